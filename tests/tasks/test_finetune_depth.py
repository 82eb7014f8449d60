"""Depth fine-tuning: options, recipes, aligned samples, the evaluation function (perfect and scaled
predictions against NumPy), the script, and learning."""

import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from helpers import save_encoder, write_depth_dataset
from transformers.modeling_outputs import DepthEstimatorOutput

from densecl_vit.hub_cards.cards import load_eval_results
from densecl_vit.modeling import DenseCLViTForDepthEstimation
from densecl_vit.training.engine.config import parse_config
from densecl_vit.training.engine.setup import cli_main
from densecl_vit.training.evaluation.shared import open_eval_source
from densecl_vit.training.tasks.depth import (
    DEPTH_METRICS,
    FinetuneDepthConfig,
    eval_sample_fn,
    main,
    resolve_columns,
    train_sample_fn,
)
from densecl_vit.training.tasks.depth_eval import DepthProtocol, evaluate_depth
from densecl_vit.training.tasks.segmentation import RECIPES_DIR

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth")
    return {
        "data": write_depth_dataset(root / "data"),
        "png": write_depth_dataset(root / "png", num_train=2, num_val=2, png_millimetres=True),
        "encoder": save_encoder(root / "encoder"),
        "encoder4": save_encoder(root / "encoder4", num_hidden_layers=4),  # out_indices 1-4: a stock DPT
    }


def run_args(files, output_dir, *extra):
    return [
        "--dataset", str(files["data"]), "--model", str(files["encoder"]), "--output-dir", str(output_dir),
        "--crop-size", "24,32", "--per-device-batch-size", "2", "--num-workers", "0", "--shuffle-buffer", "8",
        "--log-every", "2", *extra,
    ]  # fmt: skip


def tiny_cfg(files, **overrides):
    values = {
        "dataset": str(files["data"]),
        "model": str(files["encoder"]),
        "max_steps": 4,
        "crop_size": (24, 32),
    }
    return FinetuneDepthConfig(**{**values, "num_workers": 0, **overrides})


def test_validate_refuses_bad_options(files):
    cases = {
        "--min-depth": {"min_depth": 5.0, "max_depth": 1.0},
        "--depth-scale": {"depth_scale": 0.0},
        "--eval-size": {"eval_size": (20, 32)},
        "--crop-size": {"crop_size": (24, 30)},
    }
    for flag, overrides in cases.items():
        with pytest.raises(ValueError, match=flag):
            tiny_cfg(files, **overrides).validate()
    tiny_cfg(files).validate()


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
@pytest.mark.parametrize("head", ["linear", "upernet", "dpt"])
def test_table2_recipes_load_and_validate(size, head):
    cfg = parse_config(
        FinetuneDepthConfig, ["--config", str(RECIPES_DIR / f"finetune_depth_nyu_vit_{size}_{head}.yaml")]
    )
    cfg.validate()
    assert (cfg.depth_head, cfg.model, cfg.optimizer, cfg.lr, cfg.epochs) == (
        head,
        f"vit-{size}",
        "adam",
        1e-4,
        50,
    )
    assert (cfg.min_depth, cfg.max_depth, cfg.eigen_crop, cfg.num_train_samples) == (1e-3, 10.0, True, 47584)


def unnormalised_grey(pixel_values):
    """(3, H, W) normalised -> (H, W) mean of the channels in [0, 1]."""
    return (pixel_values * STD[:, None, None] + MEAN[:, None, None]).mean(0)


def test_crop_and_flip_keep_depth_aligned_with_the_image(files):
    cfg = tiny_cfg(files, color_jitter=False)
    source = open_eval_source(cfg, "train", resolve_columns, None)
    make = train_sample_fn(cfg, source.columns)
    for index, example in enumerate(source.stream.take(4)):
        sample = make(example, np.random.default_rng(index))
        assert sample["pixel_values"].shape == (3, 24, 32) and sample["labels"].shape == (24, 32)
        depth, valid = sample["labels"], sample["labels"] > 0
        # The data set: depth = 1 + 6 * grey (up to the image noise), 0 (invalid) on the first two rows.
        expected = 1.0 + 6.0 * unnormalised_grey(sample["pixel_values"])
        assert valid.float().mean() > 0.5 and (depth[valid] - expected[valid]).abs().max() < 0.6


def test_16_bit_png_millimetres_decode_to_metres(files):
    cfg = tiny_cfg(files, dataset=str(files["png"]), depth_scale=1e-3)
    source = open_eval_source(cfg, "validation", resolve_columns, None)
    sample = eval_sample_fn(source.columns, depth_scale=1e-3, min_depth=1e-3, max_depth=10.0, patch_size=8)
    depth = [sample(example, None)["labels"] for example in source.stream]
    assert len(depth) == 2 and all(d.dtype == torch.float32 and 1.0 <= d.max() <= 7.0 for d in depth)
    assert all(d[:2].eq(0).all() for d in depth)


