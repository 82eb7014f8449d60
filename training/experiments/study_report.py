"""The report of `study`: study.json, study.md (validity line, tables, paired differences) and study.png.

Everything here reads the study's records: "encoders" [{"arm", "seed", "factor", "loss_start", "loss_end",
"patch_cos", "patch_cos_centered", "probes": {L: {metric: value}}}] and "finetune" [{"arm", "seed", "task",
metric: value}]. Arms are compared seed by seed: within a seed every arm sees the same labelled subset.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..engine.runlog import write_json
from ..evaluation.visualize import pca_rgb

PROBE_METRICS = ("seg_miou", "coarse_miou", "knn_miou", "delta1", "abs_rel")
VALIDITY_METRICS = ("seg_miou", "delta1")  # one per task
VALIDITY_FACTOR = 5.0
ENCODER_METRICS = ("loss_start", "loss_end", "patch_cos", "patch_cos_centered")
FINETUNE_METRICS = ("mean_iou", "delta1", "abs_rel")
# key -> (column title, scale, decimals, True: higher is better / False: lower is better / None: a diagnostic)
COLUMNS = {
    "seg_miou": ("mIoU %", 100.0, 1, True),
    "coarse_miou": ("4-class mIoU %", 100.0, 1, True),
    "knn_miou": ("k-NN mIoU %", 100.0, 1, True),
    "mean_iou": ("mIoU %", 100.0, 1, True),
    "delta1": ("δ1 %", 100.0, 1, True),
    "abs_rel": ("AbsRel", 1.0, 3, False),
    "loss_start": ("loss start", 1.0, 2, None),
    "loss_end": ("loss end", 1.0, 2, None),
    "patch_cos": ("patch cosine", 1.0, 3, None),
    "patch_cos_centered": ("patch cosine, centred", 1.0, 3, None),
}


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


def seed_values(
    records: Sequence[Mapping[str, Any]], arm: str, metric: str, factor: int = 1, count: str | None = None
) -> dict[int, float]:
    """{seed: metric} of one arm's encoder records (a probe metric when `count`, the L, is given)."""
    out = {}
    for r in records:
        if r["arm"] == arm and r.get("factor", 1) == factor:
            source = r["probes"].get(count, {}) if count is not None else r
            if metric in source:
                out[r["seed"]] = float(source[metric])
    return out


def paired(values: Mapping[int, float], baseline: Mapping[int, float]) -> list[float]:
    """values - baseline for each seed both have, in seed order."""
    return [values[s] - baseline[s] for s in sorted(set(values) & set(baseline))]


def _cell(stats: Mapping[str, Any] | None, key: str, bold: bool = False, signed: bool = False) -> str:
    if not stats or stats["n"] == 0:
        return "–"
    _, scale, decimals, _ = COLUMNS[key]
    text = f"{scale * stats['mean']:{'+' if signed else ''}.{decimals}f}"
    if stats["std"] is not None:
        text += f" ± {scale * stats['std']:.{decimals}f}"
    return f"**{text}**" if bold else text


def _title(key: str) -> str:
    title, _, _, higher = COLUMNS[key]
    return title if higher is None else f"{title} {'↑' if higher else '↓'}"


