"""Semantic segmentation fine-tuning (ADE20K protocol): options, class names, samples, the evaluation report,
the task for `finetuning.run_finetuning`, and `main`.

Data: any `datasets` dataset with an image column and a label-map column (`annotation` by default, as ADE20K on
the Hub). With `--reduce-labels` (default) raw label 0 ("other") is ignored and classes k >= 1 become k - 1.
Class names come from `--id2label` (a JSON file: {"0": "wall", ...} or a list, ids after reduction; a bare
file name is also looked up in `training/recipes/`), else from an `id2label.json` beside a local dataset, else
from a `ClassLabel` label column.

Training samples (`dense_transforms.SegmentationAugment`): keep-ratio rescale to fit `--scale-bounds` (mmseg's
img_scale) times a random factor in `--scale-range`, a `--crop-size` crop in which one class covers at most
`--cat-max-ratio` (10 tries), flip, photometric distortion. Evaluation: rescale to fit `--scale-bounds`,
single-scale sliding window (`--eval-window`, `--eval-stride`), logits resized to the label map; the (K, K)
confusion matrix is summed over processes and turned into mIoU, mean accuracy, overall accuracy and per-class
IoU by the local `evaluate` module `mean_iou` (the loop: `segmentation_eval`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from torch import nn

from ...modeling import DenseCLViTForSemanticSegmentation
from ..data.decoding import decode_image, decode_label_map, validate_segmentation
from ..data.transforms.dense import (
    SegmentationAugment,
    SegmentationAugmentConfig,
    rescale_within,
    to_pixel_values,
)
from ..engine.config import option
from ..evaluation.shared import EvalSource, EvaluateConfig, check_scale_bounds, eval_counts, open_eval_source
from .finetuning import (
    FINETUNE_CRITICAL_KEYS,
    FinetuneArgs,
    FinetuneTask,
    PairedSample,
    image_and_target_columns,
    run_finetuning,
)
from .model_start import load_finetuned
from .segmentation_eval import SegmentationProtocol, evaluate_segmentation

TASK = "semantic-segmentation"
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
SEG_CRITICAL_KEYS = (
    *FINETUNE_CRITICAL_KEYS,
    "label_column",
    "id2label",
    "reduce_labels",
    "ignore_index",
    "decode_head",
    "scale_bounds",
    "scale_range",
    "cat_max_ratio",
    "photometric",
)


@dataclasses.dataclass
class FinetuneSegmentationConfig(FinetuneArgs):
    """Fine-tune a DenseCL-ViT encoder for semantic segmentation (linear or UPerNet head), ADE20K protocol.

    Run with `accelerate launch scripts/finetune_segmentation.py --config FILE.yaml [--option value ...]`.
    """

    output_dir: str = option("outputs/finetune_segmentation", "folder for checkpoints, logs, final/, results")
    per_device_batch_size: int = option(16, "images per process and step")
    weight_decay: float = option(
        0.005, "AdamW weight decay (never on biases, norms, position embeddings, [CLS])"
    )
    warmup_fraction: float = option(0.01, "linear warm-up over this fraction of the steps")
    layer_decay: float | None = option(0.65, "layer-wise lr decay: block i trains at lr * decay^(L+1-i)")
    label_column: str | None = option(None, "label-map column; default: annotation")
    id2label: str | None = option(
        None,
        'JSON file naming the classes ({"0": "wall", ...} or a list; ids after --reduce-labels); default: '
        "id2label.json beside a local dataset, or the label column's ClassLabel names",
    )
    reduce_labels: bool = option(
        True, "ADE20K convention: raw 0 ('other') is ignored, label k >= 1 becomes k - 1"
    )
    ignore_index: int = option(255, "label value left out of the loss and the metrics")
    decode_head: Literal["linear", "upernet"] = option("linear", "segmentation head")
    scale_bounds: tuple[int, int] = option(
        (2048, 512), "(long, short) side bounds the image is rescaled to fit, keeping its aspect ratio"
    )
    scale_range: tuple[float, float] = option((0.5, 2.0), "random factor on --scale-bounds during training")
    cat_max_ratio: float = option(
        0.75, "re-draw a crop (up to 10 times) while one class covers more than this"
    )
    photometric: bool = option(True, "random brightness, contrast, saturation and hue distortion")
    eval_window: int | None = option(None, "sliding-window size at evaluation; default: the crop height")
    eval_stride: int | None = option(
        None, "sliding-window stride at evaluation; default: 2/3 of the window (341)"
    )

    def validate(self) -> None:
        super().validate()
        if self.id2label is not None:
            read_id2label(self.id2label)
        if self.ignore_index < 0:
            raise ValueError(f"--ignore-index must be >= 0, got {self.ignore_index}")
        check_scale_bounds(self.scale_bounds)
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"--scale-range must satisfy 0 < low <= high, got {self.scale_range}")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"--cat-max-ratio must be in (0, 1], got {self.cat_max_ratio}")
        window, stride = self.eval_window_and_stride()
        if window % self.patch_size() or not 0 < stride <= window:
            raise ValueError(
                f"--eval-window {window} must be a multiple of the patch size {self.patch_size()} and "
                f"--eval-stride {stride} in [1, window]"
            )

    def eval_window_and_stride(self) -> tuple[int, int]:
        window = self.eval_window or self.crop_size[0]
        return window, self.eval_stride or default_stride(window)


def default_stride(window: int) -> int:
    """2/3 of the window, rounded (mmseg's 512 / 341)."""
    return max(1, min(window, round(window * 2 / 3)))


# --- class names --------------------------------------------------------------------------------------


def read_id2label(path: str) -> dict[int, str]:
    """{id: name} from a JSON file ({"0": "wall", ...} or ["wall", ...]); ids must be 0..K-1, K >= 2.

    A bare file name that does not exist is looked up in the shipped `training/recipes/` folder.
    """
    file = Path(path)
    if not file.is_file() and str(path) == file.name and (RECIPES_DIR / file.name).is_file():
        file = RECIPES_DIR / file.name
    if not file.is_file():
        raise ValueError(f'--id2label file {path} not found; pass a JSON file such as {{"0": "wall", ...}}')
    try:
        data = json.loads(file.read_text())
        data = dict(enumerate(data)) if isinstance(data, list) else data
        id2label = {int(k): str(v) for k, v in data.items()}
    except (ValueError, AttributeError, TypeError):
        raise ValueError(
            f'--id2label {path} must hold a JSON object {{"0": "name", ...}} or a list'
        ) from None
    if sorted(id2label) != list(range(len(id2label))) or len(id2label) < 2:
        raise ValueError(f"--id2label {path} must number at least 2 classes 0..K-1 without gaps")
    return id2label


def _dataset_folders(dataset: str) -> list[Path]:
    """Local folders where a dataset's id2label.json may sit: the folder itself, or those above its files."""
    path = Path(dataset.split("*")[0]).expanduser()
    if path.is_dir():
        return [path]
    return [path.parent, path.parent.parent] if path.parent.is_dir() else []


def resolve_id2label(cfg: FinetuneSegmentationConfig, features: Any, label_column: str) -> dict[int, str]:
    """The class names: --id2label, else id2label.json beside a local dataset, else ClassLabel names."""
    import datasets  # seconds to import: only a run without --id2label reads the dataset's ClassLabel

    if cfg.id2label is not None:
        return read_id2label(cfg.id2label)
    for folder in _dataset_folders(cfg.dataset):
        if (folder / "id2label.json").is_file():
            return read_id2label(str(folder / "id2label.json"))
    feature = (features or {}).get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return dict(enumerate(feature.names[1:] if cfg.reduce_labels else feature.names))
    raise ValueError(
        "the dataset does not name its classes; pass --id2label FILE.json with the class names "
        '({"0": "wall", ...}, ids after --reduce-labels; ade20k_id2label.json for ADE20K)'
    )


# --- samples ------------------------------------------------------------------------------------------


def reduce_zero_label(label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """ADE20K convention on an (H, W) map: 0 -> ignore_index, ignore_index stays, k -> k - 1. The metric module
    `mean_iou` defines the same function; it is repeated here so that training does not import `evaluate`."""
    return np.where((label == 0) | (label == ignore_index), ignore_index, label - 1)


@dataclasses.dataclass(frozen=True)
class SegmentationDecoder:
    """A stream example -> (RGB image, (H, W) int64 label map after reduction), or the reason to skip it."""

    columns: tuple[str, str]
    num_labels: int
    reduce_labels: bool = True
    ignore_index: int = 255

    def __call__(self, example: Mapping[str, Any]) -> tuple[PIL.Image.Image, np.ndarray] | str:
        image, label = decode_image(example[self.columns[0]]), decode_label_map(example[self.columns[1]])
        if label is not None and self.reduce_labels:
            label = reduce_zero_label(label, self.ignore_index)
        reason = validate_segmentation(image, label, self.num_labels, self.ignore_index)
        return reason if reason is not None else (image, label)


def _rescaled(
    image: PIL.Image.Image, label: np.ndarray, rng: Any, scale_bounds: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values (3, h, w) rescaled to fit `scale_bounds`, labels (H, W) at the original size)."""
    return to_pixel_values(rescale_within(image, scale_bounds)), torch.from_numpy(label)


def train_sample_fn(
    cfg: FinetuneSegmentationConfig, columns: tuple[str, str], num_labels: int
) -> PairedSample:
    """Stream example -> {"pixel_values" (3, h, w), "labels" (h, w) int64} at the crop size, or a skip reason."""
    augment = SegmentationAugmentConfig(
        crop_size=cfg.crop_size,
        scale_bounds=cfg.scale_bounds,
        scale_range=cfg.scale_range,
        cat_max_ratio=cfg.cat_max_ratio,
        ignore_index=cfg.ignore_index,
        photometric=cfg.photometric,
    )
    decode = SegmentationDecoder(columns, num_labels, cfg.reduce_labels, cfg.ignore_index)
    return PairedSample(decode, SegmentationAugment(augment))


def eval_sample_fn(
    columns: tuple[str, str],
    num_labels: int,
    reduce_labels: bool = True,
    ignore_index: int = 255,
    scale_bounds: tuple[int, int] = (2048, 512),
) -> PairedSample:
    """Stream example -> {"pixel_values" (3, h, w) rescaled to fit `scale_bounds`, "labels" (H, W) at the
    original size}, or a skip reason."""
    decode = SegmentationDecoder(columns, num_labels, reduce_labels, ignore_index)
    return PairedSample(decode, functools.partial(_rescaled, scale_bounds=scale_bounds))


# --- evaluation ---------------------------------------------------------------------------------------


def evaluation_report(
    model: nn.Module, source: EvalSource, accelerator: Accelerator, protocol: SegmentationProtocol
) -> dict[str, Any]:
    """Evaluate on `source`; returns the eval_results.json fields (all but "task")."""
    sample = eval_sample_fn(
        source.columns,
        model.config.num_labels,
        protocol.reduce_labels,
        protocol.ignore_index,
        protocol.scale_bounds,
    )
    loader = source.loader(sample, accelerator)
    metrics, _, _ = evaluate_segmentation(
        model, source.progress_bar(loader, accelerator), accelerator, protocol
    )
    names = {int(k): v for k, v in model.config.id2label.items()}
    return {
        "dataset": source.dataset,
        "metrics": {name: float(metrics[name]) for name in ("mean_iou", "mean_accuracy", "overall_accuracy")},
        "protocol": protocol.to_dict(),
        **eval_counts(loader, accelerator),
        "per_category": {
            "labels": [names.get(i, str(i)) for i in range(model.config.num_labels)],
            "iou": metrics["per_category_iou"],
            "accuracy": metrics["per_category_accuracy"],
        },
    }


# --- the run ------------------------------------------------------------------------------------------


def resolve_columns(cfg: Any, features: Any) -> tuple[str, str]:
    """(image column, label column) of a stream."""
    return image_and_target_columns(features, cfg.image_column, cfg.label_column, "label")


class SegmentationTask(FinetuneTask):
    """Semantic segmentation for `run_finetuning`: classes and head from the options, evaluation by
    `evaluation_report` with the run's sliding window."""

    name = TASK
    model_class = DenseCLViTForSemanticSegmentation
    critical_keys = SEG_CRITICAL_KEYS
    resolve_columns = staticmethod(resolve_columns)
    cfg: FinetuneSegmentationConfig

    def prepare(self, features: Any, columns: tuple[str, str]) -> tuple[PairedSample, dict[str, Any]]:
        """The training sample function and the model's config overrides: the classes and the head."""
        cfg = self.cfg
        id2label = resolve_id2label(cfg, features, columns[1])
        overrides = {
            "num_labels": len(id2label),
            "id2label": dict(id2label),
            "label2id": {name: i for i, name in id2label.items()},
            "decode_head": cfg.decode_head,
            "semantic_loss_ignore_index": cfg.ignore_index,
        }
        return train_sample_fn(cfg, columns, len(id2label)), overrides

    def evaluate(self, model: nn.Module, source: EvalSource, accelerator: Accelerator) -> dict[str, Any]:
        cfg = self.cfg
        protocol = SegmentationProtocol(
            *cfg.eval_window_and_stride(), cfg.scale_bounds, cfg.reduce_labels, cfg.ignore_index
        )
        return evaluation_report(model, source, accelerator, protocol)


def main(cfg: FinetuneSegmentationConfig) -> dict[str, Any]:
    """Fine-tune as `cfg` says; returns the results written to results.json."""
    return run_finetuning(SegmentationTask(cfg))


# ADE20K: the window is the model's image size (its fine-tuning crop, 512), the stride 2/3 of it.
ADE20K_SETTINGS = {
    "window": None,
    "stride": None,
    "scale_bounds": (2048, 512),
    "reduce_labels": True,
    "ignore_index": None,
}


def training_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation settings a segmentation fine-tuning run used, from its saved config."""
    if "decode_head" not in config or "crop_size" not in config:
        raise ValueError(
            "the config beside --model is no segmentation fine-tuning config; use --protocol ade20k"
        )
    window = config.get("eval_window") or int(config["crop_size"][0])
    return {
        "window": window,
        "stride": config.get("eval_stride") or default_stride(window),
        "scale_bounds": tuple(config.get("scale_bounds") or ADE20K_SETTINGS["scale_bounds"]),
        "reduce_labels": bool(config.get("reduce_labels", True)),
        "ignore_index": config.get("ignore_index"),
    }


def folder_protocol(cfg: EvaluateConfig, model: nn.Module) -> SegmentationProtocol:
    """The protocol `cfg` names (see `EvaluateConfig.protocol_settings`), completed with the model's defaults."""
    settings = cfg.protocol_settings(ADE20K_SETTINGS, training_settings)
    if cfg.window is not None and cfg.stride is None:
        settings["stride"] = None  # a new window takes its own default stride, not the protocol's
    window = settings["window"] or model.config.image_size
    ignore_index = settings["ignore_index"]
    return SegmentationProtocol(
        window,
        settings["stride"] or default_stride(window),
        tuple(settings["scale_bounds"]),
        settings["reduce_labels"],
        model.config.semantic_loss_ignore_index if ignore_index is None else ignore_index,
    )


def evaluate_folder(cfg: EvaluateConfig, accelerator: Accelerator) -> dict[str, Any]:
    """Evaluate a fine-tuned segmentation folder with the protocol `cfg` names; returns the eval_results.json
    fields (the protocol's name is the caller's to add)."""
    model = load_finetuned(DenseCLViTForSemanticSegmentation, cfg.model).to(accelerator.device)
    protocol = folder_protocol(cfg, model)
    if protocol.stride > protocol.window:
        raise ValueError(
            f"stride {protocol.stride} must not exceed the window {protocol.window}; set --stride"
        )
    source = open_eval_source(cfg, cfg.split, resolve_columns, cfg.max_samples, progress=cfg.progress)
    return evaluation_report(model, source, accelerator, protocol)
