"""Saved segmentation and depth folders run in transformers' pipelines as remote code, in a process without
densecl_vit, and give what the same model gives in-process."""

import json

import pytest
import torch
from PIL import Image

from densecl_vit import (
    DenseCLViTForDepthEstimation,
    DenseCLViTForSemanticSegmentation,
    DenseCLViTImageProcessor,
)

ID2LABEL = {0: "sky", 1: "person", 2: "rocket"}
# The pipeline's fresh process runs with the same thread count, so both sides compute bit for bit alike.
THREADS = 1


@pytest.fixture
def photo(tmp_path):
    """A real photograph, cropped to a non-square 384x512 (height x width) so that swapped axes show."""
    skimage_data = pytest.importorskip("skimage.data")
    path = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()[:384]).save(path)
    return path


def _processor() -> DenseCLViTImageProcessor:
    return DenseCLViTImageProcessor(size={"height": 48, "width": 64}, size_divisor=8)


def _segmentation_folder(tmp_path, tiny):
    torch.manual_seed(0)
    config = tiny(
        decode_head="upernet",
        num_labels=3,
        id2label=ID2LABEL,
        label2id={name: i for i, name in ID2LABEL.items()},
        out_indices=[1, 1, 2, 2],
        decoder_hidden_size=16,
        auxiliary_hidden_size=8,
    )
    model = DenseCLViTForSemanticSegmentation(config).eval()
    # Large classifier weights spread the classes over the photo, so the masks are not all one label.
    with torch.no_grad():
        model.classifier.weight.mul_(100)
    folder = tmp_path / "segmentation"
    model.save_pretrained(folder)
    _processor().save_pretrained(folder)
    return model, folder


def _depth_folder(tmp_path, tiny):
    torch.manual_seed(1)
    model = DenseCLViTForDepthEstimation(tiny(depth_head="linear", depth_head_hidden_size=16)).eval()
    folder = tmp_path / "depth"
    model.save_pretrained(folder)
    _processor().save_pretrained(folder)
    return model, folder


def test_saved_folders_map_the_pipeline_auto_classes(tmp_path, tiny):
    _, segmentation = _segmentation_folder(tmp_path, tiny)
    _, depth = _depth_folder(tmp_path, tiny)
    auto_map = json.loads((segmentation / "config.json").read_text())["auto_map"]
    assert (
        auto_map["AutoModelForSemanticSegmentation"]
        == "modeling_densecl_vit.DenseCLViTForSemanticSegmentation"
    )
    auto_map = json.loads((depth / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForDepthEstimation"] == "modeling_densecl_vit.DenseCLViTForDepthEstimation"
    for folder in (segmentation, depth):
        assert (folder / "losses_densecl_vit.py").exists() and (
            folder / "image_processing_densecl_vit.py"
        ).exists()


def test_pipelines_in_a_fresh_process_match_the_model_in_process(tmp_path, tiny, isolated, photo):
    segmentation_model, segmentation = _segmentation_folder(tmp_path, tiny)
    depth_model, depth = _depth_folder(tmp_path, tiny)
    processor = _processor()
    image = Image.open(photo).convert("RGB")
    with torch.no_grad():
        inputs = processor(image, return_tensors="pt")
        label_map = processor.post_process_semantic_segmentation(
            segmentation_model(**inputs), target_sizes=[(image.height, image.width)]
        )[0]
        depth_map = processor.post_process_depth_estimation(
            depth_model(**inputs), target_sizes=[(image.height, image.width)]
        )[0]["predicted_depth"]
    assert label_map.shape == depth_map.shape == (384, 512)
    assert len(label_map.unique()) >= 2
    torch.save({"label_map": label_map, "depth": depth_map}, tmp_path / "expected.pt")

    result = isolated(
        f"""
        import numpy as np, torch
        from PIL import Image
        from transformers import pipeline
        torch.set_num_threads({THREADS})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        photo = {str(photo)!r}

        segmenter = pipeline("image-segmentation", model={str(segmentation)!r}, trust_remote_code=True)
        assert type(segmenter.model).__name__ == "DenseCLViTForSemanticSegmentation"
        assert type(segmenter.model).__module__.startswith("transformers_modules"), type(segmenter.model).__module__
        segments = segmenter(photo)
        label2id = {{name: i for i, name in {ID2LABEL!r}.items()}}
        label_map = torch.full((384, 512), -1)
        for segment in segments:
            assert segment["mask"].mode == "L" and segment["mask"].size == (512, 384)
            label_map[torch.from_numpy(np.array(segment["mask"]) == 255)] = label2id[segment["label"]]
        print("labels", sorted(segment["label"] for segment in segments))
        assert torch.equal(label_map, expected["label_map"]), (label_map != expected["label_map"]).sum()

        estimator = pipeline("depth-estimation", model={str(depth)!r}, trust_remote_code=True)
        assert type(estimator.model).__name__ == "DenseCLViTForDepthEstimation"
        result = estimator(photo)
        assert isinstance(result["depth"], Image.Image) and result["depth"].size == (512, 384)
        difference = (result["predicted_depth"] - expected["depth"]).abs().max().item()
        print("depth", tuple(result["predicted_depth"].shape), "max difference", difference)
        assert difference < 1e-5
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    expected_labels = sorted(ID2LABEL[int(i)] for i in label_map.unique())
    assert f"labels {expected_labels}" in result.stdout
    assert "depth (384, 512)" in result.stdout
