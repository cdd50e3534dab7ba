"""Legacy torch files (torch < 1.6, or ``torch.save(..., _use_new_zipfile_serialization=False)``).

The file is a stream (``torch/serialization.py``, ``_legacy_save``): five pickles, then the storages.

1. the magic number ``0x1950a86a20f9469cfc6c``; 2. the protocol version (1001); 3. ``sys_info``
   (byte order, C type sizes);
4. the object, whose storages are persistent ids ``('storage', <StorageType>, key, location, numel,
   view_metadata)`` and whose whole-module classes are ``('module', <class>, source_file, source)``;
5. the storage keys, sorted;

then, for each key in that order, an int64 element count and ``count × itemsize`` bytes.

All five pickles go through statecli's restricted reader (nothing is imported or called), and what
each would do is judged (torch.load unpickles all five with plain pickle); the storage records are
checked against the data section, which is walked by its length prefixes
without reading the bytes. The object is then walked like a ``torch.save`` zip's.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from statecli.clip import describe, quote
from statecli.dtypes import DTYPES
from statecli.errors import InputError, LimitExceededError, StatecliError, UnsafeError, UnsupportedFormatError
from statecli.files import open_regular
from statecli.formats.torchpickle import MAX_PICKLE_BYTES, Walker, finish, storage_dtype
from statecli.records import Finding, RawCheckpoint
from statecli.safepickle import Action, Limits, StorageRef
from statecli.security import findings_for, loads, refuse_if_dangerous
from statecli.wording import name_list

MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL = 1001
_COUNT = struct.Struct("<q")


class _LegacyStorages:
    """Storage records from persistent ids, checked against the data section once it is walked."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.refs: dict[str, StorageRef] = {}

    def __call__(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            # A whole-module save names the module's class (and its source text, which is never used).
            return pid[1]
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise InputError(f"corrupt pickle: unexpected persistent id {describe(pid)}", path=self.path)
        _, stype, key, location, numel, view = pid
        dtype = storage_dtype(stype, key, location, numel, self.path)
        if view is not None:
            raise UnsupportedFormatError("legacy storage views (torch < 0.4) are not read", path=self.path)
        if numel < 0 or numel > 2**62:
            raise InputError(f"storage {quote(key)} claims {describe(numel)} elements", path=self.path)
        ref = self.refs.get(key)
        if ref is None:
            ref = self.refs[key] = StorageRef(key, dtype, location[:64], numel, numel * DTYPES[dtype].itemsize)
        return ref


def _pickle_at(data: bytes, start: int, path: str, persistent: Any = None) -> tuple[Any, int, Any]:
    """The pickle starting at ``start``: (object, offset after it, unpickler)."""
    if start >= len(data):
        raise InputError("legacy torch file ends before its pickles do (truncated)", path=path)
    try:
        obj, u = loads(data, persistent, Limits(), start=start)  # not data[start:]: a copy of up to 1 GiB
    except StatecliError as e:
        raise e.at(path) from None
    return obj, u.end, u


def storage_spans(path: str) -> tuple[dict[str, tuple[int, int]], int]:
    """Each storage key's bytes as (file offset, byte count) from the count prefixes, and where the
    data section starts; used by :func:`read_legacy` and by convert to find the bytes."""
    raw, header_end = _read_pickles(path)
    keys = raw[4]
    return _walk_data(path, keys, raw[5], header_end)[0], header_end


class _Verdict:
    """What the five pickles together would do: torch.load unpickles every one of them with plain pickle, so
    a payload in the magic number's pickle runs as surely as one in the object's."""

    def __init__(self) -> None:
        self.globals_seen: dict[tuple[str, str], int] = {}
        self.actions: list[Action] = []
        self.object_bytes = 0  # the object pickle's size: the walk's record budget is paid from it

    def add(self, u: Any) -> None:
        for key, n in u.globals_seen.items():
            self.globals_seen[key] = self.globals_seen.get(key, 0) + n
        self.actions.extend(u.actions.values())


def _read_pickles(path: str) -> tuple[list[Any], int]:
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(min(size, MAX_PICKLE_BYTES))
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror or e})", path=path) from e
    verdict = _Verdict()
    try:
        return _read_five(data, path, size, verdict)
    except StatecliError as e:
        # torch.load ran the pickles before this one (and this one up to its failure): a payload among
        # them makes the file unsafe, not merely unreadable.
        if verdict.actions and not isinstance(e, UnsafeError):
            refuse_if_dangerous(verdict.globals_seen, verdict.actions, e)
        raise


