"""Compile the explicitly quantized (Q/DQ) ONNX into a TensorRT engine for the GPU at hand.

The Q/DQ nodes already say which tensors are INT8 and at what scale, so no calibrator is
involved. An engine only runs on the TensorRT release and GPU that built it: the manifest
records both, and the TensorRT backend checks them before loading.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from compressed_perception.atomic import atomic_path
from compressed_perception.errors import BackendError, ConfigError, ModelError
from compressed_perception.runtime import cuda
from compressed_perception.runtime.backends.tensorrt import (
    import_tensorrt,
    tensorrt_logger,
    version_tuple,
)
from compressed_perception.runtime.manifest import (
    Manifest,
    TensorSpec,
    create_manifest,
    sha256_file,
)

ENGINE_FILE = "model.engine"
STRONGLY_TYPED_SINCE = (10, 1)
TENSORRT_MISSING = "tensorrt is not installed (pip install tensorrt)"

Shape = tuple[int, ...]


def tensorrt_available() -> str | None:
    """None when an engine can be built here, else why not (for skips and CLI messages)."""
    try:
        importlib.import_module("tensorrt")
    except ImportError:
        return TENSORRT_MISSING
    try:
        cuda.device_info()
    except BackendError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class EngineSettings:
    workspace_mb: int = 1024  # scratch memory TensorRT may use per layer, MiB
    fp16: bool = True  # FP16 for layers without Q/DQ; only where the network is weakly typed
    timing_cache: bool = True  # reuse tactic timings across builds (a file beside the engine)
    max_batch: int = 1  # largest batch a dynamic-batch ONNX is built for

    def __post_init__(self) -> None:
        for name in ("workspace_mb", "max_batch"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"engine {name}: {value!r} is not a positive whole number")
        for name in ("fp16", "timing_cache"):
            value = getattr(self, name)
            if type(value) is not bool:
                raise ConfigError(f"engine {name}: {value!r} is not true or false")


def strongly_typed(version: str) -> bool:
    """Whether this TensorRT builds the network strongly typed (types follow the graph)."""
    return version_tuple(version) >= STRONGLY_TYPED_SINCE


def input_profile(spec: TensorSpec, max_batch: int, onnx_path: Path) -> tuple[Shape, ...] | None:
    """(min, opt, max) input shapes for a dynamic-batch model; None when its batch is fixed."""
    image = (spec.height, spec.width, 3)
    if spec.batch is None:
        return (1, *image), (max_batch, *image), (max_batch, *image)
    if max_batch != spec.batch:
        raise ConfigError(
            f"engine max_batch: {max_batch}, but {onnx_path} has a fixed batch of {spec.batch}; "
            "export it with a dynamic batch to build for more"
        )
    return None


def build_record(
    settings: EngineSettings,
    *,
    version: str,
    gpu: str,
    compute_capability: str,
    input_shape: Shape,
    onnx_sha256: str,
    strongly_typed: bool,
) -> dict[str, Any]:
    """The manifest's `build`: what the runtime checks (version, GPU) and how to reproduce it."""
    return {
        "tensorrt": {
            "version": version,
            "gpu": gpu,
            "compute_capability": compute_capability,
            "input_shape": list(input_shape),
            "source_onnx_sha256": onnx_sha256,
            "strongly_typed": strongly_typed,
            "fp16": settings.fp16,
            "workspace_mb": settings.workspace_mb,
        }
    }


