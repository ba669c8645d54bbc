"""COCO bbox mAP through pycocotools' COCOeval, so numbers match what the field reports.

Two uses: agreement of a compressed model with its FP32 reference (the reference's confident
detections stand in for labels), and real mAP against labelled ground truth.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from compressed_perception.errors import ConfigError
from compressed_perception.runtime.postprocess import Detections

FrameId = str | int
# a reference detection at or above this score stands in for a label in agreement
REFERENCE_THRESHOLD = 0.35


@dataclass(frozen=True)
class MapResult:
    """COCO bbox metrics over every frame evaluated.

    map, map50 and map75 are NaN when there is no ground-truth box at all: mAP is then
    undefined, and NaN keeps it from passing for a score. per_class holds AP@[.5:.95] and
    per_class50 AP@.5 for each class name that has at least one ground-truth box: the means
    weigh every such class alike, however few boxes it has.
    """

    map: float  # AP averaged over IoU .50:.05:.95
    map50: float
    map75: float
    per_class: dict[str, float]
    per_class50: dict[str, float]
    ground_truth_boxes: int
    predicted_boxes: int
    frames: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; NaN becomes None because strict JSON has no NaN."""
        values = asdict(self)
        for key in ("map", "map50", "map75"):
            values[key] = None if math.isnan(values[key]) else values[key]
        return values


class CocoEvaluator:
    """Accumulates frames of ground truth and predictions, then scores them all at once.

    Class ids index `class_names`; COCO category ids are class id + 1 because some COCO
    tools treat 0 as "no category". Every ground-truth box is `iscrowd=0` with area w*h.
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        _check_class_names(class_names)
        self._class_names = tuple(class_names)
        self._frame_ids: set[FrameId] = set()
        self._images: list[dict[str, Any]] = []
        self._ground_truth: list[dict[str, Any]] = []
        self._predictions: list[dict[str, Any]] = []

    def add(
        self,
        frame_id: FrameId,
        width: int,
        height: int,
        ground_truth: Detections,
        predictions: Detections,
    ) -> None:
        """Adds one frame; ground-truth scores are ignored."""
        self._check_frame(frame_id, width, height)
        _check_detections(frame_id, "ground_truth", ground_truth, len(self._class_names))
        _check_detections(frame_id, "predictions", predictions, len(self._class_names))
        _check_finite_scores(frame_id, predictions)
        image_id = len(self._images) + 1
        self._frame_ids.add(frame_id)
        self._images.append({"id": image_id, "width": int(width), "height": int(height)})
        self._ground_truth += _annotations(image_id, ground_truth, len(self._ground_truth))
        predicted = _annotations(image_id, predictions, len(self._predictions))
        for annotation, score in zip(predicted, predictions.scores.tolist(), strict=True):
            annotation["score"] = score
        self._predictions += predicted

    def result(self) -> MapResult:
        """Runs COCOeval (bbox, default parameters) over every frame added so far."""
        if not self._ground_truth:
            nan = float("nan")
            return self._summary(nan, nan, nan, {}, {})
        precision, params = self._evaluate()
        at50 = precision[_iou_index(params, 0.5)]
        present = sorted({a["category_id"] - 1 for a in self._ground_truth})
        return self._summary(
            _mean_ap(precision),
            _mean_ap(at50),
            _mean_ap(precision[_iou_index(params, 0.75)]),
            {self._class_names[k]: _mean_ap(precision[:, :, k]) for k in present},
            {self._class_names[k]: _mean_ap(at50[:, k]) for k in present},
        )

    def _check_frame(self, frame_id: FrameId, width: int, height: int) -> None:
        if isinstance(frame_id, bool) or not isinstance(frame_id, str | int):
            raise ConfigError(f"frame {frame_id!r}: frame id must be a str or int")
        if frame_id in self._frame_ids:
            raise ConfigError(f"frame {frame_id!r}: duplicate frame id")
        for name, value in (("width", width), ("height", height)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ConfigError(
                    f"frame {frame_id!r}: {name} must be a positive int, not {value!r}"
                )

    def _evaluate(self) -> tuple[np.ndarray, Any]:
        """precision[T, R, K] for area 'all' and maxDets 100, plus the parameters used.

        Only the 'all' area range is evaluated: COCOeval matches every image and class once
        per range, each range on its own, so the small, medium and large ranges cost three
        quarters of the time and change nothing in 'all' (tested against all four)."""
        with contextlib.redirect_stdout(io.StringIO()):
            gt = _coco(self._images, self._ground_truth, self._class_names)
            dt = _coco(self._images, self._predictions, self._class_names)
            evaluator = COCOeval(gt, dt, iouType="bbox")
            _area_all_only(evaluator.params)
            evaluator.evaluate()
            evaluator.accumulate()
        params = evaluator.params
        area_all = params.areaRngLbl.index("all")
        max_dets = params.maxDets.index(100)
        return evaluator.eval["precision"][:, :, :, area_all, max_dets], params

    def _summary(
        self,
        map_: float,
        map50: float,
        map75: float,
        per_class: dict[str, float],
        per_class50: dict[str, float],
    ) -> MapResult:
        return MapResult(
            map=map_,
            map50=map50,
            map75=map75,
            per_class=per_class,
            per_class50=per_class50,
            ground_truth_boxes=len(self._ground_truth),
            predicted_boxes=len(self._predictions),
            frames=len(self._images),
        )


def _area_all_only(params: Any) -> None:
    """Keep only COCOeval's 'all' area range."""
    index = params.areaRngLbl.index("all")
    params.areaRng = [params.areaRng[index]]
    params.areaRngLbl = ["all"]


