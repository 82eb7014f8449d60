"""The encoder behaves like transformers' own models: activation checkpointing per layer, attention switched at
run time, outputs recorded by hooks."""

import pytest
import torch

from densecl_vit import DenseCLViTForDepthEstimation, DenseCLViTForSemanticSegmentation, DenseCLViTModel


def _randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def _pixels(batch: int = 2, height: int = 32, width: int = 40) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(3))


def _count_layer_calls(model: DenseCLViTModel) -> list[int]:
    """Per-layer call counters on each block's first module: its pre-hook fires again when the block is recomputed
    (the recompute starts at the block's input and may stop early, so a later module would not always run)."""
    counts = [0] * len(model.encoder.layer)
    for i, layer in enumerate(model.encoder.layer):

        def hook(module, args, i=i):
            counts[i] += 1

        layer.norm1.register_forward_pre_hook(hook)
    return counts


def _backward_recomputes(
    model: DenseCLViTModel, pixels: torch.Tensor
) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Which layers run again during backward, and the gradients."""
    counts = _count_layer_calls(model)
    model.zero_grad()
    loss = model(pixels).last_hidden_state.square().mean()
    after_forward = list(counts)
    loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    return [c - f for c, f in zip(counts, after_forward)], grads


@pytest.mark.parametrize(
    "every_n_layers, expected", [(1, [1, 1, 1, 1]), (2, [1, 0, 1, 0]), (3, [1, 0, 0, 1])]
)
def test_gradient_checkpointing_recomputes_only_the_selected_layers(tiny, every_n_layers, expected):
    torch.manual_seed(0)
    model = _randomized(DenseCLViTModel(tiny(num_hidden_layers=4)), seed=1).train()
    pixels = _pixels()
    plain_recomputes, plain = _backward_recomputes(model, pixels)
    assert plain_recomputes == [0, 0, 0, 0]

    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every_n_layers
    )
    recomputes, checkpointed = _backward_recomputes(model, pixels)
    assert recomputes == expected
    assert max((plain[name] - checkpointed[name]).abs().max().item() for name in plain) <= 1e-6


def test_gradient_checkpointing_passes_its_options_to_checkpoint(tiny):
    """`gradient_checkpointing_kwargs` reach torch's checkpoint: a `context_fn` there runs once per layer forward."""
    from contextlib import nullcontext

    calls = []

    def context_fn():
        calls.append(1)
        return nullcontext(), nullcontext()

    model = DenseCLViTModel(tiny(num_hidden_layers=2)).train()
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": context_fn}
    )
    model(_pixels()).last_hidden_state.sum().backward()
    assert len(calls) == 2
    model.gradient_checkpointing_disable()
    calls.clear()
    model(_pixels()).last_hidden_state.sum().backward()
    assert calls == []


@torch.no_grad()
def test_set_attn_implementation_switches_a_built_model(tiny, monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = _randomized(DenseCLViTModel(tiny()), seed=2).eval()
    pixels = _pixels()
    sdpa_calls = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def counting_sdpa(*args, **kwargs):
        sdpa_calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", counting_sdpa)
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == implementation
        sdpa_calls.clear()
        outputs[implementation] = model(pixels).last_hidden_state
        # The switch is visible in what runs: SDPA once per block, or not at all.
        assert len(sdpa_calls) == (2 if implementation == "sdpa" else 0)
    assert (outputs["eager"] - outputs["sdpa"]).abs().max().item() <= 1e-5


@torch.no_grad()
def test_attentions_come_from_the_eager_path_and_are_probabilities(tiny):
    model = _randomized(DenseCLViTModel(tiny()), seed=4).eval()
    model.set_attn_implementation("eager")
    pixels = _pixels(height=32, width=24)  # 4x3 patches + [CLS] = 13 tokens
    outputs = model(pixels, output_attentions=True, output_hidden_states=True)
    assert len(outputs.attentions) == 2 and len(outputs.hidden_states) == 3
    for attentions in outputs.attentions:
        assert attentions.shape == (2, 2, 13, 13)
        torch.testing.assert_close(attentions.sum(-1), torch.ones(2, 2, 13))
    # The first block's probabilities, recomputed by hand from its input (the embeddings).
    layer = model.encoder.layer[0]
    qkv = layer.attention.qkv(layer.norm1(outputs.hidden_states[0])).reshape(2, 13, 3, 2, 16)
    query, key, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    expected = torch.softmax(query @ key.transpose(-2, -1) / 4.0, dim=-1)
    torch.testing.assert_close(outputs.attentions[0], expected, atol=1e-6, rtol=1e-5)
    # Asking for attentions under SDPA still returns them (the eager path serves that call), with the same tokens.
    model.set_attn_implementation("sdpa")
    sdpa_outputs = model(pixels, output_attentions=True)
    torch.testing.assert_close(sdpa_outputs.attentions[0], outputs.attentions[0])
    assert model(pixels).attentions is None


@torch.no_grad()
@pytest.mark.parametrize("model_class", [DenseCLViTForSemanticSegmentation, DenseCLViTForDepthEstimation])
def test_task_models_pass_output_options_and_return_tuples(tiny, model_class):
    model = model_class(tiny(num_labels=3)).eval()
    pixels = _pixels(height=32, width=32)
    outputs = model(pixels, output_attentions=True, output_hidden_states=True)
    assert len(outputs.attentions) == 2 and len(outputs.hidden_states) == 3
    plain = model(pixels)
    assert plain.attentions is None and plain.hidden_states is None
    as_tuple = model(pixels, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], plain.to_tuple()[0])


