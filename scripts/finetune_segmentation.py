"""Fine-tune a DenseCL-ViT encoder for semantic segmentation (ADE20K protocol; linear or UPerNet head).

    accelerate launch scripts/finetune_segmentation.py \
        --config training/recipes/finetune_seg_ade20k_vit_base_upernet.yaml --model out/pretrain/final
    python scripts/finetune_segmentation.py --dataset data/ --model out/pretrain/final --id2label names.json \
        --max-steps 1000 --crop-size 256,256 --output-dir out/seg
    python scripts/finetune_segmentation.py --config FILE.yaml --resume-from latest    # continue after a stop

`--help` lists every option. Outputs in OUTPUT_DIR: config.yaml, metrics.jsonl, checkpoints/, final/ (the model
and its image processor), eval_results.json (mIoU & co. on --eval-split, read by the model card), results.json.
Exit status: 0 when done or stopped by SIGTERM/SIGINT (a checkpoint is saved), 2 for a bad option or setting,
1 when the data is mostly unusable or training diverged.
"""

import sys

from densecl_vit.training.engine.setup import cli_main
from densecl_vit.training.tasks.segmentation import FinetuneSegmentationConfig, main

if __name__ == "__main__":
    sys.exit(cli_main(main, FinetuneSegmentationConfig))
