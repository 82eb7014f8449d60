"""Optimisation: weight-decay and layer-wise lr-decay parameter groups, lr scaling, schedules, optimisers.

Every group built here carries ``name``, ``param_names``, ``weight_decay`` and ``lr_scale``.
``build_adamw`` / ``build_adam`` set each group's lr to ``lr * lr_scale``, so the schedules below (plain
``LambdaLR`` multipliers) decay every group from its own scaled base lr.

Schedules count optimiser steps. A scheduler passed through ``accelerator.prepare`` advances
``num_processes`` times per ``step()`` (accelerate assumes per-process step counts), so either create
the ``Accelerator`` with ``step_scheduler_with_optimizer=False`` or keep the scheduler out of
``prepare`` and ``accelerator.register_for_checkpointing(scheduler)``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

NO_DECAY_NAMES = ("position_embeddings", "cls_token", "mask_token")

# Wrappers that may precede the encoder's own names: DDP ("module."), torch.compile ("_orig_mod."),
# and the task models' encoder attribute ("densecl_vit.").
_PREFIXES = ("module.", "_orig_mod.", "densecl_vit.")
_BLOCK = re.compile(r"encoder\.layer\.(\d+)\.")


def _is_no_decay(name: str, param: torch.Tensor, no_decay_names: Sequence[str]) -> bool:
    """Biases and norm weights (ndim < 2) and tensors whose trailing dotted components equal a listed name."""
    return param.ndim < 2 or any(name == n or name.endswith("." + n) for n in no_decay_names)


def param_groups_weight_decay(
    model: nn.Module, weight_decay: float, no_decay_names: Sequence[str] = NO_DECAY_NAMES
) -> list[dict[str, Any]]:
    """Two groups: ``decay`` (matrices, convolution kernels) and ``no_decay`` (biases, norms, embeddings).

    Every trainable parameter lands in exactly one group; frozen ones (``requires_grad=False``) in none.
    ``no_decay_names`` match whole trailing components: "cls_token" matches "embeddings.cls_token",
    never "my_cls_token_proj.weight".
    """
    groups = {
        "decay": {
            "name": "decay",
            "params": [],
            "param_names": [],
            "weight_decay": weight_decay,
            "lr_scale": 1.0,
        },
        "no_decay": {
            "name": "no_decay",
            "params": [],
            "param_names": [],
            "weight_decay": 0.0,
            "lr_scale": 1.0,
        },
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = groups["no_decay" if _is_no_decay(name, param, no_decay_names) else "decay"]
        group["params"].append(param)
        group["param_names"].append(name)
    return [g for g in groups.values() if g["params"]]


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise lr decay (BEiT's rule).

    Patch, position and [CLS] embeddings are 0, ``encoder.layer.{i}`` is ``i + 1``, everything else (the
    final layer norm, projection heads, decoders) is ``num_layers + 1``. Names may carry the task model's
    ``densecl_vit.`` prefix (and DDP's ``module.`` / torch.compile's ``_orig_mod.``).
    """
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    if name.startswith("embeddings."):
        return 0
    match = _BLOCK.match(name)
    if match:
        block = int(match.group(1))
        if block >= num_layers:
            raise ValueError(
                f"parameter {name} belongs to block {block} but num_layers={num_layers}; pass the model's depth"
            )
        return block + 1
    return num_layers + 1


def param_groups_layer_decay(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float,
    num_layers: int,
    no_decay_names: Sequence[str] = NO_DECAY_NAMES,
) -> list[dict[str, Any]]:
    """Groups keyed by (layer id, decay / no decay) with ``lr_scale = layer_decay ** (num_layers + 1 - id)``.

    The head (id ``num_layers + 1``) trains at the full lr, block i at ``layer_decay ** (num_layers + 1 - i)``,
    and the embeddings at ``layer_decay ** (num_layers + 1)``. Groups are ordered by layer id.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer_id = layer_id_for_vit(name, num_layers)
        no_decay = _is_no_decay(name, param, no_decay_names)
        key = (layer_id, no_decay)
        if key not in groups:
            groups[key] = {
                "name": f"layer_{layer_id}_{'no_decay' if no_decay else 'decay'}",
                "params": [],
                "param_names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (num_layers + 1 - layer_id),
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def describe_param_groups(groups: Iterable[dict[str, Any]]) -> str:
    """A fixed-width table of the groups: name, tensors, parameters, weight decay, lr scale."""
    rows = [("group", "tensors", "params", "weight_decay", "lr_scale")]
    total = 0
    for g in groups:
        count = sum(p.numel() for p in g["params"])
        total += count
        rows.append(
            (
                g.get("name", "?"),
                str(len(g["params"])),
                f"{count:,}",
                f"{g.get('weight_decay', 0.0):g}",
                f"{g.get('lr_scale', 1.0):.4g}",
            )
        )
    rows.append(("total", "", f"{total:,}", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    )


def scaled_lr(base_lr: float, total_batch_size: int, reference: int = 256) -> float:
    """Linear scaling rule: ``base_lr * total_batch_size / reference`` (the paper: 1e-4 per 256 images)."""
    if total_batch_size < 1 or reference < 1:
        raise ValueError(f"batch sizes must be >= 1, got total={total_batch_size}, reference={reference}")
    return base_lr * total_batch_size / reference


def warmup_steps_from_fraction(total_steps: int, fraction: float) -> int:
    """``round(total_steps * fraction)``, at least 1 when ``fraction > 0`` (the paper warms up over 5%)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"warm-up fraction must be in [0, 1), got {fraction}")
    return max(1, round(total_steps * fraction)) if fraction > 0 and total_steps > 0 else 0


