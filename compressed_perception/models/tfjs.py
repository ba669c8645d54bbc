"""TF.js graph models: weight reading and a plain NumPy interpreter of the graph.

The interpreter is deliberately naive (one NumPy function per TensorFlow op, NHWC
as the graph states it) so that it can serve as an independent reference for the
PyTorch module that the weights are imported into.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compressed_perception.errors import ModelError

Op = Callable[["_Node", list[np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class _Node:
    name: str
    op: str
    inputs: tuple[str, ...]
    attr: Mapping[str, Any]

    def attr_ints(self, key: str) -> list[int]:
        return [int(v) for v in self.attr[key]["list"]["i"]]

    def attr_str(self, key: str) -> str:
        return base64.b64decode(self.attr[key]["s"]).decode()

    def attr_float(self, key: str) -> float:
        return float(self.attr[key]["f"])


class TfjsGraph:
    """A TF.js `graph-model`: its nodes, its constant tensors and its signature."""

    def __init__(self, model_json: Path) -> None:
        self.path = model_json
        spec = _read_json(model_json)
        try:
            topology = spec["modelTopology"]["node"]
            manifest = spec["weightsManifest"]
            signature = spec["signature"]
        except (KeyError, TypeError) as exc:
            raise ModelError(f"{model_json}: not a TF.js graph model (missing {exc})") from exc
        self.nodes = [
            _Node(n["name"], n["op"], tuple(n.get("input", ())), n.get("attr", {}))
            for n in topology
        ]
        self.weights = _read_weights(model_json.parent, manifest)
        self.inputs = [name.split(":")[0] for name in signature["inputs"]]
        self.outputs = sorted(name.split(":")[0] for name in signature["outputs"])

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Evaluate every node in file order (TF.js converters write them topologically)."""
        values: dict[str, np.ndarray] = {}
        for node in self.nodes:
            if node.op == "Placeholder":
                if node.name not in feeds:
                    raise ModelError(f"{self.path}: no value fed for input {node.name!r}")
                values[node.name] = np.asarray(feeds[node.name], dtype=np.float32)
                continue
            if node.op == "Const":
                values[node.name] = self.weights[node.name]
                continue
            if node.op not in _OPS:
                raise ModelError(
                    f"{self.path}: op {node.op!r} of node {node.name!r} is not supported"
                )
            args = [_lookup(values, ref) for ref in node.inputs]
            for index, out in enumerate(_OPS[node.op](node, args)):
                values[node.name if index == 0 else f"{node.name}:{index}"] = out
        return {name: values[name] for name in self.outputs}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: file not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable TF.js model JSON ({exc})") from exc


