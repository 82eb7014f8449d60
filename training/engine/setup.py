"""The run setup shared by pre-training and fine-tuning, launched with `accelerate launch` or plain `python`.

A script built on this module reads like accelerate's `complete_cv_example.py` split into phases::

    accelerator = build_accelerator(cfg)                        # seeds, trackers; precision from accelerate
    with setup_errors():                                        # a ValueError here: one line, exit status 2
        loader, num_examples = build_data(cfg, ...)             # a StreamLoader (not passed to prepare)
        model = apply_model_options(build_model(cfg), cfg).to(accelerator.device)  # checkpointing, compile
        optimizer, scheduler = build_optimizer(cfg, model, ...) # after .to(device): fused kernels where torch has them
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        signature = run_signature(cfg, accelerator)
        state = resume(accelerator, cfg, signature, CRITICAL_KEYS, loader)
    outcome = train_loop(accelerator, model, optimizer, scheduler, loader, cfg, state, total_steps, signature)
    finish_run(accelerator, cfg, outcome, {...})                # results.json, summary, curves.png

This module holds the options (`TrainingArgs`), the run state and outcome, the accelerator and the training
loader; `loop` holds `resume`, `train_step` and `train_loop`; `run_end` holds `save_model` and `finish_run`.

`cli_main` maps failures to exit statuses: 2 for bad options and settings (before training starts; a pickle
that torch.load(weights_only=True) refuses, wherever it is read, is one of them), 1 for
a run that cannot go on (`DataError`: mostly unusable data; `TrainingDiverged`: too many non-finite steps
in a row, the last checkpoint left as it was); SIGTERM/SIGINT end the run with a checkpoint and status 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import pickle
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from ..data.decoding import DataError, SkipCounter
from ..data.loader import StreamLoader, build_dataloader
from ..data.streaming import StreamingSamples
from .config import config_to_dict, option, run_cli
from .exits import one_line
from .guards import TrainingDiverged

T = TypeVar("T")

# Options whose change alters the result of a resumed run; a script adds its model/loss fields.
CRITICAL_KEYS = (
    *("dataset", "dataset_config", "split", "image_column", "data_files", "shuffle_buffer", "seed"),
    *("per_device_batch_size", "num_processes", "mixed_precision"),
    *("lr", "weight_decay", "warmup_fraction", "grad_clip"),
)


@dataclasses.dataclass
class TrainingArgs:
    """Options every training script shares: data, length, optimisation, checkpoints, logging."""

    dataset: str = dataclasses.field(
        metadata={
            "help": "Hub id, local folder (imagefolder or parquet), save_to_disk folder, or .parquet file/glob"
        }
    )
    dataset_config: str | None = option(None, "dataset configuration name")
    split: str = option("train", "split to train on")
    image_column: str | None = option(None, "image column; default: the dataset's only Image column")
    data_files: list[str] | None = option(None, "data files passed to datasets.load_dataset")
    output_dir: str = option("outputs/run", "folder for checkpoints, logs, the final model and results.json")
    per_device_batch_size: int = option(32, "images per process and step")
    max_steps: int | None = option(None, "optimiser steps (may be raised when resuming); or set --epochs")
    epochs: float | None = option(
        None, "passes over the data, with --num-train-samples if the stream has no length"
    )
    num_train_samples: int | None = option(None, "examples in the training split, for --epochs")
    lr: float = option(1e-4, "peak learning rate")
    weight_decay: float = option(
        0.05, "AdamW weight decay (never on biases, norms, position embeddings, [CLS])"
    )
    warmup_fraction: float = option(0.05, "linear warm-up over this fraction of the steps")
    grad_clip: float | None = option(None, "clip the global gradient norm to this value; none: no clipping")
    checkpoint_every: int = option(1000, "save a checkpoint every N steps (and at the end)")
    keep_last: int | None = option(2, "keep only the newest N checkpoints; none keeps all")
    resume_from: str | None = option(
        None, "'latest' (newest complete checkpoint in --output-dir, if any) or a step-* folder"
    )
    seed: int = option(0, "seed of the model initialisation, the data order and every augmentation")
    num_workers: int | None = option(None, "DataLoader workers per process; default: min(8, CPUs - 1)")
    shuffle_buffer: int = option(1000, "streaming shuffle buffer (examples); 0 keeps the stream order")
    log_every: int = option(20, "log loss, lr and images/s every N steps (the only host reads of the loss)")
    compile: bool = option(False, "torch.compile the model")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    report_to: Literal["none", "tensorboard", "wandb", "mlflow", "all"] = option(
        "none", "also log to these accelerate trackers (files under OUTPUT_DIR/logs)"
    )
    max_bad_fraction: float = option(0.5, "stop when more than this fraction of the examples cannot be used")
    max_nonfinite_steps: int = option(10, "stop after this many non-finite (NaN/inf) steps in a row")
    plot_curves: bool = option(True, "draw OUTPUT_DIR/curves.png from metrics.jsonl at the end")

    def validate(self) -> None:
        """Refuse impossible values of the shared options with a one-line message (before any loading)."""
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of --max-steps and --epochs")
        positive = ("max_steps", "epochs", "num_train_samples", "per_device_batch_size", "lr", "grad_clip")
        positive += ("checkpoint_every", "keep_last", "log_every", "max_nonfinite_steps")
        for name in positive:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        for name in ("weight_decay", "seed", "shuffle_buffer", "num_workers"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"--warmup-fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"--max-bad-fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.report_to in ("tensorboard", "all"):
            from accelerate.utils import is_tensorboard_available

            if not is_tensorboard_available():
                raise ValueError(
                    "--report-to tensorboard needs the tensorboard package: pip install tensorboard"
                )


@dataclasses.dataclass
class TrainerState:
    """Progress of a run, saved in every checkpoint: optimiser steps taken (skipped updates included),
    images consumed by all processes, non-finite steps skipped, seconds spent in the training loop, the
    mean loss of the last log window, and this process's [loss sum, step count] since that log (a checkpoint
    keeps one per process, so the first log after a resume averages the same steps as without the stop)."""

    step: int = 0
    images_seen: int = 0
    nonfinite_skips: int = 0
    elapsed_s: float = 0.0
    last_loss: float | None = None
    loss_window: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0])

    def to_dict(self) -> dict[str, Any]:
        """The fields all processes share; a checkpoint keeps `loss_window` apart, one per process."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "loss_window"}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> TrainerState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in names})


