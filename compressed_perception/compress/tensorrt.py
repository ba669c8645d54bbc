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
from compressed_perception.compress import graph_rules
from compressed_perception.compress.stage import BuildContext, ModelRef, Stage, Variant
from compressed_perception.errors import ConfigError, ModelError
from compressed_perception.runtime import cuda
from compressed_perception.runtime.backends.tensorrt import (
    import_tensorrt,
    tensorrt_logger,
    unavailable,
    version_tuple,
)
from compressed_perception.runtime.detector import DYNAMIC_BATCH_LIMIT
from compressed_perception.runtime.manifest import (
    Manifest,
    TensorSpec,
    create_manifest,
    sha256_file,
)

ENGINE_FILE = "model.engine"
STRONGLY_TYPED_SINCE = (10, 1)  # the STRONGLY_TYPED network flag; precision flags unused
ALWAYS_STRONGLY_TYPED_SINCE = (11, 0)  # the flag deprecated, BuilderFlag INT8/FP16 removed

Shape = tuple[int, ...]


@dataclass(frozen=True)
class EngineSettings:
    workspace_mb: int = 1024  # scratch memory TensorRT may use per layer, MiB
    fp16: bool = True  # FP16 for layers without Q/DQ; only where the network is weakly typed
    timing_cache: bool = True  # reuse tactic timings across builds (a file beside the engine)
    # largest batch the engine takes; None: the model's fixed batch, or, for a dynamic-batch
    # model, DYNAMIC_BATCH_LIMIT, the most frames the runtime sends in one call
    max_batch: int | None = None

    def __post_init__(self) -> None:
        for name in ("workspace_mb", "max_batch"):
            value = getattr(self, name)
            if name == "max_batch" and value is None:
                continue
            if type(value) is not int or value < 1:
                raise ConfigError(f"engine {name}: {value!r} is not a positive whole number")
        for name in ("fp16", "timing_cache"):
            value = getattr(self, name)
            if type(value) is not bool:
                raise ConfigError(f"engine {name}: {value!r} is not true or false")


@dataclass(frozen=True)
class BatchProfile:
    """The input shapes an engine takes: TensorRT's optimization profile (min, opt, max).

    Only a dynamic-batch network needs one; a fixed-batch model's single shape is kept in
    the same form so that the manifest records what every engine accepts.
    """

    minimum: Shape
    optimum: Shape
    maximum: Shape
    dynamic: bool  # whether the ONNX batch dimension is dynamic

    def record(self) -> dict[str, list[int]]:
        return {"min": list(self.minimum), "opt": list(self.optimum), "max": list(self.maximum)}


def strongly_typed(version: str) -> bool:
    """Whether this TensorRT builds the network strongly typed (types follow the graph)."""
    return version_tuple(version) >= STRONGLY_TYPED_SINCE


def input_profile(
    spec: TensorSpec, max_batch: int | None, onnx_path: Path, *, dynamic_batch: bool
) -> BatchProfile:
    """The batch sizes the engine is built for, from the recipe and the ONNX's batch.

    A dynamic-batch model spans 1 to `max_batch` (by default the runtime's largest call),
    optimized for the largest: the node fills a batch with every camera that is ready. A
    recipe whose `export.dynamic_batch` disagrees with the ONNX it reaches is refused, as
    the runtime would otherwise send batches the engine does not take, or the reverse.
    """
    image = (spec.height, spec.width, 3)
    if spec.batch is None:
        if not dynamic_batch:
            raise ConfigError(
                f"export.dynamic_batch: false, but {onnx_path} has a dynamic batch; "
                "set export.dynamic_batch: true to build an engine for several cameras per call"
            )
        top = DYNAMIC_BATCH_LIMIT if max_batch is None else max_batch
        return BatchProfile((1, *image), (top, *image), (top, *image), dynamic=True)
    if dynamic_batch:
        raise ConfigError(
            f"export.dynamic_batch: true, but {onnx_path} has a fixed batch of {spec.batch}; "
            "only prune, reconstruct and distill export it again, with a dynamic batch: turn "
            "one on, or set export.dynamic_batch: false"
        )
    if max_batch is not None and max_batch != spec.batch:
        raise ConfigError(
            f"engine max_batch: {max_batch}, but {onnx_path} has a fixed batch of {spec.batch}; "
            "export it with a dynamic batch to build for more"
        )
    fixed = (spec.batch, *image)
    return BatchProfile(fixed, fixed, fixed, dynamic=False)


