"""Message definitions and conversions, against rosbags' own ROS 2 type stores."""

from __future__ import annotations

import types

import cv2
import numpy as np
import pytest

from compressed_perception.errors import ConfigError, ImageError
from compressed_perception.ros.convert import (
    VisionTypes,
    compressed_to_bgr,
    detection_array,
    image_to_bgr,
)
from compressed_perception.runtime.postprocess import Detections

pytest.importorskip("rosbags", reason="message definitions need rosbags (python3-rosbags-pip)")

from rosbags.typesys import Stores, get_typestore

from compressed_perception.ros.messages import (
    DEFINITIONS,
    DETECTION_ARRAY,
    GID,
    NODE_ENTITIES_INFO,
    PARTICIPANT_ENTITIES_INFO,
    definitions,
    typestore,
)

STORE = typestore()


@pytest.mark.parametrize("distro", [Stores.ROS2_HUMBLE, Stores.ROS2_JAZZY])
def test_definitions_hash_like_the_real_ros_types(distro):
    reference = get_typestore(distro)
    shared = [name for name in DEFINITIONS if name in reference.types]
    assert len(shared) == 11  # all but vision_msgs, which rosbags does not ship
    for name in shared:
        assert STORE.hash_rihs01(name) == reference.hash_rihs01(name), name


@pytest.mark.parametrize(
    ("distro", "store"), [("humble", Stores.ROS2_HUMBLE), ("jazzy", Stores.ROS2_JAZZY)]
)
def test_discovery_definitions_are_the_distros_own(distro, store):
    """ros_discovery_info's types: Humble's Gid is char[24], Jazzy's char[16]."""
    ours, reference = typestore(distro), get_typestore(store)
    for name in (GID, NODE_ENTITIES_INFO, PARTICIPANT_ENTITIES_INFO):
        assert ours.fielddefs[name] == reference.fielddefs[name], name
        assert ours.hash_rihs01(name) == reference.hash_rihs01(name), name
    size = {"humble": 24, "jazzy": 16}[distro]
    assert ours.fielddefs[GID][1] == [("data", (3, ((1, ("char", 0)), size)))]


def test_unknown_distro_is_refused():
    with pytest.raises(ConfigError, match="ROS distro 'iron': choose one of humble, jazzy"):
        definitions("iron")


def test_vision_msgs_definition_is_the_4x_layout():
    fields = {name: [f[0] for f in STORE.fielddefs[name][1]] for name in DEFINITIONS}
    assert fields["vision_msgs/msg/Detection2D"] == ["header", "results", "bbox", "id"]
    assert fields["vision_msgs/msg/BoundingBox2D"] == ["center", "size_x", "size_y"]
    assert fields["vision_msgs/msg/Pose2D"] == ["position", "theta"]
    assert fields["vision_msgs/msg/ObjectHypothesis"] == ["class_id", "score"]


def _image_msg(encoding, height, width, step, data):
    return types.SimpleNamespace(
        encoding=encoding, height=height, width=width, step=step, is_bigendian=0, data=data
    )


@pytest.fixture
def bgr():
    return np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)


def _padded(pixels, pad):
    """Rows of `pixels` (h, w, c) followed by `pad` junk bytes each, as on the wire."""
    h = pixels.shape[0]
    rows = pixels.reshape(h, -1)
    junk = np.full((h, pad), 77, np.uint8)
    return np.concatenate([rows, junk], axis=1).reshape(-1), rows.shape[1] + pad


@pytest.mark.parametrize(
    ("encoding", "make"),
    [
        ("bgr8", lambda x: x),
        ("rgb8", lambda x: x[..., ::-1]),
        ("bgra8", lambda x: np.dstack([x, np.full(x.shape[:2], 9, np.uint8)])),
        ("rgba8", lambda x: np.dstack([x[..., ::-1], np.full(x.shape[:2], 9, np.uint8)])),
    ],
)
def test_colour_encodings_with_step_padding(bgr, encoding, make):
    data, step = _padded(np.ascontiguousarray(make(bgr)), pad=5)
    out = image_to_bgr(_image_msg(encoding, 5, 7, step, data.tobytes()))
    assert out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, bgr)


def test_bgr8_is_a_view_of_the_message_data(bgr):
    data, step = _padded(bgr, pad=3)
    out = image_to_bgr(_image_msg("bgr8", 5, 7, step, data))
    assert np.shares_memory(out, data)


def test_mono8_becomes_gray_bgr():
    gray = np.arange(35, dtype=np.uint8).reshape(5, 7)
    out = image_to_bgr(_image_msg("mono8", 5, 7, 7, gray.tobytes()))
    np.testing.assert_array_equal(out, np.dstack([gray] * 3))


