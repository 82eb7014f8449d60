"""Local-to-global contrastive pre-training: the options, and the data, model and optimiser phases of
`scripts/pretrain.py`. The loop itself is `loop.train_loop`, shared with the fine-tuning scripts.

Outputs in ``--output-dir``: ``config.yaml`` (the resolved options, written before the first step), ``metrics.jsonl``,
``checkpoints/step-*``, and once training completes ``final/`` (the encoder, a `DenseCLViTModel`
`save_pretrained` folder with its image processor: what `AutoModel` and the fine-tuning scripts load),
``final_pretraining/`` (encoder + projection head, a `DenseCLViTForPreTraining` folder that
``--model`` accepts to continue pre-training), ``results.json`` and ``curves.png``.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from ...modeling import DenseCLViTConfig, DenseCLViTForPreTraining, DenseCLViTImageProcessor
from ...modeling.configuration_densecl_vit import parse_pretraining_loss
from ..data.decoding import decode_rgb_pixels, validate_image
from ..data.loader import StreamLoader
from ..data.sources import open_stream, resolve_column
from ..data.transforms.two_view import BatchedColorAugment, SimCLRAugmentConfig, TwoViewTransform
from ..engine.config import option, save_config
from ..engine.loop import resume, train_loop
from ..engine.optim import (
    build_adamw,
    cosine_with_warmup,
    describe_param_groups,
    param_groups_weight_decay,
    scaled_lr,
    warmup_steps_from_fraction,
)
from ..engine.run_end import finish_run, save_model
from ..engine.setup import (
    CRITICAL_KEYS,
    TrainingArgs,
    apply_model_options,
    build_accelerator,
    run_signature,
    setup_errors,
    start_trackers,
    stream_num_examples,
    total_steps_for,
    train_loader,
)
from .model_start import model_source

PRETRAIN_CRITICAL_KEYS = (
    *CRITICAL_KEYS,
    "model",
    "image_size",
    "patch_size",
    "loss",
    "cls_stop_gradient",
    "gather_negatives",
    "temperature",
    "projection_dim",
    "projection_hidden_size",
    "crop_scale",
    "gpu_augment",
)


@dataclasses.dataclass
class PretrainConfig(TrainingArgs):
    """Pre-train a DenseCL-ViT encoder with the local-to-global contrastive loss on a (streamed) image dataset.

    Run with `accelerate launch scripts/pretrain.py --config FILE.yaml [--option value ...]` (processes and
    mixed precision come from accelerate) or plain `python scripts/pretrain.py ...`.
    """

    output_dir: str = option("outputs/pretrain", "folder for checkpoints, logs, final/ and results.json")
    model: str = option("vit-base", "preset (vit-tiny, vit-small, vit-base) or a config.json / model folder")
    image_size: int = option(224, "side of the square training views; a multiple of the patch size")
    patch_size: int | None = option(None, "override the model's patch size (a fresh model only; tiny tests)")
    per_device_batch_size: int = option(
        128, "images per process and step (>= 2: the negatives are the other images)"
    )
    lr: float = option(1e-4, "base learning rate for 256 images; the run uses lr * total batch / 256")
    loss: str = option(
        "local-global",
        "the pre-training loss: local-global (the paper's), global (SimCLR), local-local (dense, between "
        "corresponding patches) or a weighted sum such as 0.25*local-global+local-local",
    )
    cls_stop_gradient: bool = option(
        False, "detach the [CLS] embeddings in the local-global term (it then trains the patches only)"
    )
    gather_negatives: bool = option(False, "take negatives from every process (all-gather with gradients)")
    temperature: float = option(0.1, "temperature of the contrastive loss")
    projection_dim: int | None = option(None, "output width of the projection head; none: the model's (256)")
    projection_hidden_size: int | None = option(
        None, "hidden width of the 3-layer projection head; none: the model's (2048)"
    )
    crop_scale: tuple[float, float] = option(
        (0.08, 1.0), "random resized crop area range, as image fractions"
    )
    gpu_augment: bool | None = option(
        None,
        "run colour jitter, grayscale, blur and normalisation batched on the device; none: on for an "
        "accelerator (GPU), off on the CPU",
    )

    def validate(self) -> None:
        super().validate()
        if self.per_device_batch_size < 2:
            raise ValueError(
                f"--per-device-batch-size must be >= 2, got {self.per_device_batch_size}: the contrastive loss "
                "takes its negatives from the other images of the batch"
            )
        kind, fields = model_source(self.model)
        for name in ("patch_size", "projection_dim", "projection_hidden_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            if value is not None and kind == "weights" and value != fields.get(name):
                raise ValueError(
                    f"--{name.replace('_', '-')} {value} differs from the {fields.get(name)} of the weights in "
                    f"{self.model}; drop the option"
                )
        patch_size = self.patch_size or fields.get("patch_size", 16)
        if self.image_size % patch_size:
            raise ValueError(
                f"--image-size {self.image_size} is not a multiple of the patch size {patch_size}; "
                f"use e.g. {max(1, round(self.image_size / patch_size)) * patch_size}"
            )
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        try:
            parse_pretraining_loss(self.loss)
        except ValueError as error:
            raise ValueError(f"--loss: {error}") from None
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ValueError(f"--crop-scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        augment_config(self)  # the augmentation's own checks (e.g. views larger than the blur kernel)


def build_model(cfg: PretrainConfig) -> DenseCLViTForPreTraining:
    """The pre-training model: a preset or config.json initialised from `cfg.seed`, or a folder's weights."""
    kind, fields = model_source(cfg.model)
    overrides = {
        "loss_temperature": cfg.temperature,
        "pretraining_loss": cfg.loss,
        "cls_stop_gradient": cfg.cls_stop_gradient,
        "gather_negatives": cfg.gather_negatives,
    }
    for name in ("projection_dim", "projection_hidden_size"):
        if getattr(cfg, name) is not None:
            overrides[name] = getattr(cfg, name)
    if kind == "weights":
        model = DenseCLViTForPreTraining.from_pretrained(cfg.model, **overrides)
    else:
        fields = {
            k: v for k, v in fields.items() if k not in ("architectures", "auto_map", "transformers_version")
        }
        fields.update(
            overrides, image_size=cfg.image_size, patch_size=cfg.patch_size or fields.get("patch_size", 16)
        )
        model = DenseCLViTForPreTraining(DenseCLViTConfig.from_dict(fields))
    return model


