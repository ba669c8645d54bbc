"""Play a bag with /clock and run the perception node on it in simulated time.

    ros2 launch compressed_perception replay.launch.py bag:=/path/to/bag rate:=0.5 \
        cameras:="['/cam_front/image_raw']"

The perception arguments are forwarded to perception.launch.py unchanged (empty: as in
params_file); use_sim_time is always true here.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, IncludeLaunchDescription
from launch.conditions import IfCondition, UnlessCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration

# perception.launch.py's arguments, less use_sim_time (forced) and params_file (own default)
FORWARDED = (
    "model",
    "backend",
    "cameras",
    "compressed",
    "qos",
    "score_threshold",
    "nms_threshold",
    "classes",
    "publish_debug_image",
)


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory("compressed_perception")
    loop = LaunchConfiguration("loop")
    play = [
        "ros2",
        "bag",
        "play",
        LaunchConfiguration("bag"),
        "--clock",
        "--rate",
        LaunchConfiguration("rate"),
        "--delay",
        LaunchConfiguration("delay"),
    ]
    forwarded = {name: LaunchConfiguration(name) for name in ("params_file", *FORWARDED)}
    return LaunchDescription(
        [
            DeclareLaunchArgument("bag", description="Bag to play (required)"),
            DeclareLaunchArgument("rate", default_value="1.0", description="Playback rate"),
            DeclareLaunchArgument(
                "delay",
                default_value="5.0",
                description="Seconds before playback starts, so the node has loaded its model",
            ),
            DeclareLaunchArgument(
                "loop",
                default_value="false",
                choices=["true", "false"],
                description="Replay the bag indefinitely",
            ),
            DeclareLaunchArgument(
                "params_file",
                default_value=os.path.join(share, "config", "perception.yaml"),
                description="ROS 2 parameter file for perception_node",
            ),
            *[
                DeclareLaunchArgument(
                    name,
                    default_value="",
                    description="Forwarded to perception.launch.py (empty: as in params_file)",
                )
                for name in FORWARDED
            ],
            ExecuteProcess(cmd=[*play, "--loop"], output="screen", condition=IfCondition(loop)),
            ExecuteProcess(cmd=play, output="screen", condition=UnlessCondition(loop)),
            IncludeLaunchDescription(
                PythonLaunchDescriptionSource(
                    os.path.join(share, "launch", "perception.launch.py")
                ),
                launch_arguments={**forwarded, "use_sim_time": "true"}.items(),
            ),
        ]
    )
