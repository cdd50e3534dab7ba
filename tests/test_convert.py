"""statecli.conversion with torch as the oracle: what it writes must load into the real modules, hold the
dtypes the rules say, keep ties, and never leave a partial file."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import statecli
from statecli import conversion as conv
from statecli.errors import CheckFailedError, OutputError, UnsupportedFormatError, UsageError

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
import sample_nets  # noqa: E402


def tload(path: Path | str, **kw: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, weights_only=True, **kw)


def st_load(path: Path | str) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


def st_metadata(path: Path | str) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ----------------------------------------------------------------------------------------------- dtype rules


@pytest.mark.parametrize("out_name", ["cnn.safetensors", "cnn.pt"])
def test_bf16_loads_into_the_real_module_and_keeps_integer_buffers(tmp_path: Path, out_name: str) -> None:
    out = tmp_path / out_name
    conv.convert(SAMPLES / "cnn_bn_state_dict.pt", out, dtype="bf16")
    sd = st_load(out) if out.suffix == ".safetensors" else tload(out)
    ref = tload(SAMPLES / "cnn_bn_state_dict.pt")
    assert list(sd) == list(ref) if out.suffix == ".pt" else set(sd) == set(ref)
    for k, v in ref.items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert same_bits(sd[k], want), k
    assert sd["bn1.num_batches_tracked"].dtype == torch.int64
    model = sample_nets.SmallCNN().to(torch.bfloat16)
    model.load_state_dict(sd, strict=True)


def test_keep_buffers_leaves_batchnorm_statistics_in_fp32(tmp_path: Path) -> None:
    out = tmp_path / "cnn.safetensors"
    conv.convert(SAMPLES / "cnn_bn_state_dict.pt", out, dtype="fp16", keep_buffers=True)
    sd = st_load(out)
    assert sd["bn1.running_mean"].dtype == torch.float32
    assert sd["bn1.running_var"].dtype == torch.float32
    assert sd["bn1.weight"].dtype == torch.float16
    assert sd["bn1.num_batches_tracked"].dtype == torch.int64


def test_only_and_exclude_limit_what_changes(tmp_path: Path) -> None:
    out = tmp_path / "a.safetensors"
    conv.convert(SAMPLES / "cnn_bn_state_dict.pt", out, dtype="fp16", only=["conv*"], exclude=["*.bias"])
    sd = st_load(out)
    assert sd["conv1.weight"].dtype == torch.float16
    assert sd["conv1.bias"].dtype == torch.float32  # excluded
    assert sd["fc.weight"].dtype == torch.float32  # not in --only


@pytest.mark.parametrize(("add", "glob"), [("", "fc.*"), ("", "model.fc.*"), ("x.", "x.fc.*"), ("x.", "model.fc.*")])
def test_exclude_matches_the_output_name_as_well_as_the_stored_one(tmp_path: Path, add: str, glob: str) -> None:
    # Lightning stores model.fc.weight; renamed, it is written as fc.weight or x.fc.weight. A user may write
    # either name: a glob that silently matched nothing would cast the tensor they meant to keep.
    out = tmp_path / "a.safetensors"
    conv.convert(SAMPLES / "lightning.ckpt", out, dtype="fp16", strip_prefix=["model."], add_prefix=add, exclude=[glob])
    sd = st_load(out)
    assert sd[f"{add}fc.weight"].dtype == torch.float32 and sd[f"{add}fc.bias"].dtype == torch.float32
    assert sd[f"{add}conv1.weight"].dtype == torch.float16


@pytest.mark.parametrize(
    ("spelling", "dtype"),
    [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("half", torch.float16), ("torch.float16", torch.float16),
     ("fp64", torch.float64), ("float8_e4m3fn", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)],
)  # fmt: skip
def test_dtype_spellings(tmp_path: Path, spelling: str, dtype: torch.dtype) -> None:
    out = tmp_path / "a.pt"
    conv.convert(SAMPLES / "cnn_bn_state_dict.pt", out, dtype=spelling)
    sd = tload(out)
    assert sd["fc.weight"].dtype == dtype
    assert same_bits(sd["fc.weight"], tload(SAMPLES / "cnn_bn_state_dict.pt")["fc.weight"].to(dtype))


@pytest.mark.parametrize("bad", ["int8", "int64", "bool", "qint8", "complex64", "float4_e2m1fn_x2"])
def test_cast_to_a_non_floating_dtype_is_a_usage_error(tmp_path: Path, bad: str) -> None:
    with pytest.raises(UsageError, match="only floating tensors change dtype"):
        conv.convert(SAMPLES / "cnn_bn_state_dict.pt", tmp_path / "a.pt", dtype=bad)
    assert listing(tmp_path) == []


def test_unknown_dtype_and_device(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown dtype 'bf17'"):
        conv.convert(SAMPLES / "cnn_bn_state_dict.pt", tmp_path / "a.pt", dtype="bf17")
    with pytest.raises(UsageError, match="unknown device 'gpu'"):
        conv.convert(SAMPLES / "cnn_bn_state_dict.pt", tmp_path / "a.pt", device="gpu")
    assert listing(tmp_path) == []


def _save(tmp_path: Path, name: str, sd: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / name
    torch.save(sd, path)
    return path


@pytest.mark.parametrize(
    ("target", "src", "want"),
    [("fp16", torch.complex64, torch.complex32), ("fp32", torch.complex128, torch.complex64),
     ("fp64", torch.complex64, torch.complex128)],
)  # fmt: skip
def test_complex_goes_to_the_complex_dtype_of_the_same_width(
    tmp_path: Path, target: str, src: torch.dtype, want: torch.dtype
) -> None:
    z = torch.tensor([1 + 2j, -3.5 + 0.25j], dtype=src)
    path = _save(tmp_path, "c.pt", {"z": z, "w": torch.ones(2)})
    conv.convert(path, tmp_path / "o.pt", dtype=target)
    got = tload(tmp_path / "o.pt")["z"]
    assert got.dtype == want
    assert torch.equal(got.to(torch.complex128), z.to(want).to(torch.complex128))
    assert got.imag.abs().sum() > 0  # the imaginary part is kept


def test_complex_to_bf16_stops_instead_of_dropping_the_imaginary_part(tmp_path: Path) -> None:
    path = _save(tmp_path, "c.pt", {"z": torch.tensor([1 + 2j]), "w": torch.ones(2)})
    with pytest.raises(UsageError, match=r"no complex counterpart.*--exclude 'z'"):
        conv.convert(path, tmp_path / "o.pt", dtype="bf16")
    assert listing(tmp_path) == ["c.pt"]
    conv.convert(path, tmp_path / "o.pt", dtype="bf16", exclude=["z"])
    sd = tload(tmp_path / "o.pt")
    assert sd["z"].dtype == torch.complex64 and sd["w"].dtype == torch.bfloat16


def test_complex32_cannot_go_to_safetensors(tmp_path: Path) -> None:
    path = _save(tmp_path, "c.pt", {"z": torch.tensor([1 + 2j])})
    with pytest.raises(UsageError, match="safetensors cannot store complex32"):
        conv.convert(path, tmp_path / "o.safetensors", dtype="fp16")
    assert listing(tmp_path) == ["c.pt"]


# ----------------------------------------------------------------------------------------------- ranges


def test_overflow_is_an_error_naming_tensor_and_count_and_writes_nothing(tmp_path: Path) -> None:
    big = torch.tensor([1.0, 7e4, -1e6, 3.0e38, 2.0])
    path = _save(tmp_path, "r.pt", {"ok": torch.ones(3), "big": big})
    with pytest.raises(CheckFailedError, match=r"big \(3 values\).*--allow-overflow") as e:
        conv.convert(path, tmp_path / "o.safetensors", dtype="fp16")
    assert e.value.exit_code == 1
    assert listing(tmp_path) == ["r.pt"]


def test_allow_overflow_writes_and_reports(tmp_path: Path) -> None:
    path = _save(tmp_path, "r.pt", {"big": torch.tensor([1.0, 7e4])})
    report = conv.convert(path, tmp_path / "o.safetensors", dtype="fp16", allow_overflow=True)
    assert report.stats["big"].overflow == 1
    assert any(f.code == "overflow" and f.message == "big: 1 value became ±inf in float16" for f in report.findings)
    assert torch.isinf(st_load(tmp_path / "o.safetensors")["big"][1])


def test_underflow_is_a_warning_and_existing_nan_is_reported_not_created(tmp_path: Path) -> None:
    t = torch.tensor([1e-10, 0.0, float("nan"), float("inf"), 1.0])
    path = _save(tmp_path, "r.pt", {"t": t})
    report = conv.convert(path, tmp_path / "o.pt", dtype="fp16")
    s = report.stats["t"]
    assert (s.overflow, s.underflow, s.nonfinite) == (0, 1, 2)
    codes = {f.code for f in report.findings}
    assert {"underflow", "nonfinite-input"} <= codes


def test_fp8_overflow_is_counted_even_without_an_inf(tmp_path: Path) -> None:
    path = _save(tmp_path, "r.pt", {"t": torch.tensor([1.0, 1000.0, -5000.0])})
    with pytest.raises(CheckFailedError, match=r"t \(2 values\)"):
        conv.convert(path, tmp_path / "o.pt", dtype="float8_e4m3fn")  # max 448, and no inf in e4m3fn


def test_counts_span_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from statecli.conversion import casting

    monkeypatch.setattr(casting, "_CHUNK_ELEMENTS", 7)
    t = torch.zeros(50)
    t[3] = 1e5
    t[20] = 1e-9
    t[49] = 1e6
    t[30] = float("nan")
    _, stats = casting.cast(t, torch.float16)
    assert (stats.overflow, stats.underflow, stats.nonfinite) == (2, 1, 1)


FP8 = [torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz]
NONFINITE = torch.tensor([1e6, 448.0, 1.0, -1e6, float("nan"), float("inf"), -float("inf")])


def _oracle(x: torch.Tensor, dt: torch.dtype) -> tuple[int, int, int, str]:
    """(overflow, NaN/inf in the input, infs not kept, what an inf becomes), all from torch's own cast."""
    out = x.to(dt).to(torch.float64)
    x64 = x.to(torch.float64)
    finite = torch.isfinite(x64)
    overflow = int((finite & (x64.abs() > torch.finfo(dt).max)).sum())
    inf_changed = int((torch.isinf(x64) & (out != x64)).sum())
    inf = float(torch.tensor(float("inf")).to(dt).to(torch.float64))
    becomes = "±inf" if inf == float("inf") else "NaN" if inf != inf else f"±{inf:g}"
    return overflow, int((~finite).sum()), inf_changed, becomes


