"""Backend selection by name; heavy frameworks are imported only when chosen."""

from __future__ import annotations

import importlib

from compressed_perception.errors import BackendError
from compressed_perception.runtime.backends.base import Backend
from compressed_perception.runtime.manifest import Manifest

# kind -> (module, class, artifact it runs, what to install when the import fails)
_REGISTRY = {
    "tensorrt": (
        "compressed_perception.runtime.backends.tensorrt",
        "TensorRtBackend",
        "tensorrt",
        "pip install tensorrt pycuda",
    ),
    "onnxruntime": (
        "compressed_perception.runtime.backends.onnxruntime",
        "OnnxRuntimeBackend",
        "onnx",
        "pip install onnxruntime",
    ),
    "torch": (
        "compressed_perception.models.torch_backend",
        "TorchBackend",
        "torch",
        "pip install 'compressed_perception[torch]'",
    ),
}
BACKENDS = ("auto", *_REGISTRY)


def open_backend(manifest: Manifest, kind: str = "auto", threads: int = 0) -> Backend:
    """Instantiate backend `kind`; `auto` takes the first whose artifact the model has."""
    if kind == "auto":
        kind = next((k for k, spec in _REGISTRY.items() if spec[2] in manifest.artifacts), "")
        if not kind:
            raise BackendError(f"{manifest.path}: no artifact that any backend here can run")
    if kind not in _REGISTRY:
        raise BackendError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    module_name, class_name, _, install = _REGISTRY[kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendError(f"backend {kind!r} is not available here ({exc}); {install}") from exc
    return getattr(module, class_name)(manifest, threads=threads)
