"""The perception node on carla-ros-bridge cameras, in simulation time.

    ros2 launch compressed_perception carla.launch.py cameras:="['rgb_front', 'rgb_left']"

carla-ros-bridge publishes camera `<name>` of vehicle `<role_name>` on
`/carla/<role_name>/<name>/image` (sensor_msgs/Image, bgra8), so detections appear on
`/carla/<role_name>/<name>/detections`. Start the bridge with synchronous mode and
`/clock` (its default); this launch file sets use_sim_time. Needs a running CARLA server
(`CarlaUE4.sh -RenderOffScreen`) and the bridge: see the README.
"""

import os

import yaml
from ament_index_python.packages import get_package_share_directory
from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, OpaqueFunction
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration

FORWARDED = (
    "model",
    "backend",
    "score_threshold",
    "nms_threshold",
    "classes",
    "publish_debug_image",
)


def camera_topics(role_name: str, cameras: str) -> str:
    """`['rgb_front']` -> `['/carla/ego_vehicle/rgb_front/image']`, as a YAML list."""
    names = yaml.safe_load(cameras) if cameras.strip() else []
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"cameras must be a YAML list of camera names, got {cameras!r}")
    return str([f"/carla/{role_name}/{name}/image" for name in names])


def _include(context: LaunchContext) -> list:
    share = get_package_share_directory("compressed_perception")
    topics = camera_topics(
        LaunchConfiguration("role_name").perform(context),
        LaunchConfiguration("cameras").perform(context),
    )
    arguments = {name: LaunchConfiguration(name) for name in FORWARDED}
    arguments.update({"cameras": topics, "compressed": "false", "use_sim_time": "true"})
    return [
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(os.path.join(share, "launch", "perception.launch.py")),
            launch_arguments=arguments.items(),
        )
    ]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "role_name", default_value="ego_vehicle", description="The ego vehicle's role_name"
            ),
            DeclareLaunchArgument(
                "cameras",
                default_value="['rgb_front']",
                description="carla-ros-bridge camera names (sensor ids), a YAML list",
            ),
            *[
                DeclareLaunchArgument(
                    name, default_value="", description="Forwarded to perception.launch.py"
                )
                for name in FORWARDED
            ],
            OpaqueFunction(function=_include),
        ]
    )
