"""Losses of DenseCL-ViT: local-to-global and global contrastive pre-training losses, depth losses.

This file imports only torch: it travels as Hub remote code next to the modeling file.

- [0] Rabarisoa et al., "Self-Supervised Pre-training of Vision Transformers for Dense Prediction Tasks",
  2022, https://arxiv.org/abs/2205.15173 (section 3: local-to-global loss; equation 1: global InfoNCE).
- [1] Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations" (SimCLR), 2020,
  https://arxiv.org/abs/2002.05709 (NT-Xent).
- [2] Laina et al., "Deeper Depth Prediction with Fully Convolutional Residual Networks", 2016,
  https://arxiv.org/abs/1606.00373 (berHu loss).
- [3] Wang et al., "Dense Contrastive Learning for Self-Supervised Visual Pre-Training" (DenseCL), 2021,
  https://arxiv.org/abs/2011.09157; Xie et al., "Propagate Yourself" (PixPro), 2021,
  https://arxiv.org/abs/2011.10043; Bardes et al., "VICRegL", 2022, https://arxiv.org/abs/2210.01571
  (dense terms whose positives are the geometrically corresponding locations of two views).

The contrastive losses work on log-sum-exp only and never exponentiate a logit, so bf16/fp16 embeddings
cannot overflow; every similarity product runs in float32 (float64 stays float64), autocast or not.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

__all__ = [
    "berhu_loss",
    "gather_with_grad",
    "global_info_nce",
    "gradient_loss",
    "local_global_info_nce",
    "local_local_info_nce",
    "match_patches",
    "rank_batch_offset",
    "symmetric_local_global_loss",
]


DENSE_CHUNK_ELEMENTS = 2**26


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use a positive value such as 0.1.")


def _check_negatives(
    negatives: torch.Tensor, batch_size: int, batch_offset: int, dim: int, name: str
) -> None:
    if negatives.shape[-1] != dim:
        raise ValueError(
            f"{name} has feature size {negatives.shape[-1]} but the anchors have {dim}; pass embeddings "
            "from the same projection."
        )
    if batch_offset < 0 or batch_offset + batch_size > negatives.shape[0]:
        raise ValueError(
            f"batch_offset={batch_offset} with a local batch of {batch_size} does not fit inside the "
            f"{negatives.shape[0]} rows of {name}; pass rank * local batch size."
        )


def _similarity_logits(equation: str, temperature: float, *operands: torch.Tensor) -> torch.Tensor:
    """`einsum(equation, *operands) / temperature` with the product itself in at least float32, autocast or not.

    Rounding the product of bf16/fp16 embeddings (or letting autocast run it in half precision) puts a logit
    near 1 / t = 10 on a grid of 1/16 in bf16; so every loss term takes its products here, operands widened first.
    """
    dtype = torch.promote_types(operands[0].dtype, torch.float32)
    with torch.autocast(operands[0].device.type, enabled=False):
        return torch.einsum(equation, *(operand.to(dtype) for operand in operands)) / temperature


def _own_row_mask(batch_size: int, num_rows: int, batch_offset: int, device: torch.device) -> torch.Tensor:
    """(B, num_rows) boolean mask, True at column batch_offset + b of row b (the anchor's own image)."""
    rows = torch.arange(batch_size, device=device)
    mask = torch.zeros(batch_size, num_rows, dtype=torch.bool, device=device)
    mask[rows, rows + batch_offset] = True
    return mask


def local_global_info_nce(
    global_embeddings: torch.Tensor,
    local_embeddings: torch.Tensor,
    temperature: float = 0.1,
    negative_local_embeddings: torch.Tensor | None = None,
    batch_offset: int = 0,
) -> torch.Tensor:
    """Local-to-global InfoNCE loss of [0], section 3, for one direction (global of view 1, patches of view 2).

    For image b with global embedding z and the N patch embeddings z_i+ of its other view,
    l_i = -log(e^{z.z_i+/t} / (e^{z.z_i+/t} + sum_{z- in N(z)} e^{z.z-/t})), where N(z) holds every patch
    embedding of the other images of the batch (same view as the positives): (B - 1) * N negatives. Each
    positive has its own denominator. The image loss is the mean over its N patches, the batch loss the
    mean over images. With B = 1 and no gathered negatives the denominator holds only the positive, so
    the loss is exactly 0.

    Args:
        global_embeddings: (B, D) L2-normalised global ([CLS]) embeddings of one view.
        local_embeddings: (B, N, D) L2-normalised patch embeddings of the other view (the positives).
        temperature: softmax temperature t > 0.
        negative_local_embeddings: optional (B_all, N, D) patch embeddings gathered from every process
            (see `gather_with_grad`), same view as `local_embeddings`. When given, negatives come from it,
            leaving out row batch_offset + b for anchor b (its own image); the rows of the other images of
            this process stay negatives.
        batch_offset: index of this process's first image in `negative_local_embeddings` (ignored
            without it).

    Returns:
        Scalar loss, float32 for half-precision inputs (float64 stays float64).
    """
    _check_temperature(temperature)
    if global_embeddings.ndim != 2 or local_embeddings.ndim != 3:
        raise ValueError(
            f"expected global_embeddings (B, D) and local_embeddings (B, N, D), got "
            f"{tuple(global_embeddings.shape)} and {tuple(local_embeddings.shape)}."
        )
    batch_size, dim = global_embeddings.shape
    if local_embeddings.shape[0] != batch_size or local_embeddings.shape[2] != dim:
        raise ValueError(
            f"local_embeddings {tuple(local_embeddings.shape)} must be (B, N, D) = ({batch_size}, N, {dim}) "
            f"to match global_embeddings {tuple(global_embeddings.shape)}."
        )
    if negative_local_embeddings is None:
        negatives, batch_offset = local_embeddings, 0
    else:
        if negative_local_embeddings.ndim != 3:
            raise ValueError(
                f"negative_local_embeddings must be (B_all, N, D), got {tuple(negative_local_embeddings.shape)}."
            )
        _check_negatives(
            negative_local_embeddings, batch_size, batch_offset, dim, "negative_local_embeddings"
        )
        negatives = negative_local_embeddings

    # (B, N): similarity of each global embedding with the patches of its own other view.
    positives = _similarity_logits("bd,bnd->bn", temperature, global_embeddings, local_embeddings)
    # (B, B_all, N): similarity with every patch of every image; the anchor's own image is no negative.
    logits = _similarity_logits("bd,knd->bkn", temperature, global_embeddings, negatives)
    own = _own_row_mask(batch_size, negatives.shape[0], batch_offset, logits.device)
    logits = logits.masked_fill(own[:, :, None], float("-inf"))
    lse_negatives = torch.logsumexp(logits.flatten(1), dim=1)  # (B,), shared by the N positives
    losses = torch.logaddexp(positives, lse_negatives[:, None]) - positives  # (B, N)
    return losses.mean()


def symmetric_local_global_loss(
    global_embeddings_1: torch.Tensor,
    local_embeddings_1: torch.Tensor,
    global_embeddings_2: torch.Tensor,
    local_embeddings_2: torch.Tensor,
    temperature: float = 0.1,
    negative_local_embeddings_1: torch.Tensor | None = None,
    negative_local_embeddings_2: torch.Tensor | None = None,
    batch_offset: int = 0,
) -> torch.Tensor:
    """Local-to-global loss of [0] made symmetric by swapping the views: 0.5 * (L(g1, l2) + L(g2, l1)).

    Args:
        global_embeddings_1: (B, D) global embeddings of view 1.
        local_embeddings_1: (B, N, D) patch embeddings of view 1.
        global_embeddings_2: (B, D) global embeddings of view 2.
        local_embeddings_2: (B, N, D) patch embeddings of view 2.
        temperature: softmax temperature > 0.
        negative_local_embeddings_1: optional (B_all, N, D) gathered patch embeddings of view 1.
        negative_local_embeddings_2: optional (B_all, N, D) gathered patch embeddings of view 2.
        batch_offset: index of this process's first image in the gathered tensors.

    Returns:
        Scalar loss, float32 for half-precision inputs (float64 stays float64).
    """
    if (negative_local_embeddings_1 is None) != (negative_local_embeddings_2 is None):
        raise ValueError("pass both negative_local_embeddings_1 and negative_local_embeddings_2, or neither.")
    loss_12 = local_global_info_nce(
        global_embeddings_1, local_embeddings_2, temperature, negative_local_embeddings_2, batch_offset
    )
    loss_21 = local_global_info_nce(
        global_embeddings_2, local_embeddings_1, temperature, negative_local_embeddings_1, batch_offset
    )
    return 0.5 * (loss_12 + loss_21)


def _patch_grid(num_patches: int, grid_size: tuple[int, int] | None) -> tuple[int, int]:
    if grid_size is None:
        side = round(num_patches**0.5)
        grid_size = (side, side)
    if grid_size[0] * grid_size[1] != num_patches:
        raise ValueError(
            f"grid_size {tuple(grid_size)} does not hold {num_patches} patches; pass the (rows, columns) of the "
            "patch grid for non-square views."
        )
    return grid_size


def match_patches(
    crop_boxes_1: torch.Tensor,
    flips_1: torch.Tensor,
    grid_size_1: tuple[int, int],
    crop_boxes_2: torch.Tensor,
    flips_2: torch.Tensor,
    grid_size_2: tuple[int, int],
) -> torch.Tensor:
    """For every view-1 patch, the index of the view-2 patch of the same image that holds its centre, or -1.

    A view is the crop box (left, top, width, height) of the source image, in source pixels, resized to the
    view and then flipped horizontally when its flag is set. The centre of view-1 patch (r, c) of a
    (rows, cols) grid sits at the fractions u = (c + 0.5) / cols, v = (r + 0.5) / rows of the view (u -> 1 - u
    when flipped), i.e. at (left + u * width, top + v * height) in the source. It matches view 2 when that point
    lies in view 2's box, half-open [left, left + width) x [top, top + height); the matching patch is the one
    whose cell contains the point after view 2's own flip.

    Args:
        crop_boxes_1: (B, 4) boxes of view 1, source pixels.
        flips_1: (B,) horizontal flip flags of view 1.
        grid_size_1: (rows, cols) of view 1's patch grid.
        crop_boxes_2, flips_2, grid_size_2: the same for view 2.

    Returns:
        (B, rows_1 * cols_1) long tensor of row-major view-2 patch indices, -1 where the centre is outside view 2.
    """
    rows_1, cols_1 = grid_size_1
    rows_2, cols_2 = grid_size_2
    device, dtype = crop_boxes_1.device, torch.float64
    box_1, box_2 = crop_boxes_1.to(dtype), crop_boxes_2.to(dtype)
    v = (torch.arange(rows_1, device=device, dtype=dtype) + 0.5) / rows_1  # (R1,)
    u = (torch.arange(cols_1, device=device, dtype=dtype) + 0.5) / cols_1  # (C1,)
    u = torch.where(flips_1.bool()[:, None], 1 - u, u)  # (B, C1)
    x = box_1[:, 0, None, None] + u[:, None, :] * box_1[:, 2, None, None]  # (B, 1, C1) source column
    y = box_1[:, 1, None, None] + v[None, :, None] * box_1[:, 3, None, None]  # (B, R1, 1) source row
    u_2 = (x - box_2[:, 0, None, None]) / box_2[:, 2, None, None]  # (B, 1, C1) fraction across view 2
    v_2 = (y - box_2[:, 1, None, None]) / box_2[:, 3, None, None]  # (B, R1, 1)
    inside = (u_2 >= 0) & (u_2 < 1) & (v_2 >= 0) & (v_2 < 1)  # (B, R1, C1)
    u_2 = torch.where(flips_2.bool()[:, None, None], 1 - u_2, u_2)
    col = (u_2 * cols_2).floor().clamp(0, cols_2 - 1).long()
    row = (v_2 * rows_2).floor().clamp(0, rows_2 - 1).long()
    index = torch.where(inside, row * cols_2 + col, torch.full_like(inside, -1, dtype=torch.long))
    return index.flatten(1)


def _matched_losses(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    positive: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """sum_k weight_k * (logsumexp_m(a_k.c_m / t) - a_k.c_pos(k) / t) for (K, D) anchors, (M, D) candidates.

    Neighbouring patches have cosines near 1, so the product must not be taken in bf16/fp16 (`_similarity_logits`).
    """
    logits = _similarity_logits("kd,md->km", temperature, anchors, candidates)  # (K, M)
    losses = torch.logsumexp(logits, dim=1) - logits.gather(1, positive[:, None])[:, 0]  # (K,)
    return (losses * weight).sum()


def _dense_direction(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    match: torch.Tensor,
    batch_offset: int,
    temperature: float,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed InfoNCE of the matched anchors of one direction, and how many there were (both on the device).

    anchors (B, N1, D), candidates (B_all, N2, D), match (B, N1) from `match_patches`. Unmatched anchors are
    weighted 0 rather than dropped, so the step never waits for the host to learn how many matched. Each chunk
    of `chunk_size` anchors (None: sized by the number of candidates) is checkpointed: its (chunk, B_all * N2)
    logits are recomputed in the backward pass instead of being kept, so memory grows with the chunk, not with
    (B * N)^2.
    """
    batch = torch.arange(match.shape[0], device=match.device)[:, None] + batch_offset  # (B, 1)
    positive = (batch * candidates.shape[1] + match.clamp_min(0)).flatten()  # (B * N1,) flat candidate column
    dtype = torch.promote_types(candidates.dtype, torch.float32)  # widened once, not per chunk
    rows, flat = anchors.flatten(0, 1).to(dtype), candidates.flatten(0, 1).to(dtype)
    weight = (match >= 0).flatten().to(dtype)
    recompute = torch.is_grad_enabled() and (rows.requires_grad or flat.requires_grad)
    total = flat.new_zeros(())
    if (
        chunk_size is None
    ):  # about 2^26 logits (256 MB in float32) per chunk, whatever the number of candidates
        chunk_size = max(1, DENSE_CHUNK_ELEMENTS // flat.shape[0])
    for start in range(0, rows.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        args = (rows[part], flat, positive[part], weight[part], temperature)
        total = total + (
            checkpoint(_matched_losses, *args, use_reentrant=False) if recompute else _matched_losses(*args)
        )
    return total, weight.sum()


def local_local_info_nce(
    local_embeddings_1: torch.Tensor,
    local_embeddings_2: torch.Tensor,
    crop_boxes_1: torch.Tensor,
    flips_1: torch.Tensor,
    crop_boxes_2: torch.Tensor,
    flips_2: torch.Tensor,
    temperature: float = 0.1,
    grid_size_1: tuple[int, int] | None = None,
    grid_size_2: tuple[int, int] | None = None,
    negative_local_embeddings_1: torch.Tensor | None = None,
    negative_local_embeddings_2: torch.Tensor | None = None,
    batch_offset: int = 0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Dense local-to-local InfoNCE between geometrically corresponding patches of two views (the idea of [3]).

    Each view-1 patch whose centre falls inside view 2's crop (`match_patches`) is an anchor a; its positive p
    is the view-2 patch of the same image that holds that point, and every other view-2 patch of the batch is a
    negative, the same image's other patches included (they keep an image's patches apart, which the
    local-to-global loss of [0] does not): l_a = -log(e^{a.p/t} / sum_{c in view-2 patches} e^{a.c/t}). The
    same with the views swapped; the loss is the mean of l over the matched patches of both directions (with
    gathered negatives under torch.distributed: of every process, so that DDP's averaged gradients equal one
    process's on the whole batch). An
    image whose views do not overlap adds no term; a batch with no match at all gives 0 (with a graph), never
    NaN. The logits go through log-sum-exp in at least float32, in checkpointed chunks of `chunk_size` anchors.

    Args:
        local_embeddings_1: (B, N1, D) L2-normalised patch embeddings of view 1, row-major over its grid.
        local_embeddings_2: (B, N2, D) L2-normalised patch embeddings of view 2.
        crop_boxes_1: (B, 4) crop box (left, top, width, height) of view 1 in source pixels.
        flips_1: (B,) whether view 1 was flipped horizontally after the crop.
        crop_boxes_2: (B, 4) crop box of view 2.
        flips_2: (B,) flips of view 2.
        temperature: softmax temperature t > 0.
        grid_size_1: (rows, cols) of view 1's patch grid; None: square.
        grid_size_2: (rows, cols) of view 2's patch grid; None: square.
        negative_local_embeddings_1: optional (B_all, N1, D) view-1 patch embeddings of every process
            (`gather_with_grad`); the candidates of the view-2 anchors.
        negative_local_embeddings_2: optional (B_all, N2, D) view-2 patch embeddings of every process.
        batch_offset: index of this process's first image in the gathered tensors (ignored without them).
        chunk_size: anchors per chunk of the similarity matrix, >= 1; None: as many as keep a chunk's logits near
            2^26 values (with gathered negatives the candidates, and so each row, grow with the processes).

    Returns:
        Scalar loss, float32 for half-precision inputs (float64 stays float64).
    """
    _check_temperature(temperature)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    if local_embeddings_1.ndim != 3 or local_embeddings_2.ndim != 3:
        raise ValueError(
            f"local embeddings must be (B, N, D), got {tuple(local_embeddings_1.shape)} and "
            f"{tuple(local_embeddings_2.shape)}."
        )
    batch_size, num_1, dim = local_embeddings_1.shape
    if local_embeddings_2.shape[0] != batch_size or local_embeddings_2.shape[2] != dim:
        raise ValueError(
            f"local_embeddings_2 {tuple(local_embeddings_2.shape)} must be (B, N2, D) with B = {batch_size}, "
            f"D = {dim}."
        )
    for name, tensor, shape in (
        ("crop_boxes_1", crop_boxes_1, (batch_size, 4)),
        ("crop_boxes_2", crop_boxes_2, (batch_size, 4)),
        ("flips_1", flips_1, (batch_size,)),
        ("flips_2", flips_2, (batch_size,)),
    ):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}.")
    if (negative_local_embeddings_1 is None) != (negative_local_embeddings_2 is None):
        raise ValueError("pass both negative_local_embeddings_1 and negative_local_embeddings_2, or neither.")
    if negative_local_embeddings_1 is None:
        negatives_1, negatives_2, batch_offset = local_embeddings_1, local_embeddings_2, 0
    else:
        negatives_1, negatives_2 = negative_local_embeddings_1, negative_local_embeddings_2
        for name, negatives, reference in (
            ("negative_local_embeddings_1", negatives_1, local_embeddings_1),
            ("negative_local_embeddings_2", negatives_2, local_embeddings_2),
        ):
            if negatives.ndim != 3 or negatives.shape[1:] != reference.shape[1:]:
                raise ValueError(
                    f"{name} must be (B_all, N, D) = (B_all, {reference.shape[1]}, {dim}), got "
                    f"{tuple(negatives.shape)}."
                )
            _check_negatives(negatives, batch_size, batch_offset, dim, name)
    grid_1 = _patch_grid(num_1, grid_size_1)
    grid_2 = _patch_grid(local_embeddings_2.shape[1], grid_size_2)
    match_12 = match_patches(crop_boxes_1, flips_1, grid_1, crop_boxes_2, flips_2, grid_2)
    match_21 = match_patches(crop_boxes_2, flips_2, grid_2, crop_boxes_1, flips_1, grid_1)
    sum_12, count_12 = _dense_direction(
        local_embeddings_1, negatives_2, match_12, batch_offset, temperature, chunk_size
    )
    sum_21, count_21 = _dense_direction(
        local_embeddings_2, negatives_1, match_21, batch_offset, temperature, chunk_size
    )
    count = count_12 + count_21
    if negative_local_embeddings_1 is not None and _is_distributed():
        # Divide by the mean matched count of the processes, not this one's: once DDP averages the ranks'
        # gradients, the loss is the mean over every matched patch of the global batch, as on one process.
        count = count.detach().clone()
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return (sum_12 + sum_21) / torch.where(count > 0, count, torch.ones_like(count))


def global_info_nce(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.1,
    negative_z1: torch.Tensor | None = None,
    negative_z2: torch.Tensor | None = None,
    batch_offset: int = 0,
) -> torch.Tensor:
    """Global InfoNCE (NT-Xent) of SimCLR [1], equation 1 of [0]: the baseline loss for ablations.

    The 2B embeddings are anchors; the positive of each is the other view of its image, the negatives are
    the 2B - 2 other embeddings (both views of the other images). The loss is the mean over the 2B anchors;
    with B = 1 and no gathered negatives it is exactly 0.

    Args:
        z1: (B, D) L2-normalised global embeddings of view 1.
        z2: (B, D) L2-normalised global embeddings of view 2.
        temperature: softmax temperature > 0.
        negative_z1: optional (B_all, D) view-1 embeddings gathered from every process.
        negative_z2: optional (B_all, D) view-2 embeddings gathered from every process. When given, the
            negatives of anchor b are all gathered rows except row batch_offset + b of both views.
        batch_offset: index of this process's first image in the gathered tensors (ignored without them).

    Returns:
        Scalar loss, float32 for half-precision inputs (float64 stays float64).
    """
    _check_temperature(temperature)
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be (B, D), got {tuple(z1.shape)} and {tuple(z2.shape)}.")
    if (negative_z1 is None) != (negative_z2 is None):
        raise ValueError("pass both negative_z1 and negative_z2, or neither.")
    batch_size, dim = z1.shape
    if negative_z1 is None:
        negative_z1, negative_z2, batch_offset = z1, z2, 0
    else:
        if negative_z1.ndim != 2 or negative_z1.shape != negative_z2.shape:
            raise ValueError(
                f"negative_z1 and negative_z2 must both be (B_all, D), got {tuple(negative_z1.shape)} and "
                f"{tuple(negative_z2.shape)}."
            )
        _check_negatives(negative_z1, batch_size, batch_offset, dim, "negative_z1")

    anchors = torch.cat([z1, z2])  # (2B, D)
    positives = _similarity_logits("bd,bd->b", temperature, z1, z2).repeat(2)  # (2B,)
    candidates = torch.stack([negative_z1, negative_z2], dim=1)  # (B_all, 2, D)
    # (2B, B_all, 2): both views of the anchor's own image (itself and its positive) are no negatives.
    logits = _similarity_logits("ad,kvd->akv", temperature, anchors, candidates)
    own = _own_row_mask(batch_size, candidates.shape[0], batch_offset, logits.device).repeat(2, 1)
    logits = logits.masked_fill(own[:, :, None], float("-inf"))
    lse_negatives = torch.logsumexp(logits.flatten(1), dim=1)  # (2B,)
    return (torch.logaddexp(positives, lse_negatives) - positives).mean()


def berhu_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    valid_mask: torch.Tensor,
    threshold: float = 0.2,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Reverse Huber (berHu) loss [2] on the residual x = prediction - target over the valid pixels.

    c = threshold * max |x| over the valid pixels of the batch (detached, at least `eps`); the loss of a
    pixel is |x| where |x| <= c and (x^2 + c^2) / (2c) elsewhere (continuous at c), averaged over the
    valid pixels. Invalid pixels may hold any value, NaN included. An empty mask gives 0 (with a graph).

    Args:
        prediction: (B, H, W) predicted depth.
        target: (B, H, W) ground-truth depth.
        valid_mask: (B, H, W) boolean, True where the ground truth is valid.
        threshold: fraction of the largest residual where the loss turns quadratic, > 0.
        eps: lower bound of c, > 0, so an all-zero residual gives no NaN.

    Returns:
        Scalar loss.
    """
    _check_depth_inputs(prediction, target, valid_mask)
    if threshold <= 0 or eps <= 0:
        raise ValueError(f"threshold and eps must be > 0, got threshold={threshold}, eps={eps}.")
    valid_mask = valid_mask.bool()
    residual = prediction[valid_mask] - target[valid_mask]  # (M,)
    if residual.numel() == 0:
        return residual.sum()
    abs_residual = residual.abs()
    c = (threshold * abs_residual.max()).detach().clamp_min(eps)
    quadratic = (residual.square() + c.square()) / (2 * c)
    return torch.where(abs_residual <= c, abs_residual, quadratic).mean()


def gradient_loss(prediction: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
    """L2 loss on image gradients: mean squared finite difference of d = prediction - target.

    Horizontal and vertical differences d[y, x+1] - d[y, x] and d[y+1, x] - d[y, x] count only where both
    pixels are valid; the loss is the mean over all such pairs (0 when there is none). A prediction that
    differs from the truth by a constant has zero loss.

    Args:
        prediction: (B, H, W) predicted depth.
        target: (B, H, W) ground-truth depth.
        valid_mask: (B, H, W) boolean, True where the ground truth is valid.

    Returns:
        Scalar loss.
    """
    _check_depth_inputs(prediction, target, valid_mask)
    valid_mask = valid_mask.bool()
    diff = prediction - target
    grad_x = (diff[:, :, 1:] - diff[:, :, :-1])[valid_mask[:, :, 1:] & valid_mask[:, :, :-1]]
    grad_y = (diff[:, 1:, :] - diff[:, :-1, :])[valid_mask[:, 1:, :] & valid_mask[:, :-1, :]]
    squares = torch.cat([grad_x, grad_y]).square()
    if squares.numel() == 0:
        return squares.sum()
    return squares.mean()


def _check_depth_inputs(prediction: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor) -> None:
    if prediction.ndim != 3 or prediction.shape != target.shape or prediction.shape != valid_mask.shape:
        raise ValueError(
            f"prediction, target and valid_mask must all be (B, H, W), got {tuple(prediction.shape)}, "
            f"{tuple(target.shape)} and {tuple(valid_mask.shape)}."
        )


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands every rank the summed gradient of its own slice.

    Each rank's loss uses the gathered tensor, so the gradient of rank r's slice is the sum of the
    gradients that every rank computed for it: all-reduce the full gradient, then keep the own slice.
    Returning only the local gradient (no sum) silently drops the other ranks' negatives' contributions.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.batch_size = tensor.shape[0]
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.batch_size
        return grad[start : start + ctx.batch_size]


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather `tensor` from every process along dim 0, with gradients flowing back to every rank.

    Every process must hold the same number of rows. Under DDP (gradients averaged over the W ranks), a
    loss that is the mean over this rank's images with negatives from the gathered tensor gives the same
    gradient as one process on the concatenated batch. Returns `tensor` unchanged when torch.distributed
    is not initialised or the world size is 1.

    Args:
        tensor: (B, ...) this process's rows.

    Returns:
        (W * B, ...) rows of every process in rank order; this process's rows start at
        `rank_batch_offset(B)`.
    """
    if not _is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


def rank_batch_offset(batch_size: int) -> int:
    """Index of this process's first row in a `gather_with_grad` output: rank * batch_size (0 alone)."""
    return dist.get_rank() * batch_size if _is_distributed() else 0
