"""Data streams shared by pre-training and fine-tuning: open a dataset, pick its columns, and feed batches
to a training loop so that a run can stop and resume exactly where it was.

How examples become batches:

    raw stream       open_stream(): a `datasets.IterableDataset` with media decoding switched off
    process stream   shuffled (buffer `shuffle_buffer`, `seed`, reshuffled per epoch with `set_epoch`), then
                     `split_dataset_by_node(process_index, num_processes)`
    lanes            worker_split="chunks": one lane, the process stream; DataLoader worker w decodes the
                     chunks j with j % num_workers == w, reading (not decoding) the others.
                     worker_split="shards": one lane per worker, `split_dataset_by_node(process stream, w, W)`,
                     so a worker reads only its own shards (files) when num_shards allows.
    chunk            up to `batch_size` consecutive examples of one lane after `make_sample`, stacked, with the
                     (epoch, ordinal, skip reason) of each example
    StreamLoader     main process: takes chunks in the DataLoader's round-robin order, drops and counts skipped
                     examples, cuts batches of `batch_size`, and records the stream position after each batch.

Guarantees:
- Each example gets `make_sample(example, rng)` with `rng = sample_rng(seed, epoch, process_index,
  lane, ordinal)`, where `ordinal` counts the examples of the lane in this epoch.
- "chunks": the batches (contents and random augmentations) are the same for every `num_workers`.
  "shards": they depend on `num_workers`, and a resume needs the same `num_workers`.
- Resume: `state_dict()` after k batches, then `load_state_dict()` in a new loader, gives exactly the
  batches k+1, k+2, ... of an uninterrupted run. The state counts what the loader handed out, never what
  workers prefetched; `StreamLoader.state_dict(consumed_batches=k)` looks back when the caller holds
  batches it has not trained on yet. Resuming re-reads (without decoding) the current epoch's examples
  up to the saved position.
"""

from __future__ import annotations

import glob
import itertools
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.utils.data

from .samples import DataError, SkipCounter, collate_samples, sample_rng

if TYPE_CHECKING:
    import datasets

MakeSample = Callable[[dict[str, Any], np.random.Generator], "dict[str, torch.Tensor] | str"]

