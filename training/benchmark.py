"""Throughput benchmarks of DenseCL-ViT, each against a baseline timed in the same process and run.

    python scripts/benchmark.py                       # CPU: ViT-Ti and ViT-S, fp32, batch 4
    python scripts/benchmark.py --device cuda         # GPU: bf16 autocast, SDPA, fused AdamW, MFU
    python scripts/benchmark.py --quick               # a tiny model, for tests (< 1 minute on CPU)

Sections (`results.json` keys, and one table each in `results.md`):

- ``encoder``: our encoder against timm's `VisionTransformer` of the same size, loaded with the same weights,
  forward and forward+backward, same threads, batch and dtype.
- ``pretraining_step``: a full pre-training step (two views through the encoder as one batch, projection head
  on every token, local-to-global loss, backward, gradient norm, AdamW) against the encoder's own
  forward+backward on the same 2B views: the method's overhead, split into head, loss and optimiser.
- ``augmentation``: two-view augmentation from encoded JPEG bytes (decode + two views) per worker process
  (one thread), ours against the plain torchvision v2 pipeline of the same policy.
- ``end_to_end``: pre-training fed by the real loader (`StreamingSamples` over a local parquet file of JPEGs,
  DataLoader workers) against the same steps on a batch already in memory.

Timing: candidates run interleaved, in A B B A order round after round, so that load from other processes
and clock drift hit all alike; each reports the median over rounds after warm-up. Ratios between
candidates of one run are the numbers to compare across machines; absolute rates are of this machine.
Peak memory: per candidate, CUDA `max_memory_allocated`, or on the CPU the process's peak resident set
(VmHWM, reset before each candidate through /proc/self/clear_refs; `ru_maxrss` where that is unavailable).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import io
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from ..modeling import DenseCLViTConfig, DenseCLViTForPreTraining, DenseCLViTModel
from .conversion import densecl_to_timm

SIZES: dict[str, dict[str, Any]] = {
    "vit-tiny": {"preset": "vit-tiny", "timm": "vit_tiny_patch16_224"},
    "vit-small": {"preset": "vit-small", "timm": "vit_small_patch16_224"},
    "vit-base": {"preset": "vit-base", "timm": "vit_base_patch16_224"},
    # The test suite's model, for --quick.
    "test": {
        "config": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "patch_size": 8,
            "projection_hidden_size": 128,
            "projection_dim": 64,
        },
        "timm": "vit_tiny_patch16_224",
    },
}
SECTIONS = ("encoder", "pretraining_step", "augmentation", "end_to_end")
# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets: the first entry whose words
# all appear in the device name wins. Other cards: pass --peak-tflops.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIE"), 756.0),
    (("H100",), 989.0),  # SXM
    (("H200",), 989.0),
    (("A100",), 312.0),
    (("L4",), 121.0),
)
SOURCE_SIZE = (500, 375)  # (width, height) of the benchmark JPEGs: the ImageNet median


# --- FLOPs ---------------------------------------------------------------------------------------------


def vit_forward_flops(
    image_size: int | tuple[int, int],
    patch_size: int,
    hidden_size: int,
    num_layers: int,
    mlp_ratio: float = 4.0,
    num_channels: int = 3,
) -> int:
    """FLOPs (2 per multiply-add) of one image through the encoder's forward pass.

    With N = (H / p)(W / p) patches, T = N + 1 tokens ([CLS]), width D and MLP ratio r:

    - patch embedding, a (p^2 C -> D) linear map per patch: 2 N p^2 C D;
    - per block, per token: the qkv projection 3 D^2, the output projection D^2 and the two MLP layers
      2 r D^2 multiply-adds, (4 + 2r) D^2 in all, so (8 + 4r) T D^2 FLOPs = 24 T D^2 for r = 4;
    - per block, attention: scores Q K^T (T x T from d-wide rows, for every head: T^2 D multiply-adds)
      and the weighted sum A V (another T^2 D): 4 T^2 D FLOPs.

    Total = 2 N p^2 C D + L (24 T D^2 + 4 T^2 D). Left out, each O(T D) per block: biases, LayerNorm, GELU,
    softmax, residual additions, position embeddings (under 1% of the total at ViT-Ti/16, 224 px).
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    patches = (height // patch_size) * (width // patch_size)
    tokens, dim = patches + 1, hidden_size
    embed = 2 * patches * patch_size**2 * num_channels * dim
    block = round((8 + 4 * mlp_ratio) * tokens * dim**2) + 4 * tokens**2 * dim
    return embed + num_layers * block


def encoder_flops(config: DenseCLViTConfig, image_size: int | None = None, backward: bool = False) -> int:
    """`vit_forward_flops` of a config at `image_size` (default: the config's); with `backward`, forward+backward.

    The backward pass costs twice the forward (per matrix product, one for the input's gradient and one for the
    weights'), except that the pixels need no gradient: 3 x forward - the patch embedding's input gradient.
    """
    size = image_size or config.image_size
    forward = vit_forward_flops(
        size,
        config.patch_size,
        config.hidden_size,
        config.num_hidden_layers,
        config.mlp_ratio,
        config.num_channels,
    )
    if not backward:
        return forward
    patches = (size // config.patch_size) ** 2
    return 3 * forward - 2 * patches * config.patch_size**2 * config.num_channels * config.hidden_size


def pretraining_step_flops(config: DenseCLViTConfig, batch_size: int, image_size: int | None = None) -> int:
    """FLOPs of one pre-training step (forward + backward) on `batch_size` images, i.e. 2B views.

    2B encoder passes (`encoder_flops` with backward) + 3 x the forward of the projection head on all 2B (N + 1)
    tokens, 2 (D H + H^2 + H P) each (3 linear layers D -> H -> H -> P), + 3 x the forward of the symmetric
    local-to-global loss: per direction the positives (B N P multiply-adds) and the logits against every
    patch of the batch (B^2 N P).
    """
    size = image_size or config.image_size
    patches = (size // config.patch_size) ** 2
    dim, hidden, out = config.hidden_size, config.projection_hidden_size, config.projection_dim
    head = 2 * (patches + 1) * (dim * hidden + hidden * hidden + hidden * out)
    loss = 2 * 2 * (batch_size * patches * out + batch_size**2 * patches * out)
    return 2 * batch_size * (encoder_flops(config, size, backward=True) + 3 * head) + 3 * loss


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a GPU from its `torch.cuda.get_device_name()`, None if not in the table."""
    words = set(device_name.upper().replace("-", " ").split())
    return next((tflops for keys, tflops in PEAK_BF16_TFLOPS if words.issuperset(keys)), None)


# --- timing and memory ---------------------------------------------------------------------------------


class MemoryProbe:
    """Peak memory since the last `reset()`: CUDA max allocated, or the CPU process's peak resident set."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.resettable = self.cuda or self._clear_refs()
        self.method = (
            "cuda_max_allocated" if self.cuda else ("vmhwm_reset" if self.resettable else "ru_maxrss")
        )

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM, the peak resident set size (Linux >= 4.0)
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.resettable:
            self._clear_refs()

    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        if self.resettable:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        return _ru_maxrss_mb(resource.RUSAGE_SELF)


def _ru_maxrss_mb(who: int) -> float:
    rss = resource.getrusage(who).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call of one candidate over the timed rounds (wall clock and process CPU time)."""

    wall: list[float]
    cpu: list[float]
    peak_mb: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def time_interleaved(
    candidates: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    device: torch.device,
    probe: MemoryProbe | None = None,
) -> dict[str, Timing]:
    """Time each candidate `repeats` times after `warmup` untimed calls, in A B B A order (alternating rounds)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    probe = probe or MemoryProbe(device)
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    synchronize(device)
    timings = {name: Timing([], []) for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            probe.reset()
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            candidates[name]()
            synchronize(device)
            timings[name].wall.append(time.perf_counter() - wall)
            timings[name].cpu.append(time.process_time() - cpu)
            timings[name].peak_mb = max(timings[name].peak_mb, probe.peak_mb())
    return timings


class _OpCounter(TorchDispatchMode):
    """Counts the aten operators that run (forward and backward), by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def operator_difference(
    ours: Callable[[torch.Tensor], torch.Tensor],
    reference: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
) -> tuple[dict[str, int], dict[str, int]]:
    """The aten operators that one forward+backward of `ours` runs more often than `reference`, and vice versa.

    Noise-free evidence, where timings are noisy, that two implementations do the same work.
    """
    counts = []
    for fn in (ours, reference):
        with _OpCounter() as counter:
            fn(x).float().sum().backward()
        counts.append(counter.counts)
    return dict(counts[0] - counts[1]), dict(counts[1] - counts[0])


# --- options and models --------------------------------------------------------------------------------


@dataclass
class BenchOptions:
    """Resolved command-line options (see `build_parser` and `resolve_options`)."""

    device: torch.device
    sizes: list[str]
    batch: int
    image_size: int
    dtype: str
    threads: int
    compile: bool
    repeats: int
    warmup: int
    workers: int
    steps: int
    aug_images: int
    source_size: tuple[int, int]
    sections: list[str]
    gpu_augment: bool
    peak_tflops: float | None
    output_dir: Path

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def build_config(size: str, image_size: int) -> DenseCLViTConfig:
    spec = SIZES[size]
    if "preset" in spec:
        return DenseCLViTConfig.from_preset(spec["preset"], image_size=image_size)
    return DenseCLViTConfig(**spec["config"], image_size=image_size)


def build_timm(config: DenseCLViTConfig, name: str) -> torch.nn.Module:
    """timm's `VisionTransformer` with our config's architecture (`name`'s defaults overridden), no head."""
    import timm

    return timm.create_model(
        name,
        pretrained=False,
        num_classes=0,
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
    )


def _rate(batch: int, seconds: float) -> float:
    return batch / seconds


def _utilisation(flops_per_s: float, opts: BenchOptions) -> float | None:
    return flops_per_s / (opts.peak_tflops * 1e12) if opts.peak_tflops else None


# --- sections ------------------------------------------------------------------------------------------


def _encoder_pair(size: str, opts: BenchOptions) -> tuple[DenseCLViTModel, torch.nn.Module]:
    """Our encoder and timm's of `size`, timm's loaded with our weights, both on the device in train mode
    (dropout and drop path are 0, so train mode computes what eval mode does, and compiles once)."""
    config = build_config(size, opts.image_size)
    torch.manual_seed(0)
    ours = DenseCLViTModel(config)
    reference = build_timm(config, SIZES[size]["timm"])
    reference.load_state_dict(densecl_to_timm(ours.state_dict()))
    return ours.to(opts.device).train(), reference.to(opts.device).train()


def _pass_candidates(
    functions: dict[str, Callable], models: dict[str, torch.nn.Module], x: torch.Tensor, opts: BenchOptions
) -> dict[str, Callable[[], None]]:
    """`{name}_forward` (no grad) and `{name}_forward_backward` for each function (B, 3, H, W) -> (B, T, D)."""

    def forward(fn: Callable) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), opts.autocast():
                fn(x)

        return run

    def forward_backward(fn: Callable, model: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with opts.autocast():
                tokens = fn(x)
            tokens.float().mean().backward()
            model.zero_grad(set_to_none=True)

        return run

    candidates = {f"{name}_forward": forward(fn) for name, fn in functions.items()}
    candidates.update({f"{n}_forward_backward": forward_backward(f, models[n]) for n, f in functions.items()})
    return candidates


def encoder_benchmark(size: str, opts: BenchOptions) -> list[dict[str, Any]]:
    """Our encoder vs timm's, same weights: one row for the forward pass, one for forward+backward."""
    ours, reference = _encoder_pair(size, opts)
    x = torch.randn(opts.batch, 3, opts.image_size, opts.image_size, device=opts.device)
    functions = {"ours": lambda t: ours(pixel_values=t).last_hidden_state, "timm": reference.forward_features}
    with torch.no_grad(), opts.autocast():
        difference = (functions["ours"](x) - functions["timm"](x)).abs().max().item()
    with opts.autocast():
        extra_ours, extra_timm = operator_difference(functions["ours"], functions["timm"], x[:1])
    ours.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    if opts.compile:
        functions = {name: torch.compile(fn) for name, fn in functions.items()}
    candidates = _pass_candidates(functions, {"ours": ours, "timm": reference}, x, opts)
    timings = time_interleaved(candidates, opts.repeats, opts.warmup, opts.device)
    rows = []
    for mode in ("forward", "forward_backward"):
        mine, theirs = timings[f"ours_{mode}"], timings[f"timm_{mode}"]
        flops = encoder_flops(ours.config, backward=mode == "forward_backward")
        rows.append({
            "size": size,
            "mode": mode,
            "batch": opts.batch,
            "ours_images_per_s": _rate(opts.batch, mine.median),
            "timm_images_per_s": _rate(opts.batch, theirs.median),
            "time_ratio": mine.median / theirs.median,
            "min_time_ratio": min(mine.wall) / min(theirs.wall),
            "cpu_time_ratio": mine.cpu_median / theirs.cpu_median,
            "ours_peak_mb": mine.peak_mb,
            "timm_peak_mb": theirs.peak_mb,
            "flops_per_image": flops,
            "ours_tflops": flops * opts.batch / mine.median / 1e12,
            "ours_mfu": _utilisation(flops * opts.batch / mine.median, opts),
            "max_abs_difference": difference,
            "extra_ops_ours": extra_ours,
            "extra_ops_timm": extra_timm,
            "seconds": _timing_summary({"ours": mine, "timm": theirs}),
        })  # fmt: skip
    return rows


def _training_setup(
    config: DenseCLViTConfig, opts: BenchOptions, accelerator: Any, dataset: str = "-"
) -> tuple[Any, Any, Any, Any]:
    """(options, model, AdamW, schedule) as `scripts/pretrain.py` builds them, prepared by `accelerator`.

    With --compile the encoder and the head are compiled too, so that the candidates that call them alone
    run compiled code like the full model does.
    """
    from .pretraining import PretrainConfig, build_optimizer

    cfg = PretrainConfig(
        dataset=dataset,
        max_steps=100_000,
        per_device_batch_size=opts.batch,
        image_size=opts.image_size,
        num_workers=opts.workers,
        shuffle_buffer=64,
        gpu_augment=opts.gpu_augment,
    )
    torch.manual_seed(0)
    model = DenseCLViTForPreTraining(config).to(opts.device)
    if opts.compile:
        for module in (model.densecl_vit, model.projection, model):
            module.compile()
    optimizer, scheduler = build_optimizer(cfg, model, opts.batch, cfg.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return cfg, model, optimizer, scheduler


def _two_views(opts: BenchOptions) -> dict[str, torch.Tensor]:
    shape = (opts.batch, 3, opts.image_size, opts.image_size)
    return {key: torch.randn(shape, device=opts.device) for key in ("pixel_values", "pixel_values_2")}


def _timing_summary(timings: dict[str, Timing]) -> dict[str, dict[str, Any]]:
    return {
        name: {"median_s": t.median, "min_s": min(t.wall), "cpu_median_s": t.cpu_median, "wall_s": t.wall}
        for name, t in timings.items()
    }


def _method_part_candidates(
    model: DenseCLViTForPreTraining,
    optimizer: Any,
    accelerator: Any,
    opts: BenchOptions,
    lr: float,
    decay: float,
) -> dict[str, Callable[[], None]]:
    """The method's additions to the encoder, each alone: the projection head on 2B (N + 1) tokens and the
    normalisation + loss (forward+backward, from leaf tensors), the gradient norm + AdamW step (`optimizer`,
    and a fused AdamW over the same groups, with its own state, when `optimizer` is not fused)."""
    from .optim import build_adamw, param_groups_weight_decay

    config, params, size = model.config, list(model.parameters()), 2 * opts.batch
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    hidden = torch.randn(size, tokens, config.hidden_size, device=opts.device, requires_grad=True)
    projected = torch.randn(size, tokens, config.projection_dim, device=opts.device, requires_grad=True)
    grads = [torch.randn_like(p) * 1e-3 for p in params]

    def backward_of(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with accelerator.autocast():
                value = forward()
            value.float().mean().backward()
            optimizer.zero_grad(set_to_none=True)
            hidden.grad = projected.grad = None

        return run

    def loss() -> torch.Tensor:
        embeddings = torch.nn.functional.normalize(projected, dim=-1)  # as DenseCLViTForPreTraining.embed
        global_1, global_2 = embeddings[:, 0].chunk(2)
        local_1, local_2 = embeddings[:, 1:].chunk(2)
        return model.contrastive_loss(global_1, local_1, global_2, local_2)

    def update(step_optimizer: Any) -> Callable[[], None]:
        def run() -> None:
            for param, grad in zip(params, grads):
                param.grad = grad
            accelerator.clip_grad_norm_(params, math.inf)
            step_optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    candidates = {"head": backward_of(lambda: model.projection(hidden)), "loss": backward_of(loss)}
    candidates["optimizer"] = update(optimizer)
    if not optimizer.defaults.get("fused"):
        fused = build_adamw(param_groups_weight_decay(model, decay), lr, fused=True)
        candidates["optimizer_fused"] = update(fused)
    return candidates


def pretraining_step_benchmark(size: str, opts: BenchOptions, accelerator: Any) -> dict[str, Any]:
    """A full pre-training step vs the encoder's two-view forward+backward, and the parts of the difference.

    Candidates, same model and batch: `engine.train_step` as `scripts/pretrain.py` runs it (model, AdamW and
    schedule from `pretraining.build_optimizer`); the encoder's forward+backward on the 2B views; and the
    method's additions timed alone (`_method_part_candidates`).
    """
    from .engine import train_step
    from .guards import NonFiniteGuard
    from .optim import scaled_lr

    config = build_config(size, opts.image_size)
    cfg, model, optimizer, scheduler = _training_setup(config, opts, accelerator)
    inner = accelerator.unwrap_model(model)
    encoder, head = inner.densecl_vit, inner.projection
    batch, guard = _two_views(opts), NonFiniteGuard()
    views = torch.cat([batch["pixel_values"], batch["pixel_values_2"]])

    def encoder_two_view() -> None:
        with accelerator.autocast():
            tokens = encoder(views).last_hidden_state
        tokens.float().mean().backward()
        optimizer.zero_grad(set_to_none=True)

    candidates = {
        "train_step": lambda: train_step(accelerator, model, optimizer, scheduler, batch, guard),
        "encoder_two_view": encoder_two_view,
        **_method_part_candidates(
            inner, optimizer, accelerator, opts, scaled_lr(cfg.lr, opts.batch), cfg.weight_decay
        ),
    }
    t = time_interleaved(candidates, opts.repeats, opts.warmup, opts.device)
    base, step = t["encoder_two_view"].median, t["train_step"].median
    step_flops = pretraining_step_flops(config, opts.batch)
    return {
        "size": size,
        "batch": opts.batch,
        "encoder_two_view_images_per_s": _rate(opts.batch, base),
        "train_step_images_per_s": _rate(opts.batch, step),
        "overhead_pct": 100 * (step / base - 1),
        "cpu_overhead_pct": 100 * (t["train_step"].cpu_median / t["encoder_two_view"].cpu_median - 1),
        **{f"{part}_pct": 100 * t[part].median / base for part in ("head", "loss", "optimizer")},
        "fused_optimizer_pct": 100 * t["optimizer_fused"].median / base if "optimizer_fused" in t else None,
        "flop_overhead_pct": 100 * (step_flops / (2 * opts.batch * encoder_flops(config, backward=True)) - 1),
        "encoder_parameters": sum(p.numel() for p in encoder.parameters()),
        "head_parameters": sum(p.numel() for p in head.parameters()),
        "encoder_two_view_peak_mb": t["encoder_two_view"].peak_mb,
        "train_step_peak_mb": t["train_step"].peak_mb,
        "flops_per_step": step_flops,
        "train_step_tflops": step_flops / step / 1e12,
        "train_step_mfu": _utilisation(step_flops / step, opts),
        "fused_adamw": bool(optimizer.defaults.get("fused")),
        "seconds": _timing_summary(t),
    }


def synthetic_jpegs(count: int, size: tuple[int, int] = SOURCE_SIZE, seed: int = 0) -> list[bytes]:
    """`count` photo-like JPEGs (quality 90) of `size` (width, height): smooth colour fields, edges, noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    images = []
    for _ in range(count):
        freq, phase = rng.uniform(0.01, 0.08, 3), rng.uniform(0, 2 * np.pi, 3)
        fields = [0.5 + 0.5 * np.sin(f * xx + g * yy + p) for f, g, p in zip(freq, freq[::-1], phase)]
        pixels = np.stack(fields, axis=-1) + rng.normal(0.0, 0.06, (height, width, 3))
        pixels[: height // 2, width // 3 :] *= rng.uniform(0.3, 1.0)  # a hard edge
        buffer = io.BytesIO()
        Image.fromarray((255 * np.clip(pixels, 0, 1)).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def augmentation_benchmark(opts: BenchOptions) -> dict[str, Any]:
    """Two-view images/s of one worker (one torch thread) from JPEG bytes: decode + two augmented views.

    "ours" is the pre-training data path (`pretraining.two_view_sample`: `samples.decode_image`, then
    `TwoViewTransform`); "crop_only" its --gpu-augment variant (colour left to the device); "naive" is PIL
    decoding + `naive_torchvision_two_view`. Rounds of 10 images, interleaved.
    """
    import datasets  # noqa: F401  (imported by decode_image on first use: keep the import out of the timing)

    from .pretraining import two_view_sample
    from .transforms import SimCLRAugmentConfig, TwoViewTransform, naive_torchvision_two_view

    jpegs = synthetic_jpegs(8, opts.source_size)
    cfg = SimCLRAugmentConfig(image_size=opts.image_size)
    ours = TwoViewTransform(cfg)
    crop_only = TwoViewTransform(SimCLRAugmentConfig(opts.image_size, gpu_color=True))
    naive = naive_torchvision_two_view(cfg)
    counter = iter(range(10**9))

    def ours_path(transform: TwoViewTransform) -> Callable[[], Any]:
        def run() -> Any:
            index = next(counter)
            example = {"image": {"bytes": jpegs[index % len(jpegs)], "path": None}}
            return two_view_sample(example, np.random.default_rng([0, index]), "image", transform)

        return run

    def naive_path() -> Any:
        return naive(Image.open(io.BytesIO(jpegs[next(counter) % len(jpegs)])).convert("RGB"))

    def rounds_of(fn: Callable[[], Any], n: int) -> Callable[[], None]:
        return lambda: [fn() for _ in range(n)]

    per_round = min(10, opts.aug_images)
    candidates = {
        "ours": rounds_of(ours_path(ours), per_round),
        "crop_only": rounds_of(ours_path(crop_only), per_round),
        "naive": rounds_of(naive_path, per_round),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    try:
        rounds = max(1, opts.aug_images // per_round)
        t = time_interleaved(candidates, rounds, 1, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    result: dict[str, Any] = {"image_size": opts.image_size, "source_size": list(opts.source_size)}
    for name, timing in t.items():
        result[f"{name}_images_per_s"] = per_round / timing.median
        result[f"{name}_images_per_cpu_s"] = per_round / timing.cpu_median
        result[f"{name}_peak_mb"] = timing.peak_mb
    result["speedup"] = t["naive"].median / t["ours"].median
    result["cpu_speedup"] = t["naive"].cpu_median / t["ours"].cpu_median
    return result


def write_jpeg_parquet(path: Path, count: int, size: tuple[int, int] = SOURCE_SIZE) -> Path:
    """A parquet file with one `datasets.Image` column "image" of `count` synthetic JPEGs."""
    import datasets

    images = [{"bytes": data, "path": None} for data in synthetic_jpegs(count, size)]
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": images}, features=features).to_parquet(str(path))
    return path


def _timed_steps(
    count: int, next_batch: Callable[[int], Any], step: Callable[[Any], Any], device: torch.device
):
    """Run `count` steps `step(next_batch(i))`; returns (total seconds, seconds spent in `next_batch`)."""
    total = wait = 0.0
    for index in range(count):
        start = time.perf_counter()
        batch = next_batch(index)
        synchronize(device)
        loaded = time.perf_counter()
        step(batch)
        synchronize(device)
        total, wait = total + time.perf_counter() - start, wait + loaded - start
    return total, wait


def end_to_end_benchmark(size: str, opts: BenchOptions, accelerator: Any, data_dir: Path) -> dict[str, Any]:
    """Pre-training steps fed by the real loader vs the same steps on a batch already in memory.

    The loader is `pretraining.build_data` over a local parquet file of JPEGs (`opts.workers` DataLoader
    workers decoding and augmenting). Order: model-only steps, loader steps (after draining what the
    workers prefetched meanwhile), model-only steps again; rates are images over total time.
    """
    from .engine import train_step
    from .guards import NonFiniteGuard
    from .pretraining import DeviceColorAugment, build_data

    drain = opts.workers * 2 + 1  # the DataLoader's prefetch queue (prefetch_factor 2 per worker) + one
    path = write_jpeg_parquet(
        data_dir / "images.parquet", opts.batch * (opts.steps + drain + 1), opts.source_size
    )
    config = build_config(size, opts.image_size)
    cfg, model, optimizer, scheduler = _training_setup(config, opts, accelerator, dataset=str(path))
    loader, _ = build_data(cfg)
    batches, device, guard, probe = iter(loader), opts.device, NonFiniteGuard(), MemoryProbe(opts.device)
    if opts.gpu_augment:
        prepare_batch: Callable = DeviceColorAugment(cfg, accelerator)
    else:
        prepare_batch = lambda batch, step: {k: v.to(device, non_blocking=True) for k, v in batch.items()}  # noqa: E731
    fixed = prepare_batch(next(batches), 0)

    def run(count: int, from_loader: bool) -> tuple[float, float]:
        load = (lambda i: prepare_batch(next(batches), i)) if from_loader else (lambda i: fixed)
        return _timed_steps(
            count,
            load,
            lambda batch: train_step(accelerator, model, optimizer, scheduler, batch, guard),
            device,
        )

    half = max(1, opts.steps // 2)
    run(opts.warmup, from_loader=False)
    first, _ = run(half, from_loader=False)
    run(drain, from_loader=True)
    probe.reset()
    loader_s, wait_s = run(opts.steps, from_loader=True)
    loader_peak = probe.peak_mb()
    second, _ = run(half, from_loader=False)
    batches.close()  # ends the DataLoader iteration: its workers exit and count in RUSAGE_CHILDREN
    gc.collect()
    model_only_s = (first + second) / (2 * half)
    return {
        "size": size,
        "batch": opts.batch,
        "workers": opts.workers,
        "gpu_augment": opts.gpu_augment,
        "images_per_s": opts.batch * opts.steps / loader_s,
        "model_only_images_per_s": opts.batch / model_only_s,
        "ratio": (loader_s / opts.steps) / model_only_s,
        "data_wait_fraction": wait_s / loader_s,
        "peak_mb": loader_peak,
        "worker_peak_mb": _ru_maxrss_mb(resource.RUSAGE_CHILDREN) if opts.workers else 0.0,
    }


# --- environment, reports ------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(opts: BenchOptions, argv: Sequence[str]) -> dict[str, Any]:
    """Machine, library versions, date and the settings every number depends on."""
    import timm
    import torchvision
    import transformers

    cuda = opts.device.type == "cuda"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python scripts/benchmark.py", *argv]),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": opts.threads,
        "device": opts.device.type,
        "device_name": torch.cuda.get_device_name(opts.device) if cuda else _cpu_model(),
        "peak_bf16_tflops": opts.peak_tflops,
        "dtype": opts.dtype,
        "compile": opts.compile,
        "attention": DenseCLViTModel(build_config("test", 32)).config._attn_implementation,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "image_size": opts.image_size,
        "batch": opts.batch,
        "repeats": opts.repeats,
        "memory_method": MemoryProbe(opts.device).method,
    }


def _fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{suffix}"


def _sig(value: float) -> str:
    return f"{value:.3g}"


def _pct(fraction: float | None) -> str:
    return _fmt(None if fraction is None else 100 * fraction, 1, "%")


def _table(title: str, header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _encoder_row(r: dict[str, Any]) -> list[str]:
    return [
        r["size"],
        r["mode"].replace("_", "+"),
        str(r["batch"]),
        _fmt(r["ours_images_per_s"]),
        _fmt(r["timm_images_per_s"]),
        f"{r['time_ratio']:.3f}x; {r['min_time_ratio']:.3f}x",
        _fmt(r["cpu_time_ratio"], 3, "x"),
        f"{r['ours_peak_mb']:,.0f} / {r['timm_peak_mb']:,.0f}",
        _sig(r["ours_tflops"]),
        _pct(r["ours_mfu"]),
    ]


def _encoder_table(rows: list[dict[str, Any]]) -> list[str]:
    header = ["size", "pass", "batch", "ours img/s", "timm img/s", "time ours/timm (median; min)"]
    header += ["CPU-time ours/timm", "peak MB ours / timm", "TFLOP/s", "MFU"]
    body = map(_encoder_row, rows)
    lines = _table("Encoder vs timm VisionTransformer (same weights)", header, body)
    for r in rows[::2]:
        extra = ", ".join(f"{n} x{c}" for n, c in r["extra_ops_ours"].items()) or "none"
        fewer = ", ".join(f"{n} x{c}" for n, c in r["extra_ops_timm"].items()) or "none"
        lines.append(
            f"{r['size']}: aten operators of one forward+backward, ours beyond timm's: {extra}; timm's beyond "
            f"ours: {fewer}. Largest output difference {r['max_abs_difference']:.1e}."
        )
    return lines + [""]


def _step_row(r: dict[str, Any]) -> list[str]:
    optimizer = _fmt(r["optimizer_pct"], 1, "%")
    if r["fused_optimizer_pct"] is not None:
        optimizer += f" (fused: {_fmt(r['fused_optimizer_pct'], 1, '%')})"
    return [
        r["size"],
        str(r["batch"]),
        _fmt(r["train_step_images_per_s"]),
        _fmt(r["encoder_two_view_images_per_s"]),
        _fmt(r["overhead_pct"], 1, "%"),
        _fmt(r["head_pct"], 1, "%"),
        _fmt(r["loss_pct"], 1, "%"),
        optimizer,
        _fmt(r["flop_overhead_pct"], 1, "%"),
        f"{r['train_step_peak_mb']:,.0f} / {r['encoder_two_view_peak_mb']:,.0f}",
        _pct(r["train_step_mfu"]),
    ]


def _step_table(rows: list[dict[str, Any]]) -> list[str]:
    header = ["size", "batch (x2 views)", "step img/s", "encoder img/s", "overhead", "head", "loss"]
    header += ["grad norm + AdamW", "FLOP overhead", "peak MB step / encoder", "MFU"]
    lines = _table(
        "Pre-training step vs the encoder's two-view forward+backward", header, map(_step_row, rows)
    )
    return lines + [
        "Overhead: step time / encoder time - 1. Head, loss, grad norm + AdamW: each part timed alone, in % of "
        "the encoder's time. FLOP overhead: the floor the head's and the loss's FLOPs set.",
        "",
    ]


def _augmentation_table(a: dict[str, Any]) -> list[str]:
    names = {
        "ours": "ours (decode + crops + colour)",
        "crop_only": "ours, --gpu-augment (decode + crops)",
        "naive": "torchvision v2 on PIL (decode + all)",
    }
    body = [
        [
            label,
            _fmt(a[f"{key}_images_per_s"]),
            _fmt(a[f"{key}_images_per_cpu_s"]),
            _fmt(a[f"{key}_peak_mb"], 0),
        ]
        for key, label in names.items()
    ]
    source = "x".join(str(v) for v in a["source_size"])
    title = f"Two-view augmentation per worker (one thread, JPEG {source} -> 2 x {a['image_size']} px)"
    lines = _table(title, ["pipeline", "images/s", "images per CPU-second", "peak MB"], body)
    return lines + [
        f"Speed-up over torchvision: {a['speedup']:.2f}x (CPU time: {a['cpu_speedup']:.2f}x).",
        "",
    ]


def _end_to_end_table(e: dict[str, Any]) -> list[str]:
    header = ["size", "batch", "workers", "loader img/s", "model-only img/s", "time loader/model-only"]
    header += ["waiting for data", "peak MB main / worker"]
    body = [
        [
            e["size"],
            str(e["batch"]),
            str(e["workers"]),
            _fmt(e["images_per_s"]),
            _fmt(e["model_only_images_per_s"]),
        ]
        + [
            _fmt(e["ratio"], 2, "x"),
            _pct(e["data_wait_fraction"]),
            f"{e['peak_mb']:,.0f} / {e['worker_peak_mb']:,.0f}",
        ]
    ]
    return _table("End-to-end pre-training with the streaming loader", header, body)


def render_markdown(results: dict[str, Any]) -> str:
    """results.json as Markdown: the machine and versions, then one table per section that ran."""
    env = results["environment"]
    gpu = env["device_name"] + ", " if env["device"] == "cuda" else ""
    lines = [
        "# DenseCL-ViT benchmark",
        "",
        f"- Machine: {gpu}{env['cpu']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads; "
        f"device {env['device']}",
        f"- torch {env['torch']}, torchvision {env['torchvision']}, transformers {env['transformers']}, "
        f"timm {env['timm']}, Python {env['python']}; {env['date']}",
        f"- dtype {env['dtype']}, attention {env['attention']}, torch.compile {env['compile']}, "
        f"images {env['image_size']} px, median of {env['repeats']} interleaved repeats",
        f"- Command: `{env['command']}`",
        "",
    ]
    tables = {
        "encoder": _encoder_table,
        "pretraining_step": _step_table,
        "augmentation": _augmentation_table,
        "end_to_end": _end_to_end_table,
    }
    for name, table in tables.items():
        if results.get(name):
            lines += table(results[name])
    lines += [f"- {note}" for note in results.get("notes", [])]
    lines.append(
        "- Peak MB: CUDA max allocated, or the process's peak resident set during the candidate (on the CPU it "
        "includes what earlier sections left allocated)."
    )
    return "\n".join(lines).rstrip() + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/benchmark.py",
        description="Benchmark DenseCL-ViT against baselines timed in the same run; writes results.json and "
        "results.md.",
    )
    add = parser.add_argument
    add("--device", choices=("cpu", "cuda"), default="cpu")
    add("--quick", action="store_true", help="tiny model, batches and repeats (for tests; < 1 minute on CPU)")
    add("--sizes", help=f"comma-separated, from {', '.join(SIZES)} (default vit-tiny,vit-small; quick: test)")
    add("--batch", type=int, help="images per step (default: 4 on CPU, 128 on GPU, 2 quick)")
    add("--image-size", type=int, help="view side in pixels (default 224, quick 32)")
    add("--threads", type=int, help="torch threads (default: torch's choice)")
    add("--dtype", choices=("fp32", "bf16"), help="bf16 = autocast (default: fp32 on CPU, bf16 on GPU)")
    add("--compile", action="store_true", help="torch.compile the models (ours and timm alike)")
    add("--repeats", type=int, help="timed rounds per candidate (default: 5 on CPU, 20 on GPU, 2 quick)")
    add("--warmup", type=int, help="untimed calls per candidate first (default 1)")
    add("--workers", type=int, help="DataLoader workers of the end-to-end run (default: min(8, CPUs - 1))")
    add("--steps", type=int, help="timed steps of the end-to-end run (default 8, quick 2)")
    add("--aug-images", type=int, help="images per augmentation pipeline (default 200, quick 4)")
    add("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    add("--gpu-augment", action="store_true", help="end-to-end: colour augmentation batched on the device")
    add("--peak-tflops", type=float, help="the accelerator's peak TFLOP/s for MFU (default: from its name)")
    add("--output-dir", default="outputs/benchmark")
    return parser


def _positive(flag: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ValueError(f"{flag} must be >= {minimum}, got {value}")


def resolve_options(args: argparse.Namespace) -> BenchOptions:
    """Defaults by device and --quick; one-line ValueErrors for impossible values."""
    from .data import default_num_workers

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA GPU, and torch sees none; run with --device cpu")
    cuda, quick = args.device == "cuda", args.quick
    sizes = (args.sizes or ("test" if quick else "vit-tiny,vit-small")).split(",")
    unknown = [size for size in sizes if size not in SIZES]
    if unknown:
        raise ValueError(f"unknown --sizes {', '.join(unknown)}; choose from {', '.join(SIZES)}")
    sections = args.sections.split(",")
    if not set(sections) <= set(SECTIONS):
        raise ValueError(f"--sections must be a subset of {', '.join(SECTIONS)}, got {args.sections}")
    for flag in ("batch", "image_size", "threads", "repeats", "steps", "aug_images"):
        _positive("--" + flag.replace("_", "-"), getattr(args, flag))
    _positive("--warmup", args.warmup, 0)
    _positive("--workers", args.workers, 0)
    image_size = args.image_size or (32 if quick else 224)
    for size in sizes:
        build_config(
            size, image_size
        )  # the config refuses an image size that is no multiple of the patch size
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if cuda else ""
    return BenchOptions(
        device=device,
        sizes=sizes,
        batch=args.batch or (2 if quick else 128 if cuda else 4),
        image_size=image_size,
        dtype=args.dtype or ("bf16" if cuda else "fp32"),
        threads=args.threads or torch.get_num_threads(),
        compile=args.compile,
        repeats=args.repeats or (2 if quick else 20 if cuda else 5),
        warmup=1 if args.warmup is None else args.warmup,
        workers=default_num_workers() if args.workers is None else args.workers,
        steps=args.steps or (2 if quick else 8),
        aug_images=args.aug_images or (4 if quick else 200),
        source_size=(64, 48) if quick else SOURCE_SIZE,
        sections=sections,
        gpu_augment=args.gpu_augment,
        peak_tflops=args.peak_tflops or (peak_tflops(name) if cuda else None),
        output_dir=Path(args.output_dir),
    )


def _accelerator(opts: BenchOptions) -> Any:
    from accelerate import Accelerator

    return Accelerator(
        cpu=opts.device.type == "cpu",
        mixed_precision="bf16" if opts.dtype == "bf16" else "no",
        step_scheduler_with_optimizer=False,
    )


def run(opts: BenchOptions, argv: Sequence[str] = ()) -> dict[str, Any]:
    """Every selected section; writes results.json and results.md to `opts.output_dir` and returns the results."""
    from .runlog import atomic_write_text, write_json

    results: dict[str, Any] = {"environment": environment(opts, argv), "seconds": {}, "notes": []}
    accelerator = _accelerator(opts) if {"pretraining_step", "end_to_end"} & set(opts.sections) else None
    sections: dict[str, Callable[[], Any]] = {
        "encoder": lambda: [row for size in opts.sizes for row in encoder_benchmark(size, opts)],
        "pretraining_step": lambda: [
            pretraining_step_benchmark(size, opts, accelerator) for size in opts.sizes
        ],
        "augmentation": lambda: augmentation_benchmark(opts),
        "end_to_end": lambda: _end_to_end(opts, accelerator),
    }
    for name in opts.sections:
        sizes = {"encoder": opts.sizes, "pretraining_step": opts.sizes, "end_to_end": opts.sizes[:1]}
        print(f"benchmark: {name} {' '.join(sizes.get(name, []))}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        results[name] = sections[name]()
        results["seconds"][name] = time.perf_counter() - start
    if opts.device.type == "cpu":
        results["notes"].append(
            "No GPU in this run: MFU needs --device cuda (bf16 autocast, SDPA, fused AdamW; peak from the "
            "card's name). CPU rates depend on the machine's load; compare the ratios."
        )
    elif opts.peak_tflops is None:
        results["notes"].append("Unknown GPU peak: pass --peak-tflops for MFU.")
    results["notes"].append(
        "FLOPs per image forward: 2 N p^2 C D + L (24 T D^2 + 4 T^2 D) (T = N + 1 tokens); forward+backward = "
        "3x forward, less the patch embedding's input gradient."
    )
    opts.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(opts.output_dir / "results.json", results)
    atomic_write_text(opts.output_dir / "results.md", render_markdown(results))
    return results


def _end_to_end(opts: BenchOptions, accelerator: Any) -> dict[str, Any]:
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory() as folder:
            return end_to_end_benchmark(opts.sizes[0], opts, accelerator, Path(folder))
    finally:
        if enabled:
            datasets.enable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 with a one-line error for bad options)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        opts = resolve_options(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    try:
        results = run(opts, argv)
    finally:
        torch.set_num_threads(threads)
    print(render_markdown(results))
    print(f"wrote {opts.output_dir / 'results.json'} and {opts.output_dir / 'results.md'}")
    return 0
