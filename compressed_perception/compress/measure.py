"""Measure every built artifact against the FP32 original, all in one process.

Accuracy is agreement with the FP32 model on held-out frames (no labels exist); latency
is end-to-end detect time with every row interleaved, so ratios between rows survive a
noisy machine. The targets of the build are checked here from those measurements.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from compressed_perception.benchmark import interleave, isa_flags
from compressed_perception.compress.recipe import BenchSettings, LabelSettings
from compressed_perception.compress.report import Measurement, Target
from compressed_perception.datasets import DatasetError, moved
from compressed_perception.evaluation.coco import (
    REFERENCE_THRESHOLD,
    CocoEvaluator,
    MapResult,
    agreement,
    load_coco_ground_truth,
)
from compressed_perception.runtime.backends import open_backend
from compressed_perception.runtime.detector import Detector
from compressed_perception.runtime.manifest import Manifest, load_manifest
from compressed_perception.runtime.postprocess import Detections, PostprocessConfig
from compressed_perception.sources import read_image

CANDIDATE_THRESHOLD = 0.05  # the candidate's whole precision-recall curve is scored
REFERENCE = ("fp32", "onnxruntime")
CPU_INT8_ROWS = ("openvino-int8", "ort-int8")  # the student's CPU INT8 artifact, by preference
# the FP32 student, latest stage first (fitted: the original with its input trimmed)
FITTED = "fitted"
STUDENT_ROWS = ("distilled", "reconstructed", "pruned", FITTED)
BEFORE_DISTILLATION = ("reconstructed", "pruned")
MAX_MACS = 0.60
MIN_RECONSTRUCTED_MAP50 = 0.70
# held-out agreement distillation may lose against its start before the report says so:
# it chooses its step on the validation slice, which held-out frames need not confirm
DISTILL_HARM = -0.01
LATENCY_VS_ORT = 0.35
LATENCY_VS_TORCH = 0.25
MIN_MAP = 0.80
MIN_MAP50 = 0.90
MAX_SIZE_RATIO = 0.20
OPENVINO_UNPRUNED = "openvino-int8-unpruned"
OPENVINO_MIN = (0.90, 0.95)
OPENVINO_LATENCY = 0.40
OPENVINO_FP32_MIN = (0.97, 0.99)
BUILD_SECONDS = 1800
# a reference box scoring less than this above the threshold is one a small score change
# turns into no label at all, and a candidate's match to it into a false positive
NEAR_THRESHOLD = 0.05
CLASS_TABLE = "agreement per class"
# a class whose own change moves the class mean by this much is named as a cause
CLASS_SHARE = 0.005
# the original against itself on the held-out frames moved by a pixel: how far agreement
# falls when nothing changes but where the camera sits (the mean of a move right and down)
MOVED = "fp32-moved-1px"
MOVES = ((1, 0), (0, 1))
QUICK_BUILD_SECONDS = 180


@dataclass(frozen=True)
class Candidate:
    stage: str
    manifest: Path
    params: int | None
    macs: int | None
    backend: str = "onnxruntime"
    cpu: bool = True  # a CPU artifact, eligible for best.json


def measure(
    candidates: Sequence[Candidate],
    reference: Manifest,
    frames: Sequence[np.ndarray],
    bench: BenchSettings,
    out: Path,
    progress: bool = True,
    labelled: Sequence[tuple[np.ndarray, Detections]] = (),
) -> list[Measurement]:
    """One Measurement per artifact, plus the FP32 original under PyTorch and OpenVINO.

    The first candidate is the FP32 original on ONNX Runtime, the reference. With
    `labelled` (image, ground truth) pairs, each artifact's real mAP is measured too. One
    more row, MOVED, is the reference against itself on frames moved by a pixel: not an
    artifact, so not timed, but the yardstick the other rows' agreement is read against.
    """
    config = PostprocessConfig(score_threshold=CANDIDATE_THRESHOLD)
    rows = list(candidates)
    source = rows[0]
    if "torch" in reference.artifacts:
        rows.insert(1, dataclasses.replace(source, backend="torch", cpu=False))
    if importlib.util.find_spec("openvino") is not None:
        rows.insert(1, dataclasses.replace(source, backend="openvino", cpu=False))
    manifests = [load_manifest(c.manifest) for c in rows]
    backends = [open_backend(m, c.backend) for m, c in zip(manifests, rows, strict=True)]
    detectors = [Detector(m, b, config) for m, b in zip(manifests, backends, strict=True)]
    sizes = [(f.shape[1], f.shape[0]) for f in frames]
    expected = _detect_all(detectors[0], frames, "reference", progress)
    boxes = _reference_boxes(expected, reference.classes)
    accuracy: dict[int, dict[str, float]] = {}
    classes: dict[int, dict[str, dict[str, float]]] = {}
    for index, (candidate, detector) in enumerate(zip(rows, detectors, strict=True)):
        if candidate.backend == "torch":
            continue  # the same FP32 weights as the reference: nothing to learn, 10x the time
        # the reference row is scored on the detections it already made as the reference:
        # the same session on the same frames would only repeat them
        found = (
            expected
            if index == 0
            else _detect_all(detector, frames, f"{candidate.stage} {candidate.backend}", progress)
        )
        result = agreement(expected, found, sizes, reference.classes)
        accuracy[index] = {"map": round(result.map, 4), "map50": round(result.map50, 4)}
        classes[index] = _per_class([result], boxes)
        if labelled:
            accuracy[index].update(_labelled_map(detector, labelled, reference.classes))
    # latency at the runtime's own score threshold: a low one would time NMS, not the model
    runtime = [Detector(m, b) for m, b in zip(manifests, backends, strict=True)]
    timings = interleave(runtime, [(bench.width, bench.height)], frames, bench.iterations)
    shifted = [
        moved_agreement(detectors[0], frames, expected, reference.classes, move, progress)
        for move in MOVES
    ]
    measured = [
        Measurement(
            stage=candidate.stage,
            backend=candidate.backend,
            params=candidate.params,
            macs=candidate.macs,
            file_bytes=_size(manifest),
            latency_ms={k: round(v, 3) for k, v in timing.stats["total"].items()},
            accuracy=accuracy.get(index),
            path=str(_relative(candidate.manifest, out)),
            cpu=candidate.cpu,
            classes=classes.get(index),
        )
        for index, (candidate, manifest, timing) in enumerate(
            zip(rows, manifests, timings, strict=True)
        )
    ]
    yardstick = dataclasses.replace(
        measured[0],
        stage=MOVED,
        latency_ms=None,
        accuracy={key: _mean(shifted, key) for key in ("map", "map50")},
        cpu=False,
        classes=_per_class(shifted, boxes),
    )
    return [measured[0], yardstick, *measured[1:]]


def moved_agreement(
    detector: Detector,
    frames: Sequence[np.ndarray],
    expected: Sequence[Detections],
    classes: Sequence[str],
    move: tuple[int, int],
    progress: bool = False,
) -> MapResult:
    """Agreement of `detector` with `expected` when every frame is moved by `move` (dx, dy
    whole pixels, the edge repeated) and its boxes are moved back: with no move, a
    deterministic detector agrees with its own `expected` perfectly."""
    found = _detect_all(detector, frames, f"fp32, moved {move}", progress, move)
    return agreement(expected, found, [(f.shape[1], f.shape[0]) for f in frames], classes)


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


def _detect_all(
    detector: Detector,
    frames: Sequence[np.ndarray],
    what: str,
    progress: bool,
    move: tuple[int, int] = (0, 0),
) -> list[Detections]:
    """Each frame's detections; with `move`, of the frame moved so, with the boxes moved back."""
    bar = tqdm(frames, desc=f"accuracy {what}", disable=not progress, leave=False)
    dx, dy = move
    shift = np.array([dx, dy, dx, dy], np.float32)
    found = []
    for index, frame in enumerate(bar):
        detections = detector.detect(moved(frame, dx, dy), f"held-out frame {index}").detections
        found.append(Detections(detections.boxes - shift, detections.scores, detections.class_ids))
    return found


