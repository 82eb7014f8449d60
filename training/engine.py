"""The training loop shared by pre-training and fine-tuning, launched with `accelerate launch` or plain `python`.

A script built on this module reads like accelerate's `complete_cv_example.py` split into phases::

    accelerator = build_accelerator(cfg)                        # seeds, trackers; precision from accelerate
    with setup_errors():                                        # a ValueError here: one line, exit status 2
        loader, num_examples = build_data(cfg, ...)             # a StreamLoader (not passed to prepare)
        model = build_model(cfg).to(accelerator.device)
        optimizer, scheduler = build_optimizer(cfg, model, ...) # after .to(device): fused kernels where torch has them
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        signature = run_signature(cfg, accelerator)
        state = resume(accelerator, cfg, signature, CRITICAL_KEYS, loader)
    outcome = train_loop(accelerator, model, optimizer, scheduler, loader, cfg, state, total_steps, signature)
    finish_run(accelerator, cfg, outcome, {...})                # results.json, summary, curves.png

`cli_main` maps failures to exit statuses: 2 for bad options and settings (before training starts), 1 for
a run that cannot go on (`DataError`: mostly unusable data; `TrainingDiverged`: too many non-finite steps
in a row, the last checkpoint left as it was); SIGTERM/SIGINT end the run with a checkpoint and status 0.

Host syncs: the loss stays on the device and is pulled, reduced over processes, every `log_every` steps.
The one per-step sync is `NonFiniteGuard`'s single bool, which is what lets a non-finite update be skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, gather_object, set_seed

from .checkpoint import (
    STATE_FILE,
    check_resume_compatible,
    complete_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from .config import config_to_dict, run_cli
from .data import StreamingSamples, StreamLoader, build_dataloader
from .guards import NonFiniteGuard, PreemptionHandler, TrainingDiverged
from .runlog import MetricsLogger, ThroughputMeter, progress_bar, read_json, write_json
from .samples import DataError, SkipCounter

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Options whose change alters the result of a resumed run; a script adds its model/loss fields.
CRITICAL_KEYS = (
    *("dataset", "dataset_config", "split", "image_column", "data_files", "shuffle_buffer", "seed"),
    *("per_device_batch_size", "num_processes", "mixed_precision"),
    *("lr", "weight_decay", "warmup_fraction", "grad_clip"),
)


def _opt(default: Any, help_text: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass
class TrainingArgs:
    """Options every training script shares: data, length, optimisation, checkpoints, logging."""

    dataset: str = dataclasses.field(
        metadata={
            "help": "Hub id, local folder (imagefolder or parquet), save_to_disk folder, or .parquet file/glob"
        }
    )
    dataset_config: str | None = _opt(None, "dataset configuration name")
    split: str = _opt("train", "split to train on")
    image_column: str | None = _opt(None, "image column; default: the dataset's only Image column")
    data_files: list[str] | None = _opt(None, "data files passed to datasets.load_dataset")
    output_dir: str = _opt("outputs/run", "folder for checkpoints, logs, the final model and results.json")
    per_device_batch_size: int = _opt(32, "images per process and step")
    max_steps: int | None = _opt(None, "optimiser steps (may be raised when resuming); or set --epochs")
    epochs: float | None = _opt(
        None, "passes over the data, with --num-train-samples if the stream has no length"
    )
    num_train_samples: int | None = _opt(None, "examples in the training split, for --epochs")
    lr: float = _opt(1e-4, "peak learning rate")
    weight_decay: float = _opt(
        0.05, "AdamW weight decay (never on biases, norms, position embeddings, [CLS])"
    )
    warmup_fraction: float = _opt(0.05, "linear warm-up over this fraction of the steps")
    grad_clip: float | None = _opt(None, "clip the global gradient norm to this value; none: no clipping")
    checkpoint_every: int = _opt(1000, "save a checkpoint every N steps (and at the end)")
    keep_last: int | None = _opt(2, "keep only the newest N checkpoints; none keeps all")
    resume_from: str | None = _opt(
        None, "'latest' (newest complete checkpoint in --output-dir, if any) or a step-* folder"
    )
    seed: int = _opt(0, "seed of the model initialisation, the data order and every augmentation")
    num_workers: int | None = _opt(None, "DataLoader workers per process; default: min(8, CPUs - 1)")
    shuffle_buffer: int = _opt(1000, "streaming shuffle buffer (examples); 0 keeps the stream order")
    log_every: int = _opt(20, "log loss, lr and images/s every N steps (the only host reads of the loss)")
    compile: bool = _opt(False, "torch.compile the model")
    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward pass to save memory")
    report_to: Literal["none", "tensorboard", "wandb", "mlflow", "all"] = _opt(
        "none", "also log to these accelerate trackers (files under OUTPUT_DIR/logs)"
    )
    max_bad_fraction: float = _opt(0.5, "stop when more than this fraction of the examples cannot be used")
    max_nonfinite_steps: int = _opt(10, "stop after this many non-finite (NaN/inf) steps in a row")
    plot_curves: bool = _opt(True, "draw OUTPUT_DIR/curves.png from metrics.jsonl at the end")

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
    images consumed by all processes, non-finite steps skipped, seconds spent in the training loop, and
    the mean loss of the last log window."""

    step: int = 0
    images_seen: int = 0
    nonfinite_skips: int = 0
    elapsed_s: float = 0.0
    last_loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> TrainerState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in names})


