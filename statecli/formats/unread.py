"""Files statecli refuses to read, judged for what ``torch.load(weights_only=False)`` would run in them.

statecli refuses many files as unreadable (exit 3) that torch.load would still unpickle, payload first:

- torch.load treats every file that does not start with a zip header as a legacy checkpoint: it tries the
  torch < 0.4 tar layout (whose members hold pickles), then unpickles the file with plain ``pickle.load``
  from its first byte, expecting the magic number there and only complaining after. A plain pickle, a
  protocol-0 text pickle, a file that claims to be safetensors and is not, a legacy file whose magic number
  pickle carries a call: each runs its payload;
- in a zip, torch unpickles ``<root>/data.pkl`` (matched without regard to case, the first match) before
  it looks at anything statecli found wrong with the archive (a case twin, a second root, a storage that
  does not fit, a name over statecli's limits).

So before such a refusal stands, the pickles torch would unpickle are parsed with the restricted reader
(nothing is imported or called) and the file is refused as unsafe (exit 5) when they would run something.
"""

from __future__ import annotations

import mmap
import struct
import tarfile
import zipfile
from typing import Any

from statecli.dtypes import DTYPES, STORAGE_TYPES
from statecli.errors import InputError, StatecliError, UnsafeError
from statecli.formats.zipdir import MAX_DEFLATE_RATIO
from statecli.safepickle import MAX_INDEX, Action, Global, StorageRef
from statecli.security import findings_for, loads

MAX_PICKLE_BYTES = 1 << 30  # as torchzip's data.pkl cap: more is no checkpoint's metadata
MAX_TAR_PICKLES = 100_000  # pickles one tar member may chain (one per storage or tensor)
BOMB_PREFIX = 1 << 20  # of a zip bomb's data.pkl, the bytes judged


def refuse_if_torch_would_run(path: str, size: int, error: InputError, is_zip: bool) -> None:
    """Raise :class:`UnsafeError` if torch.load of ``path`` (which statecli refuses with ``error``) would run
    a payload: a zip's data.pkl pickles, a legacy tar file's pickles, or the pickles from byte 0 of any
    other file."""
    if is_zip:
        _judge_zip(path, error)
        return
    try:
        # torch's own order: the tar layout first (tarfile also takes the old V7 headers, without "ustar").
        with tarfile.open(path, mode="r:") as tar:
            _judge_tar(tar, path, error)
        return
    except UnsafeError:
        raise
    except Exception:  # no tar (or a broken one, which torch too gives up on): on to the pickle at byte 0
        pass
    try:
        # Mapped, the file is read by the page as the reader walks it: an unrecognised file of a gigabyte
        # costs the few pages before its first invalid opcode.
        with open(path, "rb") as f, mmap.mmap(f.fileno(), min(size, MAX_PICKLE_BYTES), access=mmap.ACCESS_READ) as data:
            verdict, pos = _Verdict(), 0
            # torch.load's legacy reader unpickles up to five pickles back to back (magic number, protocol,
            # system info, the object, the storage keys), each while the one before passed its check.
            for _ in range(5):
                got = _judge(verdict, data, pos, _inert_storage, path, error)
                if got is None:
                    break
                pos = got[1]
    except UnsafeError:
        raise
    except Exception:
        return  # unreadable here too: the caller's error says so


def _judge_zip(path: str, error: InputError) -> None:
    """Every member torch.load could unpickle as the archive's data.pkl (any ``<root>/data.pkl``, in any
    case), read with the standard library's zip reader, which takes case twins and duplicates as they are."""
    verdict = _Verdict()
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                name = info.filename.lower()
                if not (name.endswith("/data.pkl") and name.count("/") == 1):
                    continue
                # What statecli itself would read; of a member that expands more than that (a zip bomb), only
                # its first megabyte: a payload there is found, one behind a bomb's padding is not.
                n = min(info.file_size, MAX_PICKLE_BYTES)
                if info.file_size > MAX_DEFLATE_RATIO * max(info.compress_size, 1):
                    n = min(n, BOMB_PREFIX)
                try:
                    with z.open(info) as f:
                        data = f.read(n)
                except Exception:  # a member the standard library cannot inflate (zlib.error, ...): torch neither
                    continue
                _judge(verdict, data, 0, _inert_storage, path, error)
    except UnsafeError:
        raise
    except Exception:  # what the standard library cannot read as a zip, torch's reader does not either
        return


