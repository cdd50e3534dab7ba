"""torch is the oracle: what statecli reads from a torch zip must equal what ``torch.load`` rebuilds.

Every sample checkpoint is loaded both ways and compared fact by fact (names, dtypes, shapes, strides,
storage offsets, devices, requires_grad, shared storages), then the roles are checked against the
evidence the file really holds. Hypothesis adds random state dicts with views and aliases.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from subproc import run_python
from torch_facts import tensors_of

import statecli
from statecli.records import Report, TensorInfo

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


# ----------------------------------------------------------------------------------------------- helpers


def torch_load(path: Path | str, *, weights_only: bool = True) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage / ComplexHalf / quantized deprecation noise
        return torch.load(path, weights_only=weights_only, map_location="cpu")


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def flatten(obj: Any, prefix: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a loaded object, named by its key path the way statecli names it: keys joined by
    dots below the root (``None``), a key ``''`` included (``{'a': {'': t}}`` gives ``a.``)."""
    if isinstance(obj, torch.Tensor):
        yield ("tensor" if prefix is None else prefix), obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from flatten(v, str(k) if prefix is None else f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flatten(v, str(i) if prefix is None else f"{prefix}.{i}")


def facts_of_torch(t: torch.Tensor, device: str | None = None) -> dict[str, Any]:
    return {
        "dtype": dtype_name(t),
        "shape": tuple(t.shape),
        "stride": tuple(t.stride()),
        "storage_offset": t.storage_offset(),
        "device": device if device is not None else str(t.device),
    }


def facts_of_statecli(t: TensorInfo) -> dict[str, Any]:
    return {
        "dtype": t.dtype,
        "shape": tuple(t.shape),
        "stride": tuple(t.stride) if t.stride is not None else None,
        "storage_offset": t.storage_offset,
        "device": t.device,
    }


def assert_facts_match(report: Report, oracle: dict[str, torch.Tensor], device: str | None = None) -> None:
    """Names (as a set: order is checked where it is defined), dtype, shape, stride, offset, device."""
    got = tensors_of(report)
    assert set(got) == set(oracle), (
        f"only statecli: {sorted(set(got) - set(oracle))}; only torch: {sorted(set(oracle) - set(got))}"
    )
    for name, t in oracle.items():
        assert facts_of_statecli(got[name]) == facts_of_torch(t, device), name


def assert_sharing_matches(report: Report, oracle: dict[str, torch.Tensor]) -> None:
    """Tensors on one storage (same ``untyped_storage().data_ptr()``) list each other in ``shares_with``.

    Zero-byte storages all have data_ptr 0 in torch, which says nothing about sharing: they are skipped.
    """
    groups: dict[int, set[str]] = defaultdict(set)
    for name, t in oracle.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr:
            groups[ptr].add(name)
    got = tensors_of(report)
    for name, t in oracle.items():
        ptr = t.untyped_storage().data_ptr()
        if not ptr:
            continue
        assert set(got[name].shares_with) == groups[ptr] - {name}, name


def open_sample(samples_dir: Path, name: str) -> Report:
    return statecli.open_checkpoint(samples_dir / name)


# ------------------------------------------------------------------------------------ plain state dicts


EMPTY_KEYS = {"": torch.ones(2), "(root)": torch.zeros(3), "a": {"": torch.ones(1)}, "x": torch.ones(4)}


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_an_empty_key_is_a_name_like_any_other(tmp_path: Path, zipfile: bool) -> None:
    """A key '' names its tensor '' (never '(root)', which is a label, and a key a file can hold too)."""
    path = tmp_path / "empty_keys.pt"
    torch.save(EMPTY_KEYS, path, _use_new_zipfile_serialization=zipfile)
    oracle = dict(flatten(torch_load(path)))
    report = statecli.open_checkpoint(path)
    assert [t.name for t in report.tensors] == list(oracle) == ["", "(root)", "a.", "x"]
    assert_facts_match(report, oracle)
    assert (report.container.kind, report.container.state_dict_at) == ("state_dict", "")


def test_keys_below_an_empty_key_are_joined_by_a_dot(tmp_path: Path) -> None:
    """``{'': {'x': t}}`` gives '.x', apart from a top-level 'x': the names torch.distributed.checkpoint
    gives the same dict (its .metadata keys), read by statecli's DCP reader."""
    sd = {"": {"x": torch.ones(1), "": torch.zeros(1)}, "x": torch.ones(3), "a": {"": torch.ones(2)}}
    torch.save(sd, tmp_path / "nested.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming a single process"
        dcp.save(sd, checkpoint_id=str(tmp_path / "nested_dcp"), no_dist=True)
    report = statecli.open_checkpoint(tmp_path / "nested.pt")
    names = [t.name for t in report.tensors]
    assert names == list(dict(flatten(torch_load(tmp_path / "nested.pt")))) == [".x", ".", "x", "a."]
    assert sorted(t.name for t in statecli.open_checkpoint(tmp_path / "nested_dcp").tensors) == sorted(names)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_names_below_an_empty_key_survive_conversion(tmp_path: Path, suffix: str) -> None:
    """'.x' and 'x' are two names: converting them is no collision, and both keep their values."""
    sd = {"": {"x": torch.ones(1), "": torch.zeros(1)}, "x": torch.full((3,), 2.0), "a": {"": torch.ones(2)}}
    torch.save(sd, tmp_path / "nested.pt")
    out = tmp_path / f"out{suffix}"
    statecli.convert(tmp_path / "nested.pt", out)
    # A .pt keeps the whole nested dict, as torch.save wrote it.
    got = dict(flatten(torch_load(out))) if suffix == ".pt" else safetensors.torch.load_file(out)
    want = dict(flatten(sd))
    assert list(got) == list(want) or suffix == ".safetensors"  # safetensors sorts its keys
    assert set(got) == {".x", ".", "x", "a."}
    for name, t in want.items():
        assert torch.equal(got[name], t), name


def test_an_empty_top_level_key_beside_the_model(tmp_path: Path) -> None:
    path = tmp_path / "train.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "": {"x": torch.ones(1)}, "epoch": 3}, path)
    report = statecli.open_checkpoint(path)
    assert [(t.name, t.group) for t in report.tensors] == [("w", "model"), (".x", "")]
    assert report.container.state_dict_at == "state_dict"
    assert report.container.other_keys == ("", "epoch")


def test_a_shared_subtree_under_an_empty_key_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "shared.pt"
    d = {"w": torch.ones(2)}
    torch.save({"": d, "b": d}, path)
    report = statecli.open_checkpoint(path)
    assert [t.name for t in report.tensors] == [".w"]
    assert [f.message for f in report.findings if f.code == "shared-subtree"] == [
        "'b' is the same object as ''; listed once"
    ]


@pytest.mark.parametrize(
    ("name", "device"),
    [
        ("cnn_bn_state_dict.pt", None),
        ("tied_lm.pt", None),
        ("qat_observers.pt", None),
        ("cuda_tagged.pt", "cuda:0"),  # torch needs map_location="cpu" here; statecli reports the saved tag
        pytest.param("all_dtypes.pt", None),
    ],
)
def test_state_dict_facts_match_torch(samples_dir: Path, name: str, device: str | None) -> None:
    oracle = torch_load(samples_dir / name)
    report = open_sample(samples_dir, name)
    assert report.format == "torch-zip"
    assert report.container.kind == "state_dict"
    assert report.container.state_dict_at == ""
    assert [t.name for t in report.tensors] == list(oracle), "statecli keeps the file's key order"
    assert_facts_match(report, oracle, device)
    assert_sharing_matches(report, oracle)
    for t in report.tensors:
        # A plain state dict does not store requires_grad: unknown, never a made-up False.
        assert t.requires_grad is None, t.name
        assert t.exact is False, t.name
        assert t.group == "model", t.name


@pytest.mark.parametrize("name", ["cnn_bn_state_dict.pt", "cuda_tagged.pt"])
def test_plain_state_dict_roles_are_inferred(samples_dir: Path, name: str) -> None:
    report = open_sample(samples_dir, name)
    assert len(report.tensors) == 16
    for t in report.tensors:
        if t.name.rpartition(".")[2] in BN_STATS:
            assert (t.role, t.exact, t.evidence) == ("buffer", False, "rule:batchnorm-stats"), t.name
        else:
            assert (t.role, t.exact, t.evidence) == ("parameter", False, "default"), t.name
    assert report.summary.parameters.count == 10
    assert report.summary.buffers.count == 6


def test_cuda_tagged_reports_cuda_device_without_a_gpu(samples_dir: Path) -> None:
    report = open_sample(samples_dir, "cuda_tagged.pt")
    assert {t.device for t in report.tensors} == {"cuda:0"}
    assert set(report.summary.by_device) == {"cuda:0"}


def test_qat_observer_buffers(samples_dir: Path) -> None:
    report = open_sample(samples_dir, "qat_observers.pt")
    for t in report.tensors:
        if "fake_quant" in t.name or "activation_post_process" in t.name:
            assert t.role == "buffer", t.name
            assert t.evidence in ("rule:quant-observer", "rule:integer-dtype"), t.name
        else:
            assert t.name.rpartition(".")[2] in ("weight", "bias"), t.name
            assert (t.role, t.evidence) == ("parameter", "default"), t.name


# ------------------------------------------------------------------------------------------ tied weights


def test_tied_lm_shares_storage(samples_dir: Path) -> None:
    oracle = torch_load(samples_dir / "tied_lm.pt")
    assert oracle["embed.weight"].untyped_storage().data_ptr() == oracle["lm_head.weight"].untyped_storage().data_ptr()
    report = open_sample(samples_dir, "tied_lm.pt")
    got = tensors_of(report)
    assert got["embed.weight"].shares_with == ("lm_head.weight",)
    assert got["lm_head.weight"].shares_with == ("embed.weight",)
    assert report.summary.storage_nbytes < report.summary.logical_nbytes
    assert report.summary.logical_nbytes - report.summary.storage_nbytes == got["embed.weight"].nbytes
    assert (got["position_ids"].role, got["position_ids"].dtype) == ("buffer", "int64")
    assert got["rotary_emb.inv_freq"].role == "buffer"


# --------------------------------------------------------------------------------------------- all dtypes


def test_all_dtypes_sample(samples_dir: Path) -> None:
    oracle = torch_load(samples_dir / "all_dtypes.pt")
    report = open_sample(samples_dir, "all_dtypes.pt")
    assert_facts_match(report, oracle)
    assert_sharing_matches(report, oracle)
    got = tensors_of(report)
    assert {t.dtype for t in report.tensors} == {dtype_name(t) for t in oracle.values()}
    for name, t in oracle.items():
        assert (got[name].layout == "quantized") == t.is_quantized, name
    assert got["scalar_0dim"].shape == () and got["scalar_0dim"].stride == ()
    assert got["empty_0x3"].shape == (0, 3) and got["empty_0x3"].numel == 0
    assert got["transposed"].stride == tuple(oracle["transposed"].stride()) == (1, 4)
    assert got["vector_slice"].storage_offset == oracle["vector_slice"].storage_offset() == 4
    assert got["vector_slice"].shares_with == ("vector",)
    assert got["vector"].shares_with == ("vector_slice",)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.float8_e4m3fn])
