"""Data layer: opening local datasets of every kind, column choice, robust decoding, skip counting, and
the streaming loader's splitting, worker-count independence and exact resumption."""

import io
import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from densecl_vit.training.data.decoding import (
    DataError,
    SkipCounter,
    collate_samples,
    decode_depth,
    decode_image,
    decode_label_map,
    decode_rgb_pixels,
    sample_rng,
    validate_depth,
    validate_image,
    validate_segmentation,
)
from densecl_vit.training.data.loader import build_dataloader, default_num_workers
from densecl_vit.training.data.sources import open_stream, resolve_column
from densecl_vit.training.data.streaming import StreamingSamples

NUM_LABELS = 4


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def rgb_png(seed: int, size: tuple[int, int] = (6, 5)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels))


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


# make_sample functions: module level so that DataLoader workers can unpickle them.
def id_sample(example, rng):
    """Pre-training style: skip undecodable images; keep the id and one draw of the example's rng."""
    reason = validate_image(decode_image(example["image"]))
    return reason or {"id": torch.tensor(example["id"]), "draw": torch.tensor(rng.random())}


def seg_sample(example, rng):
    label = decode_label_map(example["annotation"])
    reason = validate_segmentation(decode_image(example["image"]), label, NUM_LABELS)
    return reason or {"id": torch.tensor(example["id"])}


def depth_sample(example, rng):
    depth = decode_depth(example["depth_map"], scale=1e-3)
    reason = validate_depth(decode_image(example["image"]), depth)
    return reason or {"id": torch.tensor(example["id"])}


IMAGE_FEATURES = datasets.Features({"image": datasets.Image(), "id": datasets.Value("int64")})