@dataclasses.dataclass
class RunOutcome:
    """What `train_loop` hands to `finish_run`: "completed" or "preempted", the final state (its `last_loss` is
    the run's final loss), the skipped examples of all processes, the last evaluation metrics."""

    status: str
    state: TrainerState
    skips: SkipCounter
    eval_metrics: dict[str, float]


class SetupError(ValueError):
    """A setting that turned out wrong while building the run (unknown column, checkpoint mismatch, ...)."""


@contextlib.contextmanager
def setup_errors() -> Iterator[None]:
    """Turn ValueErrors raised while building data, model and optimiser into `SetupError` (exit status 2)."""
    try:
        yield
    except (SetupError, DataError):
        raise
    except ValueError as err:
        raise SetupError(str(err)) from err


def cli_main(main_fn: Callable[[T], Any], cls: type[T], argv: Sequence[str] | None = None) -> int:
    """Parse and validate `cls` (`run_cli`), run `main_fn`, and return the process exit status."""
    try:
        run_cli(main_fn, cls, argv)
    except (SetupError, pickle.UnpicklingError) as err:  # a refused pickle: e.g. in from_pretrained
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except (DataError, TrainingDiverged) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    return 0


def build_accelerator(args: TrainingArgs) -> Accelerator:
    """An `Accelerator` whose precision and process count come from `accelerate launch` (or its env).

    The scheduler steps once per optimiser step (`step_scheduler_with_optimizer=False`: otherwise accelerate
    would step it `num_processes` times). Seeds every library with `args.seed` for the model initialisation.
    """
    project = ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "logs")
    )
    accelerator = Accelerator(
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=project,
        step_scheduler_with_optimizer=False,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        raise SetupError(
            f"launched as {launched} processes but accelerate set up {accelerator.num_processes} (no GPU?); "
            "on CPUs use: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ..."
        )
    logging.basicConfig(
        format="%(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is too chatty
    set_seed(args.seed)
    return accelerator


def run_signature(args: TrainingArgs, accelerator: Accelerator) -> dict[str, Any]:
    """The resolved config plus the launch settings that change results: saved in checkpoints and compared on resume."""
    return {
        **config_to_dict(args),
        "num_processes": accelerator.num_processes,
        "mixed_precision": str(accelerator.mixed_precision),
    }


def start_trackers(accelerator: Accelerator, project: str, signature: Mapping[str, Any]) -> None:
    """Start the --report-to trackers with the run signature as hyperparameters (non-scalars as strings)."""
    accelerator.init_trackers(
        project, {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in signature.items()}
    )


def total_steps_for(args: TrainingArgs, num_processes: int, num_examples: int | None = None) -> int:
    """`--max-steps`, or the steps of `--epochs` passes over `--num-train-samples` (else `num_examples`)."""
    if args.max_steps is not None:
        return args.max_steps
    examples = args.num_train_samples or num_examples
    if examples is None:
        raise ValueError(
            "the stream does not say how many examples it holds; set --num-train-samples for --epochs"
        )
    return max(1, math.floor(args.epochs * examples / (args.per_device_batch_size * num_processes)))


def apply_model_options(model: Any, args: TrainingArgs) -> Any:
    """--gradient-checkpointing and --compile on a freshly built model; returns it.

    Compiling is in place (`nn.Module.compile`): parameter names, and so saved checkpoints, stay those of the
    plain model.
    """
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.compile:
        model.compile()
    return model


def train_loader(
    args: TrainingArgs,
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
        shuffle_buffer=args.shuffle_buffer,
        seed=args.seed,
        infinite=True,
        columns=list(columns),
        max_bad_fraction=args.max_bad_fraction,
    )
    return build_dataloader(samples, args.per_device_batch_size, num_workers=args.num_workers)


def stream_num_examples(stream: Any, split: str) -> int | None:
    """The number of examples a `datasets` stream declares for `split`, if it declares one."""
    splits = getattr(getattr(stream, "info", None), "splits", None) or {}
    info = splits.get(split) if hasattr(splits, "get") else None
    return int(info.num_examples) if info is not None and info.num_examples else None
