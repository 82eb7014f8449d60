"""Procedural renderer of synthetic indoor scenes for dense prediction.

A scene is a rectangular room (floor, four walls and, in half of the scenes, a ceiling; without one the
sky shows) holding a few textured objects - spheres, boxes, cylinders, cones and pyramids - seen by a
pinhole camera and lit by one point light plus ambient light, with cast shadows. Rendering is vectorised
NumPy ray casting: every pixel is a row of a (P, 3) ray array, each primitive is intersected analytically
and the nearest hit wins. A render gives an RGB image, a semantic label map in the ADE20K convention
(0 = "other", here the sky, which `reduce_labels` maps to the ignore index) and metric z-depth like
NYU-Depth V2 (0 where nothing is hit).

Frames: world coordinates are metres, y up, floor at y = 0. Ray directions are scaled so that their
component along the camera axis is 1, hence the ray parameter t of a hit *is* its z-depth; shadow rays
run from a surface point to the light with t = 1 at the light.

The scene description (`Scene` and its parts) and the random scenes of the dataset (`sample_scene`) live in
`scene_sampling`; their names are importable from here too.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from .sampling import (
    CLASS_NAMES,
    OBJECT_KINDS,
    PATTERNS,
    Camera,
    Material,
    Room,
    Scene,
    SceneObject,
    sample_scene,
)

MIN_DEPTH, MAX_DEPTH = 1e-3, 10.0
SKY_COLOR = np.array([0.55, 0.75, 0.95])
_EPS = 1e-6  # smallest accepted ray parameter
_SHADOW_OFFSET = 1e-3  # metres a shadow ray starts off its surface, against self-shadowing
_NOISE_LATTICE = 16  # period of the value-noise lattice, in pattern cells
# Linear intensity in [0, 1] (quantised to 16 bits) -> gamma-encoded 8-bit value, sRGB-like gamma 2.2.
_GAMMA_TABLE = (np.linspace(0.0, 1.0, 65536) ** (1 / 2.2) * 255 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class RenderedScene:
    """image (H, W, 3) uint8, label (H, W) uint8 indices into CLASS_NAMES, depth (H, W) float32 metres."""

    image: np.ndarray
    label: np.ndarray
    depth: np.ndarray


def camera_rays(camera: Camera, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Origin (3,) and directions (H*W, 3), row-major from the top-left pixel, unit component along the axis."""
    origin = np.asarray(camera.position, dtype=np.float64)
    forward = np.asarray(camera.look_at, dtype=np.float64) - origin
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    if np.linalg.norm(right) < 1e-9:
        raise ValueError("camera looks straight up or down; move look_at off the vertical through the camera")
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    tan_half = math.tan(math.radians(camera.fov_degrees) / 2)
    u = ((np.arange(width) + 0.5) / width * 2 - 1) * tan_half * width / height
    v = (1 - (np.arange(height) + 0.5) / height * 2) * tan_half
    directions = forward + u[None, :, None] * right + v[:, None, None] * up  # (H, W, 3)
    return origin, directions.reshape(-1, 3)


