"""Letterbox, infer, decode and map back: one frame in, detections in image pixels out."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressed_perception.errors import BackendError, ConfigError, ModelError
from compressed_perception.runtime.backends import open_backend
from compressed_perception.runtime.backends.base import Backend
from compressed_perception.runtime.manifest import FITTED_FROM, Manifest, load_manifest
from compressed_perception.runtime.postprocess import Detections, PostprocessConfig, postprocess
from compressed_perception.runtime.preprocess import Letterbox, same_grid

DYNAMIC_BATCH_LIMIT = 8  # frames per call when the model's batch dimension is dynamic


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
    # why the frame does not fit the model's trimmed input (Detector.unfitted); None: it does
    unfitted: str | None = None


def _fitted_from(manifest: Manifest) -> tuple[tuple[int, int], int] | None:
    """The input size (height, width) and stride a trimmed input was fitted from, checked
    once here so that a malformed entry is a load error, not a failure on every frame."""
    fit = manifest.architecture.get(FITTED_FROM)
    if fit is None:
        return None
    try:
        height, width = (int(v) for v in fit["input_size"])
        stride = int(fit["stride"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(
            f"{manifest.path}: architecture {FITTED_FROM} must be "
            f"{{input_size: [height, width], stride: n}}, got {fit!r}"
        ) from exc
    if min(height, width, stride) < 1:
        raise ModelError(f"{manifest.path}: architecture {FITTED_FROM} has sizes < 1: {fit!r}")
    return (height, width), stride


def batch_limit(manifest: Manifest, backend: Backend) -> int:
    """The most frames one call takes: the model's fixed batch, else DYNAMIC_BATCH_LIMIT,
    lowered to the backend's own `max_batch` where it has one (a TensorRT engine is built
    for a range of batches), so that no caller batches more than the backend takes."""
    limit = manifest.io.batch or DYNAMIC_BATCH_LIMIT
    own = getattr(backend, "max_batch", None)
    if own is None:
        return limit
    if type(own) is not int or own < 1:
        raise BackendError(
            f"backend {backend.name!r}: max_batch {own!r} is not a positive whole number"
        )
    return min(limit, own)


class Detector:
    """Ties a backend to the host-side pre- and postprocessing of the model contract."""

    def __init__(
        self, manifest: Manifest, backend: Backend, config: PostprocessConfig | None = None
    ) -> None:
        self.manifest = manifest
        self.backend = backend
        self.config = config or PostprocessConfig()
        self.labels = manifest.classes
        self.max_batch = batch_limit(manifest, backend)
        self._letterbox = Letterbox(manifest.io.width, manifest.io.height, batch=self.max_batch)
        self._fitted_from = _fitted_from(manifest)

    def unfitted(self, width: int, height: int) -> str | None:
        """Why `width` x `height` frames are not seen as the original model saw them, where
        its input was trimmed to other cameras' frames (fit_input); None where they are."""
        if self._fitted_from is None:
            return None
        before, stride = self._fitted_from
        size = (self.manifest.io.height, self.manifest.io.width)
        if same_grid(before, size, stride, (width, height)):
            return None
        return (
            f"{width}x{height} frames do not fit the {size[1]}x{size[0]} input of "
            f"{self.manifest.name}, trimmed to other cameras' frames: it sees them at another "
            f"scale or grid than its {before[1]}x{before[0]} original, so less faithfully "
            "(build it with these frames, or fit_input sizes)"
        )

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
        return self.detect_batch([image], [name])[0]

    def detect_batch(
        self, images: Sequence[np.ndarray], names: Sequence[str] | None = None
    ) -> list[FrameResult]:
        """Several frames (e.g. one per camera) in one inference call.

        Each frame's inference time is the whole batch's: that is how long it waited.
        """
        if not 1 <= len(images) <= self.max_batch:
            raise ConfigError(
                f"batch of {len(images)} images; this model takes 1..{self.max_batch}"
            )
        names = names or [f"image {i}" for i in range(len(images))]
        start = time.perf_counter()
        transforms = [
            self._letterbox(image, slot=i, name=name)
            for i, (image, name) in enumerate(zip(images, names, strict=True))
        ]
        prepared = time.perf_counter()
        static = self.manifest.io.batch is not None
        inputs = self._letterbox.buffer if static else self._letterbox.buffer[: len(images)]
        boxes, scores = self.backend.infer(inputs)
        inferred = time.perf_counter()
        if scores.shape[-1] != len(self.labels):
            raise ModelError(
                f"{self.manifest.path}: the model scores {scores.shape[-1]} classes, its "
                f"manifest lists {len(self.labels)}"
            )
        results = []
        for i, transform in enumerate(transforms):
            begin = time.perf_counter()
            found = postprocess(boxes[i], scores[i], self.config)
            found = Detections(transform.to_original(found.boxes), found.scores, found.class_ids)
            times = StageTimes(
                (prepared - start) * 1e3 / len(images),
                (inferred - prepared) * 1e3,
                (time.perf_counter() - begin) * 1e3,
            )
            width, height = transform.src_width, transform.src_height
            why = self.unfitted(width, height)
            results.append(FrameResult(found, width, height, times, why))
        return results
