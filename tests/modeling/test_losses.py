"""Losses against plain loop / NumPy float64 references written from the paper's equations."""

import ast
import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densecl_vit.modeling import losses_densecl_vit
from densecl_vit.modeling.losses_densecl_vit import (
    berhu_loss,
    gather_with_grad,
    global_info_nce,
    gradient_loss,
    local_global_info_nce,
    rank_batch_offset,
    symmetric_local_global_loss,
)


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def _reference_local_global_per_image(global_emb, local_emb, temperature, negatives=None, offset=0):
    """Per-image loss, section 3 of arXiv:2205.15173, with python loops in float64."""
    g = global_emb.double().numpy()
    pos = local_emb.double().numpy()
    neg = pos if negatives is None else negatives.double().numpy()
    losses = []
    for b in range(g.shape[0]):
        negative_sims = [
            float(g[b] @ neg[k, j]) / temperature
            for k in range(neg.shape[0])
            if k != offset + b
            for j in range(neg.shape[1])
        ]
        negative_sum = sum(math.exp(s) for s in negative_sims)
        patch_losses = []
        for i in range(pos.shape[1]):
            numerator = math.exp(float(g[b] @ pos[b, i]) / temperature)
            patch_losses.append(-math.log(numerator / (numerator + negative_sum)))
        losses.append(sum(patch_losses) / len(patch_losses))
    return np.array(losses)


