"""Pictures: segmentation overlays, colour-mapped depth and PCA maps of patch features.

Figures are drawn on matplotlib's Agg canvas directly (`Figure` + `FigureCanvasAgg`, never pyplot), so importing
this module leaves the caller's interactive backend alone and works on machines without a display.
Models are loaded and run in `inference`.
Images are (H, W, 3) uint8 arrays throughout; label maps (H, W) integers; depth (H, W) metres.
Training curves are drawn by `curves`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from densecl_vit.training.data.decoding import to_rgb
from densecl_vit.training.interop.inference import load_image, load_pretrained, model_task, predict_images

DPI = 128  # a power of two: pixel sizes divided by it and multiplied back are exact in floating point
MIN_DISPLAY_HEIGHT = 256  # smaller images are enlarged (nearest, integer factor) so that text stays legible
DEPTH_CMAP = "magma_r"  # reversed: near = bright
# The file name of a prediction's picture after the image's name (scripts/predict.py, the example of a release).
PICTURE_SUFFIXES = {"segmentation": "_overlay.png", "depth": "_depth.png"}


# ---------------------------------------------------------------------------------------------------------------------
# Colours
# ---------------------------------------------------------------------------------------------------------------------


def class_palette(num_classes: int) -> np.ndarray:
    """(K, 3) uint8 colours; class i gets the same colour whatever K is.

    The first 20 are matplotlib's tab20 (the ten dark tones, then the ten light ones); later classes step round
    the hue circle by the golden angle, alternating saturation and value so that neighbours stay apart.
    """
    tab20 = np.asarray(colormaps["tab20"].colors)
    colors = list(tab20[0::2]) + list(tab20[1::2])
    for i in range(20, num_classes):
        hsv = ((i * 0.6180339887) % 1.0, 0.85 - 0.35 * (i % 2), 0.95 - 0.3 * ((i // 2) % 2))
        colors.append(hsv_to_rgb(hsv))
    return np.round(np.asarray(colors[:num_classes]) * 255).astype(np.uint8).reshape(num_classes, 3)


def overlay_segmentation(
    image: np.ndarray, labels: np.ndarray, palette: np.ndarray | None = None, alpha: float = 0.5
) -> np.ndarray:
    """Blend class colours into an image: round((1 - alpha) * image + alpha * palette[labels]), (H, W, 3) uint8."""
    labels = np.asarray(labels)
    if labels.shape != image.shape[:2]:
        raise ValueError(
            f"labels {labels.shape} and image {image.shape[:2]} must have the same height and width."
        )
    if palette is None:
        palette = class_palette(int(labels.max(initial=0)) + 1)
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * palette[labels].astype(np.float64)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def colorize_depth(
    depth: np.ndarray, vmin: float | None = None, vmax: float | None = None, cmap: str = DEPTH_CMAP
) -> np.ndarray:
    """(H, W) metres -> (H, W, 3) uint8 through `cmap` over [vmin, vmax] (default: the map's own finite range)."""
    depth = np.asarray(depth, dtype=np.float64)
    vmin, vmax = _depth_range(depth, vmin, vmax)
    rgb = colormaps[cmap](np.clip((depth - vmin) / (vmax - vmin), 0.0, 1.0))[..., :3]
    return np.round(rgb * 255).astype(np.uint8)


def _depth_range(depth: np.ndarray, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    finite = depth[np.isfinite(depth)]
    vmin = float(finite.min()) if vmin is None and finite.size else (0.0 if vmin is None else vmin)
    vmax = float(finite.max()) if vmax is None and finite.size else (1.0 if vmax is None else vmax)
    return vmin, max(vmax, vmin + 1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Prediction figures: the picture at its own resolution, a legend or colour bar beside it
# ---------------------------------------------------------------------------------------------------------------------


def display_scale(height: int) -> int:
    """Integer nearest-neighbour enlargement applied to images shorter than MIN_DISPLAY_HEIGHT."""
    return max(1, math.ceil(MIN_DISPLAY_HEIGHT / max(height, 1)))


def _enlarge(picture: np.ndarray) -> np.ndarray:
    scale = display_scale(picture.shape[0])
    return picture if scale == 1 else picture.repeat(scale, axis=0).repeat(scale, axis=1)


def depth_gap(height: int) -> int:
    """White columns between the input and its depth in `depth_figure`."""
    return max(2, height // 32)


def _font_px(height: int) -> float:
    return float(np.clip(height / 32, 10, 36))


def _render_panel(height: int, draw: Callable[[Figure, float], None]) -> np.ndarray:
    """(height, w, 3) uint8: what `draw(fig, font_pt)` puts on a white canvas, cropped right of its last artist."""
    width = 6 * height
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    draw(fig, _font_px(height) * 72 / DPI)
    canvas.draw()
    right = fig.get_tightbbox(canvas.get_renderer()).x1 * DPI + _font_px(height)
    pixels = np.asarray(canvas.buffer_rgba())[..., :3]
    return pixels[:, : int(np.clip(math.ceil(right), 1, width))].copy()


def segmentation_figure(
    image: np.ndarray, labels: np.ndarray, id2label: dict | None = None, alpha: float = 0.5
) -> np.ndarray:
    """The overlay of `labels` on `image` with a legend of the classes present (largest first, with their share).

    Returns (H', W + legend, 3) uint8; the left part is `overlay_segmentation(image, labels)` enlarged by
    `display_scale(H)` (H' = H * scale).
    """
    labels = np.asarray(labels)
    num_classes = max(len(id2label or {}), int(labels.max(initial=0)) + 1)
    palette = class_palette(num_classes)
    picture = _enlarge(overlay_segmentation(image, labels, palette, alpha))
    ids, counts = np.unique(labels, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    entries = [(class_name(id2label, int(ids[i])), counts[i] / labels.size, palette[ids[i]]) for i in order]

    def draw(fig: Figure, font_pt: float) -> None:
        font_px = font_pt * DPI / 72
        rows = max(1, int(picture.shape[0] * 0.94 // (font_px * 1.55)))
        handles = [
            Patch(facecolor=color / 255, label=f"{name} ({share:.0%})") for name, share, color in entries
        ]
        fig.legend(
            handles=handles,
            loc="center left",
            bbox_to_anchor=(font_px / fig.bbox.width, 0.5),
            frameon=False,
            fontsize=font_pt,
            ncols=math.ceil(len(handles) / rows),
            handlelength=1.2,
            borderaxespad=0.0,
        )

    return np.concatenate([picture, _render_panel(picture.shape[0], draw)], axis=1)


def depth_figure(
    depth: np.ndarray,
    image: np.ndarray | None = None,
    cmap: str = DEPTH_CMAP,
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """The colour-mapped depth with a colour bar in metres: (H', W + bar, 3) uint8, left part as `colorize_depth`
    enlarged by `display_scale(H)`. With the input `image` (H, W, 3) it comes first, then a white gap of
    `depth_gap(H')` columns: (H', W + gap + W + bar, 3), so the picture shows what the depth is of."""
    depth = np.asarray(depth, dtype=np.float64)
    vmin, vmax = _depth_range(depth, vmin, vmax)
    picture = _enlarge(colorize_depth(depth, vmin, vmax, cmap))
    if image is not None:
        gap = np.full((picture.shape[0], depth_gap(picture.shape[0]), 3), 255, dtype=np.uint8)
        picture = np.concatenate([_enlarge(np.asarray(image, dtype=np.uint8)[..., :3]), gap, picture], axis=1)

    def draw(fig: Figure, font_pt: float) -> None:
        font_px = font_pt * DPI / 72
        width, height = fig.bbox.width, fig.bbox.height
        cax = fig.add_axes((font_px / width, 0.06, max(8.0, height / 24) / width, 0.88))
        bar = fig.colorbar(ScalarMappable(norm=Normalize(vmin, vmax), cmap=cmap), cax=cax)
        bar.set_label("depth (m)", fontsize=font_pt)
        bar.ax.tick_params(labelsize=font_pt)
        # Metres on every tick, never an offset such as "+5" above a bar of a narrow range.
        bar.ax.yaxis.get_major_formatter().set_useOffset(False)

    return np.concatenate([picture, _render_panel(picture.shape[0], draw)], axis=1)


def class_name(id2label: dict | None, class_id: int) -> str:
    """`id2label[class_id]` whether its keys are ints or strings; the id itself when it has no name."""
    id2label = id2label or {}
    return str(id2label.get(class_id, id2label.get(str(class_id), class_id)))


def save_png(picture: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an (H, W, 3) uint8 picture or an (H, W) uint8/uint16 map as PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(picture).save(path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Pictures of a model's predictions (the model runs in `inference`)
# ---------------------------------------------------------------------------------------------------------------------


def render_prediction(
    image: PIL.Image.Image, prediction: np.ndarray, task: str, id2label: dict | None = None
) -> np.ndarray:
    """The picture of one prediction: `segmentation_figure` (the overlay on the image) or `depth_figure` (the
    image beside its depth), (H', W', 3) uint8."""
    if task == "segmentation":
        return segmentation_figure(np.asarray(image), prediction, id2label)
    return depth_figure(prediction, np.asarray(image))


def prediction_picture(model: Any, processor: Any, image: PIL.Image.Image) -> np.ndarray:
    """A loaded segmentation or depth model run on one RGB image, drawn as scripts/predict.py draws it:
    `render_prediction` of `predict_images`, (H', W', 3) uint8."""
    prediction = predict_images(model, processor, [image])[0]
    return render_prediction(image, prediction, model_task(model), model.config.id2label)


def render_example_prediction(
    model_dir: str | os.PathLike,
    image: str | os.PathLike | PIL.Image.Image | np.ndarray,
    output_png: str | os.PathLike,
    device: str = "cpu",
) -> Path:
    """Run a segmentation or depth model folder on one photograph and save the picture of its prediction."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    elif not isinstance(image, PIL.Image.Image):
        image = PIL.Image.fromarray(np.asarray(image))
    model, processor = load_pretrained(model_dir, device)
    return save_png(prediction_picture(model, processor, to_rgb(image)), output_png)


# ---------------------------------------------------------------------------------------------------------------------
# Patch features: PCA maps (the features come from `inference.encoder_features`)
# ---------------------------------------------------------------------------------------------------------------------


def principal_components(features: np.ndarray, num_components: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N, k) and unit axes (k, D) of the top-k principal components of (N, D) features.

    Axes come from the eigenvectors of the covariance, largest variance first, each signed so that its largest
    loading is positive (scikit-learn's convention), which makes the colours repeatable.
    """
    features = np.asarray(features, dtype=np.float64)
    centered = features - features.mean(axis=0)
    _, eigenvectors = np.linalg.eigh(centered.T @ centered)  # eigenvalues ascending
    axes = eigenvectors[:, ::-1][:, :num_components].T  # (k, D)
    signs = np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])
    axes = axes * np.where(signs == 0, 1.0, signs)[:, None]
    return centered @ axes.T, axes


def _minmax(values: np.ndarray) -> np.ndarray:
    """Scale each column of (N, k) to [0, 1]; constant columns become 0."""
    low, high = values.min(axis=0), values.max(axis=0)
    return (values - low) / np.where(high > low, high - low, 1.0)


def patch_border(grid: tuple[int, int]) -> np.ndarray:
    """(h * w,) bool, True for the patches on the edge of an (h, w) grid (row-major)."""
    border = np.ones(grid, dtype=bool)
    border[1:-1, 1:-1] = False
    return border.reshape(-1)


def background_score(features: np.ndarray, border: np.ndarray) -> np.ndarray:
    """First principal component of (N, D) features scaled to [0, 1] and signed so that the image border (the
    `border` rows, usually background) scores higher than the rest: (N,)."""
    score = _minmax(principal_components(features, 1)[0])[:, 0]
    if border.any() and (~border).any() and score[border].mean() < score[~border].mean():
        score = 1.0 - score
    return score


def pca_rgb(features: np.ndarray, foreground: np.ndarray | None = None) -> np.ndarray:
    """(N, D) features -> (N, 3) colours in [0, 1]: the first three principal components, each min-max scaled.

    With a `foreground` mask (N,) the components are those of the foreground rows only, and the rest is black,
    as in the DINO and DINOv2 figures.
    """
    features = np.asarray(features, dtype=np.float64)
    foreground = np.ones(len(features), dtype=bool) if foreground is None else np.asarray(foreground, bool)
    rgb = np.zeros((len(features), 3))
    if foreground.sum() >= 2:
        scores = principal_components(features[foreground], 3)[0]
        rgb[foreground, : scores.shape[1]] = _minmax(scores)
    return rgb


__all__ = [
    "DEPTH_CMAP",
    "DPI",
    "MIN_DISPLAY_HEIGHT",
    "background_score",
    "class_name",
    "PICTURE_SUFFIXES",
    "class_palette",
    "colorize_depth",
    "depth_figure",
    "display_scale",
    "overlay_segmentation",
    "patch_border",
    "pca_rgb",
    "prediction_picture",
    "principal_components",
    "render_example_prediction",
    "render_prediction",
    "save_png",
    "segmentation_figure",
]
