"""Segmentation evaluation (ADE20K protocol): single-scale sliding window, logits resized to the label map, and
the (K, K) confusion matrix summed over processes, turned into mIoU, mean accuracy, overall accuracy and
per-class IoU by the local `evaluate` module `mean_iou`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from ..evaluation.shared import metric_module
from ..evaluation.sliding_window import sliding_window_logits


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
    # A window clipped to a small image is padded to the patch size (UperNet keeps it in its backbone's config).
    backbone = getattr(model.config, "backbone_config", None)
    patch = getattr(model.config, "patch_size", None) or getattr(backbone, "patch_size", 1)
    return sliding_window_logits(
        forward, pixel_values, model.config.num_labels, window, stride or window, size_multiple=patch
    )


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
