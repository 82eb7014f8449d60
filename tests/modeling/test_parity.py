"""The encoder is the same network as timm's ViT, transformers' ViTModel and DINO's ViT once weights are converted.

Sizes where timm agrees exactly: timm's `dynamic_img_size` resamples `pos_embed` with `antialias=True`, and
PyTorch's antialiased bicubic uses another kernel (a = -0.5, PIL's) than the plain one (a = -0.75) even when
up-sampling. We resample as transformers, DINO and mmseg do (plain bicubic), so timm matches to float precision
only on its native grid, or at any size once its resampling is run without antialiasing.
"""

import argparse
import functools

import pytest
import timm
import timm.models.vision_transformer as timm_vit
import torch
from transformers import ViTConfig, ViTModel

from densecl_vit import DenseCLViTConfig, DenseCLViTModel
from densecl_vit.training.interop.conversion import (
    densecl_to_hf_vit,
    densecl_to_timm,
    dino_to_densecl,
    hf_vit_to_densecl,
    infer_config,
    resample_position_embeddings,
    timm_to_densecl,
)
from densecl_vit.training.interop.weight_files import load_state_dict_file

ATOL = 1e-5


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter (biases and LayerNorms included) so a wrong mapping cannot hide behind zeros/ones."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


def densecl_from(state_dict: dict, **config_overrides) -> DenseCLViTModel:
    model = DenseCLViTModel(DenseCLViTConfig(**infer_config(state_dict, **config_overrides)))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def timm_tiny():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True)
    return randomize_(model, seed=1)


@pytest.fixture(scope="module")
def converted_tiny(timm_tiny):
    return densecl_from(timm_to_densecl(timm_tiny.state_dict()))


def images(height: int, width: int, batch: int = 1, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_timm_parity_at_native_size(timm_tiny, converted_tiny):
    pixels = images(224, 224)
    expected = timm_tiny.forward_features(pixels)  # (B, 1 + 196, 192) after the final norm
    output = converted_tiny(pixels)
    assert max_diff(output.last_hidden_state[:, 1:], expected[:, 1:]) <= ATOL
    assert max_diff(output.pooler_output, expected[:, 0]) <= ATOL


@torch.no_grad()
def test_timm_parity_at_non_square_size(timm_tiny, converted_tiny, monkeypatch):
    pixels = images(224, 320)  # 14x14 -> 14x20 grid: up-sampling only
    ours = converted_tiny(pixels).last_hidden_state
    assert ours.shape == (1, 1 + 14 * 20, 192)
    plain_bicubic = functools.partial(timm_vit.resample_abs_pos_embed, antialias=False)
    monkeypatch.setattr(timm_vit, "resample_abs_pos_embed", plain_bicubic)
    assert max_diff(ours, timm_tiny.forward_features(pixels)) <= ATOL


def test_timm_default_resampling_is_antialiased_and_differs_off_the_native_grid(timm_tiny):
    pos = timm_tiny.pos_embed.detach()
    for grid in [(14, 20), (20, 20), (10, 10)]:
        ours = resample_position_embeddings(pos, grid)
        assert max_diff(ours, timm_vit.resample_abs_pos_embed(pos, grid, antialias=False)) <= 1e-6
        assert max_diff(ours, timm_vit.resample_abs_pos_embed(pos, grid)) > 1e-3
    assert torch.equal(timm_vit.resample_abs_pos_embed(pos, (14, 14)), resample_position_embeddings(pos, 14))


def test_timm_round_trip_is_exact(timm_tiny):
    original = timm_tiny.state_dict()
    back = densecl_to_timm(timm_to_densecl(original))
    assert list(back) == list(original)
    assert all(torch.equal(back[key], original[key]) for key in original)


def tiny_hf_vit() -> ViTModel:
    config = ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(3)
    return randomize_(ViTModel(config, add_pooling_layer=False), seed=4)


@torch.no_grad()
def test_hf_vit_parity_and_round_trip(tmp_path):
    vit = tiny_hf_vit()
    state_dict = hf_vit_to_densecl(vit.state_dict())
    model = densecl_from(state_dict, num_attention_heads=2, layer_norm_eps=1e-6)
    square, wide = images(32, 32), images(32, 48)
    assert max_diff(model(square).last_hidden_state, vit(square).last_hidden_state) <= ATOL
    # transformers interpolates like us (plain bicubic, align_corners=False), so non-square sizes agree too.
    expected = vit(wide, interpolate_pos_encoding=True).last_hidden_state
    assert max_diff(model(wide).last_hidden_state, expected) <= ATOL

    back = densecl_to_hf_vit(state_dict)
    original = vit.state_dict()
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[key], original[key]) for key in original)

    # The names save_pretrained writes (and Hub checkpoints carry) convert to the same weights.
    vit.save_pretrained(tmp_path / "vit")
    from_file = hf_vit_to_densecl(load_state_dict_file(tmp_path / "vit"))
    assert from_file.keys() == state_dict.keys()
    assert all(torch.equal(from_file[key], state_dict[key]) for key in state_dict)


