import math

import pytest
import torch
from torch import nn

from densecl_vit.training.engine import optim
from densecl_vit.training.engine.optim import (
    apply_lr_scale,
    build_adam,
    build_adamw,
    cosine_with_warmup,
    describe_param_groups,
    layer_id_for_vit,
    param_groups_layer_decay,
    param_groups_weight_decay,
    poly_with_warmup,
    scaled_lr,
    warmup_steps_from_fraction,
)

HIDDEN, LAYERS = 8, 3


class FakePatchEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.projection = nn.Conv2d(3, HIDDEN, kernel_size=4, stride=4)


class FakeEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, HIDDEN))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, HIDDEN))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 5, HIDDEN))
        self.patch_embeddings = FakePatchEmbeddings()


class FakeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(HIDDEN)
        self.dense = nn.Linear(HIDDEN, HIDDEN)


class FakeEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList(FakeBlock() for _ in range(LAYERS))


class FakeViT(nn.Module):
    """Same attribute names as DenseCLViTModel: embeddings.*, encoder.layer.{i}.*, layernorm."""

    def __init__(self):
        super().__init__()
        self.embeddings = FakeEmbeddings()
        self.encoder = FakeEncoder()
        self.layernorm = nn.LayerNorm(HIDDEN)


class FakeSegmenter(nn.Module):
    """Task-model layout: the encoder under ``densecl_vit`` plus a head, one frozen tensor."""

    def __init__(self):
        super().__init__()
        self.densecl_vit = FakeViT()
        self.head = nn.Linear(HIDDEN, 4)
        self.frozen = nn.Parameter(torch.zeros(2, 2), requires_grad=False)


def names_by_group(groups):
    return {g["name"]: set(g["param_names"]) for g in groups}


def assert_partition(model, groups):
    """Every trainable parameter is in exactly one group, frozen ones in none, names match tensors."""
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(trainable)
    for g in groups:
        assert [trainable[id(p)] for p in g["params"]] == g["param_names"]


def test_weight_decay_groups_match_real_names():
    model = FakeSegmenter()
    groups = param_groups_weight_decay(model, 0.05)
    assert_partition(model, groups)
    by_name = names_by_group(groups)
    assert by_name["no_decay"] == {
        "densecl_vit.embeddings.cls_token",
        "densecl_vit.embeddings.mask_token",
        "densecl_vit.embeddings.position_embeddings",
        "densecl_vit.embeddings.patch_embeddings.projection.bias",
        *(
            f"densecl_vit.encoder.layer.{i}.{m}"
            for i in range(LAYERS)
            for m in ("layernorm_before.weight", "layernorm_before.bias", "dense.bias")
        ),
        "densecl_vit.layernorm.weight",
        "densecl_vit.layernorm.bias",
        "head.bias",
    }
    assert by_name["decay"] == {
        "densecl_vit.embeddings.patch_embeddings.projection.weight",
        *(f"densecl_vit.encoder.layer.{i}.dense.weight" for i in range(LAYERS)),
        "head.weight",
    }
    assert {g["name"]: g["weight_decay"] for g in groups} == {"decay": 0.05, "no_decay": 0.0}


def test_no_decay_names_match_whole_components_only():
    model = nn.Module()
    model.my_cls_token = nn.Parameter(torch.zeros(2, 2))
    model.cls_token = nn.Parameter(torch.zeros(1, 1, 2))
    groups = param_groups_weight_decay(model, 0.1)
    assert names_by_group(groups) == {"decay": {"my_cls_token"}, "no_decay": {"cls_token"}}
    groups = param_groups_weight_decay(model, 0.1, no_decay_names=())
    assert names_by_group(groups) == {"decay": {"my_cls_token", "cls_token"}}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("embeddings.cls_token", 0),
        ("embeddings.position_embeddings", 0),
        ("embeddings.patch_embeddings.projection.weight", 0),
        ("encoder.layer.0.attention.query.weight", 1),
        ("encoder.layer.11.mlp.fc2.bias", 12),
        ("layernorm.weight", 13),
        ("decode_head.classifier.weight", 13),
        ("densecl_vit.embeddings.cls_token", 0),
        ("densecl_vit.encoder.layer.3.norm1.weight", 4),
        ("module._orig_mod.densecl_vit.encoder.layer.5.mlp.fc1.weight", 6),
        ("decode_head.encoder.layer.0.weight", 13),  # only the encoder's own blocks count
    ],
)
def test_layer_id_for_vit(name, expected):
    assert layer_id_for_vit(name, 12) == expected


