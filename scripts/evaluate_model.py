"""Evaluate a fine-tuned segmentation or depth model folder; writes eval_results.json (what the model card reads).

    python scripts/evaluate_model.py --task segmentation --model out/seg/final --dataset scene_parse_150 --split validation
    accelerate launch scripts/evaluate_model.py --task depth --model out/depth/final --dataset sayakpaul/nyu_depth_v2
    python scripts/evaluate_model.py --task depth --model out/depth/final --dataset data/ --output-dir reports/

Segmentation: single-scale sliding window (window = the model's image size, stride 2/3 of it), mIoU, mean and
overall accuracy, per-class IoU. Depth: whole image, AbsRel, SqRel, RMSE, RMSE log, log10, delta1-3 inside the
model's depth range (Eigen crop on for NYU). eval_results.json goes next to the model, or into --output-dir.
Exit status: 0 on success, 2 for a bad option, model or dataset, 1 when the data is mostly unusable.
"""

import sys
from typing import Any

from accelerate import Accelerator

from densecl_vit.training import depth, segmentation
from densecl_vit.training.engine import cli_main, setup_errors
from densecl_vit.training.evaluation import EvaluateConfig, write_eval_results


def main(cfg: EvaluateConfig) -> dict[str, Any]:
    accelerator = Accelerator()
    task = segmentation if cfg.task == "segmentation" else depth
    with setup_errors():
        report = task.evaluate_folder(cfg, accelerator)
    if accelerator.is_main_process:
        path = cfg.results_path()
        write_eval_results(path, task.TASK, **report)
        shown = ", ".join(f"{name} {value:.4f}" for name, value in report["metrics"].items())
        print(
            f"{cfg.model} on {cfg.dataset} [{cfg.split}], {report['num_samples']} images: {shown}; wrote {path}"
        )
    return report


if __name__ == "__main__":
    sys.exit(cli_main(main, EvaluateConfig))
