"""The benchmark's report: the machine and library versions, and results.json rendered as Markdown tables."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ....modeling import DenseCLViTModel
from ....modeling.configuration_densecl_vit import PRETRAINING_LOSS_TERMS
from .measure import MemoryProbe
from .options import BenchOptions, build_config


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(opts: BenchOptions, argv: Sequence[str]) -> dict[str, Any]:
    """Machine, library versions, date and the settings every number depends on."""
    import timm  # optional (dev extra), as in options.build_timm
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
        f"{r['ours_tflops']:.3g}",
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
    if r.get("unfused_optimizer_pct") is not None:
        optimizer += f" (unfused: {_fmt(r['unfused_optimizer_pct'], 1, '%')})"
    return [
        r["size"],
        str(r["batch"]),
        _fmt(r["train_step_images_per_s"]),
        _fmt(r["encoder_two_view_images_per_s"]),
        f"{_fmt(r['overhead_pct'], 1, '%')}; {_fmt(r['paired_overhead_pct'], 1, '%')}",
        _fmt(r["head_pct"], 1, "%"),
        _fmt(r["loss_pct"], 1, "%"),
        *(_fmt(r["loss_terms_pct"][t], 1, "%") for t in PRETRAINING_LOSS_TERMS),
        optimizer,
        _fmt(r["flop_overhead_pct"], 1, "%"),
        f"{r['train_step_peak_mb']:,.0f} / {r['encoder_two_view_peak_mb']:,.0f}",
        _pct(r["train_step_mfu"]),
    ]


def _step_table(rows: list[dict[str, Any]]) -> list[str]:
    header = ["size", "batch (x2 views)", "step img/s", "encoder img/s", "overhead (medians; paired)", "head"]
    header += [f"loss ({rows[0]['loss']})", *(f"{t} alone" for t in PRETRAINING_LOSS_TERMS)]
    header += ["grad norm + AdamW", "FLOP overhead", "peak MB step / encoder", "MFU"]
    lines = _table(
        f"Pre-training step ({rows[0]['loss']}) vs the encoder's two-view forward+backward",
        header,
        map(_step_row, rows),
    )
    fused = "fused" if all(r["fused_adamw"] for r in rows) else "not fused"
    return lines + [
        "Overhead: step time / encoder time - 1, from the two medians and as the median of the rounds' "
        "ratios (paired: robust to a machine whose speed drifts). Head, loss, grad norm + AdamW: each part "
        f"timed alone, in % of the encoder's time (the training run's AdamW, {fused}; unfused: torch's "
        "default kernels); each loss term alone on the same embeddings, with crop boxes drawn as pre-training "
        "draws them. FLOP overhead: the floor the head's and the local-global loss's FLOPs set.",
        "",
    ]


def _dense_memory_table(rows: list[dict[str, Any]]) -> list[str]:
    header = ["grid", "images", "chunks", "peak MB beyond inputs", "(B N)^2 float32 matrix MB", "seconds"]
    body = [
        [
            f"{r['size']} ({r['patches']} patches)",
            str(r["batch"]),
            r["chunk"],
            f"{r['peak_mb_beyond_inputs']:,.0f}",
            f"{r['similarity_matrix_mb']:,.0f}",
            _fmt(r["seconds"]),
        ]
        for r in rows
    ]
    return _table("Local-local term, forward+backward: peak memory", header, body) + [
        f"Peak memory ({rows[0]['memory']}) during the term's forward and backward on both views' embeddings.",
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
        "dense_memory": _dense_memory_table,
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
