"""TorchScript archives (``torch.jit.save``): torch is the oracle, statecli never runs TorchScript.

What statecli reads from a sample must equal what ``torch.jit.load`` rebuilds (names, dtypes, shapes,
strides, offsets, devices, requires_grad, parameter / buffer / attribute roles, training flags). Hostile
and corrupt variants are made from the samples by rewriting single zip members.
"""

from __future__ import annotations

import json
import pickletools
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from clirun import NO_COLOR, run_cli
from torch_facts import facts, statecli_facts, tensors_of
from zip_members import member, rewrite

import statecli
from statecli.formats.torchscript import parse_declarations

SAMPLES = ("torchscript_cnn.pt", "torchscript_frozen.pt", "torchscript_freeze_constants.pt")
MODULE_SAMPLES = ("torchscript_cnn.pt", "torchscript_frozen.pt")


# ----------------------------------------------------------------------------------------------- helpers


def jit_load(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu")


def oracle(module: torch.jit.ScriptModule) -> dict[str, Any]:
    """Parameters, buffers, tensor attributes and training flags as TorchScript itself lists them."""
    it = torch._C._jit_debug_module_iterators(module._c)
    params = dict(it["named_parameters_r"])
    buffers = dict(it["named_buffers_r"])
    attrs = dict(it["named_attributes_r"])
    others = {n: v for n, v in attrs.items() if isinstance(v, torch.Tensor) and n not in params and n not in buffers}
    training = {
        n.removesuffix("training").removesuffix("."): v for n, v in attrs.items() if n.rpartition(".")[2] == "training"
    }
    return {"params": params, "buffers": buffers, "others": others, "training": training}


def inspect_json(path: Path) -> tuple[int, dict[str, Any] | None, str]:
    result = run_cli("inspect", str(path), "--format", "json", env=NO_COLOR)
    data = json.loads(result.stdout) if result.exit_code == 0 else None
    return result.exit_code, data, result.stderr


def insert_into_root_state(pkl: bytes, ops: bytes) -> bytes:
    """``ops`` (key, value opcodes) spliced into the root object's attribute dict, right after its MARK."""
    seen_dict = False
    for op, _, pos in pickletools.genops(pkl):
        if op.name == "EMPTY_DICT":
            seen_dict = True
        elif seen_dict and op.name == "MARK":
            return pkl[: pos + 1] + ops + pkl[pos + 1 :]
    raise AssertionError("no attribute dict in data.pkl")


def unicode_op(s: str) -> bytes:
    b = s.encode()
    return b"X" + len(b).to_bytes(4, "little") + b


# ------------------------------------------------------------------------------------------- the samples


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_is_a_small_torchscript_archive(samples_dir: Path, name: str) -> None:
    path = samples_dir / name
    assert path.stat().st_size < 200 * 1024
    report = statecli.open_checkpoint(path)
    assert report.format == "torchscript"
    assert report.container.kind == "module"
    # torch itself refuses these under weights_only=True; statecli reads them without any unsafe fallback.
    with pytest.raises(RuntimeError, match="weights_only"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.load(path, weights_only=True)


@pytest.mark.parametrize("name", MODULE_SAMPLES)
def test_roles_and_facts_match_torch_jit_load(samples_dir: Path, name: str) -> None:
    module = jit_load(samples_dir / name)
    want = oracle(module)
    report = statecli.open_checkpoint(samples_dir / name)
    got = tensors_of(report)
    assert set(got) == set(want["params"]) | set(want["buffers"]) | set(want["others"])
    for role, table in (("parameter", want["params"]), ("buffer", want["buffers"]), ("other", want["others"])):
        for n, t in table.items():
            info = got[n]
            assert (info.role, info.exact, info.evidence) == (role, True, "torchscript"), n
            assert statecli_facts(info) == facts(t), n
            assert info.requires_grad is t.requires_grad, n
            assert info.group == "model", n
            assert info.persistent is (True if role != "other" else None), n
    assert report.container.module_class == module._c._type().qualified_name()
    assert report.container.training is module.training
    mixed = [f for f in report.findings if f.code == "training-mixed"]
    odd = sorted(n for n, v in want["training"].items() if n and v is not module.training)
    assert bool(mixed) == bool(odd)
    for n in odd:
        assert n in mixed[0].message


def test_frozen_sample_is_what_it_claims(samples_dir: Path) -> None:
    got = tensors_of(statecli.open_checkpoint(samples_dir / "torchscript_frozen.pt"))
    for n in ("backbone.0.weight", "backbone.0.bias"):
        assert (got[n].role, got[n].requires_grad) == ("parameter", False), n
    for n in ("norm.weight", "norm.bias", "head.weight", "head.bias"):
        assert (got[n].role, got[n].requires_grad) == ("parameter", True), n
    # ``cache`` was registered persistent=False; TorchScript drops the flag and torch.jit.load keeps it.
    assert (got["cache"].role, got["cache"].persistent) == ("buffer", True)
    assert "cache" in jit_load(samples_dir / "torchscript_frozen.pt").state_dict()
    assert (got["anchor"].role, got["anchor"].persistent) == ("other", None)
    codes = {f.code for f in statecli.open_checkpoint(samples_dir / "torchscript_frozen.pt").findings}
    assert {"torchscript-persistence", "torchscript-types", "training-mixed"} <= codes
    assert not any(c in codes for c in ("unknown-global", "dangerous-global"))


def test_cnn_buffers(samples_dir: Path) -> None:
    got = tensors_of(statecli.open_checkpoint(samples_dir / "torchscript_cnn.pt"))
    assert sum(t.role == "parameter" for t in got.values()) == 10
    assert sum(t.role == "buffer" for t in got.values()) == 6
    assert (got["bn1.num_batches_tracked"].dtype, got["bn1.num_batches_tracked"].shape) == ("int64", ())
    assert [t.storage for t in got.values()] == [f"data/{i}" for i in range(16)]


def test_freeze_constants_match_the_frozen_graph(samples_dir: Path) -> None:
    path = samples_dir / "torchscript_freeze_constants.pt"
    module = jit_load(path)
    assert not list(module.parameters()) and not list(module.buffers())
    graph_constants = [
        n.t("value")
        for n in module.graph.nodes()
        if n.kind() == "prim::Constant" and n.hasAttribute("value") and n.kindOf("value") == "t"
    ]
    report = statecli.open_checkpoint(path)
    got = tensors_of(report)
    assert list(got) == [f"CONSTANTS.c{i}" for i in range(len(got))]
    assert Counter(statecli_facts(t)[:2] for t in got.values()) == Counter(facts(t)[:2] for t in graph_constants)
    for n in got:
        assert f"CONSTANTS.{n.rpartition('.')[2]}" in module.code, n
        assert (got[n].role, got[n].exact, got[n].evidence, got[n].group) == ("other", True, "torchscript", "constants")
        assert got[n].storage == f"constants/{n.removeprefix('CONSTANTS.c')}"
    assert report.container.other_keys == ("CONSTANTS",)


@pytest.mark.parametrize("name", SAMPLES)
def test_cli_inspect_json(samples_dir: Path, name: str) -> None:
    code, data, _ = inspect_json(samples_dir / name)
    assert code == 0
    assert data is not None and data["format"] == "torchscript"
    assert data["tensors"] and all(t["exact"] for t in data["tensors"])
    assert {t["evidence"] for t in data["tensors"]} == {"torchscript"}


def test_tree_and_check_run(samples_dir: Path) -> None:
    assert run_cli("tree", str(samples_dir / "torchscript_frozen.pt")).exit_code == 0
    for name in SAMPLES:
        result = run_cli("check", str(samples_dir / name), "--require-exact-roles", "--no-policy")
        assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------- a module with odd attributes


class _Odd(torch.nn.Module):
    # Attribute types are inferred by TorchScript: List[int], List[Tensor], Dict[str, Tensor].
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2, bias=False)  # an Optional parameter that is None
        self.tie = self.lin  # the same submodule twice
        self.ints = [1, 2, 3]
        self.tl = [torch.ones(1), torch.zeros(2)]
        self.td = {"a": torch.ones(3)}
        self.ml = torch.nn.ModuleList([torch.nn.Linear(1, 1), torch.nn.BatchNorm1d(2)])
        self.pl = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(2))])
        self.register_buffer("opt", None)
        self.w2 = self.lin.weight  # one tensor as a root parameter and as lin.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.tl[0] + self.td["a"].sum() + self.w2.sum()


