"""Mean Intersection-over-Union for semantic segmentation, as a local `evaluate` module.

Load it with `evaluate.load("<path to this folder>")`; it needs nothing from the Hub. The file imports only
numpy, datasets and evaluate because `evaluate.load` copies it, alone, into its module cache. The pure-numpy
functions below are also what `densecl_vit.training.evaluation.metrics.SegmentationMetricAccumulator` uses, so the
evaluate module and the streaming accumulator share one implementation.

The definitions follow mmsegmentation (and the Hub's `mean_iou`): areas are summed over the whole dataset
before dividing; a class whose union is empty has IoU NaN and a class without ground-truth pixels has
accuracy NaN, and NaNs are left out of the means.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Mean Intersection-over-Union (mIoU) over a dataset of segmentation maps. Per class, the intersection, union,
predicted area and ground-truth area are summed over every image (a confusion matrix); IoU and accuracy are
computed from the totals and averaged over the classes that occur, as in mmsegmentation.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2D integer arrays): predicted label maps, each (H, W); sizes may differ per image.
    references (`list` of 2D integer arrays): ground-truth label maps, each the size of its prediction.
    num_labels (`int`): number of classes C; valid labels are 0 .. C-1.
    ignore_index (`int`, defaults to 255): ground-truth value whose pixels are left out.
    reduce_labels (`bool`, defaults to `False`): ADE20K convention for the ground truth: 0 ("other") becomes
        `ignore_index` and every other label moves down by one.
    nan_to_num (`float`, *optional*): replaces NaN in every result (the per-class values of absent classes),
        after the means, which leave NaN out either way.
    label_map (`dict[int, int]`, *optional*): maps old ground-truth ids to new ones before anything else, each
        looked up in the original map (so {1: 2, 2: 1} swaps two classes).

Returns:
    mean_iou (`float`): IoU averaged over classes with a non-empty union.
    mean_accuracy (`float`): per-class accuracy averaged over classes present in the ground truth.
    overall_accuracy (`float`): correctly labelled pixels / labelled pixels.
    per_category_iou (`ndarray` (C,)): IoU per class, NaN where the class is absent from both maps.
    per_category_accuracy (`ndarray` (C,)): accuracy per class, NaN where the class has no ground truth.

Examples:
    >>> metric = evaluate.load("training/evaluation/metrics/mean_iou")
    >>> results = metric.compute(predictions=[pred], references=[label], num_labels=150, reduce_labels=True)
"""

_CITATION = """
@misc{mmseg2020,
    title={{MMSegmentation}: OpenMMLab Semantic Segmentation Toolbox and Benchmark},
    author={MMSegmentation Contributors},
    howpublished={https://github.com/open-mmlab/mmsegmentation},
    year={2020}
}
"""


def apply_label_map(label: np.ndarray, label_map: dict) -> np.ndarray:
    """Ground truth (H, W) with every `old` id replaced by `label_map[old]`, looked up in the original map."""
    label = np.asarray(label).astype(np.int64)
    mapped = label.copy()
    for old_id, new_id in label_map.items():
        # Keys may come back from JSON as strings.
        mapped[label == int(old_id)] = int(new_id)
    return mapped


def reduce_zero_label(label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Apply the ADE20K convention to a ground-truth map (H, W): 0 -> ignore_index, ignore_index stays, k -> k - 1."""
    label = np.asarray(label).astype(np.int64)
    return np.where((label == 0) | (label == ignore_index), ignore_index, label - 1)


def confusion_matrix(
    prediction: np.ndarray,
    label: np.ndarray,
    num_labels: int,
    ignore_index: int = 255,
    reduce_labels: bool = False,
    label_map: dict | None = None,
) -> np.ndarray:
    """Count pixels per (ground-truth class, predicted class) pair for one image.

    Args:
        prediction: predicted label map (H, W), values in [0, num_labels).
        label: ground-truth label map (H, W), values in [0, num_labels) or `ignore_index` (after reduction).
        num_labels: number of classes C.
        ignore_index: ground-truth value whose pixels are not counted.
        reduce_labels: apply `reduce_zero_label` to the ground truth first.
        label_map: old -> new ground-truth ids, applied before `reduce_labels` (as the Hub's `mean_iou` does).

    Returns:
        (C, C) int64 matrix; row = ground-truth class, column = predicted class.
    """
    prediction = np.asarray(prediction)
    label = apply_label_map(label, label_map) if label_map else np.asarray(label).astype(np.int64)
    label = reduce_zero_label(label, ignore_index) if reduce_labels else label
    if prediction.shape != label.shape:
        raise ValueError(
            f"prediction shape {prediction.shape} differs from label shape {label.shape}; "
            "resize the prediction to the label's size first"
        )
    valid = label != ignore_index
    label = label[valid]
    prediction = prediction[valid].astype(np.int64)
    for name, values in (("label", label), ("prediction", prediction)):
        if values.size and (values.min() < 0 or values.max() >= num_labels):
            raise ValueError(
                f"{name} values must lie in [0, {num_labels}) (or equal ignore_index={ignore_index} for labels), "
                f"found {values.min()}..{values.max()}; check num_labels, ignore_index and reduce_labels"
            )
    counts = np.bincount(label * num_labels + prediction, minlength=num_labels * num_labels)
    return counts.reshape(num_labels, num_labels)


def _nanmean(values: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN (without a warning) when there are none."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


def segmentation_metrics(confusion: np.ndarray) -> dict:
    """mIoU, mean accuracy, overall accuracy and per-class IoU/accuracy from a (C, C) confusion matrix.

    Per class c: intersection = confusion[c, c], label area = row sum, predicted area = column sum,
    union = label area + predicted area - intersection.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    intersection = np.diag(confusion)
    area_label = confusion.sum(axis=1)
    area_prediction = confusion.sum(axis=0)
    union = area_label + area_prediction - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersection / union
        accuracy = intersection / area_label
        overall_accuracy = intersection.sum() / area_label.sum()
    return {
        "mean_iou": _nanmean(iou),
        "mean_accuracy": _nanmean(accuracy),
        "overall_accuracy": float(overall_accuracy),
        "per_category_iou": iou,
        "per_category_accuracy": accuracy,
    }


class MeanIoU(evaluate.Metric):
    """Dataset-level mIoU (mmsegmentation definition) over 2D integer label maps."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
                }
            ),
            reference_urls=["https://github.com/open-mmlab/mmsegmentation"],
        )

    def _compute(
        self,
        predictions: list,
        references: list,
        num_labels: int | None = None,
        ignore_index: int = 255,
        reduce_labels: bool = False,
        nan_to_num: float | None = None,
        label_map: dict | None = None,
    ) -> dict:
        if num_labels is None or num_labels < 1:
            raise ValueError(
                f"num_labels must be a positive integer, got {num_labels}; pass num_labels=<classes>"
            )
        confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
        for prediction, label in zip(predictions, references):
            confusion += confusion_matrix(
                prediction, label, num_labels, ignore_index, reduce_labels, label_map
            )
        results = segmentation_metrics(confusion)
        if nan_to_num is None:
            return results
        return {
            key: np.nan_to_num(value, nan=nan_to_num)
            if isinstance(value, np.ndarray)
            else float(np.nan_to_num(value, nan=nan_to_num))
            for key, value in results.items()
        }
