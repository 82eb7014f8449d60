"""Single examples: decoding, validation, the count of examples that could not be used, the per-example
random generator and the stacking of examples into batches.

Streams are opened with image decoding switched off (`datasets.Image(decode=False)`), so every image,
label map and depth map reaches the task transform as raw bytes or a path and is decoded here. The
decoders never raise on bad data: they return `None`, the task's `validate_*` function turns that (or a
shape/range problem) into a *reason* string, and the stream skips the example and counts the reason in a
`SkipCounter`. A dataset where most examples are bad stops early with a `DataError` instead of training
on the few good ones.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from .transforms.two_view import image_to_uint8_tensor

UNDECODABLE_IMAGE = "undecodable_image"
UNDECODABLE_LABEL = "undecodable_label"
UNDECODABLE_DEPTH = "undecodable_depth"
LABEL_SIZE_MISMATCH = "label_size_mismatch"
LABEL_OUT_OF_RANGE = "label_out_of_range"
DEPTH_SIZE_MISMATCH = "depth_size_mismatch"
DEPTH_ALL_INVALID = "depth_all_invalid"
SKIP_REASONS = (
    UNDECODABLE_IMAGE,
    UNDECODABLE_LABEL,
    UNDECODABLE_DEPTH,
    LABEL_SIZE_MISMATCH,
    LABEL_OUT_OF_RANGE,
    DEPTH_SIZE_MISMATCH,
    DEPTH_ALL_INVALID,
)

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class DataError(ValueError):
    """The data itself is unusable (e.g. most examples fail to decode or validate)."""


class SkipCounter:
    """Counts examples seen and examples skipped, per reason.

    Mergeable across processes: gather `to_dict()` from every process (e.g. with
    `accelerate.utils.gather_object`) and combine the results with `SkipCounter.merge`.
    """

    def __init__(self, counts: Mapping[str, int] | None = None, seen: int = 0) -> None:
        self.counts: Counter[str] = Counter(counts or {})
        self.seen = seen

    def add(self, reason: str | None) -> None:
        """Count one example; `reason` is None for a usable example, else why it was skipped."""
        self.seen += 1
        if reason is not None:
            self.counts[reason] += 1

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": dict(sorted(self.counts.items()))}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> SkipCounter:
        return cls(state.get("skipped", {}), int(state.get("seen", 0)))

    @classmethod
    def merge(cls, counters: Iterable[SkipCounter | Mapping[str, Any]]) -> SkipCounter:
        """Sum several counters (objects or their `to_dict()` forms), e.g. one per process."""
        total = cls()
        for counter in counters:
            counter = counter if isinstance(counter, SkipCounter) else cls.from_dict(counter)
            total.counts.update(counter.counts)
            total.seen += counter.seen
        return total

    def summary(self, top: int = 3) -> str:
        """The most frequent reasons, e.g. "label_size_mismatch: 30, undecodable_image: 2"."""
        return ", ".join(f"{reason}: {n}" for reason, n in self.counts.most_common(top)) or "none"

    def check(self, min_seen: int = 50, max_bad_fraction: float = 0.5) -> None:
        """Raise `DataError` once `min_seen` examples were seen and more than `max_bad_fraction` were bad."""
        if self.seen >= min_seen and self.skipped > max_bad_fraction * self.seen:
            raise DataError(
                f"{self.skipped} of the first {self.seen} examples were unusable ({self.summary()}); "
                "check the dataset and its column options, or raise max_bad_fraction"
            )

    def __repr__(self) -> str:
        return f"SkipCounter(seen={self.seen}, skipped={dict(self.counts)})"


def _open_pil(value: Any) -> PIL.Image.Image:
    """Open a datasets Image value (dict with bytes/path, path string, raw bytes, PIL image or array)."""
    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, (bytes, bytearray)):
        value = {"path": None, "bytes": bytes(value)}
    if isinstance(value, str):
        value = {"path": value, "bytes": None}
    if isinstance(value, dict):
        import datasets  # local: importing this module must stay cheap

        # datasets' own decoder reads local paths, remote (hf://, zip::) paths and bytes, and loads the
        # pixels eagerly so that truncated files fail here rather than later in a transform.
        return datasets.Image().decode_example(value)
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating) and array.ndim == 3:
        scale = 255.0 if array.max() <= 1.0 else 1.0
        array = np.clip(array * scale, 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(array)


def _wide_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """16/32-bit integer and float grey images -> 8-bit RGB, scaling rather than clipping."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode in _SIXTEEN_BIT_MODES:
        array = array / 257.0
    elif image.mode == "F" and np.nanmax(array) <= 1.0:
        array = array * 255.0
    elif image.mode == "I" and np.nanmax(array) > 255:
        array = array / (257.0 if np.nanmax(array) <= 65535 else np.nanmax(array) / 255.0)
    array = np.nan_to_num(np.clip(array, 0, 255))
    return PIL.Image.fromarray(array.round().astype(np.uint8)).convert("RGB")


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode -> RGB. Alpha is dropped; palette transparency goes through RGBA first."""
    if image.mode == "RGB":
        return image
    if image.mode in (*_SIXTEEN_BIT_MODES, "I", "F"):
        return _wide_to_rgb(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("La", "RGBa"):
        image = image.convert("RGBA")
    return image.convert("RGB")


def decode_image(value: Any) -> PIL.Image.Image | None:
    """Decode one image value to an RGB `PIL.Image`, or return None if it cannot be decoded.

    Accepts what a `datasets` column holds with `Image(decode=False)` ({"bytes", "path"} dicts or paths),
    raw bytes, PIL images and arrays ((H, W), (H, W, C) or (C, H, W)). Modes L, LA, P, RGBA, CMYK, I;16,
    I and F are converted to RGB. Never raises on bad data.
    """
    if value is None:
        return None
    try:
        return to_rgb(_open_pil(value))
    except Exception:  # any decoder failure (truncated file, unknown format, bomb) means "skip this example"
        return None


def _jpeg_bytes(value: Any) -> bytes | bytearray | None:
    """The encoded bytes of a value that holds a JPEG in memory (raw bytes or a {"bytes": ...} dict)."""
    data = value.get("bytes") if isinstance(value, dict) else value
    if isinstance(data, (bytes, bytearray)) and data[:3] == b"\xff\xd8\xff":
        return data
    return None


def decode_rgb_pixels(value: Any) -> torch.Tensor | None:
    """`decode_image` as a (3, H, W) uint8 tensor, or None if the value cannot be decoded.

    JPEG bytes (what image streams mostly hold) go through torchvision's libjpeg-turbo decoder straight into
    a tensor, with the EXIF orientation applied as `datasets` does: the same pixels as PIL's decoder without
    building a PIL image and exporting it (about 1.5 times faster). PIL reads the header first, so its
    decompression-bomb limit still holds. Other values, and JPEGs torchvision refuses, go through
    `decode_image`.
    """
    data = _jpeg_bytes(value)
    if data is not None:
        try:
            from torchvision.io import ImageReadMode, decode_jpeg

            with PIL.Image.open(io.BytesIO(data)) as header:  # reads the header only
                is_jpeg = header.format == "JPEG"
            if is_jpeg:
                encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                return decode_jpeg(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except Exception:  # a bomb, a truncated file or a JPEG flavour torchvision lacks: PIL decides below
            pass
    image = decode_image(value)
    return None if image is None else image_to_uint8_tensor(image)


def decode_label_map(value: Any) -> np.ndarray | None:
    """Decode a segmentation map to an (H, W) int64 array of class ids, or None if undecodable.

    Palette ("P") images give their palette indices; grey 8/16/32-bit images their values. A colour
    image is accepted only when its three channels agree (a grey map saved as RGB).
    """
    if value is None:
        return None
    try:
        image = value if isinstance(value, np.ndarray) else _open_pil(value)
        array = np.asarray(image)
    except Exception:
        return None
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        if not (
            np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])
        ):
            return None
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        return None
    return array.astype(np.int64)


def decode_depth(value: Any, scale: float = 1.0) -> np.ndarray | None:
    """Decode a depth map to an (H, W) float32 array in metres (raw value * `scale`), or None.

    Accepts float arrays and nested lists, PIL "F" images and integer images such as 16-bit PNGs
    (`scale=1e-3` for millimetres). Non-finite values become 0, which marks an invalid pixel.
    """
    if value is None:
        return None
    try:
        if isinstance(value, (list, tuple, np.ndarray)) or hasattr(value, "__array__"):
            array = np.asarray(value, dtype=np.float64)
        else:
            array = np.asarray(_open_pil(value), dtype=np.float64)
    except Exception:
        return None
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        return None
    return np.nan_to_num(array * scale, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def validate_image(image: PIL.Image.Image | torch.Tensor | None) -> str | None:
    """Pre-training: the reason to skip the example, or None when it is usable."""
    return UNDECODABLE_IMAGE if image is None else None


def validate_segmentation(
    image: PIL.Image.Image | None, label: np.ndarray | None, num_labels: int, ignore_index: int = 255
) -> str | None:
    """Segmentation: the reason to skip, or None. `label` (H, W) holds the ids the model will see (after any
    label reduction): each must lie in [0, num_labels) or equal `ignore_index`."""
    if image is None:
        return UNDECODABLE_IMAGE
    if label is None:
        return UNDECODABLE_LABEL
    if label.shape != (image.height, image.width):
        return LABEL_SIZE_MISMATCH
    in_range = (label >= 0) & (label < num_labels)
    if not np.all(in_range | (label == ignore_index)):
        return LABEL_OUT_OF_RANGE
    return None


def validate_depth(
    image: PIL.Image.Image | None, depth: np.ndarray | None, min_depth: float = 1e-3, max_depth: float = 10.0
) -> str | None:
    """Depth: the reason to skip, or None. `depth` (H, W) is in metres; at least one pixel must lie in
    (min_depth, max_depth), the range the loss, the masks and the metrics count as valid."""
    if image is None:
        return UNDECODABLE_IMAGE
    if depth is None:
        return UNDECODABLE_DEPTH
    if depth.shape != (image.height, image.width):
        return DEPTH_SIZE_MISMATCH
    if not np.any((depth > min_depth) & (depth < max_depth)):
        return DEPTH_ALL_INVALID
    return None


def sample_rng(seed: int, epoch: int, process_index: int, lane: int, ordinal: int) -> np.random.Generator:
    """The random generator of one example: a pure function of where the example sits in the stream, so
    augmentations do not depend on how many DataLoader workers produced them."""
    return np.random.default_rng([seed, epoch, process_index, lane, ordinal])


def collate_samples(samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack dict samples key by key: B dicts of (...) tensors -> one dict of (B, ...) tensors."""
    keys = list(samples[0])
    for sample in samples[1:]:
        if list(sample) != keys:
            raise ValueError(
                f"samples have different keys: {keys} vs {list(sample)}; make_sample must be consistent"
            )
    batch = {}
    for key in keys:
        values = [torch.as_tensor(sample[key]) for sample in samples]
        shapes = {tuple(value.shape) for value in values}
        if len(shapes) > 1:
            raise ValueError(
                f"samples differ in the shape of {key!r}: {sorted(shapes)}; the transform must crop/pad"
            )
        batch[key] = torch.stack(values)
    return batch
