import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densecl_vit.training.sliding_window import sliding_window_logits, window_positions

NUM_LABELS = 5


def _contextual_forward_fn(seed: int = 0):
    """Logits that depend on neighbours (3x3 conv), the whole crop (its mean) and the position in the crop."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, NUM_LABELS, 3, padding=1)
    context = nn.Linear(3, NUM_LABELS)

    def forward_fn(x: torch.Tensor) -> torch.Tensor:
        height = x.shape[-2]
        ramp = torch.linspace(0, 1, height)[None, None, :, None]
        return conv(x) + context(x.mean(dim=(2, 3)))[:, :, None, None] + ramp

    return forward_fn


def _reference_slide(forward_fn, images, window, stride):
    """mmseg's slide_inference, one window at a time over the whole batch, with padding to the window."""
    (window_h, window_w), (stride_h, stride_w) = window, stride
    _, _, height, width = images.shape
    images = F.pad(images, (0, max(window_w - width, 0), 0, max(window_h - height, 0)))
    padded_h, padded_w = images.shape[-2:]
    h_grids = max(padded_h - window_h + stride_h - 1, 0) // stride_h + 1
    w_grids = max(padded_w - window_w + stride_w - 1, 0) // stride_w + 1
    preds = torch.zeros(images.shape[0], NUM_LABELS, padded_h, padded_w)
    count = torch.zeros(images.shape[0], 1, padded_h, padded_w)
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * stride_h + window_h, padded_h)
            x2 = min(w_idx * stride_w + window_w, padded_w)
            y1, x1 = max(y2 - window_h, 0), max(x2 - window_w, 0)
            crop_logits = forward_fn(images[:, :, y1:y2, x1:x2])
            preds += F.pad(crop_logits, (x1, padded_w - x2, y1, padded_h - y2))
            count[:, :, y1:y2, x1:x2] += 1
    assert (count > 0).all()
    return (preds / count)[:, :, :height, :width]


@pytest.mark.parametrize(
    ("height", "width", "window", "stride"),
    [(1024, 512, 512, 341), (512, 683, 512, 341), (37, 53, (16, 24), (10, 13)), (16, 24, (16, 24), (5, 7))],
)
def test_window_positions_cover_the_image_and_end_at_the_border(height, width, window, stride):
    window_h, window_w = (window, window) if isinstance(window, int) else window
    coverage = np.zeros((height, width), dtype=int)
    positions = window_positions(height, width, window, stride)
    for top, left in positions:
        assert 0 <= top <= height - window_h and 0 <= left <= width - window_w
        coverage[top : top + window_h, left : left + window_w] += 1
    assert coverage.min() > 0
    assert max(top for top, _ in positions) == height - window_h
    assert max(left for _, left in positions) == width - window_w


def test_window_positions_golden_values():
    # ADE20K-sized inputs under the 512/341 protocol.
    assert window_positions(1024, 512, 512, 341) == [(0, 0), (341, 0), (512, 0)]
    assert window_positions(512, 683, 512, 341) == [(0, 0), (0, 171)]


@pytest.mark.parametrize("crops_per_batch", [1, 3, 100])
def test_per_pixel_conv_equals_whole_image(crops_per_batch):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, NUM_LABELS, 1)
    images = torch.randn(2, 3, 37, 53)
    with torch.no_grad():
        slid = sliding_window_logits(conv, images, NUM_LABELS, (16, 24), (10, 13), crops_per_batch)
        whole = conv(images)
    torch.testing.assert_close(slid, whole, rtol=1e-5, atol=1e-5)


def test_window_equal_to_image_equals_whole_call():
    forward_fn = _contextual_forward_fn()
    images = torch.randn(3, 3, 24, 40)
    with torch.no_grad():
        slid = sliding_window_logits(forward_fn, images, NUM_LABELS, window=(24, 40), stride=(8, 8))
        whole = forward_fn(images)
    torch.testing.assert_close(slid, whole)


def test_small_image_is_padded_to_the_window_and_cropped_back():
    forward_fn = _contextual_forward_fn()
    images = torch.randn(2, 3, 20, 30)
    with torch.no_grad():
        slid = sliding_window_logits(forward_fn, images, NUM_LABELS, window=32, stride=21)
        expected = forward_fn(F.pad(images, (0, 2, 0, 12)))[:, :, :20, :30]
    assert slid.shape == (2, NUM_LABELS, 20, 30)
    torch.testing.assert_close(slid, expected)


@pytest.mark.parametrize(
    ("height", "width", "window", "stride", "crops_per_batch"),
    [
        (37, 53, (16, 24), (10, 13), 3),
        (20, 70, 32, 21, 2),
        (64, 33, (32, 16), (32, 11), 100),
        (45, 45, 16, 16, 1),
    ],
)
def test_matches_reference_slide_inference(height, width, window, stride, crops_per_batch):
    forward_fn = _contextual_forward_fn(seed=1)
    images = torch.randn(2, 3, height, width)
    pair = (window, window) if isinstance(window, int) else window
    stride_pair = (stride, stride) if isinstance(stride, int) else stride
    with torch.no_grad():
        slid = sliding_window_logits(forward_fn, images, NUM_LABELS, window, stride, crops_per_batch)
        expected = _reference_slide(forward_fn, images, pair, stride_pair)
    torch.testing.assert_close(slid, expected)


@pytest.mark.parametrize(("height", "width"), [(37, 53), (53, 37), (10, 90), (16, 16)])
def test_count_map_has_no_zeros(height, width):
    # Constant logits survive sum / count unchanged only if every pixel is covered by a window.
    def ones(x):
        return torch.ones(x.shape[0], NUM_LABELS, *x.shape[-2:])

    slid = sliding_window_logits(ones, torch.randn(1, 3, height, width), NUM_LABELS, window=16, stride=11)
    torch.testing.assert_close(slid, torch.ones(1, NUM_LABELS, height, width))


def test_bad_arguments_raise():
    images = torch.randn(1, 3, 16, 16)
    conv = nn.Conv2d(3, NUM_LABELS, 1)
    with pytest.raises(ValueError, match="stride"):
        sliding_window_logits(conv, images, NUM_LABELS, window=8, stride=9)
    with pytest.raises(ValueError, match="forward_fn returned"):
        sliding_window_logits(conv, images, NUM_LABELS + 1, window=8, stride=4)
    with pytest.raises(ValueError, match="pixel_values"):
        sliding_window_logits(conv, images[0], NUM_LABELS, window=8, stride=4)
