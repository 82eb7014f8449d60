"""Guards for long runs: graceful preemption (SIGTERM/SIGINT) and non-finite loss/gradient detection.

The training step these are written for::

    with PreemptionHandler(accelerator, sync_every=cfg.log_every) as preempt:
        for step in range(start_step, total_steps):
            loss = model(**batch).loss
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            skip = guard.check(loss, grad_norm=grad_norm, step=step)
            if not skip or accelerator.scaler is not None:
                optimizer.step()  # fp16: the GradScaler skips non-finite updates itself and must see every step
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            at_ckpt = (step + 1) % cfg.checkpoint_every == 0
            stop = preempt.should_stop_at(step, force_sync=at_ckpt)
            if at_ckpt or stop:
                save_checkpoint(accelerator, cfg.output_dir, step + 1, extra, keep_last=cfg.keep_last)
            if stop:
                break

`loop.train_step` decides on the device instead (`NonFiniteGuard.defer`) when the optimiser is fused.
"""

from __future__ import annotations

import math
import signal
import types
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn


class PreemptionHandler:
    """Turn SIGTERM/SIGINT into a ``should_stop`` flag so the loop can checkpoint and exit cleanly.

    Inside the ``with`` block the signals only set the flag; a second SIGINT raises
    ``KeyboardInterrupt`` so an impatient user can still stop at once. The previous handlers are
    restored on exit. Install it from the main thread (a Python rule for signal handlers).

    With several processes only some may receive the signal, and a process that stops alone would
    deadlock the others in their next collective. ``should_stop_at(step)`` therefore returns a flag
    agreed by all processes (max over ranks), computed with one tiny all-reduce every ``sync_every``
    steps and whenever ``force_sync`` is true (pass it at checkpoint steps); between syncs it returns
    the last agreed value. Every process must call it with the same ``step`` and ``force_sync``.
    Choose ``sync_every`` so that ``sync_every`` steps plus a checkpoint fit in the scheduler's grace
    period between SIGTERM and SIGKILL.
    """

    def __init__(
        self,
        accelerator: Any = None,
        sync_every: int = 10,
        signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    ):
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.accelerator = accelerator
        self.sync_every = sync_every
        self.signals = tuple(signals)
        self.signal_received: int | None = None
        self._agreed = False
        self._last_synced_step: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def should_stop(self) -> bool:
        """True once this process received one of the signals (local, not agreed across processes)."""
        return self.signal_received is not None

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.signal_received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_received = signum

    def __enter__(self) -> PreemptionHandler:
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            # getsignal returns None for handlers installed outside Python; the default is the best restore.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def should_stop_at(self, step: int, force_sync: bool = False) -> bool:
        """The stop flag agreed by all processes, refreshed at ``step % sync_every == 0`` or ``force_sync``."""
        acc = self.accelerator
        if acc is None or acc.num_processes == 1:
            return self.should_stop
        if self._agreed or (step % self.sync_every != 0 and not force_sync) or self._last_synced_step == step:
            return self._agreed
        flag = torch.tensor([1 if self.should_stop else 0], device=acc.device)
        self._agreed = bool(acc.reduce(flag, reduction="max").item())
        self._last_synced_step = step
        return self._agreed


class TrainingDiverged(RuntimeError):
    """Raised after too many consecutive non-finite steps."""


