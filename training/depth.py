"""Monocular depth fine-tuning (NYU-Depth V2 protocol): options, samples, evaluation, `main`.

Data: any `datasets` dataset with an image column and a depth column (`depth_map` by default, as NYU-Depth V2 on
the Hub): float arrays in metres, or integer images such as 16-bit PNGs scaled to metres by `--depth-scale`.
Pixels that are 0, non-finite or outside (min_depth, max_depth) are invalid: masked in the loss and the metrics.

Training samples (`dense_transforms.DepthAugment`): random crop and horizontal flip of image and depth together,
colour jitter on the image. Evaluation: the whole image (resized to `--eval-size`, or to the nearest multiple of
the patch size), the prediction resized back to the ground truth and clipped to [min_depth, max_depth]; AbsRel,
SqRel, RMSE, RMSE log, log10 and delta1-3 over min_depth < gt < max_depth (1e-3 and 10 m for NYU), inside the
Eigen crop when asked, per image and averaged over the images of all processes by the local `evaluate` module
`depth_metrics`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from ..modeling import DenseCLViTForDepthEstimation
from .config import save_config
from .data import open_stream, resolve_column
from .dense_transforms import DepthAugment, DepthAugmentConfig, to_pixel_values
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
from .samples import decode_depth, decode_image, validate_depth

TASK = "depth-estimation"
DEPTH_METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3")
DEPTH_CRITICAL_KEYS = (
    *FINETUNE_CRITICAL_KEYS,
    "depth_column",
    "depth_scale",
    "min_depth",
    "max_depth",
    "depth_head",
    "color_jitter",
)


def _opt(default: Any, help_text: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass
class FinetuneDepthConfig(FinetuneArgs):
    """Fine-tune a DenseCL-ViT encoder for monocular depth (linear up-projection or UPerNet head), NYU protocol.

    Run with `accelerate launch scripts/finetune_depth.py --config FILE.yaml [--option value ...]`.
    """

    output_dir: str = _opt("outputs/finetune_depth", "folder for checkpoints, logs, final/ and results")
    per_device_batch_size: int = _opt(8, "images per process and step")
    optimizer: Literal["adamw", "adam"] = _opt("adam", "Adam (the paper's) or AdamW")
    weight_decay: float = _opt(0.0, "weight decay (an L2 penalty with Adam)")
    warmup_fraction: float = _opt(0.0, "linear warm-up over this fraction of the steps")
    poly_power: float = _opt(0.9, "exponent of the poly decay")
    crop_size: tuple[int, int] = _opt(
        (416, 544), "training crop (height, width); multiples of the patch size"
    )
    depth_column: str | None = _opt(None, "depth column; default: depth_map")
    depth_scale: float = _opt(1.0, "metres per raw depth unit (1e-3 for 16-bit PNGs in millimetres)")
    min_depth: float = _opt(1e-3, "smallest valid depth in metres (ground truth at or below is invalid)")
    max_depth: float = _opt(10.0, "largest valid depth in metres; the head's output range")
    depth_head: Literal["linear", "upernet"] = _opt("linear", "depth head")
    color_jitter: bool = _opt(True, "random gamma, brightness and colour on the image")
    eigen_crop: bool | None = _opt(
        None, "evaluate inside the Eigen crop; default: on when --dataset names NYU"
    )
    eval_size: tuple[int, int] | None = _opt(
        None, "resize evaluation images to (height, width); default: the nearest multiple of the patch size"
    )

    def validate(self) -> None:
        super().validate()
        if self.depth_scale <= 0:
            raise ValueError(f"--depth-scale must be > 0, got {self.depth_scale}")
        if not 0 < self.min_depth < self.max_depth:
            raise ValueError(f"need 0 < --min-depth < --max-depth, got {self.min_depth} and {self.max_depth}")
        patch_size = self.patch_size()
        if self.eval_size is not None and any(side < 1 or side % patch_size for side in self.eval_size):
            raise ValueError(
                f"--eval-size {self.eval_size} must hold positive multiples of the patch size {patch_size}"
            )


def auto_eigen_crop(eigen_crop: bool | None, dataset: str) -> bool:
    """An explicit choice, else on for NYU-Depth V2 (a dataset name containing "nyu")."""
    return eigen_crop if eigen_crop is not None else "nyu" in str(dataset).lower()


# --- samples ------------------------------------------------------------------------------------------


def _decode(
    example: Mapping[str, Any], columns: tuple[str, str], scale: float, min_depth: float, max_depth: float
):
    """(RGB image, (H, W) float32 depth in metres), or the reason to skip the example."""
    image, depth = decode_image(example[columns[0]]), decode_depth(example[columns[1]], scale)
    reason = validate_depth(image, depth, min_depth, max_depth)
    return reason if reason is not None else (image, depth)


def depth_train_sample(
    example: Mapping[str, Any],
    rng: np.random.Generator,
    columns: tuple[str, str],
    depth_scale: float,
    min_depth: float,
    max_depth: float,
    augment: DepthAugment,
) -> dict[str, torch.Tensor] | str:
    """A stream example -> {"pixel_values" (3, h, w), "labels" (h, w) metres, 0 = invalid}, or a skip reason."""
    decoded = _decode(example, columns, depth_scale, min_depth, max_depth)
    if isinstance(decoded, str):
        return decoded
    pixel_values, depth = augment(*decoded, rng)
    return {"pixel_values": pixel_values, "labels": depth}


def eval_input_size(
    height: int, width: int, patch_size: int, eval_size: tuple[int, int] | None = None
) -> tuple[int, int]:
    """`eval_size`, else (height, width) rounded to the nearest multiples of the patch size (at least one patch)."""
    if eval_size is not None:
        return int(eval_size[0]), int(eval_size[1])
    return max(patch_size, round(height / patch_size) * patch_size), max(
        patch_size, round(width / patch_size) * patch_size
    )


def depth_eval_sample(
    example: Mapping[str, Any],
    rng: np.random.Generator,
    columns: tuple[str, str],
    depth_scale: float,
    min_depth: float,
    max_depth: float,
    patch_size: int,
    eval_size: tuple[int, int] | None,
) -> dict[str, torch.Tensor] | str:
    """{"pixel_values" (3, h, w) at the model's input size, "labels" (H, W) ground truth in metres}."""
    decoded = _decode(example, columns, depth_scale, min_depth, max_depth)
    if isinstance(decoded, str):
        return decoded
    image, depth = decoded
    height, width = eval_input_size(image.height, image.width, patch_size, eval_size)
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), PIL.Image.BICUBIC)
    return {"pixel_values": to_pixel_values(image), "labels": torch.from_numpy(depth)}


