"""Accuracy of detectors: COCO mAP against labels or agreement with a reference model."""

from compressed_perception.evaluation.coco import (
    CocoEvaluator,
    MapResult,
    agreement,
    load_coco_ground_truth,
)

__all__ = ["CocoEvaluator", "MapResult", "agreement", "load_coco_ground_truth"]
