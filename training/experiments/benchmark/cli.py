"""`scripts/benchmark.py`: run the selected sections, write results.json and results.md, print the tables."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...engine.runlog import atomic_write_text, write_json
from .data_sections import augmentation_benchmark, end_to_end_in_temporary_folder
from .model_sections import dense_loss_memory, encoder_benchmark, pretraining_step_benchmark
from .options import BenchOptions, build_parser, resolve_options
from .report import environment, render_markdown


def _accelerator(opts: BenchOptions) -> Any:
    from accelerate import Accelerator

    return Accelerator(
        cpu=opts.device.type == "cpu",
        mixed_precision="bf16" if opts.dtype == "bf16" else "no",
        step_scheduler_with_optimizer=False,
    )


def _notes(opts: BenchOptions) -> list[str]:
    notes = []
    if opts.device.type == "cpu":
        notes.append(
            "No GPU in this run: MFU needs --device cuda (bf16 autocast, SDPA, fused AdamW; peak from the "
            "card's name). CPU rates depend on the machine's load; compare the ratios."
        )
    elif opts.peak_tflops is None:
        notes.append("Unknown GPU peak: pass --peak-tflops for MFU.")
    notes.append(
        "FLOPs per image forward: 2 N p^2 C D + L (24 T D^2 + 4 T^2 D) (T = N + 1 tokens); forward+backward = "
        "3x forward, less the patch embedding's input gradient."
    )
    return notes


def run(opts: BenchOptions, argv: Sequence[str] = ()) -> dict[str, Any]:
    """Every selected section; writes results.json and results.md to `opts.output_dir` and returns the results."""
    results: dict[str, Any] = {"environment": environment(opts, argv), "seconds": {}, "notes": _notes(opts)}
    accelerator = _accelerator(opts) if {"pretraining_step", "end_to_end"} & set(opts.sections) else None
    sections: dict[str, Callable[[], Any]] = {
        "encoder": lambda: [row for size in opts.sizes for row in encoder_benchmark(size, opts)],
        "pretraining_step": lambda: [
            pretraining_step_benchmark(size, opts, accelerator) for size in opts.sizes
        ],
        "dense_memory": lambda: dense_loss_memory(opts),
        "augmentation": lambda: augmentation_benchmark(opts),
        "end_to_end": lambda: end_to_end_in_temporary_folder(opts, accelerator),
    }
    sizes = {"encoder": opts.sizes, "pretraining_step": opts.sizes, "end_to_end": opts.sizes[:1]}
    for name in opts.sections:
        print(f"benchmark: {name} {' '.join(sizes.get(name, []))}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        results[name] = sections[name]()
        results["seconds"][name] = time.perf_counter() - start
    opts.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(opts.output_dir / "results.json", results)
    atomic_write_text(opts.output_dir / "results.md", render_markdown(results))
    return results


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
