"""The whole build, end to end, on the quick recipe: real pruning, distillation, ModelOpt
and ONNX Runtime quantization, measured on committed held-out frames."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import onnx
import pytest

from compressed_perception.cli import main
from compressed_perception.compress.build import build
from compressed_perception.compress.recipe import load_recipe
from compressed_perception.compress.report import load_report
from compressed_perception.runtime.detector import Detector
from compressed_perception.runtime.manifest import load_manifest

from conftest import FRAMES_DIR, ROOT

RECIPE = ROOT / "config" / "build.yaml"
STAGES = {"prune", "distill", "ort-int8", "ort-int8-unpruned", "quantize_qdq"}


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("build")
    files = build(
        load_recipe(RECIPE, quick=True), out, log=lambda _: None, progress=False, quick=True
    )
    return out, files


def test_report_has_every_stage_measured(quick_build):
    _, files = quick_build
    assert {files[k].name for k in ("json", "md", "png")} == {
        "report.json",
        "report.md",
        "report.png",
    }
    report = load_report(files["json"])
    rows = {(m.stage, m.backend): m for m in report.measurements}
    assert set(rows) == {
        ("fp32", "onnxruntime"),
        ("fp32", "torch"),
        ("pruned", "onnxruntime"),
        ("distilled", "onnxruntime"),
        ("ort-int8", "onnxruntime"),
        ("ort-int8-unpruned", "onnxruntime"),
        ("qdq-int8", "onnxruntime"),
    }
    assert rows[("fp32", "onnxruntime")].accuracy == {"map": 1.0, "map50": 1.0}
    assert rows[("ort-int8-unpruned", "onnxruntime")].accuracy["map50"] > 0.8
    assert rows[("pruned", "onnxruntime")].macs < 0.5 * rows[("fp32", "onnxruntime")].macs
    assert all(m.latency_ms["p50"] > 0 for m in report.measurements)
    assert (
        rows[("ort-int8", "onnxruntime")].file_bytes < rows[("distilled", "onnxruntime")].file_bytes
    )
    assert set(report.stages) == STAGES
    assert report.skipped.get("tensorrt")
    assert {t.name for t in report.targets} >= {
        "CPU artifact latency / ORT FP32",
        "Q/DQ agreement mAP",
    }
    assert "NOT MET" in files["md"].read_text() or all(t.met for t in report.targets)


def test_artifacts_are_complete_models(quick_build, frames):
    out, _ = quick_build
    stages = {p.name.rsplit("-", 1)[0]: p for p in (out / "stages").iterdir()}
    qdq = onnx.load(str(stages["quantize_qdq"] / "model.onnx"))
    ops = {n.op_type for n in qdq.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    for name in ("ort-int8", "quantize_qdq", "distill"):
        manifest = load_manifest(stages[name])
        assert manifest.classes[0] == "person"
        result = Detector(manifest, _backend(manifest)).detect(frames[0])
        assert result.detections.boxes.shape[1] == 4
    assert load_manifest(stages["ort-int8"]).precision == "int8"
    losses = json.loads((stages["distill"] / "losses.json").read_text())
    assert len(losses["total"]) == load_recipe(RECIPE, quick=True).distill.steps
    assert (stages["distill"] / "losses.png").stat().st_size > 1000


def _backend(manifest):
    from compressed_perception.runtime.backends import open_backend

    return open_backend(manifest, "onnxruntime")


def test_rerun_is_served_from_cache_and_a_changed_setting_redoes_what_depends_on_it(
    quick_build,
):
    out, _ = quick_build
    recipe = load_recipe(RECIPE, quick=True)
    build(recipe, out, log=lambda _: None, progress=False, quick=True)
    again = load_report(out / "report.json")
    assert all(stage["cached"] for stage in again.stages.values())
    changed = dataclasses.replace(recipe, distill=dataclasses.replace(recipe.distill, steps=2))
    build(changed, out, log=lambda _: None, progress=False, quick=True)
    report = load_report(out / "report.json")
    cached = {name: stage["cached"] for name, stage in report.stages.items()}
    assert cached == {
        "prune": True,
        "distill": False,
        "ort-int8": False,
        "ort-int8-unpruned": True,
        "quantize_qdq": False,
    }


def test_cli_refuses_a_bad_recipe(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("prune: {ratio: 0.95}\n")
    assert main(["build", "--config", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "prune ratio: 0.95 is outside" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_too_few_training_frames(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"train: {{source: {FRAMES_DIR}}}\nevaluate: {{source: {FRAMES_DIR}}}\n"
        "prune: null\ndistill: null\nquantize_qdq: null\n"
        "quantize_ort: {calibration_frames: 300}\n"
    )
    assert main(["build", "--config", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "40 frames selected, at least 300 needed" in err and str(FRAMES_DIR) in err
    assert not list((tmp_path / "out").glob("stages/*"))