def _read_five(data: bytes, path: str, size: int, verdict: _Verdict) -> tuple[list[Any], int]:
    magic, pos, u = _pickle_at(data, 0, path)
    verdict.add(u)
    if magic != MAGIC:
        raise InputError("not a legacy torch file (wrong magic number)", path=path)
    version, pos, u = _pickle_at(data, pos, path)
    verdict.add(u)
    if version != PROTOCOL:
        raise UnsupportedFormatError(
            f"legacy torch protocol {describe(version)} is not read (only {PROTOCOL})", path=path
        )
    sys_info, pos, u = _pickle_at(data, pos, path)
    verdict.add(u)
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise UnsupportedFormatError("a big-endian legacy torch file is not read", path=path)
    storages = _LegacyStorages(path)
    obj, pos, u = _pickle_at(data, pos, path, storages)
    verdict.add(u)
    verdict.object_bytes = u.end - u.start
    keys, pos, u = _pickle_at(data, pos, path)
    verdict.add(u)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise InputError("corrupt legacy torch file: the storage key list is not a list of strings", path=path)
    return [magic, version, sys_info, obj, keys, storages, verdict, size], pos


def _walk_data(
    path: str, keys: list[str], storages: _LegacyStorages, start: int
) -> tuple[dict[str, tuple[int, int]], int]:
    """Follow the count prefixes through the data section, checking each against its storage record."""
    spans: dict[str, tuple[int, int]] = {}
    pos = start
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            for key in keys:
                ref = storages.refs.get(key)
                if ref is None:
                    raise InputError(f"storage {quote(key)} is in the key list but no tensor uses it", path=path)
                f.seek(pos)
                head = f.read(8)
                if len(head) < 8:
                    raise InputError(f"legacy torch file ends before storage {quote(key)} (truncated)", path=path)
                (count,) = _COUNT.unpack(head)
                nbytes = count * DTYPES[ref.dtype].itemsize
                if count < 0 or pos + 8 + nbytes > size:
                    msg = f"storage {quote(key)} ({count} elements) runs past the end of the file (truncated)"
                    raise InputError(msg, path=path)
                if count < ref.numel:
                    msg = f"storage {quote(key)} holds {count} elements, its record claims {ref.numel}"
                    raise InputError(msg, path=path)
                spans[key] = (pos + 8, nbytes)
                pos += 8 + nbytes
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror or e})", path=path) from e
    missing = sorted(set(storages.refs) - set(keys))
    if missing:
        raise InputError(f"storage {quote(missing[0])} is used by a tensor but has no data", path=path)
    if len(keys) != len(set(keys)):
        raise InputError("corrupt legacy torch file: a storage key is listed twice", path=path)
    if len(keys) > 10_000_000:
        raise LimitExceededError("legacy torch file lists more than 10,000,000 storages", path=path)
    return spans, pos


def read_legacy(path: str) -> RawCheckpoint:
    """Read a legacy torch file's metadata without torch and without running its pickles."""
    (_, _, _, obj, keys, storages, verdict, size), data_start = _read_pickles(path)
    try:
        spans, end = _walk_data(path, keys, storages, data_start)
    except InputError as e:
        refuse_if_dangerous(verdict.globals_seen, verdict.actions, e)
        raise
    findings = findings_for(verdict.globals_seen, verdict.actions)
    findings.append(
        Finding(
            "info",
            "legacy-format",
            "legacy torch format (torch < 1.6 or _use_new_zipfile_serialization=False); torch.load still reads "
            "it, `statecli convert` writes the current format",
        )
    )
    if end < size:
        findings.append(Finding("warning", "trailing-data", f"{size - end} bytes after the last storage were ignored"))
    walker = Walker(path, verdict.object_bytes)
    container = walker.analyse(obj)
    raw = walker.result("torch-legacy", container, findings, size, {f"legacy/{k}": n for k, (_, n) in spans.items()})
    for t in raw.tensors:
        if t.storage is not None:
            t.storage = _legacy_key(t.storage)
        if t.quantizer is not None:
            t.quantizer = t.quantizer.moved(_legacy_key)
    keys_text = name_list(container.other_keys) or "none"
    return finish(raw, obj, f"no tensors found (top-level keys: {keys_text})")


def _legacy_key(storage: str) -> str:
    return "legacy/" + storage.removeprefix("data/")
