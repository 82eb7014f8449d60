"""The study: probes and the patch-feature diagnostic against loop references, the report's validity line,
paired differences and verdicts on hand-made records, and a whole study at tiny size with a restart that skips
the finished runs."""

import math

import numpy as np
import pytest
import torch
from helpers import load_script

from densecl_vit.training.experiments.probes import (
    ProbeSettings,
    coarse_labels,
    depth_metrics,
    depth_probe,
    knn_probe,
    mean_iou,
    mean_patch_cosine,
    patch_labels,
    patch_similarity,
    segmentation_probe,
)
from densecl_vit.training.experiments.study import labelled_subset, run_study
from densecl_vit.training.experiments.study_report import beats, best_arm, mean_std, study_markdown, validity


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
    stats = mean_std([0.1, 0.3])
    assert stats["mean"] == pytest.approx(0.2) and stats["std"] == pytest.approx(np.std([0.1, 0.3], ddof=1))
    one = mean_std([0.5])
    assert one["std"] is None and one["n"] == 1
    assert math.isnan(mean_std([1.0, float("nan")])["mean"])


# --- probes ---------------------------------------------------------------------------------------------


def loop_mean_iou(pred: np.ndarray, gt: np.ndarray, classes: int) -> float:
    ious = []
    for k in range(classes):
        valid = gt != 255
        inter = np.sum((pred == k) & (gt == k) & valid)
        union = np.sum(((pred == k) | (gt == k)) & valid)
        if union:
            ious.append(inter / union)
    return float(np.mean(ious))


def test_mean_iou_matches_a_loop_reference():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, size=(3, 8, 8))
    gt[0, :2] = 255
    pred = np.where(rng.random(gt.shape) < 0.6, gt % 255, rng.integers(0, 4, size=gt.shape))
    got = mean_iou(torch.from_numpy(pred), torch.from_numpy(gt), 5)
    assert got == pytest.approx(loop_mean_iou(pred, gt, 5), abs=1e-12)


def test_patch_labels_take_the_majority_of_labelled_pixels():
    labels = torch.full((1, 4, 4), 255)
    labels[0, :2, :2] = torch.tensor([[1, 1], [2, 255]])  # patch (0, 0): two 1s, one 2, one ignored
    labels[0, :2, 2:] = 3
    assert patch_labels(labels, 2, 4).tolist() == [[1, 3, 255, 255]]


def test_coarse_labels_group_objects():
    # reduced labels: floor 0, wall 1, five object kinds 2..6, ceiling 7
    assert coarse_labels(torch.tensor([0, 1, 2, 6, 7, 255])).tolist() == [0, 1, 3, 3, 2, 255]


def _separable(num: int, seed: int):
    """Tokens (num, 16, 4) that carry each 4x4 patch's class (one-hot) and log depth; pixel maps (num, 16, 16)."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, 3, (num, 4, 4), generator=g)
    log_depth = torch.rand(num, 4, 4, generator=g) * 2 - 0.5
    tokens = torch.cat([torch.nn.functional.one_hot(classes, 3).float(), log_depth[..., None]], -1).flatten(
        1, 2
    )
    upsample = dict(scale_factor=4, mode="nearest")
    labels = torch.nn.functional.interpolate(classes[:, None].float(), **upsample)[:, 0].long()
    depth = torch.nn.functional.interpolate(log_depth[:, None], **upsample)[:, 0].exp()
    return tokens, labels, depth


def test_probes_read_what_the_tokens_carry_and_nothing_from_noise():
    settings = ProbeSettings(steps=200, lr=0.05, knn_k=5)
    train, train_labels, train_depth = _separable(8, 0)
    val, val_labels, val_depth = _separable(4, 1)
    assert segmentation_probe(train, train_labels, val, val_labels, 3, settings, 0) > 0.7
    assert knn_probe(train, train_labels, val, val_labels, 3, settings) == pytest.approx(1.0)
    assert depth_probe(train, train_depth, val, val_depth, settings, 0)["delta1"] > 0.6
    noise = torch.randn_like(train, generator=torch.Generator().manual_seed(2))
    noise_val = torch.randn_like(val, generator=torch.Generator().manual_seed(3))
    assert knn_probe(noise, train_labels, noise_val, val_labels, 3, settings) < 0.6


def test_depth_metrics_match_their_definitions():
    gt = torch.tensor([[[1.0, 2.0], [4.0, 0.0]]])  # one invalid pixel
    pred = torch.tensor([[[1.2, 3.0], [4.0, 9.0]]])
    got = depth_metrics(pred, gt)
    assert got["delta1"] == pytest.approx(2 / 3)
    assert got["abs_rel"] == pytest.approx((0.2 + 0.5 + 0.0) / 3)


def test_labelled_subsets_are_drawn_per_seed_and_shared_by_arms():
    a, b = labelled_subset(0, 16, 256), labelled_subset(1, 16, 256)
    assert torch.equal(a, labelled_subset(0, 16, 256)) and not torch.equal(a, b)
    assert len(set(a.tolist())) == 16 and a.max() < 256
    with pytest.raises(ValueError, match="exceeds the 8 labelled scenes"):
        labelled_subset(0, 16, 8)


# --- the report -----------------------------------------------------------------------------------------


def _records(gaps: dict[str, float], noise: float = 0.01) -> list[dict]:
    """Encoder records of 3 seeds; arm a scores random's values + gaps[a] (+ a little per-seed noise)."""
    records = []
    for seed in range(3):
        base = 0.3 + noise * seed
        for arm, gap in {"random": 0.0, **gaps}.items():
            scores = {
                m: base + gap + 0.001 * seed * (arm != "random")
                for m in ("seg_miou", "coarse_miou", "knn_miou", "delta1")
            }
            probes = {c: {**scores, "abs_rel": 0.5} for c in ("16", "64")}
            records.append({"arm": arm, "seed": seed, "factor": 1, "patch_cos": 0.4, "probes": probes})
    return records