@pytest.mark.parametrize("dt", [*FP8, torch.float16, torch.bfloat16], ids=str)
def test_an_inf_the_target_cannot_hold_is_counted_as_changed_not_kept(tmp_path: Path, dt: torch.dtype) -> None:
    # float8_e4m3fn has no inf: torch makes an inf ±448 (the fnuz formats: NaN). The old note said "kept".
    path = _save(tmp_path, "r.pt", {"big": NONFINITE})
    overflow, nonfinite, inf_changed, becomes = _oracle(NONFINITE, dt)
    assert (inf_changed == 0) == (dt in (torch.float8_e5m2, torch.float16, torch.bfloat16))  # torch's facts
    report = conv.convert(path, tmp_path / "o.pt", dtype=str(dt).removeprefix("torch."), allow_overflow=True)
    s = report.stats["big"]
    assert (s.overflow, s.nonfinite, s.inf_changed) == (overflow, nonfinite, inf_changed)
    got = tload(tmp_path / "o.pt")["big"]
    assert same_bits(got, NONFINITE.to(dt))
    assert torch.isnan(got.to(torch.float32)[4])  # every target keeps NaN
    messages = {f.code: f.message for f in report.findings}
    target = str(dt).removeprefix("torch.")
    if inf_changed:
        assert messages["inf-changed"] == (
            f"big: 2 ±inf values in the input became {becomes} in {target}, which has no inf"
        )
        assert messages["nonfinite-input"] == "big: 1 NaN value in the input, kept"
    else:
        assert "inf-changed" not in messages
        assert messages["nonfinite-input"] == "big: 3 NaN/inf values in the input, kept"
    if overflow:
        assert messages["overflow"] == f"big: {overflow} values became {becomes} in {target}"