def resolve_gpu_augment(gpu_augment: bool | None, device: torch.device) -> bool:
    """--gpu-augment as a run uses it: the value given, or by default on for an accelerator, off on the CPU."""
    return device.type != "cpu" if gpu_augment is None else gpu_augment


def augment_config(cfg: PretrainConfig) -> SimCLRAugmentConfig:
    return SimCLRAugmentConfig(
        image_size=cfg.image_size, crop_scale=cfg.crop_scale, gpu_color=cfg.gpu_augment
    )


def two_view_sample(
    example: dict[str, Any], rng: np.random.Generator, column: str, transform: TwoViewTransform
) -> dict[str, torch.Tensor] | str:
    """A stream example -> its two views (3, S, S) as `pixel_values` / `pixel_values_2` with their crop boxes
    (4,) and flips () as `crop_boxes` / `crop_boxes_2` and `flips` / `flips_2`, or a skip reason."""
    image = decode_rgb_pixels(example[column])
    reason = validate_image(image)
    if reason is not None:
        return reason
    views = transform.sample(image, rng)
    return {
        "pixel_values": views.view_1,
        "pixel_values_2": views.view_2,
        "crop_boxes": views.crop_box_1,
        "crop_boxes_2": views.crop_box_2,
        "flips": views.flip_1,
        "flips_2": views.flip_2,
    }


def build_data(
    cfg: PretrainConfig, process_index: int = 0, num_processes: int = 1
) -> tuple[StreamLoader, int | None]:
    """This process's loader of two-view batches over an endless reshuffled stream, and the split's size if known."""
    stream = open_stream(cfg.dataset, cfg.dataset_config, cfg.split, data_files=cfg.data_files)
    column = resolve_column(stream.features, cfg.image_column, "image")
    make_sample = functools.partial(
        two_view_sample, column=column, transform=TwoViewTransform(augment_config(cfg))
    )
    loader = train_loader(cfg, stream, make_sample, [column], process_index, num_processes)
    return loader, stream_num_examples(stream, cfg.split)


