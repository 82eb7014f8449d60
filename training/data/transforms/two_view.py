"""Two-view SimCLR augmentation for pre-training, on the CPU or split between CPU and accelerator.

The policy is SimCLR's as used by the paper: random resized crop to `image_size`, horizontal flip, colour
jitter (p = 0.8), random grayscale (p = 0.2), Gaussian blur, ImageNet normalisation. Two paths share one
implementation of the colour math, `color_ops`, written for batches (B, 3, H, W) of floats in [0, 1]:

- `TwoViewTransform` (CPU, per sample) crops and resizes each view with one antialiased bilinear
  interpolation of the uint8 image, flips it, then runs the colour functions on it as a batch of one.
- With ``gpu_color=True`` the per-sample transform stops after crop/flip and returns uint8 views, and
  `BatchedColorAugment` applies jitter, grayscale, blur and normalisation to whole batches on any device.

Random parameters come from one uniform draw per sample, `COLOR_UNIFORMS` numbers wide, mapped by
`color_params_from_uniform`; the CPU path takes the uniforms from a NumPy generator (`host_color_params` maps
them as `TwoViewTransform` does), the batched path from a torch generator
(`sample_color_params_torch`), so both have the same parameter distributions. Jitter applies its four
operations in a random order per sample, as torchvision's ColorJitter does. Nothing here reads global
random state: a sample's views are a pure function of the generator (or seed) passed in, e.g.
``np.random.default_rng([seed, index])``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn

from .colour import (
    ColorParams,
    apply_color_params,
    apply_sample_color,
    normalize,
    to_float_batch,
    to_float_hwc,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COLOR_UNIFORMS = 12  # jitter?, 4 jitter factors, 4 order keys, grayscale?, blur?, sigma
CROP_ATTEMPTS = 10

RngLike = np.random.Generator | int | Sequence[int]


@dataclass
class SimCLRAugmentConfig:
    """Parameters of the two-view augmentation (defaults: SimCLR/DINO with colour strength s = 0.5).

    Args:
        image_size: side S of the square output views.
        crop_scale: range of the crop area as a fraction of the image area.
        crop_ratio: range of the crop aspect ratio (width / height), sampled log-uniformly.
        flip_p: probability of a horizontal flip.
        jitter_p: probability of applying colour jitter.
        brightness, contrast, saturation: jitter factors are uniform in [max(0, 1 - v), 1 + v]; 0 disables.
        hue: the hue shift is uniform in [-hue, hue] turns, hue <= 0.5; 0 disables.
        grayscale_p: probability of converting to grayscale (kept as three equal channels).
        blur_p: probability of Gaussian blur for (view 1, view 2); a float applies to both views.
            SimCLR uses 0.5 for both, BYOL and DINO (1.0, 0.1).
        blur_sigma: range of the blur standard deviation in pixels; the kernel has radius ceil(3 sigma).
        mean, std: per-channel normalisation of the output.
        gpu_color: if True, `TwoViewTransform` returns uint8 views after crop and flip, and the colour half
            runs batched in `BatchedColorAugment`.
    """

    image_size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: tuple[float, float] | float = (0.5, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    gpu_color: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.blur_p, int | float):
            self.blur_p = (float(self.blur_p), float(self.blur_p))
        self.blur_p = tuple(self.blur_p)
        for name in ("flip_p", "jitter_p", "grayscale_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if len(self.blur_p) != 2 or not all(0.0 <= p <= 1.0 for p in self.blur_p):
            raise ValueError(f"blur_p must be one probability or two in [0, 1], got {self.blur_p}")
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")
        if min(self.brightness, self.contrast, self.saturation) < 0 or not 0.0 <= self.hue <= 0.5:
            raise ValueError("brightness, contrast and saturation must be >= 0 and hue in [0, 0.5]")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {self.blur_sigma}")
        if self.image_size <= self.blur_radius:
            raise ValueError(
                f"image_size must exceed the blur radius {self.blur_radius}, got {self.image_size}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std must have 3 entries each, std > 0")

    @property
    def blur_radius(self) -> int:
        """Half-width of the blur kernel: 3 standard deviations of the widest blur."""
        return math.ceil(3.0 * self.blur_sigma[1])


def make_rng(rng: RngLike) -> np.random.Generator:
    """A NumPy generator from a generator (returned as is), a seed, or a seed sequence like [seed, index]."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


