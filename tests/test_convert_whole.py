"""Whole-checkpoint conversion (.pt to .pt) on the files torch.save writes that are not the usual ones: memo
entries shared between a storage record and a value, protocol 4 (FRAME, MEMOIZE), views over larger
storages, quantized modules, optimizer state beside a kept parameter, dtypes with no storage class. The
deep oracle over the usual training checkpoints is tests/test_convert_graph.py."""

from __future__ import annotations

import io
import struct
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from clirun import run_cli

import statecli
from statecli.errors import UnsupportedFormatError

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def _load(path: Path) -> object:
    return torch.load(path, weights_only=True)


def test_a_string_a_storage_record_memoized_is_read_back_as_itself(tmp_path: Path) -> None:
    """torch.save memoizes the location 'cpu' and the 'storage' tag inside the first storage record; a config
    value that is the same string object is then written as a memo read of it. Before: refused."""
    src = tmp_path / "cfg.pt"
    obj = {"w": torch.ones(2), "device": "cpu", "kind": "storage", "x": torch.ones(3), "cls": "FloatStorage"}
    torch.save(obj, src)
    assert b"h\x06" in zipfile.ZipFile(src).read("cfg/data.pkl")  # the read of the memoized 'cpu'
    code, _, err = run_cli("convert", src, "-o", tmp_path / "o.pt", "--dtype", "bf16")
    assert code == 0, err
    got = _load(tmp_path / "o.pt")
    assert got == {**obj, "w": got["w"], "x": got["x"]}
    assert got["w"].dtype == torch.bfloat16 and torch.equal(got["x"], torch.ones(3, dtype=torch.bfloat16))


def test_protocol_4_with_frames_and_memoize(tmp_path: Path) -> None:
    src = tmp_path / "p4.pt"
    obj = {"model": {"w": torch.randn(4, 4), "n": torch.tensor(3)}, "optimizer": {"lr": 0.1}, "tag": "cpu" * 30}
    torch.save(obj, src, pickle_protocol=4)
    pkl = zipfile.ZipFile(src).read("p4/data.pkl")
    assert pkl[:2] == b"\x80\x04" and b"\x94" in pkl and b"\x95" in pkl  # MEMOIZE and FRAME
    out = tmp_path / "o.pt"
    statecli.convert(src, out, dtype="fp16")
    got = torch.load(out, weights_only=False)
    assert got["model"]["w"].dtype == torch.float16 and torch.equal(got["model"]["w"], obj["model"]["w"].half())
    assert got["model"]["n"].dtype == torch.int64 and got["optimizer"] == {"lr": 0.1} and got["tag"] == obj["tag"]


def test_a_storage_record_read_elsewhere_as_a_value_is_refused(tmp_path: Path) -> None:
    """A hand-made pickle that memoizes a storage record's tuple and reads it back as a plain value: the
    new pickle could not say what that value was, so nothing is written (exit 3)."""
    torch.save({"w": torch.ones(2)}, tmp_path / "base.pt")
    z = zipfile.ZipFile(tmp_path / "base.pt")
    storage = z.read("base/data/0")
    pid = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tq\x07"
    tensor = (
        b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"QK\x00K\x02\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR"
    )
    pkl = b"\x80\x02}(X\x01\x00\x00\x00w" + tensor + b"X\x01\x00\x00\x00ph\x07u."
    src = tmp_path / "odd.pt"
    with zipfile.ZipFile(src, "w") as out:
        out.writestr("odd/data.pkl", pkl)
        out.writestr("odd/data/0", storage)
        out.writestr("odd/version", b"3\n")
    assert torch.load(src, weights_only=False)["p"][0] == "storage"  # torch reads it: a real, odd file
    with pytest.raises(UnsupportedFormatError, match="memo entry 7 is made inside a storage record"):
        statecli.convert(src, tmp_path / "o.pt", dtype="bf16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.pt", "odd.pt"]
    code, _, err = run_cli("convert", src, "-o", tmp_path / "o.pt", "--dtype", "bf16")
    assert code == 3 and "--state-dict" in err
    statecli.convert(src, tmp_path / "o.pt", dtype="bf16", state_dict=True)  # the way out it names
    assert _load(tmp_path / "o.pt")["w"].dtype == torch.bfloat16


def test_views_keep_their_whole_storage_and_only_viewed_values_count(tmp_path: Path) -> None:
    """As torch.save, a view keeps its whole storage; values no tensor views are cast too, but a value beyond
    fp16's range there is not an overflow anyone sees."""
    base = torch.arange(100_000, dtype=torch.float32)  # up to 99,999: beyond fp16's 65,504
    qkv = torch.randn(6, 4)
    sd = {"slice": base[10:20], "t": torch.randn(3, 5).t(), "q": qkv[:2], "k": qkv[2:4]}
    torch.save(sd, tmp_path / "v.pt")
    report = statecli.convert(tmp_path / "v.pt", tmp_path / "o.pt", dtype="fp16")
    assert report.plan.graph and not any(s.overflow for s in report.stats.values())
    got = _load(tmp_path / "o.pt")
    for k, v in sd.items():
        assert got[k].dtype == torch.float16 and torch.equal(got[k], v.half()), k
    assert got["q"].untyped_storage().data_ptr() == got["k"].untyped_storage().data_ptr()
    assert got["slice"].untyped_storage().nbytes() == 200_000  # whole, as torch.save keeps it
    assert got["t"].stride() == sd["t"].stride()


