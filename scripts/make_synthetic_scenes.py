"""Render the synthetic indoor-scene dataset (RGB, semantic labels, metric depth) into a parquet folder.

    python scripts/make_synthetic_scenes.py --output-dir data/synthetic-scenes --num-train 2000 --num-val 200

The folder loads with `datasets.load_dataset(folder)` or
`densecl_vit.training.data.synthetic.dataset.load_synthetic_dataset(folder, split)`. A folder that already holds
a complete dataset with the same settings is left as it is unless --force is given.
"""

from __future__ import annotations

import argparse
import sys
import time

from densecl_vit.training.data.synthetic.dataset import dataset_is_complete, write_dataset
from densecl_vit.training.engine.exits import exit_status


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir", "--output", dest="output", required=True, help="dataset folder to write"
    )
    parser.add_argument("--num-train", type=int, required=True, help="number of training images")
    parser.add_argument("--num-val", type=int, default=0, help="number of validation images")
    parser.add_argument("--image-size", type=int, default=128, help="side of the square images, in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scene stream")
    parser.add_argument("--num-workers", type=int, default=None, help="render processes (default: all cores)")
    parser.add_argument("--shard-size", type=int, default=1000, help="rows per parquet file")
    parser.add_argument("--force", action="store_true", help="render again even if the folder is complete")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_status(lambda: render(args))


def render(args: argparse.Namespace) -> None:
    """Write the dataset unless the folder already holds it."""
    settings = dict(
        num_train=args.num_train, num_val=args.num_val, image_size=args.image_size, seed=args.seed
    )
    if not args.force and dataset_is_complete(args.output, shard_size=args.shard_size, **settings):
        print(f"{args.output} already holds this dataset; pass --force to render it again")
        return
    start = time.perf_counter()
    write_dataset(
        args.output, num_workers=args.num_workers, shard_size=args.shard_size, progress=True, **settings
    )
    seconds = time.perf_counter() - start
    total = args.num_train + args.num_val
    print(f"wrote {total} images to {args.output} in {seconds:.1f} s ({total / seconds:.1f} images/s)")


if __name__ == "__main__":
    sys.exit(main())
