"""Offline replay of rosbag2 camera bags through the detector."""