def _table(
    rows: Sequence[tuple[str, Mapping[str, dict]]],
    keys: Sequence[str],
    signed: bool = False,
    rank: bool = True,
) -> list[str]:
    """Markdown rows of (label, {metric: mean_std}); with `rank`, the best mean of a ranked metric in bold."""
    winners = {}
    if rank and not signed:
        for key in keys:
            means = {
                label: st[key]["mean"] for label, st in rows if key in st and math.isfinite(st[key]["mean"])
            }
            if COLUMNS[key][3] is not None and means:
                best = (max if COLUMNS[key][3] else min)(means.values())
                winners[key] = {label for label, m in means.items() if m == best}
    lines = ["| encoder | " + " | ".join(_title(k) for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label, stats in rows:
        cells = [_cell(stats.get(k), k, label in winners.get(k, ()), signed) for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _probe_stats(study: Mapping[str, Any], arm: str, count: str, factor: int = 1) -> dict[str, dict]:
    records = study["encoders"]
    return {m: mean_std(list(seed_values(records, arm, m, factor, count).values())) for m in PROBE_METRICS}


def _arms_with(study: Mapping[str, Any], factor: int) -> list[str]:
    present = {r["arm"] for r in study["encoders"] if r.get("factor", 1) == factor}
    return [a for a in study["arms"] if a in present]


def validity(study: Mapping[str, Any]) -> dict[str, Any]:
    """Whether supervised beats random on the frozen probes by >= 5x random's seed std, for each label count and
    task metric: {"valid": bool | None (not measurable), "checks": [{count, metric, gap, random_std, ok}]}."""
    records, checks = study["encoders"], []
    for count in map(str, study["label_counts"]):
        for metric in VALIDITY_METRICS:
            sup = mean_std(list(seed_values(records, "supervised", metric, 1, count).values()))
            rnd = mean_std(list(seed_values(records, "random", metric, 1, count).values()))
            if sup["n"] == 0 or rnd["n"] < 2:
                checks.append(
                    {"count": count, "metric": metric, "gap": None, "random_std": rnd["std"], "ok": None}
                )
                continue
            gap = sup["mean"] - rnd["mean"]
            ok = gap >= VALIDITY_FACTOR * rnd["std"] and gap > 0
            checks.append({"count": count, "metric": metric, "gap": gap, "random_std": rnd["std"], "ok": ok})
    states = [c["ok"] for c in checks]
    valid = None if not states or None in states else all(states)
    return {"valid": valid, "checks": checks}


def _ssl_arms(study: Mapping[str, Any]) -> list[str]:
    return [a for a in _arms_with(study, 1) if a not in ("random", "supervised")]


def best_arm(study: Mapping[str, Any]) -> str | None:
    """The self-supervised arm with the largest mean paired gain over random, averaged over the label counts and
    the four probe scores (segmentation, 4-class, k-NN mIoU and δ1); None without random or any such arm."""
    records, scores = study["encoders"], {}
    for arm in _ssl_arms(study):
        gains = [
            np.mean(
                paired(seed_values(records, arm, m, 1, c), seed_values(records, "random", m, 1, c))
                or [np.nan]
            )
            for c in map(str, study["label_counts"])
            for m in PROBE_METRICS[:4]
        ]
        scores[arm] = float(np.mean(gains))
    finite = {a: s for a, s in scores.items() if math.isfinite(s)}
    return max(finite, key=finite.get) if finite else None


def beats(study: Mapping[str, Any], arm: str, baseline: str) -> bool:
    """Whether `arm` beats `baseline` beyond the seed spread on both tasks: for seg mIoU and δ1 at every label
    count, the mean paired difference exceeds twice its standard error, std / sqrt(seeds) (at least 2 seeds)."""
    records = study["encoders"]
    for count in map(str, study["label_counts"]):
        for metric in VALIDITY_METRICS:
            diffs = paired(
                seed_values(records, arm, metric, 1, count), seed_values(records, baseline, metric, 1, count)
            )
            if len(diffs) < 2 or not np.mean(diffs) > 2 * np.std(diffs, ddof=1) / np.sqrt(len(diffs)):
                return False
    return True


def _validity_lines(study: Mapping[str, Any]) -> list[str]:
    check = validity(study)
    parts = []
    for c in check["checks"]:
        title, scale, decimals, _ = COLUMNS[c["metric"]]
        if c["gap"] is None:
            parts.append(f"{title} at L={c['count']}: not measurable")
        else:
            parts.append(
                f"{title} at L={c['count']}: {scale * c['gap']:+.{decimals}f} vs 5 × {scale * c['random_std']:.{decimals}f}"
            )
    verdict = {
        True: "**valid**: the supervised upper bound beats random init by at least 5× random's seed std on both tasks",
        False: "**invalid**: the supervised upper bound does not beat random init by 5× random's seed std; "
        "this testbed cannot rank methods, and the tables below rank nothing",
        None: "**not checked**: it needs the supervised and random arms with at least 2 seeds",
    }[check["valid"]]
    return [f"Testbed {verdict} ({'; '.join(parts)})."]


def _header(study: Mapping[str, Any]) -> list[str]:
    s = study["settings"]
    model = (
        s["model"] if isinstance(s["model"], str) else ", ".join(f"{k} {v}" for k, v in s["model"].items())
    )
    p = study["probe"]
    return [
        "# Which pre-training helps dense tasks: a study on the synthetic scenes",
        "",
        f"{study['num_pool']} unlabelled pool scenes for pre-training; {s['num_train']} labelled and {s['num_val']} "
        f"validation scenes from a disjoint render, all {s['image_size']}x{s['image_size']} px. Encoder: {model}. "
        f"Pre-training: {s['pretrain_steps']} steps of {s['pretrain_batch_size']} images (base lr {s['pretrain_lr']:g} "
        f"per 256 images, crop scale {tuple(s['crop_scale'])}). Frozen probes on cached patch tokens, trained on L "
        f"labelled scenes drawn anew per seed (L in {study['label_counts']}): {p['steps']} full-batch AdamW steps at lr "
        f"{p['lr']:g}; k-NN with k = {p['knn_k']}. Mean ± sample std over seeds {study['seeds']} "
        f"(size `{study['size']}`; this invocation ran {study.get('wall_time_s', 0) / 60:.0f} min).",
        "",
    ]


def study_markdown(study: Mapping[str, Any]) -> str:
    """study.md: validity line, frozen-probe tables per L, paired differences, longer budget, fine-tuning."""
    titles, lines = study["titles"], _header(study) + _validity_lines(study)
    arms, keys, rank = _arms_with(study, 1), PROBE_METRICS, validity(study)["valid"] is True
    for count in map(str, study["label_counts"]):
        rows = [(titles[a], _probe_stats(study, a, count)) for a in arms]
        lines += ["", f"## Frozen probes, L = {count} labelled scenes", "", *_table(rows, keys, rank=rank)]
        diff_rows = []
        for baseline in ("random", "local-global"):
            base = seed_values(study["encoders"], baseline, keys[0], 1, count)
            if not base:
                continue
            compared = arms if baseline == "random" else _ssl_arms(study)
            for arm in (a for a in compared if a != baseline):
                stats = {
                    m: mean_std(
                        paired(
                            seed_values(study["encoders"], arm, m, 1, count),
                            seed_values(study["encoders"], baseline, m, 1, count),
                        )
                    )
                    for m in keys
                }
                diff_rows.append((f"{titles[arm]} − {titles[baseline]}", stats))
        if diff_rows:
            lines += ["", f"Paired differences (same seed, same labelled subset), L = {count}:", ""]
            lines += _table(diff_rows, keys, signed=True)
    lines += _verdict_lines(study)
    lines += _longer_lines(study)
    lines += _finetune_lines(study)
    enc_rows = [
        (
            titles[a],
            {m: mean_std(list(seed_values(study["encoders"], a, m).values())) for m in ENCODER_METRICS},
        )
        for a in arms
    ]
    lines += [
        "",
        "## Encoders",
        "",
        "Training loss at the first and last log; patch cosine: mean cosine between distinct patch tokens of a",
        "validation image (near 1: the patches collapsed onto one image-level vector); centred: after removing",
        "the mean patch token.",
        "",
        *_table(enc_rows, ENCODER_METRICS),
    ]
    return "\n".join(lines) + "\n"


def _verdict_lines(study: Mapping[str, Any]) -> list[str]:
    best = study.get("best_arm") or best_arm(study)
    if best is None or validity(study)["valid"] is not True:
        return []  # an invalid or unchecked testbed ranks nothing
    titles = study["titles"]
    winners = [a for a in _ssl_arms(study) if a != "local-global" and beats(study, a, "local-global")]
    text = ", ".join(titles[a] for a in winners) if winners else "none"
    return [
        "",
        f"Best self-supervised arm (largest mean paired gain over random init on the four probe scores): "
        f"**{titles[best]}**. Arms that beat the paper's loss beyond the seed spread on both tasks (mean paired "
        f"difference above twice its standard error for mIoU and δ1 at every L): {text}.",
    ]


def _longer_lines(study: Mapping[str, Any]) -> list[str]:
    factor = study["longer_factor"]
    arms = _arms_with(study, factor)
    if not arms:
        return []
    lines = ["", f"## Longer budget: {factor}x the pre-training steps", ""]
    for count in map(str, study["label_counts"]):
        rows = [(f"{study['titles'][a]}, x{factor}", _probe_stats(study, a, count, factor)) for a in arms]
        rows += [(f"{study['titles'][a]}, x1", _probe_stats(study, a, count)) for a in arms]
        lines += [f"L = {count}:", "", *_table(rows, PROBE_METRICS), ""]
    return lines


def _finetune_lines(study: Mapping[str, Any]) -> list[str]:
    runs = study.get("finetune", [])
    if not runs:
        return []
    arms = [a for a in study["arms"] if any(r["arm"] == a for r in runs)]
    rows = []
    for arm in arms:
        stats = {m: mean_std([r[m] for r in runs if r["arm"] == arm and m in r]) for m in FINETUNE_METRICS}
        rows.append((study["titles"][arm], stats))
    s = study["settings"]
    return [
        "",
        f"## Secondary protocol: full fine-tuning on all {s['num_train']} labelled scenes",
        "",
        f"{s['finetune_steps']} steps of {s['finetune_batch_size']} images, lr {s['finetune_lr']:g}, layer decay "
        f"{s['layer_decay']}; linear heads; validation scenes as above.",
        "",
        *_table(rows, FINETUNE_METRICS),
    ]


def plot_study(study: Mapping[str, Any], path: str | Path) -> Path:
    """study.png: segmentation mIoU and δ1 of the frozen probes at each L, and the patch cosine, one bar per arm
    (mean ± std) with each seed as a dot."""
    arms, records = _arms_with(study, 1), study["encoders"]
    panels = [(m, str(c)) for m in VALIDITY_METRICS for c in study["label_counts"]] + [("patch_cos", None)]
    figure = Figure(figsize=(3.0 * len(panels), 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    x = np.arange(len(arms))
    for axis, (metric, count) in zip(figure.subplots(1, len(panels)), panels):
        scale = COLUMNS[metric][1]
        values = [list(seed_values(records, a, metric, 1, count).values()) for a in arms]
        means = [scale * np.mean(v) if v else np.nan for v in values]
        errors = [scale * np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]
        axis.bar(x, means, 0.7, yerr=errors, capsize=3, alpha=0.8)
        for xi, v in zip(x, values):
            axis.plot([xi] * len(v), [scale * e for e in v], "k.", markersize=3)
        axis.set_title(_title(metric) + (f", L = {count}" if count else ""), fontsize=9)
        axis.set_xticks(x, [study["titles"][a] for a in arms], rotation=60, ha="right", fontsize=6)
        finite = [m for m in means if math.isfinite(m)]
        if finite:
            axis.set_ylim(min(finite) * 0.9, max(finite) * 1.05)
    figure.savefig(path)
    return Path(path)


def plot_pca(
    images: np.ndarray, tokens: Mapping[str, np.ndarray], titles: Mapping[str, str], path: Path
) -> Path:
    """pca.png: a row per image (the image, then each encoder's first three principal components of its patch
    tokens as RGB, fitted jointly over all the images so colours compare across rows).

    images: (M, H, W, 3) uint8; tokens: {arm: (M, N, D)} on a square patch grid."""
    count, side = images.shape[0], images.shape[1]
    figure = Figure(figsize=(1.6 * (1 + len(tokens)), 1.6 * count + 0.4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(count, 1 + len(tokens), squeeze=False)
    maps = {}
    for arm, features in tokens.items():
        grid = round(features.shape[1] ** 0.5)
        rgb = pca_rgb(features.reshape(-1, features.shape[-1])).reshape(count, grid, grid, 3)
        maps[arm] = rgb.repeat(side // grid, axis=1).repeat(side // grid, axis=2)
    for row in range(count):
        axes[row, 0].imshow(images[row])
        for col, arm in enumerate(tokens, start=1):
            axes[row, col].imshow(maps[arm][row])
    for col, title in enumerate(["scene", *(titles[a] for a in tokens)]):
        axes[0, col].set_title(title, fontsize=6)
    for axis in axes.flat:
        axis.set_axis_off()
    figure.savefig(path)
    return Path(path)


def write_report(study: Mapping[str, Any], root: Path) -> None:
    """study.json, study.md and study.png in `root`."""
    write_json(root / "study.json", study)
    (root / "study.md").write_text(study_markdown(study))
    plot_study(study, root / "study.png")


__all__ = [
    "best_arm",
    "beats",
    "mean_std",
    "paired",
    "plot_pca",
    "plot_study",
    "seed_values",
    "study_markdown",
    "validity",
    "write_report",
]
