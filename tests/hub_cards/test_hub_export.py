"""Release folders: contents, loading in a fresh process (remote code and stock classes), timm weights, push."""

import importlib.util
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import run_isolated, tiny_config
from huggingface_hub import ModelCard
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from densecl_vit.hub_cards import stock
from densecl_vit.hub_cards.export import ReleaseOptions, build_release, list_files, push_folder
from densecl_vit.modeling import (
    DenseCLViTForDepthEstimation,
    DenseCLViTForPreTraining,
    DenseCLViTForSemanticSegmentation,
    DenseCLViTImageProcessor,
    DenseCLViTModel,
)

ROOT = Path(__file__).resolve().parents[2]
SIZE = {"height": 32, "width": 48}
LABELS = {0: "sky", 1: "road", 2: "person", 3: "tree"}
SEG_CONFIG = dict(
    num_hidden_layers=4,  # out_indices 1, 2, 3, 4: distinct, as BEiT's backbone requires
    decode_head="upernet",
    decoder_hidden_size=16,
    auxiliary_hidden_size=8,
    id2label=LABELS,
    label2id={v: k for k, v in LABELS.items()},
)
DPT_CONFIG = dict(
    num_hidden_layers=4,  # out_indices 1, 2, 3, 4: distinct, as Dinov2Backbone requires
    depth_head="dpt",
    dpt_fusion_hidden_size=16,
    dpt_head_hidden_size=8,
)
TOKEN = "hf_DoNotLeakThisTokenAnywhere0123456789"


