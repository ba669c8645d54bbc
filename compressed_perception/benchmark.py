"""Latency per stage over real frames, for each backend and input size, in one process.

Every configuration runs in the same process on the same frames, so ratios between
them are meaningful even on a noisy machine; absolute figures are not portable.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from compressed_perception import datasets
from compressed_perception.runtime.detector import Detector, FrameResult
from compressed_perception.runtime.postprocess import PostprocessConfig

STAGES = ("preprocess", "inference", "postprocess", "total")
BLOCK = 10
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class BenchResult:
    backend: str
    width: int
    height: int
    iterations: int
    stats: dict[str, dict[str, float]]  # stage -> {"p50": ms, "p90": ms, "p99": ms}
    model: str = ""  # the manifest's model name
    folder: str = ""  # the manifest's folder: two builds may give a model the same name

    @property
    def label(self) -> str:
        return f"{self.model} {self.backend}".strip()

    def row(self, label: str, width: int) -> str:
        cells = [f"{self.stats[s]['p50']:8.2f} {self.stats[s]['p99']:8.2f}" for s in STAGES]
        return f"{label:<{width}} {self.width:>4}x{self.height:<5} " + " ".join(cells)


def parse_size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or "0" in (width[:1], height[:1]):
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT with positive integers")
    return int(width), int(height)


def load_frames(source: Path, limit: int = 40) -> list[np.ndarray]:
    """The first `limit` frames of an image, video, folder or bag."""
    return datasets.load_frames(datasets.FrameSource(str(source), stop=limit))


def percentiles(values: Sequence[float]) -> dict[str, float]:
    return {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}


def run_bench(
    rows: Sequence[tuple[Path, str]],
    sizes: Sequence[tuple[int, int]],
    source: Path,
    iterations: int,
    threads: int = 0,
) -> list[BenchResult]:
    """The (model, backend, size) rows take turns in blocks of `BLOCK` frames.

    Interleaving means a slow spell of a shared machine slows every row alike, so the
    ratios between rows hold even when the absolute figures drift. Each block starts
    with one unrecorded frame: ONNX Runtime's threads spin for a while after a run and
    would otherwise slow the first frame of the row that follows.
    """
    images = load_frames(source)
    detectors = [
        Detector.open(manifest, backend, PostprocessConfig(), threads=threads)
        for manifest, backend in rows
    ]
    return interleave(detectors, sizes, images, iterations)


def interleave(
    detectors: Sequence[Detector],
    sizes: Sequence[tuple[int, int]],
    images: Sequence[np.ndarray],
    iterations: int,
) -> list[BenchResult]:
    """Every (detector, size) row timed on the same frames, rows taking turns in blocks."""
    rows = [(d, size) for d in detectors for size in sizes]
    inputs = {
        size: [cv2.resize(image, size, interpolation=cv2.INTER_LINEAR) for image in images]
        for size in sizes
    }
    samples: list[list[FrameResult]] = [[] for _ in rows]
    for start in range(0, iterations, BLOCK):
        for (detector, size), results in zip(rows, samples, strict=True):
            detector.detect(inputs[size][start % len(images)])  # settles the CPU for this row
            for index in range(start, min(start + BLOCK, iterations)):
                results.append(detector.detect(inputs[size][index % len(images)]))
    return [
        BenchResult(
            detector.backend.name,
            size[0],
            size[1],
            iterations,
            {s: percentiles([getattr(r.latency_ms, s) for r in results]) for s in STAGES},
            detector.manifest.name,
            str(detector.manifest.folder),
        )
        for (detector, size), results in zip(rows, samples, strict=True)
    ]


ISA = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def isa_flags() -> list[str]:
    """The CPU's vector and matrix extensions that decide FP32, BF16 and INT8 speed."""
    flags = set(_cpuinfo().get("flags", "").split())
    return [flag for flag in ISA if flag in flags]


def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def machine() -> dict[str, Any]:
    """Where a figure was measured: ratios between CPUs of different ISA do not carry over."""
    return {
        "platform": platform.platform(),
        "processor": _cpuinfo().get("model name") or platform.processor() or platform.machine(),
        "isa": " ".join(isa_flags()) or "unknown",
        "cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def table(results: Sequence[BenchResult]) -> str:
    """Rows, then each row's total p50 as a ratio of the first row's at the same size."""
    labels = _labels(results)
    width = max(len("model backend"), *(len(label) for label in labels))
    stages = " ".join(f"{s + ' p50/p99 ms':>17}" for s in STAGES)
    lines = [f"{'model backend':<{width}} {'size':<10} {stages}"]
    lines += [r.row(label, width) for r, label in zip(results, labels, strict=True)]
    base = {
        (r.width, r.height): (r, label)
        for r, label in zip(results, labels, strict=True)
        if label == labels[0]
    }
    for r, label in zip(results, labels, strict=True):
        ref, ref_label = base.get((r.width, r.height), (None, ""))
        if ref is not None and r is not ref:
            ratio = r.stats["total"]["p50"] / ref.stats["total"]["p50"]
            lines.append(f"ratio {label} / {ref_label} at {r.width}x{r.height}: {ratio:.2f}")
    return "\n".join(lines)


def _labels(results: Sequence[BenchResult]) -> list[str]:
    """Each row's model and backend, with its folder where models from two folders share
    a name (two builds of one recipe do): otherwise their rows could not be told apart."""
    folders: dict[str, set[str]] = {}
    for r in results:
        folders.setdefault(r.label, set()).add(r.folder)
    return [f"{r.label} ({r.folder})" if len(folders[r.label]) > 1 else r.label for r in results]
