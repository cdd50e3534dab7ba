"""The Python API behind the commands. Nothing here imports torch."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager

from statecli.formats import read_raw
from statecli.records import Report
from statecli.roles import resolve


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small objects.

    Reading a 100,000-tensor checkpoint allocates millions of objects, none in reference cycles; the
    collector would rescan all of them again and again (measured: about a third of the time).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def open_checkpoint(path: str | os.PathLike[str]) -> Report:
    """Read a checkpoint's metadata (never its tensor bytes, never its code) and resolve every role.

    Raises a :class:`statecli.StatecliError` subclass, carrying its exit code, on any bad input.
    """
    with gc_paused():
        return resolve(read_raw(os.fspath(path)))
