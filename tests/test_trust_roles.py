"""Roles are "exact" only when proven: quantized models, parametrizations and RNG state against the live modules.

The oracle is the live module a file was saved from (rebuilt by sample_models/samples_roles.py, or built
here): a tensor in ``named_parameters()`` is a parameter, one in ``named_buffers()`` a buffer, anything
else ``other``. For every tensor in the file statecli's role must equal the oracle's, and a role may be
``exact`` only where the file proves it. Which tensors torch pickled (and under what name) comes from
walking the objects torch pickles, ``__getstate__`` included, independently of statecli's reader.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.ao.quantization as tq
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch_facts import facts, statecli_facts, tensors_of

import statecli
from statecli import conversion as conv
from statecli.records import Container, RawCheckpoint, RawTensor, Report
from statecli.roles import apply_keep_vars, keep_vars_proves, resolve

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
import sample_nets  # noqa: E402
import samples_roles  # noqa: E402

MODULE_INTERNALS = {"_parameters", "_buffers", "_non_persistent_buffers_set", "_modules", "training", "_version"}


# ----------------------------------------------------------------------------------------------- oracle


def quiet_load(path: Path) -> Any:
    # Our own sample files only: whole modules and TorchScript objects need the full unpickler.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, weights_only=False, map_location="cpu")


def _join(prefix: str | None, key: Any) -> str:
    return str(key) if prefix is None else f"{prefix}.{key}"


def pickled_tensors(obj: Any, prefix: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor torch pickled for ``obj``, named by its key path (a module's parameters, buffers, tensor
    attributes and children by their attribute names; a TorchScript object's by the path in its
    ``__getstate__()``; a module that pickles a tuple by the place in that tuple)."""
    if isinstance(obj, torch.Tensor):
        yield ("tensor" if prefix is None else prefix), obj
    elif isinstance(obj, torch.ScriptObject):
        yield from pickled_tensors(obj.__getstate__()[0], prefix)
    elif isinstance(obj, nn.Module):
        state = obj.__getstate__()
        if not isinstance(state, dict):
            yield from pickled_tensors(state, prefix)
            return
        for group in ("_parameters", "_buffers"):
            for name, t in state[group].items():
                if t is not None:
                    yield _join(prefix, name), t
        for name, v in state.items():
            if name not in MODULE_INTERNALS and isinstance(v, (torch.Tensor, torch.ScriptObject)):
                yield from pickled_tensors(v, _join(prefix, name))
        for name, child in state["_modules"].items():
            if child is not None:
                yield from pickled_tensors(child, _join(prefix, name))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from pickled_tensors(v, _join(prefix, k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from pickled_tensors(v, _join(prefix, i))


def live_roles(model: nn.Module) -> dict[str, str]:
    """The live module's answer: parameter, buffer, or (absent here) other."""
    roles = {n: "parameter" for n, _ in model.named_parameters(remove_duplicate=False)}
    roles.update({n: "buffer" for n, _ in model.named_buffers(remove_duplicate=False)})
    return roles


def check_against(name: str, model: nn.Module) -> tuple[Report, dict[str, Any]]:
    """Names, facts and roles of every tensor in sample ``name`` against what torch loads from it and the
    live module. Returns statecli's report and its tensors by name."""
    report = statecli.open_checkpoint(SAMPLES / name)
    file_tensors = dict(pickled_tensors(quiet_load(SAMPLES / name)))
    got = tensors_of(report)
    assert list(got) == list(file_tensors), (
        f"only statecli: {sorted(set(got) - set(file_tensors))}; only torch: {sorted(set(file_tensors) - set(got))}"
    )
    oracle = live_roles(model)
    for name, t in file_tensors.items():
        info = got[name]
        if t.is_quantized and t.dim() and min(t.shape) == 1:
            # Where torch.load rebuilds a module from its own tuple (quantized Conv), the weight it returns is
            # unpacked again, with other strides for its size-1 dimensions than the pickled ones statecli reads.
            assert (info.dtype, info.shape) == (str(t.dtype).removeprefix("torch."), tuple(t.shape)), name
        else:
            assert statecli_facts(info) == facts(t), name
        want = oracle.get(name, "other")
        assert info.role == want, f"{name}: statecli says {info.role} ({info.evidence}), the live module {want}"
        assert info.group == "model", name
    return report, got


def exact_names(report: Report) -> set[str]:
    return {t.name for t in report.tensors if t.exact}


@pytest.fixture(scope="module")
def live() -> dict[str, Any]:
    """The live objects behind the role samples, rebuilt as make_samples.py built them. The values may differ
    in the last bits on another CPU (float kernels differ); names, dtypes and shapes may not."""
    objects = samples_roles.saved_objects()
    for name, obj in objects.items():
        loaded = quiet_load(SAMPLES / name)
        want = [(k, t.dtype, t.shape) for k, t in pickled_tensors(obj)]
        assert [(k, t.dtype, t.shape) for k, t in pickled_tensors(loaded)] == want, name
    return objects


# ------------------------------------------------------------------------------------ quantized models


def test_dynamic_quantized_state_dict_has_no_exact_role(live: dict[str, Any]) -> None:
    """Before: proj's bias, pickled as an nn.Parameter inside _packed_params, made the whole dict look like
    state_dict(keep_vars=True): embed / norm parameters became exact buffers, packed weights exact too."""
    name = "quantized_dynamic_state_dict.pt"
    report, got = check_against(name, samples_roles.dynamic_quantized())
    assert exact_names(report) == set()
    for n in ("embed.weight", "norm.weight", "norm.bias"):
        assert (got[n].role, got[n].evidence) == ("parameter", "default"), n
    for n in (
        "proj.scale",
        "proj.zero_point",
        "proj._packed_params._packed_params.0",
        "proj._packed_params._packed_params.1",
    ):
        assert (got[n].role, got[n].evidence) == ("other", "rule:quantized-module"), n
    # The LSTM's packed weights live in a TorchScript object: listed, named by their path in its state.
    rnn = [n for n in got if n.startswith("rnn._all_weight_values.0.param.")]
    assert rnn and all(got[n].evidence == "rule:quantized-module" for n in rnn)
    assert {got[n].dtype for n in rnn} == {"qint8", "float32"}
    assert report.container.other_keys == ("proj._packed_params.dtype",)
    assert all(t.requires_grad is None for t in report.tensors)


def test_dynamic_quantized_keep_vars(live: dict[str, Any]) -> None:
    name = "quantized_dynamic_keep_vars.pt"
    report, got = check_against(name, samples_roles.dynamic_quantized())
    # Each Parameter that is a value of the dict proves itself; the plain tensors beside them prove nothing.
    assert exact_names(report) == {"embed.weight", "norm.weight", "norm.bias"}
    assert all(got[n].evidence == "keep-vars" for n in exact_names(report))
    bias = got["proj._packed_params._packed_params.1"]  # an nn.Parameter object, yet no parameter
    assert (bias.role, bias.exact) == ("other", False)


def test_dynamic_quantized_module(live: dict[str, Any]) -> None:
    name = "quantized_dynamic_module.pt"
    model = quiet_load(SAMPLES / name)
    report, got = check_against(name, model)
    assert all(t.exact and t.evidence == "module" for t in report.tensors)
    assert got["proj._packed_params._packed_params.0"].dtype == "qint8"
    assert report.summary.other.count == len(report.tensors) - 3


def test_static_quantized_state_dict(live: dict[str, Any]) -> None:
    """Before: conv.bias (an nn.Parameter in a plain state_dict()) made every tensor exact: the quantized
    conv weight, its scale, and the float BatchNorm / LayerNorm parameters were exact buffers."""
    name = "quantized_static_state_dict.pt"
    report, got = check_against(name, samples_roles.static_quantized())
    assert exact_names(report) == set()
    assert (got["conv.bias"].role, got["conv.bias"].evidence) == ("other", "rule:quantized-module")
    for n in ("quant.scale", "bn.scale", "norm.scale"):
        assert (got[n].role, got[n].evidence) == ("buffer", "rule:quant-params"), n


def test_static_quantized_module(live: dict[str, Any]) -> None:
    name = "quantized_static_module.pt"
    # The live module, not torch.load's: a loaded quantized Conv's __setstate__ leaves it without _parameters.
    report, got = check_against(name, samples_roles.static_quantized())
    # A quantized Conv pickles a tuple, not its __dict__: its weight and bias are found, by rule.
    assert {n for n in got if n.startswith("conv.")} == {"conv.10", "conv.11"}
    assert exact_names(report) == set(got) - {"conv.10", "conv.11"}
    assert (got["conv.10"].dtype, got["conv.10"].evidence) == ("qint8", "rule:quantized-module")


def test_static_quantized_keep_vars(tmp_path: Path) -> None:
    model = samples_roles.static_quantized()
    path = tmp_path / "static_kv.pt"
    torch.save(model.state_dict(keep_vars=True), path)
    got = tensors_of(statecli.open_checkpoint(path))
    oracle = live_roles(model)
    assert {n for n, t in got.items() if t.exact} == {"bn.weight", "bn.bias", "norm.weight", "norm.bias"}
    for name, t in got.items():
        assert t.role == oracle.get(name, "other"), name
    assert (got["conv.bias"].role, got["conv.bias"].exact) == ("other", False)  # a Parameter object, no parameter


def test_qat_prepared_keep_vars_is_exact(live: dict[str, Any]) -> None:
    """The positive case: Parameters beside observer buffers only, so every role is proven."""
    name = "qat_prepared_keep_vars.pt"
    report, _ = check_against(name, samples_roles.qat_prepared())
    assert exact_names(report) == {t.name for t in report.tensors}


def test_qat_observers_state_dict() -> None:
    model = sample_nets.QatNet().train()
    model.qconfig = tq.get_default_qat_qconfig("fbgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tq.prepare_qat(model, inplace=True)
    check_against("qat_observers.pt", model)


def test_a_quantized_whole_module_converts_with_its_packed_weights(tmp_path: Path) -> None:
    """Before: convert wrote embed / norm and dropped the packed weights it never saw, exit 0; then it refused
    quantized tensors. Now it writes every tensor it sees, the packed quantized weights among them."""
    out = tmp_path / "out.pt"
    report = conv.convert(SAMPLES / "quantized_dynamic_module.pt", out, verify=True, state_dict=True)
    assert report.plan.dropped == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors' deprecation notice
        back = torch.load(out, weights_only=True)
    assert set(back) == {t.name for t in statecli.open_checkpoint(SAMPLES / "quantized_dynamic_module.pt").tensors}
    for name in ("proj._packed_params._packed_params.0", "rnn._all_weight_values.0.param.4.1.0"):
        assert back[name].is_quantized and back[name].dtype == torch.qint8, name


def test_a_qfunctional_scale_is_a_documented_wrong_guess(tmp_path: Path) -> None:
    """QFunctional keeps scale / zero_point as attributes (other); the quant-params rule guesses buffer."""
    model = nn.Module()
    model.add = torch.ao.nn.quantized.QFunctional()
    path = tmp_path / "qf.pt"
    torch.save(model.state_dict(), path)
    got = tensors_of(statecli.open_checkpoint(path))
    assert live_roles(model) == {}
    assert (got["add.scale"].role, got["add.scale"].exact, got["add.scale"].evidence) == (
        "buffer",
        False,
        "rule:quant-params",
    )


# ----------------------------------------------------------------------------------- parametrizations


@pytest.mark.parametrize("name", ["parametrized_state_dict.pt", "parametrized_keep_vars.pt"])
def test_parametrizations(live: dict[str, Any], name: str) -> None:
    report, got = check_against(name, samples_roles.parametrized())
    for n in ("ortho.parametrizations.weight.0.base", "spectral.parametrizations.weight.0._u",
              "spectral.parametrizations.weight.0._v"):  # fmt: skip
        assert got[n].role == "buffer", n
    if name == "parametrized_state_dict.pt":
        assert exact_names(report) == set()
        assert got["spectral.parametrizations.weight.0._u"].evidence == "rule:parametrization-buffer"
        for n in ("sym.parametrizations.weight.original", "wn.parametrizations.weight.original0",
                  "wn.parametrizations.weight.original1"):  # fmt: skip
            assert got[n].evidence == "rule:parametrization-original", n
    else:
        assert exact_names(report) == set(got)


def test_a_parametrized_module_cannot_be_pickled_whole() -> None:
    """Why the parametrization samples are state dicts only: torch refuses, so no module evidence exists."""
    import io

    with pytest.raises(RuntimeError, match="state_dict"):
        torch.save(samples_roles.parametrized(), io.BytesIO())


@pytest.mark.parametrize("name", ["norm_hooks_state_dict.pt", "norm_hooks_module.pt"])
def test_old_norm_hooks(live: dict[str, Any], name: str) -> None:
    module_file = name == "norm_hooks_module.pt"
    model = quiet_load(SAMPLES / name) if module_file else samples_roles.norm_hooked()
    report, got = check_against(name, model)
    # weight_v is a buffer under spectral_norm and a parameter under weight_norm: the neighbours decide.
    assert got["fc.weight_v"].role == "buffer" and got["out.weight_v"].role == "parameter"
    if module_file:
        assert exact_names(report) == set(got)
        assert (got["fc.weight"].role, got["fc.weight"].evidence) == ("other", "module-attribute")
    else:
        assert exact_names(report) == set()
        assert got["conv.weight_u"].evidence == "rule:parametrization-buffer"
        assert got["conv.weight_orig"].evidence == "rule:parametrization-original"


# -------------------------------------------------------------------------------------------- RNG state


def test_training_checkpoint_rng_state(live: dict[str, Any]) -> None:
    """Before: the checkpoint's top-level RNG state made it a plain state dict (the model under 'model.'),
    and the uint8 generator states were buffers."""
    report = statecli.open_checkpoint(SAMPLES / "training_rng.pt")
    assert (report.container.kind, report.container.state_dict_at) == ("training", "model")
    assert {"rng_state", "cuda_rng_state", "python_rng_state", "optimizer"} <= set(report.container.other_keys)
    got = tensors_of(report)
    assert list(got) == [n for n, _ in pickled_tensors(live["training_rng.pt"]["model"])] + [
        n for n, _ in pickled_tensors({k: v for k, v in live["training_rng.pt"].items() if k != "model"})
    ]
    for n, group in (("rng_state", "rng_state"), ("cuda_rng_state.0", "cuda_rng_state"),
                     ("cuda_rng_state.1", "cuda_rng_state")):  # fmt: skip
        assert (got[n].role, got[n].exact, got[n].evidence, got[n].group) == ("other", False, "rule:rng-state", group)
    assert got["1.num_batches_tracked"].role == "buffer"


def test_trainer_rng_state_file(live: dict[str, Any]) -> None:
    """HF Trainer's rng_state.pth: no model at all, every tensor a generator state."""
    report = statecli.open_checkpoint(SAMPLES / "trainer_rng_state.pth")
    got = tensors_of(report)
    assert list(got) == ["cpu", "cuda.0", "cuda.1"]
    assert all(
        (t.role, t.evidence, t.group) == ("other", "rule:rng-state", t.name.partition(".")[0]) for t in got.values()
    )
    assert report.summary.buffers.count == 0


def _rng_checkpoint() -> dict[str, Any]:
    np.random.seed(0)
    return {
        "fc.weight": torch.ones(2, 2),
        "fc.bias": torch.zeros(2),
        "rng_state": torch.get_rng_state(),
        "numpy_rng_state": np.random.get_state(),
        "torch_cuda_manual_seed": [samples_roles.cuda_rng_state(1, 0)],
        "python": random.getstate(),
    }


def test_rng_state_beside_a_flat_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "flat.pt"
    torch.save(_rng_checkpoint(), path)
    report = statecli.open_checkpoint(path)
    got = tensors_of(report)
    assert set(got) == {"fc.weight", "fc.bias", "rng_state", "torch_cuda_manual_seed.0"}  # numpy's is no tensor
    assert (got["fc.weight"].role, got["fc.weight"].group) == ("parameter", "model")
    for n in ("rng_state", "torch_cuda_manual_seed.0"):
        assert (got[n].role, got[n].evidence, got[n].group) == ("other", "rule:rng-state", n.partition(".")[0])
    assert {"rng_state", "torch_cuda_manual_seed"} <= set(report.container.other_keys)
    plan = conv.plan(path, tmp_path / "out.safetensors")
    assert [i.name for i in plan.items] == ["fc.weight", "fc.bias"]  # training state stays out


@pytest.mark.parametrize("fmt", ["safetensors", "dcp"])
def test_rng_state_in_other_formats(tmp_path: Path, fmt: str) -> None:
    sd = {"fc.weight": torch.ones(2, 2), "rng_state": torch.get_rng_state()}
    if fmt == "safetensors":
        path = tmp_path / "x.safetensors"
        save_file(sd, path)
    else:
        path = tmp_path / "dcp"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(sd, checkpoint_id=str(path), no_dist=True)
    got = tensors_of(statecli.open_checkpoint(path))
    assert (got["rng_state"].role, got["rng_state"].evidence, got["rng_state"].group) == (
        "other",
        "rule:rng-state",
        "rng_state",
    )
    assert got["fc.weight"].role == "parameter"


# ----------------------------------------------------------------------------------- the keep_vars test


def _frozen_bn_net() -> nn.Module:
    """torchvision's FrozenBatchNorm2d pattern: weight and bias registered as buffers."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Module())
    for k in ("weight", "bias", "running_mean", "running_var"):
        net[1].register_buffer(k, torch.ones(2))
    return net


KEEP_VARS_CASES: dict[str, tuple[Callable[[], dict[str, Any]], set[str] | None]] = {
    # name: (the dict saved, the names that must be exact; None: all of them)
    "keep_vars": (lambda: sample_nets.FrozenNet().state_dict(keep_vars=True), None),
    "buffer_named_weight": (lambda: _frozen_bn_net().state_dict(keep_vars=True), {"0.weight", "0.bias"}),
    "one_parameter_in_a_plain_state_dict": (
        lambda: {**sample_nets.SmallCNN().state_dict(), "head": nn.Parameter(torch.ones(2))},
        {"head"},
    ),
    "parameter_in_a_list": (
        lambda: {"w": nn.Parameter(torch.ones(2)), "extra": [nn.Parameter(torch.ones(1))], "s": torch.ones(3)},
        {"w"},
    ),
}


@pytest.mark.parametrize("case", list(KEEP_VARS_CASES))
def test_keep_vars_needs_the_whole_dict(tmp_path: Path, case: str) -> None:
    make, exact = KEEP_VARS_CASES[case]
    sd = make()
    path = tmp_path / "sd.pt"
    torch.save(sd, path)
    report = statecli.open_checkpoint(path)
    want = {t.name for t in report.tensors} if exact is None else exact
    assert exact_names(report) == want
    params = {n for n, t in pickled_tensors(sd) if isinstance(t, nn.Parameter)}
    for t in report.tensors:
        if t.exact:
            assert (t.role == "parameter") == (t.name in params), t.name


def test_keep_vars_alone_never_proves_a_quantized_neighbour() -> None:
    tensors = [
        RawTensor("fc.bias", "float32", (2,), is_parameter=True),
        RawTensor("fc.weight", "qint8", (2, 2)),
        RawTensor("norm.weight", "float32", (2,)),
    ]
    apply_keep_vars(tensors)
    assert [(t.role, t.exact) for t in tensors] == [(None, False)] * 3
    report = resolve(RawCheckpoint("x.pt", "torch-zip", tensors, Container("state_dict", "")))
    assert [t.role for t in report.tensors] == ["other", "other", "parameter"]


def test_convert_keeps_parameters_only_where_they_read_back_exact(tmp_path: Path) -> None:
    """A whole module with a buffer named 'weight': before, the .pt output's read-back check failed (its plain
    'weight' is no longer exact); now the output holds plain tensors and a note says why."""
    path = tmp_path / "frozen_bn.pt"
    torch.save(_frozen_bn_net(), path)
    out = tmp_path / "out.pt"
    result = conv.convert(path, out, state_dict=True)
    assert [n.code for n in result.plan.notes] == ["roles-not-stored"]
    assert exact_names(statecli.open_checkpoint(out)) == set()
    out_st = tmp_path / "out.safetensors"
    conv.convert(path, out_st)
    assert exact_names(statecli.open_checkpoint(out_st)) == {t.name for t in statecli.open_checkpoint(out_st).tensors}
    assert keep_vars_proves([("a.weight", "float32", (1,), True), ("a.running_mean", "float32", (1,), False)])
    assert not keep_vars_proves([("a.weight", "float32", (1,), True), ("b.weight", "float32", (1,), False)])


def test_optimizer_evidence_counts_the_neighbour_rules(tmp_path: Path) -> None:
    """Before: old spectral_norm's weight_u / weight_v counted as parameters when lining the model up with
    its optimizer, so the counts differed (7 against 11) and no role was taken from the optimizer."""
    model = samples_roles.norm_hooked().train()
    adam = torch.optim.Adam(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(torch.randn(2, 1, 4, 4)).sum().backward()
    adam.step()
    path = tmp_path / "train.pt"
    torch.save({"model": model.state_dict(), "optimizer": adam.state_dict()}, path)
    got = tensors_of(statecli.open_checkpoint(path))
    params = dict(model.named_parameters())
    for name, t in got.items():
        if t.group == "model":
            want = ("parameter", "optimizer") if name in params else ("buffer", "rule:parametrization-buffer")
            assert (t.role, t.evidence) == want, name
