"""The rclpy node, its launch files and its parameter file.

Tests marked `ros` need rclpy (a ROS 2 Humble or Jazzy machine) and skip without it.
The rest run anywhere: they read the launch files and node.py as source (AST), because
launch, launch_ros and rclpy cannot be imported without ROS.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from compressed_perception.ros.config import (
    BACKEND_CHOICES,
    QOS_CHOICES,
    NodeConfig,
    load_config,
    parameter_defaults,
)

ROOT = Path(__file__).resolve().parents[1]
PERCEPTION_LAUNCH = ROOT / "launch" / "perception.launch.py"
REPLAY_LAUNCH = ROOT / "launch" / "replay.launch.py"
PARAMS_FILE = ROOT / "config" / "perception.yaml"
NODE_PY = ROOT / "compressed_perception" / "ros" / "node.py"
RCLPY_MISSING = "rclpy (ROS 2) is not installed: the rclpy node runs only on a ROS 2 machine"
ISSUE_ARGUMENTS = {
    "model",
    "backend",
    "cameras",
    "compressed",
    "qos",
    "score_threshold",
    "nms_threshold",
    "classes",
    "publish_debug_image",
    "use_sim_time",
}
ROS_MODULES = {
    "rclpy",
    "rcl_interfaces",
    "sensor_msgs",
    "std_msgs",
    "vision_msgs",
    "diagnostic_msgs",
    "launch",
    "launch_ros",
}
FIELDS = {f.name for f in fields(NodeConfig)}


# --- source-level checks: run everywhere ---------------------------------------------------


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    def called(node: ast.Call) -> str:
        func = node.func
        return func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")

    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and called(n) == name]


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _declared(tree: ast.AST) -> dict[str, ast.Call]:
    """DeclareLaunchArgument calls whose name is a literal, by name."""
    calls = _calls(tree, "DeclareLaunchArgument")
    return {c.args[0].value: c for c in calls if c.args and isinstance(c.args[0], ast.Constant)}


def _assigned(tree: ast.Module, name: str) -> ast.expr:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return node.value
    raise AssertionError(f"no module-level {name} = ...")


def _imported(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", [PERCEPTION_LAUNCH, REPLAY_LAUNCH])
def test_launch_file_parses_and_defines_generate_launch_description(path: Path) -> None:
    tree = _tree(path)
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in functions


def test_perception_launch_declares_the_node_parameters() -> None:
    declared = _declared(_tree(PERCEPTION_LAUNCH))
    assert set(declared) == ISSUE_ARGUMENTS | {"params_file"}
    assert ISSUE_ARGUMENTS - {"use_sim_time"} <= FIELDS
    for name, call in declared.items():
        default = _keyword(call, "default_value")
        assert default is not None, f"{name}: no default_value"
        if name != "params_file":  # empty: the params file's value stands
            assert isinstance(default, ast.Constant) and default.value == "", name


def test_perception_launch_overrides_have_the_parameter_types() -> None:
    tree = _tree(PERCEPTION_LAUNCH)
    overrides = _assigned(tree, "OVERRIDES")
    assert isinstance(overrides, ast.Dict)
    pairs = zip(overrides.keys, overrides.values, strict=True)
    types = {ast.literal_eval(k): ast.unparse(v) for k, v in pairs}
    assert set(types) == ISSUE_ARGUMENTS
    expected = {"use_sim_time": "bool"}
    for name in ISSUE_ARGUMENTS - {"use_sim_time"}:
        default = getattr(NodeConfig(), name)
        expected[name] = "list[str]" if isinstance(default, tuple) else type(default).__name__
    assert types == expected


def test_perception_launch_choices_match_the_config() -> None:
    declared = _declared(_tree(PERCEPTION_LAUNCH))
    for name, choices in (("qos", QOS_CHOICES), ("backend", BACKEND_CHOICES)):
        assert ast.literal_eval(_keyword(declared[name], "choices")) == ["", *choices]


def test_perception_launch_runs_the_console_script_with_the_params_file() -> None:
    tree = _tree(PERCEPTION_LAUNCH)
    (node,) = _calls(tree, "Node")
    literal = {k.arg: k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)}
    assert literal == {
        "package": "compressed_perception",
        "executable": "perception_node",
        "name": "perception_node",
        "output": "screen",
    }
    (function,) = [
        f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and node in ast.walk(f)
    ]
    source = ast.unparse(function)  # the params file first, then the overrides that were given
    assert "LaunchConfiguration('params_file').perform(context)" in source
    assert "for name, value_type in OVERRIDES.items()" in source
    assert (
        "perception_node = compressed_perception.ros.node:main" in (ROOT / "setup.py").read_text()
    )


def test_replay_launch_forwards_every_perception_argument() -> None:
    tree = _tree(REPLAY_LAUNCH)
    forwarded = set(ast.literal_eval(_assigned(tree, "FORWARDED")))
    assert forwarded | {"params_file", "use_sim_time"} == set(_declared(_tree(PERCEPTION_LAUNCH)))
    declared = _declared(tree)
    assert _keyword(declared["bag"], "default_value") is None  # required
    assert ast.literal_eval(_keyword(declared["rate"], "default_value")) == "1.0"
    assert ast.literal_eval(_keyword(declared["loop"], "default_value")) == "false"
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    assert {"ros2", "bag", "play", "--clock", "--rate", "--loop", "perception.launch.py"} <= (
        strings
    )
    assert "'use_sim_time': 'true'" in ast.unparse(tree)


def test_params_file_holds_the_node_config_defaults() -> None:
    assert load_config(PARAMS_FILE) == NodeConfig()
    raw = yaml.safe_load(PARAMS_FILE.read_text())["/**/perception_node"]["ros__parameters"]
    defaults = parameter_defaults()
    assert list(raw) == list(defaults)
    for name, value in raw.items():
        # rclpy types parameters statically: an int where a float is declared is refused
        assert type(value) is type(defaults[name]), name
        assert value == defaults[name], name


def test_params_file_comments_every_parameter() -> None:
    lines = PARAMS_FILE.read_text().splitlines()
    for name in parameter_defaults():
        (index,) = [i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:")]
        assert lines[index - 1].strip().startswith("#"), f"{name} has no comment line"


def test_node_module_parses_and_never_imports_torch() -> None:
    imported = _imported(_tree(NODE_PY))
    assert "torch" not in imported
    assert {"rclpy", "sensor_msgs", "vision_msgs", "diagnostic_msgs"} <= imported


def test_only_the_node_module_imports_ros() -> None:
    package = ROOT / "compressed_perception"
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported(_tree(path)) & ROS_MODULES)
        for path in package.rglob("*.py")
        if path != NODE_PY
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_node_dependencies_import_without_torch() -> None:
    """What node.py imports from this package must not pull torch in (the vehicle has none)."""
    modules = sorted(
        node.module
        for node in ast.walk(_tree(NODE_PY))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("compressed_")
    )
    code = f"import sys\nimport {', '.join(modules)}\nprint('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


# --- rclpy: only on a ROS 2 machine ----------------------------------------------------------


@pytest.fixture
def ros():
    rclpy = pytest.importorskip("rclpy", reason=RCLPY_MISSING)
    rclpy.init()
    yield rclpy
    rclpy.try_shutdown()


def _node(ros, manifest_path: Path, ros_args: list[str] | None = None, **values):
    from rclpy.parameter import Parameter

    from compressed_perception.ros.node import PerceptionNode

    values.setdefault("model", str(manifest_path))
    overrides = [Parameter(name, value=value) for name, value in values.items()]
    arguments = ["--ros-args", *ros_args] if ros_args else None
    return PerceptionNode(parameter_overrides=overrides, cli_args=arguments)


def test_ros_node_topics_and_qos(ros, manifest_path: Path) -> None:
    from rclpy.qos import ReliabilityPolicy

    cameras = ["/cam_front/image_raw", "/cam_left/image_raw"]
    node = _node(ros, manifest_path, cameras=cameras, compressed=True, publish_debug_image=True)
    try:
        inputs = {s.topic_name: s for s in node.subscriptions}
        assert set(inputs) == {f"{c}/compressed" for c in cameras}
        for subscription in inputs.values():
            assert subscription.msg_type.__name__ == "CompressedImage"
            assert subscription.qos_profile.depth == 1
            assert subscription.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT
        outputs = {p.topic_name: p for p in node.publishers}
        expected = {
            "/cam_front/detections": "Detection2DArray",
            "/cam_left/detections": "Detection2DArray",
            "/cam_front/debug_image": "Image",
            "/cam_left/debug_image": "Image",
            "/diagnostics": "DiagnosticArray",
        }
        for topic, type_name in expected.items():
            assert outputs[topic].msg_type.__name__ == type_name
            assert outputs[topic].qos_profile.reliability == ReliabilityPolicy.RELIABLE
            assert outputs[topic].qos_profile.depth == 10
        assert node.config.classes == ()
    finally:
        node.core.stop()
        node.destroy_node()


def test_ros_node_parameters_are_read_only_and_ranged(ros, manifest_path: Path) -> None:
    from rclpy.parameter import Parameter
    from rclpy.qos import ReliabilityPolicy

    node = _node(ros, manifest_path, qos="reliable", classes=["person"])
    try:
        (subscription,) = [s for s in node.subscriptions if s.topic_name.startswith("/camera")]
        assert subscription.qos_profile.reliability == ReliabilityPolicy.RELIABLE
        assert node.config.qos == "reliable" and node.config.classes == ("person",)
        descriptor = node.describe_parameter("score_threshold")
        assert descriptor.read_only
        assert descriptor.floating_point_range[0].to_value == 1.0
        assert node.describe_parameter("max_detections").integer_range[0].from_value == 1
        assert node.has_parameter("use_sim_time")  # declared by rclpy itself
        result = node.set_parameters([Parameter("score_threshold", value=0.9)])[0]
        assert not result.successful
    finally:
        node.core.stop()
        node.destroy_node()


def test_ros_node_refuses_bad_parameters(ros, manifest_path: Path) -> None:
    from rclpy.exceptions import ParameterException

    from compressed_perception.errors import ConfigError

    with pytest.raises(ConfigError, match="qos"):
        _node(ros, manifest_path, qos="fast")
    with pytest.raises(ParameterException):
        _node(ros, manifest_path, score_threshold=1.5)
    with pytest.raises(ParameterException):
        _node(ros, manifest_path, score_threshold=1)  # int for a double parameter


def test_ros_node_publishes_detections_for_a_frame(ros, manifest_path: Path, frames) -> None:
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.node import Node
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header
    from vision_msgs.msg import Detection2DArray

    node = _node(ros, manifest_path, cameras=["/cam_front/image_raw"], qos="reliable")
    probe = Node("perception_probe")
    received = []
    probe.create_subscription(Detection2DArray, "/cam_front/detections", received.append, 10)
    camera = probe.create_publisher(Image, "/cam_front/image_raw", 10)
    executor = MultiThreadedExecutor()
    executor.add_node(node)
    executor.add_node(probe)
    frame = frames[0]
    height, width = frame.shape[:2]
    image = Image(
        header=Header(frame_id="cam_front"),
        height=height,
        width=width,
        encoding="bgr8",
        is_bigendian=0,
        step=width * 3,
        data=frame.tobytes(),
    )
    image.header.stamp.sec = 42
    try:
        deadline = time.monotonic() + 30.0
        while not received and time.monotonic() < deadline:
            camera.publish(image)
            executor.spin_once(timeout_sec=0.2)
        assert received, "no Detection2DArray within 30 s"
        assert received[0].header.frame_id == "cam_front"
        assert received[0].header.stamp.sec == 42
        assert received[0].detections  # the committed frames show people
    finally:
        node.core.stop()
        executor.shutdown()
        probe.destroy_node()
        node.destroy_node()


def test_ros_node_refuses_an_unknown_parameter(ros, manifest_path: Path, tmp_path: Path) -> None:
    from compressed_perception.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown parameters \['score_treshold'\]"):
        _node(ros, manifest_path, score_treshold=0.5)
    params = tmp_path / "typo.yaml"
    params.write_text("/**/perception_node:\n  ros__parameters:\n    nms_treshold: 0.5\n")
    with pytest.raises(ConfigError, match=r"unknown parameters \['nms_treshold'\]"):
        _node(ros, manifest_path, ["--params-file", str(params)])
    node = _node(ros, manifest_path, use_sim_time=True)  # ROS's own: allowed
    node.core.stop()
    node.destroy_node()


@pytest.mark.parametrize("namespace", ["/", "/ego", "/ego/front"])
def test_ros_node_reads_the_params_file_in_a_namespace(
    ros, manifest_path: Path, tmp_path: Path, namespace: str
) -> None:
    params = tmp_path / "params.yaml"
    data = yaml.safe_load(PARAMS_FILE.read_text())
    data["/**/perception_node"]["ros__parameters"].update(
        model=str(manifest_path), score_threshold=0.55, cameras=["cam/image_raw", "/abs/image"]
    )
    params.write_text(yaml.safe_dump(data))
    node = _node(ros, manifest_path, ["-r", f"__ns:={namespace}", "--params-file", str(params)])
    try:
        assert node.get_namespace() == namespace
        assert node.config.score_threshold == 0.55
        base = namespace.rstrip("/")
        assert {s.topic_name for s in node.subscriptions} == {f"{base}/cam/image_raw", "/abs/image"}
        outputs = {p.topic_name for p in node.publishers}
        assert {f"{base}/cam/detections", "/abs/detections"} <= outputs
    finally:
        node.core.stop()
        node.destroy_node()
