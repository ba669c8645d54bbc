"""Letterboxing: the pixels land where the transform says, and boxes map back exactly."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compressed_perception.errors import ConfigError, ImageError
from compressed_perception.runtime.preprocess import Letterbox, LetterboxTransform, validate_image

FAST = settings(max_examples=150, deadline=None)
PAD = 114


def _flat(width, height, value=255):
    """A full-size image without the memory: every pixel is one broadcast value."""
    return np.broadcast_to(np.full((1, 1, 3), value, np.uint8), (height, width, 3))


def _extent(mask):
    """x1, y1, x2, y2 pixel edges of the True region of a 2-D mask."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float64)


@FAST
@given(
    src=st.tuples(st.integers(1, 4000), st.integers(1, 4000)),
    dst=st.tuples(st.integers(1, 1024), st.integers(1, 1024)),
    fractions=st.lists(st.floats(0, 1), min_size=4, max_size=4),
)
def test_round_trip_and_full_image_region(src, dst, fractions):
    (src_w, src_h), (dst_w, dst_h) = src, dst
    letterbox = Letterbox(dst_w, dst_h, pad_value=0)
    transform = letterbox(_flat(src_w, src_h))

    xs, ys = sorted(fractions[:2]), sorted(fractions[2:])
    box = np.array([[xs[0] * src_w, ys[0] * src_h, xs[1] * src_w, ys[1] * src_h]], np.float32)
    back = transform.to_original(transform.to_network(box))
    # Network pixels are float32 (below 1024: ulp 6e-5), so after dividing by a scale as
    # small as 1/4000 the absolute error grows with the image: at most 3e-5 of its size.
    np.testing.assert_allclose(back, box, rtol=1e-3, atol=1e-4 * max(src_w, src_h))

    full = transform.to_network(np.array([[0, 0, src_w, src_h]], np.float32))[0]
    assert full[0] >= 0 and full[1] >= 0
    assert full[2] <= dst_w + 1e-3 and full[3] <= dst_h + 1e-3
    region = _extent(letterbox.buffer[0].max(axis=2) > 0)
    np.testing.assert_allclose(region, full, atol=1.0)


@settings(max_examples=100, deadline=None)
@given(
    src_w=st.integers(16, 2000),
    aspect=st.floats(1 / 3, 3),
    dst=st.tuples(st.integers(96, 640), st.integers(96, 640)),
    rect=st.tuples(st.floats(0, 0.7), st.floats(0.25, 1), st.floats(0, 0.7), st.floats(0.25, 1)),
)
def test_content_lands_where_the_transform_says(src_w, aspect, dst, rect):
    src_h = min(max(round(src_w * aspect), 16), 2000)
    x0, x_size, y0, y_size = rect
    x1, y1 = round(x0 * src_w), round(y0 * src_h)
    x2 = max(min(round((x0 + x_size) * src_w), src_w), x1 + 1)
    y2 = max(min(round((y0 + y_size) * src_h), src_h), y1 + 1)
    image = np.zeros((src_h, src_w, 3), np.uint8)
    image[y1:y2, x1:x2] = 255

    letterbox = Letterbox(*dst)
    transform = letterbox(image)

    expected = transform.to_network(np.array([[x1, y1, x2, y2]], np.float32))[0]
    found = _extent(letterbox.buffer[0].min(axis=2) >= 128)
    np.testing.assert_allclose(found, expected, atol=2.5)  # 1.5 px geometry + 1 px blur


