"""Show what encoders see: the first three principal components of their last patch features as RGB.

    python scripts/visualize_features.py --model out/pretrain --model random-init photo1.jpg photo2.jpg \
        --output features.png --threshold 0.5 --attention --image-size 224

The figure has one column per input and, under the inputs, one row per model (plus a row of [CLS]-attention
maps per model with --attention). Any model folder works: the bare encoder, a pre-training folder or a
segmentation/depth folder (its encoder is used). The PCA is fitted per model over the patches of all inputs
together, so colours mean the same thing across a row. With --threshold T the background is masked out first,
as in the DINO/DINOv2 figures: the first component, scaled to [0, 1] and signed so the image border scores high,
marks the background where it exceeds T; the colours are then the PCA of the remaining (foreground) patches.
A model folder it cannot use ends in one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from densecl_vit.training.engine.exits import exit_status
from densecl_vit.training.evaluation.visualize import background_score, patch_border, pca_rgb
from densecl_vit.training.interop.inference import encoder_features, load_image, load_pretrained


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="model folder or Hub id (repeatable)")
    parser.add_argument("inputs", nargs="+", type=Path, help="images")
    parser.add_argument("--output", required=True, type=Path, help="figure file (.png)")
    parser.add_argument("--threshold", type=float, help="mask patches whose first component exceeds this")
    parser.add_argument("--attention", action="store_true", help="add [CLS]-attention maps of the last block")
    parser.add_argument(
        "--image-size",
        type=int,
        help="side in pixels the inputs are resized to, a multiple of the patch size (default: the model's "
        "processor size; the demo's 64 px encoder gives a 4x4 map, --image-size 224 a 14x14 one)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ...")
    args = parser.parse_args(argv)
    if args.image_size is not None and args.image_size < 1:
        parser.error(f"--image-size must be >= 1, got {args.image_size}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold is compared with a component scaled to [0, 1]; got {args.threshold}")
    return args


def feature_maps(results: list[dict], threshold: float | None) -> list[np.ndarray]:
    """One (h, w, 3) PCA colour map per image, fitted jointly over all the images' patches."""
    features = np.concatenate([r["features"] for r in results])
    foreground = None
    if threshold is not None:
        border = np.concatenate([patch_border(r["grid"]) for r in results])
        foreground = background_score(features, border) <= threshold
    rgb = pca_rgb(features, foreground)
    bounds = np.cumsum([0] + [len(r["features"]) for r in results])
    return [rgb[a:b].reshape(*r["grid"], 3) for r, a, b in zip(results, bounds[:-1], bounds[1:])]


def draw_heads(ax, attention: np.ndarray) -> None:
    """Tile (heads, h, w) attention maps inside one axes."""
    heads = len(attention)
    cols = math.ceil(math.sqrt(heads))
    rows = math.ceil(heads / cols)
    for spine in ax.spines.values():
        spine.set_visible(False)
    for head, attention_map in enumerate(attention):
        row, col = divmod(head, cols)
        inset = ax.inset_axes((col / cols, 1 - (row + 1) / rows, 0.96 / cols, 0.96 / rows))
        inset.imshow(attention_map, cmap=colormaps["inferno"], interpolation="nearest", vmin=0, vmax=1)
        inset.set_axis_off()


def draw_figure(
    images: list, labels: list[str], rows: list[tuple[str, str, list[np.ndarray]]], output: Path
) -> None:
    """Inputs in the first row, then one row per (title, kind "pca" | "attention", pictures)."""
    fig = Figure(figsize=(2.6 * len(images), 2.6 * (len(rows) + 1)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows) + 1, len(images), squeeze=False)
    for col, (image, label) in enumerate(zip(images, labels)):
        axes[0, col].imshow(np.asarray(image))
        axes[0, col].set_title(label, fontsize="small")
    for row, (title, kind, pictures) in enumerate(rows, 1):
        for col, (image, picture) in enumerate(zip(images, pictures)):
            if kind == "pca":
                # Stretched over the input's own extent: each patch's colour sits where the patch was.
                axes[row, col].imshow(
                    picture, interpolation="nearest", extent=(0, image.width, image.height, 0)
                )
            else:
                draw_heads(axes[row, col], picture)
        axes[row, 0].set_ylabel(title, fontsize="small")
    for ax in axes.ravel():
        ax.set(xticks=[], yticks=[])
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)


def square_size(side: int, patch_size: int) -> dict[str, int]:
    """The processor size of an --image-size: refused when the patch grid would not cover it exactly."""
    if side % patch_size:
        raise ValueError(f"--image-size {side} must be a multiple of the model's patch size {patch_size}")
    return {"height": side, "width": side}


def model_names(models: list[str]) -> list[str]:
    """Short row labels: the folder names, with their parents where two are equal."""
    names = [Path(m).name or m for m in models]
    return [f"{Path(m).parent.name}/{n}" if names.count(n) > 1 else n for m, n in zip(models, names)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_status(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    images, labels = [], []
    for path in args.inputs:
        try:
            images.append(load_image(path))
            labels.append(path.name)
        except Exception as error:  # any decoder failure: report the file and go on
            print(f"skipping {path}: {type(error).__name__}: {error}", file=sys.stderr)
    if not images:
        print("error: none of the inputs could be read", file=sys.stderr)
        return 1
    rows = []
    for model_dir, name in zip(args.model, model_names(args.model)):
        model, processor = load_pretrained(model_dir, args.device)
        if args.image_size is not None:
            processor.size = square_size(args.image_size, model.config.patch_size)
        results = [encoder_features(model.base_model, processor, image, args.attention) for image in images]
        rows.append((f"{name}\nPCA", "pca", feature_maps(results, args.threshold)))
        if args.attention:
            rows.append((f"{name}\n[CLS] attention", "attention", [r["attention"] for r in results]))
    draw_figure(images, labels, rows, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
