"""Model cards of DenseCL-ViT releases, rendered with `huggingface_hub.ModelCard` from `templates/model_card.md`.

Metrics enter a card from one place only: the `eval_results.json` an evaluation script writes. A card is
rendered with `render_model_card(inputs, eval_results=PATH)`; without a report it has no evaluation section and no
`model-index`, and any other way of passing numbers (keyword arguments, dicts, report objects) is refused.

`eval_results.json` format (validated by `load_eval_results`)::

    {
      "task": "semantic-segmentation",            # or "depth-estimation"
      "dataset": {"name": "ADE20K", "id": "scene_parse_150", "split": "validation",
                  "config": "scene_parsing"},     # "config" is optional
      "metrics": {"mean_iou": 0.4531, "mean_accuracy": 0.561, "overall_accuracy": 0.812},
      "protocol": {"mode": "slide", "crop_size": 512, "stride": 341},
      "num_samples": 2000,
      "examples_seen": 2000, "skipped_samples": 0, "skipped_by_reason": {},   # optional
      "per_category": {"iou": [0.71, null, ...]}  # optional, published in the file, not in the card
    }

`metrics` holds finite numbers under the names of `METRICS[task]` (the keys the project's `evaluate` modules
return): segmentation metrics are fractions in [0, 1] (shown in percent), depth errors are >= 0 (RMSE in metres)
and the delta accuracies are fractions. `mean_iou` (segmentation) and `abs_rel`, `rmse`, `delta1` (depth) are
required. `protocol` is a free-form mapping of the evaluation settings; `num_samples` counts evaluated images;
`examples_seen` the rows read and `skipped_by_reason` the unusable ones (the card names them when there are any).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from densecl_vit.modeling.configuration_densecl_vit import preset_name

from .snippets import (
    MODEL_TASKS,
    PAPER_URL,
    StockFormats,
    describe,
    head_of,
    limitations,
    model_size,
    stock_section,
    usage_snippet,
)

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"
BIBTEX = """@article{rabarisoa2022densecl_vit,
  title={Self-Supervised Pre-training of Vision Transformers for Dense Prediction Tasks},
  author={Rabarisoa, Jaonary and Belissen, Valentin and Chabot, Florian and Pham, Quoc-Cuong},
  journal={arXiv preprint arXiv:2205.15173},
  year={2022}
}"""
# metric name -> (label, kind, higher is better); kind "fraction" lies in [0, 1], "error" is >= 0.
METRICS = {
    "semantic-segmentation": {
        "mean_iou": ("mIoU", "fraction", True),
        "mean_accuracy": ("mAcc", "fraction", True),
        "overall_accuracy": ("aAcc", "fraction", True),
    },
    "depth-estimation": {
        "abs_rel": ("AbsRel", "error", False),
        "sq_rel": ("SqRel", "error", False),
        "rmse": ("RMSE (m)", "error", False),
        "rmse_log": ("RMSE log", "error", False),
        "log10": ("log10", "error", False),
        "delta1": ("δ < 1.25", "fraction", True),
        "delta2": ("δ < 1.25²", "fraction", True),
        "delta3": ("δ < 1.25³", "fraction", True),
    },
}
# Tasks whose fractions the card shows in percent (as segmentation papers report them).
PERCENT_TASKS = {"semantic-segmentation"}
REQUIRED_METRICS = {"semantic-segmentation": ("mean_iou",), "depth-estimation": ("abs_rel", "rmse", "delta1")}
EVAL_TASK_TYPES = {"semantic-segmentation": "image-segmentation", "depth-estimation": "depth-estimation"}
# The paper's reported numbers, keyed by (task, size preset, head, dataset key) in the units of eval_results.json.
# An entry is added only after checking it against Tables 1 and 2 of arXiv:2205.15173; a setting without an entry
# shows no paper column.
PAPER_RESULTS: dict[tuple[str, str, str, str], dict[str, float]] = {}
# Keys of a training config that name the checkpoint a run started from (so does the scripts' top-level `model`,
# unless it names a preset or a config.json: a random start), and the data it trained on.
BASE_MODEL_KEYS = (
    "pretrained_model",
    "pretrained",
    "model_name_or_path",
    "init_from",
    "encoder",
    "base_model",
)
DATASET_KEYS = ("dataset", "train_dataset", "dataset_id")  # `dataset_name` is a display name, not an id
CREDENTIAL_KEY = re.compile(r"token|secret|password|passwd|api_?key|credential", re.IGNORECASE)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_EVAL_KEYS = {
    "task",
    "dataset",
    "metrics",
    "protocol",
    "num_samples",
    "examples_seen",
    "skipped_samples",
    "skipped_by_reason",
    "per_category",
}


@dataclass(frozen=True)
class EvalReport:
    """A validated `eval_results.json`."""

    task: str
    dataset_name: str
    dataset_id: str
    dataset_split: str
    dataset_config: str | None
    metrics: dict[str, float]
    protocol: dict[str, Any]
    num_samples: int
    skipped_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def skipped_samples(self) -> int:
        return sum(self.skipped_by_reason.values())

    @property
    def hub_dataset_id(self) -> str | None:
        """`dataset_id` when it names a Hub dataset; None for a local folder (the Hub would read it as an id)."""
        return self.dataset_id if _looks_like_hub_id(self.dataset_id) else None


def _require(condition: bool, path: Path, message: str) -> None:
    if not condition:
        raise ValueError(f"{path}: {message}")


def load_eval_results(path: str | os.PathLike) -> EvalReport:
    """Read and validate an `eval_results.json` (format in this module's docstring); one-line ValueError if bad."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON file ({error}).") from None
    _require(isinstance(data, dict), path, "must hold a JSON object.")
    unknown = sorted(set(data) - _EVAL_KEYS)
    _require(not unknown, path, f"unknown keys {unknown}; allowed: {sorted(_EVAL_KEYS)}.")
    task = data.get("task")
    _require(task in METRICS, path, f"task must be one of {sorted(METRICS)}, got {task!r}.")
    dataset = data.get("dataset")
    _require(isinstance(dataset, dict), path, 'dataset must be {"name": ..., "id": ..., "split": ...}.')
    for key in ("name", "id", "split"):
        _require(isinstance(dataset.get(key), str) and dataset[key], path, f"dataset.{key} must be a string.")
    metrics = data.get("metrics")
    _require(isinstance(metrics, dict) and metrics, path, "metrics must be a non-empty object.")
    unknown = sorted(set(metrics) - set(METRICS[task]))
    _require(not unknown, path, f"unknown {task} metrics {unknown}; known: {sorted(METRICS[task])}.")
    missing = [name for name in REQUIRED_METRICS[task] if name not in metrics]
    _require(not missing, path, f"missing required metrics {missing}.")
    for name, value in metrics.items():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        _require(ok, path, f"metric {name} must be a finite number, got {value!r}.")
        kind = METRICS[task][name][1]
        valid = 0 <= value <= 1 if kind == "fraction" else value >= 0
        _require(valid, path, f"metric {name}={value} is outside its range ({kind}).")
    _require(
        isinstance(data.get("protocol"), dict), path, "protocol must be an object of evaluation settings."
    )
    num_samples = data.get("num_samples")
    _require(
        isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples > 0,
        path,
        f"num_samples must be a positive integer, got {num_samples!r}.",
    )
    skipped = data.get("skipped_by_reason", {})
    _require(
        isinstance(skipped, dict) and all(_is_count(n) for n in skipped.values()),
        path,
        f"skipped_by_reason must map reasons to counts >= 0, got {skipped!r}.",
    )
    total = sum(skipped.values())
    counts = (data.get("examples_seen", num_samples + total), data.get("skipped_samples", total))
    _require(
        counts == (num_samples + total, total),
        path,
        f"examples_seen and skipped_samples {counts} must be num_samples + {total} and {total} (skipped_by_reason).",
    )
    return EvalReport(
        task=task,
        dataset_name=dataset["name"],
        dataset_id=dataset["id"],
        dataset_split=dataset["split"],
        dataset_config=dataset.get("config"),
        metrics={name: float(value) for name, value in metrics.items()},
        protocol=data["protocol"],
        num_samples=num_samples,
        skipped_by_reason={str(reason): int(n) for reason, n in skipped.items()},
    )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def flatten(config: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mapping -> [(dotted.key, leaf value)] in file order."""
    rows = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(flatten(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def load_training_config(path: str | os.PathLike) -> dict[str, Any]:
    """A resolved training config (YAML mapping); refused if it holds a credential, which must never be published."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: not a readable YAML file ({error}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a training config must be a YAML mapping of options.")
    secrets = [key for key, value in flatten(config) if CREDENTIAL_KEY.search(key.split(".")[-1]) and value]
    if secrets:
        raise ValueError(f"{path} holds credentials under {secrets}; remove them before publishing the run.")
    return config


def _looks_like_hub_id(value: Any) -> bool:
    return isinstance(value, str) and bool(HUB_ID.match(value)) and not Path(value).exists()


def names_a_checkpoint(model: str) -> bool:
    """Whether a `model` option names a checkpoint (a Hub id or a folder), not a preset or a config.json file."""
    return preset_name(model) is None and not model.lower().endswith(".json")


def training_sources(config: dict[str, Any]) -> tuple[str | None, str | None, list[str]]:
    """(base model Hub id, base model local folder name, dataset Hub ids) named by a training config."""
    hub_id = local = None
    datasets = []
    for key, value in flatten(config):
        if not isinstance(value, str) or not value:
            continue
        leaf = key.split(".")[-1]
        if leaf in BASE_MODEL_KEYS or (key == "model" and names_a_checkpoint(value)):
            if _looks_like_hub_id(value):
                hub_id = hub_id or value
            else:
                local = local or Path(value).name
        if leaf in DATASET_KEYS and _looks_like_hub_id(value) and value not in datasets:
            datasets.append(value)
    return hub_id, local, datasets


@dataclass(frozen=True)
class CardInputs:
    """Everything a card says except metrics (those come only from eval_results.json)."""

    model_class: str
    config: dict[str, Any]
    repo_id: str
    revision: str = "main"
    license: str = "apache-2.0"
    fmt: str = "remote-code"
    stock: StockFormats = field(default_factory=StockFormats)
    training_config: dict[str, Any] | None = None
    training_config_file: str | None = None
    base_model: str | None = None
    base_model_local: str | None = None
    datasets: tuple[str, ...] = ()
    example_image: str | None = None  # a picture in the repository, by relative path
    example_caption: str | None = None  # what the picture shows, printed under it
    num_parameters: int | None = None


def _cell(value: Any) -> str:
    if value is None:
        text = "none"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_cell(v) for v in value) if value else "[]"
    elif isinstance(value, dict):
        text = "{}"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def recipe_table(config: dict[str, Any]) -> str:
    """A Markdown table of every (dotted) key and value of a training config."""
    rows = ["| Setting | Value |", "| --- | --- |"]
    rows += [f"| `{key}` | {_cell(value)} |" for key, value in flatten(config)]
    return "\n".join(rows)


