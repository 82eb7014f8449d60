"""Frozen-encoder probes on cached patch tokens: what the study measures about an encoder's dense features.

An encoder is run once over the labelled and validation scenes; its final-norm patch tokens (M, N, D) are
kept, and every probe trains on those tokens alone, so a probe costs seconds and no encoder pass:

- `segmentation_probe`: a per-patch linear classifier, its (K, rows, cols) logits upsampled bilinearly to the
  pixels and trained with pixel cross-entropy; mIoU on the validation pixels. With `coarse_labels` the same on a
  4-class split (floor, wall, ceiling, any object).
- `knn_probe`: each validation patch takes the weighted vote of its k most cosine-similar labelled patches
  (DINO's k-NN rule); mIoU over patch labels (the majority label of a patch's pixels).
- `depth_probe`: a per-patch linear regressor of log depth, upsampled like the classifier and trained with the
  squared log error on valid pixels; δ1 and AbsRel per image, averaged over images.
- `patch_similarity`: mean cosine between distinct patches of an image, raw and after removing the mean patch.

Features are standardised with the labelled subset's per-channel mean and std, so one learning rate suits
encoders whose token scales differ. Every probe is deterministic given its seed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...modeling import DenseCLViTModel
from ..data.decoding import decode_label_map
from ..data.synthetic.dataset import load_synthetic_dataset
from ..data.synthetic.sampling import CLASS_NAMES, OBJECT_KINDS
from ..data.synthetic.scenes import MAX_DEPTH, MIN_DEPTH
from ..data.transforms.dense import to_pixel_values
from ..tasks.segmentation import reduce_zero_label

IGNORE_INDEX = 255
COARSE_NAMES = ("floor", "wall", "ceiling", "object")


@dataclasses.dataclass
class Scenes:
    """Labelled scenes, decoded once: normalised pixels (M, 3, H, W), reduced labels (M, H, W) with 255 for
    "other", and depth (M, H, W) in metres (valid where MIN_DEPTH < depth < MAX_DEPTH)."""

    pixels: torch.Tensor
    labels: torch.Tensor
    depth: torch.Tensor

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def subset(self, index: torch.Tensor) -> Scenes:
        return Scenes(self.pixels[index], self.labels[index], self.depth[index])


def load_scenes(dataset: str | Path, split: str) -> Scenes:
    """Every scene of one split of a synthetic-scenes folder, in stream order."""
    pixels, labels, depths = [], [], []
    for example in load_synthetic_dataset(dataset, split, streaming=True):
        pixels.append(to_pixel_values(example["image"].convert("RGB")))
        labels.append(
            torch.from_numpy(reduce_zero_label(decode_label_map(example["annotation"]), IGNORE_INDEX))
        )
        depths.append(torch.as_tensor(np.asarray(example["depth_map"], dtype=np.float32)))
    if not pixels:
        raise ValueError(f"{dataset} holds no {split} scenes")
    return Scenes(torch.stack(pixels), torch.stack(labels).long(), torch.stack(depths))


def num_classes() -> int:
    return len(CLASS_NAMES) - 1  # "other" is ignored


def coarse_labels(labels: torch.Tensor) -> torch.Tensor:
    """Reduced labels -> floor 0, wall 1, ceiling 2, object 3 (255 stays 255)."""
    table = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
    for raw, name in enumerate(CLASS_NAMES[1:]):
        table[raw] = COARSE_NAMES.index("object" if name in OBJECT_KINDS else name)
    return table[labels.long()]


@torch.inference_mode()
def encode(encoder_dir: str | Path, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Final-norm patch tokens (M, N, D) of images (M, 3, H, W); any folder whose weights hold the encoder."""
    encoder = DenseCLViTModel.from_pretrained(encoder_dir).eval()
    parts = [
        encoder(pixel_values=pixels[i : i + batch_size]).last_hidden_state[:, 1:]
        for i in range(0, pixels.shape[0], batch_size)
    ]
    return torch.cat(parts).float()


# --- metrics --------------------------------------------------------------------------------------------


