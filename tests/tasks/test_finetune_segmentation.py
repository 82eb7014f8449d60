"""Segmentation fine-tuning: options, samples, model start, layer-decay groups, evaluation paths, the script
(in process and once as a subprocess), learning, and an exact resume after kill -9."""

import io
import json
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from accelerate import Accelerator
from helpers import PYTHON, SCRIPTS, save_encoder, subprocess_env, write_segmentation_dataset
from safetensors.torch import load_file

from densecl_vit.hub_cards.cards import load_eval_results
from densecl_vit.modeling import DenseCLViTForPreTraining, DenseCLViTForSemanticSegmentation
from densecl_vit.training.engine.config import parse_config
from densecl_vit.training.engine.setup import cli_main
from densecl_vit.training.evaluation.metrics.mean_iou.mean_iou import reduce_zero_label as metric_reduce
from densecl_vit.training.evaluation.shared import EvalSource, open_eval_source
from densecl_vit.training.tasks.finetuning import FinetuneTask, PairedSample, build_optimizer
from densecl_vit.training.tasks.model_start import load_task_model
from densecl_vit.training.tasks.segmentation import (
    RECIPES_DIR,
    TASK,
    FinetuneSegmentationConfig,
    SegmentationTask,
    eval_sample_fn,
    evaluation_report,
    main,
    read_id2label,
    reduce_zero_label,
    resolve_columns,
    train_sample_fn,
)
from densecl_vit.training.tasks.segmentation_eval import (
    SegmentationProtocol,
    confusion_counts,
    evaluate_segmentation,
    segmentation_logits,
)

NAMES = {0: "red thing", 1: "green thing", 2: "blue thing"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    return {"data": write_segmentation_dataset(root / "data"), "encoder": save_encoder(root / "encoder")}


def run_args(files, output_dir, *extra):
    return [
        "--dataset", str(files["data"]), "--model", str(files["encoder"]), "--output-dir", str(output_dir),
        "--crop-size", "32,32", "--scale-bounds", "64,32", "--eval-window", "32", "--eval-stride", "16",
        "--per-device-batch-size", "2", "--num-workers", "0", "--shuffle-buffer", "8", "--log-every", "2",
        *extra,
    ]  # fmt: skip


def tiny_cfg(files, tmp_path, **overrides):
    return FinetuneSegmentationConfig(
        **{
            "dataset": str(files["data"]),
            "model": str(files["encoder"]),
            "output_dir": str(tmp_path / "run"),
            "max_steps": 10,
            "crop_size": (32, 32),
            "scale_bounds": (64, 32),
            "eval_window": 32,
            "eval_stride": 16,
            "num_workers": 0,
            **overrides,
        }
    )


# --- options, class names, recipes --------------------------------------------------------------------


def test_validate_refuses_bad_options_before_loading(files, tmp_path):
    cases = {
        "--crop-size": {"crop_size": (30, 32)},
        "--eval-stride": {"eval_stride": 64},
        "--scale-range": {"scale_range": (2.0, 0.5)},
        "--id2label": {"id2label": str(tmp_path / "missing.json")},
        "--layer-decay": {"layer_decay": 1.5},
        "--eval-every needs": {"eval_split": None, "eval_every": 5},
    }
    for flag, overrides in cases.items():
        with pytest.raises(ValueError, match=flag):
            tiny_cfg(files, tmp_path, **overrides).validate()
    tiny_cfg(files, tmp_path).validate()


def test_read_id2label_accepts_objects_lists_and_shipped_names(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["x", "y"]))
    assert read_id2label(str(tmp_path / "a.json")) == {0: "x", 1: "y"}
    (tmp_path / "gap.json").write_text(json.dumps({"0": "x", "2": "y"}))
    with pytest.raises(ValueError, match="without gaps"):
        read_id2label(str(tmp_path / "gap.json"))
    ade = read_id2label("ade20k_id2label.json")
    assert len(ade) == 150 and ade[0] == "wall" and ade[149] == "flag"


