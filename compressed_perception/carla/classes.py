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


TRAFFIC_LIGHT = "traffic light"
STOP_SIGN = "stop sign"


def coco_class(type_id: str, base_type: str = "") -> str | None:
    """COCO class of an actor whose own bounding box is the object, else None.

    Traffic lights and stop signs are not such actors (a traffic light actor's box spans
    its pole, a `traffic.stop` actor is a trigger volume): they come from the light boxes
    and the map's sign meshes instead, see `simulate.ground_truth`.
    """
    if type_id.startswith("walker.pedestrian"):
        return "person"
    if type_id.startswith("vehicle."):
        return _VEHICLE_BASE_TYPES.get(base_type.lower()) or _TWO_WHEELERS.get(type_id, "car")
    return None


def is_stop_sign(object_name: str) -> bool:
    """Map sign meshes are named after what they show (e.g. `..._Stop_...`)."""
    return "stop" in object_name.lower()
