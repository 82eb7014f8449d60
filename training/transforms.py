"""Two-view SimCLR augmentation for pre-training, on the CPU or split between CPU and accelerator.

The policy is SimCLR's as used by the paper: random resized crop to `image_size`, horizontal flip, colour
jitter (p = 0.8), random grayscale (p = 0.2), Gaussian blur, ImageNet normalisation. Two paths share one
implementation of the colour math, written for batches (B, 3, H, W) of floats in [0, 1]:

- `TwoViewTransform` (CPU, per sample) crops and resizes with PIL in a single call per view, then runs the
  colour functions on the two views as a batch of two.
- With ``gpu_color=True`` the per-sample transform stops after crop/flip and returns uint8 views, and
  `BatchedColorAugment` applies jitter, grayscale, blur and normalisation to whole batches on any device.

Random parameters come from one uniform draw per sample, `COLOR_UNIFORMS` numbers wide, mapped by
`color_params_from_uniform`; the CPU path takes the uniforms from a NumPy generator
(`sample_color_params`), the batched path from a torch generator (`sample_color_params_torch`), so both
have the same parameter distributions. Jitter applies its four operations in a random order per sample,
as torchvision's ColorJitter does. Nothing here reads global random state: a sample's views are a pure
function of the generator (or seed) passed in, e.g. ``np.random.default_rng([seed, index])``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
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
        blur_sigma: range of the blur standard deviation in pixels; the kernel has radius ceil(3 * max).
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
            raise ValueError(f"image_size must exceed the blur radius {self.blur_radius}, got {self.image_size}")
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


@dataclass
class ColorParams:
    """Per-sample colour parameters of a batch of n images; every field has leading size n.

    `order` (n, 4) is a permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue) per sample;
    `hue` is in turns; `sigma` is in pixels and only used where `blur` is True.
    """

    jitter: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    order: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor


def color_params_from_uniform(u: torch.Tensor, cfg: SimCLRAugmentConfig, view: int) -> ColorParams:
    """Map uniforms u (n, COLOR_UNIFORMS) in [0, 1) to the colour parameters of view 0 or 1."""
    if u.ndim != 2 or u.shape[1] != COLOR_UNIFORMS:
        raise ValueError(f"u must have shape (n, {COLOR_UNIFORMS}), got {tuple(u.shape)}")
    u = u.float()

    def factor(col: int, strength: float) -> torch.Tensor:
        low = max(0.0, 1.0 - strength)
        return low + (1.0 + strength - low) * u[:, col]

    s_lo, s_hi = cfg.blur_sigma
    return ColorParams(
        jitter=u[:, 0] < cfg.jitter_p,
        brightness=factor(1, cfg.brightness),
        contrast=factor(2, cfg.contrast),
        saturation=factor(3, cfg.saturation),
        hue=cfg.hue * (2.0 * u[:, 4] - 1.0),
        order=u[:, 5:9].argsort(dim=1),  # argsort of iid uniforms: a uniformly random permutation
        grayscale=u[:, 9] < cfg.grayscale_p,
        blur=u[:, 10] < cfg.blur_p[view],
        sigma=s_lo + (s_hi - s_lo) * u[:, 11],
    )


def sample_color_params(cfg: SimCLRAugmentConfig, n: int, view: int, rng: RngLike) -> ColorParams:
    """Colour parameters of the CPU path: uniforms from a NumPy generator."""
    u = torch.from_numpy(make_rng(rng).random((n, COLOR_UNIFORMS), dtype=np.float32))
    return color_params_from_uniform(u, cfg, view)


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
    u = rng.random((CROP_ATTEMPTS, 4))
    area = width * height * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    ws = np.round(np.sqrt(area * aspect)).astype(np.int64)
    hs = np.round(np.sqrt(area / aspect)).astype(np.int64)
    fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    if fits.any():
        k = int(np.argmax(fits))
        w, h = int(ws[k]), int(hs[k])
        return int(u[k, 3] * (width - w + 1)), int(u[k, 2] * (height - h + 1)), w, h
    if width / height < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


# --- colour math on batches (B, 3, H, W) of floats in [0, 1] ----------------------------------------------


def _per_sample(v: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) tensor as (B, 1, 1, 1) on x's device and dtype."""
    return torch.as_tensor(v, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of x (B, 3, H, W) -> (B, 1, H, W)."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Scale intensities by `factor` (scalar or (B,)), clipped to [0, 1]."""
    return (x * _per_sample(factor, x)).clamp_(0.0, 1.0)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    f = _per_sample(factor, x)
    return (x * f).add_(other * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend with each image's mean luma (torchvision's adjust_contrast)."""
    return _blend(x, rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend with the per-pixel luma (torchvision's adjust_saturation)."""
    return _blend(x, rgb_to_grayscale(x), factor)


def adjust_hsv(
    x: torch.Tensor, hue_shift: torch.Tensor | float = 0.0, saturation_scale: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """Rotate HSV hue by `hue_shift` turns and scale HSV saturation (clipped to 1), value kept.

    Equal to RGB -> HSV -> RGB as in torchvision's adjust_hue, written with the closed form
    channel_n = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + 6 H) mod 6, n = 5, 3, 1 for R, G, B.
    Branch-free arithmetic only (sign, floor): boolean masks and `torch.where` are slow on CPU.
    """
    r, g, b = x.unbind(1)  # (B, H, W) each
    value = torch.maximum(torch.maximum(r, g), b)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    inv = chroma.clamp_min(1e-12).reciprocal_()  # where chroma = 0 the hue is irrelevant
    r_max = torch.sign(r - value).add_(1.0)  # 1 where r is the maximum, else 0
    g_max = torch.sign(g - value).add_(1.0).mul_(1.0 - r_max)
    b_max = 1.0 - r_max - g_max
    h6 = ((g - b) * r_max).add_((b - r).add_(2.0 * chroma).mul_(g_max)).add_((r - g).add_(4.0 * chroma).mul_(b_max))
    h6 = h6.mul_(inv).unsqueeze(1) + 6.0 * _per_sample(hue_shift, x)  # (B, 1, H, W), sextants
    offsets = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = (h6 + offsets).mul_(1.0 / 6.0)
    k = k.sub_(torch.floor(k)).mul_(6.0)  # (B, 3, H, W) in [0, 6)
    tri = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    value = value.unsqueeze(1)
    chroma = torch.minimum(chroma.unsqueeze(1) * _per_sample(saturation_scale, x), value)
    return value - chroma * tri


def adjust_hue(x: torch.Tensor, shift: torch.Tensor | float) -> torch.Tensor:
    """Rotate hue by `shift` turns (scalar or (B,)), in [-0.5, 0.5]."""
    return adjust_hsv(x, hue_shift=shift)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor | float, radius: int) -> torch.Tensor:
    """Separable Gaussian blur of x (B, C, H, W), per-sample sigma (scalar or (B,)), reflect padding.

    The kernel has 2 * radius + 1 taps exp(-t^2 / (2 sigma^2)) normalised to sum 1 (torchvision's kernel);
    it is applied as symmetric sums of shifted slices, faster on CPU than a depthwise convolution.
    """
    taps = torch.arange(radius + 1, dtype=x.dtype, device=x.device)
    s = _per_sample(sigma, x).reshape(-1, 1)
    w = torch.exp(-0.5 * (taps / s) ** 2)  # (B, radius + 1), w[:, k] is the weight of offsets +-k
    w = w / (2.0 * w.sum(dim=1, keepdim=True) - w[:, :1])
    w = w.reshape(w.shape[0], 1, 1, 1, radius + 1)
    height, width = x.shape[-2:]
    y = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="reflect")
    out = y[..., radius : radius + width] * w[..., 0]
    for k in range(1, radius + 1):
        out.addcmul_(y[..., radius + k : radius + k + width] + y[..., radius - k : radius - k + width], w[..., k])
    res = out[..., radius : radius + height, :] * w[..., 0]
    for k in range(1, radius + 1):
        res.addcmul_(out[..., radius + k : radius + k + height, :] + out[..., radius - k : radius - k + height, :], w[..., k])
    return res


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel, in place on x (B, 3, H, W)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)


