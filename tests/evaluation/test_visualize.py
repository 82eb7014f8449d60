"""Pictures: colours, prediction figures, the three scripts on real photographs, PCA maps and training curves."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import skimage.data
import torch
from helpers import load_script, tiny_config
from matplotlib import colormaps

from densecl_vit.modeling import (
    DenseCLViTForDepthEstimation,
    DenseCLViTForSemanticSegmentation,
    DenseCLViTImageProcessor,
    DenseCLViTModel,
)
from densecl_vit.training.engine import curves
from densecl_vit.training.evaluation import visualize
from densecl_vit.training.interop import inference

ROOT = Path(__file__).resolve().parents[2]
CLASS_NAMES = {0: "sky", 1: "wall", 2: "cat", 3: "cup", 4: "floor"}


def run_script(name: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "scripts" / f"{name}.py"), *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


def read_png(path: Path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Real photographs (a JPEG and two PNGs of different sizes), an unreadable file and a folder of images."""
    root = tmp_path_factory.mktemp("photos")
    paths = {
        "chelsea": root / "chelsea.jpg",
        "coffee": root / "coffee.png",
        "astronaut": root / "astronaut.png",
    }
    PIL.Image.fromarray(skimage.data.chelsea()).save(paths["chelsea"], quality=95)
    PIL.Image.fromarray(skimage.data.coffee()).save(paths["coffee"])
    PIL.Image.fromarray(skimage.data.astronaut()[::2, ::2]).save(paths["astronaut"])
    paths["broken"] = root / "broken.jpg"
    paths["broken"].write_bytes(b"\xff\xd8 these bytes are not a JPEG")
    paths["folder"] = root / "folder"
    paths["folder"].mkdir()
    PIL.Image.fromarray(skimage.data.coffee()[::2, ::2]).save(paths["folder"] / "small_coffee.png")
    (paths["folder"] / "notes.txt").write_text("not an image, and not picked up from a folder")
    return paths


def save_model(model, folder: Path, processor: DenseCLViTImageProcessor | None = None) -> Path:
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def seg_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = tiny_config(num_labels=5, id2label=CLASS_NAMES, label2id={v: k for k, v in CLASS_NAMES.items()})
    processor = DenseCLViTImageProcessor(size={"shortest_edge": 48}, size_divisor=8)
    return save_model(DenseCLViTForSemanticSegmentation(config), tmp_path_factory.mktemp("seg"), processor)


@pytest.fixture(scope="module")
def depth_dir(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    processor = DenseCLViTImageProcessor(size={"shortest_edge": 40}, size_divisor=8)
    return save_model(
        DenseCLViTForDepthEstimation(tiny_config()), tmp_path_factory.mktemp("depth"), processor
    )


def reference_prediction(folder: Path, image: PIL.Image.Image, model_class) -> np.ndarray:
    """The model run by hand on one image, its output resized bilinearly to the image: (H, K or 1, ...) -> (H, W)."""
    model = model_class.from_pretrained(folder).eval()
    processor = DenseCLViTImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        output = model(**processor(image, return_tensors="pt"))
    maps = output.logits if hasattr(output, "logits") else output.predicted_depth[:, None]
    resized = torch.nn.functional.interpolate(
        maps, size=(image.height, image.width), mode="bilinear", align_corners=False
    )
    return resized[0].argmax(0).numpy() if hasattr(output, "logits") else resized[0, 0].numpy()


# ---------------------------------------------------------------------------------------------------------------------
# Colours
# ---------------------------------------------------------------------------------------------------------------------


def test_palette_is_fixed_per_class_and_distinct():
    palette = visualize.class_palette(150)
    assert palette.shape == (150, 3) and palette.dtype == np.uint8
    assert len({tuple(c) for c in palette}) == 150
    np.testing.assert_array_equal(visualize.class_palette(7), palette[:7])
    tab20 = np.round(np.asarray(colormaps["tab20"].colors) * 255).astype(np.uint8)
    np.testing.assert_array_equal(palette[:10], tab20[0::2])


def test_overlay_matches_a_per_pixel_loop():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, (5, 7))
    palette = visualize.class_palette(4)
    expected = np.empty_like(image)
    for y in range(5):
        for x in range(7):
            for c in range(3):
                expected[y, x, c] = round(0.7 * int(image[y, x, c]) + 0.3 * int(palette[labels[y, x], c]))
    np.testing.assert_array_equal(visualize.overlay_segmentation(image, labels, palette, alpha=0.3), expected)
    with pytest.raises(ValueError, match="same height and width"):
        visualize.overlay_segmentation(image, labels[:4], palette)


