"""The benchmark: a --quick run writes every section with sane numbers, the FLOP formulas match counted FLOPs
and hand counts, the GPU peak table reads device names, and bad options fail with one line."""

import json
import math

import pytest
import torch
from accelerate.state import AcceleratorState
from torch.utils.flop_counter import FlopCounterMode

from densecl_vit import DenseCLViTForPreTraining, DenseCLViTModel
from densecl_vit.training.experiments import benchmark
from densecl_vit.training.experiments.benchmark import (
    Timing,
    encoder_flops,
    paired_ratio,
    peak_tflops,
    pretraining_step_flops,
    time_interleaved,
    vit_forward_flops,
)

POSITIVE_KEYS = {
    "encoder": ["ours_images_per_s", "timm_images_per_s", "time_ratio", "cpu_time_ratio", "ours_peak_mb",
                "timm_peak_mb", "flops_per_image", "ours_tflops"],
    "pretraining_step": ["encoder_two_view_images_per_s", "train_step_images_per_s", "flop_overhead_pct",
                         "encoder_parameters", "head_parameters", "train_step_peak_mb", "flops_per_step",
                         "unfused_optimizer_pct"],
    "augmentation": ["ours_images_per_s", "crop_only_images_per_s", "naive_images_per_s", "ours_images_per_cpu_s",
                     "naive_images_per_cpu_s", "speedup", "ours_peak_mb"],
    "end_to_end": ["images_per_s", "model_only_images_per_s", "ratio", "peak_mb", "worker_peak_mb"],
}  # fmt: skip


def positive_finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    # The run creates an Accelerator (fp32, CPU): start from, and leave, a fresh accelerate state.
    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path_factory.mktemp("bench")
    try:
        status = benchmark.main(["--quick", "--workers", "1", "--output-dir", str(out)])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return status, out


def test_quick_run_writes_every_section(quick_run):
    status, out = quick_run
    assert status == 0
    results = json.loads((out / "results.json").read_text())
    for section, keys in POSITIVE_KEYS.items():
        rows = results[section] if isinstance(results[section], list) else [results[section]]
        assert rows, section
        for row in rows:
            bad = {key: row.get(key) for key in keys if not positive_finite(row.get(key))}
            assert not bad, f"{section}: {bad}"
    assert [row["mode"] for row in results["encoder"]] == ["forward", "forward_backward"]
    assert all(math.isfinite(row["paired_overhead_pct"]) for row in results["pretraining_step"])
    # Same weights: our encoder and timm's compute the same tokens.
    assert results["encoder"][0]["max_abs_difference"] < 1e-5
    assert 0.0 <= results["end_to_end"]["data_wait_fraction"] <= 1.0
    # The training run's own optimiser, fused on the CPU too.
    assert results["pretraining_step"][0]["fused_adamw"] is True
    assert results["encoder"][0]["ours_mfu"] is None  # no peak for CPUs
    env = results["environment"]
    assert env["torch"] == torch.__version__ and env["cpu"] and env["date"] and env["torch_threads"] >= 1


def test_quick_run_writes_markdown_tables(quick_run):
    _, out = quick_run
    markdown = (out / "results.md").read_text()
    results = json.loads((out / "results.json").read_text())
    env = results["environment"]
    for text in (env["cpu"], f"torch {env['torch']}", f"timm {env['timm']}", env["date"], "--quick"):
        assert text in markdown
    for title in ("## Encoder vs timm", "## Pre-training step", "## Two-view augmentation", "## End-to-end"):
        assert title in markdown
    header = "| size | pass | batch | ours img/s | timm img/s | time ours/timm (median; min) |"
    assert header in markdown
    assert f"| test | forward | 2 | {results['encoder'][0]['ours_images_per_s']:,.1f} |" in markdown


def test_vit_flops_hand_counts():
    # Test config (image 32, patch 8, D 32, 2 blocks): N = 16, T = 17.
    # Patch embedding 2*16*(8*8*3)*32 = 196,608; per block 24*17*32^2 + 4*17^2*32 = 417,792 + 36,992.
    assert vit_forward_flops(32, 8, 32, 2) == 196_608 + 2 * (417_792 + 36_992)
    # ViT-B/16 at 224: 17.56 GMACs, the figure timm and fvcore report for vit_base_patch16_224.
    assert vit_forward_flops(224, 16, 768, 12) / 2e9 == pytest.approx(17.56, abs=0.01)
    assert vit_forward_flops((32, 64), 8, 32, 2) > vit_forward_flops(32, 8, 32, 2)


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_encoder_flops_match_flop_counter(tiny):
    # Eager attention: FlopCounterMode has no formula for the CPU flash-attention kernel, it counts matmuls.
    config = tiny(attn_implementation="eager")
    model = DenseCLViTModel(config).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        counted = counted_flops(lambda: model(pixels))
    assert counted == pytest.approx(3 * encoder_flops(config), rel=0.02)
    counted = counted_flops(lambda: model(pixels).last_hidden_state.sum().backward())
    assert counted == pytest.approx(3 * encoder_flops(config, backward=True), rel=0.02)


def test_pretraining_flops_match_flop_counter(tiny):
    config = tiny(attn_implementation="eager", projection_hidden_size=48, projection_dim=16)
    model = DenseCLViTForPreTraining(config)
    views = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    counted = counted_flops(lambda: model(*views).loss.backward())
    assert counted == pytest.approx(pretraining_step_flops(config, 4), rel=0.02)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", None),
        ("Tesla T4", None),
    ],
)
def test_peak_tflops_from_device_name(name, expected):
    assert peak_tflops(name) == expected


def test_time_interleaved_alternates_order_and_times_every_candidate():
    calls = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in "ab"}
    timings = time_interleaved(candidates, repeats=3, warmup=1, device=torch.device("cpu"))
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert all(len(t.wall) == 3 and len(t.cpu) == 3 and t.median >= 0 for t in timings.values())
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved(candidates, repeats=0, warmup=0, device=torch.device("cpu"))


def test_paired_ratio_is_the_median_of_the_rounds_ratios():
    # the machine halves its speed for rounds 2 and 3: the medians' ratio drifts, the rounds' ratios do not
    step, encoder = Timing([1.1, 1.1, 2.2, 2.2, 1.1], []), Timing([1.0, 2.0, 2.0, 2.0, 1.0], [])
    assert paired_ratio(step, encoder) == pytest.approx(1.1)
    assert step.median / encoder.median == pytest.approx(0.55)
    with pytest.raises(ValueError):
        paired_ratio(step, Timing([1.0], []))


@pytest.mark.parametrize(
    ("flag", "expected"), [([], False), (["--gpu-augment"], True), (["--no-gpu-augment"], False)]
)
def test_gpu_augment_defaults_to_what_pre_training_does_on_the_device(flag, expected):
    from densecl_vit.training.experiments.benchmark import build_parser, resolve_options

    assert resolve_options(build_parser().parse_args(["--quick", *flag])).gpu_augment is expected  # CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_gpu_is_a_one_line_error(capsys, tmp_path):
    assert benchmark.main(["--device", "cuda", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device cuda") and "\n" not in err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--sizes", "vit-huge"], "unknown --sizes vit-huge"),
        (["--sections", "encoder,speed"], "--sections must be a subset"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--quick", "--image-size", "30"], "multiple of"),
    ],
)
def test_bad_options_are_one_line_errors(argv, match, capsys, tmp_path):
    assert benchmark.main([*argv, "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err
