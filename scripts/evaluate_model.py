"""Evaluate a fine-tuned segmentation or depth model folder; writes eval_results.json (the model card's format).

    python scripts/evaluate_model.py --task segmentation --model outputs/demo/segmentation/final --dataset outputs/demo/data
    python scripts/evaluate_model.py --task segmentation --model out/seg/final --dataset scene_parse_150 --protocol ade20k
    accelerate launch scripts/evaluate_model.py --task depth --model out/depth/final --dataset sayakpaul/nyu_depth_v2

The protocol defaults to the one the model was fine-tuned with (the config.yaml its run saved beside final/), so
a model is evaluated as its training run evaluated it; `--protocol ade20k` or `--protocol nyu` names the paper's.
Segmentation: single-scale sliding window, mIoU, mean and overall accuracy, per-class IoU. Depth: whole image,
AbsRel, SqRel, RMSE, RMSE log, log10, delta1-3 inside the model's depth range. The report counts the rows read,
used and skipped (by reason). eval_results.json goes into --output-dir (default outputs/evaluation/...); the
model folder's own copy, which its model card reads, is replaced only with --write-model-card-results.
Exit status: 0 on success, 2 for a bad option, model or dataset, 1 when the data is mostly unusable.
"""

import sys
from typing import Any

from accelerate import Accelerator

from densecl_vit.hub_cards.cards import skip_reasons
from densecl_vit.training.engine.exits import user_errors
from densecl_vit.training.engine.setup import cli_main, setup_errors
from densecl_vit.training.evaluation.shared import EvaluateConfig, write_eval_results
from densecl_vit.training.tasks import depth, segmentation


def summary(cfg: EvaluateConfig, report: dict[str, Any]) -> str:
    """One line: the model, the data, the counts and the metrics."""
    shown = ", ".join(f"{name} {value:.4f}" for name, value in report["metrics"].items())
    counts = f"{report['num_samples']} of {report['examples_seen']} rows used"
    if report["skipped_samples"]:
        counts += f" ({report['skipped_samples']} skipped: {skip_reasons(report['skipped_by_reason'])})"
    protocol = report["protocol"].get("name")
    return f"{cfg.model} on {cfg.dataset} [{cfg.split}], {protocol} protocol, {counts}: {shown}"


def main(cfg: EvaluateConfig) -> dict[str, Any]:
    accelerator = Accelerator()
    task = segmentation if cfg.task == "segmentation" else depth
    with setup_errors(), user_errors():  # an empty or unreadable --model folder: exit status 2
        report = task.evaluate_folder(cfg, accelerator)
    report["protocol"] = {"name": cfg.protocol_name(), **report["protocol"]}
    if accelerator.is_main_process:
        paths = cfg.results_paths()
        for path in paths:
            write_eval_results(path, task.TASK, **report)
        print(f"{summary(cfg, report)}; wrote {', '.join(map(str, paths))}")
    return report


if __name__ == "__main__":
    sys.exit(cli_main(main, EvaluateConfig))
