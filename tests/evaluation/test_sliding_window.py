import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densecl_vit.training.evaluation.sliding_window import sliding_window_logits, window_positions

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


def _reference_slide(forward_fn, images, window, stride, size_multiple=1):
    """mmseg's slide_inference, one window at a time over the whole batch: the crop is clipped to the image, and
    (for a model that needs multiples of `size_multiple`) padded at the bottom/right and its logits cropped back."""
    (h_crop, w_crop), (h_stride, w_stride) = window, stride
    _, _, h_img, w_img = images.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = torch.zeros(images.shape[0], NUM_LABELS, h_img, w_img)
    count = torch.zeros(images.shape[0], 1, h_img, w_img)
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * h_stride, w_idx * w_stride
            y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            crop = images[:, :, y1:y2, x1:x2]
            pad_h = (size_multiple - crop.shape[-2] % size_multiple) % size_multiple
            pad_w = (size_multiple - crop.shape[-1] % size_multiple) % size_multiple
            crop_logits = forward_fn(F.pad(crop, (0, pad_w, 0, pad_h)))[:, :, : y2 - y1, : x2 - x1]
            preds += F.pad(crop_logits, (x1, w_img - x2, y1, h_img - y2))
            count[:, :, y1:y2, x1:x2] += 1
    assert (count > 0).all()
    return preds / count


def _patch_model_forward_fn(patch: int = 8):
    """A model that takes only multiples of `patch` and whose logits depend on any padding (crop mean, ramp)."""
    contextual = _contextual_forward_fn(seed=2)

    def forward_fn(x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2] % patch == 0 and x.shape[-1] % patch == 0, x.shape
        return contextual(x)

    return forward_fn


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


def test_image_smaller_than_the_window_runs_as_itself():
    # As mmseg's slide inference: the window is clipped to the image, no zero padding reaches the model.
    forward_fn = _contextual_forward_fn()
    images = torch.randn(2, 3, 20, 30)
    with torch.no_grad():
        slid = sliding_window_logits(forward_fn, images, NUM_LABELS, window=32, stride=21)
        expected = forward_fn(images)
        padded_to_window = forward_fn(F.pad(images, (0, 2, 0, 12)))[:, :, :20, :30]
    assert slid.shape == (2, NUM_LABELS, 20, 30)
    torch.testing.assert_close(slid, expected)
    assert (slid - padded_to_window).abs().max() > 1e-2  # the model does depend on padding


def test_patch_model_gets_the_smallest_pad_to_a_multiple():
    forward_fn = _patch_model_forward_fn(patch=8)
    images = torch.randn(2, 3, 20, 30)
    with torch.no_grad():
        slid = sliding_window_logits(forward_fn, images, NUM_LABELS, window=32, stride=21, size_multiple=8)
        expected = forward_fn(F.pad(images, (0, 2, 0, 4)))[:, :, :20, :30]  # 24 x 32, not the 32 x 32 window
    torch.testing.assert_close(slid, expected)


@pytest.mark.parametrize(("height", "width"), [(20, 70), (70, 20), (45, 37)])
def test_patch_model_matches_reference_where_one_side_is_short(height, width):
    forward_fn = _patch_model_forward_fn(patch=8)
    images = torch.randn(2, 3, height, width)
    with torch.no_grad():
        slid = sliding_window_logits(
            forward_fn, images, NUM_LABELS, 32, 21, crops_per_batch=3, size_multiple=8
        )
        expected = _reference_slide(forward_fn, images, (32, 32), (21, 21), size_multiple=8)
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
    with pytest.raises(ValueError, match="size_multiple"):
        sliding_window_logits(conv, images, NUM_LABELS, window=8, stride=4, size_multiple=0)


def test_segmentation_logits_pads_a_clipped_window_to_the_patch_size(tiny):
    from densecl_vit import DenseCLViTForSemanticSegmentation
    from densecl_vit.training.tasks.segmentation_eval import segmentation_logits

    torch.manual_seed(3)
    model = DenseCLViTForSemanticSegmentation(tiny(num_labels=NUM_LABELS)).eval()  # patch 8
    images = torch.randn(
        2, 3, 20, 36
    )  # 20 rows: one window of 20, padded to 24; 36 columns: two windows of 32
    with torch.no_grad():
        slid = segmentation_logits(model, images, window=32, stride=16)
        expected = _reference_slide(lambda x: model(pixel_values=x).logits, images, (32, 32), (16, 16), 8)
    torch.testing.assert_close(slid, expected)