@dataclasses.dataclass
class RunOutcome:
    """What `train_loop` hands to `finish_run`: "completed" or "preempted", the final state, the mean loss of
    the last log window, the skipped examples of all processes, the last evaluation metrics."""

    status: str
    state: TrainerState
    final_loss: float | None
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
    except SetupError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except (DataError, TrainingDiverged) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
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


def resume(
    accelerator: Accelerator,
    args: TrainingArgs,
    signature: Mapping[str, Any],
    critical_keys: Sequence[str],
    loader: Any = None,
) -> TrainerState:
    """Seed the per-process training RNGs, then restore `--resume-from` if it names a checkpoint.

    The checkpoint's config must equal `signature` in `critical_keys` (a mismatch raises, naming them);
    `max_steps`/`epochs` may differ. The loader (anything with `load_state_dict`) gets this process's saved
    stream position. A fresh start in a folder that already holds checkpoints is refused.
    """
    set_seed(args.seed, device_specific=True)  # dropout/drop-path differ per process; overwritten by a resume
    path = resolve_resume(args.output_dir, args.resume_from)
    if path is None:
        if args.resume_from is None and complete_checkpoints(args.output_dir):
            raise ValueError(
                f"{args.output_dir} already holds checkpoints; pass --resume-from latest or use a new --output-dir"
            )
        return TrainerState()
    saved = read_json(Path(path) / STATE_FILE)
    check_resume_compatible(saved.get("config", {}), dict(signature), critical_keys)
    saved = load_checkpoint(accelerator, path)
    if loader is not None:
        loader.load_state_dict(saved["data_states"][accelerator.process_index])
    state = TrainerState.from_dict(saved["trainer"])
    logger.info("resumed from %s at step %d", path, state.step)
    return state


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    batch: Mapping[str, torch.Tensor],
    guard: NonFiniteGuard,
    grad_clip: float | None = None,
    step: int | None = None,
) -> tuple[torch.Tensor, bool]:
    """One update from `model(**batch).loss`; returns the detached loss (on the device) and whether it was skipped.

    The gradient norm is always computed (clipping at `grad_clip`, or at infinity, which leaves the
    gradients untouched); it is all-reduced, so every process takes the same skip decision.
    """
    loss = model(**batch).loss
    accelerator.backward(loss)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    skipped = guard.check(loss.detach(), grad_norm=grad_norm, step=step)
    if not skipped or accelerator.scaler is not None:
        optimizer.step()  # fp16: the GradScaler skips non-finite updates itself and must see every step
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), skipped


