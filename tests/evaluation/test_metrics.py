"""Metrics against per-class loop and textbook-formula NumPy references, and offline `evaluate` loading."""

import json
import os
import socket
import subprocess
import sys

import evaluate
import numpy as np
import pytest
import torch

from densecl_vit.training.evaluation.metrics import (
    DepthMetricAccumulator,
    SegmentationMetricAccumulator,
    eigen_crop_bounds,
    load_metric,
    metric_path,
)

IGNORE = 255


# ----------------------------------------------------------------------------------------------- references
def reference_segmentation(predictions, labels, num_labels, reduce_labels):
    """Per-class loops over boolean masks; NaN where a ratio has an empty denominator."""
    inter = np.zeros(num_labels)
    union = np.zeros(num_labels)
    area_label = np.zeros(num_labels)
    for prediction, label in zip(predictions, labels):
        label = label.astype(np.int64)
        if reduce_labels:
            background_or_ignored = (label == 0) | (label == IGNORE)
            label = label - 1
            label[background_or_ignored] = IGNORE
        valid = label != IGNORE
        for c in range(num_labels):
            in_pred = (prediction == c) & valid
            in_label = (label == c) & valid
            inter[c] += np.sum(in_pred & in_label)
            union[c] += np.sum(in_pred | in_label)
            area_label[c] += np.sum(in_label)
    iou = np.array([inter[c] / union[c] if union[c] else np.nan for c in range(num_labels)])
    acc = np.array([inter[c] / area_label[c] if area_label[c] else np.nan for c in range(num_labels)])
    return {
        "mean_iou": np.mean([v for v in iou if not np.isnan(v)]),
        "mean_accuracy": np.mean([v for v in acc if not np.isnan(v)]),
        "overall_accuracy": inter.sum() / area_label.sum(),
        "per_category_iou": iou,
        "per_category_accuracy": acc,
    }


def reference_depth(prediction, depth, min_depth, max_depth, crop):
    """The eight metrics of one image from their textbook formulas; crop = (top, bottom, left, right) or None."""
    mask = (depth > min_depth) & (depth < max_depth)
    if crop is not None:
        in_crop = np.zeros_like(mask)
        in_crop[crop[0] : crop[1], crop[2] : crop[3]] = True
        mask &= in_crop
    if not mask.any():
        return None
    gt = depth[mask].astype(np.float64)
    pred = prediction[mask].astype(np.float64)
    pred = np.where(pred < min_depth, min_depth, np.where(pred > max_depth, max_depth, pred))
    n = gt.size
    delta = [np.sum((gt / pred < 1.25**k) & (pred / gt < 1.25**k)) / n for k in (1, 2, 3)]
    return {
        "abs_rel": np.sum(np.abs(gt - pred) / gt) / n,
        "sq_rel": np.sum((gt - pred) ** 2 / gt) / n,
        "rmse": np.sqrt(np.sum((gt - pred) ** 2) / n),
        "rmse_log": np.sqrt(np.sum((np.log(gt) - np.log(pred)) ** 2) / n),
        "log10": np.sum(np.abs(np.log10(gt) - np.log10(pred))) / n,
        "delta1": delta[0],
        "delta2": delta[1],
        "delta3": delta[2],
    }


def assert_segmentation_close(actual, expected):
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy"):
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-12, err_msg=key)
    for key in ("per_category_iou", "per_category_accuracy"):
        assert isinstance(actual[key], np.ndarray)
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-12, equal_nan=True, err_msg=key)


# --------------------------------------------------------------------------------------------- segmentation
def make_label_maps(reduce_labels, seed=0):
    """Maps of different sizes; class 4 is in neither map (after reduction), class 7 only in predictions."""
    rng = np.random.default_rng(seed)
    predictions, labels = [], []
    for shape in [(13, 17), (20, 9), (5, 31), (8, 8)]:
        target = rng.choice([0, 1, 2, 3, 5, 6], size=shape)
        ignored = rng.random(shape) < 0.15
        prediction = np.where(rng.random(shape) < 0.6, target, rng.choice([0, 1, 2, 3, 5, 6, 7], size=shape))
        predictions.append(np.where(ignored, rng.integers(0, 8, size=shape), prediction))
        if reduce_labels:  # ADE20K-style raw labels: 0 = background, k + 1 = class k
            labels.append(np.where(ignored, rng.choice([0, IGNORE], size=shape), target + 1))
        else:
            labels.append(np.where(ignored, IGNORE, target))
    return predictions, labels


