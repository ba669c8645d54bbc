"""Reproduce the committed vtest fixtures from vtest.avi (Debian opencv-doc 4.6.0).

    python tools/extract_vtest_frames.py vtest.avi data/vtest 0 400 10            # training range
    python tools/extract_vtest_frames.py vtest.avi data/vtest_heldout 400 795 20  # held out

Frames are written as JPEG (quality 92) named by their frame number.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2


def main(video: Path, out: Path, start: int, stop: int, step: int) -> None:
    capture = cv2.VideoCapture(str(video))
    if not capture.isOpened():
        raise SystemExit(f"{video}: cannot open video")
    out.mkdir(parents=True, exist_ok=True)
    for index in range(stop):
        ok, frame = capture.read()
        if not ok:
            raise SystemExit(f"{video}: ends at frame {index}, expected at least {stop}")
        if index >= start and (index - start) % step == 0:
            cv2.imwrite(str(out / f"vtest_{index:03d}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, 92])


if __name__ == "__main__":
    video, out, start, stop, step = sys.argv[1:6]
    main(Path(video), Path(out), int(start), int(stop), int(step))
