"""The built-in demo, end to end on a CPU: render the synthetic indoor scenes, pre-train a ViT-Ti/16 with the
local-to-global loss, fine-tune a linear segmentation head and a linear depth head from it, evaluate both, build
two Hub-ready release folders with model cards, and print the results.

Each stage is one of the project's runs called in this process on the typed options its script would parse
(`pretrain_config`, `segmentation_config`, `depth_config`; `run_stage` validates them as the script does), so the
demo exercises what a user runs without paying for a fresh interpreter (torch + transformers imports) per stage. Output layout under the demo folder::

    data/                        the synthetic dataset (kept between runs with the same settings)
    pretrain/                    final/ (the pre-trained encoder), results.json, metrics.jsonl, config.yaml
    segmentation/, depth/        final/ (the fine-tuned model), eval_results.json, example.png (its prediction on
                                 the first validation image), param_groups.txt, results.json, metrics.jsonl,
                                 config.yaml (whose protocol scripts/evaluate_model.py evaluates with)
    release/segmentation/, release/depth/   Hub-ready folders: README.md, model.safetensors, config.json, ...
    demo_results.json            the numbers of the printed table and the paths the table lists

transformers' own load reports and progress bars are off during the stages: each script prints its own line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers.utils import logging as transformers_logging

from ...modeling.configuration_densecl_vit import parse_pretraining_loss
from ..data.loader import available_cpus
from ..data.synthetic.dataset import dataset_is_complete, load_synthetic_dataset, write_dataset
from ..engine.exits import StageInterrupted
from ..engine.runlog import read_json, write_json
from ..evaluation.visualize import render_example_prediction
from ..tasks.depth import FinetuneDepthConfig
from ..tasks.depth import main as depth_main
from ..tasks.pretraining import PretrainConfig
from ..tasks.pretraining import main as pretrain_main
from ..tasks.segmentation import FinetuneSegmentationConfig
from ..tasks.segmentation import main as segmentation_main

T = TypeVar("T")
STAGE_DIRS = ("pretrain", "segmentation", "depth", "release")
# (fine-tuned model folder, release folder) -> the release folder it wrote
ExportRelease = Callable[[Path, Path], Path]


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes of every stage. `model` is a preset name or a dict of `DenseCLViTConfig` fields (tiny test models).

    Pre-training uses `pretrain_lr` as the base learning rate for 256 images (the script scales it by
    batch / 256); fine-tuning uses `finetune_lr` as it is. `num_threads` is torch's intra-op thread count during
    the runs; None takes the cores the data loader workers leave (see `torch_threads`).
    """

    image_size: int = 64
    num_train: int = 1000
    num_val: int = 100
    dataset_seed: int = 0
    model: str | Mapping[str, Any] = "vit-tiny"
    loss: str = "local-global"
    pretrain_steps: int = 120
    pretrain_batch_size: int = 32
    pretrain_lr: float = 4e-3
    crop_scale: tuple[float, float] = (0.25, 1.0)
    projection_hidden_size: int = 512
    projection_dim: int = 128
    finetune_steps: int = 100
    finetune_batch_size: int = 16
    finetune_lr: float = 3e-3
    layer_decay: float | None = 0.65
    log_every: int = 10
    num_workers: int = 1
    num_threads: int | None = None
    plot_curves: bool = True
    seed: int = 0

    def patch_size(self) -> int:
        return int(self.model.get("patch_size", 16)) if isinstance(self.model, Mapping) else 16

    def validate(self) -> None:
        """Refuse settings that would fail only after the dataset is rendered."""
        if self.image_size < 1 or self.image_size % self.patch_size():
            raise ValueError(
                f"image_size {self.image_size} must be a positive multiple of the patch size {self.patch_size()}"
            )
        counts = {
            "num_train": self.num_train,
            "num_val": self.num_val,
            "pretrain_steps": self.pretrain_steps,
            "finetune_steps": self.finetune_steps,
        }
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        parse_pretraining_loss(self.loss)

    def describe_model(self) -> str:
        if isinstance(self.model, Mapping):
            return (
                f"ViT (hidden {self.model.get('hidden_size')}, {self.model.get('num_hidden_layers')} blocks)"
            )
        return {"vit-tiny": "ViT-Ti", "vit-small": "ViT-S", "vit-base": "ViT-B"}.get(self.model, self.model)


