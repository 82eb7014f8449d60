"""The demo end to end at toy size (`scripts/demo.py --quick`): every artefact, finite metrics, the printed table;
and the pieces it is made of (the loss curve reader, the metric check, in-process stage runs on typed options)."""

import dataclasses
import json
import math
from pathlib import Path

import PIL.Image
import pytest
import torch
from helpers import load_script
from safetensors.torch import load_file

from densecl_vit.training.engine.config import config_to_dict, parse_config
from densecl_vit.training.engine.exits import StageInterrupted
from densecl_vit.training.experiments.demo import (
    QUICK,
    check_finite,
    depth_config,
    format_results,
    loss_curve,
    pretrain_config,
    run_stage,
    segmentation_config,
    torch_threads,
)
from densecl_vit.training.tasks.depth import FinetuneDepthConfig
from densecl_vit.training.tasks.pretraining import PretrainConfig
from densecl_vit.training.tasks.pretraining import main as pretrain_main
from densecl_vit.training.tasks.segmentation import FinetuneSegmentationConfig


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One `scripts/demo.py --quick` run shared by the tests below: (output folder, exit status)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, load_script("demo").main(["--quick", "--output-dir", str(out)])


def test_quick_demo_writes_every_artefact(quick_demo):
    out, status = quick_demo
    assert status == 0
    assert (out / "data" / "meta.json").is_file()
    assert sorted(p.name for p in (out / "data" / "data").glob("*.parquet")) == [
        "train-00000-of-00001.parquet",
        "validation-00000-of-00001.parquet",
    ]
    encoder = out / "pretrain" / "final"
    assert (encoder / "config.json").is_file() and (encoder / "model.safetensors").is_file()
    assert (out / "pretrain" / "results.json").is_file()
    for task in ("segmentation", "depth"):
        assert (out / task / "final" / "model.safetensors").is_file()
        report = json.loads((out / task / "eval_results.json").read_text())
        assert report["num_samples"] == QUICK.num_val
        assert all(math.isfinite(v) for v in report["metrics"].values())
        release = out / "release" / task
        for name in ("README.md", "model.safetensors", "config.json", "eval_results.json", "example.png"):
            assert (release / name).is_file(), f"{release / name} missing"
        assert load_file(release / "model.safetensors")  # readable weights, not an empty file
        architecture = {
            "segmentation": "DenseCLViTForSemanticSegmentation",
            "depth": "DenseCLViTForDepthEstimation",
        }
        assert json.loads((release / "config.json").read_text())["architectures"] == [architecture[task]]
        assert "---" in (release / "README.md").read_text()[:10]  # card metadata block first


def test_quick_demo_reports_finite_metrics_and_paths(quick_demo):
    out, _ = quick_demo
    results = json.loads((out / "demo_results.json").read_text())
    metrics = results["metrics"]
    assert set(metrics) == {
        "pretrain_loss_start",
        "pretrain_loss_end",
        "mean_iou",
        "pixel_accuracy",
        "abs_rel",
        "rmse",
        "delta1",
    }
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0 <= metrics["mean_iou"] <= 1 and 0 <= metrics["delta1"] <= 1
    assert results["steps"] == {"pretrain": 2, "segmentation": 2, "depth": 2}
    printed = format_results(results)
    for path in results["paths"].values():
        assert Path(path).exists() and path in printed
    for text in ("mIoU", "pixel acc", "AbsRel", "RMSE", "δ1", f"{metrics['pretrain_loss_start']:.3f} ->"):
        assert text in printed


