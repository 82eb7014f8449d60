"""The dense local-to-local loss and its patch matching against loop references written from the geometry."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densecl_vit.modeling.losses_densecl_vit import local_local_info_nce, match_patches


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def _reference_match(box_1, flip_1, grid_1, box_2, flip_2, grid_2):
    """Loop version: view-1 patch centre -> source pixel -> view-2 cell, or -1 outside view 2's box."""
    rows_1, cols_1 = grid_1
    rows_2, cols_2 = grid_2
    left_1, top_1, width_1, height_1 = (float(v) for v in box_1)
    left_2, top_2, width_2, height_2 = (float(v) for v in box_2)
    out = []
    for r in range(rows_1):
        for c in range(cols_1):
            u = (c + 0.5) / cols_1
            if flip_1:
                u = 1.0 - u
            x = left_1 + u * width_1
            y = top_1 + (r + 0.5) / rows_1 * height_1
            if not (left_2 <= x < left_2 + width_2 and top_2 <= y < top_2 + height_2):
                out.append(-1)
                continue
            u_2 = (x - left_2) / width_2
            if flip_2:
                u_2 = 1.0 - u_2
            col = min(int(math.floor(u_2 * cols_2)), cols_2 - 1)
            row = min(int(math.floor((y - top_2) / height_2 * rows_2)), rows_2 - 1)
            out.append(row * cols_2 + col)
    return out


def _reference_loss(l1, l2, boxes_1, flips_1, boxes_2, flips_2, grid_1, grid_2, temperature):
    """Plain loops in float64: every matched anchor of both directions, candidates = all other-view patches."""
    terms = []
    for anchors, candidates, b_a, f_a, g_a, b_c, f_c, g_c in (
        (l1, l2, boxes_1, flips_1, grid_1, boxes_2, flips_2, grid_2),
        (l2, l1, boxes_2, flips_2, grid_2, boxes_1, flips_1, grid_1),
    ):
        a, c = anchors.double().numpy(), candidates.double().numpy()
        for b in range(a.shape[0]):
            match = _reference_match(b_a[b], bool(f_a[b]), g_a, b_c[b], bool(f_c[b]), g_c)
            for i, j in enumerate(match):
                if j < 0:
                    continue
                denominator = sum(
                    math.exp(float(a[b, i] @ c[k, m]) / temperature)
                    for k in range(c.shape[0])
                    for m in range(c.shape[1])
                )
                terms.append(-math.log(math.exp(float(a[b, i] @ c[b, j]) / temperature) / denominator))
    return sum(terms) / len(terms) if terms else 0.0


# Three images: partial overlap with a flip on view 1, full containment with flips on both, and no overlap.
BOXES_1 = torch.tensor([[0.0, 0.0, 40.0, 30.0], [10.0, 5.0, 20.0, 20.0], [0.0, 0.0, 10.0, 10.0]])
BOXES_2 = torch.tensor([[20.0, 10.0, 30.0, 30.0], [0.0, 0.0, 50.0, 40.0], [30.0, 30.0, 10.0, 10.0]])
FLIPS_1 = torch.tensor([True, True, False])
FLIPS_2 = torch.tensor([False, True, False])


@pytest.mark.parametrize("grid_1, grid_2", [((3, 3), (3, 3)), ((2, 3), (4, 2))])
def test_match_patches_equals_loop_reference(grid_1, grid_2):
    got = match_patches(BOXES_1, FLIPS_1, grid_1, BOXES_2, FLIPS_2, grid_2)
    want = [
        _reference_match(BOXES_1[b], bool(FLIPS_1[b]), grid_1, BOXES_2[b], bool(FLIPS_2[b]), grid_2)
        for b in range(3)
    ]
    assert got.tolist() == want
    assert (got[2] == -1).all()  # the third image's views do not overlap
    assert (got[1] >= 0).all()  # view 1 of the second image lies inside its view 2
    assert (got[0] >= 0).any() and (got[0] == -1).any()  # partial overlap


def test_match_patches_identity_and_mirror():
    box = torch.tensor([[5.0, 7.0, 32.0, 32.0]])
    same = match_patches(box, torch.tensor([False]), (4, 4), box, torch.tensor([False]), (4, 4))
    assert same.tolist() == [list(range(16))]
    mirrored = match_patches(box, torch.tensor([True]), (4, 4), box, torch.tensor([False]), (4, 4))
    assert mirrored.tolist() == [[r * 4 + (3 - c) for r in range(4) for c in range(4)]]


@pytest.mark.parametrize("grid_1, grid_2", [((3, 3), (3, 3)), ((2, 3), (4, 2))])
@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_local_local_matches_loop_reference(grid_1, grid_2, chunk_size):
    l1 = _unit(3, grid_1[0] * grid_1[1], 6, seed=1)
    l2 = _unit(3, grid_2[0] * grid_2[1], 6, seed=2)
    got = local_local_info_nce(
        l1, l2, BOXES_1, FLIPS_1, BOXES_2, FLIPS_2, 0.2, grid_1, grid_2, chunk_size=chunk_size
    )
    want = _reference_loss(l1, l2, BOXES_1, FLIPS_1, BOXES_2, FLIPS_2, grid_1, grid_2, 0.2)
    assert got.dtype == torch.float64
    assert abs(got.item() - want) <= 1e-10


