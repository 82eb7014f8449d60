"""Run records: atomic JSON files, a JSON-lines metrics log, throughput and a main-process progress bar.

Only the main process writes or draws; the others get no-op objects, so scripts call these
unconditionally.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old file or the new one, never a torn one.

    The text goes to a temporary file in the same folder, is fsynced, then ``os.replace``s the target.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_jsonable(value: Any) -> Any:
    """Tensors and NumPy scalars/arrays become Python numbers/lists; non-finite floats become ``None``.

    ``None`` keeps the output strict JSON (``NaN`` is not), which ``jq`` and other readers require.
    """
    if hasattr(value, "tolist") and callable(value.tolist):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Atomically write ``obj`` as strict JSON (see ``to_jsonable``)."""
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=indent, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


class MetricsLogger:
    """Append one JSON object per ``log`` call to ``output_dir/metrics.jsonl`` on the main process.

    Each line holds ``step``, ``time`` (Unix seconds) and the given values; the file is flushed after
    every line so a crash loses nothing already logged. An existing file is appended to, which keeps
    the history of a resumed run in one place; with ``keep_through=step`` (the step a run resumes from)
    its lines past that step, logged after the checkpoint by a run that was then killed, are dropped
    first, so the file holds each step once.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        accelerator: Any = None,
        filename: str = "metrics.jsonl",
        keep_through: int | None = None,
    ):
        self.path = Path(output_dir) / filename
        self.enabled = accelerator is None or accelerator.is_main_process
        self._file = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if keep_through is not None and self.path.is_file():
                truncate_metrics(self.path, keep_through)
            self._file = open(self.path, "a")  # closed by close() / the with block

    def log(self, step: int, **values: Any) -> dict[str, Any] | None:
        """Write ``{"step": step, "time": now, **values}``; returns the record (``None`` off the main process)."""
        if self._file is None:
            return None
        record = to_jsonable({"step": int(step), "time": round(time.time(), 3), **values})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def truncate_metrics(path: str | os.PathLike, keep_through: int) -> int:
    """Atomically drop the lines of a metrics.jsonl past step ``keep_through`` (and a torn last line);
    returns how many were dropped."""
    lines = Path(path).read_text().splitlines()
    kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= keep_through]
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line a kill cut short."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class ThroughputMeter:
    """Images per second over the last ``window`` updates.

    Call ``update(n)`` once per step with the images that step processed (all processes together for a
    global rate). On GPUs the timing is honest only if the step synchronises with the host, which the
    per-step loss check (``NonFiniteGuard``) does.
    """

    def __init__(self, window: int = 20, now: float | None = None):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._marks: deque[tuple[float, int]] = deque(maxlen=window + 1)
        self.total = 0
        self.reset(now)

    def reset(self, now: float | None = None) -> None:
        """Start a new window at ``now`` (e.g. after an evaluation pause that should not count)."""
        self._marks.clear()
        self._marks.append((time.perf_counter() if now is None else now, 0))

    def update(self, num_images: int, now: float | None = None) -> None:
        self._marks.append((time.perf_counter() if now is None else now, int(num_images)))
        self.total += int(num_images)

    @property
    def rate(self) -> float:
        """Images/s over the window; 0.0 before the first update."""
        if len(self._marks) < 2:
            return 0.0
        elapsed = self._marks[-1][0] - self._marks[0][0]
        images = sum(n for _, n in list(self._marks)[1:])
        return images / elapsed if elapsed > 0 else 0.0


def progress_bar(total: int | None, accelerator: Any = None, desc: str = "", initial: int = 0) -> tqdm:
    """A tqdm bar drawn by the main process only (the others get a disabled bar with the same API)."""
    disable = accelerator is not None and not accelerator.is_main_process
    return tqdm(total=total, desc=desc, initial=initial, disable=disable, dynamic_ncols=True)