@pytest.mark.parametrize(
    ("src", "dst", "resized", "pad"),
    [
        ((640, 480), (416, 416), (416, 312), (0, 52)),
        ((1920, 1080), (416, 416), (416, 234), (0, 91)),
        ((1080, 1920), (416, 416), (234, 416), (91, 0)),
        ((1, 1), (416, 416), (416, 416), (0, 0)),
        ((7, 3001), (416, 416), (1, 416), (207, 0)),
        ((3001, 7), (416, 416), (416, 1), (0, 207)),
        ((333, 1001), (320, 192), (64, 192), (128, 0)),
        ((17, 5), (416, 416), (416, 122), (0, 147)),
        ((1000, 333), (416, 416), (416, 139), (0, 138)),
        ((416, 200), (416, 416), (416, 200), (0, 108)),
    ],
)
def test_geometry_and_placement(src, dst, resized, pad):
    color = (10, 200, 77)
    image = np.empty((src[1], src[0], 3), np.uint8)
    image[:] = color
    letterbox = Letterbox(*dst, pad_value=PAD)
    transform = letterbox(image)

    (new_w, new_h), (pad_x, pad_y) = resized, pad
    assert (transform.pad_x, transform.pad_y) == (pad_x, pad_y)
    assert (transform.src_width, transform.src_height) == src
    assert (transform.scale_x, transform.scale_y) == (new_w / src[0], new_h / src[1])
    frame = letterbox.buffer[0]
    inside = np.zeros(frame.shape[:2], bool)
    inside[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = True
    assert np.all(frame[inside] == color)
    assert np.all(frame[~inside] == PAD)
    # the image's edges land on the content's exactly, along the rounded side too
    full = transform.to_network(np.array([[0, 0, *src]]))[0]
    np.testing.assert_allclose(full, [pad_x, pad_y, pad_x + new_w, pad_y + new_h], atol=1e-4)


def test_upscaling_matches_a_plain_resize():
    image = np.random.default_rng(1).integers(0, 256, (3, 5, 3), np.uint8)
    letterbox = Letterbox(100, 80)
    transform = letterbox(image)
    assert (transform.scale_x, transform.scale_y) == (20.0, 20.0)
    assert (transform.pad_x, transform.pad_y) == (0.0, 10.0)
    expected = cv2.resize(image, (100, 60), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(letterbox.buffer[0, 10:70], expected)


def test_same_size_is_copied_exactly():
    image = np.random.default_rng(2).integers(0, 256, (48, 64, 3), np.uint8)
    letterbox = Letterbox(64, 48)
    transform = letterbox(image)
    assert (transform.scale_x, transform.scale_y, transform.pad_x, transform.pad_y) == (
        1.0,
        1.0,
        0.0,
        0.0,
    )
    np.testing.assert_array_equal(letterbox.buffer[0], image)


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[:, ::-1],
        lambda a: a[::-1, ::2],
        lambda a: a[..., ::-1],
        np.asfortranarray,
        lambda a: a[3:40, 5:60],
    ],
)
@pytest.mark.parametrize("size", [(50, 30), (300, 200)])
def test_non_contiguous_images_equal_their_contiguous_copy(view, size):
    image = view(np.random.default_rng(3).integers(0, 256, (97, 131, 3), np.uint8))
    strided, contiguous = Letterbox(*size), Letterbox(*size)
    assert strided(image) == contiguous(np.ascontiguousarray(image))
    np.testing.assert_array_equal(strided.buffer, contiguous.buffer)


def test_to_original_clips_to_the_image_and_copies():
    transform = LetterboxTransform(0.5, 0.25, 0.0, 10.0, src_width=200, src_height=100)
    network = np.array([[-20, 0, 120, 40], [10, 15, 20, 25]], np.float32)
    original = transform.to_original(network)
    assert original.dtype == np.float32
    np.testing.assert_array_equal(original, [[0, 0, 200, 100], [20, 20, 40, 60]])
    np.testing.assert_array_equal(network[0], [-20, 0, 120, 40])  # input left alone
    np.testing.assert_array_equal(transform.to_network(original[1:]), network[1:])


def test_empty_box_list_maps_to_empty():
    transform = LetterboxTransform(2.0, 2.0, 3.0, 4.0, src_width=10, src_height=10)
    assert transform.to_original(np.zeros((0, 4), np.float32)).shape == (0, 4)


