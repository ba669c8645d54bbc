"""CARLA without a server: projection and visibility on synthetic geometry with known answers,
the class mapping, the recorded bag, and the error when no server answers."""

from __future__ import annotations

import ast
import math
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from compressed_perception.carla import simulate
from compressed_perception.carla.classes import coco_class, is_stop_sign
from compressed_perception.carla.geometry import (
    box_corners,
    instance_ids,
    intrinsics,
    project_box,
    semantic_pixels,
    visible_pixels,
)
from compressed_perception.cli import main
from compressed_perception.coco import COCO_CLASSES
from compressed_perception.errors import ConfigError
from compressed_perception.runtime.detector import Detector
from compressed_perception.runtime.postprocess import Detections

from conftest import MODEL_DIR

W, H = 800, 600
K = intrinsics(W, H, 90.0)  # focal length 400 px, principal point (400, 300)
IDENTITY = np.eye(4)


def test_intrinsics_from_fov():
    assert K[0, 0] == pytest.approx(400.0)
    assert K[1, 1] == pytest.approx(400.0)
    assert (K[0, 2], K[1, 2]) == (400.0, 300.0)
    assert intrinsics(1000, 500, 60.0)[0, 0] == pytest.approx(500 / math.tan(math.radians(30)))
    with pytest.raises(ConfigError, match="not a valid pinhole camera"):
        intrinsics(800, 600, 180.0)


def test_box_straight_ahead_projects_to_known_pixels():
    """A 2 m wide, 1 m tall box 10 m ahead: x in 400 +- 40 px, y in 300 +- 20 px."""
    corners = box_corners(np.array([10.0, 0, 0]), np.array([0.5, 1.0, 0.5]), IDENTITY)
    box = project_box(corners, IDENTITY, K, W, H)
    # near face at 9.5 m is the widest: 400 * 1 / 9.5 = 42.1 px, 400 * 0.5 / 9.5 = 21.05 px
    np.testing.assert_allclose(
        box, [400 - 42.105, 300 - 21.053, 400 + 42.105, 300 + 21.053], atol=0.01
    )


def test_unreal_axes_right_is_image_right_and_up_is_image_up():
    right_up = box_corners(np.array([10.0, 3.0, 2.0]), np.array([0.01, 0.1, 0.1]), IDENTITY)
    box = project_box(right_up, IDENTITY, K, W, H)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    assert cx == pytest.approx(400 + 400 * 3 / 10, abs=0.5)  # right of centre
    assert cy == pytest.approx(300 - 400 * 2 / 10, abs=0.5)  # above centre


def test_camera_pose_is_applied():
    """The same box seen from a camera 5 m further back looks half as big."""
    corners = box_corners(np.array([10.0, 0, 0]), np.array([0.01, 1.0, 1.0]), IDENTITY)
    near = project_box(corners, IDENTITY, K, W, H)
    camera_back = np.eye(4)
    camera_back[0, 3] = -10.0  # camera at x = -10
    far = project_box(corners, np.linalg.inv(camera_back), K, W, H)
    assert (far[2] - far[0]) == pytest.approx((near[2] - near[0]) / 2, rel=0.01)


