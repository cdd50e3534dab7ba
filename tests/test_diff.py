"""``statecli diff``: the core's numbers against torch, and the command as a user runs it (exit codes,
JSON on stdout, messages on stderr). Tensors are tiny; conversions go through ``statecli.convert``."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from clirun import run_cli

import statecli
from statecli import diff as diff_core
from statecli.diff import compare_tensors, diff
from statecli.errors import UsageError

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
CNN = str(SAMPLES / "cnn_bn_state_dict.pt")
TIED = str(SAMPLES / "tied_lm.pt")

# bf16 keeps 8 significant bits: rounding to nearest moves a value by at most 2**-8 of itself, so by at
# most 2**-8 / (1 - 2**-8) = 0.00392 relative to the rounded (B) value. Normal values only: these are.
BF16_RTOL = 4e-3


def run_json(*args: str) -> tuple[int, dict, str]:
    code, out, err = run_cli("diff", *args, "--format", "json")
    return code, json.loads(out), err


def save(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    torch.save(tensors, path)
    return str(path)


def by_name(doc: dict) -> dict[str, dict]:
    return {t["name"]: t for t in doc["changed"]}


# ------------------------------------------------------------------------------ whole checkpoints


def test_a_checkpoint_against_itself_is_the_same() -> None:
    code, out, err = run_cli("diff", CNN, CNN)
    assert code == 0, err
    assert out.splitlines() == [f"{CNN} → {CNN}", "same: 16 identical (atol 0, rtol 0)"]
    assert err == ""


def test_against_its_bf16_conversion(tmp_path: Path) -> None:
    bf16 = tmp_path / "bf16.safetensors"
    statecli.convert(CNN, bf16, dtype="bf16")
    code, doc, err = run_json(CNN, str(bf16), "--atol", "1e-2", "--rtol", "1e-2")
    assert code == 0, err
    assert doc["same"] is True
    assert doc["tolerance"] == {"atol": 0.01, "rtol": 0.01}
    assert run_cli("diff", CNN, str(bf16), "--rtol", str(BF16_RTOL)).exit_code == 0  # the tight bound holds too
    code, doc, _ = run_json(CNN, str(bf16), "--atol", "1e-6", "--rtol", "1e-6")
    assert code == 1 and doc["same"] is False

    # torch as oracle, tensor by tensor
    a = torch.load(CNN, weights_only=True)
    from safetensors.torch import load_file

    b = load_file(bf16)
    rows = by_name(doc)
    for name, ta in a.items():
        tb = b[name]
        da, db = ta.double(), tb.double()
        if torch.equal(da, db):
            assert name not in rows or rows[name]["equal"] is True
            continue
        row = rows[name]
        assert (row["dtype_a"], row["dtype_b"]) == ("float32", "bfloat16")
        assert row["status"] == "differs" and row["within_tolerance"] is False
        assert row["max_abs"] == pytest.approx(float((da - db).abs().max()), rel=0, abs=0)
        assert row["max_rel"] == pytest.approx(float(((da - db).abs() / db.abs()).max()), rel=1e-12)
        cos = torch.nn.functional.cosine_similarity(da.reshape(1, -1), db.reshape(1, -1)).item()
        assert row["cosine"] == pytest.approx(cos, rel=1e-9)
        assert row["mismatched"] == int((~torch.isclose(da, db, rtol=1e-6, atol=1e-6)).sum())
    # integer buffers never change dtype: num_batches_tracked is identical
    assert "bn1.num_batches_tracked" in doc["identical"]


def test_dtype_change_alone_does_not_fail(tmp_path: Path) -> None:
    a = save(tmp_path / "a.pt", {"x": torch.arange(6, dtype=torch.int64), "w": torch.tensor([0.5, 2.0])})
    b = save(tmp_path / "b.pt", {"x": torch.arange(6, dtype=torch.int32), "w": torch.tensor([0.5, 2.0]).half()})
    code, doc, err = run_json(a, b)
    assert code == 0, err
    rows = by_name(doc)
    assert rows["x"]["status"] == rows["w"]["status"] == "changed"
    assert rows["x"]["differences"] == ["dtype"] and rows["x"]["equal"] is True
    code, out, _ = run_cli("diff", a, b)
    assert any(line.split()[:5] == ["x", "changed", "int64", "→", "int32"] for line in out.splitlines())
    assert out.splitlines()[-1] == "same: 2 equal in value, metadata changed (atol 0, rtol 0)"


def test_tied_pt_and_its_safetensors_conversion_compare_clean(tmp_path: Path) -> None:
    st = tmp_path / "tied.safetensors"
    statecli.convert(TIED, st)
    for a, b in ((TIED, str(st)), (str(st), TIED)):
        code, doc, err = run_json(a, b)
        assert code == 0, err
        assert doc["changed"] == [] and doc["only_in_a"] == [] and doc["only_in_b"] == []
        assert {"embed.weight", "lm_head.weight"} <= set(doc["identical"])
        assert doc["summary"]["identical"] == 18


def test_against_a_sharded_folder(tmp_path: Path) -> None:
    statecli.convert(TIED, str(tmp_path / "shards") + "/", max_shard_size="2KB")
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) > 1
    code, out, err = run_cli("diff", TIED, str(tmp_path / "shards"))
    assert code == 0, err
    assert out.splitlines()[-1] == "same: 18 identical (atol 0, rtol 0)"


def test_untied_copy_is_a_sharing_note_not_a_failure(tmp_path: Path) -> None:
    sd = torch.load(TIED, weights_only=True)
    assert sd["lm_head.weight"].data_ptr() == sd["embed.weight"].data_ptr()
    sd["lm_head.weight"] = sd["lm_head.weight"].clone()
    untied = save(tmp_path / "untied.pt", sd)
    code, doc, err = run_json(TIED, untied)
    assert code == 0, err
    rows = by_name(doc)
    assert rows["lm_head.weight"]["status"] == "changed"
    assert rows["lm_head.weight"]["differences"] == ["sharing"]
    assert rows["lm_head.weight"]["notes"] == ["shares memory with embed.weight in A only"]
    assert rows["embed.weight"]["notes"] == ["shares memory with lm_head.weight in A only"]


def test_a_tied_weight_stored_once_fails_with_a_hint(tmp_path: Path) -> None:
    sd = torch.load(TIED, weights_only=True)
    del sd["lm_head.weight"]
    once = save(tmp_path / "once.pt", sd)
    code, doc, err = run_json(TIED, once)
    assert code == 1
    assert doc["only_in_a"] == ["lm_head.weight"]
    assert "lm_head.weight is only in A, where it shares memory with embed.weight" in err


# ------------------------------------------------------------------------------- names and shapes


def test_keys_on_one_side_fail(tmp_path: Path) -> None:
    a = save(tmp_path / "a.pt", {"w": torch.ones(2), "old": torch.zeros(1)})
    b = save(tmp_path / "b.pt", {"w": torch.ones(2), "new": torch.zeros(3, dtype=torch.int8)})
    code, doc, _ = run_json(a, b)
    assert code == 1
    assert (doc["only_in_a"], doc["only_in_b"]) == (["old"], ["new"])
    assert doc["summary"]["only_in_a"] == doc["summary"]["only_in_b"] == 1
    assert doc["identical"] == ["w"]
    code, out, _ = run_cli("diff", a, b)
    assert code == 1
    lines = out.splitlines()
    assert lines[2].startswith("─")
    assert lines[3].split() == ["old", "only", "in", "A", "float32", "1"]
    assert lines[4].split() == ["new", "only", "in", "B", "int8", "3"]
    assert lines[-1] == "different: 1 only in A, 1 only in B, 1 identical (atol 0, rtol 0)"


def test_shape_change_fails(tmp_path: Path) -> None:
    a = save(tmp_path / "a.pt", {"w": torch.ones(4, 2)})
    b = save(tmp_path / "b.pt", {"w": torch.ones(2, 4)})
    code, doc, _ = run_json(a, b, "--atol", "100")
    assert code == 1
    (row,) = doc["changed"]
    assert row["status"] == "differs" and row["differences"] == ["shape"]
    assert (row["shape_a"], row["shape_b"]) == ([4, 2], [2, 4])
    assert row["within_tolerance"] is False
    assert row["max_abs"] is None and row["equal"] is None
    assert "4×2 → 2×4" in run_cli("diff", a, b).stdout


def test_normalize_prefixes(tmp_path: Path) -> None:
    sd = torch.load(CNN, weights_only=True)
    ddp = save(tmp_path / "ddp.pt", {f"module.{k}": v for k, v in sd.items()})
    code, doc, err = run_json(ddp, CNN)
    assert code == 1 and doc["summary"]["common"] == 0
    assert "--normalize-prefixes would match 16 model tensors by name (stripping A 'module.'); now 0 match" in err
    code, doc, err = run_json(ddp, CNN, "--normalize-prefixes")
    assert code == 0, err
    assert doc["prefixes"] == {"a": "module.", "b": ""}
    assert len(doc["identical"]) == 16
    assert all(t.startswith("conv") or t[:2] in ("bn", "fc") for t in doc["identical"])
    # nested wrappers (DDP around torch.compile), on the B side
    nested = save(tmp_path / "nested.pt", {f"module._orig_mod.{k}": v for k, v in sd.items()})
    code, doc, err = run_json(CNN, nested, "--normalize-prefixes")
    assert code == 0, err
    assert doc["prefixes"] == {"a": "", "b": "module._orig_mod."}


def test_normalize_prefixes_strips_only_what_makes_names_match(tmp_path: Path) -> None:
    # Both sides have model. everywhere (a model whose top module is called model): nothing is stripped.
    sd = {"model.w": torch.ones(2), "model.b": torch.zeros(2)}
    a, b = save(tmp_path / "a.pt", sd), save(tmp_path / "b.pt", sd)
    code, doc, _ = run_json(a, b, "--normalize-prefixes")
    assert code == 0 and doc["prefixes"] == {"a": "", "b": ""}
    assert doc["identical"] == ["model.w", "model.b"]


def test_lightning_checkpoint_against_its_plain_state_dict(tmp_path: Path) -> None:
    ckpt = str(SAMPLES / "lightning.ckpt")
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    plain = save(tmp_path / "plain.pt", {k.removeprefix("model."): v for k, v in sd.items()})
    code, doc, err = run_json(ckpt, plain, "--normalize-prefixes")
    assert code == 1  # the optimizer and callback state are only in A
    assert doc["summary"]["identical"] == 16 and doc["summary"]["only_in_a"] == 31
    assert "not model state (callbacks, optimizer_states); compare the model alone with --role" in err
    code, doc, err = run_json(ckpt, plain, "--normalize-prefixes", "--role", "parameter", "--role", "buffer")
    assert code == 0, err
    assert doc["prefixes"] == {"a": "model.", "b": ""}


def test_match_filters_both_sides(tmp_path: Path) -> None:
    a = save(tmp_path / "a.pt", {"enc.w": torch.ones(2), "dec.w": torch.ones(2)})
    b = save(tmp_path / "b.pt", {"enc.w": torch.ones(2), "dec.w": torch.zeros(2), "head": torch.ones(1)})
    assert run_cli("diff", a, b).exit_code == 1
    code, doc, _ = run_json(a, b, "--match", "enc.*")
    assert code == 0 and doc["identical"] == ["enc.w"] and doc["summary"]["tensors_b"] == 1


# ------------------------------------------------------------------------------------------ values


def test_nan_handling(tmp_path: Path) -> None:
    nan, inf = math.nan, math.inf
    a = save(tmp_path / "a.pt", {"same": torch.tensor([1.0, nan, inf]), "moved": torch.tensor([nan, 2.0, 3.0])})
    b = save(tmp_path / "b.pt", {"same": torch.tensor([1.0, nan, inf]), "moved": torch.tensor([1.0, nan, 3.5])})
    code, doc, _ = run_json(a, b, "--atol", "1")
    assert code == 1
    assert "same" in doc["identical"]
    row = by_name(doc)["moved"]
    assert row["mismatched"] == 2 and row["within_tolerance"] is False
    assert row["max_abs"] == 0.5  # NaN positions are counted, not part of the maximum
    assert row["cosine"] is None
    assert "2 NaN where the other side has a number" in row["notes"]
    c = save(tmp_path / "c.pt", {"same": torch.tensor([1.0, nan, inf]), "moved": torch.tensor([nan, 2.0, 3.5])})
    assert run_cli("diff", a, c, "--atol", "1").exit_code == 0  # NaN where NaN, 3 vs 3.5 within atol


def test_infinities_pass_only_against_the_same_infinity(tmp_path: Path) -> None:
    a = save(tmp_path / "a.pt", {"x": torch.tensor([math.inf, 1.0])})
    b = save(tmp_path / "b.pt", {"x": torch.tensor([1e30, 1.0])})
    code, doc, _ = run_json(a, b, "--rtol", "1")
    assert code == 1
    (row,) = doc["changed"]
    assert row["max_abs"] == "inf" and row["max_rel"] == "inf" and row["mismatched"] == 1
    json.dumps(doc, allow_nan=False)  # strict JSON: no Infinity / NaN tokens


def test_complex_by_magnitude() -> None:
    a = torch.tensor([1 + 1j, 2 - 1j], dtype=torch.complex128)
    b = a + torch.tensor([3e-3 + 4e-3j, 0], dtype=torch.complex128)
    s = compare_tensors(a, b)
    assert s.max_abs == pytest.approx(5e-3, rel=1e-12)
    assert s.max_rel == pytest.approx(5e-3 / abs(complex(b[0])), rel=1e-12)
    real = torch.nn.functional.cosine_similarity(
        torch.view_as_real(a).reshape(1, -1), torch.view_as_real(b).reshape(1, -1)
    )
    assert s.cosine == pytest.approx(real.item(), rel=1e-12)
    assert compare_tensors(a, b, atol=5.1e-3).mismatched == 0
    assert compare_tensors(a, b, atol=4.9e-3).mismatched == 1


def test_integers_are_compared_exactly() -> None:
    big = torch.tensor([2**60], dtype=torch.int64)
    s = compare_tensors(big, big + 1)
    assert not s.equal and s.mismatched == 1  # float64 cannot tell them apart; int64 can
    assert compare_tensors(big, big.clone()).equal
    assert compare_tensors(torch.tensor([3], dtype=torch.int32), torch.tensor([3], dtype=torch.int64)).equal


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_chunked_results_match_torch(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(diff_core, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 5, generator=g).t()  # a non-contiguous view
    b = (a + 1e-3 * torch.randn(5, 6, generator=g)).to(torch.float16)
    a[0, 0] = b[0, 0] = math.nan
    s = compare_tensors(a, b, atol=1e-3, rtol=1e-3)
    da, db = a.double(), b.double()
    finite = ~da.isnan()
    assert s.max_abs == float((da - db).abs()[finite].max())
    assert s.max_rel == pytest.approx(float(((da - db).abs() / db.abs())[finite].max()), rel=1e-12)
    assert s.mismatched == int((~torch.isclose(da, db, rtol=1e-3, atol=1e-3, equal_nan=True)).sum())
    assert s.cosine is None  # NaN makes it undefined
    a[0, 0] = b[0, 0] = 0.0
    s = compare_tensors(a, b)
    cos = torch.nn.functional.cosine_similarity(a.double().reshape(1, -1), b.double().reshape(1, -1)).item()
    assert s.cosine == pytest.approx(cos, rel=1e-12)


def test_views_and_offsets_on_both_sides(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32)
    pt = save(tmp_path / "v.pt", {"t": base.reshape(3, 4).t(), "slice": base[4:8], "whole": base})
    st = tmp_path / "v.safetensors"
    statecli.convert(pt, st)
    for a, b in ((pt, str(st)), (str(st), pt)):
        code, doc, err = run_json(a, b)
        assert code == 0, err
        assert set(doc["identical"]) | {t["name"] for t in doc["changed"]} == {"t", "slice", "whole"}
        assert all(t["equal"] for t in doc["changed"])  # sharing notes only


def test_b_storage_shared_by_several_tensors_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from statecli.tensors.source import Source

    base = torch.arange(8, dtype=torch.float32)
    b = save(tmp_path / "b.pt", {"p": base[:4], "q": base[4:], "r": base})
    a = save(tmp_path / "a.pt", {"p": base[:4].clone(), "q": base[4:].clone(), "r": base.clone()})
    reads: list[str] = []
    real = Source.read

    def counting(self: Source, t: statecli.TensorInfo) -> torch.Tensor:
        reads.append(f"{self.report.path}:{t.name}")
        return real(self, t)

    monkeypatch.setattr(Source, "read", counting)
    result = diff(a, b)
    assert result.same
    assert [r for r in reads if r.startswith(b)] == [f"{b}:p"]  # A's three storages, B's one


def test_unreadable_values_are_not_compared_and_said_so() -> None:
    path = str(SAMPLES / "all_dtypes.pt")
    code, doc, err = run_json(path, path)
    assert code == 0
    unchecked = {t["name"] for t in doc["changed"] if t["status"] == "unchecked"}
    # Quantized tensors are compared (exactly); packed quantized and packed fp4 values are not read.
    assert unchecked == {"quint4x2", "float4_e2m1fn_x2"}
    assert doc["summary"]["unchecked"] == len(unchecked)
    assert "statecli: warning: the values of 2 tensors were not compared" in err
    assert "complex32" in doc["identical"] and "transposed" in doc["identical"]
    assert {"qint8", "quint8", "qint32", "qint8_per_channel"} <= set(doc["identical"])


# ------------------------------------------------------------------------------- notes (core API)


def test_role_and_device_changes_are_notes() -> None:
    a = statecli.open_checkpoint(CNN)
    moved = tuple(
        dataclasses.replace(t, device="cuda:0", role="buffer" if t.name == "fc.bias" else t.role) for t in a.tensors
    )
    b = dataclasses.replace(a, tensors=moved)
    result = diff(a, b)
    assert result.same
    rows = {t.name: t for t in result.changed}
    assert len(rows) == 16
    assert rows["fc.bias"].notes == ("role parameter → buffer", "device cpu → cuda:0")
    assert rows["fc.bias"].differences == ("role", "device")
    assert rows["conv1.weight"].status == "changed"


def test_device_unknown_on_one_side_is_no_change(tmp_path: Path) -> None:
    st = tmp_path / "cnn.safetensors"
    statecli.convert(str(SAMPLES / "cuda_tagged.pt"), st)
    code, doc, err = run_json(str(SAMPLES / "cuda_tagged.pt"), str(st))
    assert code == 0, err
    assert doc["changed"] == []


def test_table_lists_identical_tensors_with_all(tmp_path: Path) -> None:
    a = save(tmp_path / "a.pt", {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])})
    b = save(tmp_path / "b.pt", {"w": torch.tensor([1.0, 2.5]), "b": torch.tensor([0.0])})
    code, out, err = run_cli("diff", a, b)
    assert code == 1 and err == ""
    assert [line.rstrip() for line in out.splitlines()] == [
        f"{a} → {b}",
        "Name  Status   DType    Shape  Max abs  Max rel     Cosine  Notes",
        "─" * 84,
        "w     differs  float32  2          0.5      0.2  0.9965458  1 value beyond tolerance",
        "",
        "different: 1 differs beyond tolerance, 1 identical (atol 0, rtol 0)",
    ]
    code, out, _ = run_cli("diff", a, b, "--all", "--atol", "0.5")
    assert code == 0
    lines = out.splitlines()
    assert lines[3].split()[:2] == ["w", "close"]
    assert lines[4].split() == ["b", "identical", "float32", "1", "0", "0", "—"]
    assert lines[-1] == "same: 1 within tolerance, 1 identical (atol 0.5, rtol 0)"


def test_json_schema_fields(tmp_path: Path) -> None:
    code, doc, _ = run_json(CNN, str(SAMPLES / "cuda_tagged.pt"))
    assert code == 1
    assert doc["schema"] == "statecli.diff/1"
    assert set(doc) == {
        "schema", "paths", "formats", "prefixes", "tolerance", "only_in_a", "only_in_b", "changed", "identical",
        "notes", "summary", "same",
    }  # fmt: skip
    assert doc["paths"] == {"a": CNN, "b": str(SAMPLES / "cuda_tagged.pt")}
    assert set(doc["summary"]) == {
        "tensors_a", "tensors_b", "common", "identical", "changed", "differs", "close", "metadata_only",
        "unchecked", "only_in_a", "only_in_b",
    }  # fmt: skip
    row = by_name(doc)["conv1.weight"]
    assert set(row) == {
        "name", "name_a", "name_b", "status", "differences", "shape_a", "shape_b", "dtype_a", "dtype_b", "role_a",
        "role_b", "device_a", "device_b", "max_abs", "max_rel", "cosine", "equal", "within_tolerance", "mismatched",
        "notes",
    }  # fmt: skip
    assert (row["device_a"], row["device_b"]) == ("cpu", "cuda:0")
    assert row["differences"] == ["device", "values"]
    assert by_name(doc)["bn1.weight"]["status"] == "changed"  # equal values, device note only


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("missing", ["a", "b"])
def test_missing_file_exits_3(tmp_path: Path, missing: str) -> None:
    gone = str(tmp_path / "gone.pt")
    args = (gone, CNN) if missing == "a" else (CNN, gone)
    code, out, err = run_cli("diff", *args)
    assert code == 3
    assert out == ""
    assert err == f"statecli: error: {gone}: no such file or directory\n"


def test_corrupt_file_exits_3(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04garbage")
    code, out, err = run_cli("diff", CNN, str(bad))
    assert code == 3 and out == ""
    assert err.startswith("statecli: error: ") and "Traceback" not in err


@pytest.mark.parametrize("args", [["--atol", "-1"], ["--rtol", "nan"], ["--format", "xml"]])
def test_bad_options_exit_2(args: list[str]) -> None:
    code, out, err = run_cli("diff", CNN, CNN, *args)
    assert code == 2 and out == ""
    assert "Traceback" not in err


def test_core_rejects_bad_tolerance() -> None:
    with pytest.raises(UsageError, match="--atol must be a finite number >= 0"):
        diff(CNN, CNN, atol=math.inf)


def test_a_hostile_pickle_is_never_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    hostile = str(SAMPLES / "malicious_os_system.pt")
    code, doc, err = run_json(hostile, hostile)
    assert code == 0
    assert doc["identical"] == ["weight"]
    assert "statecli: warning:" in err and "posix.system" in err
    assert not (tmp_path / "statecli_pwned_marker").exists()


# ---------------------------------------------------------------------------------- nothing compared


def test_a_filter_that_matches_nothing_fails(tmp_path: Path) -> None:
    safetensors = str(SAMPLES / "cnn_bn.safetensors")
    code, out, err = run_cli("diff", safetensors, TIED, "--match", "nothing*")
    assert code == 1
    assert out.splitlines() == [f"{safetensors} → {TIED}", "nothing compared: no tensors (atol 0, rtol 0)"]
    assert err == (
        "statecli: warning: no tensor matches the filters (--match 'nothing*') in A (16 tensors) or B (18 tensors): "
        "nothing was compared\n"
    )
    code, doc, err = run_json(safetensors, TIED, "--match", "nothing*", "--role", "buffer")
    assert code == 1 and doc["same"] is False
    assert doc["notes"] == [
        {
            "level": "warning",
            "code": "nothing-compared",
            "message": "no tensor matches the filters (--role buffer --match 'nothing*') in A (16 tensors) "
            "or B (18 tensors): nothing was compared",
        }
    ]
    assert doc["summary"]["tensors_a"] == doc["summary"]["tensors_b"] == 0
    assert "--role buffer --match 'nothing*'" in err


def test_a_role_that_neither_side_has_fails(tmp_path: Path) -> None:
    code, doc, err = run_json(CNN, CNN, "--role", "other")
    assert code == 1 and doc["same"] is False
    assert [n["code"] for n in doc["notes"]] == ["nothing-compared"]
    assert "(--role other)" in err


def test_a_filter_that_matches_one_side_only_is_a_plain_difference(tmp_path: Path) -> None:
    a = save(tmp_path / "a.pt", {"enc.w": torch.ones(2)})
    b = save(tmp_path / "b.pt", {"dec.w": torch.ones(2)})
    code, doc, err = run_json(a, b, "--match", "enc.*")
    assert code == 1 and doc["only_in_a"] == ["enc.w"] and doc["only_in_b"] == []
    assert doc["notes"] == [] and "nothing" not in err


def test_two_files_without_tensors_compare_nothing_and_fail(tmp_path: Path) -> None:
    a = save(tmp_path / "a.pt", {})
    b = save(tmp_path / "b.pt", {"epoch": 3})
    code, out, err = run_cli("diff", a, b)
    assert code == 1
    assert out.splitlines()[-1] == "nothing compared: no tensors (atol 0, rtol 0)"
    assert err == "statecli: warning: neither A nor B holds a tensor: nothing was compared\n"
    report = diff(a, b)
    assert report.nothing_compared and not report.same
    assert not diff(CNN, a).nothing_compared  # one empty side: 16 only in A, an ordinary difference


# --- csv and markdown ------------------------------------------------------------------------------


def test_csv_has_a_row_per_tensor_with_unrounded_numbers(tmp_path: Path) -> None:
    import csv
    import io

    a = save(tmp_path / "a.pt", {"w": torch.tensor([1.0, 2.0]), "same": torch.ones(3), "gone": torch.zeros(1)})
    b = save(tmp_path / "b.pt", {"w": torch.tensor([1.0, 2.0 + 1 / 3]), "same": torch.ones(3), "new|x": torch.zeros(2)})
    code, out, _ = run_cli("diff", a, b, "--format", "csv")
    assert code == 1  # the exit code follows the comparison whatever the format
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["name"], r["status"]) for r in rows] == [
        ("w", "differs"),
        ("same", "identical"),
        ("gone", "only in A"),
        ("new|x", "only in B"),
    ]
    w = rows[0]
    assert float(w["max_abs"]) == pytest.approx(1 / 3, rel=1e-6) and len(w["max_abs"]) > 8  # not the table's 3 digits
    assert (w["equal"], w["within_tolerance"], w["mismatched"], w["shape_a"]) == ("false", "false", "1", "2")
    assert (rows[2]["dtype_a"], rows[2]["dtype_b"], rows[3]["dtype_a"], rows[3]["shape_b"]) == ("float32", "", "", "2")
    assert rows[1]["max_abs"] == "0" or float(rows[1]["max_abs"]) == 0


def test_markdown_is_a_pull_request_comment(tmp_path: Path) -> None:
    a = save(tmp_path / "a.pt", {"w": torch.tensor([1.0, 2.0]), "same": torch.ones(3)})
    b = save(tmp_path / "b.pt", {"w": torch.tensor([1.0, 2.5]), "same": torch.ones(3), "new|x": torch.zeros(2)})
    code, out, _ = run_cli("diff", a, b, "--format", "markdown")
    assert code == 1
    lines = out.splitlines()
    assert (
        lines[0]
        == f"**`{a}` → `{b}`**: different: 1 differs beyond tolerance, 1 only in B, 1 identical (atol 0, rtol 0)"
    )
    assert lines[2] == "| name | status | dtype | shape | max abs | max rel | cosine | notes |"
    assert lines[4].startswith("| `w` | differs | float32 | 2 | 0.5 | 0.2 |")
    assert lines[5] == "| `new\\|x` | only in B | float32 | 2 |  |  |  |  |"  # a pipe in a name cannot split a cell
    assert len(lines) == 6  # identical tensors only with --all
    code, out, _ = run_cli("diff", CNN, CNN, "--format", "markdown")
    assert code == 0 and out == f"**`{CNN}` → `{CNN}`**: same: 16 identical (atol 0, rtol 0)\n"


def test_a_non_persistent_buffer_on_one_side_is_explained(tmp_path: Path) -> None:
    # A whole module keeps its non-persistent buffers; its conversion (a state_dict) does not.
    out = tmp_path / "m.safetensors"
    statecli.convert(SAMPLES / "frozen_nonpersistent_module.pt", out)
    code, doc, err = run_json(str(SAMPLES / "frozen_nonpersistent_module.pt"), str(out))
    assert code == 1 and doc["only_in_a"] == ["cache"]
    (note,) = [n for n in doc["notes"] if n["code"] == "non-persistent-only-in"]
    assert note["message"].startswith("1 non-persistent buffer only in A (cache): ")
    assert note["message"] in err
