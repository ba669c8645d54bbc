"""Silence known-harmless messages of third-party tools where they are raised, not globally.

Each one is named here with why it is harmless, so a new or different message still shows.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator


class _Drop(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


@contextlib.contextmanager
def drop_log_records(logger: str, *fragments: str) -> Iterator[None]:
    """Drop the records of `logger` (`""`: the root) whose message contains a fragment."""
    target = logging.getLogger(logger or None)
    dropped = _Drop(fragments)
    target.addFilter(dropped)
    try:
        yield
    finally:
        target.removeFilter(dropped)


@contextlib.contextmanager
def torch_export() -> Iterator[None]:
    """torch 2.13's exporter warns that its own pytree code uses a deprecated isinstance
    check (a FutureWarning from copyreg), and prints progress banners to stdout."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.filterwarnings(
            "ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning
        )
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        yield


def onnxruntime_quantization() -> contextlib.AbstractContextManager[None]:
    """ONNX Runtime asks for its shape-inference pre-processing on every call; the build's
    exported models are already folded and fully shaped."""
    return drop_log_records("", "consider to run pre-processing", "consider pre-processing")


def modelopt_on_cpu() -> contextlib.AbstractContextManager[None]:
    """ModelOpt logs an ERROR when it finds no NVIDIA driver, then calibrates on the CPU as
    asked (`calibration_eps=["cpu"]`)."""
    return drop_log_records("modelopt.onnx", "Failed to get GPU count")


@contextlib.contextmanager
def nncf_quantization() -> Iterator[None]:
    """NNCF logs each ignored node at INFO and draws progress bars on stdout; the build
    reports the kept nodes and shows its own progress."""
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        nncf_logger.setLevel(level)