def evaluation_inputs(files, tiny, predict):
    """A depth model whose output is `predict(ground truth)` of each image, and the loader feeding it."""
    torch.manual_seed(0)
    model = DenseCLViTForDepthEstimation(tiny()).eval()
    source = open_eval_source(tiny_cfg(files), "validation", resolve_columns, None)
    accelerator = Accelerator(cpu=True)
    sample = eval_sample_fn(source.columns, depth_scale=1.0, min_depth=1e-3, max_depth=10.0, patch_size=8)
    truths = [batch["labels"] for batch in source.loader(sample, accelerator)]
    outputs = iter(truths)
    model.forward = lambda pixel_values: DepthEstimatorOutput(predicted_depth=predict(next(outputs)))
    return model, source.loader(sample, accelerator), accelerator, [t[0].numpy() for t in truths]


def test_perfect_predictions_score_zero_error_and_full_accuracy(files, tiny):
    model, loader, accelerator, _ = evaluation_inputs(files, tiny, predict=lambda depth: depth.clone())
    results = evaluate_depth(model, loader, accelerator, DepthProtocol(eigen_crop=False))
    assert results["num_images"] == 4 and results["num_skipped"] == 0
    for name in ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10"):
        assert results[name] == pytest.approx(0.0, abs=1e-6), name
    assert results["delta1"] == results["delta2"] == results["delta3"] == 1.0


def test_scaled_predictions_match_numpy_per_image_means(files, tiny):
    model, loader, accelerator, truths = evaluation_inputs(files, tiny, predict=lambda depth: 1.3 * depth)
    results = evaluate_depth(model, loader, accelerator, DepthProtocol(eigen_crop=False))
    rmse, abs_rel = [], []
    for depth in truths:
        gt = depth[(depth > 1e-3) & (depth < 10.0)].astype(np.float64)
        pred = np.clip(1.3 * gt, 1e-3, 10.0)
        rmse.append(np.sqrt(np.mean((pred - gt) ** 2)))
        abs_rel.append(np.mean(np.abs(pred - gt) / gt))
    assert results["rmse"] == pytest.approx(np.mean(rmse), rel=1e-5)
    assert results["abs_rel"] == pytest.approx(np.mean(abs_rel), rel=1e-5)
    # Every ratio is 1.3: above 1.25, below 1.25^2.
    assert (results["delta1"], results["delta2"], results["delta3"]) == (0.0, 1.0, 1.0)


def test_script_trains_and_reports_all_eight_metrics(files, tmp_path):
    out = tmp_path / "run"
    argv = run_args(files, out, "--max-steps", "4", "--eval-every", "2", "--depth-head", "upernet")
    assert cli_main(main, FinetuneDepthConfig, argv) == 0
    report = load_eval_results(out / "eval_results.json")
    assert report.task == "depth-estimation" and report.num_samples == 4
    assert sorted(report.metrics) == sorted(DEPTH_METRICS)
    assert all(np.isfinite(value) for value in report.metrics.values())
    assert report.protocol["eigen_crop"] is False and report.protocol["max_depth"] == 10.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_abs_rel" in r] == [2, 4]
    config = json.loads((out / "final/config.json").read_text())
    assert config["architectures"] == ["DenseCLViTForDepthEstimation"] and config["depth_head"] == "upernet"
    assert json.loads((out / "results.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_dpt_head_fine_tunes_into_a_stock_depth_anything(files, tmp_path):
    from densecl_vit.hub_cards.stock import to_depth_anything

    out = tmp_path / "run"
    argv = run_args(files, out, "--max-steps", "2", "--depth-head", "dpt", "--model", str(files["encoder4"]))
    assert cli_main(main, FinetuneDepthConfig, argv) == 0
    assert all(np.isfinite(v) for v in load_eval_results(out / "eval_results.json").metrics.values())
    model = DenseCLViTForDepthEstimation.from_pretrained(out / "final").eval()
    assert model.config.depth_head == "dpt" and model.config.out_indices == [1, 2, 3, 4]
    released = to_depth_anything(model)
    x = torch.randn(1, 3, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(released(x).predicted_depth, model(x).predicted_depth, atol=1e-5, rtol=0)


def test_without_eval_every_the_final_model_is_evaluated_and_logged_once(files, tmp_path):
    out = tmp_path / "run"
    assert cli_main(main, FinetuneDepthConfig, run_args(files, out, "--max-steps", "2")) == 0
    report = load_eval_results(out / "eval_results.json")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["eval_abs_rel"]) for r in records if "eval_abs_rel" in r] == [
        (2, report.metrics["abs_rel"])
    ]
    assert json.loads((out / "results.json").read_text())["eval_abs_rel"] == report.metrics["abs_rel"]


def test_loss_drops_clearly_in_100_steps(files, tmp_path):
    out = tmp_path / "run"
    argv = run_args(files, out, "--max-steps", "100", "--log-every", "10", "--lr", "1e-3", "--eval-split", "none",
                    "--drop-path-rate", "0")  # fmt: skip
    assert cli_main(main, FinetuneDepthConfig, argv) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 10 and losses[-1] < 0.7 * losses[0], losses
