"""Data streams shared by pre-training and fine-tuning: feed the examples of a dataset to a training loop so
that a run can stop and resume exactly where it was. `sources` opens the stream and picks its columns, this
module turns one process's share of it into chunks of samples (`StreamingSamples`), and `loader` cuts the
chunks into batches and records the stream position (`StreamLoader`, `build_dataloader`).

How examples become batches:

    raw stream       sources.open_stream(): a `datasets.IterableDataset` with media decoding switched off
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

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.utils.data

from .decoding import DataError, SkipCounter, collate_samples, sample_rng

if TYPE_CHECKING:
    import datasets

MakeSample = Callable[[dict[str, Any], np.random.Generator], "dict[str, torch.Tensor] | str"]


@dataclass
class Chunk:
    """Consecutive examples of one lane after `make_sample`: `items[i] = (epoch, ordinal, skip reason or None)`,
    `samples` the usable ones stacked ((K, ...) tensors, K = number of None reasons)."""

    lane: int
    index: int
    items: list[tuple[int, int, str | None]]
    samples: dict[str, torch.Tensor]

    def pin_memory(self) -> Chunk:
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

    def _process(self, lane: int, index: int, chunk: list[tuple[int, int, dict[str, Any]]]) -> Chunk:
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
        return Chunk(lane, index, items, collate_samples(samples) if samples else {})

    def __iter__(self) -> Iterator[Chunk]:
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
