"""Monocular depth metrics (Eigen et al. 2014 protocol), as a local `evaluate` module.

Load it with `evaluate.load("<path to this folder>")`; it needs nothing from the Hub. The file imports only
numpy, datasets and evaluate because `evaluate.load` copies it, alone, into its module cache. The pure-numpy
functions below are also what `densecl_vit.training.evaluation.metrics.DepthMetricAccumulator` uses.

Protocol (NYU-Depth V2, as in BTS / AdaBins / GLPDepth): a pixel counts when min_depth < gt < max_depth and,
with `eigen_crop`, it lies inside the Eigen crop. Predictions are clipped to [min_depth, max_depth] (NaN ->
min_depth). Every metric is computed per image and then averaged over images; an image without a valid pixel
is skipped and counted in `num_skipped`.

Eigen crop: rows 45:471 and columns 41:601 of a 480x640 image. For another size (H, W) the bounds are scaled
proportionally and rounded to the nearest integer (halves up): top = round(45 H / 480), bottom = round(471 H /
480), left = round(41 W / 640), right = round(601 W / 640); at 480x640 this is exactly the standard crop.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Standard monocular depth metrics over valid pixels (min_depth < gt < max_depth, inside the Eigen crop): AbsRel,
SqRel, RMSE, RMSE log, log10 and the threshold accuracies delta < 1.25, 1.25^2, 1.25^3, each computed per image
and averaged over images.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2D float arrays): predicted depth maps in metres, each (H, W).
    references (`list` of 2D float arrays): ground-truth depth maps in metres, same sizes; invalid pixels 0.
    min_depth (`float`, defaults to 1e-3): pixels with gt <= min_depth are invalid; predictions clipped to it.
    max_depth (`float`, defaults to 10.0): pixels with gt >= max_depth are invalid; predictions clipped to it.
    eigen_crop (`bool`, defaults to `True`): keep only pixels inside the Eigen crop (scaled to the image size).

Returns:
    abs_rel, sq_rel, rmse, rmse_log, log10, delta1, delta2, delta3 (`float`): means over evaluated images.
    num_images (`int`): images evaluated.
    num_skipped (`int`): images left out because no pixel was valid.

Examples:
    >>> metric = evaluate.load("training/evaluation/metrics/depth_metrics")
    >>> results = metric.compute(predictions=[pred], references=[depth], max_depth=10.0)
"""

_CITATION = """
@inproceedings{eigen2014depth,
    title={Depth Map Prediction from a Single Image using a Multi-Scale Deep Network},
    author={Eigen, David and Puhrsch, Christian and Fergus, Rob},
    booktitle={Advances in Neural Information Processing Systems},
    year={2014}
}
"""

DEPTH_METRIC_NAMES = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3")

# Eigen crop of a 480x640 NYU-Depth V2 image: rows 45:471, columns 41:601.
_EIGEN_REFERENCE_SIZE = (480, 640)
_EIGEN_ROWS = (45, 471)
_EIGEN_COLS = (41, 601)


def _scale_bound(bound: int, size: int, reference: int) -> int:
    """round(bound * size / reference), halves up, in exact integer arithmetic."""
    return (2 * bound * size + reference) // (2 * reference)


def eigen_crop_bounds(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the Eigen crop for an image (height, width); end bounds are exclusive."""
    ref_h, ref_w = _EIGEN_REFERENCE_SIZE
    return (
        _scale_bound(_EIGEN_ROWS[0], height, ref_h),
        _scale_bound(_EIGEN_ROWS[1], height, ref_h),
        _scale_bound(_EIGEN_COLS[0], width, ref_w),
        _scale_bound(_EIGEN_COLS[1], width, ref_w),
    )


def valid_depth_mask(depth: np.ndarray, min_depth: float, max_depth: float, eigen_crop: bool) -> np.ndarray:
    """Boolean (H, W) mask of the pixels that count: min_depth < depth < max_depth, inside the crop if asked."""
    depth = np.asarray(depth)
    mask = (depth > min_depth) & (depth < max_depth)
    if eigen_crop:
        top, bottom, left, right = eigen_crop_bounds(*depth.shape)
        crop = np.zeros_like(mask)
        crop[top:bottom, left:right] = True
        mask &= crop
    return mask


def depth_errors(
    prediction: np.ndarray,
    depth: np.ndarray,
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
    eigen_crop: bool = True,
) -> dict[str, float] | None:
    """The eight depth metrics of one image, or None when it has no valid pixel.

    Args:
        prediction: predicted depth (H, W) in metres.
        depth: ground-truth depth (H, W) in metres.
        min_depth, max_depth: open interval of valid ground truth; predictions are clipped to it.
        eigen_crop: keep only pixels inside the Eigen crop.
    """
    if not 0 < min_depth < max_depth:
        raise ValueError(f"need 0 < min_depth < max_depth, got min_depth={min_depth}, max_depth={max_depth}")
    prediction = np.asarray(prediction, dtype=np.float64)
    depth = np.asarray(depth, dtype=np.float64)
    if prediction.shape != depth.shape or depth.ndim != 2:
        raise ValueError(
            f"prediction {prediction.shape} and ground truth {depth.shape} must be 2D maps of the same size; "
            "resize the prediction to the ground truth first"
        )
    mask = valid_depth_mask(depth, min_depth, max_depth, eigen_crop)
    if not mask.any():
        return None
    gt = depth[mask]
    pred = np.clip(np.nan_to_num(prediction[mask], nan=min_depth), min_depth, max_depth)
    ratio = np.maximum(gt / pred, pred / gt)
    return {
        "abs_rel": float(np.mean(np.abs(gt - pred) / gt)),
        "sq_rel": float(np.mean((gt - pred) ** 2 / gt)),
        "rmse": float(np.sqrt(np.mean((gt - pred) ** 2))),
        "rmse_log": float(np.sqrt(np.mean((np.log(gt) - np.log(pred)) ** 2))),
        "log10": float(np.mean(np.abs(np.log10(gt) - np.log10(pred)))),
        "delta1": float(np.mean(ratio < 1.25)),
        "delta2": float(np.mean(ratio < 1.25**2)),
        "delta3": float(np.mean(ratio < 1.25**3)),
    }


def average_depth_errors(per_image: list) -> dict:
    """Average per-image metric dicts (from `depth_errors`; None entries are skipped images) over images."""
    kept = [errors for errors in per_image if errors is not None]
    if not kept:
        raise ValueError(
            "no image has a valid ground-truth pixel; check the depth units (metres) and min_depth/max_depth"
        )
    results = {name: float(np.mean([errors[name] for errors in kept])) for name in DEPTH_METRIC_NAMES}
    results["num_images"] = len(kept)
    results["num_skipped"] = len(per_image) - len(kept)
    return results


class DepthMetrics(evaluate.Metric):
    """Per-image-averaged monocular depth metrics (AbsRel, SqRel, RMSE, RMSE log, log10, delta thresholds)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                }
            ),
            reference_urls=["https://arxiv.org/abs/1406.2283"],
        )

    def _compute(
        self,
        predictions: list,
        references: list,
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
        eigen_crop: bool = True,
    ) -> dict:
        per_image = [
            depth_errors(prediction, depth, min_depth, max_depth, eigen_crop)
            for prediction, depth in zip(predictions, references)
        ]
        return average_depth_errors(per_image)
