"""Hostile torch.distributed.checkpoint folders: chunks that do not tile their tensor, spans that claim too much.

A DCP tensor is rebuilt from its chunks into an empty buffer. Chunks whose sizes add up to the tensor's
element count can still overlap and leave a gap of the same size; the gap would be written with whatever
memory held (different bytes each run). Each folder here is a ``.metadata`` pickle written opcode by
opcode as torch's ``pickle.dump`` of its Metadata dataclass would be (NEWOBJ + BUILD of the field dict),
beside a ``__0_0.distcp`` of one torch.save archive per chunk. No torch needed.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

from make_hostile import Asm, case, error, obj, ok, torch_zip

MD = "torch.distributed.checkpoint.metadata"
FS = "torch.distributed.checkpoint.filesystem"
DATA_FILE = "__0_0.distcp"

Dims = tuple[int, ...]
Writer = Callable[[Asm], object]


def _size(dims: Sequence[int]) -> Writer:
    """``torch.Size(dims)``, as torch pickles it."""
    return lambda a: a.global_("torch", "Size").tuple_(lambda b: b.ints(tuple(dims))).op("REDUCE")


def _obj(module: str, name: str, fields: Sequence[tuple[str, Writer]]) -> Writer:
    """A dataclass as pickle writes it (see make_hostile.obj), its fields given as one list."""
    return obj(module, name, *fields)


def _properties(dtype: str) -> Writer:
    """TensorProperties: NEWOBJ, then BUILD with its ``__getstate__`` tuple."""

    def write(a: Asm) -> None:
        a.global_(MD, "TensorProperties").op("EMPTY_TUPLE").op("NEWOBJ").op("MARK")
        a.global_("torch", dtype)
        a.call("torch.serialization", "_get_layout", lambda b: b.str_("torch.strided"))
        a.op("NEWFALSE")
        a.call(MD, "_MEM_FORMAT_ENCODING", lambda b: b.int_(0))
        a.op("NEWFALSE").op("TUPLE").op("BUILD")

    return write


def metadata(
    tensors: Sequence[tuple[str, Dims, Sequence[tuple[Dims, Dims]]]],
    spans: dict[tuple[str, Dims], tuple[int, int]] | None,
) -> bytes:
    """A float32-only ``.metadata``: ``tensors`` as (key, size, [(offsets, sizes), ...]); ``spans`` maps
    (key, chunk offsets) to (offset, length) in :data:`DATA_FILE`, or is None (no storage_data)."""

    def chunk(offsets: Dims, sizes: Dims) -> Writer:
        return _obj(MD, "ChunkStorageMetadata", [("offsets", _size(offsets)), ("sizes", _size(sizes))])

    def tensor_md(size: Dims, chunks: Sequence[tuple[Dims, Dims]]) -> Writer:
        def chunk_list(a: Asm) -> None:
            a.op("EMPTY_LIST").op("MARK")
            for o, s in chunks:
                chunk(o, s)(a)
            a.op("APPENDS")

        return _obj(
            MD,
            "TensorStorageMetadata",
            [("properties", _properties("float32")), ("size", _size(size)), ("chunks", chunk_list)],
        )

    def sdm(a: Asm) -> None:
        a.op("EMPTY_DICT").op("MARK")
        for key, size, chunks in tensors:
            a.str_(key)
            tensor_md(size, chunks)(a)
        a.op("SETITEMS")

    def planner(a: Asm) -> None:
        a.op("EMPTY_DICT").op("MARK")
        for key, _, _ in tensors:
            a.str_(key).tuple_(lambda b, k=key: b.str_(k))
        a.op("SETITEMS")

    def storage(a: Asm) -> None:
        if spans is None:
            a.op("NONE")
            return
        a.op("EMPTY_DICT").op("MARK")
        for (key, offsets), (offset, length) in spans.items():
            index = [("fqn", lambda b, k=key: b.str_(k)), ("offset", _size(offsets)), ("index", lambda b: b.op("NONE"))]
            _obj(MD, "MetadataIndex", index)(a)
            info = [
                ("relative_path", lambda b: b.str_(DATA_FILE)),
                ("offset", lambda b, n=offset: b.int_(n)),
                ("length", lambda b, n=length: b.int_(n)),
            ]
            _obj(FS, "_StorageInfo", info)(a)
        a.op("SETITEMS")

    a = Asm(2)
    fields = [
        ("state_dict_metadata", sdm),
        ("planner_data", planner),
        ("storage_data", storage),
        ("storage_meta", lambda b: b.op("NONE")),
        ("version", lambda b: b.str_("1.0.0")),
    ]
    _obj(MD, "Metadata", fields)(a)
    return a.op("STOP").getvalue()


def _numel(dims: Dims) -> int:
    n = 1
    for x in dims:
        n *= x
    return n


def _strides(dims: Dims) -> Dims:
    out, acc = [], 1
    for x in reversed(dims):
        out.append(acc)
        acc *= x
    return tuple(reversed(out))


def chunk_archive(sizes: Dims, values: Sequence[float]) -> bytes:
    """One chunk as torch.save writes it: a float32 tensor of ``sizes`` over a storage of its own."""
    a = Asm(2)
    a.tensor(key="0", numel=len(values), shape=sizes, stride=_strides(sizes))
    pkl = a.op("STOP").getvalue()
    buf = io.BytesIO()
    torch_zip(buf, pkl, {"0": struct.pack(f"<{len(values)}f", *values)})  # type: ignore[arg-type]
    return buf.getvalue()


def dcp_folder(
    d: Path,
    tensors: Sequence[tuple[str, Dims, Sequence[tuple[Dims, Dims]]]],
    *,
    storage_data: bool = True,
    length_of: Callable[[str, Dims, int], int] | None = None,
    pad: int = 0,
) -> Path:
    """A float32 DCP folder in ``d``: each chunk an archive in one data file, its values the global
    tensor's element indices (so a rebuilt tensor shows which chunk put what where). ``length_of(key,
    offsets, length)`` may change the length a span claims; ``pad`` zero bytes end the data file."""
    data = bytearray()
    spans: dict[tuple[str, Dims], tuple[int, int]] = {}
    for key, size, chunks in tensors:
        strides = _strides(size)
        for offsets, sizes in chunks:
            values = [
                float(sum((o + i) * st for o, i, st in zip(offsets, idx, strides, strict=True)))
                for idx in _indices(sizes)
            ]
            blob = chunk_archive(sizes, values)
            length = len(blob) if length_of is None else length_of(key, offsets, len(blob))
            spans[(key, offsets)] = (len(data), length)
            data += blob
    (d / DATA_FILE).write_bytes(bytes(data) + bytes(pad))
    (d / ".metadata").write_bytes(metadata(tensors, spans if storage_data else None))
    return d


def metadata_only(d: Path, tensors: Sequence[tuple[str, Dims, Sequence[tuple[Dims, Dims]]]]) -> Path:
    """A folder whose ``.metadata`` has no storage_data (so no span bounds a tensor), beside an empty data file."""
    (d / DATA_FILE).write_bytes(b"")
    (d / ".metadata").write_bytes(metadata(tensors, None))
    return d


def _indices(sizes: Dims) -> list[Dims]:
    out: list[Dims] = [()]
    for n in sizes:
        out = [(*i, k) for i in out for k in range(n)]
    return out


def warmups(folder: Path) -> list[Path]:
    """A benign DCP folder, read before the audit hook goes in: the DCP reader's dataclasses compile on import."""
    d = folder / "dcp"
    d.mkdir(exist_ok=True)
    return [dcp_folder(d, [("w", (4, 2), [((0, 0), (2, 2)), ((2, 0), (2, 2))])])]


