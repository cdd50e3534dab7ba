"""Reading tensor bytes for conversion: one storage at a time, straight from the file, never unpickled.

The readers already validated every storage record (it lies inside its zip member, shapes and strides
stay inside the storage). Here those records are turned into torch tensors over bytes read with plain
``readinto``: no ``torch.load``, so no pickle runs and a whole pickled ``nn.Module`` converts like a
state dict. Reading (not mapping) keeps the process's memory at one storage, whatever the file size.
"""

from __future__ import annotations

import ctypes
import os
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from statecli.dtypes import contiguous_strides
from statecli.errors import InputError
from statecli.files import open_regular
from statecli.formats.safetensors import tensor_spans
from statecli.formats.torchzip import archive_root
from statecli.formats.zipdir import Member, data_offset, read_central_directory, read_directory_at
from statecli.records import Report, TensorInfo

if TYPE_CHECKING:
    import torch

    from statecli.tensors.dcp import DcpValues


STREAM_CHUNK = 16 << 20  # big enough to keep reads and casts efficient, small next to any model


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy and without numpy."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    arr = (ctypes.c_ubyte * n).from_address(t.data_ptr())
    # from_address does not own the memory: the array holds the tensor, the view holds the array, so
    # the bytes live exactly as long as anyone can read them.
    arr.keep_alive = t  # type: ignore[attr-defined]
    return memoryview(arr).cast("B")


class _ZipFile:
    """A zip archive's members by root-relative name: torch.save, TorchScript and torch.export archives
    all put everything under one top folder, and their readers name storages inside it. A storage of a
    torch.save archive stored inside a member (a .pt2's pickled payloads) is named ``<member>:data/<key>``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.members: Mapping[str, Member] = read_central_directory(path)
        self.nested: dict[str, tuple[Mapping[str, Member], str]] = {}
        roots = {n.split("/", 1)[0] for n in self.members if "/" in n}
        if any(n.endswith("/data.pkl") for n in self.members):
            self.root = archive_root(list(self.members), path)
        elif len(roots) == 1:
            self.root = roots.pop()  # a .pt2 has no data.pkl
        else:
            raise InputError("zip archive without a single top folder", path=path)

    def member(self, f: Any, storage: str, nesting: bool) -> Member:
        """The member that holds ``storage``; with ``nesting`` (a .pt2, whose member names hold no colon),
        ``<member>:<name>`` names a member of the archive stored in ``<member>``. A torch.save storage key
        may hold a colon: there it is only ever part of the member's name."""
        outer, nested, inner = storage.partition(":") if nesting else (storage, "", "")
        m = self.members.get(f"{self.root}/{outer}")
        if m is None:
            raise InputError(f"storage {storage} is missing from the archive", path=self.path)
        if not nested:
            return m
        hit = self.nested.get(outer)
        if hit is None:
            if m.method != 0:
                raise InputError(f"{outer} is compressed; torch never writes that", path=self.path)
            members = read_directory_at(f, data_offset(f, m, self.path), m.size, self.path)
            hit = self.nested[outer] = (members, archive_root(list(members), self.path))
        members, root = hit
        found = members.get(f"{root}/{inner}")
        if found is None:
            raise InputError(f"storage {storage} is missing from the archive", path=self.path)
        return found


