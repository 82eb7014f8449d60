"""The paper's claim in miniature: on the synthetic indoor scenes, compare encoders pre-trained with the
local-to-global loss, the global (SimCLR) loss and their sum against a random initialisation, under two
protocols (frozen encoder + linear head, and full fine-tuning) for segmentation and depth.

Every arm uses the same architecture, data and budget, for several seeds; each pre-training and fine-tuning run
is the project's own script run in this process (`demo.run_stage`). A patch-feature diagnostic measures how
alike the patch features of one image are (mean cosine similarity of distinct patches on the validation split;
near 1: the patches collapsed onto one image-level vector); the centred variant first subtracts the mean feature
of all validation patches, which removes an offset that every patch shares. Outputs in the study folder::

    data/  pretrain/ARM/seed-K/  finetune/ARM/seed-K/PROTOCOL-TASK/   the runs (finished runs are skipped
                                                                       when the study is started again)
    study.json   settings, per-run records and mean/std over seeds
    study.md     the tables          study.png   the chart
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .demo import (
    DemoSettings,
    depth_argv,
    ensure_dataset,
    loss_curve,
    model_argument,
    pretrain_argv,
    run_stage,
    segmentation_argv,
)
from .runlog import read_json, write_json

ARMS: tuple[str, ...] = ("local-global", "global", "both", "random")
PROTOCOLS: tuple[str, ...] = ("frozen", "full")
TASKS: tuple[str, ...] = ("segmentation", "depth")
TASK_METRICS = {"segmentation": ("mean_iou", "overall_accuracy"), "depth": ("abs_rel", "rmse", "delta1")}
ENCODER_METRICS = ("loss_start", "loss_end", "patch_cos", "patch_cos_centered")


@dataclasses.dataclass(frozen=True)
class StudySize:
    """Run settings shared by every arm (`settings`; its `finetune_lr` is the full fine-tuning lr), the linear
    probe's lr, and how many validation images the patch diagnostic reads."""

    settings: DemoSettings
    frozen_lr: float = 5e-3
    diagnostic_samples: int = 100


def _sizes() -> dict[str, StudySize]:
    small_vit = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "patch_size": 8}
    common = dict(
        projection_hidden_size=256, projection_dim=64, finetune_lr=5e-4, layer_decay=None, plot_curves=False
    )
    return {
        "tiny": StudySize(
            DemoSettings(
                image_size=32, num_train=16, num_val=4, pretrain_steps=2, pretrain_batch_size=4,
                finetune_steps=2, finetune_batch_size=4, log_every=1, num_workers=0,
                model={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8},
                **{**common, "projection_hidden_size": 32, "projection_dim": 16},
            ),
            diagnostic_samples=4,
        ),
        "small": StudySize(
            DemoSettings(
                image_size=32, num_train=1000, num_val=100, model=small_vit, pretrain_steps=200,
                finetune_steps=100, **common,
            )
        ),
        "default": StudySize(
            DemoSettings(
                image_size=48, num_train=2000, num_val=100, model=small_vit, pretrain_steps=400,
                finetune_steps=100, **common,
            )
        ),
        "large": StudySize(
            DemoSettings(
                image_size=128, num_train=10000, num_val=500, model="vit-tiny", pretrain_steps=3000,
                pretrain_batch_size=128, finetune_steps=1000, finetune_batch_size=32, num_workers=6,
                log_every=50, **{**common, "projection_hidden_size": 2048, "projection_dim": 256},
            ),
            frozen_lr=2e-3,
            diagnostic_samples=500,
        ),
    }  # fmt: skip


SIZES: dict[str, StudySize] = _sizes()


# --- the patch-feature diagnostic ---------------------------------------------------------------------


def mean_patch_cosine(features: torch.Tensor) -> torch.Tensor:
    """Per-image mean cosine similarity between distinct patch features: (B, N, D) -> (B,), N >= 2."""
    if features.ndim != 3 or features.shape[1] < 2:
        raise ValueError(f"features must be (B, N, D) with N >= 2 patches, got shape {tuple(features.shape)}")
    unit = F.normalize(features.double(), dim=-1)
    gram = unit @ unit.transpose(1, 2)  # (B, N, N)
    n = unit.shape[1]
    off_diagonal = gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)
    return off_diagonal / (n * (n - 1))


