"""The OpenVINO backend: the contract's ONNX or an IR, f32 unless bf16 is chosen, parity
with ONNX Runtime on real frames, and clear refusals of incomplete or tampered models."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="the OpenVINO backend needs openvino")

from compressed_perception.cli import main  # noqa: E402
from compressed_perception.errors import BackendError, IntegrityError, ModelError  # noqa: E402
from compressed_perception.runtime import backends  # noqa: E402
from compressed_perception.runtime.backends import choose, open_backend  # noqa: E402
from compressed_perception.runtime.manifest import create_manifest, load_manifest  # noqa: E402
from compressed_perception.runtime.preprocess import Letterbox  # noqa: E402

from conftest import MODEL_DIR, original_model  # noqa: E402


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSED_PERCEPTION_OPENVINO_CACHE", str(tmp_path / "ov-cache"))
    return tmp_path / "ov-cache"


@pytest.fixture(scope="module")
def images(frames):
    letterbox = Letterbox(416, 416, batch=4)
    for slot in range(4):
        letterbox(frames[slot * 9], slot=slot)
    return letterbox.buffer


@pytest.fixture(scope="module")
def ir_model(tmp_path_factory):
    """The shipped FP32 model as an OpenVINO IR, with a manifest that lists both files."""
    folder = tmp_path_factory.mktemp("ir")
    model = ov.Core().read_model(str(MODEL_DIR / "nanodet_g.onnx"))
    ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=False)
    base = load_manifest(MODEL_DIR)
    manifest = create_manifest(
        folder,
        {"openvino": "model.xml"},
        companions={"openvino": ["model.bin"]},
        name="ir",
        classes=base.classes,
        precision="fp32",
        io=base.io,
    )
    manifest.save()
    return folder


def _copy(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_matches_onnxruntime_on_real_frames(images):
    manifest = load_manifest(MODEL_DIR)
    openvino, onnxruntime = (
        open_backend(manifest, "openvino"),
        open_backend(manifest, "onnxruntime"),
    )
    assert openvino.precision == "f32"  # never bf16 unless the artifact says so
    for image in images:
        got = [a.copy() for a in openvino.infer(image[None])]
        want = onnxruntime.infer(image[None])
        assert got[0].shape == (1, 3549, 4) and got[1].shape == (1, 3549, 80)
        assert np.abs(got[0] - want[0]).max() < 0.05
        assert np.abs(got[1] - want[1]).max() < 1e-3
        assert got[1].max() > 0.5


def test_runs_an_ir_listed_in_the_manifest(ir_model, images):
    manifest = load_manifest(ir_model)
    assert manifest.companions == {"openvino": ("model.bin",)}
    got = open_backend(manifest, "openvino").infer(images[:1])
    want = open_backend(load_manifest(MODEL_DIR), "onnxruntime").infer(images[:1])
    assert np.abs(got[1] - want[1]).max() < 1e-3
    assert choose(manifest) == "openvino"


def test_compiled_models_are_cached(private_cache):
    open_backend(load_manifest(MODEL_DIR), "openvino")
    assert any(private_cache.iterdir())  # the next start loads instead of compiling


@pytest.mark.parametrize("damage", ["missing", "truncated", "tampered"])
def test_an_incomplete_or_changed_ir_is_refused(ir_model, tmp_path, damage):
    folder = _copy(ir_model, tmp_path)
    weights = folder / "model.bin"
    if damage == "missing":
        weights.unlink()
        expected, error = r"model\.bin: openvino model file listed in .* is missing", ModelError
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
        expected, error = r"model\.bin: sha256 .* truncated", IntegrityError
    else:
        data = bytearray(weights.read_bytes())
        data[100] ^= 0xFF
        weights.write_bytes(bytes(data))
        expected, error = r"model\.bin: sha256", IntegrityError
    with pytest.raises(error, match=expected):
        open_backend(load_manifest(folder), "openvino")


def test_an_unknown_precision_is_refused(ir_model, tmp_path):
    folder = _copy(ir_model, tmp_path)
    data = json.loads((folder / "manifest.json").read_text())
    data["build"] = {"openvino": {"inference_precision": "f8"}}
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BackendError, match="OpenVINO inference precision 'f8' is not one of"):
        open_backend(load_manifest(folder), "openvino")


def test_bf16_is_a_recorded_choice(ir_model, tmp_path, images):
    folder = _copy(ir_model, tmp_path)
    data = json.loads((folder / "manifest.json").read_text())
    data["build"] = {"openvino": {"inference_precision": "bf16"}}
    (folder / "manifest.json").write_text(json.dumps(data))
    backend = open_backend(load_manifest(folder), "openvino")
    assert backend.precision == "bf16"
    assert backend.infer(images[:1])[1].shape == (1, 3549, 80)


def test_a_dynamic_batch_model_takes_several_frames(tmp_path, images):
    pytest.importorskip("torch", reason="exporting a dynamic-batch model needs torch")
    from compressed_perception.compress.export import export_onnx

    spec = export_onnx(original_model(), tmp_path / "m.onnx", dynamic_batch=True)
    base = load_manifest(MODEL_DIR)
    manifest = create_manifest(
        tmp_path, {"onnx": "m.onnx"}, name="b", classes=base.classes, precision="fp32", io=spec
    )
    manifest.save()
    backend = open_backend(load_manifest(tmp_path), "openvino")
    boxes, scores = (a.copy() for a in backend.infer(images[:3]))
    single = backend.infer(images[1:2])[1]
    assert boxes.shape == (3, 3549, 4)
    assert np.abs(scores[1] - single[0]).max() < 1e-4


def test_auto_order_tensorrt_then_openvino_then_onnxruntime(monkeypatch):
    manifest = load_manifest(MODEL_DIR)
    assert choose(manifest) == "openvino"  # installed, on this x86 machine
    entry = backends._REGISTRY["openvino"]
    monkeypatch.setitem(backends._REGISTRY, "openvino", replace(entry, usable=lambda: False))
    assert choose(manifest) == "onnxruntime"  # OpenVINO not here (or not x86/ARM)
    engine = replace(manifest, artifacts={**manifest.artifacts, "tensorrt": "m.engine"})
    tensorrt = backends._REGISTRY["tensorrt"]
    monkeypatch.setitem(backends._REGISTRY, "tensorrt", replace(tensorrt, usable=lambda: True))
    assert choose(engine) == "tensorrt"  # an engine and a GPU: first choice
    assert choose(manifest) == "onnxruntime"  # a GPU, but no engine for it


def test_missing_openvino_says_how_to_install(monkeypatch, capsys, frames):
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.delitem(
        sys.modules, "compressed_perception.runtime.backends.openvino", raising=False
    )
    with pytest.raises(BackendError, match="pip install openvino"):
        open_backend(load_manifest(MODEL_DIR), "openvino")
    assert (
        main(
            [
                "detect",
                str(MODEL_DIR.parents[1] / "data" / "vtest" / "vtest_000.jpg"),
                "--backend",
                "openvino",
            ]
        )
        == 2
    )
    assert "pip install openvino" in capsys.readouterr().err
