"""The data sections of the benchmark: two-view augmentation per worker against torchvision
(``augmentation``) and pre-training fed by the streaming loader against in-memory batches (``end_to_end``)."""

from __future__ import annotations

import gc
import io
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...data.transforms.two_view import SimCLRAugmentConfig, TwoViewTransform, naive_torchvision_two_view
from ...engine.guards import NonFiniteGuard
from ...engine.loop import batch_to_device, train_step
from ...tasks.pretraining import DeviceColorAugment, build_data, two_view_sample
from .measure import MemoryProbe, ru_maxrss_mb, synchronize, time_interleaved
from .model_sections import training_setup
from .options import SOURCE_SIZE, BenchOptions, build_config


def synthetic_jpegs(count: int, size: tuple[int, int] = SOURCE_SIZE, seed: int = 0) -> list[bytes]:
    """`count` photo-like JPEGs (quality 90) of `size` (width, height): smooth colour fields, edges, noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    images = []
    for _ in range(count):
        freq, phase = rng.uniform(0.01, 0.08, 3), rng.uniform(0, 2 * np.pi, 3)
        fields = [0.5 + 0.5 * np.sin(f * xx + g * yy + p) for f, g, p in zip(freq, freq[::-1], phase)]
        pixels = np.stack(fields, axis=-1) + rng.normal(0.0, 0.06, (height, width, 3))
        pixels[: height // 2, width // 3 :] *= rng.uniform(0.3, 1.0)  # a hard edge
        buffer = io.BytesIO()
        Image.fromarray((255 * np.clip(pixels, 0, 1)).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def augmentation_benchmark(opts: BenchOptions) -> dict[str, Any]:
    """Two-view images/s of one worker (one torch thread) from JPEG bytes: decode + two augmented views.

    "ours" is the pre-training data path (`pretraining.two_view_sample`: `samples.decode_image`, then
    `TwoViewTransform`); "crop_only" its --gpu-augment variant (colour left to the device); "naive" is PIL
    decoding + `naive_torchvision_two_view`. Rounds of 10 images, interleaved.
    """
    import datasets  # noqa: F401  (imported by decode_image on first use: keep the import out of the timing)

    jpegs = synthetic_jpegs(8, opts.source_size)
    cfg = SimCLRAugmentConfig(image_size=opts.image_size)
    ours = TwoViewTransform(cfg)
    crop_only = TwoViewTransform(SimCLRAugmentConfig(opts.image_size, gpu_color=True))
    naive = naive_torchvision_two_view(cfg)
    counter = iter(range(10**9))

    def ours_path(transform: TwoViewTransform) -> Callable[[], Any]:
        def run() -> Any:
            index = next(counter)
            example = {"image": {"bytes": jpegs[index % len(jpegs)], "path": None}}
            return two_view_sample(example, np.random.default_rng([0, index]), "image", transform)

        return run

    def naive_path() -> Any:
        return naive(Image.open(io.BytesIO(jpegs[next(counter) % len(jpegs)])).convert("RGB"))

    def rounds_of(fn: Callable[[], Any], n: int) -> Callable[[], None]:
        return lambda: [fn() for _ in range(n)]

    per_round = min(10, opts.aug_images)
    candidates = {
        "ours": rounds_of(ours_path(ours), per_round),
        "crop_only": rounds_of(ours_path(crop_only), per_round),
        "naive": rounds_of(naive_path, per_round),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    try:
        rounds = max(1, opts.aug_images // per_round)
        t = time_interleaved(candidates, rounds, 1, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    result: dict[str, Any] = {"image_size": opts.image_size, "source_size": list(opts.source_size)}
    for name, timing in t.items():
        result[f"{name}_images_per_s"] = per_round / timing.median
        result[f"{name}_images_per_cpu_s"] = per_round / timing.cpu_median
        result[f"{name}_peak_mb"] = timing.peak_mb
    result["speedup"] = t["naive"].median / t["ours"].median
    result["cpu_speedup"] = t["naive"].cpu_median / t["ours"].cpu_median
    return result


def write_jpeg_parquet(path: Path, count: int, size: tuple[int, int] = SOURCE_SIZE) -> Path:
    """A parquet file with one `datasets.Image` column "image" of `count` synthetic JPEGs."""
    import datasets  # seconds to import: only the data sections need it

    images = [{"bytes": data, "path": None} for data in synthetic_jpegs(count, size)]
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": images}, features=features).to_parquet(str(path))
    return path


def _timed_steps(
    count: int, next_batch: Callable[[int], Any], step: Callable[[Any], Any], device: torch.device
) -> tuple[float, float]:
    """Run `count` steps `step(next_batch(i))`; returns (total seconds, seconds spent in `next_batch`)."""
    total = wait = 0.0
    for index in range(count):
        start = time.perf_counter()
        batch = next_batch(index)
        synchronize(device)
        loaded = time.perf_counter()
        step(batch)
        synchronize(device)
        total, wait = total + time.perf_counter() - start, wait + loaded - start
    return total, wait


def end_to_end_benchmark(size: str, opts: BenchOptions, accelerator: Any, data_dir: Path) -> dict[str, Any]:
    """Pre-training steps fed by the real loader vs the same steps on a batch already in memory.

    The loader is `pretraining.build_data` over a local parquet file of JPEGs (`opts.workers` DataLoader
    workers decoding and augmenting). Order: model-only steps, loader steps (after draining what the
    workers prefetched meanwhile), model-only steps again; rates are images over total time.
    """
    drain = opts.workers * 2 + 1  # the DataLoader's prefetch queue (prefetch_factor 2 per worker) + one
    path = write_jpeg_parquet(
        data_dir / "images.parquet", opts.batch * (opts.steps + drain + 1), opts.source_size
    )
    config = build_config(size, opts.image_size)
    cfg, model, optimizer, scheduler = training_setup(config, opts, accelerator, dataset=str(path))
    loader, _ = build_data(cfg)
    batches, device, guard, probe = iter(loader), opts.device, NonFiniteGuard(), MemoryProbe(opts.device)
    # What `loop.train_loop` runs between the loader and the step.
    prepare_batch = DeviceColorAugment(cfg, accelerator) if opts.gpu_augment else batch_to_device(device)
    fixed = prepare_batch(next(batches), 0)

    def run(count: int, from_loader: bool) -> tuple[float, float]:
        load = (lambda i: prepare_batch(next(batches), i)) if from_loader else (lambda i: fixed)
        return _timed_steps(
            count,
            load,
            lambda batch: train_step(accelerator, model, optimizer, scheduler, batch, guard),
            device,
        )

    half = max(1, opts.steps // 2)
    run(opts.warmup, from_loader=False)
    first, _ = run(half, from_loader=False)
    run(drain, from_loader=True)
    probe.reset()
    loader_s, wait_s = run(opts.steps, from_loader=True)
    loader_peak = probe.peak_mb()
    second, _ = run(half, from_loader=False)
    batches.close()  # ends the DataLoader iteration: its workers exit and count in RUSAGE_CHILDREN
    gc.collect()
    model_only_s = (first + second) / (2 * half)
    return {
        "size": size,
        "batch": opts.batch,
        "workers": opts.workers,
        "gpu_augment": opts.gpu_augment,
        "images_per_s": opts.batch * opts.steps / loader_s,
        "model_only_images_per_s": opts.batch / model_only_s,
        "ratio": (loader_s / opts.steps) / model_only_s,
        "data_wait_fraction": wait_s / loader_s,
        "peak_mb": loader_peak,
        "worker_peak_mb": ru_maxrss_mb(resource.RUSAGE_CHILDREN) if opts.workers else 0.0,
    }


def end_to_end_in_temporary_folder(opts: BenchOptions, accelerator: Any) -> dict[str, Any]:
    """`end_to_end_benchmark` of the first size, its parquet file in a temporary folder, without progress bars."""
    import datasets  # seconds to import: only the data sections need it

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory() as folder:
            return end_to_end_benchmark(opts.sizes[0], opts, accelerator, Path(folder))
    finally:
        if enabled:
            datasets.enable_progress_bars()