@pytest.fixture(scope="module")
def odd_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ts") / "odd.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script / save are deprecated in 2.13
        torch.jit.save(torch.jit.script(_Odd()), str(path))
    return path


def test_odd_attributes(odd_archive: Path) -> None:
    module = jit_load(odd_archive)
    want = oracle(module)
    report = statecli.open_checkpoint(odd_archive)
    got = tensors_of(report)
    assert {n for n, t in got.items() if t.role == "parameter"} == set(want["params"])
    assert {n for n, t in got.items() if t.role == "buffer"} == set(want["buffers"])
    # Tensors inside list / dict attributes: neither parameters nor buffers, named by their path.
    for n in ("tl.0", "tl.1", "td.a"):
        assert (got[n].role, got[n].exact, got[n].group) == ("other", True, "model"), n
    assert set(got) == set(want["params"]) | set(want["buffers"]) | {"tl.0", "tl.1", "td.a"}
    assert set(got["w2"].shares_with) == {"lin.weight", "tie.weight"}
    assert set(module.state_dict()) <= set(got)
    for n, t in module.state_dict().items():
        assert statecli_facts(got[n]) == facts(t), n
    assert report.container.training is True
    assert not [f for f in report.findings if f.level != "info"], report.findings


class _StateIsATensor(torch.nn.Module):
    """A module whose __getstate__ returns a bare tensor: its pickled state is that tensor, with no key."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.ones(2)

    @torch.jit.export
    def __getstate__(self) -> torch.Tensor:
        return self.w

    @torch.jit.export
    def __setstate__(self, state: torch.Tensor) -> None:
        self.w = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def test_a_root_state_that_is_a_bare_tensor_is_named_tensor(tmp_path: Path) -> None:
    """Named as a bare tensor torch.save'd is, never '(root)': that is a label, and a key can be '(root)'."""
    path = tmp_path / "state_tensor.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_StateIsATensor()), str(path))
    report = statecli.open_checkpoint(path)
    assert [(t.name, t.role, t.shape) for t in report.tensors] == [("tensor", "other", (2,))]


