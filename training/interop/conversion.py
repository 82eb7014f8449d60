"""Checkpoint conversion between DenseCL-ViT and the ViTs the paper's baselines start from.

Pure state_dict -> state_dict functions in the habit of timm's `checkpoint_filter_fn`: each recognises its
checkpoint by its keys, refuses one it does not recognise with a one-line `ValueError` that names the missing and
unexpected keys and the `--from` value that looks right, and resamples the position embeddings when asked for
another grid. Supported sources:

- timm `VisionTransformer` (`vit_{tiny,small,base}_patch16_*`, DeiT): `cls_token`, `pos_embed`, `blocks.{i}.*`.
- transformers `ViTModel` / `ViTFor*` (separate query/key/value, optional `vit.` prefix), both the on-disk names
  every Hub checkpoint uses (`encoder.layer.{i}.attention.attention.query`) and the in-memory names of
  transformers 5 (`layers.{i}.attention.q_proj`).
- Facebook DINO: the released backbone weights (timm names) or a training checkpoint with `teacher`/`student`.

Our names: `embeddings.{cls_token,position_embeddings,patch_embeddings.projection.*}`,
`encoder.layer.{i}.{norm1,attention.qkv,attention.proj,norm2,mlp.fc1,mlp.fc2}.*`, `layernorm.*`.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

StateDict = dict[str, Any]

# (source template, our template); `{i}` is a block index, `{w}` is `weight` or `bias`.
TIMM_NAMES = [
    ("cls_token", "embeddings.cls_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.{w}", "embeddings.patch_embeddings.projection.{w}"),
    ("blocks.{i}.norm1.{w}", "encoder.layer.{i}.norm1.{w}"),
    ("blocks.{i}.attn.qkv.{w}", "encoder.layer.{i}.attention.qkv.{w}"),
    ("blocks.{i}.attn.proj.{w}", "encoder.layer.{i}.attention.proj.{w}"),
    ("blocks.{i}.norm2.{w}", "encoder.layer.{i}.norm2.{w}"),
    ("blocks.{i}.mlp.fc1.{w}", "encoder.layer.{i}.mlp.fc1.{w}"),
    ("blocks.{i}.mlp.fc2.{w}", "encoder.layer.{i}.mlp.fc2.{w}"),
    ("norm.{w}", "layernorm.{w}"),
]
DENSECL_NAMES = [(ours, ours) for _, ours in TIMM_NAMES]
# transformers 5 in-memory names; q/k/v land on temporary names that `_fuse_qkv` concatenates.
HF_VIT_NAMES = [
    ("embeddings.cls_token", "embeddings.cls_token"),
    ("embeddings.position_embeddings", "embeddings.position_embeddings"),
    ("embeddings.patch_embeddings.projection.{w}", "embeddings.patch_embeddings.projection.{w}"),
    ("layers.{i}.layernorm_before.{w}", "encoder.layer.{i}.norm1.{w}"),
    ("layers.{i}.attention.q_proj.{w}", "encoder.layer.{i}.attention.q.{w}"),
    ("layers.{i}.attention.k_proj.{w}", "encoder.layer.{i}.attention.k.{w}"),
    ("layers.{i}.attention.v_proj.{w}", "encoder.layer.{i}.attention.v.{w}"),
    ("layers.{i}.attention.o_proj.{w}", "encoder.layer.{i}.attention.proj.{w}"),
    ("layers.{i}.layernorm_after.{w}", "encoder.layer.{i}.norm2.{w}"),
    ("layers.{i}.mlp.fc1.{w}", "encoder.layer.{i}.mlp.fc1.{w}"),
    ("layers.{i}.mlp.fc2.{w}", "encoder.layer.{i}.mlp.fc2.{w}"),
    ("layernorm.{w}", "layernorm.{w}"),
]
# The names `save_pretrained` writes and every Hub ViT checkpoint carries -> transformers 5 in-memory names.
HF_VIT_FILE_NAMES = [
    ("encoder.layer.{i}.layernorm_before.{w}", "layers.{i}.layernorm_before.{w}"),
    ("encoder.layer.{i}.attention.attention.query.{w}", "layers.{i}.attention.q_proj.{w}"),
    ("encoder.layer.{i}.attention.attention.key.{w}", "layers.{i}.attention.k_proj.{w}"),
    ("encoder.layer.{i}.attention.attention.value.{w}", "layers.{i}.attention.v_proj.{w}"),
    ("encoder.layer.{i}.attention.output.dense.{w}", "layers.{i}.attention.o_proj.{w}"),
    ("encoder.layer.{i}.layernorm_after.{w}", "layers.{i}.layernorm_after.{w}"),
    ("encoder.layer.{i}.intermediate.dense.{w}", "layers.{i}.mlp.fc1.{w}"),
    ("encoder.layer.{i}.output.dense.{w}", "layers.{i}.mlp.fc2.{w}"),
]
# Templates whose bias exists only with qkv_bias=True.
QKV_TEMPLATES = {
    "blocks.{i}.attn.qkv.{w}",
    "encoder.layer.{i}.attention.qkv.{w}",
    "layers.{i}.attention.q_proj.{w}",
    "layers.{i}.attention.k_proj.{w}",
    "layers.{i}.attention.v_proj.{w}",
}
FORMAT_NAMES = {
    "timm": "a timm ViT",
    "hf-vit": "a transformers ViT",
    "dino": "a DINO",
    "densecl": "a DenseCL-ViT",
}


def _pattern(template: str) -> re.Pattern:
    regex = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{w\}", r"(?P<w>weight|bias)")
    return re.compile(f"^{regex}$")


def _rename(sd: StateDict, table: list[tuple[str, str]], keep_unmatched: bool = False) -> StateDict:
    """Rename keys by a template table; unmatched keys are kept or dropped."""
    compiled = [(_pattern(src), dst) for src, dst in table]
    out = {}
    for key, value in sd.items():
        for pattern, dst in compiled:
            match = pattern.match(key)
            if match:
                out[dst.format(**match.groupdict())] = value
                break
        else:
            if keep_unmatched:
                out[key] = value
    return out


def _first(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... (+{len(keys) - limit} more)' if len(keys) > limit else ''}]"


def guess_format(checkpoint: StateDict) -> str | None:
    """The `--from` value a checkpoint looks like (`timm`, `hf-vit`, `dino`, `densecl`) or None."""
    if "teacher" in checkpoint or "student" in checkpoint:
        return "dino"
    keys = list(_unwrap(checkpoint))
    if any(re.search(r"(^|\.)encoder\.layer\.\d+\.attention\.qkv\.", k) for k in keys):
        return "densecl"
    if any(
        re.search(r"attention\.attention\.query\.|(^|\.)layers\.\d+\.attention\.q_proj\.", k) for k in keys
    ):
        return "hf-vit"
    if any(re.search(r"(^|\.)blocks\.\d+\.attn\.qkv\.", k) for k in keys):
        dino_like = any(k.startswith(("module.", "backbone.")) or k.startswith("head.mlp.") for k in keys)
        return "dino" if dino_like else "timm"
    return None


def _hint(checkpoint: StateDict, expected: str) -> str:
    guess = guess_format(checkpoint)
    if guess is None or guess == expected:
        return ""
    if guess == "densecl":
        return "; looks like a DenseCL-ViT checkpoint already: load it with DenseCLViTModel.from_pretrained"
    return f"; looks like {FORMAT_NAMES[guess]} checkpoint: use --from {guess}"


def _check_keys(sd: StateDict, table: list[tuple[str, str]], fmt: str, original: StateDict) -> None:
    """Refuse `sd` unless its keys are exactly the table's templates expanded over its blocks."""
    templates = [src for src, _ in table]
    compiled = [_pattern(t) for t in templates]
    unexpected = [k for k in sd if not any(p.match(k) for p in compiled)]
    indices = [
        int(m.group("i")) for k in sd for p in compiled if (m := p.match(k)) and m.groupdict().get("i")
    ]
    depth = max(indices) + 1 if indices else 0
    expected = []
    for template in templates:
        for i in range(depth) if "{i}" in template else [0]:
            for w in ("weight", "bias") if "{w}" in template else [""]:
                expected.append(template.format(i=i, w=w))
    has_qkv_bias = any(_pattern(t).match(k) and k.endswith(".bias") for t in QKV_TEMPLATES for k in sd)
    if not has_qkv_bias:
        qkv_biases = [_pattern(t) for t in QKV_TEMPLATES]
        expected = [k for k in expected if not (k.endswith(".bias") and any(p.match(k) for p in qkv_biases))]
    missing = [k for k in expected if k not in sd]
    problems = [f"missing keys {_first(missing)}"] if missing else []
    problems += [f"unexpected keys {_first(unexpected)}"] if unexpected else []
    problems += ["no transformer blocks"] if depth == 0 else []
    if problems:
        raise ValueError(f"not {FORMAT_NAMES[fmt]} checkpoint: {', '.join(problems)}{_hint(original, fmt)}.")