def _reference_global(z1, z2, temperature):
    """NT-Xent (SimCLR, equation 1 of arXiv:2205.15173) with python loops in float64."""
    z = torch.cat([z1, z2]).double().numpy()
    two_b = z.shape[0]
    losses = []
    for a in range(two_b):
        positive = (a + two_b // 2) % two_b
        denominator = sum(math.exp(float(z[a] @ z[k]) / temperature) for k in range(two_b) if k != a)
        losses.append(-math.log(math.exp(float(z[a] @ z[positive]) / temperature) / denominator))
    return sum(losses) / two_b


@pytest.mark.parametrize("batch_size,num_patches", [(1, 4), (2, 9), (8, 16)])
def test_local_global_matches_loop_reference(batch_size, num_patches):
    g, l_ = _unit(batch_size, 8, seed=1), _unit(batch_size, num_patches, 8, seed=2)
    loss = local_global_info_nce(g, l_, temperature=0.1)
    expected = _reference_local_global_per_image(g, l_, 0.1).mean()
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    if batch_size == 1:
        assert loss.item() == 0.0


def test_symmetric_local_global_matches_reference():
    g1, l1, g2, l2 = _unit(4, 8, seed=3), _unit(4, 5, 8, seed=4), _unit(4, 8, seed=5), _unit(4, 5, 8, seed=6)
    loss = symmetric_local_global_loss(g1, l1, g2, l2, temperature=0.2)
    expected = 0.5 * (
        _reference_local_global_per_image(g1, l2, 0.2).mean()
        + _reference_local_global_per_image(g2, l1, 0.2).mean()
    )
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_gathered_negatives_match_concatenated_batch():
    all_g, all_l = _unit(6, 8, seed=7), _unit(6, 4, 8, seed=8)
    full = _reference_local_global_per_image(all_g, all_l, 0.1)
    for offset in (0, 2, 4):
        rows = slice(offset, offset + 2)
        loss = local_global_info_nce(
            all_g[rows], all_l[rows], 0.1, negative_local_embeddings=all_l, batch_offset=offset
        )
        assert loss.item() == pytest.approx(full[rows].mean(), abs=1e-5)
    g1, g2, l1, l2 = all_g[2:4], _unit(2, 8, seed=9), all_l[2:4], _unit(6, 4, 8, seed=10)
    symmetric = symmetric_local_global_loss(g1, l1, g2, l2[2:4], 0.1, all_l, l2, batch_offset=2)
    expected = 0.5 * (
        _reference_local_global_per_image(g1, l2[2:4], 0.1, l2, 2).mean()
        + _reference_local_global_per_image(g2, l1, 0.1, all_l, 2).mean()
    )
    assert symmetric.item() == pytest.approx(expected, abs=1e-5)


def test_local_global_gradcheck_float64():
    for batch_size in (1, 3):
        g = _unit(batch_size, 4, seed=11).double().requires_grad_()
        l_ = _unit(batch_size, 2, 4, seed=12).double().requires_grad_()
        assert torch.autograd.gradcheck(lambda a, b: local_global_info_nce(a, b, 0.5), (g, l_))


@pytest.mark.parametrize(
    "dtype,temperature", [(torch.bfloat16, 0.05), (torch.float16, 0.05), (torch.float32, 0.01)]
)
def test_contrastive_losses_finite_at_large_logits(dtype, temperature):
    # Nearly identical embeddings put every logit near 1 / temperature: e^{20} overflows float16 and
    # e^{100} overflows float32, so a bare exp would give inf / inf = NaN.
    base = F.normalize(torch.randn(8), dim=0)
    generator = torch.Generator().manual_seed(13)
    g = F.normalize(base + 1e-3 * torch.randn(4, 8, generator=generator), dim=-1)
    l_ = F.normalize(base + 1e-3 * torch.randn(4, 6, 8, generator=generator), dim=-1)
    low = local_global_info_nce(g.to(dtype), l_.to(dtype), temperature)
    high = local_global_info_nce(g.double(), l_.double(), temperature)
    assert torch.isfinite(low)
    assert low.item() == pytest.approx(high.item(), abs=0.05)
    assert high.item() == pytest.approx(math.log(1 + 3 * 6), abs=0.05)
    low_global = global_info_nce(g.to(dtype), l_[:, 0].to(dtype), temperature)
    assert torch.isfinite(low_global)
    assert low_global.item() == pytest.approx(global_info_nce(g, l_[:, 0], temperature).item(), abs=0.05)


def test_symmetric_loss_gradients_reach_both_views_in_bf16():
    inputs = [_unit(4, 8, seed=14), _unit(4, 5, 8, seed=15), _unit(4, 8, seed=16), _unit(4, 5, 8, seed=17)]
    inputs = [x.bfloat16().requires_grad_() for x in inputs]
    symmetric_local_global_loss(*inputs, temperature=0.05).backward()
    for x in inputs:
        assert torch.isfinite(x.grad).all()
        assert x.grad.abs().sum() > 0


def test_global_info_nce_matches_loop_and_cross_entropy():
    z1, z2 = _unit(5, 8, seed=18), _unit(5, 8, seed=19)
    loss = global_info_nce(z1, z2, temperature=0.1)
    assert loss.item() == pytest.approx(_reference_global(z1, z2, 0.1), abs=1e-5)
    # Golden cross-check: the usual SimCLR code as cross-entropy over the (2B, 2B) similarity matrix.
    z = torch.cat([z1, z2])
    logits = (z @ z.T / 0.1).fill_diagonal_(float("-inf"))
    labels = (torch.arange(10) + 5) % 10
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-5)
    assert global_info_nce(z1[:1], z2[:1], 0.1).item() == 0.0


def test_global_info_nce_gathered_negatives_match_full_batch():
    z1, z2 = _unit(6, 8, seed=20), _unit(6, 8, seed=21)
    z = torch.cat([z1, z2])
    logits = (z @ z.T / 0.1).fill_diagonal_(float("-inf"))
    per_anchor = F.cross_entropy(logits, (torch.arange(12) + 6) % 12, reduction="none")
    anchors = torch.tensor([2, 3, 8, 9])
    loss = global_info_nce(z1[2:4], z2[2:4], 0.1, negative_z1=z1, negative_z2=z2, batch_offset=2)
    assert loss.item() == pytest.approx(per_anchor[anchors].mean().item(), abs=1e-5)


