"""scripts/evaluate_model.py on saved segmentation and depth folders: the report it writes, its defaults, and
the folders it refuses."""

import importlib.util
import json

import pytest
import torch
from accelerate import Accelerator, debug_launcher
from accelerate.state import AcceleratorState
from helpers import SCRIPTS, SEG_CLASSES, save_encoder, write_depth_dataset, write_segmentation_dataset

from densecl_vit.hub_cards.cards import load_eval_results
from densecl_vit.modeling import (
    DenseCLViTForDepthEstimation,
    DenseCLViTForSemanticSegmentation,
    DenseCLViTImageProcessor,
)
from densecl_vit.training.engine.setup import cli_main
from densecl_vit.training.evaluation.shared import EvaluateConfig, open_eval_source
from densecl_vit.training.tasks import depth, segmentation

spec = importlib.util.spec_from_file_location("evaluate_model", SCRIPTS / "evaluate_model.py")
evaluate_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluate_model)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("evaluate")
    names = {int(k): v for k, v in SEG_CLASSES.items()}
    torch.manual_seed(0)
    seg = tiny(num_labels=3, id2label=names, label2id={v: k for k, v in names.items()}, decode_head="upernet")
    DenseCLViTForSemanticSegmentation(seg).save_pretrained(root / "seg")
    DenseCLViTForDepthEstimation(tiny(max_depth=8.0)).save_pretrained(root / "depth")
    dpt = tiny(max_depth=8.0, depth_head="dpt", dpt_fusion_hidden_size=16, dpt_head_hidden_size=8)
    DenseCLViTForDepthEstimation(dpt).save_pretrained(root / "dpt")
    for name in ("seg", "depth", "dpt"):
        DenseCLViTImageProcessor(size={"height": 32, "width": 32}, size_divisor=8).save_pretrained(
            root / name
        )
    return {
        "root": root,
        "seg": root / "seg",
        "depth": root / "depth",
        "dpt": root / "dpt",
        "encoder": save_encoder(root / "encoder"),
        "seg_data": write_segmentation_dataset(root / "seg_data", num_train=1, num_val=3, size=40),
        "depth_data": write_depth_dataset(root / "depth_data", num_train=1, num_val=3, png_millimetres=True),
    }


def test_segmentation_folder_report_in_output_dir_and_next_to_the_model_when_asked(folders, tmp_path, capsys):
    argv = ["--task", "segmentation", "--model", str(folders["seg"]), "--dataset", str(folders["seg_data"]),
            "--num-workers", "0", "--scale-bounds", "80,40", "--output-dir", str(tmp_path)]  # fmt: skip
    assert cli_main(evaluate_model.main, EvaluateConfig, argv) == 0
    assert not (folders["seg"] / "eval_results.json").exists()
    assert "evaluate: 3image" in capsys.readouterr().err.replace("\r", "\n")  # the progress bar's last state
    assert cli_main(evaluate_model.main, EvaluateConfig, [*argv, "--write-model-card-results"]) == 0
    assert (tmp_path / "eval_results.json").read_text() == (folders["seg"] / "eval_results.json").read_text()
    report = load_eval_results(folders["seg"] / "eval_results.json")
    assert (report.task, report.num_samples, report.dataset_split) == (
        "semantic-segmentation",
        3,
        "validation",
    )
    # No training config beside the model: ADE20K, whose window is the model's image size, the stride 2/3 of it.
    assert (report.protocol["name"], report.protocol["crop_size"], report.protocol["stride"]) == (
        "ade20k",
        32,
        21,
    )
    written = json.loads((folders["seg"] / "eval_results.json").read_text())
    assert written["per_category"]["labels"] == list(SEG_CLASSES.values())

    cfg = EvaluateConfig(
        task="segmentation", model=str(folders["seg"]), dataset=str(folders["seg_data"]), num_workers=0
    )
    model = DenseCLViTForSemanticSegmentation.from_pretrained(folders["seg"])
    source = open_eval_source(cfg, "validation", segmentation.resolve_columns, None)
    protocol = segmentation.SegmentationProtocol(32, 21, (80, 40))
    direct = segmentation.evaluation_report(model, source, Accelerator(cpu=True), protocol)
    assert direct["metrics"] == pytest.approx(report.metrics)


@pytest.mark.parametrize("head", ["depth", "dpt"])
def test_depth_folder_report_in_output_dir_from_16_bit_pngs(folders, tmp_path, head):
    argv = ["--task", "depth", "--model", str(folders[head]), "--dataset", str(folders["depth_data"]),
            "--depth-scale", "1e-3", "--num-workers", "0", "--output-dir", str(tmp_path), "--max-samples", "2"]  # fmt: skip
    assert cli_main(evaluate_model.main, EvaluateConfig, argv) == 0
    assert not (folders[head] / "eval_results.json").exists()
    report = load_eval_results(tmp_path / "eval_results.json")
    assert (report.task, report.num_samples) == ("depth-estimation", 2)
    assert sorted(report.metrics) == sorted(depth.DEPTH_METRICS)
    assert report.protocol["max_depth"] == 8.0 and report.protocol["eigen_crop"] is False