def _unwrap(checkpoint: StateDict) -> StateDict:
    """Training checkpoints keep the weights under `model` or `state_dict`; DDP adds `module.`."""
    for wrapper in ("model", "state_dict"):
        if isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def _drop(sd: StateDict, prefixes: tuple[str, ...], fmt: str) -> StateDict:
    dropped = [k for k in sd if k.startswith(prefixes)]
    if dropped:
        logger.warning(
            "%s: dropped %d keys the encoder does not use: %s", fmt, len(dropped), _first(dropped, 6)
        )
    return {k: v for k, v in sd.items() if not k.startswith(prefixes)}


def _maybe_resample(sd: StateDict, grid_size: int | None) -> StateDict:
    if grid_size is not None:
        pos = sd["embeddings.position_embeddings"]
        sd["embeddings.position_embeddings"] = resample_position_embeddings(pos, grid_size)
    return sd


def timm_to_densecl(sd: StateDict, grid_size: int | None = None) -> StateDict:
    """timm `VisionTransformer` state dict -> DenseCL-ViT encoder state dict; the classifier `head` is dropped.

    grid_size: patches per side to resample `pos_embed` to (bicubic); None keeps the checkpoint's grid.
    """
    source = _drop(_unwrap(sd), ("head.weight", "head.bias"), "timm")
    _check_keys(source, TIMM_NAMES, "timm", sd)
    return _maybe_resample(_rename(source, TIMM_NAMES), grid_size)


