"""DenseCL-ViT model configuration."""

import math

from transformers import PretrainedConfig

# The three sizes of the paper (ViT/16, as in DeiT/timm): hidden size, depth, heads.
PRESETS = {
    "vit-tiny": {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3},
    "vit-small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6},
    "vit-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
}
PRESET_ALIASES = {
    "ti": "vit-tiny",
    "tiny": "vit-tiny",
    "vit-ti": "vit-tiny",
    "vit-tiny-patch16": "vit-tiny",
    "s": "vit-small",
    "small": "vit-small",
    "vit-s": "vit-small",
    "vit-small-patch16": "vit-small",
    "b": "vit-base",
    "base": "vit-base",
    "vit-b": "vit-base",
    "vit-base-patch16": "vit-base",
}


def preset_name(name: str) -> str | None:
    """The PRESETS key that `name` (a preset or an alias, any case) stands for; None for any other name."""
    key = PRESET_ALIASES.get(name.lower(), name.lower())
    return key if key in PRESETS else None


class DenseCLViTConfig(PretrainedConfig):
    r"""
    Configuration of a DenseCL-ViT model: a pre-norm Vision Transformer with a [CLS] token and learnable absolute
    position embeddings, plus the fields of its pre-training projection head and of its segmentation and depth heads.

    Args:
        hidden_size (`int`, *optional*, defaults to 768):
            Width of the token embeddings.
        num_hidden_layers (`int`, *optional*, defaults to 12):
            Number of Transformer blocks.
        num_attention_heads (`int`, *optional*, defaults to 12):
            Number of attention heads; must divide `hidden_size`.
        mlp_ratio (`float`, *optional*, defaults to 4.0):
            Ratio of the MLP hidden width to `hidden_size`.
        intermediate_size (`int`, *optional*):
            MLP hidden width, transformers' ViT name for it: sets `mlp_ratio = intermediate_size / hidden_size`.
            Reading `config.intermediate_size` gives `int(hidden_size * mlp_ratio)` either way.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the MLP blocks (exact erf GELU, as timm's ViT).
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of every LayerNorm.
        image_size (`int`, *optional*, defaults to 224):
            Resolution the position embeddings are stored at; other sizes are interpolated bicubically.
        patch_size (`int`, *optional*, defaults to 16):
            Side of the square patches.
        num_channels (`int`, *optional*, defaults to 3):
            Number of input channels.
        qkv_bias (`bool`, *optional*, defaults to `True`):
            Whether the query/key/value projection has a bias.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout after the attention projection and the MLP.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout on the attention probabilities.
        drop_path_rate (`float`, *optional*, defaults to 0.0):
            Stochastic depth rate of the last block; block `i` uses `drop_path_rate * i / (L - 1)`.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal initialisation of linear layers and embeddings.
        projection_hidden_size (`int`, *optional*, defaults to 2048):
            Hidden width of the 3-layer pre-training projection MLP.
        projection_dim (`int`, *optional*, defaults to 256):
            Output width of the projection MLP (the space the contrastive loss works in).
        loss_temperature (`float`, *optional*, defaults to 0.1):
            Temperature of the InfoNCE losses.
        pretraining_loss (`str`, *optional*, defaults to `"local-global"`):
            The pre-training loss: one term or a weighted sum of terms joined by `+`, each `term` or `weight*term`,
            e.g. `"local-global"` (the paper's loss), `"global"` (SimCLR's InfoNCE, a baseline), `"local-local"`
            (dense InfoNCE between corresponding patches of the two views) or `"0.25*local-global+local-local"`.
            `"both"` is the older name of `"local-global+global"`.
        cls_stop_gradient (`bool`, *optional*, defaults to `False`):
            Detach the [CLS] embeddings in the local-global term, so it trains the patches towards them but not
            the [CLS] token towards the patches.
        gather_negatives (`bool`, *optional*, defaults to `False`):
            Take negatives from every process (all-gather with gradients) instead of the local batch only.
        decode_head (`str`, *optional*, defaults to `"linear"`):
            Segmentation head: `"linear"` (per-patch linear classifier) or `"upernet"`.
        out_indices (`list[int]`, *optional*):
            1-based block numbers whose outputs feed the UPerNet heads; defaults to `[L/3, L/2, 2L/3, L]`
            (blocks 4, 6, 8, 12 of 12).
        decoder_hidden_size (`int`, *optional*, defaults to 512):
            Channel width of the UPerNet decoder.
        pool_scales (`list[int]`, *optional*, defaults to `[1, 2, 3, 6]`):
            Output sizes of the pyramid-pooling module.
        use_auxiliary_head (`bool`, *optional*, defaults to `True`):
            Whether the UPerNet segmentation model adds an auxiliary FCN head on the third feature level.
        auxiliary_loss_weight (`float`, *optional*, defaults to 0.4):
            Weight of the auxiliary head's loss.
        auxiliary_hidden_size (`int`, *optional*, defaults to 256):
            Channel width of the auxiliary FCN head.
        semantic_loss_ignore_index (`int`, *optional*, defaults to 255):
            Label value ignored by the segmentation loss.
        depth_head (`str`, *optional*, defaults to `"linear"`):
            Depth head: `"linear"` (four up-projection stages), `"upernet"`, or `"dpt"` (the DPT neck and metric head
            of Depth Anything on the blocks `out_indices`, numerically transformers' `DepthAnythingForDepthEstimation`
            with `depth_estimation_type="metric"`; its output is `max_depth * sigmoid(x)`, in (0, max_depth)).
        depth_head_hidden_size (`int`, *optional*, defaults to 256):
            Channels after the first up-projection stage of the linear depth head (halved at each stage).
        dpt_neck_hidden_sizes (`list[int]`, *optional*):
            Channels of the four reassembled levels of the DPT head; defaults to `[D/8, D/4, D/2, D]` for hidden size
            D, the ratios of Depth Anything.
        dpt_fusion_hidden_size (`int`, *optional*, defaults to 64):
            Channels of the DPT fusion stage.
        dpt_head_hidden_size (`int`, *optional*, defaults to 32):
            Channels of the DPT head's last hidden convolution.
        min_depth (`float`, *optional*, defaults to 1e-3):
            Lower end of the predicted depth range, in metres.
        max_depth (`float`, *optional*, defaults to 10.0):
            Upper end of the predicted depth range, in metres (the output is a sigmoid dilated to this range).
        berhu_threshold (`float`, *optional*, defaults to 0.2):
            berHu switches from L1 to L2 at `berhu_threshold * max|residual|`.
        gradient_loss_weight (`float`, *optional*, defaults to 0.5):
            Weight of the L2 gradient (smoothness) term of the depth loss.
    """

    model_type = "densecl_vit"

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        mlp_ratio: float = 4.0,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-6,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        qkv_bias: bool = True,
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        drop_path_rate: float = 0.0,
        initializer_range: float = 0.02,
        projection_hidden_size: int = 2048,
        projection_dim: int = 256,
        loss_temperature: float = 0.1,
        pretraining_loss: str = "local-global",
        cls_stop_gradient: bool = False,
        gather_negatives: bool = False,
        decode_head: str = "linear",
        out_indices: list[int] | None = None,
        decoder_hidden_size: int = 512,
        pool_scales: list[int] | tuple[int, ...] = (1, 2, 3, 6),
        use_auxiliary_head: bool = True,
        auxiliary_loss_weight: float = 0.4,
        auxiliary_hidden_size: int = 256,
        semantic_loss_ignore_index: int = 255,
        depth_head: str = "linear",
        depth_head_hidden_size: int = 256,
        dpt_neck_hidden_sizes: list[int] | None = None,
        dpt_fusion_hidden_size: int = 64,
        dpt_head_hidden_size: int = 32,
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
        berhu_threshold: float = 0.2,
        gradient_loss_weight: float = 0.5,
        intermediate_size: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        if intermediate_size is not None:
            if mlp_ratio != 4.0 and int(hidden_size * mlp_ratio) != intermediate_size:
                raise ValueError(
                    f"intermediate_size {intermediate_size} and mlp_ratio {mlp_ratio} disagree for hidden_size "
                    f"{hidden_size}; pass only one of them."
                )
            self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.qkv_bias = qkv_bias
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.initializer_range = initializer_range
        self.projection_hidden_size = projection_hidden_size
        self.projection_dim = projection_dim
        self.loss_temperature = loss_temperature
        self.pretraining_loss = pretraining_loss
        self.cls_stop_gradient = cls_stop_gradient
        self.gather_negatives = gather_negatives
        self.decode_head = decode_head
        self.out_indices = (
            list(out_indices) if out_indices is not None else self.default_out_indices(num_hidden_layers)
        )
        self.decoder_hidden_size = decoder_hidden_size
        self.pool_scales = list(pool_scales)
        self.use_auxiliary_head = use_auxiliary_head
        self.auxiliary_loss_weight = auxiliary_loss_weight
        self.auxiliary_hidden_size = auxiliary_hidden_size
        self.semantic_loss_ignore_index = semantic_loss_ignore_index
        self.depth_head = depth_head
        self.depth_head_hidden_size = depth_head_hidden_size
        self.dpt_neck_hidden_sizes = (
            list(dpt_neck_hidden_sizes)
            if dpt_neck_hidden_sizes is not None
            else [max(1, hidden_size // 2**i) for i in (3, 2, 1, 0)]
        )
        self.dpt_fusion_hidden_size = dpt_fusion_hidden_size
        self.dpt_head_hidden_size = dpt_head_hidden_size
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.berhu_threshold = berhu_threshold
        self.gradient_loss_weight = gradient_loss_weight
        self.validate_fields()

    @property
    def intermediate_size(self) -> int:
        """MLP hidden width (transformers' ViT field), kept as `mlp_ratio` so configs stay timm-shaped."""
        return int(self.hidden_size * self.mlp_ratio)

    @intermediate_size.setter
    def intermediate_size(self, value: int) -> None:
        whole = isinstance(value, int) and not isinstance(value, bool) and value > 0
        ratio = value / self.hidden_size if whole else None
        # The ratio must give the width back through `int(hidden_size * mlp_ratio)`, as the MLP and timm compute it.
        if ratio is None or int(self.hidden_size * ratio) != value:
            raise ValueError(
                f"intermediate_size {value!r} gives no mlp_ratio that reproduces it with hidden_size "
                f"{self.hidden_size}; use a positive whole number such as a multiple of hidden_size."
            )
        self.mlp_ratio = ratio

    @staticmethod
    def default_out_indices(num_hidden_layers: int) -> list[int]:
        """Blocks L/3, L/2, 2L/3 and L (4, 6, 8, 12 for 12 layers), at least block 1, strictly increasing."""
        depth = num_hidden_layers
        picks = [max(1, round(depth / 3)), max(1, round(depth / 2)), max(1, round(2 * depth / 3)), depth]
        return [min(depth, p) for p in picks]

    def validate_fields(self) -> None:
        """Refuse settings no model can be built from, with a message that says what to change."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); pick a head count that divides the width."
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})."
            )
        terms = [term for _, term in parse_pretraining_loss(self.pretraining_loss)]
        if self.cls_stop_gradient and "local-global" not in terms:
            raise ValueError(
                f"cls_stop_gradient applies to the local-global term, which pretraining_loss "
                f"{self.pretraining_loss!r} lacks; drop it or add the term."
            )
        if self.decode_head not in ("linear", "upernet"):
            raise ValueError(f"decode_head must be 'linear' or 'upernet', got {self.decode_head!r}.")
        if self.depth_head not in ("linear", "upernet", "dpt"):
            raise ValueError(f"depth_head must be 'linear', 'upernet' or 'dpt', got {self.depth_head!r}.")
        if len(self.dpt_neck_hidden_sizes) != 4 or min(self.dpt_neck_hidden_sizes) < 1:
            raise ValueError(
                f"dpt_neck_hidden_sizes must be 4 positive channel counts, got {self.dpt_neck_hidden_sizes}."
            )
        if self.dpt_fusion_hidden_size < 2 or self.dpt_head_hidden_size < 1:
            raise ValueError(
                f"dpt_fusion_hidden_size must be >= 2 and dpt_head_hidden_size >= 1, got "
                f"{self.dpt_fusion_hidden_size} and {self.dpt_head_hidden_size}."
            )
        if self.loss_temperature <= 0:
            raise ValueError(f"loss_temperature must be positive, got {self.loss_temperature}.")
        if not 0 < self.min_depth < self.max_depth:
            raise ValueError(
                f"depth range must satisfy 0 < min_depth < max_depth, got [{self.min_depth}, {self.max_depth}]."
            )
        bad = [i for i in self.out_indices if not 1 <= i <= self.num_hidden_layers]
        if bad or len(self.out_indices) != 4:
            raise ValueError(
                f"out_indices must be 4 block numbers in 1..{self.num_hidden_layers}, got {self.out_indices}."
            )

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "DenseCLViTConfig":
        """A config for one of the paper's sizes: `vit-tiny`, `vit-small` or `vit-base` (aliases ti/s/b)."""
        key = preset_name(name)
        if key is None:
            names = ", ".join(sorted(PRESETS))
            raise ValueError(f"unknown preset {name!r}; choose one of {names} (or ti, s, b).")
        return cls(**{**PRESETS[key], **kwargs})


PRETRAINING_LOSS_TERMS = ("local-global", "global", "local-local")


def parse_pretraining_loss(spec: str) -> list[tuple[float, str]]:
    """`pretraining_loss` -> [(weight, term), ...]: "0.25*local-global+local-local" -> [(0.25, "local-global"),
    (1.0, "local-local")]; "both" -> the paper's term plus the global one. Refuses unknown or repeated terms."""
    spec = "local-global+global" if spec == "both" else spec
    terms: list[tuple[float, str]] = []
    for part in str(spec).replace(" ", "").split("+"):
        weight, _, term = part.rpartition("*")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = float("nan")
        if term not in PRETRAINING_LOSS_TERMS or not 0 < value < math.inf or term in [t for _, t in terms]:
            raise ValueError(
                f"pretraining_loss {spec!r}: each '+'-joined term must be one of {', '.join(PRETRAINING_LOSS_TERMS)}, "
                "at most once, optionally with a positive weight as in '0.25*local-global+local-local'."
            )
        terms.append((value, term))
    return terms


__all__ = ["DenseCLViTConfig", "PRETRAINING_LOSS_TERMS", "parse_pretraining_loss", "preset_name"]
