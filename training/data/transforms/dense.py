"""Joint augmentations for dense prediction: the image and its label map or depth map move together.

- `SegmentationAugment` (mmsegmentation's ADE20K training pipeline): keep-ratio rescale to fit `scale_bounds`
  times a random factor in `scale_range`, random crop that re-draws (up to 10 times) while one class covers more
  than `cat_max_ratio` of it, horizontal flip, photometric distortion (brightness, contrast, saturation, hue as
  mmseg's `PhotoMetricDistortion`), normalisation, padding to the crop (image 0, labels `ignore_index`).
- `DepthAugment` (the BTS / AdaBins NYU recipe): upscale when smaller than the crop, random crop, horizontal
  flip, colour jitter (gamma, brightness, per-channel colour, with probability 0.5) on the image only;
  invalid depth (non-finite, or outside the configured range) becomes 0 (`mask_invalid_depth`).

Images are resampled bilinearly, label maps and depth maps with nearest neighbours (no invented classes, no
blending of valid depth with invalid zeros). Everything random comes from the `rng` passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .colour import adjust_hsv, normalize, to_float_hwc
from .two_view import IMAGENET_MEAN, IMAGENET_STD

CROP_ATTEMPTS = 10


def _to_float(image: PIL.Image.Image, flip: bool = False) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float32 in [0, 1], mirrored left-right if `flip`."""
    return to_float_hwc(np.asarray(image, dtype=np.uint8), flip)


def _crop_target(target: np.ndarray, box: tuple[int, int, int, int], flip: bool, dtype: type) -> torch.Tensor:
    """The (top, left, bottom, right) crop of an (H, W) target as a new `dtype` tensor, mirrored if `flip`."""
    top, left, bottom, right = box
    crop = target[top:bottom, left:right]
    return torch.from_numpy(np.ascontiguousarray(crop[:, ::-1] if flip else crop, dtype=dtype))


def _crop_image(image: PIL.Image.Image, box: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
    """The (top, left, bottom, right) crop of an RGB image as `_to_float` gives it (only the crop is
    converted)."""
    top, left, bottom, right = box
    return _to_float(image.crop((left, top, right, bottom)), flip)


def _resize_pair(
    image: PIL.Image.Image, target: np.ndarray, size: tuple[int, int]
) -> tuple[PIL.Image.Image, np.ndarray]:
    """Resize an image (bilinear) and its (H, W) target (nearest) to size = (width, height)."""
    if size == image.size:
        return image, target
    image = image.resize(size, PIL.Image.BILINEAR)
    rows = np.minimum((np.arange(size[1]) + 0.5) * target.shape[0] / size[1], target.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(size[0]) + 0.5) * target.shape[1] / size[0], target.shape[1] - 1).astype(int)
    return image, target[rows[:, None], cols[None, :]]


def keep_ratio_size(width: int, height: int, bounds: tuple[float, float]) -> tuple[int, int]:
    """(width, height) scaled with the aspect ratio kept so that the long side is <= bounds[0] and the short side
    <= bounds[1], one of them equal (mmseg's keep-ratio Resize)."""
    scale = min(bounds[0] / max(width, height), bounds[1] / min(width, height))
    return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))


def rescale_within(image: PIL.Image.Image, bounds: tuple[float, float]) -> PIL.Image.Image:
    """Keep-ratio bilinear resize of an image to fit (long, short) `bounds` (evaluation's rescale)."""
    size = keep_ratio_size(*image.size, bounds)
    return image if size == image.size else image.resize(size, PIL.Image.BILINEAR)


