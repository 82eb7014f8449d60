"""Stock (no custom code) forms of DenseCL-ViT releases, each numerically equal to the custom model.

- Encoder -> transformers `Dinov2Model` with `layerscale_value=1.0`: the same pre-norm blocks, final LayerNorm,
  [CLS]-after-LayerNorm pooler and float32 bicubic position-embedding resampling; the layer scales are ones, so the
  outputs agree to float rounding (bitwise in the CPU tests). (`ViTModel` would need `interpolate_pos_encoding=True` for other sizes and has no
  [CLS] pooler without an untrained dense layer.)
- Encoder -> timm `VisionTransformer` state dict (`densecl_to_timm`).
- UPerNet segmenter -> transformers `UperNetForSemanticSegmentation` over a `BeitBackbone` (absolute position
  embeddings, no relative position bias, `layer_scale_init_value=0.0` which makes BEiT's lambdas the constant 1.0,
  `add_fpn=True` for the deconv/pool pyramid, `out_indices` = our 1-based block numbers). BEiT's key projection has
  no bias; a key bias adds q·b_k to every logit of a query, which softmax cancels, so dropping it is exact.
  `BeitForSemanticSegmentation` itself does not fit: it returns logits at 1/4 resolution, its decoder width is tied
  to `hidden_size`, and it reads `hidden_states[i - 1]` for `out_indices` i in 0..L (sorted), so the last block can
  feed only the finest pyramid level (i = 0), never the coarsest one as ours does.

- DPT depth model -> transformers `DepthAnythingForDepthEstimation` with `depth_estimation_type="metric"` over a
  `Dinov2Backbone` (`out_indices` = our block numbers, `apply_layernorm=True`, unreshaped tokens); the DPT head was
  built to be that model, so the names map one to one. `DepthAnythingConfig` types `max_depth` as an integer.

The linear segmentation head and the paper's two depth heads (linear up-projection, UPerNet, both ending in the
dilated sigmoid) have no stock transformers counterpart; the README's release table says so head by head.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import (
    BeitConfig,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
    Dinov2Model,
    DPTImageProcessor,
    PreTrainedModel,
    SegformerImageProcessor,
    UperNetConfig,
    UperNetForSemanticSegmentation,
    ViTImageProcessor,
)

from densecl_vit.modeling import DenseCLViTImageProcessor, DenseCLViTModel
from densecl_vit.training.interop.conversion import densecl_to_hf_vit, densecl_to_timm, timm_kwargs

from .snippets import StockFormats

# Our UPerNet names -> transformers UperNetForSemanticSegmentation names; applied in order, all that match.
UPERNET_NAMES = [
    (r"^decode_head\.pyramid\.fpn1\.0\.", "backbone.fpn.fpn1.conv_transpose1."),
    (r"^decode_head\.pyramid\.fpn1\.1\.", "backbone.fpn.fpn1.normalization."),
    (r"^decode_head\.pyramid\.fpn1\.3\.", "backbone.fpn.fpn1.conv_transpose2."),
    (r"^decode_head\.pyramid\.fpn2\.", "backbone.fpn.fpn2."),
    (r"^decode_head\.psp\.stages\.(\d+)\.1\.", r"decode_head.psp_modules.\1.1."),
    (r"^decode_head\.psp\.bottleneck\.", "decode_head.bottleneck."),
    (r"^classifier\.", "decode_head.classifier."),
    (r"^auxiliary_head\.conv\.", "auxiliary_head.convs.0."),
    (r"\.norm\.", ".batch_norm."),
]


def _encoder_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The encoder's weights under our prefixed names (`densecl_vit.` + encoder names)."""
    encoder = model if isinstance(model, DenseCLViTModel) else model.densecl_vit
    return {f"densecl_vit.{k}": v for k, v in encoder.state_dict().items()}


def unavailable_reason(model: PreTrainedModel) -> str | None:
    """Why no stock transformers class expresses `model` exactly, or None when one does."""
    config = model.config
    name = type(model).__name__
    ratio = None
    if float(config.mlp_ratio) != int(config.mlp_ratio):
        ratio = f"Dinov2Model needs an integer MLP ratio, this model has {config.mlp_ratio}"
    increasing = list(config.out_indices) == sorted(set(config.out_indices))
    if name == "DenseCLViTModel":
        return ratio
    if name == "DenseCLViTForSemanticSegmentation":
        if config.decode_head != "upernet":
            return "transformers has no per-patch linear segmentation head on a ViT"
        if not increasing:
            return f"BeitBackbone needs strictly increasing out_indices, this model uses {config.out_indices}"
        return None
    if name == "DenseCLViTForDepthEstimation":
        if config.depth_head != "dpt":
            return (
                f"transformers has no ViT depth model with a {config.depth_head} head and a dilated sigmoid range; "
                "the dpt head has one"
            )
        if not increasing:
            return (
                f"Dinov2Backbone needs strictly increasing out_indices, this model uses {config.out_indices}"
            )
        if float(config.max_depth) != int(config.max_depth):
            return f"DepthAnythingConfig needs a whole-number max_depth, this model has {config.max_depth}"
        return ratio
    return f"{name} is not released"


