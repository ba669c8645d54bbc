"""The node's parameters: one table of names, defaults and descriptions for every transport.

The rclpy node declares exactly these as ROS parameters; the DDS transport reads them from
the same YAML file (`<node>: ros__parameters: ...`, node names matched as rcl matches
them), so a launch file and `compressed-perception node --config` configure the node
identically, and both refuse a parameter they do not know.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from compressed_perception.errors import ConfigError, check_choice
from compressed_perception.ros.names import (
    NODE_NAME,
    ROOT_NAMESPACE,
    check_topic,
    output_topic,
    resolve_topic,
)
from compressed_perception.runtime.backends import BACKENDS

QOS_CHOICES = ("sensor_data", "reliable")
# A node runs exported models: the PyTorch backend is for the offline build's tools, and
# the ROS side never imports torch
NODE_EXCLUDED_BACKENDS = ("torch",)
BACKEND_CHOICES = tuple(b for b in BACKENDS if b not in NODE_EXCLUDED_BACKENDS)
PARAMS_KEY = "ros__parameters"
# Parameters ROS itself declares on nodes (rclpy's TimeSource; Jazzy's type description
# service; rclpy's per-endpoint QoS overrides): a shared `/**` params file may set them.
ROS_PARAMETERS = ("use_sim_time", "start_type_description_service")
ROS_PARAMETER_PREFIXES = ("qos_overrides.",)


@dataclass(frozen=True)
class NodeConfig:
    """Defaults follow REP-2003 for inputs (best effort, keep last 1)."""

    model: str = ""  # manifest, folder or shipped name; empty: the shipped compressed model
    backend: str = "auto"
    cameras: tuple[str, ...] = ("camera/image_raw",)  # relative: in the node's namespace
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
        check_choice("qos", self.qos, QOS_CHOICES)
        check_choice("backend", self.backend, BACKEND_CHOICES)
        if not self.cameras:
            raise ConfigError("cameras: at least one image topic is needed")
        for camera in self.cameras:
            check_topic(camera, "cameras")
        if self.detections_topic.startswith(("/", "~")):
            raise ConfigError(
                f"detections_topic: {self.detections_topic!r} must be relative (it is placed "
                "in each camera's namespace)"
            )
        check_topic(self.detections_topic, "detections_topic")
        if not (math.isfinite(self.diagnostics_period) and self.diagnostics_period > 0):
            raise ConfigError(f"diagnostics_period: must be > 0, got {self.diagnostics_period}")
        if self.threads < 0:
            raise ConfigError(f"threads: must be >= 0 (0: the backend's own), got {self.threads}")
        self.check_topics()

    def input_topic(self, camera: str) -> str:
        return f"{camera}/compressed" if self.compressed else camera

    def output_topics(self, name: str | None = None) -> list[str]:
        """Per camera `<camera namespace>/<name>` (default: detections_topic), see names.py."""
        return [output_topic(camera, name or self.detections_topic) for camera in self.cameras]

    def check_topics(self, resolve: Callable[[str], str] = str) -> None:
        """Refuse two cameras that share an input or a detections topic once `resolve`d.

        As written, names that are equal always clash; a node checks again with its own
        namespace and remappings (`resolve`), where `cam/a` and `/cam/b` may meet too.
        """
        inputs = [resolve(self.input_topic(camera)) for camera in self.cameras]
        _refuse_shared("input", inputs, self.cameras)
        _refuse_shared("detections", [resolve(t) for t in self.output_topics()], self.cameras)


def _refuse_shared(kind: str, topics: Sequence[str], cameras: Sequence[str]) -> None:
    owner: dict[str, str] = {}
    for topic, camera in zip(topics, cameras, strict=True):
        if topic in owner:
            raise ConfigError(
                f"cameras: {owner[topic]!r} and {camera!r} share the {kind} topic {topic}; "
                "put each camera in its own namespace"
            )
        owner[topic] = camera


DESCRIPTIONS: dict[str, str] = {
    "model": "Model manifest, folder or shipped name; empty: the shipped compressed model",
    "backend": f"Inference backend: {', '.join(BACKEND_CHOICES)}",
    "cameras": "Image topics, one per camera; relative names are in the node's namespace",
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


def unknown_parameters(names: Iterable[str]) -> list[str]:
    """Names that are neither this node's parameters nor ones ROS declares itself."""
    known = {f.name for f in fields(NodeConfig)}
    return sorted(
        name
        for name in names
        if name not in known
        and name not in ROS_PARAMETERS
        and not name.startswith(ROS_PARAMETER_PREFIXES)
    )