DEFAULT = DemoSettings()
# Every stage at toy size (what tests/experiments/test_demo.py runs): a few seconds of compute in all.
QUICK = DemoSettings(
    image_size=32,
    num_train=16,
    num_val=4,
    model={
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "patch_size": 8,
        "depth_head_hidden_size": 16,
    },
    pretrain_steps=2,
    pretrain_batch_size=4,
    projection_hidden_size=32,
    projection_dim=16,
    finetune_steps=2,
    finetune_batch_size=4,
    log_every=1,
    num_workers=0,
    num_threads=1,  # toy models run fastest on one thread
    plot_curves=False,
)


# --- running the scripts in-process -------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(num_threads: int | None, num_workers: int) -> Iterator[int]:
    """Run a block with `num_threads` torch threads (None: the CPUs left by `num_workers` data loader workers,
    at least one), then restore the previous count. More threads than free cores make every step wait for the
    slowest, descheduled thread: on 2 cores with one loader worker, one thread is several times faster."""
    threads = num_threads if num_threads is not None else max(1, available_cpus() - num_workers)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def run_stage(main_fn: Callable[[T], Any], cfg: T) -> Any:
    """Validate `cfg` as the script would and run `main_fn` on it; returns its result.

    Bad options raise the script's one-line ValueError instead of exiting, so a caller can report the stage; a
    run stopped by a signal raises `StageInterrupted`, so that no later stage starts from its missing outputs.
    """
    cfg.validate()
    result = main_fn(cfg)
    if isinstance(result, Mapping) and result.get("status", "completed") != "completed":
        raise StageInterrupted(
            f"{cfg.output_dir} stopped at step {result.get('steps')} ({result['status']}); its checkpoint is kept"
        )
    return result


def model_argument(model: str | Mapping[str, Any], folder: Path) -> str:
    """A --model value: the preset name, or a config.json written into `folder` for a dict of fields."""
    if isinstance(model, str):
        return model
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model_config.json"
    path.write_text(json.dumps(dict(model), indent=2) + "\n")
    return str(path)


def pretrain_config(
    s: DemoSettings,
    dataset: Path,
    output_dir: Path,
    model: str,
    loss: str | None = None,
    seed: int | None = None,
) -> PretrainConfig:
    """The options of a pre-training run with settings `s` (what scripts/pretrain.py would parse)."""
    return PretrainConfig(
        dataset=str(dataset), image_column="image", model=model,
        image_size=s.image_size, per_device_batch_size=s.pretrain_batch_size,
        max_steps=s.pretrain_steps, lr=s.pretrain_lr, loss=loss or s.loss, crop_scale=tuple(s.crop_scale),
        projection_hidden_size=s.projection_hidden_size, projection_dim=s.projection_dim,
        log_every=s.log_every, checkpoint_every=s.pretrain_steps, keep_last=1,
        num_workers=s.num_workers, seed=s.seed if seed is None else seed,
        plot_curves=s.plot_curves, output_dir=str(output_dir),
        gpu_augment=False,  # the same augmentation stream on any machine (and a config the study can match)
    )  # fmt: skip


def _finetune_common(
    s: DemoSettings, dataset: Path, encoder: str, output_dir: Path, seed: int | None
) -> dict[str, Any]:
    return dict(
        dataset=str(dataset), model=encoder, crop_size=(s.image_size, s.image_size),
        per_device_batch_size=s.finetune_batch_size, max_steps=s.finetune_steps, lr=s.finetune_lr,
        layer_decay=s.layer_decay, warmup_fraction=0.05,
        log_every=s.log_every, checkpoint_every=s.finetune_steps, keep_last=1,
        num_workers=s.num_workers, seed=s.seed if seed is None else seed,
        plot_curves=s.plot_curves, dataset_name="synthetic-scenes", output_dir=str(output_dir),
    )  # fmt: skip


def segmentation_config(
    s: DemoSettings, dataset: Path, encoder: str, output_dir: Path, seed: int | None = None
) -> FinetuneSegmentationConfig:
    """The options of a segmentation run: linear head, images at their rendered size."""
    size = s.image_size
    return FinetuneSegmentationConfig(
        **_finetune_common(s, dataset, encoder, output_dir, seed),
        image_column="image", label_column="annotation", decode_head="linear",
        scale_bounds=(size, size), scale_range=(0.75, 1.5), eval_window=size, eval_stride=size,
    )  # fmt: skip


def depth_config(
    s: DemoSettings, dataset: Path, encoder: str, output_dir: Path, seed: int | None = None
) -> FinetuneDepthConfig:
    """The options of a depth run: linear up-projection head, whole images at evaluation."""
    return FinetuneDepthConfig(
        **_finetune_common(s, dataset, encoder, output_dir, seed),
        image_column="image", depth_column="depth_map", depth_head="linear", eigen_crop=False,
    )  # fmt: skip


