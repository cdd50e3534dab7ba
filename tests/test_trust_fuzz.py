"""The structural fuzzers (tests/fuzz/structures.py) in CI, and the problems they found, one test each.

``test_structural_fuzz`` builds checkpoints of every container statecli reads (DCP folders, ``.pt2`` and
TorchScript archives, nested archives, shard indexes, legacy files, torch.save archives) with targeted
corruptions and runs every command path on each (tests/fuzz/commands.py): a result or a StatecliError of
exit 3 or 5, nothing else, nothing written on failure, each input within a deadline and a memory cap.
For a longer hunt: ``python tests/fuzz/fuzz_read.py --engine structural --seconds 600``.
"""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import statecli
from statecli.diff import diff
from statecli.errors import InputError, UsageError
from statecli.stats import compute

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "hostile"))
sys.path.insert(0, str(HERE / "fuzz"))

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
    belong to no tensor in stats and in the converted file. Now every command that reads values refuses
    it with exit 3; inspect still lists it."""
    p = tmp_path / "m.pt"
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, p)
    members = read_members(p)
    members["m/data/0"] += extra
    write_members(p, members)
    with pytest.raises(RuntimeError, match="does not match expected size"):
        torch.load(p, weights_only=True)
    assert [t.name for t in statecli.open_checkpoint(p).tensors] == ["w"]
    (tmp_path / "out").mkdir()
    claims = "storage data/0 of 'w' holds .* bytes but its record claims 16"
    for read_values in (
        lambda: compute(statecli.open_checkpoint(p)),
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
