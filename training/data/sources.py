"""Opening a dataset source as a stream and choosing its columns: a Hub id, an image folder, parquet/arrow
files or globs, or a `save_to_disk` folder, always as a `datasets.IterableDataset` with media decoding switched
off (the examples are decoded by `samples`, the stream is fed to training by `data` and `loader`).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
_MAX_STREAM_SHARDS = 1024  # shards given to in-memory/on-disk Datasets turned into streams
_COLUMN_OPTIONS = {"image": "--image-column", "label": "--label-column", "depth": "--depth-column"}
_DEFAULT_COLUMNS = {"label": "annotation", "depth": "depth_map"}


def _dataset_to_stream(dataset: datasets.Dataset) -> datasets.IterableDataset:
    return dataset.to_iterable_dataset(num_shards=max(1, min(len(dataset), _MAX_STREAM_SHARDS)))


def _pick_split(splits: Mapping[str, Any], split: str, source: str) -> Any:
    if split not in splits:
        raise ValueError(f"split {split!r} not found in {source}; available splits: {', '.join(splits)}")
    return splits[split]


def _local_files(path: str) -> list[str] | None:
    """The data files named by a file path or glob, None for a folder or a Hub id."""
    if any(char in path for char in "*?["):
        files = sorted(glob.glob(os.path.expanduser(path), recursive=True))
        if not files:
            raise ValueError(f"no files match {path!r}")
    elif os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        return None
    elif (
        path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.path.splitext(path)[1] in _FILE_BUILDERS
    ):
        raise ValueError(f"dataset path not found: {path!r}")
    else:
        return None  # "name" or "owner/name": a Hub id
    extensions = {os.path.splitext(file)[1] for file in files}
    if len(extensions) != 1 or not extensions <= set(_FILE_BUILDERS):
        raise ValueError(f"{path!r} must name .parquet or .arrow files of one kind, got {sorted(extensions)}")
    return files


def open_stream(
    dataset: str,
    dataset_config: str | None = None,
    split: str = "train",
    streaming: bool = True,
    data_files: str | Sequence[str] | Mapping[str, Any] | None = None,
) -> datasets.IterableDataset:
    """Open one split of a dataset as a `datasets.IterableDataset` with image decoding switched off.

    `dataset` is a Hub id ("owner/name"), a folder (images for imagefolder, or parquet/arrow files in the
    Hub layout such as `data/train-*.parquet`), a folder written by `save_to_disk`, or a .parquet/.arrow
    file or glob (which then *is* the requested split). With `streaming=False` the split is loaded (and
    cached) first, then streamed from disk. Media columns hold {"bytes", "path"} dicts: see
    `samples.decode_image`.
    """
    import datasets

    files = _local_files(dataset)
    if files is not None:
        builder = _FILE_BUILDERS[os.path.splitext(files[0])[1]]
        stream = datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming)
    elif os.path.isdir(dataset) and any(
        os.path.exists(os.path.join(dataset, name)) for name in ("dataset_dict.json", "state.json")
    ):
        stream = datasets.load_from_disk(dataset)
        if isinstance(stream, datasets.DatasetDict):
            stream = _pick_split(stream, split, dataset)
    else:
        try:
            splits = datasets.load_dataset(dataset, dataset_config, data_files=data_files, streaming=True)
        except (ConnectionError, FileNotFoundError) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"could not open dataset {dataset!r}: {message}") from error
        stream = _pick_split(splits, split, dataset)
        if not streaming:
            stream = datasets.load_dataset(dataset, dataset_config, data_files=data_files, split=split)
    if isinstance(stream, datasets.Dataset):
        stream = _dataset_to_stream(stream)
    return stream.decode(False) if stream.features else stream


def resolve_column(
    features: datasets.Features | None,
    requested: str | None,
    kind: str = "image",
    exclude: Sequence[str] = (),
) -> str:
    """The column to read for `kind` ("image", "label" or "depth").

    A requested name must exist. Without one, "label" and "depth" default to "annotation" and "depth_map";
    "image" takes the column named `image` (the Hub's convention, which also holds beside annotation and depth
    images), else auto-detects the single `datasets.Image` column not in `exclude` (pass the label/depth column
    there for datasets whose annotations are images too).
    """
    import datasets

    if kind not in _COLUMN_OPTIONS:
        raise ValueError(f"kind must be one of {sorted(_COLUMN_OPTIONS)}, got {kind!r}")
    option = _COLUMN_OPTIONS[kind]
    if features is None:
        raise ValueError(
            f"the dataset does not declare its columns; set {option} and cast the dataset's features"
        )
    columns = ", ".join(features)
    if requested is not None:
        if requested not in features:
            raise ValueError(f"{kind} column {requested!r} not found; set {option} to one of: {columns}")
        return requested
    if kind in _DEFAULT_COLUMNS:
        if _DEFAULT_COLUMNS[kind] in features:
            return _DEFAULT_COLUMNS[kind]
        raise ValueError(f"no {kind} column {_DEFAULT_COLUMNS[kind]!r}; set {option} to one of: {columns}")
    images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    candidates = [name for name in images if name not in exclude]
    if "image" in candidates:
        return "image"
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise ValueError(f"several image columns ({', '.join(candidates)}); set {option} to one of them")
    raise ValueError(f"no image column among {columns}; set {option}")
