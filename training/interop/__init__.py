"""Other formats in and out: checkpoint conversion (timm, transformers ViT, DINO), weight
files, and loading a saved folder to predict.

Imports `modeling` and `training.data`.
"""
