"""A small zip central-directory reader.

Why not ``zipfile``: it builds a ``ZipInfo`` object per member (a checkpoint of 100,000 tensors has
100,000 members, about a second here), and it would be parsed twice (detection, then reading). This
reads the central directory once into plain records, with ZIP64 support, and reads one member with
its size capped and its CRC checked. Only what torch archives use is supported: stored or deflated
members, one disk, no encryption.

Every claim is checked against the bytes before it is believed. The directory says where each member
is and how big; torch's reader (miniz) and stream readers go by the member's local header as well, so
the local header (and the data descriptor after the bytes, which torch writes) must say the same:
method, flags, CRC, sizes and name. A stored member holds exactly the bytes it claims, inside the
archive, so no buffer is ever sized from a claim that the file cannot back. An archive stored inside
a member (a ``.pt2``'s pickled payloads) is read by the same code, with the same checks.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from statecli.clip import printable
from statecli.errors import InputError, LimitExceededError
from statecli.files import open_regular

_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s6H3L5H2L")
# The fields of a central directory entry the reader uses (signature, flags, method, CRC, sizes, the name's,
# extra field's and comment's lengths, offset), the others skipped as padding: fewer objects per member.
_CENTRAL_USED = struct.Struct("<4s4xHH4xLLLHHH8xL")
_LOCAL = struct.Struct("<4s5H3L2H")
_DESCRIPTOR32 = struct.Struct("<3L")
_DESCRIPTOR64 = struct.Struct("<LQQ")
MAX_CENTRAL_DIRECTORY = 1 << 30
# Deflate can shrink data ~1000x; torch pickles shrink ~5x. A member that claims to expand more than this
# (past the first MiB) is refused before anything is inflated: a zip bomb, not a checkpoint.
MAX_DEFLATE_RATIO = 100
_RATIO_SLACK = 1 << 20
STORED, DEFLATED = 0, 8
# General-purpose flags: 0 and 6 encryption, 3 sizes and CRC in a data descriptor after the bytes,
# 13 an encrypted central directory.
_ENCRYPTED = 0x0001 | 0x0040 | 0x2000
_DESCRIPTOR = 0x0008
# APPNOTE.TXT 4.4.5: the methods a zip may name. torch writes stored members (and deflated TorchScript code).
METHOD_NAMES = {
    1: "shrink",
    2: "reduce",
    3: "reduce",
    4: "reduce",
    5: "reduce",
    6: "implode",
    9: "deflate64",
    10: "PKWARE implode",
    12: "bzip2",
    14: "LZMA",
    18: "IBM TERSE",
    19: "IBM LZ77",
    93: "Zstandard",
    94: "MP3",
    95: "XZ",
    96: "JPEG",
    97: "WavPack",
    98: "PPMd",
    99: "AES encryption",
}


@dataclass(slots=True)  # not frozen: its __init__ would cost 0.3 s for a 100,000-member archive
class Member:
    name: str
    header_offset: int  # from the start of the file, also for a member of an archive stored inside another
    compressed_size: int
    size: int
    method: int
    crc: int
    flags: int = 0
    end: int = 1 << 63  # the member's bytes end at or before this file offset (its archive's directory)


# A member as the directory reader keeps it: Member's fields, in its order, as a plain tuple.
MEMBER_SIZE = 3  # the index of ``size`` in it


class Directory(Mapping[str, Member]):
    """A zip archive's members by name, each kept as a plain tuple of :class:`Member`'s fields and made a
    ``Member`` when it is asked for. A checkpoint of 100,000 tensors has 100,000 members, and the readers
    only ever need most of them for their size (:meth:`size`): a ``Member`` each cost as much as the rest
    of reading the directory."""

    __slots__ = ("_entries",)

    def __init__(self, entries: dict[str, tuple[str, int, int, int, int, int, int, int]]) -> None:
        self._entries = entries

    def __getitem__(self, name: str) -> Member:
        return Member(*self._entries[name])

    def get(self, name: str, default: Any = None) -> Any:
        entry = self._entries.get(name)
        return default if entry is None else Member(*entry)

    def size(self, name: str) -> int | None:
        """The uncompressed size of member ``name``, None when the archive holds none of that name."""
        entry = self._entries.get(name)
        return None if entry is None else entry[MEMBER_SIZE]

    @property
    def entries(self) -> dict[str, tuple[str, int, int, int, int, int, int, int]]:
        """The plain records by name (Member's fields in order), for readers that look up thousands: do not
        change them."""
        return self._entries

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def read_central_directory(path: str) -> Directory:
    """Every member of the zip at ``path`` by name. Raises InputError on anything malformed."""
    try:
        with open_regular(path) as f:
            return read_directory_at(f, 0, os.fstat(f.fileno()).st_size, path)
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror or e})", path=path) from e


def read_directory_at(f: Any, base: int, size: int, path: str) -> Directory:
    """Every member of the zip archive that is the ``size`` bytes at offset ``base`` of the open file
    ``f`` (a whole file, or a stored member holding an archive), with offsets from the file's start."""
    try:
        return _read(f, base, size, path)
    except struct.error as e:
        raise InputError(f"corrupt zip archive ({e})", path=path) from e


def _read(f: Any, base: int, file_size: int, path: str) -> Directory:
    tail_len = min(file_size, 65536 + _EOCD.size)
    f.seek(base + file_size - tail_len)
    tail = f.read(tail_len)
    if len(tail) != tail_len:
        raise InputError("truncated zip archive", path=path)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _EOCD.size > len(tail):
        raise InputError("corrupt or truncated zip archive (no end of central directory)", path=path)
    _, disk, _, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    eocd_pos = file_size - tail_len + at
    if count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
        loc = at - _EOCD64_LOCATOR.size
        if loc < 0 or tail[loc : loc + 4] != b"PK\x06\x07":
            raise InputError("corrupt zip archive (ZIP64 locator missing)", path=path)
        _, _, eocd64_pos, _ = _EOCD64_LOCATOR.unpack_from(tail, loc)
        if eocd64_pos + _EOCD64.size > file_size:
            raise InputError("corrupt zip archive (ZIP64 record past the end)", path=path)
        f.seek(base + eocd64_pos)
        rec = f.read(_EOCD64.size)
        if len(rec) < _EOCD64.size or rec[:4] != b"PK\x06\x06":
            raise InputError("corrupt zip archive (bad ZIP64 end record)", path=path)
        fields = _EOCD64.unpack(rec)
        count, cd_size, cd_offset = fields[7], fields[8], fields[9]
        eocd_pos = eocd64_pos
    if disk != 0:
        raise InputError("multi-disk zip archives are not supported", path=path)
    if cd_size > MAX_CENTRAL_DIRECTORY:
        raise LimitExceededError(f"zip central directory of {cd_size} bytes exceeds the limit", path=path)
    if cd_offset + cd_size > eocd_pos:
        raise InputError("corrupt or truncated zip archive (central directory past its end)", path=path)
    f.seek(base + cd_offset)
    cd = f.read(cd_size)
    if len(cd) != cd_size:
        raise InputError("truncated zip archive", path=path)
    members: dict[str, tuple[str, int, int, int, int, int, int, int]] = {}
    unpack = _CENTRAL_USED.unpack_from
    entry_size = _CENTRAL.size
    end = base + cd_offset
    pos = 0
    for _ in range(count):
        start = pos + entry_size
        if start > cd_size:
            raise InputError("corrupt zip archive (central directory ends early)", path=path)
        sig, flags, method, crc, csize, usize, nlen, xlen, clen, offset = unpack(cd, pos)
        if sig != b"PK\x01\x02":
            raise InputError("corrupt zip archive (bad central directory entry)", path=path)
        raw_name = cd[start : start + nlen]
        try:
            name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
        except UnicodeDecodeError:
            raise InputError("corrupt zip archive (a member name is not valid UTF-8)", path=path) from None
        if xlen and (usize == 0xFFFFFFFF or csize == 0xFFFFFFFF or offset == 0xFFFFFFFF):
            usize, csize, offset = _zip64_extra(cd[start + nlen : start + nlen + xlen], usize, csize, offset)
        pos = start + nlen + xlen + clen
        if name in members:
            raise InputError(f"zip archive holds {printable(name)} twice", path=path)
        if offset + csize > cd_offset:
            raise InputError(f"corrupt zip archive ({printable(name)} runs past the data area)", path=path)
        # Literals, not the names above: this runs once per member, 100,000 times for a large model.
        if method:
            if method != 8 or flags & 0x2041:
                _check_method(name, method, flags, path)  # not deflated, or encrypted
        elif csize != usize:
            # Checked here, for every member: a reader that sizes a buffer by the uncompressed size must
            # find that many bytes, and ``csize`` is within the file.
            raise InputError(
                f"corrupt zip archive ({printable(name)} is stored with {csize} bytes, directory says {usize})",
                path=path,
            )
        elif flags & 0x2041:
            _check_method(name, method, flags, path)  # encrypted
        members[name] = (name, base + offset, csize, usize, method, crc, flags, end)  # a Member's fields
    refuse_case_twins(members, path)
    return Directory(members)


def _check_method(name: str, method: int, flags: int, path: str) -> None:
    """Refuse what torch's zip reader cannot read and so no torch archive holds: encryption, and any
    compression other than stored or deflated."""
    if flags & _ENCRYPTED:
        raise InputError(f"{printable(name)} is encrypted, which torch archives never are", path=path)
    if method not in (STORED, DEFLATED):
        what = METHOD_NAMES.get(method)
        used = f"{what} compression" if what else f"zip compression method {method}"
        raise InputError(f"{printable(name)} uses {used}, which torch archives never use", path=path)


def refuse_case_twins(members: Mapping[str, Any], path: str) -> None:
    """torch's zip reader (miniz) finds records by name without regard to case: two names that differ only
    in case would let torch read a member other than the one statecli reads."""
    if len({name.lower() for name in members}) == len(members):
        return  # the common case, in one pass without a dict of originals
    seen: dict[str, str] = {}
    for name in members:
        key = name.lower()
        other = seen.get(key)
        if other is not None:
            raise InputError(
                f"zip archive holds {printable(other)} and {printable(name)}: torch matches record names "
                "without regard to case and could read the other one",
                path=path,
            )
        seen[key] = name


def _zip64_extra(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + size]
        if tag == 1:
            vals = list(struct.unpack_from(f"<{len(body) // 8}Q", body))
            if usize == 0xFFFFFFFF and vals:
                usize = vals.pop(0)
            if csize == 0xFFFFFFFF and vals:
                csize = vals.pop(0)
            if offset == 0xFFFFFFFF and vals:
                offset = vals.pop(0)
            break
        pos += 4 + size
    return usize, csize, offset


def data_offset(f: Any, m: Member, path: str) -> int:
    """Where ``m``'s bytes start in the open file ``f``, once its local header (and data descriptor, if
    any) are found to say what the directory says: name, method, encryption, CRC and sizes."""
    name = printable(m.name)
    # Name and extra fields in the same read: torch pads each header to 64 bytes with an extra field.
    head = _pread(f, m.header_offset, _LOCAL.size + 4 * len(m.name) + 128)  # UTF-8: at most 4 bytes a character
    if len(head) < _LOCAL.size or head[:4] != b"PK\x03\x04":
        raise InputError(f"corrupt zip archive (bad local header for {name})", path=path)
    _, _, flags, method, _, _, crc, csize, usize, nlen, xlen = _LOCAL.unpack_from(head)
    local_name = head[_LOCAL.size : _LOCAL.size + nlen]
    if local_name.decode("utf-8", "replace") != m.name and local_name.decode("cp437") != m.name:
        raise InputError(f"corrupt zip archive (local name differs from directory name {name})", path=path)
    start = m.header_offset + _LOCAL.size + nlen + xlen
    if start + m.compressed_size > m.end:
        raise InputError(f"corrupt zip archive ({name} runs past the data area)", path=path)
    if method != m.method or (flags & _ENCRYPTED) != (m.flags & _ENCRYPTED):
        raise InputError(
            f"corrupt zip archive (the local header of {name} says method {method}, flags {flags:#x}; the "
            f"directory says method {m.method}, flags {m.flags:#x})",
            path=path,
        )
    if csize == 0xFFFFFFFF or usize == 0xFFFFFFFF:
        extra = head[_LOCAL.size + nlen : _LOCAL.size + nlen + xlen]
        if len(extra) < xlen:
            extra = _pread(f, m.header_offset + _LOCAL.size + nlen, xlen)
        usize, csize, _ = _zip64_extra(extra, usize, csize, 0)
    claims = (crc, csize, usize)
    truth = (m.crc, m.compressed_size, m.size)
    if flags & _DESCRIPTOR:
        # The sizes and CRC follow the bytes; torch writes zeros in the header and fills in the descriptor.
        if any(c not in (0, t) for c, t in zip(claims, truth, strict=True)):
            _disagree(name, "local header", claims, truth, path)
        tail = _pread(f, start + m.compressed_size, 4 + _DESCRIPTOR64.size)
        if tail[:4] == b"PK\x07\x08":
            tail = tail[4:]
        short = _DESCRIPTOR32.unpack_from(tail) if len(tail) >= _DESCRIPTOR32.size else None
        long = _DESCRIPTOR64.unpack_from(tail) if len(tail) >= _DESCRIPTOR64.size else None
        if truth not in (short, long):
            _disagree(name, "data descriptor", short or (), truth, path)
    elif claims != truth:
        _disagree(name, "local header", claims, truth, path)
    return start


def _pread(f: Any, offset: int, n: int) -> bytes:
    """Up to ``n`` bytes at ``offset``: one system call for a real file, a seek and a read for others."""
    try:
        fd = f.fileno()
    except (AttributeError, OSError):  # io.BytesIO (an archive read into memory): UnsupportedOperation
        f.seek(offset)
        return bytes(f.read(n))
    return os.pread(fd, n, offset)


def _disagree(name: str, where: str, claims: tuple[int, ...], truth: tuple[int, int, int], path: str) -> None:
    if not claims:
        raise InputError(f"corrupt zip archive (the {where} of {name} is missing)", path=path)
    diffs = [
        (field, f"{c:#010x}" if field == "CRC" else c, f"{t:#010x}" if field == "CRC" else t)
        for field, c, t in zip(("CRC", "compressed size", "size"), claims, truth, strict=True)
        if c != t
    ]
    said = ", ".join(f"{field} {c}" for field, c, _ in diffs)
    truth_said = ", ".join(f"{field} {t}" for field, _, t in diffs)
    crc = "CRC mismatch: " if diffs[0][0] == "CRC" else ""
    raise InputError(
        f"corrupt zip archive ({crc}the {where} of {name} says {said}; the directory says {truth_said})", path=path
    )


def read_member(path: str, m: Member, cap: int) -> bytes:
    """``m``'s bytes, never more than ``cap`` whatever the archive claims, CRC checked."""
    try:
        with open_regular(path) as f:
            return read_member_from(f, m, cap, path)
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror or e})", path=path) from e


