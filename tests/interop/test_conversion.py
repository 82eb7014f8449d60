"""Checkpoint recognition, refusals, safe loading, position-embedding resampling and the conversion CLI."""

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from transformers import ViTConfig, ViTModel

from densecl_vit import DenseCLViTConfig, DenseCLViTImageProcessor, DenseCLViTModel
from densecl_vit.training.interop.conversion import (
    densecl_to_timm,
    dino_to_densecl,
    guess_format,
    hf_vit_to_densecl,
    infer_config,
    resample_position_embeddings,
    resize_to_image_size,
    timm_to_densecl,
)
from densecl_vit.training.interop.weight_files import load_state_dict_file

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "convert_checkpoint.py"
IMPORTERS = {"timm": timm_to_densecl, "hf-vit": hf_vit_to_densecl, "dino": dino_to_densecl}


class RunsCode:
    """A pickle that would touch `marker` when unpickled: proof that nothing ran if the file stays absent."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class NotATensor:
    """A custom class: a pickle holding one must not be unpickled."""

    def __init__(self, value: int = 1):
        self.value = value


def load_script():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cli():
    return load_script()


@pytest.fixture(scope="module")
def timm_model():
    """A tiny timm ViT (image 32, patch 8, width 64, 2 blocks, 2 heads) with a 10-class head, random weights."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def hf_state_dict() -> dict:
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    return {f"vit.{k}": v for k, v in ViTModel(config).state_dict().items()}


def assert_one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


@pytest.mark.parametrize("fmt", sorted(IMPORTERS))
def test_unrecognised_checkpoint_is_refused(fmt):
    with pytest.raises(ValueError) as error:
        IMPORTERS[fmt]({"foo.weight": torch.zeros(2), "bar": torch.zeros(1)})
    message = assert_one_line(error)
    assert "unexpected keys [foo.weight, bar]" in message and "missing keys [" in message
    assert "--from" not in message  # nothing looks right


@pytest.mark.parametrize(
    ("fmt", "checkpoint", "suggestion"),
    [
        ("timm", "hf", "looks like a transformers ViT checkpoint: use --from hf-vit"),
        ("hf-vit", "timm", "looks like a timm ViT checkpoint: use --from timm"),
        ("timm", "dino", "looks like a DINO checkpoint: use --from dino"),
        ("timm", "densecl", "load it with DenseCLViTModel.from_pretrained"),
    ],
)
def test_wrong_format_suggests_the_right_one(fmt, checkpoint, suggestion, timm_model, tiny):
    checkpoints = {
        "hf": hf_state_dict,
        "timm": timm_model.state_dict,
        "dino": lambda: {
            "teacher": {f"backbone.{k}": v for k, v in timm_model.state_dict().items()},
            "epoch": 1,
        },
        "densecl": lambda: DenseCLViTModel(tiny()).state_dict(),
    }
    with pytest.raises(ValueError) as error:
        IMPORTERS[fmt](checkpoints[checkpoint]())
    assert suggestion in assert_one_line(error)


def test_guess_format_and_dropped_heads(timm_model, caplog):
    hf = hf_state_dict()
    assert guess_format(hf) == "hf-vit" and guess_format(timm_model.state_dict()) == "timm"
    assert guess_format({"student": {}}) == "dino" and guess_format({"x": torch.zeros(1)}) is None
    with caplog.at_level("WARNING"):
        converted = hf_vit_to_densecl(hf)
    assert "pooler.dense.weight" in caplog.text and not any("pooler" in k for k in converted)
    assert "encoder.layer.0.attention.qkv.weight" in converted


def test_missing_block_key_is_named(timm_model):
    state_dict = dict(timm_model.state_dict())
    del state_dict["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing keys \[blocks\.1\.mlp\.fc2\.bias\]"):
        timm_to_densecl(state_dict)


def test_pickle_with_custom_object_is_refused(tmp_path):
    torch.save({"weight": torch.ones(2), "extra": NotATensor()}, tmp_path / "unsafe.pth")
    with pytest.raises(ValueError) as error:
        load_state_dict_file(tmp_path / "unsafe.pth")
    message = assert_one_line(error)
    assert "NotATensor" in message and "safetensors" in message and "weights_only=False" not in message


def test_malicious_pickle_is_refused_in_one_line_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"weight": torch.ones(2), "payload": RunsCode(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError) as error:
        load_state_dict_file(tmp_path / "evil.pth")
    message = assert_one_line(error)
    assert "posix.system" in message and "evil.pth" in message and "convert_checkpoint.py" in message
    assert "weights_only" not in message  # torch's advice to retry with weights_only=False is not passed on
    assert not marker.exists()