# ------------------------------------------------------------------------------ hostile and corrupt files


def test_os_system_in_data_pkl_is_a_finding_and_nothing_runs(
    samples_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = samples_dir / "torchscript_frozen.pt"
    payload = unicode_op("payload") + b"cos\nsystem\n" + unicode_op("touch statecli_pwned_marker") + b"\x85R"
    evil = rewrite(src, tmp_path / "evil.pt", {"data.pkl": insert_into_root_state(member(src, "data.pkl"), payload)})
    monkeypatch.chdir(tmp_path)
    code, data, stderr = inspect_json(evil)
    assert code == 0
    assert data is not None
    dangerous = [f for f in data["findings"] if f["level"] == "dangerous"]
    assert dangerous and "os.system" in dangerous[0]["message"] and "touch" in dangerous[0]["message"]
    assert "system" in stderr
    assert not (tmp_path / "statecli_pwned_marker").exists()
    # The model's tensors are still listed, with their exact roles.
    names = {t["name"]: t for t in data["tensors"]}
    assert names["backbone.0.weight"]["role"] == "parameter" and names["backbone.0.weight"]["exact"]
    check = run_cli("check", str(evil))
    assert check.exit_code != 0
    assert not (tmp_path / "statecli_pwned_marker").exists()


def test_a_bare_os_system_pickle_is_refused_naming_the_call(samples_dir: Path, tmp_path: Path) -> None:
    pkl = b"\x80\x02cos\nsystem\n" + unicode_op("touch statecli_pwned_marker") + b"\x85R."
    evil = rewrite(samples_dir / "torchscript_frozen.pt", tmp_path / "evil.pt", {"data.pkl": pkl})
    code, _, stderr = inspect_json(evil)
    assert code == 5  # not a module, and a pickle that would run a command: refused as unsafe
    assert "not hold a TorchScript module" in stderr and "would call os.system('touch" in stderr
    assert not (tmp_path / "statecli_pwned_marker").exists() and not Path("statecli_pwned_marker").exists()


def test_unknown_class_global_is_a_warning(samples_dir: Path, tmp_path: Path) -> None:
    src = samples_dir / "torchscript_frozen.pt"
    payload = unicode_op("thing") + b"cmypkg.evil\nThing\n)\x81"
    bad = rewrite(src, tmp_path / "unknown.pt", {"data.pkl": insert_into_root_state(member(src, "data.pkl"), payload)})
    report = statecli.open_checkpoint(bad)
    assert any(f.code == "unknown-global" and "mypkg.evil.Thing" in f.message for f in report.findings)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"data/3": None}, "data/3"),
        ({"data/3": b"\x00" * 4}, "claims"),
        ({"data.pkl": b"\x80\x02}q\x00."}, "does not hold a TorchScript module"),
        ({"data.pkl": b"\x80\x02(((((("}, "pickle"),
        ({"code/__torch__/sample_nets.py": None}, "no file in code/ declares"),
        ({"code/__torch__/sample_nets.py": b'class FrozenNet(Module):\n  __parameters__ = ["a", \n'}, "attribute"),
    ],
)
def test_corrupt_archives_exit_3(
    samples_dir: Path, tmp_path: Path, change: dict[str, bytes | None], words: str
) -> None:
    bad = rewrite(samples_dir / "torchscript_frozen.pt", tmp_path / "bad.pt", change)
    code, _, stderr = inspect_json(bad)
    assert code == 3, stderr
    assert words in stderr
    assert "Traceback" not in stderr