def _dinov2_config(config: Any, **backbone: Any) -> Dinov2Config:
    """The `Dinov2Config` of our encoder (layer scales of ones, no mask token), plus backbone options."""
    return Dinov2Config(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        mlp_ratio=int(config.mlp_ratio),
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        qkv_bias=config.qkv_bias,
        layerscale_value=1.0,
        use_mask_token=False,
        initializer_range=config.initializer_range,
        **backbone,
    )


def _dinov2_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The encoder's weights under `Dinov2Model` names, with layer scales of ones."""
    state_dict = {}
    for key, value in densecl_to_hf_vit(_encoder_state_dict(model)).items():
        key = re.sub(r"^layers\.(\d+)\.", r"encoder.layer.\1.", key)
        state_dict[key.replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")] = value
    for i in range(model.config.num_hidden_layers):
        for scale in ("layer_scale1", "layer_scale2"):
            state_dict[f"encoder.layer.{i}.{scale}.lambda1"] = torch.ones(model.config.hidden_size)
    return state_dict


def to_dinov2(encoder: DenseCLViTModel) -> Dinov2Model:
    """The encoder as transformers' `Dinov2Model` (layer scales of ones), eval mode, float32."""
    dinov2 = Dinov2Model(_dinov2_config(encoder.config))
    dinov2.load_state_dict(_dinov2_state_dict(encoder), strict=True)
    return dinov2.float().eval()


def to_upernet(model: PreTrainedModel) -> UperNetForSemanticSegmentation:
    """A UPerNet `DenseCLViTForSemanticSegmentation` as transformers' `UperNetForSemanticSegmentation`."""
    reason = unavailable_reason(model)
    if reason:
        raise ValueError(
            f"no stock transformers model for this segmenter: {reason}; use --format remote-code."
        )
    config = model.config
    backbone = BeitConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        use_mask_token=False,
        use_absolute_position_embeddings=True,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=False,
        layer_scale_init_value=0.0,
        use_mean_pooling=False,
        out_indices=list(config.out_indices),
        add_fpn=True,
    )
    upernet = UperNetForSemanticSegmentation(
        UperNetConfig(
            backbone_config=backbone,
            hidden_size=config.decoder_hidden_size,
            pool_scales=list(config.pool_scales),
            use_auxiliary_head=config.use_auxiliary_head,
            auxiliary_loss_weight=config.auxiliary_loss_weight,
            auxiliary_in_channels=config.hidden_size,
            auxiliary_channels=config.auxiliary_hidden_size,
            auxiliary_num_convs=1,
            auxiliary_concat_input=False,
            loss_ignore_index=config.semantic_loss_ignore_index,
            id2label=dict(config.id2label),
            label2id=dict(config.label2id),
        )
    )
    state_dict = {}
    for key, value in densecl_to_hf_vit(_encoder_state_dict(model)).items():
        if key.endswith("k_proj.bias"):
            continue  # softmax-invariant, see the module docstring
        if not config.qkv_bias and re.search(r"\.(q|v)_proj\.weight$", key):
            state_dict["backbone.beit." + key.replace(".weight", ".bias")] = value.new_zeros(value.shape[0])
        state_dict["backbone.beit." + key] = value
    for key, value in model.state_dict().items():
        if key.startswith("densecl_vit."):
            continue
        for pattern, replacement in UPERNET_NAMES:
            key = re.sub(pattern, replacement, key)
        state_dict[key] = value
    upernet.load_state_dict(state_dict, strict=True)
    return upernet.float().eval()


# Our DPT names -> transformers DepthAnythingForDepthEstimation names (the encoder is mapped as Dinov2's).
DEPTH_ANYTHING_NAMES = [
    (r"^decode_head\.reassemble\.", "neck.reassemble_stage.layers."),
    (r"^decode_head\.convs\.", "neck.convs."),
    (r"^decode_head\.fusion\.", "neck.fusion_stage.layers."),
    (r"^regressor\.", "head."),
]


