"""Synthetic indoor scenes: analytic depth and labels, primitives against ray marching, shadows, determinism,
and the parquet dataset round trip."""

import importlib.util
import json
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from densecl_vit.training.data.synthetic.dataset import (
    VALIDATION_INDEX_OFFSET,
    dataset_is_complete,
    load_synthetic_dataset,
    reduced_id2label,
    write_dataset,
)
from densecl_vit.training.data.synthetic.scenes import (
    CLASS_NAMES,
    OBJECT_KINDS,
    Camera,
    Material,
    Room,
    Scene,
    SceneObject,
    intersect,
    render,
    render_sample,
)

GREY = Material(color=(0.6, 0.6, 0.6))
SIZE = 33  # odd, so the centre pixel's ray is the camera axis


def _room(ceiling: bool = True) -> Room:
    return Room(width=6.0, depth=8.0, height=3.0, floor=GREY, wall=GREY, ceiling=GREY if ceiling else None)


def _pixel_v(row: int, fov_degrees: float, size: int = SIZE) -> float:
    """Vertical tangent of the ray through pixel row `row`, written from the pinhole model."""
    return (1 - 2 * (row + 0.5) / size) * math.tan(math.radians(fov_degrees) / 2)


@pytest.mark.parametrize("ceiling", [True, False])
def test_sphere_on_axis_and_room_match_analytic_depth(ceiling: bool) -> None:
    # camera at z = -3, 1.5 m high, looking down +z; sphere of radius 0.5 centred 3 m ahead; back wall at z = 4
    fov = 40.0
    sphere = SceneObject("sphere", position=(0.0, 1.0, 0.0), extent=(0.5, 1.0, 0.5), material=GREY)
    camera = Camera(position=(0.0, 1.5, -3.0), look_at=(0.0, 1.5, 0.0), fov_degrees=fov)
    out = render(Scene(_room(ceiling), camera, light_position=(0.0, 2.9, 0.0), objects=(sphere,)), SIZE)
    centre = SIZE // 2
    assert out.label[centre, centre] == CLASS_NAMES.index("sphere")
    assert out.depth[centre, centre] == pytest.approx(3.0 - 0.5, abs=1e-3)
    assert out.label[centre, 2] == CLASS_NAMES.index("wall")  # left of the sphere: the back wall, z-depth 7
    assert out.depth[centre, 2] == pytest.approx(7.0, abs=1e-3)
    floor_depth = 1.5 / -_pixel_v(SIZE - 1, fov)  # bottom row meets the floor 1.5 m below the camera
    assert out.label[SIZE - 1, centre] == CLASS_NAMES.index("floor")
    assert out.depth[SIZE - 1, centre] == pytest.approx(floor_depth, abs=1e-3)
    if ceiling:  # top row meets the ceiling 1.5 m above the camera
        assert out.label[0, centre] == CLASS_NAMES.index("ceiling")
        assert out.depth[0, centre] == pytest.approx(floor_depth, abs=1e-3)
    else:  # open room: the sky is "other" with invalid depth
        assert out.label[0, centre] == 0 and out.depth[0, centre] == 0.0
        assert tuple(out.image[0, centre]) != tuple(out.image[SIZE - 1, centre])


