"""Shared fixtures: the committed real frames and the committed default model; and how a
test that needs a GPU stack steps aside where there is none."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMES_DIR = ROOT / "data" / "vtest"
MODEL_DIR = ROOT / "models" / "nanodet_g"
HELD_OUT_DIR = ROOT / "data" / "vtest_heldout"
# set to 1 on the GPU machine: a test that needs TensorRT or a GPU fails there instead of
# skipping, so a broken driver or install cannot pass as "not this machine"
REQUIRE_GPU = "CP_REQUIRE_GPU"


def skip_without_gpu(reason: str) -> None:
    """Skip, naming `reason`; or fail with it where REQUIRE_GPU says the GPU stack is here."""
    if os.environ.get(REQUIRE_GPU) == "1":
        pytest.fail(f"{REQUIRE_GPU}=1, but {reason}", pytrace=False)
    pytest.skip(reason)


def original_model() -> Any:
    """A fresh torch copy of the packaged FP32 original, for a test to change or compare."""
    from compressed_perception.models.checkpoint import load_checkpoint

    return load_checkpoint(MODEL_DIR / "nanodet_g.pt")


def letterboxed(images: list[np.ndarray]) -> list[np.ndarray]:
    """Frames as the network's 416x416 uint8 input, what calibration and training take."""
    from compressed_perception.runtime.preprocess import Letterbox

    letterbox = Letterbox(416, 416)
    out = []
    for image in images:
        letterbox(image)
        out.append(letterbox.buffer[0].copy())
    return out


def output_gap(model: Any, reference: Any, images: list[np.ndarray]) -> float:
    """The distillation objective of torch `model` against `reference` summed over `images`
    (letterboxed): how far a pruned or refitted model is from the original."""
    import torch

    from compressed_perception.compress.objective import discrepancy
    from compressed_perception.compress.prune import normalized_batches

    with torch.no_grad():
        return sum(
            float(sum(discrepancy(reference(batch), model(batch)).values()))
            for batch in normalized_batches(reference, images)
        )


def conv_graph(cast_first: bool = True, int8_input: bool = True, int8_weights: bool = True) -> Any:
    """A one-convolution ONNX model as the build exports one: uint8 NHWC `images`, Cast and
    Transpose (`permute`) in that order or the other, then Conv `conv`, its input and its
    weights each through Q/DQ (`q_x`, `dq_x`, `dq_w`) or plain FP32."""
    from onnx import TensorProto, helper, numpy_helper

    if cast_first:  # images -> Cast -> f -> Transpose -> x
        cast_io, permute_io = ("images", "f"), ("f", "x")
    else:  # images -> Transpose -> f -> Cast -> x
        cast_io, permute_io = ("f", "x"), ("images", "f")
    cast = helper.make_node("Cast", cast_io[:1], cast_io[1:], to=TensorProto.FLOAT, name="cast")
    permute = helper.make_node(
        "Transpose", permute_io[:1], permute_io[1:], perm=[0, 3, 1, 2], name="permute"
    )
    nodes = [cast, permute] if cast_first else [permute, cast]
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s")]
    conv_input = "x"
    if int8_input:
        inits.append(numpy_helper.from_array(np.array(128, np.uint8), "zpu"))
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "s", "zpu"], ["xq"], name="q_x"),
            helper.make_node("DequantizeLinear", ["xq", "s", "zpu"], ["xd"], name="dq_x"),
        ]
        conv_input = "xd"
    weights = np.ones((2, 3, 1, 1), np.float32)
    if int8_weights:
        inits += [
            numpy_helper.from_array(weights.astype(np.int8), "w_q"),
            numpy_helper.from_array(np.array(0, np.int8), "zp8"),
        ]
        nodes.append(helper.make_node("DequantizeLinear", ["w_q", "s", "zp8"], ["w"], name="dq_w"))
    else:
        inits.append(numpy_helper.from_array(weights, "w"))
    nodes.append(helper.make_node("Conv", [conv_input, "w"], ["y"], name="conv"))
    return conv_model(nodes, inits, TensorProto.FLOAT)


def conv_model(nodes: list[Any], inits: list[Any], output_type: int) -> Any:
    """`nodes` from uint8 `images` (1, 4, 4, 3) to `y` (1, 2, 4, 4) as an opset 19 model."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, [1, 4, 4, 3])],
        [helper.make_tensor_value_info("y", output_type, [1, 2, 4, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def held_out_agreement(model: Any, folder: Path) -> tuple[float, float]:
    """Agreement (mAP, mAP@.5) of a torch `model`, exported into `folder`, with the FP32
    original on the committed held-out frames, both run by ONNX Runtime."""
    from compressed_perception.compress.artifacts import write_model
    from compressed_perception.datasets import FrameSource, load_frames
    from compressed_perception.evaluation.coco import agreement
    from compressed_perception.runtime.backends import open_backend
    from compressed_perception.runtime.detector import Detector
    from compressed_perception.runtime.manifest import load_manifest
    from compressed_perception.runtime.postprocess import PostprocessConfig

    reference = load_manifest(MODEL_DIR)
    manifest = write_model(model, folder, reference, "test", dynamic_batch=False)
    frames = load_frames(FrameSource(str(HELD_OUT_DIR)))
    config = PostprocessConfig(score_threshold=0.05)
    expected = Detector(reference, open_backend(reference, "onnxruntime"), config)
    found = Detector(manifest, open_backend(manifest, "onnxruntime"), config)
    result = agreement(
        [expected.detect(f).detections for f in frames],
        [found.detect(f).detections for f in frames],
        [(f.shape[1], f.shape[0]) for f in frames],
        reference.classes,
    )
    return result.map, result.map50


def fitted_detector_on(folder: Path, frames: list[np.ndarray]) -> Any:
    """The build's fit_input stage itself on `frames` (4:3: a 416x352 input), its model in
    `folder`, opened as the runtime opens any."""
    from types import SimpleNamespace

    from compressed_perception.compress import fit_input
    from compressed_perception.compress.recipe import ExportSettings
    from compressed_perception.compress.stage import ModelRef
    from compressed_perception.runtime.backends import open_backend
    from compressed_perception.runtime.detector import Detector
    from compressed_perception.runtime.manifest import load_manifest

    context = SimpleNamespace(train_frames=frames, recipe=SimpleNamespace(export=ExportSettings()))
    parent = ModelRef(load_manifest(MODEL_DIR), "key", None, None)
    info = fit_input.STAGE.produce(context, parent, fit_input.FitInputSettings(), folder)
    assert info["input_after"] == [352, 416] and info["frame_sizes"] == [[768, 576]]
    manifest = load_manifest(folder)
    return Detector(manifest, open_backend(manifest, "onnxruntime"))


@pytest.fixture(scope="session")
def frame_paths() -> list[Path]:
    paths = sorted(FRAMES_DIR.glob("vtest_*.jpg"))
    assert len(paths) == 40, "data/vtest must hold the 40 committed frames"
    return paths


@pytest.fixture(scope="session")
def frames(frame_paths: list[Path]) -> list[np.ndarray]:
    return [cv2.imread(str(p)) for p in frame_paths]


@pytest.fixture(scope="session")
def manifest_path() -> Path:
    return MODEL_DIR / "manifest.json"
