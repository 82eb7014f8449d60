"""Convert ViT checkpoints to and from DenseCL-ViT model folders.

Import (the supervised and DINO baselines of the paper start from these):

    python scripts/convert_checkpoint.py --from timm --checkpoint vit_small.safetensors --output out/vit-s
    python scripts/convert_checkpoint.py --from hf-vit --checkpoint path/to/vit-folder --output out/vit-b
    python scripts/convert_checkpoint.py --from dino --checkpoint dino_deitsmall16_pretrain.pth --output out/dino-s

Export:

    python scripts/convert_checkpoint.py --to timm --checkpoint out/vit-s --output vit_s.safetensors
    python scripts/convert_checkpoint.py --to hf-vit --checkpoint out/vit-s --output out/vit-s-hf

Errors print one line `error: ...` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from safetensors.torch import save_file
from transformers import ViTConfig, ViTModel

import densecl_vit  # noqa: F401  (registers the Auto classes before anything is saved)
from densecl_vit.modeling.configuration_densecl_vit import DenseCLViTConfig
from densecl_vit.modeling.image_processing_densecl_vit import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    DenseCLViTImageProcessor,
)
from densecl_vit.modeling.modeling_densecl_vit import DenseCLViTModel
from densecl_vit.training.engine.exits import exit_status
from densecl_vit.training.interop.conversion import (
    densecl_to_hf_vit,
    densecl_to_timm,
    dino_to_densecl,
    hf_vit_config_overrides,
    hf_vit_to_densecl,
    infer_config,
    resize_to_image_size,
    timm_to_densecl,
)
from densecl_vit.training.interop.weight_files import load_state_dict_file

IMPORTERS = {"timm": timm_to_densecl, "hf-vit": hf_vit_to_densecl, "dino": dino_to_densecl}
TIMM_LAYER_NORM_EPS = 1e-6
logger = logging.getLogger("densecl_vit.convert_checkpoint")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="source", choices=sorted(IMPORTERS), help="import this format")
    direction.add_argument("--to", dest="target", choices=["timm", "hf-vit"], help="export to this format")
    parser.add_argument("--checkpoint", required=True, type=Path, help="file or model folder to convert")
    parser.add_argument(
        "--output", required=True, type=Path, help="output folder (or .safetensors for --to timm)"
    )
    parser.add_argument("--image-size", type=int, help="resample the position embeddings to this input size")
    parser.add_argument(
        "--num-heads", type=int, help="attention heads (default: from config.json or width // 64)"
    )
    parser.add_argument(
        "--image-mean",
        type=float,
        nargs=3,
        help="normalisation mean of the source model (default: what its folder records, else ImageNet's; "
        "timm's augreg ViTs use 0.5 0.5 0.5, DeiT and DINO ImageNet's)",
    )
    parser.add_argument("--image-std", type=float, nargs=3, help="normalisation std, as --image-mean")
    return parser.parse_args(argv)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def folder_settings(source: str, checkpoint: Path) -> tuple[dict, dict]:
    """(config overrides, normalisation) a model folder records beside its weights; empty for a single file.

    transformers folders keep heads/eps/activation in config.json and mean/std in preprocessor_config.json;
    timm's Hub folders keep mean/std in config.json's `pretrained_cfg`.
    """
    if not checkpoint.is_dir():
        return {}, {}
    folder_config = _read_json(checkpoint / "config.json")
    if source == "hf-vit":
        return hf_vit_config_overrides(folder_config), _read_json(checkpoint / "preprocessor_config.json")
    pretrained = folder_config.get("pretrained_cfg", {})
    return {}, {"image_mean": pretrained.get("mean"), "image_std": pretrained.get("std")}


def import_checkpoint(args: argparse.Namespace) -> None:
    """timm / transformers ViT / DINO checkpoint -> DenseCL-ViT folder (model + image processor)."""
    state_dict = IMPORTERS[args.source](load_state_dict_file(args.checkpoint))
    if args.image_size is not None:
        state_dict = resize_to_image_size(state_dict, args.image_size)
    overrides, normalization = folder_settings(args.source, args.checkpoint)
    overrides["num_attention_heads"] = args.num_heads or overrides.get("num_attention_heads")
    config = DenseCLViTConfig(**infer_config(state_dict, **overrides))
    model = DenseCLViTModel(config)
    model.load_state_dict(state_dict, strict=True)
    model.save_pretrained(args.output)
    processor = DenseCLViTImageProcessor(
        size={"height": config.image_size, "width": config.image_size},
        size_divisor=config.patch_size,
        image_mean=args.image_mean or normalization.get("image_mean") or IMAGENET_DEFAULT_MEAN,
        image_std=args.image_std or normalization.get("image_std") or IMAGENET_DEFAULT_STD,
    )
    processor.save_pretrained(args.output)
    print(
        f"wrote a DenseCL-ViT model ({config.hidden_size}d, {config.num_hidden_layers} blocks) to {args.output}"
    )


def export_checkpoint(args: argparse.Namespace) -> None:
    """DenseCL-ViT folder -> timm .safetensors state dict or transformers ViTModel folder."""
    if not (args.checkpoint / "config.json").is_file():
        raise ValueError(f"{args.checkpoint} is not a DenseCL-ViT model folder (no config.json).")
    config = DenseCLViTConfig.from_pretrained(args.checkpoint)
    state_dict = load_state_dict_file(args.checkpoint)
    if args.target == "timm":
        export_timm(densecl_to_timm(state_dict), config, args.output)
    else:
        export_hf_vit(densecl_to_hf_vit(state_dict), config, args.output)
    print(f"wrote a {args.target} checkpoint to {args.output}")


def export_timm(state_dict: dict, config: DenseCLViTConfig, output: Path) -> None:
    """A safetensors state dict for timm's VisionTransformer; the architecture goes into the file's metadata."""
    if output.suffix != ".safetensors":
        raise ValueError(f"--to timm writes one .safetensors file; got --output {output}.")
    if config.layer_norm_eps != TIMM_LAYER_NORM_EPS:
        logger.warning(
            "timm's ViT uses LayerNorm eps 1e-6, this model %s: outputs will differ", config.layer_norm_eps
        )
    keys = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "mlp_ratio",
        "patch_size",
        "image_size",
    )
    metadata = {"format": "pt", **{key: str(getattr(config, key)) for key in keys}}
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, output, metadata=metadata)


def export_hf_vit(state_dict: dict, config: DenseCLViTConfig, output: Path) -> None:
    """A transformers ViTModel folder (no pooler), saved by transformers itself."""
    vit_config = ViTConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=config.layer_norm_eps,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        qkv_bias=config.qkv_bias,
        initializer_range=config.initializer_range,
    )
    model = ViTModel(vit_config, add_pooling_layer=False)
    model.load_state_dict(state_dict, strict=True)
    model.save_pretrained(output)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Our own notes (dropped keys, resampling) at INFO; other libraries stay at WARNING.
    logging.basicConfig(format="%(message)s")
    logging.getLogger("densecl_vit").setLevel(logging.INFO)
    return exit_status(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    """Import or export as the options say."""
    import_only = {
        "--image-size": args.image_size,
        "--num-heads": args.num_heads,
        "--image-mean": args.image_mean,
        "--image-std": args.image_std,
    }
    if args.target is not None and any(value is not None for value in import_only.values()):
        used = ", ".join(flag for flag, value in import_only.items() if value is not None)
        raise ValueError(f"{used} only apply with --from; the exported model keeps its own settings.")
    if args.source is not None:
        import_checkpoint(args)
    else:
        export_checkpoint(args)


if __name__ == "__main__":
    sys.exit(main())
