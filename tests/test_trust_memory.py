"""Memory per pickle byte stays within its documented bound (issue #11): the reader pays for the containers
and memo entries a pickle builds, the walk for the tensor records it names, shares_with for the names it
repeats, and running out of memory anyway is exit 3 with one line, never "internal error".

The bound and the measurements behind every constant are in benchmarks/pickle_memory.py and
benchmarks/RESULTS.md; the hostile files are in tests/hostile/cases_memory.py.
"""

from __future__ import annotations

import io
import pickletools
import struct
import tracemalloc
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from clirun import run_cli
from subproc import run_python

import statecli
from statecli.errors import LimitExceededError
from statecli.formats import torchpickle
from statecli.formats.legacy import read_legacy
from statecli.formats.torchzip import read_torch_zip
from statecli.records import Container, RawCheckpoint, RawTensor
from statecli.roles import MAX_SHARES_CHARS, resolve
from statecli.safepickle import Limits
from statecli.security import loads

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parent / "sample_models"

from make_hostile import Asm, state_dict, torch_zip  # noqa: E402

OPS = {op.name: op.code.encode("latin1") for op in pickletools.opcodes}
BOUND = 64  # bytes of the reader's memory per pickle byte, the figure docs/security.md gives
NO_FLOOR = Limits(alloc_floor=0)  # the per-byte budget alone, as a large pickle sees it


@contextmanager
def traced() -> Iterator[list[int]]:
    """The peak of Python's allocations inside the block, in ``out[0]``."""
    out = [0]
    tracemalloc.start()
    try:
        yield out
    finally:
        out[0] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def pickle_of(body: bytes) -> bytes:
    return OPS["PROTO"] + b"\x04" + body + OPS["STOP"]


