"""Quantized tensors (``qint8``, ``quint8``, ``qint32``; per tensor and per channel) through statecli: the
quantizer read from the pickle, ``convert`` to a .pt that torch.load(weights_only=True) reads back equal,
``statecli.load`` giving real quantized tensors, and ``diff`` comparing them exactly. torch is the oracle."""

from __future__ import annotations

import collections
import json
import pickletools
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from clirun import run_cli

import statecli
from statecli import conversion as conv
from statecli.diff import diff
from statecli.errors import OutputError, UnsupportedFormatError, UsageError
from statecli.pickled import Global, QuantizerRef, StorageRef, TensorRef
from statecli.safepickle.handlers import HANDLERS

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
QUANTIZED = {"qint8", "quint8", "qint32", "per_channel", "per_channel_axis1", "float_qparams", "transposed", "alias"}


def quiet(fn: Any, *args: Any, **kw: Any) -> Any:
    """Call ``fn`` without torch's deprecation notices for quantized tensors and TypedStorage."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def tload(path: Path | str, **kw: Any) -> Any:
    return quiet(torch.load, path, weights_only=True, **kw)


def quantized_state() -> dict[str, torch.Tensor]:
    """Every quantizer torch.save writes, beside plain tensors; ``alias`` is ``qint8`` under a second name."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qint8 = torch.quantize_per_tensor(w, 0.05, 3, torch.qint8)
        return {
            "weight": torch.randn(4, generator=g),
            "qint8": qint8,
            "quint8": torch.quantize_per_tensor(w, 0.1, 128, torch.quint8),
            "qint32": torch.quantize_per_tensor(w, 0.001, -7, torch.qint32),
            "per_channel": torch.quantize_per_channel(
                w, torch.tensor([0.1, 0.2, 0.05, 0.3], dtype=torch.float64), torch.tensor([0, 1, -2, 3]), 0, torch.qint8
            ),
            "per_channel_axis1": torch.quantize_per_channel(
                w, torch.tensor([0.02, 0.04, 0.08], dtype=torch.float64), torch.tensor([120, 128, 130]), 1, torch.quint8
            ),
            # Embedding-style: float zero points (torch pickles the scheme as per_channel_affine all the same).
            "float_qparams": torch.quantize_per_channel(
                w, torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.5, -1.0, 0.0, 2.0]), 0, torch.quint8
            ),
            "transposed": torch.quantize_per_tensor(w.t().contiguous(), 0.07, 0, torch.qint8).t(),
            "steps": torch.tensor(7),
            "alias": qint8,
        }


def save_state(path: Path, state: dict[str, torch.Tensor] | None = None, **kw: Any) -> Path:
    quiet(torch.save, quantized_state() if state is None else state, path, **kw)
    return path


def assert_same_quantized(got: torch.Tensor, want: torch.Tensor, name: str = "") -> None:
    """Equal as torch sees a quantized tensor: dtype, shape, scheme, integers and every quantizer parameter."""
    assert got.is_quantized and want.is_quantized, name
    assert got.dtype == want.dtype and got.shape == want.shape, name
    assert got.qscheme() == want.qscheme(), name
    assert torch.equal(got.int_repr(), want.int_repr()), name
    if want.qscheme() == torch.per_tensor_affine:
        assert (got.q_scale(), got.q_zero_point()) == (want.q_scale(), want.q_zero_point()), name
    else:
        assert torch.equal(got.q_per_channel_scales(), want.q_per_channel_scales()), name
        assert torch.equal(got.q_per_channel_zero_points(), want.q_per_channel_zero_points()), name
        assert got.q_per_channel_axis() == want.q_per_channel_axis(), name


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, w in want.items():
        if w.is_quantized:
            assert_same_quantized(got[name], w, name)
        else:
            assert got[name].dtype == w.dtype and torch.equal(got[name], w), name


# ----------------------------------------------------------------------------------------------- reading


def test_the_quantizer_reaches_the_records(tmp_path: Path) -> None:
    src = save_state(tmp_path / "q.pt")
    by = {t.name: t for t in statecli.open_checkpoint(src).tensors}
    q = by["qint8"].quantizer
    assert q is not None and (q.scheme, q.scale, q.zero_point, q.axis) == ("per_tensor_affine", 0.05, 3, None)
    assert by["qint32"].quantizer is not None and by["qint32"].quantizer.zero_point == -7
    pc = by["per_channel_axis1"].quantizer
    assert pc is not None and (pc.scheme, pc.axis) == ("per_channel_affine", 1)
    assert pc.scales is not None and pc.zero_points is not None
    assert (pc.scales.dtype, pc.scales.shape, pc.zero_points.dtype, pc.zero_points.shape) == (
        "float64",
        (3,),
        "int64",
        (3,),
    )
    fq = by["float_qparams"].quantizer
    assert fq is not None and fq.zero_points is not None and fq.zero_points.dtype == "float32"
    assert by["weight"].quantizer is None and by["steps"].quantizer is None