def build_record(
    settings: EngineSettings,
    *,
    version: str,
    gpu: str,
    compute_capability: str,
    profile: BatchProfile,
    onnx_sha256: str,
    strongly_typed: bool,
) -> dict[str, Any]:
    """The manifest's `build`: what the runtime checks (version, GPU) and how to reproduce it."""
    return {
        "tensorrt": {
            "version": version,
            "gpu": gpu,
            "compute_capability": compute_capability,
            "profile": profile.record(),
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
    *,
    dynamic_batch: bool,
) -> Manifest:
    """Build `dest_dir/model.engine` and its manifest from a Q/DQ ONNX; returns the manifest.

    `dynamic_batch` is the recipe's `export.dynamic_batch`: with `settings.max_batch` it
    sets the batch sizes the engine takes (`input_profile`), recorded in the manifest.

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
    profile = input_profile(spec, settings.max_batch, onnx_path, dynamic_batch=dynamic_batch)
    trt = import_tensorrt()
    gpu, capability = cuda.device_info()
    cache = timing_cache_path if settings.timing_cache else None
    plan, quantized = _compile(trt, onnx_path, spec.input_name, profile, settings, cache)
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
            profile=profile,
            onnx_sha256=sha256_file(onnx_path),
            strongly_typed=strongly_typed(trt.__version__),
        ),
    )
    manifest.save()
    return manifest


def _compile(
    trt: ModuleType,
    onnx_path: Path,
    input_name: str,
    profile: BatchProfile,
    settings: EngineSettings,
    cache: Path | None,
) -> tuple[Any, bool]:
    """The serialized engine, and whether the network is quantized (has Q/DQ layers)."""
    builder = trt.Builder(tensorrt_logger())
    network = builder.create_network(network_flags(trt, trt.__version__))
    _parser = _parse(trt, network, onnx_path)  # owns the weights: must outlive the build
    config = _builder_config(trt, builder, settings, strongly_typed(trt.__version__))
    if profile.dynamic:  # a fixed-shape network takes no profile
        shapes = builder.create_optimization_profile()
        shapes.set_shape(input_name, profile.minimum, profile.optimum, profile.maximum)
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


def network_flags(trt: ModuleType, version: str) -> int:
    """`create_network`'s flags: TensorRT 11 is always strongly typed and deprecated the
    flag (it is ignored), 10.1 to 10.x ask for it, older releases ask for explicit batch."""
    if version_tuple(version) >= ALWAYS_STRONGLY_TYPED_SINCE:
        return 0
    flag = trt.NetworkDefinitionCreationFlag
    return 1 << int(flag.STRONGLY_TYPED if strongly_typed(version) else flag.EXPLICIT_BATCH)


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


def preflight(qdq: Manifest) -> dict[str, Any]:
    """The part of the engine build that can be proven without TensorRT: the Q/DQ model
    breaks none of the rules TensorRT's ONNX importer and builder apply. Raises naming the
    first offending nodes; returns what was checked, for the report."""
    path = qdq.artifact("onnx")
    kept = qdq.build.get("int8", {}).get("kept_in_higher_precision", [])
    model = graph_rules.load(path)
    found = graph_rules.qdq_preflight(model, kept)
    if found:
        shown = "; ".join(found[:5]) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
        raise ModelError(f"{path}: TensorRT would reject this Q/DQ model: {shown}")
    convs = graph_rules.convolutions(model)
    return {
        "preflight": "passed",
        "opset": graph_rules.opset(model),
        "int8_convolutions": len(convs.int8),
        "convolutions": convs.total,
    }


def _installed_version() -> str:
    try:
        return str(importlib.import_module("tensorrt").__version__)
    except ImportError:
        return "not installed"


def _key_extra(context: BuildContext, _settings: EngineSettings) -> dict[str, Any]:
    """An engine belongs to one GPU and one TensorRT release, and its batch sizes follow the
    recipe's export and the runtime's limit: all are in its cache key."""
    return {
        "device": list(cuda.device_info()),
        "tensorrt_version": _installed_version(),
        "dynamic_batch": context.recipe.export.dynamic_batch,
        "dynamic_batch_limit": DYNAMIC_BATCH_LIMIT,
    }


def _check(context: BuildContext, parent: ModelRef, settings: EngineSettings) -> dict[str, Any]:
    """What can be proven before TensorRT runs, so it is reported where TensorRT is missing
    too: the graph rules, and the batch sizes the engine will be built for."""
    qdq = parent.manifest
    checked = preflight(qdq)
    profile = input_profile(
        qdq.io,
        settings.max_batch,
        qdq.folder / qdq.artifacts["onnx"],
        dynamic_batch=context.recipe.export.dynamic_batch,
    )
    return {**checked, "profile": profile.record()}


def _produce(
    context: BuildContext, parent: ModelRef, settings: EngineSettings, folder: Path
) -> dict[str, Any]:
    qdq = parent.manifest
    checked = _check(context, parent, settings)
    cache = context.cache_root.parent / "tensorrt.timing-cache" if settings.timing_cache else None
    manifest = build_engine(
        qdq.artifact("onnx"),
        qdq,
        folder,
        settings,
        cache,
        dynamic_batch=context.recipe.export.dynamic_batch,
    )
    return {**checked, **manifest.build}


STAGE = Stage(
    section="tensorrt",
    settings=EngineSettings,
    produce=_produce,
    variants=(
        Variant("quantize_qdq", "tensorrt", "tensorrt"),
        Variant("quantize_qdq-unpruned", "tensorrt-unpruned", "tensorrt-unpruned"),
    ),
    backend="tensorrt",
    cpu=False,
    uses_frames=False,
    key_extra=_key_extra,
    unavailable=unavailable,
    check=_check,
)
