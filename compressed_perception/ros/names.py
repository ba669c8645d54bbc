"""ROS 2 topic names, resolved the way rcl resolves them, and the node's output names.

Camera topics may be absolute (`/cam/image_raw`) or relative (`cam/image_raw`); relative
ones are resolved against the node's namespace, so a namespaced node (`__ns:=/ego`) reads
`/ego/cam/image_raw`. Each camera's outputs go to its own namespace, written the same way:
`cam/image_raw` -> `cam/detections` (relative, resolved by ROS like the input), and
`/cam/image_raw` -> `/cam/detections`, as image_pipeline nodes publish `image_rect` beside
their `image` input. The DDS transport has no namespace: it resolves against `/`.
"""

from __future__ import annotations

import re

from compressed_perception.errors import ConfigError

NODE_NAME = "perception_node"
ROOT_NAMESPACE = "/"
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_topic(name: str, what: str) -> None:
    """Refuse a name that rcl's topic name validation would refuse, naming it and why."""
    problem = _topic_problem(name)
    if problem:
        raise ConfigError(f"{what}: topic name {name!r} {problem}")


def _topic_problem(name: str) -> str | None:
    body = name
    if body.startswith("~"):
        body = body[1:]
        if not body:
            return None  # "~" alone: the node's private namespace
        if not body.startswith("/"):
            return "has '~' not followed by '/'"
    body = body.removeprefix("/")
    if not body:
        return "is empty"
    if not all(_TOKEN.fullmatch(token) for token in body.split("/")):
        return (
            "needs parts of letters, digits and '_', each starting with a letter or '_', "
            "separated by single '/' and no '/' at the end"
        )
    return None


def resolve_topic(name: str, namespace: str = ROOT_NAMESPACE, node_name: str = NODE_NAME) -> str:
    """The fully qualified name of `name` for node `node_name` in `namespace` (rcl's expansion)."""
    base = namespace.rstrip("/")
    if name == "~" or name.startswith("~/"):
        return f"{base}/{node_name}{name[1:]}"
    if name.startswith("/"):
        return name
    return f"{base}/{name}"


def output_topic(image_topic: str, name: str = "detections") -> str:
    """`/cam/image_raw` (or `.../compressed`) -> `/cam/<name>`; `cam/image_raw` -> `cam/<name>`.

    The result is absolute exactly when the image topic is, so ROS resolves it against the
    node's namespace as it resolves the input.
    """
    parts = [part for part in image_topic.split("/") if part]
    if parts and parts[-1] == "compressed":
        parts = parts[:-1]
    relative = "/".join([*parts[:-1], name])
    return f"/{relative}" if image_topic.startswith("/") else relative
