"""Measurement primitives of the benchmark: FLOP counts, GPU peaks, peak memory, interleaved timing and aten
operator counts. Nothing here knows about the sections that use them."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ....modeling import DenseCLViTConfig

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets: the first entry whose words
# all appear in the device name wins. Other cards: pass --peak-tflops.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIE"), 756.0),
    (("H100",), 989.0),  # SXM
    (("H200",), 989.0),
    (("A100",), 312.0),
    (("L4",), 121.0),
)


# --- FLOPs ---------------------------------------------------------------------------------------------


def vit_forward_flops(
    image_size: int | tuple[int, int],
    patch_size: int,
    hidden_size: int,
    num_layers: int,
    mlp_ratio: float = 4.0,
    num_channels: int = 3,
) -> int:
    """FLOPs (2 per multiply-add) of one image through the encoder's forward pass.

    With N = (H / p)(W / p) patches, T = N + 1 tokens ([CLS]), width D and MLP ratio r:

    - patch embedding, a (p^2 C -> D) linear map per patch: 2 N p^2 C D;
    - per block, per token: the qkv projection 3 D^2, the output projection D^2 and the two MLP layers
      2 r D^2 multiply-adds, (4 + 2r) D^2 in all, so (8 + 4r) T D^2 FLOPs = 24 T D^2 for r = 4;
    - per block, attention: scores Q K^T (T x T from d-wide rows, for every head: T^2 D multiply-adds)
      and the weighted sum A V (another T^2 D): 4 T^2 D FLOPs.

    Total = 2 N p^2 C D + L (24 T D^2 + 4 T^2 D). Left out, each O(T D) per block: biases, LayerNorm, GELU,
    softmax, residual additions, position embeddings (under 1% of the total at ViT-Ti/16, 224 px).
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    patches = (height // patch_size) * (width // patch_size)
    tokens, dim = patches + 1, hidden_size
    embed = 2 * patches * patch_size**2 * num_channels * dim
    block = round((8 + 4 * mlp_ratio) * tokens * dim**2) + 4 * tokens**2 * dim
    return embed + num_layers * block


def encoder_flops(config: DenseCLViTConfig, image_size: int | None = None, backward: bool = False) -> int:
    """`vit_forward_flops` of a config at `image_size` (default: the config's); with `backward`, forward+backward.

    The backward pass costs twice the forward (per matrix product, one for the input's gradient and one for the
    weights'), except that the pixels need no gradient: 3 x forward - the patch embedding's input gradient.
    """
    size = image_size or config.image_size
    forward = vit_forward_flops(
        size,
        config.patch_size,
        config.hidden_size,
        config.num_hidden_layers,
        config.mlp_ratio,
        config.num_channels,
    )
    if not backward:
        return forward
    patches = (size // config.patch_size) ** 2
    return 3 * forward - 2 * patches * config.patch_size**2 * config.num_channels * config.hidden_size


def pretraining_step_flops(config: DenseCLViTConfig, batch_size: int, image_size: int | None = None) -> int:
    """FLOPs of one pre-training step (forward + backward) on `batch_size` images, i.e. 2B views.

    2B encoder passes (`encoder_flops` with backward) + 3 x the forward of the projection head on all 2B (N + 1)
    tokens, 2 (D H + H^2 + H P) each (3 linear layers D -> H -> H -> P), + 3 x the forward of the symmetric
    local-to-global loss: per direction the positives (B N P multiply-adds) and the logits against every
    patch of the batch (B^2 N P).
    """
    size = image_size or config.image_size
    patches = (size // config.patch_size) ** 2
    dim, hidden, out = config.hidden_size, config.projection_hidden_size, config.projection_dim
    head = 2 * (patches + 1) * (dim * hidden + hidden * hidden + hidden * out)
    loss = 2 * 2 * (batch_size * patches * out + batch_size**2 * patches * out)
    return 2 * batch_size * (encoder_flops(config, size, backward=True) + 3 * head) + 3 * loss


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a GPU from its `torch.cuda.get_device_name()`, None if not in the table."""
    words = set(device_name.upper().replace("-", " ").split())
    return next((tflops for keys, tflops in PEAK_BF16_TFLOPS if words.issuperset(keys)), None)


# --- memory and timing ---------------------------------------------------------------------------------


class MemoryProbe:
    """Peak memory since the last `reset()`: CUDA max allocated, or the CPU process's peak resident set."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.resettable = self.cuda or self._clear_refs()
        self.method = (
            "cuda_max_allocated" if self.cuda else ("vmhwm_reset" if self.resettable else "ru_maxrss")
        )

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM, the peak resident set size (Linux >= 4.0)
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.resettable:
            self._clear_refs()

    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        if self.resettable:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        return ru_maxrss_mb(resource.RUSAGE_SELF)


def ru_maxrss_mb(who: int) -> float:
    """`getrusage(who).ru_maxrss` in MiB (`who`: RUSAGE_SELF or RUSAGE_CHILDREN)."""
    rss = resource.getrusage(who).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call of one candidate over the timed rounds (wall clock and process CPU time)."""

    wall: list[float]
    cpu: list[float]
    peak_mb: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def time_interleaved(
    candidates: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    device: torch.device,
) -> dict[str, Timing]:
    """Time each candidate `repeats` times after `warmup` untimed calls, in A B B A order (alternating rounds)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    probe = MemoryProbe(device)
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    synchronize(device)
    timings = {name: Timing([], []) for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            probe.reset()
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            candidates[name]()
            synchronize(device)
            timings[name].wall.append(time.perf_counter() - wall)
            timings[name].cpu.append(time.process_time() - cpu)
            timings[name].peak_mb = max(timings[name].peak_mb, probe.peak_mb())
    return timings


def paired_ratio(numerator: Timing, denominator: Timing) -> float:
    """Median over rounds of the ratio of two candidates' times in the same round: on a machine whose speed
    drifts, each ratio compares calls made seconds apart, which the ratio of the two medians does not."""
    return statistics.median(a / b for a, b in zip(numerator.wall, denominator.wall, strict=True))


def timing_summary(timings: dict[str, Timing]) -> dict[str, dict[str, Any]]:
    """Per candidate: median, min and CPU-median seconds and every round's wall seconds (for results.json)."""
    return {
        name: {"median_s": t.median, "min_s": min(t.wall), "cpu_median_s": t.cpu_median, "wall_s": t.wall}
        for name, t in timings.items()
    }


# --- operator counts -----------------------------------------------------------------------------------


class _OpCounter(TorchDispatchMode):
    """Counts the aten operators that run (forward and backward), by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def operator_difference(
    ours: Callable[[torch.Tensor], torch.Tensor],
    reference: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
) -> tuple[dict[str, int], dict[str, int]]:
    """The aten operators that one forward+backward of `ours` runs more often than `reference`, and vice versa.

    Noise-free evidence, where timings are noisy, that two implementations do the same work.
    """
    counts = []
    for fn in (ours, reference):
        with _OpCounter() as counter:
            fn(x).float().sum().backward()
        counts.append(counter.counts)
    return dict(counts[0] - counts[1]), dict(counts[1] - counts[0])