# --- chunks that do not tile their tensor ------------------------------------------------------------


@case("dcp_chunks_overlap_same_numel", "dcp", error(3, "chunks 0 and 1 overlap: both hold elements [2:4, 0:4]"))
def _(d: Path) -> Path:
    # Rows 0..4 and 2..6 of an 8x4 tensor: 16 + 16 = 32 elements, as many as the tensor has; rows 6..8
    # are in no chunk. The count-only check passed this and convert wrote uninitialised memory there.
    return dcp_folder(d, [("w", (8, 4), [((0, 0), (4, 4)), ((2, 0), (4, 4))])])


@case("dcp_chunks_gap_in_second_dim", "dcp", error(3, "no chunk holds elements [0:4, 5:6]"))
def _(d: Path) -> Path:
    return dcp_folder(d, [("w", (4, 6), [((0, 0), (4, 3)), ((0, 3), (4, 2))])])


@case("dcp_chunks_overlap_and_gap_2d", "dcp", error(3, "chunks 0 and 1 overlap: both hold elements [0:2, 2:3]"))
def _(d: Path) -> Path:
    # 12 + 4 = 16 elements of a 4x4 tensor: chunk 1 lies over column 2 of chunk 0 and leaves [2:4, 3:4] empty.
    return dcp_folder(d, [("w", (4, 4), [((0, 0), (4, 3)), ((0, 2), (2, 2))])])


@case("dcp_chunks_overlap_huge_tensor", "dcp", error(3, "chunks 0 and 1 overlap"))
def _(d: Path) -> Path:
    # 2**62 elements (no storage_data, so no span says how many bytes): a check that walks elements,
    # or allocates a bitmap of them, never ends. The second half starts one row early.
    half = 1 << 30
    chunks = [((0, 0), (half, 1 << 31)), ((half - 1, 0), (half + 1, 1 << 31))]
    return metadata_only(d, [("w", (1 << 31, 1 << 31), chunks)])


MANY = 100  # a 100 x 100 grid of chunks


@case("dcp_ten_thousand_chunks_tile", "dcp", ok(f"w ({MANY * MANY} chunks)"))
def _(d: Path) -> Path:
    # Not hostile: a large sharded layout must pass quickly (a pairwise check is 10**8 comparisons here).
    chunks = [((i * 3, j * 2), (3, 2)) for i in range(MANY) for j in range(MANY)]
    return metadata_only(d, [("w", (3 * MANY, 2 * MANY), chunks[::-1])])


@case("dcp_ten_thousand_chunks_one_shifted", "dcp", error(3, "chunks 9999 and 10000 overlap"))
def _(d: Path) -> Path:
    chunks = [((i,), (1,)) for i in range(MANY * MANY)] + [((MANY * MANY - 1,), (2,))]
    return metadata_only(d, [("w", (MANY * MANY + 1,), chunks)])


# --- spans that claim more than a chunk can hold ---------------------------------------------------


@case("dcp_chunk_span_longer_than_its_chunk", "dcp", error(3, "more than the 2097152 bytes a torch.save archive"))
def _(d: Path) -> Path:
    # 16 bytes of values, a span of 2 MiB and more: read whole before it is parsed. With a sparse data
    # file as large as the span claims, that read was a MemoryError ("internal error").
    extra = (2 << 20) + 1

    def longer(key: str, offsets: Dims, length: int) -> int:
        return length + extra

    return dcp_folder(d, [("w", (4,), [((0,), (4,))])], length_of=longer, pad=extra)
