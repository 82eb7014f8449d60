"""DenseCLViTForDepthEstimation: the three heads, the dilated sigmoid, the masked berHu + gradient loss, a short fit."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densecl_vit import DenseCLViTForDepthEstimation

MIN_DEPTH, MAX_DEPTH = 0.5, 6.0


def _model(tiny, depth_head: str, **overrides) -> DenseCLViTForDepthEstimation:
    torch.manual_seed(0)
    fields = dict(
        depth_head=depth_head,
        min_depth=MIN_DEPTH,
        max_depth=MAX_DEPTH,
        out_indices=[1, 1, 2, 2],
        decoder_hidden_size=16,
        pool_scales=[1, 2, 3],
        depth_head_hidden_size=16,
    )
    return DenseCLViTForDepthEstimation(tiny(**{**fields, **overrides}))


@pytest.mark.parametrize("depth_head", ["linear", "upernet"])
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_depth_at_input_resolution_inside_the_range(tiny, depth_head, size):
    model = _model(tiny, depth_head).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.predicted_depth.shape == (2, *size)
    assert out.loss is None
    assert (out.predicted_depth > MIN_DEPTH).all() and (out.predicted_depth < MAX_DEPTH).all()


def test_linear_head_has_log2_patch_stages_with_halving_channels(tiny):
    model = _model(tiny, "linear", depth_head_hidden_size=32)
    assert [stage.conv.out_channels for stage in model.decode_head.stages] == [32, 16, 8]  # patch 8: 3 stages
    model_16 = _model(tiny, "linear", patch_size=16, image_size=64, depth_head_hidden_size=32)
    assert [stage.conv.out_channels for stage in model_16.decode_head.stages] == [32, 16, 8, 4]
    with torch.no_grad():
        features = model_16.decode_head(torch.randn(1, 32, 3, 5))
    assert features.shape == (1, 4, 48, 80)  # x16: back to input resolution without a final resize


@pytest.mark.parametrize("depth_head", ["linear", "upernet"])
def test_output_is_the_dilated_sigmoid_of_the_regressor(tiny, depth_head):
    model = _model(tiny, depth_head).eval()
    regressor_outputs = []
    model.regressor.register_forward_hook(lambda module, args, output: regressor_outputs.append(output))
    with torch.no_grad():
        depth = model(torch.randn(1, 3, 32, 48)).predicted_depth
    logits = F.interpolate(regressor_outputs[0], size=(32, 48), mode="bilinear", align_corners=False)[:, 0]
    expected = MIN_DEPTH + (MAX_DEPTH - MIN_DEPTH) / (1 + torch.exp(-logits))
    torch.testing.assert_close(depth, expected)


@pytest.mark.parametrize(
    "size", [(32, 48), (40, 56)]
)  # grids 4x6 and 5x7 (odd: DPT's stride-2 level rounds up)
def test_dpt_output_is_max_depth_times_the_sigmoid_of_its_head(tiny, size):
    """Depth Anything's metric output: the dilated sigmoid with its lower end at 0, at the input resolution."""
    model = _model(tiny, "dpt", dpt_fusion_hidden_size=16, dpt_head_hidden_size=8).eval()
    head_outputs = []
    model.regressor.register_forward_hook(lambda module, args, output: head_outputs.append(output))
    with torch.no_grad():
        depth = model(torch.randn(2, 3, *size)).predicted_depth
    assert depth.shape == (2, *size) and head_outputs[0].shape == (2, 1, *size)
    torch.testing.assert_close(depth, MAX_DEPTH * torch.sigmoid(head_outputs[0][:, 0]))
    assert (depth > 0).all() and (depth < MAX_DEPTH).all()


def test_dpt_reads_the_chosen_blocks_after_the_final_layernorm(tiny):
    model = _model(tiny, "dpt", num_hidden_layers=4, out_indices=[1, 2, 3, 4]).eval()
    seen = []
    model.decode_head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        model(x)
        hidden = model.densecl_vit(x, output_hidden_states=True).hidden_states
    assert [tuple(m.shape) for m in seen[0]] == [(1, 32, 4, 6)] * 4
    for index, features in zip([1, 2, 3, 4], seen[0]):
        tokens = model.densecl_vit.layernorm(hidden[index])[:, 1:]  # (1, 24, 32), row-major over the grid
        torch.testing.assert_close(features.flatten(2).transpose(1, 2), tokens)


