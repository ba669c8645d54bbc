"""The TensorRT layer: settings, batch profile, cache key, preflight, version and GPU checks
anywhere; a real build compared with ONNX Runtime FP32 where TensorRT and a GPU are.

On a GPU machine: `python -m pytest test/test_tensorrt.py -k build_and_compare`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import types
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

pytest.importorskip("onnx", reason="the TensorRT stage's graph checks need the build extra (onnx)")
from onnx import save

from compressed_perception.compress import tensorrt as trt_stage
from compressed_perception.compress.build import Step, stage_inputs
from compressed_perception.compress.cache import stage_key
from compressed_perception.compress.recipe import ExportSettings, Recipe, load_recipe
from compressed_perception.compress.stage import BuildContext, ModelRef
from compressed_perception.compress.tensorrt import (
    BatchProfile,
    EngineSettings,
    build_engine,
    build_record,
    input_profile,
    preflight,
    strongly_typed,
)
from compressed_perception.errors import BackendError, ConfigError, ModelError
from compressed_perception.runtime import cuda
from compressed_perception.runtime.backends import open_backend
from compressed_perception.runtime.backends.tensorrt import (
    check_engine_compatible,
    unavailable,
    version_tuple,
)
from compressed_perception.runtime.detector import DYNAMIC_BATCH_LIMIT, Detector
from compressed_perception.runtime.manifest import TensorSpec, create_manifest, load_manifest
from compressed_perception.runtime.preprocess import Letterbox

from conftest import MODEL_DIR, ROOT, conv_graph, skip_without_gpu

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA_BINDING = any(importlib.util.find_spec(name) is not None for name in ("pycuda", "cuda"))
REBUILD = "compressed-perception build --config <recipe> --out <dir>"
HERE = {"version": "10.3.0.26", "gpu": "NVIDIA Jetson AGX Orin", "compute_capability": "8.7"}
ONNX = MODEL_DIR / "m.onnx"
IMAGE = (416, 416, 3)
HELD_OUT = ROOT / "data" / "vtest_heldout"


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
        profile=input_profile(TensorSpec(), None, ONNX, dynamic_batch=False),
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


# --- settings and versions -------------------------------------------------------------


def test_default_settings():
    assert dataclasses.astuple(EngineSettings()) == (1024, True, True, None)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("workspace_mb", 0, "engine workspace_mb: 0 is not a positive whole number"),
        ("workspace_mb", 512.5, "engine workspace_mb: 512.5 is not a positive"),
        ("workspace_mb", True, "engine workspace_mb: True is not a positive"),
        ("max_batch", -2, "engine max_batch: -2 is not a positive"),
        ("max_batch", 0, "engine max_batch: 0 is not a positive"),
        ("max_batch", 2.0, "engine max_batch: 2.0 is not a positive"),
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


# --- batch profile: what the engine takes and what the runtime sends -----------------------


def test_fixed_batch_model_takes_its_one_shape():
    profile = input_profile(TensorSpec(batch=1), None, ONNX, dynamic_batch=False)
    assert profile == BatchProfile((1, *IMAGE), (1, *IMAGE), (1, *IMAGE), dynamic=False)
    assert input_profile(TensorSpec(batch=1), 1, ONNX, dynamic_batch=False) == profile


def test_dynamic_batch_engine_takes_every_batch_the_runtime_sends():
    spec = TensorSpec(batch=None)
    profile = input_profile(spec, EngineSettings().max_batch, ONNX, dynamic_batch=True)
    assert profile.dynamic
    assert profile.minimum == (1, *IMAGE)
    assert profile.optimum == profile.maximum == (DYNAMIC_BATCH_LIMIT, *IMAGE)
    detector = Detector(_dynamic_manifest(), ZeroBackend())
    assert profile.minimum[0] == 1 and profile.maximum[0] >= detector.max_batch


def test_shipped_recipe_builds_for_the_runtime_limit():
    settings = load_recipe(ROOT / "config" / "build.yaml").stage("tensorrt")
    profile = input_profile(TensorSpec(batch=None), settings.max_batch, ONNX, dynamic_batch=True)
    assert profile.maximum[0] == DYNAMIC_BATCH_LIMIT


def test_explicit_max_batch_bounds_a_dynamic_profile():
    spec = TensorSpec(height=320, width=416, batch=None)
    assert input_profile(spec, 4, ONNX, dynamic_batch=True) == BatchProfile(
        (1, 320, 416, 3), (4, 320, 416, 3), (4, 320, 416, 3), dynamic=True
    )


def test_max_batch_beyond_a_fixed_batch_is_refused():
    with pytest.raises(ConfigError, match=r"max_batch: 4, but .*m\.onnx has a fixed batch of 1"):
        input_profile(TensorSpec(batch=1), 4, ONNX, dynamic_batch=False)


def test_dynamic_recipe_on_a_fixed_batch_model_is_refused():
    with pytest.raises(ConfigError, match=r"dynamic_batch: true, but .*m\.onnx has a fixed batch"):
        input_profile(TensorSpec(batch=1), None, ONNX, dynamic_batch=True)


def test_fixed_recipe_on_a_dynamic_batch_model_is_refused():
    with pytest.raises(ConfigError, match=r"dynamic_batch: false, but .*m\.onnx has a dynamic"):
        input_profile(TensorSpec(batch=None), None, ONNX, dynamic_batch=False)


def test_build_record():
    profile = input_profile(TensorSpec(batch=None), 8, ONNX, dynamic_batch=True)
    record = build_record(
        EngineSettings(workspace_mb=2048, fp16=False),
        version="10.1.0.27",
        gpu="NVIDIA Jetson AGX Orin",
        compute_capability="8.7",
        profile=profile,
        onnx_sha256="ab" * 32,
        strongly_typed=True,
    )
    assert record == {
        "tensorrt": {
            "version": "10.1.0.27",
            "gpu": "NVIDIA Jetson AGX Orin",
            "compute_capability": "8.7",
            "profile": {
                "min": [1, 416, 416, 3],
                "opt": [8, 416, 416, 3],
                "max": [8, 416, 416, 3],
            },
            "source_onnx_sha256": "ab" * 32,
            "strongly_typed": True,
            "fp16": False,
            "workspace_mb": 2048,
        }
    }


class ZeroBackend:
    """A backend that finds nothing, recording each call's batch; `max_batch` if given."""

    name = "zero"

    def __init__(self, max_batch=None):
        if max_batch is not None:
            self.max_batch = max_batch
        self.batches = []

    def infer(self, images):
        self.batches.append(images.shape[0])
        count = images.shape[0]
        return np.zeros((count, 3549, 4), np.float32), np.zeros((count, 3549, 80), np.float32)