def build_engine(
    onnx_path: Path,
    source_manifest: Manifest,
    dest_dir: Path,
    settings: EngineSettings,
    timing_cache_path: Path | None,
) -> Manifest:
    """Build `dest_dir/model.engine` and its manifest from a Q/DQ ONNX; returns the manifest.

    From TensorRT 10.1 the network is strongly typed: every tensor's type follows from the
    graph, Q/DQ pairs make INT8 and everything else keeps the ONNX's float type. TensorRT
    does not allow the precision builder flags there (trtexec drops --fp16/--int8 with
    --stronglyTyped, and TensorRT 11 removed the flags), so `settings.fp16` is recorded in
    the manifest but has no effect: FP16 outside the Q/DQ regions must come from casts in
    the ONNX itself. Older TensorRT (8.6, 10.0) builds weakly typed with the INT8 flag, which
    Q/DQ still drives, plus FP16 when asked.

    `timing_cache_path` is read if it exists and rewritten after the build; a cache from
    another GPU or TensorRT release is ignored rather than trusted.
    """
    onnx_path, dest_dir = Path(onnx_path), Path(dest_dir)
    if not onnx_path.is_file():
        raise ModelError(f"{onnx_path}: ONNX model to build an engine from not found")
    spec = source_manifest.io
    profile = input_profile(spec, settings.max_batch, onnx_path)
    trt = import_tensorrt()
    gpu, capability = cuda.device_info()
    typed = strongly_typed(trt.__version__)
    cache = timing_cache_path if settings.timing_cache else None
    plan, quantized = _compile(trt, onnx_path, spec.input_name, profile, settings, typed, cache)
    with atomic_path(dest_dir / ENGINE_FILE) as tmp:
        tmp.write_bytes(plan)
    manifest = create_manifest(
        dest_dir,
        {"tensorrt": ENGINE_FILE},
        name=source_manifest.name,
        classes=source_manifest.classes,
        precision="int8" if quantized else source_manifest.precision,
        io=spec,
        architecture=source_manifest.architecture,
        source=source_manifest.source,
        build=build_record(
            settings,
            version=trt.__version__,
            gpu=gpu,
            compute_capability=capability,
            input_shape=(settings.max_batch, spec.height, spec.width, 3),
            onnx_sha256=sha256_file(onnx_path),
            strongly_typed=typed,
        ),
    )
    manifest.save()
    return manifest


def _compile(
    trt: ModuleType,
    onnx_path: Path,
    input_name: str,
    profile: tuple[Shape, ...] | None,
    settings: EngineSettings,
    typed: bool,
    cache: Path | None,
) -> tuple[Any, bool]:
    """The serialized engine, and whether the network is quantized (has Q/DQ layers)."""
    builder = trt.Builder(tensorrt_logger())
    network = builder.create_network(_network_flags(trt, typed))
    _parser = _parse(trt, network, onnx_path)  # owns the weights: must outlive the build
    config = _builder_config(trt, builder, settings, typed)
    if profile is not None:
        shapes = builder.create_optimization_profile()
        shapes.set_shape(input_name, *profile)
        config.add_optimization_profile(shapes)
    if cache is not None:
        _attach_timing_cache(config, cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelError(f"{onnx_path}: TensorRT could not build an engine (see its messages)")
    if cache is not None:
        with atomic_path(cache) as tmp:
            tmp.write_bytes(config.get_timing_cache().serialize())
    return plan, _has_qdq(trt, network)


def _network_flags(trt: ModuleType, typed: bool) -> int:
    flag = trt.NetworkDefinitionCreationFlag
    return 1 << int(flag.STRONGLY_TYPED if typed else flag.EXPLICIT_BATCH)


def _parse(trt: ModuleType, network: Any, onnx_path: Path) -> Any:
    parser = trt.OnnxParser(network, tensorrt_logger())
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        details = "; ".join(f"node {error.node()}: {error.desc()}" for error in errors)
        raise ModelError(f"{onnx_path}: TensorRT cannot parse the ONNX model: {details}")
    return parser


def _builder_config(trt: ModuleType, builder: Any, settings: EngineSettings, typed: bool) -> Any:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    if not typed:
        config.set_flag(trt.BuilderFlag.INT8)  # Q/DQ sets the scales: no calibrator
        if settings.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
    return config


def _attach_timing_cache(config: Any, path: Path) -> None:
    stored = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(stored)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _has_qdq(trt: ModuleType, network: Any) -> bool:
    """Whether the network is quantized at all, so the manifest's precision tells the truth."""
    quantize = (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
    return any(network.get_layer(i).type in quantize for i in range(network.num_layers))