def _labels_with_invalid_pixels(batch: int, height: int, width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(4)
    labels = MIN_DEPTH + (MAX_DEPTH - MIN_DEPTH) * torch.rand(batch, height, width, generator=generator)
    labels[:, 0, :] = 0.0  # missing
    labels[:, 1, :5] = float("nan")
    labels[:, 2, :5] = float("inf")
    labels[:, 3, :5] = MAX_DEPTH + 1.0  # beyond the range
    labels[:, 4, :5] = MIN_DEPTH  # on the boundary: not strictly inside
    return labels


def _reference_loss(prediction: np.ndarray, labels: np.ndarray, threshold: float, weight: float) -> float:
    """berHu + weight * L2 gradient loss over the valid pixels, with NumPy loops (float64)."""
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(labels) & (labels > MIN_DEPTH) & (labels < MAX_DEPTH)
    residual = prediction[valid] - labels[valid]
    c = max(threshold * np.abs(residual).max(), 1e-6)
    berhu = np.where(np.abs(residual) <= c, np.abs(residual), (residual**2 + c**2) / (2 * c)).mean()
    diff = prediction - np.where(valid, labels, 0.0)
    squares = []
    batch, height, width = labels.shape
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                if x + 1 < width and valid[b, y, x] and valid[b, y, x + 1]:
                    squares.append((diff[b, y, x + 1] - diff[b, y, x]) ** 2)
                if y + 1 < height and valid[b, y, x] and valid[b, y + 1, x]:
                    squares.append((diff[b, y + 1, x] - diff[b, y, x]) ** 2)
    return berhu + weight * float(np.mean(squares))


def test_loss_masks_invalid_pixels_and_matches_a_numpy_reference(tiny):
    model = _model(tiny, "linear", berhu_threshold=0.3, gradient_loss_weight=0.7)
    labels = _labels_with_invalid_pixels(2, 16, 24)
    out = model(torch.randn(2, 3, 16, 24), labels=labels)
    assert torch.isfinite(out.loss)
    expected = _reference_loss(
        out.predicted_depth.detach().double().numpy(), labels.double().numpy(), 0.3, 0.7
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    out.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_loss_without_valid_pixels_is_zero_and_finite(tiny):
    model = _model(tiny, "upernet")
    labels = torch.zeros(2, 16, 16)
    labels[0, 0, 0] = float("nan")
    out = model(torch.randn(2, 3, 16, 16), labels=labels)
    assert out.loss.item() == 0.0
    out.loss.backward()


def test_bad_labels_are_refused(tiny):
    model = _model(tiny, "linear")
    with pytest.raises(ValueError, match="labels must be"):
        model(torch.randn(1, 3, 32, 32), labels=torch.ones(1, 1, 32, 32))


def _depth_scenes() -> tuple[torch.Tensor, torch.Tensor]:
    """4 images 32x32 whose brightness encodes a depth ramp (a floor receding upwards) with a box in front."""
    generator = torch.Generator().manual_seed(6)
    rows = torch.linspace(4.5, 1.0, 32)[:, None].expand(32, 32)
    depth = rows.repeat(4, 1, 1).clone()  # (4, 32, 32)
    for i, (top, left) in enumerate(torch.randint(0, 16, (4, 2), generator=generator).tolist()):
        depth[i, top : top + 16, left : left + 16] = 0.8 + 0.2 * i
    images = ((depth - 2.5) / 1.5)[:, None].repeat(1, 3, 1, 1)
    images = images + 0.05 * torch.randn(images.shape, generator=generator)
    return images, depth


@pytest.mark.parametrize("depth_head", ["linear", "upernet", "dpt"])
def test_a_short_fit_on_a_fixed_batch_lowers_the_loss(tiny, depth_head):
    # 64 -> 32 -> 16 channels: a last stage as wide as the UPerNet decoder, so both heads fit at a similar pace.
    narrow_dpt = dict(dpt_fusion_hidden_size=8, dpt_head_hidden_size=8) if depth_head == "dpt" else {}
    model = _model(tiny, depth_head, depth_head_hidden_size=64, **narrow_dpt).train()
    images, depth = _depth_scenes()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(100):
        loss = model(images, labels=depth).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