class Source:
    """Reads the bytes behind the tensors of ``report``. Use as a context manager."""

    def __init__(self, report: Report, check_crc: bool = True) -> None:
        self.report = report
        self._dcp: DcpValues | None = None
        if report.format == "dcp":
            from statecli.tensors.dcp import DcpValues  # loaded for DCP folders only: a thousand lines

            self._dcp = DcpValues(report)
        # torch.load checks no CRC either (its miniz is built without reader CRC checks); summing 2 GiB
        # costs ~0.8 s of CPU here, so convert asks for it only under --verify.
        self.check_crc = check_crc
        self.sharded = report.format.startswith("sharded")
        self.folder = os.path.dirname(report.path)
        self._files: dict[str, Any] = {}
        self._zips: dict[str, _ZipFile] = {}
        self._spans: dict[str, dict[str, tuple[int, int]]] = {}
        self._legacy: dict[str, dict[str, tuple[int, int]]] = {}
        self._zipped: dict[str, bool] = {}
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for f in self._files.values():
            f.close()
        self._files.clear()

    def path_of(self, t: TensorInfo) -> str:
        if self.sharded and t.file is not None:
            return os.path.join(self.folder, t.file)
        return self.report.path

    def _read_span(self, path: str, offset: int, n: int) -> bytes:
        buf = bytearray(n)  # ``n`` is bounded by the chunk's own size (formats.dcp checked the span)
        _pread_into(self._file(path), memoryview(buf), offset, path, "a chunk")
        return bytes(buf)

    def _is_zip(self, path: str) -> bool:
        zipped = self._zipped.get(path)
        if zipped is None:
            f = self._file(path)
            f.seek(0)
            zipped = self._zipped[path] = f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")
        return zipped

    def _file(self, path: str) -> Any:
        f = self._files.get(path)
        if f is None:
            try:
                f = open_regular(path, buffering=0)  # closed in __exit__
            except OSError as e:
                raise InputError(f"cannot read ({e.strerror or e})", path=path) from e
            self._files[path] = f
        return f

    def span(self, t: TensorInfo) -> tuple[str, int, int, int | None]:
        """(file, first byte, byte count, expected CRC or None) of the storage ``t`` views."""
        path = self.path_of(t)
        storage = t.storage
        if self.sharded and storage is not None and t.file is not None:
            storage = storage.removeprefix(f"{t.file}:")  # the index reader made keys unique per shard
        if storage is not None and not storage.startswith(("alias:", "legacy/")) and self._is_zip(path):
            z = self._zips.get(path)
            if z is None:
                z = self._zips[path] = _ZipFile(path)
            f = self._file(path)
            m = z.member(f, storage, self.report.format.endswith("torch-export"))
            if m.method != 0:
                raise InputError(f"storage {storage} is compressed; torch never writes that", path=path)
            start = data_offset(f, m, path)
            # The storage's own size, which its member holds (the reader checked): TorchScript's loader reads
            # that much of a longer member. Its CRC covers the whole member, so it is checked only then.
            size = min(m.size, self.report.storage_sizes.get(t.storage or "", m.size))
            return path, start, size, m.crc if self.check_crc and size == m.size else None
        if storage is not None and storage.startswith("legacy/"):
            legacy = self._legacy.get(path)
            if legacy is None:
                from statecli.formats.legacy import storage_spans  # loaded for legacy files only

                legacy = self._legacy[path] = storage_spans(path)[0]
            key = storage.removeprefix("legacy/")
            if key not in legacy:
                raise InputError(f"storage '{key}' is missing from the file", path=path)
            start, size = legacy[key]
            return path, start, size, None  # the legacy format has no checksums
        spans = self._spans.get(path)
        if spans is None:
            spans = self._spans[path] = tensor_spans(path)
        name = storage.removeprefix("alias:") if storage is not None and storage.startswith("alias:") else t.name
        if name not in spans:
            raise InputError(f"tensor {name!r} is not stored in the file", path=path)
        begin, end = spans[name]
        return path, begin, end - begin, None

    def _checked_span(self, t: TensorInfo) -> tuple[str, int, int, int | None]:
        """:meth:`span`, refused unless it holds exactly the bytes the storage record claims: torch.load
        refuses a record of any other size, and the bytes past the claim would be read as values."""
        path, start, size, crc = self.span(t)
        claimed = self.report.storage_sizes.get(t.storage) if t.storage is not None else None
        if claimed is not None and claimed != size:
            raise InputError(
                f"storage {t.storage} of {t.name!r} holds {size} bytes but its record claims {claimed} "
                "(torch.load refuses a record of another size)",
                path=path,
            )
        return path, start, size, crc

    def read(self, t: TensorInfo) -> torch.Tensor:
        """The whole storage behind ``t`` as a flat uint8 tensor, CRC-checked where the file has one."""
        import torch  # deferred: importing torch takes about a second, and metadata commands never need it

        if self._dcp is not None:
            return self._dcp.read(t, self._read_span)

        path, start, size, crc = self._checked_span(t)
        buf = torch.empty(size, dtype=torch.uint8)  # filled whole by _pread_into, or it raises
        view = byte_view(buf)
        _pread_into(self._file(path), view, start, path, t.name)
        if crc is not None and zlib.crc32(view) != crc:
            raise InputError(f"the bytes of {t.name!r} fail their CRC check (corrupt file)", path=path)
        return buf

    def chunks(self, t: TensorInfo, chunk: int = STREAM_CHUNK) -> Iterator[torch.Tensor]:
        """The storage behind ``t`` in pieces of at most ``chunk`` bytes, each valid until the next is
        asked for. The next piece is read (and its CRC summed) in a worker thread while the caller works
        on this one: both release the GIL, so reading overlaps casting and writing on a second core.
        The CRC is checked after the last piece: a consumer writing the pieces out learns of corruption
        before it can finish, so nothing corrupt is ever kept."""
        import torch  # deferred: importing torch takes about a second, and metadata commands never need it

        if self._dcp is not None:  # a DCP tensor is rebuilt from its chunks: one piece
            yield self.read(t)
            return
        path, start, size, crc = self._checked_span(t)
        f = self._file(path)
        if size <= chunk:
            # One piece: nothing to overlap, and a worker's hand-off costs more than a small read (a
            # checkpoint of 100,000 small tensors pays it 100,000 times).
            buf = torch.empty(size, dtype=torch.uint8)
            view = byte_view(buf)
            _pread_into(f, view, start, path, t.name)
            if crc is not None and zlib.crc32(view) != crc:
                raise InputError(f"the bytes of {t.name!r} fail their CRC check (corrupt file)", path=path)
            yield buf
            return
        bufs = [torch.empty(min(size, chunk), dtype=torch.uint8) for _ in range(2 if size > chunk else 1)]
        views = [byte_view(b) for b in bufs]
        running = [0]

        def load(k: int, offset: int, n: int) -> None:
            _pread_into(f, views[k][:n], start + offset, path, t.name)
            if crc is not None:
                running[0] = zlib.crc32(views[k][:n], running[0])

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="statecli-read")
        pending = self._pool.submit(load, 0, 0, min(size, chunk)) if size else None
        try:
            for i, offset in enumerate(range(0, size, chunk)):
                assert pending is not None
                pending.result()
                following = offset + chunk
                pending = None
                if following < size:
                    pending = self._pool.submit(load, (i + 1) % 2, following, min(chunk, size - following))
                yield bufs[i % 2][: min(chunk, size - offset)]
        finally:
            if pending is not None:
                pending.exception()  # wait: the worker must not write into a buffer nobody holds
        if crc is not None and running[0] != crc:
            raise InputError(f"the bytes of {t.name!r} fail their CRC check (corrupt file)", path=path)


