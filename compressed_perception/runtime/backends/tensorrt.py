"""TensorRT engines on an NVIDIA GPU, through the named-tensor API of TensorRT 10 and 11.

An engine runs only under the TensorRT release and on the kind of GPU that built it, so the
manifest's build record is checked before TensorRT ever sees the file.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from compressed_perception.errors import BackendError
from compressed_perception.runtime import cuda
from compressed_perception.runtime.manifest import Manifest

INSTALL_HINT = "pip install tensorrt pycuda"
REBUILD_HINT = (
    "rebuild it on this machine with `compressed-perception build --config <recipe> --out <dir>`"
)
BUILD_KEYS = ("version", "gpu", "compute_capability")


def import_tensorrt() -> ModuleType:
    """TensorRT, imported only when used, so that the rest of the package works without it."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise BackendError(f"TensorRT is not available here ({exc}); {INSTALL_HINT}") from exc


def unavailable() -> str | None:
    """None when TensorRT and a GPU are here (an engine can be built and run), else why not."""
    if importlib.util.find_spec("tensorrt") is None:
        return f"tensorrt is not installed ({INSTALL_HINT})"
    try:
        cuda.device_info()
    except BackendError as exc:
        return str(exc)
    return None


@functools.cache
def tensorrt_logger() -> Any:
    """One logger for builder and runtime alike; warnings and errors go to stderr."""
    trt = import_tensorrt()
    return trt.Logger(trt.Logger.WARNING)


def version_tuple(version: str) -> tuple[int, int]:
    """Major and minor of a TensorRT version string ("10.1.0.27" -> (10, 1)).

    These are what this package compares; TensorRT itself refuses any other mismatch
    when it deserializes.
    """
    parts = str(version).split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise BackendError(f"TensorRT version {version!r} is not MAJOR.MINOR[.PATCH...]") from None


def engine_differences(
    built: dict[str, Any], version: str, gpu: str, compute_capability: str
) -> list[str]:
    """How the machine an engine was built on differs from this one; empty if it does not."""
    found = []
    if version_tuple(built["version"]) != version_tuple(version):
        found.append(f"built with TensorRT {built['version']}, this is TensorRT {version}")
    if built["gpu"] != gpu:
        found.append(f"built on GPU {built['gpu']!r}, this is {gpu!r}")
    if str(built["compute_capability"]) != compute_capability:
        found.append(
            f"built for compute capability {built['compute_capability']}, "
            f"this GPU has {compute_capability}"
        )
    return found


def check_engine_compatible(
    manifest: Manifest, version: str, gpu: str, compute_capability: str
) -> None:
    """Refuse an engine from another TensorRT release or GPU before TensorRT tries to load it,
    which would fail with a far less useful message, or not at all and run slowly."""
    built = manifest.build.get("tensorrt")
    missing = [key for key in BUILD_KEYS if not isinstance(built, dict) or key not in built]
    if missing:
        raise BackendError(
            f"{manifest.path}: build.tensorrt does not record the engine's "
            f"{', '.join(missing)}; {REBUILD_HINT}"
        )
    differences = engine_differences(built, version, gpu, compute_capability)
    if differences:
        raise BackendError(
            f"{manifest.path}: this TensorRT engine cannot run here ({'; '.join(differences)}): "
            f"engines do not move between TensorRT versions or GPUs; {REBUILD_HINT}"
        )


@dataclass
class _Buffers:
    """Pinned host and device memory for every I/O tensor, sized once for the largest batch."""

    tensors: dict[str, tuple[cuda.HostBuffer, cuda.DeviceBuffer]]

    def free(self) -> None:
        for host, device in self.tensors.values():
            device.free()
            host.free()


def engine_batches(engine: Any, name: str) -> tuple[int, int]:
    """The smallest and largest batch `engine` takes on input `name`: its fixed batch, or the
    range of its optimization profile 0 (the one a first execution context uses)."""
    fixed = int(engine.get_tensor_shape(name)[0])
    if fixed >= 0:
        return fixed, fixed
    smallest, _best, largest = engine.get_tensor_profile_shape(name, 0)
    return int(smallest[0]), int(largest[0])


