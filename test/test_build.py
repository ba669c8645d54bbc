"""The whole build, end to end, on the quick recipe: real pruning, distillation, ModelOpt
and ONNX Runtime quantization, measured on committed held-out frames."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the build needs the build extra")
pytest.importorskip("torch", reason="the build needs the build extra")
pytest.importorskip("nncf", reason="the build needs the build extra")

from compressed_perception.cli import main  # noqa: E402
from compressed_perception.compress import graph_rules  # noqa: E402
from compressed_perception.compress.build import build  # noqa: E402
from compressed_perception.compress.measure import CLASS_TABLE, MOVED  # noqa: E402
from compressed_perception.compress.quantize_openvino import (  # noqa: E402
    int8_convolutions,
    quantized_decode,
)
from compressed_perception.compress.recipe import load_recipe  # noqa: E402
from compressed_perception.compress.report import load_report, summary  # noqa: E402
from compressed_perception.runtime.detector import Detector  # noqa: E402
from compressed_perception.runtime.manifest import FITTED_FROM, load_manifest  # noqa: E402

from conftest import FRAMES_DIR, MODEL_DIR, ROOT  # noqa: E402

RECIPE = ROOT / "config" / "build.yaml"
STAGES = {
    "fit_input",
    "prune",
    "reconstruct",
    "distill",
    "ort-int8",
    "ort-int8-unpruned",
    "openvino-int8",
    "openvino-int8-unpruned",
    "quantize_qdq",
    "quantize_qdq-unpruned",
}


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("build")
    files = build(
        load_recipe(RECIPE, quick=True), out, log=lambda _: None, progress=False, quick=True
    )
    return out, files


def test_report_has_every_stage_measured(quick_build):
    out, files = quick_build
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
        ("fp32", "openvino"),
        ("fitted", "onnxruntime"),
        ("pruned", "onnxruntime"),
        ("reconstructed", "onnxruntime"),
        ("distilled", "onnxruntime"),
        ("ort-int8", "onnxruntime"),
        ("ort-int8-unpruned", "onnxruntime"),
        ("openvino-int8", "openvino"),
        ("openvino-int8-unpruned", "openvino"),
        ("qdq-int8", "onnxruntime"),
        ("qdq-int8-unpruned", "onnxruntime"),
        (MOVED, "onnxruntime"),
    }
    assert rows[("fp32", "onnxruntime")].accuracy == {"map": 1.0, "map50": 1.0}
    # the yardstick: the same file on moved frames, never timed, never a CPU artifact
    yardstick = rows[(MOVED, "onnxruntime")]
    assert yardstick.latency_ms is None and not yardstick.cpu
    assert yardstick.path == rows[("fp32", "onnxruntime")].path
    assert 0.0 < yardstick.accuracy["map50"] <= 1.0 and yardstick.classes
    assert rows[("fp32", "openvino")].accuracy["map50"] > 0.98  # f32 inference, not bf16
    assert rows[("ort-int8-unpruned", "onnxruntime")].accuracy["map50"] > 0.8
    assert rows[("openvino-int8-unpruned", "openvino")].accuracy["map50"] > 0.8
    # the input trimmed to the 4:3 frames, the content on the original's grid: fewer MACs,
    # the same detections; the budget counts it, and the unpruned INT8 models start from it
    original, fitted = rows[("fp32", "onnxruntime")], rows[("fitted", "onnxruntime")]
    assert fitted.macs < 0.9 * original.macs and fitted.accuracy["map50"] > 0.98
    assert rows[("pruned", "onnxruntime")].macs <= 0.6 * original.macs
    assert report.stages["fit_input"]["input_after"] == [352, 416]
    for row in ("ort-int8-unpruned", "openvino-int8-unpruned", "qdq-int8-unpruned"):
        manifest = load_manifest(out / rows[(row, _backend_name(row))].path)
        assert (manifest.io.height, manifest.io.width) == (352, 416), row
        # what the runtime needs to tell which cameras' frames the input fits
        assert manifest.architecture[FITTED_FROM] == {"input_size": [416, 416], "stride": 32}
    # reconstruction brings the pruned model closer to the original, with no training
    assert (
        rows[("reconstructed", "onnxruntime")].accuracy["map50"]
        > rows[("pruned", "onnxruntime")].accuracy["map50"]
    )
    assert not rows[("qdq-int8", "onnxruntime")].cpu  # for TensorRT; never best.json
    assert all(m.latency_ms["p50"] > 0 for m in report.measurements if m.stage != MOVED)
    assert (
        rows[("ort-int8", "onnxruntime")].file_bytes < rows[("distilled", "onnxruntime")].file_bytes
    )
    assert set(report.stages) == STAGES
    # the keys name no machine, so the record says where each torch stage ran
    for name in ("fit_input", "prune", "reconstruct", "distill"):
        assert report.stages[name]["device"] == "cpu", name
    assert "device" not in report.stages["ort-int8"]
    assert report.skipped.get("tensorrt")
    for engine in ("tensorrt", "tensorrt-unpruned"):  # checked here, without TensorRT
        assert report.checks[engine]["preflight"] == "passed"
    assert {t.name for t in report.targets} >= {
        "openvino-int8 latency / ORT FP32",
        "Q/DQ agreement mAP@.5",
        "agreement mAP@.5 after pruning and reconstruction",
    }
    assert set(report.tables) == {"Pruning sensitivity", "Distillation validation", CLASS_TABLE}
    student = rows[("distilled", "onnxruntime")]
    # the per-class figures are what the overall means are made of
    for key in ("map", "map50"):
        per_class = [c[key] for c in student.classes.values()]
        assert np.mean(per_class) == pytest.approx(student.accuracy[key], abs=1e-3)
    text = files["md"].read_text()
    assert "## Pruning sensitivity" in text and "## Checks" in text
    assert text.startswith(summary(report)) and "## Recipe" not in summary(report)
    status = {True: "met", False: "**NOT MET**", None: "not measured"}
    lines = text.splitlines()
    for target in report.targets:  # each target's row says what its own figures say
        row = next(line for line in lines if line.startswith(f"| {target.name} | "))
        assert row.split(" | ")[3] == status[target.met], row


def test_quantization_keeps_what_the_student_sees(quick_build):
    """Each INT8 model of the student agrees with the original about as well as the FP32
    student it was made from: a Q/DQ model whose non-INT8 layers ran in fp16 lost 0.14 mAP@.5
    on ONNX Runtime, which only this comparison shows."""
    _, files = quick_build
    rows = {m.stage: m for m in load_report(files["json"]).measurements}
    student = rows["distilled"].accuracy["map50"]
    for stage in ("ort-int8", "openvino-int8", "qdq-int8"):
        assert rows[stage].accuracy["map50"] >= student - 0.1, stage


def _backend_name(row: str) -> str:
    return "openvino" if row.startswith("openvino") else "onnxruntime"


def _stages(out):
    return {p.name.rsplit("-", 1)[0]: p for p in (out / "stages").iterdir()}


def test_artifacts_are_complete_models(quick_build, frames):
    out, _ = quick_build
    stages = _stages(out)
    for name in ("ort-int8", "quantize_qdq", "distill", "openvino-int8", "reconstruct"):
        manifest = load_manifest(stages[name])
        manifest.verify()
        assert manifest.classes[0] == "person"
        result = Detector(manifest, _backend(manifest)).detect(frames[0])
        assert result.detections.boxes.shape[1] == 4
    assert load_manifest(stages["ort-int8"]).precision == "int8"
    losses = json.loads((stages["distill"] / "losses.json").read_text())
    assert len(losses["total"]) <= load_recipe(RECIPE, quick=True).stage("distill").steps
    assert losses["validation"][0]["step"] == 0
    assert (stages["distill"] / "losses.png").stat().st_size > 1000


def test_every_int8_claim_is_backed_by_the_graph(quick_build):
    """Each INT8 manifest's count of INT8 convolutions is the artifact's own: every conv
    but the first and the three head outputs reads INT8 input and INT8 weights."""
    out, _ = quick_build
    stages = _stages(out)
    for name in ("quantize_qdq", "quantize_qdq-unpruned", "ort-int8", "ort-int8-unpruned"):
        manifest = load_manifest(stages[name])
        convs = graph_rules.convolutions(graph_rules.load(manifest.artifact("onnx")))
        recorded = manifest.build["int8"]
        assert recorded["int8_convolutions"] == len(convs.int8) == convs.total - 4, name
        assert sorted(convs.other) == recorded["kept_in_higher_precision"], name
    for name in ("openvino-int8", "openvino-int8-unpruned"):
        manifest = load_manifest(stages[name])
        int8, other = int8_convolutions(manifest.artifact("openvino"))
        assert manifest.build["int8"]["int8_convolutions"] == len(int8) == 30, name
        assert len(other) == 4
        assert manifest.build["openvino"]["inference_precision"] == "f32"
        assert quantized_decode(manifest.artifact("openvino")) == [], name


def test_the_decode_check_finds_a_quantized_decode(quick_build, tmp_path):
    """NNCF left to itself quantizes the decode's MatMul; the check the stage runs sees it."""
    import nncf
    import numpy as np
    import openvino as ov

    out, _ = quick_build
    source = load_manifest(next(out.glob("stages/prune-*/manifest.json")))
    shape = (source.io.height, source.io.width, 3)
    images = np.stack([np.full(shape, v, np.uint8) for v in (40, 120, 200)])
    model = ov.Core().read_model(str(source.artifact("onnx")))
    with_decode = nncf.quantize(model, nncf.Dataset(list(images), lambda x: x[None]), subset_size=3)
    ov.save_model(with_decode, str(tmp_path / "model.xml"))
    assert quantized_decode(tmp_path / "model.xml") != []


