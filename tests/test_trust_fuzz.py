"""The structural fuzzers (tests/fuzz/structures.py) in CI, and the problems they found, one test each.

``test_structural_fuzz`` builds checkpoints of every container statecli reads (DCP folders, ``.pt2`` and
TorchScript archives, nested archives, shard indexes, legacy files, torch.save archives) with targeted
corruptions and runs every command path on each (tests/fuzz/commands.py): a result or a StatecliError of
exit 3 or 5, nothing else, nothing written on failure, each input within a deadline and a memory cap.
For a longer hunt: ``python tests/fuzz/fuzz_read.py --engine structural --seconds 600``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from subproc import FUZZ_PATH, checkout_env

import statecli
from statecli.diff import diff
from statecli.errors import InputError, UsageError
from statecli.stats import compute

HERE = Path(__file__).resolve().parent

from commands import run_commands  # noqa: E402


def read_members(p: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(p) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def write_members(p: Path, members: dict[str, bytes]) -> None:
    """Members stored (not deflated), as torch writes them."""
    p.write_bytes(write_zip_bytes(members))


def write_zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


# ------------------------------------------------------------------------------- problems found, fixed


@pytest.mark.parametrize("extra", [b"\x01", bytes(8)], ids=["ragged", "whole-elements"])
def test_a_storage_member_longer_than_its_record(tmp_path: Path, extra: bytes) -> None:
    """torch.load refuses a storage record of any size but the one its pickle claims; values were read
    over the whole member: a RuntimeError (a size that is no whole number of elements), or elements that
    belong to no tensor in stats and in the converted file. Now the reader refuses it (exit 3), so every
    command does, inspect included."""
    p = tmp_path / "m.pt"
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, p)
    members = read_members(p)
    members["m/data/0"] += extra
    write_members(p, members)
    with pytest.raises(RuntimeError, match="does not match expected size"):
        torch.load(p, weights_only=True)
    (tmp_path / "out").mkdir()
    claims = "storage '0' claims 16 bytes but data/0 holds"
    for read_values in (
        lambda: statecli.open_checkpoint(p),
        lambda: statecli.load(p),
        lambda: statecli.convert(p, tmp_path / "out" / "w.safetensors"),
        lambda: diff(p, p),
    ):
        with pytest.raises(InputError, match=claims):
            read_values()
    assert list((tmp_path / "out").iterdir()) == []


def test_a_pt2_weight_member_that_is_empty(samples_dir: Path, tmp_path: Path) -> None:
    """A .pt2 weight stored with no bytes (torch.export.load makes it zeros; inspect warns): the commands
    that read values viewed the empty member as the tensor's storage, a RuntimeError from torch's
    as_strided. They now refuse it with exit 3, and convert writes nothing."""
    p = tmp_path / "m.pt2"
    members = read_members(samples_dir / "export_frozen.pt2")
    members["export_frozen/data/weights/weight_0"] = b""
    write_members(p, members)
    report = statecli.open_checkpoint(p)
    assert any(f.code == "export-empty-payload" for f in report.findings)
    (tmp_path / "out").mkdir()
    needs = r"the bytes of 'net.backbone.0.weight' hold 0 float32 elements; its shape \[16, 8\] needs element 127"
    for read_values in (
        lambda: compute(statecli.open_checkpoint(p)),
        lambda: statecli.load(p),
        lambda: statecli.convert(p, tmp_path / "out" / "w.safetensors"),
        lambda: diff(p, p),
    ):
        with pytest.raises(InputError, match=needs):
            read_values()
    assert list((tmp_path / "out").iterdir()) == []


def test_a_name_safetensors_cannot_hold(tmp_path: Path) -> None:
    """A pickled key with a lone surrogate (pickle reads text with surrogatepass, so torch.load gives the same
    name): convert to safetensors crashed with a UnicodeEncodeError while writing the header. It is now
    refused before anything is written, like a dtype safetensors cannot store; a .pt output keeps the name."""
    name = "w\ud800"
    p = tmp_path / "m.pt"
    torch.save({name: torch.ones(2)}, p)
    assert list(torch.load(p, weights_only=True)) == [name]
    (tmp_path / "out").mkdir()
    with pytest.raises(UsageError, match=r"cannot store the tensor name 'w\\ud800', which is not valid Unicode"):
        statecli.convert(p, tmp_path / "out" / "m.safetensors")
    assert list((tmp_path / "out").iterdir()) == []
    statecli.convert(p, tmp_path / "out" / "m.pt")
    assert list(torch.load(tmp_path / "out" / "m.pt", weights_only=True)) == [name]


def test_pt2_sample_inputs_that_share_their_lists(samples_dir: Path, tmp_path: Path) -> None:
    """A .pt2's sample inputs pickled as a DAG of shared lists (40 levels, each ten references to the
    next: 10**40 paths in a few hundred bytes) hung every command, or ended in a MemoryError: the walk
    followed every path. Each container is now walked once. (Found by the structural fuzzer.)"""
    from structures import PID, Call, G, ODict, dumps, laughs

    tensor = Call(
        G("torch._utils", "_rebuild_tensor_v2"),
        (PID(("storage", G("torch", "FloatStorage"), "0", "cpu", 2)), 0, (2,), (1,), False, ODict([])),
    )
    inputs = write_zip_bytes({"x/data.pkl": dumps((laughs(10, 40, tensor), {})), "x/data/0": bytes(8)})
    members = read_members(samples_dir / "export_frozen.pt2")
    members["export_frozen/data/sample_inputs/model.pt"] = inputs
    (tmp_path / "in").mkdir()
    p = tmp_path / "in" / "m.pt2"
    write_members(p, members)
    run_commands(p, tmp_path / "scratch", seconds=10, memory=1 << 30)
    names = [t.name for t in statecli.open_checkpoint(p).tensors if t.group == "sample_inputs"]
    # The innermost list holds the tensor ten times: ten names, one storage (as for inputs (x, x)).
    assert names == [f"sample_inputs.0{'.0' * 39}.{i}" for i in range(10)]


# ------------------------------------------------------------------------------- the fuzzer, in CI

import known  # noqa: E402
import make_crashes  # noqa: E402
import structures  # noqa: E402
from commands import Slow, Violation  # noqa: E402
from hypothesis import HealthCheck, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# STATECLI_FUZZ_EXAMPLES=500 for a longer hunt; CI runs the default (about 40 s on two cores).
EXAMPLES = int(os.environ.get("STATECLI_FUZZ_EXAMPLES", "25"))
# CPU seconds per command: these inputs are kilobytes and every command takes milliseconds on them; the
# hostile harness holds its commands to 5 s.
CPU_SECONDS = 2.0
MEMORY = 1 << 30  # address space all the commands on one input may add: the 1 GB
_SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else None
KNOWN_SEEN: dict[str, int] = {}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")  # the generators write duplicate members
@pytest.mark.parametrize("family", list(structures.FAMILIES))
@settings(
    max_examples=EXAMPLES,
    deadline=None,  # each command has its own CPU-time deadline (a hypothesis deadline is wall-clock)
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_structural_fuzz(family: str, data: st.DataObject) -> None:
    """Every command path on a checkpoint built piece by piece (tests/fuzz/structures.py), mostly valid and
    corrupted in targeted ways: a result or a StatecliError of exit 3 or 5, nothing else, nothing written
    on failure, within CPU_SECONDS per command and MEMORY. A failure that is a known defect
    (tests/fuzz/known.py, each with a reproducer below) is counted, not raised."""
    with tempfile.TemporaryDirectory(prefix="statecli-sfuzz-", dir=_SCRATCH) as tmp:
        built = structures.build(family, structures.HypothesisDraw(data), Path(tmp) / "case")
        note(f"{family}: corruptions {built.corruptions}")
        dtype = st.sampled_from([None, "bf16", "fp16", "float8_e4m3fn"])
        flags = {"pt_output": st.booleans(), "histogram": st.booleans(), "dtype": dtype}
        options = data.draw(st.fixed_dictionaries(flags))
        try:
            run_commands(built.path, Path(tmp) / "scratch", seconds=CPU_SECONDS, memory=MEMORY, **options)
        except (Violation, Slow) as e:
            name = known.match(family, e)
            if name is None:
                raise
            KNOWN_SEEN[name] = KNOWN_SEEN.get(name, 0) + 1


def _crash_params() -> list[Any]:
    return [
        pytest.param(name, id=name)
        if crash.fixed
        else pytest.param(name, marks=pytest.mark.xfail(reason=crash.reason, strict=True), id=name)
        for name, crash in make_crashes.CRASHES.items()
    ]


@pytest.mark.parametrize("name", _crash_params())
def test_known_crash(name: str, tmp_path: Path) -> None:
    """A reproducer the fuzzer found (tests/fuzz/crashes/<name>/), through every command path: an open one
    fails, for the reason its mark gives (a fix makes it pass, strictly unexpectedly, and is then marked
    fixed); a fixed one must pass."""
    crash = make_crashes.CRASHES[name]
    if crash.needs_memory_cap and not os.path.exists("/proc/self/status"):
        pytest.skip("no address-space cap here: torch's allocator reserves the 4 GiB lazily")
    outcome = run_commands(
        make_crashes.input_of(name), tmp_path, seconds=CPU_SECONDS, memory=MEMORY, pt_output=crash.pt_output
    )
    missing = [e for e in crash.expect if e not in outcome.split()]
    assert not missing, f"{outcome}: not {missing}"


def test_every_known_pattern_has_a_reproducer() -> None:
    assert set(known.KNOWN) <= {n for n, c in make_crashes.CRASHES.items() if not c.fixed}
    for name in make_crashes.CRASHES:
        make_crashes.input_of(name)  # built, and committed


@pytest.mark.slow
def test_structural_engine_runs(tmp_path: Path) -> None:
    """The timed structural engine (tests/fuzz/fuzz_read.py --engine structural) starts, builds, runs and
    reports: a few seconds of it."""
    engine = ["--engine", "structural", "--seconds", "4", "--families", "torchzip,safetensors", "--seed", "3"]
    proc = subprocess.run(
        [sys.executable, str(HERE / "fuzz" / "fuzz_read.py"), *engine, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        env=checkout_env(path=FUZZ_PATH),
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["executions"] > 0 and summary["generator_errors"] == 0, summary
    assert summary["violations"] + summary["slow"] + summary["hangs"] == 0, (summary, proc.stderr[-3000:])


def test_a_storage_viewed_as_two_dtypes(tmp_path: Path) -> None:
    """One storage viewed as bool by one tensor and as float8_e4m3fn by another (``_rebuild_tensor_v3`` over
    the untyped storage; torch.save refuses to write it, torch.load reads it). The values commands read a
    storage as one dtype: stats gave the float8 tensor the bool view's values (max 1.0 for a 2.0),
    statecli.load returned it as a bool tensor, diff ended in a RuntimeError when the bytes were no whole
    number of the other's elements, and convert to .pt wrote one dtype and failed its own read-back with
    exit 4. (Found by the structural fuzzer.) They now refuse it with exit 3; inspect still lists it."""
    from structures import PID, Call, G, ODict, dumps

    def view(storage: str, dtype: str | None) -> Call:
        pid = PID(("storage", G("torch", storage), "0", "cpu", 4))
        if dtype is None:
            return Call(G("torch._utils", "_rebuild_tensor_v2"), (pid, 0, (4,), (1,), False, ODict([])))
        args = (pid, 0, (4,), (1,), False, ODict([]), G("torch", dtype))
        return Call(G("torch._utils", "_rebuild_tensor_v3"), args)

    members = {
        "archive/data.pkl": dumps({"a": view("BoolStorage", None), "b": view("UntypedStorage", "float8_e4m3fn")})
    }
    members |= {"archive/byteorder": b"little", "archive/data/0": b"\x38\x40\x01\x00", "archive/version": b"3\n"}
    p = tmp_path / "m.pt"
    p.write_bytes(write_zip_bytes(members))
    assert [(t.name, t.dtype, t.storage) for t in statecli.open_checkpoint(p).tensors] == [
        ("a", "bool", "data/0"),
        ("b", "float8_e4m3fn", "data/0"),
    ]
    (tmp_path / "out").mkdir()
    viewed = r"storage data/0 is viewed as bool \('a'\) and as float8_e4m3fn \('b'\)"
    for read_values in (
        lambda: compute(statecli.open_checkpoint(p)),
        lambda: statecli.load(p),
        lambda: statecli.convert(p, tmp_path / "out" / "m.pt"),
        lambda: diff(p, p),
    ):
        with pytest.raises(InputError, match=viewed):
            read_values()
    assert list((tmp_path / "out").iterdir()) == []


def test_an_empty_tensor_whose_contiguous_strides_overflow(tmp_path: Path) -> None:
    """An empty tensor (a 0 among its dims) with a dimension of 2**62: its view reaches no element, so no
    reader checks it against its storage, but its contiguous strides pass 2**63. statecli.load and convert
    ended in torch's TypeError ("Overflow when unpacking long long"); they now refuse it with exit 3.
    (Found by the structural fuzzer, in a legacy file.)"""
    from structures import PID, Call, G, ODict, dumps

    pid = PID(("storage", G("torch", "FloatStorage"), "0", "cpu", 0))
    empty = Call(G("torch._utils", "_rebuild_tensor_v2"), (pid, 0, (5, 0, 5, 2**62), (5, 5, 1, 1), False, ODict([])))
    members = {"archive/data.pkl": dumps({"w": empty}), "archive/byteorder": b"little", "archive/data/0": b""}
    p = tmp_path / "m.pt"
    p.write_bytes(write_zip_bytes({**members, "archive/version": b"3\n"}))
    assert [t.numel for t in statecli.open_checkpoint(p).tensors] == [0]
    (tmp_path / "out").mkdir()
    impossible = r"'w' of shape \[5, 0, 5, 4611686018427387904\] has an impossible stride"
    for read_values in (lambda: statecli.load(p), lambda: statecli.convert(p, tmp_path / "out" / "m.safetensors")):
        with pytest.raises(InputError, match=impossible):
            read_values()
    assert list((tmp_path / "out").iterdir()) == []


def test_a_pt2_storage_claimed_on_two_devices(samples_dir: Path, tmp_path: Path) -> None:
    """Two .pt2 weights that name the same member (tied) with different devices in their tensor_meta:
    convert to .pt wrote the storage on the first one's device, then its read-back check failed with exit
    4 (output) for a problem of the input. It is now refused before anything is written, exit 3; with
    --device the storage has one location and converts. (Found by the structural fuzzer.)"""
    members = read_members(samples_dir / "export_tied_lm.pt2")
    config_name = "export_tied_lm/data/weights/model_weights_config.json"
    config = json.loads(members[config_name])
    config["config"]["lm_head.weight"]["tensor_meta"]["device"] = {"type": "cuda", "index": 0}
    members[config_name] = json.dumps(config).encode()
    p = tmp_path / "m.pt2"
    write_members(p, members)
    devices = {t.name: t.device for t in statecli.open_checkpoint(p).tensors}
    assert (devices["embed.weight"], devices["lm_head.weight"]) == ("cpu", "cuda:0")
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match=r"'embed\.weight' and 'lm_head\.weight' share a storage but are saved on cpu"):
        statecli.convert(p, tmp_path / "out" / "m.pt")
    assert list((tmp_path / "out").iterdir()) == []
    statecli.convert(p, tmp_path / "out" / "m.pt", device="cpu")
    assert {t.device for t in statecli.open_checkpoint(tmp_path / "out" / "m.pt").tensors} == {"cpu"}
