"""Model classes; the flat files in this folder are also the remote code of every Hub release.

Importing this package registers the classes with transformers' Auto classes, both for in-process use
(`AutoModel.from_pretrained(folder)` without remote code) and for `save_pretrained`, which then writes an
`auto_map` and copies these files so that the folder loads anywhere with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_densecl_vit import DenseCLViTConfig
from .image_processing_densecl_vit import DenseCLViTImageProcessor
from .modeling_densecl_vit import DenseCLViTModel, DenseCLViTPreTrainedModel


def _register() -> None:
    AutoConfig.register(DenseCLViTConfig.model_type, DenseCLViTConfig, exist_ok=True)
    AutoModel.register(DenseCLViTConfig, DenseCLViTModel, exist_ok=True)
    AutoImageProcessor.register(DenseCLViTConfig, slow_image_processor_class=DenseCLViTImageProcessor, exist_ok=True)
    DenseCLViTConfig.register_for_auto_class()
    DenseCLViTModel.register_for_auto_class("AutoModel")
    DenseCLViTImageProcessor.register_for_auto_class("AutoImageProcessor")


_register()

__all__ = ["DenseCLViTConfig", "DenseCLViTImageProcessor", "DenseCLViTModel", "DenseCLViTPreTrainedModel"]
