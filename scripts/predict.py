"""Run a segmentation or depth model on images and save pictures of its predictions.

    python scripts/predict.py --model out/seg-ade20k photo.jpg more_photos/ --output-dir predictions

For each image NAME this writes, at the image's own size:
- segmentation: NAME_overlay.png (the image blended with one colour per class, legend of the classes present)
  and NAME_labels.png (the class ids; uint8, or uint16 for more than 256 classes);
- depth: NAME_depth.png (the image beside its colour-mapped depth, near = bright, colour bar in metres) and NAME_depth.npy
  (float32 metres).
The model is a local folder or a Hub id, remote code included. Images that cannot be read are skipped with a
message naming them; the exit status is 1 only when no image could be processed, 2 (one `error:` line) for a
model folder it cannot use.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
from tqdm.auto import tqdm

from densecl_vit.training.engine.exits import exit_status
from densecl_vit.training.evaluation.visualize import PICTURE_SUFFIXES, render_prediction, save_png
from densecl_vit.training.interop.inference import load_image, load_pretrained, model_task, predict_images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="segmentation or depth model folder, or Hub id")
    parser.add_argument("inputs", nargs="+", type=Path, help="images, or folders of images")
    parser.add_argument(
        "--output-dir", required=True, type=Path, help="folder for the pictures and predictions"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ...")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def find_images(inputs: list[Path]) -> list[Path]:
    """Files as given, plus the image files (by extension, sorted) directly inside each folder."""
    extensions = {ext for ext, _ in PIL.Image.registered_extensions().items()}
    paths = []
    for path in inputs:
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in extensions)
        else:
            paths.append(path)
    return paths


def output_names(paths: list[Path]) -> list[str]:
    """File stems; a stem seen before gets a -2, -3, ... suffix so that no output overwrites another."""
    seen: Counter = Counter()
    names = []
    for path in paths:
        seen[path.stem] += 1
        names.append(path.stem if seen[path.stem] == 1 else f"{path.stem}-{seen[path.stem]}")
    return names


def save_prediction(output_dir: Path, name: str, image, prediction: np.ndarray, task: str, id2label) -> None:
    """The picture and the raw prediction of one image."""
    save_png(
        render_prediction(image, prediction, task, id2label), output_dir / f"{name}{PICTURE_SUFFIXES[task]}"
    )
    if task == "segmentation":
        dtype = np.uint8 if prediction.max(initial=0) < 256 and len(id2label or {}) <= 256 else np.uint16
        save_png(prediction.astype(dtype), output_dir / f"{name}_labels.png")
    else:
        np.save(output_dir / f"{name}_depth.npy", prediction.astype(np.float32))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_status(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    model, processor = load_pretrained(args.model, args.device)
    task = model_task(model)
    paths = find_images(args.inputs)
    names = output_names(paths)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    with tqdm(total=len(paths), desc="predict", unit="image", dynamic_ncols=True) as bar:
        for start in range(0, len(paths), args.batch_size):
            batch = []
            for path, name in zip(
                paths[start : start + args.batch_size], names[start : start + args.batch_size]
            ):
                try:
                    batch.append((name, load_image(path)))
                except Exception as error:  # any decoder failure: report the file and go on
                    tqdm.write(f"skipping {path}: {type(error).__name__}: {error}", file=sys.stderr)
                    bar.update(1)
            predictions = predict_images(model, processor, [image for _, image in batch]) if batch else []
            for (name, image), prediction in zip(batch, predictions):
                save_prediction(args.output_dir, name, image, prediction, task, model.config.id2label)
                written += 1
                bar.update(1)
    print(f"wrote {written} {task} prediction(s) to {args.output_dir}; skipped {len(paths) - written}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
