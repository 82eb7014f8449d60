"""Build a Hub release folder from a DenseCL-ViT model folder and optionally push it in one commit.

    python scripts/export_to_hub.py --model outputs/seg-upernet-s/final --output-dir release/seg-s
    python scripts/export_to_hub.py --model outputs/pretrain-s --output-dir release/vit-s \\
        --push --repo-id my-org/densecl-vit-small --revision v1.0 --dry-run
    python scripts/export_to_hub.py --model outputs/seg-linear-s/final --output-dir release/seg-s-code --format remote-code

The folder is exactly what the repository will hold (weights, config, processor, the model card and the run's
published artefacts); see `densecl_vit.hub_cards.export`. `--format auto` (default) puts the stock transformers
model at the root wherever one is exact (encoder, UPerNet segmenter, DPT depth model), so the Hub widget runs it,
and remote code otherwise; `--format stock` or `--format remote-code` forces one.
A segmentation or depth release also holds the model's prediction on a photograph, drawn as scripts/predict.py
draws it, and its card shows it: by default on the photograph shipped with the package (NASA's public-domain
portrait of the astronaut Eileen Collins), with `--example-image PATH` on another, with `--no-example` none.
`--push` reads the token from the usual Hugging Face login (`hf auth login`) or `HF_TOKEN`; it never prints it.
Errors print one line `error: ...` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from transformers.utils import logging as transformers_logging

from densecl_vit.hub_cards.export import EXAMPLE_PHOTO, FORMATS, ReleaseOptions, build_release, push_folder
from densecl_vit.training.engine.exits import exit_status


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, type=Path, help="save_pretrained folder of the model to release"
    )
    parser.add_argument(
        "--output-dir", "--output", dest="output", required=True, type=Path, help="release folder to write"
    )
    parser.add_argument(
        "--format",
        default="auto",
        choices=FORMATS,
        help="what the repository root holds: stock transformers classes where exact (auto), or force one",
    )
    parser.add_argument(
        "--max-shard-size", default="2GB", help="largest weight file before sharding (e.g. 2GB)"
    )
    parser.add_argument("--license", default="apache-2.0", help="license id of the card metadata")
    parser.add_argument(
        "--base-model", help="Hub id the model was fine-tuned from (default: from the run config)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir folder")
    example = parser.add_mutually_exclusive_group()
    example.add_argument(
        "--example-image",
        type=Path,
        default=EXAMPLE_PHOTO,
        help="photograph the card's example prediction is made on (default: the bundled public-domain photo)",
    )
    example.add_argument(
        "--no-example", action="store_true", help="write no example prediction and show none in the card"
    )
    push = parser.add_argument_group("push")
    push.add_argument("--push", action="store_true", help="upload the folder to the Hub in one commit")
    push.add_argument("--repo-id", help="ORG/NAME of the repository (also used in the card's snippets)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", default="main", help="branch to commit to (created if missing)")
    push.add_argument("--dry-run", action="store_true", help="list the push operations without network")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, api: Any = None) -> int:
    """Entry point; `api` replaces `huggingface_hub.HfApi()` for the push (tests pass a stand-in)."""
    args = parse_args(argv)
    transformers_logging.disable_progress_bar()  # weight-loading bars of tiny files; errors stay one line
    return exit_status(lambda: run(args, api))


def run(args: argparse.Namespace, api: Any) -> None:
    """Build the folder, then push it when asked."""
    if args.push and not args.repo_id:
        raise ValueError("--push needs --repo-id ORG/NAME.")
    if args.dry_run and not args.push:
        raise ValueError("--dry-run only applies with --push.")
    options = ReleaseOptions(
        fmt=args.format,
        repo_id=args.repo_id,
        revision=args.revision,
        license=args.license,
        max_shard_size=args.max_shard_size,
        base_model=args.base_model,
        overwrite=args.overwrite,
        example_image=None if args.no_example else args.example_image,
    )
    files = build_release(args.model, args.output, options)
    print(f"wrote {len(files)} files to {args.output}")
    if args.push:
        push_folder(
            args.output,
            args.repo_id,
            revision=args.revision,
            private=args.private,
            dry_run=args.dry_run,
            api=api,
        )


if __name__ == "__main__":
    sys.exit(main())