@pytest.mark.parametrize("dt", [torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz], ids=str)
def test_an_inf_the_target_cannot_hold_is_an_error_like_overflow(tmp_path: Path, dt: torch.dtype) -> None:
    path = _save(tmp_path, "r.pt", {"ok": torch.ones(2), "t": torch.tensor([1.0, float("inf"), -2.0])})
    target = str(dt).removeprefix("torch.")
    *_, becomes = _oracle(torch.ones(1), dt)
    with pytest.raises(CheckFailedError) as e:
        conv.convert(path, tmp_path / "o.safetensors", dtype=target)
    assert e.value.exit_code == 1
    assert e.value.message.startswith(
        f"1 tensor would overflow to {becomes} in {target}, which has no inf: t (1 ±inf value). Nothing was written."
    )
    assert listing(tmp_path) == ["r.pt"]
    with pytest.raises(CheckFailedError, match=r"t \(1 ±inf value\)"):
        conv.load(path, dtype=target)


def test_overflow_and_infs_are_named_together(tmp_path: Path) -> None:
    path = _save(tmp_path, "r.pt", {"big": NONFINITE})
    want = r"overflow to ±448 in float8_e4m3fn, which has no inf: big \(4 values, 2 of them ±inf\)"
    with pytest.raises(CheckFailedError, match=want):
        conv.convert(path, tmp_path / "o.pt", dtype="fp8")
    assert listing(tmp_path) == ["r.pt"]


@pytest.mark.parametrize("dt", FP8, ids=str)
def test_nan_alone_is_kept_by_every_fp8_target(tmp_path: Path, dt: torch.dtype) -> None:
    x = torch.tensor([1.0, float("nan"), -2.0])
    assert torch.isnan(x.to(dt).to(torch.float32)[1])  # the fact the report relies on
    path = _save(tmp_path, "r.pt", {"t": x})
    report = conv.convert(path, tmp_path / "o.pt", dtype=str(dt).removeprefix("torch."))
    s = report.stats["t"]
    assert (s.overflow, s.nonfinite, s.inf_changed) == (0, 1, 0)
    what = "NaN/inf" if _oracle(x, dt)[3] == "±inf" else "NaN"  # without an inf, only NaN can be kept
    assert [f.message for f in report.findings] == [f"t: 1 {what} value in the input, kept"]
    assert same_bits(tload(tmp_path / "o.pt")["t"], x.to(dt))


def test_inf_counts_span_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    from statecli.conversion import casting

    monkeypatch.setattr(casting, "_CHUNK_ELEMENTS", 7)
    t = torch.ones(50)
    t[[2, 9, 48]] = float("inf")
    t[30] = -float("inf")
    t[17] = float("nan")
    t[40] = 1000.0
    _, stats = casting.cast(t, torch.float8_e4m3fn)
    assert (stats.overflow, stats.nonfinite, stats.inf_changed) == (1, 5, 4)


def test_a_clean_chunk_costs_one_min_max_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    # The range check stays cheap: values inside the target's range never reach isfinite / isinf.
    from statecli.conversion import casting

    calls = []
    for name in ("isfinite", "isinf"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    casting.cast(torch.linspace(-400, 400, 1000), torch.float8_e4m3fn)  # warms _limits' probe of the target
    calls.clear()
    _, stats = casting.cast(torch.linspace(-400, 400, 1000), torch.float8_e4m3fn)
    assert (stats.overflow, stats.nonfinite, stats.inf_changed) == (0, 0, 0)
    assert calls == []


# ----------------------------------------------------------------------------------------------- devices


def test_cuda_checkpoint_becomes_cpu_without_a_gpu(tmp_path: Path) -> None:
    out = tmp_path / "cpu.pt"
    conv.convert(SAMPLES / "cuda_tagged.pt", out, device="cpu")
    sd = tload(out)  # no map_location: the storages say cpu now
    assert all(v.device.type == "cpu" for v in sd.values())
    assert {t.device for t in statecli.open_checkpoint(out).tensors} == {"cpu"}


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "meta"])
def test_device_tags_are_rewritten_without_loading_to_the_device(tmp_path: Path, device: str) -> None:
    out = tmp_path / "d.pt"
    conv.convert(SAMPLES / "cnn_bn_state_dict.pt", out, device=device)
    assert {t.device for t in statecli.open_checkpoint(out).tensors} == {device}
    sd = tload(out, map_location="cpu")
    ref = tload(SAMPLES / "cnn_bn_state_dict.pt")
    if device != "meta":
        assert all(same_bits(sd[k], ref[k]) for k in ref)