@pytest.mark.parametrize(
    ("kind", "extent", "angle", "expected"),
    [
        ("sphere", (0.5, 1.0, 0.5), 0.0, 2.5),
        ("box", (0.5, 1.0, 0.4), 0.0, 2.6),
        ("box", (0.5, 1.0, 0.5), math.pi / 4, 3.0 - math.sqrt(0.5)),  # a vertical edge faces the camera
        ("cylinder", (0.4, 1.0, 0.4), 0.0, 2.6),
        ("cone", (0.5, 1.0, 0.5), 0.0, 2.75),  # radius 0.25 at half height
        ("pyramid", (0.5, 1.0, 0.3), 0.0, 2.85),  # half-depth 0.15 at half height
    ],
)
def test_each_primitive_on_axis(kind: str, extent: tuple, angle: float, expected: float) -> None:
    obj = SceneObject(kind, position=(0.0, 0.0, 0.0), extent=extent, material=GREY, angle=angle)
    camera = Camera(position=(0.0, 0.5, -3.0), look_at=(0.0, 0.5, 0.0), fov_degrees=40.0)
    out = render(Scene(_room(), camera, light_position=(1.0, 2.9, -1.0), objects=(obj,)), SIZE)
    assert out.label[SIZE // 2, SIZE // 2] == CLASS_NAMES.index(kind)
    assert out.depth[SIZE // 2, SIZE // 2] == pytest.approx(expected, abs=1e-3)


def _inside(obj: SceneObject, p: np.ndarray) -> np.ndarray:
    """Point-in-solid test (N,) for points (N, 3), written independently of the intersection code."""
    hx, h, hz = obj.extent
    cos, sin = math.cos(obj.angle), math.sin(obj.angle)
    q = p - obj.position
    x, y, z = cos * q[:, 0] - sin * q[:, 2], q[:, 1], sin * q[:, 0] + cos * q[:, 2]  # undo the rotation
    in_height = (y > 0) & (y < h)
    if obj.kind == "sphere":
        return x**2 + (y - hx) ** 2 + z**2 < hx**2
    if obj.kind == "box":
        return in_height & (np.abs(x) < hx) & (np.abs(z) < hz)
    if obj.kind == "cylinder":
        return in_height & (x**2 + z**2 < hx**2)
    if obj.kind == "cone":
        return in_height & (np.hypot(x, z) < hx * (1 - y / h))
    return in_height & (np.abs(x) < hx * (1 - y / h)) & (np.abs(z) < hz * (1 - y / h))


@pytest.mark.parametrize("kind", OBJECT_KINDS)
def test_intersections_match_ray_marching(kind: str) -> None:
    rng = np.random.default_rng(7)
    obj = SceneObject(kind, position=(0.3, 0.0, -0.2), extent=(0.5, 1.1, 0.35), material=GREY, angle=0.6)
    rays = 150
    origins = rng.normal(size=(rays, 3))
    origins = origins / np.linalg.norm(origins, axis=1, keepdims=True) * 2.5 + [0.3, 0.5, -0.2]
    targets = np.array([0.3, 0.5, -0.2]) + rng.uniform(-0.7, 0.7, (rays, 3))
    dirs = (targets - origins) * rng.uniform(0.5, 2.0, (rays, 1))  # unnormalised on purpose
    exact = intersect(obj, origins, dirs)
    step = 1e-3 / np.linalg.norm(dirs, axis=1)  # 1 mm along every ray
    ts = np.arange(4000)[None, :] * step[:, None]  # (rays, steps)
    points = origins[:, None, :] + ts[..., None] * dirs[:, None, :]
    inside = _inside(obj, points.reshape(-1, 3)).reshape(ts.shape)
    marched = np.where(inside.any(axis=1), ts[np.arange(rays), inside.argmax(axis=1)], np.inf)
    both = np.isfinite(exact) & np.isfinite(marched)
    assert both.sum() > rays // 3
    assert np.sum(np.isfinite(exact) != np.isfinite(marched)) <= 2  # grazing rays may slip between samples
    np.testing.assert_array_less(np.abs(exact[both] - marched[both]), 1.5 * step[both])


def test_object_casts_a_shadow_on_the_floor() -> None:
    ball = SceneObject("sphere", position=(0.0, 0.0, 0.0), extent=(0.4, 0.8, 0.4), material=GREY)
    camera = Camera(position=(0.0, 2.0, -3.0), look_at=(0.0, 0.0, 0.0), fov_degrees=60.0)
    lit = Scene(_room(), camera, light_position=(1.5, 2.5, 1.5), ambient=0.2)
    without = render(lit, 48)
    with_ball = render(Scene(lit.room, camera, lit.light_position, lit.ambient, objects=(ball,)), 48)
    floor = (without.label == CLASS_NAMES.index("floor")) & (with_ball.label == CLASS_NAMES.index("floor"))
    brightness_change = with_ball.image[floor].astype(int).sum(-1) - without.image[floor].astype(int).sum(-1)
    assert (brightness_change <= 0).all()  # an object only ever takes light away from the floor
    assert (brightness_change < -30).sum() >= 10  # and a visible shadow falls on it


def test_rendering_is_deterministic_per_seed_and_index() -> None:
    first, again = render_sample(0, 5, 32), render_sample(0, 5, 32)
    for name in ("image", "label", "depth"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.image, render_sample(1, 5, 32).image)
    assert not np.array_equal(first.image, render_sample(0, 6, 32).image)


def test_batch_covers_every_class_and_keeps_depth_in_range() -> None:
    seen = set()
    for index in range(16):
        out = render_sample(3, index, 32)
        assert out.image.shape == (32, 32, 3) and out.image.dtype == np.uint8
        assert out.label.dtype == np.uint8 and out.depth.dtype == np.float32
        np.testing.assert_array_equal(out.depth > 0, out.label != 0)  # depth is invalid exactly on "other"
        valid = out.depth[out.depth > 0]
        assert valid.min() > 1e-3 and valid.max() < 10.0
        seen |= set(np.unique(out.label).tolist())
    assert {CLASS_NAMES.index(name) for name in ("floor", "wall", *OBJECT_KINDS)} <= seen
    assert max(seen) < len(CLASS_NAMES)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="kind"):
        intersect(SceneObject("torus", (0, 0, 0), (1, 1, 1), GREY), np.zeros(3), np.ones((1, 3)))
    with pytest.raises(ValueError, match="num_train"):
        write_dataset("unused", num_train=0, num_val=1)


def test_write_and_stream_round_trip(tmp_path: Path) -> None:
    write_dataset(tmp_path, num_train=3, num_val=2, image_size=32, seed=4, num_workers=2, shard_size=2)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
        "validation-00000-of-00001.parquet",
    ]
    assert json.loads((tmp_path / "class_names.json").read_text()) == list(CLASS_NAMES)
    id2label = json.loads((tmp_path / "id2label.json").read_text())
    assert {int(k): v for k, v in id2label.items()} == reduced_id2label() and id2label["0"] == "floor"
    assert dataset_is_complete(tmp_path, 3, 2, 32, 4, shard_size=2)
    assert not dataset_is_complete(tmp_path, 3, 2, 32, 5, shard_size=2)

    train = list(load_synthetic_dataset(tmp_path, "train"))
    assert len(train) == 3 and isinstance(train[0]["image"], Image.Image)
    for index, example in enumerate(train):
        expected = render_sample(4, index, 32)  # any row renders again from (seed, index) alone
        assert example["image"].mode == "RGB" and example["annotation"].mode == "L"
        np.testing.assert_array_equal(np.asarray(example["image"]), expected.image)
        np.testing.assert_array_equal(np.asarray(example["annotation"]), expected.label)
        np.testing.assert_array_equal(np.asarray(example["depth_map"], dtype=np.float32), expected.depth)
    validation = next(iter(load_synthetic_dataset(tmp_path, "validation")))
    np.testing.assert_array_equal(
        np.asarray(validation["image"]), render_sample(4, VALIDATION_INDEX_OFFSET, 32).image
    )

    files = {s: str(tmp_path / "data" / f"{s}-*.parquet") for s in ("train", "validation")}
    streamed = datasets.load_dataset("parquet", data_files=files, streaming=True)
    assert streamed["train"].features["depth_map"] == datasets.Array2D((32, 32), "float32")
    assert isinstance(streamed["validation"].features["annotation"], datasets.Image)
    folder = datasets.load_dataset(str(tmp_path), streaming=True)
    assert set(folder) == {"train", "validation"} and len(list(folder["validation"])) == 2


def test_script_skips_a_complete_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = Path(__file__).resolve().parents[2] / "scripts" / "make_synthetic_scenes.py"
    spec = importlib.util.spec_from_file_location("make_synthetic_scenes", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--output", str(tmp_path), "--num-train", "2", "--image-size", "16", "--num-workers", "0"]
    script.main(argv)
    assert "images/s" in capsys.readouterr().out
    written = (tmp_path / "meta.json").stat().st_mtime_ns
    script.main(argv)
    assert "already holds" in capsys.readouterr().out
    assert (tmp_path / "meta.json").stat().st_mtime_ns == written
    script.main([*argv, "--seed", "1"])
    assert json.loads((tmp_path / "meta.json").read_text())["seed"] == 1