def _dynamic_manifest():
    return dataclasses.replace(load_manifest(MODEL_DIR), io=TensorSpec(batch=None))


def test_detector_batches_no_more_than_the_backend_takes(frames):
    backend = ZeroBackend(max_batch=3)
    detector = Detector(_dynamic_manifest(), backend)
    assert detector.max_batch == 3
    detector.detect_batch(frames[:3])
    assert backend.batches == [3]
    with pytest.raises(ConfigError, match=r"batch of 4 images; this model takes 1\.\.3"):
        detector.detect_batch(frames[:4])


def test_detector_without_a_backend_limit_takes_the_runtime_limit():
    assert Detector(_dynamic_manifest(), ZeroBackend()).max_batch == DYNAMIC_BATCH_LIMIT
    assert Detector(_dynamic_manifest(), ZeroBackend(max_batch=64)).max_batch == 8
    assert Detector(load_manifest(MODEL_DIR), ZeroBackend(max_batch=8)).max_batch == 1


def test_backend_with_a_bad_limit_is_refused():
    with pytest.raises(BackendError, match=r"backend 'zero': max_batch 0 is not a positive"):
        Detector(_dynamic_manifest(), ZeroBackend(max_batch=0))


# --- the build stage's cache key ----------------------------------------------------------


def _stage_key(monkeypatch, version, gpu=("NVIDIA H200", "9.0"), dynamic_batch=False):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))
    monkeypatch.setattr(cuda, "device_info", lambda: gpu)
    recipe = Recipe(export=ExportSettings(dynamic_batch=dynamic_batch))
    context = BuildContext(recipe, load_manifest(MODEL_DIR), log=print, progress=False)
    stage = trt_stage.STAGE
    step = Step(stage, stage.variants[0], EngineSettings())
    return stage_key(step.variant.cache, stage_inputs(step, "parent-key", context))