# --- stages -------------------------------------------------------------------------------------------


def ensure_dataset(s: DemoSettings, folder: Path, progress: bool = True) -> Path:
    """Render the synthetic scenes into `folder` unless it already holds them with these settings."""
    settings = dict(num_train=s.num_train, num_val=s.num_val, image_size=s.image_size, seed=s.dataset_seed)
    if not dataset_is_complete(folder, **settings):
        workers = 0 if s.num_train + s.num_val < 100 else None  # a process pool pays off past a few dozen
        write_dataset(folder, progress=progress, num_workers=workers, **settings)
    return folder


def loss_curve(run_dir: Path) -> tuple[float, float]:
    """(first, last) logged training loss of a run's metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    losses = [r["loss"] for r in map(json.loads, lines) if r.get("loss") is not None]
    if not losses:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no training loss")
    return float(losses[0]), float(losses[-1])


def render_example(run_dir: Path, dataset: Path) -> Path:
    """example.png beside a fine-tuned run: its prediction on the first validation image (the card shows it)."""
    first = next(iter(load_synthetic_dataset(dataset, "validation", streaming=True)))
    return render_example_prediction(run_dir / "final", first["image"], run_dir / "example.png")


def _fresh(folder: Path) -> Path:
    """Empty a stage folder of a previous demo (the scripts refuse to start over on their own checkpoints)."""
    if folder.exists():
        shutil.rmtree(folder)
    return folder


def _stages(
    s: DemoSettings, paths: Mapping[str, Path], export: ExportRelease
) -> list[tuple[str, str, Callable[[], Any]]]:
    """(key, title, run) of every stage but the report, in order."""
    data, encoder = paths["data"], str(paths["pretrain"] / "final")
    model = model_argument(s.model, paths["pretrain"])

    def publish() -> dict[str, Path]:
        for task in ("segmentation", "depth"):
            render_example(paths[task], data)
        return {
            task: export(paths[task] / "final", paths["release"] / task) for task in ("segmentation", "depth")
        }

    return [
        ("dataset", f"dataset: {s.num_train} + {s.num_val} synthetic scenes", lambda: ensure_dataset(s, data)),
        ("pretrain", f"pre-training: {s.pretrain_steps} steps, {s.loss} loss",
         lambda: run_stage(pretrain_main, pretrain_config(s, data, paths["pretrain"], model))),
        ("segmentation", f"segmentation: linear head, {s.finetune_steps} steps",
         lambda: run_stage(segmentation_main, segmentation_config(s, data, encoder, paths["segmentation"]))),
        ("depth", f"depth: linear head, {s.finetune_steps} steps",
         lambda: run_stage(depth_main, depth_config(s, data, encoder, paths["depth"]))),
        ("release", "example predictions and Hub-ready folders", publish),
    ]  # fmt: skip


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Run a block with transformers' warnings and progress bars off: its LOAD REPORT tables (raw colour codes
    in a log file) repeat what the scripts' own "loaded ...; newly initialised: ..." line says."""
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def run_demo(
    s: DemoSettings,
    output_dir: str | os.PathLike,
    echo: Callable[[str], None] = print,
    *,
    export: ExportRelease,
) -> dict:
    """Every stage of the demo into `output_dir`; returns (and writes to demo_results.json) the numbers and paths.

    `export(model_dir, output)` builds a Hub-ready folder and returns it: the caller passes `hub_cards`'
    release builder, since the library sits below `hub_cards` and never imports it.

    Raises `StageInterrupted` when a signal stops a training stage (the later stages would have no input).
    """
    s.validate()
    root, started = Path(output_dir), time.perf_counter()
    paths = {name: root / name for name in ("data", *STAGE_DIRS)}
    for name in STAGE_DIRS:
        _fresh(paths[name])
    stages = _stages(s, paths, export)
    outputs: dict[str, Any] = {}
    timings: dict[str, float] = {}
    with torch_threads(s.num_threads, s.num_workers) as threads, quiet_transformers():
        echo(f"{threads} torch thread(s), {s.num_workers} data loader worker(s) per stage")
        for number, (key, title, run) in enumerate(stages, start=1):
            echo(f"\n[{number}/{len(stages) + 1}] {title}")
            begin = time.perf_counter()
            outputs[key] = run()
            timings[key] = round(time.perf_counter() - begin, 1)
    echo(f"\n[{len(stages) + 1}/{len(stages) + 1}] results")
    results = summarize(s, paths, outputs)
    results["timings_s"] = {**timings, "total": round(time.perf_counter() - started, 1)}
    write_json(root / "demo_results.json", results)
    echo(format_results(results))
    return results


