"""The one module that touches CUDA directly, so nothing else cares which binding is installed.

pycuda is preferred; cuda-python is the fallback. Both work on device 0's primary context,
the one the CUDA runtime (and so TensorRT) uses, so buffers made here are valid there.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from compressed_perception.errors import BackendError

DEVICE = 0
INSTALL_HINT = "pip install pycuda (or cuda-python)"


class _DriverStack:
    """The calling thread's CUDA context stack, through the driver library itself.

    Only for the one entry pycuda leaves behind and cannot pop (see `_PyCuda.release`).
    """

    def __init__(self) -> None:
        name = "nvcuda.dll" if os.name == "nt" else "libcuda.so.1"
        try:
            self._lib = ctypes.CDLL(name)
        except OSError as exc:
            raise BackendError(f"cannot load the CUDA driver library {name} ({exc})") from exc
        for function in ("cuCtxGetCurrent", "cuCtxPopCurrent_v2"):
            getattr(self._lib, function).argtypes = [ctypes.POINTER(ctypes.c_void_p)]
            getattr(self._lib, function).restype = ctypes.c_int

    def current(self) -> int:
        """The current context's handle; 0 when there is none."""
        return self._call("cuCtxGetCurrent")

    def pop(self) -> int:
        """Pop the current context; returns its handle."""
        return self._call("cuCtxPopCurrent_v2")

    def _call(self, function: str) -> int:
        handle = ctypes.c_void_p()
        result = getattr(self._lib, function)(ctypes.byref(handle))
        if result != 0:  # CUDA_SUCCESS
            raise BackendError(f"CUDA {function} failed with CUresult {result}")
        return handle.value or 0


class _PyCuda:
    """pycuda's driver API; its objects free themselves when collected, `free` does it now.

    pycuda keeps a context stack of its own per thread and mirrors only its top on the
    driver's; `stack` is the driver's, for what pycuda cannot undo itself.
    """

    def __init__(self, driver: Any, stack: Any) -> None:
        self._cuda = driver
        self._stack = stack
        self.errors: tuple[type[Exception], ...] = (driver.Error,)
        try:
            driver.init()
            self._device = driver.Device(DEVICE)
        except driver.Error as exc:
            raise BackendError(f"no CUDA GPU visible ({exc})") from exc

    def device_info(self) -> tuple[str, str]:
        major, minor = self._device.compute_capability()
        return self._device.name(), f"{major}.{minor}"

    def retain(self) -> Any:
        # Not pycuda.autoinit: that makes a context of its own, which TensorRT would not share.
        return self._device.retain_primary_context()

    def push(self, context: Any) -> None:
        context.push()

    def pop(self, context: Any) -> None:
        self._cuda.Context.pop()

    def release(self, context: Any) -> None:
        """Undo `retain` and leave this thread's context stack as it was.

        `Context.close` calls this on the retaining thread with the context not current,
        where pycuda's `detach` pushes the context, releases it with
        cuDevicePrimaryCtxRelease and, taking it for cuCtxDetach, assumes that popped it.
        Unlike cuCtxDestroy, the release never pops (CUDA driver API), so the released
        context would stay current on this thread; pycuda has no call that pops it (its
        `Context.pop` pops only entries of its own stack, which detach never added), so
        it is popped here through the driver, after checking it is the one on top.
        """
        handle = context.handle
        context.detach()
        top = self._stack.current()
        if top != handle:
            raise BackendError(
                f"after releasing the primary context {handle:#x}, context {top:#x} is "
                "current instead: left on the stack rather than popping another's context"
            )
        self._stack.pop()

    def stream(self) -> tuple[Any, int]:
        stream = self._cuda.Stream()
        return stream, stream.handle

    def synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def free_stream(self, stream: Any) -> None:
        """pycuda destroys a stream when its object is collected; there is no call for it."""

    def host_alloc(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, Any]:
        array = self._cuda.pagelocked_empty(shape, dtype)
        return array, array.base

    def free_host(self, owner: Any) -> None:
        owner.free()

    def device_alloc(self, nbytes: int) -> tuple[int, Any]:
        allocation = self._cuda.mem_alloc(nbytes)
        return int(allocation), allocation

    def free_device(self, owner: Any) -> None:
        owner.free()

    def to_device(self, ptr: int, host: np.ndarray, stream: Any) -> None:
        self._cuda.memcpy_htod_async(ptr, host, stream)

    def to_host(self, host: np.ndarray, ptr: int, stream: Any) -> None:
        self._cuda.memcpy_dtoh_async(host, ptr, stream)