def test_rebuild_tensor_v3_dtypes(tmp_path: Path, dtype: torch.dtype) -> None:
    """Dtypes without a typed storage class are saved on a ``torch.storage.UntypedStorage``."""
    base = torch.zeros((2, 3), dtype=dtype)
    path = tmp_path / "v3.pt"
    torch.save({"x": base, "xt": base.t(), "tail": base.view(-1)[2:]}, path)
    oracle = torch_load(path)
    report = statecli.open_checkpoint(path)
    assert_facts_match(report, oracle)
    assert_sharing_matches(report, oracle)


def test_quint4x2_packed_storage(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(torch.rand(2, 4), 0.1, 0, torch.quint4x2)
    assert q.untyped_storage().nbytes() == 4  # two 4-bit elements per byte
    path = tmp_path / "q4.pt"
    torch.save({"q": q}, path)
    report = statecli.open_checkpoint(path)
    assert_facts_match(report, torch_load(path))


# -------------------------------------------------------------------------------------- whole modules


def load_module(samples_dir: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    # Oracle only: a whole-module pickle needs its class, and weights_only=False runs pickle code.
    # These are our own sample files; statecli itself never does this.
    monkeypatch.syspath_prepend(str(samples_dir))
    model = torch_load(samples_dir / name, weights_only=False)
    assert isinstance(model, torch.nn.Module)
    return model


@pytest.mark.parametrize("name", ["cnn_bn_module.pt", "frozen_nonpersistent_module.pt"])
def test_module_file_matches_named_parameters_and_buffers(
    samples_dir: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_module(samples_dir, name, monkeypatch)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    report = open_sample(samples_dir, name)
    got = tensors_of(report)
    assert set(got) == set(params) | set(buffers)
    assert len(report.tensors) == len(params) + len(buffers)
    assert_facts_match(report, {**params, **buffers})
    for pname, p in params.items():
        t = got[pname]
        assert (t.role, t.exact, t.evidence) == ("parameter", True, "module"), pname
        assert t.requires_grad is p.requires_grad, pname
    for bname, b in buffers.items():
        owner_name, _, leaf = bname.rpartition(".")
        owner = model.get_submodule(owner_name)
        t = got[bname]
        assert (t.role, t.exact, t.evidence) == ("buffer", True, "module"), bname
        assert t.persistent is (leaf not in owner._non_persistent_buffers_set), bname
        assert t.requires_grad is b.requires_grad, bname
    cls = type(model)
    assert report.container.kind == "module"
    assert report.container.module_class == f"{cls.__module__}.{cls.__qualname__}"
    assert report.container.training is model.training


def test_frozen_and_nonpersistent_module(samples_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_module(samples_dir, "frozen_nonpersistent_module.pt", monkeypatch)
    assert "cache" not in model.state_dict()  # the sample is what it claims to be
    got = tensors_of(open_sample(samples_dir, "frozen_nonpersistent_module.pt"))
    assert (got["cache"].role, got["cache"].persistent) == ("buffer", False)
    assert (got["scale"].role, got["scale"].persistent) == ("buffer", True)
    for n in ("backbone.0.weight", "backbone.0.bias"):
        assert got[n].requires_grad is False, n
    for n in ("norm.weight", "norm.bias", "head.weight", "head.bias"):
        assert got[n].requires_grad is True, n


# ------------------------------------------------------------------------------------------- keep_vars


@pytest.mark.parametrize(
    ("name", "parameters"),
    [("cnn_bn_keep_vars.pt", 10), ("qat_prepared_keep_vars.pt", 4), ("parametrized_keep_vars.pt", 11)],
)
def test_keep_vars_state_dict(samples_dir: Path, name: str, parameters: int) -> None:
    """Parameters beside plain tensors that all look like buffers (BatchNorm statistics, quantization
    observers, parametrization state): every role is a fact."""
    oracle = torch_load(samples_dir / name)
    report = open_sample(samples_dir, name)
    assert [t.name for t in report.tensors] == list(oracle)
    assert_facts_match(report, oracle)
    got = tensors_of(report)
    n_params = 0
    for name, t in oracle.items():
        info = got[name]
        if isinstance(t, torch.nn.Parameter):
            n_params += 1
            assert (info.role, info.exact, info.evidence) == ("parameter", True, "keep-vars"), name
        else:
            assert (info.role, info.exact, info.evidence) == ("buffer", True, "keep-vars"), name
            assert info.persistent is True, name
        assert info.requires_grad is t.requires_grad, name
    assert n_params == parameters


# ------------------------------------------------------------------------------ training checkpoints


def test_training_checkpoint(samples_dir: Path) -> None:
    ckpt = torch_load(samples_dir / "training_adam.pt")
    report = open_sample(samples_dir, "training_adam.pt")
    assert report.container.kind == "training"
    assert report.container.state_dict_at == "model"
    assert {"epoch", "optimizer"} <= set(report.container.other_keys)
    assert "model" not in report.container.other_keys

    model_sd = ckpt["model"]
    others = dict(flatten({k: v for k, v in ckpt.items() if k != "model"}))
    assert set(model_sd).isdisjoint(others)
    assert_facts_match(report, {**model_sd, **others})
    assert_sharing_matches(report, {**model_sd, **others})

    got = tensors_of(report)
    model_names = [t.name for t in report.tensors if t.group == "model"]
    assert model_names == list(model_sd), "model tensors are named without the 'model.' prefix"
    assert got["bn1.running_mean"].role == "buffer"
    assert got["conv1.weight"].role == "parameter"
    assert "optimizer.state.0.exp_avg" in got
    assert "optimizer.state.0.exp_avg_sq" in got
    for name in others:
        t = got[name]
        assert name.startswith("optimizer.state."), name
        assert (t.role, t.group) == ("other", "optimizer"), name
    for t in report.tensors:
        assert t.requires_grad is None, t.name


def test_lightning_checkpoint(samples_dir: Path) -> None:
    ckpt = torch_load(samples_dir / "lightning.ckpt")
    report = open_sample(samples_dir, "lightning.ckpt")
    assert report.container.kind == "lightning"
    assert report.container.state_dict_at == "state_dict"
    assert {"optimizer_states", "callbacks", "epoch"} <= set(report.container.other_keys)

    sd = ckpt["state_dict"]
    others = dict(flatten({k: v for k, v in ckpt.items() if k != "state_dict"}))
    assert_facts_match(report, {**sd, **others})
    assert_sharing_matches(report, {**sd, **others})

    assert [t.name for t in report.tensors if t.group == "model"] == list(sd)
    got = tensors_of(report)
    assert got["model.bn1.running_var"].role == "buffer"
    assert got["model.fc.weight"].role == "parameter"
    opt = [n for n in others if n.startswith("optimizer_states.")]
    cbs = [n for n in others if n.startswith("callbacks.")]
    assert opt and cbs
    assert set(opt) | set(cbs) == set(others)
    for n in opt + cbs:
        assert got[n].role == "other", n
    for n in opt:
        assert got[n].group == "optimizer_states", n
    for n in cbs:
        assert got[n].group == "callbacks", n


# ------------------------------------------------------------------------------ no torch on the inspect path


@pytest.mark.parametrize(
    "name",
    ["cnn_bn_state_dict.pt", "cnn_bn_module.pt", "training_adam.pt", "cnn_bn.safetensors", "export_frozen.pt2",
     "torchscript_frozen.pt"],
)  # fmt: skip
def test_inspect_does_not_import_torch(samples_dir: Path, name: str) -> None:
    code = (
        "import statecli, sys; r = statecli.open_checkpoint(sys.argv[1]); assert r.tensors; "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
        "assert not bad, bad"
    )
    proc = run_python(code, str(samples_dir / name))
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------- random state dicts

SEGMENTS = ("a", "b", "w", "bias", "0", "1", "")  # '': names such as '', 'a.', '.w', 'a..b
CLASSIC_DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
    torch.int16,
)
# saved with _rebuild_tensor_v3 on an UntypedStorage
V3_DTYPES = (
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.complex32,
    torch.uint16,
    torch.uint32,
    torch.uint64,
)
RANDOM_DTYPES = CLASSIC_DTYPES + V3_DTYPES
VIEW_KINDS = ("alias", "transpose", "slice", "strided")

names_st = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3).map(".".join)
shapes_st = st.lists(st.integers(0, 4), max_size=3).map(tuple)


@st.composite
def state_dict_specs(draw: st.DrawFn, dtypes: tuple[torch.dtype, ...]) -> Any:
    n_bases = draw(st.integers(1, 4))
    specs: list[tuple[Any, ...]] = [("base", draw(st.sampled_from(dtypes)), draw(shapes_st)) for _ in range(n_bases)]
    for _ in range(draw(st.integers(0, 4))):
        specs.append((draw(st.sampled_from(VIEW_KINDS)), draw(st.integers(0, n_bases - 1)), draw(st.integers(0, 5))))
    names = draw(st.lists(names_st, min_size=len(specs), max_size=len(specs), unique=True))
    order = draw(st.permutations(range(len(specs))))
    protocol = draw(st.sampled_from((2, 4)))
    return specs, names, order, protocol


def build_state_dict(specs: list[tuple[Any, ...]], names: list[str], order: list[int]) -> dict[str, torch.Tensor]:
    bases: list[torch.Tensor] = []
    made: list[torch.Tensor] = []
    for kind, a, b in specs:
        if kind == "base":
            t = torch.zeros(b, dtype=a)
            bases.append(t)
        else:
            base = bases[a]
            if kind == "alias":
                t = base  # the very same tensor under a second name
            elif kind == "transpose":
                t = base.t() if base.dim() <= 2 else base.transpose(0, 2)
            elif kind == "slice":
                t = base.view(-1)[b:]  # storage offset b (clamped to numel by torch)
            else:
                t = base.view(-1)[b::2]  # offset and stride 2
        made.append(t)
    return {names[i]: made[i] for i in order}


def check_random_state_dict(folder: Path, spec: Any) -> None:
    specs, names, order, protocol = spec
    sd = build_state_dict(specs, names, order)
    path = folder / "random.pt"
    torch.save(sd, path, pickle_protocol=protocol)
    # torch's weights_only loader refuses protocol 4; this file is our own, so the full loader is safe.
    oracle = torch_load(path, weights_only=protocol == 2)
    report = statecli.open_checkpoint(path)
    assert [t.name for t in report.tensors] == list(oracle)
    assert_facts_match(report, oracle)
    assert_sharing_matches(report, oracle)
    for t in report.tensors:
        assert t.requires_grad is None, t.name
        assert t.device == "cpu", t.name


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("random_state_dicts")


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=state_dict_specs(RANDOM_DTYPES))
def test_random_state_dicts_match_torch(random_dir: Path, spec: Any) -> None:
    check_random_state_dict(random_dir, spec)