def test_missing_constant_storage_exits_3(samples_dir: Path, tmp_path: Path) -> None:
    bad = rewrite(samples_dir / "torchscript_freeze_constants.pt", tmp_path / "bad.pt", {"constants/2": None})
    code, _, stderr = inspect_json(bad)
    assert code == 3
    assert "constants.pkl" in stderr and "constants/2" in stderr


def test_truncated_archive_exits_3(samples_dir: Path, tmp_path: Path) -> None:
    data = (samples_dir / "torchscript_cnn.pt").read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    code, _, stderr = inspect_json(bad)
    assert code == 3
    assert "zip" in stderr


def test_undeclared_submodule_class_means_inferred_roles(samples_dir: Path, tmp_path: Path) -> None:
    bad = rewrite(
        samples_dir / "torchscript_frozen.pt",
        tmp_path / "undeclared.pt",
        {"code/__torch__/torch/nn/modules/normalization.py": None},
    )
    report = statecli.open_checkpoint(bad)
    got = tensors_of(report)
    assert any(f.code == "torchscript-undeclared" and "LayerNorm" in f.message for f in report.findings)
    assert not got["norm.weight"].exact and got["norm.weight"].evidence == "default"
    assert (got["head.weight"].role, got["head.weight"].exact) == ("parameter", True)


# ------------------------------------------------------------------------------ declaration parsing


def test_parse_declarations() -> None:
    text = (
        "class A(Module):\n"
        '  __parameters__ = ["weight", "bias", ]\n'
        '  __buffers__ = ["running_mean", ]\n'
        "  weight : Tensor\n"
        "  def forward(self: __torch__.A) -> None:\n"
        '    __parameters__ = ["not", "this", ]\n'  # inside a method: not a declaration
        "class B(Module):\n"
        "  __parameters__ = []\n"
        "  __buffers__ = []\n"
        "def helper(x: int) -> int:\n"
        '  __buffers__ = ["ignored", ]\n'
        "class C:\n"
        "  x : int\n"
        'class D(Module):\n  __parameters__ = ["we\\"ird", "caf\\303\\251", "\\x41", ]\n  __buffers__ = []\n'
        "class E:\n  t : Tensor\n  def __setstate__(self: __torch__.E,\n    state: Tensor) -> NoneType:\n"
    )
    with pytest.raises(ValueError, match="twice"):
        parse_declarations('class A(Module):\n  __buffers__ = []\n  __buffers__ = ["again", ]\n', "__torch__")
    with pytest.raises(ValueError, match="declared twice"):
        parse_declarations(text + "class A(Module):\n  __parameters__ = []\n", "__torch__")
    decls = parse_declarations(text, "__torch__.m")
    assert decls["A"].parameters == {"weight", "bias"} and decls["A"].buffers == {"running_mean"}
    assert decls["A"].qualname == "__torch__.m.A"
    assert decls["B"].is_module and decls["B"].parameters == frozenset()
    assert not decls["C"].is_module and decls["C"].parameters is None
    assert decls["D"].parameters == {'we"ird', "café", "A"}
    assert "helper" not in decls
    assert decls["E"].setstate and not decls["E"].is_module
    assert not any(decls[c].setstate for c in "ABCD")


@pytest.mark.parametrize(
    "line",
    [
        '  __parameters__ = ["a" "b", ]',
        '  __parameters__ = ["a", b]',
        '  __parameters__ = ["a',
        "  __parameters__ = [1, ]",
    ],
)
def test_parse_declarations_refuses_what_it_cannot_read(line: str) -> None:
    with pytest.raises(ValueError):
        parse_declarations(f"class A(Module):\n{line}\n", "__torch__")


def test_parse_declarations_is_linear_on_a_huge_line() -> None:
    names = [f"p{i}" for i in range(200_000)]
    line = "  __parameters__ = [" + ", ".join(f'"{n}"' for n in names) + ", ]"
    decls = parse_declarations(f"class A(Module):\n{line}\n  __buffers__ = []\n", "__torch__")
    assert len(decls["A"].parameters or ()) == len(names)


def test_names_differing_only_in_case_are_refused(samples_dir: Path, tmp_path: Path) -> None:
    # torch's zip reader matches record names without regard to case: the twin could be what torch reads.
    src = samples_dir / "torchscript_frozen.pt"
    bad = rewrite(
        src, tmp_path / "twins.pt", {"CODE/__TORCH__/SAMPLE_NETS.PY": member(src, "code/__torch__/sample_nets.py")}
    )
    code, _, stderr = inspect_json(bad)
    assert code == 3 and "without regard to case" in stderr
