"""INT8 quantization with calibration on real frames: two artifacts from one FP32 ONNX.

- `quantize_qdq`: explicit Q/DQ ONNX by NVIDIA ModelOpt, the input TensorRT's strongly
  typed INT8 path needs. ONNX Runtime runs the same Q/DQ arithmetic on the CPU, which is
  how its accuracy is measured where no GPU is.
- `quantize_ort`: ONNX Runtime static QDQ for CPUs. Only the op types that ONNX Runtime
  fuses into integer kernels are quantized: a Q/DQ pair around anything else is pure
  overhead on a CPU.

Both keep the network's first convolution (raw pixels, wide dynamic range) and the head's
output convolutions (class logits and box bins, the score path) in higher precision when
the settings say so; those nodes are found from the graph's shape, not from their names,
so a user's detector of the same family is handled too.
"""

from __future__ import annotations

import multiprocessing
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from compressed_perception.atomic import atomic_path
from compressed_perception.errors import ConfigError, ModelError

QDQ_METHODS = ("entropy", "max")
ORT_METHODS = ("minmax", "entropy", "percentile")
HIGH_PRECISION = ("fp16", "fp32")
MIN_CALIBRATION_FRAMES = 8


@dataclass(frozen=True)
class KeepSettings:
    """Which nodes stay in higher precision."""

    first_conv: bool = True
    head_outputs: bool = True
    nodes: tuple[str, ...] = ()  # further node names (regular expressions)


@dataclass(frozen=True)
class QdqSettings(KeepSettings):
    calibration_frames: int = 300
    method: str = "entropy"
    high_precision: str = "fp16"  # dtype of everything not quantized (TensorRT runs it so)

    def __post_init__(self) -> None:
        _check_common("quantize_qdq", self.calibration_frames)
        if self.method not in QDQ_METHODS:
            raise ConfigError(f"quantize_qdq method: {self.method!r} is not one of {QDQ_METHODS}")
        if self.high_precision not in HIGH_PRECISION:
            raise ConfigError(
                f"quantize_qdq high_precision: {self.high_precision!r} is not one of "
                f"{HIGH_PRECISION}"
            )


@dataclass(frozen=True)
class OrtSettings(KeepSettings):
    calibration_frames: int = 300
    method: str = "minmax"
    op_types: tuple[str, ...] = ("Conv",)
    per_channel: bool = True
    # 7-bit weights: AVX2 without VNNI multiplies u8 x s8 pairs into saturating int16
    reduce_range: bool = True

    def __post_init__(self) -> None:
        _check_common("quantize_ort", self.calibration_frames)
        if self.method not in ORT_METHODS:
            raise ConfigError(f"quantize_ort method: {self.method!r} is not one of {ORT_METHODS}")
        if not self.op_types:
            raise ConfigError("quantize_ort op_types: empty list quantizes nothing")


def _check_common(stage: str, frames: int) -> None:
    if frames < MIN_CALIBRATION_FRAMES:
        raise ConfigError(
            f"{stage} calibration_frames: {frames} is too few (at least {MIN_CALIBRATION_FRAMES})"
        )


def kept_nodes(model: onnx.ModelProto, keep: KeepSettings) -> list[str]:
    """Names of the nodes to leave unquantized, as exact-match patterns."""
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    if not convs:
        raise ModelError(f"{model.graph.name or 'model'}: no Conv node to quantize")
    names = []
    if keep.first_conv:
        names.append(convs[0].name)  # ONNX nodes are topologically sorted
    if keep.head_outputs:
        names.extend(_head_outputs(model, convs))
    known = {node.name for node in model.graph.node}
    for pattern in keep.nodes:
        if not any(re.fullmatch(pattern, name) for name in known):
            raise ConfigError(f"keep nodes: {pattern!r} matches no node of the model")
    return [re.escape(name) for name in names] + list(keep.nodes)