def test_layer_id_rejects_wrong_depth():
    with pytest.raises(ValueError, match="num_layers=2"):
        layer_id_for_vit("encoder.layer.2.dense.weight", 2)


def test_layer_decay_scales():
    model, decay = FakeSegmenter(), 0.5
    groups = param_groups_layer_decay(model, 0.05, decay, num_layers=LAYERS)
    assert_partition(model, groups)
    scale_of = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    wd_of = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    # Hand-written expectations: embeddings 0.5**4, block i 0.5**(3 - i), head/final norm 1.
    assert scale_of["densecl_vit.embeddings.cls_token"] == 0.0625
    assert scale_of["densecl_vit.embeddings.position_embeddings"] == 0.0625
    assert scale_of["densecl_vit.embeddings.patch_embeddings.projection.weight"] == 0.0625
    assert scale_of["densecl_vit.encoder.layer.0.dense.weight"] == 0.125
    assert scale_of["densecl_vit.encoder.layer.1.layernorm_before.bias"] == 0.25
    assert scale_of["densecl_vit.encoder.layer.2.dense.weight"] == 0.5
    assert scale_of["densecl_vit.layernorm.weight"] == 1.0
    assert scale_of["head.weight"] == 1.0
    assert wd_of["densecl_vit.embeddings.cls_token"] == 0.0
    assert wd_of["densecl_vit.embeddings.patch_embeddings.projection.weight"] == 0.05
    assert wd_of["head.bias"] == 0.0
    assert [g["name"] for g in groups] == [
        "layer_0_decay",
        "layer_0_no_decay",
        *(f"layer_{i}_{kind}" for i in range(1, LAYERS + 1) for kind in ("decay", "no_decay")),
        "layer_4_decay",
        "layer_4_no_decay",
    ]


def test_layer_decay_argument_checks():
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups_layer_decay(FakeViT(), 0.05, 1.5, LAYERS)
    with pytest.raises(ValueError, match="num_layers=2"):
        param_groups_layer_decay(FakeViT(), 0.05, 0.65, 2)


def test_describe_param_groups():
    groups = param_groups_layer_decay(FakeViT(), 0.05, 0.5, LAYERS)
    table = describe_param_groups(groups)
    lines = table.splitlines()
    assert lines[0].split() == ["group", "tensors", "params", "weight_decay", "lr_scale"]
    assert lines[1].split() == ["layer_0_decay", "1", "384", "0.05", "0.0625"]  # conv weight 8*3*4*4
    total = sum(p.numel() for p in FakeViT().parameters())
    assert lines[-1].split() == ["total", f"{total:,}"]


def test_scaled_lr_and_warmup_fraction():
    assert scaled_lr(1e-4, 256) == pytest.approx(1e-4)
    assert scaled_lr(1e-4, 1024) == pytest.approx(4e-4)
    assert scaled_lr(1e-4, 64) == pytest.approx(2.5e-5)
    assert warmup_steps_from_fraction(1000, 0.05) == 50
    assert warmup_steps_from_fraction(10, 0.01) == 1
    assert warmup_steps_from_fraction(10, 0.0) == 0
    with pytest.raises(ValueError):
        warmup_steps_from_fraction(10, 1.0)


def lrs_over(scheduler, optimizer, steps):
    """Group lrs used at steps 0..steps-1 (read before each scheduler.step, as the train loop does)."""
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    out.append([g["lr"] for g in optimizer.param_groups])
    return out


def toy_optimizer(lr=1.0):
    groups = [
        {"name": "a", "params": [nn.Parameter(torch.zeros(2))], "lr_scale": 1.0, "weight_decay": 0.0},
        {"name": "b", "params": [nn.Parameter(torch.zeros(2))], "lr_scale": 0.25, "weight_decay": 0.0},
    ]
    return build_adamw(groups, lr=lr)