def dino_to_densecl(checkpoint: StateDict, grid_size: int | None = None) -> StateDict:
    """Facebook DINO checkpoint -> DenseCL-ViT encoder state dict.

    Accepts the released backbone weights (timm names) or a training checkpoint holding `teacher` (preferred: the
    EMA network DINO evaluates) and `student`, whose keys carry `module.` and `backbone.` prefixes. The DINO
    projection head (`head.*`) is dropped.
    """
    source = checkpoint
    for network in ("teacher", "student"):
        if isinstance(checkpoint.get(network), dict):
            logger.info("dino: converting the %s network", network)
            source = checkpoint[network]
            break
    source = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in _unwrap(source).items()}
    source = _drop(source, ("head.",), "dino")
    _check_keys(source, TIMM_NAMES, "dino", checkpoint)
    return _maybe_resample(_rename(source, TIMM_NAMES), grid_size)


def _fuse_qkv(sd: StateDict) -> StateDict:
    """encoder.layer.{i}.attention.{q,k,v}.{w} -> encoder.layer.{i}.attention.qkv.{w}: (D, D) x 3 -> (3D, D)."""
    out = {}
    for key, value in sd.items():
        match = re.match(r"^(encoder\.layer\.\d+\.attention\.)([qkv])\.(weight|bias)$", key)
        if match is None:
            out[key] = value
        elif match.group(2) == "q":
            prefix, w = match.group(1), match.group(3)
            parts = [sd[f"{prefix}{name}.{w}"] for name in "qkv"]
            out[f"{prefix}qkv.{w}"] = torch.cat(parts, dim=0)
    return out