def refuse_mixed_dtypes(tensors: Iterable[TensorInfo], path: str) -> None:
    """Refuse (exit 3) a storage that ``tensors`` view as different dtypes. torch.save never writes one
    ("cannot save multiple tensors or storages that view the same data as different types"), though a
    hand-made pickle can, and torch.load reads it; statecli reads a storage as one dtype, so the values of
    the other views would be the bytes of the first read the first one's way."""
    first: dict[str, TensorInfo] = {}
    for t in tensors:
        if t.storage is None:
            continue
        f = first.setdefault(t.storage, t)
        if f.dtype != t.dtype:
            raise InputError(
                f"storage {t.storage} is viewed as {f.dtype} ({f.name!r}) and as {t.dtype} ({t.name!r}); statecli "
                "reads a storage as one dtype (torch.save never writes such a file)",
                path=path,
            )


_INT64 = 1 << 63


def check_views(tensors: Iterable[TensorInfo], elements: int, path: str) -> None:
    """Refuse (exit 3) a view that reaches past the ``elements`` its storage's bytes hold. The readers
    check each view against its storage record; this checks it against the bytes really read, which can
    be fewer than a reader believed (a ``.pt2`` weight member that is empty: torch.export.load would make
    zeros, and statecli makes up no values)."""
    for t in tensors:
        stride = t.stride or contiguous_strides(t.shape)
        if not all(0 <= x < _INT64 for x in (*stride, *contiguous_strides(t.shape), t.storage_offset)):
            # An empty tensor's view is not checked against its storage (it reaches no element), but torch
            # still needs its strides, its contiguous copy's and its offset to fit an int64.
            raise InputError(
                f"{t.name!r} of shape {list(t.shape)} has an impossible stride {list(stride)} or storage offset "
                f"{t.storage_offset}",
                path=path,
            )
        if any(s == 0 for s in t.shape):
            continue
        last = t.storage_offset + sum((s - 1) * st for s, st in zip(t.shape, stride, strict=True))
        if last >= elements:
            raise InputError(
                f"the bytes of {t.name!r} hold {elements} {t.dtype} elements; its shape {list(t.shape)} needs "
                f"element {last}",
                path=path,
            )


def _pread_into(f: Any, view: memoryview, offset: int, path: str, name: str) -> None:
    """Fill all of ``view`` from ``offset``, or raise: callers hand it empty buffers, so a byte it did not
    read must never be used. Positional reads, so threads need no shared file position."""
    got = 0
    n = len(view)
    fd = f.fileno()
    while got < n:
        k = os.preadv(fd, [view[got:]], offset + got) if _HAS_PREADV else _seek_read(f, view[got:], offset + got)
        if not k:
            raise InputError(f"file ends inside the data of {name!r} (truncated)", path=path)
        got += k


_HAS_PREADV = hasattr(os, "preadv")
_SEEK_LOCK = threading.Lock()


def _seek_read(f: Any, view: memoryview, offset: int) -> int:
    with _SEEK_LOCK:
        f.seek(offset)
        return int(f.readinto(view))