@torch.inference_mode()
def patch_features(
    encoder_dir: str | Path, dataset: Path, num_samples: int, batch_size: int = 32
) -> torch.Tensor:
    """Final-norm patch features (M, N, D) of the first `num_samples` validation images, at their stored size."""
    from ..modeling import DenseCLViTModel
    from .dense_transforms import to_pixel_values
    from .synthetic_dataset import load_synthetic_dataset

    encoder = DenseCLViTModel.from_pretrained(encoder_dir).eval()
    stream = load_synthetic_dataset(dataset, "validation", streaming=True).take(num_samples)
    pixels = [to_pixel_values(example["image"].convert("RGB")) for example in stream]
    if not pixels:
        raise ValueError(f"{dataset} holds no validation images for the patch diagnostic")
    batches = [torch.stack(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    return torch.cat([encoder(pixel_values=b).last_hidden_state[:, 1:] for b in batches])


def patch_similarity(features: torch.Tensor) -> dict[str, float]:
    """{"patch_cos": mean over images of `mean_patch_cosine`, "patch_cos_centered": the same after subtracting
    the mean feature of all the patches of all the images} of features (M, N, D)."""
    centered = features - features.mean(dim=(0, 1), keepdim=True)
    return {
        "patch_cos": float(mean_patch_cosine(features).mean()),
        "patch_cos_centered": float(mean_patch_cosine(centered).mean()),
    }


# --- runs ---------------------------------------------------------------------------------------------


def _complete(run_dir: Path, needed: str) -> bool:
    results = run_dir / "results.json"
    return (
        results.is_file() and read_json(results).get("status") == "completed" and (run_dir / needed).exists()
    )


def _run_once(run_dir: Path, needed: str, run: Callable[[], Any]) -> None:
    """Run unless `run_dir` holds a completed run; a partial run is cleared first. Checkpoints are dropped
    after completion (the study only reads the final model and the results)."""
    if _complete(run_dir, needed):
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run()
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def save_random_encoder(model: str, image_size: int, seed: int, folder: Path) -> Path:
    """A randomly initialised encoder (seeded) of the --model value's architecture, saved like a pre-trained one."""
    from accelerate.utils import set_seed

    from ..modeling import DenseCLViTConfig, DenseCLViTImageProcessor, DenseCLViTModel
    from .pretraining import model_source

    fields = {k: v for k, v in model_source(model)[1].items() if k not in ("architectures", "auto_map")}
    config = DenseCLViTConfig.from_dict({**fields, "image_size": image_size})
    set_seed(seed)
    DenseCLViTModel(config).save_pretrained(folder)
    size = {"height": image_size, "width": image_size}
    DenseCLViTImageProcessor(size=size, size_divisor=config.patch_size).save_pretrained(folder)
    return folder


def build_encoder(
    size: StudySize, arm: str, seed: int, data: Path, root: Path
) -> tuple[Path, dict[str, float]]:
    """The encoder folder of (arm, seed), pre-training it if needed, and its pre-training loss start/end."""
    from .pretraining import PretrainConfig
    from .pretraining import main as pretrain_main

    s, run_dir = size.settings, root / "pretrain" / arm / f"seed-{seed}"
    model = model_argument(s.model, root)
    if arm == "random":
        if not (run_dir / "final" / "model.safetensors").is_file():
            save_random_encoder(model, s.image_size, seed, run_dir / "final")
        return run_dir / "final", {}
    argv = pretrain_argv(s, data, run_dir, model, loss=arm, seed=seed)
    _run_once(run_dir, "final", lambda: run_stage(pretrain_main, PretrainConfig, argv))
    start, end = loss_curve(run_dir)
    return run_dir / "final", {"loss_start": start, "loss_end": end}


def finetune(
    size: StudySize, task: str, protocol: str, encoder: Path, seed: int, data: Path, run_dir: Path
) -> dict[str, float]:
    """Fine-tune `encoder` for `task` under `protocol` ("frozen": linear probe, no drop path); its metrics."""
    from . import depth, segmentation

    s = (
        size.settings
        if protocol == "full"
        else dataclasses.replace(size.settings, finetune_lr=size.frozen_lr)
    )
    if task == "segmentation":
        module, cls, argv = segmentation, segmentation.FinetuneSegmentationConfig, segmentation_argv
    else:
        module, cls, argv = depth, depth.FinetuneDepthConfig, depth_argv
    args = argv(s, data, str(encoder), run_dir, seed)
    if protocol == "frozen":
        args += ["--freeze-encoder", "--drop-path-rate", "0"]
    _run_once(run_dir, "eval_results.json", lambda: run_stage(module.main, cls, args))
    metrics = read_json(run_dir / "eval_results.json")["metrics"]
    return {name: float(metrics[name]) for name in TASK_METRICS[task]}


# --- the study ----------------------------------------------------------------------------------------


def _check(arms: Sequence[str], protocols: Sequence[str], tasks: Sequence[str], seeds: Sequence[int]) -> None:
    for name, chosen, allowed in (
        ("arms", arms, ARMS),
        ("protocols", protocols, PROTOCOLS),
        ("tasks", tasks, TASKS),
    ):
        unknown = [c for c in chosen if c not in allowed]
        if unknown or not chosen:
            raise ValueError(f"{name} must be a non-empty subset of {', '.join(allowed)}; got {list(chosen)}")
    if not seeds or min(seeds) < 0:
        raise ValueError(f"seeds must be a non-empty list of non-negative integers, got {list(seeds)}")


def run_study(
    size: str | StudySize,
    seeds: Sequence[int] = (0, 1, 2),
    output_dir: str | Path = "outputs/study",
    arms: Sequence[str] = ARMS,
    protocols: Sequence[str] = PROTOCOLS,
    tasks: Sequence[str] = TASKS,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or finish) the study and write study.json, study.md and study.png; returns the study.json content.

    Seeds are the outer loop and the report is rewritten after each seed, so a stopped study leaves the report
    of its complete seeds; started again on the same folder, it skips the runs that finished.
    """
    name = size if isinstance(size, str) else "custom"
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"unknown study size {size!r}; use one of {', '.join(SIZES)}")
        size = SIZES[size]
    _check(arms, protocols, tasks, seeds)
    root, started = Path(output_dir), time.perf_counter()
    data = ensure_dataset(size.settings, root / "data")
    encoders: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    total, done = len(seeds) * len(arms) * (1 + len(protocols) * len(tasks)), 0
    for index, seed in enumerate(seeds):
        for arm in arms:
            echo(f"\n=== study [{done + 1}/{total}] encoder {arm}, seed {seed}")
            encoder, losses = build_encoder(size, arm, seed, data, root)
            similarity = patch_similarity(patch_features(encoder, data, size.diagnostic_samples))
            encoders.append({"arm": arm, "seed": seed, **losses, **similarity})
            done += 1
            for protocol in protocols:
                for task in tasks:
                    echo(f"\n=== study [{done + 1}/{total}] {task}, {protocol}, encoder {arm}, seed {seed}")
                    run_dir = root / "finetune" / arm / f"seed-{seed}" / f"{protocol}-{task}"
                    metrics = finetune(size, task, protocol, encoder, seed, data, run_dir)
                    runs.append({"arm": arm, "seed": seed, "protocol": protocol, "task": task, **metrics})
                    done += 1
        study = {
            "size": name,
            "settings": dataclasses.asdict(size.settings),
            "frozen_lr": size.frozen_lr,
            "diagnostic_samples": size.diagnostic_samples,
            "seeds": list(seeds[: index + 1]),
            "arms": list(arms),
            "protocols": list(protocols),
            "tasks": list(tasks),
            "summary": aggregate(encoders, runs, arms, protocols),
            "encoders": encoders,
            "runs": runs,
            "wall_time_s": round(time.perf_counter() - started, 1),
        }
        write_report(study, root)
    echo(f"\nstudy written to {root / 'study.md'}, {root / 'study.json'} and {root / 'study.png'}")
    return study


def write_report(study: Mapping[str, Any], root: Path) -> None:
    """study.json, study.md and study.png in `root`."""
    write_json(root / "study.json", study)
    (root / "study.md").write_text(study_markdown(study))
    plot_study(study, root / "study.png")


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


def aggregate(
    encoders: Sequence[Mapping[str, Any]],
    runs: Sequence[Mapping[str, Any]],
    arms: Sequence[str] = ARMS,
    protocols: Sequence[str] = PROTOCOLS,
) -> dict[str, dict[str, dict[str, Any]]]:
    """{arm: {"encoder": {metric: mean_std}, protocol: {metric: mean_std}}} over the seeds of each arm."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for arm in arms:
        rows = [e for e in encoders if e["arm"] == arm]
        entry = {
            "encoder": {m: mean_std([r[m] for r in rows]) for m in ENCODER_METRICS if rows and m in rows[0]}
        }
        for protocol in protocols:
            picked = [r for r in runs if r["arm"] == arm and r["protocol"] == protocol]
            names = [m for task in TASKS for m in TASK_METRICS[task] if any(m in r for r in picked)]
            entry[protocol] = {m: mean_std([r[m] for r in picked if m in r]) for m in names}
        summary[arm] = entry
    return summary


# --- the report ---------------------------------------------------------------------------------------

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
        f"(size `{study['size']}`, {study['wall_time_s'] / 60:.0f} min).",
    ]
    for protocol in study["protocols"]:
        keys = [m for task in study["tasks"] for m in TASK_METRICS[task]]
        lines += [
            "",
            f"## {PROTOCOL_TITLES[protocol]}",
            "",
            *_table(summary, arms, protocol, keys),
        ]
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