@pytest.mark.parametrize("reduce_labels", [False, True])
def test_accumulator_matches_loop_reference(reduce_labels):
    predictions, labels = make_label_maps(reduce_labels)
    expected = reference_segmentation(predictions, labels, 8, reduce_labels)
    assert np.isnan(expected["per_category_iou"][4]) and expected["per_category_iou"][7] == 0
    assert np.isnan(expected["per_category_accuracy"][7])

    accumulator = SegmentationMetricAccumulator(
        num_labels=8, ignore_index=IGNORE, reduce_labels=reduce_labels
    )
    for prediction, label in zip(predictions, labels):
        accumulator.update(prediction, label)
    assert_segmentation_close(accumulator.compute(), expected)


@pytest.mark.parametrize("reduce_labels", [False, True])
def test_evaluate_module_add_batch_matches_loop_reference(reduce_labels):
    predictions, labels = make_label_maps(reduce_labels, seed=1)
    expected = reference_segmentation(predictions, labels, 8, reduce_labels)
    metric = load_metric("mean_iou", keep_in_memory=True)
    metric.add_batch(predictions=predictions[:2], references=labels[:2])
    metric.add_batch(predictions=predictions[2:], references=labels[2:])
    results = metric.compute(num_labels=8, ignore_index=IGNORE, reduce_labels=reduce_labels)
    assert_segmentation_close(results, expected)


def map_labels_by_loop(label, label_map):
    """The Hub's `label_map`, pixel by pixel: each pixel's original id looked up once."""
    mapped = label.astype(np.int64).copy()
    for index in np.ndindex(label.shape):
        mapped[index] = label_map.get(int(label[index]), int(label[index]))
    return mapped


@pytest.mark.parametrize("reduce_labels", [False, True])
def test_evaluate_module_label_map_and_nan_to_num_match_loop_reference(reduce_labels):
    predictions, labels = make_label_maps(reduce_labels, seed=2)
    # Swap two classes (a chained replacement would merge them) and send one to the ignore index.
    offset = 1 if reduce_labels else 0
    label_map = {1 + offset: 2 + offset, 2 + offset: 1 + offset, 6 + offset: IGNORE}
    expected = reference_segmentation(
        predictions, [map_labels_by_loop(label, label_map) for label in labels], 8, reduce_labels
    )
    assert np.isnan(expected["per_category_iou"][4]) and np.isnan(expected["per_category_accuracy"][6])
    metric = load_metric("mean_iou", keep_in_memory=True)
    results = metric.compute(
        predictions=predictions,
        references=labels,
        num_labels=8,
        ignore_index=IGNORE,
        reduce_labels=reduce_labels,
        label_map=label_map,
    )
    assert_segmentation_close(results, expected)

    filled = {key: np.nan_to_num(value, nan=-1.0) for key, value in expected.items()}
    results = metric.compute(
        predictions=predictions,
        references=labels,
        num_labels=8,
        ignore_index=IGNORE,
        reduce_labels=reduce_labels,
        label_map={str(k): v for k, v in label_map.items()},  # as read back from JSON
        nan_to_num=-1,
    )
    assert_segmentation_close(results, filled)
    assert results["per_category_iou"][4] == -1 and results["per_category_accuracy"][6] == -1