def test_refuses_a_folder_without_a_trained_head_and_bad_options(folders, capsys):
    argv = [
        "--task",
        "segmentation",
        "--model",
        str(folders["encoder"]),
        "--dataset",
        str(folders["seg_data"]),
    ]
    assert cli_main(evaluate_model.main, EvaluateConfig, argv) == 2
    assert "holds no trained DenseCLViTForSemanticSegmentation" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:
        cli_main(evaluate_model.main, EvaluateConfig, [*argv, "--window", "16", "--stride", "32"])
    assert bad.value.code == 2
    with pytest.raises(SystemExit):
        cli_main(
            evaluate_model.main,
            EvaluateConfig,
            ["--task", "depth", "--model", "owner/name", "--dataset", "x", "--write-model-card-results"],
        )
    assert "--write-model-card-results needs a local --model folder" in capsys.readouterr().err
    for protocol, message in (("ade20k", "not a depth protocol"), ("training", "needs the config.yaml")):
        with pytest.raises(SystemExit):
            cli_main(
                evaluate_model.main,
                EvaluateConfig,
                [
                    "--task",
                    "depth",
                    "--model",
                    str(folders["depth"]),
                    "--dataset",
                    "x",
                    "--protocol",
                    protocol,
                ],
            )
        assert message in capsys.readouterr().err


def _evaluate_on_every_rank(argv: list[str]) -> None:
    import fsspec.asyn

    # debug_launcher forks this test process, which has streamed data already: the child drops the fsspec
    # event-loop lock it inherits (held by a thread the fork does not copy), as forked DataLoader workers do in
    # `StreamingSamples`. `accelerate launch` starts fresh processes, so the evaluation code needs no reset.
    fsspec.asyn.reset_lock()
    AcceleratorState._reset_state(reset_partial_state=True)
    status = cli_main(evaluate_model.main, EvaluateConfig, argv)
    if status != 0:
        raise RuntimeError(f"evaluation exited with status {status}")


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_two_processes_report_what_one_process_reports(folders, tmp_path, task):
    """Each process evaluates its share; confusion matrices are summed and per-image depth errors gathered."""
    name = "seg" if task == "segmentation" else "depth"
    argv = ["--task", task, "--model", str(folders[name]), "--dataset", str(folders[f"{name}_data"]),
            "--num-workers", "0", "--depth-scale", "1e-3", "--scale-bounds", "80,40"]  # fmt: skip
    assert cli_main(evaluate_model.main, EvaluateConfig, [*argv, "--output-dir", str(tmp_path / "one")]) == 0
    debug_launcher(
        _evaluate_on_every_rank, args=([*argv, "--output-dir", str(tmp_path / "two")],), num_processes=2
    )
    one, two = (load_eval_results(tmp_path / run / "eval_results.json") for run in ("one", "two"))
    assert one.num_samples == two.num_samples == 3
    counts = [
        json.loads((tmp_path / run / "eval_results.json").read_text())["examples_seen"]
        for run in ("one", "two")
    ]
    assert counts == [3, 3]  # each process read its share; the report sums them
    assert two.metrics == pytest.approx(one.metrics)


def test_training_protocol_comes_from_the_runs_config(folders, tmp_path):
    """The run's config.yaml above final/ names the protocol; a config of the other task is refused."""
    seg_settings = segmentation.training_settings(
        {"crop_size": [48, 48], "decode_head": "linear", "scale_bounds": [64, 48], "eval_window": None}
    )
    assert seg_settings == {
        "window": 48,
        "stride": 32,
        "scale_bounds": (64, 48),
        "reduce_labels": True,
        "ignore_index": None,
    }
    depth_settings = depth.training_settings({"depth_head": "linear", "dataset": "sayakpaul/nyu_depth_v2"})
    assert depth_settings == {"eigen_crop": True, "eval_size": None, "depth_scale": 1.0}
    with pytest.raises(ValueError, match="no depth fine-tuning config; use --protocol nyu"):
        depth.training_settings({"decode_head": "linear", "crop_size": [32, 32]})

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    for path in folders["seg"].iterdir():
        (run / "final" / path.name).write_bytes(path.read_bytes())
    (run / "config.yaml").write_text(
        "crop_size: [32, 32]\ndecode_head: upernet\neval_stride: 8\nscale_bounds: [80, 40]\n"
    )
    argv = ["--task", "segmentation", "--model", str(run / "final"), "--dataset", str(folders["seg_data"]),
            "--num-workers", "0", "--output-dir", str(tmp_path / "eval"), "--progress", "false"]  # fmt: skip
    assert cli_main(evaluate_model.main, EvaluateConfig, argv) == 0
    protocol = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["protocol"]
    assert (protocol["name"], protocol["crop_size"], protocol["stride"], protocol["scale_bounds"]) == (
        "training",
        32,
        8,
        [80, 40],
    )
    # ADE20K by name, one setting overridden (its 2048 x 512 rescale would make this test slow).
    ade20k = [*argv, "--protocol", "ade20k", "--scale-bounds", "64,32"]
    assert cli_main(evaluate_model.main, EvaluateConfig, ade20k) == 0
    protocol = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["protocol"]
    assert (protocol["name"], protocol["crop_size"], protocol["stride"], protocol["scale_bounds"]) == (
        "ade20k",
        32,
        21,
        [64, 32],
    )
