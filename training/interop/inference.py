"""Loading DenseCL-ViT models and running them on images: the numbers behind the pictures of `visualize`.

`load_pretrained` picks the model class from the folder's config; `predict_images` returns segmentation or
depth maps at each image's own size; `encoder_features` returns the final patch tokens and, on request, the
[CLS] attention of the last block, for PCA maps of the features.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from densecl_vit.modeling import AUTO_MODELS, DenseCLViTImageProcessor
from densecl_vit.training.data.decoding import to_rgb

logger = logging.getLogger(__name__)

_TASKS = {"ForSemanticSegmentation": "segmentation", "ForDepthEstimation": "depth"}


# ---------------------------------------------------------------------------------------------------------------------
# Loading and running models
# ---------------------------------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike) -> PIL.Image.Image:
    """An RGB image with its EXIF orientation applied; raises (OSError, ValueError, ...) if it cannot be read."""
    with PIL.Image.open(path) as image:
        image.load()
        return to_rgb(PIL.ImageOps.exif_transpose(image))


def load_pretrained(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """(model, image processor) from a local folder or Hub id, remote code allowed.

    The model class follows `config.architectures` (segmentation, depth, pre-training or the bare encoder).
    A folder without `preprocessor_config.json` gets a `DenseCLViTImageProcessor` at the config's image size.
    """
    if Path(model_dir).is_dir() and not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"{model_dir} holds no config.json; pass a folder written by save_pretrained")
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    architecture = (getattr(config, "architectures", None) or [""])[0]
    # The Auto class of our model class with the same suffix, so stock releases (UperNetFor...) load too.
    auto_class = next(
        (
            auto_class
            for auto_class, model_class in AUTO_MODELS
            if architecture.endswith(model_class.__name__.removeprefix("DenseCLViT"))
        ),
        AutoModel,
    )
    model = auto_class.from_pretrained(model_dir, config=config, trust_remote_code=True).to(device).eval()
    try:
        processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=True)
    except OSError:
        logger.warning("%s has no image processor; resizing to the config's image size", model_dir)
        size = {"height": config.image_size, "width": config.image_size}
        processor = DenseCLViTImageProcessor(size=size, size_divisor=config.patch_size)
    return model, processor


def model_task(model: Any) -> str:
    """'segmentation' or 'depth' from the model's class name; ValueError for any other model."""
    name = type(model).__name__
    task = next((task for suffix, task in _TASKS.items() if name.endswith(suffix)), None)
    if task is None:
        raise ValueError(
            f"{name} is neither a segmentation nor a depth model; pass a fine-tuned model folder."
        )
    return task


@torch.inference_mode()
def predict_images(model: Any, processor: Any, images: Sequence[PIL.Image.Image]) -> list[np.ndarray]:
    """Predictions at each image's own size: (H, W) int64 class ids or (H, W) float32 metres.

    Images are preprocessed one by one (sizes may differ when the processor keeps the aspect ratio), then run in
    batches of equal input size; the processor's post-processing resizes the outputs back to the images.
    """
    task = model_task(model)
    device = next(model.parameters()).device
    pixels = [processor(image, return_tensors="pt")["pixel_values"][0] for image in images]
    predictions: list[np.ndarray | None] = [None] * len(images)
    for shape in dict.fromkeys(p.shape for p in pixels):
        indices = [i for i, p in enumerate(pixels) if p.shape == shape]
        outputs = model(pixel_values=torch.stack([pixels[i] for i in indices]).to(device))
        sizes = [(images[i].height, images[i].width) for i in indices]
        if task == "segmentation":
            maps = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
        else:
            maps = [r["predicted_depth"] for r in processor.post_process_depth_estimation(outputs, sizes)]
        for i, prediction in zip(indices, maps):
            array = prediction.float().cpu().numpy() if task == "depth" else prediction.cpu().numpy()
            predictions[i] = array.astype(np.float32 if task == "depth" else np.int64)
    return predictions


# ---------------------------------------------------------------------------------------------------------------------
# Patch features and [CLS] attention
# ---------------------------------------------------------------------------------------------------------------------


def cls_attention(attentions: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """[CLS]-to-patch attention of one block, (B, heads, 1 + N, 1 + N) -> (B, heads, h, w), each map max-scaled."""
    maps = attentions[:, :, 0, 1:].float()
    maps = maps / maps.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return maps.reshape(*maps.shape[:2], *grid).cpu().numpy()


@torch.inference_mode()
def encoder_features(encoder: Any, processor: Any, image: PIL.Image.Image, attention: bool = False) -> dict:
    """Run the encoder on one image. Returns `features` (N, D) final patch tokens, `grid` (h, w) and, with
    `attention`, `attention` (heads, h, w): the [CLS] attention of the last block."""
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    device = next(encoder.parameters()).device
    outputs = encoder(pixel_values=pixel_values.to(device), output_attentions=attention, return_dict=True)
    grid = (
        pixel_values.shape[-2] // encoder.config.patch_size,
        pixel_values.shape[-1] // encoder.config.patch_size,
    )
    result = {"features": outputs.last_hidden_state[0, 1:].float().cpu().numpy(), "grid": grid}
    if attention:
        result["attention"] = cls_attention(outputs.attentions[-1], grid)[0]
    return result


__all__ = [
    "cls_attention",
    "encoder_features",
    "load_image",
    "load_pretrained",
    "model_task",
    "predict_images",
]
