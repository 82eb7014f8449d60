"""Synthetic indoor scenes as data, and the random distribution the dataset draws them from.

A `Scene` is a rectangular `Room` (floor, walls and an optional ceiling), a pinhole `Camera`, a point light
and a few `SceneObject` primitives, each with a `Material`; `synthetic_scenes.render` turns one into an
image, a label map and a depth map. `sample_scene` draws a random scene from a NumPy generator alone, so a
stream of scenes is a pure function of its seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

OBJECT_KINDS: tuple[str, ...] = ("sphere", "box", "cylinder", "cone", "pyramid")
# Label values of the `label` maps; 0 = "other" is the sky of rooms without a ceiling.
CLASS_NAMES: tuple[str, ...] = ("other", "floor", "wall", *OBJECT_KINDS, "ceiling")
PATTERNS: tuple[str, ...] = ("plain", "checker", "stripes", "noise")


@dataclass(frozen=True)
class Material:
    """Albedo of a surface: `color` blended towards `color2` by a solid pattern of period `scale` metres."""

    color: tuple[float, float, float]
    color2: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pattern: str = "plain"
    scale: float = 0.5
    axis: tuple[float, float, float] = (1.0, 0.0, 0.0)  # stripe direction (unit vector)
    noise_seed: int = 0


@dataclass(frozen=True)
class SceneObject:
    """One primitive standing on `position`, the centre of its lowest point or base (x, y, z).

    `extent` is (half-width along local x, height, half-depth along local z); a sphere uses extent[0] as its
    radius, a cylinder or cone extent[0] as the base radius and extent[1] as the height. `angle` rotates
    boxes and pyramids about the vertical axis (radians).
    """

    kind: str
    position: tuple[float, float, float]
    extent: tuple[float, float, float]
    material: Material
    angle: float = 0.0


@dataclass(frozen=True)
class Room:
    """The room spans x in [-width/2, width/2], z in [-depth/2, depth/2] and y in [0, height]."""

    width: float
    depth: float
    height: float
    floor: Material
    wall: Material
    ceiling: Material | None = None  # None: open to the sky


@dataclass(frozen=True)
class Camera:
    position: tuple[float, float, float]
    look_at: tuple[float, float, float]
    fov_degrees: float = 60.0  # vertical field of view


@dataclass(frozen=True)
class Scene:
    room: Room
    camera: Camera
    light_position: tuple[float, float, float]
    ambient: float = 0.25
    objects: tuple[SceneObject, ...] = ()


def _vector(values: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def _random_material(rng: np.random.Generator, low: float = 0.1, high: float = 0.95) -> Material:
    color = rng.uniform(low, high, 3)
    color2 = rng.uniform(0.05, 0.95, 3) if rng.random() < 0.5 else color * rng.uniform(0.3, 0.7)
    axis = rng.normal(size=3)
    return Material(
        color=_vector(color),
        color2=_vector(color2),
        pattern=PATTERNS[rng.integers(len(PATTERNS))],
        scale=float(rng.uniform(0.08, 0.6)),
        axis=_vector(axis / np.linalg.norm(axis)),
        noise_seed=int(rng.integers(2**31)),
    )


def _random_shape(rng: np.random.Generator) -> tuple[str, tuple[float, float, float], float]:
    """Kind, extent and footprint radius (metres, in the floor plane) of a random object."""
    kind = OBJECT_KINDS[rng.integers(len(OBJECT_KINDS))]
    half, height, half_z = rng.uniform(0.2, 0.55), rng.uniform(0.3, 1.4), rng.uniform(0.2, 0.55)
    if kind == "sphere":
        return kind, (half, 2 * half, half), half
    if kind in ("cylinder", "cone"):
        return kind, (half, height, half), half
    return kind, (half, height, half_z), math.hypot(half, half_z)


def _place_objects(rng: np.random.Generator, room: Room, camera_xz: np.ndarray) -> list[SceneObject]:
    """4 to 8 objects on the floor, apart from each other, the walls and the camera (rejection sampling)."""
    half_room = np.array([room.width / 2, room.depth / 2])
    placed: list[tuple[np.ndarray, float]] = []
    objects = []
    for _ in range(rng.integers(4, 9)):
        kind, extent, footprint = _random_shape(rng)
        for _ in range(30):
            xz = rng.uniform(-half_room + footprint + 0.05, half_room - footprint - 0.05)
            clear_of_camera = np.linalg.norm(xz - camera_xz) > footprint + 0.6
            if clear_of_camera and all(np.linalg.norm(xz - c) > footprint + r + 0.05 for c, r in placed):
                placed.append((xz, footprint))
                objects.append(
                    SceneObject(
                        kind,
                        (float(xz[0]), 0.0, float(xz[1])),
                        extent,
                        _random_material(rng),
                        angle=float(rng.uniform(0, math.pi)),
                    )
                )
                break
    return objects


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random room: sizes keep every visible point within MAX_DEPTH (room diagonal < 9.8 m)."""
    width, depth, height = rng.uniform(3.5, 6.5), rng.uniform(3.5, 6.5), rng.uniform(2.4, 3.2)
    ceiling = _random_material(rng, low=0.7) if rng.random() < 0.5 else None
    room = Room(width, depth, height, _random_material(rng), _random_material(rng), ceiling)
    half_room = np.array([width / 2, depth / 2])
    # the camera stands in the outer band of the room, so that most objects lie in front of it
    along, side = rng.uniform(-1, 1), rng.integers(4)
    edge = rng.uniform(0.3, 1.0)
    camera_xz = np.where(side % 2, [along, 1.0], [1.0, along]) * (half_room - edge) * (1 - 2 * (side // 2))
    camera = np.array([camera_xz[0], rng.uniform(0.8, 2.0), camera_xz[1]])
    objects = _place_objects(rng, room, camera_xz)
    target = np.array([0.0, 0.5, 0.0])
    if objects:  # look at the middle of the objects or at one of them
        centres = [np.asarray(obj.position) + [0.0, obj.extent[1] / 2, 0.0] for obj in objects]
        target = np.mean(centres, axis=0) if rng.random() < 0.5 else centres[rng.integers(len(centres))]
        if np.hypot(*(target - camera)[[0, 2]]) < 0.8:  # objects all around the camera: avoid a steep view
            target = centres[0]
    target = target + np.clip(rng.normal(0.0, 0.25, 3), -0.3, 0.3)
    light_xz = rng.uniform(-half_room + 0.5, half_room - 0.5)
    return Scene(
        room=room,
        camera=Camera(_vector(camera), _vector(target), fov_degrees=float(rng.uniform(50, 75))),
        light_position=(float(light_xz[0]), float(height - rng.uniform(0.1, 0.5)), float(light_xz[1])),
        ambient=float(rng.uniform(0.15, 0.35)),
        objects=tuple(objects),
    )


__all__ = [
    "CLASS_NAMES",
    "OBJECT_KINDS",
    "PATTERNS",
    "Camera",
    "Material",
    "Room",
    "Scene",
    "SceneObject",
    "sample_scene",
]
