"""Ground-truth 2D boxes from CARLA's 3D boxes: pinhole projection and visibility.

Pure NumPy, no `carla` import, so that it is tested here on synthetic geometry. CARLA
(Unreal) axes are x forward, y right, z up; camera axes are x right, y down, z forward.
"""

from __future__ import annotations

import math

import numpy as np

from compressed_perception.errors import ConfigError

NEAR_PLANE_M = 0.1


def intrinsics(width: int, height: int, fov_deg: float) -> np.ndarray:
    """3x3 camera matrix of a CARLA camera: horizontal field of view, square pixels."""
    if width < 1 or height < 1 or not 0 < fov_deg < 180:
        raise ConfigError(f"camera {width}x{height} with fov {fov_deg}: not a valid pinhole camera")
    focal = width / (2.0 * math.tan(math.radians(fov_deg) / 2.0))
    return np.array([[focal, 0, width / 2.0], [0, focal, height / 2.0], [0, 0, 1]], np.float64)


def to_camera_axes(points_ue: np.ndarray) -> np.ndarray:
    """(N, 3) points in the camera's Unreal frame to (right, down, forward)."""
    return np.stack([points_ue[:, 1], -points_ue[:, 2], points_ue[:, 0]], axis=1)


def project_box(
    corners_world: np.ndarray,
    world_to_camera: np.ndarray,
    camera_matrix: np.ndarray,
    width: int,
    height: int,
) -> np.ndarray | None:
    """The image-space box (x1, y1, x2, y2) of a 3D box's 8 corners, clipped to the image.

    Corners behind the camera are clipped to the near plane along the box's edges, so
    a box that the camera is partly inside still projects correctly; None when nothing
    of it lies in front of the camera or inside the image.
    """
    homogeneous = np.hstack([corners_world, np.ones((len(corners_world), 1))])
    local = (world_to_camera @ homogeneous.T).T[:, :3]
    points = _clip_to_near_plane(to_camera_axes(local))
    if points.size == 0:
        return None
    pixels = (camera_matrix @ points.T).T
    pixels = pixels[:, :2] / pixels[:, 2:3]
    x1, y1 = pixels.min(axis=0)
    x2, y2 = pixels.max(axis=0)
    box = np.array(
        [
            np.clip(x1, 0, width),
            np.clip(y1, 0, height),
            np.clip(x2, 0, width),
            np.clip(y2, 0, height),
        ]
    )
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
        return None
    return box


# The 12 edges of a box whose corners are ordered as `box_corners` makes them:
# corner index = x * 4 + y * 2 + z, with x, y, z in {0: minus, 1: plus} half-extent.
_EDGES = [(a, a | bit) for bit in (1, 2, 4) for a in range(8) if not a & bit]


def _clip_to_near_plane(points: np.ndarray) -> np.ndarray:
    """Corners in front of the near plane, plus where edges cross it."""
    front = points[:, 2] >= NEAR_PLANE_M
    kept = [points[front]]
    for a, b in _EDGES:
        if front[a] != front[b]:
            t = (NEAR_PLANE_M - points[a, 2]) / (points[b, 2] - points[a, 2])
            kept.append((points[a] + t * (points[b] - points[a]))[None])
    return np.concatenate(kept) if kept else np.zeros((0, 3))


def box_corners(center: np.ndarray, extent: np.ndarray, world_from_box: np.ndarray) -> np.ndarray:
    """(8, 3) world corners of a box given its centre and half-extent in its own frame."""
    signs = np.array([[(i >> 2) & 1, (i >> 1) & 1, i & 1] for i in range(8)], np.float64) * 2 - 1
    local = center + signs * extent
    homogeneous = np.hstack([local, np.ones((8, 1))])
    return (world_from_box @ homogeneous.T).T[:, :3]


def instance_ids(bgra: np.ndarray) -> np.ndarray:
    """Actor ids of an instance-segmentation image: G is the low byte, B the high byte."""
    return bgra[..., 1].astype(np.uint16) | (bgra[..., 0].astype(np.uint16) << 8)


def semantic_pixels(bgra: np.ndarray, tag: int, box: np.ndarray) -> int:
    """How many pixels inside `box` carry semantic tag `tag` (R channel): for map objects,
    which have no actor id of their own."""
    x1, y1, x2, y2 = (int(v) for v in np.round(box))
    return int(np.count_nonzero(bgra[y1:y2, x1:x2, 2] == tag))


def visible_pixels(ids: np.ndarray, actor_id: int, box: np.ndarray) -> int:
    """How many pixels inside `box` show this actor (occluded parts show something else)."""
    x1, y1, x2, y2 = (int(v) for v in np.round(box))
    return int(np.count_nonzero(ids[y1:y2, x1:x2] == (actor_id & 0xFFFF)))