def read_member_from(f: Any, m: Member, cap: int, path: str) -> bytes:
    """``m``'s bytes from the open file ``f``, never more than ``cap`` whatever the archive claims,
    CRC checked. Every size is checked before a byte is read or a buffer made."""
    name = printable(m.name)
    if m.size > cap:
        raise LimitExceededError(f"{name} claims {m.size} bytes; the limit is {cap}", path=path)
    if m.method == DEFLATED and m.size > MAX_DEFLATE_RATIO * m.compressed_size + _RATIO_SLACK:
        raise LimitExceededError(
            f"{name} would inflate {m.compressed_size} bytes to {m.size} (over {MAX_DEFLATE_RATIO}x): "
            "a zip bomb, not a checkpoint",
            path=path,
        )
    _check_method(m.name, m.method, m.flags, path)
    try:
        f.seek(data_offset(f, m, path))
        if m.method == STORED:
            data = f.read(m.compressed_size)  # == m.size <= cap: checked with the directory
            if len(data) != m.compressed_size:
                raise InputError(f"truncated zip archive ({name} is cut short)", path=path)
        else:
            # Never more than the directory claims (plus one byte, to tell a lie): the claim was checked.
            d = zlib.decompressobj(-15)
            data = d.decompress(f.read(min(m.compressed_size, cap + 1)), m.size + 1)
            if len(data) > cap:
                raise LimitExceededError(f"{name} expands past {cap} bytes", path=path)
    except zlib.error as e:
        raise InputError(f"corrupt zip member {name} ({e})", path=path) from e
    if len(data) != m.size:
        raise InputError(f"corrupt zip member {name} ({len(data)} bytes, directory says {m.size})", path=path)
    if zlib.crc32(data) != m.crc:
        raise InputError(f"corrupt zip member {name} (CRC mismatch)", path=path)
    return data
