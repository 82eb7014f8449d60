"""Reading checkpoint files without unpickling arbitrary objects, for `conversion` to convert: safetensors files,
torch pickles (`.pth`, `.pt`, `.bin`, `.ckpt`) read with `weights_only=True`, and transformers model folders.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True; argparse.Namespace is allowed because DINO checkpoints keep `args`."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = (
            f"it pickles the Python object {found.group(1)}"
            if found
            else (lines[0] if lines else "unreadable")
        )
        raise ValueError(
            f"{path} cannot be loaded with torch.load(weights_only=True) ({reason}); only tensors and plain "
            "containers are read: re-save the weights with torch.save(model.state_dict(), ...) or as .safetensors."
        ) from None


def load_state_dict_file(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint without unpickling arbitrary objects.

    `.safetensors` files via safetensors; `.pth`/`.pt`/`.bin`/`.ckpt` via torch.load(weights_only=True); a
    transformers model folder (config.json + model.safetensors or pytorch_model.bin).
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is a folder without config.json; pass a model folder or a checkpoint file."
            )
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return load_state_dict_file(path / name)
        raise ValueError(
            f"{path} holds no model.safetensors or pytorch_model.bin (sharded folders are not read)."
        )
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist.")
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device="cpu")
        except Exception as error:
            raise ValueError(f"{path} is not a readable safetensors file ({error}).") from None
    if path.suffix not in (".pth", ".pt", ".bin", ".ckpt"):
        raise ValueError(
            f"unknown checkpoint type {path.suffix!r}: pass a .safetensors, .pth, .pt, .bin or .ckpt file "
            "or a transformers model folder."
        )
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict.")
    return checkpoint


__all__ = ["load_state_dict_file"]
