"""Two-view SimCLR augmentation for pre-training, on the CPU or split between CPU and accelerator.

The policy is SimCLR's as used by the paper: random resized crop to `image_size`, horizontal flip, colour
jitter (p = 0.8), random grayscale (p = 0.2), Gaussian blur, ImageNet normalisation. Two paths share one
implementation of the colour math, written for batches (B, 3, H, W) of floats in [0, 1]:

- `TwoViewTransform` (CPU, per sample) crops and resizes each view with one antialiased bilinear
  interpolation of the uint8 image, flips it, then runs the colour functions on it as a batch of one.
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

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # luma weights of torchvision's rgb_to_grayscale
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


def color_params_from_uniform(
    u: torch.Tensor, cfg: SimCLRAugmentConfig, view: int | Sequence[int]
) -> ColorParams:
    """Map uniforms u (n, COLOR_UNIFORMS) in [0, 1) to the colour parameters of view 0 or 1 (one view for
    all rows, or one per row)."""
    if u.ndim != 2 or u.shape[1] != COLOR_UNIFORMS:
        raise ValueError(f"u must have shape (n, {COLOR_UNIFORMS}), got {tuple(u.shape)}")
    u = u.float()
    views = [view] * u.shape[0] if isinstance(view, int) else list(view)
    if len(views) != u.shape[0] or not set(views) <= {0, 1}:
        raise ValueError(f"view must be 0, 1 or one of them per row of u, got {view}")
    blur_p = torch.tensor([cfg.blur_p[v] for v in views], device=u.device)

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
        blur=u[:, 10] < blur_p,
        sigma=s_lo + (s_hi - s_lo) * u[:, 11],
    )


def sample_color_params(
    cfg: SimCLRAugmentConfig, n: int, view: int | Sequence[int], rng: RngLike
) -> ColorParams:
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


# --- colour math on batches (B, 3, H, W) of floats in [0, 1] ----------------------------------------------
# Parameters are Python floats (one value for the batch: the cheapest form for the per-sample CPU path) or
# (B,) tensors. The functions may overwrite x, avoiding fresh buffers (on CPU, page faults on new memory
# cost as much as the arithmetic); always use the returned tensor.

Param = torch.Tensor | float


def _per_sample(v: Param, x: torch.Tensor) -> Param:
    """A float as is, a (B,) tensor as (B, 1, 1, 1) on x's device and dtype."""
    if isinstance(v, float | int):
        return float(v)
    return v.to(x.device, x.dtype).reshape(-1, 1, 1, 1)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached (1, C, 1, 1) tensor of per-channel constants."""
    return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of x (B, 3, H, W) -> (B, 1, H, W), a new tensor."""
    r, g, b = x.unbind(1)
    return (
        torch.mul(r, GRAY_WEIGHTS[0])
        .add_(g, alpha=GRAY_WEIGHTS[1])
        .add_(b, alpha=GRAY_WEIGHTS[2])
        .unsqueeze(1)
    )


def adjust_brightness(x: torch.Tensor, factor: Param) -> torch.Tensor:
    """Scale intensities by `factor`, clipped to [0, 1]."""
    return x.mul_(_per_sample(factor, x)).clamp_(0.0, 1.0)