def test_depth_colours_make_near_bright():
    depth = np.array([[1.0, 2.0], [3.0, 9.0]])
    rgb = visualize.colorize_depth(depth).astype(float)
    luminance = rgb @ [0.299, 0.587, 0.114]
    assert luminance[0, 0] > luminance[0, 1] > luminance[1, 0] > luminance[1, 1]
    # A fixed range maps depth linearly: 9 in [0, 18] and 5 in [1, 9] are both halfway.
    np.testing.assert_array_equal(
        visualize.colorize_depth(np.array([[9.0]]), vmin=0, vmax=18),
        visualize.colorize_depth(np.array([[5.0]]), 1, 9),
    )


def test_small_images_are_enlarged_by_an_integer_factor():
    image = np.zeros((32, 40, 3), np.uint8)
    labels = np.zeros((32, 40), int)
    labels[:, 20:] = 1
    figure = visualize.segmentation_figure(image, labels, {0: "a", 1: "b"})
    scale = visualize.display_scale(32)
    assert scale == 8 and figure.shape[0] == 256 and figure.shape[1] > 320
    expected = visualize.overlay_segmentation(image, labels).repeat(scale, 0).repeat(scale, 1)
    np.testing.assert_array_equal(figure[:, :320], expected)


# ---------------------------------------------------------------------------------------------------------------------
# scripts/predict.py
# ---------------------------------------------------------------------------------------------------------------------