def agreement(
    reference: Sequence[Detections],
    candidate: Sequence[Detections],
    sizes: Sequence[tuple[int, int]],
    class_names: Sequence[str],
    reference_threshold: float = REFERENCE_THRESHOLD,
    candidate_threshold: float = 0.05,
) -> MapResult:
    """mAP of `candidate` against `reference` where no labels exist.

    The reference's detections with score >= reference_threshold stand in for ground truth;
    the candidate keeps a low threshold so its whole precision-recall curve is scored.
    Frame i of each pairs up, and sizes[i] is that frame's (width, height).
    """
    if not len(reference) == len(candidate) == len(sizes):
        raise ConfigError(
            f"agreement: reference has {len(reference)} frames, candidate {len(candidate)}, "
            f"sizes {len(sizes)}; they must match"
        )
    for name, value in (
        ("reference_threshold", reference_threshold),
        ("candidate_threshold", candidate_threshold),
    ):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"agreement: {name} must be in [0, 1], got {value}")
    evaluator = CocoEvaluator(class_names)
    for index, (ref, cand, (width, height)) in enumerate(
        zip(reference, candidate, sizes, strict=True)
    ):
        _check_detections(index, "reference", ref, len(class_names))
        _check_detections(index, "candidate", cand, len(class_names))
        evaluator.add(
            index,
            width,
            height,
            _above(ref, reference_threshold),
            _above(cand, candidate_threshold),
        )
    return evaluator.result()


def load_coco_ground_truth(
    path: Path, class_names: Sequence[str]
) -> dict[str, tuple[int, int, Detections]]:
    """file_name -> (width, height, ground truth with scores 1.0) from a COCO-format JSON.

    Categories are matched to `class_names` by name, since dataset and model ids rarely agree.
    Crowd annotations become ordinary boxes (Detections has no crowd flag).
    """
    _check_class_names(class_names)
    data = _read_json(path)
    categories = _category_classes(path, _list(data, "categories", path), class_names)
    images = _images(path, _list(data, "images", path))
    boxes: dict[int, list[list[float]]] = {image_id: [] for image_id in images}
    classes: dict[int, list[int]] = {image_id: [] for image_id in images}
    for index, annotation in enumerate(_list(data, "annotations", path)):
        where = f"annotations[{index}]"
        image_id = _require(annotation, "image_id", path, where)
        category_id = _require(annotation, "category_id", path, where)
        if image_id not in images:
            raise ConfigError(f"{path}: {where} refers to unknown image_id {image_id!r}")
        if category_id not in categories:
            raise ConfigError(f"{path}: {where} refers to unknown category_id {category_id!r}")
        boxes[image_id].append(_xyxy(path, where, _require(annotation, "bbox", path, where)))
        classes[image_id].append(categories[category_id])
    return {
        name: (width, height, _ground_truth_detections(boxes[image_id], classes[image_id]))
        for image_id, (name, width, height) in images.items()
    }


def _check_class_names(class_names: Sequence[str]) -> None:
    if not class_names:
        raise ConfigError("class_names: empty; at least one class is needed")
    duplicates = sorted(name for name, count in Counter(class_names).items() if count > 1)
    if duplicates:
        raise ConfigError(f"class_names: duplicate names {duplicates}")


def _check_detections(frame_id: FrameId, role: str, detections: Detections, classes: int) -> None:
    """Shapes, finite boxes with x2 >= x1 and y2 >= y1, and class ids within class_names."""
    where = f"frame {frame_id!r} {role}"
    boxes, scores, class_ids = detections.boxes, detections.scores, detections.class_ids
    count = len(scores)
    if boxes.shape != (count, 4) or scores.shape != (count,) or class_ids.shape != (count,):
        raise ConfigError(
            f"{where}: shapes boxes {boxes.shape}, scores {scores.shape}, "
            f"class_ids {class_ids.shape} do not describe {count} boxes"
        )
    if not np.isfinite(boxes).all():
        raise ConfigError(f"{where}: box coordinates must be finite")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise ConfigError(f"{where}: boxes must have x2 >= x1 and y2 >= y1")
    if not np.issubdtype(class_ids.dtype, np.integer):
        raise ConfigError(f"{where}: class_ids must be integers, got {class_ids.dtype}")
    if count and (class_ids.min() < 0 or class_ids.max() >= classes):
        raise ConfigError(
            f"{where}: class ids must be in [0, {classes}), got {sorted(set(class_ids.tolist()))}"
        )


