"""Unlabelled frames for building and evaluating: vtest.avi ranges, image folders, bag topics.

The default road video is not redistributed with the package: it is taken from Debian's
`opencv-doc` package on first use and checked against a pinned sha256, so every build
trains, calibrates and evaluates on byte-identical frames.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressed_perception.errors import ConfigError, PerceptionError
from compressed_perception.runtime.manifest import sha256_file
from compressed_perception.sources import frames

VTEST = "vtest"
VTEST_FRAMES = 795
VTEST_SHA256 = "45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf"
VTEST_PACKAGE = "opencv-doc"
VTEST_MEMBER = "usr/share/doc/opencv-doc/examples/data/vtest.avi"
TRAIN_FRAMES = range(400)  # frames that may be learnt from or calibrated on
HELD_OUT_FRAMES = range(400, VTEST_FRAMES)  # evaluation only


class DatasetError(PerceptionError):
    """A frame source is missing, unreadable, too short or cannot be fetched."""


@dataclass(frozen=True)
class FrameSource:
    """Where frames come from: `vtest`, a video file, a folder of images or a rosbag2 folder.

    `start`/`stop`/`step` select frames by index in the source's own order (a video's frame
    number, a folder's sorted files, a bag topic's log order).
    """

    source: str = VTEST
    start: int = 0
    stop: int | None = None
    step: int = 1
    topic: str | None = None  # a bag's image topic; None takes its only image topic

    def __post_init__(self) -> None:
        if self.start < 0 or self.step < 1 or (self.stop is not None and self.stop <= self.start):
            raise ConfigError(
                f"frames of {self.source!r}: start {self.start}, stop {self.stop}, step "
                f"{self.step} select nothing (need 0 <= start < stop and step >= 1)"
            )


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "compressed_perception"


def vtest_video(cache: Path | None = None) -> Path:
    """The verified vtest.avi; fetched from Debian's opencv-doc package when not cached."""
    cache = cache_dir() if cache is None else cache
    video = cache / "vtest.avi"
    if video.is_file() and sha256_file(video) == VTEST_SHA256:
        return video
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        extracted = _fetch_deb_member(Path(tmp))
        actual = sha256_file(extracted)
        if actual != VTEST_SHA256:
            raise DatasetError(
                f"{VTEST_PACKAGE}: {VTEST_MEMBER} has sha256 {actual[:16]}..., expected "
                f"{VTEST_SHA256[:16]}...; the Debian package changed"
            )
        os.replace(extracted, video)
    return video


def _fetch_deb_member(work: Path) -> Path:
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise DatasetError(
                f"vtest: {tool} not found; fetching {VTEST_PACKAGE} needs a Debian-based "
                f"machine, or give a video file as the frame source"
            )
    _run(["apt-get", "download", VTEST_PACKAGE], work)
    package = next(work.glob(f"{VTEST_PACKAGE}_*.deb"))
    _run(["dpkg-deb", "-x", str(package), "root"], work)
    member = work / "root" / VTEST_MEMBER
    if not member.is_file():
        raise DatasetError(f"{VTEST_PACKAGE}: no {VTEST_MEMBER} in the package")
    return member


def _run(argv: list[str], cwd: Path) -> None:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise DatasetError(
            f"vtest: `{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()[-300:]}"
        )


def load_frames(spec: FrameSource, minimum: int = 1, cache: Path | None = None) -> list[np.ndarray]:
    """The selected BGR frames, in order; fewer than `minimum` is an error naming the source."""
    images = list(itertools.islice(_iterate(spec, cache), spec.start, spec.stop, spec.step))
    if len(images) < minimum:
        raise DatasetError(
            f"{_describe(spec)}: {len(images)} frames selected, at least {minimum} needed"
        )
    return images


def moved(frame: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """`frame` (rows, columns, ...) with its content dx pixels right and dy down (negative:
    left and up), the edge repeated into what it leaves: the same scene seen by a camera
    that sits a little to the side, which puts it at another phase of the detector's grid."""
    if dx == dy == 0:
        return frame
    height, width = frame.shape[:2]
    pad = ((max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0))) + ((0, 0),) * (frame.ndim - 2)
    padded = np.pad(frame, pad, mode="edge")
    top, left = max(-dy, 0), max(-dx, 0)
    return np.ascontiguousarray(padded[top : top + height, left : left + width])


def _iterate(spec: FrameSource, cache: Path | None) -> Iterator[np.ndarray]:
    if spec.source == VTEST:
        yield from (frame.image for frame in frames([vtest_video(cache)]))
        return
    path = Path(spec.source)
    if not path.exists():
        raise DatasetError(f"{path}: frame source not found")
    if (path / "metadata.yaml").is_file():
        yield from _bag_images(path, spec.topic)
        return
    yield from (frame.image for frame in frames([path]))


def _bag_images(path: Path, topic: str | None) -> Iterator[np.ndarray]:
    from compressed_perception.replay.bag import image_connections, messages, open_bag
    from compressed_perception.ros.convert import compressed_to_bgr, image_to_bgr
    from compressed_perception.ros.messages import COMPRESSED_IMAGE, typestore

    store = typestore()
    with open_bag(path) as reader:
        connections = image_connections(reader, [topic] if topic else None, path)
        if len(connections) > 1:
            names = ", ".join(c.topic for c in connections)
            raise DatasetError(f"{path}: several image topics ({names}); name one as `topic`")
        for connection, log_time, raw in messages(reader, connections, path):
            message = store.deserialize_cdr(raw, connection.msgtype)
            convert = compressed_to_bgr if connection.msgtype == COMPRESSED_IMAGE else image_to_bgr
            yield convert(message, f"{path}:{connection.topic}@{log_time}")


def _describe(spec: FrameSource) -> str:
    stop = "end" if spec.stop is None else spec.stop
    topic = f" topic {spec.topic}" if spec.topic else ""
    return f"{spec.source}{topic} frames {spec.start}..{stop} step {spec.step}"
