"""The end of a run: save the trained model, write results.json and the summary, draw curves.png."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .runlog import write_json
from .setup import RunOutcome, TrainingArgs

logger = logging.getLogger(__name__)


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
        "final_loss": state.last_loss,
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
        loss = "n/a" if state.last_loss is None else f"{state.last_loss:.4f}"
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
        from .curves import plot_run_curves
    except ImportError:
        return
    try:
        plot_run_curves([output_dir], output_dir / "curves.png")
    except (OSError, ValueError) as err:
        logger.warning("could not draw the training curves: %s", err)
