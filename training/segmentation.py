"""Semantic segmentation fine-tuning (ADE20K protocol): options, samples, model, evaluation, `main`.

Data: any `datasets` dataset with an image column and a label-map column (`annotation` by default, as ADE20K on
the Hub). With `--reduce-labels` (default) raw label 0 ("other") is ignored and classes k >= 1 become k - 1.
Class names come from `--id2label` (a JSON file: {"0": "wall", ...} or a list, ids after reduction; a bare
file name is also looked up in `training/recipes/`), else from an `id2label.json` beside a local dataset, else
from a `ClassLabel` label column.

Training samples: the image is rescaled to fit `--scale-bounds` (mmseg's img_scale), by a random factor in
`--scale-range`, cropped to `--crop-size` (retrying so that one class covers at most `--cat-max-ratio`),
flipped and photometrically distorted (`dense_transforms`). Evaluation: rescaled to fit `--scale-bounds`,
single-scale sliding window (`--eval-window`, `--eval-stride`), logits resized to the label map, mIoU from a
confusion matrix summed over processes and computed by the local `evaluate` module `mean_iou`.
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
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from ..modeling import DenseCLViTForSemanticSegmentation
from .config import save_config
from .data import open_stream, resolve_column
from .dense_transforms import SegmentationAugment, SegmentationAugmentConfig
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
    EvaluateConfig,
    FinetuneArgs,
    build_optimizer,
    dataset_entry,
    describe_load,
    eval_loader,
    load_finetuned,
    load_task_model,
    metric_module,
    open_eval_stream,
    train_and_finish,
    train_loader,
)
from .metrics import confusion_matrix, reduce_zero_label
from .optim import describe_param_groups
from .samples import decode_image, decode_label_map, validate_segmentation
from .sliding_window import sliding_window_logits
from .transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, to_float_batch

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


@dataclasses.dataclass
class FinetuneSegmentationConfig(FinetuneArgs):
    """Fine-tune a DenseCL-ViT encoder for semantic segmentation (linear or UPerNet head), ADE20K protocol.

    Run with `accelerate launch scripts/finetune_segmentation.py --config FILE.yaml [--option value ...]`.
    """

    output_dir: str = _opt(
        "outputs/finetune_segmentation", "folder for checkpoints, logs, final/ and results"
    )
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
    eval_stride: int = _opt(341, "sliding-window stride at evaluation")

    def validate(self) -> None:
        super().validate()
        if self.crop_size[0] != self.crop_size[1] and self.eval_window is None:
            raise ValueError("a non-square --crop-size needs an explicit --eval-window")
        if self.id2label is not None:
            read_id2label(self.id2label)
        if not 0 <= self.ignore_index:
            raise ValueError(f"--ignore-index must be >= 0, got {self.ignore_index}")
        if min(self.scale_bounds) < 1 or self.scale_bounds[0] < self.scale_bounds[1]:
            raise ValueError(
                f"--scale-bounds must be (long, short) with long >= short >= 1, got {self.scale_bounds}"
            )
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"--scale-range must satisfy 0 < low <= high, got {self.scale_range}")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"--cat-max-ratio must be in (0, 1], got {self.cat_max_ratio}")
        window = self.eval_window or self.crop_size[0]
        if window % self.patch_size() or not 0 < self.eval_stride <= window:
            raise ValueError(
                f"--eval-window {window} must be a multiple of the patch size and --eval-stride "
                f"{self.eval_stride} in [1, window]"
            )


# --- class names --------------------------------------------------------------------------------------


def read_id2label(path: str) -> dict[int, str]:
    """{id: name} from a JSON file ({"0": "wall", ...} or ["wall", ...]); ids must be 0..K-1, K >= 2.

    A bare file name that does not exist is looked up in the shipped `training/recipes/` folder.
    """
    file = Path(path)
    if not file.is_file() and (RECIPES_DIR / file.name).is_file() and file.name == str(path):
        file = RECIPES_DIR / file.name
    if not file.is_file():
        raise ValueError(f'--id2label file {path} not found; pass a JSON file such as {{"0": "wall", ...}}')
    try:
        data = json.loads(file.read_text())
        if isinstance(data, list):
            data = dict(enumerate(data))
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
        names = feature.names[1:] if cfg.reduce_labels else feature.names
        return dict(enumerate(names))
    raise ValueError(
        "the dataset does not name its classes; pass --id2label FILE.json with the class names "
        '({"0": "wall", ...}, ids after --reduce-labels; training/recipes/ade20k_id2label.json for ADE20K)'
    )


# --- samples ------------------------------------------------------------------------------------------


def _decode(
    example: Mapping[str, Any],
    image_column: str,
    label_column: str,
    num_labels: int,
    reduce_labels: bool,
    ignore_index: int,
) -> tuple[PIL.Image.Image, np.ndarray] | str:
    """Decoded RGB image and (H, W) label map after reduction, or the reason to skip the example."""
    image = decode_image(example[image_column])
    label = decode_label_map(example[label_column])
    if label is not None and reduce_labels:
        label = reduce_zero_label(label, ignore_index)
    reason = validate_segmentation(image, label, num_labels, ignore_index)
    return reason if reason is not None else (image, label)


def segmentation_train_sample(
    example: Mapping[str, Any],
    rng: np.random.Generator,
    image_column: str,
    label_column: str,
    num_labels: int,
    reduce_labels: bool,
    ignore_index: int,
    augment: SegmentationAugment,
) -> dict[str, torch.Tensor] | str:
    """A stream example -> {"pixel_values" (3, h, w), "labels" (h, w) int64} at the crop size, or a skip reason."""
    decoded = _decode(example, image_column, label_column, num_labels, reduce_labels, ignore_index)
    if isinstance(decoded, str):
        return decoded
    pixel_values, labels = augment(*decoded, rng)
    return {"pixel_values": pixel_values, "labels": labels}


def rescale_within(image: PIL.Image.Image, bounds: tuple[int, int]) -> PIL.Image.Image:
    """Resize keeping the aspect ratio so that long side <= bounds[0] and short side <= bounds[1], one of them
    equal (mmseg's keep-ratio Resize, bilinear)."""
    width, height = image.size
    scale = min(bounds[0] / max(width, height), bounds[1] / min(width, height))
    size = (max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5)))
    return image if size == image.size else image.resize(size, PIL.Image.BILINEAR)


