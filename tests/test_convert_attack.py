"""Hostile and odd inputs to the whole-checkpoint convert (.pt → .pt), which writes the input's own pickle back
with new storage records (statecli/formats/repickle.py). Each file is built here from hand-written opcodes;
no output of a hostile input is ever loaded with ``weights_only=False`` in this process: outputs are scanned
with ``pickletools.genops`` and statecli's own reader, and a marker file proves nothing ran.
"""

from __future__ import annotations

import pickletools
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from clirun import run_cli

import statecli
from statecli.errors import UnsafeError
from statecli.formats import read
from statecli.formats.repickle import PersistentId, rewrite
from statecli.formats.torchzip import read_graph


def _x(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _g(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _pid(key: str = "0", numel: int = 4) -> bytes:
    return b"(" + _x("storage") + _g("torch", "FloatStorage") + _x(key) + _x("cpu") + b"K" + bytes((numel,)) + b"t"


def _tensor(pid: bytes | None = None) -> bytes:
    """``_rebuild_tensor_v2`` of a 4-element float32 tensor, as torch.save writes it without memo."""
    return (
        _g("torch._utils", "_rebuild_tensor_v2")
        + b"("
        + (pid or _pid())
        + b"QK\x00K\x04\x85K\x01\x85\x89"
        + _g("collections", "OrderedDict")
        + b")RtR"
    )


def _archive(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{path.stem}/data.pkl", pkl)
        z.writestr(f"{path.stem}/byteorder", "little")
        for key, raw in (storages or {"0": struct.pack("<4f", 1, 2, 3, 4)}).items():
            z.writestr(f"{path.stem}/data/{key}", raw)
        z.writestr(f"{path.stem}/version", "3\n")
    return path


def _globals_of(path: Path) -> set[str]:
    """Every global the output's pickle names, by GLOBAL or by STACK_GLOBAL of two literal strings."""
    pkl = zipfile.ZipFile(path).read(f"{path.stem}/data.pkl")
    names, strings = set(), []
    for op, arg, _ in pickletools.genops(pkl):
        if op.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            names.add(".".join(strings[-2:]))
        if isinstance(arg, str):
            strings.append(arg)
    return names


# A storage record whose MARK the reader pops with POP, so that its TUPLE takes the MARK before it: the walk in
# repickle.py took the popped MARK as the record's start and left the MARK before it in the output, one item
# deeper than the input at every later opcode.
_DESYNC = b"((0" + _pid()[1:] + b"Q00"


def _laundering_pickle(marker: Path) -> bytes:
    """Input: a set() of a string and a STACK_GLOBAL of two strings that names ``mypkg.os`` (an unknown-global
    warning, nothing dangerous). Written back by a walk that misplaces the records, it calls
    ``os.system('touch MARKER')``."""
    return (
        b"\x80\x02}"
        + _x("w")
        + _tensor()
        + b"s"
        + _x("x")
        + b"("
        + _g("__builtin__", "set")
        + _x("mypkg")
        + _x("os")
        + _x("system")
        + _DESYNC
        + b"\x93"
        + _DESYNC
        + _x(f"touch {marker}")
        + b"\x85Rls."
    )


def test_a_popped_mark_cannot_move_a_storage_record_and_launder_a_call(tmp_path: Path) -> None:
    marker = tmp_path / "statecli_hostile_marker"  # a payload marker: the session-end false-alarm check skips it
    src = _archive(tmp_path / "evil.pt", _laundering_pickle(marker))
    verdict = read(str(src))
    assert not [f for f in verdict.findings if f.level == "dangerous"]  # the input: a warning, no more
    code, _, err = run_cli("convert", src, "-o", tmp_path / "out.pt", "--dtype", "bf16")
    assert code == 3, err
    assert "cannot write this pickle back" in err and "internal error" not in err
    assert not (tmp_path / "out.pt").exists() and not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]


# Storage records whose tuple holds opcodes torch's pickler never writes there, each read by the reader as
# the usual record: a popped MARK, DUP and POP, a value built and dropped, a record of a cached key.
_ODD_RECORDS = {
    "popped-mark": b"((0" + _pid()[1:],
    "dup-pop": b"(" + _x("storage") + b"20" + _pid()[len(b"(") + len(_x("storage")) :],
    "built-and-popped": b"(" + _x("storage") + b"}0" + _pid()[len(b"(") + len(_x("storage")) :],
    "mark-pop-mark": b"(" + _x("storage") + b"(1" + _pid()[len(b"(") + len(_x("storage")) :],
}


@pytest.mark.parametrize("body", _ODD_RECORDS.values(), ids=list(_ODD_RECORDS))
def test_an_odd_storage_record_is_refused_or_written_faithfully(tmp_path: Path, body: bytes) -> None:
    pkl = b"\x80\x02}" + _x("w") + _tensor() + b"s" + _x("k") + body + b"Qs."
    src = _archive(tmp_path / "odd.pt", pkl)
    assert not [f for f in read(str(src)).findings if f.level == "dangerous"]
    code, _, err = run_cli("convert", src, "-o", tmp_path / "out.pt", "--dtype", "bf16")
    assert "internal error" not in err
    assert code in (0, 3), err
    if code == 0:
        assert _globals_of(tmp_path / "out.pt") <= _globals_of(src) | {"torch.BFloat16Storage"}
        ops = [op.name for op, _, _ in pickletools.genops(zipfile.ZipFile(tmp_path / "out.pt").read("out/data.pkl"))]
        assert "POP" not in ops and "DUP" not in ops


def test_a_repeated_storage_key_with_odd_fields_is_no_internal_error(tmp_path: Path) -> None:
    """A second record of a storage key already read: the reader returns the storage it has (as torch.load
    does, by key) whatever the other fields hold, and the rewrite took the second's type's ``.name``."""
    pid2 = b"(" + _x("storage") + _x("not a global") + _x("0") + _x("cpu") + b"K\x04t"
    src = _archive(tmp_path / "twice.pt", b"\x80\x02}" + _x("w") + _tensor() + b"s" + _x("s2") + pid2 + b"Qs.")
    code, _, err = run_cli("convert", src, "-o", tmp_path / "out.pt", "--dtype", "bf16")
    assert "internal error" not in err
    assert code in (0, 3), err
    if code == 0:
        assert _globals_of(tmp_path / "out.pt") <= {"torch._utils._rebuild_tensor_v2", "collections.OrderedDict"} | {
            "torch.BFloat16Storage"
        }


def _memo_reads_pickle(key: str, reads: int) -> bytes:
    """A storage record with its key memoized (index 1), then ``reads`` reads of that memo entry outside any
    record, each popped again: 3 bytes each, which the rewrite writes back as the key's literal."""
    pid = b"(" + _x("storage") + _g("torch", "FloatStorage") + _x(key) + b"q\x01" + _x("cpu") + b"K\x04t"
    return b"\x80\x02}" + _x("w") + _tensor(pid) + b"s" + b"h\x010" * reads + b"."


def test_memo_reads_outside_records_cost_no_memory_per_read(tmp_path: Path) -> None:
    """Each read of a record's memo entry outside it becomes a literal; the walk kept a record of every memo
    read (about 150 bytes for a 3-byte opcode: a 9 MB pickle took 700 MB to convert)."""
    pkl = _memo_reads_pickle("0", 1_000_000)
    tracemalloc.start()
    try:
        out = rewrite(
            pkl,
            0,
            len(pkl),
            [PersistentId("BFloat16Storage", "0", "cpu", 4)],
            "p",
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.count(b"X\x01\x00\x00\x000") == 1_000_001  # every read written as the literal '0'
    assert peak < 8 * len(pkl), peak


def test_a_long_memoized_key_read_again_and_again_is_refused_not_grown(tmp_path: Path) -> None:
    """A 20,000-character storage key memoized in its record and read 50,000 times outside it: the pickle is
    150 KB, written back with literals it would be 1 GB, more than statecli reads back; refused (exit 3)."""
    key = "k" * 20_000
    src = _archive(tmp_path / "long.pt", _memo_reads_pickle(key, 50_000), {key: struct.pack("<4f", 1, 2, 3, 4)})
    graph = read_graph(str(src))
    tracemalloc.start()
    try:
        with pytest.raises(statecli.errors.UnsupportedFormatError, match="cannot write this pickle back"):
            rewrite(graph.data, graph.start, graph.end, [PersistentId("FloatStorage", key, "cpu", 4)], str(src))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 400 << 20, peak


def test_the_output_pickle_is_judged_again_before_it_is_kept(tmp_path: Path) -> None:
    """The plan judged the input's pickle; the writer reads data.pkl again. A file changed in between (or any
    mistake of the rewrite) must not hand on a call the plan never saw: the output's own verdict is checked
    (exit 5, nothing written)."""
    import torch

    marker = tmp_path / "statecli_hostile_marker"  # a payload marker: the session-end false-alarm check skips it
    src = tmp_path / "m.pt"
    torch.save({"w": torch.ones(4)}, src)
    p = statecli.conversion.plan(src, tmp_path / "out.pt", dtype="bf16")
    assert p.graph and not [f for f in p.report.findings if f.level == "dangerous"]
    storage = zipfile.ZipFile(src).read("m/data/0")
    evil = b"\x80\x02}" + _x("w") + _tensor() + b"s" + _x("x") + _g("os", "system") + _x(f"touch {marker}") + b"\x85Rs."
    src.unlink()
    _archive(src, evil, {"0": storage})
    with pytest.raises(UnsafeError):
        statecli.conversion._execute.execute(p)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.pt"] and not marker.exists()


def test_nothing_ran_when_torch_reads_what_was_refused(tmp_path: Path) -> None:
    """The input itself, under torch.load(weights_only=False) in a throwaway process: it imports mypkg and
    fails; nothing touches the marker (the output, had it been written, would have)."""
    marker = tmp_path / "statecli_hostile_marker"  # a payload marker: the session-end false-alarm check skips it
    src = _archive(tmp_path / "evil.pt", _laundering_pickle(marker))
    code = f"import torch\ntry:\n    torch.load({str(src)!r}, weights_only=False)\nexcept Exception:\n    pass\n"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, timeout=120, check=True)
    assert not marker.exists()


@pytest.mark.parametrize("case", ["storage-alone", "float8"])
def test_an_untyped_storage_keeps_the_name_weights_only_accepts(tmp_path: Path, case: str) -> None:
    """torch pickles UntypedStorage (a storage saved alone, every float8/uint16 tensor) as
    torch.storage.UntypedStorage; the rewrite wrote torch.UntypedStorage, which torch.load(weights_only=True)
    refuses: a trusted file that loaded weights_only no longer did."""
    import torch

    src = tmp_path / "u.pt"
    t = torch.arange(6, dtype=torch.float32)
    if case == "storage-alone":
        obj = {"s": torch.randn(5).untyped_storage(), "t": t, "cfg": {"lr": 0.1}}
    else:
        obj = {"f8": t.to(torch.float8_e4m3fn), "t": t, "cfg": {"lr": 0.1}}
    torch.save(obj, src)
    torch.load(src, weights_only=True)
    code, _, err = run_cli("convert", src, "-o", tmp_path / "out.pt", "--dtype", "bf16", "--exclude", "f8")
    assert code == 0, err
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got["t"].dtype == torch.bfloat16 and got["cfg"] == {"lr": 0.1}
    if case == "storage-alone":
        assert bytes(got["s"]) == bytes(obj["s"])
    else:
        assert torch.equal(got["f8"].view(torch.uint8), obj["f8"].view(torch.uint8))


def test_a_sparse_tensor_in_a_whole_checkpoint_is_kept_or_refused_cleanly(tmp_path: Path) -> None:
    import torch

    src = tmp_path / "sp.pt"
    torch.save({"s": torch.eye(3).to_sparse(), "w": torch.randn(2)}, src)
    # Its layout lives in its rebuild call, which is copied: kept as saved, its component storages moved.
    code, _, err = run_cli("convert", src, "-o", tmp_path / "out.pt", "--dtype", "bf16", "--device", "cpu")
    assert code == 0, err
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got["s"].dtype == torch.float32 and torch.equal(got["s"].to_dense(), torch.eye(3))
    assert got["w"].dtype == torch.bfloat16


def test_a_global_written_again_under_another_protocol_is_refused(tmp_path: Path) -> None:
    """commands.Popen memoized in a (cached) storage record at protocol 3, where it is an unknown package's
    class (a warning); then PROTO 2 and a memo read of it, made with NEWOBJ. Written back as the literal
    GLOBAL, protocol 2's name mapping reads it as subprocess.Popen: refused (exit 3), nothing written."""
    pid2 = b"(" + _x("storage") + _g("commands", "Popen") + b"q\x05" + _x("0") + _x("cpu") + b"K\x04t"
    pkl = b"\x80\x03}" + _x("w") + _tensor() + b"s" + _x("s2") + pid2 + b"Qs\x80\x02" + _x("p") + b"h\x05)\x81s."
    src = _archive(tmp_path / "proto.pt", pkl)
    assert not [f for f in read(str(src)).findings if f.level == "dangerous"]
    code, _, err = run_cli("convert", src, "-o", tmp_path / "out.pt")
    assert code == 3, err
    assert "changes its protocol" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proto.pt"]