_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
_MAX_STREAM_SHARDS = 1024  # shards given to in-memory/on-disk Datasets turned into streams
_COLUMN_OPTIONS = {"image": "--image-column", "label": "--label-column", "depth": "--depth-column"}
_DEFAULT_COLUMNS = {"label": "annotation", "depth": "depth_map"}
WORKER_SPLITS = ("auto", "chunks", "shards")


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
    "image" auto-detects the single `datasets.Image` column not in `exclude` (pass the label/depth column
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
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise ValueError(f"several image columns ({', '.join(candidates)}); set {option} to one of them")
    raise ValueError(f"no image column among {columns}; set {option}")


def _identity(chunk: Any) -> Any:
    return chunk


@dataclass
class _Chunk:
    """Consecutive examples of one lane after `make_sample`: `items[i] = (epoch, ordinal, skip reason or None)`,
    `samples` the usable ones stacked ((K, ...) tensors, K = number of None reasons)."""

    lane: int
    index: int
    items: list[tuple[int, int, str | None]]
    samples: dict[str, torch.Tensor]

    def pin_memory(self) -> _Chunk:
        return replace(self, samples={key: value.pin_memory() for key, value in self.samples.items()})


@dataclass
class StreamPosition:
    """Where a stream stands: for each lane the epoch and the ordinal of its next example, the lane the next
    example comes from, the batches and samples handed out so far, and the skipped examples before it."""

    mode: str | None = None
    lanes: list[list[int]] = field(default_factory=list)
    next_lane: int = 0
    batches: int = 0
    samples: int = 0
    skips: SkipCounter = field(default_factory=SkipCounter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "lanes": [list(lane) for lane in self.lanes],
            "next_lane": self.next_lane,
            "batches": self.batches,
            "samples": self.samples,
            "skips": self.skips.to_dict(),
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> StreamPosition:
        return cls(
            mode=state.get("mode"),
            lanes=[[int(epoch), int(cursor)] for epoch, cursor in state.get("lanes", [])],
            next_lane=int(state.get("next_lane", 0)),
            batches=int(state.get("batches", 0)),
            samples=int(state.get("samples", 0)),
            skips=SkipCounter.from_dict(state.get("skips", {})),
        )


def _rows(stream: datasets.IterableDataset, read_batch_size: int) -> Iterator[dict[str, Any]]:
    # `iter()` rather than `__iter__`: inside a DataLoader worker the latter would shard by worker itself.
    for batch in stream.iter(batch_size=read_batch_size):
        columns = list(batch)
        yield from (dict(zip(columns, values)) for values in zip(*batch.values()))


class StreamingSamples(torch.utils.data.IterableDataset):
    """One process's share of a stream, turned into samples by `make_sample(example, rng)`.

    `make_sample` returns a dict of tensors, or a reason string to skip the example (counted in
    `state_dict()["skips"]`). It must be picklable (a module-level function or a partial of one) when the
    loader uses workers. Iterate through `build_dataloader`, which yields the batches; iterating this object
    directly yields internal chunks. `infinite=True` loops over epochs, reshuffling each one.

    `interleave_shards` input shards feed the shuffle buffer at a time (datasets' `max_buffer_input_shards`).
    With more than one, `datasets` pauses 5 s whenever a pass over a multi-file parquet stream ends (its
    guard against apache/arrow#45214); 1 avoids the pause for small multi-file datasets at some cost in mixing.
    """

    def __init__(
        self,
        stream: datasets.IterableDataset,
        make_sample: MakeSample,
        *,
        process_index: int = 0,
        num_processes: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        epoch: int = 0,
        infinite: bool = False,
        columns: Sequence[str] | None = None,
        min_seen: int = 50,
        max_bad_fraction: float = 0.5,
        read_batch_size: int = 16,
        interleave_shards: int = 10,
    ) -> None:
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}")
        if seed < 0 or epoch < 0 or shuffle_buffer < 0:
            raise ValueError(
                f"seed, epoch and shuffle_buffer must be >= 0, got {seed}, {epoch}, {shuffle_buffer}"
            )
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.stream = stream.select_columns(list(columns)) if columns else stream
        self.make_sample = make_sample
        self.process_index, self.num_processes = process_index, num_processes
        self.shuffle_buffer, self.seed, self.infinite = shuffle_buffer, seed, infinite
        self.min_seen, self.max_bad_fraction = min_seen, max_bad_fraction
        self.read_batch_size, self.interleave_shards = read_batch_size, interleave_shards
        self.position = StreamPosition()
        self.first_epoch = epoch
        self.mode: str | None = None
        self.num_lanes = 1
        self.chunk_size = 1
        # Where iteration starts, in shared memory so that persistent DataLoader workers see updates:
        # row i = (epoch, next ordinal) of lane i; _start_lane = the lane DataLoader worker 0 serves first.
        self._start = torch.zeros(1, 2, dtype=torch.long)
        self._start_lane = torch.zeros(1, dtype=torch.long)

    @property
    def epoch(self) -> int:
        """The epoch the stream is in (the earliest over lanes)."""
        return min((epoch for epoch, _ in self.position.lanes), default=self.first_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of `epoch` (finite streams: call before each epoch)."""
        self.first_epoch = epoch
        self.position.lanes = [[epoch, 0] for _ in self.position.lanes]
        self.position.next_lane = 0

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed out by the loader (JSON-serialisable)."""
        return self.position.to_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.position = StreamPosition.from_dict(state)

    def configure(self, mode: str, num_lanes: int, chunk_size: int) -> None:
        """Fix the lane layout (done once by `StreamLoader`) and publish the start position to workers."""
        if self.mode is None:
            self.mode, self.num_lanes, self.chunk_size = mode, num_lanes, chunk_size
            self._start = torch.zeros(num_lanes, 2, dtype=torch.long).share_memory_()
            self._start_lane.share_memory_()
        elif (self.mode, self.num_lanes, self.chunk_size) != (mode, num_lanes, chunk_size):
            raise ValueError(
                "these samples already feed a loader with another layout; create new StreamingSamples"
            )
        if not self.position.lanes:
            self.position.lanes = [[self.first_epoch, 0] for _ in range(num_lanes)]
        self.position.mode = mode
        self._start.copy_(torch.tensor(self.position.lanes, dtype=torch.long))
        self._start_lane.fill_(self.position.next_lane)

    def _lane_stream(self, epoch: int, lane: int) -> datasets.IterableDataset:
        from datasets.distributed import split_dataset_by_node

        stream = self.stream
        if self.shuffle_buffer > 0:
            interleave = max(1, min(self.interleave_shards, stream.num_shards))
            stream = stream.shuffle(
                self.seed, buffer_size=self.shuffle_buffer, max_buffer_input_shards=interleave
            )
        stream = split_dataset_by_node(stream, self.process_index, self.num_processes)
        if self.mode == "shards":
            stream = split_dataset_by_node(stream, lane, self.num_lanes)
        if self.shuffle_buffer > 0:
            stream.set_epoch(epoch)  # a fresh object per call, so its shared epoch counter is ours alone
        return stream

    def _examples(self, lane: int, epoch: int, cursor: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(epoch, ordinal, raw example) of one lane from (epoch, cursor) on; forever when infinite."""
        while True:
            rows = itertools.islice(_rows(self._lane_stream(epoch, lane), self.read_batch_size), cursor, None)
            empty = True
            for ordinal, example in enumerate(rows, start=cursor):
                empty = False
                yield epoch, ordinal, example
            if not self.infinite:
                return
            if empty and cursor == 0:
                raise DataError(
                    f"lane {lane} of process {self.process_index} has no examples; use fewer workers"
                )
            epoch, cursor = epoch + 1, 0

    def _chunks(self, lane: int, epoch: int, cursor: int) -> Iterator[list[tuple[int, int, dict[str, Any]]]]:
        """Examples grouped by (epoch, ordinal // chunk_size), so boundaries do not move on resume."""
        for _, group in itertools.groupby(
            self._examples(lane, epoch, cursor), key=lambda item: (item[0], item[1] // self.chunk_size)
        ):
            yield list(group)

    def _process(self, lane: int, index: int, chunk: list[tuple[int, int, dict[str, Any]]]) -> _Chunk:
        items, samples = [], []
        for epoch, ordinal, example in chunk:
            rng = sample_rng(self.seed, epoch, self.process_index, lane, ordinal)
            sample = self.make_sample(example, rng)
            if isinstance(sample, str):
                items.append((epoch, ordinal, sample))
            elif isinstance(sample, Mapping):
                items.append((epoch, ordinal, None))
                samples.append(sample)
            else:
                raise TypeError(
                    f"make_sample must return a dict of tensors or a reason string, got {type(sample)}"
                )
        return _Chunk(lane, index, items, collate_samples(samples) if samples else {})

    def __iter__(self) -> Iterator[_Chunk]:
        if self.mode is None:
            raise RuntimeError("iterate StreamingSamples through build_dataloader(...)")
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            import fsspec.asyn

            fsspec.asyn.reset_lock()  # forked workers must not inherit the parent's fsspec event loop lock
        start = self._start.tolist()
        if self.mode == "chunks":
            for index, chunk in enumerate(self._chunks(0, *start[0])):
                if index % num_workers == worker:
                    yield self._process(0, index, chunk)
            return
        if num_workers != self.num_lanes:
            raise RuntimeError(
                f"worker_split='shards' was set up for {self.num_lanes} workers, not {num_workers}"
            )
        lane = (worker + int(self._start_lane)) % self.num_lanes
        for index, chunk in enumerate(self._chunks(lane, *start[lane])):
            yield self._process(lane, index, chunk)


def default_num_workers() -> int:
    """min(8, CPUs available to this process - 1): one core stays with the training loop."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus - 1))


class StreamLoader:
    """Batches of a `StreamingSamples`, in an order that does not depend on DataLoader worker timing.

    Iterating yields dicts of (B, ...) tensors. `state_dict()` is the position after the last batch
    yielded; `state_dict(consumed_batches=k)` the position after batch k (counted over the whole run,
    resumed batches included), kept for the last `history` batches.
    """

    def __init__(
        self,
        samples: StreamingSamples,
        dataloader: torch.utils.data.DataLoader,
        batch_size: int,
        drop_last: bool = True,
        worker_split: str = "auto",
        history: int = 64,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if worker_split not in WORKER_SPLITS:
            raise ValueError(f"worker_split must be one of {WORKER_SPLITS}, got {worker_split!r}")
        self.samples, self.dataloader = samples, dataloader
        self.batch_size, self.drop_last, self.worker_split = batch_size, drop_last, worker_split
        self._history: deque[tuple[int, dict[str, Any]]] = deque(maxlen=history)

    @property
    def skips(self) -> SkipCounter:
        return self.samples.position.skips

    def state_dict(self, consumed_batches: int | None = None) -> dict[str, Any]:
        if consumed_batches is None:
            return self.samples.state_dict()
        for batches, state in reversed(self._history):
            if batches == consumed_batches:
                return state
        kept = [batches for batches, _ in self._history]
        raise ValueError(f"no stream position kept for {consumed_batches} consumed batches (kept: {kept})")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.samples.load_state_dict(state)
        self._history.clear()

    def _layout(self) -> tuple[str, int]:
        workers = max(1, self.dataloader.num_workers)
        mode, saved = self.worker_split, self.samples.position.mode
        if mode == "auto":
            shards = self.samples.stream.num_shards
            divisible = workers > 1 and shards % (workers * self.samples.num_processes) == 0
            mode = saved or ("shards" if divisible else "chunks")
        if saved is not None and saved != mode:
            raise ValueError(
                f"the stream state was saved with worker_split={saved!r}; resume with the same value"
            )
        lanes = workers if mode == "shards" else 1
        saved_lanes = len(self.samples.position.lanes)
        if saved_lanes and saved_lanes != lanes:
            raise ValueError(
                f"the stream state was saved with worker_split='shards' and num_workers={saved_lanes}; "
                f"resume with num_workers={saved_lanes}"
            )
        return mode, lanes

    def _chunks_in_order(self) -> Iterator[_Chunk]:
        """Chunks from the DataLoader, checking that each lane's chunks arrive in sequence."""
        expected: dict[int, int] = {}
        for index, chunk in enumerate(self.dataloader):
            want = index if self.samples.mode == "chunks" else expected.get(chunk.lane, 0)
            if chunk.index != want:
                raise RuntimeError(f"chunk {chunk.index} of lane {chunk.lane} arrived when {want} was due")
            expected[chunk.lane] = chunk.index + 1
            yield chunk

    def _emit(self, pieces: list[list[Any]]) -> dict[str, torch.Tensor]:
        """Batch from pieces [samples, start, stop] of chunks; a whole chunk passes through uncopied."""
        position = self.samples.position
        position.batches += 1
        position.samples += sum(stop - start for _, start, stop in pieces)
        self._history.append((position.batches, position.to_dict()))
        first, start, stop = pieces[0]
        if len(pieces) == 1 and start == 0 and stop == len(next(iter(first.values()))):
            return first
        batch = {key: torch.cat([samples[key][a:b] for samples, a, b in pieces]) for key in first}
        pinned = self.dataloader.pin_memory and torch.cuda.is_available()
        return {key: value.pin_memory() for key, value in batch.items()} if pinned else batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        samples = self.samples
        samples.configure(*self._layout(), chunk_size=self.batch_size)
        position = samples.position
        self._history.append((position.batches, position.to_dict()))
        pieces: list[list[Any]] = []
        count = 0
        for chunk in self._chunks_in_order():
            taken = 0
            for item_index, (epoch, ordinal, reason) in enumerate(chunk.items):
                position.lanes[chunk.lane] = [epoch, ordinal + 1]
                position.skips.add(reason)
                if reason is not None:
                    position.skips.check(samples.min_seen, samples.max_bad_fraction)
                    continue
                if pieces and pieces[-1][0] is chunk.samples:
                    pieces[-1][2] += 1
                else:
                    pieces.append([chunk.samples, taken, taken + 1])
                taken, count = taken + 1, count + 1
                if count == self.batch_size:
                    rest = item_index + 1 < len(chunk.items)
                    position.next_lane = chunk.lane if rest else (chunk.lane + 1) % samples.num_lanes
                    yield self._emit(pieces)
                    pieces, count = [], 0
        if pieces and not self.drop_last:
            yield self._emit(pieces)
        samples.set_epoch(max(epoch for epoch, _ in position.lanes) + 1)


def build_dataloader(
    samples: StreamingSamples,
    batch_size: int,
    num_workers: int | None = None,
    pin_memory: bool | None = None,
    prefetch_factor: int | None = 2,
    persistent_workers: bool = False,
    drop_last: bool = True,
    worker_split: str = "auto",
) -> StreamLoader:
    """A `StreamLoader` of `batch_size` batches over `samples`.

    `num_workers=None` uses `default_num_workers()`, `pin_memory=None` pins only when CUDA is available.
    `worker_split` "auto" picks "shards" when the stream's shards divide evenly over all workers of all
    processes, else "chunks" (see the module docstring for what each guarantees). Do not pass the result
    to `accelerator.prepare`: it already holds only this process's share.
    """
    num_workers = default_num_workers() if num_workers is None else num_workers
    pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
    dataloader = torch.utils.data.DataLoader(
        samples,
        batch_size=None,  # chunks are already stacked in the workers
        collate_fn=_identity,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=persistent_workers and num_workers > 0,
        in_order=True,  # round-robin over workers: the order the chunk assignment relies on
        # Each new iterator draws a seed from this generator; a private one keeps the global RNG (drop path,
        # dropout) untouched, so a resumed run, which starts a new iterator, repeats the uninterrupted one.
        generator=torch.Generator(),
    )
    return StreamLoader(samples, dataloader, batch_size, drop_last=drop_last, worker_split=worker_split)