def _dataset_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def paper_numbers(inputs: CardInputs, report: EvalReport) -> dict[str, float]:
    """The paper's numbers for the same task, model size, head and dataset, or {} when none are recorded."""
    head = head_of(inputs.model_class, inputs.config)
    key = (report.task, model_size(inputs.config), head, _dataset_key(report.dataset_name))
    return PAPER_RESULTS.get(key, {})


def _fmt(value: float, percent: bool) -> str:
    return f"{100 * value:.2f}" if percent else f"{value:.4f}"


def skip_reasons(skipped_by_reason: dict[str, int]) -> str:
    """ "label_size_mismatch: 9, unreadable: 1": the reasons of an evaluation's skipped rows, in name order."""
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped_by_reason.items()))


def _skipped_note(report: EvalReport) -> str:
    """ ", of 59 rows read; 9 skipped (label_size_mismatch: 9)", or "" when every row was used."""
    if not report.skipped_samples:
        return ""
    seen = report.num_samples + report.skipped_samples
    return (
        f" of {seen} rows read; {report.skipped_samples} skipped ({skip_reasons(report.skipped_by_reason)})"
    )


def eval_sections(inputs: CardInputs, report: EvalReport) -> dict[str, str]:
    """Template variables of the evaluation section: intro, table and protocol."""
    paper = paper_numbers(inputs, report)
    percent = report.task in PERCENT_TASKS
    header = "| Metric | This model |" + (" Paper |" if paper else "")
    rows = [header, "| --- | --- |" + (" --- |" if paper else "")]
    for name, value in report.metrics.items():
        label, _, higher = METRICS[report.task][name]
        label += (" (%)" if percent else "") + (" ↑" if higher else " ↓")
        row = f"| {label} | {_fmt(value, percent)} |"
        if paper:
            row += f" {_fmt(paper[name], percent) if name in paper else '–'} |"
        rows.append(row)
    intro = (
        f"Evaluated on {report.dataset_name} (`{report.dataset_id}`, split `{report.dataset_split}`, "
        f"{report.num_samples} images{_skipped_note(report)}); the numbers are those of `eval_results.json` in "
        "this repository."
    )
    if paper:
        intro += f" The paper column is the result reported in [the paper]({PAPER_URL}) for the same setting."
    protocol = ", ".join(f"`{key}`: {_cell(value)}" for key, value in flatten(report.protocol))
    return {
        "eval_intro": intro,
        "eval_table": "\n".join(rows),
        "eval_protocol": f"Protocol: {protocol or 'none recorded'}.",
    }