def image_rows(n: int, bad: set[int]) -> dict[str, list]:
    images = [{"bytes": truncated(rgb_png(i)) if i in bad else rgb_png(i), "path": None} for i in range(n)]
    return {"image": images, "id": list(range(n))}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Local datasets of every kind; ids in `bad` hold truncated images."""
    root = tmp_path_factory.mktemp("sources")
    folder = root / "images"
    for split in ("train", "validation"):
        (folder / split).mkdir(parents=True)
    Image.new("L", (8, 6), 90).save(folder / "train" / "grey.jpg")
    Image.new("RGBA", (8, 6), (10, 20, 30, 0)).save(folder / "train" / "alpha.png")
    Image.new("CMYK", (8, 6), (0, 64, 128, 0)).save(folder / "train" / "cmyk.jpg")
    Image.new("P", (8, 6), 3).save(folder / "train" / "palette.png")
    (folder / "train" / "broken.jpg").write_bytes(truncated(encode(Image.new("RGB", (64, 64), 7), "JPEG")))
    Image.new("RGB", (8, 6), 5).save(folder / "validation" / "val.png")

    bad = {3, 10, 17}
    parquet = root / "stream.parquet"
    datasets.Dataset.from_dict(image_rows(23, bad), features=IMAGE_FEATURES).to_parquet(str(parquet))
    hub_layout = root / "hub_layout"
    (hub_layout / "data").mkdir(parents=True)
    for split, n in (("train", 4), ("validation", 2)):
        data = datasets.Dataset.from_dict(image_rows(n, set()), features=IMAGE_FEATURES)
        data.to_parquet(str(hub_layout / "data" / f"{split}-00000-of-00001.parquet"))
    saved = root / "saved"
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict(image_rows(24, bad), features=IMAGE_FEATURES),
        validation=datasets.Dataset.from_dict(image_rows(2, set()), features=IMAGE_FEATURES),
    ).save_to_disk(str(saved))
    return {"images": folder, "parquet": parquet, "hub_layout": hub_layout, "saved": saved, "bad": bad}


# ---------------------------------------------------------------- opening streams


def test_imagefolder_streams_and_every_mode_decodes_to_rgb(sources):
    stream = open_stream(str(sources["images"]), split="train")
    assert isinstance(stream, datasets.IterableDataset)
    assert stream.features["image"].decode is False
    column = resolve_column(stream.features, None)
    decoded = {}
    for example in stream:
        decoded[example[column]["path"].rsplit("/", 1)[-1]] = decode_image(example[column])
    assert decoded.pop("broken.jpg") is None
    assert sorted(decoded) == ["alpha.png", "cmyk.jpg", "grey.jpg", "palette.png"]
    for image in decoded.values():
        assert image.mode == "RGB" and image.size == (8, 6)
    assert np.all(np.abs(np.asarray(decoded["grey.jpg"], dtype=int) - 90) <= 2)
    assert np.all(np.asarray(decoded["alpha.png"]) == [10, 20, 30])


def test_parquet_file_glob_hub_layout_and_saved_folder_open(sources):
    by_file = [ex["id"] for ex in open_stream(str(sources["parquet"]), split="train")]
    assert by_file == list(range(23))
    by_glob = open_stream(str(sources["parquet"].parent / "*.parquet"), split="validation")
    assert [ex["id"] for ex in by_glob] == list(range(23))  # a file or glob *is* the requested split
    hub = open_stream(str(sources["hub_layout"]), split="validation")
    assert [ex["id"] for ex in hub] == [0, 1]
    saved = open_stream(str(sources["saved"]), split="train")
    assert saved.features["image"].decode is False
    assert sorted(ex["id"] for ex in saved) == list(range(24))
    in_memory = open_stream(str(sources["hub_layout"]), split="train", streaming=False)
    assert isinstance(in_memory, datasets.IterableDataset) and [ex["id"] for ex in in_memory] == [0, 1, 2, 3]


@pytest.mark.parametrize("kind", ["images", "hub_layout", "saved"])
def test_missing_split_lists_the_splits(sources, kind):
    with pytest.raises(ValueError, match=r"split 'test' not found .*available splits: train, validation$"):
        open_stream(str(sources[kind]), split="test")


def test_the_suite_is_offline():
    """conftest sets the offline switches before anything reads them: the Hub code paths fail at once."""
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE


def test_path_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="dataset path not found"):
        open_stream(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no files match"):
        open_stream(str(tmp_path / "*.parquet"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"\.parquet or \.arrow"):
        open_stream(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="could not open dataset 'someone/not-here'") as error:
        open_stream("someone/not-here")  # offline: the Hub code path runs and fails cleanly
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- columns


def test_resolve_column():
    features = datasets.Features(
        {"image": datasets.Image(), "annotation": datasets.Image(), "depth_map": datasets.Value("float32")}
    )
    assert resolve_column(features, None) == "image"  # the conventional name beside annotation images
    assert resolve_column(features, None, exclude=["annotation"]) == "image"
    renamed = datasets.Features({"photo": datasets.Image(), "annotation": datasets.Image()})
    with pytest.raises(ValueError, match=r"several image columns \(photo, annotation\); set --image-column"):
        resolve_column(renamed, None)
    assert resolve_column(features, None, "label") == "annotation"
    assert resolve_column(features, None, "depth") == "depth_map"
    assert resolve_column(features, "annotation") == "annotation"
    with pytest.raises(
        ValueError, match=r"'pixels' not found; set --image-column to one of: image, annotation"
    ):
        resolve_column(features, "pixels")
    plain = datasets.Features({"img": datasets.Value("binary"), "label": datasets.Value("int64")})
    with pytest.raises(ValueError, match="no image column among img, label; set --image-column"):
        resolve_column(plain, None)
    with pytest.raises(
        ValueError, match="no label column 'annotation'; set --label-column to one of: img, label"
    ):
        resolve_column(plain, None, "label")
    assert resolve_column(datasets.Features({"photo": datasets.Image()}), None) == "photo"


# ---------------------------------------------------------------- decoding


def test_decode_image_modes_against_hand_references(tmp_path):
    grey16 = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert grey16.mode == "I;16"
    assert np.asarray(decode_image(grey16))[0, :, 0].tolist() == [0, 100, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(decode_image(floats))[0, :, 1].tolist() == [0, 128, 255]
    cmyk = Image.new("CMYK", (2, 2), (10, 20, 30, 0))
    assert np.asarray(decode_image(cmyk))[0, 0].tolist() == [245, 235, 225]  # 255 - ink when K = 0
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert np.asarray(decode_image(palette)).tolist() == [[[0, 0, 0], [200, 100, 50]]]
    la = Image.new("LA", (1, 1), (77, 0))
    assert np.asarray(decode_image(la)).tolist() == [[[77, 77, 77]]]
    assert decode_image(np.full((2, 3), 9, dtype=np.uint8)).size == (3, 2)
    chw = np.zeros((3, 2, 5), dtype=np.float32)
    chw[0] = 1.0
    assert np.asarray(decode_image(chw))[0, 0].tolist() == [255, 0, 0]
    path = tmp_path / "x.png"
    Image.new("RGB", (3, 3), (1, 2, 3)).save(path)
    for value in (str(path), {"path": str(path), "bytes": None}, path.read_bytes()):
        assert np.asarray(decode_image(value))[0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"not an image",
        {"bytes": truncated(rgb_png(0, (64, 64))), "path": None},
        {"bytes": None, "path": "/nope.png"},
    ],
)
def test_undecodable_values_give_none(value):
    assert decode_image(value) is None
    assert decode_label_map(value) is None
    assert decode_depth(value) is None


def _photo(size=(61, 37), seed=0):
    """A smooth colour image with noise: JPEG-coded, every block of it differs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    pixels = np.stack([xx * 4, yy * 6, (xx + yy) * 3], axis=-1) + rng.integers(0, 40, (size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _jpeg(image, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **kwargs)
    return buffer.getvalue()


def test_decode_rgb_pixels_equals_the_pil_decoder_for_every_jpeg_flavour():
    photo = _photo()
    exif = photo.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": datasets applies it
    encoded = {
        "baseline 4:2:0": _jpeg(photo, quality=90),
        "4:4:4": _jpeg(photo, quality=95, subsampling=0),
        "progressive": _jpeg(photo, progressive=True),
        "grey": _jpeg(photo.convert("L")),
        "cmyk": _jpeg(photo.convert("CMYK")),
        "exif-rotated": _jpeg(photo, exif=exif.tobytes()),
        "png": rgb_png(3, (20, 12)),
    }
    for name, data in encoded.items():
        for value in (data, {"bytes": data, "path": None}):
            pixels = decode_rgb_pixels(value)
            reference = np.asarray(decode_image(value))
            assert pixels.dtype == torch.uint8 and pixels.shape == (3, *reference.shape[:2]), name
            assert np.array_equal(pixels.permute(1, 2, 0).numpy(), reference), name
    assert decode_rgb_pixels(encoded["exif-rotated"]).shape == (3, 61, 37)  # turned upright


def test_decode_rgb_pixels_skips_what_pil_skips(tmp_path, monkeypatch):
    data = _jpeg(_photo((200, 120)))
    assert decode_rgb_pixels({"bytes": data[: len(data) // 2], "path": None}) is None  # truncated
    assert decode_rgb_pixels(b"\xff\xd8\xff not a jpeg") is None
    assert decode_rgb_pixels(None) is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200 * 120 // 3)  # 200 x 120 is over twice the limit
    assert decode_rgb_pixels(data) is None  # PIL's decompression-bomb check still applies
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    from_path = decode_rgb_pixels({"bytes": None, "path": str(path)})  # a path goes through PIL
    assert np.array_equal(from_path.permute(1, 2, 0).numpy(), np.asarray(decode_image(data)))


def test_decode_label_map_and_depth():
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette(
        [v for i in range(256) for v in (i, 255 - i, i // 2)]
    )  # a full palette, as VOC/ADE use
    palette.putpixel((1, 1), 3)
    assert decode_label_map({"bytes": encode(palette), "path": None}).tolist() == [[0, 0], [0, 3]]
    grey16 = Image.fromarray(np.array([[300, 2]], dtype=np.uint16))
    assert decode_label_map(grey16).tolist() == [[300, 2]]
    same_channels = np.stack([np.array([[1, 2]], dtype=np.uint8)] * 3, axis=-1)
    assert decode_label_map(same_channels).tolist() == [[1, 2]]
    assert decode_label_map(Image.new("RGB", (2, 2), (1, 2, 3))) is None
    millimetres = Image.fromarray(np.array([[0, 1500, 65535]], dtype=np.uint16))
    depth = decode_depth({"bytes": encode(millimetres), "path": None}, scale=1e-3)
    np.testing.assert_allclose(depth, [[0.0, 1.5, 65.535]], rtol=1e-6)
    assert depth.dtype == np.float32
    metres = Image.fromarray(np.array([[2.25, np.nan]], dtype=np.float32))
    assert decode_depth(metres).tolist() == [[2.25, 0.0]]
    assert decode_depth([[1.0, np.inf]]).tolist() == [[1.0, 0.0]]
    assert decode_depth(np.zeros((2, 2, 3))) is None


def test_validators_name_each_reason():
    image = Image.new("RGB", (3, 2))
    good = np.array([[0, 1, 255], [3, 2, 1]])
    assert validate_image(image) is None and validate_image(None) == "undecodable_image"
    assert validate_segmentation(image, good, NUM_LABELS) is None
    assert validate_segmentation(None, good, NUM_LABELS) == "undecodable_image"
    assert validate_segmentation(image, None, NUM_LABELS) == "undecodable_label"
    assert validate_segmentation(image, good.T, NUM_LABELS) == "label_size_mismatch"
    assert validate_segmentation(image, good + 1, NUM_LABELS) == "label_out_of_range"
    assert validate_segmentation(image, -good, NUM_LABELS) == "label_out_of_range"
    depth = np.array([[0.0, 2.0, 11.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    assert validate_depth(image, depth) is None
    assert validate_depth(image, None) == "undecodable_depth"
    assert validate_depth(image, depth[:1]) == "depth_size_mismatch"
    assert validate_depth(image, np.where(depth == 2.0, 0.0, depth)) == "depth_all_invalid"
    # The range is open at both ends, as in the loss and the metrics: depth only at max_depth is no valid pixel.
    assert validate_depth(image, np.full_like(depth, 10.0), max_depth=10.0) == "depth_all_invalid"


def test_skip_counter_merges_and_guards():
    first, second = SkipCounter(), SkipCounter()
    for reason in [None, "undecodable_image", None]:
        first.add(reason)
    for reason in ["label_out_of_range", "undecodable_image"]:
        second.add(reason)
    merged = SkipCounter.merge([first.to_dict(), json.loads(json.dumps(second.to_dict()))])
    assert merged.to_dict() == {"seen": 5, "skipped": {"label_out_of_range": 1, "undecodable_image": 2}}
    merged.check(min_seen=6)  # too few seen to judge
    with pytest.raises(DataError, match=r"3 of the first 5 .*undecodable_image: 2, label_out_of_range: 1"):
        merged.check(min_seen=5, max_bad_fraction=0.5)
    merged.check(min_seen=5, max_bad_fraction=0.6)


def test_sample_rng_and_collate():
    assert sample_rng(1, 2, 0, 0, 7).random() == sample_rng(1, 2, 0, 0, 7).random()
    assert sample_rng(1, 2, 0, 0, 7).random() != sample_rng(1, 2, 0, 0, 8).random()
    batch = collate_samples([{"x": torch.ones(2), "y": 1}, {"x": torch.zeros(2), "y": 2}])
    assert batch["x"].shape == (2, 2) and batch["y"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="shape of 'x'"):
        collate_samples([{"x": torch.ones(2)}, {"x": torch.ones(3)}])


# ---------------------------------------------------------------- skipping inside streams


def no_dict_sample(example, rng):
    return [example["id"]]


def test_misuse_is_reported(sources):
    stream = open_stream(str(sources["hub_layout"]))
    with pytest.raises(RuntimeError, match="through build_dataloader"):
        next(iter(StreamingSamples(stream, id_sample)))
    with pytest.raises(TypeError, match="dict of tensors or a reason string"):
        next(iter(build_dataloader(StreamingSamples(stream, no_dict_sample), batch_size=2, num_workers=0)))
    with pytest.raises(ValueError, match=r"process_index must be in \[0, 2\)"):
        StreamingSamples(stream, id_sample, process_index=2, num_processes=2)


def ids_of(loader) -> list[int]:
    return [i for batch in loader for i in batch["id"].tolist()]


def test_segmentation_and_depth_skips_are_counted_per_reason(tmp_path):
    image = rgb_png(0, (4, 3))
    label = encode(Image.fromarray(np.array([[0, 1, 2, 255]] * 3, dtype=np.uint8)))
    wrong_size = encode(Image.fromarray(np.zeros((4, 3), dtype=np.uint8)))
    out_of_range = encode(Image.fromarray(np.full((3, 4), NUM_LABELS, dtype=np.uint8)))
    seg = [
        (image, label),
        (image, wrong_size),
        (image, out_of_range),
        (truncated(image), label),
        (image, b"?"),
    ]
    seg_rows = {
        "image": [{"bytes": i, "path": None} for i, _ in seg] * 2,
        "annotation": [{"bytes": a, "path": None} for _, a in seg] * 2,
        "id": list(range(10)),
    }
    features = datasets.Features(
        {"image": datasets.Image(), "annotation": datasets.Image(), "id": datasets.Value("int64")}
    )
    datasets.Dataset.from_dict(seg_rows, features=features).to_parquet(str(tmp_path / "seg.parquet"))
    samples = StreamingSamples(open_stream(str(tmp_path / "seg.parquet")), seg_sample, shuffle_buffer=0)
    loader = build_dataloader(samples, batch_size=2, num_workers=0, drop_last=False)
    assert ids_of(loader) == [0, 5]
    assert loader.skips.to_dict() == {
        "seen": 10,
        "skipped": {
            "label_out_of_range": 2,
            "label_size_mismatch": 2,
            "undecodable_image": 2,
            "undecodable_label": 2,
        },
    }

    def mm(array):
        return {"bytes": encode(Image.fromarray(np.asarray(array, dtype=np.uint16))), "path": None}

    good = np.full((3, 4), 1500)
    depth_rows = {
        "image": [{"bytes": image, "path": None}] * 4,
        "depth_map": [mm(good), mm(good[:2]), mm(np.zeros((3, 4))), mm(np.full((3, 4), 20000))],
        "id": [0, 1, 2, 3],
    }
    features = datasets.Features(
        {"image": datasets.Image(), "depth_map": datasets.Image(), "id": datasets.Value("int64")}
    )
    datasets.Dataset.from_dict(depth_rows, features=features).save_to_disk(str(tmp_path / "depth"))
    samples = StreamingSamples(open_stream(str(tmp_path / "depth")), depth_sample, shuffle_buffer=0)
    loader = build_dataloader(samples, batch_size=1, num_workers=0)
    assert ids_of(loader) == [0]
    assert loader.skips.to_dict() == {
        "seen": 4,
        "skipped": {"depth_all_invalid": 2, "depth_size_mismatch": 1},
    }


def test_mostly_bad_stream_stops_early(tmp_path):
    rows = image_rows(200, bad={i for i in range(200) if i % 10})
    datasets.Dataset.from_dict(rows, features=IMAGE_FEATURES).to_parquet(str(tmp_path / "bad.parquet"))
    samples = StreamingSamples(
        open_stream(str(tmp_path / "bad.parquet")), id_sample, shuffle_buffer=0, min_seen=20
    )
    loader = build_dataloader(samples, batch_size=4, num_workers=0)
    with pytest.raises(
        DataError, match=r"of the first 2\d examples were unusable \(undecodable_image: \d+\)"
    ):
        ids_of(loader)


# ---------------------------------------------------------------- splitting, workers, resumption


@pytest.mark.parametrize("kind", ["parquet", "saved"])  # 1 shard (split by example) and 24 shards
def test_two_processes_get_disjoint_covering_shares(sources, kind):
    stream = open_stream(str(sources[kind]))
    shares = []
    for process in range(2):
        samples = StreamingSamples(
            stream, id_sample, process_index=process, num_processes=2, shuffle_buffer=8, seed=3
        )
        shares.append(ids_of(build_dataloader(samples, batch_size=3, num_workers=0, drop_last=False)))
    assert not set(shares[0]) & set(shares[1]) and all(shares)
    everything = [example["id"] for example in stream]
    assert sorted(shares[0] + shares[1]) == sorted(set(everything) - sources["bad"])


def take(loader, n: int) -> list[dict[str, torch.Tensor]]:
    iterator = iter(loader)
    batches = [next(iterator) for _ in range(n)]
    del iterator
    return batches


def assert_same_batches(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def make_loader(stream, num_workers, worker_split="auto", state=None):
    samples = StreamingSamples(stream, id_sample, shuffle_buffer=8, seed=5, infinite=True)
    loader = build_dataloader(samples, batch_size=4, num_workers=num_workers, worker_split=worker_split)
    if state is not None:
        loader.load_state_dict(json.loads(json.dumps(state)))  # checkpoints store it as JSON
    return loader


def test_batches_independent_of_workers_and_resume_is_exact(sources):
    stream = open_stream(str(sources["parquet"]))  # 20 usable examples per epoch: 5 batches of 4
    reference = take(make_loader(stream, num_workers=0), 12)
    ids = [batch["id"].tolist() for batch in reference]
    assert sorted(sum(ids[:5], [])) == sorted(set(range(23)) - sources["bad"])  # epoch 0 covered once
    assert ids[:5] != ids[5:10]  # reshuffled in epoch 1

    with_workers = make_loader(stream, num_workers=2)
    assert with_workers.samples.mode is None
    first = take(with_workers, 7)
    assert with_workers.samples.mode == "chunks"
    assert_same_batches(first, reference[:7])  # ids and rng draws identical with 0 and 2 workers

    state = with_workers.state_dict()
    assert state["batches"] == 7 and state["lanes"][0][0] == 1
    assert state["skips"]["skipped"] == {"undecodable_image": 3}
    assert with_workers.state_dict(consumed_batches=5) != state
    resumed = take(make_loader(stream, num_workers=0, state=state), 5)
    assert_same_batches(resumed, reference[7:12])
    earlier = take(make_loader(stream, num_workers=0, state=with_workers.state_dict(consumed_batches=5)), 2)
    assert_same_batches(earlier, reference[5:7])


def test_shards_mode_resumes_exactly_with_the_same_workers(sources):
    stream = open_stream(str(sources["saved"]))  # 24 shards of one example
    reference_loader = make_loader(stream, num_workers=2)
    reference = take(reference_loader, 9)
    assert reference_loader.samples.mode == "shards"
    state = reference_loader.state_dict(consumed_batches=5)
    assert state["next_lane"] == 1  # lane 1 stopped inside a chunk: it must be served first on resume
    resumed = take(make_loader(stream, num_workers=2, state=state), 4)
    assert_same_batches(resumed, reference[5:9])
    with pytest.raises(ValueError, match="resume with num_workers=2"):
        take(make_loader(stream, num_workers=1, state=state), 1)
    with pytest.raises(ValueError, match="saved with worker_split='shards'"):
        take(make_loader(stream, num_workers=2, worker_split="chunks", state=state), 1)


def test_finite_passes_with_persistent_workers_cover_each_epoch(sources):
    stream = open_stream(str(sources["parquet"]))
    samples = StreamingSamples(stream, id_sample, shuffle_buffer=8, seed=1)
    loader = build_dataloader(samples, batch_size=3, num_workers=2, persistent_workers=True, drop_last=False)
    good = sorted(set(range(23)) - sources["bad"])
    first, second = ids_of(loader), ids_of(loader)
    assert sorted(first) == sorted(second) == good and first != second
    assert samples.epoch == 2 and loader.skips.to_dict()["seen"] == 46
    assert default_num_workers() >= 0 and loader.dataloader.pin_memory == torch.cuda.is_available()