def test_dino_args_namespace_and_safetensors_load(tmp_path):
    torch.save({"teacher": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "dino.pth")
    assert torch.equal(load_state_dict_file(tmp_path / "dino.pth")["teacher"]["w"], torch.ones(2))
    save_file({"w": torch.arange(3.0)}, tmp_path / "w.safetensors")
    assert torch.equal(load_state_dict_file(tmp_path / "w.safetensors")["w"], torch.arange(3.0))
    (tmp_path / "weights.npz").write_bytes(b"0")
    (tmp_path / "garbage.pth").write_bytes(b"not a pickle")
    for bad, reason in [
        ("missing.pth", "does not exist"),
        ("weights.npz", "unknown"),
        ("garbage.pth", "Unsupported operand"),
    ]:
        with pytest.raises(ValueError, match=reason) as error:
            load_state_dict_file(tmp_path / bad)
        assert_one_line(error)


def test_resample_position_embeddings_shape_identity_and_cls():
    pos = torch.randn(1, 1 + 4 * 4, 8)
    assert resample_position_embeddings(pos, 4) is pos
    wide = resample_position_embeddings(pos, (6, 10))
    assert wide.shape == (1, 1 + 60, 8) and torch.equal(wide[:, 0], pos[:, 0])
    # Bicubic weights sum to one: a constant field stays constant.
    constant = resample_position_embeddings(torch.full((1, 1 + 9, 2), 0.25), (5, 7))
    assert torch.allclose(constant, torch.full_like(constant, 0.25), atol=1e-6)
    # Half precision in, half precision out, computed in float32.
    half = resample_position_embeddings(pos.to(torch.bfloat16), (6, 10))
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, resample_position_embeddings(pos.to(torch.bfloat16).float(), (6, 10)).bfloat16())
    with pytest.raises(ValueError, match="square"):
        resample_position_embeddings(torch.randn(1, 1 + 12, 8), 4)