def _cli():
    spec = importlib.util.spec_from_file_location("export_to_hub", ROOT / "scripts" / "export_to_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _trained(model, batches):
    """A couple of AdamW steps (BatchNorm statistics move too), then eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for kwargs in batches:
        model(**kwargs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _save(model, folder):
    model.save_pretrained(folder)
    DenseCLViTImageProcessor(size=SIZE, size_divisor=8).save_pretrained(folder)
    return folder


def _photo(name, path):
    skimage_data = pytest.importorskip("skimage.data")
    Image.fromarray(getattr(skimage_data, name)()).save(path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders (pre-training, UPerNet segmentation with its artefacts, linear and DPT depth) and their releases:
    the default format (the stock form at the root wherever one is exact) and the remote-code format."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hub")
    images = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    pretrain = _trained(
        DenseCLViTForPreTraining(tiny_config(projection_hidden_size=16, projection_dim=8)),
        [{"pixel_values": x, "pixel_values_2": x.flip(-1)} for x in images],
    )
    seg = _trained(
        DenseCLViTForSemanticSegmentation(tiny_config(**SEG_CONFIG)),
        [{"pixel_values": x, "labels": torch.randint(0, 4, (2, 32, 32))} for x in images],
    )
    depth_batches = [{"pixel_values": x, "labels": torch.rand(2, 32, 32) * 4 + 0.5} for x in images]
    depth = _trained(DenseCLViTForDepthEstimation(tiny_config(depth_head_hidden_size=16)), depth_batches)
    dpt = _trained(DenseCLViTForDepthEstimation(tiny_config(**DPT_CONFIG)), depth_batches)
    for name, model in (("pretrain", pretrain), ("seg", seg), ("depth", depth), ("dpt", dpt)):
        _save(model, root / f"{name}-run" / "model")
    seg_run = root / "seg-run"
    (seg_run / "config.yaml").write_text(
        yaml.safe_dump(
            {"pretrained_model": "my-org/densecl-vit-tiny", "dataset": "scene_parse_150", "lr": 1e-4}
        )
    )
    report = {
        "task": "semantic-segmentation",
        "dataset": {"name": "ADE20K", "id": "scene_parse_150", "split": "validation"},
        "metrics": {"mean_iou": 0.25, "overall_accuracy": 0.5},
        "protocol": {"mode": "slide", "crop_size": 32, "stride": 16},
        "num_samples": 4,
    }
    (seg_run / "eval_results.json").write_text(json.dumps(report))
    Image.new("RGB", (8, 8), "red").save(seg_run / "example_prediction.png")
    out = root / "releases"
    code = ReleaseOptions(fmt="remote-code")
    releases = {
        "enc": build_release(root / "pretrain-run/model", out / "enc", ReleaseOptions(repo_id="my-org/enc")),
        "enc-code": build_release(root / "pretrain-run/model", out / "enc-code", code),
        "seg": build_release(root / "seg-run/model", out / "seg", ReleaseOptions(repo_id="my-org/seg")),
        "seg-code": build_release(root / "seg-run/model", out / "seg-code", code),
        "depth": build_release(root / "depth-run/model", out / "depth", ReleaseOptions()),
        "dpt": build_release(root / "dpt-run/model", out / "dpt", ReleaseOptions()),
    }
    return SimpleNamespace(
        root=root,
        out=out,
        files=releases,
        encoder=pretrain.densecl_vit,
        seg=seg,
        depth=depth,
        dpt=dpt,
        processor=DenseCLViTImageProcessor(size=SIZE, size_divisor=8),
        astronaut=_photo("astronaut", root / "astronaut.png"),
        coffee=_photo("coffee", root / "coffee.png"),
    )


FRESH = """
import numpy as np, torch
from PIL import Image
from transformers import (
    AutoImageProcessor, AutoModel, AutoModelForDepthEstimation, AutoModelForSemanticSegmentation, pipeline
)

root = {root!r}
out = {{}}
photo, coffee = root + "/astronaut.png", root + "/coffee.png"
pixel_values = torch.load(root + "/pixel_values.pt")

def segments(pipe):
    return [(s["label"], torch.from_numpy(np.array(s["mask"]))) for s in pipe(photo)]

# Remote code: the remote-code format, and the linear depth head (no stock form: released as remote code)
enc = pipeline("image-feature-extraction", model=root + "/releases/enc-code", trust_remote_code=True)
out["enc_module"] = type(enc.model).__module__
out["enc"] = torch.tensor(enc(photo))
seg = pipeline("image-segmentation", model=root + "/releases/seg-code", trust_remote_code=True)
out["seg_segments"] = segments(seg)
with torch.no_grad():
    out["seg_logits"] = seg.model(pixel_values).logits
depth = pipeline("depth-estimation", model=root + "/releases/depth", trust_remote_code=True)
out["depth"] = depth(coffee)["predicted_depth"]
# A task release's auto_map also gives its fine-tuned encoder to AutoModel.
for name in ("seg-code", "depth"):
    try:
        encoder = AutoModel.from_pretrained(root + "/releases/" + name, trust_remote_code=True).eval()
    except ValueError as error:  # kept for the test of this load to show, instead of failing every test here
        out[name, "encoder"] = (str(error), None)
        continue
    with torch.no_grad():
        out[name, "encoder"] = (type(encoder).__name__, encoder(pixel_values).last_hidden_state)

# Stock classes, without trust_remote_code: plain Auto classes on both photographs at the saved (non-square) size
# and a square one, then pipeline(...) with the PIL processor and with the default one (what the widget runs).
STOCK = [
    ("enc", "/releases/enc", AutoModel, "image-feature-extraction"),
    ("enc_sub", "/releases/enc-code/stock", AutoModel, "image-feature-extraction"),
    ("seg", "/releases/seg", AutoModelForSemanticSegmentation, "image-segmentation"),
    ("dpt", "/releases/dpt", AutoModelForDepthEstimation, "depth-estimation"),
]
for name, path, auto_class, task in STOCK:
    model = auto_class.from_pretrained(root + path).eval()
    processor = AutoImageProcessor.from_pretrained(root + path, backend="pil")
    out[name + "_class"] = type(model).__name__
    for image in (photo, coffee):
        for size in (None, {{"height": 32, "width": 32}}):
            inputs = processor(Image.open(image).convert("RGB"), return_tensors="pt", **({{"size": size}} if size else {{}}))
            with torch.no_grad():
                out[name, image, str(size)] = model(**inputs)[0]
    pipes = {{"pil": pipeline(task, model=root + path, image_processor=processor), "default": pipeline(task, model=root + path)}}
    for backend, pipe in pipes.items():
        if task == "image-segmentation":
            out[name, backend] = segments(pipe)
        elif task == "depth-estimation":
            out[name, backend] = pipe(coffee)["predicted_depth"]
        else:
            out[name, backend] = torch.tensor(pipe(photo))
        out[name, backend, "model"] = type(pipe.model).__name__
torch.save(out, root + "/fresh.pt")
"""


@pytest.fixture(scope="module")
def fresh(runs):
    """Everything loaded from the release folders in one process that cannot import densecl_vit (offline)."""
    torch.save(torch.randn(1, 3, 40, 48), runs.root / "pixel_values.pt")
    result = run_isolated(FRESH.format(root=str(runs.root)), cwd=runs.root, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(runs.root / "fresh.pt")


def _features(model, processor, path):
    with torch.no_grad():
        return model(**processor(Image.open(path).convert("RGB"), return_tensors="pt"))


def _label_map(segments, label2id, shape):
    labels = torch.full(shape, -1)
    for label, mask in segments:
        labels[mask == 255] = label2id[label]
    return labels


def test_remote_code_encoder_runs_as_pipeline_in_fresh_process(runs, fresh):
    assert fresh["enc_module"].startswith("transformers_modules")
    expected = _features(runs.encoder, runs.processor, runs.astronaut).last_hidden_state
    assert fresh["enc"].shape == expected.shape == (1, 1 + 4 * 6, 32)
    torch.testing.assert_close(fresh["enc"], expected, atol=1e-5, rtol=0)


def test_remote_code_segmenter_runs_as_pipeline_in_fresh_process(runs, fresh):
    with torch.no_grad():
        torch.testing.assert_close(
            fresh["seg_logits"], runs.seg(torch.load(runs.root / "pixel_values.pt")).logits
        )
    outputs = _features(runs.seg, runs.processor, runs.astronaut)
    expected = runs.processor.post_process_semantic_segmentation(outputs, target_sizes=[(512, 512)])[0]
    assert torch.equal(_label_map(fresh["seg_segments"], runs.seg.config.label2id, (512, 512)), expected)


def test_remote_code_depth_runs_as_pipeline_in_fresh_process(runs, fresh):
    outputs = _features(runs.depth, runs.processor, runs.coffee)
    expected = runs.processor.post_process_depth_estimation(outputs, target_sizes=[(400, 600)])[0]
    torch.testing.assert_close(fresh["depth"], expected["predicted_depth"], atol=1e-5, rtol=0)


STOCK_RELEASES = {
    "enc": ("Dinov2Model", "encoder", "last_hidden_state"),
    "enc_sub": ("Dinov2Model", "encoder", "last_hidden_state"),
    "seg": ("UperNetForSemanticSegmentation", "seg", "logits"),
    "dpt": ("DepthAnythingForDepthEstimation", "dpt", "predicted_depth"),
}


@pytest.mark.parametrize("name", sorted(STOCK_RELEASES))
def test_stock_release_loads_without_remote_code_and_equals_the_custom_model(runs, fresh, name):
    """Plain Auto classes, no densecl_vit, no trust_remote_code; real photographs at a non-square and a square
    size."""
    stock_class, attribute, output = STOCK_RELEASES[name]
    assert fresh[f"{name}_class"] == stock_class
    model = getattr(runs, attribute)
    for photo in (runs.astronaut, runs.coffee):
        for size in (None, {"height": 32, "width": 32}):
            processor = DenseCLViTImageProcessor(size=size or SIZE, size_divisor=8)
            expected = getattr(_features(model, processor, photo), output)
            torch.testing.assert_close(fresh[name, str(photo), str(size)], expected, atol=1e-4, rtol=0)


def test_stock_releases_run_in_pipelines(runs, fresh):
    """pipeline(task, model=folder) as the widget runs it, and with the PIL processor equal to the custom model."""
    encoder = _features(runs.encoder, runs.processor, runs.astronaut).last_hidden_state
    for name in ("enc", "enc_sub"):
        torch.testing.assert_close(fresh[name, "pil"], encoder, atol=1e-4, rtol=0)
        assert fresh[name, "default"].shape == encoder.shape
    label2id = runs.seg.config.label2id
    outputs = _features(runs.seg, runs.processor, runs.astronaut)
    expected = runs.processor.post_process_semantic_segmentation(outputs, target_sizes=[(512, 512)])[0]
    assert torch.equal(_label_map(fresh["seg", "pil"], label2id, (512, 512)), expected)
    assert _label_map(fresh["seg", "default"], label2id, (512, 512)).min() >= 0
    # DPT's post-processing (the stock processor's) resizes bicubically, ours bilinearly: compare like with like.
    depth = _features(runs.dpt, runs.processor, runs.coffee).predicted_depth
    expected = torch.nn.functional.interpolate(depth[None], size=(400, 600), mode="bicubic")[0, 0]
    torch.testing.assert_close(fresh["dpt", "pil"], expected, atol=1e-4, rtol=0)
    assert fresh["dpt", "default"].shape == (400, 600)
    for name, (stock_class, _, _) in STOCK_RELEASES.items():
        assert fresh[name, "pil", "model"] == fresh[name, "default", "model"] == stock_class


@pytest.mark.parametrize("size", [(32, 32), (40, 48), (16, 64)])
def test_dinov2_conversion_is_exact_at_any_size(runs, size):
    dinov2 = stock.to_dinov2(runs.encoder)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours, theirs = runs.encoder(x), dinov2(x)
    torch.testing.assert_close(theirs.last_hidden_state, ours.last_hidden_state, atol=1e-6, rtol=0)
    torch.testing.assert_close(theirs.pooler_output, ours.pooler_output, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [(32, 32), (40, 48), (24, 56)])
def test_depth_anything_conversion_is_exact_at_any_size(runs, size):
    depth_anything = stock.to_depth_anything(runs.dpt)
    assert depth_anything.config.depth_estimation_type == "metric" and depth_anything.config.max_depth == 10
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours, theirs = runs.dpt(x).predicted_depth, depth_anything(x).predicted_depth
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_upernet_conversion_matches_logits(qkv_bias):
    torch.manual_seed(0)
    model = DenseCLViTForSemanticSegmentation(tiny_config(qkv_bias=qkv_bias, **SEG_CONFIG))
    for module in model.modules():  # non-trivial BatchNorm statistics and biases
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias, std=0.1)
    model.eval()
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        torch.testing.assert_close(stock.to_upernet(model)(x).logits, model(x).logits, atol=1e-5, rtol=0)


def test_timm_weights_load_strictly_and_match(runs):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    kwargs = stock.timm_kwargs(runs.encoder)
    model = timm_vit.VisionTransformer(**kwargs).eval()
    model.load_state_dict(load_file(runs.out / "enc" / "timm_model.safetensors"), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(x), runs.encoder(x).last_hidden_state, atol=1e-5, rtol=0
        )


def _config(folder):
    return json.loads((folder / "config.json").read_text())


def test_task_release_loads_its_encoder_with_auto_model(runs, fresh):
    pixel_values = torch.load(runs.root / "pixel_values.pt")
    for name, model in (("seg-code", runs.seg), ("depth", runs.depth)):
        class_name, tokens = fresh[name, "encoder"]
        assert class_name == "DenseCLViTModel"
        with torch.no_grad():
            torch.testing.assert_close(tokens, model.densecl_vit(pixel_values).last_hidden_state)


@pytest.mark.parametrize("name", ["enc", "seg", "dpt"])
@pytest.mark.parametrize("backend", ["pil", None])
def test_stock_processors_take_grayscale_and_rgba_photographs(runs, name, backend):
    from transformers import AutoImageProcessor

    kwargs = {"backend": backend} if backend else {}
    processor = AutoImageProcessor.from_pretrained(runs.out / name, **kwargs)
    photo = Image.open(runs.astronaut)
    for mode in ("L", "RGBA"):
        image = photo.convert(mode)
        got = processor(image, return_tensors="pt")["pixel_values"]
        expected = processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
        assert got.shape == (1, 3, *SIZE.values())
        torch.testing.assert_close(got, expected)


def test_remote_code_folders_name_their_task_class_and_the_encoder(runs):
    expected = {
        "enc-code": ("AutoModel", "DenseCLViTModel"),
        "seg-code": ("AutoModelForSemanticSegmentation", "DenseCLViTForSemanticSegmentation"),
        "depth": ("AutoModelForDepthEstimation", "DenseCLViTForDepthEstimation"),
    }
    code = {"configuration_densecl_vit.py", "modeling_densecl_vit.py", "losses_densecl_vit.py"}
    code.add("image_processing_densecl_vit.py")
    for name, (auto_class, model_class) in expected.items():
        folder = runs.out / name
        assert _config(folder)["auto_map"] == {
            "AutoConfig": "configuration_densecl_vit.DenseCLViTConfig",
            "AutoModel": "modeling_densecl_vit.DenseCLViTModel",
            auto_class: f"modeling_densecl_vit.{model_class}",
        }
        processor = json.loads((folder / "preprocessor_config.json").read_text())
        assert processor["auto_map"] == {
            "AutoImageProcessor": "image_processing_densecl_vit.DenseCLViTImageProcessor"
        }
        assert {p.name for p in folder.glob("*.py")} == code
        with safe_open(folder / "model.safetensors", "pt") as weights:
            tensors = [weights.get_tensor(k) for k in weights.keys()]
        assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.float32}
        assert (folder / "README.md").is_file()


def test_release_carries_the_run_artefacts(runs):
    files = {p.as_posix() for p in runs.files["seg"]}
    assert {"config.yaml", "eval_results.json", "example_prediction.png", "config.json"} <= files
    assert {"config.yaml", "eval_results.json", "stock/config.json"} <= set(map(str, runs.files["seg-code"]))
    # The depth run wrote neither a config nor an example of its own: its release holds only the photograph's one.
    depth = set(map(str, runs.files["depth"]))
    assert "example_depth.png" in depth
    assert not any(name.endswith(".yaml") or name == "example_prediction.png" for name in depth)


def test_pretraining_folder_releases_its_encoder(runs):
    weights = load_file(runs.out / "enc-code" / "model.safetensors")
    expected = runs.encoder.state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    "name, model_type", [("enc", "dinov2"), ("seg", "upernet"), ("dpt", "depth_anything")]
)
def test_default_release_of_an_exact_model_is_stock_at_the_root(runs, name, model_type):
    folder = runs.out / name
    assert not list(folder.rglob("*.py")) and not (folder / "stock").exists()
    assert "auto_map" not in _config(folder) and _config(folder)["model_type"] == model_type
    assert "auto_map" not in json.loads((folder / "preprocessor_config.json").read_text())
    assert {"README.md", "preprocessor_config.json", "model.safetensors"} <= {
        p.name for p in folder.iterdir()
    }
    assert ("timm_model.safetensors" in {p.name for p in folder.iterdir()}) == (name == "enc")


def test_release_without_stock_form_is_remote_code_and_says_why(runs):
    folder = runs.out / "depth"
    assert _config(folder)["auto_map"]["AutoModelForDepthEstimation"].endswith("DenseCLViTForDepthEstimation")
    assert "No stock transformers architecture" in (folder / "README.md").read_text()
    assert not (folder / "stock").exists()


@pytest.mark.parametrize(
    "model, reason",
    [
        (DenseCLViTModel(tiny_config(mlp_ratio=2.5)), "Dinov2Model needs an integer MLP ratio"),
        (
            DenseCLViTForSemanticSegmentation(tiny_config(num_labels=3, decode_head="upernet")),
            "BeitBackbone needs strictly increasing out_indices",
        ),
        (
            DenseCLViTForDepthEstimation(tiny_config(**DPT_CONFIG, max_depth=7.5)),
            "DepthAnythingConfig needs a whole-number max_depth",
        ),
    ],
    ids=["mlp-ratio", "out-indices", "max-depth"],
)
def test_conditional_stock_form_falls_back_to_remote_code_with_its_reason(tmp_path, model, reason):
    out = tmp_path / "out"
    build_release(_save(model, tmp_path / "model"), out, ReleaseOptions(example_image=None))
    assert "auto_map" in _config(out)
    lines = [line for line in (out / "README.md").read_text().splitlines() if reason in line]
    assert len(lines) == 1 and "trust_remote_code=True" in lines[0]
    with pytest.raises(ValueError, match=reason):
        build_release(tmp_path / "model", tmp_path / "stock", ReleaseOptions(fmt="stock"))


def test_processor_without_a_fixed_size_falls_back_to_remote_code(tmp_path):
    folder = tmp_path / "model"
    DenseCLViTModel(tiny_config()).save_pretrained(folder)
    DenseCLViTImageProcessor(size={"shortest_edge": 32}, size_divisor=8).save_pretrained(folder)
    build_release(folder, tmp_path / "out", ReleaseOptions())
    assert "auto_map" in _config(tmp_path / "out") and not (tmp_path / "out" / "stock").exists()
    assert "stock image processors need a fixed size" in (tmp_path / "out" / "README.md").read_text()


ROOT_TASKS = {"enc": "image-feature-extraction", "seg": "image-segmentation", "depth": "depth-estimation"}


@pytest.mark.parametrize("name", ["enc", "enc-code", "seg", "seg-code", "depth", "dpt"])
def test_every_card_parses_and_its_metadata_follows_the_format_at_the_root(runs, name):
    folder = runs.out / name
    remote = "auto_map" in _config(folder)
    assert remote == (name.endswith("-code") or name == "depth")
    card = ModelCard.load(folder / "README.md")
    task = ROOT_TASKS[name.split("-")[0]] if name != "dpt" else "depth-estimation"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == task
    assert ("custom_code" in card.data.tags) == remote
    # The widget runs only stock architectures from the root: a remote-code release offers none.
    widget = getattr(card.data, "widget", None)
    assert (widget is None) == remote
    assert remote or widget[0]["src"].startswith("http")
    usage = re.findall(r"```python\n(.*?)```", card.text, flags=re.DOTALL)[0]
    assert ("trust_remote_code=True" in usage) == remote
    assert f'pipeline("{task}", model=repo' in usage


def test_stock_format_refused_without_exact_equivalent(runs, tmp_path):
    linear = _save(DenseCLViTForSemanticSegmentation(tiny_config(num_labels=3)), tmp_path / "linear")
    for model_dir in (linear, runs.root / "depth-run" / "model"):
        with pytest.raises(ValueError, match="no stock transformers model"):
            build_release(model_dir, tmp_path / "out", ReleaseOptions(fmt="stock"))
        assert not (tmp_path / "out").exists()


def test_weights_are_sharded_past_the_size_limit(runs, tmp_path):
    files = build_release(
        runs.root / "depth-run/model", tmp_path / "rel", ReleaseOptions(max_shard_size="20KB")
    )
    shards = [f for f in files if f.name.startswith("model-") and f.suffix == ".safetensors"]
    assert len(shards) > 1 and Path("model.safetensors.index.json") in files
    reloaded = DenseCLViTForDepthEstimation.from_pretrained(tmp_path / "rel").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x).predicted_depth, runs.depth(x).predicted_depth)


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records the calls the push makes."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs.get("repo_id"), kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, {"operations": list(operations), **kwargs}))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123abc")


class NoNetwork:
    def __getattr__(self, name):
        raise AssertionError(f"a dry run called HfApi.{name}")


def test_dry_run_lists_exactly_the_folder_files(runs, tmp_path, capsys):
    args = ["--model", str(runs.root / "seg-run/model"), "--output", str(tmp_path / "rel"), "--push"]
    args += ["--repo-id", "my-org/seg", "--revision", "v1.0", "--dry-run"]
    assert _cli()(args, api=NoNetwork()) == 0
    printed = capsys.readouterr().out
    listed = {
        line.split()[1]: int(line.split("(")[1].split()[0])
        for line in printed.splitlines()
        if "  add " in line
    }
    folder = tmp_path / "rel"
    assert listed == {p.as_posix(): (folder / p).stat().st_size for p in list_files(folder)}
    assert "my-org/seg" in printed and "revision v1.0" in printed
    assert 'repo, revision = "my-org/seg", "v1.0"' in (folder / "README.md").read_text()


def test_push_makes_one_commit_with_every_file_and_never_shows_the_token(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    api = FakeHfApi()
    args = ["--model", str(runs.root / "seg-run/model"), "--output", str(tmp_path / "rel"), "--push"]
    args += ["--repo-id", "my-org/seg", "--revision", "v1.0", "--private"]
    assert _cli()(args, api=api) == 0
    names = [call[0] for call in api.calls]
    assert names == ["create_repo", "create_branch", "create_commit"]
    assert api.calls[0][2]["exist_ok"] and api.calls[0][2]["private"]
    assert api.calls[1][2]["branch"] == "v1.0" and api.calls[1][2]["exist_ok"]
    commit = api.calls[2][2]
    folder = tmp_path / "rel"
    assert commit["revision"] == "v1.0"
    operations = {op.path_in_repo: Path(op.path_or_fileobj) for op in commit["operations"]}
    assert set(operations) == {p.as_posix() for p in list_files(folder)}
    assert all(path.read_bytes() == (folder / name).read_bytes() for name, path in operations.items())
    output = capsys.readouterr()
    assert TOKEN not in output.out + output.err + repr(api.calls)
    assert not any(TOKEN.encode() in (folder / p).read_bytes() for p in list_files(folder))


def test_push_to_main_creates_no_branch(runs):
    api = FakeHfApi()
    files = push_folder(runs.out / "depth", "my-org/depth", api=api, echo=lambda line: None)
    assert [call[0] for call in api.calls] == ["create_repo", "create_commit"]
    assert len(api.calls[1][2]["operations"]) == len(files) == len(list_files(runs.out / "depth"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--push"], "--push needs --repo-id"),
        (["--format", "stock"], "no stock transformers model"),
        (["--max-shard-size", "lots"], "not a size"),
        (["--push", "--repo-id", "no-org", "--dry-run"], "ORG/NAME"),
    ],
)
def test_cli_errors_are_one_line(runs, tmp_path, capsys, extra, message):
    args = ["--model", str(runs.root / "depth-run/model"), "--output", str(tmp_path / "rel"), *extra]
    assert _cli()(args, api=NoNetwork()) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1


def test_existing_output_is_never_overwritten_silently(runs, tmp_path):
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="--overwrite"):
        build_release(runs.root / "depth-run/model", tmp_path / "rel", ReleaseOptions())
    build_release(runs.root / "depth-run/model", tmp_path / "rel", ReleaseOptions(overwrite=True))
    assert not (tmp_path / "rel" / "notes.txt").exists()
    with pytest.raises(ValueError, match="would contain the model folder"):
        build_release(runs.root / "depth-run/model", runs.root / "depth-run", ReleaseOptions(overwrite=True))


def test_folder_with_incomplete_weights_is_refused(tmp_path):
    folder = _save(DenseCLViTForDepthEstimation(tiny_config()), tmp_path / "model")
    weights = load_file(folder / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("regressor.")}, folder / "model.safetensors"
    )
    with pytest.raises(ValueError, match="does not hold complete DenseCLViTForDepthEstimation weights"):
        build_release(folder, tmp_path / "rel", ReleaseOptions())
