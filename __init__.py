"""densecl-vit: local-to-global self-supervised pre-training of Vision Transformers for dense prediction."""

# Absolute imports: this file is the package root, and must not create a second copy of the model classes if a
# tool imports the repository folder itself as a package.
from densecl_vit.modeling import (
    DenseCLViTConfig,
    DenseCLViTForDepthEstimation,
    DenseCLViTForPreTraining,
    DenseCLViTForSemanticSegmentation,
    DenseCLViTImageProcessor,
    DenseCLViTModel,
    DenseCLViTPreTrainedModel,
    DenseCLViTPreTrainingOutput,
    DenseCLViTUperNetDecoder,
)

__version__ = "0.1.0"

__all__ = [
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