def test_rotated_actor_box():
    """A 4 m long car 20 m ahead: 1 m wide when it drives away, 4 m wide when yawed 90 deg."""
    away = np.eye(4)
    away[0, 3] = 20.0
    across = np.array([[0, -1, 0, 20.0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float64)
    extent = np.array([2.0, 0.5, 0.5])
    narrow = project_box(box_corners(np.zeros(3), extent, away), IDENTITY, K, W, H)
    wide = project_box(box_corners(np.zeros(3), extent, across), IDENTITY, K, W, H)
    assert narrow[2] - narrow[0] == pytest.approx(2 * 400 * 0.5 / 18, abs=0.01)  # nearest face 18 m
    assert wide[2] - wide[0] == pytest.approx(2 * 400 * 2.0 / 19.5, abs=0.01)  # nearest 19.5 m


def test_behind_outside_and_straddling_boxes():
    behind = box_corners(np.array([-10.0, 0, 0]), np.array([1.0, 1.0, 1.0]), IDENTITY)
    assert project_box(behind, IDENTITY, K, W, H) is None
    far_left = box_corners(np.array([10.0, -50.0, 0]), np.array([1.0, 1.0, 1.0]), IDENTITY)
    assert project_box(far_left, IDENTITY, K, W, H) is None
    # a long truck the camera is beside and partly in front of: clipped, not mirrored
    straddling = box_corners(np.array([2.0, 3.0, 0]), np.array([6.0, 1.0, 1.5]), IDENTITY)
    box = project_box(straddling, IDENTITY, K, W, H)
    assert box is not None
    assert box[0] > 400  # all of it right of centre
    # it runs off the right edge, and fills the image's height: clipped to it
    assert box.tolist() == pytest.approx([500.0, 0.0, W, H])


def test_instance_ids_and_visibility():
    """G is the actor id's low byte, B its high byte (CARLA's instance camera)."""
    bgra = np.zeros((H, W, 4), np.uint8)
    actor = 300  # G = 44, B = 1
    bgra[100:200, 100:150, 1] = actor & 0xFF
    bgra[100:200, 100:150, 0] = actor >> 8
    bgra[150:200, 100:150, 1] = 7  # another actor occludes the lower half
    bgra[150:200, 100:150, 0] = 0
    ids = instance_ids(bgra)
    assert ids[120, 120] == 300
    assert ids[170, 120] == 7
    assert visible_pixels(ids, 300, np.array([90, 90, 160, 210])) == 50 * 50
    assert visible_pixels(ids, 300, np.array([0, 0, 50, 50])) == 0
    bgra[10:20, 10:30, 2] = 12  # a semantic tag in R, e.g. a traffic sign
    assert semantic_pixels(bgra, 12, np.array([0, 0, 25, 15])) == 5 * 15
    assert semantic_pixels(bgra, 18, np.array([0, 0, 25, 15])) == 0


@pytest.mark.parametrize(
    ("name", "expected"),
    [("BP_Stop_Sign_12", True), ("SM_stopsign_3", True), ("BP_SpeedLimit_30", False)],
)
def test_stop_signs_by_mesh_name(name, expected):
    assert is_stop_sign(name) is expected


@pytest.mark.parametrize(
    ("type_id", "base_type", "expected"),
    [
        ("walker.pedestrian.0012", "", "person"),
        ("vehicle.tesla.model3", "car", "car"),
        ("vehicle.carlamotors.carlacola", "truck", "truck"),
        ("vehicle.mitsubishi.fusorosa", "Bus", "bus"),
        ("vehicle.ford.ambulance", "van", "car"),
        ("vehicle.yamaha.yzf", "motorcycle", "motorcycle"),
        ("vehicle.gazelle.omafiets", "", "bicycle"),
        ("vehicle.audi.a2", "", "car"),
        ("traffic.traffic_light", "", None),  # from its light boxes instead
        ("traffic.stop", "", None),  # a trigger volume, not the sign
        ("traffic.speed_limit.30", "", None),
        ("sensor.camera.rgb", "", None),
        ("spectator", "", None),
    ],
)
def test_class_mapping(type_id, base_type, expected):
    assert coco_class(type_id, base_type) == expected
    assert expected is None or expected in COCO_CLASSES


def test_recorded_bag_replays_against_its_ground_truth(tmp_path, frames):
    """A recording made as `carla --out` does is scored again by `replay --ground-truth`."""
    pytest.importorskip("rosbags", reason="recording needs rosbags (python3-rosbags-pip)")
    pytest.importorskip("pycocotools", reason="scoring needs pycocotools (pip install)")
    from compressed_perception.carla.record import recording, topics
    from compressed_perception.replay.replay import ReplayOptions, replay

    found = Detector.open(MODEL_DIR / "manifest.json", "onnxruntime").detect(frames[0]).detections
    truth = found.where(found.class_ids == COCO_CLASSES.index("person"))  # every pedestrian
    out = tmp_path / "sim"
    with recording(out, "ego_vehicle", ["rgb_front"], COCO_CLASSES, overwrite=False) as recorder:
        for i in range(3):
            recorder.record("rgb_front", 10.0 + 0.05 * i, frames[0], truth, Detections.empty())
    names = topics("ego_vehicle", "rgb_front")
    metrics = replay(
        out,
        tmp_path / "scored",
        ReplayOptions(
            model=MODEL_DIR, topics=(names["image"],), ground_truth=names["ground_truth"]
        ),
    )
    assert metrics["frames"] == 3
    assert metrics["ground_truth"]["ground_truth_boxes"] == 3 * len(truth) >= 9
    assert metrics["ground_truth"]["frames_without_ground_truth"] == 0
    # the recorded JPEG frames, detected again, match the recorded truth
    assert metrics["ground_truth"]["map50"] > 0.95
    assert metrics["ground_truth"]["per_class"]["person"] > 0.7


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_no_server_is_a_clear_error(capsys, tmp_path):
    pytest.importorskip("carla", reason="the carla client (PyPI 'carla') is not installed")
    port = _closed_port()
    code = main(["carla", "--port", str(port), "--timeout", "1", "--out", str(tmp_path / "bag")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"no CARLA server answered at 127.0.0.1:{port} within 1 s (client 0.9.16)" in err
    assert "CarlaUE4.sh -RenderOffScreen" in err
    assert not (tmp_path / "bag").exists()


def test_an_unknown_host_is_a_clear_error(capsys, tmp_path):
    pytest.importorskip("carla", reason="the carla client (PyPI 'carla') is not installed")
    argv = ["carla", "--host", "no.such.host.invalid", "--timeout", "1"]
    code = main([*argv, "--out", str(tmp_path / "bag")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1  # one line, no traceback
    assert "no CARLA server answered at no.such.host.invalid:2000 within 1 s" in err
    assert not (tmp_path / "bag").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"port": 70000}, "port: 70000 is outside 1..65535"),
        ({"port": 0}, "port: 0 is outside"),
        ({"timeout": -1.0}, "timeout: -1.0 seconds must be above 0"),
        ({"timeout": math.nan}, "timeout: nan"),
        ({"frames": 0}, "frames: must be at least 1, got 0"),
        ({"walkers": -1}, "walkers -1: not below 0"),
        ({"cameras": ("rgb_front", "rgb_front")}, "must name each camera once"),
        ({"cameras": ()}, "must name each camera once"),
        ({"cameras": ("rgb_front", "rgb_top")}, "rgb_top unknown; the mountings are rgb_front"),
    ],
)
def test_bad_options_are_refused_before_connecting(options, message):
    with pytest.raises(ConfigError, match=message):
        simulate.CarlaOptions(**options)


@pytest.mark.parametrize(
    ("version", "expected"),
    [("0.9.16", (0, 9, 16)), ("0.9.15-12-gabc", (0, 9, 15)), ("0.10.0", (0, 10, 0)), ("x", ())],
)
def test_release_numbers(version, expected):
    assert simulate.release(version) == expected


class _Client:
    """The two version calls of carla.Client, answering `version` for both sides."""

    version = "0.9.15"

    def __init__(self, host, port):
        self.address = (host, port)

    def set_timeout(self, seconds):
        self.timeout = seconds

    def get_client_version(self):
        return self.version

    def get_server_version(self):
        return self.version


def test_a_server_before_actor_ids_is_refused(monkeypatch):
    """A 0.9.15 server (and client) would score every object invisible: refused by name."""
    monkeypatch.setitem(sys.modules, "carla", type(sys)("carla"))
    monkeypatch.setattr(sys.modules["carla"], "Client", _Client, raising=False)
    with pytest.raises(simulate.CarlaError, match=r"127\.0\.0\.1:2000 is 0\.9\.15: its instance"):
        simulate.connect(simulate.CarlaOptions())
    monkeypatch.setattr(_Client, "version", "0.9.16")
    assert simulate.connect(simulate.CarlaOptions()).address == ("127.0.0.1", 2000)


def test_no_client_says_how_to_install_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "carla", None)  # `import carla` fails as if absent
    code = main(["carla", "--out", str(tmp_path / "bag")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1  # one line, no traceback
    assert err.startswith("compressed-perception: error: the CARLA Python client is not")
    assert "pip install 'compressed_perception[carla]'" in err
    assert not (tmp_path / "bag").exists()


def _carla_launch_helper():
    """`camera_topics` from launch/carla.launch.py, compiled alone: launch itself needs ROS."""
    path = Path(__file__).resolve().parents[1] / "launch" / "carla.launch.py"
    tree = ast.parse(path.read_text())
    helper = next(
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "camera_topics"
    )
    namespace = {"yaml": yaml}
    exec(compile(ast.Module([helper], []), str(path), "exec"), namespace)
    return namespace["camera_topics"]


def test_carla_launch_maps_camera_names_to_bridge_topics():
    """The launch file's own mapping, run here (launch itself needs ROS)."""
    camera_topics = _carla_launch_helper()
    assert camera_topics("ego_vehicle", "['rgb_front', 'rgb_left']") == str(
        ["/carla/ego_vehicle/rgb_front/image", "/carla/ego_vehicle/rgb_left/image"]
    )
    assert camera_topics("hero", "[rgb_front]") == "['/carla/hero/rgb_front/image']"
    with pytest.raises(ValueError, match="YAML list of camera names"):
        camera_topics("hero", "rgb_front")