def test_intermediate_size_sets_the_mlp_ratio_and_round_trips(tiny, tmp_path):
    from densecl_vit import DenseCLViTConfig
    from densecl_vit.hub_cards import stock

    config = tiny(intermediate_size=64)
    assert config.mlp_ratio == 2.0 and config.intermediate_size == 64
    model = _randomized(DenseCLViTModel(config), seed=5).eval()
    assert model.encoder.layer[0].mlp.fc1.out_features == 64
    model.save_pretrained(tmp_path)
    loaded = DenseCLViTConfig.from_pretrained(tmp_path)
    assert loaded.intermediate_size == 64 and loaded.mlp_ratio == 2.0
    # A config dict written with transformers' ViT field name instead of mlp_ratio loads too.
    vit_shaped = {k: v for k, v in loaded.to_dict().items() if k != "mlp_ratio"}
    assert DenseCLViTConfig.from_dict({**vit_shaped, "intermediate_size": 96}).mlp_ratio == 3.0
    # The stock Dinov2Model has the same MLP width and output.
    pixels = _pixels(height=32, width=32)
    with torch.no_grad():
        expected = model(pixels).last_hidden_state
        got = stock.to_dinov2(DenseCLViTModel.from_pretrained(tmp_path)).eval()(pixels).last_hidden_state
    assert (got - expected).abs().max().item() <= 1e-5
    # A width that needs a fractional ratio keeps working here and is refused as stock for that reason.
    assert "integer MLP ratio" in stock.unavailable_reason(DenseCLViTModel(tiny(intermediate_size=80)))


@pytest.mark.parametrize("value", [0, -32, 33.5, "64", True])
def test_intermediate_size_without_a_sensible_ratio_is_refused_in_one_line(tiny, value):
    with pytest.raises(ValueError, match=r"^intermediate_size .* use a positive whole number[^\n]*$"):
        tiny(intermediate_size=value)
    config = tiny()
    with pytest.raises(ValueError, match="intermediate_size"):
        config.intermediate_size = value
    assert config.mlp_ratio == 4.0


def test_intermediate_size_that_contradicts_mlp_ratio_is_refused(tiny):
    with pytest.raises(ValueError, match="pass only one of them"):
        tiny(intermediate_size=64, mlp_ratio=3.0)
    assert tiny(intermediate_size=96, mlp_ratio=3.0).intermediate_size == 96


def test_training_option_checkpoints_every_block(tiny):
    from types import SimpleNamespace

    from densecl_vit import DenseCLViTForPreTraining
    from densecl_vit.training.engine.setup import apply_model_options

    model = DenseCLViTForPreTraining(tiny(num_hidden_layers=3, projection_hidden_size=16, projection_dim=8))
    apply_model_options(model, SimpleNamespace(gradient_checkpointing=True, compile=False))
    encoder = model.densecl_vit
    assert all(layer.gradient_checkpointing for layer in encoder.encoder.layer)
    counts = _count_layer_calls(encoder)
    views = _pixels(batch=2, height=32, width=32)
    model.train()(views, views.flip(-1)).loss.backward()
    assert counts == [2, 2, 2]  # one forward, one recompute each