def test_predict_segmentation_script(tmp_path, photos, seg_dir):
    inputs = [photos["chelsea"], photos["astronaut"], photos["broken"], photos["coffee"], photos["folder"]]
    result = run_script(
        "predict", "--model", seg_dir, *inputs, "--output-dir", tmp_path, "--batch-size", "2", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipping {photos['broken']}" in result.stderr
    assert "wrote 4 segmentation prediction(s)" in result.stdout
    palette = visualize.class_palette(len(CLASS_NAMES))
    for name in ("chelsea", "astronaut", "coffee", "small_coffee"):
        source = photos[name] if name in photos else photos["folder"] / f"{name}.png"
        image = PIL.Image.open(source).convert("RGB")
        labels = read_png(tmp_path / f"{name}_labels.png")
        assert labels.dtype == np.uint8 and labels.shape == (image.height, image.width)
        np.testing.assert_array_equal(
            labels, reference_prediction(seg_dir, image, DenseCLViTForSemanticSegmentation)
        )

        figure = read_png(tmp_path / f"{name}_overlay.png")[..., :3]
        scale = visualize.display_scale(image.height)
        assert figure.shape[0] == image.height * scale and figure.shape[1] > image.width * scale
        assert figure.reshape(-1, 3).var(axis=0).sum() > 0
        overlay = np.round(0.5 * np.asarray(image, float) + 0.5 * palette[labels]).astype(np.uint8)
        np.testing.assert_array_equal(
            figure[:, : image.width * scale], overlay.repeat(scale, 0).repeat(scale, 1)
        )
        # The legend shows a swatch in the colour of each class present, and none of the absent ones.
        legend_colours = {tuple(c) for c in figure[:, image.width * scale :].reshape(-1, 3)}
        for class_id in range(len(CLASS_NAMES)):
            assert (tuple(palette[class_id]) in legend_colours) == bool((labels == class_id).any())
    assert not (tmp_path / "notes_overlay.png").exists() and not (tmp_path / "broken_overlay.png").exists()


def test_predict_depth_script_in_process(tmp_path, photos, depth_dir, capsys):
    predict = load_script("predict")
    inputs = [photos["coffee"], photos["broken"], photos["chelsea"]]
    status = predict.main(
        ["--model", str(depth_dir), *map(str, inputs), "--output-dir", str(tmp_path), "--batch-size", "3"]
    )
    assert status == 0
    assert f"skipping {photos['broken']}" in capsys.readouterr().err
    for name in ("coffee", "chelsea"):
        image = PIL.Image.open(photos[name]).convert("RGB")
        depth = np.load(tmp_path / f"{name}_depth.npy")
        assert depth.dtype == np.float32 and depth.shape == (image.height, image.width)
        np.testing.assert_allclose(
            depth, reference_prediction(depth_dir, image, DenseCLViTForDepthEstimation), atol=1e-5
        )

        figure = read_png(tmp_path / f"{name}_depth.png")[..., :3]
        assert figure.shape[0] == image.height and figure.shape[1] > 2 * image.width
        normalised = (depth.astype(float) - depth.min()) / (depth.max() - depth.min())
        expected = np.round(colormaps["magma_r"](normalised)[..., :3] * 255).astype(np.uint8)
        # The photograph, a white gap, then its depth (then the colour bar).
        gap = visualize.depth_gap(image.height)
        np.testing.assert_array_equal(figure[:, : image.width], np.asarray(image))
        assert (figure[:, image.width : image.width + gap] == 255).all()
        np.testing.assert_array_equal(figure[:, image.width + gap : 2 * image.width + gap], expected)


def test_predict_depth_script_runs_a_dpt_model_and_its_stock_release(tmp_path, photos):
    """The DPT head in its own folder and released as transformers' DepthAnythingForDepthEstimation: the same
    depth, resized to the photograph bilinearly by our processor and bicubically by DPT's."""
    from densecl_vit.hub_cards.export import ReleaseOptions, build_release

    torch.manual_seed(2)
    config = tiny_config(
        num_hidden_layers=4, depth_head="dpt", dpt_fusion_hidden_size=16, dpt_head_hidden_size=8
    )
    processor = DenseCLViTImageProcessor(size={"height": 40, "width": 56}, size_divisor=8)
    folder = save_model(DenseCLViTForDepthEstimation(config), tmp_path / "dpt", processor)
    build_release(folder, tmp_path / "release", ReleaseOptions(example_image=None))
    image = PIL.Image.open(photos["coffee"]).convert("RGB")
    model = DenseCLViTForDepthEstimation.from_pretrained(folder).eval()
    with torch.no_grad():
        depth = model(**processor(image, return_tensors="pt")).predicted_depth[:, None]
    for name, mode in (("dpt", "bilinear"), ("release", "bicubic")):
        predict = load_script("predict")
        args = [
            "--model",
            str(tmp_path / name),
            str(photos["coffee"]),
            "--output-dir",
            str(tmp_path / f"{name}-out"),
        ]
        assert predict.main(args) == 0
        expected = torch.nn.functional.interpolate(depth, size=(image.height, image.width), mode=mode)[0, 0]
        np.testing.assert_allclose(
            np.load(tmp_path / f"{name}-out" / "coffee_depth.npy"), expected, atol=1e-4
        )


def test_label_maps_of_many_classes_are_saved_as_uint16(tmp_path):
    predict = load_script("predict")
    labels = np.arange(12, dtype=np.int64).reshape(3, 4) * 27  # up to 297
    image = PIL.Image.fromarray(np.full((3, 4, 3), 128, np.uint8))
    id2label = {i: f"class {i}" for i in range(300)}
    predict.save_prediction(tmp_path, "many", image, labels, "segmentation", id2label)
    saved = read_png(tmp_path / "many_labels.png")
    assert saved.dtype == np.uint16
    np.testing.assert_array_equal(saved, labels)


def test_predict_rejects_an_encoder_folder(tmp_path):
    folder = save_model(DenseCLViTModel(tiny_config()), tmp_path / "encoder")
    model, _ = inference.load_pretrained(folder)
    with pytest.raises(ValueError, match="neither a segmentation nor a depth model"):
        inference.model_task(model)


def test_render_example_prediction(tmp_path, seg_dir):
    output = visualize.render_example_prediction(
        seg_dir, skimage.data.coffee(), tmp_path / "card" / "example.png"
    )
    figure = read_png(output)
    assert figure.shape[0] == 400 and figure.shape[1] > 600 and figure.var() > 0


# ---------------------------------------------------------------------------------------------------------------------
# PCA maps and scripts/visualize_features.py
# ---------------------------------------------------------------------------------------------------------------------


def test_principal_components_match_numpy_svd():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 6)) @ np.diag([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    scores, axes = visualize.principal_components(features, 3)
    centered = features - features.mean(0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    signs = np.sign(vt[np.arange(3), np.abs(vt[:3]).argmax(1)])
    np.testing.assert_allclose(axes, vt[:3] * signs[:, None], atol=1e-8)
    np.testing.assert_allclose(scores, centered @ (vt[:3] * signs[:, None]).T, atol=1e-8)


def test_foreground_pca_masks_the_background():
    """Border patches share one feature cluster, the centre another: the border is background, coloured black."""
    rng = np.random.default_rng(0)
    border = visualize.patch_border((6, 6))
    features = rng.normal(size=(36, 8)) * 0.1
    features[border, 0] += 3.0
    score = visualize.background_score(-features, border)
    assert score[border].min() > score[~border].max()
    rgb = visualize.pca_rgb(features, foreground=score <= 0.5)
    assert (rgb[border] == 0).all() and rgb[~border].max() == 1.0 and rgb.min() == 0.0


def test_visualize_features_script(tmp_path, photos, seg_dir):
    encoder_dir = save_model(DenseCLViTModel(tiny_config()), tmp_path / "random-encoder")
    output = tmp_path / "figure" / "features.png"
    models = ["--model", encoder_dir, "--model", seg_dir]
    inputs = [photos["astronaut"], photos["broken"], photos["chelsea"]]
    result = run_script(
        "visualize_features",
        *models,
        *inputs,
        "--output",
        output,
        "--threshold",
        "0.5",
        "--attention",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipping {photos['broken']}" in result.stderr
    figure = read_png(output)
    # 2.6-inch cells at 100 dpi: columns = 2 inputs, rows = inputs + (PCA, attention) for each of 2 models.
    assert figure.shape[:2] == (260 * 5, 260 * 2)
    assert figure[..., :3].reshape(-1, 3).var(axis=0).sum() > 0


def synthetic_objects(rng: np.random.Generator, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """32x32 images: a striped object of 1-2 x 1-2 patches (8 px) on a plain noisy background, colours random.

    Returns normalised images (B, 3, 32, 32) and the object mask of the 4x4 patch grid (B, 16).
    """
    yy, xx = np.mgrid[0:32, 0:32]
    images = np.empty((count, 32, 32, 3), np.float32)
    masks = np.zeros((count, 4, 4), bool)
    for i in range(count):
        background, colour = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        images[i] = background + rng.normal(0, 0.03, (32, 32, 3))
        height, width = rng.integers(1, 3, 2)
        row, col = rng.integers(0, 5 - height), rng.integers(0, 5 - width)
        stripes = ((xx if rng.random() < 0.5 else yy) // 2) % 2
        box = np.s_[8 * row : 8 * (row + height), 8 * col : 8 * (col + width)]
        images[i][box] = (colour * (0.5 + 0.5 * stripes[..., None]))[box]
        masks[i, row : row + height, col : col + width] = True
    pixels = torch.from_numpy((images - 0.5) / 0.25).permute(0, 3, 1, 2).contiguous()
    return pixels, torch.from_numpy(masks.reshape(count, -1))


def first_component_agreement(encoder: DenseCLViTModel, pixels: torch.Tensor, masks: torch.Tensor) -> float:
    """Agreement of the sign of the first principal component of all patch features with the object mask."""
    with torch.no_grad():
        features = encoder(pixels).last_hidden_state[:, 1:].reshape(-1, encoder.config.hidden_size)
    split = visualize.principal_components(features.numpy(), 1)[0][:, 0] > 0
    accuracy = (split == masks.reshape(-1).numpy()).mean()
    return max(accuracy, 1 - accuracy)


def test_trained_encoder_separates_objects_better_than_a_random_one():
    """Colours are random, so only the texture tells objects from background: a random encoder's first component
    follows colour, while an encoder trained to classify patches (a linear probe on its patch tokens, 200 steps)
    puts the object/background split first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains faster on one thread than on two contended ones
    try:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        eval_pixels, eval_masks = synthetic_objects(np.random.default_rng(100), 64)
        encoder = DenseCLViTModel(tiny_config())
        random_agreement = first_component_agreement(encoder.eval(), eval_pixels, eval_masks)
        probe = torch.nn.Linear(encoder.config.hidden_size, 2)
        optimizer = torch.optim.AdamW([*encoder.parameters(), *probe.parameters()], lr=2e-3)
        encoder.train()
        for _ in range(200):
            pixels, masks = synthetic_objects(rng, 16)
            logits = probe(encoder(pixels).last_hidden_state[:, 1:])  # (B, 16, 2)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), masks.reshape(-1).long())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        trained_agreement = first_component_agreement(encoder.eval(), eval_pixels, eval_masks)
    finally:
        torch.set_num_threads(threads)
    assert random_agreement < 0.75
    assert trained_agreement > random_agreement + 0.2


# ---------------------------------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------------------------------


def write_run(folder: Path, scale: float) -> Path:
    """A metrics.jsonl like the training scripts write, with a resumed stretch and a torn last line."""
    folder.mkdir(parents=True)
    lines = []
    for step in list(range(0, 30)) + list(range(20, 40)):  # resumed from step 20
        lines.append(
            {"step": step, "time": 1e9 + step, "loss": scale / (step + 1), "lr": 1e-4 * min(1, step / 5)}
        )
        lines[-1]["images_per_s"] = 100.0 + step % 3
        if step % 10 == 9:
            lines.append(
                {"step": step, "eval_loss": scale / step, "eval_mean_iou": step / 50, "epoch": step // 10}
            )
    text = "\n".join(json.dumps(line) for line in lines) + '\n{"step": 40, "loss'
    (folder / "metrics.jsonl").write_text(text)
    return folder


def test_metric_series_keeps_the_last_value_of_each_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [
        {"step": 1, "loss": 3.0, "note": "text", "flag": True},
        {"step": 2, "loss": None},
        {"step": 1, "loss": 2.0},
        {"step": 3, "loss": 1.0, "eval_miou": 0.5},
    ]
    path.write_text("\n".join(map(json.dumps, records)) + "\nnot json\n")
    series = curves.metric_series(curves.read_metrics(tmp_path))
    assert sorted(series) == ["eval_miou", "loss"]
    steps, values = series["loss"]
    np.testing.assert_array_equal(steps, [1, 2, 3])
    np.testing.assert_array_equal(values, [2.0, np.nan, 1.0])
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        curves.read_metrics(tmp_path / "missing")


def test_metric_panels_group_keys():
    keys = ["lr", "loss", "eval_loss", "images_per_s", "eval_mean_iou", "grad_norm", "loss_global"]
    assert curves.metric_panels(keys) == {
        "loss": ["loss", "loss_global", "eval_loss"],
        "learning rate": ["lr"],
        "throughput": ["images_per_s"],
        "evaluation": ["eval_mean_iou"],
        "grad_norm": ["grad_norm"],
    }


def test_plot_metrics_script_with_two_runs(tmp_path):
    runs = [write_run(tmp_path / "runs" / "a", 2.0), write_run(tmp_path / "runs" / "b", 3.0)]
    result = run_script("plot_metrics", *runs, "--output", tmp_path / "curves.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    figure = read_png(tmp_path / "curves.png")
    # Five panels (loss, learning rate, throughput, evaluation, epoch): 3 columns x 2 rows of 5.2 x 3.6 in at 100 dpi.
    assert figure.shape[:2] == (720, 1560)
    assert figure[..., :3].reshape(-1, 3).var(axis=0).sum() > 0

    plot_metrics = load_script("plot_metrics")
    assert plot_metrics.main([str(runs[0])]) == 0
    assert read_png(runs[0] / "curves.png").shape[:2] == (720, 1560)
    with pytest.raises(SystemExit):
        plot_metrics.main([str(r) for r in runs])  # several runs need --output


def test_visualize_features_image_size_sets_the_patch_grid(tmp_path, photos, capsys, monkeypatch):
    script = load_script("visualize_features")
    drawn = []
    monkeypatch.setattr(script, "draw_figure", lambda images, labels, rows, output: drawn.append(rows))
    encoder_dir = save_model(DenseCLViTModel(tiny_config()), tmp_path / "encoder")  # image 32, patch 8
    argv = ["--model", str(encoder_dir), str(photos["chelsea"]), "--output", str(tmp_path / "f.png")]
    assert script.main(argv) == 0 and script.main([*argv, "--image-size", "64"]) == 0
    assert [rows[0][2][0].shape for rows in drawn] == [(4, 4, 3), (8, 8, 3)]
    assert script.main([*argv, "--image-size", "60"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("--image-size 60 must be a multiple of the model's patch size 8")
    )
