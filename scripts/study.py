"""Which pre-training helps dense tasks? Random init, a supervised upper bound, global, the paper's local-to-global
loss, the dense local-to-local term and their compositions, compared on the synthetic scenes with frozen probes
(linear segmentation, 4-class segmentation, k-NN retrieval, linear log-depth) over several seeds, with a longer
budget and full fine-tuning as secondary checks.

    python scripts/study.py                                  # default size: 2 worker processes on 2 CPU cores
    python scripts/study.py --size tiny --seeds 1 --arms random local-local   # a smoke test in seconds
    python scripts/study.py --size large                     # ViT-Ti/16 at 128 px: for a GPU

Writes OUTPUT_DIR/study.md (validity line, tables, paired differences), study.json (every record) and study.png;
started again on the same folder, it skips finished runs and resumes a run stopped by SIGTERM or SIGINT from its
checkpoint. See `densecl_vit.training.experiments.study`.
Exit status: 0 when done or stopped by a signal, 2 for a bad option or setting.
"""

from __future__ import annotations

import argparse
import sys

from densecl_vit.training.engine.exits import exit_status
from densecl_vit.training.experiments.study import ARMS, SIZES, run_study


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size", default="default", choices=list(SIZES), help="data, model and budget preset"
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (0, 1, ..., N-1)")
    parser.add_argument("--output-dir", default="outputs/study", help="folder for the runs and the report")
    parser.add_argument(
        "--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="encoders to compare"
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, each in its own process")
    parser.add_argument(
        "--no-secondary", dest="secondary", action="store_false", help="skip the full fine-tuning protocol"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_status(
        lambda: run_study(args.size, range(args.seeds), args.output_dir, args.arms, args.jobs, args.secondary)
    )


if __name__ == "__main__":
    sys.exit(main())
