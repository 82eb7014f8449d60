"""The report of `study`: study.md (one table per protocol, the encoder table) and study.png (the chart).

Both read the content of study.json: {"settings", "seeds", "arms", "protocols", "tasks", "summary": {arm:
{"encoder" | protocol: {metric: {"mean", "std", "n", "values"}}}}, ...}.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TASK_METRICS = {"segmentation": ("mean_iou", "overall_accuracy"), "depth": ("abs_rel", "rmse", "delta1")}
ENCODER_METRICS = ("loss_start", "loss_end", "patch_cos", "patch_cos_centered")

ARM_NAMES = {
    "local-global": "local-to-global (paper)",
    "global": "global (SimCLR)",
    "both": "local-to-global + global",
    "random": "random init",
}
# key -> (column title, scale, decimals, True: higher is better / False: lower is better / None: a diagnostic)
COLUMNS = {
    "mean_iou": ("mIoU %", 100.0, 1, True),
    "overall_accuracy": ("pixel acc %", 100.0, 1, True),
    "abs_rel": ("AbsRel", 1.0, 3, False),
    "rmse": ("RMSE m", 1.0, 3, False),
    "delta1": ("δ1 %", 100.0, 1, True),
    "loss_start": ("pre-train loss start", 1.0, 2, None),
    "loss_end": ("pre-train loss end", 1.0, 2, None),
    "patch_cos": ("patch cosine", 1.0, 3, None),
    "patch_cos_centered": ("patch cosine, centred", 1.0, 3, None),
}
PROTOCOL_TITLES = {"frozen": "Frozen encoder + linear head", "full": "Full fine-tuning (linear head)"}


def _title(key: str) -> str:
    title, _, _, higher = COLUMNS[key]
    return title if higher is None else f"{title} {'↑' if higher else '↓'}"


def _cell(stats: Mapping[str, Any] | None, key: str, bold: bool) -> str:
    """ "mean ± std" of a metric in its column's unit ("–" without values; no std for one seed)."""
    if not stats or stats["n"] == 0:
        return "–"
    _, scale, decimals, _ = COLUMNS[key]
    text = f"{scale * stats['mean']:.{decimals}f}"
    if stats["std"] is not None:
        text += f" ± {scale * stats['std']:.{decimals}f}"
    return f"**{text}**" if bold else text


def _table(summary: Mapping[str, Any], arms: Sequence[str], group: str, keys: Sequence[str]) -> list[str]:
    """A Markdown table: one row per arm, one column per metric of `group`; the best mean of a ranked metric
    in bold (every arm that ties for it)."""
    keys = [k for k in keys if any(k in summary[a].get(group, {}) for a in arms)]
    winners = {}
    for key in keys:
        means = {a: summary[a][group][key]["mean"] for a in arms if key in summary[a].get(group, {})}
        finite = {a: m for a, m in means.items() if math.isfinite(m)}
        if COLUMNS[key][3] is not None and finite:
            best = (max if COLUMNS[key][3] else min)(finite.values())
            winners[key] = {a for a, m in finite.items() if m == best}  # ties: every tied arm
    lines = ["| encoder | " + " | ".join(_title(k) for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for arm in arms:
        cells = [_cell(summary[arm].get(group, {}).get(k), k, arm in winners.get(k, ())) for k in keys]
        lines.append(f"| {ARM_NAMES.get(arm, arm)} | " + " | ".join(cells) + " |")
    return lines


def study_markdown(study: Mapping[str, Any]) -> str:
    """study.md: the settings, one table per protocol (best mean in bold), the encoder table."""
    s, summary, arms = study["settings"], study["summary"], study["arms"]
    model = (
        s["model"] if isinstance(s["model"], str) else ", ".join(f"{k} {v}" for k, v in s["model"].items())
    )
    lines = [
        "# Local-to-global vs global pre-training, in miniature",
        "",
        f"Synthetic indoor scenes, {s['num_train']} training / {s['num_val']} validation images of "
        f"{s['image_size']}x{s['image_size']} px; encoder: {model}. Pre-training: {s['pretrain_steps']} steps of "
        f"{s['pretrain_batch_size']} images (base lr {s['pretrain_lr']:g} per 256 images). Fine-tuning: "
        f"{s['finetune_steps']} steps of {s['finetune_batch_size']} images, lr {study['frozen_lr']:g} (frozen) / "
        f"{s['finetune_lr']:g} (full). Mean ± sample std over seeds {study['seeds']} "
        f"(size `{study['size']}`; the last invocation ran {study['wall_time_s'] / 60:.0f} min).",
    ]
    for protocol in study["protocols"]:
        keys = [m for task in study["tasks"] for m in TASK_METRICS[task]]
        lines += [
            "",
            f"## {PROTOCOL_TITLES[protocol]}",
            "",
            *_table(summary, arms, protocol, keys),
        ]
    lines += _differences_section(study)
    lines += [
        "",
        "## Encoders",
        "",
        "Patch cosine: mean cosine similarity between distinct patch features of one validation image (near 1:",
        "the patches collapsed onto one image-level vector); centred: after subtracting the mean patch feature.",
        "",
        *_table(summary, arms, "encoder", ENCODER_METRICS),
    ]
    return "\n".join(lines) + "\n"


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """{"mean", "std" (sample std over seeds; None for one value), "n", "values"}; non-finite values are kept
    in "values" and make the mean NaN (reported, never hidden)."""
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()) if array.size else math.nan,
        "std": float(array.std(ddof=1)) if array.size > 1 else None,
        "n": int(array.size),
        "values": [float(v) for v in array],
    }