@pytest.mark.parametrize("portrait_first", [False, True])
def test_padding_reset_when_geometry_changes(portrait_first):
    letterbox = Letterbox(416, 416, pad_value=PAD)
    white = np.full((1080, 1920, 3), 255, np.uint8)  # landscape: bands top and bottom
    black = np.zeros((640, 480, 3), np.uint8)  # portrait: bands left and right
    if portrait_first:
        white, black = white.transpose(1, 0, 2), black.transpose(1, 0, 2)
    letterbox(white)
    transform = letterbox(black)
    frame = letterbox.buffer[0].transpose(1, 0, 2) if portrait_first else letterbox.buffer[0]
    pad = int(transform.pad_y if portrait_first else transform.pad_x)
    assert pad == 52
    assert np.all(frame[:, :pad] == PAD)
    assert np.all(frame[:, 416 - pad :] == PAD)
    assert np.all(frame[:, pad : 416 - pad] == 0)


def test_padding_kept_when_geometry_repeats():
    """The buffer's padding is written once per geometry, not per frame."""
    letterbox = Letterbox(416, 416, pad_value=PAD)
    letterbox(np.zeros((480, 640, 3), np.uint8))
    letterbox.buffer[0, 0, 0] = 7  # a stray write into the top band
    letterbox(np.zeros((480, 640, 3), np.uint8))
    assert letterbox.buffer[0, 0, 0, 0] == 7
    letterbox(np.zeros((640, 480, 3), np.uint8))
    letterbox(np.zeros((480, 640, 3), np.uint8))
    assert letterbox.buffer[0, 0, 0, 0] == PAD


def test_slots_are_independent():
    letterbox = Letterbox(32, 32, batch=3, pad_value=PAD)
    assert letterbox.buffer.shape == (3, 32, 32, 3)
    assert letterbox.buffer.flags.c_contiguous
    letterbox(np.full((16, 32, 3), 9, np.uint8), slot=1)
    assert np.all(letterbox.buffer[[0, 2]] == PAD)
    assert np.all(letterbox.buffer[1, 8:24] == 9)
    with pytest.raises(ConfigError, match="slot: 3"):
        letterbox(np.zeros((4, 4, 3), np.uint8), slot=3)
    with pytest.raises(ConfigError, match="slot: -1"):
        letterbox(np.zeros((4, 4, 3), np.uint8), slot=-1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 416), "size"),
        ((416, -1), "size"),
        ((416, 416, 0), "batch"),
        ((416, 416, 1, 256), "pad_value"),
        ((416, 416, 1, -1), "pad_value"),
    ],
)
def test_bad_letterbox_settings(args, message):
    with pytest.raises(ConfigError, match=message):
        Letterbox(*args)


BAD_IMAGES = [
    (None, "NoneType"),
    ([[[0, 0, 0]]], "list"),
    (np.zeros((0, 0, 3), np.uint8), "empty"),
    (np.zeros((5, 0, 3), np.uint8), "empty"),
    (np.zeros(5, np.uint8), "shape (5,)"),
    (np.zeros((2, 4, 4, 3), np.uint8), "shape (2, 4, 4, 3)"),
    (np.zeros((4, 6), np.uint8), "1 channel (grayscale)"),
    (np.zeros((4, 6, 1), np.uint8), "1 channel (grayscale)"),
    (np.zeros((4, 6, 2), np.uint8), "2 channels"),
    (np.zeros((4, 6, 4), np.uint8), "4 channels (BGRA)"),
    (np.zeros((4, 6, 3), np.uint16), "16-bit (uint16)"),
    (np.zeros((4, 6, 3), np.float32), "32-bit (float32)"),
]


@pytest.mark.parametrize(("image", "message"), BAD_IMAGES)
def test_invalid_images_are_named(image, message):
    with pytest.raises(ImageError, match=r"^cam/front\.jpg: ") as caught:
        validate_image(image, "cam/front.jpg")
    assert message in str(caught.value)
    with pytest.raises(ImageError, match=r"^frame 7: "):
        Letterbox(8, 8)(image, name="frame 7")


def test_valid_image_is_returned_unchanged():
    image = np.zeros((1, 1, 3), np.uint8)
    assert validate_image(image, "x") is image