def test_stage_key_names_the_tensorrt_release(monkeypatch):
    key = _stage_key(monkeypatch, "10.3.0.26")
    assert _stage_key(monkeypatch, "10.3.0.26") == key
    assert _stage_key(monkeypatch, "10.4.0.1") != key
    assert _stage_key(monkeypatch, "11.0.0.1") != key


def test_stage_key_names_the_gpu_and_the_batch(monkeypatch):
    key = _stage_key(monkeypatch, "10.3.0.26")
    assert _stage_key(monkeypatch, "10.3.0.26", gpu=("NVIDIA Jetson AGX Orin", "8.7")) != key
    assert _stage_key(monkeypatch, "10.3.0.26", dynamic_batch=True) != key


def test_key_extra_records_version_device_and_batch(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.8.0.43"))
    monkeypatch.setattr(cuda, "device_info", lambda: ("NVIDIA H200", "9.0"))
    context = BuildContext(Recipe(), load_manifest(MODEL_DIR), log=print, progress=False)
    assert trt_stage._key_extra(context, EngineSettings()) == {
        "device": ["NVIDIA H200", "9.0"],
        "tensorrt_version": "10.8.0.43",
        "dynamic_batch": False,
        "dynamic_batch_limit": DYNAMIC_BATCH_LIMIT,
    }


# --- preflight: what TensorRT's importer would refuse, proven here -----------------------


def _qdq_manifest(folder, model, batch=1):
    folder.mkdir()
    save(model, str(folder / "model.onnx"))
    return create_manifest(
        folder,
        {"onnx": "model.onnx"},
        name="qdq",
        classes=("person",),
        precision="int8",
        io=TensorSpec(height=4, width=4, batch=batch),
    )


def test_preflight_passes_an_int8_model(tmp_path):
    checked = preflight(_qdq_manifest(tmp_path / "m", conv_graph()))
    assert checked == {
        "preflight": "passed",
        "opset": 19,
        "int8_convolutions": 1,
        "convolutions": 1,
    }


def test_preflight_refuses_a_qdq_model_without_int8_weights(tmp_path):
    manifest = _qdq_manifest(tmp_path / "m", conv_graph(int8_weights=False))
    with pytest.raises(ModelError, match=r"would reject .*no INT8 convolution among 1"):
        preflight(manifest)


def test_preflight_refuses_a_uint8_input_feeding_a_transpose(tmp_path):
    manifest = _qdq_manifest(tmp_path / "m", conv_graph(cast_first=False))
    with pytest.raises(ModelError, match=r"node 'permute' \(Transpose\) reads the UINT8 input"):
        preflight(manifest)


def test_preflight_refuses_the_fp32_model(source):
    with pytest.raises(ModelError, match=r"nanodet_g\.onnx: TensorRT would reject .*no INT8"):
        preflight(source)


def test_stage_check_reports_the_profile_without_tensorrt(tmp_path):
    parent = ModelRef(_qdq_manifest(tmp_path / "m", conv_graph()), "key", None, None)
    context = BuildContext(Recipe(), load_manifest(MODEL_DIR), log=print, progress=False)
    checked = trt_stage.STAGE.check(context, parent, EngineSettings())
    assert checked["preflight"] == "passed"
    assert checked["profile"] == {"min": [1, 4, 4, 3], "opt": [1, 4, 4, 3], "max": [1, 4, 4, 3]}
    dynamic_context = dataclasses.replace(
        context, recipe=Recipe(export=ExportSettings(dynamic_batch=True))
    )
    with pytest.raises(ConfigError, match=r"dynamic_batch: true, but .*model\.onnx has a fixed"):
        trt_stage.STAGE.check(dynamic_context, parent, EngineSettings())


# --- engines from elsewhere, missing pieces ---------------------------------------------


def test_engine_from_this_machine_is_accepted(tmp_path):
    manifest = _engine_manifest(tmp_path / "model")
    manifest.save()
    reloaded = load_manifest(tmp_path / "model")  # the record survives the JSON round trip
    check_engine_compatible(reloaded, "10.3.1.4", HERE["gpu"], HERE["compute_capability"])
    assert reloaded.build["tensorrt"]["profile"]["max"] == [1, 416, 416, 3]


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
    assert unavailable() == "tensorrt is not installed (pip install tensorrt pycuda)"


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
        BackendError,
        match=r"can run its artifacts \(tensorrt\); install one of: tensorrt: pip install tensorrt",
    ):
        open_backend(manifest, "auto")


