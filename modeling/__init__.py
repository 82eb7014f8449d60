"""Model classes; the flat files in this folder are also the remote code of every Hub release.

Importing this package registers the classes with transformers' Auto classes, both for in-process use
(`AutoModel.from_pretrained(folder)` without remote code) and for `save_pretrained`, which then writes an
`auto_map` and copies these files so that the folder loads anywhere with `trust_remote_code=True` (including
`pipeline("image-segmentation" | "depth-estimation", model=folder, trust_remote_code=True)`).
"""

import inspect

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForDepthEstimation,
    AutoModelForPreTraining,
    AutoModelForSemanticSegmentation,
)

from .configuration_densecl_vit import DenseCLViTConfig
from .image_processing_densecl_vit import DenseCLViTImageProcessor
from .modeling_densecl_vit import (
    DenseCLViTForDepthEstimation,
    DenseCLViTForPreTraining,
    DenseCLViTForSemanticSegmentation,
    DenseCLViTModel,
    DenseCLViTPreTrainedModel,
    DenseCLViTPreTrainingOutput,
    DenseCLViTUperNetDecoder,
)

# Auto class -> model class, for in-process loading and for the auto_map that save_pretrained writes.
AUTO_MODELS = (
    (AutoModel, DenseCLViTModel),
    (AutoModelForPreTraining, DenseCLViTForPreTraining),
    (AutoModelForSemanticSegmentation, DenseCLViTForSemanticSegmentation),
    (AutoModelForDepthEstimation, DenseCLViTForDepthEstimation),
)


def _register() -> None:
    AutoConfig.register(DenseCLViTConfig.model_type, DenseCLViTConfig, exist_ok=True)
    if "image_processor_classes" in inspect.signature(AutoImageProcessor.register).parameters:
        # Transformers with image-processor backends: one class serves both (it works on tensors and PIL images
        # alike), so loading does not fall back from the default torchvision backend with a warning.
        processors = {
            "image_processor_classes": dict.fromkeys(("pil", "torchvision"), DenseCLViTImageProcessor)
        }
    else:
        processors = {"slow_image_processor_class": DenseCLViTImageProcessor}
    AutoImageProcessor.register(DenseCLViTConfig, **processors, exist_ok=True)
    DenseCLViTConfig.register_for_auto_class()
    DenseCLViTImageProcessor.register_for_auto_class("AutoImageProcessor")
    for auto_class, model_class in AUTO_MODELS:
        auto_class.register(DenseCLViTConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)


_register()

__all__ = [
    "AUTO_MODELS",
    "DenseCLViTConfig",
    "DenseCLViTForDepthEstimation",
    "DenseCLViTForPreTraining",
    "DenseCLViTForSemanticSegmentation",
    "DenseCLViTImageProcessor",
    "DenseCLViTModel",
    "DenseCLViTPreTrainedModel",
    "DenseCLViTPreTrainingOutput",
    "DenseCLViTUperNetDecoder",
]