# --- random parameters ----------------------------------------------------------------------------------


def _uniform_fields(
    u: torch.Tensor | np.ndarray, cfg: SimCLRAugmentConfig, view: int | Sequence[int]
) -> dict[str, torch.Tensor | np.ndarray]:
    """The mapping of uniforms u (n, COLOR_UNIFORMS) to the `ColorParams` fields of view 0 or 1 (one view for
    all rows, or one per row), for torch tensors and NumPy arrays alike: the same float32 arithmetic."""
    if u.ndim != 2 or u.shape[1] != COLOR_UNIFORMS:
        raise ValueError(f"u must have shape (n, {COLOR_UNIFORMS}), got {tuple(u.shape)}")
    views = [view] * u.shape[0] if isinstance(view, int) else list(view)
    if len(views) != u.shape[0] or not set(views) <= {0, 1}:
        raise ValueError(f"view must be 0, 1 or one of them per row of u, got {view}")
    blur_p = [cfg.blur_p[v] for v in views]  # each row's blur probability
    # the order of the four jitter operations is the argsort of iid uniforms: a uniformly random permutation
    if isinstance(u, torch.Tensor):
        u, blur_p = u.float(), torch.tensor(blur_p, device=u.device)
        order = u[:, 5:9].argsort(dim=1, stable=True)
    else:
        u, blur_p = u.astype(np.float32, copy=False), np.array(blur_p, dtype=np.float32)
        order = u[:, 5:9].argsort(1, kind="stable")

    def factor(col: int, strength: float) -> torch.Tensor | np.ndarray:
        low = max(0.0, 1.0 - strength)
        return low + (1.0 + strength - low) * u[:, col]

    s_lo, s_hi = cfg.blur_sigma
    return {
        "jitter": u[:, 0] < cfg.jitter_p,
        "brightness": factor(1, cfg.brightness),
        "contrast": factor(2, cfg.contrast),
        "saturation": factor(3, cfg.saturation),
        "hue": cfg.hue * (2.0 * u[:, 4] - 1.0),
        "order": order,
        "grayscale": u[:, 9] < cfg.grayscale_p,
        "blur": u[:, 10] < blur_p,
        "sigma": s_lo + (s_hi - s_lo) * u[:, 11],
    }


def color_params_from_uniform(
    u: torch.Tensor, cfg: SimCLRAugmentConfig, view: int | Sequence[int]
) -> ColorParams:
    """Map uniforms u (n, COLOR_UNIFORMS) in [0, 1) to the colour parameters of view 0 or 1 (one view for
    all rows, or one per row)."""
    return ColorParams(**_uniform_fields(u, cfg, view))


def host_color_params(u: np.ndarray, cfg: SimCLRAugmentConfig, view: int | Sequence[int]) -> dict[str, list]:
    """`color_params_from_uniform` for a NumPy u (n, COLOR_UNIFORMS): the `ColorParams` fields as lists,
    ready for the per-sample path (a few NumPy calls instead of ~20 small torch operations)."""
    return {k: v.tolist() for k, v in _uniform_fields(u, cfg, view).items()}


def sample_color_params_torch(
    cfg: SimCLRAugmentConfig, n: int, view: int, generator: torch.Generator | None = None
) -> ColorParams:
    """Colour parameters of the batched path: uniforms from a torch generator, on its device (global RNG
    if None)."""
    device = generator.device if generator is not None else None
    u = torch.rand((n, COLOR_UNIFORMS), generator=generator, device=device)
    return color_params_from_uniform(u, cfg, view)


