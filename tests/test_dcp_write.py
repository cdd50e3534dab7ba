"""Writing torch.distributed.checkpoint folders (statecli.formats.dcpwrite), and reading sharded ones back to HF.

torch is the oracle: ``torch.distributed.checkpoint.load`` (single process) and ``format_utils``'
``dcp_to_torch_save`` / ``torch_save_to_dcp`` read and write the same folders with torch's own code. They
unpickle ``.metadata`` with plain pickle: only folders these tests made are given to them.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

import statecli
from statecli.errors import InputError, UnsupportedFormatError
from statecli.formats.dcpwrite import (
    DCP_VERSION,
    METADATA_NAME,
    DcpRecord,
    DcpTensor,
    dcp_file_name,
    metadata_bytes,
    plan_files,
    write_dcp_file,
)


class FileSink:
    """A plain file with the two calls the writer makes; records every write's length."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.writes: list[Any] = []

    def write(self, data: bytes | memoryview) -> None:
        self.writes.append(data)
        self.f.write(data)

    def pwrite(self, data: bytes, offset: int) -> None:
        self.f.flush()
        os.pwrite(self.f.fileno(), data, offset)

    def close(self) -> None:
        self.f.close()


def raw_bytes(t: torch.Tensor) -> bytes:
    """``t``'s elements, row-major, as a contiguous copy of it holds them."""
    c = t.detach().contiguous()
    return c.reshape(-1).view(torch.uint8).numpy().tobytes() if c.numel() else b""