def eval_results_metadata(report: EvalReport) -> list[EvalResult]:
    """The model-index entries of a report: one EvalResult per metric."""
    return [
        EvalResult(
            task_type=EVAL_TASK_TYPES[report.task],
            task_name=report.task.replace("-", " ").capitalize(),
            # The Hub reads `type` as a dataset id: a local folder is named by its display name instead.
            dataset_type=report.hub_dataset_id or report.dataset_name,
            dataset_name=report.dataset_name,
            dataset_config=report.dataset_config,
            dataset_split=report.dataset_split,
            metric_type=name,
            metric_name=METRICS[report.task][name][0],
            metric_value=value,
        )
        for name, value in report.metrics.items()
    ]


def card_text(inputs: CardInputs, report: EvalReport | None) -> dict[str, Any]:
    """Template variables describing the model: title, summary, usage, stock loading, limitations, example."""
    base = inputs.base_model and f"[{inputs.base_model}](https://huggingface.co/{inputs.base_model})"
    base = base or (inputs.base_model_local and f"the pre-training run `{inputs.base_model_local}`")
    remote = inputs.fmt == "remote-code"
    dataset = report.dataset_name if report else None
    variables = describe(inputs.model_class, inputs.config, dataset, base, inputs.num_parameters)
    variables.update(
        usage=usage_snippet(inputs.model_class, inputs.repo_id, inputs.revision, remote),
        stock_section=stock_section(
            inputs.model_class, inputs.repo_id, inputs.revision, inputs.fmt, inputs.stock
        ),
        limitations=limitations(inputs.model_class, inputs.config, inputs.fmt),
        example_image=inputs.example_image,
        example_caption=inputs.example_caption,
    )
    return variables


