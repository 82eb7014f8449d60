"""Joint (image, target) augmentations: alignment of image and target through rescale, crop, flip and
padding, determinism, mmseg's photometric distortion against a colorsys loop, and depth validity."""

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image

from densecl_vit.training.data.transforms.dense import (
    DepthAugment,
    DepthAugmentConfig,
    SegmentationAugment,
    SegmentationAugmentConfig,
    mask_invalid_depth,
    photometric_distortion,
)
from densecl_vit.training.data.transforms.two_view import IMAGENET_MEAN, IMAGENET_STD

PALETTE = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255]], np.uint8
)
IGNORE = 255


def block_labels(height, width, block=8, seed=0):
    """A label map of random classes on a grid of block x block squares."""
    grid = np.random.default_rng(seed).integers(0, len(PALETTE), (height // block + 1, width // block + 1))
    return np.kron(grid, np.ones((block, block), np.int64))[:height, :width]


def painted(label):
    """The image whose colour at every pixel is the palette colour of its label."""
    return Image.fromarray(PALETTE[label])


def to_uint8(pixel_values):
    """Un-normalise (3, h, w) pixel values back to (h, w, 3) levels in [0, 255]."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((pixel_values * std + mean) * 255.0).permute(1, 2, 0).numpy()


def seg_augment(**overrides):
    fields = dict(crop_size=(32, 32), scale_bounds=(128, 32), photometric=False, cat_max_ratio=1.0)
    fields.update(overrides)
    return SegmentationAugment(SegmentationAugmentConfig(**fields))


# --- segmentation -----------------------------------------------------------------------------------------


def test_segmentation_shapes_dtypes_and_determinism():
    label = block_labels(40, 56)
    augment = seg_augment(photometric=True, cat_max_ratio=0.75)
    x, y = augment(painted(label), label, np.random.default_rng(3))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (32, 32) and y.dtype == torch.int64
    x2, y2 = augment(painted(label), label, np.random.default_rng(3))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = augment(painted(label), label, np.random.default_rng(4))
    assert not torch.equal(x, x3)


@pytest.mark.parametrize("seed", range(6))
def test_crop_and_flip_keep_image_and_labels_aligned(seed):
    """Without rescaling (bounds equal to the image), every pixel's colour is its label's colour exactly."""
    label = block_labels(40, 56, block=3, seed=seed)
    augment = seg_augment(scale_bounds=(56, 40), scale_range=(1.0, 1.0))
    x, y = augment(painted(label), label, np.random.default_rng(seed))
    np.testing.assert_allclose(to_uint8(x), PALETTE[y.numpy()], atol=1e-3)


@pytest.mark.parametrize("seed", range(6))
def test_rescaled_image_and_labels_stay_aligned(seed):
    """With random rescaling (x0.5 to x1.33 here), the colour equals the label's colour wherever the 5x5
    label neighbourhood is uniform (elsewhere bilinear blending across a class boundary is expected), and
    nearly everywhere."""
    label = block_labels(48, 64, block=16, seed=seed)
    x, y = seg_augment(scale_range=(0.75, 2.0))(painted(label), label, np.random.default_rng(seed))
    colors, y = to_uint8(x), y.numpy()
    valid = y != IGNORE
    matches = np.abs(colors - PALETTE[np.where(valid, y, 0)]).max(-1) < 1.0
    padded = np.pad(y, 2, constant_values=-1)  # pixels near the crop border blend with unseen ones
    windows = np.lib.stride_tricks.sliding_window_view(padded, (5, 5))
    interior = valid & (windows.min((-2, -1)) == windows.max((-2, -1)))
    assert interior.sum() > 0.3 * valid.sum()
    assert matches[interior].all()
    assert matches[valid].mean() > 0.8


def test_padding_uses_zero_pixels_and_ignore_labels():
    label = block_labels(12, 20)
    x, y = seg_augment(scale_bounds=(20, 12), scale_range=(1.0, 1.0))(
        painted(label), label, np.random.default_rng(0)
    )
    assert x.shape == (3, 32, 32) and y.shape == (32, 32)
    assert (y[12:] == IGNORE).all() and (y[:, 20:] == IGNORE).all() and (y[:12, :20] != IGNORE).all()
    assert (x[:, 12:] == 0).all() and (x[:, :, 20:] == 0).all()


def test_flip_flips_image_and_labels_together():
    label = block_labels(40, 56, block=5)
    kwargs = dict(scale_bounds=(56, 40), scale_range=(1.0, 1.0), photometric=True)
    x0, y0 = seg_augment(flip_p=0.0, **kwargs)(painted(label), label, np.random.default_rng(1))
    x1, y1 = seg_augment(flip_p=1.0, **kwargs)(painted(label), label, np.random.default_rng(1))
    assert torch.equal(x1, x0.flip(-1)) and torch.equal(y1, y0.flip(-1))
    assert not torch.equal(y0, y1)


def test_cat_max_ratio_avoids_crops_dominated_by_one_class():
    label = np.zeros((64, 64), np.int64)
    label[:24] = 1  # a crop is balanced enough (< 75 % one class) for 15 of its 33 vertical offsets
    label[40:, :8] = IGNORE  # never counted
    image = painted(np.where(label == IGNORE, 0, label))

    def dominated_fraction(ratio):
        augment = seg_augment(scale_bounds=(64, 64), scale_range=(1.0, 1.0), cat_max_ratio=ratio)
        fractions = []
        for seed in range(40):
            y = augment(image, label, np.random.default_rng(seed))[1]
            counts = torch.bincount(y[y != IGNORE])
            fractions.append(counts.max().item() / counts.sum().item())
        return np.mean(np.array(fractions) >= 0.75)

    assert dominated_fraction(0.75) < 0.1
    assert dominated_fraction(1.0) > 0.3


def reference_photometric(image, rng, cfg):
    """mmseg's PhotoMetricDistortion as a per-pixel loop with colorsys, drawing like the implementation."""
    out = image.astype(np.float64)
    draws = rng.random(6)
    if draws[0] < 0.5:
        out = np.clip(out + rng.uniform(-cfg.brightness_delta, cfg.brightness_delta) / 255.0, 0, 1)
    contrast = rng.uniform(*cfg.contrast_range) if draws[2] < 0.5 else None
    if contrast is not None and draws[1] < 0.5:
        out = np.clip(out * contrast, 0, 1)
    saturation = rng.uniform(*cfg.saturation_range) if draws[3] < 0.5 else 1.0
    hue = rng.uniform(-cfg.hue_delta, cfg.hue_delta) / 180.0 if draws[4] < 0.5 else 0.0
    for index in np.ndindex(out.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*out[index])
        out[index] = colorsys.hsv_to_rgb((h + hue) % 1.0, min(s * saturation, 1.0), v)
    if contrast is not None and draws[1] >= 0.5:
        out = np.clip(out * contrast, 0, 1)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_photometric_distortion_matches_colorsys_reference(seed):
    cfg = SegmentationAugmentConfig()
    image = np.random.default_rng(100 + seed).random((4, 5, 3))
    x = torch.from_numpy(image).float().permute(2, 0, 1)[None]
    out = photometric_distortion(x.clone(), np.random.default_rng(seed), cfg)[0].permute(1, 2, 0).numpy()
    expected = reference_photometric(image.astype(np.float32), np.random.default_rng(seed), cfg)
    np.testing.assert_allclose(out, expected, atol=2e-5)


# --- depth ------------------------------------------------------------------------------------------------


def coordinate_pair(height, width):
    """An image whose red/green levels encode the column/row and a depth map that is a function of both."""
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.stack([cols * 4, rows * 4, np.full_like(rows, 128)], -1).astype(np.uint8)
    return Image.fromarray(image), (1.0 + cols / 10.0 + rows / 100.0).astype(np.float32)


def depth_of_colors(pixel_values):
    colors = np.rint(to_uint8(pixel_values)).astype(int)
    return 1.0 + colors[..., 0] / 4 / 10.0 + colors[..., 1] / 4 / 100.0


def test_depth_shapes_determinism_and_alignment():
    image, depth = coordinate_pair(40, 56)
    augment = DepthAugment(DepthAugmentConfig(crop_size=(32, 48), color_jitter=False))
    flips = set()
    for seed in range(6):
        x, d = augment(image, depth, np.random.default_rng(seed))
        assert x.shape == (3, 32, 48) and d.shape == (32, 48) and d.dtype == torch.float32
        np.testing.assert_allclose(d.numpy(), depth_of_colors(x), atol=1e-5)
        flips.add(bool(d[0, 0] > d[0, -1]))
        x2, d2 = augment(image, depth, np.random.default_rng(seed))
        assert torch.equal(x, x2) and torch.equal(d, d2)
    assert flips == {True, False}


def test_depth_jitter_changes_only_the_image():
    image, depth = coordinate_pair(40, 56)
    plain = DepthAugment(DepthAugmentConfig(crop_size=(32, 48), color_jitter=False))
    jitter = DepthAugment(DepthAugmentConfig(crop_size=(32, 48), jitter_p=1.0))
    x0, d0 = plain(image, depth, np.random.default_rng(2))
    x1, d1 = jitter(image, depth, np.random.default_rng(2))
    assert torch.equal(d0, d1) and not torch.allclose(x0, x1)


def test_small_depth_pairs_are_upscaled_with_nearest_neighbours():
    image, depth = coordinate_pair(20, 30)
    x, d = DepthAugment(DepthAugmentConfig(crop_size=(32, 48), color_jitter=False))(
        image, depth, np.random.default_rng(0)
    )
    assert x.shape == (3, 32, 48) and d.shape == (32, 48)
    assert np.isin(d.numpy(), depth).all()


def test_invalid_depth_becomes_zero():
    depth = np.full((32, 48), 2.0, np.float32)
    depth[0, :7] = [np.nan, np.inf, -np.inf, 0.0, -1.0, 5e-4, 12.0]
    depth[1, 0] = 10.0
    image = Image.fromarray(np.zeros((32, 48, 3), np.uint8))
    cfg = dict(crop_size=(32, 48), flip_p=0.0, color_jitter=False)
    _, only_finite = DepthAugment(DepthAugmentConfig(**cfg))(image, depth.copy(), np.random.default_rng(0))
    expected = np.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0)
    np.testing.assert_array_equal(only_finite.numpy(), expected)
    _, ranged = DepthAugment(DepthAugmentConfig(**cfg, min_depth=1e-3, max_depth=10.0))(
        image, depth.copy(), np.random.default_rng(0)
    )
    expected[(expected <= 1e-3) | (expected >= 10.0)] = 0.0
    np.testing.assert_array_equal(ranged.numpy(), expected)


def test_mask_invalid_depth_leaves_its_input_alone():
    depth = torch.tensor([[float("nan"), 0.5, 3.0, 20.0]])
    masked = mask_invalid_depth(depth, 1.0, 10.0)
    assert masked.tolist() == [[0.0, 0.0, 3.0, 0.0]]
    assert torch.isnan(depth[0, 0]) and depth[0, 3] == 20.0