@torch.no_grad()
def test_dino_training_checkpoint_converts_teacher(timm_tiny, tmp_path):
    backbone = timm_tiny.state_dict()
    head = {"head.mlp.0.weight": torch.randn(32, 192), "head.last_layer.weight_g": torch.ones(64, 1)}
    # The student shares the teacher's tensors (saved once) except its [CLS] token, which tells them apart.
    student = {**backbone, **head, "cls_token": torch.zeros_like(backbone["cls_token"])}
    checkpoint = {
        "teacher": {f"backbone.{k}": v for k, v in {**backbone, **head}.items()},
        "student": {f"module.backbone.{k}": v for k, v in student.items()},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=64),
        "dino_loss": {"center": torch.zeros(1, 64)},
    }
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    state_dict = dino_to_densecl(load_state_dict_file(tmp_path / "checkpoint.pth"))
    assert torch.equal(state_dict["embeddings.cls_token"], backbone["cls_token"])
    model = densecl_from(state_dict)
    pixels = images(224, 224)
    assert max_diff(model(pixels).last_hidden_state, timm_tiny.forward_features(pixels)) <= ATOL


@torch.no_grad()
def test_eager_and_sdpa_attention_agree(tiny, tmp_path):
    torch.manual_seed(5)
    randomize_(DenseCLViTModel(tiny()), seed=6).save_pretrained(tmp_path)
    pixels = images(32, 40, batch=2)
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model = DenseCLViTModel.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert model.config._attn_implementation == implementation
        outputs[implementation] = model(pixels).last_hidden_state
    assert max_diff(outputs["eager"], outputs["sdpa"]) <= ATOL


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_preset_parameter_counts_equal_timm(size):
    with torch.device("meta"):
        ours = DenseCLViTModel(DenseCLViTConfig.from_preset(f"vit-{size}"))
        reference = timm.create_model(f"vit_{size}_patch16_224", pretrained=False, num_classes=0)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    if size == "tiny":
        assert count == 5_524_416


def test_drop_path_rates_follow_a_linear_schedule(tiny):
    model = DenseCLViTModel(tiny(num_hidden_layers=4, drop_path_rate=0.3))
    rates = [getattr(layer.drop_path, "drop_prob", 0.0) for layer in model.encoder.layer]
    assert rates == pytest.approx([0.3 * i / 3 for i in range(4)])
    assert isinstance(model.encoder.layer[0].drop_path, torch.nn.Identity)

    drop_path = model.encoder.layer[3].drop_path.train()
    hidden = torch.ones(2000, 3, 4)
    torch.manual_seed(12)
    dropped = drop_path(hidden)
    kept = dropped.flatten(1).amax(dim=1) > 0
    # Whole samples are zeroed or rescaled by 1 / keep_prob.
    assert torch.equal(dropped[kept], torch.full_like(dropped[kept], 1 / 0.7))
    assert torch.equal(dropped[~kept], torch.zeros_like(dropped[~kept]))
    assert abs(kept.float().mean().item() - 0.7) < 0.05
    assert torch.equal(drop_path.eval()(hidden), hidden)


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    torch.manual_seed(7)
    model = randomize_(DenseCLViTModel(tiny(drop_path_rate=0.5)), seed=8).train()
    pixels = images(32, 32, batch=4)

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(9)  # the same drop-path masks in both runs
        model(pixels).last_hidden_state.square().mean().backward()
        return {name: param.grad.clone() for name, param in model.named_parameters()}

    plain = gradients()
    model.gradient_checkpointing_enable()
    assert model.encoder.gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    assert max(max_diff(plain[name], checkpointed[name]) for name in plain) <= 1e-6


@torch.no_grad()
def test_hidden_states_are_embeddings_then_every_block(tiny):
    torch.manual_seed(10)
    model = randomize_(DenseCLViTModel(tiny(num_hidden_layers=3)), seed=11)
    pixels = images(32, 24)
    output = model(pixels, output_hidden_states=True)
    assert len(output.hidden_states) == model.config.num_hidden_layers + 1
    assert torch.equal(output.hidden_states[0], model.embeddings(pixels))
    assert torch.equal(model.layernorm(output.hidden_states[-1]), output.last_hidden_state)