def to_depth_anything(model: PreTrainedModel) -> DepthAnythingForDepthEstimation:
    """A DPT `DenseCLViTForDepthEstimation` as transformers' `DepthAnythingForDepthEstimation` (metric) over a
    `Dinov2Backbone`, eval mode, float32."""
    reason = unavailable_reason(model)
    if reason:
        raise ValueError(
            f"no stock transformers model for this depth model: {reason}; use --format remote-code."
        )
    config = model.config
    backbone = _dinov2_config(config, out_indices=list(config.out_indices), reshape_hidden_states=False)
    depth_anything = DepthAnythingForDepthEstimation(
        DepthAnythingConfig(
            backbone_config=backbone,
            patch_size=config.patch_size,
            reassemble_hidden_size=config.hidden_size,
            reassemble_factors=[4, 2, 1, 0.5],
            neck_hidden_sizes=list(config.dpt_neck_hidden_sizes),
            fusion_hidden_size=config.dpt_fusion_hidden_size,
            head_hidden_size=config.dpt_head_hidden_size,
            depth_estimation_type="metric",
            max_depth=int(config.max_depth),
        )
    )
    state_dict = {f"backbone.{key}": value for key, value in _dinov2_state_dict(model).items()}
    for key, value in model.state_dict().items():
        if key.startswith("densecl_vit."):
            continue
        for pattern, replacement in DEPTH_ANYTHING_NAMES:
            key = re.sub(pattern, replacement, key)
        state_dict[key] = value
    depth_anything.load_state_dict(state_dict, strict=True)
    return depth_anything.float().eval()


STOCK_CLASSES = {
    "DenseCLViTModel": ("Dinov2Model", to_dinov2),
    "DenseCLViTForSemanticSegmentation": ("UperNetForSemanticSegmentation", to_upernet),
    "DenseCLViTForDepthEstimation": ("DepthAnythingForDepthEstimation", to_depth_anything),
}


def to_stock(model: PreTrainedModel) -> PreTrainedModel:
    """The stock transformers model equal to `model`; ValueError naming the reason when there is none."""
    reason = unavailable_reason(model)
    if reason:
        raise ValueError(f"no stock transformers model for {type(model).__name__}: {reason}.")
    return STOCK_CLASSES[type(model).__name__][1](model)


def stock_image_processor(processor: DenseCLViTImageProcessor, stock_model: PreTrainedModel):
    """A stock processor doing what ours does: `ViTImageProcessor` (encoders), `SegformerImageProcessor`
    (segmenters) or `DPTImageProcessor` (depth; its post-processing resizes bicubically where ours is bilinear).

    Load it with `backend="pil"` for the same PIL resizing as ours; the default torchvision backend resizes a little
    differently. Our `shortest_edge` sizing (rounded to the patch size) has no stock equivalent.
    """
    if "height" not in processor.size:
        raise ValueError(
            f"stock image processors need a fixed size; this one resizes by {processor.size}. Save the model's "
            "processor with size={'height': h, 'width': w}."
        )
    height, width = processor.output_size(1, 1)  # the fixed size, rounded to the size divisor as ours does
    kwargs: dict[str, Any] = dict(
        do_resize=processor.do_resize,
        size={"height": height, "width": width},
        resample={"nearest": 0, "bilinear": 2, "bicubic": 3}.get(processor.resample, processor.resample),
        do_rescale=processor.do_rescale,
        rescale_factor=processor.rescale_factor,
        do_normalize=processor.do_normalize,
        image_mean=list(processor.image_mean),
        image_std=list(processor.image_std),
        # Grayscale, palette and RGBA photographs become RGB first, as ours do, instead of failing on 1 or 4 channels.
        do_convert_rgb=True,
    )
    if isinstance(stock_model, UperNetForSemanticSegmentation):
        return SegformerImageProcessor(do_reduce_labels=False, **kwargs)
    if isinstance(stock_model, DepthAnythingForDepthEstimation):
        return DPTImageProcessor(keep_aspect_ratio=False, ensure_multiple_of=1, do_pad=False, **kwargs)
    return ViTImageProcessor(**kwargs)


def timm_state_dict(encoder: DenseCLViTModel) -> dict[str, torch.Tensor]:
    """The encoder's weights under timm `VisionTransformer` names, contiguous float32 (safetensors-ready)."""
    return {
        k: v.detach().float().contiguous() for k, v in densecl_to_timm(_encoder_state_dict(encoder)).items()
    }


def stock_formats(
    model: PreTrainedModel, fmt: str, timm_file: str | None, reason: str | None = None
) -> StockFormats:
    """What the card says about loading the release without custom code; `reason`: why there is no stock form,
    when the release knows one beyond the model's own (`unavailable_reason`), such as its image processor."""
    reason = reason or unavailable_reason(model)
    name = None if reason else STOCK_CLASSES[type(model).__name__][0]
    kwargs = timm_kwargs(model) if timm_file else None
    return StockFormats(
        transformers_class=name,
        subfolder=None if fmt == "stock" or name is None else "stock",
        timm_file=timm_file if kwargs else None,
        timm_kwargs=kwargs or {},
        unavailable=reason,
    )


__all__ = [
    "stock_formats",
    "stock_image_processor",
    "timm_kwargs",
    "timm_state_dict",
    "to_depth_anything",
    "to_dinov2",
    "to_stock",
    "to_upernet",
    "unavailable_reason",
]