def test_every_onnx_casts_its_uint8_input_first(quick_build):
    """TensorRT allows UINT8 only as a graph input: every ONNX the build writes, and the
    shipped ones, read `images` through a Cast."""
    out, _ = quick_build
    shipped = MODEL_DIR.parent / "nanodet_g_compressed"
    files = [*out.glob("stages/*/*.onnx"), MODEL_DIR / "nanodet_g.onnx", *shipped.glob("*/*.onnx")]
    assert len(files) >= 7
    for path in files:
        assert graph_rules.uint8_violations(graph_rules.load(path)) == [], path


def _backend(manifest):
    from compressed_perception.runtime.backends import open_backend

    return open_backend(manifest, "openvino" if "openvino" in manifest.artifacts else "onnxruntime")


def test_rerun_is_served_from_cache_and_a_changed_setting_redoes_what_depends_on_it(
    quick_build,
):
    out, _ = quick_build
    recipe = load_recipe(RECIPE, quick=True)
    build(recipe, out, log=lambda _: None, progress=False, quick=True)
    again = load_report(out / "report.json")
    assert all(stage["cached"] for stage in again.stages.values())
    distill = recipe.stage("distill")
    changed = recipe.with_stage("distill", dataclasses.replace(distill, steps=2))
    build(changed, out, log=lambda _: None, progress=False, quick=True)
    report = load_report(out / "report.json")
    cached = {name: stage["cached"] for name, stage in report.stages.items()}
    assert cached == {
        "fit_input": True,
        "prune": True,
        "reconstruct": True,
        "distill": False,
        "ort-int8": False,
        "ort-int8-unpruned": True,
        "openvino-int8": False,
        "openvino-int8-unpruned": True,
        "quantize_qdq": False,
        "quantize_qdq-unpruned": True,
    }


