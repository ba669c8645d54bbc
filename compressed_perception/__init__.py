"""Compressed camera object detection for ROS 2: offline build step, runtime and node."""

__version__ = "0.1.0"
