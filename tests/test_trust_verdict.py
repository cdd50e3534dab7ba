"""The allow-list verdict on real checkpoints: no false alarm on what torch itself writes.

The hostile side (exploits that must be called dangerous, each proven to run under torch.load) lives in
tests/hostile/cases_verdict.py. Here torch builds benign checkpoints of many families (whole models of
every common layer, quantized and QAT models, old-style spectral/weight norm hooks, training checkpoints
with optimizer, scheduler, RNG state of torch, numpy and Python, hyper-parameters as Namespace, paths and
dates, pickle protocols 1 to 5, whole optimizers and schedulers), and every one must be free of dangerous
findings, so ``statecli check`` passes. A file that torch's own ``weights_only=True`` loader accepts must
not even get a warning.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import pathlib
import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from clirun import run_cli

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

import statecli  # noqa: E402
from statecli.security import INERT_CALLABLES, INERT_CLASSES, findings_for, loads  # noqa: E402

nn = torch.nn


class _AllLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [nn.Conv1d(2, 2, 1), nn.Conv2d(2, 2, 1), nn.Conv3d(2, 2, 1), nn.ConvTranspose2d(2, 2, 1)]
        )
        self.norms = nn.ModuleDict(
            {
                "bn": nn.BatchNorm2d(2),
                "ln": nn.LayerNorm(4),
                "gn": nn.GroupNorm(1, 2),
                "in": nn.InstanceNorm2d(2, affine=True),
                "rms": nn.RMSNorm(4),
            }
        )
        self.rnns = nn.Sequential()
        self.lstm = nn.LSTM(4, 4, batch_first=True)
        self.gru = nn.GRU(4, 4)
        self.rnn = nn.RNN(4, 4)
        self.emb = nn.Embedding(10, 4, padding_idx=0)
        self.bag = nn.EmbeddingBag(10, 4)
        self.attn = nn.MultiheadAttention(4, 2)
        self.enc = nn.TransformerEncoderLayer(4, 2, 8)
        self.dec = nn.TransformerDecoderLayer(4, 2, 8)
        self.act = nn.Sequential(nn.ReLU(), nn.GELU(), nn.SiLU(), nn.Softmax(-1), nn.LogSoftmax(-1), nn.Softmin(-1))
        self.pool = nn.Sequential(
            nn.AvgPool3d(1), nn.MaxPool2d(1), nn.AdaptiveAvgPool2d(1), nn.Upsample(scale_factor=2)
        )
        self.misc = nn.Sequential(nn.Dropout(0.1), nn.Identity(), nn.Flatten(), nn.PixelShuffle(1), nn.Linear(4, 4))
        self.plist = nn.ParameterList([nn.Parameter(torch.zeros(2))])
        self.pdict = nn.ParameterDict({"a": nn.Parameter(torch.ones(2))})
        self.register_buffer("step", torch.tensor(3))
        self.register_buffer("cache", torch.zeros(2), persistent=False)


def _quantized_dynamic() -> Any:
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.LSTM(4, 4))
    return torch.ao.quantization.quantize_dynamic(m, {nn.Linear, nn.LSTM}, dtype=torch.qint8)


class _Static(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.conv = nn.Conv2d(1, 2, 1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2, 2)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: Any) -> Any:
        x = self.relu(self.conv(self.quant(x)))
        return self.dequant(self.fc(x.mean((2, 3))))


def _quantized_static() -> Any:
    m = _Static().eval()
    m.qconfig = torch.ao.quantization.get_default_qconfig("fbgemm")
    prepared = torch.ao.quantization.prepare(m)
    prepared(torch.randn(2, 1, 4, 4))
    return torch.ao.quantization.convert(prepared)


def _qat_prepared() -> Any:
    m = _Static().train()
    m.qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    return torch.ao.quantization.prepare_qat(m)


def _norm_hooks() -> Any:
    m = nn.Sequential(nn.Linear(3, 3), nn.Conv2d(1, 1, 1))
    nn.utils.spectral_norm(m[0])
    nn.utils.weight_norm(m[1])
    return m


def _optimizer_and_scheduler() -> tuple[Any, Any, Any]:
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    sched.step()
    return model, opt, sched


def _training() -> dict[str, Any]:
    model, opt, sched = _optimizer_and_scheduler()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "epoch": 7,
        "rng_state": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "numpy_generator": np.random.default_rng(0).bit_generator.state,
            "python": random.getstate(),
        },
        "hyper_parameters": {
            "args": argparse.Namespace(lr=0.1, layers=[1, 2], name="run"),
            "out_dir": pathlib.Path("runs/exp1"),
            "started": datetime.datetime(2026, 1, 2, 3, 4, 5),
            "elapsed": datetime.timedelta(hours=1),
            "counts": collections.Counter("aab"),
            "groups": collections.defaultdict(list, {"a": [1]}),
            "ratio": complex(1, 2),
            "blob": b"\x00\x01",
            "tags": {"a", "b"},
            "frozen": frozenset({1}),
            "nan": float("nan"),
            "array": np.arange(6, dtype=np.float32).reshape(2, 3),
            "scalar": np.float64(1.5),
        },
    }


def _extras() -> dict[str, Any]:
    p = nn.Parameter(torch.ones(2))
    p.tag = "kept"  # an attribute on a Parameter: torch pickles it with _rebuild_parameter_with_state
    return {
        "param_with_attr": p,
        "sparse": torch.eye(3).to_sparse(),
        "complex": torch.ones(2, dtype=torch.complex64),
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "f8": torch.zeros(2, dtype=torch.float8_e4m3fn),
        "q": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8),
        "qc": torch.quantize_per_channel(
            torch.ones(2, 2), torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), 0, torch.qint8
        ),
        "meta": torch.empty(2, device="meta"),
        "view": torch.arange(10.0)[2:8:2],
        "size": torch.Size([2, 3]),
        "device": torch.device("cpu"),
        "dtype": torch.float16,
        "layout": torch.strided,
    }


def _whole_optimizer() -> dict[str, Any]:
    _, opt, sched = _optimizer_and_scheduler()
    return {"optimizer": opt, "scheduler": sched}


BENIGN: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
    "whole_model_every_layer": (_AllLayers, {}),
    "whole_model_protocol1": (_AllLayers, {"pickle_protocol": 1}),
    "whole_model_protocol4": (_AllLayers, {"pickle_protocol": 4}),
    "whole_model_protocol5": (_AllLayers, {"pickle_protocol": 5}),
    "state_dict_keep_vars": (lambda: _AllLayers().state_dict(keep_vars=True), {}),
    "quantized_dynamic_model": (_quantized_dynamic, {}),
    "quantized_dynamic_state_dict": (lambda: _quantized_dynamic().state_dict(), {}),
    "quantized_static_model": (_quantized_static, {}),
    "quantized_static_state_dict": (lambda: _quantized_static().state_dict(), {}),
    # A QAT-prepared model cannot be pickled whole (its observers hold local functions): its state dict.
    "qat_prepared_state_dict": (lambda: _qat_prepared().state_dict(), {}),
    "norm_hooks_model": (_norm_hooks, {}),
    "training_checkpoint": (_training, {}),
    "tensor_extras": (_extras, {}),
    "whole_optimizer_and_scheduler": (_whole_optimizer, {}),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("benign")
    torch.manual_seed(0)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (make, kwargs) in BENIGN.items():
            out[name] = folder / f"{name}.pt"
            torch.save(make(), out[name], **kwargs)
    return out


@pytest.mark.parametrize("name", list(BENIGN))
def test_benign_checkpoints_have_no_dangerous_finding(corpus: dict[str, Path], name: str) -> None:
    report = statecli.open_checkpoint(corpus[name])
    dangerous = [f.message for f in report.findings if f.level == "dangerous"]
    assert dangerous == [], dangerous
    result = statecli.check(corpus[name])
    assert result.passed, [r for r in result.rules if not r.passed]


@pytest.mark.parametrize("name", list(BENIGN))
def test_what_weights_only_loads_gets_no_warning(corpus: dict[str, Path], name: str) -> None:
    """torch's weights_only loader is the reference allow list: what it accepts, statecli must not doubt."""
    try:
        torch.load(corpus[name], weights_only=True)
    except Exception:
        pytest.skip("torch.load(weights_only=True) refuses this file too")
    report = statecli.open_checkpoint(corpus[name])
    doubts = [f.message for f in report.findings if f.level in ("dangerous", "warning") and "global" in f.code]
    assert doubts == [], doubts


