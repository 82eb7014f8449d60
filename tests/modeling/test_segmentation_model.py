"""DenseCLViTForSemanticSegmentation: linear and UPerNet heads, loss, auxiliary head, loading, a short fit."""

import pytest
import torch
import torch.nn.functional as F

from densecl_vit import DenseCLViTForPreTraining, DenseCLViTForSemanticSegmentation, DenseCLViTModel

NUM_LABELS, IGNORE = 3, 255
ID2LABEL = {0: "red", 1: "green", 2: "blue"}
LABEL2ID = {name: i for i, name in ID2LABEL.items()}


def _config(tiny, decode_head: str, **overrides):
    fields = dict(
        decode_head=decode_head,
        num_labels=NUM_LABELS,
        out_indices=[1, 1, 2, 2],
        decoder_hidden_size=16,
        auxiliary_hidden_size=8,
        pool_scales=[1, 2, 3],
    )
    return tiny(**{**fields, **overrides})


def _model(tiny, decode_head: str, **overrides) -> DenseCLViTForSemanticSegmentation:
    torch.manual_seed(0)
    return DenseCLViTForSemanticSegmentation(_config(tiny, decode_head, **overrides))


def _reference_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of -log softmax(logits)[label] over the pixels whose label is not the ignore index, by hand."""
    log_probs = logits - logits.logsumexp(dim=1, keepdim=True)  # (B, K, H, W)
    valid = labels != IGNORE
    picked = log_probs.permute(0, 2, 3, 1)[valid]  # (M, K)
    return -picked[torch.arange(len(picked)), labels[valid]].mean()


def _labels_with_ignored_pixels(batch: int, height: int, width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    labels = torch.randint(0, NUM_LABELS, (batch, height, width), generator=generator)
    labels[:, : height // 4] = IGNORE
    return labels


@pytest.mark.parametrize("decode_head", ["linear", "upernet"])
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_logits_at_input_resolution(tiny, decode_head, size):
    model = _model(tiny, decode_head).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.logits.shape == (2, NUM_LABELS, *size)
    assert out.loss is None and out.hidden_states is None
    assert torch.isfinite(out.logits).all()


def test_upernet_pyramid_strides_for_patch_16(tiny):
    """Patch 16: the four levels sit at strides 4, 8, 16 and 32 and the fused map at stride 4."""
    model = _model(tiny, "upernet", patch_size=16, image_size=64).eval()
    pixel_values = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        hidden_states = model.densecl_vit(pixel_values, output_hidden_states=True).hidden_states
        levels = model.decode_head.feature_pyramid(hidden_states, (4, 8))
        fused = model.decode_head.fuse(levels)
    assert [tuple(level.shape[-2:]) for level in levels] == [(16, 32), (8, 16), (4, 8), (2, 4)]
    assert fused.shape == (1, 16, 16, 32)


def test_upernet_reads_the_configured_blocks(tiny):
    """out_indices are 1-based block numbers: hidden_states[i] is block i's output (0 = the embeddings)."""
    model = _model(tiny, "upernet", out_indices=[2, 1, 1, 2]).eval()
    hidden_states = tuple(torch.randn(1, 17, 32) * (i + 1) for i in range(3))
    seen = []
    model.decode_head.pyramid.fpn1.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    with torch.no_grad():
        model.decode_head(hidden_states, (4, 4))
    expected = hidden_states[2][:, 1:].transpose(1, 2).reshape(1, 32, 4, 4)
    assert torch.equal(seen[0], expected)


