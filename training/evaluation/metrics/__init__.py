"""Evaluation metrics: local `evaluate` modules shipped in this folder, and streaming accumulators.

`load_metric("mean_iou")` and `load_metric("depth_metrics")` return `evaluate` modules that load from this
folder, offline. `evaluate` keeps every added prediction until `compute`; for large evaluation sets the
accumulators below keep only a (C, C) confusion matrix or eight numbers per image, and they use the very
functions the modules use.
"""

from pathlib import Path

import evaluate
import numpy as np

from .depth_metrics.depth_metrics import average_depth_errors, depth_errors, eigen_crop_bounds
from .mean_iou.mean_iou import confusion_matrix, segmentation_metrics

METRICS_DIR = Path(__file__).resolve().parent
AVAILABLE_METRICS = ("mean_iou", "depth_metrics")


def metric_path(name: str) -> str:
    """Absolute path of the local `evaluate` module folder `name` (one of AVAILABLE_METRICS)."""
    if name not in AVAILABLE_METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(AVAILABLE_METRICS)}")
    return str(METRICS_DIR / name)


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` on the local module folder `name`; kwargs go to `evaluate.load` (e.g. keep_in_memory)."""
    return evaluate.load(metric_path(name), **kwargs)


def _to_numpy(array) -> np.ndarray:
    """NumPy array from a NumPy array or a torch tensor (any device; half precision is widened to float32)."""
    if hasattr(array, "detach"):
        array = array.detach()
        array = (array.float() if array.is_floating_point() else array).cpu().numpy()
    return np.asarray(array)


def _as_batch(array, name: str) -> np.ndarray:
    """(H, W) or (B, H, W) -> (B, H, W)."""
    array = _to_numpy(array)
    if array.ndim == 2:
        return array[None]
    if array.ndim != 3:
        raise ValueError(f"{name} must be (H, W) or (B, H, W), got shape {array.shape}")
    return array


class SegmentationMetricAccumulator:
    """Streaming mIoU: sums a (C, C) confusion matrix over `update` calls, then `compute`s the metrics.

    The results equal those of `load_metric("mean_iou")` on the same maps. Across processes, sum
    `confusion` (an int64 (C, C) array, row = ground truth, column = prediction) before `compute`.
    """

    def __init__(self, num_labels: int, ignore_index: int = 255, reduce_labels: bool = False) -> None:
        if num_labels < 1:
            raise ValueError(f"num_labels must be a positive integer, got {num_labels}")
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.reduce_labels = reduce_labels
        self.confusion = np.zeros((num_labels, num_labels), dtype=np.int64)

    def update(self, predictions, labels) -> None:
        """Add predicted label maps and ground-truth maps, each (H, W) or (B, H, W), arrays or tensors."""
        predictions = _as_batch(predictions, "predictions")
        labels = _as_batch(labels, "labels")
        if len(predictions) != len(labels):
            raise ValueError(
                f"got {len(predictions)} predictions for {len(labels)} labels; pass one per image"
            )
        for prediction, label in zip(predictions, labels):
            self.confusion += confusion_matrix(
                prediction, label, self.num_labels, self.ignore_index, self.reduce_labels
            )

    def compute(self) -> dict:
        """mean_iou, mean_accuracy, overall_accuracy, per_category_iou (C,), per_category_accuracy (C,)."""
        return segmentation_metrics(self.confusion)

    def reset(self) -> None:
        self.confusion[:] = 0


class DepthMetricAccumulator:
    """Streaming depth metrics: keeps the eight per-image numbers of each `update`d image, then averages.

    The results equal those of `load_metric("depth_metrics")` on the same maps.
    """

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 10.0, eigen_crop: bool = True) -> None:
        if not 0 < min_depth < max_depth:
            raise ValueError(
                f"need 0 < min_depth < max_depth, got min_depth={min_depth}, max_depth={max_depth}"
            )
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.eigen_crop = eigen_crop
        self.per_image: list = []

    def update(self, predictions, depths) -> None:
        """Add predicted and ground-truth depth maps in metres, each (H, W) or (B, H, W), arrays or tensors."""
        predictions = _as_batch(predictions, "predictions")
        depths = _as_batch(depths, "depths")
        if len(predictions) != len(depths):
            raise ValueError(
                f"got {len(predictions)} predictions for {len(depths)} depth maps; pass one per image"
            )
        for prediction, depth in zip(predictions, depths):
            self.per_image.append(
                depth_errors(prediction, depth, self.min_depth, self.max_depth, self.eigen_crop)
            )

    def compute(self) -> dict:
        """abs_rel, sq_rel, rmse, rmse_log, log10, delta1..3 averaged over images; num_images, num_skipped."""
        return average_depth_errors(self.per_image)

    def reset(self) -> None:
        self.per_image.clear()


__all__ = [
    "AVAILABLE_METRICS",
    "DepthMetricAccumulator",
    "SegmentationMetricAccumulator",
    "average_depth_errors",
    "confusion_matrix",
    "depth_errors",
    "eigen_crop_bounds",
    "load_metric",
    "metric_path",
    "segmentation_metrics",
]
