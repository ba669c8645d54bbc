"""The node core without any middleware: one-slot buffers, fairness, batching, diagnostics."""

from __future__ import annotations

import threading
import time
import types

import numpy as np
import pytest

from compressed_perception.ros.core import STALL_MIN_S, STALL_TURNS, PerceptionCore
from compressed_perception.runtime.backends import open_backend
from compressed_perception.runtime.detector import Detector, FrameResult, StageTimes
from compressed_perception.runtime.manifest import create_manifest, load_manifest
from compressed_perception.runtime.postprocess import Detections

from conftest import MODEL_DIR, fitted_detector_on, original_model


def _msg(image, stamp):
    h, w = image.shape[:2]
    header = types.SimpleNamespace(stamp=types.SimpleNamespace(sec=stamp, nanosec=0), frame_id="c")
    return types.SimpleNamespace(
        header=header, height=h, width=w, encoding="bgr8", step=w * 3, is_bigendian=0,
        data=image.tobytes(),
    )  # fmt: skip


class CountingBackend:
    """The real backend, with each call's batch size recorded."""

    def __init__(self, backend):
        self.inner = backend
        self.name = backend.name
        self.batches: list[int] = []

    def infer(self, images):
        self.batches.append(images.shape[0])
        return self.inner.infer(images)


@pytest.fixture(scope="module")
def static_detector():
    manifest = load_manifest(MODEL_DIR)
    return Detector(manifest, CountingBackend(open_backend(manifest, "onnxruntime")))


@pytest.fixture(scope="module")
def batch_detector(tmp_path_factory):
    """The default model exported with a dynamic batch dimension (multi-camera engines)."""
    pytest.importorskip("torch", reason="exporting a batch model needs torch ([torch] extra)")
    pytest.importorskip("onnx", reason="exporting a batch model needs onnx ([torch] extra)")
    from compressed_perception.compress.export import export_onnx

    folder = tmp_path_factory.mktemp("batch")
    spec = export_onnx(original_model(), folder / "m.onnx", dynamic_batch=True)
    base = load_manifest(MODEL_DIR)
    manifest = create_manifest(
        folder, {"onnx": "m.onnx"}, name="batch", classes=base.classes, precision="fp32", io=spec
    )
    manifest.save()
    manifest = load_manifest(folder)
    return Detector(manifest, CountingBackend(open_backend(manifest, "onnxruntime")))


class Sink:
    def __init__(self):
        self.published = []
        self.warnings = []
        self.event = threading.Event()

    def publish(self, camera, header, result, image):
        self.published.append((camera, header.stamp.sec, result))
        self.event.set()

    def wait(self, count, timeout=30):
        deadline = time.monotonic() + timeout
        while len(self.published) < count:
            assert time.monotonic() < deadline, f"only {len(self.published)} of {count} published"
            self.event.wait(0.05)
            self.event.clear()


def test_latest_frame_wins_and_drops_are_counted(static_detector, frames):
    sink = Sink()
    core = PerceptionCore(static_detector, ["/a"], False, sink.publish, sink.warnings.append)
    for stamp in range(1, 6):  # before the worker runs: four are replaced unseen
        core.on_message(0, _msg(frames[stamp], stamp))
    core.start()
    sink.wait(1)
    time.sleep(0.3)
    core.stop()
    assert [(c, s) for c, s, _ in sink.published] == [(0, 5)]
    stats = core.stats[0]
    assert (stats.received, stats.dropped, stats.processed) == (5, 4, 1)


def test_batch_model_takes_all_cameras_in_one_call(batch_detector, frames):
    sink = Sink()
    topics = ["/a", "/b", "/c"]
    core = PerceptionCore(batch_detector, topics, False, sink.publish, sink.warnings.append)
    batch_detector.backend.batches.clear()
    for camera in range(3):
        core.on_message(camera, _msg(frames[camera * 10], camera + 1))
    core.start()
    sink.wait(3)
    core.stop()
    assert batch_detector.backend.batches == [3]
    assert sorted((c, s) for c, s, _ in sink.published) == [(0, 1), (1, 2), (2, 3)]
    # the batched results equal one-by-one detection of the same frames
    for camera, _, result in sink.published:
        single = batch_detector.detect(frames[camera * 10]).detections
        np.testing.assert_allclose(result.detections.boxes, single.boxes, atol=0.05)
        np.testing.assert_array_equal(result.detections.class_ids, single.class_ids)


def test_cameras_take_turns_under_overload(static_detector, frames):
    """Four cameras always ready: each is served in turn, none starves."""
    sink = Sink()
    core = PerceptionCore(static_detector, ["/0", "/1", "/2", "/3"], False, sink.publish, print)
    stop = threading.Event()

    def flood():
        stamp = 0
        while not stop.is_set():
            stamp += 1
            for camera in range(4):
                core.on_message(camera, _msg(frames[camera], stamp))
            time.sleep(0.005)

    feeder = threading.Thread(target=flood)
    feeder.start()
    core.start()
    sink.wait(8)
    stop.set()
    feeder.join()
    core.stop()
    served = [c for c, _, _ in sink.published[:8]]
    assert sorted(served) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(core.stats[c].dropped > 0 for c in range(4))