class _CudaRuntime:
    """cuda-python's runtime API: calls return (error, result...) tuples instead of raising.

    The runtime retains the primary context itself, once per process, and makes it current
    on each thread with cudaSetDevice (setting the top of the thread's stack, not pushing
    onto it), as TensorRT's own runtime calls do; so there is nothing to pop or release,
    and `Context`'s rules (close on the creating thread) hold here only for consistency.
    """

    errors: tuple[type[Exception], ...] = ()

    def __init__(self, runtime: Any) -> None:
        self._rt = runtime
        try:
            count = self._call("cudaGetDeviceCount")
        except BackendError as exc:
            raise BackendError(f"no CUDA GPU visible ({exc})") from exc
        if count <= DEVICE:
            raise BackendError("no CUDA GPU visible (cudaGetDeviceCount found none)")

    def _call(self, function: str, *args: Any) -> Any:
        error, *results = getattr(self._rt, function)(*args)
        if error != self._rt.cudaError_t.cudaSuccess:
            raise BackendError(f"CUDA {function} failed: {getattr(error, 'name', error)}")
        return results[0] if results else None

    def device_info(self) -> tuple[str, str]:
        props = self._call("cudaGetDeviceProperties", DEVICE)
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else props.name
        return name.rstrip("\x00"), f"{props.major}.{props.minor}"

    def retain(self) -> None:
        self._call("cudaSetDevice", DEVICE)  # the runtime retains the primary context

    def push(self, context: None) -> None:
        self._call("cudaSetDevice", DEVICE)  # the current device is per thread

    def pop(self, context: None) -> None:
        """The runtime keeps no context stack: nothing to undo."""

    def release(self, context: None) -> None:
        """The runtime owns the primary context and releases it at exit."""

    def stream(self) -> tuple[Any, int]:
        stream = self._call("cudaStreamCreate")
        return stream, int(stream)

    def synchronize(self, stream: Any) -> None:
        self._call("cudaStreamSynchronize", stream)

    def free_stream(self, stream: Any) -> None:
        self._call("cudaStreamDestroy", stream)

    def host_alloc(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, int]:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        ptr = self._call("cudaMallocHost", nbytes)
        raw = np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(ptr))
        return raw.view(dtype).reshape(shape), ptr

    def free_host(self, owner: int) -> None:
        self._call("cudaFreeHost", owner)

    def device_alloc(self, nbytes: int) -> tuple[int, Any]:
        ptr = self._call("cudaMalloc", nbytes)
        return int(ptr), ptr

    def free_device(self, owner: Any) -> None:
        self._call("cudaFree", owner)

    def to_device(self, ptr: int, host: np.ndarray, stream: Any) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpyAsync", ptr, host.ctypes.data, host.nbytes, kind, stream)

    def to_host(self, host: np.ndarray, ptr: int, stream: Any) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync", host.ctypes.data, ptr, host.nbytes, kind, stream)


@functools.cache
def _driver() -> _PyCuda | _CudaRuntime:
    """The binding in use; failures are not cached, so installing one later works."""
    try:
        return _PyCuda(importlib.import_module("pycuda.driver"), _DriverStack())
    except ImportError as exc:
        pycuda_missing = exc
    # cuda-python >= 12.8 and 13 name it cuda.bindings.runtime; older releases cuda.cudart
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        with contextlib.suppress(ImportError):
            return _CudaRuntime(importlib.import_module(name))
    raise BackendError(
        f"neither pycuda nor cuda-python can be imported ({pycuda_missing}); {INSTALL_HINT}"
    )


