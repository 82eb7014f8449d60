"""Writes the synthetic indoor scenes of `synthetic_scenes` as a local `datasets` parquet dataset.

Layout of a dataset folder (the Hub convention, so `datasets.load_dataset(folder)` finds the splits):

    folder/data/train-00000-of-0000N.parquet, folder/data/validation-00000-of-0000M.parquet
    folder/class_names.json   raw label names, index = value in `annotation` (0 = "other")
    folder/id2label.json      {"0": "floor", ...}: the ids after reduce_labels (raw 0 -> 255, v -> v - 1)
    folder/meta.json          the settings, written last: its presence marks a complete dataset
    folder/README.md          dataset card

Columns: `image` (datasets.Image, RGB PNG), `annotation` (datasets.Image, mode "L" PNG label map) and
`depth_map` (datasets.Array2D((H, W), "float32"), metres, 0 = invalid). Depth is a float array rather than an
image because a mode "F" TIFF does not survive every decoder and a 16-bit PNG would quantise it;
`np.asarray(example["depth_map"], dtype=np.float32)` reads it, as it reads a PIL depth image.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from .scenes import CLASS_NAMES, MAX_DEPTH, MIN_DEPTH, render_sample

SPLITS: tuple[str, ...] = ("train", "validation")
VALIDATION_INDEX_OFFSET = 10**9  # validation image j is stream index offset + j, apart from any train index
RENDERER_VERSION = 1  # bump when a change to the renderer alters the images of a seed
_FILES_PER_SPLIT_PATTERN = "data/{split}-*.parquet"


def reduced_id2label() -> dict[int, str]:
    """Label names after reduce_labels (raw 0 = "other" becomes the ignore index 255, raw v becomes v - 1)."""
    return {raw - 1: name for raw, name in enumerate(CLASS_NAMES) if raw > 0}


def dataset_features(image_size: int) -> datasets.Features:
    return datasets.Features(
        {
            "image": datasets.Image(),
            "annotation": datasets.Image(),
            "depth_map": datasets.Array2D(shape=(image_size, image_size), dtype="float32"),
        }
    )


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _render_encoded(job: tuple[int, int, int]) -> tuple[bytes, bytes, np.ndarray]:
    """PNG of the image, PNG of the label map and depth (S, S) of stream index job[1]; runs in a worker."""
    seed, index, image_size = job
    scene = render_sample(seed, index, image_size)
    return _png(scene.image), _png(scene.label), scene.depth


def _shard_table(rows: list[tuple[bytes, bytes, np.ndarray]], features: datasets.Features) -> pa.Table:
    """Arrow table of rendered rows; the schema carries the features, so Image columns decode on load."""
    schema = features.arrow_schema
    image_type = schema.field("image").type
    columns = [pa.array([{"bytes": row[k], "path": None} for row in rows], type=image_type) for k in (0, 1)]
    depth = np.stack([row[2] for row in rows])  # (N, H, W)
    n, h, w = depth.shape
    lines = pa.ListArray.from_arrays(np.arange(0, n * h * w + 1, w, dtype=np.int32), pa.array(depth.ravel()))
    maps = pa.ListArray.from_arrays(np.arange(0, n * h + 1, h, dtype=np.int32), lines)
    columns.append(pa.ExtensionArray.from_storage(schema.field("depth_map").type, maps))
    return pa.Table.from_arrays(columns, schema=schema)


def _jobs(num_train: int, num_val: int, image_size: int, seed: int) -> Iterator[tuple[int, int, int]]:
    for index in range(num_train):
        yield seed, index, image_size
    for index in range(num_val):
        yield seed, VALIDATION_INDEX_OFFSET + index, image_size


def _settings(num_train: int, num_val: int, image_size: int, seed: int, shard_size: int) -> dict:
    return {
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "seed": seed,
        "shard_size": shard_size,
        "renderer_version": RENDERER_VERSION,
    }


def _shard_names(split: str, count: int, shard_size: int) -> list[str]:
    shards = math.ceil(count / shard_size)
    return [f"data/{split}-{i:05d}-of-{shards:05d}.parquet" for i in range(shards)]


def dataset_is_complete(
    output_dir: str | os.PathLike,
    num_train: int,
    num_val: int,
    image_size: int,
    seed: int,
    shard_size: int = 1000,
) -> bool:
    """True when output_dir holds a finished dataset written with exactly these settings."""
    meta_path = Path(output_dir) / "meta.json"
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    expected = _settings(num_train, num_val, image_size, seed, shard_size)
    if any(meta.get(key) != value for key, value in expected.items()):
        return False
    return all((Path(output_dir) / name).is_file() for name in meta.get("files", []))


def _dataset_card(settings: dict, splits: list[str]) -> str:
    configs = "\n".join(
        f"  - split: {s}\n    path: {_FILES_PER_SPLIT_PATTERN.format(split=s)}" for s in splits
    )
    classes = ", ".join(f"{i} = {name}" for i, name in enumerate(CLASS_NAMES))
    return f"""---
configs:
- config_name: default
  data_files:
{configs}
task_categories:
- image-segmentation
- depth-estimation
---
# Synthetic indoor scenes

