"""The paper's claim in miniature: local-to-global vs global (SimCLR) vs both vs random initialisation, on the
synthetic indoor scenes, for segmentation and depth, frozen and fully fine-tuned, over several seeds.

    python scripts/study.py                                  # default size: about an hour on 2 CPU cores
    python scripts/study.py --size small --seeds 3 --output-dir outputs/study-small
    python scripts/study.py --size large                     # ViT-Ti/16 at 128 px: for a GPU
    python scripts/study.py --size tiny --seeds 1 --arms local-global random   # a smoke test in seconds

Writes OUTPUT_DIR/study.md (tables), study.json (every run and the mean ± std over seeds) and study.png (chart);
started again on the same folder, it skips the runs that already finished and resumes a run stopped by SIGTERM
or SIGINT from its checkpoint. See `densecl_vit.training.study`.
Exit status: 0 when done or stopped by a signal, 2 for a bad option or setting.
"""

from __future__ import annotations

import argparse
import sys

from densecl_vit.training.demo import exit_status
from densecl_vit.training.study import ARMS, PROTOCOLS, SIZES, TASKS, run_study


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size", default="default", choices=list(SIZES), help="data, model and budget preset"
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (0, 1, ..., N-1)")
    parser.add_argument("--output-dir", default="outputs/study", help="folder for the runs and the report")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, help="encoders to compare")
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_status(
        lambda: run_study(
            args.size, range(args.seeds), args.output_dir, args.arms, args.protocols, args.tasks
        )
    )


if __name__ == "__main__":
    sys.exit(main())
