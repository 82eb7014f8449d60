"""What the two fine-tuning scripts share: their common options, the model start (a pre-training folder, any
DenseCL-ViT folder, a converted timm/DINO/ViT folder or a random-init preset), layer-wise lr decay optimisers,
training and evaluation loaders, the evaluation schedule and the `eval_results.json` report.

The loop itself is `engine.train_loop`; the task modules (`segmentation`, `depth`) add their samples, model
class, evaluation protocol and metric.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from torch import nn

from ..modeling import DenseCLViTConfig, DenseCLViTImageProcessor
from .conversion import resample_position_embeddings
from .data import StreamingSamples, StreamLoader, build_dataloader, open_stream
from .engine import CRITICAL_KEYS, TrainerState, TrainingArgs, finish_run, save_model, train_loop
from .optim import (
    build_adam,
    build_adamw,
    cosine_with_warmup,
    param_groups_layer_decay,
    poly_with_warmup,
    warmup_steps_from_fraction,
)
from .pretraining import model_source
from .runlog import MetricsLogger, write_json

FINETUNE_CRITICAL_KEYS = (
    *CRITICAL_KEYS,
    "model",
    "crop_size",
    "drop_path_rate",
    "layer_decay",
    "optimizer",
    "lr_schedule",
    "poly_power",
    "freeze_encoder",
)
_CONFIG_META = ("architectures", "auto_map", "transformers_version", "model_type")


def _opt(default: Any, help_text: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass
class FinetuneArgs(TrainingArgs):
    """Options shared by the segmentation and depth fine-tuning scripts (on top of the engine's)."""

    model: str = _opt(
        "vit-base",
        "start from: a pre-training output folder (its final/), any DenseCL-ViT model folder, a converted "
        "timm/DINO/ViT folder, or a preset (vit-tiny, vit-small, vit-base) for a random-init baseline",
    )
    crop_size: tuple[int, int] = _opt(
        (512, 512), "training crop (height, width); multiples of the patch size"
    )
    drop_path_rate: float = _opt(0.1, "stochastic depth rate of the last block (linear over the blocks)")
    layer_decay: float | None = _opt(
        None, "layer-wise lr decay: block i trains at lr * decay^(L+1-i); none trains every layer at --lr"
    )
    optimizer: Literal["adamw", "adam"] = _opt("adamw", "AdamW (decoupled weight decay) or Adam (L2 penalty)")
    lr_schedule: Literal["poly", "cosine"] = _opt("poly", "decay after the linear warm-up")
    poly_power: float = _opt(1.0, "exponent of the poly decay")
    freeze_encoder: bool = _opt(
        False, "train the head only (linear probing): the encoder's weights stay as loaded"
    )
    eval_split: str | None = _opt(
        "validation", "split evaluated during and after training; none: no evaluation"
    )
    eval_every: int | None = _opt(None, "evaluate every N steps as well as at the end")
    max_eval_samples: int | None = _opt(None, "evaluate on the first N examples only (quick periodic checks)")
    dataset_name: str | None = _opt(
        None, "dataset name in eval_results.json; default: the last part of --dataset"
    )

    def patch_size(self) -> int:
        """The patch size of --model (read from its config.json; 16 for the presets)."""
        return model_source(self.model)[1].get("patch_size", 16)

    def validate(self) -> None:
        super().validate()
        patch_size = self.patch_size()
        for side in self.crop_size:
            if side < 1 or side % patch_size:
                raise ValueError(
                    f"--crop-size {self.crop_size} must hold positive multiples of the model's patch size "
                    f"{patch_size}, e.g. {max(1, round(side / patch_size)) * patch_size}"
                )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"--drop-path-rate must be in [0, 1), got {self.drop_path_rate}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"--layer-decay must be in (0, 1] or none, got {self.layer_decay}")
        if self.poly_power <= 0:
            raise ValueError(f"--poly-power must be > 0, got {self.poly_power}")
        for flag, value in (("--eval-every", self.eval_every), ("--max-eval-samples", self.max_eval_samples)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1 or none, got {value}")
        if self.eval_every is not None and self.eval_split is None:
            raise ValueError("--eval-every needs an --eval-split; drop --eval-every or name the split")


# --- model --------------------------------------------------------------------------------------------


def store_position_embeddings_at(model: nn.Module, image_size: int) -> None:
    """Resample the encoder's position embeddings once to an `image_size` square input (bicubic, as the model
    does on the fly) so that training at that size skips the per-step resampling; updates `config.image_size`."""
    embeddings = model.densecl_vit.embeddings
    patch_size = model.config.patch_size
    grid = image_size // patch_size
    if grid == embeddings.grid_size:
        return
    with torch.no_grad():
        resampled = resample_position_embeddings(embeddings.position_embeddings.detach(), grid)
    embeddings.position_embeddings = nn.Parameter(resampled.contiguous())
    embeddings.grid_size = grid
    model.config.image_size = image_size


def _newly_initialised(missing: Sequence[str]) -> list[str]:
    """Top-level module names of the missing keys, e.g. ["auxiliary_head", "classifier", "decode_head"]."""
    return sorted({key.split(".")[0] for key in missing})


def load_task_model(
    model_cls: type, source: str, crop_size: tuple[int, int], **overrides: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """A task model started from `source` (a --model value) with config `overrides` (labels, head, drop path).

    Returns the model and its load report: {"source_kind", "newly_initialized" (top-level modules), "missing",
    "unused" (checkpoint tensors not used, e.g. a pre-training projection head)}. A square crop stores the
    position embeddings at the crop size; other crops resample them on the fly.
    """
    kind, fields = model_source(source)
    if kind == "folder":
        raise ValueError(f"--model {source} holds a config.json but no weights; pass a folder with weights")
    if kind == "weights":
        model, info = model_cls.from_pretrained(
            source, output_loading_info=True, ignore_mismatched_sizes=True, **overrides
        )
        missing = sorted(info["missing_keys"]) + sorted(key for key, *_ in info.get("mismatched_keys", ()))
        report = {
            "source_kind": kind,
            "newly_initialized": _newly_initialised(missing),
            "missing": missing,
            "unused": sorted(info["unexpected_keys"]),
        }
    else:
        fields = {k: v for k, v in fields.items() if k not in _CONFIG_META}
        config = DenseCLViTConfig.from_dict({**fields, "image_size": crop_size[0], **overrides})
        model = model_cls(config)
        report = {"source_kind": kind, "newly_initialized": ["all"], "missing": [], "unused": []}
    if crop_size[0] == crop_size[1]:
        store_position_embeddings_at(model, crop_size[0])
    return model, report


def describe_load(source: str, report: Mapping[str, Any]) -> str:
    """One line saying where the weights came from and what starts from scratch."""
    if report["source_kind"] != "weights":
        return f"random initialisation from {source} (no pre-trained weights)"
    unused = f"; {len(report['unused'])} checkpoint tensors unused" if report["unused"] else ""
    return (
        f"loaded {source}; newly initialised: {', '.join(report['newly_initialized']) or 'nothing'}{unused}"
    )


# --- optimisation -------------------------------------------------------------------------------------


def build_optimizer(
    cfg: FinetuneArgs, model: nn.Module, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Layer-wise lr decay groups (decay 1 when --layer-decay is none), AdamW or Adam at --lr, poly or cosine
    decay after a linear warm-up. Build it after moving the model to its device. With --freeze-encoder the
    encoder's parameters stop requiring gradients first, so the groups hold the head's parameters only."""
    if cfg.freeze_encoder:
        model.densecl_vit.requires_grad_(False)
    groups = param_groups_layer_decay(
        model, cfg.weight_decay, cfg.layer_decay or 1.0, model.config.num_hidden_layers
    )
    build = build_adamw if cfg.optimizer == "adamw" else build_adam
    optimizer = build(groups, lr=cfg.lr)
    warmup = warmup_steps_from_fraction(total_steps, cfg.warmup_fraction)
    if cfg.lr_schedule == "poly":
        scheduler = poly_with_warmup(optimizer, total_steps, warmup, power=cfg.poly_power)
    else:
        scheduler = cosine_with_warmup(optimizer, total_steps, warmup)
    return optimizer, scheduler


# --- data ---------------------------------------------------------------------------------------------


def train_loader(
    cfg: FinetuneArgs,
    stream: Any,
    make_sample: Callable,
    columns: Sequence[str],
    process_index: int = 0,
    num_processes: int = 1,
) -> StreamLoader:
    """This process's loader of training batches over an endless, reshuffled stream."""
    samples = StreamingSamples(
        stream,
        make_sample,
        process_index=process_index,
        num_processes=num_processes,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed,
        infinite=True,
        columns=list(columns),
        max_bad_fraction=cfg.max_bad_fraction,
    )
    return build_dataloader(samples, cfg.per_device_batch_size, num_workers=cfg.num_workers)


@dataclasses.dataclass
class EvalSource:
    """An evaluation split: its stream and (image, target) columns, its eval_results.json "dataset" entry, and
    how to read it (`max_samples` counts over all processes)."""

    stream: Any
    columns: tuple[str, str]
    dataset: dict[str, Any]
    num_workers: int | None = None
    max_samples: int | None = None
    max_bad_fraction: float = 0.5

    def loader(self, make_sample: Callable, accelerator: Accelerator) -> StreamLoader:
        """One pass over this process's share in the stored order, one image per batch (sizes differ)."""
        stream = self.stream.take(self.max_samples) if self.max_samples is not None else self.stream
        samples = StreamingSamples(
            stream,
            make_sample,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
            shuffle_buffer=0,
            columns=list(self.columns),
            max_bad_fraction=self.max_bad_fraction,
        )
        return build_dataloader(samples, 1, num_workers=self.num_workers, drop_last=False)


def open_eval_source(
    cfg: Any, split: str, resolve_columns: Callable[[Any, Any], tuple[str, str]], max_samples: int | None
) -> EvalSource:
    """The `split` of `cfg.dataset` (a fine-tuning or evaluation config) as an `EvalSource`."""
    stream = open_stream(cfg.dataset, cfg.dataset_config, split, data_files=cfg.data_files)
    return EvalSource(
        stream,
        resolve_columns(cfg, stream.features),
        dataset_entry(cfg.dataset, cfg.dataset_config, split, cfg.dataset_name),
        cfg.num_workers,
        max_samples,
        cfg.max_bad_fraction,
    )


# --- evaluation ---------------------------------------------------------------------------------------


def metric_module(name: str, accelerator: Accelerator | None = None) -> types.ModuleType:
    """The Python module `evaluate.load` built for the local metric `name` (main process first: one cache
    write). The final numbers go through its functions, so the reported path is the `evaluate` module."""
    from .metrics import load_metric  # imports `evaluate` (seconds): only runs that evaluate pay for it

    context = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    with context:
        metric = load_metric(name)
    return sys.modules[type(metric).__module__]


def dataset_entry(dataset: str, config: str | None, split: str, name: str | None = None) -> dict[str, Any]:
    """The "dataset" object of eval_results.json."""
    entry = {"name": name or Path(str(dataset).rstrip("/")).name or str(dataset), "id": str(dataset)}
    if config:
        entry["config"] = config
    entry["split"] = split
    return entry


def write_eval_results(
    path: str | os.PathLike,
    task: str,
    dataset: Mapping[str, Any],
    metrics: Mapping[str, float],
    protocol: Mapping[str, Any],
    num_samples: int,
    per_category: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the report the model cards read (`hub_cards.cards.load_eval_results` format); returns it."""
    report: dict[str, Any] = {
        "task": task,
        "dataset": dict(dataset),
        "metrics": dict(metrics),
        "protocol": dict(protocol),
        "num_samples": int(num_samples),
    }
    if per_category is not None:
        report["per_category"] = dict(per_category)
    write_json(path, report)
    return report


class PeriodicEvaluator:
    """The engine's `evaluate(state)` callback: `evaluate_fn(model)` gives the eval_results.json fields; it runs
    on the unwrapped model, and the last report is kept for the final write."""

    def __init__(self, accelerator: Accelerator, model: nn.Module, evaluate_fn: Callable[[nn.Module], dict]):
        self.accelerator, self.model, self.evaluate_fn = accelerator, model, evaluate_fn
        self.last_step: int | None = None
        self.last_report: dict[str, Any] | None = None

    def __call__(self, state: TrainerState) -> dict[str, float]:
        self.last_report = self.evaluate_fn(self.accelerator.unwrap_model(self.model))
        self.last_step = state.step
        return dict(self.last_report["metrics"])

    def final(self, state: TrainerState) -> dict[str, Any]:
        """The report of the model at `state.step`, evaluating only if that step was not evaluated yet."""
        if self.last_step != state.step:
            self(state)
        return self.last_report


# --- the end of a run ---------------------------------------------------------------------------------


def train_and_finish(
    accelerator: Accelerator,
    cfg: FinetuneArgs,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loader: StreamLoader,
    state: TrainerState,
    total_steps: int,
    signature: Mapping[str, Any],
    evaluate_fn: Callable[[nn.Module], Any] | None,
    task: str,
) -> dict[str, Any]:
    """`engine.train_loop`, then (if training completed) OUTPUT_DIR/final with its image processor (size = crop,
    size_divisor = patch), the final evaluation in eval_results.json, and results.json via `finish_run`."""
    output_dir = Path(cfg.output_dir)
    total_batch = cfg.per_device_batch_size * accelerator.num_processes
    accelerator.init_trackers(
        task, {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in signature.items()}
    )
    accelerator.print(
        f"fine-tuning ({task}) {total_steps} steps of {total_batch} images ({accelerator.num_processes} "
        f"processes, {accelerator.mixed_precision} precision), lr {cfg.lr:.3g}, starting at step {state.step}"
    )
    evaluator = PeriodicEvaluator(accelerator, model, evaluate_fn) if evaluate_fn is not None else None
    outcome = train_loop(
        accelerator,
        model,
        optimizer,
        scheduler,
        loader,
        cfg,
        state,
        total_steps,
        signature,
        evaluate=evaluator,
        eval_every=cfg.eval_every if evaluator is not None else None,
        desc=task,
    )
    extra: dict[str, Any] = {"task": task, "total_steps": total_steps, "total_batch_size": total_batch}
    if outcome.status != "completed":
        return finish_run(accelerator, cfg, outcome, extra)
    patch_size = accelerator.unwrap_model(model).config.patch_size
    processor = DenseCLViTImageProcessor(
        size={"height": cfg.crop_size[0], "width": cfg.crop_size[1]}, size_divisor=patch_size
    )
    save_model(accelerator, model, output_dir / "final", processor)
    extra["model_dir"] = "final"
    if evaluator is not None:
        evaluated = evaluator.last_step == outcome.state.step
        report = evaluator.final(outcome.state)
        scalars = {f"eval_{name}": value for name, value in report["metrics"].items()}
        if not evaluated:
            with MetricsLogger(output_dir, accelerator) as metrics:
                metrics.log(outcome.state.step, **scalars)
        extra.update(scalars, eval_results="eval_results.json")
        if accelerator.is_main_process:
            write_eval_results(output_dir / "eval_results.json", task, **report)
    return finish_run(accelerator, cfg, outcome, extra)


# --- evaluating a saved folder ------------------------------------------------------------------------


@dataclasses.dataclass
class EvaluateConfig:
    """Evaluate a fine-tuned segmentation or depth model folder on a dataset split; writes eval_results.json.

    Run with `python scripts/evaluate_model.py --task segmentation --model DIR --dataset DATA [--split validation]`
    (or under `accelerate launch` to share the images over processes).
    """

    task: Literal["segmentation", "depth"] = dataclasses.field(metadata={"help": "what the model predicts"})
    model: str = dataclasses.field(metadata={"help": "fine-tuned model folder (e.g. OUTPUT_DIR/final)"})
    dataset: str = dataclasses.field(
        metadata={
            "help": "Hub id, local folder (imagefolder or parquet), save_to_disk folder, or .parquet file/glob"
        }
    )
    dataset_config: str | None = _opt(None, "dataset configuration name")
    split: str = _opt("validation", "split to evaluate")
    data_files: list[str] | None = _opt(None, "data files passed to datasets.load_dataset")
    dataset_name: str | None = _opt(
        None, "dataset name in eval_results.json; default: the last part of --dataset"
    )
    output_dir: str | None = _opt(None, "folder for eval_results.json; default: the model folder")
    image_column: str | None = _opt(None, "image column; default: the dataset's only other Image column")
    label_column: str | None = _opt(None, "segmentation: label-map column; default: annotation")
    depth_column: str | None = _opt(None, "depth: depth column; default: depth_map")
    max_samples: int | None = _opt(None, "evaluate the first N examples only")
    num_workers: int | None = _opt(None, "DataLoader workers per process; default: min(8, CPUs - 1)")
    max_bad_fraction: float = _opt(0.5, "stop when more than this fraction of the examples cannot be used")
    reduce_labels: bool = _opt(True, "segmentation: raw 0 is ignored and label k >= 1 becomes k - 1 (ADE20K)")
    ignore_index: int | None = _opt(None, "segmentation: ignored label; default: the model's")
    scale_bounds: tuple[int, int] = _opt(
        (2048, 512), "segmentation: (long, short) bounds images are rescaled to fit"
    )
    window: int | None = _opt(None, "segmentation: sliding-window size; default: the model's image size")
    stride: int | None = _opt(
        None, "segmentation: sliding-window stride; default: 2/3 of the window (512 -> 341)"
    )
    depth_scale: float = _opt(1.0, "depth: metres per raw depth unit (1e-3 for 16-bit PNGs in millimetres)")
    eigen_crop: bool | None = _opt(
        None, "depth: evaluate inside the Eigen crop; default: on when --dataset names NYU"
    )
    eval_size: tuple[int, int] | None = _opt(
        None, "depth: resize images to (height, width); default: the nearest multiple of the patch size"
    )

    def validate(self) -> None:
        if not Path(self.model).is_dir() and self.output_dir is None:
            raise ValueError(
                f"--model {self.model} is not a local folder; set --output-dir for eval_results.json"
            )
        for flag, value in (
            ("--max-samples", self.max_samples),
            ("--window", self.window),
            ("--stride", self.stride),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.window is not None and self.stride is not None and self.stride > self.window:
            raise ValueError(f"--stride {self.stride} must not exceed --window {self.window}")
        if self.depth_scale <= 0:
            raise ValueError(f"--depth-scale must be > 0, got {self.depth_scale}")
        if min(self.scale_bounds) < 1 or self.scale_bounds[0] < self.scale_bounds[1]:
            raise ValueError(
                f"--scale-bounds must be (long, short) with long >= short >= 1, got {self.scale_bounds}"
            )

    def results_path(self) -> Path:
        return Path(self.output_dir or self.model) / "eval_results.json"


def load_finetuned(model_cls: type, folder: str) -> nn.Module:
    """A fine-tuned task model; refuses a folder whose head would be newly initialised (e.g. an encoder)."""
    model, info = model_cls.from_pretrained(folder, output_loading_info=True)
    missing = _newly_initialised(sorted(info["missing_keys"]))
    if missing:
        raise ValueError(
            f"{folder} holds no trained {model_cls.__name__} ({', '.join(missing)} missing); "
            "evaluate the final/ folder of a fine-tuning run"
        )
    return model.eval()
