"""Crash-safe checkpoints on top of ``accelerator.save_state`` / ``load_state``.

Layout under ``output_dir/checkpoints``::

    step-00001000/            a complete checkpoint
        model.safetensors, optimizer.bin, scheduler.bin, random_states_{rank}.pkl, ...   (accelerate)
        trainer_state.json    step, samples seen, data-stream state, resolved config, ...
        COMPLETE              written last: the step, the size and the SHA-256 of every file above
    .tmp-step-00002000/       a save in progress (or one a crash interrupted); never resumed from

A checkpoint is written under its temporary name and renamed by the main process once every process
has finished writing and ``COMPLETE`` is on disk, so a folder named ``step-*`` with a valid ``COMPLETE``
is always whole. ``validate_checkpoint`` also checks the recorded file sizes, which catches copies truncated
later, and, on resume, the SHA-256 of every file, which catches any corruption (hashing reads every byte: 1.6 s
per GB on one core, once when saving and once per resume). All processes must share the filesystem, as
accelerate itself assumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import load as accelerate_load

from ..interop.weight_files import unpickled_file, unpickling_reason, unpickling_refusal
from .config import config_diff
from .runlog import atomic_write_text, read_json, write_json

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
MARKER_FILE = "COMPLETE"
_NAME = re.compile(r"^step-(\d{8,})$")
_TMP = re.compile(r"^\.tmp-step-(\d{8,})$")
_RESERVED = ("step", "num_processes", "saved_at")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_path(path: Path) -> None:
    """fsync a file or a folder (the latter makes a rename durable); silently skipped where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_marker(folder: Path, step: int) -> None:
    """fsync everything in ``folder``, then write ``COMPLETE`` listing each file's size and SHA-256."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER_FILE)
    for path in files:
        _fsync_path(path)
    names = [p.relative_to(folder).as_posix() for p in files]
    manifest = {
        "step": step,
        "files": {name: p.stat().st_size for name, p in zip(names, files)},
        "sha256": {name: sha256_of(p) for name, p in zip(names, files)},
    }
    atomic_write_text(folder / MARKER_FILE, json.dumps(manifest, indent=1) + "\n")
    _fsync_path(folder)


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` (the same step saved again) is moved aside first."""
    old = dst.with_name(f".old-{dst.name}")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync_path(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    accelerator: Any,
    output_dir: str | os.PathLike,
    step: int,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Save the accelerator's registered objects and ``extra`` as ``output_dir/checkpoints/step-XXXXXXXX``.

    Call on every process at the same step. ``extra`` (JSON-serialisable: data-stream state, samples
    seen, ``config_to_dict(cfg)``, ...) goes to ``trainer_state.json`` next to ``step``. With
    ``keep_last=K`` only the newest K complete checkpoints are kept. Returns the checkpoint folder.
    """
    if accelerator.project_configuration.automatic_checkpoint_naming:
        raise ValueError(
            "save_checkpoint names folders itself; create the Accelerator without automatic_checkpoint_naming"
        )
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    extra = dict(extra or {})
    clash = [k for k in _RESERVED if k in extra]
    if clash:
        raise ValueError(f"extra must not set {', '.join(clash)}; save_checkpoint records them itself")
    state = {"step": int(step), "num_processes": accelerator.num_processes, "saved_at": time.time(), **extra}
    try:
        json.dumps(state, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"extra must be JSON-serialisable: {err}") from None

    root = Path(output_dir) / CHECKPOINTS_DIR
    tmp, final = root / f".tmp-{checkpoint_name(step)}", root / checkpoint_name(step)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a save that crashed at this step
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # main writes model/optimizer/scheduler; every rank its RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / STATE_FILE, state)
        _write_marker(tmp, step)
        _replace_dir(tmp, final)
        if keep_last is not None:
            prune_checkpoints(output_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def validate_checkpoint(path: str | os.PathLike, verify_hashes: bool = False) -> str | None:
    """Why ``path`` cannot be resumed from (one line), or ``None`` when it is a complete checkpoint.

    Checks the files ``COMPLETE`` lists and their sizes; with ``verify_hashes`` also their SHA-256 (checkpoints
    written before hashes were recorded are checked by size only).
    """
    path = Path(path)
    if not path.is_dir():
        return "not a folder"
    if _TMP.match(path.name):
        return "unfinished save (temporary folder)"
    marker = path / MARKER_FILE
    if not marker.is_file():
        return f"no {MARKER_FILE} marker: the save was interrupted"
    try:
        manifest = json.loads(marker.read_text())
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError):
        return f"unreadable {MARKER_FILE} marker"
    for rel, size in files.items():
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing"
        if file.stat().st_size != size:
            return f"{rel} is {file.stat().st_size} bytes, expected {size} (truncated copy?)"
    hashes = manifest.get("sha256") if verify_hashes else None
    for rel, digest in (hashes or {}).items():
        if sha256_of(path / rel) != digest:
            return f"{rel} does not match the SHA-256 in {MARKER_FILE} (corrupted since it was saved)"
    try:
        state = read_json(path / STATE_FILE)
    except (OSError, ValueError):
        return f"unreadable {STATE_FILE}"
    if state.get("step") != manifest.get("step"):
        return f"{STATE_FILE} says step {state.get('step')} but {MARKER_FILE} says {manifest.get('step')}"
    return None


def _candidates(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) for every ``step-*`` and ``.tmp-step-*`` folder, newest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name) or _TMP.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found, key=lambda item: (item[0], item[1].name.startswith("step-")), reverse=True)


def find_latest_checkpoint(
    output_dir: str | os.PathLike, verify_hashes: bool = False
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint (or ``None``) and every incomplete folder, with the reason it is skipped.

    ``verify_hashes`` hashes the candidates newer than the one returned and that one, not the older ones.
    """
    latest, skipped = None, []
    for _, folder in _candidates(output_dir):
        reason = validate_checkpoint(folder, verify_hashes=verify_hashes and latest is None)
        if reason is not None:
            skipped.append((folder, reason))
        elif latest is None:
            latest = folder
    return latest, skipped


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [
        f
        for _, f in reversed(_candidates(output_dir))
        if _NAME.match(f.name) and validate_checkpoint(f) is None
    ]


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints; returns the deleted folders.

    Incomplete folders are left alone so ``find_latest_checkpoint`` keeps reporting them.
    """
    doomed = complete_checkpoints(output_dir)[:-keep_last]
    for folder in doomed:
        shutil.rmtree(folder)
    return doomed


def resolve_resume(output_dir: str | os.PathLike, resume_from: str | os.PathLike | None) -> Path | None:
    """Map ``--resume-from`` to a checkpoint folder.

    ``None`` / ``""`` / ``"none"``: start fresh. ``"latest"``: the newest complete checkpoint in
    ``output_dir`` whose files match their SHA-256 (``None`` if there is none yet; skipped folders are
    logged, naming the file at fault). A path: that checkpoint, which must be complete and intact.
    """
    if resume_from is None or str(resume_from).strip().lower() in ("", "none"):
        return None
    if str(resume_from) == "latest":
        latest, skipped = find_latest_checkpoint(output_dir, verify_hashes=True)
        for folder, reason in skipped:
            logger.warning("skipping checkpoint %s: %s", folder, reason)
        return latest
    path = Path(resume_from)
    if not path.exists():
        raise ValueError(f"--resume-from {path} does not exist; pass a step-* folder, 'latest' or none")
    reason = validate_checkpoint(path, verify_hashes=True)
    if reason is not None:
        raise ValueError(
            f"cannot resume from {path}: {reason}; pass 'latest' to use the newest complete checkpoint"
        )
    return path


def load_checkpoint(accelerator: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Restore the accelerator's registered objects from a complete checkpoint; returns trainer_state.

    Pickles are read with ``weights_only=True`` (accelerate's default): one that holds other objects is refused
    in one line naming the file and the object. A random state that cannot be restored is an error naming the
    file (accelerate only logs it), since the resumed run would no longer repeat the uninterrupted one.
    """
    path = Path(path)
    reason = validate_checkpoint(path)
    if reason is not None:
        raise ValueError(f"cannot resume from {path}: {reason}")
    state = read_json(path / STATE_FILE)
    saved_procs = state.get("num_processes")
    if saved_procs is not None and saved_procs != accelerator.num_processes:
        logger.warning(
            "checkpoint %s was saved by %s processes, now %s: random states of missing ranks are not restored",
            path,
            saved_procs,
            accelerator.num_processes,
        )
    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as err:
        raise ValueError(unpickling_refusal(unpickled_file(err), err)) from None
    if saved_procs in (None, accelerator.num_processes):
        _check_random_state(path / f"random_states_{accelerator.process_index}.pkl")
    return state


def _check_random_state(file: Path) -> None:
    """Raise if ``file`` is not the torch random state now in effect (accelerate swallows a failed restore)."""
    try:
        restored = torch.equal(torch.get_rng_state(), accelerate_load(file)["torch_manual_seed"])
        why = "it differs from the state accelerate restored"
    except Exception as err:  # accelerate met the same error and only logged it
        if isinstance(err, pickle.UnpicklingError) and "GLOBAL" in str(err):
            raise ValueError(unpickling_refusal(file, err)) from None
        restored, why = False, unpickling_reason(err)
    if not restored:
        raise ValueError(
            f"cannot restore the random state from {file} ({' '.join(why.split())}); "
            "resume from another checkpoint (--resume-from PATH) or start a new --output-dir"
        )


def check_resume_compatible(
    saved_config: dict[str, Any], current_config: dict[str, Any], critical_keys: Sequence[str]
) -> None:
    """Raise a one-line ``ValueError`` naming every critical field that changed since the checkpoint."""
    diffs = config_diff(saved_config, current_config, critical_keys)
    if diffs:
        detail = ", ".join(
            f"{k} (checkpoint {saved_config.get(k)!r}, now {current_config.get(k)!r})" for k in diffs
        )
        raise ValueError(
            f"cannot resume: the config differs from the checkpoint's in {detail}; restore them or use a new --output-dir"
        )