def test_local_local_batch_of_one_and_zero_overlap():
    l1, l2 = _unit(1, 9, 4, seed=3), _unit(1, 9, 4, seed=4)
    one = local_local_info_nce(l1, l2, BOXES_1[:1], FLIPS_1[:1], BOXES_2[:1], FLIPS_2[:1], 0.1)
    want = _reference_loss(l1, l2, BOXES_1[:1], FLIPS_1[:1], BOXES_2[:1], FLIPS_2[:1], (3, 3), (3, 3), 0.1)
    assert abs(one.item() - want) <= 1e-10 and one.item() > 0  # the image's own other patches are negatives

    l1.requires_grad_(True)
    none = local_local_info_nce(l1, l2, BOXES_1[2:], FLIPS_1[2:], BOXES_2[2:], FLIPS_2[2:], 0.1)
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(l1.grad).all() and (l1.grad == 0).all()


def test_image_without_overlap_adds_nothing():
    l1, l2 = _unit(3, 9, 4, seed=5), _unit(3, 9, 4, seed=6)
    with_disjoint = local_local_info_nce(l1, l2, BOXES_1, FLIPS_1, BOXES_2, FLIPS_2, 0.1)
    # The same loss with the non-overlapping image's terms gone (its patches stay candidates).
    want = _reference_loss(l1, l2, BOXES_1, FLIPS_1, BOXES_2, FLIPS_2, (3, 3), (3, 3), 0.1)
    assert abs(with_disjoint.item() - want) <= 1e-10


def test_local_local_gradients_chunked_equal_unchunked():
    l1, l2 = _unit(3, 9, 5, seed=7).requires_grad_(True), _unit(3, 9, 5, seed=8).requires_grad_(True)
    grads = []
    for chunk_size in (2, 4096):
        l1.grad = l2.grad = None
        local_local_info_nce(
            l1, l2, BOXES_1, FLIPS_1, BOXES_2, FLIPS_2, 0.1, chunk_size=chunk_size
        ).backward()
        grads.append((l1.grad.clone(), l2.grad.clone()))
    for got, want in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, b: local_local_info_nce(a, b, BOXES_1, FLIPS_1, BOXES_2, FLIPS_2, 0.1, chunk_size=4),
        (l1.detach().requires_grad_(True), l2.detach().requires_grad_(True)),
    )


def test_gathered_negatives_equal_the_concatenated_batch_with_one_process():
    l1, l2 = _unit(3, 9, 4, seed=9), _unit(3, 9, 4, seed=10)
    plain = local_local_info_nce(l1, l2, BOXES_1, FLIPS_1, BOXES_2, FLIPS_2, 0.1)
    gathered = local_local_info_nce(l1, l2, BOXES_1, FLIPS_1, BOXES_2, FLIPS_2, 0.1, None, None, l1, l2, 0)
    assert gathered.item() == pytest.approx(plain.item(), abs=1e-12)


def test_half_precision_stays_finite_and_close():
    l1, l2 = _unit(3, 9, 16, seed=11), _unit(3, 9, 16, seed=12)
    want = local_local_info_nce(l1, l2, BOXES_1, FLIPS_1, BOXES_2, FLIPS_2, 0.05)
    got = local_local_info_nce(l1.bfloat16(), l2.bfloat16(), BOXES_1, FLIPS_1, BOXES_2, FLIPS_2, 0.05)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert abs(got.item() - want.item()) < 0.05 * np.log(27)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"grid_size_1": (2, 2)}, "grid_size"),
        ({"crop_boxes_1": torch.zeros(3, 3)}, "crop_boxes_1"),
        ({"negative_local_embeddings_1": torch.zeros(3, 9, 4)}, "both"),
    ],
)
def test_impossible_arguments_raise(kwargs, match):
    args = dict(
        local_embeddings_1=_unit(3, 9, 4),
        local_embeddings_2=_unit(3, 9, 4),
        crop_boxes_1=BOXES_1,
        flips_1=FLIPS_1,
        crop_boxes_2=BOXES_2,
        flips_2=FLIPS_2,
    )
    with pytest.raises(ValueError, match=match):
        local_local_info_nce(**{**args, **kwargs})


def test_autocast_does_not_lower_the_similarity_product():
    l1, l2 = _unit(3, 9, 16, seed=13).float(), _unit(3, 9, 16, seed=14).float()
    want = local_local_info_nce(l1.double(), l2.double(), BOXES_1, FLIPS_1, BOXES_2, FLIPS_2, 0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = local_local_info_nce(l1, l2, BOXES_1, FLIPS_1, BOXES_2, FLIPS_2, 0.05)
    assert abs(got.item() - want.item()) < 1e-5
