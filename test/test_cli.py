"""The command line: JSON lines, annotated frames, and one clear error per bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from compressed_perception.benchmark import STAGES, BenchResult, table
from compressed_perception.cli import main
from compressed_perception.resources import resolve_model
from compressed_perception.runtime.manifest import load_manifest

from conftest import FRAMES_DIR, fitted_detector_on


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_detect_writes_json_lines_and_annotations(tmp_path, capsys, frame_paths):
    out = tmp_path / "det.jsonl"
    code, stdout, _ = _run(
        capsys,
        "detect",
        frame_paths[0],
        frame_paths[1],
        "--json",
        out,
        "--annotate",
        tmp_path / "ann",
    )
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in records] == [str(frame_paths[0]), str(frame_paths[1])]
    first = records[0]
    assert (first["frame"], first["width"], first["height"]) == (0, 768, 576)
    assert set(first["latency_ms"]) == {"preprocess", "inference", "postprocess"}
    people = [d for d in first["detections"] if d["label"] == "person"]
    assert len(people) >= 3
    for det in first["detections"]:
        x1, y1, x2, y2 = det["box"]
        assert 0 <= x1 < x2 <= 768 and 0 <= y1 < y2 <= 576
        assert det["score"] >= 0.35
        assert set(det) == {"class_id", "label", "score", "box"}
    annotated = sorted(p.name for p in (tmp_path / "ann").iterdir())
    assert annotated == [f"{frame_paths[0].stem}.jpg", f"{frame_paths[1].stem}.jpg"]
    assert "2 frames" in stdout and "person" in stdout
    assert first["unfitted"] is None and "less faithful" not in stdout


def test_detect_says_which_frames_a_fitted_input_does_not_fit(tmp_path, capsys, frames):
    """The build's input trimmed to 4:3 frames; a square image is still detected, and the
    record and summary say it is seen less faithfully than by the original."""
    pytest.importorskip("torch", reason="fitting the input needs torch ([torch] extra)")
    model = fitted_detector_on(tmp_path / "model", frames).manifest.path
    square, wide = tmp_path / "square.png", tmp_path / "wide.png"
    cv2.imwrite(str(square), frames[0][:, :576])
    cv2.imwrite(str(wide), frames[0])
    out = tmp_path / "det.jsonl"
    code, stdout, err = _run(capsys, "detect", square, wide, "--model", model, "--json", out)
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[0]["unfitted"].startswith("576x576 frames do not fit the 416x352 input")
    assert records[1]["unfitted"] is None and records[1]["detections"]
    assert "\n1 frames less faithful: 576x576 frames do not fit" in stdout


def test_detect_video_numbers_frames(tmp_path, capsys, frames):
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (768, 576))
    for image in frames[:3]:
        writer.write(image)
    writer.release()
    out = tmp_path / "det.jsonl"
    code, _, _ = _run(capsys, "detect", video, "--json", out, "--classes", "person")
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["frame"] for r in records] == [0, 1, 2]
    assert all(d["label"] == "person" for r in records for d in r["detections"])
    assert all(len(r["detections"]) >= 3 for r in records)


def _png(path, image):
    ok, data = cv2.imencode(".png", image)
    assert ok
    path.write_bytes(data.tobytes())
    return path


BAD_IMAGES = {
    "gray.png": (lambda p: _png(p, np.zeros((20, 30), np.uint8)), "1 channel"),
    "rgba.png": (lambda p: _png(p, np.zeros((20, 30, 4), np.uint8)), "4"),
    "deep.png": (lambda p: _png(p, np.zeros((20, 30, 3), np.uint16)), "16-bit"),
    "empty.jpg": (lambda p: p.write_bytes(b""), "not a readable image"),
    "text.jpg": (lambda p: p.write_text("hello"), "not a readable image"),
    "broken.avi": (lambda p: p.write_bytes(b"\x00" * 100), "video"),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_input_is_named_and_no_json_left(tmp_path, capsys, frame_paths, name):
    make, message = BAD_IMAGES[name]
    bad = tmp_path / name
    make(bad)
    out = tmp_path / "det.jsonl"
    code, _, err = _run(capsys, "detect", frame_paths[0], bad, "--json", out)
    assert code == 2
    assert str(bad) in err
    assert message in err
    assert err.count("\n") == 1  # one clear line, no traceback
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no partial file either


def test_missing_path_and_unsupported_file(tmp_path, capsys):
    code, _, err = _run(capsys, "detect", tmp_path / "nope.jpg")
    assert code == 2 and "nope.jpg: no such file or folder" in err
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    code, _, err = _run(capsys, "detect", notes)
    assert code == 2 and "notes.txt: not an image or video file" in err
    code, _, err = _run(capsys, "detect", tmp_path)
    assert code == 2 and "folder holds no image or video files" in err


def test_unknown_backend_and_class(capsys, frame_paths):
    code, _, err = _run(capsys, "detect", frame_paths[0], "--backend", "tflite")
    assert code == 2 and "unknown backend 'tflite'" in err
    code, _, err = _run(capsys, "detect", frame_paths[0], "--classes", "unicorn")
    assert code == 2 and "'unicorn' is neither a class name nor an id" in err


def _tampered_share(tmp_path: Path, relative: str) -> Path:
    """A share folder with the FP32 original and the shipped default list, where the
    manifest's main file of `relative` (under models/) has lost its last bytes."""
    models = FRAMES_DIR.parents[1] / "models"
    share = tmp_path / "share" / "models"
    shutil.copytree(models / "nanodet_g", share / "nanodet_g")
    shutil.copyfile(models / "default.json", share / "default.json")
    folder = Path(relative).parent
    if folder.name != "nanodet_g":
        shutil.copytree(models / folder, share / folder)
    manifest = load_manifest(share / relative)
    victim = manifest.folder / next(iter(manifest.artifacts.values()))
    victim.write_bytes(victim.read_bytes()[:-10])
    return victim


