"""What the two fine-tuning scripts share: their common options, the optimiser (layer-wise lr decay), the paired
(image, target) samples, and the run itself (`run_finetuning`): data, model (`model_start`), optimiser, resume,
`loop.train_loop` with periodic evaluation, then final/, eval_results.json and results.json.

A task module (`segmentation`, `depth`) implements `FinetuneTask`: its columns, sample decoding and transforms,
model class and config, and its evaluation (protocol and metric in `segmentation_eval`, `depth_eval`, on top of
`evaluation`). `RunEvaluation` calls the task's evaluation during and after training.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from torch import nn

from ...modeling import DenseCLViTImageProcessor
from ..data.loader import StreamLoader
from ..data.sources import open_stream, resolve_column
from ..engine.config import option, save_config
from ..engine.loop import resume, train_loop
from ..engine.optim import (
    build_adam,
    build_adamw,
    cosine_with_warmup,
    describe_param_groups,
    param_groups_layer_decay,
    poly_with_warmup,
    warmup_steps_from_fraction,
)
from ..engine.run_end import finish_run, save_model
from ..engine.runlog import MetricsLogger
from ..engine.setup import (
    CRITICAL_KEYS,
    TrainerState,
    TrainingArgs,
    apply_model_options,
    build_accelerator,
    run_signature,
    setup_errors,
    start_trackers,
    stream_num_examples,
    total_steps_for,
    train_loader,
)
from ..evaluation.shared import EvalSource, open_eval_source, write_eval_results
from .model_start import describe_load, load_task_model, model_source

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


@dataclasses.dataclass
class FinetuneArgs(TrainingArgs):
    """Options shared by the segmentation and depth fine-tuning scripts (on top of the engine's)."""

    model: str = option(
        "vit-base",
        "start from: a pre-training output folder (its final/), any DenseCL-ViT model folder, a converted "
        "timm/DINO/ViT folder, or a preset (vit-tiny, vit-small, vit-base) for a random-init baseline",
    )
    crop_size: tuple[int, int] = option(
        (512, 512), "training crop (height, width); multiples of the patch size"
    )
    drop_path_rate: float = option(0.1, "stochastic depth rate of the last block (linear over the blocks)")
    layer_decay: float | None = option(
        None, "layer-wise lr decay: block i trains at lr * decay^(L+1-i); none trains every layer at --lr"
    )
    optimizer: Literal["adamw", "adam"] = option(
        "adamw", "AdamW (decoupled weight decay) or Adam (L2 penalty)"
    )
    lr_schedule: Literal["poly", "cosine"] = option("poly", "decay after the linear warm-up")
    poly_power: float = option(1.0, "exponent of the poly decay")
    freeze_encoder: bool = option(
        False, "train the head only (linear probing): the encoder's weights stay as loaded"
    )
    eval_split: str | None = option(
        "validation", "split evaluated during and after training; none: no evaluation"
    )
    eval_every: int | None = option(None, "evaluate every N steps as well as at the end")
    max_eval_samples: int | None = option(
        None, "evaluate on the first N examples only (quick periodic checks)"
    )
    dataset_name: str | None = option(
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


def image_and_target_columns(
    features: Any, image_column: str | None, target_column: str | None, kind: str
) -> tuple[str, str]:
    """(image column, target column) of a stream: the target column (`kind` "label" or "depth") first, then the
    image column among the others."""
    target = resolve_column(features, target_column, kind)
    return resolve_column(features, image_column, "image", exclude=[target]), target


@dataclasses.dataclass(frozen=True)
class PairedSample:
    """A stream example -> {"pixel_values" (3, h, w), "labels" (h', w')}, or the reason to skip it.

    `decode(example)` gives (RGB image, (H, W) target array) or a skip reason; `transform(image, target, rng)`
    gives the two tensors (a training augmentation, or an evaluation resize).
    """

    decode: Callable[[Mapping[str, Any]], tuple[PIL.Image.Image, np.ndarray] | str]
    transform: Callable[
        [PIL.Image.Image, np.ndarray, np.random.Generator | None], tuple[torch.Tensor, torch.Tensor]
    ]

    def __call__(
        self, example: Mapping[str, Any], rng: np.random.Generator | None
    ) -> dict[str, torch.Tensor] | str:
        decoded = self.decode(example)
        if isinstance(decoded, str):
            return decoded
        pixel_values, labels = self.transform(*decoded, rng)
        return {"pixel_values": pixel_values, "labels": labels}


# --- the run ------------------------------------------------------------------------------------------


class FinetuneTask(abc.ABC):
    """What a task adds to the shared fine-tuning run, built from the task's options (`self.cfg`).

    `name` is the eval_results.json "task", `model_class` the task model, `critical_keys` the options a resume
    must not change, `resolve_columns(cfg, features)` the (image, target) columns of a stream (a plain function,
    shared with evaluating a saved folder).
    """

    name: ClassVar[str]
    model_class: ClassVar[type[nn.Module]]
    critical_keys: ClassVar[tuple[str, ...]]
    resolve_columns: ClassVar[Callable[[Any, Any], tuple[str, str]]]

    def __init__(self, cfg: FinetuneArgs) -> None:
        self.cfg = cfg

    @abc.abstractmethod
    def prepare(self, features: Any, columns: tuple[str, str]) -> tuple[PairedSample, dict[str, Any]]:
        """The training sample function and the model's config overrides (labels, head, depth range)."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, source: EvalSource, accelerator: Accelerator) -> dict[str, Any]:
        """The eval_results.json fields (all but "task") of `model` on `source`."""


class RunEvaluation:
    """The `evaluate(state)` callback of `loop.train_loop`: the task's evaluation of the unwrapped model on the
    run's --eval-split; the last report and its step are kept for the final eval_results.json."""

    def __init__(self, task: FinetuneTask, source: EvalSource, accelerator: Accelerator, model: nn.Module):
        self.task, self.source, self.accelerator, self.model = task, source, accelerator, model
        self.last_step: int | None = None
        self.last_report: dict[str, Any] | None = None

    def __call__(self, state: TrainerState) -> dict[str, float]:
        model = self.accelerator.unwrap_model(self.model)
        self.last_report = self.task.evaluate(model, self.source, self.accelerator)
        self.last_step = state.step
        return dict(self.last_report["metrics"])


def build_model(task: FinetuneTask, overrides: Mapping[str, Any], accelerator: Accelerator) -> nn.Module:
    """The task model on the --model start with `overrides` and drop path, checkpointed and compiled as asked,
    on the accelerator's device."""
    cfg = task.cfg
    model, report = load_task_model(
        task.model_class, cfg.model, cfg.crop_size, **overrides, drop_path_rate=cfg.drop_path_rate
    )
    accelerator.print(describe_load(cfg.model, report))
    return apply_model_options(model, cfg).to(accelerator.device)


def run_finetuning(task: FinetuneTask) -> dict[str, Any]:
    """Fine-tune as the task's options say; returns the results written to results.json."""
    cfg = task.cfg
    accelerator = build_accelerator(cfg)
    if accelerator.is_main_process:
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    with setup_errors():
        stream = open_stream(cfg.dataset, cfg.dataset_config, cfg.split, data_files=cfg.data_files)
        columns = task.resolve_columns(cfg, stream.features)
        sample, overrides = task.prepare(stream.features, columns)
        loader = train_loader(
            cfg, stream, sample, columns, accelerator.process_index, accelerator.num_processes
        )
        total_steps = total_steps_for(cfg, accelerator.num_processes, stream_num_examples(stream, cfg.split))
        model = build_model(task, overrides, accelerator)
        optimizer, scheduler = build_optimizer(cfg, model, total_steps)
        if accelerator.is_main_process:  # two rows per block: a file of the run, not the log
            groups = Path(cfg.output_dir) / "param_groups.txt"
            groups.write_text(describe_param_groups(optimizer.param_groups) + "\n")
            print(f"parameter groups (lr scale, weight decay): {groups}")
        source = None
        if cfg.eval_split is not None:
            source = open_eval_source(cfg, cfg.eval_split, task.resolve_columns, cfg.max_eval_samples)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        signature = run_signature(cfg, accelerator)
        state = resume(accelerator, cfg, signature, task.critical_keys, loader)
    return train_and_finish(
        accelerator,
        cfg,
        model,
        optimizer,
        scheduler,
        loader,
        state,
        total_steps,
        signature,
        RunEvaluation(task, source, accelerator, model) if source is not None else None,
        task.name,
    )


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
    evaluator: RunEvaluation | None,
    task: str,
) -> dict[str, Any]:
    """`loop.train_loop`, then (if training completed) OUTPUT_DIR/final with its image processor (size = crop,
    size_divisor = patch), the final evaluation in eval_results.json, and results.json via `finish_run`."""
    total_batch = cfg.per_device_batch_size * accelerator.num_processes
    start_trackers(accelerator, task, signature)
    accelerator.print(
        f"fine-tuning ({task}) {total_steps} steps of {total_batch} images ({accelerator.num_processes} "
        f"processes, {accelerator.mixed_precision} precision), lr {cfg.lr:.3g}, starting at step {state.step}"
    )
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
        eval_every=cfg.eval_every,
        desc=task,
    )
    extra: dict[str, Any] = {"task": task, "total_steps": total_steps, "total_batch_size": total_batch}
    if outcome.status == "completed":
        extra.update(save_final(accelerator, cfg, model, outcome.state, evaluator, task))
    return finish_run(accelerator, cfg, outcome, extra)


