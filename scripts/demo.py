"""The end-to-end demo on a CPU: synthetic indoor scenes -> local-to-global pre-training of a ViT-Ti/16 -> linear
segmentation and depth heads -> evaluation -> Hub-ready folders with model cards -> a results table.

    make demo                                   # or: python scripts/demo.py
    python scripts/demo.py --output-dir outputs/demo --pretrain-steps 300
    python scripts/demo.py --quick              # every stage at toy size, in seconds (what the tests run)

About 4 minutes on two CPU cores at the default settings (2 minutes of CPU time; README.md has the measurements);
see `densecl_vit.training.experiments.demo` for the stages and the output layout. Exit status: 0 on success or when stopped by
SIGTERM/SIGINT, 2 for a bad option or setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from densecl_vit.hub_cards.export import ReleaseOptions, build_release
from densecl_vit.training.engine.exits import exit_status
from densecl_vit.training.experiments.demo import DEFAULT, QUICK, check_finite, run_demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="outputs/demo", help="folder for every output of the demo")
    parser.add_argument("--quick", action="store_true", help="toy sizes: a tiny model, 2 steps per stage")
    parser.add_argument(
        "--loss", help="pre-training loss, e.g. local-global (the default) or local-global+local-local"
    )
    for name in ("pretrain_steps", "finetune_steps", "num_train", "num_val", "image_size", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, help=f"override the {name} setting")
    return parser.parse_args(argv)


def export_release(model_dir: Path, output: Path) -> Path:
    """A Hub-ready folder (weights, config, remote code, model card, eval results) built from `model_dir`."""
    build_release(model_dir, output, ReleaseOptions(overwrite=True))
    return output


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("output_dir", "quick") and v is not None}
    settings = dataclasses.replace(QUICK if args.quick else DEFAULT, **overrides)
    return exit_status(lambda: check_finite(run_demo(settings, args.output_dir, export=export_release)))


if __name__ == "__main__":
    sys.exit(main())
