"""The rclpy perception node: ROS parameters, subscriptions and publishers around the core.

Decoding, inference, message building and diagnostics live in the transport-neutral
modules (`core`, `convert`, `config`); this file only wires them to rclpy, so the node
behaves like the Cyclone DDS transport in `dds_node.py`. Imported only where ROS 2 exists.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header
from vision_msgs.msg import Detection2DArray

from compressed_perception.errors import PerceptionError
from compressed_perception.ros.config import (
    BACKEND_CHOICES,
    DESCRIPTIONS,
    NODE_NAME,
    QOS_CHOICES,
    from_parameters,
    parameter_defaults,
    refuse_unknown,
)
from compressed_perception.ros.convert import VisionTypes, bgr_to_image_fields, detection_array
from compressed_perception.ros.core import PerceptionCore, detector_from_config, diagnostic_array
from compressed_perception.runtime.annotate import annotate
from compressed_perception.runtime.detector import FrameResult

OUTPUT_DEPTH = 10
UNIT_INTERVAL = ("score_threshold", "nms_threshold")
INTEGER_RANGES = {"max_detections": (1, 1000), "threads": (0, 256)}  # inclusive bounds
CHOICES = {"qos": QOS_CHOICES, "backend": BACKEND_CHOICES}


def _descriptor(name: str) -> ParameterDescriptor:
    descriptor = ParameterDescriptor(description=DESCRIPTIONS[name], read_only=True)
    if name in UNIT_INTERVAL:
        descriptor.floating_point_range = [
            FloatingPointRange(from_value=0.0, to_value=1.0, step=0.0)
        ]
    if name in INTEGER_RANGES:
        low, high = INTEGER_RANGES[name]
        descriptor.integer_range = [IntegerRange(from_value=low, to_value=high, step=1)]
    if name in CHOICES:
        descriptor.additional_constraints = f"one of: {', '.join(CHOICES[name])}"
    return descriptor


def _message_class(name: str) -> type:
    """`vision_msgs/msg/Detection2D` -> the rclpy class `vision_msgs.msg.Detection2D`."""
    package, _, type_name = name.split("/")
    return getattr(importlib.import_module(f"{package}.msg"), type_name)


def _qos(reliability: ReliabilityPolicy, depth: int) -> QoSProfile:
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=reliability,
        durability=DurabilityPolicy.VOLATILE,
    )


class PerceptionNode(Node):
    def __init__(self, **kwargs: Any) -> None:
        """`kwargs` go to `rclpy.node.Node`, e.g. `parameter_overrides` in tests."""
        super().__init__(NODE_NAME, **kwargs)
        source = f"{self.get_fully_qualified_name()} parameters"
        try:
            values = self._declare_parameters()
            # rclpy keeps overrides nobody declares without a word; it has no public way to
            # list them (Humble, Jazzy): `_parameter_overrides` is what declare_parameter reads.
            refuse_unknown(self._parameter_overrides, source)
            self.config = from_parameters(values, source)
            self.config.check_topics(self.resolve_topic_name)  # with namespace and remaps
            self.detector = detector_from_config(self.config)
        except (PerceptionError, ParameterException) as exc:
            self.get_logger().fatal(f"cannot start: {exc}")
            raise
        config = self.config
        self._vision = VisionTypes.from_lookup(_message_class)
        output_qos = _qos(ReliabilityPolicy.RELIABLE, OUTPUT_DEPTH)
        self._outputs = [
            self.create_publisher(Detection2DArray, topic, output_qos)
            for topic in config.output_topics()
        ]
        self._debug = [
            self.create_publisher(Image, topic, output_qos)
            for topic in config.output_topics("debug_image")
            if config.publish_debug_image
        ]
        self._diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", output_qos)
        self.core = PerceptionCore(
            self.detector,
            [self.resolve_topic_name(config.input_topic(camera)) for camera in config.cameras],
            config.compressed,
            self._publish,
            self.get_logger().warning,
        )
        reliable = config.qos == "reliable"
        input_qos = _qos(
            ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT, 1
        )
        group = ReentrantCallbackGroup()  # on_message only stores the frame, under a lock
        self._inputs = [
            self.create_subscription(
                CompressedImage if config.compressed else Image,
                config.input_topic(camera),
                lambda msg, i=i: self.core.on_message(i, msg),
                input_qos,
                callback_group=group,
            )
            for i, camera in enumerate(config.cameras)
        ]
        # Steady time: diagnostics keep coming (and report "no input") when a bag's clock stops.
        self._timer = self.create_timer(
            config.diagnostics_period,
            self._publish_diagnostics,
            clock=Clock(clock_type=ClockType.STEADY_TIME),
        )
        self.core.start()
        inputs = ", ".join(subscription.topic_name for subscription in self._inputs)
        self.get_logger().info(
            f"{self.detector.manifest.name} on {self.detector.backend.name}: {inputs}"
        )

    def _declare_parameters(self) -> dict[str, Any]:
        """Declare every parameter read-only; return the values set (params file, overrides)."""
        values: dict[str, Any] = {}
        for name, default in parameter_defaults().items():
            # rclpy types an empty list default as BYTE_ARRAY: declare those by type instead.
            initial = Parameter.Type.STRING_ARRAY if default == [] else default
            parameter = self.declare_parameter(name, initial, _descriptor(name))
            if parameter.type_ != Parameter.Type.NOT_SET:
                values[name] = parameter.value
            elif isinstance(default, list):
                # Unset: no override of a by-type declaration, or an untyped YAML `[]`.
                values[name] = []
        return values

    def _publish(self, camera: int, header: Any, result: FrameResult, image: np.ndarray) -> None:
        """Runs on the core's worker thread, once per processed frame."""
        if not self.context.ok():  # shutting down: publishers are about to go
            return
        header = Header(stamp=header.stamp, frame_id=header.frame_id)
        labels = self.detector.labels
        self._outputs[camera].publish(
            detection_array(
                self._vision, header, result.detections, labels, self.config.class_id_as_label
            )
        )
        if self._debug and self._debug[camera].get_subscription_count() > 0:
            fields = bgr_to_image_fields(annotate(image, result.detections, labels))
            # uint8[] is an array.array('B'): built from bytes in one copy, not per element
            fields["data"] = fields["data"].tobytes()
            self._debug[camera].publish(Image(header=header, **fields))

    def _publish_diagnostics(self) -> None:
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id="")
        statuses = self.core.diagnostics(
            self.detector.backend.name, str(self.detector.manifest.path)
        )
        self._diagnostics.publish(diagnostic_array(_message_class, header, statuses))


def main(args: list[str] | None = None) -> None:
    """The `perception_node` console script (`ros2 run compressed_perception perception_node`)."""
    rclpy.init(args=args)
    node = None
    try:
        node = PerceptionNode()
        executor = MultiThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass  # Ctrl-C or SIGTERM: rclpy's signal handlers have shut the context down
    finally:
        if node is not None:
            node.core.stop()
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