def mean_iou(predictions: torch.Tensor, labels: torch.Tensor, classes: int) -> float:
    """Dataset-level mIoU: per class intersection / union summed over all maps, averaged over the classes
    that occur in the labels or the predictions; pixels labelled 255 are left out."""
    valid = labels != IGNORE_INDEX
    counts = torch.bincount(labels[valid] * classes + predictions[valid], minlength=classes * classes)
    confusion = counts.reshape(classes, classes).double()
    intersection = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    return float((intersection[present] / union[present]).mean()) if present.any() else float("nan")


def depth_metrics(prediction: torch.Tensor, depth: torch.Tensor) -> dict[str, float]:
    """δ1 (share of valid pixels with max(p/g, g/p) < 1.25) and AbsRel per image, averaged over images."""
    valid = (depth > MIN_DEPTH) & (depth < MAX_DEPTH)
    ratio = torch.maximum(prediction / depth, depth / prediction)
    count = valid.sum((1, 2)).clamp_min(1)
    delta1 = ((ratio < 1.25) & valid).sum((1, 2)) / count
    abs_rel = torch.where(valid, (prediction - depth).abs() / depth, 0).sum((1, 2)) / count
    used = valid.any(dim=(1, 2))
    return {"delta1": float(delta1[used].mean()), "abs_rel": float(abs_rel[used].mean())}


def mean_patch_cosine(features: torch.Tensor) -> torch.Tensor:
    """Per-image mean cosine similarity between distinct patch features: (B, N, D) -> (B,), N >= 2."""
    if features.ndim != 3 or features.shape[1] < 2:
        raise ValueError(f"features must be (B, N, D) with N >= 2 patches, got shape {tuple(features.shape)}")
    unit = F.normalize(features.double(), dim=-1)
    gram = unit @ unit.transpose(1, 2)  # (B, N, N)
    n = unit.shape[1]
    off_diagonal = gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)
    return off_diagonal / (n * (n - 1))


def patch_similarity(features: torch.Tensor) -> dict[str, float]:
    """{"patch_cos": mean over images of `mean_patch_cosine`, "patch_cos_centered": the same after subtracting
    the mean feature of all the patches of all the images} of features (M, N, D)."""
    centered = features - features.mean(dim=(0, 1), keepdim=True)
    return {
        "patch_cos": float(mean_patch_cosine(features).mean()),
        "patch_cos_centered": float(mean_patch_cosine(centered).mean()),
    }


