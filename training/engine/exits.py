"""How the command-line scripts end. What the user can fix ends in one line `error: ...` on stderr and exit
status 2, never a traceback: a bad option or setting (ValueError), a file, folder or Hub request that failed
(OSError, which transformers raises for a folder with no model and huggingface_hub for a failed push), and a
pickle that torch.load(weights_only=True) refused.
A run stopped by SIGTERM/SIGINT (`StageInterrupted`) ends with status 0, its checkpoint kept.

The training scripts go through `engine.cli_main`, which adds status 1 for unusable data and divergence;
`user_errors` lets their setup report an unreadable model folder the same way.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
from collections.abc import Callable, Iterator
from typing import Any

from ..interop.weight_files import unpickled_file, unpickling_refusal


class StageInterrupted(RuntimeError):
    """A training stage stopped before its end (SIGTERM/SIGINT); its checkpoint is kept in its output folder."""


def one_line(error: BaseException) -> str:
    """The error's message on one line (its type name when it has none); for a pickle that
    torch.load(weights_only=True) refused, wherever it was read (transformers, accelerate), the refusal naming
    the file and the forbidden object, never torch's advice to load it unsafely."""
    if isinstance(error, pickle.UnpicklingError):
        return unpickling_refusal(unpickled_file(error), error)
    return " ".join(str(error).split()) or type(error).__name__


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise an OSError of the block (a missing or unreadable file or model folder, a failed Hub request) as
    a one-line ValueError, the exception the scripts report with status 2."""
    try:
        yield
    except OSError as error:
        raise ValueError(one_line(error)) from error


def exit_status(run: Callable[[], Any]) -> int:
    """Run a command line's work and return its exit status: `run`'s own when it returns an int, else 0; 2 with
    a one-line `error:` for a ValueError, an OSError or a refused pickle; 0 with a `stopped:` line for
    `StageInterrupted`."""
    try:
        result = run()
    except (ValueError, OSError, pickle.UnpicklingError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except StageInterrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        return 0
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
