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
import torch.distributed as dist
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPooling,
    DepthEstimatorOutput,
    SemanticSegmenterOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.generic import can_return_tuple

try:
    from transformers.utils.output_capturing import capture_outputs
except ImportError:  # transformers < 5.2 names the same decorator check_model_inputs
    from transformers.utils.generic import check_model_inputs as capture_outputs

from .configuration_densecl_vit import DenseCLViTConfig, parse_pretraining_loss
from .losses_densecl_vit import (
    berhu_loss,
    gather_with_grad,
    global_info_nce,
    gradient_loss,
    local_local_info_nce,
    rank_batch_offset,
    symmetric_local_global_loss,
)


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
        embeddings = embeddings + self.interpolate_pos_encoding(
            height // self.patch_size, width // self.patch_size
        )
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
        self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        # (B, N, 3D) -> 3 x (B, heads, N, d)
        qkv = self.qkv(hidden_states).reshape(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)

        # Read at every call, so that `model.set_attn_implementation(...)` switches a built model. Only the eager
        # path computes attention probabilities, so a request for them takes it whatever the setting.
        implementation = "eager" if kwargs.get("output_attentions") else self.config._attn_implementation
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
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


class DenseCLViTLayer(GradientCheckpointingLayer):
    """Pre-norm Transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    As a `GradientCheckpointingLayer`, it recomputes itself in the backward pass when
    `model.gradient_checkpointing_enable(...)` selected it (every layer, or every n-th one).
    """

    def __init__(self, config: DenseCLViTConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = DenseCLViTAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = DenseCLViTMLP(config)
        self.drop_path = DenseCLViTDropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        attn_output, _ = self.attention(self.norm1(hidden_states), **kwargs)
        hidden_states = hidden_states + self.drop_path(attn_output)
        return hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)))


class DenseCLViTEncoder(nn.Module):
    def __init__(self, config: DenseCLViTConfig):
        super().__init__()
        depth = config.num_hidden_layers
        # Linear stochastic-depth schedule: 0 for the first block, drop_path_rate for the last.
        rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layer = nn.ModuleList([DenseCLViTLayer(config, rate) for rate in rates])
        # Reports whether checkpointing is on (`gradient_checkpointing_enable` sets it); the layers checkpoint themselves.
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> BaseModelOutput:
        # Hidden states and attentions are recorded by the hooks of `capture_outputs` on the model.
        for layer in self.layer:
            hidden_states = layer(hidden_states, **kwargs)
        return BaseModelOutput(last_hidden_state=hidden_states)


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
    # What `capture_outputs` records: each block's output (after the embeddings) and each attention's probabilities.
    _can_record_outputs = {"hidden_states": DenseCLViTLayer, "attentions": DenseCLViTAttention}

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
            # BatchNorm statistics are buffers: a head loaded on top of a pre-trained encoder gets them from here.
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
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
        return pixel_values.shape[-2] // self.config.patch_size, pixel_values.shape[
            -1
        ] // self.config.patch_size

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images; height and width must be multiples of `config.patch_size`.
        output_hidden_states (`bool`, *optional*):
            Return the embeddings and the (un-normalised) output of every block: `L + 1` tensors `(B, 1 + N, D)`.
        output_attentions (`bool`, *optional*):
            Return the attention probabilities of every block (computed by the eager path).
        """
        encoder_outputs = self.encoder(self.embeddings(pixel_values), **kwargs)
        sequence_output = self.layernorm(encoder_outputs.last_hidden_state)
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence_output, pooler_output=sequence_output[:, 0]
        )


def patch_tokens_to_map(tokens: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Drop [CLS] and lay the patch tokens out on their grid: (B, 1 + h*w, D) -> (B, D, h, w)."""
    batch_size, _, dim = tokens.shape
    return tokens[:, 1:].transpose(1, 2).reshape(batch_size, dim, *grid_size)