def device_info() -> tuple[str, str]:
    """Device 0's name and compute capability ("8.7"): what a TensorRT engine is tied to."""
    return _driver().device_info()


class Context:
    """Device 0's primary context, retained until `close`; `active` makes it current.

    Activating per call rather than once lets a backend made on one thread run on another.
    `close` must run on the thread that made the context and outside `active`: pycuda
    releases a primary context only on the thread that retained it (from any other thread
    it silently keeps it retained). Anywhere else `close` raises BackendError and changes
    nothing, so it can be called again on the right thread.
    """

    def __init__(self) -> None:
        self._driver = _driver()
        self._handle = self._driver.retain()
        self._owner = threading.current_thread()
        self._lock = threading.Lock()
        self._in_use = 0  # `active` blocks open, on any thread
        self._open = True

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with self._lock:
            if not self._open:
                raise BackendError("CUDA context used after close()")
            self._in_use += 1
        try:
            self._driver.push(self._handle)
            try:
                yield
            finally:
                self._driver.pop(self._handle)
        except self._driver.errors as exc:
            raise BackendError(f"CUDA: {exc}") from exc
        finally:
            with self._lock:
                self._in_use -= 1

    def check_closable(self) -> None:
        """Raise BackendError unless `close` may run here and now."""
        here = threading.current_thread()
        if here is not self._owner:
            raise BackendError(
                f"CUDA context closed on thread {here.name!r}, but it was made on "
                f"{self._owner.name!r}; pycuda releases a primary context only on the thread "
                "that retained it: close it there"
            )
        if self._in_use:
            raise BackendError("CUDA context closed while it is active (inside active())")

    def close(self) -> None:
        with self._lock:
            if not self._open:
                return
            self.check_closable()
            self._open = False
        try:
            self._driver.release(self._handle)
        except self._driver.errors as exc:
            raise BackendError(f"CUDA: releasing the primary context failed: {exc}") from exc


class Stream:
    """A CUDA stream; `handle` is the integer TensorRT's execute_async_v3 takes."""

    def __init__(self) -> None:
        self._driver = _driver()
        self._stream, self.handle = self._driver.stream()

    def synchronize(self) -> None:
        self._driver.synchronize(self._stream)

    def free(self) -> None:
        if self._stream is not None:
            self._driver.free_stream(self._stream)
            self._stream = None


class HostBuffer:
    """Page-locked host memory, so that copies on a stream are truly asynchronous."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | type) -> None:
        self._driver = _driver()
        self.array, self._owner = self._driver.host_alloc(tuple(shape), np.dtype(dtype))

    def free(self) -> None:
        if self._owner is not None:
            self._driver.free_host(self._owner)
            self._owner = None


class DeviceBuffer:
    """Linear device memory; `ptr` is the address TensorRT's set_tensor_address takes."""

    def __init__(self, nbytes: int) -> None:
        self._driver = _driver()
        self.nbytes = nbytes
        self.ptr, self._owner = self._driver.device_alloc(nbytes)

    def copy_from_host_async(
        self, host: HostBuffer, stream: Stream, rows: int | None = None
    ) -> None:
        """Queue a copy of `host`'s first `rows` rows (all by default) to this buffer."""
        self._driver.to_device(self.ptr, self._fitting(host, rows), stream._stream)

    def copy_to_host_async(self, host: HostBuffer, stream: Stream, rows: int | None = None) -> None:
        """Queue a copy of this buffer into `host`'s first `rows` rows (all by default)."""
        self._driver.to_host(self._fitting(host, rows), self.ptr, stream._stream)

    def free(self) -> None:
        if self._owner is not None:
            self._driver.free_device(self._owner)
            self._owner = None

    def _fitting(self, host: HostBuffer, rows: int | None) -> np.ndarray:
        """The part of `host` to copy: its first `rows` rows, contiguous pinned memory."""
        part = host.array if rows is None else host.array[:rows]
        if part.nbytes > self.nbytes:
            raise BackendError(
                f"host buffer of {part.nbytes} bytes does not fit a {self.nbytes}-byte "
                "device buffer"
            )
        return part
