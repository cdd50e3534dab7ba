"""The Python API behind the commands. Nothing here imports torch."""

from __future__ import annotations

import os

from statecli.formats import read_raw
from statecli.records import Report
from statecli.roles import resolve


def open_checkpoint(path: str | os.PathLike[str]) -> Report:
    """Read a checkpoint's metadata (never its tensor bytes, never its code) and resolve every role.

    Raises a :class:`statecli.StatecliError` subclass, carrying its exit code, on any bad input.
    """
    return resolve(read_raw(os.fspath(path)))
