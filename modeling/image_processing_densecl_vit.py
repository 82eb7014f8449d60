"""Image processor for DenseCL-ViT: resize, rescale, normalise, plus the post-processing the pipelines call."""

import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_transforms import to_pil_image
from transformers.image_utils import PILImageResampling, to_numpy_array

# Remote code: this file imports only torch and transformers (PIL and NumPy are reached through transformers).
IMAGENET_DEFAULT_MEAN = [0.485, 0.456, 0.406]
IMAGENET_DEFAULT_STD = [0.229, 0.224, 0.225]
_RESAMPLE = {
    "nearest": PILImageResampling.NEAREST,
    "bilinear": PILImageResampling.BILINEAR,
    "bicubic": PILImageResampling.BICUBIC,
    0: PILImageResampling.NEAREST,
    2: PILImageResampling.BILINEAR,
    3: PILImageResampling.BICUBIC,
}


def _to_rgb_pil(image):
    """PIL image, (H, W[, C]) / (C, H, W) array or tensor -> RGB PIL image (floats in [0, 1] are rescaled)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not hasattr(image, "convert"):
        image = to_pil_image(image)
    return image.convert("RGB") if image.mode != "RGB" else image


class DenseCLViTImageProcessor(BaseImageProcessor):
    r"""
    Turns images into the normalised `pixel_values` a DenseCL-ViT model takes.

    Args:
        do_resize (`bool`, *optional*, defaults to `True`):
            Whether to resize the images.
        size (`dict`, *optional*, defaults to `{"height": 224, "width": 224}`):
            Either `{"height": h, "width": w}` (a fixed size) or `{"shortest_edge": s}` (keeps the aspect ratio).
        resample (`str` or `int`, *optional*, defaults to `"bicubic"`):
            Resampling filter: `"nearest"`, `"bilinear"` or `"bicubic"`.
        size_divisor (`int`, *optional*, defaults to 16):
            Output height and width are rounded to a multiple of this (the patch size).
        do_rescale (`bool`, *optional*, defaults to `True`):
            Whether to multiply pixel values by `rescale_factor`.
        rescale_factor (`float`, *optional*, defaults to 1/255):
            Scale that maps uint8 pixels to [0, 1].
        do_normalize (`bool`, *optional*, defaults to `True`):
            Whether to subtract `image_mean` and divide by `image_std`.
        image_mean (`list[float]`, *optional*, defaults to the ImageNet mean):
            Per-channel mean.
        image_std (`list[float]`, *optional*, defaults to the ImageNet standard deviation):
            Per-channel standard deviation.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        size: dict[str, int] | None = None,
        resample: str | int = "bicubic",
        size_divisor: int = 16,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.do_resize = do_resize
        self.size = dict(size) if size is not None else {"height": 224, "width": 224}
        self.resample = resample
        self.size_divisor = size_divisor
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean) if image_mean is not None else list(IMAGENET_DEFAULT_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(IMAGENET_DEFAULT_STD)
        if not ({"height", "width"} <= self.size.keys() or "shortest_edge" in self.size):
            raise ValueError(f"size must be {{'height', 'width'}} or {{'shortest_edge'}}, got {self.size}.")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be 'nearest', 'bilinear' or 'bicubic', got {self.resample!r}.")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of the given size is resized to."""
        if "shortest_edge" in self.size:
            scale = self.size["shortest_edge"] / min(height, width)
            height, width = height * scale, width * scale
        else:
            height, width = self.size["height"], self.size["width"]
        div = self.size_divisor or 1
        return max(div, int(round(height / div)) * div), max(div, int(round(width / div)) * div)

    def _preprocess_one(self, image, do_resize: bool, do_rescale: bool, do_normalize: bool) -> torch.Tensor:
        pil = _to_rgb_pil(image)
        if do_resize:
            height, width = self.output_size(pil.height, pil.width)
            if (height, width) != (pil.height, pil.width):
                pil = pil.resize((width, height), resample=_RESAMPLE[self.resample])
        pixels = torch.from_numpy(to_numpy_array(pil).copy()).float()  # (H, W, 3)
        if do_rescale:
            pixels = pixels * self.rescale_factor
        if do_normalize:
            pixels = (pixels - torch.tensor(self.image_mean)) / torch.tensor(self.image_std)
        return pixels.permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)

    def preprocess(
        self,
        images,
        return_tensors: str | None = None,
        do_resize: bool | None = None,
        do_rescale: bool | None = None,
        do_normalize: bool | None = None,
        **kwargs,
    ) -> BatchFeature:
        """One image or a list of images -> `BatchFeature` with `pixel_values` (B, 3, H, W)."""
        if not isinstance(images, (list, tuple)) and getattr(images, "ndim", 3) != 4:
            images = [images]
        arrays = [
            self._preprocess_one(
                image,
                self.do_resize if do_resize is None else do_resize,
                self.do_rescale if do_rescale is None else do_rescale,
                self.do_normalize if do_normalize is None else do_normalize,
            )
            for image in images
        ]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(
                f"images were resized to different sizes {sorted(shapes)}; use a fixed size "
                "{'height': h, 'width': w} to batch them, or pass them one at a time."
            )
        pixel_values = torch.stack(arrays)
        if return_tensors != "pt":
            pixel_values = pixel_values.numpy()
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def post_process_semantic_segmentation(
        self, outputs, target_sizes: list[tuple[int, int]] | torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Segmentation maps from a model's `logits` (B, K, h, w): one (H, W) tensor of class ids per image.

        Logits are resized bilinearly to each target size (height, width) before the argmax, as transformers'
        BEiT and SegFormer processors do; without target sizes the maps keep the logits' size.
        """
        logits = outputs.logits
        sizes = _target_sizes(target_sizes, len(logits))
        maps = []
        for image_logits, size in zip(logits, sizes):
            if size is not None:
                image_logits = _resize(image_logits[None], size)[0]
            maps.append(image_logits.argmax(dim=0))
        return maps

    def post_process_depth_estimation(
        self, outputs, target_sizes: list[tuple[int, int]] | torch.Tensor | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """Depth maps from a model's `predicted_depth` (B, h, w): one `{"predicted_depth": (H, W)}` per image,
        the format transformers' depth-estimation pipeline reads.

        Resizing is bilinear rather than DPT's bicubic: bicubic overshoots at depth edges and can leave the
        (min_depth, max_depth) range the model's output is confined to.
        """
        predicted_depth = outputs.predicted_depth
        sizes = _target_sizes(target_sizes, len(predicted_depth))
        results = []
        for depth, size in zip(predicted_depth, sizes):
            if size is not None:
                depth = _resize(depth[None, None], size)[0, 0]
            results.append({"predicted_depth": depth})
        return results


def _target_sizes(target_sizes, batch_size: int) -> list[tuple[int, int] | None]:
    """One (height, width) per image, or None everywhere when no target sizes are given."""
    if target_sizes is None:
        return [None] * batch_size
    if len(target_sizes) != batch_size:
        raise ValueError(
            f"got {len(target_sizes)} target sizes for a batch of {batch_size}; pass one (height, width) per image."
        )
    return [(int(size[0]), int(size[1])) for size in target_sizes]


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) maps (align_corners=False); float32 at least, so half inputs resize too."""
    if tuple(maps.shape[-2:]) == size:
        return maps
    dtype = torch.promote_types(maps.dtype, torch.float32)
    return torch.nn.functional.interpolate(maps.to(dtype), size=size, mode="bilinear", align_corners=False)


__all__ = ["DenseCLViTImageProcessor"]
