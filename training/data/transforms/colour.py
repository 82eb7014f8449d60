"""Colour operations on batches (B, 3, H, W) of floats in [0, 1]: the colour half of the augmentations.

Brightness, contrast, saturation and hue as torchvision defines them, grayscale, Gaussian blur and
normalisation, written once for both paths of `transforms` (per sample on the CPU, batched on any device)
and for `dense_transforms`. `apply_color_params` runs the colour policy for per-sample `ColorParams`: jitter
in each sample's own order of the four operations, then grayscale, then blur (`apply_sample_color` for one
image with its parameters as Python values).

Parameters are Python floats (one value for the batch: the cheapest form for the per-sample CPU path) or
(B,) tensors. The functions may overwrite x, avoiding fresh buffers (on CPU a pass that writes fresh
memory costs up to twice one in place); always use the returned tensor. Each operation is a short chain of
whole-tensor passes, since a pass costs ~10 us per 224 x 224 plane on one core: clamps that cannot change a
value in [0, 1] are skipped and blends are one lerp.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

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


def _per_sample(v: Param, x: torch.Tensor, ndim: int = 4) -> Param:
    """A float as is, a (B,) tensor as (B, 1, 1, 1) (`ndim` dimensions) on x's device and dtype."""
    if isinstance(v, float | int):
        return float(v)
    return v.to(x.device, x.dtype).reshape(-1, *([1] * (ndim - 1)))


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


def _may_leave_unit_range(factor: Param) -> bool:
    """False for a Python factor in [0, 1]: scaling or blending values in [0, 1] by it cannot leave [0, 1], so
    the clamp after it is the identity and is skipped."""
    return not (isinstance(factor, float | int) and 0.0 <= factor <= 1.0)


def adjust_brightness(x: torch.Tensor, factor: Param) -> torch.Tensor:
    """Scale intensities by `factor`, clipped to [0, 1]."""
    x = x.mul_(_per_sample(factor, x))
    return x.clamp_(0.0, 1.0) if _may_leave_unit_range(factor) else x


