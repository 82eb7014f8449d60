"""Every command-line script ends in one `error:` line on stderr and exit status 2, never a traceback, when its
model folder is empty or holds the wrong kind of model, when a Hub push fails, or when a file cannot be read.
The scripts run in this process (`load_script`), as `python scripts/NAME.py` would run them."""

import argparse
import dataclasses
import os

import numpy as np
import PIL.Image
import pytest
import torch
from helpers import load_script, save_encoder, write_segmentation_dataset
from huggingface_hub.errors import HfHubHTTPError

from densecl_vit.modeling import DenseCLViTForSemanticSegmentation, DenseCLViTImageProcessor
from densecl_vit.training.engine.exits import exit_status


def _training_cli(name: str, config: str):
    """A training script's entry point: the `cli_main(main, Config)` its `__main__` block runs."""
    module = load_script(name)
    return lambda argv: module.cli_main(module.main, getattr(module, config), argv)


def _exit_status(entry, argv) -> int:
    try:
        return entry(argv)
    except SystemExit as stop:  # argparse-level refusals exit instead of returning
        return stop.code


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("cli")
    (root / "empty").mkdir()
    PIL.Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(root / "photo.png")
    (root / "broken.png").write_bytes(b"not a picture")
    (root / "broken.safetensors").write_bytes(b"not a checkpoint")
    seg = DenseCLViTForSemanticSegmentation(tiny(num_labels=3))
    seg.save_pretrained(root / "seg")
    DenseCLViTImageProcessor(size={"height": 32, "width": 32}, size_divisor=8).save_pretrained(root / "seg")
    return argparse.Namespace(
        root=root,
        empty=root / "empty",
        encoder=save_encoder(root / "encoder"),
        seg=root / "seg",
        data=write_segmentation_dataset(root / "data", num_train=2, num_val=1),
        photo=root / "photo.png",
        broken=root / "broken.png",
        broken_checkpoint=root / "broken.safetensors",
    )


def _cases():
    """(script, entry point, argv of a model folder MODEL) of every script that reads a model folder."""
    evaluate = _training_cli("evaluate_model", "EvaluateConfig")
    finetune = {
        name: _training_cli(f"finetune_{name}", config)
        for name, config in (("segmentation", "FinetuneSegmentationConfig"), ("depth", "FinetuneDepthConfig"))
    }
    common = ["--max-steps", "1", "--num-workers", "0", "--crop-size", "32,32", "--eval-split", "none"]
    return {
        "evaluate_model": (
            evaluate,
            [
                "--task",
                "segmentation",
                "--model",
                "MODEL",
                "--dataset",
                "DATA",
                "--num-workers",
                "0",
                "--output-dir",
                "OUT",
            ],
        ),  # fmt: skip
        "predict": (load_script("predict").main, ["--model", "MODEL", "PHOTO", "--output-dir", "OUT"]),
        "visualize_features": (
            load_script("visualize_features").main,
            ["--model", "MODEL", "PHOTO", "--output", "OUT/features.png"],
        ),
        "export_to_hub": (load_script("export_to_hub").main, ["--model", "MODEL", "--output", "OUT"]),
        "convert_checkpoint": (
            load_script("convert_checkpoint").main,
            ["--to", "timm", "--checkpoint", "MODEL", "--output", "OUT/vit.safetensors"],
        ),
        "finetune_segmentation": (
            finetune["segmentation"],
            ["--dataset", "DATA", "--model", "MODEL", "--output-dir", "OUT", *common],
        ),
        "finetune_depth": (
            finetune["depth"],
            ["--dataset", "DATA", "--model", "MODEL", "--output-dir", "OUT", *common],
        ),
    }


CASES = _cases()
# The wrong kind of folder: an encoder where a task model is needed (the other scripts take any DenseCL-ViT model).
WRONG_KIND = {"evaluate_model": "encoder", "predict": "encoder"}


def _check_one_error_line(capsys, status) -> str:
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def _argv(argv, model, inputs, tmp_path):
    swap = {"MODEL": str(model), "DATA": str(inputs.data), "PHOTO": str(inputs.photo), "OUT": str(tmp_path)}
    return [swap.get(arg, arg.replace("OUT", str(tmp_path))) for arg in argv]


@pytest.mark.parametrize("script", sorted(CASES))
def test_an_empty_model_folder_is_one_error_line(script, inputs, tmp_path, capsys):
    entry, argv = CASES[script]
    status = _exit_status(entry, _argv(argv, inputs.empty, inputs, tmp_path))
    assert str(inputs.empty) in _check_one_error_line(capsys, status)


