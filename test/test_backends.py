"""Every backend honours the same contract and gives the same answer on real frames."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from compressed_perception.errors import BackendError, ConfigError, IntegrityError, ModelError
from compressed_perception.runtime.backends import open_backend
from compressed_perception.runtime.manifest import load_manifest
from compressed_perception.runtime.preprocess import Letterbox

from conftest import MODEL_DIR


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(MODEL_DIR)


def _letterboxed(frames, count):
    letterbox = Letterbox(416, 416, batch=count)
    for slot in range(count):
        letterbox(frames[slot * 9], slot=slot)
    return letterbox.buffer


def test_onnxruntime_matches_torch_on_real_frames(manifest, frames):
    ort_backend = open_backend(manifest, "onnxruntime")
    torch_backend = open_backend(manifest, "torch")
    for image in _letterboxed(frames, 4):
        batch = image[None]
        ort_boxes, ort_scores = (a.copy() for a in ort_backend.infer(batch))
        ref_boxes, ref_scores = torch_backend.infer(batch)
        assert ort_boxes.shape == (1, 3549, 4)
        assert ort_scores.shape == (1, 3549, 80)
        assert np.abs(ort_boxes - ref_boxes).max() < 0.05
        assert np.abs(ort_scores - ref_scores).max() < 1e-4
        assert ort_scores.max() > 0.5  # a street scene: confident people somewhere


def test_onnxruntime_reuses_output_buffers(manifest, frames):
    backend = open_backend(manifest, "onnxruntime")
    images = _letterboxed(frames, 2)
    first = backend.infer(images[:1])
    kept = first[1].copy()
    second = backend.infer(images[1:])
    assert second[1] is first[1]  # the same preallocated array, written in place
    assert not np.array_equal(kept, second[1])


def test_static_batch_model_refuses_other_batch(manifest, frames):
    backend = open_backend(manifest, "onnxruntime")
    with pytest.raises(BackendError, match="model takes batch 1, got 2"):
        backend.infer(_letterboxed(frames, 2))


def test_auto_runs_what_the_model_has(manifest):
    assert open_backend(manifest, "auto").name in ("openvino", "onnxruntime")
    torch_only = replace(manifest, artifacts={"torch": manifest.artifacts["torch"]})
    assert open_backend(torch_only, "auto").name == "torch"
    with pytest.raises(BackendError, match="no backend here can run its artifacts"):
        open_backend(replace(manifest, artifacts={}), "auto")


def test_unknown_backend(manifest):
    with pytest.raises(BackendError, match=r"unknown backend 'tflite'.*onnxruntime"):
        open_backend(manifest, "tflite")


@pytest.mark.parametrize("kind", ["auto", "onnxruntime", "openvino"])
def test_a_negative_thread_count_is_refused_alike_by_every_backend(manifest, kind):
    with pytest.raises(ConfigError, match=r"threads: -3 is below 0 \(0: the backend's default\)"):
        open_backend(manifest, kind, threads=-3)


@pytest.fixture
def model_copy(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("manifest.json", "nanodet_g.onnx", "nanodet_g.pt"):
        shutil.copyfile(MODEL_DIR / name, folder / name)
    return folder


@pytest.mark.parametrize(
    ("kind", "file"), [("onnxruntime", "nanodet_g.onnx"), ("torch", "nanodet_g.pt")]
)
def test_tampered_model_file_is_refused(model_copy, kind, file):
    data = bytearray((model_copy / file).read_bytes())
    data[len(data) // 2] ^= 0x01
    (model_copy / file).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=f"{file}: sha256"):
        open_backend(load_manifest(model_copy), kind)


def test_truncated_model_file_is_refused(model_copy):
    path = model_copy / "nanodet_g.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(IntegrityError, match=r"nanodet_g\.onnx: sha256.*truncated"):
        open_backend(load_manifest(model_copy), "onnxruntime")


def test_missing_model_file_is_named(model_copy):
    (model_copy / "nanodet_g.pt").unlink()
    with pytest.raises(ModelError, match=r"nanodet_g\.pt: torch model file .* is missing"):
        open_backend(load_manifest(model_copy), "torch")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "unreadable model manifest"),
        ('{"format": "other"}', "format 'other'"),
        ('{"format": "compressed_perception/manifest@1"}', "malformed model manifest"),
        ("[]", "malformed model manifest .*a manifest is a JSON object, got list"),
    ],
)
def test_bad_manifest(tmp_path, text, message):
    path = tmp_path / "manifest.json"
    path.write_text(text)
    with pytest.raises(ModelError, match=message):
        load_manifest(path)


@pytest.mark.parametrize("artifacts", [{"onnx": "x.onnx"}, ["onnx"]])
def test_artifacts_of_the_wrong_shape_are_a_malformed_manifest(tmp_path, artifacts):
    data = json.loads((MODEL_DIR / "manifest.json").read_text())
    data["artifacts"] = artifacts
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match=r"manifest\.json: malformed model manifest"):
        load_manifest(tmp_path)


def test_missing_manifest(tmp_path):
    with pytest.raises(ModelError, match="model manifest not found"):
        load_manifest(tmp_path / "nope.json")


@pytest.mark.parametrize("kind", ["onnxruntime", "torch"])
def test_a_manifest_listing_other_classes_than_the_model_scores_is_named(model_copy, frames, kind):
    from compressed_perception.runtime.detector import Detector

    data = json.loads((model_copy / "manifest.json").read_text())
    data["classes"] = ["person"]
    (model_copy / "manifest.json").write_text(json.dumps(data))
    detector = Detector.open(model_copy, kind)
    with pytest.raises(
        ModelError, match=r"manifest\.json: the model scores 80 classes, its manifest lists 1"
    ):
        detector.detect(frames[0])
