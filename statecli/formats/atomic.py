"""Output files that appear whole or not at all.

Each output is first an anonymous file in the destination folder (Linux ``O_TMPFILE``): a crash, a
``kill -9`` or a full disk leaves nothing behind, not even a temporary name. Only when every file of the
conversion is written, flushed and checked are they given their names: a new output is linked straight to
its name. Where ``O_TMPFILE`` is missing (other systems, some filesystems) a hidden temporary file stands
in, removed on any error. Files get the mode a normal ``open()`` would give them (0666 less the umask),
not ``mkstemp``'s 0600.

Two moments can still leave a hidden file after a ``kill -9``: replacing an existing output (``--force``),
where the file is linked to a hidden name and then renamed over the old one, because a link cannot replace
a name; and the whole write, where the hidden temporary stands in for ``O_TMPFILE``. Those names say which
process made them, ``.statecli-<pid>-<where>-<token>.tmp`` (``where``: this machine, boot and process
namespace), so that :func:`remove_leftovers` can remove them on the next conversion into the folder once
that process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import platform
import re
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
    """A file being written in ``folder`` that becomes ``path`` only on :meth:`commit`.

    ``sync=False`` (``--no-sync``) never asks the kernel to put the bytes on disk: faster on scratch
    space, but a crash or power loss soon after can leave a named file that is empty or partly written."""

    def __init__(self, path: str, sync: bool = True) -> None:
        self.path = path
        self.sync = sync
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
                fd, self.temp_name = tempfile.mkstemp(prefix=_temp_prefix(), suffix=".tmp", dir=self.folder)
            except OSError as e:
                raise output_error(e, path) from e
        self.fd = fd
        self._unsynced = 0
        self._sync: Future[None] | None = None
        self._syncer: ThreadPoolExecutor | None = None
        self._final: Future[None] | None = None

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data``. Every so often the kernel is asked, from a worker thread, to start putting
        what is written on disk, so the final fsync has little left to wait for."""
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self._unsynced += n
        if self.sync and self._unsynced >= _SYNC_EVERY and (self._sync is None or self._sync.done()):
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

    def done_writing(self) -> None:
        """Nothing more will be written: start the final flush to disk in the background, so that the
        next file's work overlaps it. :meth:`finish` waits for it."""
        if self._final is not None or not self.sync:
            return
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="statecli-sync")
        self._final = self._syncer.submit(self._flush)

    def _flush(self) -> None:
        if self._sync is not None:
            self._sync.result()
        os.fchmod(self.fd, _umask_mode())
        if self.sync:
            os.fsync(self.fd)

    def finish(self) -> None:
        """Flush to disk and set the normal permissions; the file still has no name."""
        try:
            if self._final is not None:
                final, self._final = self._final, None
                final.result()
            else:
                self._flush()
            self._join_sync()
        except OSError as e:
            raise output_error(e, self.path) from e

    def _join_sync(self) -> None:
        if self._final is not None:
            final, self._final = self._final, None
            with contextlib.suppress(OSError):
                final.result()  # only on the way out (discard, close): commit runs after finish
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
                # A new output is linked straight to its name: no moment exists in which a kill leaves a
                # hidden file. A link cannot replace a name, though: an existing output (--force) is
                # replaced by linking to a hidden name and renaming that over it.
                if self._link(os.path.basename(self.path)):
                    self.temp_name = None
                    return
                staging = f"{_temp_prefix()}{self.fd}.tmp"
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.folder, staging))
                if not self._link(staging):
                    raise FileExistsError(errno.EEXIST, "staging name taken", staging)
                self.temp_name = os.path.join(self.folder, staging)
            os.replace(self.temp_name, self.path)
            self.temp_name = None
        except OSError as e:
            raise output_error(e, self.path) from e
        finally:
            self.close()

    def stage(self, name: str) -> str:
        """Give the finished file the hidden name ``name`` in its folder (a :func:`staging_name`) and
        return its path: another process (the one that started this worker) commits it with
        :func:`commit_staged` once every file of the conversion is written and checked."""
        target = os.path.join(self.folder, name)
        try:
            if self.temp_name is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(target)
                if not self._link(name):
                    raise FileExistsError(errno.EEXIST, "staging name taken", name)
            else:
                os.replace(self.temp_name, target)
                self.temp_name = None
        except OSError as e:
            raise output_error(e, self.path) from e
        finally:
            self.close()
        return target

    def _link(self, name: str) -> bool:
        """Give the anonymous file the name ``name`` in its folder; False when that name exists."""
        # linkat(AT_SYMLINK_FOLLOW) through /proc names the anonymous file; CPython only calls linkat (not
        # link, which would link the /proc symlink itself) when given a dir fd.
        dir_fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.link(f"/proc/self/fd/{self.fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
        except FileExistsError:
            return False
        finally:
            os.close(dir_fd)
        return True

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


def staging_name(owner: int, run: str, k: int) -> str:
    """The hidden name of output file ``k`` of conversion ``run``, written by a worker for the process
    ``owner``. It follows the leftover pattern: if ``owner`` is killed before it commits, the next
    conversion into the folder removes it (see :func:`remove_leftovers`)."""
    return f".statecli-{owner}-{_where()}-{run}f{k}.tmp"


def commit_staged(staged: str, path: str) -> None:
    """Give a staged file (see :meth:`PendingFile.stage`) its name, replacing what was there."""
    try:
        os.replace(staged, path)
    except OSError as e:
        raise output_error(e, path) from e


def discard_staged(folder: str, owner: int, run: str) -> None:
    """Remove every file staged for ``owner``'s conversion ``run`` (a worker died, or one failed)."""
    prefix = f".statecli-{owner}-{_where()}-{run}f"
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name.startswith(prefix) and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))


_LEFTOVER = re.compile(r"\.statecli-([0-9]{1,10})-([0-9a-f]{8})-[A-Za-z0-9_]{1,32}\.tmp")


@functools.cache
def _where() -> str:
    """Eight hex digits for where process ids mean something: this machine, its boot, its pid namespace.

    A process id alone says nothing about a file another machine (a shared folder) or another container
    made; such files are never judged."""
    parts = [platform.node()]
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as f:
        parts.append(f.read().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


def _temp_prefix() -> str:
    return f".statecli-{os.getpid()}-{_where()}-"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, the kernel only says whether the process exists
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, as another user's process
    return True


def remove_leftovers(folder: str, started: float) -> list[str]:
    """Remove the hidden files a killed conversion left in ``folder``; return their names.

    Only files that are certainly abandoned: named with this module's pattern by a process of this
    machine, boot and namespace that no longer runs, regular files of this user, and not changed since
    ``started`` (when the current run began). Anything else is left alone. POSIX only: elsewhere there is
    no harmless way to ask whether a process runs.
    """
    if os.name != "posix":
        return []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    removed = []
    for name in names:
        m = _LEFTOVER.fullmatch(name)
        if m is None or m.group(2) != _where():
            continue
        pid = int(m.group(1))
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            continue
        if st.st_mtime >= started or st.st_ctime >= started or pid == os.getpid() or _running(pid):
            continue
        try:
            os.unlink(path)
        except OSError:
            continue
        removed.append(name)
    return removed


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