def _plan_reasons(path: Path, tmp_path: Path, **options: object) -> dict[str, tuple[str, str, str]]:
    p = statecli.conversion.plan(path, tmp_path / "o.pt", **options)
    return {i.name: (i.action, i.dst_dtype, i.reason) for i in p.items}


def test_optimizer_state_follows_its_parameter_and_step_never_changes(tmp_path: Path) -> None:
    src = SAMPLES / "training_adam.pt"
    got = _plan_reasons(src, tmp_path, dtype="bf16", exclude=["conv1.*"])
    assert got["conv1.weight"][0] == "keep"
    assert got["optimizer.state.0.exp_avg"] == ("keep", "float32", "follows its parameter conv1.weight (kept)")
    assert got["optimizer.state.2.exp_avg"] == (
        "cast",
        "bfloat16",
        "float32 → bfloat16 (follows its parameter bn1.weight)",
    )
    assert got["optimizer.state.2.step"][:2] == ("keep", "float32")
    kept = _plan_reasons(src, tmp_path, dtype="bf16", keep_optimizer_dtype=True)
    assert kept["optimizer.state.2.exp_avg"] == ("keep", "float32", "optimizer state: --keep-optimizer-dtype")
    assert kept["conv1.weight"][:2] == ("cast", "bfloat16")


def test_keep_optimizer_dtype_on_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "o.pt"
    code, _, err = run_cli(
        "convert", SAMPLES / "training_adam.pt", "-o", out, "--dtype", "bf16", "--keep-optimizer-dtype"
    )
    assert code == 0, err
    assert "left out" not in err and "the whole checkpoint, 46 tensors (14 cast to bfloat16)" in err
    got = _load(out)
    assert got["model"]["conv1.weight"].dtype == torch.bfloat16
    assert {v.dtype for s in got["optimizer"]["state"].values() for v in s.values()} == {torch.float32}
    assert (got["epoch"], got["global_step"]) == (3, 120)


@pytest.mark.parametrize("dtype", ["fp8", "float8_e5m2"])
def test_a_dtype_with_no_storage_class_inside_a_training_checkpoint_is_refused(tmp_path: Path, dtype: str) -> None:
    out = tmp_path / "o.pt"
    code, _, err = run_cli("convert", SAMPLES / "training_adam.pt", "-o", out, "--dtype", dtype)
    assert code == 2 and "inside a whole checkpoint" in err and "--state-dict" in err
    assert not out.exists()
    code, _, err = run_cli("convert", SAMPLES / "training_adam.pt", "-o", out, "--dtype", dtype, "--state-dict")
    assert code == 0, err
    # A plain state dict takes the state-dict writer without being asked: nothing but tensors to lose.
    code, _, err = run_cli("convert", SAMPLES / "cnn_bn_state_dict.pt", "-o", tmp_path / "sd.pt", "--dtype", dtype)
    assert code == 0, err


def test_a_quantized_whole_module_moves_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: refused (exit 3), since its packed weights live in the pickle; the pickle is now copied."""
    monkeypatch.syspath_prepend(str(SAMPLES))  # the trusted sample's classes, for torch.load below
    src = SAMPLES / "quantized_static_module.pt"
    out = tmp_path / "o.pt"
    code, _, err = run_cli("convert", src, "-o", out, "--dtype", "bf16", "--device", "cpu")
    assert code == 0, err
    a = torch.load(src, weights_only=False, map_location="cpu")
    b = torch.load(out, weights_only=False)
    assert type(a) is type(b) and list(a._modules) == list(b._modules)
    before = {t.name: t for t in statecli.open_checkpoint(src).tensors}
    after = {t.name: t for t in statecli.open_checkpoint(out).tensors}
    assert list(before) == list(after)
    planned = {i.name: i.dst_dtype for i in statecli.conversion.plan(src, out, dtype="bf16").items}
    assert set(planned.values()) == {t.dtype for t in before.values()}  # a quantized model: nothing cast
    for name, t in before.items():
        want = planned[name]
        assert (after[name].dtype, after[name].layout, after[name].shape) == (want, t.layout, t.shape), name
    assert any(t.layout == "quantized" for t in after.values())
    assert a.quant.scale.dtype == b.quant.scale.dtype == torch.float32  # quantized kernels take float32 only
    assert "sample_nets" in sys.modules


def test_the_lightning_sample_keeps_every_key(tmp_path: Path) -> None:
    out = tmp_path / "o.ckpt"
    code, _, err = run_cli("convert", SAMPLES / "lightning.ckpt", "-o", out, "--dtype", "bf16")
    assert code == 0, err
    a, b = _load(SAMPLES / "lightning.ckpt"), _load(out)
    assert list(a) == list(b)
    assert b["optimizer_states"][0]["state"][0]["exp_avg"].dtype == torch.bfloat16
    assert {k: v for k, v in a.items() if not isinstance(v, (dict, list))} == {
        k: v for k, v in b.items() if not isinstance(v, (dict, list))
    }


def test_the_pickle_grows_only_by_its_storage_records(tmp_path: Path) -> None:
    torch.save({f"w{i}": torch.ones(1) for i in range(200)}, tmp_path / "many.pt")
    statecli.convert(tmp_path / "many.pt", tmp_path / "o.pt", device="cpu")
    before = zipfile.ZipFile(tmp_path / "many.pt").read("many/data.pkl")
    after = zipfile.ZipFile(tmp_path / "o.pt").read("o/data.pkl")
    assert len(after) < len(before) + 200 * 40
    assert struct.unpack("<B", after[1:2])[0] == 2 and io.BytesIO(after).read(2) == b"\x80\x02"