def test_every_sample_but_the_malicious_one_passes_check(samples_dir: Path) -> None:
    paths = sorted(p for p in samples_dir.iterdir() if p.suffix in (".pt", ".ckpt", ".pt2", ".safetensors"))
    paths += [samples_dir / "dcp_sharded", samples_dir / "dcp_training", samples_dir / "sharded"]
    for p in paths:
        result = statecli.check(p)
        assert result.passed is (p.name != "malicious_os_system.pt"), p


def test_a_model_class_of_the_users_own_is_a_warning_not_a_danger(corpus: dict[str, Path]) -> None:
    """torch.save(model) pickles the model's own class: torch.load imports and runs its package. statecli
    cannot vouch for that code, and does not call it an exploit either."""
    report = statecli.open_checkpoint(corpus["whole_model_every_layer"])
    [own] = [f for f in report.findings if f.code == "unknown-global"]  # F.relu, stored as data, is not one
    assert own.level == "warning" and "_AllLayers" in own.message and "__setstate__" in own.message
    assert not [f for f in report.findings if f.level == "dangerous"]


# ---------------------------------------------------------------------------------- the rules, one by one


def _verdict(data: bytes) -> list[tuple[str, str]]:
    _, u = loads(data)
    return [(f.level, f.code) for f in findings_for(u.globals_seen, u.actions.values())]


