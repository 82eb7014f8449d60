"""The training loop: resume a run, then train, log, evaluate and checkpoint until `total_steps`.

`resume` restores a checkpoint (or seeds a fresh start), `train_step` is one optimiser update, and `train_loop`
drives them, hands the final state to `run_end.finish_run` as a `RunOutcome`, and stops cleanly with a
checkpoint on SIGTERM/SIGINT. The run's options and state types live in `engine`.

Host syncs: none inside a step with a fused optimiser (the default): the loss, the skip decision of
`NonFiniteGuard` and its counts stay on the device, and are read back, reduced over processes, at logging
and checkpoint steps. With another optimiser, or fp16, the guard reads back one bool per step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed

from ..data.decoding import DataError, SkipCounter
from .checkpoint import (
    STATE_FILE,
    check_resume_compatible,
    complete_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from .guards import NonFiniteGuard, PreemptionHandler
from .runlog import MetricsLogger, ThroughputMeter, progress_bar, read_json
from .setup import RunOutcome, TrainerState, TrainingArgs

logger = logging.getLogger(__name__)

# accelerate's modes where every process ends the backward pass with the whole (all-reduced) gradients
_WHOLE_GRADIENTS = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


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
    if "loss_windows" in saved:  # checkpoints written before the window was saved start a fresh one
        state.loss_window = list(saved["loss_windows"][accelerator.process_index])
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
) -> tuple[torch.Tensor, bool | torch.Tensor]:
    """One update from `model(**batch).loss`; returns the detached loss (on the device) and whether the update
    was skipped: a bool, or a 0-dim bool tensor on the device when the optimiser skips there.

    The gradient norm is always computed (`gradient_norm`, clipping at `grad_clip` if set); it is of the
    all-reduced gradients, so every process takes the same skip decision. A fused
    Adam/AdamW (what `optim.build_adamw` builds wherever torch has the kernels) takes the decision as
    ``found_inf`` and skips on the device, with no host sync: `guard.sync()` later reads the counts. Other
    optimisers, and fp16 (whose GradScaler owns ``found_inf``), read the decision back every step.
    """
    loss = model(**batch).loss
    accelerator.backward(loss)
    loss = loss.detach()
    grad_norm = gradient_norm(accelerator, model.parameters(), grad_clip)
    inner = _device_skipping_optimizer(accelerator, optimizer)
    if inner is not None:
        skipped = guard.defer(loss, grad_norm, -1 if step is None else step)
        inner.found_inf = skipped.float()
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    else:
        skipped = guard.check(loss, grad_norm=grad_norm, step=step)
        if not skipped or accelerator.scaler is not None:
            optimizer.step()  # fp16: the GradScaler skips non-finite updates itself and must see every step
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, skipped


def gradient_norm(
    accelerator: Accelerator, parameters: Iterable[torch.nn.Parameter], grad_clip: float | None = None
) -> torch.Tensor | None:
    """The global L2 norm of the gradients, after clipping them to `grad_clip` if it is set.

    Clipping goes through accelerate, which knows FSDP, DeepSpeed and XLA and unscales fp16 gradients.
    Without clipping, where every process holds the whole gradients (one process or DDP) and no GradScaler
    scales them, only the norm is computed, with the function torch's clipping uses: clipping at infinity
    would multiply every gradient by 1, a pass over all of them for nothing.
    """
    plain = accelerator.distributed_type in _WHOLE_GRADIENTS and accelerator.scaler is None
    if grad_clip is None and plain and hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    return accelerator.clip_grad_norm_(parameters, grad_clip or math.inf)


def _device_skipping_optimizer(accelerator: Accelerator, optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimiser inside `optimizer` if it can skip a step on the device (a fused kernel that reads
    ``found_inf``, as GradScaler uses it) and no GradScaler owns that attribute; else None."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it in an AcceleratedOptimizer
    fused = isinstance(inner, torch.optim.Optimizer) and bool(inner.defaults.get("fused"))
    reads_found_inf = getattr(inner, "_step_supports_amp_scaling", False)
    return inner if fused and reads_found_inf and accelerator.scaler is None else None


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
    accelerator: Accelerator,
    args: TrainingArgs,
    state: TrainerState,
    loader: Any,
    signature: Mapping,
    loss_window: list[float],
) -> None:
    extra = {
        "trainer": state.to_dict(),
        "data_states": gather_object([loader.state_dict()]),  # one stream position per process
        "loss_windows": gather_object([loss_window]),  # each process's sums since the last log
        "config": dict(signature),
    }
    path = save_checkpoint(accelerator, args.output_dir, state.step, extra, keep_last=args.keep_last)
    logger.info("saved checkpoint %s", path)


class _Reporter:
    """metrics.jsonl, accelerate trackers and the progress bar. The loss stays on the device between logs."""

    def __init__(
        self, accelerator: Accelerator, args: TrainingArgs, total_steps: int, state: TrainerState, desc: str
    ):
        self.accelerator = accelerator
        self.metrics = MetricsLogger(args.output_dir, accelerator, keep_through=state.step)
        self.bar = progress_bar(total_steps, accelerator, desc=desc, initial=state.step)
        self.meter = ThroughputMeter(window=max(2, args.log_every))
        # float32 sums, as the device keeps them: a saved window restores bit for bit
        self.loss_sum, self.loss_count = (
            torch.tensor(value, dtype=torch.float32, device=accelerator.device) for value in state.loss_window
        )

    def window(self) -> list[float]:
        """This process's [loss sum, step count] since the last log (one host read; for checkpoints)."""
        return torch.stack([self.loss_sum, self.loss_count]).tolist()

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()

    def update(self, loss: torch.Tensor, skipped: bool | torch.Tensor, images: int) -> None:
        if isinstance(skipped, torch.Tensor):  # decided on the device: count the step there, no host read
            kept = skipped.logical_not()
            self.loss_sum += torch.where(kept, loss.float(), 0.0)
            self.loss_count += kept
        elif not skipped:
            self.loss_sum += loss.float()
            self.loss_count += 1
        self.meter.update(images)
        self.bar.update(1)

    def log(self, state: TrainerState, lr: float, loader: Any) -> None:
        """One all-reduce and one host read of the loss since the last log (mean over steps and processes)."""
        pair = torch.stack([self.loss_sum, self.loss_count])
        total, count = self.accelerator.reduce(pair, reduction="sum").tolist()
        self.loss_sum.zero_()
        self.loss_count.zero_()
        mean = total / count if count else None
        if mean is not None:
            state.last_loss = mean
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


