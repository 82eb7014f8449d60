"""Training curves: the records of a run's metrics.jsonl, grouped into panels and drawn against the step.

Figures are drawn on matplotlib's Agg canvas directly (`Figure` + `FigureCanvasAgg`, never pyplot), so importing
this module leaves the caller's interactive backend alone and works on machines without a display.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

_EVAL_PREFIXES = ("eval_", "eval/", "val_", "test_")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file (or of `path/metrics.jsonl`); a torn or malformed line is skipped."""
    path = Path(path)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no metrics log at {path}; pass a run folder that holds metrics.jsonl.")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            logger.warning("%s:%d is not JSON; skipped", path, number)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def metric_series(records: Sequence[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Numeric key -> (steps, values) sorted by step. A step logged twice keeps its last value (a resumed run
    appends to the log from its checkpoint's step); null (non-finite) values become NaN gaps."""
    series: dict[str, dict[float, float]] = {}
    for index, record in enumerate(records):
        step = record.get("step", index)
        for key, value in record.items():
            if key in ("step", "time") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) or (value is None and key in series):
                series.setdefault(key, {})[float(step)] = math.nan if value is None else float(value)
    return {
        key: (np.array(sorted(points)), np.array([points[s] for s in sorted(points)]))
        for key, points in series.items()
    }


def metric_panels(keys: Sequence[str]) -> dict[str, list[str]]:
    """Group metric names into panels: losses, learning rate, throughput, evaluation, then one panel per other key."""
    rules = (
        ("loss", lambda k: "loss" in k),
        ("learning rate", lambda k: k == "lr" or k.startswith("lr_") or "learning_rate" in k),
        ("throughput", lambda k: "per_s" in k or "throughput" in k or "per_second" in k),
        ("evaluation", lambda k: k.startswith(_EVAL_PREFIXES)),
    )
    panels: dict[str, list[str]] = {}
    for key in sorted(keys, key=lambda k: (k.startswith(_EVAL_PREFIXES), k)):  # training series first
        title = next((title for title, match in rules if match(key)), key)
        panels.setdefault(title, []).append(key)
    order = [title for title, _ in rules]
    return dict(
        sorted(panels.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))
    )


def plot_run_curves(run_dirs: Sequence[str | os.PathLike], output: str | os.PathLike) -> Path:
    """Draw every numeric series of each run's metrics.jsonl against the step, one panel per metric group
    (`metric_panels`); runs share colours across panels and are named by their folder in the legends."""
    runs = {_run_name(Path(run), run_dirs): metric_series(read_metrics(run)) for run in run_dirs}
    panels = metric_panels(sorted({key for series in runs.values() for key in series}))
    if not panels:
        raise ValueError(
            f"no numeric metrics in {[str(r) for r in run_dirs]}; log some values before plotting."
        )
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.6 * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = colormaps["tab10"].colors
    for ax, (title, keys) in zip(axes, panels.items()):
        for run_index, (run, series) in enumerate(runs.items()):
            for key_index, key in enumerate(k for k in keys if k in series):
                steps, values = series[key]
                color = colors[(run_index if len(runs) > 1 else key_index) % len(colors)]
                label = f"{run}: {key}" if len(runs) > 1 else key
                style = ("-", "--", ":", "-.")[key_index % 4] if len(runs) > 1 else "-"
                ax.plot(
                    steps, values, style, color=color, label=label, marker="o" if len(steps) < 30 else None
                )
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    return output


def _run_name(run: Path, runs: Sequence[str | os.PathLike]) -> str:
    """The run folder's name, with its parent's when two runs share a name (e.g. .../a/run and .../b/run)."""
    folders = [(p.parent if p.is_file() else p).resolve() for p in map(Path, runs)]
    folder = (run.parent if run.is_file() else run).resolve()
    return (
        f"{folder.parent.name}/{folder.name}"
        if [f.name for f in folders].count(folder.name) > 1
        else folder.name
    )


__all__ = ["metric_panels", "metric_series", "plot_run_curves", "read_metrics"]