def test_gather_with_grad_is_identity_without_distributed():
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x
    assert rank_batch_offset(3) == 0


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: local_global_info_nce(_unit(2, 8), _unit(2, 4, 8), temperature=0.0), "temperature"),
        (lambda: local_global_info_nce(_unit(2, 8), _unit(2, 4, 8), temperature=-1.0), "temperature"),
        (lambda: local_global_info_nce(_unit(2, 8), _unit(3, 4, 8)), "local_embeddings"),
        (lambda: local_global_info_nce(_unit(2, 8), _unit(2, 4, 6)), "local_embeddings"),
        (lambda: local_global_info_nce(_unit(2, 8), _unit(2, 8)), "global_embeddings"),
        (lambda: local_global_info_nce(_unit(2, 8), _unit(2, 4, 8), 0.1, _unit(4, 4, 6)), "feature size"),
        (lambda: local_global_info_nce(_unit(2, 8), _unit(2, 4, 8), 0.1, _unit(4, 4, 8), 3), "batch_offset"),
        (lambda: local_global_info_nce(_unit(2, 8), _unit(2, 4, 8), 0.1, _unit(4, 8)), "B_all"),
        (
            lambda: symmetric_local_global_loss(*[_unit(2, 8), _unit(2, 4, 8)] * 2, 0.1, _unit(4, 4, 8)),
            "both",
        ),
        (lambda: global_info_nce(_unit(2, 8), _unit(3, 8)), "z1 and z2"),
        (lambda: global_info_nce(_unit(2, 8), _unit(2, 8), 0.0), "temperature"),
        (lambda: global_info_nce(_unit(2, 8), _unit(2, 8), 0.1, _unit(4, 8)), "both"),
        (
            lambda: global_info_nce(_unit(2, 8), _unit(2, 8), 0.1, _unit(4, 8), _unit(4, 8), -1),
            "batch_offset",
        ),
        (lambda: berhu_loss(torch.zeros(1, 2, 2), torch.zeros(1, 2, 3), torch.ones(1, 2, 2)), "(B, H, W)"),
        (
            lambda: berhu_loss(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.ones(1, 2, 2), 0.0),
            "threshold",
        ),
        (lambda: gradient_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2)), "(B, H, W)"),
    ],
)
def test_impossible_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _berhu_pixel(x: float, c: float) -> float:
    return abs(x) if abs(x) <= c else (x * x + c * c) / (2 * c)


def test_berhu_matches_piecewise_definition():
    residuals = [0.1, -0.5, 1.0, -2.0, 0.3, 0.0]
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, float("nan")]]], dtype=torch.float64)
    prediction = target.clone()
    prediction.view(-1)[:6] += torch.tensor(residuals, dtype=torch.float64)
    valid = torch.tensor([[[True, True, True, True], [True, True, False, False]]])
    c = 0.2 * 2.0
    expected = sum(_berhu_pixel(x, c) for x in residuals) / len(residuals)
    assert berhu_loss(prediction, target, valid).item() == pytest.approx(expected, abs=1e-12)
    # threshold = 0.5 moves c to 1.0, so 1.0 sits on the linear side and -2.0 on the quadratic one.
    expected = sum(_berhu_pixel(x, 1.0) for x in residuals) / len(residuals)
    assert berhu_loss(prediction, target, valid, threshold=0.5).item() == pytest.approx(expected, abs=1e-12)


def test_berhu_is_continuous_at_c():
    target = torch.zeros(1, 1, 2, dtype=torch.float64)
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    # The largest residual 10 fixes c = 2; the other residual crosses c.
    below = berhu_loss(torch.tensor([[[10.0, 2.0 - 1e-9]]], dtype=torch.float64), target, valid)
    above = berhu_loss(torch.tensor([[[10.0, 2.0 + 1e-9]]], dtype=torch.float64), target, valid)
    assert above.item() == pytest.approx(below.item(), abs=1e-8)
    assert below.item() == pytest.approx((_berhu_pixel(10.0, 2.0) + 2.0) / 2, abs=1e-8)


