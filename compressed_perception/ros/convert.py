"""Image messages to BGR arrays and detections to vision_msgs, for any message classes.

Works on anything with the ROS field names: rclpy messages on a vehicle, `rosbags`
dataclasses in replay and over the DDS transport. No cv_bridge (it breaks with NumPy 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from compressed_perception.errors import ImageError
from compressed_perception.runtime.postprocess import Detections

# encoding -> (bytes per pixel, function from an (h, w, bpp) uint8 view to BGR)
_DIRECT = {
    "bgr8": (3, lambda v: v),
    "rgb8": (3, lambda v: v[..., ::-1]),
    "bgra8": (4, lambda v: v[..., :3]),
    "rgba8": (4, lambda v: v[..., 2::-1]),
    "mono8": (1, lambda v: cv2.cvtColor(v[..., 0], cv2.COLOR_GRAY2BGR)),
    "8uc1": (1, lambda v: cv2.cvtColor(v[..., 0], cv2.COLOR_GRAY2BGR)),
    "8uc3": (3, lambda v: v),
    "yuv422": (2, lambda v: cv2.cvtColor(np.ascontiguousarray(v), cv2.COLOR_YUV2BGR_UYVY)),
    "uyvy": (2, lambda v: cv2.cvtColor(np.ascontiguousarray(v), cv2.COLOR_YUV2BGR_UYVY)),
    "yuv422_yuy2": (2, lambda v: cv2.cvtColor(np.ascontiguousarray(v), cv2.COLOR_YUV2BGR_YUY2)),
    "yuyv": (2, lambda v: cv2.cvtColor(np.ascontiguousarray(v), cv2.COLOR_YUV2BGR_YUY2)),
}
ENCODINGS = tuple(_DIRECT)


def image_to_bgr(msg: Any, name: str = "image") -> np.ndarray:
    """A sensor_msgs/Image as an (h, w, 3) uint8 BGR array, a view of `msg.data` if possible.

    8-bit encodings carry no byte order, so `is_bigendian` changes nothing for them; wider
    encodings are refused rather than silently misread.
    """
    encoding = str(msg.encoding).lower()
    if encoding not in _DIRECT:
        raise ImageError(
            f"{name}: unsupported encoding {msg.encoding!r} (supported: {', '.join(ENCODINGS)})"
        )
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    bpp, convert = _DIRECT[encoding]
    if height == 0 or width == 0:
        raise ImageError(f"{name}: empty image ({width}x{height})")
    if bpp == 2 and width % 2:  # 4:2:2 packs two pixels in four bytes
        raise ImageError(f"{name}: odd width {width} in {encoding}, which packs pixel pairs")
    if step < width * bpp:
        raise ImageError(
            f"{name}: step {step} is less than width {width} x {bpp} bytes ({encoding})"
        )
    data = (
        np.frombuffer(msg.data, dtype=np.uint8)
        if not isinstance(msg.data, np.ndarray)
        else msg.data
    )
    if data.size < step * height:
        raise ImageError(
            f"{name}: truncated data: {data.size} bytes, {height} rows of step {step} need "
            f"{step * height}"
        )
    rows = data[: step * height].reshape(height, step)
    view = rows[:, : width * bpp].reshape(height, width, bpp)
    return convert(view)


def compressed_to_bgr(msg: Any, name: str = "image") -> np.ndarray:
    """A sensor_msgs/CompressedImage decoded to BGR, whatever its format says.

    The format is only a hint (empty means jpeg; image_transport writes "jpeg", "png",
    "rgb8; jpeg compressed bgr8", Humble also lists tiff): OpenCV reads the data's own
    signature, so a frame is refused only when it does not decode. compressedDepth is
    refused outright: depth, behind a header of its own, not a camera picture.
    """
    if "compresseddepth" in str(msg.format).lower():
        raise ImageError(f"{name}: {msg.format!r} is a depth image, not a camera image")
    data = (
        np.frombuffer(msg.data, dtype=np.uint8)
        if not isinstance(msg.data, np.ndarray)
        else msg.data
    )
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        fmt = msg.format or "jpeg"
        raise ImageError(f"{name}: corrupt, empty or undecodable {fmt!r} data ({data.size} bytes)")
    return image


def bgr_to_image_fields(image: np.ndarray, encoding: str = "bgr8") -> dict[str, Any]:
    """sensor_msgs/Image fields (less the header) for a BGR array, e.g. a debug image."""
    if encoding != "bgr8":
        raise ImageError(f"debug image: only bgr8 output is produced, not {encoding!r}")
    height, width = image.shape[:2]
    return {
        "height": height,
        "width": width,
        "encoding": "bgr8",
        "is_bigendian": 0,
        "step": width * 3,
        "data": np.ascontiguousarray(image).reshape(-1),
    }


# VisionTypes field -> the message type it holds (the rclpy node imports their packages)
VISION_TYPE_NAMES = {
    "detection_array": "vision_msgs/msg/Detection2DArray",
    "detection": "vision_msgs/msg/Detection2D",
    "hypothesis_with_pose": "vision_msgs/msg/ObjectHypothesisWithPose",
    "hypothesis": "vision_msgs/msg/ObjectHypothesis",
    "bbox": "vision_msgs/msg/BoundingBox2D",
    "pose2d": "vision_msgs/msg/Pose2D",
    "point2d": "vision_msgs/msg/Point2D",
    "pose_with_covariance": "geometry_msgs/msg/PoseWithCovariance",
    "pose": "geometry_msgs/msg/Pose",
    "point": "geometry_msgs/msg/Point",
    "quaternion": "geometry_msgs/msg/Quaternion",
}


@dataclass(frozen=True)
class VisionTypes:
    """The message classes to build vision_msgs with (rclpy's or a typestore's)."""

    detection_array: type
    detection: type
    hypothesis_with_pose: type
    hypothesis: type
    bbox: type
    pose2d: type
    point2d: type
    pose_with_covariance: type
    pose: type
    point: type
    quaternion: type

    @classmethod
    def from_lookup(cls, lookup: Any) -> VisionTypes:
        """`lookup("vision_msgs/msg/Detection2D")` must return the class of that type."""
        return cls(**{field: lookup(name) for field, name in VISION_TYPE_NAMES.items()})


def detection_array(
    types: VisionTypes,
    header: Any,
    detections: Detections,
    labels: Sequence[str],
    class_id_as_label: bool = True,
) -> Any:
    """vision_msgs/Detection2DArray with the image's header; boxes as centre + size (4.x)."""
    items = []
    for box, score, class_id in zip(
        detections.boxes, detections.scores, detections.class_ids, strict=True
    ):
        x1, y1, x2, y2 = (float(v) for v in box)
        label = labels[int(class_id)] if class_id_as_label else str(int(class_id))
        hypothesis = types.hypothesis_with_pose(
            hypothesis=types.hypothesis(class_id=label, score=float(score)),
            pose=types.pose_with_covariance(
                pose=types.pose(
                    position=types.point(x=0.0, y=0.0, z=0.0),
                    orientation=types.quaternion(x=0.0, y=0.0, z=0.0, w=1.0),
                ),
                covariance=np.zeros(36, np.float64),
            ),
        )
        bbox = types.bbox(
            center=types.pose2d(
                position=types.point2d(x=(x1 + x2) / 2, y=(y1 + y2) / 2), theta=0.0
            ),
            size_x=x2 - x1,
            size_y=y2 - y1,
        )
        items.append(types.detection(header=header, results=[hypothesis], bbox=bbox, id=""))
    return types.detection_array(header=header, detections=items)
