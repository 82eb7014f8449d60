"""Semantic segmentation fine-tuning (ADE20K protocol): options, class names, samples, evaluation, `main`.

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
IoU by the local `evaluate` module `mean_iou`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from ..modeling import DenseCLViTForSemanticSegmentation
from .config import save_config
from .data import open_stream, resolve_column
from .dense_transforms import SegmentationAugment, SegmentationAugmentConfig, rescale_within, to_pixel_values
from .engine import (
    build_accelerator,
    resume,
    run_signature,
    setup_errors,
    stream_num_examples,
    total_steps_for,
)
from .finetuning import (
    FINETUNE_CRITICAL_KEYS,
    EvalSource,
    EvaluateConfig,
    FinetuneArgs,
    build_optimizer,
    describe_load,
    load_finetuned,
    load_task_model,
    metric_module,
    open_eval_source,
    train_and_finish,
    train_loader,
)
from .optim import describe_param_groups
from .samples import decode_image, decode_label_map, validate_segmentation
from .sliding_window import sliding_window_logits

TASK = "semantic-segmentation"
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
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


def _opt(default: Any, help_text: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help_text})


def check_scale_bounds(scale_bounds: tuple[int, int]) -> None:
    if min(scale_bounds) < 1 or scale_bounds[0] < scale_bounds[1]:
        raise ValueError(f"--scale-bounds must be (long, short) with long >= short >= 1, got {scale_bounds}")


@dataclasses.dataclass
class FinetuneSegmentationConfig(FinetuneArgs):
    """Fine-tune a DenseCL-ViT encoder for semantic segmentation (linear or UPerNet head), ADE20K protocol.

    Run with `accelerate launch scripts/finetune_segmentation.py --config FILE.yaml [--option value ...]`.
    """

    output_dir: str = _opt("outputs/finetune_segmentation", "folder for checkpoints, logs, final/, results")
    per_device_batch_size: int = _opt(16, "images per process and step")
    weight_decay: float = _opt(
        0.005, "AdamW weight decay (never on biases, norms, position embeddings, [CLS])"
    )
    warmup_fraction: float = _opt(0.01, "linear warm-up over this fraction of the steps")
    layer_decay: float | None = _opt(0.65, "layer-wise lr decay: block i trains at lr * decay^(L+1-i)")
    label_column: str | None = _opt(None, "label-map column; default: annotation")
    id2label: str | None = _opt(
        None,
        'JSON file naming the classes ({"0": "wall", ...} or a list; ids after --reduce-labels); default: '
        "id2label.json beside a local dataset, or the label column's ClassLabel names",
    )
    reduce_labels: bool = _opt(
        True, "ADE20K convention: raw 0 ('other') is ignored, label k >= 1 becomes k - 1"
    )
    ignore_index: int = _opt(255, "label value left out of the loss and the metrics")
    decode_head: Literal["linear", "upernet"] = _opt("linear", "segmentation head")
    scale_bounds: tuple[int, int] = _opt(
        (2048, 512), "(long, short) side bounds the image is rescaled to fit, keeping its aspect ratio"
    )
    scale_range: tuple[float, float] = _opt((0.5, 2.0), "random factor on --scale-bounds during training")
    cat_max_ratio: float = _opt(0.75, "re-draw a crop (up to 10 times) while one class covers more than this")
    photometric: bool = _opt(True, "random brightness, contrast, saturation and hue distortion")
    eval_window: int | None = _opt(None, "sliding-window size at evaluation; default: the crop height")
    eval_stride: int | None = _opt(
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
    import datasets

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


def _decode(example: Mapping[str, Any], columns: tuple[str, str], num_labels: int, reduce: bool, ignore: int):
    """(RGB image, (H, W) int64 label map after reduction), or the reason to skip the example."""
    image, label = decode_image(example[columns[0]]), decode_label_map(example[columns[1]])
    if label is not None and reduce:
        label = reduce_zero_label(label, ignore)
    reason = validate_segmentation(image, label, num_labels, ignore)
    return reason if reason is not None else (image, label)


def segmentation_train_sample(
    example: Mapping[str, Any],
    rng: np.random.Generator,
    columns: tuple[str, str],
    num_labels: int,
    reduce_labels: bool,
    ignore_index: int,
    augment: SegmentationAugment,
) -> dict[str, torch.Tensor] | str:
    """A stream example -> {"pixel_values" (3, h, w), "labels" (h, w) int64} at the crop size, or a skip reason."""
    decoded = _decode(example, columns, num_labels, reduce_labels, ignore_index)
    if isinstance(decoded, str):
        return decoded
    pixel_values, labels = augment(*decoded, rng)
    return {"pixel_values": pixel_values, "labels": labels}


def segmentation_eval_sample(
    example: Mapping[str, Any],
    rng: np.random.Generator,
    columns: tuple[str, str],
    num_labels: int,
    reduce_labels: bool,
    ignore_index: int,
    scale_bounds: tuple[int, int],
) -> dict[str, torch.Tensor] | str:
    """{"pixel_values" (3, h, w) rescaled to fit `scale_bounds`, "labels" (H, W) at the original size}."""
    decoded = _decode(example, columns, num_labels, reduce_labels, ignore_index)
    if isinstance(decoded, str):
        return decoded
    image, label = decoded
    return {
        "pixel_values": to_pixel_values(rescale_within(image, scale_bounds)),
        "labels": torch.from_numpy(label),
    }


# --- evaluation ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SegmentationProtocol:
    """Evaluation settings: sliding window and stride, rescale bounds, label convention."""

    window: int = 512
    stride: int = 341
    scale_bounds: tuple[int, int] = (2048, 512)
    reduce_labels: bool = True
    ignore_index: int = 255

    def to_dict(self) -> dict[str, Any]:
        """The "protocol" object of eval_results.json."""
        return {
            "mode": "slide",
            "crop_size": self.window,
            "stride": self.stride,
            "scales": [1.0],
            "flip": False,
            "scale_bounds": list(self.scale_bounds),
            "reduce_labels": self.reduce_labels,
            "ignore_index": self.ignore_index,
        }


def segmentation_logits(
    model: nn.Module, pixel_values: torch.Tensor, window: int | None = None, stride: int | None = None
) -> torch.Tensor:
    """Logits (B, K, H, W) of normalised images (B, 3, H, W): sliding window when `window` is set, else one
    forward pass over the whole image (H, W multiples of the patch size)."""
    if window is None:
        return model(pixel_values=pixel_values).logits.float()
    forward = lambda crops: model(pixel_values=crops).logits  # noqa: E731
    return sliding_window_logits(forward, pixel_values, model.config.num_labels, window, stride or window)


def confusion_counts(
    predictions: torch.Tensor, labels: torch.Tensor, num_labels: int, ignore_index: int
) -> torch.Tensor:
    """(K, K) int64 pixel counts, row = ground truth, column = prediction, of (B, H, W) maps on their device;
    pixels labelled `ignore_index` are left out (labels are valid: `validate_segmentation` checked them)."""
    valid = labels != ignore_index
    index = labels[valid].long() * num_labels + predictions[valid].long()
    return torch.bincount(index, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


@torch.inference_mode()
def evaluate_segmentation(
    model: nn.Module, loader: Any, accelerator: Accelerator, protocol: SegmentationProtocol
) -> tuple[dict[str, Any], np.ndarray, int]:
    """mIoU & co. of `model` over every process's share of `loader` (batches of one image).

    Returns (the `mean_iou` evaluate module's metrics of the confusion matrix summed over processes, that
    (K, K) matrix, the number of images over all processes).
    """
    model.eval()
    num_labels = model.config.num_labels
    confusion = torch.zeros(num_labels * num_labels + 1, dtype=torch.int64, device=accelerator.device)
    for batch in loader:
        labels = batch["labels"].to(accelerator.device)
        logits = segmentation_logits(
            model, batch["pixel_values"].to(accelerator.device), protocol.window, protocol.stride
        )
        # (B, K, h, w) -> (B, K, H, W) at the label map's size -> class ids (B, H, W)
        predictions = F.interpolate(
            logits, size=labels.shape[-2:], mode="bilinear", align_corners=False
        ).argmax(1)
        confusion[:-1] += confusion_counts(predictions, labels, num_labels, protocol.ignore_index).ravel()
        confusion[-1] += len(labels)
    totals = accelerator.reduce(confusion, reduction="sum").cpu().numpy()
    matrix = totals[:-1].reshape(num_labels, num_labels)
    return metric_module("mean_iou", accelerator).segmentation_metrics(matrix), matrix, int(totals[-1])


def evaluation_report(
    model: nn.Module, source: EvalSource, accelerator: Accelerator, protocol: SegmentationProtocol
) -> dict[str, Any]:
    """Evaluate on `source`; returns the eval_results.json fields (all but "task")."""
    sample = functools.partial(
        segmentation_eval_sample,
        columns=source.columns,
        num_labels=model.config.num_labels,
        reduce_labels=protocol.reduce_labels,
        ignore_index=protocol.ignore_index,
        scale_bounds=protocol.scale_bounds,
    )
    metrics, _, count = evaluate_segmentation(
        model, source.loader(sample, accelerator), accelerator, protocol
    )
    names = {int(k): v for k, v in model.config.id2label.items()}
    return {
        "dataset": source.dataset,
        "metrics": {name: float(metrics[name]) for name in ("mean_iou", "mean_accuracy", "overall_accuracy")},
        "protocol": protocol.to_dict(),
        "num_samples": count,
        "per_category": {
            "labels": [names.get(i, str(i)) for i in range(model.config.num_labels)],
            "iou": metrics["per_category_iou"],
            "accuracy": metrics["per_category_accuracy"],
        },
    }


# --- the run ------------------------------------------------------------------------------------------


def resolve_columns(cfg: Any, features: Any) -> tuple[str, str]:
    """(image column, label column) of a stream."""
    label_column = resolve_column(features, cfg.label_column, "label")
    return resolve_column(features, cfg.image_column, "image", exclude=[label_column]), label_column


def build_model(
    cfg: FinetuneSegmentationConfig, id2label: Mapping[int, str]
) -> tuple[DenseCLViTForSemanticSegmentation, dict[str, Any]]:
    """The segmentation model on the --model start, with `id2label`'s classes, the head and drop path."""
    model, report = load_task_model(
        DenseCLViTForSemanticSegmentation,
        cfg.model,
        cfg.crop_size,
        num_labels=len(id2label),
        id2label=dict(id2label),
        label2id={name: i for i, name in id2label.items()},
        decode_head=cfg.decode_head,
        drop_path_rate=cfg.drop_path_rate,
        semantic_loss_ignore_index=cfg.ignore_index,
    )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, report


