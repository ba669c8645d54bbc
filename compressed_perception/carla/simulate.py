"""Run the detector in CARLA (0.9.16) and score it against ground truth.

0.9.16 is the first release whose instance-segmentation camera encodes actor ids (earlier
ones encode Unreal's internal ids, carla-simulator/carla#8334): visibility is counted by
actor id, so an older server is refused rather than scored with nothing visible.

The world is switched to synchronous mode with a fixed step for the run and restored
afterwards, and every actor spawned here is destroyed, also on Ctrl-C or an error.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import queue
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compressed_perception.carla.classes import STOP_SIGN, TRAFFIC_LIGHT, coco_class, is_stop_sign
from compressed_perception.carla.geometry import (
    box_corners,
    instance_ids,
    intrinsics,
    project_box,
    semantic_pixels,
    visible_pixels,
)
from compressed_perception.errors import ConfigError, PerceptionError
from compressed_perception.runtime.detector import Detector
from compressed_perception.runtime.postprocess import Detections

# Mounting poses on the ego vehicle: (x, y, z) metres, yaw degrees.
CAMERA_POSES = {
    "rgb_front": (1.5, 0.0, 2.4, 0.0),
    "rgb_left": (0.5, -0.9, 2.4, -60.0),
    "rgb_right": (0.5, 0.9, 2.4, 60.0),
    "rgb_rear": (-2.2, 0.0, 2.4, 180.0),
}
SENSOR_WAIT_S = 10.0
CLIENT_INSTALL = "pip install 'compressed_perception[carla]'"  # carla==0.9.16
OLDEST_SERVER = (0, 9, 16)  # instance camera with actor ids


class CarlaError(PerceptionError):
    """No client or no server, a version mismatch, an unknown town, or a failed spawn."""


def client_module() -> Any:
    """The `carla` client package, or a CarlaError saying how to install it."""
    try:
        import carla
    except ImportError as exc:  # absent, or a wheel built for another Python
        raise CarlaError(
            f"the CARLA Python client is not installed or does not load ({exc}); install it "
            f"with {CLIENT_INSTALL} (carla==0.9.16, matching a 0.9.16 server)"
        ) from exc
    return carla


@dataclass(frozen=True)
class CarlaOptions:
    host: str = "127.0.0.1"
    port: int = 2000
    timeout: float = 10.0
    town: str | None = None  # None keeps the loaded map
    frames: int = 200
    cameras: tuple[str, ...] = ("rgb_front",)
    width: int = 1280
    height: int = 720
    fov: float = 90.0
    fixed_delta: float = 0.05
    vehicles: int = 30
    walkers: int = 30
    seed: int = 0
    min_visible_pixels: int = 100
    role_name: str = "ego_vehicle"
    allow_version_mismatch: bool = False

    def __post_init__(self) -> None:
        """Refused before any connection, naming the option: a bad port or time-out reached
        the client library as a raw OverflowError, and a camera named twice left a pair of
        sensors spawned and never read."""
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port: {self.port} is outside 1..65535")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ConfigError(f"timeout: {self.timeout} seconds must be above 0")
        if self.frames < 1:
            raise ConfigError(f"frames: must be at least 1, got {self.frames}")
        if self.vehicles < 0 or self.walkers < 0:
            raise ConfigError(f"vehicles {self.vehicles}, walkers {self.walkers}: not below 0")
        if not self.cameras or len(set(self.cameras)) != len(self.cameras):
            raise ConfigError(f"cameras: {list(self.cameras)} must name each camera once")
        unknown = [name for name in self.cameras if name not in CAMERA_POSES]
        if unknown:
            raise ConfigError(
                f"cameras: {', '.join(unknown)} unknown; the mountings are "
                f"{', '.join(CAMERA_POSES)}"
            )


@dataclass
class _Scene:
    ego: Any = None
    sensors: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # name -> (rgb, instance)
    images: dict[int, queue.Queue[Any]] = field(default_factory=dict)  # sensor id -> images
    actors: list[Any] = field(default_factory=list)  # everything to destroy, sensors first
    controllers: list[Any] = field(default_factory=list)


def connect(options: CarlaOptions) -> Any:
    """A client whose server answered; CarlaError naming host, port, timeout and versions."""
    carla = client_module()
    try:
        client = carla.Client(options.host, options.port)
        client.set_timeout(options.timeout)
        version = client.get_client_version()
        server = client.get_server_version()
    except RuntimeError as exc:  # the host does not resolve, or nothing answers
        version = _client_version()
        raise CarlaError(
            f"no CARLA server answered at {options.host}:{options.port} within "
            f"{options.timeout:g} s (client {version}); start one with "
            f"`CarlaUE4.sh -RenderOffScreen -carla-rpc-port={options.port}` ({exc})"
        ) from exc
    if server != version and not options.allow_version_mismatch:
        raise CarlaError(
            f"CARLA server at {options.host}:{options.port} is {server}, this client is {version}: "
            f"install carla=={server} (or pass --allow-version-mismatch)"
        )
    if release(server) < OLDEST_SERVER:
        raise CarlaError(
            f"CARLA server at {options.host}:{options.port} is {server}: its instance camera "
            "does not encode actor ids, so no object could be counted visible; use 0.9.16"
        )
    return client


def release(version: str) -> tuple[int, ...]:
    """(0, 9, 16) of "0.9.16" or "0.9.16-12-gabc"; () when it does not start with a number."""
    numbers = []
    for part in str(version).split("-")[0].split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


def _client_version() -> str:
    """The client's version without a client object (making one is what failed)."""
    try:
        return importlib.metadata.version("carla")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def load_town(client: Any, town: str | None) -> Any:
    if town is None:
        return client.get_world()
    available = {Path(m).name.removesuffix("_Opt"): m for m in client.get_available_maps()}
    if town.removesuffix("_Opt") not in available:
        raise CarlaError(
            f"town {town!r} is not on this server (has: {', '.join(sorted(available))})"
        )
    return client.load_world(available[town.removesuffix("_Opt")])