# --- evaluation ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DepthProtocol:
    """Evaluation settings: valid ground-truth range (predictions are clipped to it), Eigen crop, input size."""

    min_depth: float = 1e-3
    max_depth: float = 10.0
    eigen_crop: bool = True
    eval_size: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The "protocol" object of eval_results.json."""
        return {
            "min_depth": self.min_depth,
            "max_depth": self.max_depth,
            "eigen_crop": self.eigen_crop,
            "eval_size": list(self.eval_size) if self.eval_size else "image size rounded to the patch size",
            "clip_predictions": True,
            "averaging": "per image",
            "flip": False,
        }


def predict_depth(
    model: nn.Module, pixel_values: torch.Tensor, size: tuple[int, int], min_depth: float, max_depth: float
) -> torch.Tensor:
    """Depth (B, H, W) in metres for images (B, 3, h, w): resized bilinearly to `size` = (H, W), clipped."""
    depth = model(pixel_values=pixel_values).predicted_depth.float()
    if tuple(depth.shape[-2:]) != tuple(size):
        depth = F.interpolate(depth[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return depth.clamp(min_depth, max_depth)


@torch.inference_mode()
def evaluate_depth(
    model: nn.Module, loader: Any, accelerator: Accelerator, protocol: DepthProtocol
) -> dict[str, float]:
    """The `depth_metrics` evaluate module's per-image metrics of `model` over every process's share of
    `loader`, averaged over all images: the eight metrics, num_images, num_skipped (no valid pixel)."""
    model.eval()
    module = metric_module("depth_metrics", accelerator)
    per_image = []
    for batch in loader:
        labels = batch["labels"].numpy()
        predictions = predict_depth(
            model,
            batch["pixel_values"].to(accelerator.device),
            labels.shape[-2:],
            protocol.min_depth,
            protocol.max_depth,
        )
        for prediction, depth in zip(predictions.cpu().numpy(), labels):
            per_image.append(
                module.depth_errors(
                    prediction, depth, protocol.min_depth, protocol.max_depth, protocol.eigen_crop
                )
            )
    if accelerator.num_processes > 1:
        per_image = gather_object(per_image)
    return module.average_depth_errors(per_image)


def evaluation_report(
    model: nn.Module,
    source: EvalSource,
    accelerator: Accelerator,
    protocol: DepthProtocol,
    depth_scale: float = 1.0,
) -> dict[str, Any]:
    """Evaluate on `source`; returns the eval_results.json fields (all but "task")."""
    sample = functools.partial(
        depth_eval_sample,
        columns=source.columns,
        depth_scale=depth_scale,
        min_depth=protocol.min_depth,
        max_depth=protocol.max_depth,
        patch_size=model.config.patch_size,
        eval_size=protocol.eval_size,
    )
    results = evaluate_depth(model, source.loader(sample, accelerator), accelerator, protocol)
    return {
        "dataset": source.dataset,
        "metrics": {name: float(results[name]) for name in DEPTH_METRICS},
        "protocol": {
            **protocol.to_dict(),
            "depth_scale": depth_scale,
            "num_skipped": int(results["num_skipped"]),
        },
        "num_samples": int(results["num_images"]),
    }


# --- the run ------------------------------------------------------------------------------------------


def resolve_columns(cfg: Any, features: Any) -> tuple[str, str]:
    """(image column, depth column) of a stream."""
    depth_column = resolve_column(features, cfg.depth_column, "depth")
    return resolve_column(features, cfg.image_column, "image", exclude=[depth_column]), depth_column


def build_model(cfg: FinetuneDepthConfig) -> tuple[DenseCLViTForDepthEstimation, dict[str, Any]]:
    """The depth model on the --model start, with the head, depth range and drop path."""
    model, report = load_task_model(
        DenseCLViTForDepthEstimation,
        cfg.model,
        cfg.crop_size,
        depth_head=cfg.depth_head,
        min_depth=cfg.min_depth,
        max_depth=cfg.max_depth,
        drop_path_rate=cfg.drop_path_rate,
    )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, report


def train_sample_fn(cfg: FinetuneDepthConfig, columns: tuple[str, str]) -> Any:
    return functools.partial(
        depth_train_sample,
        columns=columns,
        depth_scale=cfg.depth_scale,
        min_depth=cfg.min_depth,
        max_depth=cfg.max_depth,
        augment=DepthAugment(
            DepthAugmentConfig(
                crop_size=cfg.crop_size,
                color_jitter=cfg.color_jitter,
                min_depth=cfg.min_depth,
                max_depth=cfg.max_depth,
            )
        ),
    )


def main(cfg: FinetuneDepthConfig) -> dict[str, Any]:
    """Fine-tune as `cfg` says; returns the results written to results.json."""
    accelerator = build_accelerator(cfg)
    if accelerator.is_main_process:
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    with setup_errors():
        stream = open_stream(cfg.dataset, cfg.dataset_config, cfg.split, data_files=cfg.data_files)
        columns = resolve_columns(cfg, stream.features)
        sample = train_sample_fn(cfg, columns)
        loader = train_loader(
            cfg, stream, sample, columns, accelerator.process_index, accelerator.num_processes
        )
        total_steps = total_steps_for(cfg, accelerator.num_processes, stream_num_examples(stream, cfg.split))
        model, load_report = build_model(cfg)
        accelerator.print(describe_load(cfg.model, load_report))
        model = model.to(accelerator.device)
        optimizer, scheduler = build_optimizer(cfg, model, total_steps)
        accelerator.print(describe_param_groups(optimizer.param_groups))
        evaluate_fn = None
        if cfg.eval_split is not None:
            source = open_eval_source(cfg, cfg.eval_split, resolve_columns, cfg.max_eval_samples)
            protocol = DepthProtocol(
                cfg.min_depth, cfg.max_depth, auto_eigen_crop(cfg.eigen_crop, cfg.dataset), cfg.eval_size
            )
            evaluate_fn = functools.partial(
                evaluation_report,
                source=source,
                accelerator=accelerator,
                protocol=protocol,
                depth_scale=cfg.depth_scale,
            )
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        signature = run_signature(cfg, accelerator)
        state = resume(accelerator, cfg, signature, DEPTH_CRITICAL_KEYS, loader)
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
    """Evaluate a fine-tuned depth folder as `cfg` says (depth range: the model's); returns the
    eval_results.json fields."""
    model = load_finetuned(DenseCLViTForDepthEstimation, cfg.model).to(accelerator.device)
    patch_size = model.config.patch_size
    if cfg.eval_size is not None and any(side % patch_size for side in cfg.eval_size):
        raise ValueError(
            f"--eval-size {cfg.eval_size} must hold multiples of the model's patch size {patch_size}"
        )
    protocol = DepthProtocol(
        model.config.min_depth,
        model.config.max_depth,
        auto_eigen_crop(cfg.eigen_crop, cfg.dataset),
        cfg.eval_size,
    )
    source = open_eval_source(cfg, cfg.split, resolve_columns, cfg.max_samples)
    return evaluation_report(model, source, accelerator, protocol, cfg.depth_scale)
