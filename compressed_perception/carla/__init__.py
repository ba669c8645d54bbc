"""CARLA simulation: the detector against the simulator's ground truth."""