def resize_to(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) maps to `size` (align_corners=False, as mmsegmentation); no-op when equal."""
    if tuple(features.shape[-2:]) == tuple(size):
        return features
    return nn.functional.interpolate(features, size=size, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------------------------------
# Pre-training
# ---------------------------------------------------------------------------------------------------------------------


class DenseCLViTProjectionHead(nn.Module):
    """The projection network g of the paper: a 3-layer MLP with GELU, applied to every token.

    (B, T, D) -> (B, T, P), not normalised; T counts [CLS] and the patches alike.
    """

    def __init__(self, config: DenseCLViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.projection_hidden_size)
        self.fc2 = nn.Linear(config.projection_hidden_size, config.projection_hidden_size)
        self.fc3 = nn.Linear(config.projection_hidden_size, config.projection_dim)
        self.act = nn.GELU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(hidden_states)))))


@dataclass
class DenseCLViTPreTrainingOutput(ModelOutput):
    r"""
    Output of [`DenseCLViTForPreTraining`]. Every embedding is L2-normalised.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `pixel_values_2` is given):
            The pre-training loss selected by `config.pretraining_loss`.
        global_embeddings (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            Projected [CLS] embedding of the first view.
        local_embeddings (`torch.FloatTensor` of shape `(batch_size, num_patches, projection_dim)`):
            Projected patch embeddings of the first view, row-major over the patch grid.
        global_embeddings_2 (`torch.FloatTensor` of shape `(batch_size, projection_dim)`, *optional*):
            Projected [CLS] embedding of the second view.
        local_embeddings_2 (`torch.FloatTensor` of shape `(batch_size, num_patches_2, projection_dim)`, *optional*):
            Projected patch embeddings of the second view.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The encoder's embeddings and block outputs for the first view, `L + 1` tensors `(B, 1 + N, D)`.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            The attention probabilities of every block for the first view, `(B, heads, 1 + N, 1 + N)` each.
        hidden_states_2 (`tuple(torch.FloatTensor)`, *optional*):
            The same as `hidden_states` for the second view.
        attentions_2 (`tuple(torch.FloatTensor)`, *optional*):
            The same as `attentions` for the second view.
    """

    loss: torch.FloatTensor | None = None
    global_embeddings: torch.FloatTensor | None = None
    local_embeddings: torch.FloatTensor | None = None
    global_embeddings_2: torch.FloatTensor | None = None
    local_embeddings_2: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    hidden_states_2: tuple[torch.FloatTensor, ...] | None = None
    attentions_2: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class DenseCLViTViewGeometry:
    """Where the two views of each image come from: crop boxes (B, 4) as (left, top, width, height) in source
    pixels, horizontal flips (B,), and the (rows, cols) patch grid of each view."""

    crop_boxes: torch.Tensor
    flips: torch.Tensor
    crop_boxes_2: torch.Tensor
    flips_2: torch.Tensor
    grid_size: tuple[int, int]
    grid_size_2: tuple[int, int]

    def boxes_and_flips(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.crop_boxes, self.flips, self.crop_boxes_2, self.flips_2


def split_views(
    outputs: BaseModelOutputWithPooling,
) -> tuple[BaseModelOutputWithPooling, BaseModelOutputWithPooling]:
    """The encoder's output for a (2B, ...) batch of both views -> one output per view, every tensor halved."""

    def halves(tensors: tuple[torch.Tensor, ...] | None) -> tuple[tuple | None, tuple | None]:
        if tensors is None:
            return None, None
        first, second = zip(*(tensor.chunk(2) for tensor in tensors))
        return first, second

    hidden_1, hidden_2 = halves(outputs.hidden_states)
    attentions_1, attentions_2 = halves(outputs.attentions)
    last_1, last_2 = outputs.last_hidden_state.chunk(2)
    return (
        BaseModelOutputWithPooling(last_hidden_state=last_1, hidden_states=hidden_1, attentions=attentions_1),
        BaseModelOutputWithPooling(last_hidden_state=last_2, hidden_states=hidden_2, attentions=attentions_2),
    )


class DenseCLViTForPreTraining(DenseCLViTPreTrainedModel):
    """Encoder + projection head trained by `config.pretraining_loss`: the paper's local-to-global loss by default,
    or a weighted sum with the global InfoNCE baseline and the dense local-to-local term."""

    def __init__(self, config: DenseCLViTConfig):
        super().__init__(config)
        self.densecl_vit = DenseCLViTModel(config)
        self.projection = DenseCLViTProjectionHead(config)
        self.post_init()

    def embed(
        self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple[torch.Tensor, torch.Tensor, BaseModelOutputWithPooling]:
        """Images (B, 3, H, W) -> normalised global (B, P) and local (B, N, P) embeddings, and the encoder's output
        (which carries hidden states and attentions when `kwargs` ask for them)."""
        outputs = self.densecl_vit(pixel_values, **kwargs)
        embeddings = nn.functional.normalize(
            self.projection(outputs.last_hidden_state), dim=-1
        )  # (B, 1 + N, P)
        return embeddings[:, 0], embeddings[:, 1:], outputs

    def contrastive_loss(
        self,
        global_embeddings: torch.Tensor,
        local_embeddings: torch.Tensor,
        global_embeddings_2: torch.Tensor,
        local_embeddings_2: torch.Tensor,
        geometry: DenseCLViTViewGeometry | None = None,
    ) -> torch.Tensor:
        """The loss named by `config.pretraining_loss` on normalised (B, P) global and (B, N, P) local embeddings.

        The local-local term needs `geometry` (the crop boxes, flips and patch grids of both views). With
        `config.gather_negatives` under torch.distributed, the negatives come from the projected embeddings of
        every process (gathered with gradients); the positives stay this process's own.
        """
        gather = self.config.gather_negatives and dist.is_available() and dist.is_initialized()
        offset = rank_batch_offset(global_embeddings.shape[0]) if gather else 0

        gathered: dict[int, torch.Tensor] = {}  # one all-gather per tensor, however many terms read it

        def negatives(embeddings: torch.Tensor) -> torch.Tensor | None:
            if not gather:
                return None
            if id(embeddings) not in gathered:
                gathered[id(embeddings)] = gather_with_grad(embeddings)
            return gathered[id(embeddings)]

        temperature = self.config.loss_temperature
        losses = []
        for weight, term in parse_pretraining_loss(self.config.pretraining_loss):
            if term == "local-global":
                detach = self.config.cls_stop_gradient
                loss = symmetric_local_global_loss(
                    global_embeddings.detach() if detach else global_embeddings,
                    local_embeddings,
                    global_embeddings_2.detach() if detach else global_embeddings_2,
                    local_embeddings_2,
                    temperature,
                    negatives(local_embeddings),
                    negatives(local_embeddings_2),
                    batch_offset=offset,
                )
            elif term == "global":
                loss = global_info_nce(
                    global_embeddings,
                    global_embeddings_2,
                    temperature,
                    negatives(global_embeddings),
                    negatives(global_embeddings_2),
                    batch_offset=offset,
                )
            else:
                if geometry is None:
                    raise ValueError(
                        "the local-local loss needs each view's crop box and flip: pass crop_boxes, flips, "
                        "crop_boxes_2 and flips_2 (the pre-training data path returns them)."
                    )
                loss = local_local_info_nce(
                    local_embeddings,
                    local_embeddings_2,
                    *geometry.boxes_and_flips(),
                    temperature,
                    geometry.grid_size,
                    geometry.grid_size_2,
                    negatives(local_embeddings),
                    negatives(local_embeddings_2),
                    batch_offset=offset,
                )
            losses.append(loss if weight == 1.0 else weight * loss)
        return sum(losses[1:], losses[0])

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_values_2: torch.Tensor | None = None,
        crop_boxes: torch.Tensor | None = None,
        flips: torch.Tensor | None = None,
        crop_boxes_2: torch.Tensor | None = None,
        flips_2: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DenseCLViTPreTrainingOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            First augmented view of each image.
        pixel_values_2 (`torch.FloatTensor` of shape `(batch_size, num_channels, height_2, width_2)`, *optional*):
            Second view; when given, the loss is computed. Views of the same size go through the encoder as one
            batch of 2B images.
        crop_boxes (`torch.FloatTensor` of shape `(batch_size, 4)`, *optional*):
            Crop box (left, top, width, height) of the first view in source pixels; needed by the local-local loss.
        flips (`torch.BoolTensor` of shape `(batch_size,)`, *optional*):
            Whether the first view was flipped horizontally after cropping; needed by the local-local loss.
        crop_boxes_2 (`torch.FloatTensor` of shape `(batch_size, 4)`, *optional*):
            Crop box of the second view.
        flips_2 (`torch.BoolTensor` of shape `(batch_size,)`, *optional*):
            Flips of the second view.
        output_hidden_states, output_attentions (`bool`, *optional*):
            Return the encoder's hidden states and attentions, per view.
        """
        global_2 = local_2 = loss = outputs_2 = None
        if pixel_values_2 is None:
            global_1, local_1, outputs_1 = self.embed(pixel_values, **kwargs)
        else:
            if pixel_values_2.shape[0] != pixel_values.shape[0]:
                raise ValueError(
                    f"both views need the same batch size, got {pixel_values.shape[0]} and {pixel_values_2.shape[0]}."
                )
            if pixel_values.shape == pixel_values_2.shape:
                # One encoder pass over (2B, 3, H, W), split back into the two views afterwards.
                global_both, local_both, outputs_both = self.embed(
                    torch.cat([pixel_values, pixel_values_2]), **kwargs
                )
                global_1, global_2 = global_both.chunk(2)
                local_1, local_2 = local_both.chunk(2)
                outputs_1, outputs_2 = split_views(outputs_both)
            else:
                global_1, local_1, outputs_1 = self.embed(pixel_values, **kwargs)
                global_2, local_2, outputs_2 = self.embed(pixel_values_2, **kwargs)
            geometry = None
            if (
                crop_boxes is not None
                and flips is not None
                and crop_boxes_2 is not None
                and flips_2 is not None
            ):
                patch = self.config.patch_size
                geometry = DenseCLViTViewGeometry(
                    crop_boxes,
                    flips,
                    crop_boxes_2,
                    flips_2,
                    (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch),
                    (pixel_values_2.shape[-2] // patch, pixel_values_2.shape[-1] // patch),
                )
            loss = self.contrastive_loss(global_1, local_1, global_2, local_2, geometry)
        return DenseCLViTPreTrainingOutput(
            loss=loss,
            global_embeddings=global_1,
            local_embeddings=local_1,
            global_embeddings_2=global_2,
            local_embeddings_2=local_2,
            hidden_states=outputs_1.hidden_states,
            attentions=outputs_1.attentions,
            hidden_states_2=outputs_2.hidden_states if outputs_2 is not None else None,
            attentions_2=outputs_2.attentions if outputs_2 is not None else None,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Dense-prediction decoders (UPerNet after BEiT / mmsegmentation, up-projection for depth)
# ---------------------------------------------------------------------------------------------------------------------


class DenseCLViTConvModule(nn.Module):
    """Conv (no bias, 'same' padding) -> BatchNorm -> ReLU: mmsegmentation's ConvModule, the decoders' brick."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(hidden_states)))


class DenseCLViTFeaturePyramid(nn.Module):
    """Four single-scale ViT maps at stride p -> a pyramid at strides p/4, p/2, p and 2p (BEiT's fpn1..fpn4).

    For p = 16 the strides are 4, 8, 16 and 32, the levels a convolutional backbone would give UPerNet.
    """

    def __init__(self, config: DenseCLViTConfig):
        super().__init__()
        dim = config.hidden_size
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
        )
        self.fpn2 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """4 x (B, D, h, w) -> (B, D, 4h, 4w), (B, D, 2h, 2w), (B, D, h, w), (B, D, h/2, w/2)."""
        rescales = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        return [rescale(features) for rescale, features in zip(rescales, feature_maps, strict=True)]


class DenseCLViTPyramidPooling(nn.Module):
    """PSPNet's pyramid pooling on the coarsest level: average-pool to each of `config.pool_scales`, project,
    upsample back, concatenate with the input and fuse: (B, D, h, w) -> (B, C, h, w)."""

    def __init__(self, config: DenseCLViTConfig):
        super().__init__()
        dim, channels = config.hidden_size, config.decoder_hidden_size
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), DenseCLViTConvModule(dim, channels, 1))
            for scale in config.pool_scales
        )
        self.bottleneck = DenseCLViTConvModule(dim + len(config.pool_scales) * channels, channels, 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        size = features.shape[-2:]
        pooled = [resize_to(stage(features), size) for stage in self.stages]
        return self.bottleneck(torch.cat([features, *pooled], dim=1))


class DenseCLViTUperNetDecoder(nn.Module):
    """UPerNet (Xiao et al., 2018) on a ViT, as BEiT uses it: the shared decoder of the segmentation and depth models.

    The outputs of blocks `config.out_indices` become a 4-level pyramid (`DenseCLViTFeaturePyramid`); pyramid
    pooling runs on the coarsest level, lateral 1x1 convolutions and a top-down pass merge the levels, 3x3
    convolutions smooth them, and the four maps, upsampled to the finest level, are concatenated and fused by a 3x3
    convolution into (B, C, 4h, 4w) with C = `config.decoder_hidden_size` (H/4 x W/4 for patch size 16).
    Each task model puts its own 1x1 convolution on top.

    The blocks' outputs are taken before the encoder's final LayerNorm, as in BEiT; the decoder's BatchNorms
    standardise them. Training needs more than one image per BatchNorm (per process, or SyncBatchNorm).
    """

    def __init__(self, config: DenseCLViTConfig):
        super().__init__()
        dim, channels = config.hidden_size, config.decoder_hidden_size
        self.out_indices = list(config.out_indices)
        self.pyramid = DenseCLViTFeaturePyramid(config)
        self.psp = DenseCLViTPyramidPooling(config)
        self.lateral_convs = nn.ModuleList(DenseCLViTConvModule(dim, channels, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(DenseCLViTConvModule(channels, channels, 3) for _ in range(3))
        self.fpn_bottleneck = DenseCLViTConvModule(4 * channels, channels, 3)

    def feature_pyramid(
        self, hidden_states: tuple[torch.Tensor, ...], grid_size: tuple[int, int]
    ) -> list[torch.Tensor]:
        """Encoder hidden states (embeddings, block 1, ..., block L), each (B, 1 + h*w, D) -> 4 pyramid levels."""
        feature_maps = [patch_tokens_to_map(hidden_states[index], grid_size) for index in self.out_indices]
        return self.pyramid(feature_maps)

    def fuse(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """4 pyramid levels, finest first -> fused features (B, C, h0, w0) at the finest level's size."""
        laterals = [conv(level) for conv, level in zip(self.lateral_convs, levels[:3])]
        laterals.append(self.psp(levels[3]))
        # Top-down: each level receives the coarser one upsampled to its size.
        for i in range(3, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_to(laterals[i], laterals[i - 1].shape[-2:])
        outputs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals[:3])] + [laterals[3]]
        size = outputs[0].shape[-2:]
        return self.fpn_bottleneck(torch.cat([resize_to(output, size) for output in outputs], dim=1))

    def forward(self, hidden_states: tuple[torch.Tensor, ...], grid_size: tuple[int, int]) -> torch.Tensor:
        return self.fuse(self.feature_pyramid(hidden_states, grid_size))


class DenseCLViTFCNHead(nn.Module):
    """Auxiliary FCN head of UPerNet training (mmsegmentation's setting for BEiT): 3x3 conv-BN-ReLU of width
    `config.auxiliary_hidden_size`, then a 1x1 classifier. (B, D, h, w) -> (B, num_labels, h, w)."""

    def __init__(self, config: DenseCLViTConfig):
        super().__init__()
        self.conv = DenseCLViTConvModule(config.hidden_size, config.auxiliary_hidden_size, 3)
        self.classifier = nn.Conv2d(config.auxiliary_hidden_size, config.num_labels, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv(features))


class DenseCLViTUpProjectionDecoder(nn.Module):
    """The 'linear' depth head: from the patch grid back to input resolution by stride-2 up-projection stages.

    log2(patch_size) stages (4 for patch 16), each a 3x3 conv-BN-ReLU followed by bilinear x2 upsampling; the
    first stage has `config.depth_head_hidden_size` channels and each next one half as many.
    (B, D, h, w) -> (B, C_last, h * 2^stages, w * 2^stages).
    """

    def __init__(self, config: DenseCLViTConfig):
        super().__init__()
        num_stages = max(1, int(math.log2(config.patch_size)))
        channels = [max(1, config.depth_head_hidden_size // 2**i) for i in range(num_stages)]
        in_channels = [config.hidden_size] + channels[:-1]
        self.stages = nn.ModuleList(
            DenseCLViTConvModule(c_in, c_out, 3) for c_in, c_out in zip(in_channels, channels)
        )
        self.out_channels = channels[-1]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            # Convolve at the coarser resolution, then upsample: 4x fewer multiply-adds than the other order.
            features = nn.functional.interpolate(
                stage(features), scale_factor=2, mode="bilinear", align_corners=False
            )
        return features


class DenseCLViTDPTReassembleLayer(nn.Module):
    """One level of DPT's reassemble stage: a 1x1 projection to `channels`, then a rescale by `factor`
    (transposed convolution up, identity, or a strided 3x3 convolution down)."""

    def __init__(self, config: DenseCLViTConfig, channels: int, factor: float):
        super().__init__()
        self.projection = nn.Conv2d(config.hidden_size, channels, kernel_size=1)
        if factor > 1:
            self.resize = nn.ConvTranspose2d(channels, channels, kernel_size=int(factor), stride=int(factor))
        elif factor == 1:
            self.resize = nn.Identity()
        else:
            self.resize = nn.Conv2d(channels, channels, kernel_size=3, stride=int(1 / factor), padding=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.resize(self.projection(features))


class DenseCLViTDPTResidualUnit(nn.Module):
    """DPT's pre-activation residual unit: x + conv(relu(conv(relu(x)))), 3x3 convolutions with bias."""

    def __init__(self, config: DenseCLViTConfig):
        super().__init__()
        channels = config.dpt_fusion_hidden_size
        self.activation1 = nn.ReLU()
        self.convolution1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.activation2 = nn.ReLU()
        self.convolution2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.convolution2(self.activation2(self.convolution1(self.activation1(features))))


class DenseCLViTDPTFusionLayer(nn.Module):
    """One DPT fusion step: add the refined finer level to the coarser result, refine, upsample (to `size`, else
    x2, bilinear with aligned corners as DPT does) and project 1x1."""

    def __init__(self, config: DenseCLViTConfig):
        super().__init__()
        channels = config.dpt_fusion_hidden_size
        self.projection = nn.Conv2d(channels, channels, kernel_size=1)
        self.residual_layer1 = DenseCLViTDPTResidualUnit(config)
        self.residual_layer2 = DenseCLViTDPTResidualUnit(config)

    def forward(
        self,
        features: torch.Tensor,
        level: torch.Tensor | None = None,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        if level is not None:
            if level.shape != features.shape:
                level = nn.functional.interpolate(
                    level, size=features.shape[-2:], mode="bilinear", align_corners=False
                )
            features = features + self.residual_layer1(level)
        features = self.residual_layer2(features)
        resize = {"scale_factor": 2} if size is None else {"size": size}
        features = nn.functional.interpolate(features, **resize, mode="bilinear", align_corners=True)
        return self.projection(features)


class DenseCLViTDPTNeck(nn.Module):
    """DPT's neck (Ranftl et al., 2021) as Depth Anything builds it on a ViT.

    Four token maps (B, D, h, w) are reassembled to strides p/4, p/2, p, 2p with `config.dpt_neck_hidden_sizes`
    channels, brought to `config.dpt_fusion_hidden_size` channels by 3x3 convolutions, and fused coarse to fine;
    the result is (B, F, 8h, 8w).
    """

    factors = (4, 2, 1, 0.5)

    def __init__(self, config: DenseCLViTConfig):
        super().__init__()
        sizes, fusion = config.dpt_neck_hidden_sizes, config.dpt_fusion_hidden_size
        self.out_indices = list(config.out_indices)
        self.reassemble = nn.ModuleList(
            DenseCLViTDPTReassembleLayer(config, channels, factor)
            for channels, factor in zip(sizes, self.factors, strict=True)
        )
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, fusion, kernel_size=3, padding=1, bias=False) for channels in sizes
        )
        self.fusion = nn.ModuleList(DenseCLViTDPTFusionLayer(config) for _ in sizes)

    def forward(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        levels = [conv(layer(maps)) for conv, layer, maps in zip(self.convs, self.reassemble, feature_maps)]
        levels = levels[::-1]  # coarsest first
        fused = None
        for i, (level, layer) in enumerate(zip(levels, self.fusion)):
            size = tuple(levels[i + 1].shape[-2:]) if i + 1 < len(levels) else None
            fused = layer(level, size=size) if fused is None else layer(fused, level, size=size)
        return fused


class DenseCLViTDPTHead(nn.Module):
    """Depth Anything's head: 3x3 conv to F/2, bilinear upsampling to the input size, 3x3 conv to
    `config.dpt_head_hidden_size`, ReLU, 1x1 conv to one channel. (B, F, 8h, 8w) -> (B, 1, H, W), before the
    output activation."""

    def __init__(self, config: DenseCLViTConfig):
        super().__init__()
        channels = config.dpt_fusion_hidden_size
        self.conv1 = nn.Conv2d(channels, channels // 2, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels // 2, config.dpt_head_hidden_size, kernel_size=3, padding=1)
        self.activation = nn.ReLU()
        self.conv3 = nn.Conv2d(config.dpt_head_hidden_size, 1, kernel_size=1)

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        features = nn.functional.interpolate(self.conv1(features), size, mode="bilinear", align_corners=True)
        return self.conv3(self.activation(self.conv2(features)))


# ---------------------------------------------------------------------------------------------------------------------
# Semantic segmentation
# ---------------------------------------------------------------------------------------------------------------------


class DenseCLViTForSemanticSegmentation(DenseCLViTPreTrainedModel):
    """Encoder + segmentation head selected by `config.decode_head`.

    - `"linear"`: the linear protocol of the paper, one linear layer on each final (LayerNorm-ed) patch token. No
      BatchNorm is added: the final LayerNorm already standardises the tokens, and a plain linear layer keeps the
      probe a measure of the encoder alone.
    - `"upernet"`: `DenseCLViTUperNetDecoder` + 1x1 classifier, with an optional auxiliary FCN head on the third
      pyramid level (stride p) that adds `config.auxiliary_loss_weight` times its loss during training.

    Logits are upsampled bilinearly to the input size, so the loss and the pipelines see full resolution.
    """

    def __init__(self, config: DenseCLViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.densecl_vit = DenseCLViTModel(config)
        self.decode_head = self.auxiliary_head = None
        if config.decode_head == "upernet":
            self.decode_head = DenseCLViTUperNetDecoder(config)
            self.classifier = nn.Conv2d(config.decoder_hidden_size, config.num_labels, kernel_size=1)
            if config.use_auxiliary_head:
                self.auxiliary_head = DenseCLViTFCNHead(config)
        else:
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def segmentation_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Pixel-wise cross-entropy of (B, K, H, W) logits against (B, H, W) class ids, ignoring the ignore index."""
        return nn.functional.cross_entropy(
            logits, labels.long(), ignore_index=self.config.semantic_loss_ignore_index
        )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SemanticSegmenterOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images; height and width must be multiples of `config.patch_size`.
        labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            Class ids per pixel; `config.semantic_loss_ignore_index` marks pixels left out of the loss.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        size = tuple(pixel_values.shape[-2:])
        if labels is not None:
            if self.num_labels < 2:
                raise ValueError(
                    f"segmentation needs num_labels >= 2, got {self.num_labels}; set num_labels."
                )
            if labels.shape != (pixel_values.shape[0], *size):
                raise ValueError(
                    f"labels must be (batch, height, width) = {(pixel_values.shape[0], *size)}, "
                    f"got {tuple(labels.shape)}."
                )
        outputs = self.densecl_vit(
            pixel_values, output_hidden_states=output_hidden_states or self.decode_head is not None, **kwargs
        )
        grid_size = self.densecl_vit.patch_grid(pixel_values)
        levels = None
        if self.decode_head is not None:
            levels = self.decode_head.feature_pyramid(outputs.hidden_states, grid_size)
            logits = self.classifier(self.decode_head.fuse(levels))  # (B, K, 4h, 4w)
        else:
            # (B, N, D) -> (B, N, K) -> (B, K, h, w)
            patch_logits = self.classifier(outputs.last_hidden_state[:, 1:])
            logits = patch_logits.transpose(1, 2).reshape(patch_logits.shape[0], -1, *grid_size)
        logits = resize_to(logits, size)

        loss = None
        if labels is not None:
            loss = self.segmentation_loss(logits, labels)
            if self.auxiliary_head is not None:
                auxiliary_logits = resize_to(self.auxiliary_head(levels[2]), size)
                loss = loss + self.config.auxiliary_loss_weight * self.segmentation_loss(
                    auxiliary_logits, labels
                )
        return SemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            attentions=outputs.attentions,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Monocular depth estimation
# ---------------------------------------------------------------------------------------------------------------------


class DenseCLViTForDepthEstimation(DenseCLViTPreTrainedModel):
    """Encoder + depth head selected by `config.depth_head`, predicting metric depth in metres.

    - `"linear"`: `DenseCLViTUpProjectionDecoder` on the final patch tokens, back to input resolution.
    - `"upernet"`: `DenseCLViTUperNetDecoder` (same as segmentation), upsampled to input resolution.
    - `"dpt"`: `DenseCLViTDPTNeck` + `DenseCLViTDPTHead` on the blocks `config.out_indices` after the final
      LayerNorm: numerically transformers' `DepthAnythingForDepthEstimation` (metric) over a `Dinov2Backbone`, so
      it is released as that stock class.

    A 1x1 convolution gives one channel x; the output is a sigmoid dilated to the dataset's depth range,
    depth = min_depth + (max_depth - min_depth) * sigmoid(x), so every prediction lies inside the range. The DPT
    head keeps Depth Anything's metric output, depth = max_depth * sigmoid(x): the same dilated sigmoid with its
    lower end at 0 instead of min_depth, so predictions lie in (0, max_depth); min_depth then only marks
    ground-truth pixels as invalid (loss and metrics), and evaluation clips predictions to [min_depth, max_depth].
    """

    def __init__(self, config: DenseCLViTConfig):
        super().__init__(config)
        self.densecl_vit = DenseCLViTModel(config)
        if config.depth_head == "dpt":
            self.decode_head = DenseCLViTDPTNeck(config)
            self.regressor = DenseCLViTDPTHead(config)
        elif config.depth_head == "upernet":
            self.decode_head = DenseCLViTUperNetDecoder(config)
            self.regressor = nn.Conv2d(config.decoder_hidden_size, 1, kernel_size=1)
        else:
            self.decode_head = DenseCLViTUpProjectionDecoder(config)
            self.regressor = nn.Conv2d(self.decode_head.out_channels, 1, kernel_size=1)
        self.post_init()

    def depth_from_features(
        self, outputs: BaseModelOutputWithPooling, grid_size: tuple[int, int], size: tuple[int, int]
    ) -> torch.Tensor:
        """Encoder outputs -> (B, H, W) depth in metres at the input size `size`."""
        if self.config.depth_head == "dpt":
            # Dinov2Backbone's feature maps: the chosen blocks after the final LayerNorm, as (B, D, h, w) grids.
            feature_maps = [
                patch_tokens_to_map(self.densecl_vit.layernorm(outputs.hidden_states[index]), grid_size)
                for index in self.decode_head.out_indices
            ]
            logits = self.regressor(self.decode_head(feature_maps), size).squeeze(1)
            return self.config.max_depth * torch.sigmoid(logits)
        if self.config.depth_head == "upernet":
            features = self.decode_head(outputs.hidden_states, grid_size)
        else:
            features = self.decode_head(patch_tokens_to_map(outputs.last_hidden_state, grid_size))
        # Resize before the sigmoid so that interpolation cannot leave the depth range: (B, 1, H, W) -> (B, H, W).
        logits = resize_to(self.regressor(features), size).squeeze(1)
        depth_range = self.config.max_depth - self.config.min_depth
        return self.config.min_depth + depth_range * torch.sigmoid(logits)

    def depth_loss(self, predicted_depth: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """berHu + gradient_loss_weight * L2 gradient loss over the pixels whose (B, H, W) ground truth is finite
        and strictly inside (min_depth, max_depth)."""
        valid = torch.isfinite(labels) & (labels > self.config.min_depth) & (labels < self.config.max_depth)
        # Invalid pixels never enter the losses; zeroing them keeps NaN/inf out of every intermediate tensor.
        target = torch.where(valid, labels, torch.zeros_like(labels)).to(predicted_depth.dtype)
        berhu = berhu_loss(predicted_depth, target, valid, threshold=self.config.berhu_threshold)
        return berhu + self.config.gradient_loss_weight * gradient_loss(predicted_depth, target, valid)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DepthEstimatorOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images; height and width must be multiples of `config.patch_size`.
        labels (`torch.FloatTensor` of shape `(batch_size, height, width)`, *optional*):
            Ground-truth depth in metres; pixels that are 0, non-finite or outside (min_depth, max_depth) are
            left out of the loss.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        size = tuple(pixel_values.shape[-2:])
        if labels is not None and labels.shape != (pixel_values.shape[0], *size):
            raise ValueError(
                f"labels must be (batch, height, width) = {(pixel_values.shape[0], *size)}, got {tuple(labels.shape)}."
            )
        outputs = self.densecl_vit(
            pixel_values,
            output_hidden_states=output_hidden_states or self.config.depth_head != "linear",
            **kwargs,
        )
        predicted_depth = self.depth_from_features(outputs, self.densecl_vit.patch_grid(pixel_values), size)

        loss = self.depth_loss(predicted_depth, labels) if labels is not None else None
        return DepthEstimatorOutput(
            loss=loss,
            predicted_depth=predicted_depth,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            attentions=outputs.attentions,
        )


__all__ = [
    "DenseCLViTForDepthEstimation",
    "DenseCLViTForPreTraining",
    "DenseCLViTForSemanticSegmentation",
    "DenseCLViTModel",
    "DenseCLViTPreTrainedModel",
    "DenseCLViTPreTrainingOutput",
    "DenseCLViTUperNetDecoder",
]