class TensorRtBackend:
    """`threads` is accepted for the common signature; the GPU does the work.

    `max_batch` is the most images one `infer` takes, from the engine itself. Memory for
    that many is allocated once; a smaller batch uses its first rows. `close` must run on
    the thread that made the backend (see `cuda.Context`).
    """

    name = "tensorrt"

    def __init__(self, manifest: Manifest, threads: int = 0) -> None:
        path = manifest.artifact("tensorrt")
        trt = import_tensorrt()
        gpu, capability = cuda.device_info()
        check_engine_compatible(manifest, trt.__version__, gpu, capability)
        self._io = manifest.io
        self._buffers: _Buffers | None = None
        self._runtime: Any = None
        self._engine: Any = None
        self._execution: Any = None
        self._stream: cuda.Stream | None = None
        self.min_batch = self.max_batch = 0
        self._dynamic = False
        self._context: cuda.Context | None = cuda.Context()
        try:
            with self._context.active():
                self._load(trt, path)
        except Exception:
            self.close()
            raise

    def _load(self, trt: ModuleType, path: Path) -> None:
        self._runtime = trt.Runtime(tensorrt_logger())  # must outlive the engine
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise BackendError(
                f"{path}: TensorRT {trt.__version__} cannot deserialize this engine "
                f"(see its messages above); {REBUILD_HINT}"
            )
        self._check_io(trt, path)
        self.min_batch, self.max_batch = engine_batches(self._engine, self._io.input_name)
        self._check_batches(path)
        self._dynamic = self.min_batch != self.max_batch
        self._execution = self._engine.create_execution_context()
        self._stream = cuda.Stream()
        self._buffers = self._allocate()

    def _check_io(self, trt: ModuleType, path: Path) -> None:
        """The engine must keep the model I/O contract the rest of the pipeline relies on."""
        io, engine = self._io, self._engine
        expected = {
            io.input_name: (trt.TensorIOMode.INPUT, trt.DataType.UINT8),
            io.boxes_name: (trt.TensorIOMode.OUTPUT, trt.DataType.FLOAT),
            io.scores_name: (trt.TensorIOMode.OUTPUT, trt.DataType.FLOAT),
        }
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        if names != set(expected):
            raise BackendError(f"{path}: engine tensors {sorted(names)} != {sorted(expected)}")
        for name, (mode, dtype) in expected.items():
            actual = (engine.get_tensor_mode(name), engine.get_tensor_dtype(name))
            if actual != (mode, dtype):
                raise BackendError(f"{path}: tensor {name!r} is {actual}, expected {mode, dtype}")

    def _check_batches(self, path: Path) -> None:
        """A fixed-batch model needs an engine of that batch; any engine needs batch >= 1."""
        fixed = self._io.batch
        if self.min_batch < 1 or (fixed is not None and self.max_batch != fixed):
            wanted = f"batch {fixed}" if fixed is not None else "batches from 1"
            raise BackendError(
                f"{path}: engine takes batches {self.min_batch}..{self.max_batch}, the "
                f"manifest's model {wanted}; {REBUILD_HINT}"
            )

    def _allocate(self) -> _Buffers:
        """Buffers for `max_batch` images, sized by TensorRT's own shape inference and bound
        to the engine once: every call reuses them."""
        io = self._io
        self._set_batch(self.max_batch)
        tensors = {}
        dtypes = {io.input_name: np.uint8, io.boxes_name: np.float32, io.scores_name: np.float32}
        for name, dtype in dtypes.items():
            shape = tuple(self._execution.get_tensor_shape(name))
            if shape[0] != self.max_batch:
                raise BackendError(f"engine tensor {name!r} of shape {shape} is not batch-major")
            host = cuda.HostBuffer(shape, dtype)
            device = cuda.DeviceBuffer(host.array.nbytes)
            tensors[name] = (host, device)
            if not self._execution.set_tensor_address(name, device.ptr):
                raise BackendError(f"TensorRT refused the address of tensor {name!r}")
        return _Buffers(tensors)

    def _set_batch(self, batch: int) -> None:
        """Tell a dynamic-batch engine this call's batch; a fixed one knows it already."""
        io = self._io
        shape = (batch, io.height, io.width, 3)
        if self._dynamic and not self._execution.set_input_shape(io.input_name, shape):
            raise BackendError(f"TensorRT refused input shape {shape} (see its messages above)")

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._context is None or self._buffers is None:
            raise BackendError("TensorRT backend used after close()")
        self._check_images(images)
        with self._context.active():
            return self._run(images, self._buffers)

    def _check_images(self, images: np.ndarray) -> None:
        """Refuse what the engine would misread, before anything is copied."""
        io = self._io
        image = (io.height, io.width, 3)
        if images.dtype != np.uint8 or images.shape[1:] != image:
            raise BackendError(
                f"model takes uint8 images of shape (batch, {', '.join(map(str, image))}), "
                f"got {images.dtype} {images.shape}"
            )
        if not self.min_batch <= images.shape[0] <= self.max_batch:
            raise BackendError(
                f"engine takes {self.min_batch}..{self.max_batch} images per call, "
                f"got {images.shape[0]}"
            )

    def _run(self, images: np.ndarray, buffers: _Buffers) -> tuple[np.ndarray, np.ndarray]:
        """Copy in, execute, copy out the first `batch` rows, all queued on one stream; one
        wait at the end. The outputs are views into buffers the next call overwrites."""
        io, stream, batch = self._io, self._stream, images.shape[0]
        self._set_batch(batch)
        host, device = buffers.tensors[io.input_name]
        np.copyto(host.array[:batch], images)
        device.copy_from_host_async(host, stream, rows=batch)
        if not self._execution.execute_async_v3(stream.handle):
            raise BackendError("TensorRT could not enqueue inference (see its messages above)")
        outputs = [buffers.tensors[io.boxes_name], buffers.tensors[io.scores_name]]
        for host_out, device_out in outputs:
            device_out.copy_to_host_async(host_out, stream, rows=batch)
        stream.synchronize()
        return outputs[0][0].array[:batch], outputs[1][0].array[:batch]

    def close(self) -> None:
        """Free device memory and release the CUDA context; the backend is unusable after.

        Only on the thread that made the backend; elsewhere it raises BackendError and
        frees nothing, so it can be called again there.
        """
        if self._context is None:
            return
        self._context.check_closable()
        with self._context.active():
            if self._stream is not None:
                self._stream.synchronize()  # nothing may still be copying into what is freed
            if self._buffers is not None:
                self._buffers.free()
                self._buffers = None
            if self._stream is not None:
                self._stream.free()
            self._execution = self._engine = self._runtime = None  # TensorRT frees its memory
        self._context.close()
        self._context = None
