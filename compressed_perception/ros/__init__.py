"""ROS 2 side: message definitions and conversion (no ROS needed), and the rclpy node."""
