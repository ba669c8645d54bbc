"""The perception node over Cyclone DDS: the same core as the rclpy node, no ROS needed.

There is no namespace and no remapping here: relative topic names resolve against `/`, as
the rclpy node's would in the root namespace.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

from compressed_perception.ros.config import NodeConfig
from compressed_perception.ros.convert import VisionTypes, bgr_to_image_fields, detection_array
from compressed_perception.ros.core import PerceptionCore, detector_from_config, diagnostic_array
from compressed_perception.ros.dds import NodeIdentity, Participant, RawPublisher, RawSubscriber
from compressed_perception.ros.messages import (
    COMPRESSED_IMAGE,
    DEFAULT_DISTRO,
    DETECTION_ARRAY,
    DIAGNOSTIC_ARRAY,
    IMAGE,
    make_header,
)
from compressed_perception.ros.names import NODE_NAME, ROOT_NAMESPACE, resolve_topic
from compressed_perception.runtime.annotate import annotate
from compressed_perception.runtime.detector import FrameResult

OUTPUT_DEPTH = 10


def _log(level: str, text: str) -> None:
    print(f"[{level}] [perception_node]: {text}", file=sys.stderr, flush=True)


class DdsPerceptionNode:
    def __init__(self, config: NodeConfig, domain_id: int, distro: str = DEFAULT_DISTRO) -> None:
        """`distro` (humble or jazzy): the ROS 2 peers' layout of the graph message."""
        config.check_topics(resolve_topic)
        self.config = config
        self.detector = detector_from_config(config)
        node = NodeIdentity(NODE_NAME, ROOT_NAMESPACE)
        self._participant = Participant(domain_id, node, distro)
        self._store = self._participant.store
        self._vision = VisionTypes.from_lookup(self._store.types.__getitem__)
        self._outputs = [self._publisher(topic) for topic in config.output_topics()]
        self._debug = (
            [self._publisher(topic, IMAGE) for topic in config.output_topics("debug_image")]
            if config.publish_debug_image
            else []
        )
        self._diagnostics = RawPublisher(
            self._participant, "/diagnostics", DIAGNOSTIC_ARRAY, reliable=True, depth=OUTPUT_DEPTH
        )
        inputs = [resolve_topic(config.input_topic(camera)) for camera in config.cameras]
        self.core = PerceptionCore(
            self.detector,
            inputs,
            config.compressed,
            self._publish,
            lambda text: _log("WARN", text),
        )
        msgtype = COMPRESSED_IMAGE if config.compressed else IMAGE
        self._inputs = [
            RawSubscriber(
                self._participant,
                topic,
                msgtype,
                lambda message, index=index: self.core.on_message(index, message),
                reliable=config.qos == "reliable",
                depth=1,
            )
            for index, topic in enumerate(inputs)
        ]

    def _publisher(self, topic: str, msgtype: str = DETECTION_ARRAY) -> RawPublisher:
        return RawPublisher(
            self._participant, resolve_topic(topic), msgtype, reliable=True, depth=OUTPUT_DEPTH
        )

    def _publish(self, camera: int, header: Any, result: FrameResult, image: Any) -> None:
        message = detection_array(
            self._vision,
            header,
            result.detections,
            self.detector.labels,
            self.config.class_id_as_label,
        )
        self._outputs[camera].publish(message)
        if self._debug and self._debug[camera].subscriber_count():
            drawn = annotate(image, result.detections, self.detector.labels)
            fields = bgr_to_image_fields(drawn)
            self._debug[camera].publish(self._store.types[IMAGE](header=header, **fields))

    def publish_diagnostics(self) -> None:
        stamped = make_header(time.time_ns(), "")
        statuses = self.core.diagnostics(
            self.detector.backend.name, str(self.detector.manifest.path)
        )
        self._diagnostics.publish(
            diagnostic_array(self._store.types.__getitem__, stamped, statuses)
        )

    def spin(self, stop: threading.Event) -> None:
        """Run until `stop` is set; diagnostics go out every `diagnostics_period` seconds."""
        self.core.start()
        inputs = ", ".join(stats.topic for stats in self.core.stats)
        _log("INFO", f"{self.detector.manifest.name} on {self.detector.backend.name}: {inputs}")
        try:
            while not stop.wait(self.config.diagnostics_period):
                self.publish_diagnostics()
        finally:
            self.close()
            _log("INFO", "stopped")

    def close(self) -> None:
        """Inputs first (no new frames), then the worker, then every DDS entity."""
        for subscriber in self._inputs:
            subscriber.close()
        self.core.stop()
        self._participant.close()


def run(config: NodeConfig, domain_id: int, distro: str = DEFAULT_DISTRO) -> int:
    """Blocking entry point of `compressed-perception node --transport dds`."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    DdsPerceptionNode(config, domain_id, distro).spin(stop)
    return 0