def test_linear_head_is_one_linear_layer_per_patch(tiny):
    model = _model(tiny, "linear").eval()
    pixel_values = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True)
        tokens = model.densecl_vit(pixel_values).last_hidden_state[:, 1:]  # (B, N, D)
    patch_logits = tokens @ model.classifier.weight.T + model.classifier.bias  # (B, 4*6, K)
    grid = patch_logits.transpose(1, 2).reshape(2, NUM_LABELS, 4, 6)
    expected = F.interpolate(grid, size=(32, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    assert len(out.hidden_states) == 3
    assert model.auxiliary_head is None and model.decode_head is None


def test_linear_loss_is_cross_entropy_without_ignored_pixels(tiny):
    model = _model(tiny, "linear", use_auxiliary_head=True)
    labels = _labels_with_ignored_pixels(2, 32, 40)
    out = model(torch.randn(2, 3, 32, 40), labels=labels)
    torch.testing.assert_close(out.loss, _reference_cross_entropy(out.logits, labels))
    # Logits at ignored pixels (the top quarter) do not move the loss.
    perturbed = out.logits.detach().clone()
    perturbed[:, :, :8] += 100 * torch.randn(perturbed[:, :, :8].shape)
    torch.testing.assert_close(model.segmentation_loss(perturbed, labels), out.loss.detach())


def test_upernet_loss_adds_the_weighted_auxiliary_loss(tiny):
    model = _model(tiny, "upernet", auxiliary_loss_weight=0.4).eval()
    auxiliary_outputs = []
    model.auxiliary_head.register_forward_hook(lambda module, args, output: auxiliary_outputs.append(output))
    pixel_values, labels = torch.randn(2, 3, 32, 40), _labels_with_ignored_pixels(2, 32, 40)
    with torch.no_grad():
        model(pixel_values)
        assert auxiliary_outputs == []  # the auxiliary head only runs for the loss
        out = model(pixel_values, labels=labels)
    (auxiliary,) = auxiliary_outputs
    assert auxiliary.shape == (2, NUM_LABELS, 4, 5)  # third pyramid level: the patch grid
    auxiliary = F.interpolate(auxiliary, size=(32, 40), mode="bilinear", align_corners=False)
    main, auxiliary_loss = (
        _reference_cross_entropy(out.logits, labels),
        _reference_cross_entropy(auxiliary, labels),
    )
    torch.testing.assert_close(out.loss, main + 0.4 * auxiliary_loss)
    assert auxiliary_loss > 0

    without = _model(tiny, "upernet", use_auxiliary_head=False).eval()
    assert without.auxiliary_head is None
    with torch.no_grad():
        out = without(pixel_values, labels=labels)
    torch.testing.assert_close(out.loss, _reference_cross_entropy(out.logits, labels))


def test_bad_labels_are_refused(tiny):
    model = _model(tiny, "linear")
    with pytest.raises(ValueError, match="labels must be"):
        model(torch.randn(1, 3, 32, 32), labels=torch.zeros(1, 16, 16, dtype=torch.long))
    single = _model(tiny, "linear", num_labels=1)
    with pytest.raises(ValueError, match="num_labels"):
        single(torch.randn(1, 3, 32, 32), labels=torch.zeros(1, 32, 32, dtype=torch.long))


def _bn_buffers_are_fresh(model) -> bool:
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    return bool(norms) and all(
        torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
        and torch.equal(m.running_var, torch.ones_like(m.running_var))
        for m in norms
    )


@pytest.mark.parametrize("source", ["pretraining", "encoder"])
def test_loading_an_encoder_folder_initialises_only_the_head(tmp_path, tiny, source):
    torch.manual_seed(0)
    config = tiny(projection_hidden_size=64, projection_dim=16)
    pretrained = DenseCLViTForPreTraining(config) if source == "pretraining" else DenseCLViTModel(config)
    pretrained.save_pretrained(tmp_path)

    model, info = DenseCLViTForSemanticSegmentation.from_pretrained(
        tmp_path,
        num_labels=NUM_LABELS,
        id2label=ID2LABEL,
        label2id=LABEL2ID,
        decode_head="upernet",
        decoder_hidden_size=16,
        auxiliary_hidden_size=8,
        output_loading_info=True,
    )
    head_keys = {key for key in model.state_dict() if not key.startswith("densecl_vit.")}
    assert set(info["missing_keys"]) == head_keys
    assert {key.split(".")[0] for key in head_keys} == {"decode_head", "classifier", "auxiliary_head"}
    expected_unexpected = {f"projection.fc{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}
    assert set(info["unexpected_keys"]) == (expected_unexpected if source == "pretraining" else set())
    assert not info["mismatched_keys"]

    encoder = pretrained.densecl_vit if source == "pretraining" else pretrained
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(model.densecl_vit.state_dict()[name], tensor), name
    assert model.config.id2label == ID2LABEL and model.config.num_labels == NUM_LABELS
    assert model.classifier.out_channels == NUM_LABELS
    # Newly created BatchNorms start from the identity statistics, not from uninitialised memory.
    assert _bn_buffers_are_fresh(model)


def _colour_scenes() -> tuple[torch.Tensor, torch.Tensor]:
    """4 images 32x32 tiled in 8x8 blocks, each block red, green or blue (its class) plus noise."""
    generator = torch.Generator().manual_seed(3)
    block_labels = torch.randint(0, NUM_LABELS, (4, 4, 4), generator=generator)
    labels = block_labels.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)  # (4, 32, 32)
    images = F.one_hot(labels, NUM_LABELS).permute(0, 3, 1, 2).float() * 2 - 1  # (4, 3, 32, 32)
    images = images + 0.3 * torch.randn(images.shape, generator=generator)
    return images, labels


@pytest.mark.parametrize("decode_head", ["linear", "upernet"])
def test_a_short_fit_on_a_fixed_batch_lowers_the_loss(tiny, decode_head):
    model = _model(tiny, decode_head).train()
    images, labels = _colour_scenes()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(100):
        loss = model(images, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    model.eval()
    with torch.no_grad():
        predictions = model(images).logits.argmax(dim=1)
    assert (predictions == labels).float().mean() > 0.9
