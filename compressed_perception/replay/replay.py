"""Replay a camera bag through the detector: every frame, in log order, deterministically.

A reader thread deserializes and decodes while the main thread infers, so decoding and
I/O overlap with inference; the queue between them is bounded, so memory is too.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from compressed_perception.benchmark import percentiles
from compressed_perception.errors import ConfigError, ImageError, PerceptionError
from compressed_perception.replay.bag import (
    BagError,
    bag_typestore,
    image_connections,
    image_kind,
    messages,
    new_bag,
    open_bag,
    storage_of,
)
from compressed_perception.ros.convert import (
    VisionTypes,
    compressed_to_bgr,
    detection_array,
    image_to_bgr,
)
from compressed_perception.ros.messages import COMPRESSED_IMAGE, DETECTION_ARRAY, typestore
from compressed_perception.ros.names import output_topic
from compressed_perception.runtime.backends import open_backend
from compressed_perception.runtime.detector import Detector, FrameResult
from compressed_perception.runtime.manifest import Manifest, load_manifest
from compressed_perception.runtime.postprocess import Detections, PostprocessConfig

EVAL_SCORE_THRESHOLD = 0.05  # candidate detections scored for mAP go down to this score
STAGES = ("preprocess", "inference", "postprocess")


@dataclass(frozen=True)
class ReplayOptions:
    model: Path
    backend: str = "auto"
    topics: tuple[str, ...] = ()
    storage: str | None = None  # output storage; None keeps the input's
    copy_input: bool = False
    overwrite: bool = False
    reference: Path | None = None
    ground_truth: str | None = None  # a Detection2DArray topic in the bag, or a COCO JSON file
    class_id_as_label: bool = True
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    threads: int = 0


@dataclass(frozen=True)
class _Frame:
    topic: str
    log_time: int
    message: Any  # the deserialized image message (its header is reused)
    raw: bytes | memoryview
    image: np.ndarray | None
    error: str | None


@dataclass(frozen=True)
class _Truth:
    topic: str
    log_time: int
    key: str | None  # None when the message does not deserialize (`error` says why)
    message: Any
    error: str | None = None


_END = object()


def replay(in_bag: Path, out_bag: Path, options: ReplayOptions) -> dict[str, Any]:
    """Replay one bag; returns the metrics (also for frames that failed to decode)."""
    in_bag, out_bag = Path(in_bag), Path(out_bag)
    manifest = load_manifest(options.model)
    run_config, coco_truth = _evaluation(options, manifest)
    backend = open_backend(manifest, options.backend, threads=options.threads)
    detector = Detector(manifest, backend, run_config)
    reference = _reference_detector(options)
    store = typestore()
    vision = VisionTypes.from_lookup(lambda name: store.types[name])
    with open_bag(in_bag) as reader:
        bag_types = bag_typestore(reader)
        cameras = image_connections(reader, options.topics, in_bag, bag_types)
        truth_topic = _truth_topic(reader, options.ground_truth, in_bag)
        storage = options.storage or storage_of(in_bag)
        stats = _Stats(detector.labels)
        outputs = {c.topic: output_topic(c.topic) for c in cameras}
        if len(set(outputs.values())) != len(outputs):
            raise BagError(
                f"{in_bag}: two camera topics map to one detections topic ({outputs}); "
                "choose them with --topics"
            )
        with new_bag(out_bag, storage, options.overwrite) as writer:
            for out_topic in outputs.values():
                writer.add_topic(out_topic, DETECTION_ARRAY)
            if options.copy_input:
                for camera in cameras:
                    writer.add_topic(camera.topic, camera.msgtype, store=bag_types)
            connections = [*cameras, *([truth_topic] if truth_topic else [])]
            started = time.perf_counter()
            for item in _read_ahead(reader, connections, in_bag, bag_types):
                if isinstance(item, _Truth):
                    stats.add_truth(item, in_bag)
                    continue
                if options.copy_input:
                    writer.write_raw(item.topic, item.log_time, item.raw)
                if item.image is None:
                    stats.fail(item, in_bag)
                    continue
                result = detector.detect(item.image, name=f"{in_bag}:{item.topic}")
                published = result.detections.where(
                    result.detections.scores >= options.postprocess.score_threshold
                )
                msg = detection_array(
                    vision,
                    item.message.header,
                    published,
                    detector.labels,
                    options.class_id_as_label,
                )
                writer.write(outputs[item.topic], item.log_time, msg)
                ref = reference.detect(item.image).detections if reference else None
                stats.add(item, result, published, ref)
            wall = time.perf_counter() - started
            # scored before the bag is committed: ground truth that cannot be scored (a
            # label the model lacks, frames sharing a stamp) leaves no output behind
            metrics = stats.metrics(wall)
            if options.reference is not None:
                metrics["agreement"] = stats.agreement(detector.labels)
            if options.ground_truth is not None:
                metrics["ground_truth"] = stats.ground_truth(
                    options.ground_truth, manifest, coco_truth
                )
    metrics.update(
        {
            "input": str(in_bag),
            "output": str(out_bag),
            "storage": storage,
            "model": str(manifest.path),
            "backend": backend.name,
            "topics": {
                t: {"detections_topic": o, **stats.per_topic(t)} for t, o in outputs.items()
            },
        }
    )
    return metrics


def coco_evaluation(purpose: str) -> ModuleType:
    """compressed_perception.evaluation, which needs pycocotools (no rosdep key for it)."""
    try:
        from compressed_perception import evaluation
    except ImportError as exc:
        raise PerceptionError(
            f"{purpose} needs pycocotools ({exc}): pip install pycocotools"
        ) from exc
    return evaluation


def _reference_detector(options: ReplayOptions) -> Detector | None:
    if options.reference is None:
        return None
    manifest = load_manifest(options.reference)
    backend = open_backend(manifest, "auto", threads=options.threads)
    return Detector(manifest, backend, PostprocessConfig(score_threshold=0.35))


def _truth_topic(reader: Any, ground_truth: str | None, path: Path) -> Any:
    if ground_truth is None or _is_coco_file(ground_truth):
        return None
    for connection in reader.connections:
        if connection.topic == ground_truth:
            if connection.msgtype != DETECTION_ARRAY:
                raise BagError(f"{path}: ground-truth topic {ground_truth} is {connection.msgtype}")
            return connection
    raise BagError(f"{path}: no ground-truth topic {ground_truth} in the bag")


def _evaluation(
    options: ReplayOptions, manifest: Manifest
) -> tuple[PostprocessConfig, dict[str, Detections] | None]:
    """What evaluating needs, checked before the replay rather than after it: pycocotools,
    a COCO ground-truth file, and a score threshold low enough for mAP to see the curve."""
    run_config = options.postprocess
    if options.reference is not None or options.ground_truth is not None:
        coco_evaluation("--reference and --ground-truth")
        lowest = min(run_config.score_threshold, EVAL_SCORE_THRESHOLD)
        run_config = replace(run_config, score_threshold=lowest)
    return run_config, _coco_truth(options.ground_truth, manifest)


def _coco_truth(ground_truth: str | None, manifest: Manifest) -> dict[str, Detections] | None:
    """A COCO file's ground truth per image file name; None for a topic or no ground truth."""
    if ground_truth is None or not _is_coco_file(ground_truth):
        return None
    load = coco_evaluation("--ground-truth").load_coco_ground_truth
    return {name: gt for name, (_, _, gt) in load(Path(ground_truth), manifest.classes).items()}