# Example from the docstring of the Hub's `mean_iou` metric (huggingface/evaluate, metrics/mean_iou/mean_iou.py).
HUB_PREDICTIONS = [
    np.array([[1, 2], [3, 4], [5, 255]]),
    np.array([[2, 7], [9, 2], [3, 6]]),
    np.array([[2, 2, 3], [8, 2, 4], [3, 255, 2]]),
]
HUB_REFERENCES = [
    np.array([[0, 3], [5, 4], [6, 255]]),
    np.array([[1, 7], [9, 2], [3, 6]]),
    np.array([[1, 2, 2], [8, 2, 1], [3, 255, 1]]),
]
HUB_RESULTS = {
    "mean_iou": 0.47750000000000004,
    "mean_accuracy": 0.5916666666666666,
    "overall_accuracy": 0.5263157894736842,
    "per_category_iou": [0.0, 0.0, 0.375, 0.4, 0.5, 0.0, 0.5, 1.0, 1.0, 1.0],
    "per_category_accuracy": [0.0, 0.0, 0.75, 2 / 3, 1.0, 0.0, 0.5, 1.0, 1.0, 1.0],
}


def test_hub_mean_iou_golden_values():
    accumulator = SegmentationMetricAccumulator(num_labels=10)
    for prediction, label in zip(HUB_PREDICTIONS, HUB_REFERENCES):
        accumulator.update(prediction, label)
    assert_segmentation_close(accumulator.compute(), HUB_RESULTS)


def test_accumulator_takes_batched_tensors_and_resets():
    predictions, labels = make_label_maps(False)
    prediction, label = torch.from_numpy(predictions[3][None]), torch.from_numpy(labels[3][None])
    accumulator = SegmentationMetricAccumulator(num_labels=8)
    accumulator.update(torch.cat([prediction, prediction]), torch.cat([label, label]))
    assert_segmentation_close(
        accumulator.compute(), reference_segmentation([predictions[3]] * 2, [labels[3]] * 2, 8, False)
    )
    accumulator.reset()
    assert accumulator.confusion.sum() == 0


def test_segmentation_bad_inputs_raise():
    accumulator = SegmentationMetricAccumulator(num_labels=3)
    with pytest.raises(ValueError, match="label values"):
        accumulator.update(np.zeros((2, 2), int), np.full((2, 2), 3))
    with pytest.raises(ValueError, match="prediction values"):
        accumulator.update(np.full((2, 2), 5), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="shape"):
        accumulator.update(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="unknown metric"):
        metric_path("accuracy")


# ---------------------------------------------------------------------------------------------------- depth
def make_depth_maps(shape, seed=0):
    rng = np.random.default_rng(seed)
    depth = rng.uniform(0.5, 9.5, size=shape).astype(np.float32)
    depth[rng.random(shape) < 0.1] = 0.0
    depth[rng.random(shape) < 0.05] = 12.0
    prediction = (depth * rng.lognormal(0.0, 0.2, size=shape)).astype(np.float32)
    prediction[rng.random(shape) < 0.02] = -1.0
    prediction[rng.random(shape) < 0.02] = 15.0
    return prediction, depth


def test_depth_matches_formula_reference_with_eigen_crop():
    images = [make_depth_maps((480, 640), seed) for seed in (0, 1)]
    invalid = (np.ones((480, 640), np.float32), np.zeros((480, 640), np.float32))
    per_image = [reference_depth(p, d, 1e-3, 10.0, (45, 471, 41, 601)) for p, d in images]
    expected = {key: np.mean([errors[key] for errors in per_image]) for key in per_image[0]}

    accumulator = DepthMetricAccumulator()
    for prediction, depth in [images[0], invalid, images[1]]:
        accumulator.update(torch.from_numpy(prediction), depth)
    results = accumulator.compute()
    assert results["num_images"] == 2 and results["num_skipped"] == 1
    for key, value in expected.items():
        np.testing.assert_allclose(results[key], value, rtol=1e-9, err_msg=key)