def pieces_of(data: bytes, n: int = 3) -> Iterator[memoryview]:
    """The bytes in ``n`` pieces (some possibly empty), as a streaming source hands them out."""
    view = memoryview(data)
    step = max(1, -(-len(data) // n))
    for start in range(0, len(data), step):
        yield view[start : start + step]


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def to_write(state: dict[str, torch.Tensor]) -> list[DcpTensor]:
    out = []
    for name, t in state.items():
        data = raw_bytes(t)
        out.append(DcpTensor(name, dtype_name(t), tuple(t.shape), len(data), pieces_of(data)))
    return out


def write_folder(folder: Path, state: dict[str, torch.Tensor], max_file_size: int | None = None) -> list[DcpRecord]:
    """The engine's sequence: lay out, write each data file, then the metadata from every file's records."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = to_write(state)
    records: list[DcpRecord] = []
    for name, group in plan_files(tensors, lambda t: t.nbytes, max_file_size):
        sink = FileSink(folder / name)
        try:
            records += write_dcp_file(sink, name, group)
        finally:
            sink.close()
    (folder / METADATA_NAME).write_bytes(metadata_bytes(records))
    return records


def sample_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "encoder.layers.0.attn.q_proj.weight": torch.randn(6, 4, generator=g),
        "encoder.layers.0.norm.weight": torch.randn(4, generator=g).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(17, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
        "transposed": torch.randn(5, 3, generator=g).t(),  # not contiguous in the source
        "fp16": torch.randn(2, 2, 2, generator=g).half(),
        "f8": torch.randn(9, generator=g).to(torch.float8_e4m3fn),  # pickled with _rebuild_tensor_v3
        "u16": torch.tensor([0, 1, 65535, 7, 300], dtype=torch.int32).to(torch.uint16),
        "mask": torch.tensor([True, False, True]),
        "c64": torch.randn(3, generator=g, dtype=torch.complex64),
        "size": torch.ones(2),  # a key equal to a field name of the metadata dataclasses
    }


def quiet_load(state: dict[str, torch.Tensor], folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)


def quiet_dcp_to_pt(folder: Path, out: Path) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(str(folder), str(out))
    return torch.load(out, weights_only=True)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits (float8 and complex have no torch.equal on every build)."""
    return a.dtype == b.dtype and a.shape == b.shape and raw_bytes(a) == raw_bytes(b)


# --- oracle 1: torch's DCP loader reads what statecli writes ------------------------------------------


@pytest.mark.parametrize("max_file_size", [None, 3000])
def test_torch_dcp_load_fills_every_tensor(tmp_path: Path, max_file_size: int | None) -> None:
    state = sample_state()
    folder = tmp_path / "ckpt"
    records = write_folder(folder, state, max_file_size)
    files = sorted({r.relative_path for r in records})
    assert sorted(p.name for p in folder.iterdir()) == sorted([METADATA_NAME, *files])
    if max_file_size is not None:
        assert len(files) > 1  # the limit really cut the output into several files
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    quiet_load(target, folder)
    for k, v in state.items():
        assert same(target[k], v), k


def test_dcp_to_torch_save_matches_torchs_own_round_trip(tmp_path: Path) -> None:
    state = sample_state()
    write_folder(tmp_path / "ours", state, 4000)
    ours = quiet_dcp_to_pt(tmp_path / "ours", tmp_path / "ours.pt")

    torch.save(state, tmp_path / "src.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_save_to_dcp(str(tmp_path / "src.pt"), str(tmp_path / "theirs"))
    theirs = quiet_dcp_to_pt(tmp_path / "theirs", tmp_path / "theirs.pt")

    assert list(ours) == list(theirs) == list(state)
    for k in state:
        assert same(ours[k], theirs[k]), k
        assert same(ours[k], state[k]), k


def test_metadata_is_what_torch_records_for_the_same_state(tmp_path: Path) -> None:
    state = sample_state()
    write_folder(tmp_path / "ours", state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(tmp_path / "theirs"), no_dist=True)
    ours = FileSystemReader(str(tmp_path / "ours")).read_metadata()
    theirs = FileSystemReader(str(tmp_path / "theirs")).read_metadata()
    assert type(ours) is Metadata
    assert ours.state_dict_metadata == theirs.state_dict_metadata  # dtype, size, one chunk at 0, properties
    assert ours.planner_data == theirs.planner_data
    assert set(ours.storage_data) == set(theirs.storage_data)
    assert ours.version == theirs.version == DCP_VERSION
    assert {type(v) for v in ours.storage_data.values()} == {_StorageInfo}
    assert all(v.transform_descriptors is None for v in ours.storage_data.values())


def test_each_span_is_a_torch_save_of_the_tensor(tmp_path: Path) -> None:
    state = sample_state()
    records = write_folder(tmp_path / "ckpt", state, 3000)
    for r in records:
        with open(tmp_path / "ckpt" / r.relative_path, "rb") as f:
            f.seek(r.offset)
            block = torch.load(io.BytesIO(f.read(r.length)), weights_only=True)
        assert same(block, state[r.name].contiguous()), r.name
        assert block.is_contiguous()
    ends = {}
    for r in records:  # spans follow each other without gaps, from offset 0, to the file's end
        assert r.offset == ends.get(r.relative_path, 0)
        ends[r.relative_path] = r.offset + r.length
    for path, end in ends.items():
        assert (tmp_path / "ckpt" / path).stat().st_size == end


# --- statecli reads it back ----------------------------------------------------------------------------


def test_statecli_inspect_reads_exact_names_shapes_dtypes(tmp_path: Path) -> None:
    state = sample_state()
    write_folder(tmp_path / "ckpt", state, 3000)
    report = statecli.open_checkpoint(tmp_path / "ckpt")
    assert report.format == "dcp"
    assert [(t.name, t.dtype, t.shape) for t in report.tensors] == [
        (k, dtype_name(v), tuple(v.shape)) for k, v in state.items()
    ]
    assert not [f for f in report.findings if f.level != "info"]
    roles = {t.name: t.role for t in report.tensors}
    assert roles["bn.num_batches_tracked"] == "buffer"  # from the name rules, as for any DCP folder


def test_statecli_convert_of_the_written_folder_gives_the_values(tmp_path: Path) -> None:
    state = {k: v for k, v in sample_state().items() if k not in ("f8", "u16", "c64")}  # safetensors-friendly
    write_folder(tmp_path / "ckpt", state, 3000)
    statecli.convert(tmp_path / "ckpt", tmp_path / "out.safetensors", verify=True)
    got = load_file(tmp_path / "out.safetensors")
    assert sorted(got) == sorted(state)
    for k, v in state.items():
        assert same(got[k], v), k


# --- determinism and layout -----------------------------------------------------------------------------


def test_writing_twice_gives_identical_bytes(tmp_path: Path) -> None:
    state = sample_state()
    write_folder(tmp_path / "a", state, 3000)
    write_folder(tmp_path / "b", state, 3000)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_metadata_bytes_ignore_record_order_and_string_identity() -> None:
    records = [
        DcpRecord("size", "float32", (2,), dcp_file_name(0), 0, 1200),
        DcpRecord("torch", "int64", (), dcp_file_name(0), 1200, 1200),
        DcpRecord("w", "bfloat16", (3, 1), dcp_file_name(1), 0, 1300),
        DcpRecord("float32", "float32", (0,), dcp_file_name(10), 0, 1100),
        DcpRecord("x", "float32", (1,), dcp_file_name(2), 0, 1100),
    ]
    # The same strings as other objects: copies no one else holds, as records coming back from worker
    # processes are, then interned ones (the very objects pickle's own field and class names are).
    fresh = [r._replace(name="".join(list(r.name)), relative_path="".join(list(r.relative_path))) for r in records]
    assert fresh[0].name is not sys.intern("size")
    first = metadata_bytes(fresh)
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    other = [r._replace(name=sys.intern(r.name)) for r in shuffled]
    assert metadata_bytes(other) == first
    md = pickle.loads(first)  # our own bytes, just made
    # File order, numerically (__0_10 after __0_2), then offset.
    assert list(md.state_dict_metadata) == ["size", "torch", "w", "x", "float32"]


def test_file_names_are_those_of_a_one_process_save(tmp_path: Path) -> None:
    # FileSystemWriter with one rank and two threads writes two files: their names are ours.
    state = {"a": torch.ones(4), "b": torch.zeros(3)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path), thread_count=2), no_dist=True)
    data = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".distcp")
    assert data == [dcp_file_name(0), dcp_file_name(1)] == ["__0_0.distcp", "__0_1.distcp"]


