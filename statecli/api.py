"""The public Python API behind the commands. Nothing here imports torch."""

from __future__ import annotations

import os

from statecli.formats import read
from statecli.records import Report


def open_checkpoint(path: str | os.PathLike[str]) -> Report:
    """Read a checkpoint's metadata (never its tensor bytes, never its code) and resolve every role.

    Raises a :class:`statecli.StatecliError` subclass, carrying its exit code, on any bad input; a file
    that needs more memory than the process may have is one (:class:`LimitExceededError`, exit 3).
    """
    return read(os.fspath(path))