def grad_norm_of(parameters: Iterable[torch.Tensor]) -> torch.Tensor | None:
    """Global L2 norm of the gradients (0-dim tensor on their device), or ``None`` if none has a gradient."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else None


class NonFiniteGuard:
    """Skip updates whose loss or gradients are NaN/inf; give up after ``max_consecutive`` in a row.

    Two ways to use it:

    - ``check`` (host decision) folds the loss and the global gradient norm (pass the one
      ``clip_grad_norm_`` already returned, otherwise it is computed from ``model``) into one
      ``torch.isfinite`` and reads back a single bool: one host sync per step. It raises
      ``TrainingDiverged`` at the ``max_consecutive``-th non-finite step in a row.
    - ``defer`` (device decision) returns the skip flag as a 0-dim tensor on the device, for an optimiser
      that skips on the device (torch's fused Adam/AdamW take it as ``found_inf``, as with a GradScaler),
      and keeps the streak and skip counts on the device too: no host sync. ``sync()`` reads them back
      (one host read; call it at logging and checkpoint steps) and raises ``TrainingDiverged`` naming the
      step where the streak reached ``max_consecutive``, with that step's loss and gradient norm.

    In a multi-process run pass the grad norm: gradients are all-reduced, so every process sees the same
    norm and reaches the same decision, while a loss is per process. With fp16 the GradScaler overflows a
    few times while it calibrates its scale; keep ``max_consecutive`` above that.
    """

    def __init__(self, max_consecutive: int = 10):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.num_skipped = 0
        self._pending: dict[str, torch.Tensor] | None = None  # `defer`'s device counters since the last sync
        self._deferred_norm = False  # whether `defer` was given gradient norms (for the error message)

    @staticmethod
    def finite_flag(
        loss: torch.Tensor | float, grad_norm: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """0-dim bool tensor, True when the loss and the grad norm are finite; no host sync."""
        loss = torch.as_tensor(loss).detach()
        values = [loss.float().reshape(-1)]
        if grad_norm is not None:
            values.append(torch.as_tensor(grad_norm, device=loss.device).detach().float().reshape(-1))
        return torch.isfinite(torch.cat(values)).all()

    def check(
        self,
        loss: torch.Tensor | float,
        model: nn.Module | None = None,
        *,
        grad_norm: torch.Tensor | float | None = None,
        step: int | None = None,
    ) -> bool:
        """True when this update must be skipped (non-finite loss or gradients).

        Raises ``TrainingDiverged`` on the ``max_consecutive``-th non-finite step in a row.
        """
        if grad_norm is None and model is not None:
            grad_norm = grad_norm_of(model.parameters())
        if bool(self.finite_flag(loss, grad_norm).item()):
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.num_skipped += 1
        if self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(self._message(self.consecutive, loss, grad_norm, step))
        return True

    def defer(
        self, loss: torch.Tensor, grad_norm: torch.Tensor | None = None, step: int = -1
    ) -> torch.Tensor:
        """The skip decision of this update as a 0-dim bool tensor on the loss's device; no host sync.

        The streak, the skip count and the first step where the streak reached ``max_consecutive`` (`step`,
        an int; -1 for unknown), with its loss and gradient norm, are kept on the device; ``sync`` reads them.
        """
        bad = self.finite_flag(loss, grad_norm).logical_not()
        p = self._pending
        if p is None:
            zero = torch.zeros((), dtype=torch.float32, device=bad.device)
            p = dict(
                streak=zero + self.consecutive, skipped=zero, diverged=zero, at=zero, loss=zero, norm=zero
            )
        streak = (p["streak"] + 1) * bad
        first = (p["diverged"] == 0) & (streak >= self.max_consecutive)
        self._deferred_norm = grad_norm is not None
        norm = p["norm"] if grad_norm is None else torch.as_tensor(grad_norm).detach().float()
        self._pending = {
            "streak": streak,
            "skipped": p["skipped"] + bad,
            "diverged": p["diverged"] + first,
            "at": torch.where(first, step, p["at"]),
            "loss": torch.where(first, loss.detach().float(), p["loss"]),
            "norm": torch.where(first, norm, p["norm"]),
        }
        return bad

    def sync(self) -> None:
        """Read the counters of the deferred steps since the last sync (one host read). Raises
        ``TrainingDiverged`` if a streak of ``max_consecutive`` non-finite steps was reached."""
        if self._pending is None:
            return
        values = dict(zip(self._pending, torch.stack(list(self._pending.values())).tolist()))
        self._pending = None
        self.consecutive, self.num_skipped = int(values["streak"]), self.num_skipped + int(values["skipped"])
        if values["diverged"]:
            norm = values["norm"] if self._deferred_norm else None
            step = int(values["at"]) if values["at"] >= 0 else None
            raise TrainingDiverged(self._message(self.max_consecutive, values["loss"], norm, step))

    @staticmethod
    def _message(consecutive: int, loss: Any, grad_norm: Any, step: int | None) -> str:
        def show(value: Any) -> str:
            value = float(torch.as_tensor(value).float().reshape(-1)[0]) if value is not None else math.nan
            return f"{value:.4g}"

        where = f" at step {step}" if step is not None else ""
        return (
            f"training diverged{where}: {consecutive} consecutive non-finite steps "
            f"(loss={show(loss)}, grad_norm={show(grad_norm) if grad_norm is not None else 'n/a'}); "
            "likely causes: learning rate too high (try a lower --lr or a larger --warmup-fraction), "
            "fp16 overflow (launch with accelerate launch --mixed_precision bf16), "
            "no gradient clipping (set --grad-clip 1.0)"
        )