def to_pixel_values(image: PIL.Image.Image) -> torch.Tensor:
    """RGB image -> ImageNet-normalised float32 (3, H, W)."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return normalize(to_float_batch(array[None]), IMAGENET_MEAN, IMAGENET_STD)[0]


def segmentation_eval_sample(
    example: Mapping[str, Any],
    rng: np.random.Generator,
    image_column: str,
    label_column: str,
    num_labels: int,
    reduce_labels: bool,
    ignore_index: int,
    scale_bounds: tuple[int, int],
) -> dict[str, torch.Tensor] | str:
    """{"pixel_values" (3, h, w) rescaled to fit `scale_bounds`, "labels" (H, W) at the original size}."""
    decoded = _decode(example, image_column, label_column, num_labels, reduce_labels, ignore_index)
    if isinstance(decoded, str):
        return decoded
    image, label = decoded
    return {
        "pixel_values": to_pixel_values(rescale_within(image, scale_bounds)),
        "labels": torch.from_numpy(label),
    }


# --- evaluation ---------------------------------------------------------------------------------------


def segmentation_logits(
    model: nn.Module, pixel_values: torch.Tensor, window: int | None = None, stride: int | None = None
) -> torch.Tensor:
    """Logits (B, K, H, W) of normalised images (B, 3, H, W): sliding window when `window` is set, else one
    forward pass over the whole image (H, W multiples of the patch size)."""
    if window is None:
        return model(pixel_values=pixel_values).logits.float()
    return sliding_window_logits(
        lambda crops: model(pixel_values=crops).logits,
        pixel_values,
        model.config.num_labels,
        window,
        stride or window,
    )


@torch.inference_mode()
def evaluate_segmentation(
    model: nn.Module,
    loader: Any,
    accelerator: Accelerator,
    window: int | None,
    stride: int | None,
    ignore_index: int = 255,
    metrics_module: Any = None,
) -> tuple[dict[str, Any], np.ndarray, int]:
    """mIoU & co. of `model` over every process's share of `loader` (batches of one image).

    Returns (metrics from the `mean_iou` evaluate module's functions, summed (K, K) confusion matrix, images).
    """
    model.eval()
    num_labels = model.config.num_labels
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    count = 0
    for batch in loader:
        pixel_values = batch["pixel_values"].to(accelerator.device)
        labels = batch["labels"].numpy()
        logits = segmentation_logits(model, pixel_values, window, stride)
        # (B, K, h, w) -> (B, K, H, W) at the label map's size, then class ids.
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        predictions = logits.argmax(1).cpu().numpy()
        for prediction, label in zip(predictions, labels):
            confusion += confusion_matrix(prediction, label, num_labels, ignore_index)
            count += 1
    packed = torch.from_numpy(np.append(confusion.ravel(), count)).to(accelerator.device)
    packed = accelerator.reduce(packed, reduction="sum").cpu().numpy()
    confusion, count = packed[:-1].reshape(num_labels, num_labels), int(packed[-1])
    module = metrics_module or metric_module("mean_iou", accelerator)
    return module.segmentation_metrics(confusion), confusion, count


def segmentation_report(
    metrics: Mapping[str, Any], id2label: Mapping[int, str]
) -> tuple[dict[str, float], dict[str, Any]]:
    """(the card's scalar metrics, per-category lists with the class names)."""
    scalars = {name: float(metrics[name]) for name in ("mean_iou", "mean_accuracy", "overall_accuracy")}
    per_category = {
        "labels": [id2label[i] for i in range(len(id2label))],
        "iou": metrics["per_category_iou"],
        "accuracy": metrics["per_category_accuracy"],
    }
    return scalars, per_category


def eval_protocol(
    window: int, stride: int, scale_bounds: tuple[int, int], reduce_labels: bool, ignore_index: int
) -> dict:
    return {
        "mode": "slide",
        "crop_size": window,
        "stride": stride,
        "scale_bounds": list(scale_bounds),
        "scales": [1.0],
        "flip": False,
        "reduce_labels": reduce_labels,
        "ignore_index": ignore_index,
    }


# --- the run ------------------------------------------------------------------------------------------


def resolve_columns(cfg: Any, features: Any) -> tuple[str, str]:
    """(image column, label column) of a stream."""
    label_column = resolve_column(features, cfg.label_column, "label")
    image_column = resolve_column(features, cfg.image_column, "image", exclude=[label_column])
    return image_column, label_column


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


def augment_config(cfg: FinetuneSegmentationConfig) -> SegmentationAugmentConfig:
    return SegmentationAugmentConfig(
        crop_size=cfg.crop_size,
        scale_bounds=cfg.scale_bounds,
        scale_range=cfg.scale_range,
        cat_max_ratio=cfg.cat_max_ratio,
        ignore_index=cfg.ignore_index,
        photometric=cfg.photometric,
    )


def make_evaluate_fn(
    cfg: FinetuneSegmentationConfig, accelerator: Accelerator, columns: tuple[str, str], id2label: Mapping
) -> Any:
    """`model -> (scalar metrics, eval_results report)` over --eval-split, or None without one."""
    stream = open_eval_stream(cfg)
    if stream is None:
        return None
    sample = functools.partial(
        segmentation_eval_sample,
        image_column=columns[0],
        label_column=columns[1],
        num_labels=len(id2label),
        reduce_labels=cfg.reduce_labels,
        ignore_index=cfg.ignore_index,
        scale_bounds=cfg.scale_bounds,
    )
    module = metric_module("mean_iou", accelerator)
    window = cfg.eval_window or cfg.crop_size[0]
    dataset = dataset_entry(cfg.dataset, cfg.dataset_config, cfg.eval_split, cfg.dataset_name)
    protocol = eval_protocol(window, cfg.eval_stride, cfg.scale_bounds, cfg.reduce_labels, cfg.ignore_index)

    def evaluate_fn(model: nn.Module) -> tuple[dict[str, float], dict[str, Any]]:
        loader = eval_loader(
            stream,
            sample,
            columns,
            accelerator.process_index,
            accelerator.num_processes,
            cfg.num_workers,
            cfg.max_eval_samples,
            cfg.max_bad_fraction,
        )
        metrics, _, count = evaluate_segmentation(
            model, loader, accelerator, window, cfg.eval_stride, cfg.ignore_index, module
        )
        scalars, per_category = segmentation_report(metrics, id2label)
        report = {
            "dataset": dataset,
            "metrics": scalars,
            "protocol": protocol,
            "num_samples": count,
            "per_category": per_category,
        }
        return scalars, report

    return evaluate_fn


def main(cfg: FinetuneSegmentationConfig) -> dict[str, Any]:
    """Fine-tune as `cfg` says; returns the results written to results.json."""
    accelerator = build_accelerator(cfg)
    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        save_config(cfg, output_dir / "config.yaml")
    with setup_errors():
        stream = open_stream(cfg.dataset, cfg.dataset_config, cfg.split, data_files=cfg.data_files)
        columns = resolve_columns(cfg, stream.features)
        id2label = resolve_id2label(cfg, stream.features, columns[1])
        sample = functools.partial(
            segmentation_train_sample,
            image_column=columns[0],
            label_column=columns[1],
            num_labels=len(id2label),
            reduce_labels=cfg.reduce_labels,
            ignore_index=cfg.ignore_index,
            augment=SegmentationAugment(augment_config(cfg)),
        )
        loader = train_loader(
            cfg, stream, sample, columns, accelerator.process_index, accelerator.num_processes
        )
        total_steps = total_steps_for(cfg, accelerator.num_processes, stream_num_examples(stream, cfg.split))
        model, load_report = build_model(cfg, id2label)
        accelerator.print(describe_load(cfg.model, load_report))
        model = model.to(accelerator.device)
        optimizer, scheduler = build_optimizer(cfg, model, total_steps)
        accelerator.print(describe_param_groups(optimizer.param_groups))
        evaluate_fn = make_evaluate_fn(cfg, accelerator, columns, id2label)
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
    """Evaluate a fine-tuned segmentation folder as `cfg` says; returns the eval_results.json fields."""
    model = load_finetuned(DenseCLViTForSemanticSegmentation, cfg.model).to(accelerator.device)
    stream = open_stream(cfg.dataset, cfg.dataset_config, cfg.split, data_files=cfg.data_files)
    columns = resolve_columns(cfg, stream.features)
    ignore_index = model.config.semantic_loss_ignore_index if cfg.ignore_index is None else cfg.ignore_index
    window = cfg.window or model.config.image_size
    stride = cfg.stride or max(1, min(window, round(window * 2 / 3)))
    sample = functools.partial(
        segmentation_eval_sample,
        image_column=columns[0],
        label_column=columns[1],
        num_labels=model.config.num_labels,
        reduce_labels=cfg.reduce_labels,
        ignore_index=ignore_index,
        scale_bounds=cfg.scale_bounds,
    )
    loader = eval_loader(
        stream,
        sample,
        columns,
        accelerator.process_index,
        accelerator.num_processes,
        cfg.num_workers,
        cfg.max_samples,
        cfg.max_bad_fraction,
    )
    metrics, _, count = evaluate_segmentation(model, loader, accelerator, window, stride, ignore_index)
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    scalars, per_category = segmentation_report(metrics, id2label)
    return {
        "dataset": dataset_entry(cfg.dataset, cfg.dataset_config, cfg.split, cfg.dataset_name),
        "metrics": scalars,
        "protocol": eval_protocol(window, stride, cfg.scale_bounds, cfg.reduce_labels, ignore_index),
        "num_samples": count,
        "per_category": per_category,
    }