def _study(records) -> dict:
    arms = list(dict.fromkeys(r["arm"] for r in records))
    return {
        "size": "custom", "settings": {"model": "vit-tiny", "num_train": 64, "num_val": 8, "image_size": 64,
        "pretrain_steps": 3, "pretrain_batch_size": 4, "pretrain_lr": 1e-3, "crop_scale": [0.25, 1.0]},
        "num_pool": 100, "label_counts": [16, 64], "probe": {"steps": 3, "lr": 0.01, "knn_k": 5},
        "longer_factor": 3, "seeds": [0, 1, 2], "arms": arms, "titles": {a: a for a in arms},
        "encoders": records, "finetune": [],
    }  # fmt: skip


def test_validity_line_needs_the_supervised_margin():
    valid = _study(_records({"supervised": 0.2, "local-global": 0.0, "local-local": 0.1}))
    assert validity(valid)["valid"] is True
    assert "Testbed **valid**" in study_markdown(valid)
    invalid = _study(_records({"supervised": 0.04, "local-global": 0.0}))  # 0.04 < 5 x std 0.01
    assert validity(invalid)["valid"] is False
    markdown = study_markdown(invalid)
    assert "Testbed **invalid**" in markdown
    assert "**" not in markdown.split("Testbed **invalid**")[1]  # no winner in bold, no best arm, no verdict
    assert "Best self-supervised arm" not in markdown
    one_seed = _study([r for r in _records({"supervised": 0.2}) if r["seed"] == 0])
    assert validity(one_seed)["valid"] is None


def test_best_arm_and_beating_the_paper_use_paired_differences():
    study = _study(_records({"supervised": 0.2, "local-global": 0.0, "local-local": 0.1, "global": -0.05}))
    assert best_arm(study) == "local-local"
    assert beats(study, "local-local", "local-global") and not beats(study, "global", "local-global")
    markdown = study_markdown(study)
    assert "| local-local − random | **+10.0" not in markdown  # differences are not bolded
    assert "| local-local − random | +10.1 ± 0.1 |" in markdown
    assert (
        "beat the paper's loss beyond the seed spread on both tasks" in markdown
        and "**local-local**" in markdown
    )


# --- a whole study --------------------------------------------------------------------------------------


def test_tiny_study_writes_its_report_and_skips_finished_runs_on_restart(tmp_path):
    out, arms = tmp_path / "study", ["random", "local-local"]
    argv = ["--size", "tiny", "--seeds", "1", "--jobs", "1", "--output-dir", str(out), "--arms", *arms]
    assert load_script("study").main(argv) == 0
    study = __import__("json").loads((out / "study.json").read_text())
    factors = sorted((r["arm"], r["factor"]) for r in study["encoders"])
    assert factors == [("local-local", 1), ("local-local", 2), ("random", 1), ("random", 2)]
    for record in study["encoders"]:
        assert set(record["probes"]) == {"2", "4"}
        assert all(math.isfinite(v) for v in record["probes"]["2"].values())
    assert {(r["arm"], r["task"]) for r in study["finetune"]} == {
        (a, t) for a in arms for t in ("segmentation", "depth")
    }
    assert "loss: local-local" in (out / "runs/local-local/seed-0/train/config.yaml").read_text()
    markdown = (out / "study.md").read_text()
    assert "Testbed **not checked**" in markdown and "## Longer budget: 2x" in markdown
    assert not list(out.glob("**/checkpoints"))  # dropped once a run completed
    assert (out / "study.png").stat().st_size > 0 and (out / "pca.png").stat().st_size > 0

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("**/results.json")}
    assert len(stamps) == 2 + 4  # two pre-trainings, four fine-tunings
    again = run_study("tiny", [0], out, arms=arms, jobs=1, echo=lambda text: None)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing ran twice
    assert again["encoders"] == study["encoders"]


def test_study_refuses_bad_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown study size"):
        run_study("huge", [0], tmp_path)
    with pytest.raises(ValueError, match="arms must be"):
        run_study("tiny", [0], tmp_path, arms=["local-global", "dense"])
    with pytest.raises(ValueError, match="seeds"):
        run_study("tiny", [], tmp_path)
    with pytest.raises(ValueError, match="jobs"):
        run_study("tiny", [0], tmp_path, jobs=0)
    assert load_script("study").main(["--seeds", "0", "--output-dir", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())
