"""The smallest end-to-end run: build a ViT-Ti/16 encoder, run an image through it, save it and load it back."""

import argparse
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel

from densecl_vit import DenseCLViTConfig, DenseCLViTImageProcessor, DenseCLViTModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default="outputs/demo")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = DenseCLViTModel(DenseCLViTConfig.from_preset("vit-tiny")).eval()
    processor = DenseCLViTImageProcessor()
    yy, xx = np.mgrid[0:240, 0:320]
    image = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
    inputs = processor(image, return_tensors="pt")
    with torch.no_grad():
        tokens = model(**inputs).last_hidden_state
    out = Path(args.output_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    reloaded = AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        diff = (reloaded(**inputs).last_hidden_state - tokens).abs().max().item()
    print(f"encoder: {sum(p.numel() for p in model.parameters()):,} parameters, tokens {tuple(tokens.shape)}")
    print(f"saved to {out}; reloaded max abs difference {diff:.2e}")


if __name__ == "__main__":
    main()