@contextlib.contextmanager
def synchronous(client: Any, world: Any, options: CarlaOptions) -> Iterator[Any]:
    """Synchronous mode with a fixed step, the traffic manager in step; restored on exit."""
    original = world.get_settings()
    settings = world.get_settings()
    settings.synchronous_mode = True
    settings.fixed_delta_seconds = options.fixed_delta
    traffic = client.get_trafficmanager()
    try:
        world.apply_settings(settings)
        traffic.set_synchronous_mode(True)
        traffic.set_random_device_seed(options.seed)
        world.set_pedestrians_seed(options.seed)
        yield traffic
    finally:
        traffic.set_synchronous_mode(False)
        world.apply_settings(original)


@contextlib.contextmanager
def scene(client: Any, world: Any, traffic: Any, options: CarlaOptions) -> Iterator[_Scene]:
    """Ego vehicle with cameras, plus seeded traffic; all destroyed on exit."""
    carla = client_module()
    built = _Scene()
    try:
        _spawn(world, traffic, options, built, carla)
        yield built
    finally:
        for rgb, instance in built.sensors.values():
            rgb.stop()
            instance.stop()
        for controller in built.controllers:
            controller.stop()
        client.apply_batch_sync([carla.command.DestroyActor(a) for a in built.actors])


def _spawn(world: Any, traffic: Any, options: CarlaOptions, built: _Scene, carla: Any) -> None:
    rng = random.Random(options.seed)
    library = world.get_blueprint_library()
    points = world.get_map().get_spawn_points()
    rng.shuffle(points)
    ego_bp = library.find("vehicle.tesla.model3")
    ego_bp.set_attribute("role_name", options.role_name)
    built.ego = next((world.try_spawn_actor(ego_bp, p) for p in points[:10] if p), None)
    if built.ego is None:
        raise CarlaError("could not spawn the ego vehicle at any of 10 spawn points")
    built.actors.append(built.ego)
    for name in options.cameras:
        built.sensors[name] = tuple(
            _camera(world, library, kind, name, options, built, carla)
            for kind in ("sensor.camera.rgb", "sensor.camera.instance_segmentation")
        )
    built.ego.set_autopilot(True, traffic.get_port())
    vehicle_bps = library.filter("vehicle.*")
    for point in points[1 : 1 + options.vehicles]:
        vehicle = world.try_spawn_actor(rng.choice(vehicle_bps), point)
        if vehicle is not None:
            vehicle.set_autopilot(True, traffic.get_port())
            built.actors.append(vehicle)
    _spawn_walkers(world, library, options.walkers, rng, built, carla)


def _camera(
    world: Any, library: Any, kind: str, name: str, options: CarlaOptions, built: _Scene, carla: Any
) -> Any:
    x, y, z, yaw = CAMERA_POSES[name]
    blueprint = library.find(kind)
    blueprint.set_attribute("image_size_x", str(options.width))
    blueprint.set_attribute("image_size_y", str(options.height))
    blueprint.set_attribute("fov", str(options.fov))
    pose = carla.Transform(carla.Location(x=x, y=y, z=z), carla.Rotation(yaw=yaw))
    sensor = world.spawn_actor(blueprint, pose, attach_to=built.ego)
    built.actors.insert(0, sensor)  # sensors go first when destroying
    built.images[sensor.id] = queue.Queue()
    sensor.listen(built.images[sensor.id].put)
    return sensor


def _spawn_walkers(
    world: Any, library: Any, count: int, rng: random.Random, built: _Scene, carla: Any
) -> None:
    walker_bps = library.filter("walker.pedestrian.*")
    controller_bp = library.find("controller.ai.walker")
    for _ in range(count):
        location = world.get_random_location_from_navigation()
        if location is None:
            continue
        walker = world.try_spawn_actor(rng.choice(walker_bps), carla.Transform(location))
        if walker is None:
            continue
        controller = world.spawn_actor(controller_bp, carla.Transform(), attach_to=walker)
        built.actors.extend([controller, walker])
        built.controllers.append(controller)
    world.tick()  # controllers need one tick before they take orders
    for controller in built.controllers:
        controller.start()
        controller.go_to_location(world.get_random_location_from_navigation())
        controller.set_max_speed(1.4)