@torch.no_grad()
def test_converted_grid_equals_run_time_interpolation(tiny):
    """A checkpoint resampled to 48x48 gives what the 32x32 model computes at 48x48."""
    torch.manual_seed(1)
    model = DenseCLViTModel(tiny()).eval()
    with torch.no_grad():
        model.embeddings.position_embeddings.normal_()
    resized = resize_to_image_size(model.state_dict(), 48)
    bigger = DenseCLViTModel(DenseCLViTConfig(**infer_config(resized, num_attention_heads=2))).eval()
    bigger.load_state_dict(resized)
    pixels = torch.randn(1, 3, 48, 48)
    assert torch.allclose(bigger(pixels).last_hidden_state, model(pixels).last_hidden_state, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        resize_to_image_size(model.state_dict(), 50)


@pytest.mark.parametrize(("size", "heads"), [("tiny", 3), ("small", 6), ("base", 12)])
def test_infer_config_reads_presets(size, heads):
    config = DenseCLViTConfig.from_preset(f"vit-{size}")
    with torch.device("meta"):
        state_dict = DenseCLViTModel(config).state_dict()
    inferred = infer_config(state_dict)
    assert inferred["num_attention_heads"] == heads == config.num_attention_heads
    for key in ("hidden_size", "num_hidden_layers", "mlp_ratio", "image_size", "patch_size", "qkv_bias"):
        assert inferred[key] == getattr(config, key)
    assert infer_config(state_dict, num_attention_heads=4, hidden_act=None)["num_attention_heads"] == 4
    with pytest.raises(ValueError, match="resample them first"):
        infer_config(state_dict, image_size=384)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@torch.no_grad()
def test_cli_imports_timm_safetensors_in_a_subprocess(timm_model, tmp_path):
    save_file(timm_model.state_dict(), tmp_path / "vit.safetensors")
    result = run_cli("--from", "timm", "--checkpoint", str(tmp_path / "vit.safetensors"), "--output",
                     str(tmp_path / "out"), "--num-heads", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "dropped 2 keys" in result.stderr  # the 10-class head
    model = DenseCLViTModel.from_pretrained(tmp_path / "out").eval()
    processor = DenseCLViTImageProcessor.from_pretrained(tmp_path / "out")
    assert processor.size == {"height": 32, "width": 32} and processor.size_divisor == 8
    pixels = torch.randn(2, 3, 32, 32)
    expected = timm_model.forward_features(pixels)
    assert (model(pixels).last_hidden_state - expected).abs().max() <= 1e-5


def test_cli_error_is_one_line_with_exit_status_2(cli, timm_model, tmp_path, capsys):
    save_file(timm_model.state_dict(), tmp_path / "vit.safetensors")
    args = ["--checkpoint", str(tmp_path / "vit.safetensors"), "--output", str(tmp_path / "out")]
    assert cli.main(["--from", "hf-vit", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: not a transformers ViT checkpoint")
    assert "use --from timm" in lines[0] and not (tmp_path / "out").exists()
    assert cli.main(["--from", "timm", *args, "--num-heads", "3"]) == 2  # 64 is not divisible by 3
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: hidden_size (64) must be divisible by num_attention_heads (3); pick a head count that divides the width."
    ]


@torch.no_grad()
def test_cli_pth_import_with_image_size_and_export_back(cli, timm_model, tmp_path, capsys):
    torch.save(timm_model.state_dict(), tmp_path / "vit.pth")
    folder = tmp_path / "densecl"
    args = ["--checkpoint", str(tmp_path / "vit.pth"), "--output", str(folder), "--num-heads", "2"]
    assert cli.main(["--from", "timm", *args, "--image-size", "48", "--image-mean", "0.5", "0.5", "0.5"]) == 0
    model = DenseCLViTModel.from_pretrained(folder).eval()
    assert model.config.image_size == 48 and model.config.num_attention_heads == 2
    assert DenseCLViTImageProcessor.from_pretrained(folder).image_mean == [0.5, 0.5, 0.5]

    assert (
        cli.main(
            ["--to", "timm", "--checkpoint", str(folder), "--output", str(tmp_path / "back.safetensors")]
        )
        == 0
    )
    back = load_file(tmp_path / "back.safetensors")
    original = {k: v for k, v in timm_model.state_dict().items() if not k.startswith("head.")}
    assert back.keys() == original.keys()
    resampled = resample_position_embeddings(original["pos_embed"], 6)
    assert all(torch.equal(back[k], resampled if k == "pos_embed" else original[k]) for k in original)
    assert json.loads((folder / "config.json").read_text())["image_size"] == 48

    # A model folder round-trips to timm exactly when no resampling is asked for.
    assert (
        cli.main(["--from", "timm", "--checkpoint", str(tmp_path / "vit.pth"), "--output", str(folder)]) == 0
    )
    assert (
        cli.main(
            ["--to", "timm", "--checkpoint", str(folder), "--output", str(tmp_path / "same.safetensors")]
        )
        == 0
    )
    same = load_file(tmp_path / "same.safetensors")
    assert all(torch.equal(same[k], original[k]) for k in original)

    assert cli.main(["--to", "timm", "--checkpoint", str(folder), "--output", str(tmp_path / "x.pth")]) == 2
    assert cli.main(["--to", "timm", "--checkpoint", str(folder), "--output", "x", "--image-size", "64"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in errors[-2:]] == ["error", "error"]


@torch.no_grad()
def test_cli_exports_a_transformers_vit_folder(cli, tiny, tmp_path):
    torch.manual_seed(2)
    model = DenseCLViTModel(tiny(layer_norm_eps=1e-12)).eval()
    model.save_pretrained(tmp_path / "densecl")
    assert (
        cli.main(
            ["--to", "hf-vit", "--checkpoint", str(tmp_path / "densecl"), "--output", str(tmp_path / "hf")]
        )
        == 0
    )
    assert not any(key.startswith("pooler.") for key in load_file(tmp_path / "hf" / "model.safetensors"))
    vit = ViTModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval()
    assert vit.config.layer_norm_eps == 1e-12
    pixels = torch.randn(1, 3, 32, 40)
    expected = model(pixels).last_hidden_state
    assert (vit(pixels, interpolate_pos_encoding=True).last_hidden_state - expected).abs().max() <= 1e-5
    # ...and back, reading heads and LayerNorm eps from its config.json.
    assert (
        cli.main(
            ["--from", "hf-vit", "--checkpoint", str(tmp_path / "hf"), "--output", str(tmp_path / "again")]
        )
        == 0
    )
    again = DenseCLViTModel.from_pretrained(tmp_path / "again").eval()
    assert again.config.num_attention_heads == 2 and again.config.layer_norm_eps == 1e-12
    assert torch.equal(again(pixels).last_hidden_state, expected)


def test_image_size_not_multiple_of_patch_fails_at_forward_in_one_line(tiny):
    model = DenseCLViTModel(tiny()).eval()
    with pytest.raises(ValueError) as error:
        model(torch.randn(1, 3, 33, 32))
    message = assert_one_line(error)
    assert "33x32" in message and "multiple of the patch size 8" in message
    assert math.isfinite(model(torch.randn(1, 3, 40, 16)).last_hidden_state.sum().item())


def test_export_strips_task_model_prefix_and_heads(tiny, caplog):
    encoder = DenseCLViTModel(tiny()).state_dict()
    task = {
        **{f"densecl_vit.{k}": v for k, v in encoder.items()},
        "decode_head.classifier.weight": torch.zeros(3),
    }
    with caplog.at_level("WARNING"):
        exported = densecl_to_timm(task)
    assert "decode_head.classifier.weight" in caplog.text
    assert torch.equal(exported["blocks.1.attn.qkv.weight"], encoder["encoder.layer.1.attention.qkv.weight"])
    assert len(exported) == len(encoder)


def test_cli_reads_normalisation_from_a_timm_hub_folder(cli, timm_model, tmp_path):
    folder = tmp_path / "timm-folder"
    folder.mkdir()
    save_file(timm_model.state_dict(), folder / "model.safetensors")
    pretrained_cfg = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    (folder / "config.json").write_text(
        json.dumps({"architecture": "vit_tiny", "pretrained_cfg": pretrained_cfg})
    )
    args = [
        "--from",
        "timm",
        "--checkpoint",
        str(folder),
        "--output",
        str(tmp_path / "out"),
        "--num-heads",
        "2",
    ]
    assert cli.main([*args, "--image-std", "0.25", "0.25", "0.25"]) == 0
    processor = DenseCLViTImageProcessor.from_pretrained(tmp_path / "out")
    assert processor.image_mean == [0.5, 0.5, 0.5] and processor.image_std == [0.25, 0.25, 0.25]
