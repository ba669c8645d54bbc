"""The default detector on real road frames: it finds the pedestrians, and boxes lie on them.

No labels exist for these frames, so "on them" is checked against motion: pedestrians
walk, so pixels that differ from the median of the 40 frames (spread over 40 s) mark them.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from compressed_perception.runtime.detector import Detector

from conftest import MODEL_DIR

PERSON = 0


@pytest.fixture(scope="module")
def detector():
    return Detector.open(MODEL_DIR / "manifest.json", "onnxruntime")


@pytest.fixture(scope="module")
def foreground(frames):
    background = np.median(np.stack(frames), axis=0).astype(np.int16)
    masks = []
    for image in frames:
        diff = np.abs(image.astype(np.int16) - background).max(axis=2) > 30
        masks.append(cv2.morphologyEx(diff.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3))))
    return masks


def _fraction(mask, box):
    x1, y1, x2, y2 = (round(float(v)) for v in box)
    region = mask[y1:y2, x1:x2]
    return float(region.mean()) if region.size else 0.0


def test_finds_several_pedestrians_in_every_frame(detector, frames):
    for index, image in enumerate(frames):
        found = detector.detect(image).detections
        confident = (found.class_ids == PERSON) & (found.scores > 0.4)
        assert confident.sum() >= 3, f"frame {index}: {confident.sum()} people above 0.4"


def test_person_boxes_lie_on_moving_people(detector, frames, foreground):
    rng = np.random.default_rng(0)
    on_boxes, shifted = [], []
    for image, mask in zip(frames, foreground, strict=True):
        found = detector.detect(image).detections
        for box in found.boxes[(found.class_ids == PERSON) & (found.scores > 0.4)]:
            on_boxes.append(_fraction(mask, box))
            w, h = box[2] - box[0], box[3] - box[1]
            x, y = rng.uniform(0, 768 - w), rng.uniform(0, 576 - h)
            shifted.append(_fraction(mask, (x, y, x + w, y + h)))
    assert len(on_boxes) >= 120
    # Most person boxes hold a moving body; the same boxes placed at random mostly do not.
    assert np.median(on_boxes) > 0.25
    assert np.median(on_boxes) > 4 * np.median(shifted)


@pytest.mark.parametrize("size", [(640, 480), (1920, 1080), (1003, 751), (385, 289)])
def test_boxes_follow_the_image_when_resized(detector, frames, size):
    """Detections on a resized frame, mapped to its pixels, are the originals scaled."""
    image = frames[5]
    base = detector.detect(image).detections
    resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    result = detector.detect(resized)
    assert (result.width, result.height) == size
    scale = np.array([size[0] / 768, size[1] / 576] * 2, np.float32)
    expected = base.boxes[base.scores > 0.5] * scale
    assert len(expected) >= 3  # the frame has confident detections for the loop below
    got = result.detections.boxes
    assert np.all(got[:, [0, 2]] <= size[0]) and np.all(got[:, [1, 3]] <= size[1])
    assert np.all(got >= 0)
    for box in expected:
        assert _best_iou(box, got) > 0.6


def _best_iou(box, boxes):
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return float((inter / (area + areas - inter)).max()) if len(boxes) else 0.0
