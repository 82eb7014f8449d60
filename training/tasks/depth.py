"""Monocular depth fine-tuning (NYU-Depth V2 protocol): options, samples, the evaluation report, the task for
`finetuning.run_finetuning`, and `main`.

Data: any `datasets` dataset with an image column and a depth column (`depth_map` by default, as NYU-Depth V2 on
the Hub): float arrays in metres, or integer images such as 16-bit PNGs scaled to metres by `--depth-scale`.
Pixels that are 0, non-finite or outside (min_depth, max_depth) are invalid: masked in the loss and the metrics.

Training samples (`dense_transforms.DepthAugment`): random crop and horizontal flip of image and depth together,
colour jitter on the image. Evaluation: the whole image (resized to `--eval-size`, or to the nearest multiple of
the patch size), the prediction resized back to the ground truth and clipped to [min_depth, max_depth]; AbsRel,
SqRel, RMSE, RMSE log, log10 and delta1-3 over min_depth < gt < max_depth (1e-3 and 10 m for NYU), inside the
Eigen crop when asked, per image and averaged over the images of all processes by the local `evaluate` module
`depth_metrics` (the loop: `depth_eval`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from torch import nn

from ...modeling import DenseCLViTForDepthEstimation
from ..data.decoding import decode_depth, decode_image, validate_depth
from ..data.transforms.dense import DepthAugment, DepthAugmentConfig, to_pixel_values
from ..engine.config import option
from ..evaluation.shared import EvalSource, EvaluateConfig, eval_counts, open_eval_source
from .depth_eval import DepthProtocol, evaluate_depth
from .finetuning import (
    FINETUNE_CRITICAL_KEYS,
    FinetuneArgs,
    FinetuneTask,
    PairedSample,
    image_and_target_columns,
    run_finetuning,
)
from .model_start import load_finetuned

TASK = "depth-estimation"
NO_VALID_PIXEL_IN_CROP = "no_valid_pixel_in_crop"
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


@dataclasses.dataclass
class FinetuneDepthConfig(FinetuneArgs):
    """Fine-tune a DenseCL-ViT encoder for monocular depth (linear up-projection, UPerNet or DPT head), NYU protocol.

    Run with `accelerate launch scripts/finetune_depth.py --config FILE.yaml [--option value ...]`.
    """

    output_dir: str = option("outputs/finetune_depth", "folder for checkpoints, logs, final/ and results")
    per_device_batch_size: int = option(8, "images per process and step")
    optimizer: Literal["adamw", "adam"] = option("adam", "Adam (the paper's) or AdamW")
    weight_decay: float = option(0.0, "weight decay (an L2 penalty with Adam)")
    warmup_fraction: float = option(0.0, "linear warm-up over this fraction of the steps")
    poly_power: float = option(0.9, "exponent of the poly decay")
    crop_size: tuple[int, int] = option(
        (416, 544), "training crop (height, width); multiples of the patch size"
    )
    depth_column: str | None = option(None, "depth column; default: depth_map")
    depth_scale: float = option(1.0, "metres per raw depth unit (1e-3 for 16-bit PNGs in millimetres)")
    min_depth: float = option(1e-3, "smallest valid depth in metres (ground truth at or below is invalid)")
    max_depth: float = option(10.0, "largest valid depth in metres; the head's output range")
    depth_head: Literal["linear", "upernet", "dpt"] = option(
        "linear", "depth head; dpt releases as transformers' DepthAnythingForDepthEstimation"
    )
    color_jitter: bool = option(True, "random gamma, brightness and colour on the image")
    eigen_crop: bool | None = option(
        None, "evaluate inside the Eigen crop; default: on when --dataset names NYU"
    )
    eval_size: tuple[int, int] | None = option(
        None, "resize evaluation images to (height, width); default: the nearest multiple of the patch size"
    )

    def validate(self) -> None:
        super().validate()
        if self.depth_scale <= 0:
            raise ValueError(f"--depth-scale must be > 0, got {self.depth_scale}")
        if not 0 < self.min_depth < self.max_depth:
            raise ValueError(f"need 0 < --min-depth < --max-depth, got {self.min_depth} and {self.max_depth}")
        check_eval_size(self.eval_size, self.patch_size())


def check_eval_size(eval_size: tuple[int, int] | None, patch_size: int) -> None:
    """Refuse an --eval-size that is not (height, width) in positive multiples of the model's patch size."""
    if eval_size is not None and any(side < 1 or side % patch_size for side in eval_size):
        raise ValueError(
            f"--eval-size {eval_size} must hold positive multiples of the model's patch size {patch_size}"
        )