def repeated(unit: bytes, size: int, before: bytes = b"", after: bytes = OPS["LIST"]) -> bytes:
    """``before`` MARK ``unit``... ``after``: a pickle of about ``size`` bytes."""
    return pickle_of(before + OPS["MARK"] + unit * (size // len(unit)) + after)


# --- the reader ------------------------------------------------------------------------------------

COSTLY = {
    "EMPTY_SET": OPS["EMPTY_SET"],
    "EMPTY_SET MEMOIZE": OPS["EMPTY_SET"] + OPS["MEMOIZE"],
    "EMPTY_DICT": OPS["EMPTY_DICT"],
    "EMPTY_LIST": OPS["EMPTY_LIST"],
    "MARK FROZENSET": OPS["MARK"] + OPS["FROZENSET"],
    "MARK DICT": OPS["MARK"] + OPS["DICT"],
    "MARK LIST": OPS["MARK"] + OPS["LIST"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", COSTLY)
def test_containers_past_the_budget_are_refused_within_the_bound(name: str) -> None:
    data = repeated(COSTLY[name], 300_000)
    with traced() as peak, pytest.raises(LimitExceededError, match="sets, dicts and lists"):
        loads(data, limits=NO_FLOOR)
    assert peak[0] < BOUND * len(data), f"{peak[0] / len(data):.0f} bytes per pickle byte"


@pytest.mark.slow
def test_memoizing_more_than_one_object_per_four_bytes_is_refused_within_the_bound() -> None:
    data = pickle_of(OPS["NONE"] + OPS["MEMOIZE"] * 300_000)
    too_many = "memo exceeds 75001 entries, more than a 300004-byte pickle may store"
    with traced() as peak, pytest.raises(LimitExceededError, match=too_many):
        loads(data, limits=NO_FLOOR)
    assert peak[0] < BOUND * len(data), f"{peak[0] / len(data):.0f} bytes per pickle byte"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "unit", "before"),
    [
        ("LONG_BINPUT to new slots", None, OPS["NONE"]),
        ("DUP", OPS["DUP"], OPS["NONE"]),
        ("BINGET", OPS["BINGET"] + b"\x00", OPS["NONE"] + OPS["BINPUT"] + b"\x00"),
        ("EMPTY_TUPLE", OPS["EMPTY_TUPLE"], b""),
        ("NONE TUPLE1", OPS["NONE"] + OPS["TUPLE1"], b""),
        ("BININT", OPS["BININT"] + struct.pack("<i", 123456), b""),
        ("SHORT_BINUNICODE", OPS["SHORT_BINUNICODE"] + b"\x02\xc4\x80", b""),
        # A stub's dict item under a None key: the dict once came with a hash counter of its own (101 B/B).
        (
            "stub SETITEM",
            OPS["BINGET"] + b"\x00" + OPS["EMPTY_TUPLE"] + OPS["REDUCE"] + OPS["NONE"] * 2 + OPS["SETITEM"],
            OPS["GLOBAL"] + b"mod\nCls\n" + OPS["BINPUT"] + b"\x00",
        ),
    ],
)
def test_cheap_objects_are_read_within_the_bound(name: str, unit: bytes | None, before: bytes) -> None:
    if unit is None:
        body = before + b"".join(OPS["LONG_BINPUT"] + struct.pack("<I", i) for i in range(60_000))
        data = pickle_of(body)
    else:
        data = repeated(unit, 300_000, before, OPS["LIST"] + OPS["POP"] if before else OPS["LIST"])
    with traced() as peak:
        loads(data, limits=NO_FLOOR)
    assert peak[0] < BOUND * len(data), f"{peak[0] / len(data):.0f} bytes per pickle byte"


@pytest.mark.parametrize("op", ["SETITEM", "ADDITEMS"])
def test_a_flood_added_one_key_at_a_time_is_still_refused(op: str) -> None:
    # Ints past the hash modulus collide; the counter made at 64 keys counts the ones already there.
    colliding = [OPS["LONG1"] + b"\x09" + (k * (2**61 - 1)).to_bytes(9, "little", signed=True) for k in range(1, 100)]
    if op == "SETITEM":
        body = OPS["EMPTY_DICT"] + b"".join(c + OPS["NONE"] + OPS["SETITEM"] for c in colliding)
    else:
        body = OPS["EMPTY_SET"] + b"".join(OPS["MARK"] + c + OPS["ADDITEMS"] for c in colliding)
    with pytest.raises(LimitExceededError, match="share one hash"):
        loads(pickle_of(body))


def test_a_small_pickle_of_memoized_empty_lists_is_read() -> None:
    # The densest memo an honest pickle has, an empty list and its MEMOIZE in two bytes: within the floors.
    data = repeated(OPS["EMPTY_LIST"] + OPS["MEMOIZE"], 400_000)
    assert len(loads(data)[0]) == 200_000


def _torch_save(obj: object, protocol: int) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf, pickle_protocol=protocol)
    return buf.getvalue()


def _real_checkpoints() -> list[tuple[str, bytes]]:
    """torch.save archives: the samples, and whole modules and optimizers in protocols 2 and 4 (protocol 4
    writes a set per module, the most containers per byte of any torch pickle measured)."""
    import torch
    from torch import nn

    out = [(p.name, p.read_bytes()) for p in [*sorted(SAMPLES.glob("*.pt")), SAMPLES / "lightning.ckpt"]]
    out = [(n, b) for n, b in out if zipfile.is_zipfile(io.BytesIO(b)) and "torchscript" not in n]
    model = nn.Sequential(*[nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2), nn.ReLU()) for _ in range(20)])
    opt = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for protocol in (2, 4):
        out.append((f"module, protocol {protocol}", _torch_save(model, protocol)))
        out.append(
            (
                f"training dict, protocol {protocol}",
                _torch_save({"model": model.state_dict(), "opt": opt.state_dict()}, protocol),
            )
        )
    return out


def test_torch_checkpoints_fit_both_budgets_without_their_floors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    monkeypatch.setattr(torchpickle, "WALK_UNITS_FLOOR", 0)
    for name, data in _real_checkpoints():
        path = tmp_path / "x.pt"
        path.write_bytes(data)
        raw = read_torch_zip(str(path), limits=NO_FLOOR)
        assert raw.tensors, name


# --- the walk --------------------------------------------------------------------------------------


def test_a_pickle_naming_a_tensor_per_byte_is_refused(tmp_path: Path) -> None:
    # DUP of one tensor in a list: one record per byte, each 3-8 KB once reported.
    data = state_dict(("t", lambda a: a.op("MARK").tensor().raw(OPS["DUP"] * 40_000).op("LIST")))
    path = torch_zip(tmp_path / "dup.pt", data)
    with pytest.raises(LimitExceededError, match="names more tensors than it holds"):
        read_torch_zip(str(path))