def sample_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """Random resized crop box (left, top, w, h), torchvision's RandomResizedCrop rule.

    Up to CROP_ATTEMPTS (area, log-ratio) draws; the first that fits is placed uniformly; otherwise a central
    crop with the aspect ratio clamped into `ratio`. Always consumes the same number of random numbers.
    """
    u = rng.random(4 * CROP_ATTEMPTS).tolist()  # Python scalars: faster than NumPy on 10 draws
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for k in range(0, 4 * CROP_ATTEMPTS, 4):
        area = width * height * (scale[0] + (scale[1] - scale[0]) * u[k])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[k + 1])
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u[k + 3] * (width - w + 1)), int(u[k + 2] * (height - h + 1)), w, h
    if width / height < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


# --- the two paths --------------------------------------------------------------------------------------


ImageLike = Image.Image | np.ndarray | torch.Tensor


def image_to_uint8_tensor(image: ImageLike) -> torch.Tensor:
    """A PIL image (any mode), an (H, W, 3) uint8 array or a (3, H, W) uint8 tensor -> (3, H, W) uint8 tensor.

    Arrays become channels-last views (no copy beyond PIL's export), which the resize reads directly.
    """
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"a tensor image must be uint8 (3, H, W), got {image.dtype} {tuple(image.shape)}"
            )
        return image
    if isinstance(image, Image.Image):
        image = np.array(image if image.mode == "RGB" else image.convert("RGB"))
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"an array image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    return torch.from_numpy(image if image.flags.writeable else image.copy()).permute(2, 0, 1)


class TwoViews(NamedTuple):
    """Two augmented views of one image and their geometry: each view is the crop box (left, top, width,
    height) of the source image, in source pixels, resized to (S, S) and then flipped horizontally if its flag
    is set. The boxes and flips are float32 (4,) and bool () tensors, so batches collate them like the views."""

    view_1: torch.Tensor
    view_2: torch.Tensor
    crop_box_1: torch.Tensor
    crop_box_2: torch.Tensor
    flip_1: torch.Tensor
    flip_2: torch.Tensor


class TwoViewTransform:
    """Image -> two augmented views (3, S, S): normalised float32, or uint8 when ``cfg.gpu_color``.

    Deterministic given `rng` (a NumPy generator, a seed, or a seed sequence such as [seed, index]).
    Crop and resize use torch's antialiased bilinear interpolation on uint8 (as torchvision's
    RandomResizedCrop with antialias=True, and about 3 times faster than PIL's resize here).
    """

    def __init__(self, cfg: SimCLRAugmentConfig | None = None) -> None:
        self.cfg = cfg or SimCLRAugmentConfig()

    def _crop_view(
        self, image: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, bool, tuple[int, int, int, int]]:
        """(3, H, W) uint8 -> random resized crop (1, 3, S, S) uint8, whether to flip it horizontally, and the
        crop box (left, top, width, height) in source pixels."""
        c = self.cfg
        height, width = image.shape[-2:]
        box = sample_crop_box(width, height, c.crop_scale, c.crop_ratio, rng)
        left, top, w, h = box
        crop = image[None, :, top : top + h, left : left + w]
        if not c.gpu_color:
            # A channels-last contiguous crop takes torch's vectorised uint8 resize (same values, ~40% less
            # time) but yields channels-last views: worth it when they are converted to float anyway.
            crop = crop.contiguous(memory_format=torch.channels_last)
        size = (c.image_size, c.image_size)
        view = torch.nn.functional.interpolate(
            crop, size=size, mode="bilinear", antialias=True, align_corners=False
        )
        return view, bool(rng.random() < c.flip_p), box

    def __call__(self, image: ImageLike, rng: RngLike) -> tuple[torch.Tensor, torch.Tensor]:
        views = self.sample(image, rng)
        return views.view_1, views.view_2

    def sample(self, image: ImageLike, rng: RngLike) -> TwoViews:
        """The two views and their geometry (crop boxes in source pixels, flips): what the dense loss matches."""
        rng = make_rng(rng)
        image = _pixels(image)
        crops = (self._crop_view(image, rng), self._crop_view(image, rng))
        boxes = tuple(torch.tensor(box, dtype=torch.float32) for _, _, box in crops)
        flips = tuple(torch.tensor(flip) for _, flip, _ in crops)
        if self.cfg.gpu_color:
            views = tuple((view.flip(-1) if flip else view)[0].contiguous() for view, flip, _ in crops)
            return TwoViews(*views, *boxes, *flips)
        host = host_color_params(rng.random((2, COLOR_UNIFORMS), dtype=np.float32), self.cfg, (0, 1))
        out = []
        for i, (view, flip, _) in enumerate(
            crops
        ):  # one at a time: a batch of one needs no per-sample indexing
            x = to_float_hwc(view[0].permute(1, 2, 0).numpy(), flip)  # (1, 3, S, S) float32
            x = apply_sample_color(x, {k: v[i] for k, v in host.items()})
            out.append(normalize(x, self.cfg.mean, self.cfg.std)[0])
        return TwoViews(out[0], out[1], *boxes, *flips)


