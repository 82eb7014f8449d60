"""Which pre-training gives a ViT better dense features? A study on the synthetic scenes that can tell.

Arms (`ARMS`): random initialisation; a supervised upper bound (the same encoder trained for the same steps
with a linear segmentation head on the unlabelled pool's labels); global InfoNCE; the paper's local-to-global
loss; their sum; the dense local-to-local term; the paper's loss plus the dense term, at weight 1 and 0.25 and
with a stop-gradient on its [CLS] side.

Main protocol: frozen encoders, their patch tokens cached once per encoder (`probes`): linear segmentation
(all classes and a floor/wall/ceiling/object split), k-NN patch retrieval and linear log-depth, each trained on
L labelled scenes for every L in `label_counts`, the subset drawn anew with each seed; plus the patch cosine.
The unlabelled pool, the labelled scenes and the validation scenes are disjoint (two datasets rendered from
different seeds). A longer budget (`longer_factor` x the steps) repeats global, the paper's loss and the best
arm; a secondary protocol fine-tunes whole encoders on the full labelled split.

Each run is the project's own run called in-process on its typed options (`demo.run_stage`), `jobs` at a
time in worker processes. Finished runs are skipped when the study starts again, stopped ones resume from their
checkpoint, and the report is rewritten after every finished run. Outputs in the study folder::

    data/pool  data/labelled                      the two datasets
    runs/ARM/seed-K[-xF]/{pretrain,probes.json}   one encoder and its probe results (F: budget factor)
    finetune/ARM/seed-K/TASK/                     the secondary protocol's runs
    study.json  study.md  study.png               the report
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate.utils import set_seed

from ...modeling import DenseCLViTConfig, DenseCLViTImageProcessor, DenseCLViTModel
from ..data.transforms.two_view import IMAGENET_MEAN, IMAGENET_STD
from ..engine.checkpoint import complete_checkpoints
from ..engine.config import config_to_dict
from ..engine.exits import StageInterrupted
from ..engine.runlog import read_json, write_json
from ..tasks import depth, segmentation
from ..tasks.model_start import model_source
from ..tasks.pretraining import main as pretrain_main
from .demo import (
    QUICK,
    DemoSettings,
    depth_config,
    ensure_dataset,
    loss_curve,
    model_argument,
    pretrain_config,
    run_stage,
    segmentation_config,
)
from .probes import ProbeSettings, Scenes, encode, load_scenes, patch_similarity, probe_encoder
from .study_report import best_arm, plot_pca, validity, write_report


@dataclasses.dataclass(frozen=True)
class Arm:
    """One encoder recipe: `loss` is the --loss of its pre-training (None: no self-supervised pre-training)."""

    name: str
    title: str
    loss: str | None = None
    cls_stop_gradient: bool = False


ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm("random", "random init"),
        Arm("supervised", "supervised (upper bound)"),
        Arm("global", "global (SimCLR)", "global"),
        Arm("local-global", "local-global (paper)", "local-global"),
        Arm("local-global+global", "local-global + global", "local-global+global"),
        Arm("local-local", "local-local", "local-local"),
        Arm("local-global+local-local", "local-global + local-local", "local-global+local-local"),
        Arm(
            "0.25local-global+local-local", "0.25 local-global + local-local", "0.25*local-global+local-local"
        ),
        Arm(
            "local-global-sg+local-local",
            "local-global, [CLS] stop-grad, + local-local",
            "local-global+local-local",
            cls_stop_gradient=True,
        ),
    )
}
LONGER_ARMS = ("random", "global", "local-global")  # plus the best arm
SECONDARY_ARMS = ("random", "supervised", "local-global")  # plus the best arm
PCA_ARMS = ("random", "supervised", "local-global")  # plus the best arm
TASKS = ("segmentation", "depth")


@dataclasses.dataclass(frozen=True)
class StudySize:
    """`settings` sizes the runs (its num_train / num_val are the labelled and validation scenes; its fine-tuning
    fields the secondary protocol); `num_pool` unlabelled scenes feed pre-training."""

    settings: DemoSettings
    num_pool: int
    label_counts: tuple[int, ...] = (16, 64)
    probe: ProbeSettings = ProbeSettings()
    longer_factor: int = 3
    supervised_lr: float = 1e-3


def _sizes() -> dict[str, StudySize]:
    small_vit = {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "patch_size": 8,
        "depth_head_hidden_size": 64,
    }
    common = dict(
        projection_hidden_size=256, projection_dim=64, finetune_lr=5e-3, layer_decay=0.65, plot_curves=False,
        num_workers=0, num_threads=1, log_every=25,
    )  # fmt: skip
    return {
        "tiny": StudySize(
            dataclasses.replace(QUICK, num_train=8, num_val=4, finetune_lr=5e-3),
            num_pool=16,
            label_counts=(2, 4),
            probe=ProbeSettings(steps=5, knn_k=3),
            longer_factor=2,
        ),
        "default": StudySize(
            DemoSettings(
                image_size=64, num_train=256, num_val=200, model=small_vit, pretrain_steps=300,
                finetune_steps=150, **common,
            ),
            num_pool=4000,
        ),
        "large": StudySize(
            DemoSettings(
                image_size=128, num_train=1000, num_val=500, model="vit-tiny", pretrain_steps=3000,
                pretrain_batch_size=128, finetune_steps=1000, finetune_batch_size=32,
                **{**common, "projection_hidden_size": 2048, "projection_dim": 256, "finetune_lr": 1e-3,
                   "num_workers": 6, "num_threads": None, "log_every": 50},
            ),
            num_pool=20000,
            label_counts=(16, 64, 256),
        ),
    }  # fmt: skip


SIZES: dict[str, StudySize] = _sizes()


@dataclasses.dataclass(frozen=True)
class StudyPaths:
    """Where the study keeps its data and runs; `model` is the --model value every run uses."""

    root: Path
    pool: Path
    labelled: Path
    model: str

    def run_dir(self, arm: str, seed: int, factor: int) -> Path:
        return self.root / "runs" / arm / (f"seed-{seed}" + (f"-x{factor}" if factor > 1 else ""))


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


def fingerprint(folder: Path) -> dict[str, Any]:
    """What identifies a dataset folder (its meta.json settings) or a model folder (its weights' SHA-1)."""
    if (folder / "meta.json").is_file():
        return {k: v for k, v in read_json(folder / "meta.json").items() if k != "files"}
    return {"sha1": hashlib.sha1((folder / "model.safetensors").read_bytes()).hexdigest()}


def _run_once(
    run_dir: Path,
    needed: str,
    main_fn: Callable[[Any], Any],
    cfg: Any,
    key: Mapping[str, Any],
) -> None:
    """Run a script's `main_fn` on `cfg` unless `run_dir` holds a completed run of the same config and inputs
    (`key`: the fingerprints of its data and starting weights, which the config names only by path); resume a
    stopped run of the same config from its last checkpoint; start over otherwise. Checkpoints are dropped
    after completion (the study reads the final model and results)."""
    cfg = dataclasses.replace(cfg, resume_from="latest")
    key_path = run_dir / "study_key.json"
    same = _same_config(run_dir, config_to_dict(cfg))
    # A run without a key comes from a study written before keys were kept: its config is all there is to check.
    same = same and (not key_path.is_file() or read_json(key_path) == json.loads(json.dumps(key)))
    results = run_dir / "results.json"
    done = results.is_file() and read_json(results).get("status") == "completed"
    if same and done and (run_dir / needed).exists():
        return
    if run_dir.exists() and not (same and complete_checkpoints(run_dir)):
        shutil.rmtree(run_dir)
    write_json(key_path, key)
    run_stage(main_fn, cfg)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def save_random_encoder(model: str, image_size: int, seed: int, folder: Path) -> Path:
    """A randomly initialised encoder (seeded) of the --model value's architecture, saved like a pre-trained one;
    kept when `folder` already holds the same one, written to a temporary folder and renamed into place."""
    fields = {k: v for k, v in model_source(model)[1].items() if k not in ("architectures", "auto_map")}
    key = {"model": fields, "image_size": image_size, "seed": seed}
    if (folder / "study_key.json").is_file() and read_json(folder / "study_key.json") == json.loads(
        json.dumps(key)
    ):
        return folder
    config = DenseCLViTConfig.from_dict({**fields, "image_size": image_size})
    set_seed(seed)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    DenseCLViTModel(config).save_pretrained(partial)
    size = {"height": image_size, "width": image_size}
    DenseCLViTImageProcessor(size=size, size_divisor=config.patch_size).save_pretrained(partial)
    write_json(partial / "study_key.json", key)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder


def _random_dir(paths: StudyPaths, seed: int) -> Path:
    return paths.root / "runs" / "random" / f"seed-{seed}" / "encoder"


def build_encoder(size: StudySize, arm: Arm, seed: int, factor: int, paths: StudyPaths) -> tuple[Path, dict]:
    """The encoder folder of (arm, seed, budget factor), training it if needed, and its training loss start/end."""
    s, run_dir = size.settings, paths.run_dir(arm.name, seed, factor) / "train"
    steps, random_dir = s.pretrain_steps * factor, _random_dir(paths, seed)
    if arm.name == "random" or arm.name == "supervised":
        if arm.name == "random":
            return random_dir, {}
        # The same encoder, data, steps and batch as pre-training, taught by the pool's labels instead.
        sup = dataclasses.replace(
            s, finetune_steps=steps, finetune_batch_size=s.pretrain_batch_size, finetune_lr=size.supervised_lr,
            layer_decay=None, log_every=max(1, steps // 10),
        )  # fmt: skip
        cfg = segmentation_config(sup, paths.pool, str(random_dir), run_dir, seed)
        key = {"data": fingerprint(paths.pool), "start": fingerprint(random_dir)}
        _run_once(run_dir, "final", segmentation.main, cfg, key)
    else:
        run = dataclasses.replace(s, pretrain_steps=steps, log_every=max(1, steps // 10))
        cfg = pretrain_config(run, paths.pool, run_dir, paths.model, loss=arm.loss, seed=seed)
        cfg = dataclasses.replace(cfg, cls_stop_gradient=arm.cls_stop_gradient)
        _run_once(run_dir, "final", pretrain_main, cfg, {"data": fingerprint(paths.pool)})
    start, end = loss_curve(run_dir)
    return run_dir / "final", {"loss_start": start, "loss_end": end}


_SCENES: dict[Path, tuple[Scenes, Scenes]] = {}


def _scenes(labelled: Path) -> tuple[Scenes, Scenes]:
    """(labelled, validation) scenes of the labelled dataset, decoded once per process."""
    if labelled not in _SCENES:
        _SCENES[labelled] = (load_scenes(labelled, "train"), load_scenes(labelled, "validation"))
    return _SCENES[labelled]


def labelled_subset(seed: int, count: int, available: int) -> torch.Tensor:
    """The indices of the `count` labelled scenes of `seed`: the same for every arm, new for each seed."""
    if count > available:
        raise ValueError(
            f"label count {count} exceeds the {available} labelled scenes; render more or pick less"
        )
    rng = np.random.default_rng([seed, count])
    return torch.from_numpy(np.sort(rng.choice(available, size=count, replace=False)))


def encoder_record(
    size: StudySize, arm_name: str, seed: int, factor: int, paths: StudyPaths
) -> dict[str, Any]:
    """Train (or find) one encoder and probe it: {"arm", "seed", "factor", losses, patch cosine, "probes": {L:
    metrics}}. The record is kept in probes.json and reused while the probe settings stay the same."""
    arm = ARMS[arm_name]
    record_path = paths.run_dir(arm.name, seed, factor) / "probes.json"
    encoder, losses = build_encoder(size, arm, seed, factor, paths)
    settings = {
        "probe": dataclasses.asdict(size.probe),
        "label_counts": list(size.label_counts),
        "data": fingerprint(paths.labelled),
        "encoder": fingerprint(encoder),
    }
    if record_path.is_file():
        saved = read_json(record_path).get("probe_settings", {})
        # a record written before fingerprints were kept is matched on what it recorded
        compared = {k: v for k, v in json.loads(json.dumps(settings)).items() if k in saved}
        if saved == compared and {"probe", "label_counts"} <= set(saved):
            return read_json(record_path)
    train, val = _scenes(paths.labelled)
    tokens = encode(encoder, torch.cat([train.pixels, val.pixels]))  # (M, N, D), cached for every probe
    train_tokens, val_tokens = tokens[: len(train)], tokens[len(train) :]
    probes = {}
    for count in size.label_counts:
        index = labelled_subset(seed, count, len(train))
        probes[str(count)] = probe_encoder(
            train_tokens[index], train.subset(index), val_tokens, val, size.probe, seed
        )
    record = {
        "arm": arm.name,
        "seed": seed,
        "factor": factor,
        **losses,
        **patch_similarity(val_tokens),
        "probes": probes,
        "probe_settings": settings,
    }
    write_json(record_path, record)
    return record


def finetune_record(
    size: StudySize, arm_name: str, seed: int, task: str, paths: StudyPaths
) -> dict[str, Any]:
    """The secondary protocol: fine-tune the whole encoder of (arm, seed) on the full labelled split."""
    encoder, _ = build_encoder(size, ARMS[arm_name], seed, 1, paths)
    run_dir = paths.root / "finetune" / arm_name / f"seed-{seed}" / task
    module, options = (segmentation, segmentation_config) if task == "segmentation" else (depth, depth_config)
    key = {"data": fingerprint(paths.labelled), "start": fingerprint(encoder)}
    cfg = options(size.settings, paths.labelled, str(encoder), run_dir, seed)
    _run_once(run_dir, "eval_results.json", module.main, cfg, key)
    metrics = read_json(run_dir / "eval_results.json")["metrics"]
    names = ("mean_iou",) if task == "segmentation" else ("delta1", "abs_rel")
    return {"arm": arm_name, "seed": seed, "task": task, **{n: float(metrics[n]) for n in names}}


def pca_figure(
    size: StudySize, arms: Sequence[str], seed: int, paths: StudyPaths, titles: Mapping[str, str]
) -> Path:
    """pca.png: the first validation scenes and the principal components of each arm's patch tokens (one seed)."""
    _, val = _scenes(paths.labelled)
    count = min(4, len(val))
    pixels = val.pixels[:count]
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    images = ((pixels * std + mean).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    tokens = {
        arm: encode(build_encoder(size, ARMS[arm], seed, 1, paths)[0], pixels).numpy()
        for arm in dict.fromkeys(arms)
    }
    return plot_pca(images, tokens, titles, paths.root / "pca.png")


# --- the study ----------------------------------------------------------------------------------------


def _worker_start(num_threads: int) -> None:
    torch.set_num_threads(num_threads)


def _map(
    jobs: int, num_threads: int, calls: Sequence[tuple[Callable, tuple]], done: Callable[[Any], None]
) -> None:
    """Run `calls` (function, args) `jobs` at a time in worker processes (in this process for jobs=1), handing
    each result to `done` as it finishes."""
    if jobs <= 1:
        before = torch.get_num_threads()
        torch.set_num_threads(num_threads)
        try:
            for fn, args in calls:
                done(fn(*args))
        finally:
            torch.set_num_threads(before)
        return
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(jobs, context, _worker_start, (num_threads,))

    def forward(signum: int, frame: Any) -> None:  # a stop sent to this process alone reaches the runs too
        for process in list(getattr(pool, "_processes", {}).values()):
            with contextlib.suppress(OSError):
                os.kill(process.pid, signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        futures = [pool.submit(fn, *args) for fn, args in calls]
        for future in concurrent.futures.as_completed(futures):
            done(future.result())
    except KeyboardInterrupt:
        forward(signal.SIGINT, None)
        raise StageInterrupted("stopped by SIGINT; finished runs are kept, stopped ones resume") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a failed or stopped run ends the study, not its queue
        signal.signal(signal.SIGTERM, previous)


def run_study(
    size: str | StudySize,
    seeds: Sequence[int] = (0, 1, 2),
    output_dir: str | Path = "outputs/study",
    arms: Sequence[str] = tuple(ARMS),
    jobs: int = 2,
    secondary: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or finish) the study and write study.json, study.md and study.png; returns the study.json content."""
    name = size if isinstance(size, str) else "custom"
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"unknown study size {size!r}; use one of {', '.join(SIZES)}")
        size = SIZES[size]
    _check(arms, seeds, jobs)
    root, started = Path(output_dir), time.perf_counter()
    s = size.settings
    echo(f"rendering the datasets into {root / 'data'} (skipped when present)")
    pool = ensure_dataset(
        dataclasses.replace(
            s, num_train=size.num_pool, num_val=max(4, s.num_val // 10), dataset_seed=s.dataset_seed + 1
        ),
        root / "data" / "pool",
    )
    paths = StudyPaths(
        root, pool, ensure_dataset(s, root / "data" / "labelled"), model_argument(s.model, root / "runs")
    )
    for seed in seeds:  # made here, once: the random and supervised arms of a seed start from it
        save_random_encoder(paths.model, s.image_size, seed, _random_dir(paths, seed))
    study: dict[str, Any] = {
        "size": name,
        "settings": dataclasses.asdict(s),
        "num_pool": size.num_pool,
        "label_counts": list(size.label_counts),
        "probe": dataclasses.asdict(size.probe),
        "longer_factor": size.longer_factor,
        "seeds": list(seeds),
        "arms": list(arms),
        "titles": {a: ARMS[a].title for a in ARMS},
        "encoders": [],
        "finetune": [],
    }

    def report(record: Mapping[str, Any], key: str) -> None:
        study[key].append(dict(record))
        study["wall_time_s"] = round(time.perf_counter() - started, 1)
        write_report(study, root)
        echo(f"done: {' '.join(str(record[k]) for k in ('arm', 'seed', 'factor', 'task') if k in record)}")

    threads = s.num_threads or 1
    main_jobs = [(encoder_record, (size, arm, seed, 1, paths)) for seed in seeds for arm in arms]
    echo(f"main protocol: {len(main_jobs)} encoders, {jobs} at a time")
    _map(jobs, threads, main_jobs, lambda r: report(r, "encoders"))
    # An invalid testbed ranks nothing: no best arm for the longer budget (an unchecked one picks provisionally).
    best = best_arm(study) if validity(study)["valid"] is not False else None
    study["best_arm"] = best
    longer = [a for a in (*LONGER_ARMS, best) if a in arms and a is not None]
    longer = list(dict.fromkeys(longer))
    longer_jobs = [
        (encoder_record, (size, a, seed, size.longer_factor, paths))
        for seed in seeds
        for a in longer
        if a != "random"
    ]
    for record in [r for r in study["encoders"] if r["arm"] == "random" and r["factor"] == 1]:
        study["encoders"].append({**record, "factor": size.longer_factor})  # random init has no budget
    echo(f"longer budget (x{size.longer_factor}): {', '.join(longer)}")
    _map(jobs, threads, longer_jobs, lambda r: report(r, "encoders"))
    if secondary:
        chosen = list(dict.fromkeys(a for a in (*SECONDARY_ARMS, best) if a in arms and a is not None))
        for arm, seed in itertools.product(
            chosen, seeds
        ):  # normally found finished: never trained twice at once
            build_encoder(size, ARMS[arm], seed, 1, paths)
        ft_jobs = [
            (finetune_record, (size, a, seed, task, paths))
            for seed in seeds
            for a in chosen
            for task in TASKS
        ]
        echo(f"secondary protocol (full fine-tuning): {', '.join(chosen)}")
        _map(jobs, threads, ft_jobs, lambda r: report(r, "finetune"))
    pca_figure(size, [a for a in PCA_ARMS + (best,) if a in arms], min(seeds), paths, study["titles"])
    study["wall_time_s"] = round(time.perf_counter() - started, 1)
    write_report(study, root)
    echo(
        f"\nstudy written to {root / 'study.md'}, {root / 'study.json'}, {root / 'study.png'} and {root / 'pca.png'}"
    )
    return study


def _check(arms: Sequence[str], seeds: Sequence[int], jobs: int) -> None:
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise ValueError(f"arms must be a non-empty subset of {', '.join(ARMS)}; got {list(arms)}")
    if not seeds or min(seeds) < 0:
        raise ValueError(f"seeds must be a non-empty list of non-negative integers, got {list(seeds)}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")


__all__ = [
    "ARMS",
    "SIZES",
    "Arm",
    "StudySize",
    "build_encoder",
    "encoder_record",
    "finetune_record",
    "labelled_subset",
    "run_study",
    "save_random_encoder",
]