def _head_outputs(model: onnx.ModelProto, convs: Sequence[onnx.NodeProto]) -> list[str]:
    """Convolutions from which a graph output is reachable without another convolution."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {output.name for output in model.graph.output}
    return [conv.name for conv in convs if _reaches(conv, consumers, outputs)]


def _reaches(
    start: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]], outputs: set[str]
) -> bool:
    pending, seen = list(start.output), set()
    while pending:
        tensor = pending.pop()
        if tensor in outputs:
            return True
        for node in consumers.get(tensor, []):
            if node.op_type != "Conv" and node.name not in seen:
                seen.add(node.name)
                pending.extend(node.output)
    return False


def quantize_qdq(
    source: Path, dest: Path, calibration: np.ndarray, settings: QdqSettings
) -> list[str]:
    """Write the ModelOpt explicit Q/DQ model to `dest`; returns the nodes kept unquantized.

    ModelOpt runs in a child process: it patches ONNX Runtime's calibration classes when
    it runs, which breaks any ONNX Runtime quantization later in the same process.
    """
    _check_calibration(calibration, settings.calibration_frames)
    excluded = kept_nodes(onnx.load(str(source)), settings)
    with tempfile.TemporaryDirectory(prefix="qdq-") as scratch, atomic_path(dest) as tmp:
        work = Path(scratch) / "model.onnx"
        shutil.copyfile(source, work)  # ModelOpt rewrites its input in place
        frames = Path(scratch) / "calibration.npy"
        np.save(frames, calibration)
        options = {
            "calibration_method": settings.method,
            "nodes_to_exclude": excluded,
            "high_precision_dtype": settings.high_precision,
        }
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            pool.submit(_modelopt, work, frames, tmp, options).result()
        _check_written(tmp, "ModelOpt")
    return excluded


def _modelopt(work: Path, frames: Path, dest: Path, options: dict[str, Any]) -> None:
    from modelopt.onnx.quantization import quantize

    quantize(
        str(work),
        quantize_mode="int8",
        calibration_data={"images": np.load(frames)},
        calibration_eps=["cpu"],
        output_path=str(dest),
        log_level="WARNING",
        **options,
    )


def quantize_ort(
    source: Path, dest: Path, calibration: np.ndarray, settings: OrtSettings
) -> list[str]:
    """Write the ONNX Runtime static QDQ model to `dest`; returns the nodes kept unquantized."""
    from onnxruntime import quantization as q

    _check_calibration(calibration, settings.calibration_frames)
    model = onnx.load(str(source))
    excluded = kept_nodes(model, settings)
    names = [node.name for node in model.graph.node]
    exclude = sorted({n for n in names if any(re.fullmatch(p, n) for p in excluded)})
    methods = {
        "minmax": q.CalibrationMethod.MinMax,
        "entropy": q.CalibrationMethod.Entropy,
        "percentile": q.CalibrationMethod.Percentile,
    }
    with atomic_path(dest) as tmp:
        q.quantize_static(
            str(source),
            str(tmp),
            _Reader(calibration, model.graph.input[0].name),
            quant_format=q.QuantFormat.QDQ,
            op_types_to_quantize=list(settings.op_types),
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            nodes_to_exclude=exclude,
            calibrate_method=methods[settings.method],
        )
        _check_written(tmp, "ONNX Runtime quantization")
    return excluded


def _check_calibration(calibration: np.ndarray, wanted: int) -> None:
    if calibration.ndim != 4 or calibration.dtype != np.uint8 or calibration.shape[-1] != 3:
        raise ConfigError(
            f"calibration: need letterboxed uint8 (N, H, W, 3) frames, got {calibration.dtype} "
            f"{calibration.shape}"
        )
    if len(calibration) < wanted:
        raise ConfigError(
            f"calibration: {len(calibration)} frames given, the recipe asks for {wanted}"
        )


def _check_written(path: Path, tool: str) -> None:
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, OSError) as exc:
        raise ModelError(f"{path}: {tool} wrote no valid ONNX model ({exc})") from exc


class _Reader(CalibrationDataReader):
    """ONNX Runtime's calibration reader protocol over in-memory frames, one per batch."""

    def __init__(self, frames: np.ndarray, name: str) -> None:
        super().__init__()
        self._name = name
        self._frames: Iterator[np.ndarray] = iter(frames)

    def get_next(self) -> dict[str, np.ndarray] | None:
        frame = next(self._frames, None)
        return None if frame is None else {self._name: frame[None]}