def test_cosine_with_warmup_matches_formula():
    total, warmup, min_ratio, lr = 20, 4, 0.1, 2.0
    opt = toy_optimizer(lr)
    lrs = lrs_over(cosine_with_warmup(opt, total, warmup, min_ratio), opt, total + 3)
    for step, (a, b) in enumerate(lrs):
        if step < warmup:
            factor = (step + 1) / warmup
        else:
            progress = min(1.0, (step - warmup) / (total - warmup))
            factor = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        assert a == pytest.approx(lr * factor) and b == pytest.approx(0.25 * lr * factor)
    assert lrs[0][0] == pytest.approx(0.5)  # first update already moves: 1/4 of the peak
    assert lrs[warmup - 1][0] == pytest.approx(lr) and lrs[warmup][0] == pytest.approx(lr)
    assert lrs[total][0] == pytest.approx(lr * min_ratio)  # end value
    assert lrs[total + 2][0] == pytest.approx(lr * min_ratio)  # stays there past the end
    assert all(x[0] >= y[0] for x, y in zip(lrs[warmup:], lrs[warmup + 1 :]))


def test_poly_with_warmup_matches_formula():
    total, warmup, power = 10, 2, 0.9
    opt = toy_optimizer(1.0)
    lrs = lrs_over(poly_with_warmup(opt, total, warmup, power=power), opt, total)
    expected = [0.5, 1.0] + [(1 - (s - warmup) / (total - warmup)) ** power for s in range(warmup, total + 1)]
    assert [a for a, _ in lrs] == pytest.approx(expected)
    assert [b for _, b in lrs] == pytest.approx([0.25 * e for e in expected])
    assert lrs[-1][0] == 0.0


def test_schedule_without_warmup_starts_at_peak():
    opt = toy_optimizer(1.0)
    lrs = lrs_over(cosine_with_warmup(opt, 4, 0), opt, 4)
    assert [a for a, _ in lrs] == pytest.approx(
        [1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5 * math.cos(math.pi / 4), 0.0]
    )


def test_schedule_argument_checks():
    opt = toy_optimizer()
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_with_warmup(opt, 10, 11)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        poly_with_warmup(opt, 10, 0, min_lr_ratio=2.0)


def test_build_optimizers_apply_lr_scale_and_weight_decay():
    model = FakeSegmenter()
    groups = param_groups_layer_decay(model, 0.05, 0.5, LAYERS)
    opt = build_adamw(groups, lr=1e-3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * g["lr_scale"] for g in groups])
    assert [g["weight_decay"] for g in opt.param_groups] == [g["weight_decay"] for g in groups]
    assert "lr" not in groups[0]  # the caller's groups are not modified
    adam = build_adam(param_groups_weight_decay(model, 0.0), lr=1e-4)
    assert isinstance(adam, torch.optim.Adam) and all(g["lr"] == 1e-4 for g in adam.param_groups)
    assert opt.param_groups[0]["fused"] is True  # torch >= 2.4 has fused Adam/AdamW kernels on the CPU too
    assert adam.param_groups[0]["fused"] is True