def _nearest(*candidates: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Smallest parameter t > eps among (t, valid) candidates, inf where none is valid."""
    best = np.full(np.shape(candidates[0][0]), np.inf)
    for t, valid in candidates:
        best = np.where(valid & (t > _EPS) & (t < best), t, best)
    return best


def _quadratic_roots(a: np.ndarray, half_b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both roots of a t^2 + 2 half_b t + c = 0, NaN where they are not real."""
    with np.errstate(invalid="ignore", divide="ignore"):
        root = np.sqrt(half_b * half_b - a * c)
        return (-half_b - root) / a, (-half_b + root) / a


def _rotation_y(angle: float) -> np.ndarray:
    cos, sin = math.cos(angle), math.sin(angle)
    return np.array([[cos, 0.0, sin], [0.0, 1.0, 0.0], [-sin, 0.0, cos]])


def _face_planes(obj: SceneObject) -> tuple[np.ndarray, np.ndarray]:
    """World-frame planes (normals (F, 3), offsets (F,)) whose half-spaces n . p <= c bound a box or pyramid."""
    hx, h, hz = obj.extent
    if obj.kind == "box":
        normals = np.array([[1, 0, 0], [-1, 0, 0], [0, 0, 1], [0, 0, -1], [0, 1, 0], [0, -1, 0]], float)
        offsets = np.array([hx, hx, hz, hz, h, 0.0])
    else:  # pyramid: each side plane holds one base edge and the apex (0, h, 0)
        normals = np.array([[h, hx, 0], [-h, hx, 0], [0, hz, h], [0, hz, -h], [0, -1, 0]], float)
        offsets = np.array([hx * h, hx * h, hz * h, hz * h, 0.0])
        norms = np.linalg.norm(normals, axis=1)
        normals, offsets = normals / norms[:, None], offsets / norms
    normals = normals @ _rotation_y(obj.angle).T
    return normals, offsets + normals @ np.asarray(obj.position, float)


def _hit_convex(obj: SceneObject, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Kay-Kajiya style clipping of each ray against every face plane; returns t (P,)."""
    normals, offsets = _face_planes(obj)
    denom = dirs @ normals.T  # (P, F)
    num = offsets - origins @ normals.T
    with np.errstate(divide="ignore", invalid="ignore"):
        t = num / denom
    t_enter = np.where(denom < 0, t, -np.inf).max(axis=1)
    t_exit = np.where(denom > 0, t, np.inf).min(axis=1)
    outside_parallel = ((denom == 0) & (num < 0)).any(axis=1)
    valid = (t_enter <= t_exit) & ~outside_parallel
    return _nearest((np.where(t_enter > _EPS, t_enter, t_exit), valid))


def _hit_round(obj: SceneObject, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Spheres, capped cylinders and cones (vertical axes); returns t (P,)."""
    radius, height = obj.extent[0], obj.extent[1]
    o = origins - np.asarray(obj.position, float)  # object frame, base centre at the origin
    ox, oy, oz = np.broadcast_to(o, dirs.shape).T
    dx, dy, dz = dirs.T
    if obj.kind == "sphere":
        oy = oy - radius
        t0, t1 = _quadratic_roots(
            dx * dx + dy * dy + dz * dz, ox * dx + oy * dy + oz * dz, ox * ox + oy * oy + oz * oz - radius**2
        )
        return _nearest((t0, np.isfinite(t0)), (t1, np.isfinite(t1)))
    with np.errstate(divide="ignore", invalid="ignore"):
        t_base, t_top = -oy / dy, (height - oy) / dy

    def in_disc(t: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):  # rays parallel to the disc: t = inf times a zero component
            return (ox + t * dx) ** 2 + (oz + t * dz) ** 2 <= radius**2

    if obj.kind == "cylinder":
        t0, t1 = _quadratic_roots(dx * dx + dz * dz, ox * dx + oz * dz, ox * ox + oz * oz - radius**2)
        caps = ((t_base, in_disc(t_base)), (t_top, in_disc(t_top)))
    else:  # cone: x^2 + z^2 = k^2 (height - y)^2 with k = radius / height
        k2, q = (radius / height) ** 2, height - oy
        t0, t1 = _quadratic_roots(
            dx * dx + dz * dz - k2 * dy * dy, ox * dx + oz * dz + k2 * q * dy, ox * ox + oz * oz - k2 * q * q
        )
        caps = ((t_base, in_disc(t_base)),)

    def on_side(t: np.ndarray) -> np.ndarray:
        y = oy + t * dy
        return (y >= 0) & (y <= height)

    return _nearest((t0, on_side(t0)), (t1, on_side(t1)), *caps)


def _near_bounding_sphere(
    obj: SceneObject, origins: np.ndarray, dirs: np.ndarray, t_max: float
) -> np.ndarray:
    """Indices of the rays whose stretch t in (0, t_max) meets the object's bounding sphere."""
    half_x, height, half_z = obj.extent
    footprint = math.hypot(half_x, half_z) if obj.kind in ("box", "pyramid") else half_x
    oc = origins - (np.asarray(obj.position, float) + [0.0, height / 2, 0.0])
    if oc.ndim == 1:
        half_b, c = dirs @ oc, oc @ oc
    else:
        half_b, c = np.einsum("pd,pd->p", oc, dirs), np.einsum("pd,pd->p", oc, oc)
    a = np.einsum("pd,pd->p", dirs, dirs)
    c = c - footprint**2 - (height / 2) ** 2  # < 0: the origin is inside the sphere
    discriminant = half_b * half_b - a * c
    near = (discriminant >= 0) & ((half_b < 0) | (c < 0))
    if math.isfinite(t_max):  # the sphere starts before t_max: its middle is, or t_max lies inside it
        near &= (c < 0) | (-half_b < a * t_max) | ((a * t_max + 2 * half_b) * t_max + c < 0)
    return np.flatnonzero(near)


def intersect(obj: SceneObject, origins: np.ndarray, dirs: np.ndarray, t_max: float = math.inf) -> np.ndarray:
    """Ray parameter (P,) of the first hit of rays origins (3,) or (P, 3) + t dirs (P, 3); inf on a miss.

    Only the rays through the object's bounding sphere go through the exact test, which is what keeps a
    128 x 128 render at a few tens of milliseconds; with a finite t_max, rays whose bounding-sphere stretch
    starts past t_max may be reported as misses (shadow rays only ask for hits before the light, t_max = 1).
    """
    if obj.kind not in OBJECT_KINDS:
        raise ValueError(f"unknown object kind {obj.kind!r}; use one of {OBJECT_KINDS}")
    t = np.full(len(dirs), np.inf)
    rays = _near_bounding_sphere(obj, origins, dirs, t_max)
    if rays.size:
        hit = _hit_convex if obj.kind in ("box", "pyramid") else _hit_round
        t[rays] = hit(obj, origins if origins.ndim == 1 else origins[rays], dirs[rays])
    return t


def surface_normals(obj: SceneObject, points: np.ndarray) -> np.ndarray:
    """Outward unit normals (M, 3) of `obj` at surface points (M, 3)."""
    p = points - np.asarray(obj.position, float)
    radius, height = obj.extent[0], obj.extent[1]
    if obj.kind in ("box", "pyramid"):
        normals, offsets = _face_planes(obj)
        return normals[np.argmax(points @ normals.T - offsets, axis=1)]  # the face the point lies on
    if obj.kind == "sphere":
        return (p - [0.0, radius, 0.0]) / radius
    rho = np.maximum(np.hypot(p[:, 0], p[:, 2]), 1e-12)
    if obj.kind == "cylinder":
        side = np.stack([p[:, 0], np.zeros_like(rho), p[:, 2]], axis=1)
        side_distance = np.abs(rho - radius)
    else:
        slope = radius / height
        side = np.stack([p[:, 0], slope * rho, p[:, 2]], axis=1)  # gradient of rho - slope (height - y)
        side_distance = np.abs(rho - slope * (height - p[:, 1]))
    normals = side / np.linalg.norm(side, axis=1, keepdims=True)
    normals[np.abs(p[:, 1]) < side_distance] = [0.0, -1.0, 0.0]
    if obj.kind == "cylinder":
        normals[np.abs(p[:, 1] - height) < side_distance] = [0.0, 1.0, 0.0]
    return normals


def _value_noise(points: np.ndarray, seed: int) -> np.ndarray:
    """Two-octave trilinear value noise in [0, 1] at points (M, 3) given in pattern cells."""
    lattice = np.random.default_rng(seed).random(_NOISE_LATTICE**3)  # flattened (N, N, N) grid
    total = np.zeros(len(points))
    for octave, weight in ((1.0, 2 / 3), (2.0, 1 / 3)):
        q = points * octave
        cell = np.floor(q)
        f = q - cell
        f = f * f * (3 - 2 * f)  # smoothstep
        low = cell.astype(np.int64) % _NOISE_LATTICE
        corners = (low, (low + 1) % _NOISE_LATTICE)
        weights = (1 - f, f)
        for cx, cy, cz in itertools.product((0, 1), repeat=3):
            w = weights[cx][:, 0] * weights[cy][:, 1] * weights[cz][:, 2]
            flat = (corners[cx][:, 0] * _NOISE_LATTICE + corners[cy][:, 1]) * _NOISE_LATTICE + corners[cz][
                :, 2
            ]
            total += weight * w * lattice[flat]
    return total


def albedo(material: Material, points: np.ndarray) -> np.ndarray:
    """Surface colour (M, 3) in [0, 1] of a material at points (M, 3) of its local frame (metres)."""
    q = points / material.scale + 0.25  # the shift keeps axis-aligned faces off the cell boundaries
    if material.pattern == "plain":
        mix = np.zeros(len(points))
    elif material.pattern == "checker":
        mix = np.floor(q).sum(axis=1) % 2
    elif material.pattern == "stripes":
        mix = np.floor(q @ np.asarray(material.axis, float)) % 2
    elif material.pattern == "noise":
        mix = _value_noise(q, material.noise_seed)
    else:
        raise ValueError(f"unknown pattern {material.pattern!r}; use one of {PATTERNS}")
    color, color2 = np.asarray(material.color, float), np.asarray(material.color2, float)
    return color + mix[:, None] * (color2 - color)


def _hit_room(room: Room, origin: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exit parameter (P,) of rays leaving the room box from inside, the surface (P,): 0 floor, 1 wall,
    2 top, and the inward unit normal (P, 3) there."""
    low = np.array([-room.width / 2, 0.0, -room.depth / 2])
    high = np.array([room.width / 2, room.height, room.depth / 2])
    with np.errstate(divide="ignore", invalid="ignore"):
        t_axes = np.where(dirs > 0, (high - origin) / dirs, np.where(dirs < 0, (low - origin) / dirs, np.inf))
    axis = np.argmin(t_axes, axis=1)
    t = t_axes[np.arange(len(dirs)), axis]
    surface = np.where(axis == 1, np.where(dirs[:, 1] < 0, 0, 2), 1)
    normals = np.zeros_like(dirs)
    normals[np.arange(len(dirs)), axis] = -np.sign(dirs[np.arange(len(dirs)), axis])
    return t, surface, normals


def _shade_hits(
    scene: Scene, points: np.ndarray, hit: np.ndarray, normals: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Albedo (M, 3) and unit normals (M, 3) at hit points, given the room normals (M, 3) along the rays.

    Hit codes: 0 floor, 1 wall, 2 ceiling, 3 + k object k.
    """
    room = scene.room
    colors, normals = np.zeros_like(points), normals.copy()
    for code, material in enumerate((room.floor, room.wall, room.ceiling)):
        mask = hit == code
        if material is not None and mask.any():
            colors[mask] = albedo(material, points[mask])
    for k, obj in enumerate(scene.objects):
        mask = hit == 3 + k
        if mask.any():
            normals[mask] = surface_normals(obj, points[mask])
            local = (points[mask] - np.asarray(obj.position, float)) @ _rotation_y(obj.angle)
            colors[mask] = albedo(obj.material, local)
    return colors, normals


def _lit_fraction(scene: Scene, points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Lambert term (M,) of the point light times its visibility through the objects (shadow rays).

    Shadow rays are cast from the light (one origin, like camera rays) to the points lifted off their
    surfaces by _SHADOW_OFFSET, reaching them at t = 1: a hit before that is an occluder.
    """
    light = np.asarray(scene.light_position, float)
    to_light = light - points  # (M, 3)
    cosine = np.einsum("md,md->m", normals, to_light) / np.linalg.norm(to_light, axis=1)
    from_light = points + _SHADOW_OFFSET * normals - light
    visible = cosine > 0
    for obj in scene.objects:
        visible &= intersect(obj, light, from_light, t_max=1.0) >= 1.0
    return np.where(visible, cosine, 0.0)


def render(scene: Scene, image_size: int | tuple[int, int]) -> RenderedScene:
    """Ray-cast `scene` at image_size (side, or (height, width)) into image, label and depth maps."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    origin, dirs = camera_rays(scene.camera, height, width)
    t, hit, room_normals = _hit_room(scene.room, origin, dirs)
    for k, obj in enumerate(scene.objects):
        t_obj = intersect(obj, origin, dirs)
        closer = t_obj < t
        t, hit = np.where(closer, t_obj, t), np.where(closer, 3 + k, hit)
    valid = ~((hit == 2) & (scene.room.ceiling is None)) & np.isfinite(t)
    points = origin + t[valid, None] * dirs[valid]
    colors, normals = _shade_hits(scene, points, hit[valid], room_normals[valid])
    normals *= -np.sign(np.einsum("md,md->m", normals, dirs[valid]))[:, None]  # face the camera
    light = scene.ambient + (1 - scene.ambient) * _lit_fraction(scene, points, normals)
    rgb = np.broadcast_to(SKY_COLOR, dirs.shape).copy()
    rgb[valid] = colors * light[:, None]
    image = _GAMMA_TABLE[(np.clip(rgb, 0, 1) * 65535 + 0.5).astype(np.int64)]
    labels = np.zeros(len(dirs), np.uint8)
    object_ids = np.array([CLASS_NAMES.index(obj.kind) for obj in scene.objects], np.uint8)
    surface_ids = np.array([CLASS_NAMES.index(name) for name in ("floor", "wall", "ceiling")], np.uint8)
    labels[valid] = np.concatenate([surface_ids, object_ids])[hit[valid]]
    depth = np.where(valid & (t > MIN_DEPTH) & (t < MAX_DEPTH), t, 0.0).astype(np.float32)
    shape = (height, width)
    return RenderedScene(image.reshape(*shape, 3), labels.reshape(shape), depth.reshape(shape))


def render_sample(seed: int, index: int, image_size: int | tuple[int, int] = 128) -> RenderedScene:
    """Image `index` of the stream `seed`: rendered from np.random.default_rng([seed, index]) alone."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return render(sample_scene(np.random.default_rng([seed, index])), image_size)


__all__ = [
    "CLASS_NAMES",
    "MAX_DEPTH",
    "MIN_DEPTH",
    "OBJECT_KINDS",
    "PATTERNS",
    "SKY_COLOR",
    "Camera",
    "Material",
    "RenderedScene",
    "Room",
    "Scene",
    "SceneObject",
    "albedo",
    "camera_rays",
    "intersect",
    "render",
    "render_sample",
    "sample_scene",
    "surface_normals",
]
