"""Frames from image files, videos and folders of them, with clear errors for bad input."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from compressed_perception.errors import ImageError, PerceptionError, VideoError
from compressed_perception.runtime.preprocess import validate_image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm"})
VIDEO_SUFFIXES = frozenset({".avi", ".mp4", ".mkv", ".mov", ".webm", ".mpg", ".mpeg", ".m4v"})


@dataclass(frozen=True)
class Frame:
    source: str
    index: int  # frame number within a video, 0 for a still image
    image: np.ndarray


def expand(paths: list[Path]) -> list[Path]:
    """Folders become their sorted image and video files; anything else must be one."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES
            )
            if not found:
                raise PerceptionError(f"{path}: folder holds no image or video files")
            files.extend(found)
        elif not path.exists():
            raise PerceptionError(f"{path}: no such file or folder")
        elif path.suffix.lower() not in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
            raise PerceptionError(f"{path}: not an image or video file (by its extension)")
        else:
            files.append(path)
    return files


def read_image(path: Path) -> np.ndarray:
    """Read as stored (no silent conversion), so 16-bit, gray or alpha images are refused."""
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ImageError(f"{path}: not a readable image ({data.size} bytes)")
    return validate_image(image, str(path))


def read_video(path: Path) -> Iterator[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise VideoError(f"{path}: cannot open video")
    try:
        count = 0
        while True:
            ok, image = capture.read()
            if not ok:
                break
            count += 1
            yield validate_image(image, f"{path} frame {count - 1}")
        if count == 0:
            raise VideoError(f"{path}: video opened but no frame could be decoded")
    finally:
        capture.release()


def frames(paths: list[Path]) -> Iterator[Frame]:
    for path in expand(paths):
        if path.suffix.lower() in VIDEO_SUFFIXES:
            for index, image in enumerate(read_video(path)):
                yield Frame(str(path), index, image)
        else:
            yield Frame(str(path), 0, read_image(path))