# --- the report ---------------------------------------------------------------------------------------


def written_paths(paths: Mapping[str, Path], releases: Mapping[str, Path], results: Path) -> dict[str, str]:
    """What the demo wrote worth opening, by label in stage order: the files and folders that exist (curves.png
    only where the runs drew them), and `results`, the demo_results.json written with this list."""
    candidates = [
        ("dataset", paths["data"]),
        ("encoder", paths["pretrain"] / "final"),
        ("pre-training log", paths["pretrain"] / "metrics.jsonl"),
        ("pre-training curves", paths["pretrain"] / "curves.png"),
    ]
    for task in ("segmentation", "depth"):
        run = paths[task]
        candidates += [
            (f"{task} model", run / "final"),
            (f"{task} log", run / "metrics.jsonl"),
            (f"{task} curves", run / "curves.png"),
            (f"{task} example", run / "example.png"),
            (f"{task} release", releases[task]),
        ]
    written = {label: str(path) for label, path in candidates if path.exists()}
    return {**written, "results": str(results)}


def summarize(s: DemoSettings, paths: Mapping[str, Path], outputs: Mapping[str, Any]) -> dict[str, Any]:
    """The demo's numbers (from the runs' results and eval_results.json files) and where everything lies;
    `outputs` holds what each stage returned (the training stages: their results.json content)."""
    loss_start, loss_end = loss_curve(paths["pretrain"])
    seg = read_json(paths["segmentation"] / "eval_results.json")["metrics"]
    depth = read_json(paths["depth"] / "eval_results.json")["metrics"]
    metrics = {
        "pretrain_loss_start": loss_start,
        "pretrain_loss_end": loss_end,
        "mean_iou": seg["mean_iou"],
        "pixel_accuracy": seg["overall_accuracy"],
        "abs_rel": depth["abs_rel"],
        "rmse": depth["rmse"],
        "delta1": depth["delta1"],
    }
    written = written_paths(paths, outputs["release"], paths["data"].parent / "demo_results.json")
    return {
        "settings": dataclasses.asdict(s),
        "model": f"{s.describe_model()}/{s.patch_size()} at {s.image_size}x{s.image_size} px",
        "steps": {
            "pretrain": outputs["pretrain"]["steps"],
            "segmentation": outputs["segmentation"]["steps"],
            "depth": outputs["depth"]["steps"],
        },
        "metrics": metrics,
        "paths": written,
    }


def format_results(results: Mapping[str, Any]) -> str:
    """The printed table: pre-training loss, segmentation and depth metrics, then the output paths."""
    m, steps, s = results["metrics"], results["steps"], results["settings"]
    rows = [
        ("pre-training", f"{s['loss']} loss {m['pretrain_loss_start']:.3f} -> {m['pretrain_loss_end']:.3f}",
         f"{steps['pretrain']} steps"),
        ("segmentation", f"mIoU {100 * m['mean_iou']:.1f} %   pixel acc {100 * m['pixel_accuracy']:.1f} %",
         f"{steps['segmentation']} steps, linear head"),
        ("depth", f"AbsRel {m['abs_rel']:.3f}   RMSE {m['rmse']:.3f} m   δ1 {100 * m['delta1']:.1f} %",
         f"{steps['depth']} steps, linear head"),
    ]  # fmt: skip
    width = max(len(r[1]) for r in rows)
    lines = [
        f"{results['model']}, synthetic indoor scenes ({s['num_train']} train / {s['num_val']} validation)"
    ]
    lines += [f"  {name:<13} {value:<{width}}   ({note})" for name, value, note in rows]
    total = results.get("timings_s", {}).get("total")
    if total is not None:
        lines.append(f"  wall time     {total:.0f} s")
    lines.append("written:")
    width = max(map(len, results["paths"]))
    lines += [f"  {name:<{width}}  {path}" for name, path in results["paths"].items()]
    return "\n".join(lines)


def check_finite(results: Mapping[str, Any]) -> None:
    """Raise ValueError naming any metric of `results` that is not a finite number."""
    bad = [
        k for k, v in results["metrics"].items() if not isinstance(v, (int, float)) or not math.isfinite(v)
    ]
    if bad:
        raise ValueError(f"non-finite demo metrics: {', '.join(bad)}")