def _read_weights(folder: Path, manifest: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Decode every weight group; float16-quantized weights are widened back to float32."""
    weights: dict[str, np.ndarray] = {}
    for group in manifest:
        blob = b"".join(_read_bytes(folder / p) for p in group["paths"])
        offset = 0
        for spec in group["weights"]:
            shape = [int(d) for d in spec["shape"]]
            stored = np.dtype(spec.get("quantization", {}).get("dtype", spec["dtype"]))
            count = int(np.prod(shape)) if shape else 1
            end = offset + count * stored.itemsize
            if end > len(blob):
                raise ModelError(
                    f"{folder / group['paths'][-1]}: truncated: weight {spec['name']!r} "
                    f"needs bytes {offset}..{end}, file group has {len(blob)}"
                )
            array = np.frombuffer(blob, dtype=stored, count=count, offset=offset).reshape(shape)
            weights[spec["name"]] = array.astype(np.dtype(spec["dtype"]))
            offset = end
        if offset != len(blob):
            raise ModelError(
                f"{folder / group['paths'][-1]}: {len(blob) - offset} bytes beyond the last weight"
            )
    return weights


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read weight file ({exc.strerror})") from exc


def _lookup(values: Mapping[str, np.ndarray], ref: str) -> np.ndarray:
    name, _, index = ref.partition(":")
    return values[name if index in ("", "0") else f"{name}:{index}"]


def _conv2d(node: _Node, args: list[np.ndarray]) -> list[np.ndarray]:
    """NHWC x HWIO convolution by explicit patch extraction (VALID padding only)."""
    x, kernel = args
    if node.attr_str("data_format") != "NHWC" or node.attr_str("padding") != "VALID":
        raise ModelError(f"Conv2D {node.name}: only NHWC with VALID padding is interpreted")
    if set(node.attr_ints("dilations")) != {1}:
        raise ModelError(f"Conv2D {node.name}: dilation is not interpreted")
    _, stride_h, stride_w, _ = node.attr_ints("strides")
    kh, kw, _, _ = kernel.shape
    patches = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    patches = patches[:, ::stride_h, ::stride_w]  # N, OH, OW, C, KH, KW
    return [np.einsum("nhwcij,ijco->nhwo", patches, kernel, optimize=True).astype(np.float32)]


def _max_pool(node: _Node, args: list[np.ndarray]) -> list[np.ndarray]:
    if node.attr_str("data_format") != "NHWC" or node.attr_str("padding") != "VALID":
        raise ModelError(f"MaxPool {node.name}: only NHWC with VALID padding is interpreted")
    _, kh, kw, _ = node.attr_ints("ksize")
    _, stride_h, stride_w, _ = node.attr_ints("strides")
    windows = np.lib.stride_tricks.sliding_window_view(args[0], (kh, kw), axis=(1, 2))
    return [windows[:, ::stride_h, ::stride_w].max(axis=(-2, -1))]


def _resize_bilinear(node: _Node, args: list[np.ndarray]) -> list[np.ndarray]:
    """Half-pixel-centre bilinear resize, written out from its definition."""
    if not node.attr["half_pixel_centers"].get("b") or node.attr["align_corners"].get("b"):
        raise ModelError(f"ResizeBilinear {node.name}: only half-pixel centres are interpreted")
    x, size = args
    out = x
    for axis, target in zip((1, 2), (int(size[0]), int(size[1])), strict=True):
        source = out.shape[axis]
        centre = (np.arange(target) + 0.5) * (source / target) - 0.5
        centre = np.clip(centre, 0, source - 1)
        low = np.floor(centre).astype(np.int64)
        high = np.minimum(low + 1, source - 1)
        frac = (centre - low).astype(np.float32)
        shape = [1, 1, 1, 1]
        shape[axis] = target
        frac = frac.reshape(shape)
        out = np.take(out, low, axis=axis) * (1 - frac) + np.take(out, high, axis=axis) * frac
    return [out.astype(np.float32)]


def _sparse_to_dense(_node: _Node, args: list[np.ndarray]) -> list[np.ndarray]:
    indices, shape, values, default = args
    dense = np.full([int(d) for d in shape], default, dtype=values.dtype)
    rows = indices.reshape(len(values), -1) if len(values) else []
    for index, value in zip(rows, values, strict=True):
        dense[tuple(index)] = value
    return [dense]


def _split_v(node: _Node, args: list[np.ndarray]) -> list[np.ndarray]:
    x, sizes, axis = args
    bounds = np.cumsum(sizes)[:-1]
    parts = np.split(x, bounds, axis=int(axis))
    if len(parts) != int(node.attr["num_split"]["i"]):
        raise ModelError(f"SplitV {node.name}: split sizes do not match num_split")
    return parts


def _reshape(_node: _Node, args: list[np.ndarray]) -> list[np.ndarray]:
    return [args[0].reshape([int(d) for d in args[1]])]


_OPS: dict[str, Op] = {
    "Identity": lambda _n, a: [a[0]],
    "Transpose": lambda _n, a: [np.transpose(a[0], a[1])],
    "Add": lambda _n, a: [a[0] + a[1]],
    "AddV2": lambda _n, a: [a[0] + a[1]],
    "Pad": lambda _n, a: [np.pad(a[0], a[1])],
    "PadV2": lambda _n, a: [np.pad(a[0], a[1], constant_values=a[2])],
    "LeakyRelu": lambda n, a: [np.where(a[0] >= 0, a[0], a[0] * n.attr_float("alpha"))],
    "Sigmoid": lambda _n, a: [_sigmoid(a[0])],
    "ConcatV2": lambda _n, a: [np.concatenate(a[:-1], axis=int(a[-1]))],
    "Reshape": _reshape,
    "SplitV": _split_v,
    "SparseToDense": _sparse_to_dense,
    "Conv2D": _conv2d,
    "MaxPool": _max_pool,
    "ResizeBilinear": _resize_bilinear,
}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp overflow is the correct limit: sigmoid -> 0
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
