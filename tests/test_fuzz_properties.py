"""Property tests: damaged and mutated inputs give a report or a StatecliError, never anything else, quickly.

tests/test_corruption.py truncates and overwrites whole sample files; most of those mutations are caught
by the zip CRC or the safetensors length prefix before any parser sees them. These tests mutate *inside*
the containers and then repair them (the zip is rewritten with fresh CRCs, the header length is fixed),
so the mutations reach the restricted unpickler, the walker and the header validation; plus opcode-level
random pickles for the unpickler alone. Each example is bounded by a hypothesis deadline.

For long runs, use the harness: ``python tests/fuzz/fuzz_read.py --seconds 600``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from subproc import FUZZ_PATH, checkout_env

import statecli
from statecli.errors import InputError, StatecliError, UnsafeError
from statecli.security import loads

HERE = Path(__file__).resolve().parent
SAMPLES_DIR = HERE.parent / "sample_models"
ZIPS = sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix in (".pt", ".ckpt") and zipfile.is_zipfile(p))
SAFETENSORS = sorted(SAMPLES_DIR.rglob("*.safetensors"))

# STATECLI_FUZZ_EXAMPLES=5000 for a longer hunt; CI runs the default.
EXAMPLES = int(os.environ.get("STATECLI_FUZZ_EXAMPLES", "60"))
FAST = settings(
    max_examples=EXAMPLES,
    deadline=3000,  # ms per example: every example here takes well under 100 ms
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def read(path: Path) -> None:
    """The property: a report (that serializes) or a StatecliError with a one-line message, nothing else."""
    try:
        report = statecli.open_checkpoint(path)
    except StatecliError as e:
        assert e.exit_code in (3, 5), (type(e).__name__, e)
        assert "\n" not in str(e), str(e)
        return
    json.dumps(report.to_dict())


def _data_pkl(path: Path) -> tuple[list[zipfile.ZipInfo], dict[str, bytes], str]:
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        members = {i.filename: z.read(i.filename) for i in infos}
    name = next(n for n in members if n.endswith("/data.pkl"))
    return infos, members, name


def _rezip(infos: list[zipfile.ZipInfo], members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for info in infos:
            z.writestr(zipfile.ZipInfo(info.filename, info.date_time), members[info.filename])
    return buf.getvalue()


# Mutations of a byte string, as data hypothesis can shrink: (kind, where in [0, 1], a byte or a length).
MUTATION = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "dup", "cut"]),
    st.floats(0, 1, allow_nan=False),
    st.integers(0, 255),
)
# Bytes that matter to a pickle parser: opcodes that build, call, memoize, nest, and the STOP.
OPCODES = b"()0123.ABCGIJKLMNPQRSTUVXabcdeghijklopqrstu}\x80\x81\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f"
OPCODES += b"\x90\x91\x92\x93\x94\x95\x96"


def mutate(data: bytes, edits: list[tuple[str, float, int]]) -> bytes:
    out = bytearray(data)
    for kind, where, value in edits:
        at = min(int(where * len(out)), max(len(out) - 1, 0))
        if kind == "flip" and out:
            out[at] ^= 1 << (value % 8)
        elif kind == "set" and out:
            out[at] = OPCODES[value % len(OPCODES)] if value < 128 else value
        elif kind == "insert":
            out[at:at] = bytes([OPCODES[value % len(OPCODES)]])
        elif kind == "delete" and out:
            del out[at : at + 1 + value % 8]
        elif kind == "dup" and out:
            out[at:at] = out[at : at + 1 + value % 16]  # repeats a run: memo puts, marks, strings
        elif kind == "cut":
            del out[at:]
    return bytes(out)


@FAST
@given(index=st.integers(0, len(ZIPS) - 1), edits=st.lists(MUTATION, min_size=1, max_size=6))
def test_mutated_pickle_inside_a_valid_zip(index: int, edits: list[tuple[str, float, int]]) -> None:
    infos, members, name = _data_pkl(ZIPS[index])
    members[name] = mutate(members[name], edits)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / f"m{ZIPS[index].suffix}"
        p.write_bytes(_rezip(infos, members))
        read(p)


@FAST
@given(
    index=st.integers(0, len(ZIPS) - 1),
    which=st.floats(0, 1, allow_nan=False),
    size=st.sampled_from([0, 1, 3, 4, 7, 1 << 20]),
)
def test_storage_members_of_other_sizes(index: int, which: float, size: int) -> None:
    """A storage member shorter or longer than its tensors need: an error naming it, or a report."""
    infos, members, _ = _data_pkl(ZIPS[index])
    storages = sorted(n for n in members if "/data/" in n)
    assume(storages)
    victim = storages[min(int(which * len(storages)), len(storages) - 1)]
    members[victim] = bytes(size)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "m.pt"
        p.write_bytes(_rezip(infos, members))
        read(p)


@FAST
@given(index=st.integers(0, len(ZIPS) - 1), edits=st.lists(MUTATION, min_size=1, max_size=4))
def test_mutated_zip_directory(index: int, edits: list[tuple[str, float, int]]) -> None:
    """Mutations confined to the central directory and the end record (sizes, offsets, names, counts)."""
    data = ZIPS[index].read_bytes()
    cd = data.rfind(b"PK\x01\x02")
    first = data.find(b"PK\x01\x02")
    head, tail = data[:first], data[first:]
    assume(cd >= 0)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "m.pt"
        p.write_bytes(head + mutate(tail, [(k, w, v) for k, w, v in edits if k != "cut"]))
        read(p)


@FAST
@given(index=st.integers(0, len(SAFETENSORS) - 1), edits=st.lists(MUTATION, min_size=1, max_size=6))
def test_mutated_safetensors_header_with_its_length_fixed(index: int, edits: list[tuple[str, float, int]]) -> None:
    data = SAFETENSORS[index].read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    header = mutate(data[8 : 8 + n], edits)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "m.safetensors"
        p.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n :])
        read(p)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@FAST
@given(
    entry=st.fixed_dictionaries(
        {},
        optional={
            "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "F8_E4M3", "X", ""]) | JSON_VALUES,
            "shape": st.lists(st.integers(-2, 2**64), max_size=5) | JSON_VALUES,
            "data_offsets": st.lists(st.integers(-2, 2**64), max_size=3) | JSON_VALUES,
        },
    ),
    metadata=st.none() | JSON_VALUES,
    tail=st.integers(0, 64),
)
def test_random_safetensors_headers(entry: dict, metadata: object, tail: int) -> None:
    header: dict[str, object] = {"t": entry}
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "m.safetensors"
        p.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(tail))
        read(p)


@FAST
@given(
    shards=st.dictionaries(
        st.text(min_size=1, max_size=6),
        st.sampled_from(["s.safetensors", "../s.safetensors", "/etc/hostname", "sub/../s.safetensors", "", "."])
        | st.text(max_size=12),
        max_size=4,
    )
)
def test_random_index_weight_maps(shards: dict[str, str]) -> None:
    """Whatever a weight_map names, the answer is a report, an input error (3) or a refusal (5)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        folder.mkdir()
        raw = json.dumps({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
        (folder / "s.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
        read(folder)


# ------------------------------------------------------------------------ the unpickler on its own


def _arg(draw: st.DrawFn, op: int) -> bytes:
    """An argument for opcode ``op``: mostly well formed, sometimes hostile (huge sizes, huge indices)."""
    small = draw(st.integers(0, 255))
    if op in b"KhqC\x8c":  # one-byte argument: BININT1, BINGET, BINPUT, SHORT_BINBYTES, SHORT_BINUNICODE
        n = small % 8 if op in b"C\x8c" else small
        return bytes([n]) + (b"abcdefgh"[:n] if op in b"C\x8c" else b"")
    if op in b"MJjr":  # two or four bytes
        width = 2 if op == ord("M") else 4
        v = draw(st.sampled_from([0, 1, 7, 255, 2**16 - 1, 2**31 - 1, 2**32 - 1])) % (1 << (8 * width))
        return v.to_bytes(width, "little")
    if op in b"XB":  # four-byte length, then that many bytes (or a lie)
        n = draw(st.sampled_from([0, 1, 3, 2**32 - 1]))
        return struct.pack("<I", n) + b"abc"[: min(n, 3)]
    if op in b"\x8d\x8e\x96\x95":  # eight-byte length
        n = draw(st.sampled_from([0, 2, 2**63, 2**64 - 1]))
        return struct.pack("<Q", n) + (b"ab"[: min(n, 2)] if op != 0x95 else b"")
    if op == 0x8A:  # LONG1
        n = small % 10
        return bytes([n]) + bytes(range(n))
    if op in b"cgpiILFSVP":  # newline-terminated text
        text = draw(st.sampled_from([b"os\nsystem", b"torch\nFloatStorage", b"0", b"12", b"'x'", b"builtins\neval"]))
        return text + b"\n"
    if op == 0x80:
        return bytes([small % 6])
    return b""


@st.composite
def opcode_streams(draw: st.DrawFn) -> bytes:
    ops = draw(st.lists(st.sampled_from(list(OPCODES)), min_size=1, max_size=60))
    out = bytearray(b"\x80" + bytes([draw(st.integers(0, 5))]))
    for op in ops:
        out.append(op)
        out += _arg(draw, op)
    if draw(st.booleans()):
        out.append(ord("."))
    return bytes(out)


@settings(max_examples=5 * EXAMPLES, deadline=2000, database=None)
@given(data=opcode_streams(), fast=st.booleans())
def test_random_opcode_streams(data: bytes, fast: bool) -> None:
    """Opcode-level random pickles (hostile sizes, memo indices, calls, marks): inert data or InputError,
    with and without the tensor fast path."""

    def persistent(pid: object) -> object:
        raise InputError("no storages here")

    with contextlib.suppress(InputError, UnsafeError):  # UnsafeError: a call, then a failure
        loads(data, persistent, fast_paths=fast)


@pytest.mark.slow
def test_fuzz_harness_runs(tmp_path: Path) -> None:
    """The long-running harness (tests/fuzz/fuzz_read.py) still starts, mutates and reports, in 3 s."""
    env = checkout_env(path=FUZZ_PATH)
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "fuzz" / "fuzz_read.py"),
            "--seconds",
            "3",
            "--engine",
            "random",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["executions"] > 0 and summary["crashes"] == 0, summary


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickles_of_plain_data_need_no_allowlist(protocol: int) -> None:
    """The limits added against hostile pickles leave ordinary data alone: int keys (optimizer state),
    small tuple keys, sets, nested containers."""
    value = {
        "state": {i: {"step": i} for i in range(5000)},
        "pairs": {(i, i + 1): i for i in range(100)},
        "set": set(range(100)),
        "neg": {-1: 1, -2: 2},
        "nested": [[[[1, 2], (3, 4)]]],
    }
    obj, _ = loads(pickle.dumps(value, protocol=protocol))
    assert obj["state"][4999] == {"step": 4999}
    assert obj["pairs"][(99, 100)] == 99
    assert obj["neg"] == {-1: 1, -2: 2}