def test_missing_class_names_say_how_to_supply_them(files, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for parquet in (files["data"] / "data").glob("*.parquet"):
        (bare / parquet.name).write_bytes(parquet.read_bytes())
    argv = run_args(files, tmp_path / "out", "--max-steps", "1")
    argv[1] = str(bare / "train-00000-of-00001.parquet")
    assert cli_main(main, FinetuneSegmentationConfig, argv) == 2
    assert "--id2label FILE.json" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
@pytest.mark.parametrize("head", ["linear", "upernet"])
def test_table1_recipes_load_and_validate(size, head):
    cfg = parse_config(
        FinetuneSegmentationConfig,
        ["--config", str(RECIPES_DIR / f"finetune_seg_ade20k_vit_{size}_{head}.yaml")],
    )
    cfg.validate()
    assert (cfg.decode_head, cfg.model, cfg.crop_size, cfg.epochs) == (head, f"vit-{size}", (512, 512), 64)
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.layer_decay) == ("adamw", 1e-4, 0.005, 0.65)
    assert (cfg.drop_path_rate, cfg.eval_window, cfg.eval_stride, cfg.lr_schedule) == (0.1, 512, 341, "poly")


# --- samples ------------------------------------------------------------------------------------------


def test_samples_reduce_labels_and_keep_image_and_labels_aligned(files, tmp_path):
    cfg = tiny_cfg(files, tmp_path, photometric=False, scale_range=(1.0, 1.0))
    source = open_eval_source(cfg, "train", resolve_columns, None)
    example = next(iter(source.stream))
    raw = np.asarray(PIL.Image.open(io.BytesIO(example["annotation"]["bytes"])))
    np.testing.assert_array_equal(reduce_zero_label(raw.astype(np.int64)), metric_reduce(raw))
    sample = train_sample_fn(cfg, source.columns, 3)(example, np.random.default_rng(0))
    assert sample["pixel_values"].shape == (3, 32, 32) and sample["labels"].shape == (32, 32)
    assert set(sample["labels"].unique().tolist()) <= {0, 1, 2, 255}
    # With no photometric change the red channel of a pixel tells its class: red things are class 0.
    red = sample["pixel_values"][0] > sample["pixel_values"][1] + 1.0
    assert (sample["labels"][red] == 0).all()
    evaluation = eval_sample_fn(
        source.columns, 3, reduce_labels=True, ignore_index=255, scale_bounds=(64, 16)
    )(example, None)
    assert evaluation["pixel_values"].shape == (3, 16, 16) and evaluation["labels"].shape == (32, 32)


# --- model start and optimiser ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head, new", [("linear", ["classifier"]), ("upernet", ["auxiliary_head", "classifier", "decode_head"])]
)
def test_loading_an_encoder_initialises_only_the_head(files, tmp_path, head, new):
    labels = {"num_labels": 3, "id2label": NAMES, "label2id": {v: k for k, v in NAMES.items()}}
    model, report = load_task_model(
        DenseCLViTForSemanticSegmentation, str(files["encoder"]), (32, 32), decode_head=head, **labels
    )
    assert report["newly_initialized"] == new and report["unused"] == []
    saved = load_file(files["encoder"] / "model.safetensors")
    loaded = model.densecl_vit.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in saved.items())

    pretraining = DenseCLViTForPreTraining.from_pretrained(files["encoder"])
    pretraining.save_pretrained(tmp_path / "final_pretraining")
    model, report = load_task_model(
        DenseCLViTForSemanticSegmentation,
        str(tmp_path / "final_pretraining"),
        (48, 48),
        decode_head=head,
        **labels,
    )
    assert report["newly_initialized"] == new and report["unused"]
    assert not any(key.startswith("densecl_vit.") for key in report["unused"])
    # A 48x48 crop stores the position embeddings resampled once, as the encoder resamples them on the fly.
    source = pretraining.densecl_vit.embeddings
    assert model.config.image_size == 48 and model.densecl_vit.embeddings.grid_size == 6
    torch.testing.assert_close(
        model.densecl_vit.embeddings.position_embeddings, source.interpolate_pos_encoding(6, 6)
    )


