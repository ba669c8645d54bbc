"""The ROS 2 message types this package speaks, defined once from their .msg text.

The definitions feed a `rosbags` typestore, which gives CDR (de)serialization, the
message definitions stored in bags and the RIHS01 type hashes; the rosbag replay and
the DDS transport both use it, so they cannot drift apart. Field names, types and
order follow ROS 2 Humble/Jazzy (vision_msgs 4.x) exactly: the hashes depend on them.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

from compressed_perception.errors import ConfigError

DEFINITIONS: dict[str, str] = {
    "builtin_interfaces/msg/Time": "int32 sec\nuint32 nanosec\n",
    "std_msgs/msg/Header": "builtin_interfaces/Time stamp\nstring frame_id\n",
    "sensor_msgs/msg/Image": (
        "std_msgs/Header header\nuint32 height\nuint32 width\nstring encoding\n"
        "uint8 is_bigendian\nuint32 step\nuint8[] data\n"
    ),
    "sensor_msgs/msg/CompressedImage": "std_msgs/Header header\nstring format\nuint8[] data\n",
    "geometry_msgs/msg/Point": "float64 x\nfloat64 y\nfloat64 z\n",
    "geometry_msgs/msg/Quaternion": "float64 x 0\nfloat64 y 0\nfloat64 z 0\nfloat64 w 1\n",
    "geometry_msgs/msg/Pose": "Point position\nQuaternion orientation\n",
    "geometry_msgs/msg/PoseWithCovariance": "Pose pose\nfloat64[36] covariance\n",
    "vision_msgs/msg/Point2D": "float64 x\nfloat64 y\n",
    "vision_msgs/msg/Pose2D": "vision_msgs/Point2D position\nfloat64 theta\n",
    "vision_msgs/msg/BoundingBox2D": "vision_msgs/Pose2D center\nfloat64 size_x\nfloat64 size_y\n",
    "vision_msgs/msg/ObjectHypothesis": "string class_id\nfloat64 score\n",
    "vision_msgs/msg/ObjectHypothesisWithPose": (
        "ObjectHypothesis hypothesis\ngeometry_msgs/PoseWithCovariance pose\n"
    ),
    "vision_msgs/msg/Detection2D": (
        "std_msgs/Header header\nObjectHypothesisWithPose[] results\nBoundingBox2D bbox\n"
        "string id\n"
    ),
    "vision_msgs/msg/Detection2DArray": "std_msgs/Header header\nDetection2D[] detections\n",
    "diagnostic_msgs/msg/KeyValue": "string key\nstring value\n",
    "diagnostic_msgs/msg/DiagnosticStatus": (
        "byte OK=0\nbyte WARN=1\nbyte ERROR=2\nbyte STALE=3\nbyte level\nstring name\n"
        "string message\nstring hardware_id\nKeyValue[] values\n"
    ),
    "diagnostic_msgs/msg/DiagnosticArray": "std_msgs/Header header\nDiagnosticStatus[] status\n",
}

# ROS 2's graph discovery (`ros_discovery_info`), as rmw_dds_common defines it. Its Gid
# holds an rmw_gid_t, whose size changed after Humble: `char[24] data` in Humble,
# `char[16] data` in Jazzy, so DDS peers of the two distros cannot exchange it.
ROS_DISTROS = ("humble", "jazzy")
DEFAULT_DISTRO = "jazzy"
GID = "rmw_dds_common/msg/Gid"
NODE_ENTITIES_INFO = "rmw_dds_common/msg/NodeEntitiesInfo"
PARTICIPANT_ENTITIES_INFO = "rmw_dds_common/msg/ParticipantEntitiesInfo"
GID_SIZE = {"humble": 24, "jazzy": 16}
DISCOVERY_DEFINITIONS: dict[str, str] = {
    NODE_ENTITIES_INFO: (
        "string<=256 node_namespace\nstring<=256 node_name\nGid[] reader_gid_seq\n"
        "Gid[] writer_gid_seq\n"
    ),
    PARTICIPANT_ENTITIES_INFO: "Gid gid\nNodeEntitiesInfo[] node_entities_info_seq\n",
}

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
DETECTION_ARRAY = "vision_msgs/msg/Detection2DArray"
DIAGNOSTIC_ARRAY = "diagnostic_msgs/msg/DiagnosticArray"
IMAGE_TYPES = (IMAGE, COMPRESSED_IMAGE)


def make_header(stamp_ns: int, frame_id: str) -> Any:
    """std_msgs/Header (typestore class) for a time in nanoseconds."""
    types = typestore().types
    stamp = types["builtin_interfaces/msg/Time"](sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
    return types["std_msgs/msg/Header"](stamp=stamp, frame_id=frame_id)


def definitions(distro: str = DEFAULT_DISTRO) -> dict[str, str]:
    """Every definition above, with the Gid layout of `distro` (humble or jazzy)."""
    if distro not in ROS_DISTROS:
        raise ConfigError(f"ROS distro {distro!r}: choose one of {', '.join(ROS_DISTROS)}")
    gid = {GID: f"char[{GID_SIZE[distro]}] data\n"}
    return {**DEFINITIONS, **gid, **DISCOVERY_DEFINITIONS}


def typestore(distro: str = DEFAULT_DISTRO) -> Typestore:
    """A typestore holding exactly the definitions above (nothing from elsewhere)."""
    return _typestore(distro)


@cache
def _typestore(distro: str) -> Typestore:
    """One store per distro, however it is asked for (`typestore()` or by name)."""
    store = get_typestore(Stores.EMPTY)
    types = {}
    for name, text in definitions(distro).items():
        types.update(get_types_from_msg(text, name))
    store.register(types)
    return store