_JITTER_OPS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    adjust_hue,
)


def _apply_rows(x: torch.Tensor, rows: torch.Tensor, fn: Callable, *args: torch.Tensor) -> torch.Tensor:
    """x with fn applied to the rows `rows` (a CPU index tensor); args are per-row (B,) parameters."""
    if rows.numel() == 0:
        return x
    if rows.numel() == x.shape[0]:
        return fn(x, *(a.to(x.device) for a in args))
    idx = rows.to(x.device)
    x[idx] = fn(x[idx], *(a[rows].to(x.device) for a in args))
    return x


def apply_color_params(x: torch.Tensor, p: ColorParams, blur_radius: int) -> torch.Tensor:
    """Jitter (random order per sample), grayscale and blur x (B, 3, H, W) in [0, 1] as `p` says.

    Returns a float tensor in [0, 1]; x may be overwritten. Parameters may live on another device.
    """
    p = ColorParams(**{k: v.cpu() for k, v in vars(p).items()})
    factors = (p.brightness, p.contrast, p.saturation, p.hue)
    identity = (1.0, 1.0, 1.0, 0.0)
    jittered = p.jitter.nonzero().squeeze(1)
    for slot in range(4):
        for op, fn in enumerate(_JITTER_OPS):
            if bool((factors[op][jittered] == identity[op]).all()):
                continue  # a disabled operation (strength 0) or no sample to change
            rows = jittered[p.order[jittered, slot] == op]
            x = _apply_rows(x, rows, fn, factors[op])
    x = _apply_rows(x, p.grayscale.nonzero().squeeze(1), lambda t: rgb_to_grayscale(t).expand_as(t))
    blur = lambda t, s: gaussian_blur(t, s, blur_radius)  # noqa: E731
    return _apply_rows(x, p.blur.nonzero().squeeze(1), blur, p.sigma)