def test_tampered_engine_is_refused_before_tensorrt(tmp_path):
    manifest = _engine_manifest(tmp_path / "model")
    (tmp_path / "model" / "model.engine").write_bytes(b"tampered")
    with pytest.raises(ModelError, match=r"model\.engine: sha256"):
        open_backend(manifest, "tensorrt")


# --- the real thing: build an engine here and compare it with ONNX Runtime FP32 ------------


def _needs_tensorrt_and_gpu():
    reason = unavailable()
    if reason is not None:
        skip_without_gpu(f"needs TensorRT and a GPU: {reason}")


def _held_out():
    """The committed held-out frames (never trained or calibrated on), letterboxed."""
    paths = sorted(HELD_OUT.glob("*.jpg"))
    assert len(paths) >= 8, f"{HELD_OUT}: expected the committed held-out frames"
    letterbox = Letterbox(IMAGE[1], IMAGE[0], batch=len(paths))
    for slot, path in enumerate(paths):
        letterbox(cv2.imread(str(path)), slot=slot, name=str(path))
    return letterbox.buffer.copy()


def _assert_agrees(engine, reference, images):
    """The engine's outputs on `images` (one call) agree with ONNX Runtime's, frame by frame."""
    boxes, scores = (a.copy() for a in engine.infer(images))
    assert boxes.shape == (len(images), 3549, 4) and scores.shape == (len(images), 3549, 80)
    for i, image in enumerate(images):
        ref_boxes, ref_scores = reference.infer(image[None])
        assert np.abs(boxes[i] - ref_boxes[0]).max() < 0.5  # TF32 convolutions: px
        assert np.abs(scores[i] - ref_scores[0]).max() < 0.01


def _driver_stack_top():
    """The driver's current context under pycuda, None under cuda-python (see cuda.py)."""
    binding = cuda._driver()
    return cuda._DriverStack().current() if isinstance(binding, cuda._PyCuda) else None


def test_build_and_compare_fixed_batch_engine_with_onnxruntime(tmp_path, source):
    _needs_tensorrt_and_gpu()
    cache = tmp_path / "timing.cache"
    # FP32 ONNX without Q/DQ and no FP16: the engine should agree with ONNX Runtime closely
    settings = EngineSettings(fp16=False)
    onnx = source.artifact("onnx")
    built = build_engine(onnx, source, tmp_path / "engine", settings, cache, dynamic_batch=False)
    assert cache.stat().st_size > 0
    assert built.precision == "fp32"
    assert built.build["tensorrt"]["profile"]["max"] == [1, 416, 416, 3]
    reference = open_backend(source, "onnxruntime")

    def serve():
        """On a thread CUDA has not touched yet, so nothing else sets its current context."""
        before = _driver_stack_top()
        engine = open_backend(load_manifest(tmp_path / "engine"), "tensorrt")
        try:
            assert (engine.min_batch, engine.max_batch) == (1, 1)
            for image in _held_out():
                _assert_agrees(engine, reference, image[None])
        finally:
            engine.close()
        return before, _driver_stack_top()

    with ThreadPoolExecutor(1) as pool:
        before, after = pool.submit(serve).result()
    assert after == before  # close left nothing pushed (pycuda)