def test_layer_decay_groups_hold_every_parameter_once_with_its_scale(files, tmp_path):
    cfg = tiny_cfg(files, tmp_path, decode_head="upernet", warmup_fraction=0.0, lr=2e-4)
    model, _ = load_task_model(
        DenseCLViTForSemanticSegmentation, cfg.model, (32, 32), num_labels=3, decode_head="upernet"
    )
    optimizer, _ = build_optimizer(cfg, model, total_steps=10)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(names) and len(seen) == len(set(seen))
    depth = model.config.num_hidden_layers
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            if name.startswith("densecl_vit.embeddings."):
                layer = 0
            elif name.startswith("densecl_vit.encoder.layer."):
                layer = int(name.split(".")[3]) + 1
            else:
                layer = depth + 1
            no_decay = param.ndim < 2 or name.endswith(("position_embeddings", "cls_token"))
            assert group["weight_decay"] == (0.0 if no_decay else 0.005), name
            assert group["initial_lr"] == pytest.approx(2e-4 * 0.65 ** (depth + 1 - layer)), name


# --- evaluation ---------------------------------------------------------------------------------------


def tiny_model(tiny, decode_head="linear"):
    torch.manual_seed(0)
    config = tiny(
        num_labels=3, id2label=NAMES, label2id={v: k for k, v in NAMES.items()}, decode_head=decode_head
    )
    return DenseCLViTForSemanticSegmentation(config).eval()


def test_sliding_window_equals_whole_image_when_the_window_covers_it(tiny):
    model = tiny_model(tiny, "upernet")
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        whole = segmentation_logits(model, pixel_values)
        slide = segmentation_logits(model, pixel_values, window=32, stride=21)
    torch.testing.assert_close(slide, whole, rtol=0, atol=1e-6)


def test_evaluate_module_accumulator_and_script_path_agree(files, tmp_path, tiny):
    from densecl_vit.training.evaluation.metrics import SegmentationMetricAccumulator, load_metric
    from densecl_vit.training.evaluation.metrics.mean_iou.mean_iou import confusion_matrix

    rng = np.random.default_rng(0)
    prediction, label = rng.integers(0, 3, (2, 9, 7)), rng.choice([0, 1, 2, 255], (2, 9, 7))
    torch.testing.assert_close(
        confusion_counts(torch.from_numpy(prediction), torch.from_numpy(label), 3, 255).numpy(),
        sum(confusion_matrix(p, t, 3) for p, t in zip(prediction, label)),
    )
    model, accelerator = tiny_model(tiny), Accelerator(cpu=True)
    source = open_eval_source(tiny_cfg(files, tmp_path), "validation", resolve_columns, None)
    protocol = SegmentationProtocol(window=32, stride=16, scale_bounds=(64, 32))
    metrics, matrix, count = evaluate_segmentation(
        model, make_loader(source, accelerator, protocol), accelerator, protocol
    )
    predictions, references = [], []
    for batch in make_loader(source, accelerator, protocol):
        with torch.inference_mode():
            logits = segmentation_logits(model, batch["pixel_values"], 32, 16)
        logits = torch.nn.functional.interpolate(logits, size=batch["labels"].shape[-2:], mode="bilinear")
        predictions.append(logits.argmax(1)[0].numpy())
        references.append(batch["labels"][0].numpy())
    expected = load_metric("mean_iou").compute(predictions=predictions, references=references, num_labels=3)
    accumulator = SegmentationMetricAccumulator(3)
    accumulator.update(np.stack(predictions), np.stack(references))
    assert count == 4 and matrix.sum() == sum((r != 255).sum() for r in references)
    np.testing.assert_array_equal(matrix, accumulator.confusion)
    for name in ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou"):
        np.testing.assert_allclose(metrics[name], expected[name])
        np.testing.assert_allclose(accumulator.compute()[name], expected[name])


