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

    def row(self) -> str:
        cells = [f"{self.stats[s]['p50']:8.2f} {self.stats[s]['p99']:8.2f}" for s in STAGES]
        return f"{self.backend:<12} {self.width:>4}x{self.height:<5} " + " ".join(cells)


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
    manifest: Path,
    backends: Sequence[str],
    sizes: Sequence[tuple[int, int]],
    source: Path,
    iterations: int,
    threads: int = 0,
) -> list[BenchResult]:
    """The (backend, size) rows take turns in blocks of `BLOCK` frames.

    Interleaving means a slow spell of a shared machine slows every row alike, so the
    ratios between rows hold even when the absolute figures drift. Each block starts
    with one unrecorded frame: ONNX Runtime's threads spin for a while after a run and
    would otherwise slow the first frame of the row that follows.
    """
    images = load_frames(source)
    detectors = [Detector.open(manifest, b, PostprocessConfig(), threads=threads) for b in backends]
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
        )
        for (detector, size), results in zip(rows, samples, strict=True)
    ]


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def table(results: Sequence[BenchResult]) -> str:
    header = f"{'backend':<12} {'size':<10} " + " ".join(f"{s + ' p50/p99 ms':>17}" for s in STAGES)
    lines = [header, *(r.row() for r in results)]
    base = {(r.width, r.height): r for r in results if r.backend == results[0].backend}
    for r in results[len(base) :]:
        ref = base.get((r.width, r.height))
        if ref:
            ratio = r.stats["total"]["p50"] / ref.stats["total"]["p50"]
            lines.append(f"ratio {r.backend}/{ref.backend} at {r.width}x{r.height}: {ratio:.2f}")
    return "\n".join(lines)