def test_a_stdlib_class_made_without_a_call_is_dangerous() -> None:
    # NEWOBJ of a class with a __del__ that acts on its state: no REDUCE at all.
    assert _verdict(b"\x80\x02ctempfile\n_TemporaryFileCloser\n)\x81}b.") == [("dangerous", "dangerous-global")]


def test_a_torch_class_off_the_list_is_dangerous_and_one_on_it_is_information() -> None:
    assert _verdict(b"\x80\x02ctorch.fx.graph_module\nGraphModule\n)\x81}b.") == [("dangerous", "dangerous-global")]
    assert _verdict(b"\x80\x02ctorch.nn.modules.linear\nLinear\n)\x81}b.") == [("info", "global")]


def test_a_call_of_an_allow_listed_callable_is_silent_and_of_any_other_dangerous() -> None:
    assert _verdict(b"\x80\x02cdatetime\ntimedelta\nK\x01\x85R.") == []
    assert _verdict(b"\x80\x02ctorch.nn.modules.linear\nLinear\nK\x01K\x01\x86R.") == [
        ("dangerous", "dangerous-global")
    ]  # a class on the list may be made with NEWOBJ, not called: Linear(1, 1) runs its __init__


def test_a_call_on_a_value_is_dangerous_whatever_the_value() -> None:
    for callee in (b"X\x01\x00\x00\x00s", b"K\x01", b"ccollections\nOrderedDict\n)R"):
        assert ("dangerous", "call-on-value") in _verdict(b"\x80\x02" + callee + b")R."), callee


def test_a_million_calls_on_values_are_one_action() -> None:
    _, u = loads(b"\x80\x02(" + b"X\x01\x00\x00\x00s)R0" * 100_000 + b"1N.")
    [action] = u.actions.values()
    assert action.kind == "call-on-value" and action.count == 100_000