def hf_vit_to_densecl(sd: StateDict, grid_size: int | None = None) -> StateDict:
    """transformers `ViTModel`/`ViTFor*` state dict -> DenseCL-ViT encoder state dict.

    query, key and value are concatenated into the fused `qkv` (timm order q, k, v, heads contiguous within each).
    A `vit.` prefix is stripped; `pooler.*`, `classifier.*` and `embeddings.mask_token` are dropped.
    """
    source = {k.removeprefix("vit."): v for k, v in _unwrap(sd).items()}
    source = _drop(source, ("pooler.", "classifier.", "embeddings.mask_token"), "hf-vit")
    source = _rename(source, HF_VIT_FILE_NAMES, keep_unmatched=True)
    _check_keys(source, HF_VIT_NAMES, "hf-vit", sd)
    return _maybe_resample(_fuse_qkv(_rename(source, HF_VIT_NAMES)), grid_size)


def _densecl_encoder(sd: StateDict) -> StateDict:
    """A DenseCL-ViT encoder state dict; task models' `densecl_vit.` prefix is stripped and their heads dropped."""
    if any(k.startswith("densecl_vit.") for k in sd):
        sd = _drop(
            sd, tuple({k.split(".")[0] + "." for k in sd if not k.startswith("densecl_vit.")}), "densecl"
        )
        sd = {k.removeprefix("densecl_vit."): v for k, v in sd.items()}
    _check_keys(sd, DENSECL_NAMES, "densecl", sd)
    return sd


def densecl_to_timm(sd: StateDict) -> StateDict:
    """DenseCL-ViT encoder state dict -> timm `VisionTransformer` (num_classes=0) state dict."""
    return _rename(_densecl_encoder(sd), [(ours, theirs) for theirs, ours in TIMM_NAMES])


def densecl_to_hf_vit(sd: StateDict) -> StateDict:
    """DenseCL-ViT encoder state dict -> transformers 5 `ViTModel(add_pooling_layer=False)` state dict.

    `ViTModel.save_pretrained` writes these under the Hub's file names, which every transformers version loads.
    """
    split = {}
    for key, value in _densecl_encoder(sd).items():
        match = re.match(r"^(encoder\.layer\.\d+\.attention\.)qkv\.(weight|bias)$", key)
        if match is None:
            split[key] = value
            continue
        # (3D, ...) -> 3 x (D, ...); clones so each tensor owns its storage (safetensors refuses shared ones).
        for name, part in zip("qkv", value.chunk(3, dim=0)):
            split[f"{match.group(1)}{name}.{match.group(2)}"] = part.clone()
    return _rename(split, [(ours, theirs) for theirs, ours in HF_VIT_NAMES])


def resample_position_embeddings(pos: torch.Tensor, new_grid: int | tuple[int, int]) -> torch.Tensor:
    """Resample position embeddings to another patch grid, keeping the [CLS] entry.

    pos: (1, 1 + g*g, D) -> (1, 1 + gh*gw, D). Bicubic, align_corners=False, without antialiasing, in float32:
    exactly what `DenseCLViTEmbeddings.interpolate_pos_encoding` (and transformers' ViT, DINO, mmseg) compute at
    run time, so a model converted at another grid gives the outputs the original gives at that size.
    """
    grid_h, grid_w = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    num_patches, dim = pos.shape[1] - 1, pos.shape[-1]
    grid = math.isqrt(num_patches)
    if pos.ndim != 3 or pos.shape[0] != 1 or grid * grid != num_patches:
        raise ValueError(
            f"position embeddings must have shape (1, 1 + g*g, D) for a square g x g grid, got {tuple(pos.shape)}."
        )
    if (grid_h, grid_w) == (grid, grid):
        return pos
    # (1, g*g, D) -> (1, D, g, g) -> (1, D, gh, gw) -> (1, gh*gw, D)
    patch_pos = pos[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2).float()
    patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim).to(pos.dtype)
    logger.info("resampled position embeddings from a %dx%d to a %dx%d grid", grid, grid, grid_h, grid_w)
    return torch.cat((pos[:, :1], patch_pos), dim=1)