def test_long_names_are_paid_for(tmp_path: Path) -> None:
    # 200 references (5 bytes each) to one tensor under a 60,000-character key: 12 MB of names from 61 KB.
    def payload(a: Asm) -> None:
        a.tensor().put(1).op("POP").op("EMPTY_DICT").str_("k" * 60_000).op("MARK")
        a.raw((OPS["LONG_BINGET"] + struct.pack("<I", 1)) * 200).op("LIST").op("SETITEM")

    path = torch_zip(tmp_path / "long.pt", state_dict(("payload", payload)))
    with pytest.raises(LimitExceededError, match="names more tensors than it holds"):
        read_torch_zip(str(path))


def test_many_tied_names_of_one_tensor_are_still_read(tmp_path: Path) -> None:
    # Tied weights under 10,000 names: legitimate, and within the floor of the walk's budget.
    a = Asm(2).op("EMPTY_DICT").op("MARK").str_("weight").tensor().put(1)
    for i in range(10_000):
        a.str_(f"tied.{i}").get(1)
    path = torch_zip(tmp_path / "tied.pt", a.op("SETITEMS").op("STOP").getvalue())
    assert len(read_torch_zip(str(path)).tensors) == 10_001


# --- shares_with -----------------------------------------------------------------------------------


def _shared(names: list[str]) -> RawCheckpoint:
    tensors = [RawTensor(n, "float32", (4,), (1,), 0, "cpu", "data/0", 16) for n in names]
    return RawCheckpoint("x.pt", "torch-zip", tensors, Container("state_dict", ""), file_size=16)


def test_shares_with_lists_at_most_its_characters_of_names() -> None:
    # Two 60,000-character names first, then short ones: every tensor of the storage would list both again.
    names = ["a" * 60_000, "b" * 60_000] + [f"t{i}" + "n" * 98 for i in range(20)]
    report = resolve(_shared(names))
    for t in report.tensors:
        assert sum(map(len, t.shares_with)) <= MAX_SHARES_CHARS
    assert report.tensors[-1].shares_with == ()  # the first sharer's name alone is over the limit
    assert any(f.code == "many-sharers" and "too long" in f.message for f in report.findings)
    names = [f"t{i}" + "n" * 98 for i in range(20)]
    listed = [t.shares_with for t in resolve(_shared(names)).tensors]
    assert listed[0] == tuple(names[1:6]) and listed[1] == (names[0], *names[2:6]) and listed[19] == tuple(names[:5])


def test_shares_with_of_short_names_is_unchanged() -> None:
    report = resolve(_shared(["a", "b", "c"]))
    assert [t.shares_with for t in report.tensors] == [("b", "c"), ("a", "c"), ("a", "b")]
    assert not report.findings


# --- out of memory ---------------------------------------------------------------------------------

OOM_SCRIPT = r"""
import resource, sys
from statecli.cli.main import main

def vm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

# Room for about 16 MiB more than the interpreter and statecli hold already.
resource.setrlimit(resource.RLIMIT_AS, (vm() + (16 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
sys.argv = ["statecli", "inspect", sys.argv[1], "--format", "json"]
main()
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmSize from /proc")
def test_running_out_of_memory_is_exit_3_with_one_line(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "big.pt"
    torch.save({f"layer{i}.weight": torch.zeros(2) for i in range(30_000)}, path)  # ~50 MB to read
    proc = run_python(OOM_SCRIPT, str(path), timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "out of memory" in proc.stderr and "internal error" not in proc.stderr
    assert str(path) in proc.stderr


def test_a_memory_error_anywhere_in_a_command_is_exit_3_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(path: object) -> None:
        raise MemoryError

    monkeypatch.setattr(statecli, "open_checkpoint", no_memory)
    result = run_cli("inspect", "x.pt")
    assert result.exit_code == 3
    assert result.stderr == "statecli: error: out of memory: the input needs more memory than this process may use\n"


# --- legacy files ----------------------------------------------------------------------------------


def test_a_legacy_file_is_not_copied_once_per_pickle(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2_000_000)}, path, _use_new_zipfile_serialization=False)  # 8 MB of storage
    size = path.stat().st_size
    with traced() as peak:
        read_legacy(str(path))
    assert peak[0] < 1.5 * size, f"peak {peak[0] >> 20} MiB for a {size >> 20} MiB file"
