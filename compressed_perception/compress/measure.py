"""Measure every built artifact against the FP32 original, all in one process.

Accuracy is agreement with the FP32 model on held-out frames (no labels exist); latency
is end-to-end detect time with every row interleaved, so ratios between rows survive a
noisy machine. The targets of the build are checked here from those measurements.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from compressed_perception.benchmark import interleave
from compressed_perception.compress.recipe import BenchSettings, LabelSettings
from compressed_perception.compress.report import Measurement, Target
from compressed_perception.datasets import DatasetError
from compressed_perception.evaluation.coco import CocoEvaluator, agreement, load_coco_ground_truth
from compressed_perception.runtime.backends import open_backend
from compressed_perception.runtime.detector import Detector
from compressed_perception.runtime.manifest import Manifest, load_manifest
from compressed_perception.runtime.postprocess import Detections, PostprocessConfig
from compressed_perception.sources import read_image

CANDIDATE_THRESHOLD = 0.05  # the candidate's whole precision-recall curve is scored
CPU_ARTIFACT = "ort-int8"
LATENCY_VS_ORT = 0.35
LATENCY_VS_TORCH = 0.25
MIN_MAP = 0.75
MIN_MAP50 = 0.90
MAX_SIZE_RATIO = 0.25
BUILD_SECONDS = 1800
QUICK_BUILD_SECONDS = 180


@dataclass(frozen=True)
class Candidate:
    stage: str
    manifest: Path
    params: int | None
    macs: int | None


def measure(
    candidates: Sequence[Candidate],
    reference: Manifest,
    frames: Sequence[np.ndarray],
    bench: BenchSettings,
    out: Path,
    progress: bool = True,
    labelled: Sequence[tuple[np.ndarray, Detections]] = (),
) -> list[Measurement]:
    """One Measurement per (artifact, backend), plus the FP32 original under PyTorch.

    With `labelled` (image, ground truth) pairs, each artifact's real mAP is measured too.
    """
    config = PostprocessConfig(score_threshold=CANDIDATE_THRESHOLD)
    rows = [(c, _backend(c)) for c in candidates]
    if "torch" in reference.artifacts:
        rows.insert(1, (candidates[0], "torch"))
    manifests = [load_manifest(c.manifest) for c, _ in rows]
    backends = [open_backend(m, b) for m, (_, b) in zip(manifests, rows, strict=True)]
    detectors = [Detector(m, b, config) for m, b in zip(manifests, backends, strict=True)]
    sizes = [(f.shape[1], f.shape[0]) for f in frames]
    expected = _detect_all(detectors[0], frames, "reference", progress)
    accuracy = {}
    for (candidate, backend), detector in zip(rows, detectors, strict=True):
        if backend == "torch":
            continue  # the same FP32 weights as the reference: nothing to learn, 10x the time
        found = _detect_all(detector, frames, candidate.stage, progress)
        result = agreement(expected, found, sizes, reference.classes)
        accuracy[candidate.stage] = {"map": round(result.map, 4), "map50": round(result.map50, 4)}
        if labelled:
            accuracy[candidate.stage].update(_labelled_map(detector, labelled, reference.classes))
    # latency at the runtime's own score threshold: a low one would time NMS, not the model
    runtime = [Detector(m, b) for m, b in zip(manifests, backends, strict=True)]
    timings = interleave(runtime, [(bench.width, bench.height)], frames, bench.iterations)
    return [
        Measurement(
            stage=candidate.stage,
            backend=backend,
            params=candidate.params,
            macs=candidate.macs,
            file_bytes=_size(manifest),
            latency_ms={k: round(v, 3) for k, v in timing.stats["total"].items()},
            accuracy=None if backend == "torch" else accuracy[candidate.stage],
            path=str(_relative(candidate.manifest, out)),
        )
        for (candidate, backend), manifest, timing in zip(rows, manifests, timings, strict=True)
    ]


def load_labelled(
    labels: LabelSettings, classes: Sequence[str]
) -> list[tuple[np.ndarray, Detections]]:
    """(image, ground truth) for every image of a COCO JSON, read from `labels.images`."""
    truth = load_coco_ground_truth(Path(labels.coco), classes)
    if not truth:
        raise DatasetError(f"{labels.coco}: no images in the labelled set")
    pairs = []
    for name, (width, height, boxes) in sorted(truth.items()):
        path = Path(labels.images) / name
        if not path.is_file():
            raise DatasetError(f"{path}: image named in {labels.coco} not found")
        image = read_image(path)
        if image.shape[:2] != (height, width):
            raise DatasetError(
                f"{path}: {image.shape[1]}x{image.shape[0]}, but "
                f"{labels.coco} says {width}x{height}"
            )
        pairs.append((image, boxes))
    return pairs


def _labelled_map(
    detector: Detector, labelled: Sequence[tuple[np.ndarray, Detections]], classes: Sequence[str]
) -> dict[str, float]:
    evaluator = CocoEvaluator(classes)
    for index, (image, truth) in enumerate(labelled):
        found = detector.detect(image, f"labelled image {index}").detections
        evaluator.add(index, image.shape[1], image.shape[0], truth, found)
    result = evaluator.result()
    return {"labelled_map": round(result.map, 4), "labelled_map50": round(result.map50, 4)}


def _backend(candidate: Candidate) -> str:
    return "tensorrt" if candidate.stage == "tensorrt" else "onnxruntime"


def _detect_all(
    detector: Detector, frames: Sequence[np.ndarray], what: str, progress: bool
) -> list[Detections]:
    bar = tqdm(frames, desc=f"accuracy {what}", disable=not progress, leave=False)
    return [detector.detect(frame, f"held-out frame {i}").detections for i, frame in enumerate(bar)]


def _size(manifest: Manifest) -> int:
    """Bytes of the file the row's backend runs (the engine, else the ONNX model)."""
    kind = "tensorrt" if "tensorrt" in manifest.artifacts else "onnx"
    return (manifest.folder / manifest.artifacts[kind]).stat().st_size


