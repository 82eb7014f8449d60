"""What the fine-tuning runs and `scripts/evaluate_model.py` share to evaluate: the evaluation split as a loader,
the local `evaluate` metric modules, the `eval_results.json` report the model cards read, and the options of
evaluating a saved folder.

The task modules (`segmentation_eval`, `depth_eval`) add their protocol and metric.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import types
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..data.decoding import SkipCounter
from ..data.loader import StreamLoader, build_dataloader
from ..data.sources import open_stream
from ..data.streaming import StreamingSamples
from ..engine.config import option
from ..engine.runlog import write_json
from ..engine.setup import stream_num_examples

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
    progress: bool = False

    def progress_bar(self, loader: StreamLoader, accelerator: Accelerator) -> Iterable:
        """`loader` behind a tqdm bar on the main process when `progress` is set (its total: this process's
        share of the split, when the dataset declares its size)."""
        if not (self.progress and accelerator.is_main_process):
            return loader
        total = stream_num_examples(self.stream, self.dataset["split"])
        if total is not None and self.max_samples is not None:
            total = min(total, self.max_samples)
        share = None if total is None else math.ceil(total / accelerator.num_processes)
        return tqdm(loader, total=share, desc="evaluate", unit="image", dynamic_ncols=True)

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
    cfg: Any,
    split: str,
    resolve_columns: Callable[[Any, Any], tuple[str, str]],
    max_samples: int | None,
    progress: bool = False,
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
        progress,
    )


def eval_counts(
    loader: StreamLoader, accelerator: Accelerator, dropped: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """The rows read, used and skipped by reason over all processes, under the names training's results.json
    uses. `dropped` counts rows the loader handed out that the metric could not use (reason -> count)."""
    skips = SkipCounter.merge(gather_object([loader.skips.to_dict()]))
    skips.counts.update({reason: count for reason, count in (dropped or {}).items() if count})
    return {
        "examples_seen": skips.seen,
        "num_samples": skips.seen - skips.skipped,
        "skipped_samples": skips.skipped,
        "skipped_by_reason": dict(sorted(skips.counts.items())),
    }


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
    examples_seen: int | None = None,
    skipped_samples: int = 0,
    skipped_by_reason: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Write the report the model cards read (`hub_cards.cards.load_eval_results` format); returns it.
    `num_samples` images were used of the `examples_seen` rows read (all of them by default)."""
    report: dict[str, Any] = {
        "task": task,
        "dataset": dict(dataset),
        "metrics": dict(metrics),
        "protocol": dict(protocol),
        "num_samples": int(num_samples),
        "examples_seen": int(num_samples + skipped_samples if examples_seen is None else examples_seen),
        "skipped_samples": int(skipped_samples),
        "skipped_by_reason": dict(skipped_by_reason or {}),
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


PROTOCOLS = {"segmentation": "ade20k", "depth": "nyu"}  # each task's standard protocol
TRAINING_CONFIG_NAMES = ("config.yaml", "training_config.yaml")  # a run folder's, a release folder's


def find_training_config(model: str | os.PathLike) -> Path | None:
    """The resolved config the fine-tuning run saved: in the model folder (a release) or in the run folder above
    its final/ (where `run_finetuning` writes it)."""
    folder = Path(model)
    if not folder.is_dir():
        return None  # a Hub id
    found = (candidate / name for candidate in (folder, folder.parent) for name in TRAINING_CONFIG_NAMES)
    return next((path for path in found if path.is_file()), None)


def read_training_config(path: Path) -> dict[str, Any]:
    """The options of a saved training config (YAML mapping of option names to values)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(
            f"cannot read the training config {path} ({error}); pass --protocol by name"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds no mapping of training options; pass --protocol by name")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def slug(text: str) -> str:
    """A folder name for a model or dataset: path separators and odd characters become "-"."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-.") or "model"


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
    protocol: Literal["training", "ade20k", "nyu"] | None = option(
        None,
        "evaluation settings: training (those of the config.yaml the fine-tuning run saved beside --model), "
        "ade20k (segmentation) or nyu (depth); default: training when that config exists, else the task's "
        "standard one; the options below override single settings",
    )
    output_dir: str | None = option(
        None, "folder for eval_results.json; default: outputs/evaluation/MODEL/DATASET-SPLIT"
    )
    write_model_card_results: bool = option(
        False, "also write eval_results.json into the --model folder, replacing the one the model card reads"
    )
    progress: bool = option(True, "show a progress bar over the images")
    image_column: str | None = option(
        None, "image column; default: image, or the dataset's only other Image column"
    )
    label_column: str | None = option(None, "segmentation: label-map column; default: annotation")
    depth_column: str | None = option(None, "depth: depth column; default: depth_map")
    max_samples: int | None = option(None, "evaluate the first N examples only")
    num_workers: int | None = option(None, "DataLoader workers per process; default: min(8, CPUs - 1)")
    max_bad_fraction: float = option(0.5, "stop when more than this fraction of the examples cannot be used")
    reduce_labels: bool | None = option(
        None,
        "segmentation: raw 0 is ignored and label k >= 1 becomes k - 1; default: the protocol's (ADE20K: on)",
    )
    ignore_index: int | None = option(
        None, "segmentation: ignored label; default: the protocol's, else the model's"
    )
    scale_bounds: tuple[int, int] | None = option(
        None,
        "segmentation: (long, short) bounds images are rescaled to fit; default: the protocol's (2048, 512)",
    )
    window: int | None = option(
        None, "segmentation: sliding-window size; default: the protocol's (ADE20K: the model's image size)"
    )
    stride: int | None = option(
        None,
        "segmentation: sliding-window stride; default: the protocol's, else 2/3 of the window (512 -> 341)",
    )
    depth_scale: float | None = option(
        None,
        "depth: metres per raw depth unit (1e-3 for 16-bit PNGs in millimetres); default: the protocol's (1)",
    )
    eigen_crop: bool | None = option(
        None,
        "depth: evaluate inside the Eigen crop; default: the protocol's (NYU: on when --dataset names NYU)",
    )
    eval_size: tuple[int, int] | None = option(
        None,
        "depth: resize images to (height, width); default: the protocol's, else the nearest multiple of "
        "the patch size",
    )

    def validate(self) -> None:
        if self.write_model_card_results and not Path(self.model).is_dir():
            raise ValueError(f"--write-model-card-results needs a local --model folder, got {self.model}")
        if self.protocol not in (None, "training", PROTOCOLS[self.task]):
            raise ValueError(
                f"--protocol {self.protocol} is not a {self.task} protocol; use training or {PROTOCOLS[self.task]}"
            )
        if self.protocol == "training" and find_training_config(self.model) is None:
            raise ValueError(
                f"--protocol training needs the config.yaml of the run beside --model {self.model}; "
                f"use --protocol {PROTOCOLS[self.task]}"
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
        if self.depth_scale is not None and self.depth_scale <= 0:
            raise ValueError(f"--depth-scale must be > 0, got {self.depth_scale}")
        if self.scale_bounds is not None:
            check_scale_bounds(self.scale_bounds)

    def protocol_name(self) -> str:
        """--protocol, else training when the run's config is beside the model, else the task's standard one."""
        if self.protocol is not None:
            return self.protocol
        return "training" if find_training_config(self.model) else PROTOCOLS[self.task]

    def protocol_settings(
        self, standard: Mapping[str, Any], from_training: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> dict[str, Any]:
        """The protocol's settings (`standard`, or `from_training` of the run's config), then every option of
        the same name that is set."""
        name = self.protocol_name()
        base = dict(standard)
        if name == "training":
            base = from_training(read_training_config(find_training_config(self.model)))
        return {**base, **{key: getattr(self, key) for key in base if getattr(self, key) is not None}}

    def results_paths(self) -> list[Path]:
        """Where eval_results.json goes: --output-dir (or its default), and the model folder when asked."""
        folder = Path(self.model)
        name = folder.name if folder.name != "final" else f"{folder.parent.name}-final"
        dataset = self.dataset_name or Path(str(self.dataset).rstrip("/")).name or self.dataset
        default = Path("outputs/evaluation") / slug(name) / slug(f"{dataset}-{self.split}")
        paths = [Path(self.output_dir or default) / "eval_results.json"]
        return paths + [folder / "eval_results.json"] if self.write_model_card_results else paths