def test_malformed_frames_warn_throttled_and_count(static_detector, frames):
    sink = Sink()
    core = PerceptionCore(static_detector, ["/cam"], False, sink.publish, sink.warnings.append)
    core.start()
    bad = _msg(frames[0], 1)
    bad.encoding = "32FC1"
    for _ in range(5):
        core.on_message(0, bad)
        time.sleep(0.05)
    core.on_message(0, _msg(frames[0], 9))
    sink.wait(1)
    core.stop()
    assert core.stats[0].malformed == 5
    assert len(sink.warnings) == 1  # throttled: one line per 5 s per camera
    assert "/cam: unsupported encoding '32FC1'" in sink.warnings[0]
    assert [s for _, s, _ in sink.published] == [9]


def test_diagnostics_report_rates_drops_and_health(static_detector, frames):
    sink = Sink()
    core = PerceptionCore(static_detector, ["/x", "/idle"], False, sink.publish, print)
    core.diagnostics("onnxruntime", "m")  # start of the period
    core.start()
    for stamp in range(1, 4):
        core.on_message(0, _msg(frames[stamp], stamp))
        sink.wait(stamp)
    time.sleep(0.2)
    active, idle = core.diagnostics("onnxruntime", "models/m.json")
    core.stop()
    assert active.name == "perception: /x"
    assert active.level == 0 and active.message == "ok"
    assert float(active.values["input_rate_hz"]) > 0
    assert active.values["processed"] == "3"
    assert active.values["dropped"] == "0"
    assert float(active.values["latency_p50_ms"]) >= float(active.values["inference_p50_ms"]) > 0
    assert active.values["backend"] == "onnxruntime"
    assert active.values["model"] == "models/m.json"
    assert idle.level == 1 and idle.message == "no input"


class GatedDetector:
    """Stands in for the model so that a test decides when each inference ends.

    Every call reports an inference time of `inference_ms` and blocks until released.
    """

    max_batch = 1

    def __init__(self, inference_ms: float):
        self.inference_ms = inference_ms
        self.calls = 0
        self._gate = threading.Semaphore(0)
        self._called = threading.Condition()

    def detect_batch(self, images, names):
        with self._called:
            self.calls += 1
            self._called.notify_all()
        self._gate.acquire()
        times = StageTimes(preprocess=0.0, inference=self.inference_ms, postprocess=0.0)
        return [FrameResult(Detections.empty(), i.shape[1], i.shape[0], times) for i in images]

    def wait_calls(self, count, timeout=30):
        with self._called:
            assert self._called.wait_for(lambda: self.calls >= count, timeout), self.calls

    def release(self, count=1):
        for _ in range(count):
            self._gate.release()


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_cameras_waiting_their_turn_are_not_reported_stalled(frames):
    """Four cameras, one worker: a camera is stalled only after the grace period."""
    detector, clock, sink = GatedDetector(inference_ms=300.0), Clock(), Sink()
    topics = [f"/cam{i}" for i in range(4)]
    core = PerceptionCore(detector, topics, False, sink.publish, print, clock=clock)
    image = np.ascontiguousarray(frames[0][:8, :8])

    def at(seconds):
        clock.now = seconds
        for camera in range(4):
            core.on_message(camera, _msg(image, int(seconds * 10)))
        return {s.name.split()[-1]: s for s in core.diagnostics("onnxruntime", "m")}

    try:
        at(0.0)
        core.start()
        detector.wait_calls(1)  # /cam0 is inferring, the others wait
        assert core.stall_after() == STALL_MIN_S  # nothing measured yet
        first = at(1.0)
        assert {s.level for s in first.values()} == {0}, first
        assert first["/cam3"].message == "starting: no output yet"
        detector.release()  # /cam0's result is published at t = 1 s
        sink.wait(1)
        detector.wait_calls(2)
        assert core.stall_after() == pytest.approx(STALL_TURNS * 0.3 * 4)  # 4.8 s
        waiting = at(4.5)  # /cam1../cam3: 4.5 s since their first frame, no output yet
        assert waiting["/cam0"].message == "ok"
        assert all(waiting[t].level == 0 for t in topics)
        stalled = at(5.0)  # past 4.8 s: only the cameras never served are stalled
        assert [t for t in topics if stalled[t].level == 2] == ["/cam1", "/cam2", "/cam3"]
        assert stalled["/cam2"].message == "input but no output for 5.0 s"
        assert stalled["/cam0"].level == 0  # its last output was 4 s ago
        assert at(6.0)["/cam0"].level == 2  # 5 s without output
    finally:
        detector.release(100)
        core.stop()