def test_layout_cuts_by_size_in_order_and_a_big_tensor_goes_alone() -> None:
    sizes = [100, 100, 5000, 100, 100, 100]
    files = plan_files(list(range(len(sizes))), lambda i: sizes[i], 4000)
    assert files == [
        ("__0_0.distcp", [0, 1]),
        ("__0_1.distcp", [2]),
        ("__0_2.distcp", [3, 4]),
        ("__0_3.distcp", [5]),
    ]
    assert plan_files([1, 2, 3], lambda i: 10**9, None) == [("__0_0.distcp", [1, 2, 3])]
    with pytest.raises(ValueError):
        plan_files([1], lambda i: 1, 0)


def test_pieces_stream_through_without_being_joined(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    parts = [memoryview(data)[i : i + 1000] for i in range(0, len(data), 1000)]
    sink = FileSink(tmp_path / dcp_file_name(0))
    try:
        write_dcp_file(sink, dcp_file_name(0), [DcpTensor("t", "uint8", (len(data),), len(data), iter(parts))])
    finally:
        sink.close()
    written = [id(w) for w in sink.writes]
    assert all(id(p) in written for p in parts)  # each piece handed to the sink as it came


# --- refusals ------------------------------------------------------------------------------------------


def test_pieces_that_do_not_add_up_are_refused(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / dcp_file_name(0))
    try:
        with pytest.raises(InputError, match="announced"):
            write_dcp_file(sink, dcp_file_name(0), [DcpTensor("t", "float32", (4,), 16, iter([b"\0" * 12]))])
        with pytest.raises(InputError, match="takes 16 bytes, not 12"):
            write_dcp_file(sink, dcp_file_name(0), [DcpTensor("t", "float32", (4,), 12, iter([b"\0" * 12]))])
    finally:
        sink.close()


def test_quantized_tensors_and_repeated_names_are_refused(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / dcp_file_name(0))
    try:
        with pytest.raises(UnsupportedFormatError, match="quantized"):
            write_dcp_file(sink, dcp_file_name(0), [DcpTensor("q", "qint8", (2,), 2, iter([b"\0\0"]))])
    finally:
        sink.close()
    twice = [DcpRecord("a", "float32", (1,), dcp_file_name(k), 0, 1100) for k in range(2)]
    with pytest.raises(InputError, match="twice"):
        metadata_bytes(twice)
    with pytest.raises(ValueError, match="not a DCP data file name"):
        write_dcp_file(sink, "../x.distcp", [])


# --- oracle 2: sharded DCP folders to HF shards, against torch's dcp_to_torch_save -----------------------


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in sorted(folder.glob("*.safetensors")):
        out.update(load_file(p))
    return out


def assert_hf_matches_torch(src: Path, tmp_path: Path, model_key: str | None = "model") -> None:
    reference = quiet_dcp_to_pt(src, tmp_path / "reference.pt")
    expected = reference[model_key] if model_key else reference
    out = tmp_path / "hf"
    statecli.convert(src, f"{out}/", max_shard_size=2000)
    assert (out / "model.safetensors.index.json").exists()
    got = hf_tensors(out)
    assert sorted(got) == sorted(k for k, v in expected.items() if isinstance(v, torch.Tensor))
    for k, v in got.items():
        assert same(v, expected[k]), k


@pytest.mark.parametrize("sample", ["dcp_sharded", "dcp_training"])
def test_sample_folders_to_hf_shards_match_torch(samples_dir: Path, tmp_path: Path, sample: str) -> None:
    # dcp_sharded: FSDP-like Shard(0) parameters, 3 chunks in 3 files; dcp_training: model beside an
    # optimizer and non-tensor entries (the optimizer's tensors are left out of a model's HF shards).
    assert_hf_matches_torch(samples_dir / sample, tmp_path)


def handmade_sharded(folder: Path) -> None:
    """A folder as several ranks write it, each chunk a torch.save of its block: made with torch's own
    dataclasses and torch.save (not with the module under test). 2-D blocks of uneven sizes, a tensor split
    along its second dimension, an empty block, chunks of one tensor in several files and in no particular
    order."""
    g = torch.Generator().manual_seed(3)
    full = {
        "model.grid": torch.randn(5, 7, generator=g),
        "model.cols": torch.randn(3, 6, generator=g).to(torch.bfloat16),
        "model.rows": torch.arange(10, dtype=torch.int64),
        "model.whole": torch.randn(4, generator=g),
    }
    layout: dict[str, list[tuple[tuple[int, ...], tuple[int, ...], int]]] = {  # (offsets, sizes, file)
        "model.grid": [((3, 4), (2, 3), 0), ((0, 0), (3, 4), 1), ((3, 0), (2, 4), 2), ((0, 4), (3, 3), 0)],
        "model.cols": [((0, 0), (3, 2), 1), ((0, 2), (3, 4), 0)],
        # An empty block at offset == size, as a DTensor rank whose Shard(0) slice is empty writes it.
        "model.rows": [((0,), (4,), 0), ((4,), (4,), 1), ((8,), (2,), 2), ((10,), (0,), 1)],
        "model.whole": [((0,), (4,), 2)],
    }
    folder.mkdir()
    blobs: dict[int, bytearray] = {0: bytearray(), 1: bytearray(), 2: bytearray()}
    state_md: dict[str, TensorStorageMetadata] = {}
    storage: dict[MetadataIndex, _StorageInfo] = {}
    for name, chunks in layout.items():
        t = full[name]
        meta = []
        for offsets, sizes, k in chunks:
            block = t
            for d, (o, s) in enumerate(zip(offsets, sizes, strict=True)):
                block = block.narrow(d, o, s)
            buf = io.BytesIO()
            torch.save(block.contiguous(), buf)
            path = f"__{k}_0.distcp"
            storage[MetadataIndex(name, offsets)] = _StorageInfo(path, len(blobs[k]), len(buf.getvalue()))
            blobs[k] += buf.getvalue()
            meta.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
        state_md[name] = TensorStorageMetadata(TensorProperties(dtype=t.dtype), t.size(), meta)
    for k, blob in blobs.items():
        (folder / f"__{k}_0.distcp").write_bytes(bytes(blob))
    planner = {name: ("model", name.removeprefix("model.")) for name in full}
    md = Metadata(state_md, planner_data=planner, storage_data=storage, version=DCP_VERSION)
    (folder / METADATA_NAME).write_bytes(pickle.dumps(md))


def test_handmade_multi_chunk_folder_to_hf_matches_torch(tmp_path: Path) -> None:
    handmade_sharded(tmp_path / "ckpt")
    assert_hf_matches_torch(tmp_path / "ckpt", tmp_path)
