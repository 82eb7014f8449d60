"""Reading checkpoint files without unpickling arbitrary objects, for `conversion` to convert: safetensors files,
torch pickles (`.pth`, `.pt`, `.bin`, `.ckpt`) read with `weights_only=True`, and transformers model folders.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

_GLOBAL = re.compile(r"GLOBAL (\S+)")
# torch's own lines around the reason: its advice to retry with weights_only=False would run the file's code
_TORCH_ADVICE = re.compile(r"weights.only|check the documentation|file an issue", re.IGNORECASE)


def unpickling_reason(error: BaseException) -> str:
    """Why torch.load(weights_only=True) failed, in a few words: the forbidden global it met, or its own reason."""
    found = _GLOBAL.search(str(error))
    if found:
        return f"it pickles the Python object {found.group(1)}, and unpickling it could run code"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not _TORCH_ADVICE.search(line)]
    return lines[0] if lines else type(error).__name__


def unpickling_refusal(path: str | os.PathLike | None, error: BaseException) -> str:
    """One line saying why torch.load(weights_only=True) refused `path` and the way out; never torch's advice to
    pass weights_only=False, which runs what the file holds."""
    return (
        f"refused to load {path or 'a pickled checkpoint'}: {unpickling_reason(error)}; only tensors and plain "
        "containers are unpickled: convert the weights to safetensors (scripts/convert_checkpoint.py, after "
        "re-saving a trusted file's tensors with torch.save(model.state_dict(), ...))"
    )


def unpickled_file(error: BaseException) -> str | None:
    """The file a failed `torch.load` was reading, from its frame: transformers and accelerate do not name it."""
    found, tb = None, error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "load" and frame.f_globals.get("__name__") == "torch.serialization":
            file = frame.f_locals.get("f")
            found = os.fspath(file) if isinstance(file, (str, os.PathLike)) else found
        tb = tb.tb_next
    return found


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True; argparse.Namespace is allowed because DINO checkpoints keep `args`."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(unpickling_refusal(path, error)) from None


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


__all__ = ["load_state_dict_file", "unpickled_file", "unpickling_refusal"]
