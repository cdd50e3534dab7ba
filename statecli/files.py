"""Opening the files a checkpoint names: regular files only.

A path in a checkpoint folder, an index or on the command line can be a FIFO (``open`` waits for a writer
that never comes: every command hangs), a character device (``/dev/zero`` and ``/dev/urandom`` never end;
their size is 0), or a socket. :func:`open_regular` opens without blocking (``O_NONBLOCK``: a FIFO opens
at once), checks the open file itself with ``fstat`` (no race with a swap after a ``stat``), and refuses
anything that is not a regular file with an :class:`~statecli.errors.InputError` (exit 3).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

from statecli.errors import InputError

try:
    import fcntl
except ImportError:  # Windows: no FIFOs to open without blocking
    fcntl = None  # type: ignore[assignment]

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # not on Windows, where a path cannot name a FIFO anyway
_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)


_KINDS = {
    stat.S_ISFIFO: "a FIFO",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISSOCK: "a socket",
    stat.S_ISDIR: "a directory",
    stat.S_ISREG: "a regular file",
}


def kind_of(mode: int) -> str:
    """What a file of ``mode`` is, in words: ``a FIFO``, ``a character device``, ``a directory``, ..."""
    return next((words for test, words in _KINDS.items() if test(mode)), "not a file")


def not_regular(path: str, mode: int, what: str = "") -> InputError:
    """The error for ``path`` (``what`` names it in the message, e.g. ``data file 'x.distcp'``)."""
    subject = f"{what} is" if what else "is"
    return InputError(f"{subject} {kind_of(mode)}, not a regular file", path=path)


def open_regular(path: str, what: str = "", buffering: int = -1) -> BinaryIO:
    """``path`` open for reading in binary, once the open file is proven a regular file.

    Raises :class:`~statecli.errors.InputError` for anything else (a FIFO, a device, a socket, a
    directory), and ``OSError`` as ``open`` does (missing, no permission): callers word those.
    """
    try:
        fd = os.open(path, _FLAGS | _NONBLOCK)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.EOPNOTSUPP, errno.EISDIR):
            # A socket cannot be opened at all (ENXIO); say what it is rather than "no such device".
            try:
                mode = os.stat(path).st_mode
            except OSError:
                raise e from None
            if not stat.S_ISREG(mode):
                raise not_regular(path, mode, what) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(path, mode, what)
        if _NONBLOCK and fcntl is not None:
            # Reads of a regular file never block; cleared so the file behaves as any other open file.
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def regular_size(path: str, what: str = "") -> int:
    """The size of ``path`` (symlinks followed) once it is a regular file; ``OSError`` as ``os.stat``."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise not_regular(path, st.st_mode, what)
    return st.st_size


__all__ = ["kind_of", "not_regular", "open_regular", "regular_size"]
