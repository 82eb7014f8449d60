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
and clock drift hit all alike; each reports the median over rounds after warm-up (the pre-training overhead
also as the median of the rounds' ratios, `paired_ratio`). Ratios between
candidates of one run are the numbers to compare across machines; absolute rates are of this machine.
Peak memory: per candidate, CUDA `max_memory_allocated`, or on the CPU the process's peak resident set
(VmHWM, reset before each candidate through /proc/self/clear_refs; `ru_maxrss` where that is unavailable).

Modules: `measure` (FLOPs, memory, timing, operator counts), `options` (sizes and the command line),
`model_sections` (encoder, pre-training step), `data_sections` (augmentation, end-to-end), `report`
(environment, Markdown) and `cli` (`run`, `main`).
"""

from .cli import main, run
from .data_sections import (
    augmentation_benchmark,
    end_to_end_benchmark,
    synthetic_jpegs,
    write_jpeg_parquet,
)
from .measure import (
    MemoryProbe,
    Timing,
    encoder_flops,
    operator_difference,
    paired_ratio,
    peak_tflops,
    pretraining_step_flops,
    time_interleaved,
    vit_forward_flops,
)
from .model_sections import encoder_benchmark, pretraining_step_benchmark
from .options import SECTIONS, SIZES, BenchOptions, build_config, build_parser, build_timm, resolve_options
from .report import environment, render_markdown

__all__ = [
    "SECTIONS",
    "SIZES",
    "BenchOptions",
    "MemoryProbe",
    "Timing",
    "augmentation_benchmark",
    "build_config",
    "build_parser",
    "build_timm",
    "encoder_benchmark",
    "encoder_flops",
    "end_to_end_benchmark",
    "environment",
    "main",
    "operator_difference",
    "paired_ratio",
    "peak_tflops",
    "pretraining_step_benchmark",
    "pretraining_step_flops",
    "render_markdown",
    "resolve_options",
    "run",
    "synthetic_jpegs",
    "time_interleaved",
    "vit_forward_flops",
    "write_jpeg_parquet",
]
