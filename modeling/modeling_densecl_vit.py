"""PyTorch DenseCL-ViT: a pre-norm Vision Transformer pre-trained by contrasting the global [CLS] embedding of one
view with every patch embedding of another (Rabarisoa et al., 2022, https://arxiv.org/abs/2205.15173), with heads
for semantic segmentation and monocular depth estimation.

The encoder is numerically the same network as timm's `VisionTransformer` and transformers' `ViTModel`
(pre-norm blocks, [CLS] token, learnable absolute position embeddings, final LayerNorm) given the same weights.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_densecl_vit import DenseCLViTConfig


class DenseCLViTPatchEmbeddings(nn.Module):
    """Non-overlapping patches to vectors: (B, C, H, W) -> (B, H/p * W/p, D), row-major over the patch grid."""

    def __init__(self, config: DenseCLViTConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {self.num_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}."
            )
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}; "
                f"resize or crop the image to a multiple of {self.patch_size}."
            )
        # (B, D, H/p, W/p) -> (B, N, D)
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class DenseCLViTEmbeddings(nn.Module):
    """[CLS] token + patch embeddings + absolute position embeddings, resampled to any grid."""

    def __init__(self, config: DenseCLViTConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.grid_size = config.image_size // config.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.grid_size**2 + 1, config.hidden_size))
        self.patch_embeddings = DenseCLViTPatchEmbeddings(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """Position embeddings for a (grid_height, grid_width) patch grid: (1, 1 + gh*gw, D).

        Bicubic resampling (align_corners=False, no antialias) in float32, as transformers' ViT and DINOv2 do;
        half-precision bicubic resampling shifts the embeddings.
        """
        if grid_height == self.grid_size and grid_width == self.grid_size and not torch.jit.is_tracing():
            return self.position_embeddings
        cls_pos, patch_pos = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
        dim = patch_pos.shape[-1]
        # (1, g*g, D) -> (1, D, g, g)
        patch_pos = patch_pos.reshape(1, self.grid_size, self.grid_size, dim).permute(0, 3, 1, 2)
        patch_pos = nn.functional.interpolate(
            patch_pos.float(), size=(grid_height, grid_width), mode="bicubic", align_corners=False
        ).to(cls_pos.dtype)
        # (1, D, gh, gw) -> (1, gh*gw, D)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_height * grid_width, dim)
        return torch.cat((cls_pos, patch_pos), dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        patches = self.patch_embeddings(pixel_values.to(self.patch_embeddings.projection.weight.dtype))
        cls_tokens = self.cls_token.expand(patches.shape[0], -1, -1)
        embeddings = torch.cat((cls_tokens, patches), dim=1)
        embeddings = embeddings + self.interpolate_pos_encoding(height // self.patch_size, width // self.patch_size)
        return self.dropout(embeddings)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention. query/key/value: (B, heads, N, d) -> output (B, N, heads, d), weights (B, heads, N, N)."""
    attn_weights = torch.matmul(query, key.transpose(-2, -1)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class DenseCLViTAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, dispatched through transformers' attention interface."""

    def __init__(self, config: DenseCLViTConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        # Every token attends to every token; without this flag the SDPA integration would run causally.
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.proj_dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        # (B, N, 3D) -> 3 x (B, heads, N, d)
        qkv = self.qkv(hidden_states).reshape(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)

        attention_interface: Callable = eager_attention_forward
        if self.config._attn_implementation != "eager" and not output_attentions:
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        # (B, N, heads, d) -> (B, N, D)
        attn_output = self.proj_dropout(self.proj(attn_output.reshape(batch_size, seq_len, -1)))
        return attn_output, attn_weights


class DenseCLViTMLP(nn.Module):
    def __init__(self, config: DenseCLViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(hidden_states)))))


class DenseCLViTDropPath(nn.Module):
    """Stochastic depth per sample (Huang et al., 2016); identity at eval time or with rate 0."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = hidden_states.new_empty(shape).bernoulli_(keep_prob)
        return hidden_states * mask / keep_prob

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class DenseCLViTLayer(nn.Module):
    """Pre-norm Transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: DenseCLViTConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = DenseCLViTAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = DenseCLViTMLP(config)
        self.drop_path = DenseCLViTDropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_output, attn_weights = self.attention(self.norm1(hidden_states), output_attentions)
        hidden_states = hidden_states + self.drop_path(attn_output)
        hidden_states = hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)))
        return hidden_states, attn_weights


class DenseCLViTEncoder(nn.Module):
    def __init__(self, config: DenseCLViTConfig):
        super().__init__()
        depth = config.num_hidden_layers
        # Linear stochastic-depth schedule: 0 for the first block, drop_path_rate for the last.
        rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layer = nn.ModuleList([DenseCLViTLayer(config, rate) for rate in rates])
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layer:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden_states, attn_weights = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, output_attentions
                )
            else:
                hidden_states, attn_weights = layer(hidden_states, output_attentions)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        return BaseModelOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=all_attentions
        )


class DenseCLViTPreTrainedModel(PreTrainedModel):
    config_class = DenseCLViTConfig
    config: DenseCLViTConfig
    base_model_prefix = "densecl_vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["DenseCLViTEmbeddings", "DenseCLViTLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """timm/ViT initialisation: truncated normal (std = initializer_range) for weights and embeddings."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, DenseCLViTEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            init.trunc_normal_(module.cls_token, mean=0.0, std=std)


class DenseCLViTModel(DenseCLViTPreTrainedModel):
    """The bare encoder: (B, 3, H, W) -> tokens (B, 1 + N, D), [CLS] first, then the patches row-major."""

    def __init__(self, config: DenseCLViTConfig):
        super().__init__(config)
        self.embeddings = DenseCLViTEmbeddings(config)
        self.encoder = DenseCLViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> DenseCLViTPatchEmbeddings:
        return self.embeddings.patch_embeddings

    def patch_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """(rows, columns) of the patch grid for an input batch."""
        return pixel_values.shape[-2] // self.config.patch_size, pixel_values.shape[-1] // self.config.patch_size

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images; height and width must be multiples of `config.patch_size`.
        output_hidden_states (`bool`, *optional*):
            Return the embeddings and the (un-normalised) output of every block: `L + 1` tensors `(B, 1 + N, D)`.
        output_attentions (`bool`, *optional*):
            Return the attention probabilities of every block (computed by the eager path).
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if return_dict is None:
            return_dict = self.config.return_dict
        embeddings = self.embeddings(pixel_values)
        encoder_outputs = self.encoder(
            embeddings, output_hidden_states=output_hidden_states, output_attentions=output_attentions
        )
        sequence_output = self.layernorm(encoder_outputs.last_hidden_state)
        output = BaseModelOutputWithPooling(
            last_hidden_state=sequence_output,
            pooler_output=sequence_output[:, 0],
            hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["DenseCLViTModel", "DenseCLViTPreTrainedModel"]