def _relative(path: Path, root: Path) -> Path:
    try:
        return path.resolve().relative_to(root.resolve())
    except ValueError:
        return path


def _row(measurements: Sequence[Measurement], stage: str, backend: str) -> Measurement | None:
    return next((m for m in measurements if m.stage == stage and m.backend == backend), None)


def targets(measurements: Sequence[Measurement], seconds: float, quick: bool) -> tuple[Target, ...]:
    """The issue's targets, each from ratios measured in this one run.

    A target that falls short says why, from the same run: how much of the latency comes
    from pruning and how much from INT8, and whether accuracy was lost to pruning or to
    quantization.
    """
    cpu = _row(measurements, CPU_ARTIFACT, "onnxruntime")
    qdq = _row(measurements, "qdq-int8", "onnxruntime")
    ort = _row(measurements, "fp32", "onnxruntime")
    torch_row = _row(measurements, "fp32", "torch")
    speed, accuracy = _why_latency(measurements, ort), _why_accuracy(measurements)
    found = [
        Target(
            "CPU artifact latency / ORT FP32", _latency_ratio(cpu, ort), LATENCY_VS_ORT, "<=", speed
        ),
        Target(
            "CPU artifact latency / PyTorch FP32",
            _latency_ratio(cpu, torch_row),
            LATENCY_VS_TORCH,
            "<=",
            speed,
        ),
        Target(
            "CPU artifact agreement mAP",
            _accuracy(cpu, "map"),
            MIN_MAP,
            ">=",
            accuracy,
            axis_line=("y", MIN_MAP),
        ),
        Target("CPU artifact agreement mAP@.5", _accuracy(cpu, "map50"), MIN_MAP50, ">=", accuracy),
        Target("Q/DQ agreement mAP", _accuracy(qdq, "map"), MIN_MAP, ">=", accuracy),
        Target("Q/DQ agreement mAP@.5", _accuracy(qdq, "map50"), MIN_MAP50, ">=", accuracy),
        Target("CPU artifact file / FP32 ONNX", _size_ratio(cpu, ort), MAX_SIZE_RATIO, "<="),
        Target(
            "build seconds (from scratch)" + (" --quick" if quick else ""),
            round(seconds, 1),
            QUICK_BUILD_SECONDS if quick else BUILD_SECONDS,
            "<=",
        ),
    ]
    return tuple(_explained(t) for t in found)


def _explained(target: Target) -> Target:
    """Keep the explanation only where the target fell short."""
    return target if target.met is False else dataclasses.replace(target, explanation="")


def _why_latency(measurements: Sequence[Measurement], ort: Measurement | None) -> str:
    return _phrases(
        (
            "INT8 alone runs at {:.2f}x FP32 on this CPU",
            _latency_ratio(_row(measurements, "ort-int8-unpruned", "onnxruntime"), ort),
        ),
        (
            "pruning alone at {:.2f}x",
            _latency_ratio(_row(measurements, "distilled", "onnxruntime"), ort),
        ),
    )


def _why_accuracy(measurements: Sequence[Measurement]) -> str:
    return _phrases(
        (
            "the pruned, distilled FP32 student reaches mAP {:.2f}",
            _accuracy(_row(measurements, "distilled", "onnxruntime"), "map"),
        ),
        (
            "INT8 without pruning reaches {:.2f}",
            _accuracy(_row(measurements, "ort-int8-unpruned", "onnxruntime"), "map"),
        ),
    )


def _phrases(*parts: tuple[str, float | None]) -> str:
    return "; ".join(text.format(value) for text, value in parts if value is not None)


def curve(measurements: Sequence[Measurement], ratio: float) -> list[dict[str, float]]:
    """The CPU INT8 trade-off measured in this run: unpruned and pruned at `ratio`."""
    points = []
    for stage, value in (("ort-int8-unpruned", 0.0), (CPU_ARTIFACT, ratio)):
        row = _row(measurements, stage, "onnxruntime")
        if row is not None and row.accuracy and row.latency_ms:
            points.append(
                {"prune ratio": value, **row.accuracy, "latency_p50": row.latency_ms["p50"]}
            )
    return points


def _latency_ratio(row: Measurement | None, base: Measurement | None) -> float | None:
    if row is None or base is None or not row.latency_ms or not base.latency_ms:
        return None
    return round(row.latency_ms["p50"] / base.latency_ms["p50"], 3)


def _accuracy(row: Measurement | None, key: str) -> float | None:
    return None if row is None or row.accuracy is None else row.accuracy[key]


def _size_ratio(row: Measurement | None, base: Measurement | None) -> float | None:
    return None if row is None or base is None else round(row.file_bytes / base.file_bytes, 3)


def best_cpu_artifact(measurements: Sequence[Measurement]) -> Measurement | None:
    """The fastest ONNX Runtime artifact that meets the accuracy targets, else the most accurate.

    A vehicle should not silently get a fast model that disagrees with the original: speed
    only decides among models that are accurate enough.
    """
    rows = [
        m
        for m in measurements
        if m.backend == "onnxruntime" and m.stage != "qdq-int8" and m.accuracy and m.latency_ms
    ]
    good = [m for m in rows if m.accuracy["map"] >= MIN_MAP and m.accuracy["map50"] >= MIN_MAP50]
    if good:
        return min(good, key=lambda m: m.latency_ms["p50"])
    return max(rows, key=lambda m: m.accuracy["map"], default=None)