def build_optimizer(
    cfg: PretrainConfig, model: torch.nn.Module, total_batch_size: int, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on tensors of rank < 2, position embeddings and [CLS]) at lr * batch / 256, cosine
    decay after a linear warm-up. Build it after moving the model to its device."""
    groups = param_groups_weight_decay(model, cfg.weight_decay)
    optimizer = build_adamw(groups, lr=scaled_lr(cfg.lr, total_batch_size))
    scheduler = cosine_with_warmup(
        optimizer, total_steps, warmup_steps_from_fraction(total_steps, cfg.warmup_fraction)
    )
    return optimizer, scheduler


class DeviceColorAugment:
    """`prepare_batch` for --gpu-augment: uint8 crops -> device -> batched colour augmentation per view.

    The colour parameters of step s come from a CPU generator seeded by (seed, s, process), so a resumed
    run draws the same ones without saving generator state.
    """

    def __init__(self, cfg: PretrainConfig, accelerator: Accelerator):
        self.color = BatchedColorAugment(augment_config(cfg))
        self.seed, self.accelerator = cfg.seed, accelerator

    def __call__(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        key = np.random.SeedSequence([self.seed, step, self.accelerator.process_index]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(key))
        device = self.accelerator.device
        out = {name: value.to(device, non_blocking=True) for name, value in batch.items()}
        for view, name in enumerate(("pixel_values", "pixel_values_2")):
            out[name] = self.color(out[name], view=view, generator=generator)
        return out


def main(cfg: PretrainConfig) -> dict[str, Any]:
    """Pre-train as `cfg` says; returns the results written to results.json."""
    accelerator = build_accelerator(cfg)
    output_dir = Path(cfg.output_dir)
    total_batch = cfg.per_device_batch_size * accelerator.num_processes
    # resolved here, so config.yaml and the resume check hold what ran
    cfg.gpu_augment = resolve_gpu_augment(cfg.gpu_augment, accelerator.device)
    with setup_errors():
        loader, num_examples = build_data(cfg, accelerator.process_index, accelerator.num_processes)
        total_steps = total_steps_for(cfg, accelerator.num_processes, num_examples)
        model = apply_model_options(build_model(cfg), cfg).to(accelerator.device)
        optimizer, scheduler = build_optimizer(cfg, model, total_batch, total_steps)
        accelerator.print(describe_param_groups(optimizer.param_groups))
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        signature = run_signature(cfg, accelerator)
        state = resume(accelerator, cfg, signature, PRETRAIN_CRITICAL_KEYS, loader)
    if accelerator.is_main_process:
        save_config(cfg, output_dir / "config.yaml")
    start_trackers(accelerator, "pretrain", signature)
    lr = scaled_lr(cfg.lr, total_batch)
    accelerator.print(
        f"pre-training {total_steps} steps of {total_batch} images ({accelerator.num_processes} processes, "
        f"{accelerator.mixed_precision} precision), lr {lr:.3g}, starting at step {state.step}"
    )
    outcome = train_loop(
        accelerator,
        model,
        optimizer,
        scheduler,
        loader,
        cfg,
        state,
        total_steps,
        signature,
        prepare_batch=DeviceColorAugment(cfg, accelerator) if cfg.gpu_augment else None,
        desc="pretrain",
    )
    extra: dict[str, Any] = {"total_steps": total_steps, "total_batch_size": total_batch, "lr": lr}
    if outcome.status == "completed":
        patch_size = accelerator.unwrap_model(model).config.patch_size
        processor = DenseCLViTImageProcessor(
            size={"height": cfg.image_size, "width": cfg.image_size}, size_divisor=patch_size
        )
        save_model(accelerator, model, output_dir / "final", processor, submodule="densecl_vit")
        save_model(accelerator, model, output_dir / "final_pretraining", processor)
        extra.update(encoder_dir="final", pretraining_dir="final_pretraining")
    return finish_run(accelerator, cfg, outcome, extra)