def resize_to_image_size(sd: StateDict, image_size: int) -> StateDict:
    """Resample a DenseCL-ViT state dict's position embeddings to `image_size` (a multiple of the patch size)."""
    patch_size = sd["embeddings.patch_embeddings.projection.weight"].shape[-1]
    if image_size <= 0 or image_size % patch_size:
        raise ValueError(
            f"image size {image_size} is not a positive multiple of the patch size {patch_size}."
        )
    return _maybe_resample(dict(sd), image_size // patch_size)


def infer_config(sd: StateDict, **overrides: Any) -> dict[str, Any]:
    """`DenseCLViTConfig` keyword arguments read off a DenseCL-ViT encoder state dict.

    Hidden size, depth, patch size, channels, image size (position grid x patch), qkv bias and MLP ratio come
    from the weights. Heads cannot be read off weights: `hidden_size // 64` (Ti 3, S 6, B 12) unless given.
    Overrides that are None are ignored.
    """
    sd = _densecl_encoder(sd)
    hidden_size = sd["embeddings.cls_token"].shape[-1]
    depth = len({k.split(".")[2] for k in sd if k.startswith("encoder.layer.")})
    channels, patch_h, patch_w = sd["embeddings.patch_embeddings.projection.weight"].shape[1:]
    num_patches = sd["embeddings.position_embeddings"].shape[1] - 1
    grid = math.isqrt(num_patches)
    if patch_h != patch_w or grid * grid != num_patches:
        raise ValueError(
            f"only square patches and square position grids are supported, got {patch_h}x{patch_w} patches "
            f"and {num_patches} position embeddings."
        )
    mlp_hidden = sd["encoder.layer.0.mlp.fc1.weight"].shape[0]
    kwargs = {
        "hidden_size": hidden_size,
        "num_hidden_layers": depth,
        "num_attention_heads": max(1, hidden_size // 64),
        "mlp_ratio": mlp_hidden / hidden_size,
        "image_size": grid * patch_h,
        "patch_size": patch_h,
        "num_channels": channels,
        "qkv_bias": "encoder.layer.0.attention.qkv.bias" in sd,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("image_size", kwargs["image_size"]) != kwargs["image_size"]:
        raise ValueError(
            f"the position embeddings are stored for image size {kwargs['image_size']}, not "
            f"{overrides['image_size']}; resample them first with resize_to_image_size."
        )
    kwargs.update(overrides)
    if int(kwargs["hidden_size"] * kwargs["mlp_ratio"]) != mlp_hidden:
        raise ValueError(f"MLP width {mlp_hidden} is not an exact ratio of the hidden size {hidden_size}.")
    return kwargs


def hf_vit_config_overrides(vit_config: dict[str, Any]) -> dict[str, Any]:
    """The fields of a transformers ViT `config.json` that weights cannot tell (heads, LayerNorm eps, activation)."""
    keys = ("num_attention_heads", "layer_norm_eps", "hidden_act")
    return {key: vit_config[key] for key in keys if key in vit_config}


__all__ = [
    "densecl_to_hf_vit",
    "densecl_to_timm",
    "dino_to_densecl",
    "guess_format",
    "hf_vit_config_overrides",
    "hf_vit_to_densecl",
    "infer_config",
    "resample_position_embeddings",
    "resize_to_image_size",
    "timm_to_densecl",
]


# timm's `VisionTransformer` default; an encoder with another epsilon has no exact timm twin.
TIMM_LAYER_NORM_EPS = 1e-6


def timm_kwargs(encoder: torch.nn.Module) -> dict[str, Any] | None:
    """Keyword arguments of timm's `VisionTransformer` for this encoder, None when timm cannot match it."""
    config = encoder.config
    if config.layer_norm_eps != TIMM_LAYER_NORM_EPS or config.hidden_act != "gelu":
        return None
    return {
        "img_size": config.image_size,
        "patch_size": config.patch_size,
        "in_chans": config.num_channels,
        "embed_dim": config.hidden_size,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "mlp_ratio": float(config.mlp_ratio),
        "qkv_bias": config.qkv_bias,
        "num_classes": 0,
    }
