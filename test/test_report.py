"""The build report: JSON that reloads, Markdown ratios from one run, a plot, atomic writes."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from compressed_perception.compress import report as report_module
from compressed_perception.compress.report import (
    Measurement,
    Report,
    Target,
    load_report,
    markdown,
    write_report,
)
from compressed_perception.errors import ConfigError, ModelError

FILES = ("report.json", "report.md", "report.png")


def _measurement(stage, backend, p50, map_=None, file_bytes=4_000_000, params=None):
    return Measurement(
        stage=stage,
        backend=backend,
        params=params,
        macs=None if params is None else params * 300,
        file_bytes=file_bytes,
        latency_ms=None if p50 is None else {"p50": p50, "p99": p50 * 1.5},
        accuracy=None if map_ is None else {"map": map_, "map50": min(1.0, map_ + 0.05)},
        path=f"{stage}/{backend}.model",
    )


def _report(**changes):
    fields = {
        "recipe": {"prune": {"ratio": 0.5}, "quantize": ["ort-int8"]},
        "machine": {"processor": "x86_64", "cpus": 2, "date": "2026-01-02T03:04:05+00:00"},
        "bench": {"size": [640, 480], "frames": 40, "iterations": 60},
        "measurements": (
            _measurement("fp32", "onnxruntime", 100.0, 1.0, 4_000_000, 1_200_000),
            _measurement("fp32", "torch", 150.0, 1.0, 4_100_000, 1_200_000),
            _measurement("pruned", "onnxruntime", 60.0, 0.8, 2_000_000, 600_000),
            _measurement("ort-int8", "onnxruntime", 30.0, 0.7, 1_000_000),
            _measurement("tensorrt", "tensorrt", None),
        ),
        "targets": (
            Target("latency vs ORT FP32", 0.3, 0.5, "<=", axis_line=("x", 50.0)),
            Target("agreement mAP", 0.7, 0.9, ">=", "INT8 activations clip the box logits"),
            Target("TensorRT latency", None, 10.0, "<="),
        ),
        "stages": {
            "prune": {"seconds": 12.5, "cached": True, "key": "ab12", "prune": {"macs_ratio": 0.5}},
            "distill": {"seconds": 300.0, "cached": False, "key": "cd34", "final_loss": 0.0123},
        },
        "skipped": {"tensorrt": "tensorrt is not installed"},
        "curves": {
            "prune ratio": [
                {"ratio": 0.3, "map": 0.9, "map50": 0.95, "latency_p50": 80.0},
                {"ratio": 0.5, "map": 0.8, "map50": 0.9, "latency_p50": 60.0},
            ]
        },
    }
    return Report(**{**fields, **changes})


def _row(text, stage, backend):
    prefix = f"| {stage} | {backend} |"
    rows = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, f"one row for {stage}/{backend}"
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def _header_cells(text):
    line = next(line for line in text.splitlines() if line.startswith("| stage | backend |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_json_round_trip(tmp_path):
    original = _report()
    paths = write_report(original, tmp_path)
    assert paths == {
        kind: tmp_path / name for kind, name in zip(("json", "md", "png"), FILES, strict=True)
    }
    assert load_report(paths["json"]) == original
    payload = json.loads(paths["json"].read_text())
    assert [t["met"] for t in payload["targets"]] == [True, False, None]


def test_ratios_come_from_rows_of_the_same_report():
    text = markdown(_report())
    header = _header_cells(text)
    int8 = dict(zip(header, _row(text, "ort-int8", "onnxruntime"), strict=True))
    assert int8["p50 vs ORT fp32"] == "0.30"
    assert int8["p50 vs torch fp32"] == "0.20"
    assert int8["size vs fp32 ONNX"] == "0.25"
    assert int8["p50 ms"] == "30.00" and int8["p99 ms"] == "45.00"
    assert int8["params M"] == "n/a" and int8["mAP"] == "0.700"
    pruned = dict(zip(header, _row(text, "pruned", "onnxruntime"), strict=True))
    assert pruned["params M"] == "0.60" and pruned["p50 vs ORT fp32"] == "0.60"
    unmeasured = dict(zip(header, _row(text, "tensorrt", "tensorrt"), strict=True))
    assert unmeasured["p50 ms"] == unmeasured["p50 vs ORT fp32"] == unmeasured["mAP"] == "n/a"


def test_ratio_columns_need_their_reference_row():
    only_onnx = tuple(m for m in _report().measurements if m.backend != "torch")
    header = _header_cells(markdown(_report(measurements=only_onnx)))
    assert "p50 vs ORT fp32" in header
    assert "p50 vs torch fp32" not in header


def test_targets_stages_skips_and_curves_are_shown():
    text = markdown(_report())
    assert (
        "| agreement mAP | 0.7 | >= 0.9 | **NOT MET** | INT8 activations clip the box logits |"
        in (text)
    )
    assert "| latency vs ORT FP32 | 0.3 | <= 0.5 | met |  |" in text
    assert "| TensorRT latency | n/a | <= 10 | not measured |  |" in text
    assert "| prune | 12.5 | yes | `ab12` | prune.macs_ratio=0.5 |" in text
    assert "| distill | 300.0 | no | `cd34` | final_loss=0.0123 |" in text
    assert "- tensorrt: tensorrt is not installed" in text
    assert "| ratio | map | map50 | latency_p50 |" in text
    assert "| 0.3 | 0.9 | 0.95 | 80 |" in text
    assert "2026-01-02T03:04:05+00:00" in text and "size: 640x480" in text


def test_target_met_follows_comparison():
    assert Target("t", 1.0, 1.0, "<=").met is True
    assert Target("t", 1.1, 1.0, "<=").met is False
    assert Target("t", 0.9, 1.0, ">=").met is False
    assert Target("t", None, 1.0, ">=").met is None
    with pytest.raises(ConfigError, match="comparison"):
        Target("t", 1.0, 1.0, "<")


def test_plot_is_a_real_image(tmp_path):
    png = write_report(_report(), tmp_path)["png"]
    image = cv2.imread(str(png))
    assert image is not None and image.shape == (600, 800, 3)
    assert image.std() > 20
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50
    blank = write_report(_report(measurements=(), targets=(), curves={}), tmp_path / "b")["png"]
    assert not np.array_equal(cv2.imread(str(blank)), image)  # the points are drawn


def test_failed_render_leaves_no_report(tmp_path, monkeypatch):
    def broken(report, dest):
        dest.write_bytes(b"\x89PNG half")
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(report_module, "render_plot", broken)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        write_report(_report(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_failed_render_keeps_previous_report(tmp_path, monkeypatch):
    write_report(_report(), tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in FILES}
    monkeypatch.setattr(report_module, "render_plot", _raise)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        write_report(_report(skipped={}), tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in FILES} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)


def _raise(report, dest):
    raise RuntimeError("renderer crashed")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("truncated", "cannot be read as JSON"),
        ("not a report", "not a report"),
        ("missing field", "missing field 'targets'"),
        ("bad measurement", "unexpected keyword argument 'latency'"),
    ],
)
def test_bad_report_file_names_path_and_problem(tmp_path, content, reason):
    good = json.loads(write_report(_report(), tmp_path)["json"].read_text())
    texts = {
        "truncated": json.dumps(good)[:200],
        "not a report": json.dumps({"format": "nanodet.manifest/1", "files": []}),
        "missing field": json.dumps({k: v for k, v in good.items() if k != "targets"}),
        "bad measurement": json.dumps(
            {**good, "measurements": [{**good["measurements"][0], "latency": 1.0}]}
        ),
    }
    path = tmp_path / "bad.json"
    path.write_text(texts[content])
    with pytest.raises(ModelError, match=reason) as error:
        load_report(path)
    assert str(path) in str(error.value)


def test_missing_report_file_names_path(tmp_path):
    path = tmp_path / "absent" / "report.json"
    with pytest.raises(ModelError, match="cannot be read") as error:
        load_report(path)
    assert str(path) in str(error.value)