def refuse_unknown(names: Iterable[str], source: str) -> None:
    """Fail on a misspelled or foreign parameter rather than run with its default."""
    unknown = unknown_parameters(names)
    if unknown:
        known = sorted(f.name for f in fields(NodeConfig))
        raise ConfigError(f"{source}: unknown parameters {unknown} (known: {known})")


def from_parameters(values: dict[str, Any], source: str) -> NodeConfig:
    """Build and validate a config from parameter values; unknown names are an error."""
    refuse_unknown(values, source)
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
            if not math.isfinite(value):
                raise ConfigError(f"{source}: {f.name} must be a finite number, got {value!r}")
            if isinstance(default, int) and value != int(value):
                raise ConfigError(f"{source}: {f.name} must be a whole number, got {value!r}")
            value = type(default)(value)
        else:
            value = str(value)
        converted[f.name] = value
    return NodeConfig(**converted)


def load_config(
    path: Path, node_name: str = NODE_NAME, namespace: str = ROOT_NAMESPACE
) -> NodeConfig:
    """This node's parameters from a ROS 2 parameter YAML file, as rcl and rclpy read it.

    Every section whose node name matches the node's fully qualified name applies, later
    ones overriding earlier ones parameter by parameter (`/**`, `/**/perception_node`,
    `perception_node`, `/ego/perception_node`, nested `ego: perception_node:` ...).
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: unreadable YAML ({exc})") from exc
    fqn = resolve_topic(node_name, namespace)
    sections = list(node_sections(data, str(path)))
    matching = [parameters for key, parameters in sections if node_name_matches(key, fqn)]
    if not matching:
        found = ", ".join(repr(key) for key, _ in sections) or "none"
        raise ConfigError(
            f"{path}: no '<node name>: {PARAMS_KEY}:' section applies to {fqn} "
            f"(sections: {found}; e.g. '/**/{node_name}')"
        )
    values: dict[str, Any] = {}
    for parameters in matching:
        values.update(parameters)
    return from_parameters(values, str(path))


def node_sections(data: Any, source: str, prefix: str = "") -> Iterator[tuple[str, dict]]:
    """(node name, parameters) in file order; nested keys join with '/' as in rcl's parser."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected node names mapping to '{PARAMS_KEY}:' sections")
    for key, value in data.items():
        if key == PARAMS_KEY:
            if not prefix:
                raise ConfigError(f"{source}: '{PARAMS_KEY}' without a node name above it")
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{source}: {prefix}: '{PARAMS_KEY}' must be a mapping")
            yield prefix, dict(_flatten(value or {}))
        else:
            separator = "" if not prefix or prefix.endswith("/") else "/"
            yield from node_sections(value, source, f"{prefix}{separator}{key}")


def _flatten(parameters: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Nested mappings are parameter namespaces: `a: {b: 1}` is the parameter `a.b`."""
    for name, value in parameters.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def node_name_matches(key: str, fqn: str) -> bool:
    """Whether a params-file node name applies to the node `fqn` (e.g. `/ego/perception_node`).

    rclpy (Humble and Jazzy, `_populate_node_parameters_from_rcl_params`) puts a '/' in
    front of a relative key, turns each `/*` into the regular expression `(/\\w+)` (so
    `/**` becomes `(/\\w+)*`, any number of namespace levels) and needs a full match.
    """
    absolute = key if key.startswith("/") else f"/{key}"
    pattern = absolute.replace("/*", r"(/\w+)")
    return re.fullmatch(pattern, fqn, flags=re.ASCII) is not None
