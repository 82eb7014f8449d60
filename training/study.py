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
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from .checkpoint import complete_checkpoints
from .config import config_to_dict, parse_config
from .demo import (
    QUICK,
    DemoSettings,
    depth_argv,
    ensure_dataset,
    loss_curve,
    model_argument,
    pretrain_argv,
    run_stage,
    segmentation_argv,
    torch_threads,
)
from .runlog import read_json, write_json
from .study_report import ENCODER_METRICS, TASK_METRICS, mean_std, plot_study, study_markdown

ARMS: tuple[str, ...] = ("local-global", "global", "both", "random")
PROTOCOLS: tuple[str, ...] = ("frozen", "full")
TASKS: tuple[str, ...] = ("segmentation", "depth")


@dataclasses.dataclass(frozen=True)
class StudySize:
    """Run settings shared by every arm (`settings`; its `finetune_lr` is the full fine-tuning lr), the linear
    probe's lr, and how many validation images the patch diagnostic reads."""

    settings: DemoSettings
    frozen_lr: float = 1e-2
    diagnostic_samples: int = 100


def _sizes() -> dict[str, StudySize]:
    # The depth head's width scales with the encoder's (its default, 256, suits ViT-B and would dominate here).
    small_vit = {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "patch_size": 8,
        "depth_head_hidden_size": 64,
    }
    # Full fine-tuning: the head at finetune_lr, block i of L at finetune_lr * 0.65^(L + 1 - i).
    common = dict(
        projection_hidden_size=256, projection_dim=64, finetune_lr=5e-3, layer_decay=0.65, plot_curves=False
    )
    return {
        # The demo's toy sizes (2 steps per run), with the study's fine-tuning recipe.
        "tiny": StudySize(dataclasses.replace(QUICK, finetune_lr=common["finetune_lr"]), diagnostic_samples=4),
        "small": StudySize(
            DemoSettings(
                image_size=32, num_train=1000, num_val=100, model=small_vit, pretrain_steps=150,
                finetune_steps=100, **common,
            )
        ),
        "default": StudySize(
            DemoSettings(
                image_size=48, num_train=2000, num_val=100, model=small_vit, pretrain_steps=250,
                finetune_steps=200, **common,
            )
        ),
        "large": StudySize(
            DemoSettings(
                image_size=128, num_train=10000, num_val=500, model="vit-tiny", pretrain_steps=3000,
                pretrain_batch_size=128, finetune_steps=1000, finetune_batch_size=32, num_workers=6,
                log_every=50,
                **{**common, "projection_hidden_size": 2048, "projection_dim": 256, "finetune_lr": 1e-3},
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


def _same_config(run_dir: Path, wanted: Mapping[str, Any]) -> bool:
    """Whether the run's saved config.yaml is the config the study would run now (`--resume-from` aside)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return False
    saved = yaml.safe_load(path.read_text()) or {}
    return {k: v for k, v in saved.items() if k != "resume_from"} == {
        k: v for k, v in wanted.items() if k != "resume_from"
    }


def _run_once(run_dir: Path, needed: str, main_fn: Callable[[Any], Any], cls: type, argv: list[str]) -> None:
    """Run a script's `main_fn` on `argv` unless `run_dir` holds a completed run of the same config; resume a
    stopped run of the same config from its last checkpoint; start over otherwise (a changed setting, or no
    checkpoint yet). Checkpoints are dropped after completion (the study reads the final model and results)."""
    argv = [*argv, "--resume-from", "latest"]
    same = _same_config(run_dir, config_to_dict(parse_config(cls, argv)))
    results = run_dir / "results.json"
    if (
        same
        and results.is_file()
        and read_json(results).get("status") == "completed"
        and (run_dir / needed).exists()
    ):
        return
    if run_dir.exists() and not (same and complete_checkpoints(run_dir)):
        shutil.rmtree(run_dir)
    run_stage(main_fn, cls, argv)
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
    _run_once(run_dir, "final", pretrain_main, PretrainConfig, argv)
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
    _run_once(run_dir, "eval_results.json", module.main, cls, args)
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
    of its complete seeds; started again on the same folder, it skips the runs that finished and resumes a run
    stopped by a signal (which raises `StageInterrupted`) from its checkpoint.
    """
    name = size if isinstance(size, str) else "custom"
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"unknown study size {size!r}; use one of {', '.join(SIZES)}")
        size = SIZES[size]
    _check(arms, protocols, tasks, seeds)
    root, started = Path(output_dir), time.perf_counter()
    data = ensure_dataset(size.settings, root / "data")
    plan = [(seed, arm) for seed in seeds for arm in arms]
    encoders: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    with torch_threads(size.settings.num_threads, size.settings.num_workers) as threads:
        echo(f"{threads} torch thread(s), {size.settings.num_workers} data loader worker(s) per run")
        for number, (seed, arm) in enumerate(plan, start=1):
            echo(f"\n=== study [{number}/{len(plan)}] encoder {arm}, seed {seed}")
            encoder, losses = build_encoder(size, arm, seed, data, root)
            similarity = patch_similarity(patch_features(encoder, data, size.diagnostic_samples))
            encoders.append({"arm": arm, "seed": seed, **losses, **similarity})
            for protocol, task in [(p, t) for p in protocols for t in tasks]:
                echo(f"\n=== study [{number}/{len(plan)}] {task}, {protocol}, encoder {arm}, seed {seed}")
                run_dir = root / "finetune" / arm / f"seed-{seed}" / f"{protocol}-{task}"
                metrics = finetune(size, task, protocol, encoder, seed, data, run_dir)
                runs.append({"arm": arm, "seed": seed, "protocol": protocol, "task": task, **metrics})
            if arm == arms[-1]:  # a seed is complete: rewrite the report
                done = list(seeds[: list(seeds).index(seed) + 1])
                study = {
                    "size": name,
                    **_describe(size),
                    "seeds": done,
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


def _describe(size: StudySize) -> dict[str, Any]:
    return {
        "settings": dataclasses.asdict(size.settings),
        "frozen_lr": size.frozen_lr,
        "diagnostic_samples": size.diagnostic_samples,
    }


def write_report(study: Mapping[str, Any], root: Path) -> None:
    """study.json, study.md and study.png in `root`."""
    write_json(root / "study.json", study)
    (root / "study.md").write_text(study_markdown(study))
    plot_study(study, root / "study.png")


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