def _blend_(x: torch.Tensor, other: torch.Tensor, factor: Param) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clipped; `other` (B, 1, H, W) or (B, 1, 1, 1) is overwritten."""
    f = _per_sample(factor, x)
    return x.mul_(f).add_(other.mul_(1.0 - f)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: Param) -> torch.Tensor:
    """Blend with each image's mean luma (torchvision's adjust_contrast)."""
    return _blend_(x, rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: Param) -> torch.Tensor:
    """Blend with the per-pixel luma (torchvision's adjust_saturation)."""
    return _blend_(x, rgb_to_grayscale(x), factor)


def adjust_hsv(x: torch.Tensor, hue_shift: Param = 0.0, saturation_scale: Param = 1.0) -> torch.Tensor:
    """Rotate HSV hue by `hue_shift` turns (in [-0.5, 0.5]) and scale HSV saturation (clipped to 1).

    Equal to RGB -> HSV -> RGB as in torchvision's adjust_hue, through the closed form
    channel = V - C clamp(2 - |k - 2|, 0, 1), k = (n + 6 H) mod 6 with n = 5, 3, 1 for R, G, B, where V is
    the max and C the max minus the min of the pixel. Branch-free arithmetic (sign, frac): boolean masks
    and `torch.where` are slow on CPU.
    """
    r, g, b = x.unbind(1)  # (B, H, W) each
    value = torch.maximum(r, g)
    torch.maximum(value, b, out=value)
    chroma = torch.minimum(r, g)
    torch.minimum(chroma, b, out=chroma)
    torch.sub(value, chroma, out=chroma)
    r_max = torch.sub(r, value).sign_().add_(1.0)  # 1 where r is the maximum, else 0
    g_max = torch.sub(g, value).sign_().add_(1.0)
    g_max.addcmul_(g_max, r_max, value=-1.0)  # 1 where g is the maximum and r is not
    # 6 H C = (g - b) where r is the max, (b - r) + 2 C where g is, else (r - g) + 4 C
    h6 = torch.sub(r, g).add_(chroma, alpha=4.0)
    h6.addcmul_(torch.sub(g, b).sub_(h6), r_max).addcmul_(
        torch.sub(b, r).add_(chroma, alpha=2.0).sub_(h6), g_max
    )
    # the shifted hue in turns (any value where C = 0), then k / 6 per channel; the offsets n/6 + 1 keep
    # it positive so that frac is the mod: (B, 3, H, W) in [0, 1)
    turns = h6.div_(chroma.clamp_min(1e-12)).mul_(1.0 / 6.0).unsqueeze(1).add_(_per_sample(hue_shift, x))
    k = turns.add(_constant((11 / 6, 9 / 6, 7 / 6), x.dtype, x.device)).frac_()
    value, chroma = value.unsqueeze(1), chroma.unsqueeze(1)
    if not (isinstance(saturation_scale, float) and saturation_scale == 1.0):
        chroma = torch.minimum(chroma.mul_(_per_sample(saturation_scale, x)), value)
    # V - C clamp(2 - 6 |k - 1/3|, 0, 1) = (V - 2 C) + 6 C clamp(|k - 1/3|, 1/6, 1/3)
    k = k.sub_(1.0 / 3.0).abs_().clamp_(1.0 / 6.0, 1.0 / 3.0).mul_(chroma * 6.0)
    return k.add_(value.sub_(chroma, alpha=2.0))


def adjust_hue(x: torch.Tensor, shift: Param) -> torch.Tensor:
    """Rotate hue by `shift` turns, in [-0.5, 0.5]."""
    return adjust_hsv(x, hue_shift=shift)


def _gaussian_taps(sigma: Param, x: torch.Tensor) -> list[Param]:
    """Weights of offsets 0..R (R = ceil(3 max sigma)) of the normalised kernels of half-width ceil(3 sigma)."""
    if isinstance(sigma, float | int):
        radius = math.ceil(3.0 * sigma)
        w = [math.exp(-0.5 * (t / sigma) ** 2) for t in range(radius + 1)]
        return [v / (2.0 * sum(w) - w[0]) for v in w]
    sig = sigma.to(x.device, x.dtype).reshape(-1, 1)  # (B, 1)
    taps = torch.arange(math.ceil(3.0 * float(sig.max())) + 1, dtype=x.dtype, device=x.device)
    w = torch.exp(-0.5 * (taps / sig) ** 2) * (taps <= torch.ceil(3.0 * sig))  # (B, R + 1)
    return list(
        (w / (2.0 * w.sum(dim=1, keepdim=True) - w[:, :1])).reshape(-1, 1, 1, 1, len(taps)).unbind(-1)
    )


def _axpy_(out: torch.Tensor, y: torch.Tensor, w: Param) -> torch.Tensor:
    return out.add_(y, alpha=w) if isinstance(w, float) else out.addcmul_(y, w)


def _reflect_pad(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Reflect padding of `radius` on both ends of dimension `dim` (F.pad's "reflect" parallelises tiny
    tensors with a grain of one, which stalls on a busy machine; slices, flips and cat do not)."""
    size = x.shape[dim]
    head, tail = x.narrow(dim, 1, radius).flip(dim), x.narrow(dim, size - 1 - radius, radius).flip(dim)
    return torch.cat([head, x, tail], dim)


def gaussian_blur(x: torch.Tensor, sigma: Param) -> torch.Tensor:
    """Separable Gaussian blur of x (B, C, H, W), reflect padding; returns a new tensor.

    Sample i's kernel has taps exp(-t^2 / (2 sigma_i^2)) for |t| <= ceil(3 sigma_i), normalised to sum 1
    (torchvision's kernel with kernel_size 2 ceil(3 sigma) + 1), applied as sums of shifted slices:
    faster on CPU than a depthwise convolution.
    """
    w = _gaussian_taps(sigma, x)
    radius, (height, width) = len(w) - 1, x.shape[-2:]
    if radius >= min(height, width):
        raise ValueError(
            f"blur radius {radius} (3 sigma) must be smaller than the image side {min(height, width)}"
        )
    y = _reflect_pad(x, radius, -1)  # (B, C, H, W + 2 radius)
    out = y.narrow(-1, radius, width) * w[0]
    for k in range(1, radius + 1):
        _axpy_(_axpy_(out, y.narrow(-1, radius + k, width), w[k]), y.narrow(-1, radius - k, width), w[k])
    y = _reflect_pad(out, radius, -2)  # (B, C, H + 2 radius, W)
    res = y.narrow(-2, radius, height) * w[0]
    for k in range(1, radius + 1):
        _axpy_(_axpy_(res, y.narrow(-2, radius + k, height), w[k]), y.narrow(-2, radius - k, height), w[k])
    return res


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel of x (B, 3, H, W)."""
    x = x.sub_(_constant(tuple(mean), x.dtype, x.device))
    return x.mul_(_constant(tuple(1.0 / s for s in std), x.dtype, x.device))


_JITTER_OPS: tuple[tuple[str, Callable[[torch.Tensor, Param], torch.Tensor], float], ...] = (
    ("brightness", adjust_brightness, 1.0),
    ("contrast", adjust_contrast, 1.0),
    ("saturation", adjust_saturation, 1.0),
    ("hue", adjust_hue, 0.0),
)  # (parameter, function, identity value)


def apply_color_params(x: torch.Tensor, p: ColorParams) -> torch.Tensor:
    """Jitter (random order per sample), grayscale and blur x (B, 3, H, W) in [0, 1] as `p` says.

    Returns a float tensor in [0, 1]; x may be overwritten. Samples are grouped on the host from `p`
    (any device); each group's parameters go to x's device as one small tensor.
    """
    return _apply_host_params(x, {k: v.tolist() for k, v in vars(p).items()})


def _apply_host_params(x: torch.Tensor, host: dict[str, list]) -> torch.Tensor:
    """`apply_color_params` with the parameters as lists (ColorParams fields, one entry per sample)."""
    batch = x.shape[0]

    def apply(x: torch.Tensor, rows: list[int], fn: Callable, name: str | None = None) -> torch.Tensor:
        if not rows:
            return x
        args = []
        if name is not None:
            values = [host[name][i] for i in rows]
            args.append(values[0] if batch == 1 else torch.tensor(values, dtype=x.dtype, device=x.device))
        if len(rows) == batch:
            return fn(x, *args)
        idx = torch.tensor(rows, device=x.device)
        x[idx] = fn(x[idx], *args)
        return x

    jittered = [i for i in range(batch) if host["jitter"][i]]
    for slot in range(4):
        for op, (name, fn, identity) in enumerate(_JITTER_OPS):
            rows = [i for i in jittered if host["order"][i][slot] == op and host[name][i] != identity]
            x = apply(x, rows, fn, name)
    x = apply(x, [i for i in range(batch) if host["grayscale"][i]], lambda t: t.copy_(rgb_to_grayscale(t)))
    return apply(x, [i for i in range(batch) if host["blur"][i]], gaussian_blur, "sigma")


def to_float_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float32 in [0, 1]; a float batch is copied as float32."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).mul_(1.0 / 255.0)
    return images.to(torch.float32, copy=True)


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


class TwoViewTransform:
    """Image -> two augmented views (3, S, S): normalised float32, or uint8 when ``cfg.gpu_color``.

    Deterministic given `rng` (a NumPy generator, a seed, or a seed sequence such as [seed, index]).
    Crop and resize use torch's antialiased bilinear interpolation on uint8 (as torchvision's
    RandomResizedCrop with antialias=True, and about 3 times faster than PIL's resize here).
    """

    def __init__(self, cfg: SimCLRAugmentConfig | None = None) -> None:
        self.cfg = cfg or SimCLRAugmentConfig()

    def _crop_view(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """(3, H, W) uint8 -> random resized crop, maybe flipped, (1, 3, S, S) uint8."""
        c = self.cfg
        height, width = image.shape[-2:]
        left, top, w, h = sample_crop_box(width, height, c.crop_scale, c.crop_ratio, rng)
        crop = image[None, :, top : top + h, left : left + w]
        size = (c.image_size, c.image_size)
        view = torch.nn.functional.interpolate(
            crop, size=size, mode="bilinear", antialias=True, align_corners=False
        )
        return view.flip(-1) if rng.random() < c.flip_p else view

    def __call__(self, image: ImageLike, rng: RngLike) -> tuple[torch.Tensor, torch.Tensor]:
        rng = make_rng(rng)
        image = image_to_uint8_tensor(image)
        views = (self._crop_view(image, rng), self._crop_view(image, rng))
        if self.cfg.gpu_color:
            return views[0][0].contiguous(), views[1][0].contiguous()
        host = {k: v.tolist() for k, v in vars(sample_color_params(self.cfg, 2, (0, 1), rng)).items()}
        out = []
        for i, view in enumerate(views):  # one at a time: a batch of one needs no per-sample indexing
            x = torch.empty(view.shape, dtype=torch.float32).copy_(view).mul_(1.0 / 255.0)
            x = _apply_host_params(x, {k: v[i : i + 1] for k, v in host.items()})
            out.append(normalize(x, self.cfg.mean, self.cfg.std)[0])
        return out[0], out[1]


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
