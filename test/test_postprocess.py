"""Postprocessing against plain-Python references, plus the cases that matter in practice."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from compressed_perception.errors import ConfigError, ModelError
from compressed_perception.runtime.postprocess import (
    PAIRWISE_MAX,
    Detections,
    PostprocessConfig,
    nms,
    postprocess,
)

FAST = settings(max_examples=200, deadline=None)


def _reference_iou(a, b):
    def area(box):
        return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])

    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def _reference_nms(boxes, scores, threshold):
    """The textbook O(n^2) loop: visit by (score desc, index asc), drop what overlaps."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    suppressed, kept = set(), []
    for position, i in enumerate(order):
        if i in suppressed:
            continue
        kept.append(i)
        for j in order[position + 1 :]:
            if _reference_iou(boxes[i].tolist(), boxes[j].tolist()) > threshold:
                suppressed.add(j)
    return kept


def _reference_postprocess(boxes, scores, config):
    """Per-class NMS on explicit candidate lists, merged by score: no offset trick."""
    candidates = [
        (float(scores[a, c]), a, c)
        for a in range(scores.shape[0])
        for c in range(scores.shape[1])
        if scores[a, c] > config.score_threshold
        and (config.class_ids is None or c in config.class_ids)
    ]
    # sorted() is stable: equal scores stay in anchor-then-class order.
    candidates = sorted(candidates, key=lambda item: -item[0])[: config.pre_nms_top_k]
    kept = []
    for class_id in {c for _, _, c in candidates}:
        rank = [r for r, (_, _, c) in enumerate(candidates) if c == class_id]
        class_boxes = boxes[[candidates[r][1] for r in rank]]
        class_scores = [candidates[r][0] for r in rank]
        kept += [rank[k] for k in _reference_nms(class_boxes, class_scores, config.nms_threshold)]
    return [candidates[r] for r in sorted(kept)][: config.max_detections]


def integer_boxes(count):
    """Integer corners keep IoU exact, so reference and NumPy agree on every threshold.

    Widths and heights may be zero or negative: degenerate boxes are part of the input.
    """
    corners = hnp.arrays(np.int64, (count, 2), elements=st.integers(-20, 60))
    sizes = hnp.arrays(np.int64, (count, 2), elements=st.integers(-3, 40))
    return st.tuples(corners, sizes).map(
        lambda pair: np.concatenate([pair[0], pair[0] + pair[1]], axis=1).astype(np.float32)
    )


SCORES = st.one_of(st.sampled_from([0.25, 0.5, 0.75]), st.floats(0, 1, width=32))


def score_arrays(shape):
    """Scores with frequent exact ties, to pin down the tie-breaking order."""
    return hnp.arrays(np.float32, shape, elements=SCORES)


@FAST
@given(
    data=st.data(),
    count=st.integers(0, 40),
    threshold=st.floats(0, 1),
    limit=st.one_of(st.none(), st.integers(1, 45)),
)
def test_nms_matches_reference(data, count, threshold, limit):
    """The first `limit` boxes the textbook loop keeps, however early the loop stops."""
    boxes = data.draw(integer_boxes(count))
    scores = data.draw(score_arrays(count))
    kept = nms(boxes, scores, threshold, limit)
    assert kept.dtype == np.int64
    assert kept.tolist() == _reference_nms(boxes, scores.tolist(), threshold)[:limit]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("limit", [None, 100])
def test_nms_past_the_pairwise_size_matches_reference(seed, limit):
    """Past PAIRWISE_MAX boxes NMS takes its other path, one kept box at a time: as many
    boxes as a 0.05 score threshold gives, crowded, with tied scores and empty boxes."""
    rng = np.random.default_rng(seed)
    count = PAIRWISE_MAX * 3
    corners = rng.integers(-20, 200, (count, 2))
    boxes = np.concatenate([corners, corners + rng.integers(-3, 60, (count, 2))], 1)
    scores = rng.choice([0.25, 0.5, 0.75, *rng.random(8)], count).astype(np.float32)
    threshold = float(rng.uniform(0.2, 0.8))
    kept = nms(boxes.astype(np.float32), scores, threshold, limit)
    expected = _reference_nms(boxes.astype(np.float32), scores.tolist(), threshold)
    assert len(expected) > PAIRWISE_MAX // 4  # crowded, yet many boxes kept
    assert kept.tolist() == expected[:limit]


