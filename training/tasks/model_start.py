"""Starting a task model: from a pre-training output folder, any DenseCL-ViT folder, a converted timm/DINO/ViT
folder or a random-init preset (`load_task_model`, for fine-tuning), or from a fine-tuned folder
(`load_finetuned`, for evaluation); `model_source` reads what a --model value names, for pre-training and
fine-tuning alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...modeling import DenseCLViTConfig
from ...modeling.configuration_densecl_vit import PRESETS, preset_name
from ..interop.conversion import resample_position_embeddings

_CONFIG_META = ("architectures", "auto_map", "transformers_version", "model_type")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def model_source(model: str) -> tuple[str, dict[str, Any]]:
    """("preset" | "config" | "weights" | "folder", the config fields it names) for a --model value."""
    key = preset_name(model)
    if key is not None:
        return "preset", {**PRESETS[key], "patch_size": 16}
    path = Path(model)
    if path.is_file() and path.suffix == ".json":
        return "config", json.loads(path.read_text())
    if path.is_dir() and (path / "config.json").is_file():
        kind = "weights" if any((path / name).is_file() for name in _WEIGHT_FILES) else "folder"
        return kind, json.loads((path / "config.json").read_text())
    raise ValueError(
        f"unknown --model {model!r}: use a preset ({', '.join(PRESETS)}, or ti/s/b), "
        "a config.json file or a model folder holding one"
    )


def store_position_embeddings_at(model: nn.Module, image_size: int) -> None:
    """Resample the encoder's position embeddings once to an `image_size` square input (bicubic, as the model
    does on the fly) so that training at that size skips the per-step resampling; updates `config.image_size`."""
    embeddings = model.densecl_vit.embeddings
    patch_size = model.config.patch_size
    grid = image_size // patch_size
    if grid == embeddings.grid_size:
        return
    with torch.no_grad():
        resampled = resample_position_embeddings(embeddings.position_embeddings.detach(), grid)
    embeddings.position_embeddings = nn.Parameter(resampled.contiguous())
    embeddings.grid_size = grid
    model.config.image_size = image_size


def _newly_initialised(missing: Sequence[str]) -> list[str]:
    """Top-level module names of the missing keys, e.g. ["auxiliary_head", "classifier", "decode_head"]."""
    return sorted({key.split(".")[0] for key in missing})


def load_task_model(
    model_cls: type, source: str, crop_size: tuple[int, int], **overrides: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """A task model started from `source` (a --model value) with config `overrides` (labels, head, drop path).

    Returns the model and its load report: {"source_kind", "newly_initialized" (top-level modules), "missing",
    "unused" (checkpoint tensors not used, e.g. a pre-training projection head)}. A square crop stores the
    position embeddings at the crop size; other crops resample them on the fly.
    """
    kind, fields = model_source(source)
    if kind == "folder":
        raise ValueError(f"--model {source} holds a config.json but no weights; pass a folder with weights")
    if kind == "weights":
        model, info = model_cls.from_pretrained(
            source, output_loading_info=True, ignore_mismatched_sizes=True, **overrides
        )
        missing = sorted(info["missing_keys"]) + sorted(key for key, *_ in info.get("mismatched_keys", ()))
        report = {
            "source_kind": kind,
            "newly_initialized": _newly_initialised(missing),
            "missing": missing,
            "unused": sorted(info["unexpected_keys"]),
        }
    else:
        fields = {k: v for k, v in fields.items() if k not in _CONFIG_META}
        config = DenseCLViTConfig.from_dict({**fields, "image_size": crop_size[0], **overrides})
        model = model_cls(config)
        report = {"source_kind": kind, "newly_initialized": ["all"], "missing": [], "unused": []}
    if crop_size[0] == crop_size[1]:
        store_position_embeddings_at(model, crop_size[0])
    return model, report


def describe_load(source: str, report: Mapping[str, Any]) -> str:
    """One line saying where the weights came from and what starts from scratch."""
    if report["source_kind"] != "weights":
        return f"random initialisation from {source} (no pre-trained weights)"
    unused = f"; {len(report['unused'])} checkpoint tensors unused" if report["unused"] else ""
    return (
        f"loaded {source}; newly initialised: {', '.join(report['newly_initialized']) or 'nothing'}{unused}"
    )


def load_finetuned(model_cls: type, folder: str) -> nn.Module:
    """A fine-tuned task model; refuses a folder whose head would be newly initialised (e.g. an encoder)."""
    model, info = model_cls.from_pretrained(folder, output_loading_info=True)
    missing = _newly_initialised(info["missing_keys"])
    if missing:
        raise ValueError(
            f"{folder} holds no trained {model_cls.__name__} ({', '.join(missing)} missing); "
            "evaluate the final/ folder of a fine-tuning run"
        )
    return model.eval()