def _blend_(x: torch.Tensor, other: torch.Tensor, factor: Param) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clipped; `other` (B, 1, H, W) or (B, 1, 1, 1). One lerp of x
    towards `other` (a pass fewer than multiply-and-add)."""
    weight = 1.0 - factor if isinstance(factor, float | int) else 1.0 - _per_sample(factor, x)
    x = x.lerp_(other, weight)
    return x.clamp_(0.0, 1.0) if _may_leave_unit_range(factor) else x


def adjust_contrast(x: torch.Tensor, factor: Param) -> torch.Tensor:
    """Blend with each image's mean luma (torchvision's adjust_contrast); the mean luma is the luma of the
    channel means, which saves building the luma image."""
    weights = _constant(GRAY_WEIGHTS, x.dtype, x.device).view(3, 1)
    mean = torch.mm(x.mean(dim=(2, 3)), weights).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return _blend_(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: Param) -> torch.Tensor:
    """Blend with the per-pixel luma (torchvision's adjust_saturation)."""
    return _blend_(x, rgb_to_grayscale(x), factor)


def _hue_value_chroma(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """HSV hue in turns (in [0, 1]; 0 where the chroma is 0), value V, chroma C and 6 C of x: four (B, H, W).

    Sextant selection in the manner of Hocevar's branch-free rgb2hsv: with s1 = [g >= b] and s2 = [r is the
    max] (ties go to r, then g, as in torchvision), hue = |offset + n / (6 C)|, where n is
    max(g, b) - min(g, b) and offset s1 - 1 if r is the max, else n = r - min(g, b), offset 2/3 - s1.
    Comparisons write 0/1 floats directly and lerp selects: boolean masks and `torch.where` are slow on CPU.
    """
    r, g, b = x.unbind(1)
    # six planes from one allocation, each reused once dead: fresh memory costs more than the arithmetic
    g_ge_b, gb_max, gb_min, r_max, value, chroma = x.new_empty((6, *r.shape)).unbind(0)
    torch.ge(g, b, out=g_ge_b)
    torch.maximum(g, b, out=gb_max)
    torch.minimum(g, b, out=gb_min)
    torch.ge(r, gb_max, out=r_max)
    torch.maximum(r, gb_max, out=value)
    torch.sub(value, torch.minimum(r, gb_min, out=chroma), out=chroma)
    n = torch.lerp(r, gb_max, r_max, out=gb_max).sub_(gb_min)
    two_thirds = _constant((2.0 / 3.0,), x.dtype, x.device).view(())
    offset = torch.add(two_thirds, g_ge_b, alpha=-1.0, out=gb_min).lerp_(g_ge_b.sub_(1.0), r_max)
    six_chroma = torch.mul(chroma, 6.0, out=g_ge_b)
    hue = n.div_(torch.clamp_min(six_chroma, 1e-12, out=r_max)).add_(offset).abs_()
    return hue, value, chroma, six_chroma


def adjust_hsv(x: torch.Tensor, hue_shift: Param = 0.0, saturation_scale: Param = 1.0) -> torch.Tensor:
    """Rotate HSV hue by `hue_shift` turns (in [-0.5, 0.5]) and scale HSV saturation (clipped to 1).

    Equal to RGB -> HSV -> RGB as in torchvision's adjust_hue, through the closed form
    channel = (V - 2 C) + 6 C clamp(|frac(H + k) - 1/2|, 1/6, 1/3), k = 2, 5/3, 4/3 for R, G, B (that is
    V - C clamp(2 - |k' - 2|, 0, 1) with k' = (n + 6 H) mod 6, n = 5, 3, 1), where V is the max and C the
    max minus the min of the pixel; the offsets k keep the argument of frac positive. x is overwritten with
    the result.
    """
    hue, value, chroma, six_chroma = _hue_value_chroma(x)  # (B, H, W) each
    if not (isinstance(saturation_scale, float | int) and saturation_scale == 1.0):
        torch.minimum(chroma.mul_(_per_sample(saturation_scale, x, ndim=3)), value, out=chroma)
        torch.mul(chroma, 6.0, out=six_chroma)
    offsets = _constant((2.0, 5.0 / 3.0, 4.0 / 3.0), x.dtype, x.device) + _per_sample(hue_shift, x)
    k = torch.add(hue.unsqueeze(1), offsets, out=x).frac_().sub_(0.5).abs_().clamp_(1.0 / 6.0, 1.0 / 3.0)
    base = value.sub_(chroma, alpha=2.0)
    return torch.addcmul(base.unsqueeze(1), k, six_chroma.unsqueeze(1), out=x)


def adjust_hue(x: torch.Tensor, shift: Param) -> torch.Tensor:
    """Rotate hue by `shift` turns, in [-0.5, 0.5]."""
    return adjust_hsv(x, hue_shift=shift)


def _gaussian_taps(sigma: Param, x: torch.Tensor, max_sigma: float | None = None) -> list[Param]:
    """Weights of offsets 0..R (R = ceil(3 max sigma)) of the normalised kernels of half-width ceil(3 sigma).

    For a tensor `sigma`, `max_sigma` (its largest value, known on the host) saves reading it from x's device.
    """
    if isinstance(sigma, float | int):
        radius = math.ceil(3.0 * sigma)
        w = [math.exp(-0.5 * (t / sigma) ** 2) for t in range(radius + 1)]
        return [v / (2.0 * sum(w) - w[0]) for v in w]
    sig = sigma.to(x.device, x.dtype).reshape(-1, 1)  # (B, 1)
    # the widest sigma in x's dtype, from the host when it knows it (a CPU tensor: no read from x's device)
    widest = sig.max() if max_sigma is None else torch.tensor(max_sigma, dtype=x.dtype)
    taps = torch.arange(math.ceil(float(3.0 * widest)) + 1, dtype=x.dtype, device=x.device)
    w = torch.exp(-0.5 * (taps / sig) ** 2) * (taps <= torch.ceil(3.0 * sig))  # (B, R + 1)
    return list(
        (w / (2.0 * w.sum(dim=1, keepdim=True) - w[:, :1])).reshape(-1, 1, 1, 1, len(taps)).unbind(-1)
    )


def _axpy_(out: torch.Tensor, y: torch.Tensor, w: Param) -> torch.Tensor:
    return out.add_(y, alpha=w) if isinstance(w, float) else out.addcmul_(y, w)


def _reflect_pad(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Reflect padding of `radius` on both ends of dimension `dim` (-1 or -2), a new tensor.

    With one thread (a data-loading worker) this is F.pad, one call. With more, the slices are copied one by
    one instead: F.pad's "reflect" splits even tiny tensors across threads, which stalls on a busy machine.
    """
    if torch.get_num_threads() == 1:
        return F.pad(x, (radius, radius, 0, 0) if dim == -1 else (0, 0, radius, radius), mode="reflect")
    size = x.shape[dim]
    y = x.new_empty((*x.shape[:dim], size + 2 * radius, *x.shape[dim:][1:]))
    y.narrow(dim, radius, size).copy_(x)
    y.narrow(dim, 0, radius).copy_(x.narrow(dim, 1, radius).flip(dim))
    y.narrow(dim, radius + size, radius).copy_(x.narrow(dim, size - 1 - radius, radius).flip(dim))
    return y


def _correlate_(out: torch.Tensor, y: torch.Tensor, w: list[Param], dim: int) -> torch.Tensor:
    """out = sum_t w[|t|] y[center + t] along `dim`, for y padded by R = len(w) - 1 at both ends; in place."""
    radius = len(w) - 1
    # the 2R + 1 shifted windows as views from one call (narrow costs a few us each)
    shifted = y.as_strided((2 * radius + 1, *out.shape), (y.stride(dim), *y.stride()), y.storage_offset())
    shifted = shifted.unbind(0)
    torch.mul(shifted[radius], w[0], out=out)
    for k in range(1, radius + 1):
        _axpy_(_axpy_(out, shifted[radius + k], w[k]), shifted[radius - k], w[k])
    return out


def gaussian_blur(x: torch.Tensor, sigma: Param, max_sigma: float | None = None) -> torch.Tensor:
    """Separable Gaussian blur of x (B, C, H, W), reflect padding; x is overwritten with the result.

    Sample i's kernel has taps exp(-t^2 / (2 sigma_i^2)) for |t| <= ceil(3 sigma_i), normalised to sum 1
    (torchvision's kernel with kernel_size 2 ceil(3 sigma) + 1), applied as sums of shifted slices:
    faster on CPU than a depthwise convolution. For per-sample `sigma` on an accelerator, pass its largest
    value as `max_sigma` if the host knows it: the kernel width then needs no read from the device.
    """
    w = _gaussian_taps(sigma, x, max_sigma)
    radius, (height, width) = len(w) - 1, x.shape[-2:]
    if radius >= min(height, width):
        raise ValueError(
            f"blur radius {radius} (3 sigma) must be smaller than the image side {min(height, width)}"
        )
    x = _correlate_(x, _reflect_pad(x, radius, -1), w, -1)  # x is copied into the padding first
    return _correlate_(x, _reflect_pad(x, radius, -2), w, -2)


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
    (any device); each group's parameters go to x's device as one small tensor. With `p` on the CPU nothing
    is read back from x's device.
    """
    host = {k: v.tolist() for k, v in vars(p).items()}
    batch = x.shape[0]
    if batch == 1:
        return apply_sample_color(x, {k: v[0] for k, v in host.items()})

    def apply(x: torch.Tensor, rows: list[int], fn: Callable, name: str | None = None) -> torch.Tensor:
        if not rows:
            return x
        args = []
        if name is not None:
            args.append(torch.tensor([host[name][i] for i in rows], dtype=x.dtype, device=x.device))
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
    blurred = [i for i in range(batch) if host["blur"][i]]
    widest = max((host["sigma"][i] for i in blurred), default=0.0)
    return apply(x, blurred, functools.partial(gaussian_blur, max_sigma=widest), "sigma")


def apply_sample_color(x: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    """`apply_color_params` for one image x (1, 3, H, W), `p` holding its value of each `ColorParams` field
    as a Python value (`order` a list): operations get Python floats, and a blurred grayscale image is
    blurred as one plane rather than three equal ones."""
    if p["jitter"]:
        for op in p["order"]:
            name, fn, identity = _JITTER_OPS[op]
            if p[name] != identity:
                x = fn(x, p[name])
    if not p["grayscale"]:
        return gaussian_blur(x, p["sigma"]) if p["blur"] else x
    gray = rgb_to_grayscale(x)  # (1, 1, H, W)
    return x.copy_(gaussian_blur(gray, p["sigma"]) if p["blur"] else gray)


def to_float_hwc(pixels: np.ndarray, flip: bool = False) -> torch.Tensor:
    """uint8 (H, W, 3) pixels of any strides -> contiguous float32 (1, 3, H, W) in [0, 1], mirrored left-right
    if `flip`.

    NumPy's strided copy does the flip (a negative stride) and the channel deinterleave in one pass; torch
    would copy the flip first.
    """
    height, width, channels = pixels.shape
    out = torch.empty((1, channels, height, width), dtype=torch.float32)
    np.copyto(out[0].numpy(), (pixels[:, ::-1] if flip else pixels).transpose(2, 0, 1), casting="unsafe")
    return out.mul_(1.0 / 255.0)


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
    "apply_sample_color",
    "gaussian_blur",
    "normalize",
    "rgb_to_grayscale",
    "to_float_batch",
    "to_float_hwc",
]