@FAST
@given(
    data=st.data(),
    anchors=st.integers(0, 25),
    classes=st.integers(1, 4),
    score_threshold=st.sampled_from([0.0, 0.25, 0.5, 0.9]),
    nms_threshold=st.floats(0, 1),
    max_detections=st.integers(1, 30),
    pre_nms_top_k=st.integers(1, 60),
    class_filter=st.booleans(),
)
def test_postprocess_matches_reference(
    data,
    anchors,
    classes,
    score_threshold,
    nms_threshold,
    max_detections,
    pre_nms_top_k,
    class_filter,
):
    boxes = data.draw(integer_boxes(anchors))
    scores = data.draw(score_arrays((anchors, classes)))
    class_ids = None
    if class_filter:
        class_ids = tuple(data.draw(st.sets(st.integers(0, classes - 1), min_size=1)))
    config = PostprocessConfig(
        score_threshold, nms_threshold, max_detections, pre_nms_top_k, class_ids
    )
    found = postprocess(boxes, scores, config)
    expected = _reference_postprocess(boxes, scores, config)
    assert found.boxes.dtype == np.float32 and found.boxes.shape == (len(expected), 4)
    assert found.scores.dtype == np.float32 and found.class_ids.dtype == np.int64
    assert found.scores.tolist() == [s for s, _, _ in expected]
    assert found.class_ids.tolist() == [c for _, _, c in expected]
    np.testing.assert_array_equal(found.boxes, boxes[[a for _, a, _ in expected]].reshape(-1, 4))


def _outputs(boxes, classes=3, **scores):
    """Boxes plus an (N, classes) score matrix, set where named: a{anchor}_{class}=score."""
    matrix = np.zeros((len(boxes), classes), np.float32)
    for key, value in scores.items():
        anchor, class_id = (int(v) for v in key[1:].split("_"))
        matrix[anchor, class_id] = value
    return np.array(boxes, np.float32), matrix


OVERLAPPING = [[0, 0, 100, 100], [5, 5, 105, 105]]  # IoU 0.82


def test_same_class_overlap_is_suppressed_other_class_kept():
    boxes, scores = _outputs(OVERLAPPING, a0_1=0.9, a1_1=0.8)
    found = postprocess(boxes, scores, PostprocessConfig())
    assert found.scores.tolist() == pytest.approx([0.9])
    boxes, scores = _outputs(OVERLAPPING, a0_1=0.9, a1_2=0.8)
    found = postprocess(boxes, scores, PostprocessConfig())
    assert found.class_ids.tolist() == [1, 2]
    np.testing.assert_array_equal(found.boxes, boxes)


def test_one_anchor_gives_several_classes():
    boxes, scores = _outputs([[10, 10, 50, 50]], a0_2=0.8, a0_0=0.9, a0_1=0.2)
    found = postprocess(boxes, scores, PostprocessConfig())
    assert found.class_ids.tolist() == [0, 2]
    np.testing.assert_array_equal(found.boxes, [[10, 10, 50, 50]] * 2)


def test_classes_never_meet_even_at_negative_coordinates():
    """An offset of max + 1 would let these classes overlap; the span offset does not."""
    box = [-300, -300, -250, -250]
    boxes, scores = _outputs([box, box, [0, 0, 1, 1]], a0_0=0.9, a1_1=0.8, a2_0=0.7)
    found = postprocess(boxes, scores, PostprocessConfig())
    assert found.class_ids.tolist() == [0, 1, 0]


def test_class_filter():
    boxes, scores = _outputs([[0, 0, 9, 9], [20, 20, 29, 29]], a0_0=0.9, a1_2=0.6, a0_2=0.5)
    found = postprocess(boxes, scores, PostprocessConfig(class_ids=(2,)))
    assert found.class_ids.tolist() == [2, 2]
    assert found.scores.tolist() == pytest.approx([0.6, 0.5])


def test_class_filter_beyond_model_classes():
    boxes, scores = _outputs([[0, 0, 9, 9]], a0_0=0.9)
    with pytest.raises(ConfigError, match=r"class_ids: \[3, 7\] beyond the model's 3 classes"):
        postprocess(boxes, scores, PostprocessConfig(class_ids=(0, 3, 7)))


def test_score_threshold_is_strict():
    above = float(np.nextafter(np.float32(0.5), np.float32(1)))
    boxes, scores = _outputs([[0, 0, 9, 9], [20, 20, 29, 29]], a0_0=0.5, a1_0=above)
    found = postprocess(boxes, scores, PostprocessConfig(score_threshold=0.5))
    assert found.scores.tolist() == [above]
    np.testing.assert_array_equal(found.boxes, boxes[1:])


def _disjoint(count):
    boxes = [[20 * i, 0, 20 * i + 10, 10] for i in range(count)]
    values = np.linspace(0.4, 0.95, count, dtype=np.float32)[::-1]
    return np.array(boxes, np.float32), values[:, None].copy()


def test_max_detections_keeps_the_best():
    boxes, scores = _disjoint(10)
    found = postprocess(boxes, scores, PostprocessConfig(max_detections=3))
    np.testing.assert_array_equal(found.scores, scores[:3, 0])
    np.testing.assert_array_equal(found.boxes, boxes[:3])


