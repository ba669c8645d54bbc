"""Letterbox, infer, decode and map back: one frame in, detections in image pixels out."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressed_perception.runtime.backends import open_backend
from compressed_perception.runtime.backends.base import Backend
from compressed_perception.runtime.manifest import Manifest, load_manifest
from compressed_perception.runtime.postprocess import Detections, PostprocessConfig, postprocess
from compressed_perception.runtime.preprocess import Letterbox


@dataclass(frozen=True)
class StageTimes:
    """Milliseconds spent in each stage of one frame."""

    preprocess: float
    inference: float
    postprocess: float

    @property
    def total(self) -> float:
        return self.preprocess + self.inference + self.postprocess


@dataclass(frozen=True)
class FrameResult:
    detections: Detections  # boxes in original image pixels, clipped to the image
    width: int
    height: int
    latency_ms: StageTimes


class Detector:
    """Ties a backend to the host-side pre- and postprocessing of the model contract."""

    def __init__(
        self, manifest: Manifest, backend: Backend, config: PostprocessConfig | None = None
    ) -> None:
        self.manifest = manifest
        self.backend = backend
        self.config = config or PostprocessConfig()
        self.labels = manifest.classes
        self._letterbox = Letterbox(manifest.io.width, manifest.io.height)

    @classmethod
    def open(
        cls,
        manifest: Path,
        backend: str = "auto",
        config: PostprocessConfig | None = None,
        threads: int = 0,
    ) -> Detector:
        loaded = load_manifest(manifest)
        return cls(loaded, open_backend(loaded, backend, threads=threads), config)

    def detect(self, image: np.ndarray, name: str = "image") -> FrameResult:
        """`image` is an (h, w, 3) uint8 BGR array; `name` appears in any error."""
        start = time.perf_counter()
        transform = self._letterbox(image, name=name)
        prepared = time.perf_counter()
        boxes, scores = self.backend.infer(self._letterbox.buffer)
        inferred = time.perf_counter()
        found = postprocess(boxes[0], scores[0], self.config)
        found = Detections(transform.to_original(found.boxes), found.scores, found.class_ids)
        done = time.perf_counter()
        times = StageTimes(
            (prepared - start) * 1e3, (inferred - prepared) * 1e3, (done - inferred) * 1e3
        )
        return FrameResult(found, transform.src_width, transform.src_height, times)