def save_final(
    accelerator: Accelerator,
    cfg: FinetuneArgs,
    model: nn.Module,
    state: TrainerState,
    evaluator: RunEvaluation | None,
    task: str,
) -> dict[str, Any]:
    """OUTPUT_DIR/final with its image processor, and the final evaluation (logged to metrics.jsonl unless the
    last step was evaluated already) in eval_results.json; returns the fields this adds to results.json."""
    output_dir = Path(cfg.output_dir)
    patch_size = accelerator.unwrap_model(model).config.patch_size
    processor = DenseCLViTImageProcessor(
        size={"height": cfg.crop_size[0], "width": cfg.crop_size[1]}, size_divisor=patch_size
    )
    save_model(accelerator, model, output_dir / "final", processor)
    extra: dict[str, Any] = {"model_dir": "final"}
    if evaluator is None:
        return extra
    fresh = evaluator.last_step != state.step  # the loop evaluated the last step unless it had run already
    if fresh:
        evaluator(state)
    report = evaluator.last_report
    scalars = {f"eval_{name}": value for name, value in report["metrics"].items()}
    if fresh:
        with MetricsLogger(output_dir, accelerator) as metrics:
            metrics.log(state.step, **scalars)
        accelerator.log(scalars, step=state.step)
    extra.update(scalars, eval_results="eval_results.json")
    if accelerator.is_main_process:
        write_eval_results(output_dir / "eval_results.json", task, **report)
    return extra