def test_the_task_prepares_from_its_options_and_evaluates_with_the_run_protocol(files, tmp_path, tiny):
    cfg = tiny_cfg(files, tmp_path, decode_head="upernet", ignore_index=254, eval_window=16, eval_stride=8)
    task = SegmentationTask(cfg)
    assert (task.name, task.model_class, task.resolve_columns) == (
        TASK,
        DenseCLViTForSemanticSegmentation,
        resolve_columns,
    )
    source = open_eval_source(cfg, "validation", task.resolve_columns, 2)
    sample, overrides = task.prepare(source.stream.features, source.columns)
    assert overrides["num_labels"] == 3 and overrides["label2id"] == {v: k for k, v in NAMES.items()}
    assert (overrides["decode_head"], overrides["semantic_loss_ignore_index"]) == ("upernet", 254)
    assert isinstance(sample, PairedSample) and sample.decode.ignore_index == 254
    model, accelerator = tiny_model(tiny), Accelerator(cpu=True)
    protocol = SegmentationProtocol(window=16, stride=8, scale_bounds=(64, 32), ignore_index=254)
    report, expected = (
        task.evaluate(model, source, accelerator),
        evaluation_report(model, source, accelerator, protocol),
    )
    assert report["protocol"] == expected["protocol"] == protocol.to_dict()
    assert report["metrics"] == expected["metrics"] and report["num_samples"] == expected["num_samples"] == 2


def test_a_task_without_its_evaluation_cannot_be_built(files, tmp_path):
    class NoEvaluation(FinetuneTask):
        def prepare(self, features, columns):
            return None, {}

    with pytest.raises(TypeError, match="evaluate"):
        NoEvaluation(tiny_cfg(files, tmp_path))


def make_loader(source: EvalSource, accelerator, protocol):
    sample = eval_sample_fn(
        source.columns, 3, reduce_labels=True, ignore_index=255, scale_bounds=protocol.scale_bounds
    )
    return source.loader(sample, accelerator)


# --- the script ---------------------------------------------------------------------------------------


