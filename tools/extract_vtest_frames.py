"""Reproduce data/vtest: every 10th of frames 0-399 of vtest.avi as JPEG (quality 92)."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2


def main(video: Path, out: Path) -> None:
    capture = cv2.VideoCapture(str(video))
    if not capture.isOpened():
        raise SystemExit(f"{video}: cannot open video")
    out.mkdir(parents=True, exist_ok=True)
    for index in range(400):
        ok, frame = capture.read()
        if not ok:
            raise SystemExit(f"{video}: ends at frame {index}, expected at least 400")
        if index % 10 == 0:
            cv2.imwrite(str(out / f"vtest_{index:03d}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, 92])


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
