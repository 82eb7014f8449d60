"""The benchmark's command line: model sizes, `BenchOptions`, the parser and the defaults by device."""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ....modeling import DenseCLViTConfig, DenseCLViTModel
from ...data.loader import default_num_workers
from ...interop.conversion import timm_kwargs
from ...tasks.pretraining import resolve_gpu_augment
from .measure import peak_tflops

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
SECTIONS = ("encoder", "pretraining_step", "dense_memory", "augmentation", "end_to_end")
SOURCE_SIZE = (500, 375)  # (width, height) of the benchmark JPEGs: the ImageNet median


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
    loss: str = "local-global"
    dense_batch: int = 128

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def build_config(size: str, image_size: int, loss: str = "local-global") -> DenseCLViTConfig:
    """The config of a `SIZES` entry at `image_size` trained by `loss` (ValueError if the image size is no
    multiple of the patch size or the loss is no valid composition)."""
    spec = SIZES[size]
    if "preset" in spec:
        return DenseCLViTConfig.from_preset(spec["preset"], image_size=image_size, pretraining_loss=loss)
    return DenseCLViTConfig(**spec["config"], image_size=image_size, pretraining_loss=loss)


def build_timm(encoder: DenseCLViTModel, name: str) -> torch.nn.Module:
    """timm's `VisionTransformer` of `encoder`'s architecture (`name`'s defaults overridden), no head."""
    import timm  # optional (dev extra): only the timm baseline needs it

    kwargs = timm_kwargs(encoder)
    if kwargs is None:
        raise ValueError(f"timm's VisionTransformer cannot match {name} with this config; use a preset size")
    return timm.create_model(name, pretrained=False, **kwargs)


def utilisation(flops_per_s: float, opts: BenchOptions) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over the accelerator's peak; None without a known peak."""
    return flops_per_s / (opts.peak_tflops * 1e12) if opts.peak_tflops else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/benchmark.py",
        description="Benchmark DenseCL-ViT against baselines timed in the same run; writes results.json and "
        "results.md.",
    )
    add = parser.add_argument
    add("--device", choices=("cpu", "cuda"), default="cpu", help="where to time (cuda: bf16 autocast, MFU)")
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
    add(
        "--gpu-augment",
        action=argparse.BooleanOptionalAction,
        help="end-to-end: colour augmentation batched on the device (default: on for a GPU, as pre-training)",
    )
    add(
        "--loss",
        default="local-global",
        help="pretraining_loss of the timed training step, e.g. local-global+local-local (each term is also "
        "timed alone)",
    )
    add(
        "--dense-batch",
        type=int,
        help="images of the dense_memory section (default 128 on GPU, 32 on CPU, quick 2)",
    )
    add("--peak-tflops", type=float, help="the accelerator's peak TFLOP/s for MFU (default: from its name)")
    add("--output-dir", default="outputs/benchmark", help="folder for results.json and results.md")
    return parser


def _positive(flag: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ValueError(f"{flag} must be >= {minimum}, got {value}")


def _check_args(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(sizes, sections) of `args`, after one-line ValueErrors for impossible values."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA GPU, and torch sees none; run with --device cpu")
    sizes = (args.sizes or ("test" if args.quick else "vit-tiny,vit-small")).split(",")
    unknown = [size for size in sizes if size not in SIZES]
    if unknown:
        raise ValueError(f"unknown --sizes {', '.join(unknown)}; choose from {', '.join(SIZES)}")
    sections = args.sections.split(",")
    if not set(sections) <= set(SECTIONS):
        raise ValueError(f"--sections must be a subset of {', '.join(SECTIONS)}, got {args.sections}")
    for flag in ("batch", "image_size", "threads", "repeats", "steps", "aug_images", "dense_batch"):
        _positive("--" + flag.replace("_", "-"), getattr(args, flag))
    _positive("--warmup", args.warmup, 0)
    _positive("--workers", args.workers, 0)
    return sizes, sections


def resolve_options(args: argparse.Namespace) -> BenchOptions:
    """Defaults by device and --quick; one-line ValueErrors for impossible values."""
    sizes, sections = _check_args(args)
    cuda, quick = args.device == "cuda", args.quick
    image_size = args.image_size or (32 if quick else 224)
    for (
        size
    ) in sizes:  # the config refuses an image size that is no multiple of the patch size, or a bad loss
        build_config(size, image_size, args.loss)
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
        gpu_augment=resolve_gpu_augment(args.gpu_augment, device),
        peak_tflops=args.peak_tflops or (peak_tflops(name) if cuda else None),
        output_dir=Path(args.output_dir),
        loss=args.loss,
        dense_batch=args.dense_batch or (2 if quick else 128 if cuda else 32),
    )
