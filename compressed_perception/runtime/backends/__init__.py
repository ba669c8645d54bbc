"""Backend selection by name; heavy frameworks are imported only when chosen.

`auto` takes, in this order, the first backend that can run the model here:

1. TensorRT, where the model has an engine and a GPU and TensorRT are present: the GPU is
   the vehicle computer's fastest unit, and an engine only exists for it;
2. OpenVINO, where it is installed and the CPU is x86 or ARM: its INT8 and FP32 kernels
   use the CPU's VNNI, AMX and bf16 units, where ONNX Runtime's INT8 kernels gave little
   or nothing over its FP32 ones on the same machines;
3. ONNX Runtime, on any CPU;
4. PyTorch, for a model that has only a checkpoint.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
from collections.abc import Callable
from dataclasses import dataclass

from compressed_perception.errors import BackendError, ConfigError
from compressed_perception.runtime.backends.base import Backend
from compressed_perception.runtime.manifest import Manifest


@dataclass(frozen=True)
class _Entry:
    module: str
    cls: str
    artifacts: tuple[str, ...]  # manifest artifact kinds it runs, by preference
    install: str  # what to install when the import fails
    usable: Callable[[], bool]  # whether `auto` may pick it on this machine


def _installed(module: str) -> Callable[[], bool]:
    return lambda: importlib.util.find_spec(module) is not None


def _gpu_engine_runtime() -> bool:
    from compressed_perception.runtime.backends.tensorrt import unavailable

    return unavailable() is None


def _openvino_here() -> bool:
    machines = ("x86_64", "amd64", "aarch64", "arm64")
    return platform.machine().lower() in machines and _installed("openvino")()


_REGISTRY = {
    "tensorrt": _Entry(
        "compressed_perception.runtime.backends.tensorrt",
        "TensorRtBackend",
        ("tensorrt",),
        "pip install tensorrt pycuda",
        _gpu_engine_runtime,
    ),
    "openvino": _Entry(
        "compressed_perception.runtime.backends.openvino",
        "OpenVinoBackend",
        ("openvino", "onnx"),
        "pip install openvino (on a ROS machine: see the README)",
        _openvino_here,
    ),
    "onnxruntime": _Entry(
        "compressed_perception.runtime.backends.onnxruntime",
        "OnnxRuntimeBackend",
        ("onnx",),
        "pip install onnxruntime",
        _installed("onnxruntime"),
    ),
    "torch": _Entry(
        "compressed_perception.models.torch_backend",
        "TorchBackend",
        ("torch",),
        "pip install 'compressed_perception[torch]'",
        _installed("torch"),
    ),
}
BACKENDS = ("auto", *_REGISTRY)


def choose(manifest: Manifest) -> str:
    """The backend `auto` picks for `manifest` on this machine (see the module docstring)."""
    for kind, entry in _REGISTRY.items():
        if any(a in manifest.artifacts for a in entry.artifacts) and entry.usable():
            return kind
    have = ", ".join(sorted(manifest.artifacts)) or "none"
    raise BackendError(
        f"{manifest.path}: no backend here can run its artifacts ({have}); install one of: "
        + "; ".join(f"{k}: {e.install}" for k, e in _REGISTRY.items())
    )


def runnable(manifest: Manifest, installed_only: bool = True) -> list[str]:
    """The backends (registry order) that can run one of `manifest`'s artifacts; with
    `installed_only`, those whose framework is installed here, a GPU one only with a GPU."""
    return [
        kind
        for kind, entry in _REGISTRY.items()
        if any(a in manifest.artifacts for a in entry.artifacts)
        and (not installed_only or entry.usable())
    ]


def open_backend(manifest: Manifest, kind: str = "auto", threads: int = 0) -> Backend:
    """Instantiate backend `kind`; `auto` picks as `choose` does; `threads` 0 is the
    backend's own default (each backend refused a negative count in its own words)."""
    if threads < 0:
        raise ConfigError(f"threads: {threads} is below 0 (0: the backend's default)")
    if kind == "auto":
        kind = choose(manifest)
    if kind not in _REGISTRY:
        raise BackendError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    entry = _REGISTRY[kind]
    try:
        module = importlib.import_module(entry.module)
    except ImportError as exc:
        raise BackendError(
            f"backend {kind!r} is not available here ({exc}); {entry.install}"
        ) from exc
    return getattr(module, entry.cls)(manifest, threads=threads)