PAIRS = (("local-global", "global"), ("local-global", "random"), ("both", "global"))


def paired_differences(
    runs: Sequence[Mapping[str, Any]], arm: str, baseline: str, protocol: str, metric: str
) -> list[float]:
    """metric(arm) - metric(baseline) for each seed both arms ran under `protocol`, in seed order."""
    values = {
        name: {
            r["seed"]: r[metric]
            for r in runs
            if r["arm"] == name and r["protocol"] == protocol and metric in r
        }
        for name in (arm, baseline)
    }
    return [
        values[arm][seed] - values[baseline][seed]
        for seed in sorted(set(values[arm]) & set(values[baseline]))
    ]


def _differences_section(study: Mapping[str, Any]) -> list[str]:
    """A table of paired differences (same seed: same fine-tuning data order and head initialisation)."""
    keys = [m for task in study["tasks"] for m in TASK_METRICS[task]]
    pairs = [(a, b) for a, b in PAIRS if a in study["arms"] and b in study["arms"]]
    if not pairs:
        return []
    lines = [
        "",
        "## Paired differences",
        "",
        "Arm minus baseline for each seed, then mean ± std over the seeds (units as above; positive is better for",
        "↑ metrics, negative for ↓ ones).",
        "",
        "| protocol | difference | " + " | ".join(_title(k) for k in keys) + " |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for protocol in study["protocols"]:
        for arm, baseline in pairs:
            stats = {k: mean_std(paired_differences(study["runs"], arm, baseline, protocol, k)) for k in keys}
            cells = [_cell(stats[k], k, bold=False) for k in keys]
            name = f"{ARM_NAMES[arm].split(' (')[0]} − {ARM_NAMES[baseline].split(' (')[0]}"
            lines.append(f"| {protocol} | {name} | " + " | ".join(cells) + " |")
    return lines


def plot_study(study: Mapping[str, Any], path: str | Path) -> Path:
    """study.png: per metric, one group of bars per arm (one bar per protocol, ±std) with the seeds as dots,
    and the patch cosine of each encoder."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    summary, arms, protocols = study["summary"], study["arms"], study["protocols"]
    keys = [m for task in study["tasks"] for m in TASK_METRICS[task] if m != "overall_accuracy"]
    panels = [(k, protocols) for k in keys] + [("patch_cos", ["encoder"])]
    figure = Figure(figsize=(3.2 * len(panels), 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    x = np.arange(len(arms))
    for axis, (key, groups) in zip(figure.subplots(1, len(panels)), panels):
        width = 0.8 / len(groups)
        for g, group in enumerate(groups):
            stats = [summary[a].get(group, {}).get(key) for a in arms]
            scale = COLUMNS[key][1]
            means = [scale * st["mean"] if st else np.nan for st in stats]
            errors = [scale * (st["std"] or 0.0) if st else 0.0 for st in stats]
            offset = x + (g - (len(groups) - 1) / 2) * width
            axis.bar(offset, means, width, yerr=errors, capsize=3, label=group, alpha=0.8)
            for xi, st in zip(offset, stats):
                values = [scale * v for v in (st["values"] if st else [])]
                axis.plot([xi] * len(values), values, "k.", markersize=3)
        axis.set_title(_title(key), fontsize=10)
        axis.set_xticks(
            x, [ARM_NAMES.get(a, a).split(" (")[0] for a in arms], rotation=30, ha="right", fontsize=8
        )
        if len(groups) > 1:
            axis.legend(fontsize=7)
    figure.savefig(path)
    return Path(path)