def _batches(loader: Any) -> Iterator[Any]:
    """The loader's batches, starting a new pass whenever one ends (infinite streams never end)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise DataError("the training data yields no complete batch; lower --per-device-batch-size")


def _skips(loader: Any) -> SkipCounter:
    """Skipped examples of all processes (a collective: every process must call it at the same step)."""
    local = loader.skips.to_dict() if hasattr(loader, "skips") else SkipCounter().to_dict()
    return SkipCounter.merge(gather_object([local]))


def _save(
    accelerator: Accelerator, args: TrainingArgs, state: TrainerState, loader: Any, signature: Mapping
) -> None:
    extra = {
        "trainer": state.to_dict(),
        "data_states": gather_object([loader.state_dict()]),  # one stream position per process
        "config": dict(signature),
    }
    path = save_checkpoint(accelerator, args.output_dir, state.step, extra, keep_last=args.keep_last)
    logger.info("saved checkpoint %s", path)


class _Reporter:
    """metrics.jsonl, accelerate trackers and the progress bar. The loss stays on the device between logs."""

    def __init__(self, accelerator: Accelerator, args: TrainingArgs, total_steps: int, start: int, desc: str):
        self.accelerator = accelerator
        self.metrics = MetricsLogger(args.output_dir, accelerator)
        self.bar = progress_bar(total_steps, accelerator, desc=desc, initial=start)
        self.meter = ThroughputMeter(window=max(2, args.log_every))
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=accelerator.device)
        self.loss_count = 0

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()

    def update(self, loss: torch.Tensor, skipped: bool, images: int) -> None:
        if not skipped:
            self.loss_sum += loss.float()
            self.loss_count += 1
        self.meter.update(images)
        self.bar.update(1)

    def log(self, state: TrainerState, lr: float, loader: Any) -> None:
        """One all-reduce and one host read of the loss since the last log (mean over steps and processes)."""
        count = torch.tensor(float(self.loss_count), device=self.loss_sum.device)
        total, count = self.accelerator.reduce(torch.stack([self.loss_sum, count]), reduction="sum").tolist()
        self.loss_sum.zero_()
        self.loss_count = 0
        mean = total / count if count else None
        state.last_loss = mean if mean is not None else state.last_loss
        skips = _skips(loader)
        record = {
            "loss": mean,
            "lr": lr,
            "images_per_s": round(self.meter.rate, 2),
            "images_seen": state.images_seen,
            "examples_seen": skips.seen,
            "skipped_samples": skips.skipped,
            "skipped_by_reason": dict(skips.counts),
            "nonfinite_skips": state.nonfinite_skips,
        }
        self.metrics.log(state.step, **record)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        self.accelerator.log(scalars, step=state.step)
        shown = "nan" if mean is None else f"{mean:.4f}"
        self.bar.set_postfix(loss=shown, lr=f"{lr:.3g}", img_s=f"{self.meter.rate:.1f}")

    def log_eval(self, step: int, values: Mapping[str, float]) -> dict[str, float]:
        values = {(k if k.startswith("eval_") else f"eval_{k}"): v for k, v in values.items()}
        self.metrics.log(step, **values)
        self.accelerator.log(values, step=step)
        self.meter.reset()  # the evaluation pause is no training time
        return values


def _to_device(device: torch.device) -> Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]]:
    return lambda batch, step: {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_loop(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    loader: Any,
    args: TrainingArgs,
    state: TrainerState,
    total_steps: int,
    signature: Mapping[str, Any],
    prepare_batch: Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]] | None = None,
    evaluate: Callable[[TrainerState], dict[str, float]] | None = None,
    eval_every: int | None = None,
    desc: str = "train",
) -> RunOutcome:
    """Train from `state.step` to `total_steps`: log, evaluate, checkpoint, and stop cleanly on SIGTERM/SIGINT.

    `loader` yields dicts of tensors (`model(**batch).loss` must work) and has `state_dict` /
    `load_state_dict` (a `StreamLoader`). `prepare_batch(batch, step)` moves a batch to the device
    (default: every tensor, non-blocking) and may augment it there. `evaluate(state)` runs on every process
    every `eval_every` steps and at the end; its metrics are logged with an ``eval_`` prefix. Checkpoints
    are written every `args.checkpoint_every` steps, at the end and on a stop signal, never during a run
    of non-finite steps. Raises `TrainingDiverged` and `DataError`.
    """
    prepare_batch = prepare_batch or _to_device(accelerator.device)
    guard = NonFiniteGuard(args.max_nonfinite_steps)
    guard.num_skipped = state.nonfinite_skips
    global_batch = args.per_device_batch_size * accelerator.num_processes
    status, eval_metrics, due = "completed", {}, False
    started, elapsed_before = time.perf_counter(), state.elapsed_s
    reporter = _Reporter(accelerator, args, total_steps, state.step, desc)
    model.train()
    with PreemptionHandler(accelerator, sync_every=args.log_every) as preempt, contextlib.closing(reporter):
        batches = _batches(loader)
        while state.step < total_steps:
            batch = prepare_batch(next(batches), state.step)
            lr = max(group["lr"] for group in optimizer.param_groups)
            loss, skipped = train_step(
                accelerator, model, optimizer, scheduler, batch, guard, args.grad_clip, state.step
            )
            state.step += 1
            state.images_seen += global_batch
            state.nonfinite_skips = guard.num_skipped
            state.elapsed_s = elapsed_before + time.perf_counter() - started
            reporter.update(loss, skipped, global_batch)
            last = state.step == total_steps
            if state.step % args.log_every == 0 or last:
                reporter.log(state, lr, loader)
            if evaluate is not None and eval_every and (state.step % eval_every == 0 or last):
                eval_metrics = reporter.log_eval(state.step, evaluate(state))
                model.train()
            due = due or state.step % args.checkpoint_every == 0 or last
            at_checkpoint = due and guard.consecutive == 0  # never mid-streak: keep the last good checkpoints
            stop = preempt.should_stop_at(state.step, force_sync=at_checkpoint)
            if at_checkpoint or stop:
                _save(accelerator, args, state, loader, signature)
                due = False
            if stop and not last:
                status = "preempted"
                accelerator.print(
                    f"stopped by a signal at step {state.step}; resume with --resume-from latest"
                )
                break
    return RunOutcome(status, state, state.last_loss, _skips(loader), eval_metrics)


def save_model(
    accelerator: Accelerator,
    model: torch.nn.Module,
    folder: str | Path,
    processor: Any = None,
    submodule: str | None = None,
) -> Path:
    """`save_pretrained` the model (or its attribute `submodule`, e.g. the encoder) and `processor` into `folder`.

    Call on every process (gathering a sharded state dict is a collective); only the main process writes.
    """
    state_dict = accelerator.get_state_dict(model)
    target = accelerator.unwrap_model(model, keep_torch_compile=False)
    if submodule is not None:
        prefix = submodule + "."
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        target = getattr(target, submodule)
    if accelerator.is_main_process:
        target.save_pretrained(folder, state_dict=state_dict)
        if processor is not None:
            processor.save_pretrained(folder)
    accelerator.wait_for_everyone()
    return Path(folder)


def finish_run(
    accelerator: Accelerator, args: TrainingArgs, outcome: RunOutcome, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write results.json, print the end-of-run summary, draw curves.png; returns the results."""
    state, skips = outcome.state, outcome.skips
    results = {
        "status": outcome.status,
        "steps": state.step,
        "images_seen": state.images_seen,
        "final_loss": outcome.final_loss,
        "examples_seen": skips.seen,
        "skipped_samples": skips.skipped,
        "skipped_by_reason": dict(skips.counts),
        "nonfinite_skips": state.nonfinite_skips,
        "wall_time_s": round(state.elapsed_s, 3),
        "images_per_s": round(state.images_seen / state.elapsed_s, 2) if state.elapsed_s > 0 else None,
        **outcome.eval_metrics,
        **(extra or {}),
    }
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        write_json(output_dir / "results.json", results)
        loss = "n/a" if outcome.final_loss is None else f"{outcome.final_loss:.4f}"
        print(
            f"{outcome.status}: {state.step} steps, {state.images_seen} images in {state.elapsed_s:.1f} s "
            f"({results['images_per_s']} images/s), final loss {loss}; skipped examples: {skips.skipped} of "
            f"{skips.seen} ({skips.summary()}); non-finite steps skipped: {state.nonfinite_skips}; "
            f"results in {output_dir / 'results.json'}"
        )
        if args.plot_curves:
            _plot_curves(output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def _plot_curves(output_dir: Path) -> None:
    try:
        from .visualize import plot_run_curves
    except ImportError:
        return
    try:
        plot_run_curves([output_dir], output_dir / "curves.png")
    except (OSError, ValueError) as err:
        logger.warning("could not draw the training curves: %s", err)
