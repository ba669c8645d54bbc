"""Turn a video into a rosbag2 camera bag, so replay can be tried on real footage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from compressed_perception.errors import ConfigError, ImageError
from compressed_perception.replay.bag import new_bag
from compressed_perception.ros.convert import bgr_to_image_fields
from compressed_perception.ros.messages import COMPRESSED_IMAGE, IMAGE, make_header, typestore
from compressed_perception.sources import read_video

START_NS = 1_700_000_000 * 10**9  # a fixed epoch, so that sample bags are reproducible


@dataclass(frozen=True)
class SampleOptions:
    compressed: bool = True
    topic: str = "/camera/image_raw"
    frame_id: str = "camera"
    first: int = 0
    count: int | None = None  # None: to the end of the video
    fps: float = 10.0
    scale: float = 1.0
    jpeg_quality: int = 90
    storage: str = "mcap"
    overwrite: bool = False


def make_sample_bag(video: Path, out: Path, options: SampleOptions) -> int:
    """Write frames [first, first + count) as Image or CompressedImage; returns the count."""
    if options.count is not None and options.count < 1:
        raise ConfigError(f"count {options.count}: need at least 1 frame")
    if options.first < 0:
        raise ConfigError(f"first {options.first}: frame indices start at 0")
    if options.fps <= 0 or not 0 < options.scale <= 1 or not 1 <= options.jpeg_quality <= 100:
        raise ConfigError(
            f"fps {options.fps}, scale {options.scale}, jpeg quality {options.jpeg_quality}: "
            "need fps > 0, 0 < scale <= 1, quality in 1..100"
        )
    store = typestore()
    msgtype = COMPRESSED_IMAGE if options.compressed else IMAGE
    topic = f"{options.topic}/compressed" if options.compressed else options.topic
    written = 0
    with new_bag(out, options.storage, options.overwrite) as writer:
        writer.add_topic(topic, msgtype)
        for index, image in enumerate(read_video(Path(video))):
            if index < options.first:
                continue
            if options.count is not None and written >= options.count:
                break
            stamp_ns = START_NS + round(written * 1e9 / options.fps)
            stamped = make_header(stamp_ns, options.frame_id)
            frame = _scaled(image, options.scale)
            fields = (
                _compressed(frame, options.jpeg_quality)
                if options.compressed
                else bgr_to_image_fields(frame)
            )
            writer.write(topic, stamp_ns, store.types[msgtype](header=stamped, **fields))
            written += 1
        if written == 0:
            raise ConfigError(f"{video}: no frame at or after index {options.first}")
    return written


def _scaled(image: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1:
        return image
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    if min(size) < 1:
        raise ConfigError(
            f"scale {scale}: {image.shape[1]}x{image.shape[0]} frames would have no pixels"
        )
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _compressed(image: np.ndarray, quality: int) -> dict[str, object]:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ImageError("sample frame: JPEG encoding failed")
    return {"format": "jpeg", "data": data.reshape(-1)}
