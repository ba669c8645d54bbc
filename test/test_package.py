"""package.xml declares, as rosdep keys, everything the node and replay import at run time.

colcon never installs setup.py's install_requires: on a ROS machine `rosdep install` reads
package.xml only, so an import missing there is a node that cannot start.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from compressed_perception.ros.convert import VISION_TYPE_NAMES

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_XML = ROOT / "package.xml"
README = ROOT / "README.md"
NODE_PY = ROOT / "compressed_perception" / "ros" / "node.py"
LAUNCH_FILES = sorted((ROOT / "launch").glob("*.launch.py"))

# Python import -> rosdep key: a ROS package, or a key of ros/rosdistro rosdep/python.yaml.
# None: rosdistro has no key (checked there); the README says what to pip install.
ROSDEP_KEYS: dict[str, str | None] = {
    "rclpy": "rclpy",
    "rcl_interfaces": "rcl_interfaces",
    "sensor_msgs": "sensor_msgs",
    "std_msgs": "std_msgs",
    "vision_msgs": "vision_msgs",
    "geometry_msgs": "geometry_msgs",
    "diagnostic_msgs": "diagnostic_msgs",
    "launch": "launch",
    "launch_ros": "launch_ros",
    "ament_index_python": "ament_index_python",
    "yaml": "python3-yaml",
    "numpy": "python3-numpy",
    "cv2": "python3-opencv",
    "onnxruntime": "python3-onnxruntime-pip",
    "rosbags": "python3-rosbags-pip",
    "openvino": None,  # optional backend
    "pycocotools": None,  # replay --reference / --ground-truth metrics
    "cyclonedds": None,  # the DDS transport (no ROS needed there)
}
PIP_NAMES = {"openvino": "openvino", "pycocotools": "pycocotools", "cyclonedds": "cyclonedds"}
TEST_KEYS = {"pytest": "python3-pytest", "hypothesis": "python3-hypothesis"}

# Runs the node's and replay's code paths (less rclpy) and prints the distributions of
# the modules it imported (not those Python loaded at start-up): what a vehicle needs
# installed besides ROS itself.
PROBE = """
import importlib, json, sys
from importlib.metadata import packages_distributions
startup = set(sys.modules)
for module in {modules}:
    importlib.import_module(module)
import compressed_perception.replay.replay
from compressed_perception.ros.config import NodeConfig
from compressed_perception.ros.core import detector_from_config
detector_from_config(NodeConfig(backend="onnxruntime"))
installed = packages_distributions()
loaded = {{m.split(".")[0] for m in set(sys.modules) - startup}} & set(installed)
print(json.dumps({{m: installed[m] for m in loaded - {{"compressed_perception"}}}}))
"""


def _depends(*tags: str) -> set[str]:
    root = ET.parse(PACKAGE_XML).getroot()
    return {element.text.strip() for tag in tags for element in root.iter(tag)}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"compressed_perception"}


def _with_requirements(distributions: set[str]) -> set[str]:
    """The distributions and, transitively, those they require (as installed here)."""
    found: set[str] = set()
    todo = [canonicalize_name(d) for d in distributions]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return found


def test_every_key_in_the_table_is_declared():
    runtime = _depends("exec_depend", "depend")
    missing = {module: key for module, key in ROSDEP_KEYS.items() if key and key not in runtime}
    assert missing == {}
    tests = _depends("test_depend", "depend", "exec_depend")
    assert set(TEST_KEYS.values()) - tests == set()


def test_the_rclpy_node_and_launch_files_import_only_declared_packages():
    imported = _imports(NODE_PY).union(*(_imports(path) for path in LAUNCH_FILES))
    looked_up = {name.split("/")[0] for name in VISION_TYPE_NAMES.values()}
    assert "geometry_msgs" in looked_up  # node.py imports it by name, not by statement
    needed = imported | looked_up | {"diagnostic_msgs"}
    assert needed - set(ROSDEP_KEYS) == set()


def test_the_runtime_imports_of_node_and_replay_are_in_the_table():
    ours = sorted(
        node.module
        for node in ast.walk(ast.parse(NODE_PY.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("compressed_")
    )
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(modules=ours)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    imported: dict[str, list[str]] = json.loads(result.stdout)
    assert {"cv2", "numpy", "onnxruntime", "rosbags", "yaml"} <= set(imported)
    declared = {imported[m][0] for m in ROSDEP_KEYS if m in imported}
    covered = _with_requirements(declared)  # a pip key brings its own requirements
    uncovered = {
        m for m, dists in imported.items() if not {canonicalize_name(d) for d in dists} & covered
    }
    assert uncovered == set(), "add these to ROSDEP_KEYS and package.xml"


@pytest.mark.parametrize("module", [m for m, key in ROSDEP_KEYS.items() if key is None])
def test_the_readme_says_how_to_install_what_rosdep_cannot(module):
    section = README.read_text().split("## ROS 2 node", 1)[1].split("\n## ", 1)[0]
    assert f"pip install {PIP_NAMES[module]}" in section
