"""The node's core, shared by the rclpy node and the DDS transport.

Per camera a one-slot buffer: a new frame replaces an untaken one (latest frame wins,
the replaced one counts as dropped), so latency stays bounded whatever the input rate.
Decoding and inference run on one worker thread, off the subscription callbacks; when
the model takes a batch, the latest frames of several cameras go in one call.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compressed_perception.errors import ConfigError, ImageError
from compressed_perception.resources import resolve_model
from compressed_perception.ros.config import BACKEND_CHOICES, NODE_EXCLUDED_BACKENDS, NodeConfig
from compressed_perception.ros.convert import compressed_to_bgr, image_to_bgr
from compressed_perception.runtime.backends import choose, open_backend
from compressed_perception.runtime.detector import Detector, FrameResult
from compressed_perception.runtime.manifest import load_manifest
from compressed_perception.runtime.postprocess import PostprocessConfig

WARN_PERIOD_S = 5.0
LATENCY_WINDOW = 1000
# A camera with input is reported stalled only after this long without output: at least
# STALL_MIN_S, and STALL_TURNS rounds of every camera's inference (cameras take turns).
STALL_MIN_S = 2.0
STALL_TURNS = 4

# (camera index, image header, result with boxes in image pixels, the BGR image)
PublishFn = Callable[[int, Any, FrameResult, np.ndarray], None]
LogFn = Callable[[str], None]


@dataclass
class _Pending:
    message: Any
    received: float  # the core's clock at the subscription callback


@dataclass
class CameraStats:
    topic: str
    received: int = 0
    processed: int = 0
    dropped: int = 0
    malformed: int = 0
    failed: int = 0  # decoded frames whose inference or publishing raised
    end_to_end_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    inference_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    last_warning: float = -1e9
    suppressed_warnings: int = 0
    first_input: float | None = None  # clock time of the first frame received
    last_output: float | None = None  # clock time of the latest frame published
    # why the latest frame does not fit the model's trimmed input (Detector.unfitted)
    unfitted: str = ""

    @property
    def skipped(self) -> int:
        """Frames received but never published: malformed, or failed."""
        return self.malformed + self.failed


@dataclass(frozen=True)
class CameraStatus:
    """One camera's health over the last diagnostics period, transport-neutral."""

    name: str
    level: int  # diagnostic_msgs/DiagnosticStatus: 0 OK, 1 WARN, 2 ERROR, 3 STALE
    message: str
    values: dict[str, str]


