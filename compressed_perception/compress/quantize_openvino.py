"""INT8 for x86 and ARM CPUs with NNCF post-training quantization, saved as OpenVINO IR.

OpenVINO runs INT8 convolutions on VNNI and AMX units, where ONNX Runtime's INT8 kernels
gave little over its FP32 ones. The first convolution and the head's output convolutions
stay in higher precision, found from the ONNX graph as the other INT8 stages find them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compressed_perception import quiet
from compressed_perception.compress.artifacts import write_manifest
from compressed_perception.compress.quantize import (
    KeepSettings,
    check_calibration,
    check_calibration_count,
    kept_nodes,
)
from compressed_perception.compress.stage import (
    ORIGINAL,
    STUDENT,
    BuildContext,
    ModelRef,
    Stage,
    Variant,
)
from compressed_perception.errors import ModelError, check_choice

PRESETS = ("mixed", "performance")
PRECISIONS = ("f32", "bf16")
IR = "model.xml"
WEIGHTS = "model.bin"


@dataclass(frozen=True)
class OpenVinoSettings(KeepSettings):
    calibration_frames: int = 300
    preset: str = "mixed"  # mixed: asymmetric activations, symmetric weights
    fast_bias_correction: bool = True
    # what OpenVINO computes the layers outside INT8 in; bf16 is a deliberate choice
    inference_precision: str = "f32"

    def __post_init__(self) -> None:
        check_calibration_count("quantize_openvino", self.calibration_frames)
        check_choice("quantize_openvino preset", self.preset, PRESETS)
        check_choice("quantize_openvino inference_precision", self.inference_precision, PRECISIONS)


def quantize_openvino(
    source: Path, dest: Path, calibration: np.ndarray, settings: OpenVinoSettings
) -> list[str]:
    """Write the INT8 IR (`dest` and the .bin beside it) from an ONNX model; returns the
    nodes kept in higher precision."""
    import nncf
    import openvino as ov

    check_calibration(calibration, settings.calibration_frames)
    kept = kept_nodes(onnx.load(str(source)), settings)
    model = ov.Core().read_model(str(source))
    ignored = _openvino_names(model, kept) + [op.get_friendly_name() for op in decode_ops(model)]
    dataset = nncf.Dataset(list(calibration), lambda frame: frame[None])
    with quiet.nncf_quantization():
        quantized = nncf.quantize(
            model,
            dataset,
            preset=nncf.QuantizationPreset(settings.preset),
            subset_size=len(calibration),
            fast_bias_correction=settings.fast_bias_correction,
            ignored_scope=nncf.IgnoredScope(names=ignored),
        )
    # into a stage folder, which appears only once complete (StageCache)
    ov.save_model(quantized, str(dest), compress_to_fp16=False)
    return kept


def _openvino_names(model: Any, onnx_names: Sequence[str]) -> list[str]:
    """The OpenVINO operations an ONNX node became: its name, or its name plus a suffix
    (a Conv becomes `<name>/WithoutBiases` and the bias Add)."""
    names = [op.get_friendly_name() for op in model.get_ordered_ops()]
    found = []
    for onnx_name in onnx_names:
        pattern = re.compile(rf"{re.escape(onnx_name)}(/.*)?")
        matched = [name for name in names if pattern.fullmatch(name)]
        if not matched:
            raise ModelError(f"OpenVINO has no operation for the ONNX node {onnx_name!r}")
        found.extend(matched)
    return found


def decode_ops(model: Any) -> list[Any]:
    """The operations after the last convolution on every path to an output: the box decode
    and the score sigmoid. They stay in float: NNCF would otherwise quantize the decode's
    MatMul, rounding the box-bin probabilities (mAP 0.957 against 0.971 kept in float) for
    no speed (measured, docs/benchmarks.md)."""
    ops = model.get_ordered_ops()
    after: set[str] = set()  # fed, directly or not, by a convolution
    for op in ops:
        sources = [op.input_value(i).get_node() for i in range(op.get_input_size())]
        if any(
            s.get_type_name() == "Convolution" or s.get_friendly_name() in after for s in sources
        ):
            after.add(op.get_friendly_name())
    leads: set[str] = set()  # feeds, directly or not, a convolution
    for op in reversed(ops):
        targets = [t.get_node() for out in op.outputs() for t in out.get_target_inputs()]
        if any(
            t.get_type_name() == "Convolution" or t.get_friendly_name() in leads for t in targets
        ):
            leads.add(op.get_friendly_name())
    return [
        op
        for op in ops
        if op.get_friendly_name() in after
        and op.get_friendly_name() not in leads
        and op.get_type_name() not in ("Convolution", "Result")
    ]


def quantized_decode(path: Path) -> list[str]:
    """FakeQuantize operations in an IR's decode: none, where the stage did its job."""
    import openvino as ov

    model = ov.Core().read_model(str(path))
    return [
        op.get_friendly_name() for op in decode_ops(model) if op.get_type_name() == "FakeQuantize"
    ]


