"""The TensorRT layer: settings, version and GPU checks anywhere; a real build where a GPU is."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest

from compressed_perception.compress.tensorrt import (
    TENSORRT_MISSING,
    EngineSettings,
    build_engine,
    build_record,
    input_profile,
    strongly_typed,
    tensorrt_available,
)
from compressed_perception.errors import BackendError, ConfigError, ModelError
from compressed_perception.runtime import cuda
from compressed_perception.runtime.backends import open_backend
from compressed_perception.runtime.backends.tensorrt import check_engine_compatible, version_tuple
from compressed_perception.runtime.manifest import (
    TensorSpec,
    create_manifest,
    load_manifest,
)
from compressed_perception.runtime.preprocess import Letterbox

from conftest import MODEL_DIR

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA_BINDING = any(importlib.util.find_spec(name) is not None for name in ("pycuda", "cuda"))
REBUILD = "compressed-perception build --config <recipe> --out <dir>"
HERE = {"version": "10.3.0.26", "gpu": "NVIDIA Jetson AGX Orin", "compute_capability": "8.7"}


@pytest.fixture(scope="module")
def source():
    return load_manifest(MODEL_DIR)


def _engine_manifest(folder, **built):
    """A manifest with an engine file that is never deserialized: the checks come first."""
    folder.mkdir(exist_ok=True)
    (folder / "model.engine").write_bytes(b"not an engine")
    record = build_record(
        EngineSettings(),
        **{**HERE, **built},
        input_shape=(1, 416, 416, 3),
        onnx_sha256="0" * 64,
        strongly_typed=True,
    )
    return create_manifest(
        folder,
        {"tensorrt": "model.engine"},
        name="m",
        classes=("person",),
        precision="int8",
        build=record,
    )


def test_default_settings():
    assert dataclasses.astuple(EngineSettings()) == (1024, True, True, 1)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("workspace_mb", 0, "engine workspace_mb: 0 is not a positive whole number"),
        ("workspace_mb", 512.5, "engine workspace_mb: 512.5 is not a positive"),
        ("workspace_mb", True, "engine workspace_mb: True is not a positive"),
        ("max_batch", -2, "engine max_batch: -2 is not a positive"),
        ("fp16", "yes", "engine fp16: 'yes' is not true or false"),
        ("timing_cache", 1, "engine timing_cache: 1 is not true or false"),
    ],
)
def test_bad_settings_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        EngineSettings(**{field: value})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10.1.0.27", (10, 1)), ("8.6.1", (8, 6)), ("11.0", (11, 0)), ("10.13.3.9", (10, 13))],
)
def test_version_tuple(text, expected):
    assert version_tuple(text) == expected


@pytest.mark.parametrize("text", ["10", "ten.one", "", "10.x.1"])
def test_bad_version_is_refused(text):
    with pytest.raises(BackendError, match=r"is not MAJOR\.MINOR"):
        version_tuple(text)


@pytest.mark.parametrize(
    ("version", "typed"),
    [
        ("8.6.1.6", False),
        ("10.0.1.6", False),
        ("10.1.0.27", True),
        ("10.9.0", True),
        ("11.1", True),
    ],
)
def test_strong_typing_from_10_1(version, typed):
    assert strongly_typed(version) is typed


def test_fixed_batch_model_has_no_profile():
    assert input_profile(TensorSpec(batch=1), 1, MODEL_DIR / "m.onnx") is None


def test_dynamic_batch_profile_spans_one_to_max():
    spec = TensorSpec(height=320, width=416, batch=None)
    assert input_profile(spec, 8, MODEL_DIR / "m.onnx") == (
        (1, 320, 416, 3),
        (8, 320, 416, 3),
        (8, 320, 416, 3),
    )


def test_max_batch_beyond_a_fixed_batch_is_refused():
    with pytest.raises(ConfigError, match=r"max_batch: 4, but .*m\.onnx has a fixed batch of 1"):
        input_profile(TensorSpec(batch=1), 4, MODEL_DIR / "m.onnx")


def test_build_record():
    record = build_record(
        EngineSettings(workspace_mb=2048, fp16=False),
        version="10.1.0.27",
        gpu="NVIDIA Jetson AGX Orin",
        compute_capability="8.7",
        input_shape=(1, 416, 416, 3),
        onnx_sha256="ab" * 32,
        strongly_typed=True,
    )
    assert record == {
        "tensorrt": {
            "version": "10.1.0.27",
            "gpu": "NVIDIA Jetson AGX Orin",
            "compute_capability": "8.7",
            "input_shape": [1, 416, 416, 3],
            "source_onnx_sha256": "ab" * 32,
            "strongly_typed": True,
            "fp16": False,
            "workspace_mb": 2048,
        }
    }


def test_engine_from_this_machine_is_accepted(tmp_path):
    manifest = _engine_manifest(tmp_path / "model")
    manifest.save()
    reloaded = load_manifest(tmp_path / "model")  # the record survives the JSON round trip
    check_engine_compatible(reloaded, "10.3.1.4", HERE["gpu"], HERE["compute_capability"])


@pytest.mark.parametrize(
    ("built", "message"),
    [
        ({"version": "10.1.0.27"}, "built with TensorRT 10.1.0.27, this is TensorRT 10.3.0.26"),
        ({"version": "8.6.1.6"}, "built with TensorRT 8.6.1.6, this is TensorRT 10.3.0.26"),
        ({"gpu": "NVIDIA GeForce RTX 4090"}, "built on GPU 'NVIDIA GeForce RTX 4090', this is"),
        ({"compute_capability": "8.9"}, "built for compute capability 8.9, this GPU has 8.7"),
    ],
)
def test_engine_from_another_machine_is_refused(tmp_path, built, message):
    manifest = _engine_manifest(tmp_path / "model", **built)
    with pytest.raises(BackendError) as refused:
        check_engine_compatible(manifest, **HERE)
    assert message in str(refused.value)
    assert str(manifest.path) in str(refused.value)
    assert REBUILD in str(refused.value)


def test_every_difference_is_named(tmp_path):
    manifest = _engine_manifest(
        tmp_path / "model", version="10.1.0", gpu="Other", compute_capability="9.0"
    )
    with pytest.raises(BackendError, match=r"TensorRT 10\.1\.0.*GPU 'Other'.*capability 9\.0"):
        check_engine_compatible(manifest, **HERE)


def test_engine_without_build_record_is_refused(tmp_path):
    manifest = _engine_manifest(tmp_path / "model")
    del manifest.build["tensorrt"]["gpu"]
    with pytest.raises(BackendError, match=f"does not record the engine's gpu; rebuild.*{REBUILD}"):
        check_engine_compatible(manifest, **HERE)


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_tensorrt_unavailable_reason():
    assert tensorrt_available() == TENSORRT_MISSING


@pytest.mark.skipif(HAS_CUDA_BINDING, reason="a CUDA binding is installed here")
def test_cuda_without_binding_names_what_to_install():
    with pytest.raises(BackendError, match=r"neither pycuda nor cuda-python.*pip install pycuda"):
        cuda.device_info()


def test_model_without_engine_is_refused_by_name(source):
    with pytest.raises(
        ModelError, match=r"no tensorrt artifact in this manifest \(has: onnx, torch\)"
    ):
        open_backend(source, "tensorrt")


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_auto_prefers_an_engine_and_says_what_to_install(tmp_path):
    manifest = _engine_manifest(tmp_path / "model")
    with pytest.raises(
        BackendError, match=r"TensorRT is not available here .*pip install tensorrt"
    ):
        open_backend(manifest, "auto")


def test_tampered_engine_is_refused_before_tensorrt(tmp_path):
    manifest = _engine_manifest(tmp_path / "model")
    (tmp_path / "model" / "model.engine").write_bytes(b"tampered")
    with pytest.raises(ModelError, match=r"model\.engine: sha256"):
        open_backend(manifest, "tensorrt")


def _letterboxed(frames, count):
    letterbox = Letterbox(416, 416, batch=count)
    for slot in range(count):
        letterbox(frames[slot * 9], slot=slot)
    return letterbox.buffer


def test_engine_matches_onnxruntime_on_real_frames(tmp_path, source, frames):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install tensorrt)")
    reason = tensorrt_available()
    if reason is not None:
        pytest.skip(reason)
    cache = tmp_path / "timing.cache"
    # FP32 ONNX without Q/DQ and no FP16: the engine should agree with ONNX Runtime closely
    settings = EngineSettings(fp16=False)
    built = build_engine(source.artifact("onnx"), source, tmp_path / "engine", settings, cache)
    assert cache.stat().st_size > 0
    assert built.precision == "fp32"
    assert built.build["tensorrt"]["input_shape"] == [1, 416, 416, 3]
    engine = open_backend(load_manifest(tmp_path / "engine"), "tensorrt")
    reference = open_backend(source, "onnxruntime")
    try:
        for image in _letterboxed(frames, 4):
            boxes, scores = (a.copy() for a in engine.infer(image[None]))
            ref_boxes, ref_scores = reference.infer(image[None])
            assert boxes.shape == ref_boxes.shape == (1, 3549, 4)
            assert scores.shape == ref_scores.shape == (1, 3549, 80)
            assert np.abs(boxes - ref_boxes).max() < 0.5  # TF32 convolutions: px
            assert np.abs(scores - ref_scores).max() < 0.01
    finally:
        engine.close()
