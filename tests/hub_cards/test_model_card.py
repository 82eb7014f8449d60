"""Model cards: metadata round trip through ModelCard.load, metrics only from eval_results.json, recipe, snippets."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from densecl_vit.hub_cards import cards
from densecl_vit.hub_cards.cards import (
    CardInputs,
    load_eval_results,
    load_training_config,
    render_model_card,
    training_sources,
)
from densecl_vit.hub_cards.snippets import StockFormats
from densecl_vit.modeling import DenseCLViTConfig

SEG_REPORT = {
    "task": "semantic-segmentation",
    "dataset": {"name": "ADE20K", "id": "scene_parse_150", "split": "validation"},
    "metrics": {"mean_iou": 0.4531, "mean_accuracy": 0.5612, "overall_accuracy": 0.8123},
    "protocol": {"mode": "slide", "crop_size": 512, "stride": 341},
    "num_samples": 2000,
}
DEPTH_REPORT = {
    "task": "depth-estimation",
    "dataset": {"name": "NYU-Depth V2", "id": "sayakpaul/nyu_depth_v2", "split": "test"},
    "metrics": {"abs_rel": 0.1234, "rmse": 0.456, "delta1": 0.851, "delta2": 0.97, "delta3": 0.993},
    "protocol": {"crop": "eigen", "min_depth": 0.001, "max_depth": 10.0},
    "num_samples": 654,
}
TRAINING = {"lr": 1e-4, "pretrained_model": "my-org/densecl-vit-small", "optim": {"betas": [0.9, 0.999]}}
CLASSES = {
    "encoder": "DenseCLViTModel",
    "seg": "DenseCLViTForSemanticSegmentation",
    "depth": "DenseCLViTForDepthEstimation",
}


def _inputs(kind="seg", **overrides):
    config = DenseCLViTConfig.from_preset("vit-small", decode_head="upernet", num_labels=150).to_dict()
    kwargs = dict(
        model_class=CLASSES[kind], config=config, repo_id="my-org/densecl-vit-s-ade", revision="v1.0"
    )
    kwargs.update(overrides)
    return CardInputs(**kwargs)


def _report(tmp_path, report=SEG_REPORT, name="eval_results.json"):
    path = tmp_path / name
    path.write_text(json.dumps(report))
    return path


def _round_trip(card, tmp_path):
    card.save(tmp_path / "README.md")
    return ModelCard.load(tmp_path / "README.md")


def test_card_metadata_round_trips_with_the_reported_metrics(tmp_path):
    inputs = _inputs(base_model="my-org/densecl-vit-small", datasets=("scene_parse_150",))
    card = _round_trip(render_model_card(inputs, eval_results=_report(tmp_path)), tmp_path)
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-segmentation"
    assert {"custom_code", "densecl-vit", "vision-transformer", "self-supervised"} <= set(data.tags)
    assert data.license == "apache-2.0" and data.base_model == "my-org/densecl-vit-small"
    assert data.datasets == ["scene_parse_150"]
    assert not hasattr(data, "widget")  # remote code at the root: the widget cannot run it
    results = {r.metric_type: r for r in data.eval_results}
    assert {k: r.metric_value for k, r in results.items()} == SEG_REPORT["metrics"]
    first = results["mean_iou"]
    assert (first.task_type, first.dataset_type, first.dataset_name, first.dataset_split) == (
        "image-segmentation",
        "scene_parse_150",
        "ADE20K",
        "validation",
    )
    assert "| mIoU (%) ↑ | 45.31 |" in card.text and "2000 images" in card.text


def test_depth_card_reports_depth_metrics(tmp_path):
    card = render_model_card(_inputs("depth"), eval_results=_report(tmp_path, DEPTH_REPORT))
    card = _round_trip(card, tmp_path)
    assert card.data.pipeline_tag == "depth-estimation"
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == DEPTH_REPORT["metrics"]
    assert "| AbsRel ↓ | 0.1234 |" in card.text and "| δ < 1.25 ↑ | 0.8510 |" in card.text


def test_card_metadata_names_no_local_folder_as_a_hub_dataset(tmp_path):
    local = tmp_path / "scenes"
    local.mkdir()
    report = SEG_REPORT | {"dataset": {"name": "synthetic-scenes", "id": str(local), "split": "validation"}}
    inputs = _inputs(
        datasets=training_sources({"dataset": str(local), "dataset_name": "synthetic-scenes"})[2]
    )
    card = _round_trip(render_model_card(inputs, eval_results=_report(tmp_path, report)), tmp_path)
    assert card.data.datasets is None
    assert {r.dataset_type for r in card.data.eval_results} == {"synthetic-scenes"}
    assert str(local) in card.text  # the card's text still says where the evaluation data was


def test_card_without_report_has_no_metrics(tmp_path):
    card = _round_trip(render_model_card(_inputs()), tmp_path)
    assert card.data.eval_results is None and "model-index" not in card.content
    assert "## Evaluation" not in card.text and "mIoU" not in card.text


def test_metrics_passed_any_other_way_are_refused(tmp_path):
    inputs = _inputs()
    path = _report(tmp_path)
    for attempt in (
        lambda: render_model_card(inputs, metrics={"mean_iou": 0.9}),
        lambda: render_model_card(inputs, eval_results=path, mean_iou=0.9),
        lambda: render_model_card(inputs, eval_results=SEG_REPORT),
        lambda: render_model_card(inputs, eval_results=load_eval_results(path)),
        lambda: render_model_card(inputs, eval_results=_report(tmp_path, name="my_numbers.json")),
    ):
        with pytest.raises(ValueError, match="eval_results"):
            attempt()
    with pytest.raises(TypeError):
        CardInputs(model_class=CLASSES["seg"], config={}, repo_id="a/b", metrics={"mean_iou": 0.9})


def test_report_of_another_task_is_refused(tmp_path):
    with pytest.raises(ValueError, match="reports depth-estimation"):
        render_model_card(_inputs("seg"), eval_results=_report(tmp_path, DEPTH_REPORT))
    with pytest.raises(ValueError, match="encoder"):
        render_model_card(_inputs("encoder"), eval_results=_report(tmp_path))


def test_load_eval_results_returns_the_typed_report(tmp_path):
    report = load_eval_results(_report(tmp_path, {**SEG_REPORT, "per_category": {"iou": [0.5, None]}}))
    assert report.task == "semantic-segmentation" and report.num_samples == 2000
    assert (report.dataset_name, report.dataset_id, report.dataset_split) == (
        "ADE20K",
        "scene_parse_150",
        "validation",
    )
    assert report.metrics == SEG_REPORT["metrics"] and report.protocol["stride"] == 341


@pytest.mark.parametrize(
    "change, message",
    [
        ({"task": "classification"}, "task must be"),
        ({"metrics": {"mean_iou": 45.3}}, "outside its range"),
        ({"metrics": {"miou": 0.4}}, "unknown semantic-segmentation metrics"),
        ({"metrics": {"mean_accuracy": 0.4}}, "missing required metrics"),
        ({"metrics": {"mean_iou": float("nan")}}, "finite number"),
        ({"metrics": {"mean_iou": "0.45"}}, "finite number"),
        ({"dataset": {"name": "ADE20K", "split": "validation"}}, "dataset.id"),
        ({"num_samples": 0}, "num_samples"),
        ({"protocol": None}, "protocol"),
        ({"notes": "hand-tuned"}, "unknown keys"),
    ],
)
def test_load_eval_results_refuses_bad_reports(tmp_path, change, message):
    path = tmp_path / "eval_results.json"
    path.write_text(json.dumps({**SEG_REPORT, **change}))
    with pytest.raises(ValueError, match=message) as error:
        load_eval_results(path)
    assert len(str(error.value).splitlines()) == 1


def test_paper_numbers_appear_only_beside_the_same_setting(tmp_path, monkeypatch):
    key = ("semantic-segmentation", "vit-small", "upernet", "ade20k")
    monkeypatch.setattr(cards, "PAPER_RESULTS", {key: {"mean_iou": 0.5}})
    card = render_model_card(_inputs(), eval_results=_report(tmp_path))
    assert "| Metric | This model | Paper |" in card.text and "| mIoU (%) ↑ | 45.31 | 50.00 |" in card.text
    linear = _inputs(config={**_inputs().config, "decode_head": "linear"})
    assert "Paper" not in render_model_card(linear, eval_results=_report(tmp_path)).text


def test_recipe_table_lists_every_key_of_the_training_config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**TRAINING, "note": "a|b", "resume": None}))
    config = load_training_config(path)
    card = render_model_card(_inputs(training_config=config, training_config_file="config.yaml"))
    rows = dict(re.findall(r"^\| `([^`]+)` \| (.*) \|$", card.text, flags=re.MULTILINE))
    assert rows == {
        "lr": "0.0001",
        "pretrained_model": "my-org/densecl-vit-small",
        "optim.betas": "0.9, 0.999",
        "note": "a\\|b",
        "resume": "none",
    }
    assert "`config.yaml`" in card.text


def test_training_config_with_a_credential_is_refused(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"lr": 0.1, "hub": {"hub_token": "hf_abc"}}))
    with pytest.raises(ValueError, match="hub.hub_token"):
        load_training_config(path)
    path.write_text(yaml.safe_dump({"lr": 0.1, "hub": {"hub_token": None}}))
    assert load_training_config(path)["lr"] == 0.1


def test_training_sources_tell_hub_ids_from_local_folders(tmp_path):
    local = tmp_path / "pretrain-run"
    local.mkdir()
    assert training_sources(TRAINING | {"dataset": "scene_parse_150"}) == (
        "my-org/densecl-vit-small",
        None,
        ["scene_parse_150"],
    )
    assert training_sources({"pretrained_model": str(local), "dataset": str(tmp_path)}) == (
        None,
        "pretrain-run",
        [],
    )


def test_training_sources_read_the_start_of_a_finetuning_run_but_not_a_preset(tmp_path):
    recipes = Path(__file__).resolve().parents[2] / "training" / "recipes"
    finetune = load_training_config(recipes / "finetune_seg_ade20k_vit_small_linear.yaml")
    assert finetune["model"] == "vit-small" and training_sources(finetune)[:2] == (None, None)
    assert training_sources(finetune | {"model": "my-org/densecl-vit-small"})[:2] == (
        "my-org/densecl-vit-small",
        None,
    )
    encoder = tmp_path / "pretrain-run"
    encoder.mkdir()
    assert training_sources(finetune | {"model": str(encoder)})[:2] == (None, "pretrain-run")
    # A pre-training run starts from a preset or a config.json: random weights, no base model.
    pretrain = load_training_config(recipes / "pretrain_vit_tiny.yaml")
    for model in (pretrain["model"], "ViT-Small", "b", "tiny", str(tmp_path / "config.json")):
        assert training_sources(pretrain | {"model": model})[:2] == (None, None), model
    # Only the run's own top-level option names its start.
    assert training_sources({"tracker": {"model": "my-org/other"}})[:2] == (None, None)


def _python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


@pytest.mark.parametrize("kind", ["encoder", "seg", "depth"])
@pytest.mark.parametrize("fmt", ["remote-code", "stock"])
def test_usage_snippets_are_python_pinned_to_the_revision(kind, fmt):
    stock = StockFormats(
        transformers_class="Dinov2Model", subfolder="stock" if fmt == "remote-code" else None
    )
    card = render_model_card(_inputs(kind, fmt=fmt, stock=stock))
    blocks = _python_blocks(card.text)
    assert blocks
    for block in blocks:
        compile(block, "<card>", "exec")
        assert 'repo, revision = "my-org/densecl-vit-s-ade", "v1.0"' in block
    pipeline_tag = card.data.pipeline_tag
    assert f'pipeline("{pipeline_tag}"' in blocks[0]
    assert ("trust_remote_code=True" in blocks[0]) == (fmt == "remote-code")
    assert ("custom_code" in card.data.tags) == (fmt == "remote-code")
    if fmt == "remote-code":
        assert 'subfolder="stock"' in blocks[1] and "trust_remote_code" not in blocks[1]


@pytest.mark.parametrize("kind", ["encoder", "seg", "depth"])
def test_stock_card_offers_the_widget_and_no_custom_code(kind, tmp_path):
    stock = StockFormats(transformers_class="UperNetForSemanticSegmentation")
    card = _round_trip(render_model_card(_inputs(kind, fmt="stock", stock=stock)), tmp_path)
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == cards.MODEL_TASKS[CLASSES[kind]].pipeline_tag
    assert card.data.widget == [
        {"src": cards.MODEL_TASKS[CLASSES[kind]].widget, "example_title": "Sample photo"}
    ]
    assert "custom_code" not in card.data.tags and "trust_remote_code" not in card.text


def test_card_says_when_no_stock_architecture_exists():
    reason = "transformers has no ViT depth model with a linear head and a sigmoid depth range"
    card = render_model_card(_inputs("depth", stock=StockFormats(unavailable=reason)))
    assert f"No stock transformers architecture expresses this model exactly ({reason})" in card.text
    assert len(_python_blocks(card.text)) == 1


def test_timm_snippet_names_the_published_file():
    stock = StockFormats(
        transformers_class="Dinov2Model",
        subfolder="stock",
        timm_file="timm_model.safetensors",
        timm_kwargs={"img_size": 224, "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6},
    )
    card = render_model_card(dataclasses.replace(_inputs("encoder"), stock=stock))
    timm_block = _python_blocks(card.text)[-1]
    compile(timm_block, "<card>", "exec")
    assert (
        "VisionTransformer(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6)" in timm_block
    )
    assert (
        'hf_hub_download("my-org/densecl-vit-s-ade", "timm_model.safetensors", revision="v1.0")' in timm_block
    )


@pytest.mark.parametrize(
    "loss, stop_gradient, phrases",
    [
        ("local-global", False, ["`pretraining_loss: local-global`", "local-to-global contrastive loss"]),
        (
            "0.25*local-global+local-local",
            True,
            [
                "0.25 × the local-to-global",
                "stop-gradient on the [CLS] side",
                "plus the dense local-to-local",
            ],
        ),
    ],
)
def test_card_says_which_loss_pre_trained_the_encoder(loss, stop_gradient, phrases):
    config = DenseCLViTConfig.from_preset(
        "vit-small", pretraining_loss=loss, cls_stop_gradient=stop_gradient
    ).to_dict()
    text = render_model_card(_inputs("encoder", config=config)).text
    for phrase in phrases:
        assert phrase in text
    assert ("local-local" in text) == ("local-local" in loss)
