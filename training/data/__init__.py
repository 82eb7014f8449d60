"""Reading examples and making tensors of them: dataset sources, the streaming sample reader,
the loader, decoding and validation, the augmentations (`transforms/`) and the synthetic scenes
(`synthetic/`).

Imports only `modeling` and itself; everything else in `training` sits above it.
"""