def test_pre_nms_top_k_cuts_before_nms():
    """The third box survives NMS, but only the two best candidates ever reach it."""
    boxes, scores = _outputs([*OVERLAPPING, [300, 300, 310, 310]], a0_0=0.9, a1_0=0.8, a2_0=0.7)
    assert len(postprocess(boxes, scores, PostprocessConfig())) == 2
    found = postprocess(boxes, scores, PostprocessConfig(pre_nms_top_k=2))
    assert found.scores.tolist() == pytest.approx([0.9])


def test_ties_are_broken_by_anchor_then_class():
    boxes, scores = _outputs([[0, 0, 9, 9], [0, 0, 9, 9]], a1_0=0.5, a0_1=0.5, a0_0=0.5)
    found = postprocess(boxes, scores, PostprocessConfig(score_threshold=0.1))
    assert found.class_ids.tolist() == [0, 1]
    np.testing.assert_array_equal(found.boxes, boxes[[0, 0]])
    assert nms(boxes, np.array([0.5, 0.5], np.float32), 0.5).tolist() == [0]
    assert nms(boxes, np.array([0.5, 0.6], np.float32), 0.5).tolist() == [1]


@pytest.mark.parametrize("anchors", [0, 5])
def test_nothing_above_threshold_gives_empty(anchors):
    boxes = np.zeros((anchors, 4), np.float32)
    found = postprocess(boxes, np.full((anchors, 80), 0.1, np.float32), PostprocessConfig())
    for detections in (found, Detections.empty()):
        assert len(detections) == 0
        assert (detections.boxes.shape, detections.boxes.dtype) == ((0, 4), np.float32)
        assert (detections.scores.shape, detections.scores.dtype) == ((0,), np.float32)
        assert (detections.class_ids.shape, detections.class_ids.dtype) == ((0,), np.int64)


def test_nms_of_nothing():
    kept = nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5)
    assert (kept.shape, kept.dtype) == ((0,), np.int64)


def test_degenerate_boxes_warn_nothing_and_suppress_nothing():
    boxes = np.array([[5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 10, 10], [8, 8, 2, 2]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nms(boxes, scores, 0.0).tolist() == [0, 1, 2, 3]


def test_results_do_not_alias_model_outputs():
    """Backends reuse their output buffers: detections must survive the next frame."""
    boxes, scores = _outputs([[0, 0, 9, 9]], a0_0=0.9)
    found = postprocess(boxes, scores, PostprocessConfig())
    boxes[:] = -1
    scores[:] = 0
    np.testing.assert_array_equal(found.boxes, [[0, 0, 9, 9]])
    assert found.scores.tolist() == pytest.approx([0.9])


def test_model_sized_output_is_bounded_and_sorted():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 400, (3549, 2)).astype(np.float32)
    boxes = np.concatenate([corners, corners + rng.uniform(4, 60, (3549, 2))], axis=1)
    scores = rng.uniform(0, 1, (3549, 80)).astype(np.float32)
    found = postprocess(boxes.astype(np.float32), scores, PostprocessConfig(max_detections=100))
    assert len(found) == 100
    assert np.all(np.diff(found.scores) <= 0)
    assert found.scores.min() > 0.35


@pytest.mark.parametrize(
    ("boxes", "scores"),
    [((10, 4), (11, 80)), ((10, 5), (10, 80)), ((40,), (10, 80)), ((10, 4), (10,))],
)
def test_mismatched_outputs_name_their_shapes(boxes, scores):
    with pytest.raises(ModelError, match=rf"boxes \({boxes[0]}.*scores \({scores[0]}"):
        postprocess(np.zeros(boxes, np.float32), np.zeros(scores, np.float32), PostprocessConfig())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("score_threshold", -0.1, "must be in [0, 1], got -0.1"),
        ("score_threshold", 1.5, "got 1.5"),
        ("score_threshold", float("nan"), "got nan"),
        ("nms_threshold", 1.01, "got 1.01"),
        ("max_detections", 0, "must be at least 1, got 0"),
        ("pre_nms_top_k", -3, "got -3"),
        ("class_ids", (0, -1), "must be >= 0, got (0, -1)"),
        ("class_ids", (), "empty"),
    ],
)
def test_config_validation_names_field_and_value(field, value, message):
    with pytest.raises(ConfigError, match=f"^{field}: ") as caught:
        PostprocessConfig(**{field: value})
    assert message in str(caught.value)


def test_config_accepts_bounds():
    config = PostprocessConfig(score_threshold=0, nms_threshold=1, max_detections=1)
    assert (config.score_threshold, config.nms_threshold) == (0, 1)
