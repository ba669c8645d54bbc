"""The node's parameters: one table of names, defaults and descriptions for every transport.

The rclpy node declares exactly these as ROS parameters; the DDS transport reads them from
the same YAML file (`<node>: ros__parameters: ...`), so a launch file and
`compressed-perception node --config` configure the node identically.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from compressed_perception.errors import ConfigError

NODE_NAME = "perception_node"
QOS_CHOICES = ("sensor_data", "reliable")
BACKEND_CHOICES = ("auto", "tensorrt", "onnxruntime", "torch")


@dataclass(frozen=True)
class NodeConfig:
    """Defaults follow REP-2003 for inputs (best effort, keep last 1)."""

    model: str = ""  # manifest path; empty: the best built artifact, else the FP32 default
    backend: str = "auto"
    cameras: tuple[str, ...] = ("/camera/image_raw",)
    compressed: bool = False  # subscribe to <camera>/compressed (sensor_msgs/CompressedImage)
    qos: str = "sensor_data"
    score_threshold: float = 0.35
    nms_threshold: float = 0.6
    max_detections: int = 100
    classes: tuple[str, ...] = ()  # class names (or ids) to keep; empty keeps all
    class_id_as_label: bool = True  # vision_msgs class_id: "person" rather than "0"
    detections_topic: str = "detections"  # published as <camera namespace>/<this>
    publish_debug_image: bool = False
    diagnostics_period: float = 1.0
    threads: int = 0

    def __post_init__(self) -> None:
        if self.qos not in QOS_CHOICES:
            raise ConfigError(f"qos: {self.qos!r} is not one of {', '.join(QOS_CHOICES)}")
        if self.backend not in BACKEND_CHOICES:
            raise ConfigError(
                f"backend: {self.backend!r} is not one of {', '.join(BACKEND_CHOICES)}"
            )
        if not self.cameras:
            raise ConfigError("cameras: at least one image topic is needed")
        if len(set(self.cameras)) != len(self.cameras):
            raise ConfigError(f"cameras: duplicate topics in {list(self.cameras)}")
        if self.diagnostics_period <= 0:
            raise ConfigError(f"diagnostics_period: must be > 0, got {self.diagnostics_period}")

    def input_topic(self, camera: str) -> str:
        return f"{camera.rstrip('/')}/compressed" if self.compressed else camera


DESCRIPTIONS: dict[str, str] = {
    "model": "Model manifest path; empty picks the best built artifact, else the FP32 default",
    "backend": "Inference backend: auto, tensorrt, onnxruntime or torch",
    "cameras": "Image topics, one per camera",
    "compressed": "Subscribe to <camera>/compressed (sensor_msgs/CompressedImage) instead",
    "qos": "Input QoS: sensor_data (best effort, keep last 1) or reliable",
    "score_threshold": "Minimum detection score, 0..1",
    "nms_threshold": "IoU above which NMS suppresses a box of the same class, 0..1",
    "max_detections": "Most detections per image",
    "classes": "Class names or ids to publish; empty publishes all",
    "class_id_as_label": "vision_msgs class_id holds the label (true) or the class index (false)",
    "detections_topic": "Output topic name, relative to each camera's namespace",
    "publish_debug_image": "Publish annotated images on <camera namespace>/debug_image",
    "diagnostics_period": "Seconds between diagnostics on /diagnostics",
    "threads": "CPU threads for the backend; 0 lets it choose",
}


def parameter_defaults() -> dict[str, Any]:
    """Name -> default, as ROS parameter values (lists, not tuples)."""
    defaults = NodeConfig()
    return {
        f.name: list(getattr(defaults, f.name))
        if isinstance(getattr(defaults, f.name), tuple)
        else getattr(defaults, f.name)
        for f in fields(NodeConfig)
    }


def from_parameters(values: dict[str, Any], source: str) -> NodeConfig:
    """Build and validate a config from parameter values; unknown names are an error."""
    known = {f.name for f in fields(NodeConfig)}
    unknown = sorted(set(values) - known - {"use_sim_time"})
    if unknown:
        raise ConfigError(f"{source}: unknown parameters {unknown} (known: {sorted(known)})")
    converted = {}
    for f in fields(NodeConfig):
        if f.name not in values:
            continue
        value = values[f.name]
        default = getattr(NodeConfig(), f.name)
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{source}: {f.name} must be a list, got {value!r}")
            value = tuple(str(v) for v in value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: {f.name} must be true or false, got {value!r}")
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{source}: {f.name} must be a number, got {value!r}")
            value = type(default)(value)
        else:
            value = str(value)
        converted[f.name] = value
    return NodeConfig(**converted)


def load_config(path: Path, node_name: str = NODE_NAME) -> NodeConfig:
    """Read `<node_name>: ros__parameters:` from a ROS 2 parameter YAML file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: unreadable YAML ({exc})") from exc
    section = (data or {}).get(node_name, (data or {}).get("/**", {}))
    if not isinstance(section, dict) or "ros__parameters" not in section:
        raise ConfigError(f"{path}: no '{node_name}: ros__parameters:' section")
    return from_parameters(section["ros__parameters"] or {}, str(path))
