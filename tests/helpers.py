"""Tiny local datasets and encoder folders for the fine-tuning and evaluation tests.

Each image is a few rectangles of class colours plus noise, so a 2-layer model learns it within ~100 steps:
- segmentation: raw labels 1..3 (0 = "other", ignored after reduce_labels), an `id2label.json` beside the data;
- depth: depth in metres = 1 + 6 * grey level of the rectangle, 0 (invalid) along the top rows.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch

SEG_CLASSES = {"0": "red thing", "1": "green thing", "2": "blue thing"}
COLOURS = np.array([[90, 90, 90], [220, 40, 40], [40, 200, 60], [50, 70, 230]])  # raw label 0..3
THREADS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _layout(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) raw labels: background 0 and three rectangles of classes 1..3."""
    label = np.zeros((size, size), dtype=np.uint8)
    for value in rng.permutation([1, 2, 3]):
        top, left = rng.integers(0, size // 2, size=2)
        height, width = rng.integers(size // 3, size // 2 + 1, size=2)
        label[top : top + height, left : left + width] = value
    return label


def _image(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
    noise = rng.normal(0, 12, size=(*label.shape, 3))
    return np.clip(COLOURS[label] + noise, 0, 255).astype(np.uint8)


def write_segmentation_dataset(root: Path, num_train: int = 16, num_val: int = 4, size: int = 32) -> Path:
    """Parquet splits data/{train,validation}-*.parquet with `image` and `annotation`, and id2label.json."""
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    rng = np.random.default_rng(0)
    for split, count in (("train", num_train), ("validation", num_val)):
        rows = {"image": [], "annotation": []}
        for _ in range(count):
            label = _layout(rng, size)
            rows["image"].append({"bytes": _png(_image(rng, label)), "path": None})
            rows["annotation"].append({"bytes": _png(label), "path": None})
        (root / "data").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            root / f"data/{split}-00000-of-00001.parquet"
        )
    (root / "id2label.json").write_text(json.dumps(SEG_CLASSES))
    return root


def write_depth_dataset(
    root: Path, num_train: int = 16, num_val: int = 4, size: int = 32, png_millimetres: bool = False
) -> Path:
    """Parquet splits with `image` and `depth_map`: float32 metres (Array2D), or 16-bit PNGs in millimetres."""
    depth_feature = datasets.Image() if png_millimetres else datasets.Array2D((size, size), "float32")
    features = datasets.Features({"image": datasets.Image(), "depth_map": depth_feature})
    rng = np.random.default_rng(1)
    for split, count in (("train", num_train), ("validation", num_val)):
        rows = {"image": [], "depth_map": []}
        for _ in range(count):
            label = _layout(rng, size)
            grey = rng.uniform(0.1, 0.9, size=4)[label]
            image = np.clip(grey[..., None] * 255 + rng.normal(0, 6, size=(size, size, 3)), 0, 255)
            depth = (1.0 + 6.0 * grey).astype(np.float32)
            depth[:2] = 0.0
            rows["image"].append({"bytes": _png(image.astype(np.uint8)), "path": None})
            if png_millimetres:
                rows["depth_map"].append({"bytes": _png((depth * 1000).astype(np.uint16)), "path": None})
            else:
                rows["depth_map"].append(depth)
        (root / "data").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            root / f"data/{split}-00000-of-00001.parquet"
        )
    return root


def save_encoder(folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny `DenseCLViTModel` folder (hidden 32, 2 layers, 2 heads, patch 8, image 32)."""
    from densecl_vit.modeling import DenseCLViTConfig, DenseCLViTModel

    torch.manual_seed(seed)
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    DenseCLViTModel(DenseCLViTConfig(**{**kwargs, **overrides})).save_pretrained(folder)
    return folder


def subprocess_env() -> dict[str, str]:
    """Offline, single-threaded (bit-reproducible) environment for a script run in a child process."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(THREADS_ENV, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return env


SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
PYTHON = sys.executable


def tiny_config(**overrides):
    """The suite's tiny model: image 32, patch 8, hidden 32, 2 layers, 2 heads."""
    from densecl_vit import DenseCLViTConfig

    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    kwargs.update(overrides)
    return DenseCLViTConfig(**kwargs)


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts folder is no package), to call its main(argv) in this process."""
    spec = importlib.util.spec_from_file_location(
        f"script_{name}", Path(__file__).parents[1] / "scripts" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_isolated(code: str, cwd, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run Python code in a fresh process that cannot import `densecl_vit` (what a Hub user has), offline."""
    prelude = "import sys\nsys.modules['densecl_vit'] = None  # any import of the package now fails\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd) + "/hf_modules", TRANSFORMERS_VERBOSITY="error")
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
