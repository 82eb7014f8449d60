"""Release folders: contents, loading in a fresh process (remote code and stock classes), timm weights, push."""

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import run_isolated, tiny_config
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
)

ROOT = Path(__file__).resolve().parent.parent
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
    """Three run folders (pre-training, UPerNet segmentation with its artefacts, depth) and their releases."""
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
    depth = _trained(
        DenseCLViTForDepthEstimation(tiny_config(depth_head_hidden_size=16)),
        [{"pixel_values": x, "labels": torch.rand(2, 32, 32) * 4 + 0.5} for x in images],
    )
    _save(pretrain, root / "pretrain-run" / "model")
    _save(seg, root / "seg-run" / "model")
    _save(depth, root / "depth-run" / "model")
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
    releases = {
        "enc": build_release(root / "pretrain-run/model", out / "enc", ReleaseOptions(repo_id="my-org/enc")),
        "enc-stock": build_release(
            root / "pretrain-run/model", out / "enc-stock", ReleaseOptions(fmt="stock")
        ),
        "seg": build_release(root / "seg-run/model", out / "seg", ReleaseOptions(repo_id="my-org/seg")),
        "depth": build_release(root / "depth-run/model", out / "depth", ReleaseOptions()),
    }
    return SimpleNamespace(
        root=root,
        out=out,
        files=releases,
        encoder=pretrain.densecl_vit,
        seg=seg,
        depth=depth,
        processor=DenseCLViTImageProcessor(size=SIZE, size_divisor=8),
        astronaut=_photo("astronaut", root / "astronaut.png"),
        coffee=_photo("coffee", root / "coffee.png"),
    )


FRESH = """
import numpy as np, torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation, pipeline

root = {root!r}
out = {{}}
photo, coffee = root + "/astronaut.png", root + "/coffee.png"
pixel_values = torch.load(root + "/pixel_values.pt")

def segments(pipe):
    return [(s["label"], torch.from_numpy(np.array(s["mask"]))) for s in pipe(photo)]

# Remote code
enc = pipeline("image-feature-extraction", model=root + "/releases/enc", trust_remote_code=True)
out["enc_module"] = type(enc.model).__module__
out["enc"] = torch.tensor(enc(photo))
seg = pipeline("image-segmentation", model=root + "/releases/seg", trust_remote_code=True)
out["seg_segments"] = segments(seg)
with torch.no_grad():
    out["seg_logits"] = seg.model(pixel_values).logits
depth = pipeline("depth-estimation", model=root + "/releases/depth", trust_remote_code=True)
out["depth"] = depth(coffee)["predicted_depth"]

# Stock classes, without trust_remote_code
for name, path, kwargs in [("enc_stock", "/releases/enc-stock", {{}}), ("enc_sub", "/releases/enc", {{"subfolder": "stock"}})]:
    model = AutoModel.from_pretrained(root + path, **kwargs).eval()
    processor = AutoImageProcessor.from_pretrained(root + path, backend="pil", **kwargs)
    out[name + "_class"] = type(model).__name__
    with torch.no_grad():
        out[name] = model(**processor(Image.open(photo).convert("RGB"), return_tensors="pt")).last_hidden_state
upernet = AutoModelForSemanticSegmentation.from_pretrained(root + "/releases/seg", subfolder="stock").eval()
processor = AutoImageProcessor.from_pretrained(root + "/releases/seg", subfolder="stock", backend="pil")
out["upernet_class"] = type(upernet).__name__
with torch.no_grad():
    out["upernet_logits"] = upernet(pixel_values).logits
out["upernet_segments"] = segments(pipeline("image-segmentation", model=upernet, image_processor=processor))
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


def test_stock_encoder_loads_without_remote_code_and_matches(runs, fresh):
    expected = _features(runs.encoder, runs.processor, runs.astronaut).last_hidden_state
    for name in ("enc_stock", "enc_sub"):
        assert fresh[f"{name}_class"] == "Dinov2Model"
        torch.testing.assert_close(fresh[name], expected, atol=1e-5, rtol=0)


def test_stock_upernet_loads_without_remote_code_and_matches(runs, fresh):
    assert fresh["upernet_class"] == "UperNetForSemanticSegmentation"
    with torch.no_grad():
        expected = runs.seg(torch.load(runs.root / "pixel_values.pt")).logits
    torch.testing.assert_close(fresh["upernet_logits"], expected, atol=1e-5, rtol=0)
    assert torch.equal(
        _label_map(fresh["upernet_segments"], runs.seg.config.label2id, (512, 512)),
        _label_map(fresh["seg_segments"], runs.seg.config.label2id, (512, 512)),
    )


@pytest.mark.parametrize("size", [(32, 32), (40, 48), (16, 64)])
def test_dinov2_conversion_is_exact_at_any_size(runs, size):
    dinov2 = stock.to_dinov2(runs.encoder)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours, theirs = runs.encoder(x), dinov2(x)
    torch.testing.assert_close(theirs.last_hidden_state, ours.last_hidden_state, atol=1e-6, rtol=0)
    torch.testing.assert_close(theirs.pooler_output, ours.pooler_output, atol=1e-6, rtol=0)


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


def test_remote_code_folders_name_only_their_task_class(runs):
    expected = {
        "enc": ("AutoModel", "DenseCLViTModel"),
        "seg": ("AutoModelForSemanticSegmentation", "DenseCLViTForSemanticSegmentation"),
        "depth": ("AutoModelForDepthEstimation", "DenseCLViTForDepthEstimation"),
    }
    code = {"configuration_densecl_vit.py", "modeling_densecl_vit.py", "losses_densecl_vit.py"}
    code.add("image_processing_densecl_vit.py")
    for name, (auto_class, model_class) in expected.items():
        folder = runs.out / name
        assert _config(folder)["auto_map"] == {
            "AutoConfig": "configuration_densecl_vit.DenseCLViTConfig",
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
    assert {"config.yaml", "eval_results.json", "example_prediction.png", "stock/config.json"} <= files
    # The depth run wrote neither a config nor an example of its own: its release holds only the photograph's one.
    depth = set(map(str, runs.files["depth"]))
    assert "example_depth.png" in depth
    assert not any(name.endswith(".yaml") or name == "example_prediction.png" for name in depth)


def test_pretraining_folder_releases_its_encoder(runs):
    weights = load_file(runs.out / "enc" / "model.safetensors")
    expected = runs.encoder.state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_stock_format_folder_has_no_custom_code(runs):
    folder = runs.out / "enc-stock"
    assert not list(folder.glob("*.py"))
    assert "auto_map" not in _config(folder) and _config(folder)["model_type"] == "dinov2"
    assert {p.name for p in folder.iterdir()} >= {
        "timm_model.safetensors",
        "README.md",
        "preprocessor_config.json",
    }
    assert "custom_code" not in (folder / "README.md").read_text().split("---")[1]
    assert "No stock transformers architecture" in (runs.out / "depth" / "README.md").read_text()
    assert not (runs.out / "depth" / "stock").exists()


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