Procedurally rendered rooms (floor, walls, an optional ceiling) with spheres, boxes, cylinders, cones and
pyramids under a point light with cast shadows, written by `densecl_vit.training.data.synthetic.dataset`.
Settings: {json.dumps(settings)}.

- `image`: RGB PNG, {settings["image_size"]}x{settings["image_size"]}.
- `annotation`: mode "L" PNG label map, ADE20K convention: {classes}. Label 0 ("other": the sky of
  rooms without a ceiling) is ignored after `reduce_labels`; `id2label.json` names the reduced ids.
- `depth_map`: float32 array (Array2D), z-depth in metres along the camera axis, within
  ({MIN_DEPTH}, {MAX_DEPTH}); 0 marks pixels with no surface.

Image i of a split is rendered from `numpy.random.default_rng([seed, index])` alone (validation indices
start at {VALIDATION_INDEX_OFFSET}), so any subset can be rendered again identically.
"""


def _write_metadata(root: Path, settings: dict, splits: list[str], files: list[str]) -> None:
    (root / "class_names.json").write_text(json.dumps(list(CLASS_NAMES), indent=2) + "\n")
    id2label = {str(k): v for k, v in reduced_id2label().items()}
    (root / "id2label.json").write_text(json.dumps(id2label, indent=2) + "\n")
    (root / "README.md").write_text(_dataset_card(settings, splits))
    (root / "meta.json").write_text(json.dumps({**settings, "files": files}, indent=2) + "\n")


def write_dataset(
    output_dir: str | os.PathLike,
    num_train: int,
    num_val: int,
    image_size: int = 128,
    seed: int = 0,
    num_workers: int | None = None,
    shard_size: int = 1000,
    progress: bool = False,
) -> Path:
    """Render num_train + num_val scenes of image_size x image_size pixels into a parquet dataset folder.

    Rendering runs in a multiprocessing pool of `num_workers` processes (default: os.cpu_count(); 0 renders
    in this process); shards of `shard_size` rows are written in order as their rows arrive.
    """
    if num_train < 1 or num_val < 0:
        raise ValueError(f"need num_train >= 1 and num_val >= 0, got {num_train} and {num_val}")
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (0 renders in this process), got {num_workers}")
    if image_size < 1 or shard_size < 1 or seed < 0:
        raise ValueError(
            f"image_size, shard_size must be >= 1 and seed >= 0, got {image_size}, {shard_size}, {seed}"
        )
    if shard_size * image_size**2 >= 2**31:  # depth rows are indexed by 32-bit Arrow list offsets
        raise ValueError(f"shard_size * image_size^2 must stay below 2^31; lower shard_size ({shard_size})")
    root = Path(output_dir)
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "meta.json").unlink(missing_ok=True)
    for stale in (root / "data").glob("*.parquet"):
        stale.unlink()
    settings = _settings(num_train, num_val, image_size, seed, shard_size)
    splits = [s for s, n in zip(SPLITS, (num_train, num_val)) if n > 0]
    names = {s: _shard_names(s, n, shard_size) for s, n in zip(SPLITS, (num_train, num_val))}
    targets = [
        (root / name, min(shard_size, n - i * shard_size))
        for s, n in zip(SPLITS, (num_train, num_val))
        for i, name in enumerate(names[s])
    ]
    features = dataset_features(image_size)
    workers = min((os.cpu_count() or 1) if num_workers is None else num_workers, num_train + num_val)
    jobs = _jobs(num_train, num_val, image_size, seed)
    if workers == 0:
        _write_shards(map(_render_encoded, jobs), targets, features, progress)
    else:
        with multiprocessing.Pool(workers) as pool:
            _write_shards(pool.imap(_render_encoded, jobs, chunksize=8), targets, features, progress)
    _write_metadata(root, settings, splits, [name for s in splits for name in names[s]])
    return root


def _write_shards(
    results: Iterator[tuple[bytes, bytes, np.ndarray]],
    targets: list[tuple[Path, int]],
    features: datasets.Features,
    progress: bool,
) -> None:
    """Consume rendered rows in order, writing each (path, row count) target as one parquet file."""
    with tqdm(
        total=sum(rows for _, rows in targets), unit="img", disable=not progress, desc="rendering"
    ) as bar:
        for path, rows in targets:
            shard = []
            for _ in range(rows):
                shard.append(next(results))
                bar.update(1)
            pq.write_table(_shard_table(shard, features), path)


def load_synthetic_dataset(
    output_dir: str | os.PathLike, split: str = "train", streaming: bool = True
) -> datasets.IterableDataset | datasets.Dataset:
    """One split of a folder written by `write_dataset`, streamed by default."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pattern = Path(output_dir) / _FILES_PER_SPLIT_PATTERN.format(split=split)
    if not any(pattern.parent.glob(pattern.name)):
        raise ValueError(
            f"no {split} shards under {output_dir}; write them with scripts/make_synthetic_scenes.py"
        )
    return datasets.load_dataset(
        "parquet", data_files={split: str(pattern)}, split=split, streaming=streaming
    )
