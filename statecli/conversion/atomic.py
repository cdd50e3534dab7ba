"""Output files that appear whole or not at all.

Each output is first an anonymous file in the destination folder (Linux ``O_TMPFILE``): a crash, a
``kill -9`` or a full disk leaves nothing behind, not even a temporary name. Only when every file of the
conversion is written, flushed and checked are they given their names. Where ``O_TMPFILE`` is missing
(other systems, some filesystems) a hidden ``.statecli-*.tmp`` file stands in, removed on any error.
Files get the mode a normal ``open()`` would give them (0666 less the umask), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import PurePath

from statecli.errors import OutputError


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def check_destination(path: str, force: bool, inputs: list[str]) -> None:
    """Refuse before any work: output onto an input, an existing output without --force, a folder that
    is missing, not a folder, or read-only."""
    real = os.path.realpath(path)
    for src in inputs:
        if real == os.path.realpath(src):
            raise OutputError("refusing to convert onto the input file; choose another output path", path=path)
    folder = os.path.dirname(os.path.abspath(path))
    problem = folder_problem(folder)
    if problem is not None:
        raise OutputError(problem, path=path)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {folder} is not writable", path=path)
    if os.path.lexists(path):
        if os.path.isdir(path):
            raise OutputError("output path is a folder", path=path)
        if not force:
            if os.path.islink(path) and not os.path.exists(path):
                # --force replaces the link itself (a rename), never the file it names: say so.
                raise OutputError(
                    f"output path is a broken symbolic link (to {_link_target(path)}); "
                    "pass --force to replace the link",
                    path=path,
                )
            raise OutputError("output exists; pass --force to replace it", path=path)


def folder_problem(folder: str) -> str | None:
    """Why new files cannot be made in ``folder`` (an absolute path), or None when it is a folder. The
    first part of the path that is not a folder is named, with what it is: missing, a file, a link to a
    file, a broken link."""
    if os.path.isdir(folder):
        return None
    for part in [*map(str, reversed(PurePath(folder).parents)), folder]:
        try:
            st = os.stat(part)
        except FileNotFoundError:
            if os.path.islink(part):
                what = f"{part} is not a folder (it is a broken symbolic link to {_link_target(part)})"
                break
            return f"output folder {folder} does not exist"
        except OSError as e:
            return f"output folder {folder} cannot be reached ({part}: {e.strerror or e})"
        if stat.S_ISDIR(st.st_mode):
            continue
        if os.path.islink(part):
            to = f"the file {_link_target(part)}" if stat.S_ISREG(st.st_mode) else _link_target(part)
            what = f"{part} is not a folder (it is a symbolic link to {to})"
        elif stat.S_ISREG(st.st_mode):
            what = f"{part} is not a folder (it is a file)"
        else:
            what = f"{part} is not a folder"
        break
    else:
        return f"output folder {folder} is not a folder"  # changed while it was looked at
    return f"output folder {what}" if part == folder else f"output folder {folder} does not exist: {what}"


def _link_target(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


class PendingFile:
    """A file being written in ``folder`` that becomes ``path`` only on :meth:`commit`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path)) or "."
        self.temp_name: str | None = None
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
        tmpfile = getattr(os, "O_TMPFILE", 0)
        fd = -1
        if tmpfile and os.path.isdir("/proc/self/fd"):
            try:
                fd = os.open(self.folder, flags | tmpfile, 0o600)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                    raise output_error(e, path) from e
        if fd < 0:
            try:
                fd, self.temp_name = tempfile.mkstemp(prefix=".statecli-", suffix=".tmp", dir=self.folder)
            except OSError as e:
                raise output_error(e, path) from e
        self.fd = fd
        self._unsynced = 0
        self._sync: Future[None] | None = None
        self._syncer: ThreadPoolExecutor | None = None

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data``. Every so often the kernel is asked, from a worker thread, to start putting
        what is written on disk, so the final fsync has little left to wait for."""
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self._unsynced += n
        if self._unsynced >= _SYNC_EVERY and (self._sync is None or self._sync.done()):
            if self._sync is not None:
                self._sync.result()  # raises the OSError (no space, ...) the last sync met
            if self._syncer is None:
                self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="statecli-sync")
            self._sync = self._syncer.submit(_datasync, self.fd)
            self._unsynced = 0

    def pwrite(self, data: bytes, offset: int) -> None:
        """Overwrite bytes already written (a zip member's CRC): all of ``data``, whatever pwrite returns."""
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    @property
    def readable_path(self) -> str:
        """A path that reads the file as written so far (to check it before it is named)."""
        return self.temp_name if self.temp_name is not None else f"/proc/self/fd/{self.fd}"

    def finish(self) -> None:
        """Flush to disk and set the normal permissions; the file still has no name."""
        try:
            self._join_sync()
            os.fchmod(self.fd, _umask_mode())
            os.fsync(self.fd)
        except OSError as e:
            raise output_error(e, self.path) from e

    def _join_sync(self) -> None:
        if self._sync is not None:
            sync, self._sync = self._sync, None
            sync.result()
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)
            self._syncer = None

    def commit(self) -> None:
        """Give the file its name, replacing what was there (the caller checked --force)."""
        try:
            if self.temp_name is None:
                # A link cannot replace a file: link to a fresh hidden name, then rename over.
                staging = os.path.join(self.folder, f".statecli-{os.getpid()}-{self.fd}.tmp")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(staging)
                # linkat(AT_SYMLINK_FOLLOW) through /proc names the anonymous file; CPython only calls
                # linkat (not link, which would link the /proc symlink itself) when given a dir fd.
                dir_fd = os.open(self.folder, os.O_RDONLY)
                try:
                    os.link(
                        f"/proc/self/fd/{self.fd}", os.path.basename(staging), dst_dir_fd=dir_fd, follow_symlinks=True
                    )
                finally:
                    os.close(dir_fd)
                self.temp_name = staging
            os.replace(self.temp_name, self.path)
            self.temp_name = None
        except OSError as e:
            raise output_error(e, self.path) from e
        finally:
            self.close()

    def discard(self) -> None:
        self.close()
        if self.temp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.temp_name)
            self.temp_name = None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._join_sync()  # a sync still running must not outlive its file descriptor
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


_SYNC_EVERY = 256 << 20


def _datasync(fd: int) -> None:
    getattr(os, "fdatasync", os.fsync)(fd)  # macOS has no fdatasync


def sync_folder(folder: str) -> None:
    """Make the new names durable (a rename lives in the folder's own metadata)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def output_error(e: OSError, path: str) -> OutputError:
    """The OutputError (exit 4) for an OSError met while writing ``path``."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError("no space left on the device; nothing was written", path=path)
    if e.errno == errno.EFBIG:
        return OutputError("file size limit reached (ulimit -f or the filesystem's); nothing was written", path=path)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write here ({e.strerror}); nothing was written", path=path)
    return OutputError(f"cannot write output ({e.strerror or e}); nothing was written", path=path)