class FlakyDetector:
    """Raises on the first call, as a backend may on a GPU error, then detects nothing."""

    max_batch = 1

    def __init__(self):
        self.calls = 0

    def detect_batch(self, images, names):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        times = StageTimes(preprocess=0.0, inference=1.0, postprocess=0.0)
        return [FrameResult(Detections.empty(), i.shape[1], i.shape[0], times) for i in images]


def test_a_frame_whose_inference_raises_costs_that_frame_not_the_worker(frames):
    sink = Sink()
    core = PerceptionCore(FlakyDetector(), ["/cam"], False, sink.publish, sink.warnings.append)
    image = np.ascontiguousarray(frames[0][:8, :8])
    core.start()
    core.on_message(0, _msg(image, 1))
    deadline = time.monotonic() + 30
    while core.stats[0].failed == 0:
        assert time.monotonic() < deadline, "the failure was never counted"
        time.sleep(0.01)
    core.on_message(0, _msg(image, 2))
    sink.wait(1)
    core.stop()
    assert [s for _, s, _ in sink.published] == [2]
    assert core.stats[0].failed == 1 and core.stats[0].processed == 1
    assert len(sink.warnings) == 1 and "frame not processed: RuntimeError('CUDA" in sink.warnings[0]


def test_skipped_frames_warn_in_the_period_they_happened_only(frames):
    detector, clock, sink = GatedDetector(inference_ms=1.0), Clock(), Sink()
    core = PerceptionCore(detector, ["/cam"], False, sink.publish, print, clock=clock)
    image = np.ascontiguousarray(frames[0][:8, :8])
    bad = _msg(image, 1)
    bad.encoding = "yuyv"  # 8 pixels wide is fine; 7 cannot be packed in pixel pairs
    bad.width, bad.step = 7, 14
    detector.release(100)
    core.start()
    try:
        for period, frames_in in enumerate(([bad, _msg(image, 2)], [_msg(image, 3)])):
            for message in frames_in:
                core.on_message(0, message)
                time.sleep(0.2)  # served one at a time: none replaces another
            clock.now = period + 1.0
            (status,) = core.diagnostics("onnxruntime", "m")
            if period == 0:
                assert status.level == 1, status
                assert status.message == (
                    "1 frames skipped since the last report (in all 1 malformed, 0 failed)"
                )
            else:
                assert (status.level, status.message) == (0, "ok"), status
                assert status.values["malformed"] == "1"
    finally:
        core.stop()


def test_a_frame_whose_publishing_raises_is_counted_failed_not_processed(static_detector, frames):
    sink = Sink()
    calls = []

    def publish(camera, header, result, image):
        calls.append(header.stamp.sec)
        if len(calls) == 1:
            raise RuntimeError("publisher's context is invalid")
        sink.publish(camera, header, result, image)

    core = PerceptionCore(static_detector, ["/cam"], False, publish, sink.warnings.append)
    core.start()
    core.on_message(0, _msg(frames[0], 1))
    deadline = time.monotonic() + 30
    while core.stats[0].failed == 0:
        assert time.monotonic() < deadline, "the failure was never counted"
        time.sleep(0.01)
    core.on_message(0, _msg(frames[1], 2))
    sink.wait(1)
    core.stop()
    assert calls == [1, 2] and [s for _, s, _ in sink.published] == [2]
    assert (core.stats[0].failed, core.stats[0].processed) == (1, 1)
    assert "frame not processed: RuntimeError(\"publisher's context" in sink.warnings[0]


def test_frames_that_do_not_fit_a_fitted_input_warn_once_and_show_in_diagnostics(tmp_path, frames):
    """A model whose input the build trimmed to 4:3 frames, given a square camera's: it
    still detects, less faithfully, and the node says so once and while it lasts."""
    pytest.importorskip("torch", reason="fitting the input needs torch ([torch] extra)")
    sink = Sink()
    detector = fitted_detector_on(tmp_path, frames)
    core = PerceptionCore(detector, ["/cam"], False, sink.publish, sink.warnings.append)
    core.start()
    square = np.ascontiguousarray(frames[0][:, :576])
    for stamp in (1, 2):
        core.on_message(0, _msg(square, stamp))
        sink.wait(stamp)
    status = core.diagnostics("onnxruntime", "m")[0]
    core.on_message(0, _msg(frames[1], 3))
    sink.wait(3)
    fits = core.diagnostics("onnxruntime", "m")[0]
    core.stop()
    assert status.level == 1 and status.message.startswith("576x576 frames do not fit")
    assert sink.warnings == [f"/cam: {status.message}"]
    assert fits.level == 0 and fits.message == "ok"
