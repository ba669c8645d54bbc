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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from compressed_perception import quiet
from compressed_perception.atomic import atomic_path
from compressed_perception.compress import graph_rules
from compressed_perception.compress.artifacts import write_manifest
from compressed_perception.compress.stage import (
    ORIGINAL,
    STUDENT,
    BuildContext,
    ModelRef,
    Stage,
    Variant,
)
from compressed_perception.errors import ConfigError, ModelError, check_choice

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
    high_precision: str = "fp32"  # dtype of everything not quantized (TensorRT runs it so)

    def __post_init__(self) -> None:
        check_calibration_count("quantize_qdq", self.calibration_frames)
        check_choice("quantize_qdq method", self.method, QDQ_METHODS)
        check_choice("quantize_qdq high_precision", self.high_precision, HIGH_PRECISION)


@dataclass(frozen=True)
class OrtSettings(KeepSettings):
    calibration_frames: int = 300
    method: str = "minmax"
    op_types: tuple[str, ...] = ("Conv",)
    per_channel: bool = True
    # 7-bit weights: AVX2 without VNNI multiplies u8 x s8 pairs into saturating int16
    reduce_range: bool = True

    def __post_init__(self) -> None:
        check_calibration_count("quantize_ort", self.calibration_frames)
        check_choice("quantize_ort method", self.method, ORT_METHODS)
        if not self.op_types:
            raise ConfigError("quantize_ort op_types: empty list quantizes nothing")


def check_calibration_count(stage: str, frames: int) -> None:
    if frames < MIN_CALIBRATION_FRAMES:
        raise ConfigError(
            f"{stage} calibration_frames: {frames} is too few (at least {MIN_CALIBRATION_FRAMES})"
        )


def kept_nodes(model: onnx.ModelProto, keep: KeepSettings) -> list[str]:
    """Names of the nodes to leave unquantized, each exactly one node of `model`.

    A pattern of `keep.nodes` names every node it matches whole (`re.fullmatch`), so
    `conv_1` never also keeps `conv_10`.
    """
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    if not convs:
        raise ModelError(f"{model.graph.name or 'model'}: no Conv node to quantize")
    names = []
    if keep.first_conv:
        names.append(convs[0].name)  # ONNX nodes are topologically sorted
    if keep.head_outputs:
        names.extend(_head_outputs(model, convs))
    known = [node.name for node in model.graph.node]
    for pattern in keep.nodes:
        matched = [name for name in known if re.fullmatch(pattern, name)]
        if not matched:
            raise ConfigError(f"keep nodes: {pattern!r} matches no node of the model")
        names.extend(matched)
    return list(dict.fromkeys(names))


def exact_patterns(names: Sequence[str]) -> list[str]:
    """Regular expressions for tools that match node names with `re.match`, a prefix match
    (ModelOpt): anchored at both ends, each matches its one name only."""
    return [f"^{re.escape(name)}$" for name in names]


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
    check_calibration(calibration, settings.calibration_frames)
    excluded = kept_nodes(onnx.load(str(source)), settings)
    with tempfile.TemporaryDirectory(prefix="qdq-") as scratch, atomic_path(dest) as tmp:
        work = Path(scratch) / "model.onnx"
        shutil.copyfile(source, work)  # ModelOpt rewrites its input in place
        frames = Path(scratch) / "calibration.npy"
        np.save(frames, calibration)
        options = {
            "calibration_method": settings.method,
            "nodes_to_exclude": exact_patterns(excluded),
            "high_precision_dtype": settings.high_precision,
        }
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            pool.submit(_modelopt, work, frames, tmp, options).result()
        _check_written(tmp, "ModelOpt")
    return excluded


def _modelopt(work: Path, frames: Path, dest: Path, options: dict[str, Any]) -> None:
    from modelopt.onnx.quantization import quantize

    with quiet.modelopt_on_cpu():
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

    check_calibration(calibration, settings.calibration_frames)
    model = onnx.load(str(source))
    excluded = kept_nodes(model, settings)
    methods = {
        "minmax": q.CalibrationMethod.MinMax,
        "entropy": q.CalibrationMethod.Entropy,
        "percentile": q.CalibrationMethod.Percentile,
    }
    with atomic_path(dest) as tmp, quiet.onnxruntime_quantization():
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
            nodes_to_exclude=excluded,
            calibrate_method=methods[settings.method],
        )
        _check_written(tmp, "ONNX Runtime quantization")
    return excluded


def check_calibration(calibration: np.ndarray, wanted: int) -> None:
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


def verified_int8(path: Path, kept: Sequence[str], tool: str) -> dict[str, object]:
    """The artifact's own graph must back its "int8" claim: every convolution but the kept
    ones reads INT8 input and INT8 weights. Returns the counts for manifest and report."""
    convs = graph_rules.convolutions(graph_rules.load(path))
    missing = graph_rules.missing_int8(convs, kept)
    if missing or not convs.int8:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelError(
            f"{path}: {tool} left {len(missing)} of {convs.total} convolutions outside INT8 "
            f"that the recipe did not keep ({shown or 'no INT8 convolution at all'})"
        )
    return graph_rules.summary(convs, kept)


def _stage_producer(
    run: Callable[[Path, Path, np.ndarray, Any], list[str]], tool: str, precision: str
) -> Callable[[BuildContext, ModelRef, Any, Path], dict[str, Any]]:
    def produce(
        context: BuildContext, parent: ModelRef, settings: Any, folder: Path
    ) -> dict[str, Any]:
        manifest = parent.manifest
        calibration = context.calibration(settings.calibration_frames, manifest)
        kept = run(manifest.artifact("onnx"), folder / "model.onnx", calibration, settings)
        counts = verified_int8(folder / "model.onnx", kept, tool)
        write_manifest(
            folder,
            {"onnx": "model.onnx"},
            manifest,
            name=f"{manifest.name}-{precision}",
            precision=precision,
            stage=tool,
            build={"int8": counts},
        )
        return counts

    return produce


ORT_STAGE = Stage(
    section="quantize_ort",
    settings=OrtSettings,
    produce=_stage_producer(quantize_ort, "quantize_ort", "int8"),
    variants=(
        Variant(STUDENT, "ort-int8", "ort-int8"),
        Variant(ORIGINAL, "ort-int8-unpruned", "ort-int8-unpruned"),
    ),
)
QDQ_STAGE = Stage(
    section="quantize_qdq",
    settings=QdqSettings,
    produce=_stage_producer(quantize_qdq, "quantize_qdq", "int8-qdq"),
    variants=(
        Variant(STUDENT, "quantize_qdq", "qdq-int8"),
        Variant(ORIGINAL, "quantize_qdq-unpruned", "qdq-int8-unpruned"),
    ),
    cpu=False,  # made for TensorRT; measured with ONNX Runtime where no GPU is
    revision=2,  # node patterns anchored: the first revision quantized no convolution
)
