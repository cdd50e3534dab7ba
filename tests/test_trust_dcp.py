"""Issue #11, DCP and outputs: chunks tile each tensor exactly, spans are bounded, every output byte is
accounted for, and a killed conversion leaves nothing behind for long.

The DCP folders are torch's own (``dcp.save``) with their ``.metadata`` rewritten by pickling torch's
dataclasses back (trusted fixtures), or hand-made ones from ``tests/hostile/cases_dcp.py``.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cases_dcp
import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from clirun import NO_COLOR, run_cli
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

import statecli
from statecli.errors import InputError, LimitExceededError
from statecli.formats import dcp as dcp_reader
from statecli.formats.dcp import MAX_CHUNK_FRAMING, TilingBudget, read_dcp, tiling_problem
from statecli.tensors.source import Source

Chunks = list[tuple[tuple[int, ...], tuple[int, ...]]]


def coverage(shape: tuple[int, ...], chunks: Chunks) -> np.ndarray:
    """How many chunks hold each element: the brute-force answer, for small shapes only."""
    cov = np.zeros(shape, dtype=np.int64)
    for o, s in chunks:
        cov[tuple(slice(a, a + b) for a, b in zip(o, s, strict=True))] += 1
    return cov


def region(message: str) -> tuple[slice, ...]:
    m = re.search(r"elements \[([^\]]*)\]", message)
    assert m, message
    return tuple(slice(*map(int, part.split(":"))) for part in m.group(1).split(", "))


def assert_verdict(shape: tuple[int, ...], chunks: Chunks) -> None:
    """tiling_problem agrees with counting, and the region it names is really doubly held or empty."""
    cov = coverage(shape, chunks)
    got = tiling_problem(shape, chunks)
    assert (got is None) == bool((cov == 1).all()), (shape, chunks, got)
    if got is None or not shape:
        return
    held = cov[region(got)]
    assert held.size
    if "overlap" in got:
        i, j = map(int, re.search(r"chunks (\d+) and (\d+)", got).groups())  # type: ignore[union-attr]
        assert (held >= 2).all(), (shape, chunks, got)
        assert (coverage(shape, [chunks[i]]) & coverage(shape, [chunks[j]]))[region(got)].all()
    else:
        assert (held == 0).all(), (shape, chunks, got)


def guillotine(rng: random.Random, shape: tuple[int, ...]) -> Chunks:
    """A random tiling of ``shape``: boxes cut in two, again and again."""
    boxes: Chunks = [((0,) * len(shape), shape)]
    for _ in range(rng.randint(0, 8) if shape else 0):
        k = rng.randrange(len(boxes))
        o, s = boxes[k]
        d = rng.randrange(len(shape))
        if s[d] < 2:
            continue
        c = rng.randint(1, s[d] - 1)
        boxes[k : k + 1] = [
            (o, (*s[:d], c, *s[d + 1 :])),
            ((*o[:d], o[d] + c, *o[d + 1 :]), (*s[:d], s[d] - c, *s[d + 1 :])),
        ]
    return boxes


# --- the tiling check --------------------------------------------------------------------------------


def test_tiling_verdict_and_region_match_counting_every_element() -> None:
    rng = random.Random(11)
    for _ in range(4000):
        shape = tuple(rng.randint(1, 5) for _ in range(rng.randint(0, 4)))
        chunks = guillotine(rng, shape)
        for _ in range(rng.choice([0, 0, 1, 2])):
            what = rng.random()
            if what < 0.3 and chunks:
                chunks.pop(rng.randrange(len(chunks)))  # a gap
            elif what < 0.5 and chunks:
                chunks.append(chunks[rng.randrange(len(chunks))])  # a chunk listed twice
            else:
                o = tuple(rng.randrange(n) for n in shape)
                chunks.append((o, tuple(rng.randint(1, n - x) for n, x in zip(shape, o, strict=True))))
        rng.shuffle(chunks)
        assert_verdict(shape, chunks)


def test_a_tiling_no_straight_cut_divides_is_recognised() -> None:
    # The pinwheel: four 2x1/1x2 bricks around a centre; not a grid, not cut by any full line.
    pinwheel: Chunks = [((0, 0), (2, 1)), ((0, 1), (1, 2)), ((1, 2), (2, 1)), ((2, 0), (1, 2)), ((1, 1), (1, 1))]
    assert tiling_problem((3, 3), pinwheel) is None
    for k in range(5):
        assert_verdict((3, 3), pinwheel[:k] + pinwheel[k + 1 :])
    moved = [*pinwheel[:4], ((1, 1), (2, 1))]
    assert_verdict((3, 3), moved)


@pytest.mark.parametrize(
    ("shape", "chunks", "problem"),
    [
        ((), [((), ())], None),
        ((), [], "no chunk holds its one element"),
        ((), [((), ()), ((), ())], "chunks 0 and 1 overlap: both hold its one element"),
        ((0, 4), [], None),
        ((0, 4), [((0, 0), (0, 4)), ((0, 0), (0, 4))], None),
        ((4,), [((0,), (4,)), ((2,), (0,)), ((4,), (0,))], None),  # empty chunks hold nothing
        ((4, 4), [((0, 0), (4, 4)), ((0, 0), (4, 4))], "chunks 0 and 1 overlap: both hold elements [0:4, 0:4]"),
        ((8, 4), [((0, 0), (4, 4)), ((2, 0), (4, 4))], "chunks 0 and 1 overlap: both hold elements [2:4, 0:4]"),
        ((8, 4), [((0, 0), (4, 4)), ((6, 0), (2, 4))], "no chunk holds elements [4:6, 0:4]"),
        ((2, 3, 4), [((0, 0, 0), (2, 3, 2)), ((0, 0, 2), (2, 2, 2))], "no chunk holds elements [0:2, 2:3, 2:4]"),
    ],
)
def test_tiling_answers(shape: tuple[int, ...], chunks: Chunks, problem: str | None) -> None:
    assert tiling_problem(shape, chunks) == problem


def test_no_element_is_walked_whatever_the_shape() -> None:
    half = 1 << 30
    shape = (1 << 31, 1 << 31)  # 2**62 elements
    assert tiling_problem(shape, [((0, 0), (half, 1 << 31)), ((half, 0), (half, 1 << 31))]) is None
    assert tiling_problem(shape, [((0, 0), (half, 1 << 31)), ((half, 0), (half, (1 << 31) - 1))]) == (
        f"no chunk holds elements [{half}:{1 << 31}, {(1 << 31) - 1}:{1 << 31}]"
    )
    side = 1 << 20
    grid = [((i * side, j * side, k * side), (side,) * 3) for i in range(4) for j in range(4) for k in range(4)]
    assert tiling_problem((4 * side,) * 3, grid) is None


def test_thousands_of_chunks_are_checked_by_sorting_and_counting() -> None:
    # Pairwise comparison would be 5 * 10**9 steps for the first and 10**8 for the grid.
    rng = random.Random(3)
    line: Chunks = [((3 * i,), (3,)) for i in range(100_000)]
    rng.shuffle(line)
    assert tiling_problem((300_000,), line) is None
    assert tiling_problem((300_000,), [*line, ((7,), (1,))]) is not None
    grid: Chunks = [((2 * i, 5 * j), (2, 5)) for i in range(100) for j in range(100)]
    rng.shuffle(grid)
    assert tiling_problem((200, 500), grid, TilingBudget(len(grid))) is None
    shifted = [*grid[:-1], ((grid[-1][0][0], grid[-1][0][1] + 1), (2, 5))]
    assert tiling_problem((200, 500), shifted, TilingBudget(len(grid))) is not None


def test_splits_along_many_dimensions_are_a_limit_not_a_hang() -> None:
    # Seventeen chunks, each halving another of 16 dimensions: 2**16 corners apiece.
    shape = (2,) * 16
    chunks: Chunks = []
    for d in range(16):
        chunks.append((tuple(1 if k < d else 0 for k in range(16)), tuple(1 if k <= d else 2 for k in range(16))))
    chunks.append(((1,) * 16, (1,) * 16))
    with pytest.raises(LimitExceededError, match="more work than statecli allows"):
        tiling_problem(shape, chunks, TilingBudget(len(chunks)))
    shape17 = (2,) * 17
    halves = [((0,) * 17, (1,) * 17), ((1,) * 17, (1,) * 17)]
    with pytest.raises(LimitExceededError, match="along 17 dimensions"):
        tiling_problem(shape17, halves)


# --- torch's own folders, rewritten ------------------------------------------------------------------


def save(folder: Path, state: dict[str, Any]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


def rewrite(folder: Path, change: Callable[[Metadata], Any]) -> Path:
    md = FileSystemReader(str(folder)).read_metadata()  # a trusted folder: this test wrote it
    md.storage_meta = None
    change(md)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return folder


def as_chunks(folder: Path, name: str, size: tuple[int, ...], pieces: dict[str, tuple[int, ...]]) -> Path:
    """Make the separately saved tensors ``pieces`` (key -> offsets) the chunks of one tensor ``name``."""

    def change(md: Metadata) -> None:
        first = md.state_dict_metadata[next(iter(pieces))]
        chunks = []
        for key, offsets in pieces.items():
            entry = md.state_dict_metadata.pop(key)
            sizes = entry.chunks[0].sizes
            chunks.append(ChunkStorageMetadata(torch.Size(offsets), sizes))
            info = md.storage_data.pop(MetadataIndex(key, (0,) * len(size)))
            md.storage_data[MetadataIndex(name, offsets)] = info
        first.size = torch.Size(size)
        first.chunks = chunks
        md.state_dict_metadata[name] = first
        md.planner_data = {name: (name,)}

    return rewrite(folder, change)


@pytest.fixture
def overlapping(tmp_path: Path) -> Path:
    """Rows 0..4 and 2..6 of an 8x4 tensor: 32 elements in all, as many as the tensor has."""
    w = torch.arange(32, dtype=torch.float32).reshape(8, 4)
    folder = save(tmp_path / "overlap", {"a": w[:4].clone(), "b": w[4:].clone()})
    return as_chunks(folder, "w", (8, 4), {"a": (0, 0), "b": (2, 0)})


OVERLAP = "tensor 'w' (size [8, 4]): chunks 0 and 1 overlap: both hold elements [2:4, 0:4]"


@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "{f}"],
        ["inspect", "{f}", "-f", "json"],
        ["check", "{f}"],
        ["check", "{f}", "--no-nan"],
        ["stats", "{f}"],
        ["diff", "{f}", "{f}"],
        ["convert", "{f}", "-o", "{out}/w.safetensors"],
        ["convert", "{f}", "-o", "{out}/w.pt"],
    ],
)
def test_overlapping_chunks_are_refused_by_every_command(overlapping: Path, tmp_path: Path, command: list[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli(*(c.format(f=overlapping, out=out) for c in command), env=NO_COLOR)
    assert result.exit_code == 3, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and OVERLAP in result.stderr, result.stderr
    assert os.listdir(out) == []


def test_overlapping_chunks_are_refused_by_the_api(overlapping: Path) -> None:
    for call in (statecli.open_checkpoint, statecli.load):
        with pytest.raises(InputError, match=re.escape(OVERLAP)):
            call(overlapping)


def test_a_gap_in_the_second_dimension_is_refused(tmp_path: Path) -> None:
    w = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    folder = save(tmp_path / "gap", {"a": w[:, :3].clone(), "b": w[:, 3:5].clone()})
    as_chunks(folder, "w", (4, 6), {"a": (0, 0), "b": (0, 3)})
    result = run_cli("convert", str(folder), "-o", str(tmp_path / "w.safetensors"), env=NO_COLOR)
    assert result.exit_code == 3
    assert "tensor 'w' (size [4, 6]): no chunk holds elements [0:4, 5:6]" in result.stderr
    assert not (tmp_path / "w.safetensors").exists()


def test_the_converter_checks_the_tiling_again_before_it_allocates(
    overlapping: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A chunk map that skipped the reader's check (a future caller, a bug) still writes no unread byte.
    from statecli.tensors import dcp as dcp_values

    assert dcp_values.tiling_problem is dcp_reader.tiling_problem  # imported before the reader's is replaced
    monkeypatch.setattr(dcp_reader, "tiling_problem", lambda shape, chunks, budget=None: None)
    report = statecli.open_checkpoint(overlapping)
    with Source(report) as source, pytest.raises(InputError, match=r"chunks 0 and 1 overlap.*not read"):
        source.read(report.tensors[0])


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_converting_a_sharded_folder_is_exact_and_repeatable(samples_dir: Path, tmp_path: Path, suffix: str) -> None:
    folder = samples_dir / "dcp_sharded"  # three ranks, rows split 3 + 3 + 2
    outs = [tmp_path / "1" / f"model{suffix}", tmp_path / "2" / f"model{suffix}"]  # a .pt's root is its stem
    for out in outs:
        out.parent.mkdir()
        result = run_cli("convert", str(folder), "-o", str(out), env=NO_COLOR)
        assert result.exit_code == 0, result.output
    assert outs[0].read_bytes() == outs[1].read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _load_state_dict_from_keys(checkpoint_id=str(folder))["model"]  # torch's DCP loader
    got = load_file(outs[0]) if suffix == ".safetensors" else torch.load(outs[0], weights_only=True)
    assert got.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(got[name], t), name
    assert run_cli("diff", str(folder), str(folder), env=NO_COLOR).exit_code == 0
    assert run_cli("diff", str(folder), str(outs[0]), env=NO_COLOR).exit_code == 0


# --- spans -----------------------------------------------------------------------------------------


def sparse_ok(path: Path) -> bool:
    return path.stat().st_blocks * 512 < path.stat().st_size


@pytest.mark.parametrize("command", ["inspect", "stats", "convert"])
def test_a_span_claiming_gigabytes_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    cases_dcp.dcp_folder(folder, [("w", (4,), [((0,), (4,))])], length_of=lambda k, o, n: 8 << 30)
    os.truncate(folder / cases_dcp.DATA_FILE, (8 << 30) + 4096)  # the file holds what the span claims
    if not sparse_ok(folder / cases_dcp.DATA_FILE):
        pytest.skip("this filesystem has no sparse files")

    def never(*args: object) -> bytes:
        raise AssertionError("a span was read")

    monkeypatch.setattr(Source, "_read_span", never)
    extra = ["-o", str(tmp_path / "w.safetensors")] if command == "convert" else []
    result = run_cli(command, str(folder), *extra, env=NO_COLOR)
    assert result.exit_code == 3, result.output
    assert "claims 8589934592, more than the 2097152 bytes a torch.save archive adds" in result.stderr
    assert not (tmp_path / "w.safetensors").exists()


def test_a_span_just_within_the_framing_bound_is_listed(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    chunks = [("w", (4,), [((0,), (4,))])]
    cases_dcp.dcp_folder(folder, chunks, length_of=lambda k, o, n: 16 + MAX_CHUNK_FRAMING, pad=MAX_CHUNK_FRAMING)
    assert [t.name for t in read_dcp(str(folder)).tensors] == ["w"]
    cases_dcp.dcp_folder(folder, chunks, length_of=lambda k, o, n: 17 + MAX_CHUNK_FRAMING, pad=MAX_CHUNK_FRAMING)
    with pytest.raises(InputError, match="claims 2097169"):
        read_dcp(str(folder))


def chunk_folder(tmp_path: Path, archive: bytes) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / cases_dcp.DATA_FILE).write_bytes(archive)
    spans = {("w", (0,)): (0, len(archive))}
    (folder / ".metadata").write_bytes(cases_dcp.metadata([("w", (4,), [((0,), (4,))])], spans))
    return folder


def archive(storage: bytes, method: int = zipfile.ZIP_STORED) -> bytes:
    pkl = cases_dcp.Asm(2).tensor(key="0", numel=4, shape=(4,), stride=(1,)).op("STOP").getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data, how in (("data.pkl", pkl, zipfile.ZIP_STORED), ("data/0", storage, method)):
            info = zipfile.ZipInfo(f"archive/{name}", (1980, 1, 1, 0, 0, 0))
            info.compress_type = how
            z.writestr(info, data)
    return buf.getvalue()


def _encrypted(data: bytes) -> bytes:
    out = bytearray(data)
    at = out.index(b"PK\x01\x02")  # the first central record: data.pkl
    struct.pack_into("<H", out, at + 8, 1)  # general purpose flag bit 0: encrypted
    return bytes(out)


def _longer_member(data: bytes) -> bytes:
    out = bytearray(data)
    at = out.rindex(b"PK\x01\x02")  # the last central record: data/0
    struct.pack_into("<II", out, at + 20, 10**6, 10**6)  # compressed and real size: past the span
    return bytes(out)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: archive(bytes(64 << 20), zipfile.ZIP_DEFLATED), "stores its bytes compressed"),
        (lambda: _encrypted(archive(bytes(16))), "is corrupt"),
        (lambda: _longer_member(archive(bytes(16))), "a chunk of 'w'"),
    ],
    ids=["deflated", "encrypted", "longer-than-span"],
)
@pytest.mark.parametrize("command", ["stats", "convert"])
def test_a_chunk_archive_that_lies_is_an_input_error(
    tmp_path: Path, make: Callable[[], bytes], message: str, command: str
) -> None:
    folder = chunk_folder(tmp_path, make())
    extra = ["-o", str(tmp_path / "w.safetensors")] if command == "convert" else []
    result = run_cli(command, str(folder), *extra, env=NO_COLOR)
    assert result.exit_code == 3, result.output
    assert result.stderr.count("\n") == 1 and "internal error" not in result.stderr, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "w.safetensors").exists()


def test_a_valid_hand_made_folder_reads_its_values(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    chunks = [((0, 0), (2, 3)), ((2, 0), (2, 3)), ((0, 3), (4, 1))]
    cases_dcp.dcp_folder(folder, [("w", (4, 4), chunks)])
    out = tmp_path / "w.safetensors"
    assert run_cli("convert", str(folder), "-o", str(out), env=NO_COLOR).exit_code == 0
    assert torch.equal(load_file(out)["w"], torch.arange(16, dtype=torch.float32).reshape(4, 4))


# --- every output byte accounted for -----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_storage_that_comes_short_writes_nothing(
    samples_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    real_read, real_chunks = Source.read, Source.chunks

    def short_read(self: Source, t: Any) -> torch.Tensor:
        return real_read(self, t)[:-1]

    def short_chunks(self: Source, t: Any, chunk: int = 16 << 20) -> Any:
        pieces = list(real_chunks(self, t, chunk))
        return iter([p.clone() for p in pieces[:-1]] + [pieces[-1][:-1].clone()])

    monkeypatch.setattr(Source, "read", short_read)
    monkeypatch.setattr(Source, "chunks", short_chunks)
    out = tmp_path / f"out{suffix}"
    result = run_cli("convert", str(samples_dir / "cnn_bn.safetensors"), "-o", str(out), env=NO_COLOR)
    assert result.exit_code == 3, result.output
    assert "not the" in result.stderr and "nothing was written" in result.stderr, result.stderr
    assert os.listdir(tmp_path) == []


def test_chunks_that_tile_load_exactly(tmp_path: Path) -> None:
    # The same rewiring as the refused folders above, done right: the values come back whole.
    w = torch.arange(8, dtype=torch.float32)
    folder = save(tmp_path / "f", {"a": w[:4].clone(), "b": w[4:].clone()})
    as_chunks(folder, "w", (8,), {"b": (4,), "a": (0,)})
    assert torch.equal(statecli.load(folder)["w"], w)


# --- kill -9 between naming steps -------------------------------------------------------------------

# Converts argv[1] to argv[2] (with --force) in a fresh process that SIGKILLs itself at argv[3]: right
# after the anonymous output got a name ("link"), or right before that name is renamed over the old
# output ("replace"). os is patched in this child only.
CRASH = r"""
import os, signal, sys
import statecli.conversion as conv

