"""The model sections of the benchmark: our encoder against timm's (``encoder``) and the full pre-training
step against the encoder's own two-view forward+backward (``pretraining_step``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ....modeling import DenseCLViTConfig, DenseCLViTForPreTraining, DenseCLViTModel
from ....modeling.configuration_densecl_vit import PRETRAINING_LOSS_TERMS
from ....modeling.losses_densecl_vit import local_local_info_nce
from ....modeling.modeling_densecl_vit import DenseCLViTViewGeometry
from ...data.transforms.two_view import sample_crop_box
from ...engine.guards import NonFiniteGuard
from ...engine.loop import gradient_norm, train_step
from ...engine.optim import build_adamw
from ...interop.conversion import densecl_to_timm
from ...tasks.pretraining import PretrainConfig, build_optimizer
from .measure import (
    MemoryProbe,
    encoder_flops,
    operator_difference,
    paired_ratio,
    pretraining_step_flops,
    synchronize,
    time_interleaved,
    timing_summary,
)
from .options import SIZES, SOURCE_SIZE, BenchOptions, build_config, build_timm, utilisation


def _backward_pass(
    forward: Callable[[], torch.Tensor],
    autocast: Callable[[], contextlib.AbstractContextManager],
    clear: Callable[[], None],
) -> Callable[[], None]:
    """A candidate: `forward()` under `autocast()`, the backward pass of its mean, then `clear()` the grads."""

    def run() -> None:
        with autocast():
            value = forward()
        value.float().mean().backward()
        clear()

    return run


# --- encoder vs timm -----------------------------------------------------------------------------------


def _encoder_pair(size: str, opts: BenchOptions) -> tuple[DenseCLViTModel, torch.nn.Module]:
    """Our encoder and timm's of `size`, timm's loaded with our weights, both on the device in train mode
    (dropout and drop path are 0, so train mode computes what eval mode does, and compiles once)."""
    config = build_config(size, opts.image_size)
    torch.manual_seed(0)
    ours = DenseCLViTModel(config)
    reference = build_timm(ours, SIZES[size]["timm"])
    reference.load_state_dict(densecl_to_timm(ours.state_dict()))
    return ours.to(opts.device).train(), reference.to(opts.device).train()


def _pass_candidates(
    functions: dict[str, Callable], models: dict[str, torch.nn.Module], x: torch.Tensor, opts: BenchOptions
) -> dict[str, Callable[[], None]]:
    """`{name}_forward` (no grad) and `{name}_forward_backward` for each function (B, 3, H, W) -> (B, T, D)."""

    def forward(fn: Callable) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), opts.autocast():
                fn(x)

        return run

    def forward_backward(fn: Callable, model: torch.nn.Module) -> Callable[[], None]:
        return _backward_pass(lambda: fn(x), opts.autocast, lambda: model.zero_grad(set_to_none=True))

    candidates = {f"{name}_forward": forward(fn) for name, fn in functions.items()}
    candidates.update({f"{n}_forward_backward": forward_backward(f, models[n]) for n, f in functions.items()})
    return candidates


def encoder_benchmark(size: str, opts: BenchOptions) -> list[dict[str, Any]]:
    """Our encoder vs timm's, same weights: one row for the forward pass, one for forward+backward."""
    ours, reference = _encoder_pair(size, opts)
    x = torch.randn(opts.batch, 3, opts.image_size, opts.image_size, device=opts.device)
    functions = {"ours": lambda t: ours(pixel_values=t).last_hidden_state, "timm": reference.forward_features}
    with torch.no_grad(), opts.autocast():
        difference = (functions["ours"](x) - functions["timm"](x)).abs().max().item()
    with opts.autocast():
        extra_ours, extra_timm = operator_difference(functions["ours"], functions["timm"], x[:1])
    ours.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    if opts.compile:
        functions = {name: torch.compile(fn) for name, fn in functions.items()}
    candidates = _pass_candidates(functions, {"ours": ours, "timm": reference}, x, opts)
    timings = time_interleaved(candidates, opts.repeats, opts.warmup, opts.device)
    rows = []
    for mode in ("forward", "forward_backward"):
        mine, theirs = timings[f"ours_{mode}"], timings[f"timm_{mode}"]
        flops = encoder_flops(ours.config, backward=mode == "forward_backward")
        rows.append({
            "size": size,
            "mode": mode,
            "batch": opts.batch,
            "ours_images_per_s": opts.batch / mine.median,
            "timm_images_per_s": opts.batch / theirs.median,
            "time_ratio": mine.median / theirs.median,
            "min_time_ratio": min(mine.wall) / min(theirs.wall),
            "cpu_time_ratio": mine.cpu_median / theirs.cpu_median,
            "ours_peak_mb": mine.peak_mb,
            "timm_peak_mb": theirs.peak_mb,
            "flops_per_image": flops,
            "ours_tflops": flops * opts.batch / mine.median / 1e12,
            "ours_mfu": utilisation(flops * opts.batch / mine.median, opts),
            "max_abs_difference": difference,
            "extra_ops_ours": extra_ours,
            "extra_ops_timm": extra_timm,
            "seconds": timing_summary({"ours": mine, "timm": theirs}),
        })  # fmt: skip
    return rows


