"""densecl-vit: local-to-global self-supervised pre-training of Vision Transformers for dense prediction.

The model classes are imported on first access, so `densecl_vit.training` tools and script `--help` start without
loading transformers. Absolute imports: this file is the package root and must not create a second copy of the
model classes if a tool imports the repository folder itself as a package.
"""

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("densecl_vit.modeling"), name)
    raise AttributeError(f"module 'densecl_vit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
