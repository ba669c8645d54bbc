"""`bench --node`: the node's own cost over DDS on loopback, apart from inference.

The node runs as a separate process; this process publishes real frames and waits for
each frame's detections before sending the next, so the figure is latency, not queueing.
Node overhead = end-to-end p50 (publish to detections received) - inference p50 (as the
node reports it on /diagnostics): conversion, letterbox, postprocessing, CDR and DDS.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from compressed_perception.errors import PerceptionError
from compressed_perception.ros.dds import LOOPBACK_CONFIG, Participant, RawPublisher, RawSubscriber
from compressed_perception.ros.messages import (
    DETECTION_ARRAY,
    DIAGNOSTIC_ARRAY,
    IMAGE,
    make_header,
    typestore,
)

CAMERA = "/bench/image_raw"
CARRY_HZ = 30
CARRY_FRAMES = 90


@contextlib.contextmanager
def _node_process(domain: int, model: str, backend: str, folder: Path) -> Iterator[None]:
    params = {"cameras": [CAMERA], "model": model, "backend": backend, "diagnostics_period": 0.5}
    config = folder / "bench.yaml"
    config.write_text(yaml.safe_dump({"perception_node": {"ros__parameters": params}}))
    command = [sys.executable, "-m", "compressed_perception.cli", "node", "--transport", "dds"]
    command += ["--config", str(config), "--domain-id", str(domain)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _image(store: Any, image: np.ndarray, index: int) -> Any:
    height, width = image.shape[:2]
    return store.types[IMAGE](
        header=make_header(index * 10**9, "bench"),
        height=height,
        width=width,
        encoding="bgr8",
        is_bigendian=0,
        step=width * 3,
        data=np.ascontiguousarray(image).reshape(-1),
    )


def _arrives(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True


def _wait(condition: Any, timeout: float, what: str) -> None:
    if not _arrives(condition, timeout):
        raise PerceptionError(f"bench --node: {what} within {timeout:.0f} s")


def bench_size(
    participant: Participant, images: Sequence[np.ndarray], size: tuple[int, int], count: int
) -> dict[str, float]:
    store = typestore()
    arrived: dict[int, float] = {}
    diagnostics: list[Any] = []

    def on_detections(message: Any) -> None:
        arrived[message.header.stamp.sec] = time.perf_counter()

    subscriber = RawSubscriber(
        participant, "/bench/detections", DETECTION_ARRAY, on_detections, True, 10
    )
    RawSubscriber(participant, "/diagnostics", DIAGNOSTIC_ARRAY, diagnostics.append, True, 10)
    publisher = RawPublisher(participant, CAMERA, IMAGE, reliable=False, depth=1)
    _wait(lambda: publisher.subscriber_count() and subscriber.publisher_count(), 90, "no node")
    frames = [_image(store, cv2.resize(img, size), i) for i, img in enumerate(images)]
    latencies = []
    lost = 0
    for index in range(count + 5):  # 5 warm-up frames
        message = frames[index % len(frames)]
        message.header.stamp.sec = index + 1
        for _attempt in range(5):  # best effort: a large frame can be lost on the way
            sent = time.perf_counter()
            publisher.publish(message)
            if _arrives(lambda i=index + 1: i in arrived, 3.0):
                break
            lost += 1
        else:
            raise PerceptionError(f"bench --node: frame {index} got no detections in 5 tries")
        if index >= 5:
            latencies.append((arrived[index + 1] - sent) * 1e3)
    time.sleep(1.2)  # one more diagnostics period
    values = _values(diagnostics)
    end_to_end = float(np.percentile(latencies, 50))
    inference = float(values["inference_p50_ms"])
    inside = float(values["latency_p50_ms"]) - inference  # receive callback to publish
    publish_ms, carried = _carry(publisher, frames, diagnostics, CARRY_HZ, CARRY_FRAMES)
    return {
        "width": size[0],
        "height": size[1],
        "frames": count,
        "end_to_end_p50_ms": round(end_to_end, 2),
        "end_to_end_p99_ms": round(float(np.percentile(latencies, 99)), 2),
        "inference_p50_ms": round(inference, 2),
        "node_overhead_p50_ms": round(end_to_end - inference, 2),
        "inside_node_p50_ms": round(inside, 2),
        "publish_call_p50_ms": round(publish_ms, 2),
        "frames_resent": lost,
        f"received_of_{CARRY_FRAMES}_at_{CARRY_HZ}hz": carried,
    }


def _carry(
    publisher: RawPublisher, frames: Sequence[Any], diagnostics: list[Any], hz: int, count: int
) -> tuple[float, int]:
    """Publish `count` frames at `hz`; returns the publish call's p50 ms and how many arrived."""
    before = int(_values(diagnostics)["received"])
    calls = []
    start = time.perf_counter()
    for index in range(count):
        time.sleep(max(0.0, start + index / hz - time.perf_counter()))
        begin = time.perf_counter()
        publisher.publish(frames[index % len(frames)])
        calls.append((time.perf_counter() - begin) * 1e3)
    time.sleep(1.5)  # the last frames, then a diagnostics period
    return float(np.percentile(calls, 50)), int(_values(diagnostics)["received"]) - before


def _values(diagnostics: list[Any]) -> dict[str, str]:
    return {kv.key: kv.value for kv in diagnostics[-1].status[0].values}


def bench_node(
    images: Sequence[np.ndarray],
    sizes: Sequence[tuple[int, int]],
    count: int,
    model: str = "",
    backend: str = "onnxruntime",
) -> list[dict[str, float]]:
    """One node process per size, on a private loopback-only DDS domain."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        if "CYCLONEDDS_URI" not in os.environ:
            (folder / "cyclonedds.xml").write_text(LOOPBACK_CONFIG)
            os.environ["CYCLONEDDS_URI"] = (folder / "cyclonedds.xml").as_uri()
        domain = 150 + os.getpid() % 80
        results = []
        for size in sizes:
            with _node_process(domain, model, backend, folder), Participant(domain) as participant:
                results.append(bench_size(participant, images, size, count))
        return results
