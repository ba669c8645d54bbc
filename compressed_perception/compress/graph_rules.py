"""ONNX graph rules that TensorRT's parser and builder apply, checked without TensorRT.

TensorRT cannot be installed on the machines this project is built and tested on, so what
its ONNX importer would refuse is checked here, on the files themselves, and the same
checks prove what an artifact's manifest claims (that its convolutions are INT8):

- a UINT8 tensor may only be a graph input or output, so each consumer of a UINT8 input
  must be a Cast (onnx-tensorrt: "TensorRT does not support UINT8 types for intermediate
  tensors");
- per-channel Q/DQ needs opset 13 or later;
- an INT8 convolution reads both its input and its weights through DequantizeLinear of
  8-bit data;
- a Q/DQ scale has the float type of the network around it (FP16 in an FP16 network), or
  the strongly typed builder would have to insert casts it does not insert.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

MIN_QDQ_OPSET = 13
EIGHT_BIT = (TensorProto.INT8, TensorProto.UINT8)
FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


@dataclass(frozen=True)
class Convolutions:
    """Every Conv of a graph, by whether it runs in INT8 (input and weights)."""

    int8: tuple[str, ...]
    other: tuple[str, ...]

    @property
    def total(self) -> int:
        return len(self.int8) + len(self.other)


def load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


class _Graph:
    """Producers, consumers, initializers and inferred element types of one graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        graph = inferred.graph
        self.nodes = list(graph.node)
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.types = {i.name: i.data_type for i in graph.initializer}
        for info in (*graph.input, *graph.output, *graph.value_info):
            if info.type.HasField("tensor_type"):
                self.types.setdefault(info.name, info.type.tensor_type.elem_type)
        for node in graph.node:  # Constant nodes carry their tensor's type
            if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
                self.types.setdefault(node.output[0], node.attribute[0].t.data_type)
        self.inputs = list(graph.input)

    def eight_bit_dequantized(self, tensor: str) -> bool:
        """Whether `tensor` is DequantizeLinear of INT8/UINT8 data."""
        node = self.producer.get(tensor)
        if node is None or node.op_type != "DequantizeLinear":
            return False
        return self.quantized_type(node.input[0]) in EIGHT_BIT

    def quantized_type(self, tensor: str) -> int | None:
        """The element type of quantized data: stored, or what a QuantizeLinear makes."""
        node = self.producer.get(tensor)
        if node is not None and node.op_type == "QuantizeLinear":
            zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else ""
            return (
                self.types.get(zero_point, TensorProto.UINT8) if zero_point else TensorProto.UINT8
            )
        return self.types.get(tensor)


def convolutions(model: onnx.ModelProto) -> Convolutions:
    graph = _Graph(model)
    int8, other = [], []
    for node in graph.nodes:
        if node.op_type != "Conv":
            continue
        quantized = all(graph.eight_bit_dequantized(name) for name in node.input[:2])
        (int8 if quantized else other).append(node.name)
    return Convolutions(tuple(int8), tuple(other))


def uint8_violations(model: onnx.ModelProto) -> list[str]:
    """Nodes that read a UINT8 graph input without casting it first."""
    graph = _Graph(model)
    found = []
    for tensor in graph.inputs:
        if tensor.type.tensor_type.elem_type != TensorProto.UINT8:
            continue
        for node in graph.consumers.get(tensor.name, []):
            if node.op_type != "Cast":
                found.append(
                    f"node {node.name!r} ({node.op_type}) reads the UINT8 input {tensor.name!r} "
                    "directly; TensorRT allows UINT8 only as a graph input or output, so the "
                    "first layer after it must be a Cast"
                )
    return found


def opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def scale_type_violations(model: onnx.ModelProto) -> list[str]:
    """Q/DQ nodes whose scale is not of the network's float type (that of its convolutions).

    An FP32 scale in an FP16 network makes DequantizeLinear produce FP32, so a Cast must
    stand between it and the convolution, and TensorRT no longer fuses the pair into an
    INT8 convolution.
    """
    graph = _Graph(model)
    conv_types = {graph.types.get(n.output[0]) for n in graph.nodes if n.op_type == "Conv"}
    network = conv_types - {None}
    if len(network) != 1:
        return []  # mixed or unknown: nothing to compare against
    (float_type,) = network
    found = []
    for node in graph.nodes:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = graph.types.get(node.input[1])
        if scale is not None and scale != float_type:
            found.append(
                f"node {node.name!r}: {node.op_type} scale is "
                f"{TensorProto.DataType.Name(scale)} in a "
                f"{TensorProto.DataType.Name(float_type)} network"
            )
    return found


def qdq_preflight(model: onnx.ModelProto, kept: Iterable[str]) -> list[str]:
    """Everything TensorRT would reject in an explicit-quantization model, before it builds.

    `kept` are the convolutions the recipe keeps in higher precision; every other one must
    be INT8. An empty list means the engine build can start.
    """
    found = list(uint8_violations(model))
    version = opset(model)
    if version < MIN_QDQ_OPSET:
        found.append(f"opset {version}: per-channel Q/DQ needs opset {MIN_QDQ_OPSET} or later")
    convs = convolutions(model)
    if not convs.int8:
        found.append(f"no INT8 convolution among {convs.total}: the model is not quantized")
    found += [
        f"convolution {name!r} is not INT8 (input and weights through 8-bit DequantizeLinear)"
        for name in missing_int8(convs, kept)
    ]
    found += scale_type_violations(model)
    return found


def missing_int8(convs: Convolutions, kept: Iterable[str]) -> list[str]:
    """Convolutions that should be INT8 (all but `kept`) and are not."""
    keep = set(kept)
    return [name for name in convs.other if name not in keep]


def summary(convs: Convolutions, kept: Sequence[str]) -> dict[str, object]:
    """What the manifest and the report record about an INT8 artifact."""
    return {
        "int8_convolutions": len(convs.int8),
        "convolutions": convs.total,
        "kept_in_higher_precision": sorted(kept),
    }