def train_sample_fn(cfg: FinetuneSegmentationConfig, columns: tuple[str, str], num_labels: int) -> Any:
    augment = SegmentationAugmentConfig(
        crop_size=cfg.crop_size,
        scale_bounds=cfg.scale_bounds,
        scale_range=cfg.scale_range,
        cat_max_ratio=cfg.cat_max_ratio,
        ignore_index=cfg.ignore_index,
        photometric=cfg.photometric,
    )
    return functools.partial(
        segmentation_train_sample,
        columns=columns,
        num_labels=num_labels,
        reduce_labels=cfg.reduce_labels,
        ignore_index=cfg.ignore_index,
        augment=SegmentationAugment(augment),
    )


def main(cfg: FinetuneSegmentationConfig) -> dict[str, Any]:
    """Fine-tune as `cfg` says; returns the results written to results.json."""
    accelerator = build_accelerator(cfg)
    if accelerator.is_main_process:
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    with setup_errors():
        stream = open_stream(cfg.dataset, cfg.dataset_config, cfg.split, data_files=cfg.data_files)
        columns = resolve_columns(cfg, stream.features)
        id2label = resolve_id2label(cfg, stream.features, columns[1])
        sample = train_sample_fn(cfg, columns, len(id2label))
        loader = train_loader(
            cfg, stream, sample, columns, accelerator.process_index, accelerator.num_processes
        )
        total_steps = total_steps_for(cfg, accelerator.num_processes, stream_num_examples(stream, cfg.split))
        model, load_report = build_model(cfg, id2label)
        accelerator.print(describe_load(cfg.model, load_report))
        model = model.to(accelerator.device)
        optimizer, scheduler = build_optimizer(cfg, model, total_steps)
        accelerator.print(describe_param_groups(optimizer.param_groups))
        evaluate_fn = None
        if cfg.eval_split is not None:
            source = open_eval_source(cfg, cfg.eval_split, resolve_columns, cfg.max_eval_samples)
            protocol = SegmentationProtocol(
                *cfg.eval_window_and_stride(),
                cfg.scale_bounds,
                cfg.reduce_labels,
                cfg.ignore_index,
            )
            evaluate_fn = functools.partial(
                evaluation_report, source=source, accelerator=accelerator, protocol=protocol
            )
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        signature = run_signature(cfg, accelerator)
        state = resume(accelerator, cfg, signature, SEG_CRITICAL_KEYS, loader)
    return train_and_finish(
        accelerator,
        cfg,
        model,
        optimizer,
        scheduler,
        loader,
        state,
        total_steps,
        signature,
        evaluate_fn,
        TASK,
    )


def evaluate_folder(cfg: EvaluateConfig, accelerator: Accelerator) -> dict[str, Any]:
    """Evaluate a fine-tuned segmentation folder as `cfg` says (window: the model's image size, stride 2/3 of
    it by default); returns the eval_results.json fields."""
    model = load_finetuned(DenseCLViTForSemanticSegmentation, cfg.model).to(accelerator.device)
    window = cfg.window or model.config.image_size
    protocol = SegmentationProtocol(
        window,
        cfg.stride or default_stride(window),
        cfg.scale_bounds,
        cfg.reduce_labels,
        model.config.semantic_loss_ignore_index if cfg.ignore_index is None else cfg.ignore_index,
    )
    source = open_eval_source(cfg, cfg.split, resolve_columns, cfg.max_samples)
    return evaluation_report(model, source, accelerator, protocol)
