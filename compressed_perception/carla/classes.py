"""Which CARLA actors are ground truth, and as which COCO class."""

from __future__ import annotations

# CARLA vehicle blueprints carry a `base_type` attribute (0.9.14 and later).
_VEHICLE_BASE_TYPES = {
    "car": "car",
    "van": "car",
    "truck": "truck",
    "bus": "bus",
    "motorcycle": "motorcycle",
    "bicycle": "bicycle",
}
# Older blueprints without base_type: fall back on well-known two-wheelers by id.
_TWO_WHEELERS = {
    "vehicle.bh.crossbike": "bicycle",
    "vehicle.diamondback.century": "bicycle",
    "vehicle.gazelle.omafiets": "bicycle",
    "vehicle.harley-davidson.low_rider": "motorcycle",
    "vehicle.kawasaki.ninja": "motorcycle",
    "vehicle.vespa.zx125": "motorcycle",
    "vehicle.yamaha.yzf": "motorcycle",
}
GROUND_TRUTH_CLASSES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "bus",
    "truck",
    "traffic light",
    "stop sign",
)


def coco_class(type_id: str, base_type: str = "") -> str | None:
    """COCO class name of an actor, or None when it is not ground truth."""
    if type_id.startswith("walker.pedestrian"):
        return "person"
    if type_id.startswith("vehicle."):
        return _VEHICLE_BASE_TYPES.get(base_type.lower()) or _TWO_WHEELERS.get(type_id, "car")
    if type_id == "traffic.traffic_light":
        return "traffic light"
    if type_id == "traffic.stop":
        return "stop sign"
    return None
