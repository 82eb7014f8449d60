"""Fine-tune a DenseCL-ViT encoder for monocular depth estimation (NYU-Depth V2 protocol; linear or UPerNet head).

    accelerate launch scripts/finetune_depth.py \
        --config training/recipes/finetune_depth_nyu_vit_base_linear.yaml --model out/pretrain/final
    python scripts/finetune_depth.py --dataset data/ --model out/pretrain/final --max-steps 1000 \
        --crop-size 224,288 --output-dir out/depth
    python scripts/finetune_depth.py --config FILE.yaml --resume-from latest    # continue after a stop

`--help` lists every option. Outputs in OUTPUT_DIR: config.yaml, metrics.jsonl, checkpoints/, final/ (the model
and its image processor), eval_results.json (AbsRel, RMSE, delta1 & co. on --eval-split), results.json.
Exit status: 0 when done or stopped by SIGTERM/SIGINT (a checkpoint is saved), 2 for a bad option or setting,
1 when the data is mostly unusable or training diverged.
"""

import sys

from densecl_vit.training.engine.setup import cli_main
from densecl_vit.training.tasks.depth import FinetuneDepthConfig, main

if __name__ == "__main__":
    sys.exit(cli_main(main, FinetuneDepthConfig))