def test_safetensors_says_it_stores_no_device(tmp_path: Path) -> None:
    report = conv.convert(SAMPLES / "cnn_bn_state_dict.pt", tmp_path / "a.safetensors", device="cuda")
    assert any(n.code == "device-not-stored" and n.level == "warning" for n in report.plan.notes)
    report = conv.convert(SAMPLES / "cuda_tagged.pt", tmp_path / "b.safetensors")
    assert any(n.code == "device-not-stored" and "cuda:0" in n.message for n in report.plan.notes)


# ----------------------------------------------------------------------------------------------- ties and views


def test_tied_weights_stay_tied_in_pt(tmp_path: Path) -> None:
    out = tmp_path / "t.pt"
    conv.convert(SAMPLES / "tied_lm.pt", out, dtype="fp16")
    sd = tload(out)
    assert sd["embed.weight"].data_ptr() == sd["lm_head.weight"].data_ptr()
    model = sample_nets.TinyLM().half()
    model.load_state_dict(sd)


def test_tied_weights_in_safetensors_are_stored_once_and_restored_by_inspect(tmp_path: Path) -> None:
    out = tmp_path / "t.safetensors"
    conv.convert(SAMPLES / "tied_lm.pt", out, dtype="bf16")
    stored = st_load(out)
    assert "lm_head.weight" not in stored and "embed.weight" in stored
    meta = json.loads(st_metadata(out)["statecli"])
    assert meta["aliases"] == {"lm_head.weight": "embed.weight"}
    assert st_metadata(out)["format"] == "pt"
    by_name = {t.name: t for t in statecli.open_checkpoint(out).tensors}
    assert by_name["lm_head.weight"].shares_with == ("embed.weight",)
    # and back to .pt: one storage again
    conv.convert(out, tmp_path / "back.pt")
    sd = tload(tmp_path / "back.pt")
    assert sd["embed.weight"].data_ptr() == sd["lm_head.weight"].data_ptr()
    assert sd["embed.weight"].dtype == torch.bfloat16


def test_views_are_saved_compactly_and_views_of_one_storage_stay_views(tmp_path: Path) -> None:
    base = torch.arange(100_000, dtype=torch.float32)
    qkv = torch.randn(6, 4)
    sd = {"slice": base[10:20], "t": torch.randn(3, 5).t(), "q": qkv[:2], "k": qkv[2:4], "small": torch.ones(2)}
    path = _save(tmp_path, "v.pt", sd)
    out = tmp_path / "o.pt"
    conv.convert(path, out, dtype="fp16", state_dict=True)
    assert out.stat().st_size < 10_000  # the 400 KB base of "slice" is not carried along
    got = tload(out)
    for k, v in sd.items():
        assert same_bits(got[k], v.to(torch.float16)), k
    assert got["q"].untyped_storage().data_ptr() == got["k"].untyped_storage().data_ptr()
    st = tmp_path / "o.safetensors"
    conv.convert(path, st)
    got = st_load(st)
    assert all(same_bits(got[k], v) for k, v in sd.items())


# ----------------------------------------------------------------------------------------------- containers


def test_whole_module_becomes_a_state_dict_with_exact_roles(tmp_path: Path) -> None:
    out = tmp_path / "f.safetensors"
    report = conv.convert(SAMPLES / "frozen_nonpersistent_module.pt", out)
    assert any("non-persistent buffer" in d.reason for d in report.plan.dropped)
    back = {t.name: t for t in statecli.open_checkpoint(out).tensors}
    assert "cache" not in back  # non-persistent: not in state_dict()
    assert back["scale"].role == "buffer" and back["scale"].exact and back["scale"].evidence == "metadata"
    assert back["backbone.0.weight"].requires_grad is False and back["head.weight"].requires_grad is True
    model = sample_nets.FrozenNet()
    model.load_state_dict(st_load(out))

    pt = tmp_path / "f.pt"
    conv.convert(SAMPLES / "frozen_nonpersistent_module.pt", pt, state_dict=True)
    back = {t.name: t for t in statecli.open_checkpoint(pt).tensors}
    assert back["scale"].role == "buffer" and back["scale"].exact
    assert back["head.weight"].role == "parameter" and back["head.weight"].exact
    sd = tload(pt)
    assert sd["backbone.0.weight"].requires_grad is False and sd["head.weight"].requires_grad is True
    model.load_state_dict(sd)


