"""Local-to-global contrastive pre-training of a DenseCL-ViT encoder on a streamed image dataset.

    accelerate launch scripts/pretrain.py --config training/recipes/pretrain_vit_small.yaml --dataset DATA
    accelerate launch --num_processes 2 --mixed_precision bf16 scripts/pretrain.py --config FILE.yaml
    python scripts/pretrain.py --dataset images/ --model vit-tiny --max-steps 1000 --output-dir out/pt
    python scripts/pretrain.py --config FILE.yaml --resume-from latest      # continue after a stop

`--help` lists every option. The encoder lands in OUTPUT_DIR/final (load it with AutoModel or pass it to the
fine-tuning scripts). Exit status: 0 when done or stopped by SIGTERM/SIGINT (a checkpoint is saved), 2 for a
bad option or setting, 1 when the data is mostly unusable or training diverged.
"""

import sys

from densecl_vit.training.engine.setup import cli_main
from densecl_vit.training.tasks.pretraining import PretrainConfig, main

if __name__ == "__main__":
    sys.exit(cli_main(main, PretrainConfig))