@pytest.mark.parametrize(
    ("encoding", "order"),
    [("yuv422", "UYVY"), ("yuv422_yuy2", "YUY2")],
)
def test_yuv422_byte_orders(encoding, order):
    """Dark left pixel, bright right pixel, no colour: only the right byte order gives that."""
    y0, y1, u, v = 50, 200, 128, 128
    pair = [u, y0, v, y1] if order == "UYVY" else [y0, u, y1, v]
    data = np.tile(np.array(pair, np.uint8), 2 * 4)  # 2 rows of 4 pixels
    out = image_to_bgr(_image_msg(encoding, 2, 4, 8, data.tobytes()))
    assert out.shape == (2, 4, 3)
    assert np.all(np.ptp(out.astype(int), axis=2) <= 2)  # gray
    assert np.all(out[:, 0::2, 0] < 70) and np.all(out[:, 1::2, 0] > 180)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (("16UC1", 2, 2, 4, b"\0" * 8), "unsupported encoding '16UC1'"),
        (("bgr8", 2, 4, 10, b"\0" * 24), "step 10 is less than width 4 x 3 bytes"),
        (("bgr8", 2, 4, 12, b"\0" * 20), "truncated data: 20 bytes"),
        (("bgr8", 0, 4, 12, b""), "empty image"),
        (("yuv422", 2, 3, 6, b"\0" * 12), "odd width 3 in yuv422, which packs pixel pairs"),
        (("yuyv", 2, 5, 10, b"\0" * 20), "odd width 5 in yuyv"),
    ],
)
def test_malformed_images_are_refused(fields, message):
    with pytest.raises(ImageError, match=message):
        image_to_bgr(_image_msg(*fields), name="/cam/image")
    with pytest.raises(ImageError, match=r"^/cam/image: "):
        image_to_bgr(_image_msg(*fields), name="/cam/image")


def test_compressed_jpeg_and_png(bgr):
    big = cv2.resize(bgr, (70, 50), interpolation=cv2.INTER_NEAREST)
    png = cv2.imencode(".png", big)[1]
    out = compressed_to_bgr(types.SimpleNamespace(format="png", data=png.tobytes()))
    np.testing.assert_array_equal(out, big)
    jpeg = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 100])[1]
    msg = types.SimpleNamespace(format="rgb8; jpeg compressed bgr8", data=jpeg)
    assert np.abs(compressed_to_bgr(msg).astype(int) - big).mean() < 6


@pytest.mark.parametrize(
    ("fmt", "suffix"),
    [
        ("", ".jpg"),  # sensor_msgs: an empty format means jpeg
        ("tiff", ".tiff"),  # listed by Humble's CompressedImage
        ("bgr8; png compressed bgr8", ".png"),
        ("jpeg", ".png"),  # the data's signature decides, not the hint
        ("h265", ".bmp"),  # an unknown word: decoded if the data decodes
    ],
)
def test_compressed_formats_decode_by_content(bgr, fmt, suffix):
    big = cv2.resize(bgr, (70, 50), interpolation=cv2.INTER_NEAREST)
    params = [cv2.IMWRITE_JPEG_QUALITY, 100] if suffix == ".jpg" else []
    data = cv2.imencode(suffix, big, params)[1].tobytes()
    out = compressed_to_bgr(types.SimpleNamespace(format=fmt, data=data))
    assert out.shape == (50, 70, 3)
    assert np.abs(out.astype(int) - big).mean() < 6


@pytest.mark.parametrize(
    ("fmt", "data", "message"),
    [
        ("jpeg", b"\xff\xd8\xff garbage", "corrupt, empty or undecodable 'jpeg' data"),
        ("jpeg", b"", "corrupt, empty or undecodable"),
        ("", b"\0\1\2", "undecodable 'jpeg' data \\(3 bytes\\)"),
        ("tiff", b"\0", "undecodable 'tiff' data"),
        ("16UC1; compressedDepth", b"\0", "is a depth image, not a camera image"),
    ],
)
def test_bad_compressed_images(fmt, data, message):
    with pytest.raises(ImageError, match=message):
        compressed_to_bgr(types.SimpleNamespace(format=fmt, data=data), name="/cam")


def test_compressed_depth_is_refused_even_when_its_png_decodes(bgr):
    png = cv2.imencode(".png", bgr)[1].tobytes()
    msg = types.SimpleNamespace(format="16UC1; compressedDepth png", data=png)
    with pytest.raises(ImageError, match=r"^/cam: .*compressedDepth"):
        compressed_to_bgr(msg, name="/cam")


def test_detection_array_round_trips_through_cdr():
    vision = VisionTypes.from_lookup(lambda name: STORE.types[name])
    header = STORE.types["std_msgs/msg/Header"](
        stamp=STORE.types["builtin_interfaces/msg/Time"](sec=12, nanosec=34), frame_id="cam"
    )
    found = Detections(
        np.array([[10, 20, 50, 100], [0, 0, 768, 576]], np.float32),
        np.array([0.9, 0.4], np.float32),
        np.array([0, 2], np.int64),
    )
    labels = ["person", "bicycle", "car"]
    msg = detection_array(vision, header, found, labels)
    back = STORE.deserialize_cdr(STORE.serialize_cdr(msg, DETECTION_ARRAY), DETECTION_ARRAY)
    assert (back.header.stamp.sec, back.header.stamp.nanosec, back.header.frame_id) == (
        12,
        34,
        "cam",
    )
    first, second = back.detections
    assert (first.bbox.center.position.x, first.bbox.center.position.y) == (30.0, 60.0)
    assert (first.bbox.size_x, first.bbox.size_y) == (40.0, 80.0)
    assert first.results[0].hypothesis.class_id == "person"
    assert first.results[0].hypothesis.score == pytest.approx(0.9)
    assert second.results[0].hypothesis.class_id == "car"
    assert first.header.frame_id == "cam"
    as_index = detection_array(vision, header, found, labels, class_id_as_label=False)
    assert as_index.detections[1].results[0].hypothesis.class_id == "2"