def _pixels(image: ImageLike) -> torch.Tensor:
    """`image_to_uint8_tensor` without its second copy for RGB PIL images: the tensor then reads PIL's export,
    which NumPy marks read-only, so it must stay private to a transform that only reads it."""
    if not (isinstance(image, Image.Image) and image.mode == "RGB"):
        return image_to_uint8_tensor(image)
    with warnings.catch_warnings():  # torch warns (once) that writing to a read-only array is undefined
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)


class BatchedColorAugment(nn.Module):
    """The colour half of the augmentation for a batch of views, on the batch's device.

    forward(images (B, 3, S, S) uint8 or float in [0, 1], view (0 or 1, selects blur_p), generator)
    -> (B, 3, S, S) float32 normalised. Parameters are drawn per sample from `generator` (any device;
    torch's global generator if None) with `sample_color_params_torch`.
    """

    def __init__(self, cfg: SimCLRAugmentConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or SimCLRAugmentConfig()

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, view: int = 0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        if view not in (0, 1):
            raise ValueError(f"view must be 0 or 1, got {view}")
        p = sample_color_params_torch(self.cfg, images.shape[0], view, generator)
        x = apply_color_params(to_float_batch(images), p)
        return normalize(x, self.cfg.mean, self.cfg.std)


def naive_torchvision_two_view(cfg: SimCLRAugmentConfig | None = None) -> Callable:
    """The straightforward torchvision v2 pipeline of the same policy (PIL ops, global RNG): a benchmark
    baseline. Returns image -> (view1, view2)."""
    from torchvision.transforms import v2  # the benchmark's baseline only: training never loads it

    c = cfg or SimCLRAugmentConfig()

    def one_view(blur_p: float) -> Callable:
        kernel = 2 * c.blur_radius + 1
        return v2.Compose([
            v2.RandomResizedCrop(c.image_size, scale=c.crop_scale, ratio=c.crop_ratio, antialias=True),
            v2.RandomHorizontalFlip(c.flip_p),
            v2.RandomApply([v2.ColorJitter(c.brightness, c.contrast, c.saturation, c.hue)], p=c.jitter_p),
            v2.RandomGrayscale(c.grayscale_p),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=c.blur_sigma)], p=blur_p),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(c.mean, c.std),
        ])  # fmt: skip

    first, second = one_view(c.blur_p[0]), one_view(c.blur_p[1])
    return lambda image: (first(image), second(image))


__all__ = [
    "COLOR_UNIFORMS",
    "CROP_ATTEMPTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BatchedColorAugment",
    "ImageLike",
    "RngLike",
    "SimCLRAugmentConfig",
    "TwoViewTransform",
    "TwoViews",
    "color_params_from_uniform",
    "host_color_params",
    "image_to_uint8_tensor",
    "make_rng",
    "naive_torchvision_two_view",
    "sample_color_params_torch",
    "sample_crop_box",
]