def test_tampered_default_model_is_refused(tmp_path, capsys, frame_paths, monkeypatch):
    first = json.loads((FRAMES_DIR.parents[1] / "models" / "default.json").read_text())
    victim = _tampered_share(tmp_path, first["artifacts"][0])
    monkeypatch.setenv("COMPRESSED_PERCEPTION_SHARE", str(tmp_path / "share"))
    code, _, err = _run(capsys, "detect", frame_paths[0])
    assert code == 2 and f"{victim.name}: sha256" in err


def test_tampered_original_is_refused(tmp_path, capsys, frame_paths, monkeypatch):
    victim = _tampered_share(tmp_path, "nanodet_g/manifest.json")
    monkeypatch.setenv("COMPRESSED_PERCEPTION_SHARE", str(tmp_path / "share"))
    code, _, err = _run(capsys, "detect", frame_paths[0], "--model", "nanodet_g")
    assert code == 2 and f"{victim.name}: sha256" in err


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        ("auto", "nanodet_g_compressed/openvino_int8_unpruned"),
        ("openvino", "nanodet_g_compressed/openvino_int8_unpruned"),
        ("onnxruntime", "nanodet_g_compressed/ort_int8_unpruned"),
        ("torch", "nanodet_g"),
    ],
)
def test_default_model_follows_the_backend_asked_for(backend, expected):
    """No model named: the shipped list's best model that `backend` runs (`--backend
    onnxruntime` gets ONNX Runtime's INT8 model, not an error about the OpenVINO one
    ranked first), and the FP32 original for PyTorch, the one with a checkpoint."""
    if "openvino" in expected:
        pytest.importorskip("openvino", reason="OpenVINO is not installed on this platform")
    models = FRAMES_DIR.parents[1] / "models"
    assert resolve_model(None, backend) == models / expected / "manifest.json"


def test_bench_reports_stages(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, stdout, _ = _run(
        capsys, "bench", "--backend", "onnxruntime", "--size", "320x240", "--iterations", "5",
        "--json", out,
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())["results"][0]
    assert (result["backend"], result["width"], result["height"]) == ("onnxruntime", 320, 240)
    for stage in ("preprocess", "inference", "postprocess", "total"):
        stats = result["stats"][stage]
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
    assert "onnxruntime" in stdout


def test_bench_tells_apart_two_builds_of_one_model():
    """Two builds of one recipe name their models alike: each row says its folder, and
    ratios are to the first row, not to the last row bearing its name."""

    def result(folder, total, backend="openvino"):
        stats = {stage: dict.fromkeys(("p50", "p90", "p99"), total) for stage in STAGES}
        return BenchResult(backend, 640, 480, 10, stats, "student", folder)

    text = table([result("/a", 10.0), result("/b", 5.0), result("/c", 20.0)])
    assert "student openvino (/a)  640x480" in text
    assert "student openvino (/b)  640x480" in text
    assert "ratio student openvino (/b) / student openvino (/a) at 640x480: 0.50" in text
    assert "ratio student openvino (/c) / student openvino (/a) at 640x480: 2.00" in text
    one_build = table([result("/a", 10.0), result("/a", 30.0, "torch")])
    assert "ratio student torch / student openvino at 640x480: 3.00" in one_build


def test_bench_rejects_bad_size(capsys):
    code, _, err = _run(capsys, "bench", "--size", "640by480")
    assert code == 2 and "'640by480' is not WIDTHxHEIGHT" in err


def test_counts_and_the_environment_are_checked_by_name(capsys, monkeypatch):
    with pytest.raises(SystemExit) as stopped:
        main(["bench", "--model", "nanodet_g", "--iterations", "0"])
    assert stopped.value.code == 2
    assert "argument --iterations: 0 is less than 1" in capsys.readouterr().err
    monkeypatch.setenv("ROS_DOMAIN_ID", "abc")
    code, _, err = _run(capsys, "node", "--transport", "dds")
    assert code == 2 and "ROS_DOMAIN_ID: 'abc' is not a whole number" in err


def test_an_output_path_that_cannot_be_made_is_named(tmp_path, capsys, frame_paths):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    code, _, err = _run(
        capsys, "detect", frame_paths[0], "--model", "nanodet_g", "--annotate", blocker / "sub"
    )
    assert code == 2 and f"Not a directory: '{blocker / 'sub'}'" in err


def test_annotated_frames_of_sources_sharing_a_name_do_not_overwrite(tmp_path, capsys, frame_paths):
    for folder, source in (("a", frame_paths[0]), ("b", frame_paths[1])):
        (tmp_path / folder).mkdir()
        shutil.copyfile(source, tmp_path / folder / "x.jpg")
    out = tmp_path / "annotated"
    code, _, err = _run(
        capsys, "detect", tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg",
        "--model", "nanodet_g", "--annotate", out,
    )  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["x-2.jpg", "x.jpg"]
    first, second = (cv2.imread(str(out / name)) for name in ("x.jpg", "x-2.jpg"))
    assert np.abs(first.astype(int) - second.astype(int)).mean() > 1  # two different frames