def test_berhu_zero_residual_and_empty_mask():
    target = torch.rand(2, 3, 3)
    prediction = target.clone().requires_grad_()
    loss = berhu_loss(prediction, target, torch.ones(2, 3, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(prediction.grad).all() and (prediction.grad == 0).all()

    prediction = torch.rand(2, 3, 3, requires_grad=True)
    empty = berhu_loss(
        prediction, torch.full((2, 3, 3), float("nan")), torch.zeros(2, 3, 3, dtype=torch.bool)
    )
    empty.backward()
    assert empty.item() == 0.0 and empty.requires_grad
    assert (prediction.grad == 0).all()


def _reference_gradient_loss(prediction, target, valid):
    d = (prediction - target).double().numpy()
    m = valid.numpy()
    squares = []
    for b in range(d.shape[0]):
        for y in range(d.shape[1]):
            for x in range(d.shape[2]):
                if x + 1 < d.shape[2] and m[b, y, x] and m[b, y, x + 1]:
                    squares.append((d[b, y, x + 1] - d[b, y, x]) ** 2)
                if y + 1 < d.shape[1] and m[b, y, x] and m[b, y + 1, x]:
                    squares.append((d[b, y + 1, x] - d[b, y, x]) ** 2)
    return sum(squares) / len(squares)


def test_gradient_loss_matches_reference_and_ignores_constant_offsets():
    generator = torch.Generator().manual_seed(22)
    target = torch.rand(2, 5, 6, generator=generator, dtype=torch.float64) + 1
    prediction = torch.rand(2, 5, 6, generator=generator, dtype=torch.float64) + 1
    valid = torch.rand(2, 5, 6, generator=generator) > 0.3
    target[~valid] = float("nan")
    loss = gradient_loss(prediction, target, valid)
    assert loss.item() > 0
    assert loss.item() == pytest.approx(_reference_gradient_loss(prediction, target, valid), abs=1e-12)
    assert gradient_loss(target + 3.0, target, valid).item() == pytest.approx(0.0, abs=1e-20)
    nothing = gradient_loss(prediction, target, torch.zeros_like(valid))
    assert nothing.item() == 0.0


def test_loss_file_imports_only_torch():
    # The file ships as Hub remote code next to the modeling file and must stand on its own.
    tree = ast.parse(inspect.getsource(losses_densecl_vit))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "." for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {name.split(".")[0] for name in imported} <= {"torch", "__future__"}, imported


def _patch_like(batch: int, patches: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [CLS] (B, D) and patch (B, N, D) embeddings whose tokens share their image's direction (cosines ~0.8)."""
    generator = torch.Generator().manual_seed(seed)
    centre = torch.randn(batch, 1, 64, generator=generator)
    tokens = F.normalize(centre + 0.5 * torch.randn(batch, patches + 1, 64, generator=generator), dim=-1)
    tokens = tokens.bfloat16()
    return tokens[:, 0], tokens[:, 1:]


@pytest.mark.parametrize("autocast", [False, True])
def test_half_precision_similarities_are_taken_in_float32(autocast):
    # The same bf16-rounded embeddings in float64 give the reference: only the product's precision differs. A bf16
    # product puts logits near 1 / t = 10 on a 1/16 grid, off by ~2e-4 (local-global) and ~1e-3 (global) here.
    g1, l1 = _patch_like(4, 4, seed=30)
    g2, l2 = _patch_like(4, 4, seed=31)
    views = (g1, l1, g2, l2)
    want_local = symmetric_local_global_loss(*(v.double() for v in views), temperature=0.1)
    want_global = global_info_nce(g1.double(), g2.double(), temperature=0.1)
    inputs = [v.float() for v in views] if autocast else views  # float32 under bf16 autocast, or bf16 tensors
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got_local = symmetric_local_global_loss(*inputs, temperature=0.1)
        got_global = global_info_nce(inputs[0], inputs[2], temperature=0.1)
    assert got_local.dtype == got_global.dtype == torch.float32
    assert abs(got_local.item() - want_local.item()) <= 1e-5
    assert abs(got_global.item() - want_global.item()) <= 1e-5
