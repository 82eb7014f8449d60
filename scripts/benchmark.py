"""Benchmark DenseCL-ViT against baselines timed in the same run: the encoder vs timm's ViT, the pre-training
step vs the bare encoder, the augmentation vs torchvision, the streaming loader vs in-memory batches.

    python scripts/benchmark.py                                   # CPU, ViT-Ti and ViT-S, fp32
    python scripts/benchmark.py --device cuda                     # GPU, bf16 autocast, MFU
    python scripts/benchmark.py --quick --output-dir /tmp/bench   # a tiny model, under a minute

Writes OUTPUT_DIR/results.json and OUTPUT_DIR/results.md (default outputs/benchmark); `--help` lists options.
"""

import sys

from densecl_vit.training.experiments.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
