"""The example prediction of a release: rendered on a photograph as scripts/predict.py renders it, shown in the card."""

import fnmatch
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from helpers import load_script, tiny_config

from densecl_vit.hub_cards.export import EXAMPLE_PHOTO, ReleaseOptions, build_release
from densecl_vit.modeling import (
    DenseCLViTForDepthEstimation,
    DenseCLViTForPreTraining,
    DenseCLViTForSemanticSegmentation,
    DenseCLViTImageProcessor,
)
from densecl_vit.training.evaluation.visualize import display_scale

ROOT = Path(__file__).resolve().parents[2]
LABELS = {0: "sky", 1: "wall", 2: "person", 3: "floor"}
EXAMPLES = {"seg": "example_overlay.png", "depth": "example_depth.png"}


def save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    DenseCLViTImageProcessor(size={"height": 32, "width": 32}, size_divisor=8).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny segmentation, depth and pre-training folders (random weights: the pictures only need to vary)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    labels = dict(id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    return {
        "seg": save(DenseCLViTForSemanticSegmentation(tiny_config(**labels)), root / "seg"),
        "depth": save(DenseCLViTForDepthEstimation(tiny_config(depth_head_hidden_size=16)), root / "depth"),
        "enc": save(
            DenseCLViTForPreTraining(tiny_config(projection_hidden_size=16, projection_dim=8)), root / "enc"
        ),
    }


def export(model_dir: Path, output: Path, *extra: str) -> int:
    return load_script("export_to_hub").main(["--model", str(model_dir), "--output", str(output), *extra])


def read_png(path: Path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path))


@pytest.mark.parametrize("kind", ["seg", "depth"])
def test_release_shows_predict_py_picture_of_the_bundled_photo(models, tmp_path, kind):
    assert export(models[kind], tmp_path / "release") == 0
    name = EXAMPLES[kind]
    picture = read_png(tmp_path / "release" / name)
    # The bundled photo is 256 x 256: shown at its size, a legend or colour bar to its right.
    assert picture.shape[0] == 256 and picture.shape[1] > 256 + 20 and picture.shape[2] == 3
    assert picture[:, :256].reshape(-1, 3).var(axis=0).min() > 0
    card = (tmp_path / "release" / "README.md").read_text()
    assert f"## Example prediction\n\n![Example prediction]({name})\n" in card
    assert "Eileen Collins, NASA, public domain" in card
    # scripts/predict.py on the same photograph draws the same pixels.
    predict = load_script("predict").main
    assert predict([str(EXAMPLE_PHOTO), "--model", str(models[kind]), "--output-dir", str(tmp_path)]) == 0
    suffix = name.removeprefix("example")
    np.testing.assert_array_equal(picture, read_png(tmp_path / f"example_photo{suffix}"))


def test_example_image_option_uses_the_given_photo(models, tmp_path):
    photo = tmp_path / "street.png"
    PIL.Image.open(EXAMPLE_PHOTO).crop((0, 40, 96, 104)).save(photo)  # 96 x 64
    assert export(models["depth"], tmp_path / "release", "--example-image", str(photo)) == 0
    picture = read_png(tmp_path / "release" / "example_depth.png")
    scale = display_scale(64)
    assert scale == 4 and picture.shape[0] == 64 * scale and picture.shape[1] > 96 * scale
    assert picture[:, : 96 * scale].reshape(-1, 3).var(axis=0).min() > 0
    card = (tmp_path / "release" / "README.md").read_text()
    assert "![Example prediction](example_depth.png)" in card and "`street.png`" in card
    assert "NASA" not in card


@pytest.mark.parametrize("kind", ["seg", "depth"])
def test_no_example_writes_no_picture(models, tmp_path, kind):
    assert export(models[kind], tmp_path / "release", "--no-example") == 0
    assert not list((tmp_path / "release").glob("*.png"))
    assert "Example prediction" not in (tmp_path / "release" / "README.md").read_text()


def test_encoder_release_has_no_example(models, tmp_path):
    assert export(models["enc"], tmp_path / "release") == 0
    assert not list((tmp_path / "release").glob("*.png"))
    assert "Example prediction" not in (tmp_path / "release" / "README.md").read_text()


def test_the_photo_replaces_the_card_example_of_the_run_but_both_are_published(models, tmp_path):
    run = tmp_path / "run"
    model_dir = save(DenseCLViTForSemanticSegmentation.from_pretrained(models["seg"]), run / "final")
    PIL.Image.new("RGB", (8, 8), "red").save(run / "example.png")
    build_release(model_dir, tmp_path / "release", ReleaseOptions())
    assert {p.name for p in (tmp_path / "release").glob("*.png")} == {"example.png", "example_overlay.png"}
    card = (tmp_path / "release" / "README.md").read_text()
    assert "![Example prediction](example_overlay.png)" in card and "(example.png)" not in card
    build_release(model_dir, tmp_path / "bare", ReleaseOptions(example_image=None))
    assert "![Example prediction](example.png)" in (tmp_path / "bare" / "README.md").read_text()


def test_unreadable_example_image_fails_before_writing(models, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a JPEG")
    assert export(models["seg"], tmp_path / "release", "--example-image", str(broken)) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "cannot read the example image" in error and "--no-example" in error
    assert not (tmp_path / "release").exists()
    with pytest.raises(SystemExit):
        export(models["seg"], tmp_path / "release", "--example-image", str(broken), "--no-example")


def test_export_needs_no_scikit_image(models, tmp_path, monkeypatch):
    """The photograph ships with the package: a user install without scikit-image still gets the example."""
    for name in [m for m in sys.modules if m == "skimage" or m.startswith("skimage.")] + ["skimage"]:
        monkeypatch.setitem(sys.modules, name, None)  # any import of scikit-image now fails
    build_release(models["seg"], tmp_path / "release", ReleaseOptions())
    assert (tmp_path / "release" / "example_overlay.png").is_file()


def test_bundled_photo_is_small_package_data_of_the_public_domain_astronaut():
    assert EXAMPLE_PHOTO.stat().st_size < 40_000
    with PIL.Image.open(EXAMPLE_PHOTO) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (256, 256))
        photo = np.asarray(image, dtype=np.float64)
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch.fnmatch(EXAMPLE_PHOTO.name, p) for p in patterns["densecl_vit.hub_cards"])
    skimage_data = pytest.importorskip("skimage.data")
    reference = np.asarray(
        PIL.Image.fromarray(skimage_data.astronaut()).resize((256, 256), PIL.Image.Resampling.LANCZOS),
        np.float64,
    )
    assert np.abs(photo - reference).mean() < 4.0  # the same picture, up to JPEG compression