def test_build_and_compare_dynamic_batch_engine_with_onnxruntime(tmp_path, source):
    _needs_tensorrt_and_gpu()
    pytest.importorskip("torch", reason="exporting a dynamic-batch ONNX needs torch")
    from compressed_perception.compress.artifacts import torch_model
    from compressed_perception.compress.export import export_onnx

    folder = tmp_path / "dynamic"
    folder.mkdir()
    spec = export_onnx(torch_model(source, "the test"), folder / "model.onnx", dynamic_batch=True)
    dynamic = create_manifest(
        folder,
        {"onnx": "model.onnx"},
        name="nanodet-g-dynamic",
        classes=source.classes,
        precision="fp32",
        io=spec,
    )
    settings = EngineSettings(fp16=False, timing_cache=False)
    built = build_engine(
        folder / "model.onnx", dynamic, tmp_path / "engine", settings, None, dynamic_batch=True
    )
    assert built.build["tensorrt"]["profile"]["max"] == [DYNAMIC_BATCH_LIMIT, *IMAGE]
    engine = open_backend(load_manifest(tmp_path / "engine"), "tensorrt")
    reference = open_backend(source, "onnxruntime")
    try:
        assert (engine.min_batch, engine.max_batch) == (1, DYNAMIC_BATCH_LIMIT)
        assert Detector(built, engine).max_batch == DYNAMIC_BATCH_LIMIT
        images = _held_out()
        for batch in (2, DYNAMIC_BATCH_LIMIT, 1, 3):  # growing and shrinking, same buffers
            _assert_agrees(engine, reference, images[:batch])
        with pytest.raises(BackendError, match=r"takes 1\.\.8 images per call, got 9"):
            engine.infer(np.zeros((DYNAMIC_BATCH_LIMIT + 1, *IMAGE), np.uint8))
    finally:
        engine.close()


def test_build_and_compare_shipped_qdq_engine_with_onnxruntime(tmp_path, source):
    """The INT8 engine built from the shipped Q/DQ ONNX of the unpruned model sees what the
    FP32 model sees on the held-out frames, as ONNX Runtime measured that ONNX in the build
    (agreement mAP@.5 0.935 there, on 395 frames; >= 0.90 required here)."""
    _needs_tensorrt_and_gpu()
    from compressed_perception.evaluation.coco import agreement
    from compressed_perception.runtime.postprocess import PostprocessConfig

    qdq = load_manifest(ROOT / "models" / "nanodet_g_compressed" / "qdq_int8_unpruned")
    built = build_engine(
        qdq.artifact("onnx"), qdq, tmp_path / "engine", EngineSettings(), None, dynamic_batch=False
    )
    assert built.precision == "int8"
    config = PostprocessConfig(score_threshold=0.05)
    frames = [cv2.imread(str(path)) for path in sorted(HELD_OUT.glob("*.jpg"))]
    reference = Detector(source, open_backend(source, "onnxruntime"), config)
    engine = Detector.open(tmp_path / "engine" / "manifest.json", "tensorrt", config)
    try:
        found = [engine.detect(frame).detections for frame in frames]
    finally:
        engine.backend.close()
    expected = [reference.detect(frame).detections for frame in frames]
    sizes = [(frame.shape[1], frame.shape[0]) for frame in frames]
    assert agreement(expected, found, sizes, source.classes).map50 >= 0.90
