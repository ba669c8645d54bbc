"""Host-side letterboxing into the model's fixed-size uint8 BGR input, and the way back.

The model graph normalizes internally, so the host only resizes (keeping the aspect
ratio), centres and pads; it writes straight into one preallocated batch buffer so
that a frame costs one resize and no allocation.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from compressed_perception.errors import ConfigError, ImageError

_CHANNEL_NAMES = {1: "1 channel (grayscale)", 4: "4 channels (BGRA)"}


def validate_image(image: object, name: str) -> np.ndarray:
    """Fail early with a message naming the input, rather than deep inside OpenCV."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{name}: expected a numpy image array, got {type(image).__name__}")
    if image.size == 0:
        raise ImageError(f"{name}: empty image (shape {image.shape})")
    if image.ndim not in (2, 3):
        raise ImageError(f"{name}: expected an (h, w, 3) image, got shape {image.shape}")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels != 3:
        found = _CHANNEL_NAMES.get(channels, f"{channels} channels")
        raise ImageError(f"{name}: expected 3 channels (BGR), got {found}")
    if image.dtype != np.uint8:
        raise ImageError(f"{name}: expected 8-bit (uint8) pixels, got {_depth(image.dtype)}")
    return image


def _depth(dtype: np.dtype) -> str:
    """Users know depths as bits ("16-bit"); the dtype name says which kind exactly."""
    if dtype.kind in "biufc":
        return f"{dtype.itemsize * 8}-bit ({dtype.name})"
    return dtype.name


@dataclass(frozen=True)
class LetterboxTransform:
    """Maps boxes between original-image and network-input pixels: `net = orig * scale + pad`.

    One scale per axis, each the resized side over the original one: the resize rounds
    the shorter side to whole pixels, so the aspect-ratio scale alone would misplace boxes
    along it by up to half a network pixel; these map the image's edges onto the content's.
    """

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    src_width: int
    src_height: int

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """(K, 4) x1, y1, x2, y2 network boxes to float32 image boxes, clipped to the image."""
        original = (np.asarray(boxes, np.float64) - self._offset()) / self._scales()
        limits = np.array([self.src_width, self.src_height] * 2, np.float64)
        return np.clip(original, 0.0, limits).astype(np.float32)

    def to_network(self, boxes: np.ndarray) -> np.ndarray:
        """Exact inverse of `to_original` before clipping, e.g. to map ground truth."""
        return (np.asarray(boxes, np.float64) * self._scales() + self._offset()).astype(np.float32)

    def _scales(self) -> np.ndarray:
        return np.array([self.scale_x, self.scale_y] * 2, np.float64)

    def _offset(self) -> np.ndarray:
        return np.array([self.pad_x, self.pad_y] * 2, np.float64)


def letterbox_geometry(
    width: int, height: int, src_width: int, src_height: int
) -> tuple[int, int, int, int]:
    """(content width, content height, pad x, pad y) of a `src` frame letterboxed into
    `width` x `height`: the aspect ratio kept, the content centred."""
    scale = min(width / src_width, height / src_height)
    new_w = min(max(round(src_width * scale), 1), width)
    new_h = min(max(round(src_height * scale), 1), height)
    return new_w, new_h, (width - new_w) // 2, (height - new_h) // 2


def same_grid(
    before: tuple[int, int], after: tuple[int, int], stride: int, frame: tuple[int, int]
) -> bool:
    """Whether a `frame` (width, height) letterboxed into `after` (height, width) lands at
    the same scale as into `before`, moved by whole multiples of `stride`: a fully
    convolutional model then computes the same cells on it."""
    old_w, old_h, old_x, old_y = letterbox_geometry(before[1], before[0], *frame)
    new_w, new_h, new_x, new_y = letterbox_geometry(after[1], after[0], *frame)
    moved = (old_x - new_x) % stride == 0 and (old_y - new_y) % stride == 0
    return (old_w, old_h) == (new_w, new_h) and moved


class Letterbox:
    """Letterboxes frames into slots of `buffer`, the (batch, height, width, 3) model input.

    Each slot remembers the geometry of its last frame, so padding is rewritten only when
    the geometry changes. Callers must treat `buffer` as read-only for that reason.
    """

    def __init__(self, width: int, height: int, batch: int = 1, pad_value: int = 0) -> None:
        if width < 1 or height < 1:
            raise ConfigError(f"letterbox size: must be at least 1x1, got {width}x{height}")
        if batch < 1:
            raise ConfigError(f"letterbox batch: must be at least 1, got {batch}")
        if not 0 <= pad_value <= 255:
            raise ConfigError(f"letterbox pad_value: must be in 0..255, got {pad_value}")
        self.width = width
        self.height = height
        self.pad_value = pad_value
        self.buffer = np.full((batch, height, width, 3), pad_value, np.uint8)
        self._sizes: list[tuple[int, int] | None] = [None] * batch

    def __call__(self, image: np.ndarray, slot: int = 0, name: str = "image") -> LetterboxTransform:
        """Writes `image` into `buffer[slot]`; the returned transform maps boxes back."""
        image = validate_image(image, name)
        if not 0 <= slot < len(self._sizes):
            raise ConfigError(f"letterbox slot: {slot} is outside 0..{len(self._sizes) - 1}")
        src_h, src_w = image.shape[:2]
        new_w, new_h, pad_x, pad_y = letterbox_geometry(self.width, self.height, src_w, src_h)
        if self._sizes[slot] != (new_w, new_h):
            self._fill_padding(slot, pad_x, pad_y, new_w, new_h)
            self._sizes[slot] = (new_w, new_h)
        target = self.buffer[slot, pad_y : pad_y + new_h, pad_x : pad_x + new_w]
        if (new_w, new_h) == (src_w, src_h):
            np.copyto(target, image)
        else:
            # OpenCV copies flipped or strided sources itself; dst is a strided view it
            # accepts as a sub-matrix, so the resize lands in the buffer without a copy.
            cv2.resize(image, (new_w, new_h), dst=target, interpolation=cv2.INTER_LINEAR)
        return LetterboxTransform(
            new_w / src_w, new_h / src_h, float(pad_x), float(pad_y), src_w, src_h
        )

    def _fill_padding(self, slot: int, pad_x: int, pad_y: int, new_w: int, new_h: int) -> None:
        """Resets the four bands around the image area, where an older frame may remain."""
        frame = self.buffer[slot]
        bottom, right = pad_y + new_h, pad_x + new_w
        frame[:pad_y] = self.pad_value
        frame[bottom:] = self.pad_value
        frame[pad_y:bottom, :pad_x] = self.pad_value
        frame[pad_y:bottom, right:] = self.pad_value