def test_optimizer_step_decays_only_decay_group():
    """AdamW with zero gradients changes only decayed tensors, and by exactly lr * wd * value."""
    model = FakeViT()
    for p in model.parameters():
        nn.init.constant_(p, 1.0)
    opt = build_adamw(param_groups_weight_decay(model, 0.1), lr=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        expected = (
            1.0 - 0.5 * 0.1
            if (p.ndim >= 2 and not name.endswith(("cls_token", "mask_token", "position_embeddings")))
            else 1.0
        )
        torch.testing.assert_close(p.detach(), torch.full_like(p, expected), msg=name)


def random_vit(seed=0):
    torch.manual_seed(seed)
    model = FakeViT()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


@pytest.mark.parametrize(
    ("build", "reference_class"), [(build_adamw, torch.optim.AdamW), (build_adam, torch.optim.Adam)]
)
def test_fused_steps_match_reference_loop(build, reference_class):
    """The auto-picked fused kernel (CPU) takes the same steps as torch's per-tensor loop, with weight decay
    and groups of differing lr (layer decay 0.5: lrs 1/16 to 1 of the base)."""
    lr, wd = 1e-2, 0.1
    model, reference_model = random_vit(), random_vit()
    groups = param_groups_layer_decay(model, wd, 0.5, LAYERS)
    fused = build(groups, lr=lr)
    reference_groups = apply_lr_scale(param_groups_layer_decay(reference_model, wd, 0.5, LAYERS), lr)
    reference = reference_class(reference_groups, lr=lr, foreach=False, fused=False)
    assert all(g["fused"] is True for g in fused.param_groups)
    assert len({g["lr"] for g in fused.param_groups}) == LAYERS + 2
    assert {g["weight_decay"] for g in fused.param_groups} == {0.0, wd}
    for step in range(3):
        grads = [torch.randn_like(p) for p in model.parameters()]
        for params, opt in ((model.parameters(), fused), (reference_model.parameters(), reference)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")


def test_first_fused_adamw_step_matches_closed_form():
    """Step 1 of AdamW: m_hat = g, v_hat = g^2, so p <- p (1 - lr wd) - lr g / (|g| + eps) per group."""
    lr, wd, eps = 1e-2, 0.1, 1e-8
    model, initial = random_vit(), random_vit()
    groups = param_groups_layer_decay(model, wd, 0.5, LAYERS)
    opt = build_adamw(groups, lr=lr, eps=eps)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n]
    opt.step()
    before = dict(initial.named_parameters())
    for group in groups:
        group_lr, group_wd = lr * group["lr_scale"], group["weight_decay"]
        for name, p in zip(group["param_names"], group["params"]):
            g = grads[name].double()
            expected = before[name].detach().double() * (1 - group_lr * group_wd) - group_lr * g / (
                g.abs() + eps
            )
            torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6, msg=name)


def test_kernel_choice_falls_back_and_can_be_turned_off(monkeypatch):
    groups = param_groups_weight_decay(FakeViT(), 0.05)
    opt = build_adamw(groups, lr=1e-3, fused=False)
    assert opt.param_groups[0]["fused"] is False and opt.param_groups[0]["foreach"] is None
    # A device without fused kernels gets foreach ones where it has them, else torch's default.
    monkeypatch.setattr(optim, "_supported_devices", lambda: (["cuda"], ["cpu"]))
    opt = build_adamw(groups, lr=1e-3)
    assert opt.param_groups[0]["fused"] is None and opt.param_groups[0]["foreach"] is True
    monkeypatch.setattr(optim, "_supported_devices", lambda: (["cuda"], ["cuda"]))
    opt = build_adam(groups, lr=1e-3)
    assert opt.param_groups[0]["fused"] is None and opt.param_groups[0]["foreach"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_on_cuda():
    model = FakeViT().cuda()
    opt = build_adamw(param_groups_weight_decay(model, 0.05), lr=1e-3)
    assert opt.param_groups[0]["fused"] is True


def test_real_task_model_names():
    """The rules hold for DenseCLViT's own parameter names (encoder under ``densecl_vit.``)."""
    from densecl_vit.modeling.modeling_densecl_vit import DenseCLViTConfig, DenseCLViTForSemanticSegmentation

    config = DenseCLViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, num_labels=3
    )
    model = DenseCLViTForSemanticSegmentation(config)
    groups = param_groups_layer_decay(model, 0.05, 0.5, num_layers=2)
    assert_partition(model, groups)
    group_of = {n: g for g in groups for n in g["param_names"]}
    for name in (
        "embeddings.cls_token",
        "embeddings.position_embeddings",
        "embeddings.patch_embeddings.projection.bias",
    ):
        assert group_of[f"densecl_vit.{name}"]["name"] == "layer_0_no_decay"
    assert group_of["densecl_vit.embeddings.patch_embeddings.projection.weight"]["name"] == "layer_0_decay"
    assert group_of["densecl_vit.encoder.layer.1.mlp.fc1.weight"]["name"] == "layer_2_decay"
    assert group_of["densecl_vit.encoder.layer.0.norm1.weight"]["name"] == "layer_1_no_decay"
    assert group_of["densecl_vit.layernorm.weight"]["name"] == "layer_3_no_decay"
    head = [n for n in group_of if not n.startswith("densecl_vit.")]
    assert head and all(group_of[n]["lr_scale"] == 1.0 for n in head)
    assert group_of["densecl_vit.embeddings.cls_token"]["lr_scale"] == 0.125