where = sys.argv[3]
real_link, real_replace = os.link, os.replace

def link(*args, **kwargs):
    real_link(*args, **kwargs)
    if where == "link":
        os.kill(os.getpid(), signal.SIGKILL)

def replace(*args, **kwargs):
    if where == "replace":
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(*args, **kwargs)

os.link, os.replace = link, replace
conv.convert(sys.argv[1], sys.argv[2], force=True)
"""


def crash(src: Path, out: Path, where: str) -> None:
    from subproc import run_python

    proc = run_python(CRASH, str(src), str(out), where, timeout=120)
    assert proc.returncode == -9, proc.stderr


@pytest.fixture
def o_tmpfile(tmp_path: Path) -> None:
    from statecli.formats.atomic import PendingFile

    probe = PendingFile(str(tmp_path / "never-named"))
    anonymous = probe.temp_name is None
    probe.discard()
    if not anonymous:
        pytest.skip("no O_TMPFILE here: outputs start as hidden files")


@pytest.mark.slow
def test_a_kill_right_after_a_new_output_is_named_leaves_that_output_only(
    samples_dir: Path, tmp_path: Path, o_tmpfile: None
) -> None:
    out = tmp_path / "model.safetensors"
    crash(samples_dir / "cnn_bn.safetensors", out, "link")
    assert os.listdir(tmp_path) == ["model.safetensors"]  # linked straight to its name, whole
    assert run_cli("diff", str(samples_dir / "cnn_bn.safetensors"), str(out), env=NO_COLOR).exit_code == 0


@pytest.mark.slow
def test_a_kill_between_link_and_rename_is_cleaned_by_the_next_run(
    samples_dir: Path, tmp_path: Path, o_tmpfile: None
) -> None:
    from statecli.formats.atomic import _LEFTOVER

    out = tmp_path / "model.safetensors"
    out.write_bytes(b"the old output")
    crash(samples_dir / "cnn_bn.safetensors", out, "replace")
    assert out.read_bytes() == b"the old output"
    left = [n for n in os.listdir(tmp_path) if n != "model.safetensors"]
    assert len(left) == 1 and _LEFTOVER.fullmatch(left[0]), left
    other = tmp_path / "other.pt"
    (tmp_path / "unrelated.tmp").write_bytes(b"")
    result = run_cli("convert", str(samples_dir / "cnn_bn.safetensors"), "-o", str(other), env=NO_COLOR)
    assert result.exit_code == 0, result.output
    assert f"removed 1 hidden temporary file that a killed statecli conversion left in {tmp_path}: {left[0]}" in (
        result.stderr
    )
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "other.pt", "unrelated.tmp"]


@pytest.mark.skipif(os.name != "posix", reason="leftovers are judged on POSIX only")
def test_only_files_certainly_abandoned_are_removed(tmp_path: Path) -> None:
    import subprocess
    import time

    from statecli.formats import atomic

    dead = subprocess.Popen(["true"])
    dead.wait()  # a process id that has ended
    live = subprocess.Popen(["sleep", "30"])
    here = atomic._where()
    try:
        files = {
            "gone": f".statecli-{dead.pid}-{here}-abcd1234.tmp",
            "running": f".statecli-{live.pid}-{here}-abcd1234.tmp",
            "elsewhere": f".statecli-{dead.pid}-{'0' * 8 if here != '0' * 8 else '1' * 8}-abcd1234.tmp",
            "mine": f".statecli-{os.getpid()}-{here}-abcd1234.tmp",
            "not ours": ".statecli-abcd1234.tmp",
            "newer": f".statecli-{dead.pid}-{here}-newer.tmp",
        }
        for name in files.values():
            (tmp_path / name).write_bytes(b"x")
        link = f".statecli-{dead.pid}-{here}-link.tmp"
        (tmp_path / link).symlink_to(tmp_path / files["gone"])
        past, future = time.time() - 60, time.time() + 60
        for key, name in files.items():
            when = future if key == "newer" else past  # "newer": written to after the run began
            os.utime(tmp_path / name, (when, when), follow_symlinks=False)
        # ctime cannot be set back: a run that started before they were made leaves every one alone.
        assert atomic.remove_leftovers(str(tmp_path), past - 60) == []
        assert atomic.remove_leftovers(str(tmp_path), time.time() + 1) == [files["gone"]]
        assert sorted(os.listdir(tmp_path)) == sorted([link, *(n for k, n in files.items() if k != "gone")])
    finally:
        live.kill()
        live.wait()


def test_hidden_temporaries_are_named_for_their_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from statecli.formats import atomic

    monkeypatch.delattr(os, "O_TMPFILE", raising=False)  # the fallback other systems take
    pending = atomic.PendingFile(str(tmp_path / "o.pt"))
    try:
        assert pending.temp_name is not None
        m = atomic._LEFTOVER.fullmatch(os.path.basename(pending.temp_name))
        assert m and int(m.group(1)) == os.getpid() and m.group(2) == atomic._where()
    finally:
        pending.discard()
    assert os.listdir(tmp_path) == []