def test_cli_refuses_a_bad_recipe(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("prune: {macs: 1.5}\n")
    assert main(["build", "--config", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "prune macs: 1.5 is outside" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_too_few_training_frames(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"train: {{source: {FRAMES_DIR}}}\nevaluate: {{source: {FRAMES_DIR}}}\n"
        "prune: null\nreconstruct: null\ndistill: null\nquantize_qdq: null\n"
        "quantize_openvino: null\nquantize_ort: {calibration_frames: 300}\n"
    )
    assert main(["build", "--config", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "40 frames selected, at least 300 needed" in err and str(FRAMES_DIR) in err
    assert not list((tmp_path / "out").glob("stages/*"))


def test_ship_copies_what_the_report_measured(quick_build, tmp_path):
    from compressed_perception.compress.ship import ship

    out, _ = quick_build
    index = tmp_path / "default.json"
    shipped = ship(out, tmp_path / "shipped", index, "nanodet_g/manifest.json")
    report = load_report(out / "report.json")
    record = json.loads((tmp_path / "shipped" / "shipped.json").read_text())
    assert set(record["artifacts"]) >= {"fp32", "ort_int8", "openvino_int8", "qdq_int8"}
    for folder, entry in record["artifacts"].items():
        load_manifest(tmp_path / "shipped" / folder).verify()
        row = next(m for m in report.measurements if m.path == entry["build_path"])
        assert row.accuracy == entry["accuracy"] and row.stage == entry["row"]
    provenance = (tmp_path / "shipped" / "PROVENANCE.md").read_text()
    assert "frames 0-399 of" in provenance and "the last 10 only to choose" in provenance
    assert "agreement was measured on frames 0 to the end, every 1" in provenance
    order = json.loads(index.read_text())["artifacts"]
    assert order == shipped.default_order and order[-1] == "nanodet_g/manifest.json"
    for relative in order[:-1]:  # only artifacts that met the accuracy targets come first
        folder = relative.split("/")[1]
        accuracy = record["artifacts"][folder]["accuracy"]
        assert accuracy["map"] >= 0.80 and accuracy["map50"] >= 0.90


def test_ship_refuses_a_folder_without_a_report(tmp_path):
    from compressed_perception.compress.ship import ship
    from compressed_perception.errors import ModelError

    with pytest.raises(ModelError, match=r"report\.json"):
        ship(tmp_path, tmp_path / "shipped", tmp_path / "default.json", "x/manifest.json")
    assert not (tmp_path / "shipped").exists()