def to_float_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float32 in [0, 1]; a float batch is copied as float32."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).mul_(1.0 / 255.0)
    return images.to(torch.float32, copy=True)


# --- the two paths --------------------------------------------------------------------------------------


class TwoViewTransform:
    """PIL image -> two augmented views (3, S, S): normalised float32, or uint8 when ``cfg.gpu_color``.

    Deterministic given `rng` (a NumPy generator, a seed, or a seed sequence such as [seed, index]).
    """

    def __init__(self, cfg: SimCLRAugmentConfig | None = None) -> None:
        self.cfg = cfg or SimCLRAugmentConfig()

    def _crop_view(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        c = self.cfg
        left, top, w, h = sample_crop_box(image.width, image.height, c.crop_scale, c.crop_ratio, rng)
        view = image.resize((c.image_size, c.image_size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        if rng.random() < c.flip_p:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(view)

    def __call__(self, image: Image.Image, rng: RngLike) -> tuple[torch.Tensor, torch.Tensor]:
        rng = make_rng(rng)
        if image.mode != "RGB":
            image = image.convert("RGB")
        pair = np.stack([self._crop_view(image, rng), self._crop_view(image, rng)])  # (2, S, S, 3)
        views = torch.from_numpy(pair).permute(0, 3, 1, 2)
        if self.cfg.gpu_color:
            return views[0].contiguous(), views[1].contiguous()
        x = torch.empty(views.shape, dtype=torch.float32).copy_(views).mul_(1.0 / 255.0)
        u = rng.random((2, COLOR_UNIFORMS), dtype=np.float32)
        for view in (0, 1):
            p = color_params_from_uniform(torch.from_numpy(u[view : view + 1]), self.cfg, view)
            x[view : view + 1] = apply_color_params(x[view : view + 1], p, self.cfg.blur_radius)
        x = normalize(x, self.cfg.mean, self.cfg.std)
        return x[0], x[1]


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
        x = apply_color_params(to_float_batch(images), p, self.cfg.blur_radius)
        return normalize(x, self.cfg.mean, self.cfg.std)


def naive_torchvision_two_view(cfg: SimCLRAugmentConfig | None = None) -> Callable:
    """The straightforward torchvision v2 pipeline of the same policy (PIL ops, global RNG): a benchmark
    baseline. Returns image -> (view1, view2)."""
    from torchvision.transforms import v2

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


def benchmark_two_view(
    cfg: SimCLRAugmentConfig | None = None, num_images: int = 200, size: tuple[int, int] = (500, 375)
) -> dict[str, float]:
    """Two-view images per second, one thread, from a decoded PIL image of `size` (w, h): this module's
    CPU path, its crop-only part (``gpu_color``) and the naive torchvision pipeline."""
    cfg = cfg or SimCLRAugmentConfig()
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 17.0 + yy / 23.0)], axis=-1)
    noise = rng.normal(0.0, 0.05, (h, w, 3))
    image = Image.fromarray((255 * np.clip(smooth + noise, 0, 1)).astype(np.uint8))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fns = {
        "two_view_per_s": lambda i, t=TwoViewTransform(cfg): t(image, [0, i]),
        "crop_only_per_s": lambda i, t=TwoViewTransform(SimCLRAugmentConfig(**{**vars(cfg), "gpu_color": True})): t(
            image, [0, i]
        ),
        "naive_torchvision_per_s": lambda i, t=naive_torchvision_two_view(cfg): t(image),
    }
    rates = {}
    try:
        for name, fn in fns.items():
            fn(0)
            start = time.perf_counter()
            for i in range(num_images):
                fn(i)
            rates[name] = num_images / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    rates["speedup"] = rates["two_view_per_s"] / rates["naive_torchvision_per_s"]
    return rates


if __name__ == "__main__":
    print(json.dumps(benchmark_two_view(), indent=2))
