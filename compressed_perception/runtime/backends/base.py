"""The one interface every inference backend implements."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    """Runs the model I/O contract: uint8 (B, H, W, 3) BGR in, boxes and scores out.

    Returned arrays may be views into buffers the backend reuses on the next call:
    copy what must outlive it.
    """

    name: str

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`images` (B, H, W, 3) uint8 -> boxes (B, N, 4) float32, scores (B, N, C) float32."""
        ...
