"""Batches of a `data.StreamingSamples` in an order that does not depend on DataLoader worker timing, with the
stream position after every batch (see `data` for how examples become batches and what a resume repeats).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.utils.data

from .decoding import SkipCounter
from .streaming import Chunk, StreamingSamples

WORKER_SPLITS = ("auto", "chunks", "shards")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _identity(chunk: Any) -> Any:
    return chunk


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn`: the worker ignores SIGTERM/SIGINT, which `timeout`, SLURM, `kill -- -PGID`
    and Ctrl-C send to the whole process group, so it keeps serving batches while the main process, which owns
    the stop, finishes its step and saves a checkpoint; the main process ends its workers itself."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by `stop_signals_held` while forking


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold SIGTERM/SIGINT back while DataLoader workers start: a forked worker inherits the block, so a signal to
    the group cannot kill it before `ignore_stop_signals` runs; the main process gets the held signal afterwards."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_num_workers() -> int:
    """min(8, CPUs available to this process - 1): one core stays with the training loop."""
    return max(0, min(8, available_cpus() - 1))


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

    def _chunks_in_order(self) -> Iterator[Chunk]:
        """Chunks from the DataLoader, checking that each lane's chunks arrive in sequence."""
        expected: dict[int, int] = {}
        with stop_signals_held():
            chunks = iter(self.dataloader)  # starts the workers
        for index, chunk in enumerate(chunks):
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
        worker_init_fn=ignore_stop_signals,
    )
    return StreamLoader(samples, dataloader, batch_size, drop_last=drop_last, worker_split=worker_split)