# operations that pass a quantized tensor on unchanged in precision, so a FakeQuantize before
# them still makes the convolution after them INT8 (OpenVINO's precision-preserving ops)
PRESERVING = ("MaxPool", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Split")


def int8_convolutions(path: Path) -> tuple[list[str], list[str]]:
    """(INT8, other) convolutions of an IR: INT8 reads its input through FakeQuantize to 256
    levels (past precision-preserving ops) and its weights as 8-bit integer constants."""
    import openvino as ov

    model = ov.Core().read_model(str(path))
    int8, other = [], []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Convolution":
            continue
        data, weights = (op.input_value(i).get_node() for i in range(2))
        quantized = _quantized_input(data) and _int8_weights(weights)
        (int8 if quantized else other).append(op.get_friendly_name())
    return int8, other


def _quantized_input(node: Any, depth: int = 0) -> bool:
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return node.get_attributes().get("levels") == 256
    if kind in PRESERVING and depth < 8:
        sources = [node.input_value(i).get_node() for i in range(node.get_input_size())]
        if kind not in ("Concat",):
            sources = sources[:1]
        return all(_quantized_input(source, depth + 1) for source in sources)
    return False


def _int8_weights(node: Any) -> bool:
    """Weights as a Constant of i8/u8, dequantized by Convert, Subtract and Multiply."""
    for _ in range(8):
        if node.get_type_name() not in ("Multiply", "Subtract", "Convert", "Reshape"):
            break
        node = node.input_value(0).get_node()
    if node.get_type_name() == "FakeQuantize":
        return node.get_attributes().get("levels") in (255, 256)
    return node.get_type_name() == "Constant" and node.get_element_type().get_type_name() in (
        "i8",
        "u8",
    )


def _produce(
    context: BuildContext, parent: ModelRef, settings: OpenVinoSettings, folder: Path
) -> dict[str, Any]:
    manifest = parent.manifest
    calibration = context.calibration(settings.calibration_frames, manifest)
    kept = quantize_openvino(manifest.artifact("onnx"), folder / IR, calibration, settings)
    int8, other = int8_convolutions(folder / IR)
    unexpected = [
        name for name in other if not any(name.startswith(k + "/") or name == k for k in kept)
    ]
    if unexpected or not int8:
        raise ModelError(
            f"{folder / IR}: NNCF left {len(unexpected)} convolutions outside INT8 that the "
            f"recipe did not keep ({', '.join(unexpected[:5]) or 'no INT8 convolution at all'})"
        )
    in_decode = quantized_decode(folder / IR)
    if in_decode:
        raise ModelError(
            f"{folder / IR}: NNCF quantized the box decode after the head's outputs "
            f"({', '.join(in_decode[:5])}); it must stay in float"
        )
    counts = {
        "int8_convolutions": len(int8),
        "convolutions": len(int8) + len(other),
        "kept_in_higher_precision": sorted(kept),
    }
    write_manifest(
        folder,
        {"openvino": IR},
        manifest,
        name=f"{manifest.name}-openvino-int8",
        precision="int8",
        stage="quantize_openvino",
        build={
            "int8": counts,
            "openvino": {"inference_precision": settings.inference_precision},
        },
        companions={"openvino": [WEIGHTS]},
    )
    return counts


STAGE = Stage(
    section="quantize_openvino",
    settings=OpenVinoSettings,
    produce=_produce,
    variants=(
        Variant(STUDENT, "openvino-int8", "openvino-int8"),
        Variant(ORIGINAL, "openvino-int8-unpruned", "openvino-int8-unpruned"),
    ),
    backend="openvino",
    revision=2,  # the decode stays in float: the first revision let NNCF quantize its MatMul
)
