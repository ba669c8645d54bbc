"""Launch the perception node with config/perception.yaml and optional per-argument overrides.

    ros2 launch compressed_perception perception.launch.py \
        cameras:="['/cam_front/image_raw', '/cam_left/image_raw']" score_threshold:=0.5

Every argument except params_file defaults to '' (empty), which means "as in params_file":
only arguments given a value override the file. List arguments are YAML lists; class ids
in `classes` must be quoted (`classes:="['0', 'car']"`) because the parameter is a string
array. `classes:="[]"` reaches the node as an untyped empty list, read as "all classes"; it
replaces the file's list because launch writes overrides under `/**` (under the node's full
name when a namespace is pushed), a later entry than the file's `/**/perception_node:` (rcl
keeps a value an empty list repeats in the same entry). Namespaced, e.g. with
`PushRosNamespace('ego')` around an include, the node reads `/ego/<camera>` for relative
camera topics and publishes beside them.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

# Argument -> type of the node parameter it overrides (launch coerces the text to it).
OVERRIDES = {
    "model": str,
    "backend": str,
    "cameras": list[str],  # launch's value_type takes typing.List[str] or list[str]
    "compressed": bool,
    "qos": str,
    "score_threshold": float,
    "nms_threshold": float,
    "classes": list[str],
    "publish_debug_image": bool,
    "use_sim_time": bool,
}
FROM_FILE = "empty: as in params_file"


def _node(context: LaunchContext) -> list:
    overrides = {
        name: ParameterValue(LaunchConfiguration(name), value_type=value_type)
        for name, value_type in OVERRIDES.items()
        if LaunchConfiguration(name).perform(context)
    }
    parameters: list = [LaunchConfiguration("params_file").perform(context)]
    if overrides:
        parameters.append(overrides)  # written to a later params file: it wins
    return [
        Node(
            package="compressed_perception",
            executable="perception_node",
            name="perception_node",
            parameters=parameters,
            output="screen",
        )
    ]


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory("compressed_perception")
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "params_file",
                default_value=os.path.join(share, "config", "perception.yaml"),
                description="ROS 2 parameter file for perception_node",
            ),
            DeclareLaunchArgument(
                "model", default_value="", description=f"Model manifest path ({FROM_FILE})"
            ),
            DeclareLaunchArgument(
                "backend",
                default_value="",
                choices=["", "auto", "tensorrt", "openvino", "onnxruntime"],
                description=f"Inference backend ({FROM_FILE})",
            ),
            DeclareLaunchArgument(
                "cameras",
                default_value="",
                description=f"Image topics, a YAML list: \"['/cam/image_raw']\" ({FROM_FILE})",
            ),
            DeclareLaunchArgument(
                "compressed",
                default_value="",
                description=f"Subscribe to <camera>/compressed ({FROM_FILE})",
            ),
            DeclareLaunchArgument(
                "qos",
                default_value="",
                choices=["", "sensor_data", "reliable"],
                description=f"Input QoS ({FROM_FILE})",
            ),
            DeclareLaunchArgument(
                "score_threshold",
                default_value="",
                description=f"Minimum detection score, 0..1 ({FROM_FILE})",
            ),
            DeclareLaunchArgument(
                "nms_threshold", default_value="", description=f"NMS IoU, 0..1 ({FROM_FILE})"
            ),
            DeclareLaunchArgument(
                "classes",
                default_value="",
                description=f"Classes to keep as a YAML list of strings ({FROM_FILE})",
            ),
            DeclareLaunchArgument(
                "publish_debug_image",
                default_value="",
                description=f"Publish annotated images ({FROM_FILE})",
            ),
            DeclareLaunchArgument(
                "use_sim_time",
                default_value="",
                description=f"Use /clock (e.g. bag replay) ({FROM_FILE}; rclpy's default: false)",
            ),
            OpaqueFunction(function=_node),
        ]
    )
