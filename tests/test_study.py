"""The study: the patch-feature diagnostic against loop references, the mean ± std aggregation, the report, and
a whole study at tiny size (2 steps per run, 1 seed) including a restart that skips the finished runs."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script

from densecl_vit.training.study import (
    ARMS,
    PROTOCOLS,
    SIZES,
    aggregate,
    mean_patch_cosine,
    patch_similarity,
    run_study,
)
from densecl_vit.training.study_report import mean_std, paired_differences, study_markdown


def loop_patch_cosine(features: np.ndarray) -> np.ndarray:
    """Reference: for each image, the mean of cos(f_i, f_j) over ordered pairs i != j, by explicit loops."""
    out = []
    for image in features:
        values = []
        for i in range(len(image)):
            for j in range(len(image)):
                if i != j:
                    a, b = image[i], image[j]
                    values.append(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        out.append(np.mean(values))
    return np.array(out)


def test_mean_patch_cosine_matches_the_loop_reference():
    features = np.random.default_rng(0).normal(size=(3, 5, 7)) + 0.5
    got = mean_patch_cosine(torch.from_numpy(features)).numpy()
    np.testing.assert_allclose(got, loop_patch_cosine(features), rtol=1e-10, atol=1e-12)


def test_mean_patch_cosine_is_one_when_collapsed_and_zero_when_orthogonal():
    collapsed = torch.randn(2, 1, 8).expand(2, 6, 8) * torch.rand(2, 6, 1)  # positive multiples of one vector
    orthogonal = torch.eye(6).expand(2, 6, 6)
    torch.testing.assert_close(mean_patch_cosine(collapsed), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(mean_patch_cosine(orthogonal), torch.zeros(2, dtype=torch.float64))


def test_mean_patch_cosine_needs_two_patches():
    with pytest.raises(ValueError, match="N >= 2"):
        mean_patch_cosine(torch.randn(2, 1, 4))
    with pytest.raises(ValueError, match="N >= 2"):
        mean_patch_cosine(torch.randn(4, 8))


def test_centred_similarity_removes_the_shared_offset():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(4, 9, 16)) + 10.0  # a large offset common to every patch
    similarity = patch_similarity(torch.from_numpy(features))
    centred = features - features.reshape(-1, 16).mean(0)
    assert similarity["patch_cos"] == pytest.approx(loop_patch_cosine(features).mean(), rel=1e-9)
    assert similarity["patch_cos_centered"] == pytest.approx(loop_patch_cosine(centred).mean(), abs=1e-9)
    assert similarity["patch_cos"] > 0.9 > 0.2 > abs(similarity["patch_cos_centered"])


def test_mean_std_uses_the_sample_std_and_keeps_one_seed_honest():
    stats = mean_std([0.2, 0.4, 0.9])
    assert stats["mean"] == pytest.approx(np.mean([0.2, 0.4, 0.9]))
    assert stats["std"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
    assert stats["n"] == 3 and stats["values"] == [0.2, 0.4, 0.9]
    assert mean_std([0.5])["std"] is None
    assert math.isnan(mean_std([1.0, float("nan")])["mean"])


def fake_records():
    encoders, runs = [], []
    for a, arm in enumerate(ARMS):
        for seed in (0, 1):
            encoders.append({"arm": arm, "seed": seed, "patch_cos": 0.1 * a + 0.01 * seed})
            for protocol in PROTOCOLS:
                runs.append({"arm": arm, "seed": seed, "protocol": protocol, "task": "segmentation",
                             "mean_iou": 0.1 * a + 0.02 * seed, "overall_accuracy": 0.5})  # fmt: skip
                runs.append({"arm": arm, "seed": seed, "protocol": protocol, "task": "depth",
                             "abs_rel": 0.3 - 0.05 * a, "rmse": 1.0 + seed, "delta1": 0.6})  # fmt: skip
    return encoders, runs


def test_aggregate_groups_by_arm_and_protocol():
    summary = aggregate(*fake_records())
    assert set(summary) == set(ARMS)
    assert set(summary["global"]) == {"encoder", *PROTOCOLS}
    seg = summary["global"]["frozen"]["mean_iou"]
    assert seg["values"] == pytest.approx([0.1, 0.12]) and seg["std"] == pytest.approx(
        np.std([0.1, 0.12], ddof=1)
    )
    assert summary["random"]["full"]["abs_rel"]["mean"] == pytest.approx(0.15)
    assert summary["both"]["encoder"]["patch_cos"]["mean"] == pytest.approx(0.205)


def test_paired_differences_match_seed_by_seed():
    _, runs = fake_records()
    runs = [r for r in runs if not (r["arm"] == "global" and r["seed"] == 1)]  # a seed only one arm ran
    diffs = paired_differences(runs, "local-global", "global", "frozen", "mean_iou")
    assert diffs == pytest.approx([0.0 - 0.1])  # seed 0 only
    diffs = paired_differences(runs, "random", "local-global", "full", "abs_rel")
    assert diffs == pytest.approx([-0.15, -0.15])


def test_markdown_bolds_the_best_arm_in_the_metric_direction():
    encoders, runs = fake_records()
    study = {
        "size": "custom",
        "settings": dict(SIZES["tiny"].settings.__dict__),
        "frozen_lr": 1e-3,
        "seeds": [0, 1],
        "arms": list(ARMS),
        "protocols": list(PROTOCOLS),
        "tasks": ["segmentation", "depth"],
        "summary": aggregate(encoders, runs),
        "runs": runs,
        "wall_time_s": 60.0,
    }
    text = study_markdown(study)
    frozen = text.split("## Frozen")[1].split("##")[0]
    random_row = next(line for line in frozen.splitlines() if line.startswith("| random init"))
    local_row = next(line for line in frozen.splitlines() if line.startswith("| local-to-global (paper)"))
    assert "**31.0 ± 1.4**" in random_row  # highest mIoU (0.30, 0.32) -> 31.0 %
    assert "**0.150 ± 0.000**" in random_row  # lowest AbsRel
    assert "**" not in local_row.split(" | ")[1] and "**" not in local_row.split(" | ")[3]
    assert local_row.count("**") == random_row.count("**") - 4  # ties (pixel acc, δ1) are bold in every row
    differences = text.split("## Paired differences")[1].split("##")[0]
    assert "| frozen | local-to-global − global | -10.0 ± 0.0 |" in differences
    assert "patch cosine" in text and "**" not in text.split("## Encoders")[1]  # diagnostics are not ranked


def check_report(out: Path, arms: list[str]) -> dict:
    """The three report files exist and study.json holds finite metrics of every (arm, protocol, task)."""
    for name in ("study.md", "study.json", "study.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    study = json.loads((out / "study.json").read_text())
    assert len(study["runs"]) == len(arms) * 2 * 2 and len(study["encoders"]) == len(arms)
    assert list(study["summary"]) == arms
    for arm in arms:
        for protocol in PROTOCOLS:
            stats = study["summary"][arm][protocol]
            assert set(stats) == {"mean_iou", "overall_accuracy", "abs_rel", "rmse", "delta1"}
            assert all(math.isfinite(s["mean"]) and s["n"] == 1 for s in stats.values())
        assert 0 < study["summary"][arm]["encoder"]["patch_cos"]["mean"] <= 1
    markdown = (out / "study.md").read_text()
    assert markdown.count("| random init |") == 3  # frozen, full and encoder tables
    return study


def test_tiny_study_writes_its_report_and_skips_finished_runs_on_restart(tmp_path):
    """A pre-trained arm and the random arm (the two ways an encoder is made), both protocols and tasks."""
    out, arms = tmp_path / "study", ["local-global", "random"]
    argv = ["--size", "tiny", "--seeds", "1", "--output-dir", str(out), "--arms", *arms]
    assert load_script("study").main(argv) == 0
    study = check_report(out, arms)
    assert "loss_end" in study["summary"]["local-global"]["encoder"]
    assert "loss_end" not in study["summary"]["random"]["encoder"]
    assert not list(out.glob("**/checkpoints"))  # dropped once a run completed
    frozen = (out / "finetune/random/seed-0/frozen-depth/config.yaml").read_text()
    assert "freeze_encoder: true" in frozen and "drop_path_rate: 0.0" in frozen
    assert "freeze_encoder: false" in (out / "finetune/random/seed-0/full-depth/config.yaml").read_text()
    assert "loss: local-global" in (out / "pretrain/local-global/seed-0/config.yaml").read_text()

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("**/results.json")}
    assert len(stamps) == 1 + 8
    again = run_study("tiny", [0], out, arms=arms, echo=lambda text: None)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing ran twice
    assert again["summary"] == study["summary"]

    changed = dataclasses.replace(SIZES["tiny"], frozen_lr=0.5)  # only the frozen runs see this setting
    run_study(changed, [0], out, arms=arms, protocols=["frozen"], tasks=["depth"], echo=lambda text: None)
    rerun = {p for p in stamps if p.stat().st_mtime_ns != stamps[p]}
    assert rerun == {out / "finetune/local-global/seed-0/frozen-depth/results.json",
                     out / "finetune/random/seed-0/frozen-depth/results.json"}  # fmt: skip
    assert "lr: 0.5" in (out / "finetune/random/seed-0/frozen-depth/config.yaml").read_text()


@pytest.mark.slow
def test_tiny_study_compares_all_four_encoders(tmp_path):
    out = tmp_path / "study"
    assert load_script("study").main(["--size", "tiny", "--seeds", "1", "--output-dir", str(out)]) == 0
    check_report(out, list(ARMS))
    for loss in ("global", "both"):
        assert f"loss: {loss}" in (out / f"pretrain/{loss}/seed-0/config.yaml").read_text()


def test_study_refuses_bad_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown study size"):
        run_study("huge", [0], tmp_path)
    with pytest.raises(ValueError, match="arms must be"):
        run_study("tiny", [0], tmp_path, arms=["local-global", "dense"])
    with pytest.raises(ValueError, match="seeds"):
        run_study("tiny", [], tmp_path)
    assert load_script("study").main(["--seeds", "0", "--output-dir", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())