def _check_finite_scores(frame_id: FrameId, predictions: Detections) -> None:
    if not np.isfinite(predictions.scores).all():
        raise ConfigError(f"frame {frame_id!r} predictions: scores must be finite")


def _annotations(image_id: int, detections: Detections, previous: int) -> list[dict[str, Any]]:
    """COCO annotations (xywh, category = class + 1); ids continue after `previous` from 1.

    Ids must start at 1: COCOeval stores matched ids in an array where 0 means "unmatched".
    """
    x1, y1, x2, y2 = detections.boxes.astype(np.float64).T.tolist()
    return [
        {
            "id": previous + index + 1,
            "image_id": image_id,
            "category_id": int(class_id) + 1,
            "bbox": [left, top, right - left, bottom - top],
            "area": (right - left) * (bottom - top),
            "iscrowd": 0,
        }
        for index, (left, top, right, bottom, class_id) in enumerate(
            zip(x1, y1, x2, y2, detections.class_ids.tolist(), strict=True)
        )
    ]


def _coco(
    images: list[dict[str, Any]], annotations: list[dict[str, Any]], class_names: Sequence[str]
) -> COCO:
    """A COCO index built in memory; loadRes is avoided because it fails on no results."""
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(class_names)]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    coco.createIndex()
    return coco


def _iou_index(params: Any, threshold: float) -> int:
    return int(np.flatnonzero(np.isclose(params.iouThrs, threshold))[0])


def _mean_ap(precision: np.ndarray) -> float:
    """Mean over defined entries (-1 marks a class without ground truth), as COCO does."""
    defined = precision[precision > -1]
    return float(defined.mean()) if defined.size else float("nan")


def _above(detections: Detections, threshold: float) -> Detections:
    keep = detections.scores >= threshold
    return Detections(detections.boxes[keep], detections.scores[keep], detections.class_ids[keep])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read COCO ground truth: {error.strerror}") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: COCO ground truth must be a JSON object")
    return data


def _require(record: Any, key: str, path: Path, where: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise ConfigError(f"{path}: {where} has no '{key}'")
    return record[key]


def _list(data: dict[str, Any], key: str, path: Path) -> list[Any]:
    value = _require(data, key, path, "file")
    if not isinstance(value, list):
        raise ConfigError(f"{path}: '{key}' must be a list, got {type(value).__name__}")
    return value


def _category_classes(
    path: Path, categories: list[Any], class_names: Sequence[str]
) -> dict[Any, int]:
    """COCO category id -> index in class_names, matched by name."""
    names = {
        _require(c, "id", path, f"categories[{i}]"): _require(c, "name", path, f"categories[{i}]")
        for i, c in enumerate(categories)
    }
    unknown = sorted(str(n) for n in names.values() if n not in class_names)
    if unknown:
        raise ConfigError(f"{path}: categories not in class_names: {unknown}")
    return {category_id: list(class_names).index(name) for category_id, name in names.items()}


def _images(path: Path, images: list[Any]) -> dict[Any, tuple[str, int, int]]:
    """image id -> (file_name, width, height); file names must be unique, sizes positive."""
    result: dict[Any, tuple[str, int, int]] = {}
    seen: set[str] = set()
    for index, image in enumerate(images):
        where = f"images[{index}]"
        image_id, name, width, height = (
            _require(image, key, path, where) for key in ("id", "file_name", "width", "height")
        )
        if name in seen or image_id in result:
            raise ConfigError(f"{path}: {where} repeats file_name {name!r} or id {image_id!r}")
        for key, value in (("width", width), ("height", height)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{path}: {where} {key} must be a positive int, got {value!r}")
        seen.add(name)
        result[image_id] = (name, width, height)
    return result


def _xyxy(path: Path, where: str, bbox: Any) -> list[float]:
    """COCO [x, y, w, h] -> [x1, y1, x2, y2], rejecting what no box can be."""
    valid = (
        isinstance(bbox, list)
        and len(bbox) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
        and all(math.isfinite(v) for v in bbox)
        and bbox[2] >= 0
        and bbox[3] >= 0
    )
    if not valid:
        raise ConfigError(f"{path}: {where} bbox must be 4 finite numbers with w, h >= 0")
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def _ground_truth_detections(boxes: list[list[float]], classes: list[int]) -> Detections:
    return Detections(
        np.array(boxes, np.float32).reshape(-1, 4),
        np.ones(len(classes), np.float32),
        np.array(classes, np.int64),
    )