def to_pixel_values(image: PIL.Image.Image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """RGB image -> normalised float32 (3, H, W)."""
    return normalize(_to_float(image), mean, std)[0]


def _crop_box(
    rng: np.random.Generator, height: int, width: int, crop: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of a random crop of at most `crop` = (h, w) inside the image."""
    crop_h, crop_w = min(crop[0], height), min(crop[1], width)
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    return top, left, top + crop_h, left + crop_w


@dataclass
class SegmentationAugmentConfig:
    """Parameters of `SegmentationAugment` (defaults: mmsegmentation's ADE20K 512x512 recipe).

    Args:
        crop_size: (height, width) of the output.
        scale_bounds: (long, short) side bounds the image is rescaled to fit, keeping its aspect ratio.
        scale_range: random factor applied to `scale_bounds`.
        cat_max_ratio: largest fraction of a crop one class may cover; 1 disables the re-draws.
        ignore_index: label of padded and ignored pixels (never counted by `cat_max_ratio`).
        flip_p: probability of a horizontal flip.
        photometric: apply the photometric distortion.
        brightness_delta: brightness shift range in 8-bit levels; contrast_range, saturation_range: factors;
            hue_delta: hue shift range in OpenCV hue units (180 per turn).
    """

    crop_size: tuple[int, int] = (512, 512)
    scale_bounds: tuple[int, int] = (2048, 512)
    scale_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    ignore_index: int = 255
    flip_p: float = 0.5
    photometric: bool = True
    brightness_delta: float = 32.0
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: float = 18.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def photometric_distortion(
    x: torch.Tensor, rng: np.random.Generator, cfg: SegmentationAugmentConfig
) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on x (1, 3, H, W) in [0, 1]: each step with probability 0.5, contrast
    before or after the HSV steps (probability 0.5), values clipped to [0, 1] after every step."""
    draws = rng.random(6)
    if draws[0] < 0.5:
        x = x.add_(rng.uniform(-cfg.brightness_delta, cfg.brightness_delta) / 255.0).clamp_(0.0, 1.0)
    contrast_first = draws[1] < 0.5
    contrast = rng.uniform(*cfg.contrast_range) if draws[2] < 0.5 else None
    if contrast is not None and contrast_first:
        x = x.mul_(contrast).clamp_(0.0, 1.0)
    saturation = rng.uniform(*cfg.saturation_range) if draws[3] < 0.5 else 1.0
    hue = rng.uniform(-cfg.hue_delta, cfg.hue_delta) / 180.0 if draws[4] < 0.5 else 0.0
    if saturation != 1.0 or hue != 0.0:
        x = adjust_hsv(x, hue_shift=float(hue), saturation_scale=float(saturation)).clamp_(0.0, 1.0)
    if contrast is not None and not contrast_first:
        x = x.mul_(contrast).clamp_(0.0, 1.0)
    return x


class SegmentationAugment:
    """(RGB image, (H, W) int label map, rng) -> (pixel_values (3, h, w) float32, labels (h, w) int64) at the crop size."""

    def __init__(self, cfg: SegmentationAugmentConfig | None = None):
        self.cfg = cfg or SegmentationAugmentConfig()

    def _rescale(self, image: PIL.Image.Image, label: np.ndarray, rng: np.random.Generator):
        ratio = rng.uniform(*self.cfg.scale_range)
        bounds = (self.cfg.scale_bounds[0] * ratio, self.cfg.scale_bounds[1] * ratio)
        return _resize_pair(image, label, keep_ratio_size(*image.size, bounds))

    def _crop(self, label: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int, int]:
        box = _crop_box(rng, *label.shape, self.cfg.crop_size)
        if self.cfg.cat_max_ratio >= 1.0:
            return box
        for _ in range(CROP_ATTEMPTS - 1):
            top, left, bottom, right = box
            values = label[top:bottom, left:right]
            counts = np.bincount(values[values != self.cfg.ignore_index].ravel())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cfg.cat_max_ratio:
                break
            box = _crop_box(rng, *label.shape, self.cfg.crop_size)
        return box

    def __call__(
        self, image: PIL.Image.Image, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        image, label = self._rescale(image, label, rng)
        box = self._crop(label, rng)
        flip = rng.random() < cfg.flip_p
        x, y = _crop_image(image, box, flip), _crop_target(label, box, flip, np.int64)
        if cfg.photometric:
            x = photometric_distortion(x, rng, cfg)
        x = normalize(x, cfg.mean, cfg.std)[0]
        pad_h, pad_w = cfg.crop_size[0] - x.shape[1], cfg.crop_size[1] - x.shape[2]
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
            y = F.pad(y, (0, pad_w, 0, pad_h), value=cfg.ignore_index)
        return x, y


@dataclass
class DepthAugmentConfig:
    """Parameters of `DepthAugment` (defaults: BTS's NYU-Depth V2 recipe).

    Args:
        crop_size: (height, width) of the output; smaller inputs are first upscaled to cover it.
        flip_p: probability of a horizontal flip.
        color_jitter: apply, with probability `jitter_p`, gamma, brightness and per-channel colour factors drawn
            uniformly from `gamma_range`, `brightness_range` and `color_range`.
        min_depth, max_depth: depth <= min_depth or >= max_depth becomes 0 (invalid); None skips that bound.
            Non-finite depth always becomes 0.
    """

    crop_size: tuple[int, int] = (416, 544)
    flip_p: float = 0.5
    color_jitter: bool = True
    jitter_p: float = 0.5
    gamma_range: tuple[float, float] = (0.9, 1.1)
    brightness_range: tuple[float, float] = (0.75, 1.25)
    color_range: tuple[float, float] = (0.9, 1.1)
    min_depth: float | None = None
    max_depth: float | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def mask_invalid_depth(
    depth: torch.Tensor, min_depth: float | None = None, max_depth: float | None = None
) -> torch.Tensor:
    """A copy of depth with non-finite values, values <= min_depth and values >= max_depth set to 0 (invalid)."""
    invalid = ~torch.isfinite(depth)
    if min_depth is not None:
        invalid |= depth <= min_depth
    if max_depth is not None:
        invalid |= depth >= max_depth
    return depth.masked_fill(invalid, 0.0)


class DepthAugment:
    """(RGB image, (H, W) depth in metres, rng) -> (pixel_values (3, h, w) float32, depth (h, w) float32)."""

    def __init__(self, cfg: DepthAugmentConfig | None = None):
        self.cfg = cfg or DepthAugmentConfig()

    def _jitter(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        cfg = self.cfg
        if rng.random() >= cfg.jitter_p:
            return x
        gamma, brightness = rng.uniform(*cfg.gamma_range), rng.uniform(*cfg.brightness_range)
        colors = torch.tensor(rng.uniform(*cfg.color_range, size=3), dtype=x.dtype).view(1, 3, 1, 1)
        return x.pow_(gamma).mul_(brightness).mul_(colors).clamp_(0.0, 1.0)

    def __call__(
        self, image: PIL.Image.Image, depth: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        width, height = image.size
        scale = max(cfg.crop_size[0] / height, cfg.crop_size[1] / width, 1.0)
        if scale > 1.0:
            image, depth = _resize_pair(
                image, depth, (int(np.ceil(width * scale)), int(np.ceil(height * scale)))
            )
        box = _crop_box(rng, depth.shape[0], depth.shape[1], cfg.crop_size)
        flip = rng.random() < cfg.flip_p
        x, y = _crop_image(image, box, flip), _crop_target(depth, box, flip, np.float32)
        if cfg.color_jitter:
            x = self._jitter(x, rng)
        y = mask_invalid_depth(y, cfg.min_depth, cfg.max_depth)
        return normalize(x, cfg.mean, cfg.std)[0], y