def _inert_storage(pid: Any) -> StorageRef:
    """A storage record that takes any view: the bytes are never read here, only what the pickle would do."""
    if isinstance(pid, tuple) and len(pid) >= 5 and isinstance(pid[1], Global):
        dtype = STORAGE_TYPES.get(pid[1].name, "uint8")
        return StorageRef("judged", dtype, "cpu", MAX_INDEX, MAX_INDEX)
    raise InputError("unexpected persistent id")


class _Verdict:
    """What a sequence of pickles would do, together."""

    def __init__(self) -> None:
        self.globals_seen: dict[tuple[str, str], int] = {}
        self.actions: list[Action] = []

    def add(self, u: Any) -> None:
        for key, n in u.globals_seen.items():
            self.globals_seen[key] = self.globals_seen.get(key, 0) + n
        self.actions.extend(u.actions.values())

    def refuse(self, path: str, error: InputError) -> None:
        # As for a pickle that fails (security.refuse_if_dangerous): a name alone counts only once the pickle
        # made or called something that could call it.
        named = self.globals_seen if self.actions else {}
        dangerous = [f.message for f in findings_for(named, self.actions) if f.level == "dangerous"]
        if dangerous:
            more = f" (and {len(dangerous) - 1} more)" if len(dangerous) > 1 else ""
            raise UnsafeError(
                f"{dangerous[0]}{more}; torch.load would unpickle this file (statecli does not read it: "
                f"{error.message})",
                path=path,
            ) from error


def _judge(verdict: _Verdict, data: Any, start: int, persistent: Any, path: str, error: InputError) -> Any:
    """Parse the pickle at ``start``, add what it would do to ``verdict``, and refuse the file once anything
    in it is dangerous. Returns (object, end offset), or None where the bytes are no (whole) pickle."""
    try:
        obj, u = loads(data, persistent, start=start)
    except UnsafeError as e:
        raise e.at(path) from error  # a payload, then bytes that are no pickle: ran before the failure
    except StatecliError:
        verdict.refuse(path, error)
        return None
    verdict.add(u)
    verdict.refuse(path, error)
    return obj, u.end


def _judge_tar(tar: tarfile.TarFile, path: str, error: InputError) -> None:
    """torch's loader for the torch < 0.4 tar layout unpickles, in this order: in member ``storages`` a
    count, then per storage a ``(key, location, storage_type)`` pickle followed by an int64 element count
    and the elements, then the storage views; in ``tensors`` a count, then per tensor a pickle followed by
    its shape and strides; then member ``pickle``. Each is judged; the walk stops where torch's would."""
    verdict = _Verdict()
    try:
        for name in ("storages", "tensors", "pickle"):
            try:
                member = tar.getmember(name)
            except KeyError:
                return  # torch fails here, before it unpickles anything more
            f = tar.extractfile(member)
            if f is None or member.size > MAX_PICKLE_BYTES:
                return
            data = f.read(member.size)
            if name == "pickle":
                _judge(verdict, data, 0, _inert_storage, path, error)
            elif not _judge_records(verdict, data, name, path, error):
                return
    finally:
        verdict.refuse(path, error)  # what was read before any failure still counts


def _judge_records(verdict: _Verdict, data: bytes, name: str, path: str, error: InputError) -> bool:
    """The count, the records and (for storages) the views of one member; False where torch would stop."""
    got = _judge(verdict, data, 0, None, path, error)
    if got is None or type(got[0]) is not int or not 0 <= got[0] <= MAX_TAR_PICKLES:
        return False
    count, pos = got
    for _ in range(count):
        got = _judge(verdict, data, pos, None, path, error)
        if got is None:
            return False
        args, pos = got
        if name == "storages":
            # The storage's elements: an int64 count, then count × the element size of its storage type.
            itemsize = _itemsize(args)
            if itemsize is None or pos + 8 > len(data):
                return False
            (n,) = struct.unpack_from("<q", data, pos)
            pos += 8 + n * itemsize
        else:
            # ndim (int32) and 4 bytes of padding, then ndim sizes, ndim strides and the offset (int64s).
            if pos + 8 > len(data):
                return False
            (ndim,) = struct.unpack_from("<i", data, pos)
            pos += 8 + 16 * ndim + 8
        if not 0 <= pos <= len(data):
            return False
    if name == "storages":
        return _judge(verdict, data, pos, None, path, error) is not None
    return True


def _itemsize(args: Any) -> int | None:
    if not (type(args) is tuple and len(args) == 3 and type(args[2]) is Global):
        return None
    dtype = STORAGE_TYPES.get(args[2].name)
    return DTYPES[dtype].itemsize if dtype in DTYPES else None
