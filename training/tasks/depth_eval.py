"""Depth evaluation (NYU-Depth V2 protocol): the whole image in, the prediction resized back to the ground
truth and clipped to [min_depth, max_depth]; AbsRel, SqRel, RMSE, RMSE log, log10 and delta1-3 over
min_depth < gt < max_depth, inside the Eigen crop when asked, per image and averaged over the images of all
processes by the local `evaluate` module `depth_metrics`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from ..evaluation.shared import metric_module


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