def _check_schedule(total_steps: int, warmup_steps: int, min_lr_ratio: float) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")


def _warmup(step: int, warmup_steps: int) -> float | None:
    """Linear warm-up reaching 1 at the last warm-up step: (step + 1) / warmup_steps; None after it."""
    return (step + 1) / warmup_steps if step < warmup_steps else None


def cosine_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up, then half-cosine from 1 down to ``min_lr_ratio`` at ``total_steps``."""
    warm = _warmup(step, warmup_steps)
    if warm is not None:
        return warm
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def poly_factor(
    step: int, total_steps: int, warmup_steps: int, power: float = 1.0, min_lr_ratio: float = 0.0
) -> float:
    """LR multiplier: linear warm-up, then ``(1 - progress) ** power`` from 1 down to ``min_lr_ratio``."""
    warm = _warmup(step, warmup_steps)
    if warm is not None:
        return warm
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress) ** power


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Per-step ``LambdaLR`` applying ``cosine_factor`` to every group's (already lr_scale-d) base lr."""
    _check_schedule(total_steps, warmup_steps, min_lr_ratio)
    # A partial keeps the factor out of the scheduler's state_dict, so a resumed run uses the current
    # total/warm-up steps rather than silently restoring old ones.
    return LambdaLR(
        optimizer,
        functools.partial(
            cosine_factor, total_steps=total_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio
        ),
    )


def poly_with_warmup(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    power: float = 1.0,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Per-step ``LambdaLR`` applying ``poly_factor`` (the segmentation recipe's poly decay)."""
    _check_schedule(total_steps, warmup_steps, min_lr_ratio)
    if power <= 0:
        raise ValueError(f"power must be > 0, got {power}")
    return LambdaLR(
        optimizer,
        functools.partial(
            poly_factor,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            power=power,
            min_lr_ratio=min_lr_ratio,
        ),
    )


def apply_lr_scale(groups: Iterable[dict[str, Any]], lr: float) -> list[dict[str, Any]]:
    """Copies of ``groups`` with ``lr = lr * lr_scale`` (missing ``lr_scale`` means 1)."""
    return [{**g, "lr": lr * g.get("lr_scale", 1.0)} for g in groups]


def _supported_devices() -> tuple[list[str], list[str]]:
    """(device types with fused Adam/AdamW kernels, device types with foreach kernels) in this torch."""
    try:
        from torch.utils._foreach_utils import (
            _get_foreach_kernels_supported_devices,
            _get_fused_kernels_supported_devices,
        )
    except ImportError:  # a torch that moved the helpers: the kernels every torch >= 2.4 has
        return ["cuda", "cpu"], ["cuda"]
    return _get_fused_kernels_supported_devices(), _get_foreach_kernels_supported_devices()


def _kernel_choice(
    groups: Sequence[dict[str, Any]], fused: bool | None, foreach: bool | None
) -> dict[str, Any]:
    """Auto-pick when both are None: fused kernels where this torch has them for the parameters' device
    (CUDA and, since torch 2.4, CPU), foreach kernels otherwise where available, else torch's default.

    Fused needs every parameter to be a floating tensor on one device type. Build the optimiser after moving
    the model to its device (as accelerate's examples do), so that the device seen here is the one it trains
    on. Pass ``fused=False`` (or any explicit choice) to turn the auto-pick off.
    """
    if fused is not None or foreach is not None:
        return {"fused": fused, "foreach": foreach}
    params = [p for g in groups for p in g["params"]]
    devices = {p.device.type for p in params}
    if len(devices) != 1:
        return {"fused": None, "foreach": None}
    device = devices.pop()
    fused_devices, foreach_devices = _supported_devices()
    if device in fused_devices and all(torch.is_floating_point(p) for p in params):
        return {"fused": True, "foreach": None}
    return {"fused": None, "foreach": True if device in foreach_devices else None}


def build_adamw(
    groups: Sequence[dict[str, Any]],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
    foreach: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``groups`` (each keeps its own ``weight_decay``), group lr = ``lr * lr_scale``.

    Fused kernels wherever torch has them for the parameters' device (see ``_kernel_choice``); ``fused=False``
    keeps torch's default (foreach on GPUs, a per-tensor loop on the CPU)."""
    groups = apply_lr_scale(groups, lr)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **_kernel_choice(groups, fused, foreach))


def build_adam(
    groups: Sequence[dict[str, Any]],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
    foreach: bool | None = None,
) -> torch.optim.Adam:
    """Adam (L2 penalty for groups with ``weight_decay`` > 0), group lr = ``lr * lr_scale``; the depth recipe."""
    groups = apply_lr_scale(groups, lr)
    return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, **_kernel_choice(groups, fused, foreach))