@pytest.mark.parametrize("script", sorted(WRONG_KIND))
def test_a_model_of_the_wrong_kind_is_one_error_line(script, inputs, tmp_path, capsys):
    entry, argv = CASES[script]
    status = _exit_status(entry, _argv(argv, getattr(inputs, WRONG_KIND[script]), inputs, tmp_path))
    _check_one_error_line(capsys, status)


def test_a_failed_push_is_one_error_line(inputs, tmp_path, capsys):
    class RefusingApi:
        def create_repo(self, repo_id, **kwargs):
            raise ConnectionError("403 Forbidden: you have no write access\nto my-org/seg")

    assert issubclass(HfHubHTTPError, OSError)  # what huggingface_hub raises for a refused request
    argv = [
        "--model",
        str(inputs.seg),
        "--output",
        str(tmp_path / "rel"),
        "--push",
        "--repo-id",
        "my-org/seg",
    ]
    status = load_script("export_to_hub").main([*argv, "--no-example"], api=RefusingApi())
    assert "403 Forbidden" in _check_one_error_line(capsys, status)


@pytest.mark.parametrize(
    "script, argv",
    [
        ("export_to_hub", ["--model", "SEG", "--output", "OUT/rel", "--example-image", "BROKEN"]),
        (
            "convert_checkpoint",
            ["--from", "timm", "--checkpoint", "BROKEN_CHECKPOINT", "--output", "OUT/vit"],
        ),
        ("plot_metrics", ["BROKEN", "--output", "OUT/curves.png"]),
    ],
)
def test_an_unreadable_file_is_one_error_line(script, argv, inputs, tmp_path, capsys):
    swap = {"SEG": inputs.seg, "BROKEN": inputs.broken, "BROKEN_CHECKPOINT": inputs.broken_checkpoint}
    argv = [str(swap.get(arg, arg.replace("OUT", str(tmp_path)))) for arg in argv]
    status = _exit_status(load_script(script).main, argv)
    assert "broken" in _check_one_error_line(capsys, status)  # the message names the file


class _Parsed(Exception):
    """Raised instead of parsing, to hand the test the parser a script built."""


ARGPARSE_SCRIPTS = {
    "demo": [],
    "predict": ["--model", "m", "x.png", "--output-dir", "o"],
    "visualize_features": ["--model", "m", "x.png", "--output", "o.png"],
    "export_to_hub": ["--model", "m", "--output", "o"],
    "convert_checkpoint": ["--to", "timm", "--checkpoint", "m", "--output", "o"],
    "plot_metrics": ["run"],
    "make_synthetic_scenes": ["--output", "o", "--num-train", "1"],
    "study": [],
    "benchmark": [],
}
CONFIG_SCRIPTS = {
    "pretrain": "PretrainConfig",
    "finetune_segmentation": "FinetuneSegmentationConfig",
    "finetune_depth": "FinetuneDepthConfig",
    "evaluate_model": "EvaluateConfig",
}


@pytest.mark.parametrize("script", sorted(ARGPARSE_SCRIPTS))
def test_every_option_of_an_argparse_script_has_help(script, monkeypatch):
    def capture(parser, *args, **kwargs):
        raise _Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    module = load_script(script)
    with pytest.raises(_Parsed) as parsed:
        (getattr(module, "parse_args", None) or module.main)(ARGPARSE_SCRIPTS[script])
    actions = [a for a in parsed.value.args[0]._actions if not isinstance(a, argparse._HelpAction)]
    assert actions and not [a.dest for a in actions if not (a.help or "").strip()]


@pytest.mark.parametrize("script", sorted(CONFIG_SCRIPTS))
def test_every_option_of_a_config_script_has_help(script):
    cls = getattr(load_script(script), CONFIG_SCRIPTS[script])
    fields = dataclasses.fields(cls)
    assert fields and not [f.name for f in fields if not f.metadata.get("help", "").strip()]


def test_every_cli_refuses_an_unsafe_pickle_in_one_line(tmp_path, capsys):
    """A pickle torch.load(weights_only=True) refuses, wherever a script meets it, ends in the same one line."""

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    evil = tmp_path / "pytorch_model.bin"
    torch.save({"payload": RunsCode()}, evil)
    assert exit_status(lambda: torch.load(evil, weights_only=True)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: refused to load") and str(evil) in err
    assert "posix.system" in err and "safetensors" in err and "weights_only" not in err
    assert not (tmp_path / "ran").exists()