def _image(built: _Scene, sensor: Any, frame: int) -> np.ndarray:
    """The sensor's BGRA image of simulation frame `frame` (older frames are skipped)."""
    deadline = time.monotonic() + SENSOR_WAIT_S
    while True:
        remaining = deadline - time.monotonic()
        try:
            image = built.images[sensor.id].get(timeout=max(remaining, 0.001))
        except queue.Empty as exc:
            raise CarlaError(f"sensor {sensor.type_id} sent no image for frame {frame}") from exc
        if image.frame == frame:
            return np.frombuffer(image.raw_data, np.uint8).reshape(image.height, image.width, 4)


def ground_truth(
    world: Any, camera: Any, bgra: np.ndarray, labels: Sequence[str], options: CarlaOptions
) -> Detections:
    """Visible objects' boxes in this camera, as detections of the model's class indices.

    `bgra` is the instance-segmentation image taken at the camera's pose: actors are
    visible where their id shows, map objects where their semantic tag does.
    """
    carla = client_module()
    world_to_camera = np.array(camera.get_transform().get_inverse_matrix())
    matrix = intrinsics(options.width, options.height, options.fov)
    ids = instance_ids(bgra)
    boxes, classes = [], []

    def keep(name: str, corners: np.ndarray, visible: Any) -> None:
        if name not in labels:
            return
        box = project_box(corners, world_to_camera, matrix, options.width, options.height)
        if box is not None and visible(box) >= options.min_visible_pixels:
            boxes.append(box)
            classes.append(labels.index(name))

    light_tag = int(carla.CityObjectLabel.TrafficLight)
    sign_tag = int(carla.CityObjectLabel.TrafficSigns)
    for actor in world.get_actors():
        name = coco_class(actor.type_id, actor.attributes.get("base_type", ""))
        if name is not None:
            corners = _corners(actor.bounding_box, np.array(actor.get_transform().get_matrix()))
            keep(name, corners, lambda b, i=actor.id: visible_pixels(ids, i, b))
        elif actor.type_id == "traffic.traffic_light":
            for light in actor.get_light_boxes():  # world frame, one per light housing
                corners = _world_corners(light, carla)
                keep(TRAFFIC_LIGHT, corners, lambda b: semantic_pixels(bgra, light_tag, b))
    for sign in world.get_environment_objects(carla.CityObjectLabel.TrafficSigns):
        if is_stop_sign(sign.name):
            corners = _world_corners(sign.bounding_box, carla)
            keep(STOP_SIGN, corners, lambda b: semantic_pixels(bgra, sign_tag, b))
    return Detections.ground_truth(boxes, classes)


def _corners(box: Any, world_from_frame: np.ndarray) -> np.ndarray:
    center = np.array([box.location.x, box.location.y, box.location.z])
    extent = np.array([box.extent.x, box.extent.y, box.extent.z])
    return box_corners(center, extent, world_from_frame)


def _world_corners(box: Any, carla: Any) -> np.ndarray:
    """A box given in world coordinates (location, rotation, extent)."""
    pose = np.array(carla.Transform(box.location, box.rotation).get_matrix())
    return box_corners(np.zeros(3), np.array([box.extent.x, box.extent.y, box.extent.z]), pose)


def run(options: CarlaOptions, detector: Detector, recorder: Any | None = None) -> dict[str, Any]:
    """Simulate `options.frames` steps; returns mAP per class against CARLA's ground truth."""
    from compressed_perception.replay.replay import coco_evaluation  # needs rosbags

    evaluation = coco_evaluation("scoring against CARLA's ground truth")
    client = connect(options)
    world = load_town(client, options.town)
    evaluator = evaluation.CocoEvaluator(detector.labels)
    latencies: list[float] = []
    with (
        synchronous(client, world, options) as traffic,
        scene(client, world, traffic, options) as built,
    ):
        for _ in range(options.frames):
            frame = world.tick()
            stamp = world.get_snapshot().timestamp.elapsed_seconds
            for name, (rgb, instance) in built.sensors.items():
                image = np.ascontiguousarray(_image(built, rgb, frame)[..., :3])
                bgra = _image(built, instance, frame)
                truth = ground_truth(world, instance, bgra, detector.labels, options)
                result = detector.detect(image, name=f"carla {name} frame {frame}")
                latencies.append(result.latency_ms.total)
                evaluator.add(
                    f"{name}/{frame}", options.width, options.height, truth, result.detections
                )
                if recorder is not None:
                    recorder.record(name, stamp, image, truth, result.detections)
    result = evaluator.result().to_dict()
    result["latency_ms_p50"] = float(np.percentile(latencies, 50)) if latencies else None
    result["cameras"] = list(options.cameras)
    return result