def _pickled_module_with_an_attribute(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = sample_nets.FrozenNet()
    model.anchor = torch.linspace(-1.0, 1.0, 5)  # neither parameter nor buffer: not in state_dict()
    path = tmp_path / "module.pt"
    torch.save(model, path)
    return path, model


def _jit_module(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    path = SAMPLES / "torchscript_frozen.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated, still the oracle
        return path, torch.jit.load(str(path), map_location="cpu")


def _export_module(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    path = SAMPLES / "export_frozen.pt2"
    return path, torch.export.load(str(path)).module()


@pytest.mark.parametrize("source", [_pickled_module_with_an_attribute, _jit_module, _export_module])
def test_a_module_converts_to_exactly_its_state_dict(tmp_path: Path, source: Any) -> None:
    # torch is the oracle: the module's own state_dict() names what a conversion must write, and the
    # output must load back into that module with strict=True.
    path, module = source(tmp_path)
    oracle = module.state_dict()
    out = tmp_path / "out.safetensors"
    report = conv.convert(path, out)
    sd = st_load(out)
    assert sorted(sd) == sorted(oracle)
    assert all(same_bits(sd[k], oracle[k]) for k in oracle)
    module.load_state_dict(sd, strict=True)
    left_out = {d.name for d in report.plan.dropped}
    assert "anchor" in left_out or "offset" in left_out  # the plain attribute / the exported constant
    assert sorted(statecli.load(path)) == sorted(oracle)  # the same rules without a file


def test_a_torchscript_attribute_is_left_out_with_a_note_naming_it() -> None:
    plan = conv.plan(SAMPLES / "torchscript_frozen.pt", "o.safetensors")
    assert [(d.name, d.reason) for d in plan.dropped] == [
        ("anchor", "plain tensor attribute of a module: not in its state_dict()")
    ]
    assert [n.message for n in plan.notes] == [
        "1 tensor left out (anchor): plain tensor attribute of a module: not in its state_dict()"
    ]


def test_notes_name_a_few_left_out_tensors_and_count_many() -> None:
    plan = conv.plan(SAMPLES / "training_adam.pt", "o.safetensors")
    assert [n.message for n in plan.notes] == ["30 tensors left out: optimizer state"]


def test_constants_picked_with_select_are_written(tmp_path: Path) -> None:
    # Exact "other" tensors outside the model group are what --select asks for: they stay.
    src = SAMPLES / "torchscript_freeze_constants.pt"
    out = tmp_path / "c.safetensors"
    conv.convert(src, out, select="constants")
    assert sorted(st_load(out)) == [f"CONSTANTS.c{i}" for i in range(6)]


def test_an_other_tensor_of_a_state_dict_file_is_written(tmp_path: Path) -> None:
    # In a safetensors file every tensor is a key of the state dict, whatever role its metadata gives.
    src = tmp_path / "in.safetensors"
    meta = {"statecli": json.dumps({"schema": "statecli.roles/1", "roles": {"w": "parameter", "x": "other"}})}
    save_file({"w": torch.ones(2), "x": torch.zeros(3)}, src, metadata=meta)
    x = next(t for t in statecli.open_checkpoint(src).tensors if t.name == "x")
    assert (x.role, x.exact) == ("other", True)
    conv.convert(src, tmp_path / "o.safetensors")
    assert sorted(st_load(tmp_path / "o.safetensors")) == ["w", "x"]


def test_lightning_checkpoint_with_strip_prefix_drops_optimizer_state(tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    report = conv.convert(SAMPLES / "lightning.ckpt", out, strip_prefix="model.", dtype="fp16", keep_buffers=True)
    sd = st_load(out)
    assert not any(k.startswith(("model.", "optimizer")) for k in sd)
    assert any(d.reason == "optimizer state" for d in report.plan.dropped)
    sample_nets.SmallCNN().half().load_state_dict({k: v for k, v in sd.items()}, strict=True)


def test_select_a_sub_dict_and_add_prefix(tmp_path: Path) -> None:
    sd = {"model": {"w": torch.ones(2)}, "ema": {"w": torch.full((2,), 3.0), "bn.running_mean": torch.zeros(2)}}
    path = _save(tmp_path, "e.pt", sd)
    conv.convert(path, tmp_path / "ema.safetensors", select="ema", add_prefix="net.")
    got = st_load(tmp_path / "ema.safetensors")
    assert set(got) == {"net.w", "net.bn.running_mean"}
    assert torch.equal(got["net.w"], torch.full((2,), 3.0))
    roles = {t.name: t.role for t in statecli.open_checkpoint(tmp_path / "ema.safetensors").tensors}
    assert roles["net.bn.running_mean"] == "buffer"  # inferred afresh, not "other"


def test_missing_select_key_lists_what_there_is(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"--select 'ema' names no tensors.*optimizer"):
        conv.convert(SAMPLES / "training_adam.pt", tmp_path / "o.pt", select="ema")
    assert listing(tmp_path) == []


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def test_dcp_select_takes_the_top_level_key_that_inspect_shows(tmp_path: Path) -> None:
    # The stored names are optim.state.…; --select optim used to be refused and then suggested.
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    src = SAMPLES / "dcp_training"
    assert {t.name.split(".")[0] for t in statecli.open_checkpoint(src).tensors if t.group != "model"} == {"optim"}
    sd = conv.load(src, select="optim")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "... assuming the intent is to load in a single process"
        want = {k: v for k, v in _flat(_load_state_dict_from_keys(checkpoint_id=str(src))["optim"]).items()}
    want = {k: v for k, v in want.items() if isinstance(v, torch.Tensor)}
    assert sorted(sd) == sorted(want) and "state.conv1.weight.exp_avg" in sd
    for k, v in want.items():
        assert same_bits(sd[k], v), k
    out = tmp_path / "o.safetensors"
    conv.convert(src, out, select="optim", dtype="bf16")
    assert same_bits(st_load(out)["state.fc.bias.exp_avg_sq"], want["state.fc.bias.exp_avg_sq"].bfloat16())


SAMPLE_INPUTS = sorted(
    p.name for p in SAMPLES.iterdir() if not p.name.endswith((".py", ".md")) and "malicious" not in p.name
)


@pytest.mark.parametrize("sample", SAMPLE_INPUTS)
def test_every_select_key_suggested_works(tmp_path: Path, sample: str) -> None:
    with pytest.raises(UsageError, match=r"--select 'nope' names no tensors") as e:
        conv.plan(SAMPLES / sample, tmp_path / "o.pt", select="nope")
    suggested = e.value.message.split("try one of: ")[1].split(", ")
    assert suggested
    for key in suggested:
        try:
            assert conv.plan(SAMPLES / sample, tmp_path / "o.pt", select=key).items, key
        except UnsupportedFormatError as err:  # selected, then refused for another reason
            assert "is quantized" in err.message, key


def test_dcp_suggestions_name_the_key_not_the_internal_group(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as e:
        conv.plan(SAMPLES / "dcp_training", tmp_path / "o.pt", select="nope")
    assert e.value.message.endswith("try one of: bn1, bn2, conv1, conv2, fc, model, optim")


# ----------------------------------------------------------------------------------------------- --only / --exclude


@pytest.mark.parametrize("api", ["convert", "plan", "load"])
@pytest.mark.parametrize("dtype", ["bf16", None])
def test_an_only_glob_that_matches_nothing_is_a_usage_error(tmp_path: Path, api: str, dtype: str | None) -> None:
    # A mistyped --only used to write every tensor in its old dtype and exit 0.
    call = {"convert": conv.convert, "plan": conv.plan, "load": lambda src, _dst, **kw: conv.load(src, **kw)}[api]
    with pytest.raises(UsageError, match=r"^--only 'nomatch\*' matches no tensor in .*tied_lm\.pt") as e:
        call(SAMPLES / "tied_lm.pt", tmp_path / "o.pt", dtype=dtype, only=["embed.*", "nomatch*"])
    assert e.value.exit_code == 2
    assert "'embed.*'" not in e.value.message  # only the glob that matched nothing is named
    assert listing(tmp_path) == []


def test_each_only_glob_that_matches_nothing_is_named(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"^--only 'x\*' and --only 'y\*' match no tensor"):
        conv.plan(SAMPLES / "tied_lm.pt", tmp_path / "o.pt", dtype="bf16", only=["x*", "y*"])


def test_an_only_glob_that_matches_only_left_out_tensors_says_so(tmp_path: Path) -> None:
    want = r"\('optimizer\.\*' matches only tensors left out: optimizer\.state\.0\.step, optimizer state\)"
    with pytest.raises(UsageError, match=want):
        conv.plan(SAMPLES / "training_adam.pt", tmp_path / "o.pt", dtype="bf16", only=["optimizer.*"], state_dict=True)


@pytest.mark.parametrize(
    ("options", "glob"),
    [
        ({"strip_prefix": ["model."], "add_prefix": "x."}, "x.fc.*"),  # the output name
        ({"strip_prefix": ["model."], "add_prefix": "x."}, "model.fc.*"),  # the name in the file
        ({"select": "model"}, "fc.*"),  # the name inside --select
    ],
)
def test_an_only_glob_may_match_any_of_the_names_a_tensor_has(
    tmp_path: Path, options: dict[str, Any], glob: str
) -> None:
    p = conv.plan(SAMPLES / "lightning.ckpt", tmp_path / "o.pt", dtype="fp16", only=[glob], **options)
    assert {i.name.rsplit(".", 2)[-2] for i in p.items if i.action == "cast"} == {"fc"}


def test_an_only_glob_matching_integer_tensors_matches(tmp_path: Path) -> None:
    # It names tensors that exist; that they never change dtype is the rule, not a typo.
    p = conv.plan(SAMPLES / "cnn_bn_state_dict.pt", tmp_path / "o.pt", dtype="fp16", only=["*.num_batches_tracked"])
    assert not any(i.action == "cast" for i in p.items) and not p.notes


def test_an_exclude_glob_that_matches_nothing_is_a_warning(tmp_path: Path) -> None:
    out = tmp_path / "o.pt"
    report = conv.convert(SAMPLES / "cnn_bn_state_dict.pt", out, dtype="fp16", exclude=["*.bias", "head.*"])
    assert [(n.level, n.code, n.message) for n in report.plan.notes] == [
        ("warning", "exclude-matches-nothing", "--exclude 'head.*' matches no tensor: it leaves nothing out")
    ]
    sd = tload(out)
    assert sd["fc.bias"].dtype == torch.float32 and sd["fc.weight"].dtype == torch.float16


def test_globs_without_dtype_are_checked_and_said_to_change_nothing(tmp_path: Path) -> None:
    p = conv.plan(SAMPLES / "cnn_bn_state_dict.pt", tmp_path / "o.pt", only=["conv*"], exclude=["nope"])
    assert [n.message for n in p.notes] == [
        "--exclude 'nope' matches no tensor: it leaves nothing out",
        "--only / --exclude choose what --dtype casts; without --dtype nothing is cast",
    ]
    assert all(i.action == "keep" for i in p.items)


def test_name_collision_after_strip_prefix_is_an_error(tmp_path: Path) -> None:
    path = _save(tmp_path, "c.pt", {"module.w": torch.ones(1), "w": torch.zeros(1)})
    with pytest.raises(UsageError, match=r"'module\.w' and 'w' would both be named 'w'"):
        conv.convert(path, tmp_path / "o.pt", strip_prefix="module.")
    assert listing(tmp_path) == ["c.pt"]


def test_packed_quantized_tensors_are_refused_clearly(tmp_path: Path) -> None:
    # all_dtypes.pt holds a quint4x2 tensor; qint8, quint8 and qint32 convert (tests/test_quantized.py).
    with pytest.raises(UnsupportedFormatError, match=r"'quint4x2' is quantized \(quint4x2\): several values packed"):
        conv.convert(SAMPLES / "all_dtypes.pt", tmp_path / "o.pt", state_dict=True)
    assert listing(tmp_path) == []


# ----------------------------------------------------------------------------------------------- shards


def test_single_to_sharded_and_back(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    report = conv.convert(SAMPLES / "tied_lm.pt", str(out) + "/", max_shard_size="3KB")
    names = listing(out)
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in names
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    stored: dict[str, torch.Tensor] = {}
    for s in shards:
        assert (out / s).stat().st_size <= 3000 + 1024 or len(st_load(out / s)) == 1
        stored.update(st_load(out / s))
    assert set(index["weight_map"]) == set(stored)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in stored.values())
    assert report.files[-1].endswith("model.safetensors.index.json")
    back = statecli.open_checkpoint(out)
    assert not back.findings
    conv.convert(out, tmp_path / "single.pt")
    sd = tload(tmp_path / "single.pt")
    ref = tload(SAMPLES / "tied_lm.pt")
    assert set(sd) == set(ref) and all(same_bits(sd[k], ref[k]) for k in ref)
    assert sd["embed.weight"].data_ptr() == sd["lm_head.weight"].data_ptr()


def test_sharded_output_folder_is_created_and_removed_again_on_failure(tmp_path: Path) -> None:
    path = _save(tmp_path, "r.pt", {"big": torch.tensor([1e6]), "ok": torch.ones(3)})
    with pytest.raises(CheckFailedError):
        conv.convert(path, tmp_path / "out", output_format="sharded", dtype="fp16")
    assert listing(tmp_path) == ["r.pt"]
    with pytest.raises(OutputError, match=r"output folder .*/a does not exist"):
        conv.convert(path, tmp_path / "a" / "b", max_shard_size="1KB")
    assert listing(tmp_path) == ["r.pt"]
    conv.convert(path, str(tmp_path / "out") + "/", max_shard_size="1KB")
    assert "model.safetensors.index.json" in listing(tmp_path / "out")


def test_stale_shards_of_an_earlier_conversion_are_named(tmp_path: Path) -> None:
    out = str(tmp_path / "out") + "/"
    conv.convert(SAMPLES / "tied_lm.pt", out, max_shard_size="2KB")
    before = listing(tmp_path / "out")
    report = conv.convert(SAMPLES / "tied_lm.pt", out, max_shard_size="1MB", force=True)
    (stale,) = [f for f in report.findings if f.code == "stale-shards"]
    assert f"{len(before) - 1} shard file(s)" in stale.message
    assert json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]


def test_sharded_input_to_safetensors(tmp_path: Path) -> None:
    out = tmp_path / "one.safetensors"
    conv.convert(SAMPLES / "sharded", out, dtype="bf16")
    assert all(v.dtype in (torch.bfloat16, torch.int64) for v in st_load(out).values())


# ----------------------------------------------------------------------------------------------- output safety


def test_existing_output_is_refused_unless_force(tmp_path: Path) -> None:
    out = tmp_path / "o.pt"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="output exists; pass --force") as e:
        conv.convert(SAMPLES / "cnn_bn_state_dict.pt", out)
    assert e.value.exit_code == 4
    assert out.read_bytes() == b"keep me"
    conv.convert(SAMPLES / "cnn_bn_state_dict.pt", out, force=True)
    assert "conv1.weight" in tload(out)


def test_converting_onto_the_input_is_refused_even_with_force(tmp_path: Path) -> None:
    src = tmp_path / "m.pt"
    src.write_bytes((SAMPLES / "cnn_bn_state_dict.pt").read_bytes())
    before = src.read_bytes()
    for target in (src, tmp_path / "link.pt"):
        if target != src:
            target.symlink_to(src)
        with pytest.raises(OutputError, match="onto the input"):
            conv.convert(src, target, force=True, dtype="fp16")
    assert src.read_bytes() == before


def test_missing_output_folder(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        conv.convert(SAMPLES / "cnn_bn_state_dict.pt", tmp_path / "nope" / "o.pt")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_read_only_output_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not writable"):
            conv.convert(SAMPLES / "cnn_bn_state_dict.pt", folder / "o.pt")
    finally:
        folder.chmod(0o755)


def test_output_mode_follows_the_umask_not_0600(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        conv.convert(SAMPLES / "cnn_bn_state_dict.pt", tmp_path / "a.safetensors")
        conv.convert(SAMPLES / "cnn_bn_state_dict.pt", tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "b.pt").stat().st_mode & 0o777 == 0o640


def test_input_is_never_modified(tmp_path: Path) -> None:
    before = (SAMPLES / "tied_lm.pt").read_bytes()
    conv.convert(SAMPLES / "tied_lm.pt", tmp_path / "o.safetensors", dtype="fp16", verify=True)
    assert (SAMPLES / "tied_lm.pt").read_bytes() == before


def test_verify_compares_every_value(tmp_path: Path) -> None:
    report = conv.convert(SAMPLES / "tied_lm.pt", tmp_path / "o.pt", dtype="bf16", verify=True)
    assert report.values_verified


def test_a_read_back_mismatch_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from statecli.conversion import execute

    real = execute._safetensors_header

    def wrong_header(entries: list[Any], items: list[Any], aliases: dict[str, str]) -> bytes:
        return real(entries, items, aliases).replace(b'"F32"', b'"I32"', 1)  # same size, wrong dtype

    monkeypatch.setattr(execute, "_safetensors_header", wrong_header)
    with pytest.raises(OutputError, match="does not match the plan"):
        conv.convert(SAMPLES / "cnn_bn_state_dict.pt", tmp_path / "o.safetensors")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_disk_full_is_exit_4_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    import errno

    from statecli.formats import atomic

    real = atomic.PendingFile.write
    calls = []

    def full(self: atomic.PendingFile, data: bytes | memoryview) -> None:
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, data)

    monkeypatch.setattr(atomic.PendingFile, "write", full)
    with pytest.raises(OutputError, match="no space left on the device; nothing was written") as e:
        conv.convert(SAMPLES / "cnn_bn_state_dict.pt", tmp_path / f"o{suffix}", dtype="fp16")
    assert e.value.exit_code == 4
    assert listing(tmp_path) == []


def test_interrupt_leaves_no_file(tmp_path: Path) -> None:
    def stop(done: int, tensors: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        conv.convert(SAMPLES / "cnn_bn_state_dict.pt", tmp_path / "o.pt", progress=stop)
    assert listing(tmp_path) == []


def test_corrupt_storage_bytes_fail_their_crc_under_verify(tmp_path: Path) -> None:
    import zipfile

    src = tmp_path / "m.pt"
    data = bytearray((SAMPLES / "cnn_bn_state_dict.pt").read_bytes())
    with zipfile.ZipFile(SAMPLES / "cnn_bn_state_dict.pt") as z:
        info = z.getinfo("cnn_bn_state_dict/data/7")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    with open(SAMPLES / "cnn_bn_state_dict.pt", "rb") as f:  # the local header's own extra length
        f.seek(info.header_offset + 28)
        extra = int.from_bytes(f.read(2), "little")
    start = info.header_offset + 30 + len(info.filename) + extra
    data[start + 5] ^= 0xFF
    src.write_bytes(bytes(data))
    with pytest.raises(statecli.InputError, match="CRC"):
        conv.convert(src, tmp_path / "o.safetensors", verify=True)
    assert listing(tmp_path) == ["m.pt"]
    with pytest.raises(statecli.InputError, match="CRC"):
        statecli.load(src)
    # Without --verify, like torch.load (which checks no CRC at all), the bytes are taken as they are.
    conv.convert(src, tmp_path / "o.safetensors")


# ----------------------------------------------------------------------------------------------- load()


def test_load_applies_the_rules_and_keeps_ties() -> None:
    sd = statecli.load(SAMPLES / "tied_lm.pt", dtype="fp16")
    assert sd["embed.weight"].dtype == torch.float16 and sd["position_ids"].dtype == torch.int64
    assert sd["embed.weight"].data_ptr() == sd["lm_head.weight"].data_ptr()
    sample_nets.TinyLM().half().load_state_dict(sd)


def test_load_from_a_whole_module_without_its_code_running() -> None:
    sd = statecli.load(SAMPLES / "frozen_nonpersistent_module.pt")
    assert "cache" not in sd and "scale" in sd
    sample_nets.FrozenNet().load_state_dict(sd)


def test_load_to_meta() -> None:
    sd = statecli.load(SAMPLES / "cnn_bn_state_dict.pt", device="meta", dtype="bf16")
    assert all(v.device.type == "meta" for v in sd.values())
    assert sd["fc.weight"].dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_load_to_cuda_without_a_gpu_says_so() -> None:
    with pytest.raises(UsageError, match="torch sees no CUDA GPU"):
        statecli.load(SAMPLES / "tied_lm.pt", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_load_really_moves_to_cuda() -> None:
    sd = statecli.load(SAMPLES / "tied_lm.pt", device="cuda", dtype="bf16")
    assert all(v.device.type == "cuda" for v in sd.values())
    assert sd["embed.weight"].data_ptr() == sd["lm_head.weight"].data_ptr()


def test_dry_run_plan_needs_no_torch_and_writes_nothing(tmp_path: Path) -> None:
    import subprocess

    code = (
        "import sys, statecli.conversion as c\n"
        f"p = c.plan({str(SAMPLES / 'cnn_bn_state_dict.pt')!r}, {str(tmp_path / 'o.pt')!r}, dtype='fp16')\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print(len(p.items), sum(i.action == 'cast' for i in p.items))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["16", "14"]
    assert listing(tmp_path) == []


def test_safetensors_input_round_trip_keeps_exact_values(tmp_path: Path) -> None:
    sd = {"a": torch.randn(3, 4, dtype=torch.float64), "b": torch.arange(5), "c": torch.randn(2).to(torch.bfloat16)}
    save_file(sd, tmp_path / "in.safetensors")
    conv.convert(tmp_path / "in.safetensors", tmp_path / "o.pt")
    got = tload(tmp_path / "o.pt")
    assert all(same_bits(got[k], v) for k, v in sd.items())
