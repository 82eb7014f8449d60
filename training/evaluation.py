"""What the fine-tuning runs and `scripts/evaluate_model.py` share to evaluate: the evaluation split as a loader,
the local `evaluate` metric modules, the `eval_results.json` report the model cards read, and the options of
evaluating a saved folder.

The task modules (`segmentation_eval`, `depth_eval`) add their protocol and metric.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from accelerate import Accelerator

from .config import option
from .data import StreamingSamples
from .loader import StreamLoader, build_dataloader
from .runlog import write_json
from .sources import open_stream

# --- the evaluation split -----------------------------------------------------------------------------


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


def dataset_entry(dataset: str, config: str | None, split: str, name: str | None = None) -> dict[str, Any]:
    """The "dataset" object of eval_results.json."""
    entry = {"name": name or Path(str(dataset).rstrip("/")).name or str(dataset), "id": str(dataset)}
    if config:
        entry["config"] = config
    entry["split"] = split
    return entry


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


# --- metrics and the report ---------------------------------------------------------------------------


def metric_module(name: str, accelerator: Accelerator | None = None) -> types.ModuleType:
    """The Python module `evaluate.load` built for the local metric `name` (main process first: one cache
    write). The final numbers go through its functions, so the reported path is the `evaluate` module."""
    from .metrics import load_metric  # imports `evaluate` (seconds): only runs that evaluate pay for it

    context = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    with context:
        metric = load_metric(name)
    return sys.modules[type(metric).__module__]


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


# --- evaluating a saved folder ------------------------------------------------------------------------


def check_scale_bounds(scale_bounds: tuple[int, int]) -> None:
    """Refuse (long, short) rescale bounds that are not long >= short >= 1 (segmentation's --scale-bounds)."""
    if min(scale_bounds) < 1 or scale_bounds[0] < scale_bounds[1]:
        raise ValueError(f"--scale-bounds must be (long, short) with long >= short >= 1, got {scale_bounds}")


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
    dataset_config: str | None = option(None, "dataset configuration name")
    split: str = option("validation", "split to evaluate")
    data_files: list[str] | None = option(None, "data files passed to datasets.load_dataset")
    dataset_name: str | None = option(
        None, "dataset name in eval_results.json; default: the last part of --dataset"
    )
    output_dir: str | None = option(None, "folder for eval_results.json; default: the model folder")
    image_column: str | None = option(None, "image column; default: the dataset's only other Image column")
    label_column: str | None = option(None, "segmentation: label-map column; default: annotation")
    depth_column: str | None = option(None, "depth: depth column; default: depth_map")
    max_samples: int | None = option(None, "evaluate the first N examples only")
    num_workers: int | None = option(None, "DataLoader workers per process; default: min(8, CPUs - 1)")
    max_bad_fraction: float = option(0.5, "stop when more than this fraction of the examples cannot be used")
    reduce_labels: bool = option(
        True, "segmentation: raw 0 is ignored and label k >= 1 becomes k - 1 (ADE20K)"
    )
    ignore_index: int | None = option(None, "segmentation: ignored label; default: the model's")
    scale_bounds: tuple[int, int] = option(
        (2048, 512), "segmentation: (long, short) bounds images are rescaled to fit"
    )
    window: int | None = option(None, "segmentation: sliding-window size; default: the model's image size")
    stride: int | None = option(
        None, "segmentation: sliding-window stride; default: 2/3 of the window (512 -> 341)"
    )
    depth_scale: float = option(1.0, "depth: metres per raw depth unit (1e-3 for 16-bit PNGs in millimetres)")
    eigen_crop: bool | None = option(
        None, "depth: evaluate inside the Eigen crop; default: on when --dataset names NYU"
    )
    eval_size: tuple[int, int] | None = option(
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
        check_scale_bounds(self.scale_bounds)

    def results_path(self) -> Path:
        return Path(self.output_dir or self.model) / "eval_results.json"