class PerceptionCore:
    def __init__(
        self,
        detector: Detector,
        topics: Sequence[str],
        compressed: bool,
        publish: PublishFn,
        warn: LogFn,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` gives seconds (monotonic); tests pass their own to step time exactly."""
        self.detector = detector
        self.compressed = compressed
        self._publish = publish
        self._warn = warn
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._slots: list[_Pending | None] = [None] * len(topics)
        self._served = [0] * len(topics)  # turn number at which each camera was last taken
        self._turns = itertools.count(1)
        self.stats = [CameraStats(topic) for topic in topics]
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="perception-worker", daemon=True)
        self._clock = clock
        self._last_report = (clock(), [(0, 0, 0)] * len(topics))

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def on_message(self, camera: int, message: Any) -> None:
        """Subscription callback: store and return at once; never decodes or infers."""
        now = self._clock()
        with self._wake:
            stats = self.stats[camera]
            stats.received += 1
            if stats.first_input is None:
                stats.first_input = now
            if self._slots[camera] is not None:
                stats.dropped += 1
            self._slots[camera] = _Pending(message, now)
            self._wake.notify()

    def _take(self) -> list[tuple[int, _Pending]] | None:
        """Wait for frames; returns up to one batch of (camera, frame).

        Cameras served longest ago go first, so that under overload every camera gets
        its share instead of the one whose frames happen to arrive first.
        """
        with self._wake:
            while not self._stopping and all(slot is None for slot in self._slots):
                self._wake.wait()
            if self._stopping:
                return None
            ready = [(i, slot) for i, slot in enumerate(self._slots) if slot is not None]
            ready.sort(key=lambda item: (self._served[item[0]], item[1].received))
            batch = ready[: self.detector.max_batch]
            for camera, _ in batch:
                self._slots[camera] = None
                self._served[camera] = next(self._turns)
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            decoded = [
                (camera, pending, self._decode(camera, pending)) for camera, pending in batch
            ]
            ready = [(c, p, image) for c, p, image in decoded if image is not None]
            if ready:
                self._serve(ready)

    def _serve(self, ready: list[tuple[int, _Pending, np.ndarray]]) -> None:
        """Detect and publish one batch; whatever raises costs that batch, never the worker
        (a node that stopped here would keep receiving and never publish again)."""
        done = 0
        try:
            results = self.detector.detect_batch(
                [image for *_, image in ready], [self.stats[c].topic for c, *_ in ready]
            )
            for (camera, pending, image), result in zip(ready, results, strict=True):
                self._publish(camera, pending.message.header, result, image)
                self._record(camera, pending, result)
                self._check_fit(camera, result.unfitted or "")
                done += 1
        except Exception as exc:  # the worker must outlive any one frame
            self._failed([camera for camera, *_ in ready[done:]], f"frame not processed: {exc!r}")

    def _check_fit(self, camera: int, why: str) -> None:
        """Warn once per change, and say it in diagnostics while it lasts."""
        with self._lock:
            changed, self.stats[camera].unfitted = why != self.stats[camera].unfitted, why
        if why and changed:
            self._warn(f"{self.stats[camera].topic}: {why}")

    def _failed(self, cameras: list[int], text: str) -> None:
        with self._lock:
            for camera in cameras:
                self.stats[camera].failed += 1
        self._throttled_warning(cameras[0], text)

    def _decode(self, camera: int, pending: _Pending) -> np.ndarray | None:
        topic = self.stats[camera].topic
        try:
            if self.compressed:
                return compressed_to_bgr(pending.message, topic)
            return image_to_bgr(pending.message, topic)
        except ImageError as exc:
            with self._lock:
                self.stats[camera].malformed += 1
            self._throttled_warning(camera, f"skipped malformed frame: {exc}")
            return None
        except Exception as exc:  # not the frame's fault, but it must not stop the worker
            self._failed([camera], f"frame not decoded: {exc!r}")
            return None

    def _record(self, camera: int, pending: _Pending, result: FrameResult) -> None:
        now = self._clock()
        with self._lock:
            stats = self.stats[camera]
            stats.processed += 1
            stats.last_output = now
            stats.end_to_end_ms.append((now - pending.received) * 1e3)
            stats.inference_ms.append(result.latency_ms.inference)

    def _throttled_warning(self, camera: int, text: str) -> None:
        now = self._clock()
        with self._lock:
            stats = self.stats[camera]
            if now - stats.last_warning < WARN_PERIOD_S:
                stats.suppressed_warnings += 1
                return
            suppressed, stats.suppressed_warnings = stats.suppressed_warnings, 0
            stats.last_warning = now
        more = f" ({suppressed} similar warnings suppressed)" if suppressed else ""
        self._warn(f"{text}{more}")

    def stall_after(self) -> float:
        """Seconds without output before a camera with input counts as stalled.

        One worker serves the cameras in turn, so a camera may wait a whole round of
        inferences (and the first ones, while the backend warms up, are the slowest).
        """
        with self._lock:
            samples = [ms for stats in self.stats for ms in stats.inference_ms]
        inference_s = float(np.median(samples)) / 1e3 if samples else 0.0
        return max(STALL_MIN_S, STALL_TURNS * inference_s * len(self.stats))

    def diagnostics(self, backend: str, model: str) -> list[CameraStatus]:
        """Per camera: rates since the previous call, drops, latency percentiles."""
        stall_after = self.stall_after()
        now = self._clock()
        with self._lock:
            since, counts = self._last_report
            period = _Period(max(now - since, 1e-9), now, stall_after, backend, model)
            statuses = [
                _status(stats, before, period)
                for stats, before in zip(self.stats, counts, strict=True)
            ]
            self._last_report = (
                now,
                [(s.received, s.processed, s.skipped) for s in self.stats],
            )
        return statuses


@dataclass(frozen=True)
class _Period:
    elapsed: float
    now: float
    stall_after: float
    backend: str
    model: str


def _status(stats: CameraStats, before: tuple[int, int, int], period: _Period) -> CameraStatus:
    """`before`: frames received, processed and skipped (malformed or failed) at the last
    report; a skipped frame warns in the period it happened, not forever after."""
    received, processed, skipped = before
    input_rate = (stats.received - received) / period.elapsed
    output_rate = (stats.processed - processed) / period.elapsed
    e2e = _percentiles(stats.end_to_end_ms)
    values = {
        "input_rate_hz": f"{input_rate:.2f}",
        "output_rate_hz": f"{output_rate:.2f}",
        "received": str(stats.received),
        "processed": str(stats.processed),
        "dropped": str(stats.dropped),
        "malformed": str(stats.malformed),
        "failed": str(stats.failed),
        "latency_p50_ms": f"{e2e[0]:.2f}",
        "latency_p99_ms": f"{e2e[1]:.2f}",
        "inference_p50_ms": f"{_percentiles(stats.inference_ms)[0]:.2f}",
        "backend": period.backend,
        "model": period.model,
    }
    quiet_since = stats.last_output if stats.last_output is not None else stats.first_input
    quiet = period.now - quiet_since if quiet_since is not None else 0.0
    if input_rate == 0:
        level, text = 1, "no input"
    elif output_rate == 0 and quiet > period.stall_after:
        why = f" ({stats.malformed} malformed, {stats.failed} failed)" if stats.skipped else ""
        level, text = 2, f"input but no output for {quiet:.1f} s{why}"
    elif output_rate == 0 and stats.last_output is None:
        level, text = 0, "starting: no output yet"
    elif stats.skipped > skipped:
        level = 1
        text = (
            f"{stats.skipped - skipped} frames skipped since the last report "
            f"(in all {stats.malformed} malformed, {stats.failed} failed)"
        )
    elif stats.unfitted:
        level, text = 1, stats.unfitted
    else:
        level, text = 0, "ok"
    return CameraStatus(f"perception: {stats.topic}", level, text, values)


def _percentiles(samples: deque[float]) -> tuple[float, float]:
    if not samples:
        return (float("nan"), float("nan"))
    values = np.fromiter(samples, float)
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def diagnostic_array(
    lookup: Callable[[str], type], header: Any, statuses: Sequence[CameraStatus]
) -> Any:
    """diagnostic_msgs/DiagnosticArray from statuses, with the given message classes."""
    status_cls = lookup("diagnostic_msgs/msg/DiagnosticStatus")
    pair_cls = lookup("diagnostic_msgs/msg/KeyValue")
    return lookup("diagnostic_msgs/msg/DiagnosticArray")(
        header=header,
        status=[
            status_cls(
                level=_level_value(status_cls, s.level),
                name=s.name,
                message=s.message,
                hardware_id="",
                values=[pair_cls(key=k, value=v) for k, v in s.values.items()],
            )
            for s in statuses
        ],
    )


def _level_value(status_cls: type, level: int) -> Any:
    """rclpy's `byte` fields take bytes; a typestore's take ints."""
    return bytes([level]) if getattr(status_cls, "_fields_and_field_types", None) else level


def detector_from_config(config: NodeConfig) -> Detector:
    """The detector a node runs: model, backend, thresholds and class filter from its config."""
    manifest = load_manifest(resolve_model(config.model, config.backend))
    postprocess = PostprocessConfig(
        score_threshold=config.score_threshold,
        nms_threshold=config.nms_threshold,
        max_detections=config.max_detections,
        class_ids=manifest.class_ids(config.classes),
    )
    kind = choose(manifest) if config.backend == "auto" else config.backend
    if kind in NODE_EXCLUDED_BACKENDS:
        raise ConfigError(
            f"model: {manifest.path} runs only on {kind}; the node runs exported models "
            f"({', '.join(b for b in BACKEND_CHOICES if b != 'auto')})"
        )
    backend = open_backend(manifest, kind, threads=config.threads)
    return Detector(manifest, backend, postprocess)
