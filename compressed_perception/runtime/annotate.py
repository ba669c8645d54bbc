"""Debug drawing of detections onto a copy of the frame."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from compressed_perception.runtime.postprocess import Detections


def _color(class_id: int) -> tuple[int, int, int]:
    """A stable, well-spread colour per class."""
    hue = (class_id * 47) % 180
    bgr = cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def annotate(image: np.ndarray, detections: Detections, labels: Sequence[str]) -> np.ndarray:
    canvas = image.copy()
    for box, score, class_id in zip(
        detections.boxes, detections.scores, detections.class_ids, strict=True
    ):
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        color = _color(int(class_id))
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, 2)
        text = f"{labels[int(class_id)]} {score:.2f}"
        cv2.putText(canvas, text, (x1, max(y1 - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1)
    return canvas