# --- probes ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """Full-batch AdamW on the labelled tokens: `steps` at `lr`; `knn_k` neighbours at `knn_temperature`."""

    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-4
    knn_k: int = 20
    knn_temperature: float = 0.07


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean = train.mean(dim=(0, 1), keepdim=True)
    std = train.std(dim=(0, 1), keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def _to_pixels(values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(M, N, C) per-patch values -> (M, C, H, W), bilinear over the square patch grid."""
    side = round(values.shape[1] ** 0.5)
    grid = values.transpose(1, 2).reshape(values.shape[0], values.shape[2], side, side)
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)


def _fit_linear(
    features: torch.Tensor, out_dim: int, loss_fn, settings: ProbeSettings, seed: int
) -> torch.nn.Linear:
    """A linear map D -> out_dim, trained full-batch by AdamW on loss_fn(per-patch outputs (M, N, out_dim))."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(features.shape[-1], out_dim)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    with torch.enable_grad():
        for _ in range(settings.steps):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(layer(features)).backward()
            optimizer.step()
    return layer.eval()


def segmentation_probe(
    train_tokens: torch.Tensor,
    train_labels: torch.Tensor,
    val_tokens: torch.Tensor,
    val_labels: torch.Tensor,
    classes: int,
    settings: ProbeSettings,
    seed: int,
) -> float:
    """Linear per-patch classifier trained on (L, N, D) tokens against (L, H, W) labels; validation mIoU."""
    train, val = _standardise(train_tokens, val_tokens)
    size = tuple(train_labels.shape[-2:])

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_to_pixels(logits, size), train_labels, ignore_index=IGNORE_INDEX)

    layer = _fit_linear(train, classes, loss_fn, settings, seed)
    with torch.no_grad():
        predictions = _to_pixels(layer(val), size).argmax(1)
    return mean_iou(predictions, val_labels, classes)


def patch_labels(labels: torch.Tensor, grid: int, classes: int) -> torch.Tensor:
    """(M, H, W) pixel labels -> (M, grid * grid) majority label of each patch's labelled pixels (255 if none)."""
    one_hot = F.one_hot(labels.clamp_max(classes), classes + 1)[..., :classes]  # 255 -> all zeros
    counts = F.adaptive_avg_pool2d(one_hot.permute(0, 3, 1, 2).double(), grid)  # (M, K, g, g)
    best = counts.argmax(1)
    return torch.where(counts.sum(1) > 0, best, IGNORE_INDEX).flatten(1)


def knn_probe(
    train_tokens: torch.Tensor,
    train_labels: torch.Tensor,
    val_tokens: torch.Tensor,
    val_labels: torch.Tensor,
    classes: int,
    settings: ProbeSettings,
) -> float:
    """Weighted k-NN over labelled patches (cosine similarity, weights exp(s / T)); patch-level mIoU."""
    grid = round(train_tokens.shape[1] ** 0.5)
    train_targets = patch_labels(train_labels, grid, classes).flatten()
    keep = train_targets != IGNORE_INDEX
    bank = F.normalize(train_tokens.flatten(0, 1)[keep], dim=-1)  # (P, D)
    bank_labels = train_targets[keep]
    queries = F.normalize(val_tokens.flatten(0, 1), dim=-1)  # (Q, D)
    k = min(settings.knn_k, bank.shape[0])
    votes = []
    for chunk in queries.split(4096):
        similarity, index = (chunk @ bank.T).topk(k, dim=1)  # (q, k)
        weights = (similarity / settings.knn_temperature).exp()
        scores = torch.zeros(chunk.shape[0], classes).scatter_add_(1, bank_labels[index], weights)
        votes.append(scores.argmax(1))
    val_targets = patch_labels(val_labels, grid, classes).flatten()
    return mean_iou(torch.cat(votes), val_targets, classes)


def depth_probe(
    train_tokens: torch.Tensor,
    train_depth: torch.Tensor,
    val_tokens: torch.Tensor,
    val_depth: torch.Tensor,
    settings: ProbeSettings,
    seed: int,
) -> dict[str, float]:
    """Linear per-patch log-depth regressor, upsampled to the pixels; validation δ1 and AbsRel."""
    train, val = _standardise(train_tokens, val_tokens)
    size = tuple(train_depth.shape[-2:])
    valid = (train_depth > MIN_DEPTH) & (train_depth < MAX_DEPTH)
    target = torch.where(valid, train_depth, 1.0).log()

    def loss_fn(log_depth: torch.Tensor) -> torch.Tensor:
        return (_to_pixels(log_depth, size)[:, 0] - target)[valid].square().mean()

    layer = _fit_linear(train, 1, loss_fn, settings, seed)
    with torch.no_grad():
        prediction = _to_pixels(layer(val), size)[:, 0].exp().clamp(MIN_DEPTH, MAX_DEPTH)
    return depth_metrics(prediction, val_depth)


def probe_encoder(
    train_tokens: torch.Tensor,
    train: Scenes,
    val_tokens: torch.Tensor,
    val: Scenes,
    settings: ProbeSettings,
    seed: int,
) -> dict[str, float]:
    """Every frozen probe of one encoder on one labelled subset: {"seg_miou", "coarse_miou", "knn_miou",
    "delta1", "abs_rel"}."""
    classes = num_classes()
    return {
        "seg_miou": segmentation_probe(
            train_tokens, train.labels, val_tokens, val.labels, classes, settings, seed
        ),
        "coarse_miou": segmentation_probe(
            train_tokens,
            coarse_labels(train.labels),
            val_tokens,
            coarse_labels(val.labels),
            4,
            settings,
            seed,
        ),
        "knn_miou": knn_probe(train_tokens, train.labels, val_tokens, val.labels, classes, settings),
        **depth_probe(train_tokens, train.depth, val_tokens, val.depth, settings, seed),
    }


__all__ = [
    "COARSE_NAMES",
    "ProbeSettings",
    "Scenes",
    "coarse_labels",
    "depth_metrics",
    "depth_probe",
    "encode",
    "knn_probe",
    "load_scenes",
    "mean_iou",
    "mean_patch_cosine",
    "num_classes",
    "patch_labels",
    "patch_similarity",
    "probe_encoder",
    "segmentation_probe",
]
