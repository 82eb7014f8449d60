"""Colour operations on batches (B, 3, H, W) of floats in [0, 1]: the colour half of the augmentations.

Brightness, contrast, saturation and hue as torchvision defines them, grayscale, Gaussian blur and
normalisation, written once for both paths of `transforms` (per sample on the CPU, batched on any device)
and for `dense_transforms`. `apply_color_params` runs the colour policy for per-sample `ColorParams`: jitter
in each sample's own order of the four operations, then grayscale, then blur.

Parameters are Python floats (one value for the batch: the cheapest form for the per-sample CPU path) or
(B,) tensors. The functions may overwrite x, avoiding fresh buffers (on CPU, page faults on new memory
cost as much as the arithmetic); always use the returned tensor.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # luma weights of torchvision's rgb_to_grayscale


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


__all__ = [
    "GRAY_WEIGHTS",
    "ColorParams",
    "Param",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hsv",
    "adjust_hue",
    "adjust_saturation",
    "apply_color_params",
    "gaussian_blur",
    "normalize",
    "rgb_to_grayscale",
    "to_float_batch",
]