def batch_to_device(
    device: torch.device,
) -> Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]]:
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
    prepare_batch = prepare_batch or batch_to_device(accelerator.device)
    guard = NonFiniteGuard(args.max_nonfinite_steps)
    guard.num_skipped = state.nonfinite_skips
    global_batch = args.per_device_batch_size * accelerator.num_processes
    status, eval_metrics, due = "completed", {}, False
    started, elapsed_before = time.perf_counter(), state.elapsed_s
    reporter = _Reporter(accelerator, args, total_steps, state, desc)
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
            state.elapsed_s = elapsed_before + time.perf_counter() - started
            reporter.update(loss, skipped, global_batch)
            last = state.step == total_steps
            log = state.step % args.log_every == 0 or last
            due = due or state.step % args.checkpoint_every == 0 or last
            stop = preempt.should_stop_at(state.step, force_sync=due)
            if log or due or stop:  # whenever the state is logged or saved
                guard.sync()  # the device-side skip counts; raises TrainingDiverged
                state.nonfinite_skips = guard.num_skipped
            if log:
                reporter.log(state, lr, loader)
            if evaluate is not None and (last or (eval_every and state.step % eval_every == 0)):
                eval_metrics = reporter.log_eval(state.step, evaluate(state))
                model.train()
            at_checkpoint = due and guard.consecutive == 0  # never mid-streak: keep the last good checkpoints
            if at_checkpoint or stop:
                _save(accelerator, args, state, loader, signature, reporter.window())
                due = False
            if stop and not last:
                status = "preempted"
                accelerator.print(
                    f"stopped by a signal at step {state.step}; resume with --resume-from latest"
                )
                break
    return RunOutcome(status, state, _skips(loader), eval_metrics)
