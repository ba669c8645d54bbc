"""Retain and release of the primary CUDA context, checked against pycuda's semantics.

`FakePyCuda` implements what pycuda's src/cpp/cuda.hpp does with contexts (its own stack
per thread, mirrored on the driver's; `detach` of a primary context calling
cuDevicePrimaryCtxRelease, which never pops) over `FakeDriver`, the driver's per-thread
context stack and the primary context's retain count. The tests check our pairing logic
(`cuda.Context`), not CUDA: after `close` both stacks must be as they were and the retain
count back to zero.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from compressed_perception.errors import BackendError
from compressed_perception.runtime import cuda

from conftest import REQUIRE_GPU, skip_without_gpu

PRIMARY = 0x7F00_1000  # device 0's primary context handle


class FakeCudaError(Exception):
    """pycuda.driver.Error."""


class FakeDriver:
    """The CUDA driver: a context stack per thread, the primary context's retain count."""

    def __init__(self) -> None:
        self.retains = 0
        self._local = threading.local()

    def stack(self) -> list[int]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def current(self) -> int:  # cuCtxGetCurrent
        return self.stack()[-1] if self.stack() else 0

    def pop(self) -> int:  # cuCtxPopCurrent
        if not self.stack():
            raise FakeCudaError("cuCtxPopCurrent: CUDA_ERROR_INVALID_CONTEXT")
        return self.stack().pop()

    def retain_primary(self) -> int:  # cuDevicePrimaryCtxRetain
        self.retains += 1
        return PRIMARY

    def release_primary(self) -> None:  # cuDevicePrimaryCtxRelease: never pops
        if self.retains == 0:
            raise FakeCudaError("cuDevicePrimaryCtxRelease: CUDA_ERROR_INVALID_CONTEXT")
        self.retains -= 1


class FakeContext:
    """pycuda's primary_context object."""

    def __init__(self, pycuda: FakePyCuda, handle: int) -> None:
        self._pycuda = pycuda
        self.handle = handle
        self.valid = True
        self.thread = threading.current_thread()

    def push(self) -> None:  # context_push
        self._pycuda.prepare_context_switch()
        self._pycuda.driver.stack().append(self.handle)
        self._pycuda.stack().append(self)

    def detach(self) -> None:  # context::detach with primary_context::detach_internal
        pycuda, driver = self._pycuda, self._pycuda.driver
        if not self.valid:
            raise FakeCudaError("context::detach: cannot detach from invalid context")
        active = pycuda.current_context() is self
        if active:
            driver.release_primary()
        elif self.thread is threading.current_thread():
            driver.stack().append(self.handle)  # cuCtxPushCurrent; "pop is implicit"
            driver.release_primary()
        # from any other thread pycuda does nothing: the context stays retained
        self.valid = False
        if active:
            new_active = pycuda.current_context(except_=self)
            if new_active is not None:
                driver.stack().append(new_active.handle)


class FakePyCuda:
    """pycuda.driver, as far as `cuda._PyCuda` uses contexts."""

    Error = FakeCudaError

    def __init__(self, driver: FakeDriver) -> None:
        self.driver = driver
        self._local = threading.local()
        pycuda = self

        class Context:
            @staticmethod
            def pop() -> None:
                pycuda.pop()

        self.Context = Context

    def init(self) -> None:
        """cuInit."""

    def Device(self, ordinal: int) -> FakeDevice:  # noqa: N802 (pycuda's name)
        return FakeDevice(self)

    def stack(self) -> list[FakeContext]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def current_context(self, except_: FakeContext | None = None) -> FakeContext | None:
        stack = self.stack()
        while stack:
            if stack[-1] is not except_ and stack[-1].valid:
                return stack[-1]
            stack.pop()
        return None

    def prepare_context_switch(self) -> None:
        if self.stack():
            self.driver.pop()

    def pop(self) -> None:  # context::pop
        self.prepare_context_switch()
        if not self.stack():
            raise FakeCudaError("context::pop: cannot pop non-current context")
        self.current_context()
        if not self.stack():
            raise FakeCudaError("m_stack::pop: cannot pop context from empty stack")
        self.stack().pop()
        current = self.current_context()
        if current is not None:
            self.driver.stack().append(current.handle)


class FakeDevice:
    def __init__(self, pycuda: FakePyCuda) -> None:
        self._pycuda = pycuda

    def name(self) -> str:
        return "Fake GPU"

    def compute_capability(self) -> tuple[int, int]:
        return 8, 7

    def retain_primary_context(self) -> FakeContext:
        return FakeContext(self._pycuda, self._pycuda.driver.retain_primary())


@pytest.fixture
def pycuda(monkeypatch):
    driver = FakeDriver()
    fake = FakePyCuda(driver)
    binding = cuda._PyCuda(fake, driver)
    monkeypatch.setattr(cuda, "_driver", lambda: binding)
    return fake