def auto_eigen_crop(eigen_crop: bool | None, dataset: str) -> bool:
    """An explicit choice, else on for NYU-Depth V2 (a dataset name containing "nyu")."""
    return eigen_crop if eigen_crop is not None else "nyu" in str(dataset).lower()


# --- samples ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DepthDecoder:
    """A stream example -> (RGB image, (H, W) float32 depth in metres), or the reason to skip it."""

    columns: tuple[str, str]
    depth_scale: float = 1.0
    min_depth: float = 1e-3
    max_depth: float = 10.0

    def __call__(self, example: Mapping[str, Any]) -> tuple[PIL.Image.Image, np.ndarray] | str:
        image = decode_image(example[self.columns[0]])
        depth = decode_depth(example[self.columns[1]], self.depth_scale)
        reason = validate_depth(image, depth, self.min_depth, self.max_depth)
        return reason if reason is not None else (image, depth)


def eval_input_size(
    height: int, width: int, patch_size: int, eval_size: tuple[int, int] | None = None
) -> tuple[int, int]:
    """`eval_size`, else (height, width) rounded to the nearest multiples of the patch size (at least one patch)."""
    if eval_size is not None:
        return int(eval_size[0]), int(eval_size[1])
    return max(patch_size, round(height / patch_size) * patch_size), max(
        patch_size, round(width / patch_size) * patch_size
    )


def _resized(
    image: PIL.Image.Image, depth: np.ndarray, rng: Any, patch_size: int, eval_size: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values (3, h, w) at the model's input size, labels (H, W): the ground truth in metres)."""
    height, width = eval_input_size(image.height, image.width, patch_size, eval_size)
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), PIL.Image.BICUBIC)
    return to_pixel_values(image), torch.from_numpy(depth)


def train_sample_fn(cfg: FinetuneDepthConfig, columns: tuple[str, str]) -> PairedSample:
    """Stream example -> {"pixel_values" (3, h, w), "labels" (h, w) metres, 0 = invalid}, or a skip reason."""
    augment = DepthAugmentConfig(
        crop_size=cfg.crop_size,
        color_jitter=cfg.color_jitter,
        min_depth=cfg.min_depth,
        max_depth=cfg.max_depth,
    )
    decode = DepthDecoder(columns, cfg.depth_scale, cfg.min_depth, cfg.max_depth)
    return PairedSample(decode, DepthAugment(augment))


def eval_sample_fn(
    columns: tuple[str, str],
    depth_scale: float,
    min_depth: float,
    max_depth: float,
    patch_size: int,
    eval_size: tuple[int, int] | None = None,
) -> PairedSample:
    """Stream example -> {"pixel_values" (3, h, w) at the model's input size, "labels" (H, W) ground truth in
    metres}, or a skip reason."""
    decode = DepthDecoder(columns, depth_scale, min_depth, max_depth)
    return PairedSample(decode, functools.partial(_resized, patch_size=patch_size, eval_size=eval_size))


# --- evaluation ---------------------------------------------------------------------------------------


def evaluation_report(
    model: nn.Module,
    source: EvalSource,
    accelerator: Accelerator,
    protocol: DepthProtocol,
    depth_scale: float = 1.0,
) -> dict[str, Any]:
    """Evaluate on `source`; returns the eval_results.json fields (all but "task")."""
    sample = eval_sample_fn(
        source.columns,
        depth_scale,
        protocol.min_depth,
        protocol.max_depth,
        model.config.patch_size,
        protocol.eval_size,
    )
    loader = source.loader(sample, accelerator)
    results = evaluate_depth(model, source.progress_bar(loader, accelerator), accelerator, protocol)
    # Rows that decoded but keep no valid pixel inside the crop reach the metric and are left out there.
    dropped = {NO_VALID_PIXEL_IN_CROP: int(results["num_skipped"])}
    return {
        "dataset": source.dataset,
        "metrics": {name: float(results[name]) for name in DEPTH_METRICS},
        "protocol": {**protocol.to_dict(), "depth_scale": depth_scale},
        **eval_counts(loader, accelerator, dropped),
    }


