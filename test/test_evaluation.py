"""COCO evaluation on hand-built cases whose mAP is known from first principles.

COCOeval's rules used below: a detection matches a ground-truth box at IoU threshold t when
IoU >= t; AP is the mean, over 101 recall points 0, .01, ..., 1, of the highest precision
reached at recall >= that point (0 where the recall is never reached); mAP averages AP over
the 10 thresholds .50:.05:.95 and over classes that have ground truth.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from compressed_perception.errors import ConfigError
from compressed_perception.evaluation import (
    CocoEvaluator,
    MapResult,
    agreement,
    coco,
    load_coco_ground_truth,
)
from compressed_perception.runtime.postprocess import Detections

from conftest import ROOT

CLASSES = ("person", "car", "bicycle")
PERSON, CAR, BICYCLE = 0, 1, 2
IOU_THRESHOLDS = [0.5 + 0.05 * i for i in range(10)]
RECALL_POINTS = [i / 100 for i in range(101)]


def _dets(boxes, class_ids, scores=None):
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    scores = np.full(len(boxes), 0.9) if scores is None else scores
    return Detections(boxes, np.array(scores, np.float32), np.array(class_ids, np.int64))


def _evaluate(frames) -> MapResult:
    """frames: (ground truth, predictions) pairs on 640x480 images."""
    evaluator = CocoEvaluator(CLASSES)
    for index, (truth, predicted) in enumerate(frames):
        evaluator.add(f"frame{index}", 640, 480, truth, predicted)
    return evaluator.result()


def _fraction_of_thresholds_met(iou):
    return sum(iou >= t - 1e-12 for t in IOU_THRESHOLDS) / len(IOU_THRESHOLDS)


SCENE = [
    _dets([[10, 10, 110, 210], [300, 200, 420, 260]], [PERSON, CAR]),
    _dets([[50, 60, 90, 160], [200, 100, 260, 140], [400, 300, 520, 380]], [PERSON, BICYCLE, CAR]),
    _dets([[0, 0, 640, 480]], [CAR]),
]


def test_identical_predictions_score_one():
    result = _evaluate([(truth, truth) for truth in SCENE])
    assert result.map == pytest.approx(1.0)
    assert result.map50 == pytest.approx(1.0)
    assert result.map75 == pytest.approx(1.0)
    assert result.per_class == pytest.approx({"person": 1.0, "car": 1.0, "bicycle": 1.0})
    assert (result.ground_truth_boxes, result.predicted_boxes, result.frames) == (6, 6, 3)


def test_evaluation_prints_nothing(capsys):
    _evaluate([(truth, truth) for truth in SCENE])
    assert capsys.readouterr().out == ""


def test_shift_with_known_iou_meets_only_the_lower_thresholds():
    truth = _dets([[100, 100, 200, 200]], [PERSON])
    shifted = _dets([[120, 100, 220, 200]], [PERSON])  # IoU = 80*100 / (120*100) = 2/3
    iou = 80 * 100 / (120 * 100)
    result = _evaluate([(truth, shifted)])
    assert _fraction_of_thresholds_met(iou) == 0.4  # .50, .55, .60, .65
    assert result.map50 == pytest.approx(1.0)
    assert result.map75 == pytest.approx(0.0)
    assert result.map == pytest.approx(0.4)


def test_iou_equal_to_threshold_is_a_match():
    truth = _dets([[0, 0, 100, 100]], [CAR])
    half = _dets([[0, 0, 100, 50]], [CAR])  # IoU = 5000 / 10000 = 0.5 exactly
    result = _evaluate([(truth, half)])
    assert result.map50 == pytest.approx(1.0)
    assert result.map == pytest.approx(0.1)


def test_wrong_class_scores_zero_for_that_class():
    truth = _dets([[10, 10, 110, 110], [200, 200, 300, 260]], [PERSON, CAR])
    predicted = _dets([[10, 10, 110, 110], [200, 200, 300, 260]], [PERSON, BICYCLE])
    result = _evaluate([(truth, predicted)])
    # bicycle has no ground truth, so COCO leaves it out of the mean.
    assert result.per_class == pytest.approx({"person": 1.0, "car": 0.0})
    assert result.map == pytest.approx(0.5)


def test_per_class_at_50_weighs_each_class_alike():
    # the same five boxes; the one car among them is predicted as a bicycle
    boxes = [[0, 0, 100, 100], *([[200 + 60 * i, 0, 250 + 60 * i, 50] for i in range(4)])]
    truth = _dets(boxes, [CAR, *[PERSON] * 4])
    predicted = _dets(boxes, [BICYCLE, *[PERSON] * 4])
    result = _evaluate([(truth, predicted)])
    assert result.per_class50 == pytest.approx({"person": 1.0, "car": 0.0})
    # four person boxes of five are right, yet the class mean is 0.5
    assert result.map50 == pytest.approx(0.5)


def test_half_the_boxes_predicted_gives_51_of_101():
    truth = [_dets([[10 + 100 * i, 10, 90 + 100 * i, 200]], [PERSON]) for i in range(4)]
    predictions = [truth[0], truth[1], Detections.empty(), Detections.empty()]
    # Precision is 1 up to recall 0.5 and recall never goes higher.
    expected = sum(1.0 for r in RECALL_POINTS if r <= 0.5) / len(RECALL_POINTS)
    assert expected == 51 / 101
    result = _evaluate(list(zip(truth, predictions, strict=True)))
    assert result.map50 == pytest.approx(expected)
    assert result.map == pytest.approx(expected)


def test_false_positive_ranked_first_lowers_precision():
    truth = _dets([[0, 0, 50, 50], [100, 100, 150, 150]], [CAR, CAR])
    predicted = _dets(
        [[300, 300, 350, 350], [0, 0, 50, 50], [100, 100, 150, 150]], [CAR] * 3, [0.95, 0.9, 0.8]
    )
    # Ranked: FP, TP, TP -> precision 0, 1/2, 2/3 at recall 0, 1/2, 1. Interpolated
    # precision (best at any recall >= r) is 2/3 at every recall point.
    result = _evaluate([(truth, predicted)])
    assert result.map == pytest.approx(2 / 3)


def test_frames_without_boxes_still_count():
    result = _evaluate([(SCENE[0], SCENE[0]), (Detections.empty(), Detections.empty())])
    assert result.frames == 2
    assert result.map == pytest.approx(1.0)


def test_no_ground_truth_gives_nan_not_a_crash():
    result = _evaluate([(Detections.empty(), SCENE[0]), (Detections.empty(), Detections.empty())])
    assert math.isnan(result.map) and math.isnan(result.map50) and math.isnan(result.map75)
    assert (result.ground_truth_boxes, result.predicted_boxes, result.frames) == (0, 2, 2)
    assert result.per_class == {}
    as_json = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert as_json["map"] is None and as_json["frames"] == 2


def test_empty_evaluator_gives_nan():
    result = CocoEvaluator(CLASSES).result()
    assert math.isnan(result.map) and result.frames == 0


def test_to_dict_is_json_ready():
    result = _evaluate([(truth, truth) for truth in SCENE])
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert set(data) == {
        "map",
        "map50",
        "map75",
        "per_class",
        "per_class50",
        "ground_truth_boxes",
        "predicted_boxes",
        "frames",
    }
    assert data["map"] == pytest.approx(1.0) and data["per_class"]["car"] == pytest.approx(1.0)


def test_agreement_thresholds_the_reference():
    reference = [_dets([[10, 10, 110, 110], [300, 300, 400, 400]], [PERSON, CAR], [0.9, 0.3])]
    candidate = [_dets([[10, 10, 110, 110]], [PERSON], [0.8])]
    result = agreement(reference, candidate, [(640, 480)], CLASSES)
    assert result.ground_truth_boxes == 1
    assert result.map == pytest.approx(1.0)
    # With the 0.3 box as ground truth, the candidate misses the car entirely.
    lower = agreement(reference, candidate, [(640, 480)], CLASSES, reference_threshold=0.25)
    assert lower.ground_truth_boxes == 2
    assert lower.per_class == pytest.approx({"person": 1.0, "car": 0.0})


def test_agreement_thresholds_the_candidate():
    reference = [_dets([[10, 10, 110, 110]], [PERSON], [0.9])]
    candidate = [_dets([[10, 10, 110, 110]], [PERSON], [0.04])]
    result = agreement(reference, candidate, [(640, 480)], CLASSES)
    assert result.predicted_boxes == 0
    assert result.map == pytest.approx(0.0)
    kept = agreement(reference, candidate, [(640, 480)], CLASSES, candidate_threshold=0.01)
    assert kept.predicted_boxes == 1
    assert kept.map == pytest.approx(1.0)


def test_agreement_thresholds_are_inclusive():
    reference = [_dets([[10, 10, 110, 110]], [CAR], [0.35])]
    candidate = [_dets([[10, 10, 110, 110]], [CAR], [0.05])]
    result = agreement(reference, candidate, [(640, 480)], CLASSES)
    assert (result.ground_truth_boxes, result.predicted_boxes) == (1, 1)
    assert result.map == pytest.approx(1.0)


def test_agreement_with_itself_is_one():
    rng = np.random.default_rng(7)
    frames = []
    for _ in range(5):
        corners = rng.uniform(0, 500, (8, 2))
        sizes = rng.uniform(5, 120, (8, 2))
        boxes = np.hstack([corners, corners + sizes])
        frames.append(_dets(boxes, rng.integers(0, 3, 8), rng.uniform(0.06, 1.0, 8)))
    result = agreement(frames, frames, [(640, 480)] * 5, CLASSES)
    assert result.ground_truth_boxes > 0
    assert result.predicted_boxes > result.ground_truth_boxes  # low-score boxes are kept
    assert result.map == pytest.approx(1.0)
    assert result.map50 == pytest.approx(1.0)


def _jittered(frames, rng):
    """Each frame's boxes moved a little, some dropped, with random scores: a candidate
    that agrees partly, with boxes of every COCO area range (small, medium, large)."""
    out = []
    for frame in frames:
        keep = rng.random(len(frame.scores)) < 0.8
        boxes = frame.boxes[keep] + rng.normal(0, 4, (int(keep.sum()), 4)).astype(np.float32)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
        scores = rng.uniform(0.05, 1.0, len(boxes)).astype(np.float32)
        out.append(Detections(boxes, scores, frame.class_ids[keep]))
    return out


def test_evaluating_only_the_all_area_range_changes_nothing(monkeypatch):
    rng = np.random.default_rng(3)
    frames = []
    for _ in range(12):
        corners = rng.uniform(0, 400, (10, 2))
        sizes = rng.uniform(4, 240, (10, 2))  # areas from 16 to 57600 px: all three ranges
        boxes = np.hstack([corners, corners + sizes])
        frames.append(_dets(boxes, rng.integers(0, 3, 10), rng.uniform(0.35, 1.0, 10)))
    candidate = _jittered(frames, rng)
    sizes = [(640, 480)] * len(frames)
    fast = agreement(frames, candidate, sizes, CLASSES)
    monkeypatch.setattr(coco, "_area_all_only", lambda params: None)
    every_range = agreement(frames, candidate, sizes, CLASSES)
    assert 0.2 < fast.map < 0.9  # a partial agreement, not a trivial 0 or 1
    assert fast == every_range


def test_agreement_rejects_inconsistent_detections():
    ragged = Detections(np.zeros((2, 4), np.float32), np.ones(3, np.float32), np.zeros(3, np.int64))
    with pytest.raises(ConfigError, match=r"frame 0 candidate: shapes"):
        agreement([SCENE[0]], [ragged], [(640, 480)], CLASSES)


def test_agreement_lengths_must_match():
    with pytest.raises(ConfigError, match=r"3 frames, candidate 2"):
        agreement([SCENE[0]] * 3, [SCENE[0]] * 2, [(640, 480)] * 3, CLASSES)


@pytest.mark.parametrize(
    ("truth", "problem"),
    [
        (_dets([[0, 0, 10, 10]], [3]), "class ids"),
        (_dets([[0, 0, 10, 10]], [-1]), "class ids"),
        (_dets([[20, 0, 10, 10]], [PERSON]), "x2 >= x1"),
        (_dets([[0, np.nan, 10, 10]], [PERSON]), "finite"),
        (_dets([[0, 0, np.inf, 10]], [PERSON]), "finite"),
    ],
)
def test_invalid_boxes_name_the_frame(truth, problem):
    evaluator = CocoEvaluator(CLASSES)
    with pytest.raises(ConfigError, match=rf"frame 'cam_7' ground_truth: .*{problem}"):
        evaluator.add("cam_7", 640, 480, truth, Detections.empty())
    with pytest.raises(ConfigError, match=rf"frame 'cam_7' predictions: .*{problem}"):
        evaluator.add("cam_7", 640, 480, Detections.empty(), truth)


def test_duplicate_frame_id_is_rejected():
    evaluator = CocoEvaluator(CLASSES)
    evaluator.add(12, 640, 480, SCENE[0], SCENE[0])
    with pytest.raises(ConfigError, match=r"frame 12: duplicate"):
        evaluator.add(12, 640, 480, SCENE[1], SCENE[1])


def test_bad_size_and_class_names_are_rejected():
    with pytest.raises(ConfigError, match=r"frame 'a': width"):
        CocoEvaluator(CLASSES).add("a", 0, 480, SCENE[0], SCENE[0])
    with pytest.raises(ConfigError, match=r"duplicate names \['car'\]"):
        CocoEvaluator(["car", "person", "car"])


def _write_coco(path, categories, annotations):
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 640, "height": 480},
            {"id": 2, "file_name": "b.jpg", "width": 800, "height": 600},
        ],
        "annotations": annotations,
        "categories": categories,
    }
    path.write_text(json.dumps(data))
    return path


def test_load_coco_ground_truth_converts_boxes_and_categories(tmp_path):
    path = _write_coco(
        tmp_path / "gt.json",
        [{"id": 3, "name": "car"}, {"id": 7, "name": "person"}],
        [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 20, 30, 40]},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [100.5, 50.25, 60, 20]},
        ],
    )
    loaded = load_coco_ground_truth(path, CLASSES)
    assert list(loaded) == ["a.jpg", "b.jpg"]
    width, height, truth = loaded["a.jpg"]
    assert (width, height) == (640, 480)
    np.testing.assert_array_equal(truth.boxes, [[10, 20, 40, 60], [100.5, 50.25, 160.5, 70.25]])
    np.testing.assert_array_equal(truth.class_ids, [PERSON, CAR])
    np.testing.assert_array_equal(truth.scores, [1.0, 1.0])
    assert truth.boxes.dtype == np.float32 and truth.class_ids.dtype == np.int64
    width, height, empty = loaded["b.jpg"]
    assert (width, height, len(empty), empty.boxes.shape) == (800, 600, 0, (0, 4))


def test_loaded_ground_truth_feeds_the_evaluator(tmp_path):
    path = _write_coco(
        tmp_path / "gt.json",
        [{"id": 1, "name": "bicycle"}],
        [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [5, 5, 50, 50]}],
    )
    evaluator = CocoEvaluator(CLASSES)
    for name, (width, height, truth) in load_coco_ground_truth(path, CLASSES).items():
        evaluator.add(name, width, height, truth, truth)
    result = evaluator.result()
    assert result.per_class == pytest.approx({"bicycle": 1.0})
    assert result.frames == 2


def test_unknown_category_names_are_listed(tmp_path):
    path = _write_coco(
        tmp_path / "gt.json",
        [{"id": 1, "name": "person"}, {"id": 2, "name": "tram"}, {"id": 3, "name": "dog"}],
        [],
    )
    with pytest.raises(ConfigError, match=r"gt\.json.*\['dog', 'tram'\]"):
        load_coco_ground_truth(path, CLASSES)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"absent\.json"):
        load_coco_ground_truth(tmp_path / "absent.json", CLASSES)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"images": [], "categories": []}', "no 'annotations'"),
        ('{"images": [{"id": 1}], "annotations": [], "categories": []}', "no 'file_name'"),
        ('{"images": {}, "annotations": [], "categories": []}', "'images' must be a list"),
    ],
)
def test_malformed_file_names_the_file(tmp_path, text, problem):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"broken\.json.*{problem}"):
        load_coco_ground_truth(path, CLASSES)


def test_bad_annotation_is_rejected(tmp_path):
    path = _write_coco(
        tmp_path / "gt.json",
        [{"id": 1, "name": "car"}],
        [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, -5, 10]}],
    )
    with pytest.raises(ConfigError, match=r"gt\.json: annotations\[0\] bbox"):
        load_coco_ground_truth(path, CLASSES)


def test_evaluation_does_not_import_torch():
    code = "import sys, compressed_perception.evaluation; sys.exit('torch' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