def _qtensor(params: tuple[Any, ...]) -> TensorRef:
    """What the restricted reader makes of ``_rebuild_qtensor`` over a 4×3 qint8 storage with ``params``."""
    rebuild = HANDLERS[("torch._utils", "_rebuild_qtensor")]
    return rebuild((StorageRef("0", "qint8", "cpu", 12, 12), 0, (4, 3), (3, 1), params, False, None))


def test_quantizer_params_torch_load_would_refuse_are_not_carried() -> None:
    scales = TensorRef(StorageRef("1", "float64", "cpu", 4, 32), 0, (4,), (1,), "float64", None)
    zero_points = TensorRef(StorageRef("2", "int64", "cpu", 4, 32), 0, (4,), (1,), "int64", None)
    per_tensor, per_channel = Global("torch", "per_tensor_affine"), Global("torch", "per_channel_affine")
    assert _qtensor((per_tensor, 0.5, 3)).quantizer == QuantizerRef("per_tensor_affine", 0.5, 3)
    q = _qtensor((per_channel, scales, zero_points, 0)).quantizer
    assert q is not None and (q.axis, q.scales, q.zero_points) == (0, scales, zero_points)
    bad = [
        (per_tensor, 0.5),
        (per_tensor, "0.5", 3),
        (per_tensor, 0.5, True),
        (per_tensor, 0.5, 2**63),
        (Global("torch", "per_tensor_symmetric"), 0.5, 3),  # torch.load refuses every other scheme
        (Global("os", "per_tensor_affine"), 0.5, 3),
        (per_channel, scales, zero_points, 1),  # 3 channels along axis 1, 4 scales
        (per_channel, scales, zero_points, -1),
        (per_channel, scales, zero_points, 2),
        (per_channel, [0.1] * 4, [0] * 4, 0),  # lists: torch.save writes tensors
        (per_channel, zero_points, zero_points, 0),  # integer scales
        (per_channel, scales, zero_points),
        (),
    ]
    for params in bad:
        t = _qtensor(params)
        assert t.layout == "quantized" and t.quantizer is None, params


