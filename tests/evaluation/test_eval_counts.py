"""Evaluation reports count what they read: rows read, used, and skipped by reason, for segmentation and depth,
in `evaluate_model.py`'s eval_results.json, its printed line, and the model card built from it."""

import io
import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from helpers import SEG_CLASSES, load_script, write_depth_dataset, write_segmentation_dataset

from densecl_vit.hub_cards.cards import CardInputs, load_eval_results, render_model_card
from densecl_vit.modeling import (
    DenseCLViTForDepthEstimation,
    DenseCLViTForSemanticSegmentation,
    DenseCLViTImageProcessor,
)
from densecl_vit.training.engine.setup import cli_main
from densecl_vit.training.evaluation.shared import EvaluateConfig

evaluate_model = load_script("evaluate_model")


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _with_bad_rows(good_root, root, bad_rows: dict[str, list]) -> str:
    """The validation split of `good_root` followed by `bad_rows`, as one parquet file under `root`."""
    good = datasets.load_dataset("parquet", data_files=str(good_root / "data/validation-*.parquet"))["train"]
    rows = good.to_dict()
    for column, values in bad_rows.items():
        rows[column] += values
    root.mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=good.features).to_parquet(root / "validation.parquet")
    (root / "id2label.json").write_text(json.dumps(SEG_CLASSES))
    return str(root / "validation.parquet")


def _folder(model, root):
    model.save_pretrained(root)
    DenseCLViTImageProcessor(size={"height": 32, "width": 32}, size_divisor=8).save_pretrained(root)
    return str(root)


def _evaluate(argv, capsys):
    assert (
        cli_main(evaluate_model.main, EvaluateConfig, [*argv, "--num-workers", "0", "--progress", "false"])
        == 0
    )
    return capsys.readouterr().out


def test_segmentation_report_counts_rows_read_used_and_skipped(tmp_path, tiny, capsys):
    names = {int(k): v for k, v in SEG_CLASSES.items()}
    torch.manual_seed(0)
    config = tiny(num_labels=3, id2label=names, label2id={v: k for k, v in names.items()})
    model = _folder(DenseCLViTForSemanticSegmentation(config), tmp_path / "seg")
    good = write_segmentation_dataset(tmp_path / "good", num_train=1, num_val=4)
    garbage = {"bytes": b"not an image", "path": None}
    small_label = {"bytes": _png(np.ones((8, 8), np.uint8)), "path": None}
    image = {"bytes": _png(np.zeros((32, 32, 3), np.uint8)), "path": None}
    data = _with_bad_rows(
        good, tmp_path / "mixed", {"image": [garbage, garbage, image], "annotation": [small_label] * 3}
    )
    out = _evaluate(["--task", "segmentation", "--model", model, "--dataset", data, "--split", "train",
                     "--output-dir", str(tmp_path / "eval")], capsys)  # fmt: skip
    written = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    # Two undecodable images; the third bad row decodes but its label map is 8x8 under a 32x32 image.
    assert (written["examples_seen"], written["num_samples"], written["skipped_samples"]) == (7, 4, 3)
    assert written["skipped_by_reason"] == {"label_size_mismatch": 1, "undecodable_image": 2}
    assert "4 of 7 rows used (3 skipped: label_size_mismatch: 1, undecodable_image: 2)" in out

    inputs = CardInputs(
        model_class="DenseCLViTForSemanticSegmentation", config=config.to_dict(), repo_id="a/b"
    )
    card = render_model_card(inputs, eval_results=tmp_path / "eval" / "eval_results.json")
    assert "4 images of 7 rows read; 3 skipped (label_size_mismatch: 1, undecodable_image: 2)" in card.text


def test_depth_report_counts_unusable_rows_and_rows_with_no_pixel_in_the_crop(tmp_path, tiny, capsys):
    torch.manual_seed(0)
    model = _folder(DenseCLViTForDepthEstimation(tiny(max_depth=8.0)), tmp_path / "depth")
    good = write_depth_dataset(tmp_path / "good", num_train=1, num_val=3)
    zeros = np.zeros((32, 32), np.float32)
    top_row_only = zeros.copy()
    top_row_only[0] = 2.0  # valid, but above the Eigen crop (rows 3..30 of 32)
    image = {"bytes": _png(np.full((32, 32, 3), 128, np.uint8)), "path": None}
    data = _with_bad_rows(
        good,
        tmp_path / "mixed",
        {"image": [image] * 3, "depth_map": [d.tolist() for d in (zeros, zeros, top_row_only)]},
    )
    argv = ["--task", "depth", "--model", model, "--dataset", data, "--split", "train"]
    _evaluate([*argv, "--output-dir", str(tmp_path / "crop"), "--eigen-crop", "true"], capsys)
    report = load_eval_results(tmp_path / "crop" / "eval_results.json")  # the card reads it
    assert (report.num_samples, report.skipped_samples) == (3, 3)
    written = json.loads((tmp_path / "crop" / "eval_results.json").read_text())
    assert written["skipped_by_reason"] == {"depth_all_invalid": 2, "no_valid_pixel_in_crop": 1}
    assert (written["examples_seen"], written["num_samples"]) == (6, 3)

    _evaluate([*argv, "--output-dir", str(tmp_path / "whole"), "--eigen-crop", "false"], capsys)
    written = json.loads((tmp_path / "whole" / "eval_results.json").read_text())
    assert written["skipped_by_reason"] == {"depth_all_invalid": 2}
    assert (written["examples_seen"], written["num_samples"]) == (6, 4)


def test_card_omits_counts_when_every_row_was_used_and_refuses_inconsistent_ones(tmp_path):
    report = {
        "task": "semantic-segmentation",
        "dataset": {"name": "ADE20K", "id": "scene_parse_150", "split": "validation"},
        "metrics": {"mean_iou": 0.45},
        "protocol": {},
        "num_samples": 10,
        "examples_seen": 10,
        "skipped_samples": 0,
        "skipped_by_reason": {},
    }
    path = tmp_path / "eval_results.json"
    path.write_text(json.dumps(report))
    from densecl_vit.modeling import DenseCLViTConfig

    inputs = CardInputs(
        model_class="DenseCLViTForSemanticSegmentation", config=DenseCLViTConfig().to_dict(), repo_id="a/b"
    )
    assert "split `validation`, 10 images);" in render_model_card(inputs, eval_results=path).text
    path.write_text(json.dumps({**report, "examples_seen": 12}))
    with pytest.raises(ValueError, match="examples_seen and skipped_samples"):
        load_eval_results(path)