# --- pre-training step vs the encoder ------------------------------------------------------------------


def training_setup(
    config: DenseCLViTConfig, opts: BenchOptions, accelerator: Any, dataset: str = "-"
) -> tuple[Any, Any, Any, Any]:
    """(options, model, AdamW, schedule) as `scripts/pretrain.py` builds them (`pretraining.build_optimizer`,
    the training run's own optimiser builder), prepared by `accelerator`.

    With --compile the encoder and the head are compiled too, so that the candidates that call them alone
    run compiled code like the full model does.
    """
    cfg = PretrainConfig(
        dataset=dataset,
        max_steps=100_000,
        per_device_batch_size=opts.batch,
        image_size=opts.image_size,
        num_workers=opts.workers,
        shuffle_buffer=64,
        gpu_augment=opts.gpu_augment,
    )
    torch.manual_seed(0)
    model = DenseCLViTForPreTraining(config).to(opts.device)
    if opts.compile:
        for module in (model.densecl_vit, model.projection, model):
            module.compile()
    optimizer, scheduler = build_optimizer(cfg, model, opts.batch, cfg.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return cfg, model, optimizer, scheduler


def _method_part_candidates(
    model: DenseCLViTForPreTraining,
    optimizer: Any,
    accelerator: Any,
    opts: BenchOptions,
) -> dict[str, Callable[[], None]]:
    """The method's additions to the encoder, each alone: the projection head on 2B (N + 1) tokens and the
    normalisation + loss (forward+backward, from leaf tensors), the gradient norm + AdamW step (`optimizer`;
    when it is fused, also an unfused AdamW over the same groups, with its own state, for comparison)."""
    config, params, size = model.config, list(model.parameters()), 2 * opts.batch
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    hidden = torch.randn(size, tokens, config.hidden_size, device=opts.device, requires_grad=True)
    projected = torch.randn(size, tokens, config.projection_dim, device=opts.device, requires_grad=True)
    grads = [torch.randn_like(p) * 1e-3 for p in params]

    def clear() -> None:
        optimizer.zero_grad(set_to_none=True)
        hidden.grad = projected.grad = None

    geometry = view_geometry(opts.batch, config, opts.device)

    def loss(term: str | None = None) -> Callable[[], torch.Tensor]:
        """The configured loss, or one of its terms alone (`term`), from the projected leaf tokens."""

        def run() -> torch.Tensor:
            embeddings = torch.nn.functional.normalize(projected, dim=-1)  # as DenseCLViTForPreTraining.embed
            global_1, global_2 = embeddings[:, 0].chunk(2)
            local_1, local_2 = embeddings[:, 1:].chunk(2)
            if term is None:
                return model.contrastive_loss(global_1, local_1, global_2, local_2, geometry)
            spec = model.config.pretraining_loss
            model.config.pretraining_loss = term
            try:
                return model.contrastive_loss(global_1, local_1, global_2, local_2, geometry)
            finally:
                model.config.pretraining_loss = spec

        return run

    def update(step_optimizer: Any) -> Callable[[], None]:
        def run() -> None:
            for param, grad in zip(params, grads):
                param.grad = grad
            gradient_norm(accelerator, params)  # as `loop.train_step` without --grad-clip
            step_optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    candidates = {
        "head": _backward_pass(lambda: model.projection(hidden), accelerator.autocast, clear),
        "loss": _backward_pass(loss(), accelerator.autocast, clear),
        **{f"term:{t}": _backward_pass(loss(t), accelerator.autocast, clear) for t in PRETRAINING_LOSS_TERMS},
    }
    candidates["optimizer"] = update(optimizer)
    if optimizer.defaults.get("fused"):
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
        unfused = build_adamw(groups, optimizer.defaults["lr"], fused=False)
        candidates["optimizer_unfused"] = update(unfused)
    return candidates


def pretraining_step_benchmark(size: str, opts: BenchOptions, accelerator: Any) -> dict[str, Any]:
    """A full pre-training step vs the encoder's two-view forward+backward, and the parts of the difference.

    Candidates, same model and batch: `loop.train_step` as `scripts/pretrain.py` runs it (model, AdamW and
    schedule from `pretraining.build_optimizer`); the encoder's forward+backward on the 2B views; and the
    method's additions timed alone (`_method_part_candidates`).
    """
    config = build_config(size, opts.image_size, opts.loss)
    _, model, optimizer, scheduler = training_setup(config, opts, accelerator)
    inner = accelerator.unwrap_model(model)
    encoder, head = inner.densecl_vit, inner.projection
    shape = (opts.batch, 3, opts.image_size, opts.image_size)
    batch = {key: torch.randn(shape, device=opts.device) for key in ("pixel_values", "pixel_values_2")}
    geometry = view_geometry(opts.batch, config, opts.device)
    batch.update(zip(("crop_boxes", "flips", "crop_boxes_2", "flips_2"), geometry.boxes_and_flips()))
    views, guard = torch.cat([batch["pixel_values"], batch["pixel_values_2"]]), NonFiniteGuard()

    candidates = {
        "train_step": lambda: train_step(accelerator, model, optimizer, scheduler, batch, guard),
        "encoder_two_view": _backward_pass(
            lambda: encoder(views).last_hidden_state,
            accelerator.autocast,
            lambda: optimizer.zero_grad(set_to_none=True),
        ),
        **_method_part_candidates(inner, optimizer, accelerator, opts),
    }
    t = time_interleaved(candidates, opts.repeats, opts.warmup, opts.device)
    base, step = t["encoder_two_view"].median, t["train_step"].median
    step_flops = pretraining_step_flops(config, opts.batch)
    return {
        "size": size,
        "batch": opts.batch,
        "encoder_two_view_images_per_s": opts.batch / base,
        "train_step_images_per_s": opts.batch / step,
        "overhead_pct": 100 * (step / base - 1),
        "paired_overhead_pct": 100 * (paired_ratio(t["train_step"], t["encoder_two_view"]) - 1),
        "cpu_overhead_pct": 100 * (t["train_step"].cpu_median / t["encoder_two_view"].cpu_median - 1),
        **{f"{part}_pct": 100 * t[part].median / base for part in ("head", "loss", "optimizer")},
        "loss": opts.loss,
        "loss_terms_pct": {term: 100 * t[f"term:{term}"].median / base for term in PRETRAINING_LOSS_TERMS},
        "unfused_optimizer_pct": (
            100 * t["optimizer_unfused"].median / base if "optimizer_unfused" in t else None
        ),
        "flop_overhead_pct": 100 * (step_flops / (2 * opts.batch * encoder_flops(config, backward=True)) - 1),
        "encoder_parameters": sum(p.numel() for p in encoder.parameters()),
        "head_parameters": sum(p.numel() for p in head.parameters()),
        "encoder_two_view_peak_mb": t["encoder_two_view"].peak_mb,
        "train_step_peak_mb": t["train_step"].peak_mb,
        "flops_per_step": step_flops,
        "train_step_tflops": step_flops / step / 1e12,
        "train_step_mfu": utilisation(step_flops / step, opts),
        "fused_adamw": bool(optimizer.defaults.get("fused")),
        "seconds": timing_summary(t),
    }


# --- the dense term's memory ---------------------------------------------------------------------------


def view_geometry(batch: int, config: DenseCLViTConfig, device: torch.device) -> DenseCLViTViewGeometry:
    """Crop boxes and flips of `batch` image pairs as pre-training draws them from a benchmark-sized photo
    (crop scale 0.08-1, flip p = 0.5; fixed seed), on `device`."""
    rng = np.random.default_rng(0)
    boxes = [
        [sample_crop_box(*SOURCE_SIZE, (0.08, 1.0), (3 / 4, 4 / 3), rng) for _ in range(2)]
        for _ in range(batch)
    ]
    tensor = torch.tensor(boxes, dtype=torch.float32, device=device)  # (B, 2, 4)
    flips = torch.from_numpy(rng.random((batch, 2)) < 0.5).to(device)
    grid = (config.image_size // config.patch_size,) * 2
    return DenseCLViTViewGeometry(tensor[:, 0], flips[:, 0], tensor[:, 1], flips[:, 1], grid, grid)


def dense_loss_memory(opts: BenchOptions) -> list[dict[str, Any]]:
    """Peak memory of the local-local term's forward+backward for ViT-B's token grid at `opts.dense_batch` images
    (the projection's 256-wide embeddings, both views), chunked as training runs it and in one chunk; beyond
    the inputs, with the full (B N)^2 float32 similarity matrix for scale."""
    size = "test" if opts.dense_batch <= 4 and "test" in opts.sizes else "vit-base"
    config = build_config(size, opts.image_size if size == "test" else 224)
    batch, patches = opts.dense_batch, (config.image_size // config.patch_size) ** 2
    geometry = view_geometry(batch, config, opts.device)
    probe, rows = MemoryProbe(opts.device), []
    generator = torch.Generator(opts.device).manual_seed(0)
    embeddings = [
        torch.nn.functional.normalize(
            torch.randn(batch, patches, config.projection_dim, device=opts.device, generator=generator),
            dim=-1,
        ).requires_grad_(True)
        for _ in range(2)
    ]
    for label, chunk in (("chunked (training default)", None), ("one chunk", batch * patches)):
        synchronize(opts.device)
        probe.reset()
        before = probe.peak_mb()
        start = time.perf_counter()
        with opts.autocast():
            value = local_local_info_nce(
                *embeddings, *geometry.boxes_and_flips(), config.loss_temperature, chunk_size=chunk
            )
        value.backward()
        synchronize(opts.device)
        rows.append({
            "size": size, "batch": batch, "patches": patches, "chunk": label,
            "peak_mb_beyond_inputs": probe.peak_mb() - before, "seconds": time.perf_counter() - start,
            "similarity_matrix_mb": (batch * patches) ** 2 * 4 / 2**20, "memory": probe.method,
        })  # fmt: skip
        for e in embeddings:
            e.grad = None
    return rows
