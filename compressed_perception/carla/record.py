"""Recording a simulation as a rosbag2 bag that `compressed-perception replay` can score again."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from compressed_perception.errors import ImageError
from compressed_perception.replay.bag import BagWriter, new_bag
from compressed_perception.ros.convert import VisionTypes, detection_array
from compressed_perception.ros.messages import (
    COMPRESSED_IMAGE,
    DETECTION_ARRAY,
    make_header,
    typestore,
)
from compressed_perception.runtime.postprocess import Detections


def topics(role_name: str, camera: str) -> dict[str, str]:
    """carla-ros-bridge's layout: /carla/<role>/<camera>/image, plus ours beside it."""
    base = f"/carla/{role_name}/{camera}"
    return {
        "image": f"{base}/image/compressed",
        "ground_truth": f"{base}/ground_truth",
        "detections": f"{base}/detections",
    }


class Recorder:
    """Per camera: JPEG images, ground truth and detections, all with the image's header."""

    def __init__(
        self, writer: BagWriter, role_name: str, cameras: Sequence[str], labels: Sequence[str]
    ) -> None:
        self._writer = writer
        self._labels = labels
        self._store = typestore()
        self._vision = VisionTypes.from_lookup(self._store.types.__getitem__)
        self._topics = {camera: topics(role_name, camera) for camera in cameras}
        for names in self._topics.values():
            writer.add_topic(names["image"], COMPRESSED_IMAGE)
            writer.add_topic(names["ground_truth"], DETECTION_ARRAY)
            writer.add_topic(names["detections"], DETECTION_ARRAY)

    def record(
        self, camera: str, stamp_s: float, image: np.ndarray, truth: Detections, found: Detections
    ) -> None:
        stamp_ns = round(stamp_s * 1e9)
        types = self._store.types
        stamped = make_header(stamp_ns, camera)
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise ImageError(f"carla {camera}: JPEG encoding failed")
        names = self._topics[camera]
        image_msg = types[COMPRESSED_IMAGE](header=stamped, format="jpeg", data=jpeg.reshape(-1))
        self._writer.write(names["image"], stamp_ns, image_msg)
        for kind, detections in (("ground_truth", truth), ("detections", found)):
            message = detection_array(self._vision, stamped, detections, self._labels)
            self._writer.write(names[kind], stamp_ns, message)


@contextlib.contextmanager
def recording(
    out: Path | None, role_name: str, cameras: Sequence[str], labels: Sequence[str], overwrite: bool
) -> Iterator[Recorder | None]:
    if out is None:
        yield None
        return
    with new_bag(out, "mcap", overwrite) as writer:
        yield Recorder(writer, role_name, cameras, labels)