def _is_coco_file(ground_truth: str) -> bool:
    """A `.json` path is a COCO file; anything else names a Detection2DArray topic."""
    return ground_truth.lower().endswith(".json")


def frame_key(header: Any, with_frame_id: bool = True) -> str:
    """How frames are matched to ground truth: `frame_id/sec.nanosec` of the image header."""
    stamp = f"{int(header.stamp.sec)}.{int(header.stamp.nanosec):09d}"
    return f"{header.frame_id}/{stamp}" if with_frame_id else stamp


def _read_ahead(reader: Any, connections: Sequence[Any], path: Path, store: Any) -> Iterator[Any]:
    """Deserialize (with the bag's types) and decode on a thread, a few frames ahead."""
    pending: queue.Queue[Any] = queue.Queue(maxsize=8)
    stop = threading.Event()

    def work() -> None:
        try:
            for connection, log_time, raw in messages(reader, connections, path):
                if stop.is_set():
                    return
                pending.put(_decode(store, connection, log_time, raw, path))
            pending.put(_END)
        except BaseException as exc:
            pending.put(exc)

    thread = threading.Thread(target=work, name="bag-reader", daemon=True)
    thread.start()
    try:
        while (item := pending.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting on a full queue
            with contextlib.suppress(queue.Empty):
                pending.get_nowait()
            thread.join(timeout=0.01)


def _decode(store: Any, connection: Any, log_time: int, raw: Any, path: Path) -> _Frame | _Truth:
    truth = connection.msgtype == DETECTION_ARRAY
    try:
        message = store.deserialize_cdr(raw, connection.msgtype)
    except Exception as exc:
        error = f"undecodable CDR ({exc})"
        if truth:
            return _Truth(connection.topic, log_time, None, None, error)
        return _Frame(connection.topic, log_time, None, raw, None, error)
    if truth:
        return _Truth(connection.topic, log_time, frame_key(message.header), message)
    name = f"{path}:{connection.topic}@{log_time}"
    try:
        kind = image_kind(store, connection.msgtype)
        convert = compressed_to_bgr if kind == COMPRESSED_IMAGE else image_to_bgr
        image = convert(message, name)
    except ImageError as exc:
        return _Frame(connection.topic, log_time, message, raw, None, str(exc))
    return _Frame(connection.topic, log_time, message, raw, image, None)


class _Stats:
    """What the metrics JSON reports, gathered frame by frame."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = labels
        self.frames: Counter[str] = Counter()
        self.failures: list[dict[str, Any]] = []
        self.latency: dict[str, list[float]] = {stage: [] for stage in STAGES}
        self.classes: Counter[str] = Counter()
        self.truth: dict[str, Any] = {}
        self.truth_failures: list[dict[str, Any]] = []
        self.evaluated: list[tuple[str, tuple[int, int], Detections, Detections | None]] = []
        self.unfitted: Counter[str] = Counter()  # frames the model's trimmed input does not fit
        self.unfitted_why: str | None = None

    def fail(self, frame: _Frame, path: Path) -> None:
        self.failures.append(_failure(frame, path))

    def add_truth(self, truth: _Truth, path: Path) -> None:
        """A ground-truth message; one that does not deserialize is counted, not fatal:
        its frame is then scored as one without ground truth."""
        if truth.key is None:
            self.truth_failures.append(_failure(truth, path))
        else:
            self.truth[truth.key] = truth.message

    def add(
        self, frame: _Frame, result: FrameResult, published: Detections, ref: Detections | None
    ) -> None:
        self.frames[frame.topic] += 1
        if result.unfitted:
            self.unfitted[frame.topic] += 1
            self.unfitted_why = self.unfitted_why or result.unfitted
        for stage in STAGES:
            self.latency[stage].append(getattr(result.latency_ms, stage))
        self.classes.update(self.labels[int(c)] for c in published.class_ids)
        size = (result.width, result.height)
        self.evaluated.append((frame_key(frame.message.header), size, result.detections, ref))

    def per_topic(self, topic: str) -> dict[str, int]:
        failed = sum(1 for f in self.failures if f["topic"] == topic)
        return {
            "frames": self.frames[topic],
            "decode_failures": failed,
            "unfitted_frames": self.unfitted[topic],
        }

    def metrics(self, wall: float) -> dict[str, Any]:
        total = sum(self.frames.values())
        latency = {stage: _percentiles(values) for stage, values in self.latency.items() if values}
        return {
            "frames": total,
            "decode_failures": self.failures,
            "wall_s": round(wall, 3),
            "throughput_fps": round(total / wall, 2) if wall > 0 else None,
            "latency_ms": latency,
            "detections_per_class": dict(self.classes.most_common()),
            "unfitted": self.unfitted_why,  # the first such frame's reason, or None
        }

    def agreement(self, labels: Sequence[str]) -> dict[str, Any]:
        agreement = coco_evaluation("--reference").agreement
        reference = [ref for *_, ref in self.evaluated if ref is not None]
        candidate = [det for _, _, det, ref in self.evaluated if ref is not None]
        sizes = [size for _, size, _, ref in self.evaluated if ref is not None]
        return agreement(reference, candidate, sizes, labels).to_dict()

    def ground_truth(
        self, source: str, manifest: Manifest, coco: dict[str, Detections] | None
    ) -> dict[str, Any]:
        """`coco`: the ground truth of a COCO file, read before the replay; else `source` is
        the bag's ground-truth topic."""
        evaluator = coco_evaluation("--ground-truth").CocoEvaluator(manifest.classes)
        if coco is not None:
            truth = coco
        else:
            truth = {
                k: _truth_detections(m, manifest, f"{source} at {k}") for k, m in self.truth.items()
            }
        matched: set[str] = set()
        for key, size, found, _ in self.evaluated:
            gt = truth.get(key, truth.get(key.split("/")[-1]))
            if gt is None:
                continue
            if key in matched:
                raise PerceptionError(
                    f"{source}: two replayed images share frame_id and stamp {key}; ground "
                    "truth is matched to images by them, so each image needs its own stamp"
                )
            matched.add(key)
            evaluator.add(key, size[0], size[1], gt, found)
        if not matched:
            raise PerceptionError(f"{source}: no ground truth matches any replayed frame")
        return {
            **evaluator.result().to_dict(),
            "frames_without_ground_truth": len(self.evaluated) - len(matched),
            "ground_truth_decode_failures": self.truth_failures,
        }


def _failure(item: _Frame | _Truth, path: Path) -> dict[str, Any]:
    """A message that could not be used, as the metrics list it; warned about on stderr."""
    warning = f"warning: {path}: {item.topic} message at {item.log_time}: {item.error}"
    print(warning, file=sys.stderr)
    return {"topic": item.topic, "log_time": item.log_time, "error": item.error}


def _truth_detections(message: Any, manifest: Manifest, where: str) -> Detections:
    """A ground-truth Detection2DArray; class_id is a label or index of the model's classes.

    `where` (topic and frame) names the message in any error."""
    boxes, names = [], []
    for det in message.detections:
        if not det.results:
            raise PerceptionError(f"{where}: a ground-truth detection without a class (results [])")
        cx, cy = det.bbox.center.position.x, det.bbox.center.position.y
        w, h = det.bbox.size_x, det.bbox.size_y
        boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        names.append(det.results[0].hypothesis.class_id)
    try:
        ids = manifest.class_ids(names) or ()
    except ConfigError as exc:
        raise PerceptionError(f"{where}: ground-truth label not in the model ({exc})") from exc
    return Detections.ground_truth(boxes, ids)


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    return {name: round(value, 3) for name, value in percentiles(values).items()}


def replay_many(
    jobs: Sequence[tuple[Path, Path]], options: ReplayOptions, workers: int
) -> list[dict[str, Any]]:
    """Several bags in parallel processes, CPU threads shared out between them."""
    if workers <= 1 or len(jobs) <= 1:
        return [replay(src, dst, options) for src, dst in jobs]
    threads = max(1, (os.cpu_count() or 1) // workers)
    per_worker = replace(options, threads=options.threads or threads)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(replay, src, dst, per_worker) for src, dst in jobs]
        return [future.result() for future in futures]
