"""The node as a real process over real Cyclone DDS, confined to loopback.

Each test run uses its own DDS domain id and a Cyclone configuration with the loopback
interface only, multicast off and 127.0.0.1 as the one discovery peer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

pytest.importorskip("cyclonedds", reason="the DDS transport needs cyclonedds (pip install)")
pytest.importorskip("rosbags", reason="the DDS transport needs rosbags (python3-rosbags-pip)")

from cyclonedds.builtin import (
    BuiltinDataReader,
    BuiltinTopicDcpsParticipant,
    BuiltinTopicDcpsPublication,
    BuiltinTopicDcpsSubscription,
)
from cyclonedds.core import Policy

from compressed_perception.ros.dds import (
    DISCOVERY_TOPIC,
    NodeIdentity,
    Participant,
    RawPublisher,
    RawSubscriber,
)
from compressed_perception.ros.messages import (
    COMPRESSED_IMAGE,
    DETECTION_ARRAY,
    DIAGNOSTIC_ARRAY,
    IMAGE,
    PARTICIPANT_ENTITIES_INFO,
    typestore,
)

STORE = typestore()
T = STORE.types


@pytest.fixture(scope="module")
def dds(tmp_path_factory):
    """Loopback-only Cyclone config and a domain id of this run, for us and the node."""
    folder = tmp_path_factory.mktemp("dds")
    from compressed_perception.ros.dds import LOOPBACK_CONFIG

    (folder / "cyclonedds.xml").write_text(LOOPBACK_CONFIG)
    domain = 100 + os.getpid() % 120
    saved = os.environ.get("CYCLONEDDS_URI")
    os.environ["CYCLONEDDS_URI"] = (folder / "cyclonedds.xml").as_uri()
    with Participant(domain) as participant:
        yield folder, domain, participant
    if saved is None:
        del os.environ["CYCLONEDDS_URI"]
    else:
        os.environ["CYCLONEDDS_URI"] = saved


@pytest.fixture
def collect(dds):
    """Collectors on the shared participant, closed (their readers deleted) after the test."""
    made = []

    def make(topics):
        made.append(Collector(dds[2], topics))
        return made[-1]

    yield make
    for collector in made:
        collector.close()


class NodeProcess:
    """`compressed-perception node --transport dds` in a subprocess, its stderr collected."""

    def __init__(self, folder: Path, domain: int, name: str, **params):
        config = folder / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"perception_node": {"ros__parameters": params}}))
        self.log: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "compressed_perception.cli", "node", "--transport", "dds",
             "--config", str(config), "--domain-id", str(domain)],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + 90
        while not any("[INFO]" in line for line in self.log):
            assert self.proc.poll() is None, f"node exited: {self.log}"
            assert time.monotonic() < deadline, f"node did not start: {self.log}"
            time.sleep(0.1)

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line.rstrip())

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def stop(self, sig=signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)


class Collector:
    """Detections and diagnostics received, keyed by stamp, with arrival times."""

    def __init__(self, participant, topics):
        self.by_stamp: dict[tuple[str, int, int], tuple[object, float]] = {}
        self.order: list[tuple[str, int, int]] = []
        self.diagnostics: list[object] = []
        self.event = threading.Event()
        self._subs = [
            RawSubscriber(participant, t, DETECTION_ARRAY, self._on_detections, True, 100)
            for t in topics
        ]
        self._subs.append(
            RawSubscriber(
                participant, "/diagnostics", DIAGNOSTIC_ARRAY, self.diagnostics.append, True, 100
            )
        )

    def close(self):
        for sub in self._subs:
            sub.close()

    def _on_detections(self, msg):
        key = (msg.header.frame_id, msg.header.stamp.sec, msg.header.stamp.nanosec)
        self.by_stamp[key] = (msg, time.time())
        self.order.append(key)
        self.event.set()

    def wait_matched(self, timeout=15):
        deadline = time.monotonic() + timeout
        while not all(s.publisher_count() for s in self._subs):
            assert time.monotonic() < deadline, "node's publishers were not discovered"
            time.sleep(0.05)

    def last_status(self, topic):
        for array in reversed(self.diagnostics):
            for status in array.status:
                if status.name.endswith(topic):
                    return {kv.key: kv.value for kv in status.values}, status
        raise AssertionError(f"no diagnostics for {topic}")


def _header(frame_id, stamp_ns):
    return T["std_msgs/msg/Header"](
        stamp=T["builtin_interfaces/msg/Time"](sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9),
        frame_id=frame_id,
    )


def _image(frame_id, stamp_ns, bgr):
    h, w = bgr.shape[:2]
    return T[IMAGE](
        header=_header(frame_id, stamp_ns), height=h, width=w, encoding="bgr8", is_bigendian=0,
        step=w * 3, data=bgr.reshape(-1),
    )  # fmt: skip


def _jpeg(frame_id, stamp_ns, bgr):
    data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].reshape(-1)
    return T[COMPRESSED_IMAGE](header=_header(frame_id, stamp_ns), format="jpeg", data=data)


def _publisher(participant, topic, msgtype):
    pub = RawPublisher(participant, topic, msgtype, reliable=False, depth=1)
    deadline = time.monotonic() + 15
    while not pub.subscriber_count():
        assert time.monotonic() < deadline, "the node's subscription was not discovered"
        time.sleep(0.05)
    return pub


def _people(msg):
    return [d for d in msg.detections if d.results[0].hypothesis.class_id == "person"]


@pytest.fixture(scope="module")
def image_node(dds):
    folder, domain, _ = dds
    node = NodeProcess(
        folder, domain, "image", cameras=["/front/image_raw"], diagnostics_period=0.5
    )
    yield node
    node.stop()


def test_every_image_gets_its_detections_at_10hz(dds, collect, image_node, frames):
    _, _, participant = dds
    collector = collect(["/front/detections"])
    collector.wait_matched()
    pub = _publisher(participant, "/front/image_raw", IMAGE)
    sent = {}
    for i in range(12):
        stamp = 1_700_000_000_000_000_000 + i * 100_000_000
        key = ("front_camera", stamp // 10**9, stamp % 10**9)
        collector.event.clear()
        sent[key] = time.time()
        pub.publish(_image("front_camera", stamp, frames[i]))
        # paced at 10 Hz at most, and never ahead of the node: every frame must come back
        deadline = time.monotonic() + 10
        while key not in collector.by_stamp:
            assert time.monotonic() < deadline, f"no detections for frame {i}"
            collector.event.wait(0.05)
        time.sleep(max(0.0, 0.1 - (time.time() - sent[key])))
    assert set(collector.by_stamp) == set(sent)
    for key, (msg, arrived) in collector.by_stamp.items():
        assert (msg.header.frame_id, msg.header.stamp.sec, msg.header.stamp.nanosec) == key
        assert len(_people(msg)) >= 3
        for det in msg.detections:
            assert 0 <= det.bbox.center.position.x <= 768 and 0 <= det.bbox.center.position.y <= 576
            assert det.header.stamp.sec == key[1]
        assert arrived - sent[key] < 2.0  # inference is ~0.1 s here; generous for a busy CI


def test_malformed_messages_are_skipped_and_the_node_keeps_running(
    dds, collect, image_node, frames
):
    _, _, participant = dds
    collector = collect(["/front/detections"])
    collector.wait_matched()
    pub = _publisher(participant, "/front/image_raw", IMAGE)
    good = frames[3]
    bad = [
        T[IMAGE](header=_header("f", 1), height=576, width=768, encoding="bgr8", is_bigendian=0,
                 step=100, data=good.reshape(-1)),  # step mismatch
        T[IMAGE](header=_header("f", 2), height=2, width=2, encoding="32FC1", is_bigendian=0,
                 step=8, data=np.zeros(16, np.uint8)),  # unknown encoding
        T[IMAGE](header=_header("f", 3), height=576, width=768, encoding="bgr8", is_bigendian=0,
                 step=2304, data=good.reshape(-1)[:1000]),  # truncated
        T[IMAGE](header=_header("f", 4), height=0, width=0, encoding="bgr8", is_bigendian=0,
                 step=0, data=np.zeros(0, np.uint8)),  # zero size
    ]  # fmt: skip
    for msg in bad:
        pub.publish(msg)
        time.sleep(0.3)  # let each reach the one-slot buffer on its own
    pub.publish(_image("f", 5, good))
    deadline = time.monotonic() + 10
    while ("f", 0, 5) not in collector.by_stamp:
        assert time.monotonic() < deadline, "node stopped answering after malformed input"
        time.sleep(0.05)
    assert image_node.proc.poll() is None
    assert not any(key[2] in (1, 2, 3, 4) for key in collector.by_stamp)
    warnings = [line for line in image_node.log if "skipped malformed frame" in line]
    assert warnings, image_node.log
    expected = ("step 100 is less than width 768", "unsupported encoding '32FC1'",
                "truncated data: 1000 bytes", "empty image (0x0)")  # fmt: skip
    assert all(any(e in w for e in expected) for w in warnings), warnings
    assert all("/front/image_raw" in w for w in warnings)
    time.sleep(1.2)  # a diagnostics period
    values, _ = collector.last_status("/front/image_raw")
    assert int(values["malformed"]) >= 1


def test_compressed_at_30hz_latest_frame_wins(dds, collect, frames):
    folder, domain, participant = dds
    node = NodeProcess(
        folder, domain, "compressed", cameras=["/rear/image"], compressed=True,
        diagnostics_period=0.5,
    )  # fmt: skip
    try:
        collector = collect(["/rear/detections"])
        collector.wait_matched()
        pub = _publisher(participant, "/rear/image/compressed", COMPRESSED_IMAGE)
        corrupt = T[COMPRESSED_IMAGE](
            header=_header("rear", 1), format="jpeg", data=np.frombuffer(b"\xff\xd8junk", np.uint8)
        )
        for _ in range(3):  # best effort: one of them may be lost on the way
            pub.publish(corrupt)
            time.sleep(0.3)
        messages = [_jpeg("rear", 10**9 + i * 33_333_333, frames[i % 40]) for i in range(75)]
        sent = {}
        start = time.time()
        for i, msg in enumerate(messages):
            if i < 60:  # 30 Hz, then a burst of 15 no model keeps up with, whatever its speed
                time.sleep(max(0.0, start + i / 30 - time.time()))
            sent[("rear", msg.header.stamp.sec, msg.header.stamp.nanosec)] = time.time()
            pub.publish(msg)
        time.sleep(1.5)
        got = collector.order
        assert got[-1] in list(sent)[-5:]  # after the burst, the newest frame is served
        assert len(got) >= 5
        assert set(got) <= set(sent)  # only real stamps come back
        assert got == sorted(got, key=lambda k: (k[1], k[2]))  # in order, newest wins
        latencies = [collector.by_stamp[k][1] - sent[k] for k in got]
        assert max(latencies) < 1.5  # bounded: never a queue of stale frames
        values, _ = collector.last_status("/rear/image/compressed")
        # best effort over UDP may lose a frame: all but a couple of the 60 at 30 Hz and the
        # 3 corrupt ones arrive; of the burst, the reader's history of 1 keeps what it can
        assert 60 - 2 <= int(values["received"]) <= len(sent) + 3
        # whether the node itself drops at 30 Hz depends on the model's speed (the burst's
        # surplus may already go in the reader's history): its counts must add up
        counted = int(values["processed"]) + int(values["dropped"]) + int(values["malformed"])
        assert counted <= int(values["received"])
        assert ("rear", 0, 1) not in collector.by_stamp
        assert 1 <= int(values["malformed"]) <= 3
    finally:
        assert node.stop(signal.SIGTERM) == 0
    assert any("stopped" in line for line in node.log)
    assert any("corrupt, empty or undecodable 'jpeg' data" in line for line in node.log)


def test_overload_four_cameras_at_60hz(dds, collect, frames):
    folder, domain, participant = dds
    cameras = [f"/cam{i}/image_raw" for i in range(4)]
    # the FP32 original on ONNX Runtime: 240 frames/s in must be more than the node can run
    node = NodeProcess(
        folder, domain, "overload", cameras=cameras, diagnostics_period=0.5,
        model="nanodet_g", backend="onnxruntime",
    )  # fmt: skip
    try:
        collector = collect([f"/cam{i}/detections" for i in range(4)])
        collector.wait_matched()
        pubs = [_publisher(participant, topic, IMAGE) for topic in cameras]
        small = [cv2.resize(f, (384, 288), interpolation=cv2.INTER_AREA) for f in frames]
        sent = {}
        rss = []
        start = time.time()
        for i in range(60 * 12):  # 12 s at 60 Hz, 4 cameras: 2880 frames
            time.sleep(max(0.0, start + i / 60 - time.time()))
            for c, pub in enumerate(pubs):
                stamp = 2 * 10**9 + i * 16_666_667
                sent[(f"cam{c}", stamp // 10**9, stamp % 10**9)] = time.time()
                pub.publish(_image(f"cam{c}", stamp, small[(i + c) % 40]))
            if i % 60 == 0 and i >= 180:
                rss.append(node.rss_mb())
        time.sleep(1.5)
        latencies = [arrived - sent[key] for key, (_, arrived) in collector.by_stamp.items()]
        assert len(latencies) >= 40
        assert float(np.percentile(latencies, 99)) < 2.0
        per_camera = defaultdict(int)
        for key in collector.by_stamp:
            per_camera[key[0]] += 1
        assert set(per_camera) == {"cam0", "cam1", "cam2", "cam3"}  # no camera starves
        assert min(per_camera.values()) >= 5
        for topic in cameras:
            values, status = collector.last_status(topic)
            assert int(values["dropped"]) > 1000 / 4  # the surplus is dropped, and said so
            assert status.level in (0, 1)
        assert max(rss) - min(rss) < 40, rss  # flat: no queue grows with the input
        assert node.proc.poll() is None
    finally:
        assert node.stop(signal.SIGINT) == 0


def test_clean_shutdown_on_sigint(image_node):
    assert image_node.stop(signal.SIGINT) == 0
    assert any("stopped" in line for line in image_node.log)
    assert not any("Traceback" in line for line in image_node.log)


# --- ROS 2 graph: ros_discovery_info ---------------------------------------------------------


class GraphWatch:
    """ros_discovery_info as a ROS 2 node would read it, and Cyclone's own endpoint table."""

    def __init__(self, participant, distro="jazzy"):
        self.participant = participant
        self.messages = []
        self.subscriber = RawSubscriber(
            participant, DISCOVERY_TOPIC, PARTICIPANT_ENTITIES_INFO, self.messages.append,
            reliable=True, depth=100, transient_local=True, dds_name=DISCOVERY_TOPIC,
            on_graph=False,
        )  # fmt: skip
        self.endpoints = {
            kind: BuiltinDataReader(participant.domain, topic)
            for kind, topic in (
                ("writer", BuiltinTopicDcpsPublication),
                ("reader", BuiltinTopicDcpsSubscription),
            )
        }
        self.seen = {"writer": {}, "reader": {}}  # guid bytes -> (DDS topic, participant guid)

    def close(self):
        self.subscriber.close()

    def latest(self, participant_gid: bytes):
        """The latest graph message of the participant whose GUID is `participant_gid`."""
        for message in reversed(self.messages):
            if bytes(message.gid.data[:16]) == participant_gid:
                return message
        return None

    def until(self, condition, timeout=15):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"graph messages: {self.messages[-3:]}"
            time.sleep(0.05)

    def endpoint(self, kind, dds_topic):
        """(endpoint GUID, participant GUID) of the `kind` endpoint Cyclone saw on a topic."""
        for sample in self.endpoints[kind].take(N=100):
            if sample.sample_info.valid_data:
                self.seen[kind][sample.key.bytes] = (sample.topic_name, sample.participant_key)
        found = [(g, p.bytes) for g, (t, p) in self.seen[kind].items() if t == dds_topic]
        return found[0] if len(found) == 1 else None