def _in_thread(function):
    """Run `function` on a new thread named worker_0; returns its result or raises."""
    with ThreadPoolExecutor(1, thread_name_prefix="worker") as pool:
        return pool.submit(function).result()


def test_close_leaves_no_context_pushed_and_nothing_retained(pycuda):
    context = cuda.Context()
    assert pycuda.driver.retains == 1
    with context.active():
        assert pycuda.driver.stack() == [PRIMARY]
    assert pycuda.driver.stack() == []
    context.close()
    assert pycuda.driver.stack() == []  # pycuda's detach alone leaves [PRIMARY] here
    assert pycuda.stack() == []
    assert pycuda.driver.retains == 0


def test_close_without_activation_pairs_too(pycuda):
    cuda.Context().close()
    assert pycuda.driver.stack() == []
    assert pycuda.driver.retains == 0


def test_use_on_another_thread_then_close_on_the_creating_one(pycuda):
    context = cuda.Context()

    def use():
        with context.active():
            inside = list(pycuda.driver.stack())
        return inside, list(pycuda.driver.stack()), list(pycuda.stack())

    assert _in_thread(use) == ([PRIMARY], [], [])
    context.close()
    assert pycuda.driver.stack() == []
    assert pycuda.driver.retains == 0


def test_close_from_another_thread_is_refused_and_changes_nothing(pycuda):
    context = cuda.Context()
    with pytest.raises(
        BackendError, match=r"closed on thread 'worker_0', but it was made on 'MainThread'"
    ):
        _in_thread(context.close)
    assert pycuda.driver.retains == 1  # still retained, still usable
    with context.active():
        pass
    context.close()
    assert pycuda.driver.retains == 0
    assert pycuda.driver.stack() == []


def test_close_inside_active_is_refused(pycuda):
    context = cuda.Context()
    with context.active(), pytest.raises(BackendError, match=r"while it is active"):
        context.close()
    context.close()
    assert (pycuda.driver.retains, pycuda.driver.stack()) == (0, [])


def test_close_keeps_a_context_someone_else_made_current(pycuda):
    """As pycuda.autoprimaryctx does: its own retain of the primary context, pushed."""
    theirs = pycuda.Device(0).retain_primary_context()
    theirs.push()
    context = cuda.Context()
    with context.active():
        pass
    context.close()
    assert pycuda.driver.stack() == [PRIMARY]  # theirs, once
    assert pycuda.stack() == [theirs]
    assert pycuda.driver.retains == 1  # theirs


def test_context_is_refused_after_close(pycuda):
    context = cuda.Context()
    context.close()
    context.close()  # a second close does nothing
    with pytest.raises(BackendError, match=r"used after close\(\)"), context.active():
        pass
    assert pycuda.driver.retains == 0


class FakeRuntime:
    """cuda-python's runtime module, as far as `cuda._CudaRuntime` needs it for a context."""

    class cudaError_t:  # noqa: N801 (cuda-python's name)
        cudaSuccess = 0  # noqa: N815

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def cudaGetDeviceCount(self):  # noqa: N802
        return 0, 1

    def cudaSetDevice(self, device):  # noqa: N802
        self.calls.append(("cudaSetDevice", device))
        return (0,)


def test_cuda_python_context_follows_the_same_thread_rule(monkeypatch):
    runtime = FakeRuntime()
    binding = cuda._CudaRuntime(runtime)
    monkeypatch.setattr(cuda, "_driver", lambda: binding)
    context = cuda.Context()
    with pytest.raises(BackendError, match=r"made on"):
        _in_thread(context.close)
    with context.active():
        pass
    context.close()
    # the runtime owns the primary context: it is selected, never pushed or released
    assert runtime.calls == [("cudaSetDevice", 0)] * 2


def test_a_real_context_leaves_the_driver_stack_as_it_found_it():
    """The simulation above, checked against the real driver where pycuda and a GPU are."""
    pytest.importorskip("pycuda.driver", reason="pycuda is not installed (a GPU machine's extra)")
    try:
        cuda.device_info()
    except BackendError as exc:
        skip_without_gpu(f"pycuda sees no CUDA GPU here ({exc})")
    stack = cuda._DriverStack()
    before = stack.current()
    for _ in range(2):  # a second context, after the first is closed, works as well
        context = cuda.Context()
        with context.active():
            assert stack.current() != 0
        context.close()
        assert stack.current() == before


@pytest.mark.parametrize(("required", "outcome"), [(None, "skip"), ("0", "skip"), ("1", "fail")])
def test_a_missing_gpu_fails_only_where_it_is_required(monkeypatch, required, outcome):
    if required is None:
        monkeypatch.delenv(REQUIRE_GPU, raising=False)
    else:
        monkeypatch.setenv(REQUIRE_GPU, required)
    expected = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(expected, match="no CUDA GPU here"):
        skip_without_gpu("no CUDA GPU here")