def _check_report_matches(inputs: CardInputs, report: EvalReport) -> None:
    expected = MODEL_TASKS[inputs.model_class].eval_task
    if report.task != expected:
        kind = expected or "an encoder (no evaluation report applies)"
        raise ValueError(
            f"eval_results.json reports {report.task}, but the model is {kind}; publish it with its model."
        )


def _resolve_report(eval_results: Any, unexpected: dict[str, Any]) -> EvalReport | None:
    if unexpected:
        raise ValueError(
            f"metrics come only from an eval_results.json file (eval_results=PATH); got {sorted(unexpected)}."
        )
    if eval_results is None:
        return None
    if not isinstance(eval_results, (str, os.PathLike)) or Path(eval_results).name != "eval_results.json":
        raise ValueError(
            f"eval_results must be the path of an eval_results.json file, got {type(eval_results).__name__} "
            f"{str(eval_results)[:60]!r}; numbers typed in any other way are refused."
        )
    return load_eval_results(eval_results)


def render_model_card(
    inputs: CardInputs, eval_results: str | os.PathLike | None = None, **unexpected: Any
) -> ModelCard:
    """The release's model card; its metrics section and model-index come only from `eval_results` (a path)."""
    if inputs.model_class not in MODEL_TASKS:
        raise ValueError(f"no card for {inputs.model_class}; release one of {sorted(MODEL_TASKS)}.")
    report = _resolve_report(eval_results, unexpected)
    if report is not None:
        _check_report_matches(inputs, report)
    task = MODEL_TASKS[inputs.model_class]
    tags = ["densecl-vit", "vision-transformer", "self-supervised", "dense-prediction"]
    if inputs.fmt == "remote-code":
        tags.insert(0, "custom_code")
    evaluated_on = [report.hub_dataset_id] if report and report.hub_dataset_id else []
    datasets = list(dict.fromkeys([*inputs.datasets, *evaluated_on]))
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=task.pipeline_tag,
        license=inputs.license,
        tags=tags,
        datasets=datasets or None,
        base_model=inputs.base_model,
        model_name=inputs.repo_id.split("/")[-1],
        eval_results=eval_results_metadata(report) if report else None,
        # The widget runs only stock architectures from the repository root, never custom code.
        widget=[{"src": task.widget, "example_title": "Sample photo"}] if inputs.fmt == "stock" else None,
    )
    variables = card_text(inputs, report)
    if inputs.training_config:
        variables.update(
            recipe_table=recipe_table(inputs.training_config), recipe_file=inputs.training_config_file
        )
    if report is not None:
        variables.update(eval_sections(inputs, report))
    return ModelCard.from_template(card_data, template_path=str(TEMPLATE_PATH), bibtex=BIBTEX, **variables)


__all__ = [
    "BIBTEX",
    "METRICS",
    "MODEL_TASKS",
    "PAPER_RESULTS",
    "CardInputs",
    "EvalReport",
    "StockFormats",
    "load_eval_results",
    "load_training_config",
    "model_size",
    "recipe_table",
    "render_model_card",
    "training_sources",
]
