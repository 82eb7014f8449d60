"""DenseCLViTForPreTraining: embeddings, the three losses, one batched encoder pass, gradients, gathered negatives."""

import pytest
import torch
import torch.nn.functional as F

from densecl_vit import DenseCLViTForPreTraining, DenseCLViTPreTrainingOutput
from densecl_vit.modeling import modeling_densecl_vit
from densecl_vit.modeling.configuration_densecl_vit import parse_pretraining_loss
from densecl_vit.modeling.losses_densecl_vit import (
    global_info_nce,
    local_local_info_nce,
    symmetric_local_global_loss,
)

BATCH, PROJECTION_DIM, NUM_PATCHES = 3, 16, 16  # 32x32 images, patch 8 -> 4x4 patches


def _model(tiny, **overrides) -> DenseCLViTForPreTraining:
    torch.manual_seed(0)
    config = tiny(projection_hidden_size=64, projection_dim=PROJECTION_DIM, **overrides)
    return DenseCLViTForPreTraining(config).eval()


def _views(size: int = 32, size_2: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(BATCH, 3, size, size, generator=generator),
        torch.randn(BATCH, 3, size_2, size_2, generator=generator),
    )


def _reference_embeddings(model, pixel_values):
    """Projection of every token of one view on its own, normalised by hand: (B, P), (B, N, P)."""
    tokens = model.densecl_vit(pixel_values).last_hidden_state
    projected = model.projection(tokens)
    projected = projected / projected.norm(dim=-1, keepdim=True)
    return projected[:, 0], projected[:, 1:]