def test_loss_curve_reads_first_and_last_logged_loss(tmp_path):
    records = [
        {"step": 1, "loss": 5.0},
        {"step": 2, "eval_x": 1.0},
        {"step": 3, "loss": None},
        {"step": 4, "loss": 3.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert loss_curve(tmp_path) == (5.0, 3.5)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval_x": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no training loss"):
        loss_curve(tmp_path)


def test_check_finite_names_the_bad_metric():
    check_finite({"metrics": {"a": 1.0, "b": 0}})
    with pytest.raises(ValueError, match="rmse"):
        check_finite({"metrics": {"a": 1.0, "rmse": float("nan")}})


def test_run_stage_refuses_bad_settings_before_loading(tmp_path):
    cfg = pretrain_config(QUICK, tmp_path / "no-data", tmp_path / "run", "vit-tiny")
    cfg = dataclasses.replace(cfg, image_size=30)  # no multiple of 16
    with pytest.raises(ValueError, match="multiple of the patch size"):
        run_stage(pretrain_main, cfg)
    assert not (tmp_path / "run").exists()


@dataclasses.dataclass
class StageOptions:
    output_dir: str = "out"
    steps: int = 1

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError("--steps must be >= 1")


def test_run_stage_validates_and_stops_on_an_interrupted_run():
    result = run_stage(lambda cfg: {"status": "completed", "steps": cfg.steps}, StageOptions(steps=3))
    assert result == {"status": "completed", "steps": 3}
    with pytest.raises(ValueError, match="--steps must be"):
        run_stage(lambda cfg: {}, StageOptions(steps=0))
    with pytest.raises(StageInterrupted, match="out stopped at step 2"):
        run_stage(lambda cfg: {"status": "preempted", "steps": 2}, StageOptions())


def test_stage_options_are_what_the_scripts_parse_from_the_same_command_line():
    """The typed options of each stage against scripts' command lines (the settings the study keys its runs on,
    so a change here would restart every stored study run)."""
    s = dataclasses.replace(QUICK, layer_decay=0.5, crop_scale=(0.3, 0.9))
    pretrain = [
        "--dataset", "d", "--image-column", "image", "--model", "m.json", "--image-size", "32",
        "--per-device-batch-size", "4", "--max-steps", "2", "--lr", "0.004", "--loss", "global",
        "--crop-scale", "0.3,0.9", "--projection-hidden-size", "32", "--projection-dim", "16",
        "--log-every", "1", "--checkpoint-every", "2", "--keep-last", "1", "--num-workers", "0",
        "--seed", "7", "--plot-curves", "false", "--output-dir", "o", "--gpu-augment", "false",
    ]  # fmt: skip
    common = [
        "--dataset", "d", "--model", "e", "--crop-size", "32,32", "--per-device-batch-size", "4",
        "--max-steps", "2", "--lr", "0.003", "--layer-decay", "0.5", "--warmup-fraction", "0.05",
        "--log-every", "1", "--checkpoint-every", "2", "--keep-last", "1", "--num-workers", "0",
        "--seed", "0", "--plot-curves", "false", "--dataset-name", "synthetic-scenes", "--output-dir", "o",
    ]  # fmt: skip
    segmentation = [
        *common, "--image-column", "image", "--label-column", "annotation", "--decode-head", "linear",
        "--scale-bounds", "32,32", "--scale-range", "0.75,1.5", "--eval-window", "32", "--eval-stride", "32",
    ]  # fmt: skip
    depth = [
        *common, "--image-column", "image", "--depth-column", "depth_map", "--depth-head", "linear",
        "--eigen-crop", "false",
    ]  # fmt: skip
    pairs = [
        (
            parse_config(PretrainConfig, pretrain),
            pretrain_config(s, Path("d"), Path("o"), "m.json", "global", 7),
        ),
        (
            parse_config(FinetuneSegmentationConfig, segmentation),
            segmentation_config(s, Path("d"), "e", Path("o")),
        ),
        (parse_config(FinetuneDepthConfig, depth), depth_config(s, Path("d"), "e", Path("o"))),
    ]
    for parsed, typed in pairs:
        assert type(typed) is type(parsed) and typed == parsed
        assert repr(config_to_dict(typed)) == repr(config_to_dict(parsed))  # same types too (1 vs 1.0)


def test_torch_threads_sets_and_restores_the_thread_count():
    before = torch.get_num_threads()
    with torch_threads(None, num_workers=10**6) as threads:  # more workers than cores: still one thread
        assert threads == 1 == torch.get_num_threads()
    with torch_threads(2, num_workers=0) as threads:
        assert threads == 2 == torch.get_num_threads()
    assert torch.get_num_threads() == before


def test_demo_script_rejects_bad_options_before_rendering(capsys, tmp_path):
    demo = load_script("demo")
    assert demo.main(["--loss", "nope", "--output-dir", str(tmp_path / "demo")]) == 2
    assert "each '+'-joined term must be one of local-global, global, local-local" in capsys.readouterr().err
    assert demo.main(["--image-size", "40", "--output-dir", str(tmp_path / "demo")]) == 2
    assert "multiple of the patch size 16" in capsys.readouterr().err
    assert demo.main(["--quick", "--num-val", "0", "--output-dir", str(tmp_path / "demo")]) == 2
    assert "num_val must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_evaluate_model_on_the_demo_model_uses_its_training_protocol(quick_demo, tmp_path, monkeypatch, task):
    """evaluate_model.py with no protocol option evaluates as the fine-tuning run did: same settings, same
    numbers as the run's own eval_results.json; the report goes under outputs/evaluation, not into final/."""
    from densecl_vit.training.engine.setup import cli_main
    from densecl_vit.training.evaluation.shared import EvaluateConfig

    out, _ = quick_demo
    monkeypatch.chdir(tmp_path)
    argv = ["--task", task, "--model", str(out / task / "final"), "--dataset", str(out / "data"),
            "--num-workers", "0"]  # fmt: skip
    assert cli_main(load_script("evaluate_model").main, EvaluateConfig, argv) == 0
    report = json.loads(next(tmp_path.glob("outputs/evaluation/*/*/eval_results.json")).read_text())
    assert not (out / task / "final" / "eval_results.json").exists()
    run = json.loads((out / task / "eval_results.json").read_text())
    assert report["protocol"] == {"name": "training", **run["protocol"]}
    if task == "segmentation":  # the demo's window and rescale, not ADE20K's 2048 x 512
        assert (report["protocol"]["crop_size"], report["protocol"]["scale_bounds"]) == (32, [32, 32])
    assert report["metrics"] == pytest.approx(run["metrics"], rel=1e-6)
    assert report["num_samples"] == report["examples_seen"] == run["examples_seen"] == QUICK.num_val
    assert report["skipped_by_reason"] == run["skipped_by_reason"] == {}


def test_quick_demo_log_is_quiet_and_lists_what_it_wrote(tmp_path, capfd):
    """No transformers LOAD REPORT (raw colour codes in a log file) nor layer-decay table in the log: the table
    goes to param_groups.txt, named in one line; the "written:" list names the logs and example pictures."""
    assert load_script("demo").main(["--quick", "--output-dir", str(tmp_path / "demo")]) == 0
    out, err = capfd.readouterr()
    log = out + err
    assert "LOAD REPORT" not in log and "\x1b[" not in log and "layer_0_decay" not in log
    for task in ("segmentation", "depth"):
        groups = tmp_path / "demo" / task / "param_groups.txt"
        assert (
            "layer_0_decay" in groups.read_text()
            and f"parameter groups (lr scale, weight decay): {groups}" in log
        )
    assert log.count("newly initialised") == 2  # the scripts' own line on what the encoder did not hold
    paths = json.loads((tmp_path / "demo" / "demo_results.json").read_text())["paths"]
    assert {"pre-training log", "segmentation example", "depth example", "depth log", "results"} <= set(paths)
    assert "pre-training curves" not in paths  # the quick demo draws no curves
    written = out[out.index("written:") :]
    assert all(path in written for path in paths.values())
    # The depth picture: the input and its depth side by side (square images), then the colour bar.
    picture = PIL.Image.open(paths["depth example"])
    assert picture.width > 2 * picture.height
