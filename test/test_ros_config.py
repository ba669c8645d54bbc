"""Topic names, parameter files and parameter checks, as rcl and rclpy resolve them.

Shared by the rclpy node and the DDS transport, so both configure the node the same way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from compressed_perception.errors import ConfigError
from compressed_perception.ros.config import (
    NodeConfig,
    load_config,
    node_name_matches,
    node_sections,
    unknown_parameters,
)
from compressed_perception.ros.names import check_topic, output_topic, resolve_topic

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "nanodet_g"
PARAMS_FILE = ROOT / "config" / "perception.yaml"
NAMESPACES = ("/", "/ego", "/ego/front")


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- topic names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("/camera/image_raw", "/camera/detections"),
        ("/camera/image_raw/compressed", "/camera/detections"),
        ("/carla/ego_vehicle/rgb_front/image", "/carla/ego_vehicle/rgb_front/detections"),
        ("camera/image_raw", "camera/detections"),  # relative stays relative
        ("image", "detections"),  # the node's own namespace
        ("~/image", "~/detections"),
    ],
)
def test_output_topic_sits_beside_the_camera(topic, expected):
    assert output_topic(topic) == expected


@pytest.mark.parametrize(
    ("name", "namespace", "expected"),
    [
        ("camera/image_raw", "/", "/camera/image_raw"),
        ("camera/image_raw", "/ego", "/ego/camera/image_raw"),
        ("camera/detections", "/ego/front", "/ego/front/camera/detections"),
        ("/camera/image_raw", "/ego", "/camera/image_raw"),
        ("~/image", "/ego", "/ego/perception_node/image"),
        ("~", "/", "/perception_node"),
    ],
)
def test_resolve_topic_like_rcl(name, namespace, expected):
    assert resolve_topic(name, namespace) == expected


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "is empty"),
        ("/", "is empty"),
        ("~cam", "'~' not followed by '/'"),
        ("cam//image", "parts of letters"),
        ("cam/image/", "parts of letters"),
        ("2cam/image", "parts of letters"),
        ("cam/im age", "parts of letters"),
    ],
)
def test_invalid_topic_names_are_refused(name, problem):
    with pytest.raises(ConfigError, match=f"^cameras: topic name {name!r} .*{problem}"):
        check_topic(name, "cameras")
    with pytest.raises(ConfigError, match="cameras: topic name"):
        NodeConfig(cameras=(name,))


def test_detections_topic_must_be_relative():
    with pytest.raises(ConfigError, match="detections_topic: '/out' must be relative"):
        NodeConfig(detections_topic="/out")


# --- two cameras, one topic ---------------------------------------------------------------


@pytest.mark.parametrize(
    "cameras",
    [
        ("/cam/image_raw", "/cam/image_rect"),
        ("cam/image_raw", "cam/image_rect"),
        ("/front/image", "/cam/image_raw", "/cam/image_raw/compressed"),
    ],
)
def test_two_cameras_in_one_namespace_are_refused_naming_both(cameras):
    first, second = cameras[-2:]
    with pytest.raises(ConfigError) as error:
        NodeConfig(cameras=cameras)
    message = str(error.value)
    assert f"{first!r} and {second!r}" in message
    assert "detections topic" in message
    assert output_topic(first) in message


def test_the_same_camera_twice_is_refused_on_its_input():
    with pytest.raises(ConfigError, match="'/cam/image' and '/cam/image' share the input topic"):
        NodeConfig(cameras=("/cam/image", "/cam/image"))


def test_shared_topics_are_checked_again_where_the_node_runs():
    """`cam/image_raw` and `/ego/cam/image_rect` only meet once the node is in /ego."""
    config = NodeConfig(cameras=("cam/image_raw", "/ego/cam/image_rect"))
    config.check_topics(lambda name: resolve_topic(name, "/"))  # distinct in /
    with pytest.raises(ConfigError, match="share the detections topic /ego/cam/detections"):
        config.check_topics(lambda name: resolve_topic(name, "/ego"))


# --- parameter files: node names as rcl matches them --------------------------------------


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_the_params_file_applies_in_any_namespace(tmp_path, namespace):
    changed = yaml.safe_load(PARAMS_FILE.read_text())
    (key,) = changed
    assert key == "/**/perception_node"
    changed[key]["ros__parameters"]["score_threshold"] = 0.5
    path = _write(tmp_path, changed)
    assert load_config(path, namespace=namespace).score_threshold == 0.5
    assert load_config(PARAMS_FILE, namespace=namespace) == NodeConfig()


@pytest.mark.parametrize(
    ("key", "applies"),
    [
        ("perception_node", (True, False, False)),  # relative key: /perception_node only
        ("/perception_node", (True, False, False)),
        ("/**", (True, True, True)),
        ("/**/perception_node", (True, True, True)),
        ("/*/perception_node", (False, True, False)),  # exactly one namespace level
        ("/*", (True, False, False)),
        ("ego/perception_node", (False, True, False)),
        ("/ego/*", (False, True, False)),
        ("/ego/front/perception_node", (False, False, True)),
        ("/**/other_node", (False, False, False)),
    ],
)
def test_node_names_match_like_rclpy(tmp_path, key, applies):
    path = _write(tmp_path, {key: {"ros__parameters": {"nms_threshold": 0.3}}})
    for namespace, expected in zip(NAMESPACES, applies, strict=True):
        fqn = resolve_topic("perception_node", namespace)
        assert node_name_matches(key, fqn) is expected, (key, fqn)
        if expected:
            assert load_config(path, namespace=namespace).nms_threshold == 0.3
        else:
            with pytest.raises(ConfigError, match=f"no .* section applies to {fqn}"):
                load_config(path, namespace=namespace)


def test_later_sections_override_earlier_ones_per_parameter(tmp_path):
    data = {
        "/**": {"ros__parameters": {"score_threshold": 0.2, "use_sim_time": True}},
        "/**/perception_node": {"ros__parameters": {"score_threshold": 0.4, "threads": 2}},
        "/ego/perception_node": {"ros__parameters": {"threads": 3}},
    }
    path = _write(tmp_path, data)
    in_ego = load_config(path, namespace="/ego")
    assert (in_ego.score_threshold, in_ego.threads) == (0.4, 3)
    at_root = load_config(path)
    assert (at_root.score_threshold, at_root.threads) == (0.4, 2)


def test_nested_node_keys_join_with_slashes(tmp_path):
    data = {"ego": {"front": {"perception_node": {"ros__parameters": {"threads": 4}}}}}
    path = _write(tmp_path, data)
    assert [key for key, _ in node_sections(data, "x")] == ["ego/front/perception_node"]
    assert load_config(path, namespace="/ego/front").threads == 4


def test_parameter_namespaces_flatten_with_dots(tmp_path):
    data = {
        "/**": {
            "ros__parameters": {
                "qos_overrides": {"/tf": {"publisher": {"depth": 5}}},
                "use_sim_time": True,
            }
        }
    }
    assert dict(node_sections(data, "x"))["/**"] == {
        "qos_overrides./tf.publisher.depth": 5,
        "use_sim_time": True,
    }
    assert load_config(_write(tmp_path, data)) == NodeConfig()


def test_params_without_a_node_name_are_refused(tmp_path):
    path = _write(tmp_path, {"ros__parameters": {"threads": 1}})
    with pytest.raises(ConfigError, match="'ros__parameters' without a node name"):
        load_config(path)


# --- unknown parameters: refused on both transports ---------------------------------------


def test_a_misspelled_parameter_is_refused_by_name(tmp_path):
    path = _write(tmp_path, {"/**/perception_node": {"ros__parameters": {"score_treshold": 0.5}}})
    with pytest.raises(ConfigError, match=r"unknown parameters \['score_treshold'\]"):
        load_config(path)


def test_ros_own_parameters_are_not_unknown():
    names = [
        "use_sim_time",
        "start_type_description_service",
        "qos_overrides./camera/image_raw.subscription.depth",
        "score_threshold",
        "score_treshold",
        "qos_override",
    ]
    assert unknown_parameters(names) == ["qos_override", "score_treshold"]


# --- values a params file may hold that no node can use ----------------------------------


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("diagnostics_period", float("nan"), "must be a finite number"),
        ("diagnostics_period", float("inf"), "must be a finite number"),
        ("max_detections", float("inf"), "must be a finite number"),
        ("max_detections", 1.5, "must be a whole number"),
        ("threads", -1, "threads: must be >= 0"),
        ("backend", "torch", "backend: 'torch' is not one of auto, tensorrt"),
    ],
)
def test_unusable_values_are_refused_by_name(tmp_path, name, value, problem):
    path = _write(tmp_path, {"/**/perception_node": {"ros__parameters": {name: value}}})
    with pytest.raises(ConfigError, match=problem):
        load_config(path)


def test_a_model_only_pytorch_runs_is_refused_by_the_node(tmp_path):
    from compressed_perception.ros.core import detector_from_config

    data = json.loads((MODEL_DIR / "manifest.json").read_text())
    data["artifacts"] = {"torch": data["artifacts"]["torch"]}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    shutil.copyfile(MODEL_DIR / "nanodet_g.pt", tmp_path / "nanodet_g.pt")
    with pytest.raises(ConfigError, match=r"manifest\.json runs only on torch; the node runs"):
        detector_from_config(NodeConfig(model=str(tmp_path)))
