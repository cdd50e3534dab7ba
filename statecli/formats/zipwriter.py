"""A minimal zip writer for torch.save archives: stored members, 64-byte aligned data, ZIP64 when needed.

torch's own writer (``PyTorchFileWriter``) takes whole storages, so every converted tensor would have to
exist at once. This one takes a member's bytes in chunks, which lets convert stream tensor by tensor.
Layout follows what torch writes (see ``torch/serialization.py`` and ``caffe2/serialize``): members are
stored (method 0), each member's data starts on a 64-byte boundary, padded with an extra field ``FB``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from statecli.errors import InputError

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

ALIGNMENT = 64
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<4sHHHHIIH")
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")
_EOCD64_LOCATOR = struct.Struct("<4sIQI")
_U32 = 0xFFFFFFFF
_DOS_DATE = 0x21  # 1980-01-01: fixed, so two conversions of one input give identical bytes


@dataclass(slots=True)
class _Entry:
    name: bytes
    offset: int
    size: int
    crc: int


class Sink(Protocol):
    """Where the archive goes: appended to in order, with one patch per member (its CRC)."""

    def write(self, data: bytes | memoryview) -> None: ...

    def pwrite(self, data: bytes, offset: int) -> None: ...


class ZipWriter:
    """Writes members one after another to ``sink``, a fresh file at offset 0."""

    def __init__(self, sink: Sink, force_zip64: bool = False) -> None:
        self.sink = sink
        self.pos = 0
        self.entries: list[_Entry] = []
        self.force_zip64 = force_zip64
        self._pool: ThreadPoolExecutor | None = None

    def _crc_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            # Here, not at the top: this module sits on inspect's import path, which needs no threads.
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="statecli-crc")
        return self._pool

    def add(self, name: str, size: int, chunks: Iterable[bytes | memoryview]) -> None:
        """Write member ``name`` whose data, ``size`` bytes in all, comes from ``chunks``."""
        raw_name = name.encode("utf-8")
        zip64 = self.force_zip64 or size >= _U32
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        header_end = self.pos + _LOCAL.size + len(raw_name) + len(extra)
        pad = (-(header_end + 4)) % ALIGNMENT
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB": torch's padding field
        stored = _U32 if zip64 else size
        header = _LOCAL.pack(
            b"PK\x03\x04", 45 if zip64 else 20, 0, 0, 0, _DOS_DATE, 0, stored, stored, len(raw_name), len(extra)
        )
        offset = self.pos
        self.sink.write(header + raw_name + extra)
        self.pos += len(header) + len(raw_name) + len(extra)
        crc = 0
        written = 0
        for chunk in chunks:
            n = len(memoryview(chunk).cast("B"))
            if n >= 1 << 20:
                # zlib.crc32 and the write both release the GIL: sum on a second core while writing.
                summed = self._crc_pool().submit(zlib.crc32, chunk, crc)
                self.sink.write(chunk)
                crc = summed.result()
            else:
                crc = zlib.crc32(chunk, crc)
                self.sink.write(chunk)
            written += n
        if written != size:
            # The header already announced ``size``: a short or long member would misplace every later one.
            raise InputError(f"member {name}: got {written} bytes, announced {size}; nothing was written")
        self.pos += size
        self.sink.pwrite(struct.pack("<I", crc), offset + 14)
        self.entries.append(_Entry(raw_name, offset, size, crc))

    def shutdown(self) -> None:
        """Stop the CRC worker (after :meth:`close`, or on an error)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def close(self) -> None:
        """Write the central directory and the end records."""
        self.shutdown()
        cd_start = self.pos
        parts = []
        for e in self.entries:
            fields = []
            size = e.size
            offset = e.offset
            if self.force_zip64 or e.size >= _U32:
                fields += [e.size, e.size]
                size = _U32
            if self.force_zip64 or e.offset >= _U32:
                fields.append(e.offset)
                offset = _U32
            extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
            parts.append(
                _CENTRAL.pack(
                    b"PK\x01\x02",
                    45,
                    45 if fields else 20,
                    0,
                    0,
                    0,
                    _DOS_DATE,
                    e.crc,
                    size,
                    size,
                    len(e.name),
                    len(extra),
                    0,
                    0,
                    0,
                    0,
                    offset,
                )
                + e.name
                + extra
            )
        cd = b"".join(parts)
        self.sink.write(cd)
        self.pos += len(cd)
        count = len(self.entries)
        if self.force_zip64 or count >= 0xFFFF or cd_start >= _U32 or len(cd) >= _U32:
            eocd64_at = self.pos
            rec = _EOCD64.pack(b"PK\x06\x06", _EOCD64.size - 12, 45, 45, 0, 0, count, count, len(cd), cd_start)
            loc = _EOCD64_LOCATOR.pack(b"PK\x06\x07", 0, eocd64_at, 1)
            self.sink.write(rec + loc)
            self.pos += len(rec) + len(loc)
            end = _EOCD.pack(b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, _U32, _U32, 0)
        else:
            end = _EOCD.pack(b"PK\x05\x06", 0, 0, count, count, len(cd), cd_start, 0)
        self.sink.write(end)
        self.pos += len(end)
