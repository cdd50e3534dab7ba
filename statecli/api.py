"""The Python API behind the commands. Nothing here imports torch."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager

from statecli.errors import LimitExceededError
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

    Raises a :class:`statecli.StatecliError` subclass, carrying its exit code, on any bad input; a file
    that needs more memory than the process may have is one (:class:`LimitExceededError`, exit 3).
    """
    name = os.fspath(path)
    try:
        with gc_paused():
            return resolve(read_raw(name))
    except MemoryError:
        pass  # raised below, once leaving this block has let go of the frames that hold the memory
    raise LimitExceededError("out of memory: reading it needs more memory than this process may use", path=name)