def _reference_boxes(
    expected: Sequence[Detections], names: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Per class, the reference's boxes that count as labels, and those just above the bar."""
    found: dict[str, dict[str, float]] = {}
    for detections in expected:
        for class_id, score in zip(detections.class_ids, detections.scores, strict=True):
            if score >= REFERENCE_THRESHOLD:
                counts = found.setdefault(names[int(class_id)], {"boxes": 0, "near": 0})
                counts["boxes"] += 1
                counts["near"] += int(score < REFERENCE_THRESHOLD + NEAR_THRESHOLD)
    return found


def _per_class(
    results: Sequence[MapResult], boxes: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """Per class, its reference boxes and its mAP and mAP@.5, the mean over `results`."""
    names = results[0].per_class
    return {
        name: {
            **boxes[name],
            "map": round(float(np.mean([r.per_class[name] for r in results])), 4),
            "map50": round(float(np.mean([r.per_class50[name] for r in results])), 4),
        }
        for name in sorted(names, key=lambda n: -boxes[n]["boxes"])
    }


def _mean(results: Sequence[MapResult], key: str) -> float:
    return round(float(np.mean([getattr(r, key) for r in results])), 4)


def _size(manifest: Manifest) -> int:
    """Bytes of what the row's backend loads (the engine, the IR with its weights, the ONNX)."""
    kind = next(k for k in ("tensorrt", "openvino", "onnx", "torch") if k in manifest.artifacts)
    files = (manifest.artifacts[kind], *manifest.companions.get(kind, ()))
    return sum((manifest.folder / name).stat().st_size for name in files)


def _relative(path: Path, root: Path) -> Path:
    try:
        return path.resolve().relative_to(root.resolve())
    except ValueError:
        return path


def _row(measurements: Sequence[Measurement], stage: str, backend: str) -> Measurement | None:
    return next((m for m in measurements if m.stage == stage and m.backend == backend), None)


def _first(measurements: Sequence[Measurement], stages: Sequence[str]) -> Measurement | None:
    """The row of the first of `stages` that was measured (each artifact has one row)."""
    for stage in stages:
        found = next((m for m in measurements if m.stage == stage), None)
        if found is not None:
            return found
    return None


def targets(
    measurements: Sequence[Measurement],
    seconds: float,
    quick: bool,
    spent: dict[str, float] | None = None,
) -> tuple[Target, ...]:
    """The issues' targets, each from ratios measured in this one run.

    A target that falls short says why, from the same run: how much of the latency comes
    from pruning and how much from INT8 (and whether this CPU has VNNI), whether accuracy
    was lost to pruning, to distillation or to quantization, and where the build's time
    went (`spent`: seconds per stage and for measuring).
    """
    ort = _row(measurements, *REFERENCE)
    torch_row = _row(measurements, "fp32", "torch")
    openvino_fp32 = _row(measurements, "fp32", "openvino")
    cpu = _first(measurements, CPU_INT8_ROWS)
    unpruned = _first(measurements, tuple(f"{row}-unpruned" for row in CPU_INT8_ROWS))
    student = _first(measurements, STUDENT_ROWS)
    before = _first(measurements, BEFORE_DISTILLATION)
    qdq = _first(measurements, ("qdq-int8",))
    qdq_unpruned = _first(measurements, ("qdq-int8-unpruned",))
    ov_unpruned = _first(measurements, (OPENVINO_UNPRUNED,))
    speed = _why_latency(cpu, unpruned, student, ort)
    fitted = _first(measurements, (FITTED,))
    why = (
        _why_trimmed(fitted, ort),
        _why_accuracy(before, student, unpruned),
        _yardstick(measurements),
        _weak(student),
    )
    lost = "; ".join(p for p in why if p)
    name = cpu.stage if cpu else "CPU INT8"
    found = [
        Target("student MACs / original", _macs_ratio(student, ort), MAX_MACS, "<="),
        Target(
            "agreement mAP@.5 after pruning and reconstruction",
            _accuracy(before, "map50"),
            MIN_RECONSTRUCTED_MAP50,
            ">=",
            lost,
        ),
        Target(
            "distillation's change in agreement mAP (held out)",
            _change(before, student, "map"),
            DISTILL_HARM,
            ">=",
            _why_distillation(before, student),
        ),
        Target("student (FP32) agreement mAP", _accuracy(student, "map"), MIN_MAP, ">=", lost),
        Target(
            "student (FP32) agreement mAP@.5", _accuracy(student, "map50"), MIN_MAP50, ">=", lost
        ),
        Target(
            f"{name} latency / ORT FP32",
            _latency_ratio(cpu, ort),
            LATENCY_VS_ORT,
            "<=",
            speed,
            axis_line=_latency_line(ort, LATENCY_VS_ORT),
        ),
        Target(
            f"{name} latency / PyTorch FP32",
            _latency_ratio(cpu, torch_row),
            LATENCY_VS_TORCH,
            "<=",
            speed,
        ),
        Target(
            f"{name} agreement mAP",
            _accuracy(cpu, "map"),
            MIN_MAP,
            ">=",
            lost,
            axis_line=("y", MIN_MAP),
        ),
        Target(f"{name} agreement mAP@.5", _accuracy(cpu, "map50"), MIN_MAP50, ">=", lost),
        Target(f"{name} file / FP32 ONNX", _size_ratio(cpu, ort), MAX_SIZE_RATIO, "<="),
        Target("Q/DQ agreement mAP@.5", _accuracy(qdq, "map50"), MIN_MAP50, ">=", lost),
        Target(
            "Q/DQ (unpruned) agreement mAP@.5", _accuracy(qdq_unpruned, "map50"), MIN_MAP50, ">="
        ),
        Target(
            "OpenVINO INT8 (unpruned) agreement mAP",
            _accuracy(ov_unpruned, "map"),
            OPENVINO_MIN[0],
            ">=",
        ),
        Target(
            "OpenVINO INT8 (unpruned) agreement mAP@.5",
            _accuracy(ov_unpruned, "map50"),
            OPENVINO_MIN[1],
            ">=",
        ),
        Target(
            "OpenVINO INT8 (unpruned) latency / ORT FP32",
            _latency_ratio(ov_unpruned, ort),
            OPENVINO_LATENCY,
            "<=",
            _isa_note(),
        ),
        Target(
            "OpenVINO FP32 agreement mAP with ORT FP32",
            _accuracy(openvino_fp32, "map"),
            OPENVINO_FP32_MIN[0],
            ">=",
        ),
        Target(
            "OpenVINO FP32 agreement mAP@.5 with ORT FP32",
            _accuracy(openvino_fp32, "map50"),
            OPENVINO_FP32_MIN[1],
            ">=",
        ),
        Target("OpenVINO FP32 latency / ORT FP32", _latency_ratio(openvino_fp32, ort), 1.0, "<="),
        Target(
            "build seconds (from scratch)" + (" --quick" if quick else ""),
            round(seconds, 1),
            QUICK_BUILD_SECONDS if quick else BUILD_SECONDS,
            "<=",
            _why_slow(spent or {}, seconds),
        ),
    ]
    return tuple(_explained(t) for t in found)


def _explained(target: Target) -> Target:
    """Keep the explanation only where the target fell short."""
    return target if target.met is False else dataclasses.replace(target, explanation="")


def _why_latency(
    cpu: Measurement | None,
    unpruned: Measurement | None,
    student: Measurement | None,
    ort: Measurement | None,
) -> str:
    backend = cpu.backend if cpu else "the CPU backend"
    return _phrases(
        (
            f"INT8 alone ({backend}, unpruned) runs at {{:.2f}}x ORT FP32",
            _latency_ratio(unpruned, ort),
        ),
        ("pruning alone (FP32 student on ORT) at {:.2f}x", _latency_ratio(student, ort)),
        (_isa_note(), 0.0),
    )


def _why_slow(spent: dict[str, float], seconds: float) -> str:
    """The three largest shares of the build's time, and the CPU's vector units: an
    AVX2-only EPYC took 1.6x (prune) to 3.3x (distillation, fp32 against bf16) the time
    of an AVX-512 one (docs/benchmarks.md)."""
    largest = sorted(spent.items(), key=lambda item: -item[1])[:3]
    shares = ", ".join(f"{name} {value:.0f} s" for name, value in largest)
    flags = " ".join(isa_flags()) or "unknown"
    text = f"of {seconds:.0f} s, {shares}" if largest else ""
    return "; ".join(p for p in (text, f"this CPU's vector ISA flags: {flags}") if p)


def _why_accuracy(
    before: Measurement | None, student: Measurement | None, unpruned: Measurement | None
) -> str:
    return _phrases(
        (
            f"after pruning and reconstruction ({before.stage if before else ''}) agreement "
            "is mAP {:.3f}",
            _accuracy(before, "map"),
        ),
        ("the FP32 student reaches {:.3f}", _accuracy(student, "map")),
        ("INT8 without pruning reaches {:.3f}", _accuracy(unpruned, "map")),
    )


def _why_trimmed(fitted: Measurement | None, ort: Measurement | None) -> str:
    """What the input's trim alone gave and cost, so that a shortfall is not laid on it or
    on pruning by guess: both count towards the MACs budget."""
    macs = _macs_ratio(fitted, ort)
    if macs is None:
        return ""
    return _phrases(
        (
            f"the input trimmed to the camera's frames alone ({FITTED}, {macs:.3f}x MACs) "
            "agrees at mAP {:.3f}",
            _accuracy(fitted, "map"),
        )
    )


def _why_distillation(before: Measurement | None, student: Measurement | None) -> str:
    """Which classes the held-out fall comes from: the mean weighs classes alike, so one box
    of a rare class can outweigh what every frequent class gained."""
    text = (
        "the step distillation chose on its validation slice agrees less with the original "
        "on held-out frames than the model it started from"
    )
    start, end = (before.classes if before else None), (student.classes if student else None)
    if not start or not end:
        return text
    change = {k: v["map"] - start[k]["map"] for k, v in end.items() if k in start}
    fell = sorted((k for k, d in change.items() if d / len(end) <= -CLASS_SHARE), key=change.get)
    if not fell:
        return text
    named = ", ".join(
        f"{k} ({_boxes(end[k])}) {start[k]['map']:.3f} -> {end[k]['map']:.3f}" for k in fell
    )
    fall = -sum(change[k] for k in fell) / len(end)
    text += f"; the class mean falls by {fall:.3f} through {named}"
    rest = [d for k, d in change.items() if k not in fell]
    if rest:
        text += f", and the other {len(rest)} classes change by {np.mean(rest):+.3f} on average"
    return text


def _boxes(counts: dict[str, float]) -> str:
    boxes = int(counts["boxes"])
    return f"{boxes} reference box" + ("" if boxes == 1 else "es")


def _yardstick(measurements: Sequence[Measurement]) -> str:
    """What the original itself agrees at when the camera moves by a pixel: a target above
    it asks the student to track the original more closely than the original tracks itself."""
    row = _first(measurements, (MOVED,))
    if _accuracy(row, "map") is None or _accuracy(row, "map50") is None:
        return ""
    return (
        f"the original itself, on the same frames moved by 1 px (right, or down), agrees at "
        f"{_accuracy(row, 'map'):.3f} / {_accuracy(row, 'map50'):.3f} on average"
    )


def _weak(student: Measurement | None) -> str:
    """Which classes hold the FP32 student's shortfall: the means weigh classes alike."""
    classes = student.classes if student else None
    if not classes:
        return ""
    weak = {k: v for k, v in classes.items() if v["map50"] < MIN_MAP50}
    if not weak:
        return ""
    named = ", ".join(f"{k} {v['map50']:.2f}" for k, v in sorted(weak.items(), key=_map50))
    rest = [v["map50"] for k, v in classes.items() if k not in weak]
    text = (
        f"the student's mAP@.5 is a mean over the reference's {len(classes)} classes, and "
        f"{len(weak)} below {MIN_MAP50} ({named}) hold {_total(weak, 'boxes')} of its "
        f"{_total(classes, 'boxes')} boxes, {_total(weak, 'near')} of them scored within "
        f"{NEAR_THRESHOLD} of its {REFERENCE_THRESHOLD} threshold"
    )
    if rest:
        text += f"; its other {len(rest)} classes average {np.mean(rest):.3f}"
    return text


def _map50(item: tuple[str, dict[str, float]]) -> float:
    return item[1]["map50"]


def _total(classes: dict[str, dict[str, float]], key: str) -> int:
    return int(sum(v[key] for v in classes.values()))


def class_tables(measurements: Sequence[Measurement]) -> dict[str, dict[str, object]]:
    """Agreement per class of the FP32 student, the model distillation started from, the
    original with its input trimmed, and the CPU INT8 artifacts, for the report."""
    picked = (
        _first(measurements, STUDENT_ROWS),
        _first(measurements, BEFORE_DISTILLATION),
        _first(measurements, (FITTED,)),
        _first(measurements, CPU_INT8_ROWS),
        _first(measurements, tuple(f"{r}-unpruned" for r in CPU_INT8_ROWS)),
        _first(measurements, (MOVED,)),
    )
    rows = [
        row
        for i, row in enumerate(picked)
        if row is not None and row.classes and all(row is not p for p in picked[:i])
    ]  # without distillation the student is the model it would have started from
    if not rows:
        return {}
    reference = rows[0].classes or {}  # every row counts the same reference boxes
    columns = [
        "class",
        "reference boxes",
        f"of them < {REFERENCE_THRESHOLD + NEAR_THRESHOLD:g}",
        *(f"{row.stage} ({row.backend}) mAP / mAP@.5" for row in rows),
    ]
    table = [
        [
            name,
            int(counts["boxes"]),
            int(counts["near"]),
            *(_pair((row.classes or {}).get(name)) for row in rows),
        ]
        for name, counts in reference.items()
    ]
    note = (
        f"mAP and mAP@.5 are means over these classes, each weighing alike however few boxes "
        f"it has. A reference box scoring just above its {REFERENCE_THRESHOLD} threshold is "
        "a label a small score change removes, turning a candidate's match into a false "
        f"positive. {MOVED} is the original against itself on the frames moved by a pixel."
    )
    return {CLASS_TABLE: {"columns": columns, "rows": table, "note": note}}


def _pair(values: dict[str, float] | None) -> str:
    return "n/a" if values is None else f"{values['map']:.3f} / {values['map50']:.3f}"


def _isa_note() -> str:
    flags = isa_flags()
    vnni = [f for f in flags if "vnni" in f or f.startswith("amx")]
    if vnni:
        return f"this CPU has {', '.join(vnni)}"
    return "this CPU has no VNNI (INT8 dot products): INT8 cannot be much faster than FP32 here"


def _phrases(*parts: tuple[str, float | None]) -> str:
    return "; ".join(text.format(value) for text, value in parts if value is not None and text)


def curve(measurements: Sequence[Measurement]) -> list[dict[str, float]]:
    """The CPU INT8 trade-off measured in this run: the unpruned and the pruned artifact."""
    ort = _row(measurements, *REFERENCE)
    points = []
    for stages in (tuple(f"{r}-unpruned" for r in CPU_INT8_ROWS), CPU_INT8_ROWS):
        row = _first(measurements, stages)
        student = _first(measurements, STUDENT_ROWS) if stages == CPU_INT8_ROWS else ort
        macs = _macs_ratio(student, ort)
        if row is not None and row.accuracy and row.latency_ms and macs is not None:
            points.append(
                {"MACs ratio": macs, **row.accuracy, "latency_p50": row.latency_ms["p50"]}
            )
    return points


def _latency_ratio(row: Measurement | None, base: Measurement | None) -> float | None:
    if row is None or base is None or not row.latency_ms or not base.latency_ms:
        return None
    return round(row.latency_ms["p50"] / base.latency_ms["p50"], 3)


def _latency_line(ort: Measurement | None, ratio: float) -> tuple[str, float] | None:
    if ort is None or not ort.latency_ms:
        return None
    return ("x", round(ort.latency_ms["p50"] * ratio, 3))


def _macs_ratio(row: Measurement | None, base: Measurement | None) -> float | None:
    if row is None or base is None or not row.macs or not base.macs:
        return None
    return round(row.macs / base.macs, 4)


def _accuracy(row: Measurement | None, key: str) -> float | None:
    return None if row is None or row.accuracy is None else row.accuracy.get(key)


def _change(start: Measurement | None, end: Measurement | None, key: str) -> float | None:
    first, last = _accuracy(start, key), _accuracy(end, key)
    return None if first is None or last is None else round(last - first, 4)


def _size_ratio(row: Measurement | None, base: Measurement | None) -> float | None:
    return None if row is None or base is None else round(row.file_bytes / base.file_bytes, 3)


def best_cpu_artifact(measurements: Sequence[Measurement]) -> Measurement | None:
    """The fastest CPU artifact that meets the accuracy targets, else the most accurate.

    A vehicle should not silently get a fast model that disagrees with the original: speed
    only decides among models that are accurate enough.
    """
    rows = [m for m in measurements if m.cpu and m.accuracy and m.latency_ms]
    good = [m for m in rows if m.accuracy["map"] >= MIN_MAP and m.accuracy["map50"] >= MIN_MAP50]
    if good:
        return min(good, key=lambda m: m.latency_ms["p50"])
    return max(rows, key=lambda m: m.accuracy["map"], default=None)