# --- the run ------------------------------------------------------------------------------------------


def resolve_columns(cfg: Any, features: Any) -> tuple[str, str]:
    """(image column, depth column) of a stream."""
    return image_and_target_columns(features, cfg.image_column, cfg.depth_column, "depth")


class DepthTask(FinetuneTask):
    """Monocular depth for `run_finetuning`: head and depth range from the options, evaluation by
    `evaluation_report` with the run's depth range, Eigen crop and evaluation size."""

    name = TASK
    model_class = DenseCLViTForDepthEstimation
    critical_keys = DEPTH_CRITICAL_KEYS
    resolve_columns = staticmethod(resolve_columns)
    cfg: FinetuneDepthConfig

    def prepare(self, features: Any, columns: tuple[str, str]) -> tuple[PairedSample, dict[str, Any]]:
        """The training sample function and the model's config overrides: the head and the depth range."""
        cfg = self.cfg
        overrides = {"depth_head": cfg.depth_head, "min_depth": cfg.min_depth, "max_depth": cfg.max_depth}
        return train_sample_fn(cfg, columns), overrides

    def evaluate(self, model: nn.Module, source: EvalSource, accelerator: Accelerator) -> dict[str, Any]:
        cfg = self.cfg
        protocol = DepthProtocol(
            cfg.min_depth, cfg.max_depth, auto_eigen_crop(cfg.eigen_crop, cfg.dataset), cfg.eval_size
        )
        return evaluation_report(model, source, accelerator, protocol, cfg.depth_scale)


def main(cfg: FinetuneDepthConfig) -> dict[str, Any]:
    """Fine-tune as `cfg` says; returns the results written to results.json."""
    return run_finetuning(DepthTask(cfg))


# NYU-Depth V2: Eigen crop (None: on when --dataset names NYU), whole images, depth in metres.
NYU_SETTINGS = {"eigen_crop": None, "eval_size": None, "depth_scale": 1.0}


def training_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation settings a depth fine-tuning run used, from its saved config."""
    if "depth_head" not in config:
        raise ValueError("the config beside --model is no depth fine-tuning config; use --protocol nyu")
    eval_size = config.get("eval_size")
    return {
        "eigen_crop": auto_eigen_crop(config.get("eigen_crop"), config.get("dataset", "")),
        "eval_size": tuple(eval_size) if eval_size else None,
        "depth_scale": float(config.get("depth_scale", 1.0)),
    }


def evaluate_folder(cfg: EvaluateConfig, accelerator: Accelerator) -> dict[str, Any]:
    """Evaluate a fine-tuned depth folder with the protocol `cfg` names (depth range: the model's); returns the
    eval_results.json fields (the protocol's name is the caller's to add)."""
    model = load_finetuned(DenseCLViTForDepthEstimation, cfg.model).to(accelerator.device)
    settings = cfg.protocol_settings(NYU_SETTINGS, training_settings)
    check_eval_size(settings["eval_size"], model.config.patch_size)
    eigen_crop = settings["eigen_crop"]
    if cfg.protocol == "nyu" and eigen_crop is None:
        eigen_crop = True  # named explicitly: the NYU protocol, whatever the dataset is called
    protocol = DepthProtocol(
        model.config.min_depth,
        model.config.max_depth,
        auto_eigen_crop(eigen_crop, cfg.dataset),
        settings["eval_size"],
    )
    source = open_eval_source(cfg, cfg.split, resolve_columns, cfg.max_samples, progress=cfg.progress)
    return evaluation_report(model, source, accelerator, protocol, settings["depth_scale"])
