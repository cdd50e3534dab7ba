"""A small zip central-directory reader.

Why not ``zipfile``: it builds a ``ZipInfo`` object per member (a checkpoint of 100,000 tensors has
100,000 members, about a second here), and it would be parsed twice (detection, then reading). This
reads the central directory once into plain records, with ZIP64 support, and reads one member with
its size capped and its CRC checked. Only what torch archives use is supported: stored or deflated
members, one disk.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

from statecli.errors import InputError, LimitExceededError
from statecli.files import open_regular
from statecli.safepickle import printable

_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_LOCAL = struct.Struct("<4s5H3L2H")
MAX_CENTRAL_DIRECTORY = 1 << 30
# Deflate can shrink data ~1000x; torch pickles shrink ~5x. A member that claims to expand more than this
# (past the first MiB) is refused before anything is inflated: a zip bomb, not a checkpoint.
MAX_DEFLATE_RATIO = 100
_RATIO_SLACK = 1 << 20


@dataclass(slots=True)  # not frozen: its __init__ would cost 0.3 s for a 100,000-member archive
class Member:
    name: str
    header_offset: int
    compressed_size: int
    size: int
    method: int
    crc: int


def read_central_directory(path: str) -> dict[str, Member]:
    """Every member of the zip at ``path`` by name. Raises InputError on anything malformed."""
    try:
        with open_regular(path) as f:
            return _read(f, os.fstat(f.fileno()).st_size, path)
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror or e})", path=path) from e
    except struct.error as e:
        raise InputError(f"corrupt zip archive ({e})", path=path) from e


def _read(f, file_size: int, path: str) -> dict[str, Member]:  # type: ignore[no-untyped-def]
    tail_len = min(file_size, 65536 + _EOCD.size)
    f.seek(file_size - tail_len)
    tail = f.read(tail_len)
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
        f.seek(eocd64_pos)
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
    f.seek(cd_offset)
    cd = f.read(cd_size)
    if len(cd) != cd_size:
        raise InputError("truncated zip archive", path=path)
    members: dict[str, Member] = {}
    unpack = _CENTRAL.unpack_from
    pos = 0
    for _ in range(count):
        if pos + _CENTRAL.size > cd_size:
            raise InputError("corrupt zip archive (central directory ends early)", path=path)
        (sig, _, _, flags, method, _, _, crc, csize, usize, nlen, xlen, clen, _, _, _, offset) = unpack(cd, pos)
        if sig != b"PK\x01\x02":
            raise InputError("corrupt zip archive (bad central directory entry)", path=path)
        start = pos + _CENTRAL.size
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
        members[name] = Member(name, offset, csize, usize, method, crc)
    refuse_case_twins(members, path)
    return members


def refuse_case_twins(members: dict[str, Member], path: str) -> None:
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


def data_offset(f, m: Member, path: str) -> int:  # type: ignore[no-untyped-def]
    """Where ``m``'s bytes start, after its local header (whose name must match the directory's)."""
    f.seek(m.header_offset)
    head = f.read(_LOCAL.size)
    if len(head) < _LOCAL.size or head[:4] != b"PK\x03\x04":
        raise InputError(f"corrupt zip archive (bad local header for {printable(m.name)})", path=path)
    fields = _LOCAL.unpack(head)
    nlen, xlen = fields[9], fields[10]
    local_name = f.read(nlen)
    if local_name.decode("utf-8", "replace") != m.name and local_name.decode("cp437") != m.name:
        raise InputError(f"corrupt zip archive (local name differs from directory name {printable(m.name)})", path=path)
    return m.header_offset + _LOCAL.size + nlen + xlen


def read_member(path: str, m: Member, cap: int) -> bytes:
    """``m``'s bytes, never more than ``cap`` whatever the archive claims, CRC checked."""
    name = printable(m.name)
    if m.size > cap:
        raise LimitExceededError(f"{name} claims {m.size} bytes; the limit is {cap}", path=path)
    if m.method == 0 and m.compressed_size != m.size:
        raise InputError(
            f"corrupt zip archive ({name} is stored with {m.compressed_size} bytes, directory says {m.size})",
            path=path,
        )
    if m.method == 8 and m.size > MAX_DEFLATE_RATIO * m.compressed_size + _RATIO_SLACK:
        raise LimitExceededError(
            f"{name} would inflate {m.compressed_size} bytes to {m.size} (over {MAX_DEFLATE_RATIO}x): "
            "a zip bomb, not a checkpoint",
            path=path,
        )
    try:
        with open_regular(path) as f:
            f.seek(data_offset(f, m, path))
            if m.method == 0:
                data = f.read(m.compressed_size)
                if len(data) != m.compressed_size:
                    raise InputError(f"truncated zip archive ({name} is cut short)", path=path)
            elif m.method == 8:
                # Never more than the directory claims (plus one byte, to tell a lie): the claim was checked.
                d = zlib.decompressobj(-15)
                data = d.decompress(f.read(min(m.compressed_size, cap + 1)), m.size + 1)
                if len(data) > cap:
                    raise LimitExceededError(f"{name} expands past {cap} bytes", path=path)
            else:
                raise InputError(f"{name} uses zip compression method {m.method}, not supported", path=path)
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror or e})", path=path) from e
    except zlib.error as e:
        raise InputError(f"corrupt zip member {name} ({e})", path=path) from e
    if len(data) != m.size:
        raise InputError(f"corrupt zip member {name} ({len(data)} bytes, directory says {m.size})", path=path)
    if zlib.crc32(data) != m.crc:
        raise InputError(f"corrupt zip member {name} (CRC mismatch)", path=path)
    return data