def test_depth_evaluate_module_matches_accumulator():
    images = [make_depth_maps(shape, seed) for seed, shape in enumerate([(48, 64), (30, 50), (60, 40)])]
    metric = load_metric("depth_metrics", keep_in_memory=True)
    metric.add_batch(predictions=[p for p, _ in images[:2]], references=[d for _, d in images[:2]])
    metric.add(predictions=images[2][0], references=images[2][1])
    results = metric.compute(max_depth=8.0, eigen_crop=False)

    per_image = [reference_depth(p, d, 1e-3, 8.0, None) for p, d in images]
    for key in per_image[0]:
        np.testing.assert_allclose(results[key], np.mean([e[key] for e in per_image]), rtol=1e-9, err_msg=key)
    assert results["num_images"] == 3 and results["num_skipped"] == 0


def test_eigen_crop_scales_with_image_size():
    assert eigen_crop_bounds(480, 640) == (45, 471, 41, 601)
    assert eigen_crop_bounds(240, 320) == (23, 236, 21, 301)  # 22.5, 235.5, 20.5, 300.5 rounded half up
    prediction, depth = make_depth_maps((96, 128), seed=3)
    expected = reference_depth(prediction, depth, 1e-3, 10.0, (9, 94, 8, 120))  # 45/5, 471/5 ... 601/5
    accumulator = DepthMetricAccumulator()
    accumulator.update(prediction, depth)
    results = accumulator.compute()
    for key, value in expected.items():
        np.testing.assert_allclose(results[key], value, rtol=1e-9, err_msg=key)


def test_perfect_depth_prediction():
    _, depth = make_depth_maps((480, 640))
    accumulator = DepthMetricAccumulator()
    accumulator.update(depth, depth)
    results = accumulator.compute()
    for key in ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10"):
        assert results[key] == pytest.approx(0.0, abs=1e-12)
    for key in ("delta1", "delta2", "delta3"):
        assert results[key] == 1.0


def test_depth_bad_inputs_raise():
    accumulator = DepthMetricAccumulator()
    accumulator.update(np.ones((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="no image has a valid"):
        accumulator.compute()
    with pytest.raises(ValueError, match="same size"):
        accumulator.update(np.ones((4, 4)), np.ones((4, 5)))
    with pytest.raises(ValueError, match="min_depth"):
        DepthMetricAccumulator(min_depth=1.0, max_depth=0.5)


# --------------------------------------------------------------------------------------------------- offline
OFFLINE_SCRIPT = """
import json, numpy as np
from densecl_vit.training.evaluation.metrics import load_metric
predictions = [np.array(p) for p in json.loads({predictions!r})]
references = [np.array(r) for r in json.loads({references!r})]
iou = load_metric("mean_iou").compute(predictions=predictions, references=references, num_labels=10)
depth = load_metric("depth_metrics").compute(
    predictions=[np.full((48, 64), 2.0)], references=[np.full((48, 64), 2.0)]
)
print(json.dumps({{"mean_iou": iou["mean_iou"], "abs_rel": depth["abs_rel"], "delta1": depth["delta1"]}}))
"""


def test_metrics_load_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    iou = load_metric("mean_iou", keep_in_memory=True)
    results = iou.compute(predictions=HUB_PREDICTIONS, references=HUB_REFERENCES, num_labels=10)
    assert results["mean_iou"] == pytest.approx(HUB_RESULTS["mean_iou"])
    depth = load_metric("depth_metrics", keep_in_memory=True)
    _, target = make_depth_maps((48, 64))
    assert depth.compute(predictions=[target], references=[target])["delta1"] == 1.0


@pytest.mark.slow
def test_metrics_load_offline_in_fresh_process(tmp_path):
    """The offline environment variables set before `evaluate` is imported, with an empty HF cache."""
    script = OFFLINE_SCRIPT.format(
        predictions=json.dumps([p.tolist() for p in HUB_PREDICTIONS]),
        references=json.dumps([r.tolist() for r in HUB_REFERENCES]),
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_EVALUATE_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["HF_HOME"] = str(tmp_path / "hf_home")
    completed = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert results == {"mean_iou": pytest.approx(HUB_RESULTS["mean_iou"]), "abs_rel": 0.0, "delta1": 1.0}
