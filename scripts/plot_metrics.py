"""Plot the training curves of one or several runs from their metrics.jsonl logs.

    python scripts/plot_metrics.py outputs/pretrain-vit-s                 # -> outputs/pretrain-vit-s/curves.png
    python scripts/plot_metrics.py runs/a runs/b --output compare.png     # several runs on one figure

Every numeric key is drawn against the step, grouped into panels: losses, learning rate, throughput,
evaluation metrics (eval_*), and one panel for each other key. A missing or unreadable log ends in one
`error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from densecl_vit.training.engine.curves import plot_run_curves
from densecl_vit.training.engine.exits import exit_status


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding metrics.jsonl (or the files)")
    parser.add_argument("--output", type=Path, help="figure file (default: RUN_DIR/curves.png for one run)")
    args = parser.parse_args(argv)
    if args.output is None:
        if len(args.runs) > 1:
            parser.error("several runs share one figure: pass --output FILE.png")
        run = args.runs[0]
        args.output = (run.parent if run.is_file() else run) / "curves.png"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_status(lambda: print(f"wrote {plot_run_curves(args.runs, args.output)}"))


if __name__ == "__main__":
    sys.exit(main())
