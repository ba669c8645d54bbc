"""Replay of real camera bags, in both storages, through the CLI and the library."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
import types

import cv2
import numpy as np
import pytest

pytest.importorskip("rosbags", reason="replay needs rosbags (rosdep key python3-rosbags-pip)")

from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

import compressed_perception
from compressed_perception.cli import main
from compressed_perception.errors import PerceptionError
from compressed_perception.replay.bag import BagError, new_bag
from compressed_perception.replay.replay import ReplayOptions, _truth_detections, replay
from compressed_perception.ros.convert import VisionTypes, detection_array
from compressed_perception.ros.messages import (
    COMPRESSED_IMAGE,
    DETECTION_ARRAY,
    IMAGE,
    typestore,
)
from compressed_perception.runtime.detector import Detector
from compressed_perception.runtime.manifest import load_manifest

from conftest import MODEL_DIR, fitted_detector_on

FRAMES = 6
STORE = typestore()
NO_COCO = "replay metrics need pycocotools (no rosdep key: pip install pycocotools)"
SAMPLE_BAG = MODEL_DIR.parents[1] / "data" / "sample_bag"
HAVE_COCO = importlib.util.find_spec("pycocotools") is not None
GROUND_TRUTH_ERROR = "no ground-truth topic /gt" if HAVE_COCO else "needs pycocotools"


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _write_video(path, images):
    height, width = images[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (width, height))
    for image in images:
        writer.write(np.ascontiguousarray(image))
    writer.release()
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory, frames):
    return _write_video(tmp_path_factory.mktemp("video") / "street.avi", frames[:FRAMES])


def _sample(capsys, video, out, *extra):
    code, stdout, err = _run(capsys, "make-sample-bag", video, "--out", out, *extra)
    assert code == 0, err
    assert f"wrote {FRAMES} frames" in stdout
    return out


def _read(path):
    """(topic, log time, message, connection) for every message of a bag, in log order."""
    with Reader(path) as reader:
        return [
            (c.topic, t, STORE.deserialize_cdr(raw, c.msgtype), c)
            for c, t, raw in reader.messages()
        ]


def _header_key(header):
    return (header.frame_id, header.stamp.sec, header.stamp.nanosec)


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
@pytest.mark.parametrize("compressed", [True, False])
def test_every_frame_gets_detections_with_its_header(tmp_path, capsys, video, storage, compressed):
    bag = _sample(
        capsys, video, tmp_path / "in", "--storage", storage, *(["--compressed"] * compressed)
    )
    out = tmp_path / "out"
    metrics_path = tmp_path / "metrics.json"
    code, stdout, err = _run(capsys, "replay", bag, "--out", out, "--metrics", metrics_path)
    assert code == 0, err
    images = list(_read(bag))
    outputs = _read(out)
    assert len(outputs) == len(images) == FRAMES
    image_topic = "/camera/image_raw/compressed" if compressed else "/camera/image_raw"
    assert {t for t, *_ in images} == {image_topic}
    for (_, image_time, image, _), (topic, time, found, conn) in zip(images, outputs, strict=True):
        assert topic == "/camera/detections"
        assert conn.msgtype == DETECTION_ARRAY
        assert time == image_time
        assert _header_key(found.header) == _header_key(image.header)
        people = [d for d in found.detections if d.results[0].hypothesis.class_id == "person"]
        assert len(people) >= 3
        for det in found.detections:
            assert _header_key(det.header) == _header_key(image.header)
            assert 0 <= det.bbox.center.position.x <= 768
            assert 0 <= det.bbox.center.position.y <= 576
            assert det.bbox.size_x > 0 and det.bbox.size_y > 0
            assert det.results[0].hypothesis.score >= 0.35
    metrics = json.loads(metrics_path.read_text())
    assert metrics["frames"] == FRAMES
    assert metrics["storage"] == storage
    assert metrics["decode_failures"] == []
    assert metrics["topics"][image_topic] == {
        "detections_topic": "/camera/detections",
        "frames": FRAMES,
        "decode_failures": 0,
        "unfitted_frames": 0,
    }
    assert metrics["unfitted"] is None
    assert metrics["detections_per_class"]["person"] >= 3 * FRAMES
    assert set(metrics["latency_ms"]) == {"preprocess", "inference", "postprocess"}
    assert f"frames {FRAMES}, decode failures 0" in stdout


def test_output_bag_is_complete_for_ros2(tmp_path, capsys, video):
    """metadata.yaml, stored definitions (MCAP schema) and QoS, as ros2 bag info needs."""
    bag = _sample(capsys, video, tmp_path / "in", "--compressed")
    out = tmp_path / "out"
    assert _run(capsys, "replay", bag, "--out", out, "--copy-input")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["metadata.yaml", "out.mcap"]
    meta = (out / "metadata.yaml").read_text()
    assert re.search(r"^  version: 8$", meta, re.MULTILINE)
    assert "reliability: 1" in meta  # reliable, keep last 10 for the detections
    with Reader(out) as reader:
        topics = {c.topic: c for c in reader.connections}
        assert set(topics) == {"/camera/detections", "/camera/image_raw/compressed"}
        definition = topics["/camera/detections"].msgdef.data
        assert "vision_msgs/Detection2D[] detections" in definition
        assert topics["/camera/detections"].digest == STORE.hash_rihs01(DETECTION_ARRAY)
        assert reader.message_count == 2 * FRAMES
    # copied input is byte-identical
    with Reader(bag) as src, Reader(out) as dst:
        raw_in = [raw for _, _, raw in src.messages()]
        raw_out = [raw for c, _, raw in dst.messages() if c.topic == "/camera/image_raw/compressed"]
    assert raw_in == raw_out


def test_replay_is_deterministic(tmp_path, capsys, video):
    bag = _sample(capsys, video, tmp_path / "in")
    for name in ("a", "b"):
        assert _run(capsys, "replay", bag, "--out", tmp_path / name, "--storage", "sqlite3")[0] == 0
    with Reader(tmp_path / "a") as a, Reader(tmp_path / "b") as b:
        assert [(t, r) for _, t, r in a.messages()] == [(t, r) for _, t, r in b.messages()]


def _write_bag(path, storage, items):
    """items: (topic, msgtype, log time, message, or bytes written as they are)."""
    with new_bag(path, storage) as writer:
        for topic, msgtype in dict.fromkeys((i[0], i[1]) for i in items):
            writer.add_topic(topic, msgtype)
        for topic, _, time, message in items:
            if isinstance(message, bytes):
                writer.write_raw(topic, time, message)
            else:
                writer.write(topic, time, message)
    return path


def _header(sec, frame_id="cam"):
    return STORE.types["std_msgs/msg/Header"](
        stamp=STORE.types["builtin_interfaces/msg/Time"](sec=sec, nanosec=5), frame_id=frame_id
    )


def _jpeg(header, image):
    data = cv2.imencode(".jpg", image)[1].reshape(-1)
    return STORE.types[COMPRESSED_IMAGE](header=header, format="jpeg", data=data)


def test_bad_frames_are_counted_not_dropped(tmp_path, capsys, frames):
    raw16 = STORE.types[IMAGE](
        header=_header(2), height=4, width=4, encoding="16UC1", is_bigendian=0, step=8,
        data=np.zeros(32, np.uint8),
    )  # fmt: skip
    corrupt = STORE.types[COMPRESSED_IMAGE](
        header=_header(3), format="jpeg", data=np.frombuffer(b"\xff\xd8garbage", np.uint8)
    )
    bag = _write_bag(
        tmp_path / "in",
        "mcap",
        [
            ("/cam/image/compressed", COMPRESSED_IMAGE, 1, _jpeg(_header(1), frames[0])),
            ("/cam/image/compressed", COMPRESSED_IMAGE, 3, corrupt),
            ("/cam/image", IMAGE, 2, raw16),
            ("/cam/image/compressed", COMPRESSED_IMAGE, 4, _jpeg(_header(4), frames[1])),
        ],
    )
    with pytest.raises(BagError, match="two camera topics map to one detections topic"):
        replay(bag, tmp_path / "x", ReplayOptions(model=MODEL_DIR))
    metrics = replay(
        bag, tmp_path / "out", ReplayOptions(model=MODEL_DIR, topics=("/cam/image/compressed",))
    )
    assert metrics["frames"] == 2
    failures = metrics["decode_failures"]
    assert [(f["topic"], f["log_time"]) for f in failures] == [("/cam/image/compressed", 3)]
    assert "corrupt, empty or undecodable 'jpeg' data" in failures[0]["error"]
    assert "warning:" in capsys.readouterr().err
    metrics = replay(bag, tmp_path / "out2", ReplayOptions(model=MODEL_DIR, topics=("/cam/image",)))
    assert metrics["frames"] == 0
    assert "unsupported encoding '16UC1'" in metrics["decode_failures"][0]["error"]


@pytest.fixture
def small_bag(tmp_path, frames):
    items = [
        ("/cam/image/compressed", COMPRESSED_IMAGE, i + 1, _jpeg(_header(i + 1), frames[i]))
        for i in range(3)
    ]
    return _write_bag(tmp_path / "in", "mcap", items)


def test_bad_bags_and_arguments(tmp_path, capsys, small_bag):
    out = tmp_path / "out"
    cases = [
        ((tmp_path / "nope", "--out", out), "not a rosbag2 folder"),
        ((small_bag, "--out", out, "--topics", "/other"), "no topic /other in the bag"),
        ((small_bag, "--out", small_bag), "output exists (pass --overwrite"),
        ((small_bag, "--out", out, "--ground-truth", "/gt"), GROUND_TRUTH_ERROR),
    ]
    for argv, message in cases:
        code, _, err = _run(capsys, "replay", *argv)
        assert code == 2, argv
        assert message in err
        assert not out.exists()
    broken = tmp_path / "broken"
    shutil.copytree(small_bag, broken)
    meta = broken / "metadata.yaml"
    meta.write_text(meta.read_text().replace("storage_identifier: mcap", "storage_identifier: db9"))
    code, _, err = _run(capsys, "replay", broken, "--out", out)
    assert code == 2 and "unknown storage 'db9'" in err


def test_truncated_bag_is_an_error_and_leaves_no_output(tmp_path, capsys, small_bag):
    mcap = small_bag / "in.mcap"
    mcap.write_bytes(mcap.read_bytes()[: mcap.stat().st_size // 2])
    out = tmp_path / "out"
    code, _, err = _run(capsys, "replay", small_bag, "--out", out)
    assert code == 2
    assert str(small_bag) in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_overwrite_replaces_output(tmp_path, capsys, small_bag):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert _run(capsys, "replay", small_bag, "--out", out, "--overwrite")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["metadata.yaml", "out.mcap"]


def test_agreement_and_ground_truth_topic(tmp_path, frames):
    """The model against itself agrees perfectly; against its own boxes as truth, too."""
    pytest.importorskip("pycocotools", reason=NO_COCO)
    detector = Detector.open(MODEL_DIR / "manifest.json", "onnxruntime")
    vision = VisionTypes.from_lookup(lambda name: STORE.types[name])
    items = []
    for i in range(3):
        header = _header(i + 1)
        truth = detector.detect(frames[i]).detections
        items.append(("/cam/image/compressed", COMPRESSED_IMAGE, i + 1, _jpeg(header, frames[i])))
        gt = detection_array(vision, header, truth, detector.labels)
        items.append(("/cam/truth", DETECTION_ARRAY, i + 1, gt))
    bag = _write_bag(tmp_path / "in", "sqlite3", items)
    metrics = replay(
        bag,
        tmp_path / "out",
        ReplayOptions(model=MODEL_DIR, reference=MODEL_DIR, ground_truth="/cam/truth"),
    )
    assert metrics["agreement"]["map"] == pytest.approx(1.0)
    assert metrics["agreement"]["frames"] == 3
    # JPEG round trip moves boxes slightly: near-perfect, not exact
    assert metrics["ground_truth"]["map50"] > 0.95
    assert metrics["ground_truth"]["map"] > 0.7
    assert metrics["ground_truth"]["frames_without_ground_truth"] == 0


def _truth_bag(path, frames, stamps, labels=None, corrupt=False):
    """Images with these header stamps (seconds), the first one's boxes from the model as
    ground truth (named `labels` if given), and a message on that topic that does not
    deserialize if `corrupt`."""
    detector = Detector.open(MODEL_DIR / "manifest.json", "onnxruntime")
    vision = VisionTypes.from_lookup(lambda name: STORE.types[name])
    items = [
        ("/cam/image/compressed", COMPRESSED_IMAGE, i + 1, _jpeg(_header(sec), frames[i]))
        for i, sec in enumerate(stamps)
    ]
    truth = detector.detect(frames[0]).detections
    gt = detection_array(vision, _header(stamps[0]), truth, labels or detector.labels)
    items.append(("/cam/truth", DETECTION_ARRAY, 1, gt))
    if corrupt:
        items.append(("/cam/truth", DETECTION_ARRAY, 2, b"\x00\x01\x00\x00\xff"))
    return _write_bag(path, "mcap", items)


def test_a_corrupt_ground_truth_message_is_listed_and_its_frame_scored_without(tmp_path, frames):
    """It used to come back as an image of the truth topic: miscounted as a failed frame,
    and with --copy-input written to a topic the output bag never had (KeyError)."""
    pytest.importorskip("pycocotools", reason=NO_COCO)
    bag = _truth_bag(tmp_path / "in", frames, [1, 2], corrupt=True)
    options = ReplayOptions(model=MODEL_DIR, ground_truth="/cam/truth", copy_input=True)
    metrics = replay(bag, tmp_path / "out", options)
    assert metrics["frames"] == 2 and metrics["decode_failures"] == []
    failures = metrics["ground_truth"]["ground_truth_decode_failures"]
    assert [(f["topic"], f["log_time"]) for f in failures] == [("/cam/truth", 2)]
    assert "undecodable CDR" in failures[0]["error"]
    assert metrics["ground_truth"]["frames_without_ground_truth"] == 1
    assert metrics["ground_truth"]["map50"] > 0.95
    written = sorted((topic, time) for topic, time, *_ in _read(tmp_path / "out"))
    topics = ("/cam/detections", "/cam/image/compressed")
    assert written == [(topic, time) for topic in topics for time in (1, 2)]


@pytest.mark.parametrize(
    ("stamps", "labels", "message"),
    [
        ([1, 1], None, "two replayed images share frame_id and stamp cam/1.000000005"),
        ([1, 2], ["pedestrian"] * 80, "ground-truth label not in the model"),
    ],
)
def test_ground_truth_that_cannot_be_scored_leaves_no_output(
    tmp_path, capsys, frames, stamps, labels, message
):
    pytest.importorskip("pycocotools", reason=NO_COCO)
    bag = _truth_bag(tmp_path / "in", frames, stamps, labels)
    out, metrics = tmp_path / "out", tmp_path / "m.json"
    argv = ["replay", bag, "--out", out, "--ground-truth", "/cam/truth", "--metrics", metrics]
    for _ in range(2):  # and the second try is not refused for an output the first left
        code, _, err = _run(capsys, *argv)
        assert code == 2 and message in err
        assert not out.exists() and not metrics.exists()


def test_an_mcap_of_only_its_magic_bytes_is_a_bag_error(tmp_path, capsys, small_bag):
    """What a recorder killed at start-up leaves; rosbags raised TypeError on it."""
    stub = tmp_path / "stub.mcap"
    stub.write_bytes((small_bag / "in.mcap").read_bytes()[:8])
    code, _, err = _run(capsys, "replay", stub, "--out", tmp_path / "out")
    assert code == 2 and f"{stub}: cannot open bag (TypeError" in err
    assert not (tmp_path / "out").exists()


def test_metrics_without_pycocotools_say_what_to_install(tmp_path, capsys, small_bag, monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] == "pycocotools"] + ["pycocotools"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    for name in [m for m in sys.modules if m.startswith("compressed_perception.evaluation")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(compressed_perception, "evaluation", raising=False)
    out = tmp_path / "out"
    code, _, err = _run(capsys, "replay", small_bag, "--out", out, "--reference", MODEL_DIR)
    assert code == 2
    assert "--reference and --ground-truth needs pycocotools" in err
    assert "pip install pycocotools" in err and err.count("\n") == 1
    assert not out.exists()
    assert _run(capsys, "replay", small_bag, "--out", out)[0] == 0  # plain replay needs none


def test_coco_json_ground_truth(tmp_path, capsys, small_bag):
    pytest.importorskip("pycocotools", reason=NO_COCO)
    coco = {
        "images": [{"id": 1, "file_name": "cam/1.000000005", "width": 768, "height": 576}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "person"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(coco))
    metrics_path = tmp_path / "m.json"
    code, stdout, err = _run(
        capsys, "replay", small_bag, "--out", tmp_path / "out", "--ground-truth", path,
        "--metrics", metrics_path,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(metrics_path.read_text())["ground_truth"]
    assert result["ground_truth_boxes"] == 1
    assert result["map"] == pytest.approx(0.0)  # nobody stands in the top-left 5x5 corner
    assert result["frames_without_ground_truth"] == 2
    assert "ground truth: mAP@[.5:.95] 0.000" in stdout


def test_a_bad_coco_file_is_refused_before_the_replay(tmp_path, capsys, small_bag, monkeypatch):
    pytest.importorskip("pycocotools", reason=NO_COCO)
    path = tmp_path / "gt.json"
    path.write_text("{not json")
    replayed = []
    monkeypatch.setattr(Detector, "detect_batch", lambda *a, **k: replayed.append(a))
    out = tmp_path / "out"
    code, _, err = _run(capsys, "replay", small_bag, "--out", out, "--ground-truth", path)
    assert code == 2 and str(path) in err
    assert replayed == [] and not out.exists()


def test_workers_replay_several_bags(tmp_path, capsys, small_bag):
    second = tmp_path / "second"
    shutil.copytree(small_bag, second)
    (second / "in.mcap").rename(second / "second.mcap")
    meta = second / "metadata.yaml"
    meta.write_text(meta.read_text().replace("in.mcap", "second.mcap"))
    out = tmp_path / "outs"
    code, stdout, err = _run(capsys, "replay", small_bag, second, "--out", out, "--workers", "2")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["in", "second"]
    for name in ("in", "second"):
        assert len(_read(out / name)) == 3
    assert stdout.count("frames 3, decode failures 0") == 2


def test_committed_sample_bag():
    """data/sample_bag, which make demo replays: 400 decodable frames at 10 Hz."""
    from compressed_perception.ros.convert import compressed_to_bgr

    with Reader(SAMPLE_BAG) as reader:
        (connection,) = reader.connections
        assert (connection.topic, connection.msgtype) == (
            "/camera/image_raw/compressed",
            COMPRESSED_IMAGE,
        )
        times = []
        for index, (_, time, raw) in enumerate(reader.messages()):
            times.append(time)
            if index % 100 == 0:
                message = STORE.deserialize_cdr(raw, COMPRESSED_IMAGE)
                assert message.header.frame_id == "camera"
                assert message.header.stamp.sec * 10**9 + message.header.stamp.nanosec == time
                assert compressed_to_bgr(message).shape == (288, 384, 3)
    assert len(times) == 400
    assert set(np.diff(times)) == {100_000_000}


# --- bare MCAP files (no metadata.yaml), as Foxglove exports them ---------------------------


def test_bare_mcap_replays_into_a_rosbag2_folder(tmp_path, capsys, small_bag):
    bare = tmp_path / "drive.mcap"
    shutil.copy(small_bag / "in.mcap", bare)  # the storage file alone, without metadata.yaml
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "replay", bare, "--out", out, "--copy-input")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["metadata.yaml", "out.mcap"]
    with Reader(bare) as src:
        images = [(t, STORE.deserialize_cdr(raw, c.msgtype)) for c, t, raw in src.messages()]
    found = [(t, m) for topic, t, m, _ in _read(out) if topic == "/cam/detections"]
    assert [t for t, _ in found] == [t for t, _ in images] == [1, 2, 3]
    for (_, image), (_, detections) in zip(images, found, strict=True):
        assert _header_key(detections.header) == _header_key(image.header)
        assert detections.detections  # real frames with people
    assert "frames 3, decode failures 0" in stdout
    several = tmp_path / "several"
    assert _run(capsys, "replay", bare, small_bag, "--out", several)[0] == 0
    assert sorted(p.name for p in several.iterdir()) == ["drive", "in"]


def test_the_committed_sample_bag_opens_as_a_bare_mcap(tmp_path):
    from compressed_perception.replay.bag import image_connections, messages, open_bag

    bare = tmp_path / "sample.mcap"
    shutil.copy(SAMPLE_BAG / "sample_bag.mcap", bare)
    with open_bag(bare) as reader:
        (camera,) = image_connections(reader, None, bare)
        assert (camera.topic, camera.msgtype) == ("/camera/image_raw/compressed", COMPRESSED_IMAGE)
        assert sum(1 for _ in messages(reader, [camera], bare)) == 400


def test_bare_mcap_with_its_own_image_type(tmp_path, capsys, frames):
    """A type this package does not define, with CompressedImage's fields, read from the
    file's schema record."""
    vendor = "vendor_msgs/msg/CameraFrame"
    store = get_typestore(Stores.EMPTY)
    store.register(STORE.fielddefs)
    store.register(
        get_types_from_msg("std_msgs/Header header\nstring format\nuint8[] data\n", vendor)
    )
    folder = tmp_path / "vendor"
    with Writer(folder, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        connection = writer.add_connection("/front/frame", vendor, typestore=store)
        for i in range(2):
            message = _jpeg(_header(i + 1, "front"), frames[i])
            frame = store.types[vendor](header=message.header, format="", data=message.data)
            writer.write(connection, i + 1, store.serialize_cdr(frame, vendor))
    bare = tmp_path / "vendor.mcap"
    shutil.copy(folder / "vendor.mcap", bare)
    out = tmp_path / "out"
    code, _, err = _run(capsys, "replay", bare, "--out", out, "--copy-input")
    assert code == 0, err
    with Reader(out) as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
        assert types == {"/front/detections": DETECTION_ARRAY, "/front/frame": vendor}
        detections = [c for c in reader.connections if c.topic == "/front/detections"]
        found = [STORE.deserialize_cdr(r, DETECTION_ARRAY) for *_, r in reader.messages(detections)]
    assert [m.header.stamp.sec for m in found] == [1, 2]
    assert all(m.detections for m in found)
    code, _, err = _run(capsys, "replay", bare, "--out", tmp_path / "x", "--topics", "/nope")
    assert code == 2 and "no topic /nope in the bag (topics: /front/frame)" in err


def test_a_file_that_is_not_a_bag_is_refused(tmp_path, capsys):
    notes = tmp_path / "notes.db3"
    notes.write_text("x")
    code, _, err = _run(capsys, "replay", notes, "--out", tmp_path / "out")
    assert code == 2
    assert f"{notes}: not a rosbag2 folder (no metadata.yaml) nor a .mcap file" in err


def test_a_sample_bag_of_no_pixels_or_no_frames_is_refused_and_not_written(tmp_path, capsys, video):
    out = tmp_path / "bag"
    code, _, err = _run(capsys, "make-sample-bag", video, "--out", out, "--scale", "0.0005")
    assert code == 2 and "scale 0.0005: 768x576 frames would have no pixels" in err
    assert not out.exists()
    with pytest.raises(SystemExit) as stopped:
        main(["make-sample-bag", str(video), "--out", str(out), "--count", "0"])
    assert stopped.value.code == 2 and "--count: 0 is less than 1" in capsys.readouterr().err
    assert not out.exists()
    code, _, err = _run(capsys, "make-sample-bag", video, "--out", out, "--first", "-2")
    assert code == 2 and "first -2: frame indices start at 0" in err
    assert not out.exists()


def test_ground_truth_without_a_class_or_with_a_foreign_one_is_named():
    manifest = load_manifest(MODEL_DIR)

    def det(results):
        centre = types.SimpleNamespace(position=types.SimpleNamespace(x=5.0, y=5.0))
        box = types.SimpleNamespace(center=centre, size_x=4.0, size_y=4.0)
        return types.SimpleNamespace(bbox=box, results=results)

    def hypothesis(label):
        return [types.SimpleNamespace(hypothesis=types.SimpleNamespace(class_id=label))]

    where = "/cam/truth at 1.0"
    found = _truth_detections(
        types.SimpleNamespace(detections=[det(hypothesis("car"))]), manifest, where
    )
    assert found.class_ids.tolist() == [manifest.classes.index("car")]
    with pytest.raises(
        PerceptionError, match=r"^/cam/truth at 1\.0: a ground-truth detection without a class"
    ):
        _truth_detections(types.SimpleNamespace(detections=[det([])]), manifest, where)
    with pytest.raises(
        PerceptionError,
        match=r"^/cam/truth at 1\.0: ground-truth label not in the model .*'pedestrian'",
    ):
        _truth_detections(
            types.SimpleNamespace(detections=[det(hypothesis("pedestrian"))]), manifest, where
        )


def test_frames_a_fitted_input_does_not_fit_are_counted(tmp_path, capsys, frames):
    """A model whose input the build trimmed to 4:3 frames, replayed on a square camera's:
    every frame still gets its detections, and the metrics and summary say why they are
    less faithful than the original's."""
    pytest.importorskip("torch", reason="fitting the input needs torch ([torch] extra)")
    model = fitted_detector_on(tmp_path / "model", frames).manifest.path
    square = _write_video(tmp_path / "square.avi", [f[:, :576] for f in frames[:FRAMES]])
    bag = _sample(capsys, square, tmp_path / "in")
    metrics_path = tmp_path / "metrics.json"
    code, stdout, err = _run(
        capsys, "replay", bag, "--out", tmp_path / "out", "--metrics", metrics_path,
        "--model", model,
    )  # fmt: skip
    assert code == 0, err
    metrics = json.loads(metrics_path.read_text())
    assert [t["unfitted_frames"] for t in metrics["topics"].values()] == [FRAMES]
    assert metrics["unfitted"].startswith("576x576 frames do not fit the 416x352 input")
    assert f"{FRAMES} frames less faithful: 576x576 frames do not fit" in stdout