def test_output_shapes_unit_norm_and_values(tiny):
    model = _model(tiny)
    view_1, view_2 = _views()
    with torch.no_grad():
        out = model(view_1, view_2)
        expected_1, expected_2 = _reference_embeddings(model, view_1), _reference_embeddings(model, view_2)
    assert isinstance(out, DenseCLViTPreTrainingOutput)
    assert out.global_embeddings.shape == out.global_embeddings_2.shape == (BATCH, PROJECTION_DIM)
    assert out.local_embeddings.shape == out.local_embeddings_2.shape == (BATCH, NUM_PATCHES, PROJECTION_DIM)
    for embeddings in (
        out.global_embeddings,
        out.local_embeddings,
        out.global_embeddings_2,
        out.local_embeddings_2,
    ):
        torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(embeddings.shape[:-1]))
    # The batched pass splits back into the right views, in order.
    torch.testing.assert_close(out.global_embeddings, expected_1[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.local_embeddings, expected_1[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.global_embeddings_2, expected_2[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.local_embeddings_2, expected_2[1], atol=1e-5, rtol=1e-5)


def test_single_view_gives_embeddings_and_no_loss(tiny):
    model = _model(tiny)
    view_1, _ = _views()
    with torch.no_grad():
        out = model(view_1)
    assert out.loss is None and out.global_embeddings_2 is None and out.local_embeddings_2 is None
    assert out.local_embeddings.shape == (BATCH, NUM_PATCHES, PROJECTION_DIM)
    assert model(view_1, return_dict=False)[0].shape == (BATCH, PROJECTION_DIM)


@pytest.mark.parametrize("pretraining_loss", ["local-global", "global", "both"])
def test_loss_is_the_losses_file_function_on_the_returned_embeddings(tiny, pretraining_loss):
    model = _model(tiny, pretraining_loss=pretraining_loss, loss_temperature=0.2)
    with torch.no_grad():
        out = model(*_views())
    g1, l1, g2, l2 = (
        out.global_embeddings,
        out.local_embeddings,
        out.global_embeddings_2,
        out.local_embeddings_2,
    )
    local_global = symmetric_local_global_loss(g1, l1, g2, l2, temperature=0.2)
    global_loss = global_info_nce(g1, g2, temperature=0.2)
    expected = {"local-global": local_global, "global": global_loss, "both": local_global + global_loss}
    torch.testing.assert_close(out.loss, expected[pretraining_loss])
    assert out.loss.item() > 0


GEOMETRY = {
    "crop_boxes": torch.tensor([[0.0, 0.0, 32.0, 32.0], [4.0, 2.0, 20.0, 24.0], [0.0, 0.0, 8.0, 8.0]]),
    "flips": torch.tensor([False, True, False]),
    "crop_boxes_2": torch.tensor([[8.0, 8.0, 24.0, 24.0], [0.0, 0.0, 32.0, 32.0], [20.0, 20.0, 8.0, 8.0]]),
    "flips_2": torch.tensor([True, False, False]),
}


@pytest.mark.parametrize(
    "spec, cls_stop_gradient",
    [("local-local", False), ("0.25*local-global+local-local", False), ("local-global+local-local", True)],
)
def test_weighted_compositions_sum_the_terms(tiny, spec, cls_stop_gradient):
    model = _model(tiny, pretraining_loss=spec, cls_stop_gradient=cls_stop_gradient, loss_temperature=0.2)
    out = model(*_views(), **GEOMETRY)
    g1, l1, g2, l2 = (
        out.global_embeddings,
        out.local_embeddings,
        out.global_embeddings_2,
        out.local_embeddings_2,
    )
    terms = {
        "local-global": symmetric_local_global_loss(g1, l1, g2, l2, temperature=0.2),
        "local-local": local_local_info_nce(l1, l2, *GEOMETRY.values(), temperature=0.2),
    }
    expected = sum(weight * terms[term] for weight, term in parse_pretraining_loss(spec))
    torch.testing.assert_close(out.loss, expected)
    # The [CLS] embeddings learn only from the local-global term, and not at all under the stop-gradient.
    (cls_grad,) = torch.autograd.grad(out.loss, g1, retain_graph=True, allow_unused=True)
    trains_cls = "local-global" in spec and not cls_stop_gradient
    assert (cls_grad is not None and cls_grad.abs().sum() > 0) == trains_cls


def test_local_local_without_geometry_says_what_to_pass(tiny):
    model = _model(tiny, pretraining_loss="local-global+local-local")
    with pytest.raises(ValueError, match="crop_boxes, flips"):
        model(*_views())


@pytest.mark.parametrize(
    "spec", ["local", "local-global+local-global", "-1*global", "x*global", "inf*global", ""]
)
def test_config_refuses_bad_loss_compositions(tiny, spec):
    with pytest.raises(ValueError, match="pretraining_loss"):
        tiny(pretraining_loss=spec)
    with pytest.raises(ValueError, match="cls_stop_gradient applies to the local-global term"):
        tiny(pretraining_loss="local-local", cls_stop_gradient=True)


def _count_encoder_calls(model) -> list[int]:
    batch_sizes = []
    model.densecl_vit.register_forward_hook(lambda module, args, output: batch_sizes.append(args[0].shape[0]))
    return batch_sizes


def test_views_of_equal_size_share_one_encoder_pass(tiny):
    model = _model(tiny)
    batch_sizes = _count_encoder_calls(model)
    with torch.no_grad():
        model(*_views())
    assert batch_sizes == [2 * BATCH]


def test_views_of_different_sizes_run_separately_and_still_give_a_loss(tiny):
    model = _model(tiny)
    batch_sizes = _count_encoder_calls(model)
    view_1, view_2 = _views(32, 16)
    with torch.no_grad():
        out = model(view_1, view_2)
    assert batch_sizes == [BATCH, BATCH]
    assert out.local_embeddings_2.shape == (BATCH, 4, PROJECTION_DIM)
    expected = symmetric_local_global_loss(
        out.global_embeddings, out.local_embeddings, out.global_embeddings_2, out.local_embeddings_2, 0.1
    )
    torch.testing.assert_close(out.loss, expected)


def test_gradients_reach_encoder_and_projection_head(tiny):
    model = _model(tiny, pretraining_loss="both").train()
    model(*_views()).loss.backward()
    for name in (
        "densecl_vit.embeddings.cls_token",
        "densecl_vit.embeddings.patch_embeddings.projection.weight",
        "densecl_vit.encoder.layer.0.attention.qkv.weight",
        "projection.fc1.weight",
        "projection.fc3.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_mismatched_batch_sizes_are_refused(tiny):
    model = _model(tiny)
    view_1, view_2 = _views()
    with pytest.raises(ValueError, match="same batch size"):
        model(view_1, view_2[:1])


def test_gathered_negatives_are_the_projected_embeddings_of_every_process(tiny, monkeypatch):
    """With gather_negatives under torch.distributed, the losses get the gathered projected embeddings.

    A stand-in for the all-gather puts this process second in a world of two, behind fixed embeddings of a
    'rank 0'; the loss must be the losses-file function called with those negatives and offset BATCH.
    """
    model = _model(tiny, pretraining_loss="both", gather_negatives=True)
    generator = torch.Generator().manual_seed(5)
    gathered_inputs = []

    def fake_gather(tensor: torch.Tensor) -> torch.Tensor:
        gathered_inputs.append(tensor)
        other_rank = F.normalize(torch.randn(tensor.shape, generator=generator), dim=-1)
        return torch.cat([other_rank, tensor])

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(modeling_densecl_vit, "gather_with_grad", fake_gather)
    monkeypatch.setattr(modeling_densecl_vit, "rank_batch_offset", lambda batch_size: batch_size)
    with torch.no_grad():
        out = model(*_views())

    g1, l1, g2, l2 = (
        out.global_embeddings,
        out.local_embeddings,
        out.global_embeddings_2,
        out.local_embeddings_2,
    )
    # Gathered: patches of view 1 and 2 (local-to-global), then [CLS] of view 1 and 2 (global), as projected.
    assert len(gathered_inputs) == 4
    for sent, own in zip(gathered_inputs, (l1, l2, g1, g2)):
        assert torch.equal(sent, own)
    negatives = [torch.cat([torch.zeros_like(t), t]) for t in (l1, l2, g1, g2)]
    # Rebuild the gathered tensors with the same fixed 'rank 0' rows.
    generator.manual_seed(5)
    for i, own in enumerate((l1, l2, g1, g2)):
        negatives[i][: own.shape[0]] = F.normalize(torch.randn(own.shape, generator=generator), dim=-1)
    expected = symmetric_local_global_loss(
        g1, l1, g2, l2, 0.1, negatives[0], negatives[1], batch_offset=BATCH
    ) + global_info_nce(g1, g2, 0.1, negatives[2], negatives[3], batch_offset=BATCH)
    torch.testing.assert_close(out.loss, expected)
    local_only = symmetric_local_global_loss(g1, l1, g2, l2, 0.1) + global_info_nce(g1, g2, 0.1)
    assert not torch.allclose(out.loss, local_only)


def test_negatives_stay_local_without_the_option(tiny, monkeypatch):
    model = _model(tiny)
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(
        modeling_densecl_vit, "gather_with_grad", lambda tensor: calls.append(tensor) or tensor
    )
    with torch.no_grad():
        model(*_views())
    assert calls == []


@pytest.mark.parametrize("size_2", [32, 24])  # one batched encoder pass, and one pass per view
def test_hidden_states_and_attentions_are_returned_per_view(tiny, size_2):
    model = _model(tiny, pretraining_loss="local-global+local-local", attn_implementation="eager")
    view_1, view_2 = _views(32, size_2)
    with torch.no_grad():
        out = model(view_1, view_2, **GEOMETRY, output_hidden_states=True, output_attentions=True)
        plain = model(view_1, view_2, **GEOMETRY)
        alone = [
            model.densecl_vit(v, output_hidden_states=True, output_attentions=True) for v in (view_1, view_2)
        ]
    # The geometry still feeds the local-local term: the loss is the one computed without the extra outputs.
    torch.testing.assert_close(out.loss, plain.loss)
    assert plain.hidden_states is plain.attentions is plain.hidden_states_2 is plain.attentions_2 is None
    for got, expected in ((out.hidden_states, alone[0]), (out.hidden_states_2, alone[1])):
        assert len(got) == 3  # embeddings + 2 blocks
        for tensor, reference in zip(got, expected.hidden_states):
            torch.testing.assert_close(tensor, reference, atol=1e-5, rtol=1e-5)
    for got, expected in ((out.attentions, alone[0]), (out.attentions_2, alone[1])):
        assert len(got) == 2
        for tensor, reference in zip(got, expected.attentions):
            torch.testing.assert_close(tensor, reference, atol=1e-5, rtol=1e-5)
    as_tuple = model(view_1, view_2, **GEOMETRY, output_hidden_states=True, return_dict=False)
    torch.testing.assert_close(as_tuple[0], plain.loss)
    assert len(as_tuple) == 7  # loss, 4 embeddings, hidden states of view 1, of view 2