def test_inspect_json_does_not_show_the_quantizer(tmp_path: Path) -> None:
    src = save_state(tmp_path / "q.pt")
    code, out, err = run_cli("inspect", src, "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    keys = {tuple(t) for t in doc["tensors"]}
    assert len(keys) == 1  # quantized tensors have exactly the fields of the others
    assert json.loads(statecli.open_checkpoint(src).to_json()) == statecli.open_checkpoint(src).to_dict()


# ----------------------------------------------------------------------------------------------- convert


def test_convert_to_pt_keeps_quantized_tensors_as_torch_saved_them(tmp_path: Path) -> None:
    src = save_state(tmp_path / "q.pt")
    out = tmp_path / "out.pt"
    report = conv.convert(src, out, dtype="bf16", verify=True)
    decisions = {i.name: (i.action, i.dst_dtype, i.reason) for i in report.plan.items}
    assert decisions["qint8"] == ("keep", "qint8", "quantized qint8: never changes")
    assert decisions["per_channel_axis1"] == ("keep", "quint8", "quantized quint8: never changes")
    # A float tensor of the module that holds quantized ones feeds quantized kernels: never cast.
    assert decisions["weight"] == ("keep", "float32", "float32 in a quantized module: its kernels take it as it is")
    want = tload(src)
    back = tload(out)
    assert_same_state(back, want)
    assert back["alias"].untyped_storage().data_ptr() == back["qint8"].untyped_storage().data_ptr()


def test_the_written_pickle_calls_what_torch_save_calls(tmp_path: Path) -> None:
    """The same globals in the same order as torch.save's own pickle: _rebuild_qtensor with a storage typed
    by the quantized dtype, and the quantizer tuple torch writes (per_channel_affine for float qparams too)."""
    for name, t in quantized_state().items():
        if not t.is_quantized or name == "alias":
            continue
        src = save_state(tmp_path / f"{name}.pt", collections.OrderedDict({name: t}))  # as statecli writes one
        out = tmp_path / f"{name}-out.pt"
        conv.convert(src, out)
        assert _globals(out) == _globals(src), name


def _globals(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    return [arg for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL"]


def test_a_quantizer_that_reads_back_wrong_is_not_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from statecli.conversion import quantized as cq

    src = save_state(tmp_path / "q.pt", {"q": quantized_state()["qint8"]})
    real = cq.QuantizedOut.wrap

    def rescaled(self: cq.QuantizedOut, item: conv.PlanItem, t: Any) -> Any:
        out = real(self, item, t)
        out.scale *= 2
        return out

    monkeypatch.setattr(cq.QuantizedOut, "wrap", rescaled)
    with pytest.raises(OutputError, match=r"q has quantizer \('per_tensor_affine', 0.1, 3\), expected"):
        conv.convert(src, tmp_path / "o.pt", state_dict=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.pt"]


def test_verify_reads_the_per_channel_scales_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from statecli.conversion import quantized as cq

    src = save_state(tmp_path / "q.pt", {"q": quantized_state()["per_channel"]})
    real = cq.QuantizedOut.storages

    def scrambled(self: cq.QuantizedOut) -> Any:
        for storage, pieces in real(self):
            yield storage, [bytes(reversed(bytes(p))) for p in pieces]

    monkeypatch.setattr(cq.QuantizedOut, "storages", scrambled)
    conv.convert(src, tmp_path / "unchecked.pt", state_dict=True)  # names, dtypes, shapes: all as planned
    with pytest.raises(OutputError, match="--verify: the values of q"):
        conv.convert(src, tmp_path / "o.pt", verify=True, state_dict=True)
    assert not (tmp_path / "o.pt").exists()


def test_convert_moves_quantized_tensors_with_the_others(tmp_path: Path) -> None:
    src = save_state(tmp_path / "q.pt")
    out = tmp_path / "gpu.pt"
    conv.convert(src, out, device="cuda:0")
    assert {t.device for t in statecli.open_checkpoint(out).tensors} == {"cuda:0"}
    with zipfile.ZipFile(out) as z:
        pkl = z.read("gpu/data.pkl")
    assert b"cpu" not in pkl  # the per-channel scales and zero points move too, as torch.save's would
    assert_same_state(tload(out, map_location="cpu"), tload(src))
    back = tmp_path / "cpu.pt"
    conv.convert(out, back, device="cpu")
    assert_same_state(tload(back), tload(src))


def test_quantized_tensors_cannot_go_to_meta(tmp_path: Path) -> None:
    src = save_state(tmp_path / "q.pt")
    with pytest.raises(UsageError, match=r"quantized.*meta"):
        conv.plan(src, tmp_path / "o.pt", device="meta")
    with pytest.raises(UsageError, match=r"quantized.*meta"):
        statecli.load(src, device="meta")


def test_safetensors_output_is_a_usage_error_naming_the_tensors(tmp_path: Path) -> None:
    src = save_state(tmp_path / "q.pt")
    out = tmp_path / "out" / "q.safetensors"
    out.parent.mkdir()
    with pytest.raises(UsageError) as e:
        conv.convert(src, out)
    assert "qint8" in e.value.message and "per_channel_axis1" in e.value.message and ".pt" in e.value.message
    code, _, err = run_cli("convert", src, "-o", out)
    assert code == 2 and "write a .pt file instead" in err
    code, _, err = run_cli("convert", src, "-o", out.parent / "shards/")
    assert code == 2, err
    assert list(out.parent.iterdir()) == []


def test_convert_cli_table_says_why_quantized_tensors_keep_their_dtype(tmp_path: Path) -> None:
    src = save_state(tmp_path / "q.pt")
    code, out, err = run_cli(
        "convert", src, "-o", tmp_path / "o.pt", "--dtype", "fp16", "--dry-run", "--format", "json"
    )
    assert code == 0, err
    reasons = {t["name"]: t["reason"] for t in json.loads(out)["tensors"]}
    assert reasons["per_channel"] == "quantized qint8: never changes"
    assert reasons["qint32"] == "quantized qint32: never changes"


def test_plan_of_a_quantized_checkpoint_needs_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys, statecli.conversion as c\n"
        f"p = c.plan({str(SAMPLES / 'quantized_static_state_dict.pt')!r}, {str(tmp_path / 'o.pt')!r}, dtype='fp16')\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print(sorted({i.reason for i in p.items if i.src_dtype == 'qint8'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['quantized qint8: never changes']"


def test_packed_quantized_dtypes_are_still_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFormatError, match=r"quint4x2.*packed"):
        conv.convert(SAMPLES / "all_dtypes.pt", tmp_path / "o.pt", state_dict=True)
    assert list(tmp_path.iterdir()) == []
    # The whole checkpoint copies their bytes as they are.
    conv.convert(SAMPLES / "all_dtypes.pt", tmp_path / "o.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torch.load(tmp_path / "o.pt", weights_only=False)  # trusted: the bundled sample, converted
        want = torch.load(SAMPLES / "all_dtypes.pt", weights_only=False)
    assert torch.equal(got["quint4x2"].int_repr(), want["quint4x2"].int_repr())


@pytest.mark.parametrize("sample", ["quantized_static_state_dict.pt", "quantized_dynamic_state_dict.pt"])
def test_quantized_samples_convert_to_pt(tmp_path: Path, sample: str) -> None:
    out = tmp_path / "o.pt"
    code, _, err = run_cli("convert", SAMPLES / sample, "-o", out, "--dtype", "bf16", "--verify", "--state-dict")
    assert code == 0, err
    back = tload(out)
    got = quiet(statecli.load, SAMPLES / sample)
    assert set(back) == set(got) and any(t.is_quantized for t in got.values())
    for name, t in got.items():
        if t.is_quantized:
            assert_same_quantized(back[name], t, name)


# ----------------------------------------------------------------------------------------------- statecli.load


def test_load_gives_real_quantized_tensors(tmp_path: Path) -> None:
    src = save_state(tmp_path / "q.pt")
    got = quiet(statecli.load, src, dtype="fp16")
    want = tload(src)  # "weight" beside the quantized tensors is theirs: kept float32, as convert keeps it
    assert_same_state(got, want)
    assert got["alias"].untyped_storage().data_ptr() == got["qint8"].untyped_storage().data_ptr()


def test_load_matches_torch_on_the_static_sample() -> None:
    got = quiet(statecli.load, SAMPLES / "quantized_static_state_dict.pt")
    want = tload(SAMPLES / "quantized_static_state_dict.pt")
    packed = want["fc._packed_params._packed_params"]
    assert_same_quantized(got["conv.weight"], want["conv.weight"], "conv.weight")
    assert_same_quantized(got["fc._packed_params._packed_params.0"], packed[0], "fc weight")
    assert torch.equal(got["fc._packed_params._packed_params.1"], packed[1])


def test_load_from_a_legacy_file(tmp_path: Path) -> None:
    src = save_state(tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert statecli.open_checkpoint(src).format == "torch-legacy"
    assert_same_state(quiet(statecli.load, src), tload(src))


def test_load_from_bin_shards(tmp_path: Path) -> None:
    state = quantized_state()
    del state["alias"]
    names = list(state)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    save_state(tmp_path / "pytorch_model-1.bin", {k: state[k] for k in first})
    save_state(tmp_path / "pytorch_model-2.bin", {k: state[k] for k in second})
    weight_map = {k: "pytorch_model-1.bin" for k in first} | {k: "pytorch_model-2.bin" for k in second}
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    got = quiet(statecli.load, index)
    assert_same_state(got, state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_load_to_cuda(tmp_path: Path) -> None:
    src = save_state(tmp_path / "q.pt")
    want = tload(src)
    for device in ("cuda", "cuda:0"):
        try:
            got = quiet(statecli.load, src, device=device)
        except UsageError as e:  # torch without quantized CUDA kernels for a scheme: said, not crashed
            assert "quantized" in e.message and "cuda" in e.message
            continue
        assert all(v.device.type == "cuda" for v in got.values())
        assert_same_state({k: v.cpu() for k, v in got.items()}, want)


# ----------------------------------------------------------------------------------------------- diff


def _edited(**changes: torch.Tensor) -> dict[str, torch.Tensor]:
    state = quantized_state()
    state.update(changes)
    return state


def test_diff_of_a_quantized_checkpoint_with_itself_compares_every_value(tmp_path: Path) -> None:
    src = save_state(tmp_path / "q.pt")
    result = diff(src, src)
    assert result.same
    assert result.summary.unchecked == 0 and result.summary.identical == len(quantized_state())
    assert not any(n.code == "values-not-compared" for n in result.notes)


def test_diff_against_the_converted_pt(tmp_path: Path) -> None:
    src = save_state(tmp_path / "q.pt")
    out = tmp_path / "o.pt"
    conv.convert(src, out)
    result = diff(src, out)
    assert result.same and result.summary.unchecked == 0


def test_a_change_of_scale_alone_is_a_difference(tmp_path: Path) -> None:
    q = quantized_state()["qint8"]
    rescaled = quiet(torch._make_per_tensor_quantized_tensor, q.int_repr(), 0.06, 3)
    a = save_state(tmp_path / "a.pt")
    b = save_state(tmp_path / "b.pt", _edited(qint8=rescaled, alias=rescaled))
    result = diff(a, b, atol=1.0, rtol=1.0)  # a tolerance does not hide a new quantizer
    assert not result.same
    d = {t.name: t for t in result.tensors}["qint8"]
    assert d.status == "differs" and d.equal is False and d.mismatched == q.numel()
    assert "values" in d.differences
    assert any("scale 0.05 → 0.06" in n for n in d.notes)
    code, _, _ = run_cli("diff", a, b)
    assert code == 1


def test_one_integer_changed_is_counted(tmp_path: Path) -> None:
    q = quantized_state()["qint32"]
    ints = q.int_repr().clone()
    ints[1, 2] += 1
    a = save_state(tmp_path / "a.pt")
    b = save_state(tmp_path / "b.pt", _edited(qint32=quiet(torch._make_per_tensor_quantized_tensor, ints, 0.001, -7)))
    d = {t.name: t for t in diff(a, b).tensors}["qint32"]
    assert d.status == "differs" and d.mismatched == 1
    assert d.max_abs == pytest.approx(0.001)


def test_one_channel_rescaled_counts_that_channel(tmp_path: Path) -> None:
    q = quantized_state()["per_channel"]
    scales = q.q_per_channel_scales().clone()
    scales[2] = 0.5
    changed = quiet(torch._make_per_channel_quantized_tensor, q.int_repr(), scales, q.q_per_channel_zero_points(), 0)
    a = save_state(tmp_path / "a.pt")
    b = save_state(tmp_path / "b.pt", _edited(per_channel=changed))
    d = {t.name: t for t in diff(a, b).tensors}["per_channel"]
    assert d.status == "differs" and d.mismatched == 3  # the 3 values of channel 2
    assert any("scales differ in 1 of 4 channels" in n for n in d.notes)


def test_a_quantized_tensor_against_a_float_one_is_not_compared(tmp_path: Path) -> None:
    a = save_state(tmp_path / "a.pt")
    b = save_state(tmp_path / "b.pt", _edited(qint8=quantized_state()["qint8"].dequantize()))
    d = {t.name: t for t in diff(a, b).tensors}["qint8"]
    assert d.status == "unchecked"
    assert any("values not compared" in n and "quantized" in n for n in d.notes)


@pytest.mark.parametrize("chunk", [5, 1 << 20])
def test_channels_are_found_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Along axis 1 of a 4×3 tensor, channel 1 holds flat elements 1, 4, 7, 10: chunks of 5 split it."""
    from statecli import diff as diff_core

    monkeypatch.setattr(diff_core, "CHUNK_ELEMENTS", chunk)
    q = quantized_state()["per_channel_axis1"]
    zero_points = q.q_per_channel_zero_points().clone()
    zero_points[1] += 1
    ints = q.int_repr().clone()
    ints[0, 0] += 1  # channel 0: one more value
    ints[2, 1] += 1  # channel 1: already counted
    changed = quiet(torch._make_per_channel_quantized_tensor, ints, q.q_per_channel_scales(), zero_points, 1)
    a = save_state(tmp_path / "a.pt")
    b = save_state(tmp_path / "b.pt", _edited(per_channel_axis1=changed))
    d = {t.name: t for t in diff(a, b).tensors}["per_channel_axis1"]
    assert d.mismatched == 4 + 1
    assert "per-channel zero points differ in 1 of 3 channels" in d.notes and "2 integers changed" in d.notes


def test_a_new_scheme_or_zero_point_changes_every_value(tmp_path: Path) -> None:
    state = quantized_state()
    q = state["qint8"]
    per_channel = quiet(
        torch._make_per_channel_quantized_tensor,
        q.int_repr(),
        torch.full((4,), q.q_scale(), dtype=torch.float64),
        torch.full((4,), q.q_zero_point()),
        0,
    )
    shifted = quiet(torch._make_per_tensor_quantized_tensor, q.int_repr(), q.q_scale(), q.q_zero_point() + 1)
    a = save_state(tmp_path / "a.pt")
    b = save_state(tmp_path / "b.pt", _edited(qint8=per_channel, alias=shifted))
    by = {t.name: t for t in diff(a, b).tensors}
    assert by["qint8"].mismatched == 12 and "qscheme per_tensor_affine → per_channel_affine" in by["qint8"].notes
    # Same real values (one scale everywhere), a different representation: still a difference.
    assert by["qint8"].max_abs == 0 and by["qint8"].status == "differs"
    assert by["alias"].mismatched == 12 and "zero point 3 → 4" in by["alias"].notes