@pytest.fixture
def graph(dds):
    watch = GraphWatch(dds[2])
    yield watch
    watch.close()


def test_node_announces_itself_and_its_endpoint_gids(dds, graph):
    """What `ros2 node list` / `ros2 node info` read: name, namespace, reader and writer GIDs."""
    folder, domain, _ = dds
    node = NodeProcess(folder, domain, "graph", cameras=["graph/image_raw"])  # relative
    try:
        graph.until(lambda: graph.endpoint("writer", "rt/graph/detections") is not None)
        graph.until(lambda: graph.endpoint("reader", "rt/graph/image_raw") is not None)
        writer, node_participant = graph.endpoint("writer", "rt/graph/detections")
        reader, reader_participant = graph.endpoint("reader", "rt/graph/image_raw")
        assert reader_participant == node_participant
        graph.until(lambda: graph.latest(node_participant) is not None)
        message = graph.latest(node_participant)
        assert len(message.gid.data) == 16  # Jazzy's Gid: char[16]
        (entities,) = message.node_entities_info_seq
        assert (entities.node_namespace, entities.node_name) == ("/", "perception_node")
        writers = {bytes(g.data) for g in entities.writer_gid_seq}
        readers = {bytes(g.data) for g in entities.reader_gid_seq}
        assert writer in writers and reader in readers
        diagnostics, _ = graph.endpoint("writer", "rt/diagnostics")
        assert writers == {writer, diagnostics}  # not the ros_discovery_info writer itself
        assert readers == {reader}
        participants = BuiltinDataReader(dds[2].domain, BuiltinTopicDcpsParticipant)
        user_data = {
            s.key.bytes: s.qos[Policy.Userdata].data
            for s in participants.take(N=100)
            if s.sample_info.valid_data and Policy.Userdata in s.qos
        }
        assert user_data[node_participant] == b"enclave=/;"  # rmw_cyclonedds_cpp's
    finally:
        assert node.stop(signal.SIGINT) == 0


@pytest.mark.parametrize("distro", ["humble", "jazzy"])
def test_graph_message_follows_endpoints(dds, distro):
    """Republished when an endpoint comes or goes, in the distro's Gid layout."""
    _, domain, _ = dds
    with Participant(domain, NodeIdentity("probe_node", "/ego"), distro) as node:
        watch = GraphWatch(Participant(domain, distro=distro))
        try:
            watch.until(lambda: watch.latest(node.gid) is not None)
            first = watch.latest(node.gid)
            size = {"humble": 24, "jazzy": 16}[distro]
            assert bytes(first.gid.data) == node.gid.ljust(size, b"\0")
            assert first.node_entities_info_seq[0].node_namespace == "/ego"
            assert not first.node_entities_info_seq[0].writer_gid_seq
            publisher = RawPublisher(node, "/ego/out", DETECTION_ARRAY, True, 1)
            gid = publisher.gid.ljust(size, b"\0")

            def writers():
                latest = watch.latest(node.gid).node_entities_info_seq[0]
                return [bytes(g.data) for g in latest.writer_gid_seq]

            watch.until(lambda: writers() == [gid])
            publisher.close()
            watch.until(lambda: writers() == [])
        finally:
            watch.close()
            watch.participant.close()