def test_special_attributes_in_a_build_state_are_dangerous() -> None:
    namespace = b"\x80\x02cargparse\nNamespace\n)\x81"
    assert _verdict(namespace + b"}X\x01\x00\x00\x00aK\x01sb.") == [("info", "global")]
    assert ("dangerous", "dangerous-state") in _verdict(namespace + b"}X\x09\x00\x00\x00__class__K\x01sb.")
    # (dict, slots) state, as pickle sets slots with setattr
    assert ("dangerous", "dangerous-state") in _verdict(namespace + b"N}X\x09\x00\x00\x00__class__K\x01s\x86b.")
    # a second BUILD calls what the first may have planted
    assert ("dangerous", "dangerous-state") in _verdict(namespace + b"}bX\x01\x00\x00\x00xb.")


def test_after_a_patch_no_name_is_trusted() -> None:
    # BUILD on torch._utils, then _rebuild_tensor_v2: the name may now be anything.
    data = b"\x80\x02ctorch\n_utils\n}b0ctorch._utils\n_rebuild_tensor_v2\nX\x01\x00\x00\x00x\x85R."
    _, u = loads(data)
    kinds = {(a.kind, a.name) for a in u.actions.values()}
    assert kinds == {("patch", "torch._utils"), ("call", "torch._utils._rebuild_tensor_v2")}
    codes = [(f.level, f.code) for f in findings_for(u.globals_seen, u.actions.values())]
    assert codes == [("dangerous", "build-on-global"), ("dangerous", "dangerous-global")]


def test_a_pickle_that_fails_after_a_dangerous_call_is_refused_as_unsafe() -> None:
    from statecli.errors import UnsafeError

    with pytest.raises(UnsafeError, match=r"would call posix.system\('x'\).*then the pickle fails"):
        loads(b"\x80\x02cposix\nsystem\nX\x01\x00\x00\x00x\x85R\xff")
    # a dangerous name alone, then garbage: nothing ran, so it stays a corrupt file
    from statecli.errors import InputError

    with pytest.raises(InputError):
        loads(b"\x80\x02cposix\nsystem\n\xff")


def test_the_allow_lists_hold_no_way_to_run_code() -> None:
    """A review aid that fails loudly if someone allow-lists a known gadget."""
    bad = {"os", "posix", "nt", "subprocess", "builtins.eval", "builtins.exec", "builtins.getattr", "pydoc", "runpy"}
    bad |= {"torch.utils.collect_env", "torch.fx.graph_module", "torch._utils._import_dotted_name", "pkgutil"}
    for module, name in INERT_CALLABLES | INERT_CLASSES:
        full = f"{module}.{name}"
        assert not any(full == b or full.startswith(b + ".") for b in bad), full


def test_strict_globals_refuses_the_users_own_class_too(samples_dir: Path) -> None:
    import json

    module = str(samples_dir / "cnn_bn_module.pt")
    plain = run_cli("check", module, "--no-policy", "-f", "json")
    assert plain.exit_code == 0  # a warning, by default
    strict = run_cli("check", module, "--no-policy", "--strict-globals", "-f", "json")
    assert strict.exit_code == 5, strict.stdout + strict.stderr
    rule = next(r for r in json.loads(strict.stdout)["rules"] if r["rule"] == "no_unknown_globals")
    assert not rule["passed"] and "sample_nets.SmallCNN" in rule["failures"][0]["message"]
    state_dict = str(samples_dir / "cnn_bn_state_dict.pt")
    assert run_cli("check", state_dict, "--no-policy", "--strict-globals").exit_code == 0


def test_strict_globals_from_a_policy_file(tmp_path: Path, samples_dir: Path) -> None:
    policy = tmp_path / "statecli.toml"
    policy.write_text("[check]\nstrict_globals = true\n")
    result = statecli.check(samples_dir / "cnn_bn_module.pt", policy)
    assert not result.passed
    assert [r.rule for r in result.results if not r.passed] == ["no_unknown_globals"]