def test_script_trains_evaluates_and_writes_its_outputs(files, tmp_path, capsys):
    out = tmp_path / "run"
    argv = run_args(files, out, "--max-steps", "4", "--eval-every", "2", "--decode-head", "upernet")
    assert cli_main(main, FinetuneSegmentationConfig, argv) == 0
    printed = capsys.readouterr().out
    assert "newly initialised: auxiliary_head, classifier" in printed
    # The layer-decay table goes to a file of the run, named in one line of the log.
    assert "layer_0_no_decay" not in printed and f"weight decay): {out / 'param_groups.txt'}" in printed
    assert (out / "param_groups.txt").read_text().count("layer_0_no_decay") == 1
    for name in ("config.yaml", "metrics.jsonl", "results.json", "eval_results.json", "final/config.json",
                 "final/model.safetensors", "final/preprocessor_config.json"):  # fmt: skip
        assert (out / name).is_file(), name
    report = load_eval_results(out / "eval_results.json")
    assert report.task == "semantic-segmentation" and report.num_samples == 4
    assert np.isfinite(report.metrics["mean_iou"]) and report.protocol["stride"] == 16
    assert json.loads((out / "eval_results.json").read_text())["per_category"]["labels"] == list(
        NAMES.values()
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    assert [r["step"] for r in records if "eval_mean_iou" in r] == [2, 4]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and results["eval_mean_iou"] == report.metrics["mean_iou"]
    processor = json.loads((out / "final/preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 32, "width": 32} and processor["size_divisor"] == 8
    config = json.loads((out / "final/config.json").read_text())
    assert (
        config["architectures"] == ["DenseCLViTForSemanticSegmentation"]
        and config["id2label"]["2"] == "blue thing"
    )


@pytest.mark.slow  # ~1-2 min: torch.compile builds CPU kernels for training and for the evaluation shapes
def test_compile_trains_and_evaluates_the_same_model(files, tmp_path):
    from torch._dynamo.utils import counters

    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    for out, extra in ((plain, []), (compiled, ["--compile"])):
        counters.clear()
        assert (
            cli_main(main, FinetuneSegmentationConfig, run_args(files, out, "--max-steps", "2", *extra)) == 0
        )
        assert (counters["stats"]["unique_graphs"] > 0) == bool(extra)  # graphs were compiled, and only here
    mine, theirs = (load_file(str(out / "final" / "model.safetensors")) for out in (compiled, plain))
    assert mine.keys() == theirs.keys()  # the plain model's parameter names, no compile wrapper
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], atol=1e-4, rtol=1e-4, msg=name)
    scores = [json.loads((out / "results.json").read_text())["eval_mean_iou"] for out in (compiled, plain)]
    assert scores[0] == pytest.approx(scores[1], abs=1e-3)


@pytest.mark.slow  # ~25-45 s on 2 shared cores, nearly all of it the child's imports
def test_script_runs_as_a_subprocess_and_refuses_bad_options(files, tmp_path):
    out = tmp_path / "run"
    argv = run_args(files, out, "--max-steps", "2", "--eval-split", "none")
    done = subprocess.run(
        [PYTHON, str(SCRIPTS / "finetune_segmentation.py"), *argv],
        env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "final/model.safetensors").is_file() and not (out / "eval_results.json").exists()
    with pytest.raises(SystemExit) as bad:  # a bad option: one line on stderr, status 2, before any loading
        cli_main(main, FinetuneSegmentationConfig, [*argv, "--eval-stride", "64"])
    assert bad.value.code == 2


def test_loss_drops_clearly_in_100_steps(files, tmp_path):
    out = tmp_path / "run"
    argv = run_args(files, out, "--max-steps", "100", "--log-every", "10", "--lr", "1e-3", "--eval-split", "none",
                    "--warmup-fraction", "0.05", "--drop-path-rate", "0")  # fmt: skip
    assert cli_main(main, FinetuneSegmentationConfig, argv) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 10 and losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow  # ~30-50 s: a child process (imports) killed mid-run, then two in-process runs
def test_kill_9_then_resume_gives_the_uninterrupted_weights_bit_for_bit(files, tmp_path):
    common = ["--max-steps", "12", "--checkpoint-every", "3", "--keep-last", "none", "--seed", "3"]
    assert (
        cli_main(
            main, FinetuneSegmentationConfig, run_args(files, tmp_path / "full", *common, "--eval-every", "4")
        )
        == 0
    )

    out = tmp_path / "killed"
    slow = (
        "import sys, time\n"
        "from densecl_vit.training.engine import loop, setup\n"
        "from densecl_vit.training.tasks.segmentation import FinetuneSegmentationConfig, main\n"
        "step = loop.train_step\n"
        "loop.train_step = lambda *a, **k: (time.sleep(0.25), step(*a, **k))[1]\n"
        "sys.exit(setup.cli_main(main, FinetuneSegmentationConfig, sys.argv[1:]))\n"
    )
    argv = run_args(files, out, *common, "--eval-split", "none")
    child = subprocess.Popen([PYTHON, "-c", slow, *argv], env=subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints/step-00000003/COMPLETE").is_file():
            assert child.poll() is None, child.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 1.5))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGKILL and not (out / "final").exists()

    assert cli_main(main, FinetuneSegmentationConfig, [*argv, "--resume-from", "latest"]) == 0
    full, resumed = (
        load_file(tmp_path / "full/final/model.safetensors"),
        load_file(out / "final/model.safetensors"),
    )
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[name], resumed[name]) for name in full)
    assert Path(out / "results.json").is_file()
