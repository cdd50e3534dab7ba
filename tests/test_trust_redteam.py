"""Red team of the allow-list verdict: the rules that closed its bypasses, and the false alarms it raised.

The bypasses themselves (files whose payload runs under torch.load while statecli said exit 0 or 3) are
hostile cases in tests/hostile/cases_redteam.py, each loaded the unsafe way to prove it runs. Here:

- checkpoints torch writes that statecli called dangerous: a TransformerEncoderLayer with ``gelu`` or
  ``torch.tanh`` (torch pickles them as ``torch._C._nn.gelu`` and ``getattr(torch._C._VariableFunctionsClass,
  'tanh')``), numpy ``Generator``/``RandomState`` objects, ``random.Random``, ``torch.Generator``,
  ``PackedSequence``, ``torch.distributions`` objects; and names only named in configs (numpy scalar types,
  ``nn.init`` functions, ``Ellipsis``) that must stay quiet now that a named function is dangerous;
- each new rule at its boundary.
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

import statecli  # noqa: E402
from statecli.errors import InputError, UnsafeError  # noqa: E402
from statecli.safepickle import Global, Stub  # noqa: E402
from statecli.security import classify, findings_for, loads  # noqa: E402

nn = torch.nn


def _distributions() -> dict[str, Any]:
    d = torch.distributions
    base = d.Normal(torch.zeros(2), torch.ones(2))
    return {
        "normal": base,
        "categorical": d.Categorical(probs=torch.ones(3) / 3),
        "independent": d.Independent(base, 1),
        "log_normal": d.TransformedDistribution(base, [d.transforms.ExpTransform()]),
    }


def _rng_objects() -> dict[str, Any]:
    return {
        "numpy_generator": np.random.default_rng(0),
        "numpy_random_state": np.random.RandomState(0),
        "numpy_bit_generator": np.random.PCG64(1),
        "python_random": random.Random(1),
        "torch_generator": torch.Generator().manual_seed(1),
    }


def _named_in_a_config() -> dict[str, Any]:
    return {
        "dtype": np.float32,
        "int_type": np.int64,
        "init": nn.init.kaiming_normal_,
        "act_layer": nn.GELU,
        "optimizer_class": torch.optim.AdamW,
        "ellipsis": Ellipsis,
    }


FALSE_ALARMS: dict[str, Callable[[], Any]] = {
    "transformer_gelu_whole": lambda: nn.TransformerEncoderLayer(4, 2, 8, activation="gelu"),
    "transformer_torch_tanh_whole": lambda: nn.TransformerEncoderLayer(4, 2, 8, activation=torch.tanh),
    "softplus_stored": lambda: {"activation": nn.functional.softplus, "w": torch.zeros(2)},
    "rng_objects": _rng_objects,
    "packed_sequence": lambda: nn.utils.rnn.pack_padded_sequence(torch.zeros(3, 2, 4), torch.tensor([3, 2])),
    "distributions": _distributions,
    "named_in_a_config": _named_in_a_config,
}


@pytest.fixture(scope="module")
def benign(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("redteam_benign")
    torch.manual_seed(0)
    out = {}
    for name, make in FALSE_ALARMS.items():
        out[name] = folder / f"{name}.pt"
        torch.save(make(), out[name])
    return out


@pytest.mark.parametrize("name", list(FALSE_ALARMS))
def test_checkpoints_torch_writes_are_not_dangerous(benign: dict[str, Path], name: str) -> None:
    report = statecli.open_checkpoint(benign[name])
    dangerous = [f.message for f in report.findings if f.level == "dangerous"]
    assert dangerous == [], dangerous
    assert statecli.check(benign[name]).passed


# ------------------------------------------------------------------------------------- names are calls


def _verdict(data: bytes) -> list[tuple[str, str]]:
    _, u = loads(data)
    return [(f.level, f.code) for f in findings_for(u.globals_seen, u.actions.values())]


@pytest.mark.parametrize(
    ("module", "name", "kind"),
    [
        ("logging.config", "dictConfig", "dangerous"),  # calls any dotted name in its dict
        ("uuid", "_get_command_stdout", "dangerous"),
        ("torch._utils", "_import_dotted_name", "dangerous"),
        ("sympy", "sympify", "dangerous"),  # torch's dependency: installed wherever torch is
        ("jinja2", "Template", "dangerous"),
        ("numpy.random._pcg64", "PCG64", "allowed"),
        ("numpy", "float32", "allowed"),
        ("builtins", "Ellipsis", "allowed"),
        ("torch.nn.init", "xavier_uniform_", "allowed"),
        ("torch._C._nn", "gelu", "allowed"),
        ("torch.nn.modules.activation", "GELU", "info"),
        ("mypkg.layers", "swish", "unknown"),  # the model's own code: a warning, as before
    ],
)
def test_a_name_of_a_strict_namespace_off_the_lists_is_dangerous(module: str, name: str, kind: str) -> None:
    assert classify(module, name) == kind


def test_a_named_function_says_how_it_would_be_called() -> None:
    [f] = [f for f in findings_for({("logging.config", "dictConfig"): 1}, []) if f.level == "dangerous"]
    assert "`append`" in f.message and "logging.config.dictConfig" in f.message


def test_numpy_rng_constructors_are_judged_by_what_they_call() -> None:
    ctor = b"cnumpy.random._pickle\n__bit_generator_ctor\n"
    # As numpy pickles them: a bit generator's name or class, and numpy's own constructor.
    assert (
        _verdict(b"\x80\x02cnumpy.random._pickle\n__randomstate_ctor\nX\x07\x00\x00\x00MT19937" + ctor + b"\x86R.")
        == []
    )
    assert _verdict(b"\x80\x02" + ctor + b"cnumpy.random._pcg64\nPCG64\n\x85R.") == []
    # Any other constructor is called with the name: a call of a user function is a call, not a warning.
    other = b"\x80\x02cnumpy.random._pickle\n__generator_ctor\nX\x01\x00\x00\x00xcmypkg\nf\n\x86R."
    assert ("dangerous", "dangerous-global") in _verdict(other)
    # __bit_generator_ctor calls the class it is given.
    assert ("dangerous", "dangerous-global") in _verdict(b"\x80\x02" + ctor + b"csubprocess\nPopen\n\x85R.")


def test_an_append_stored_on_an_object_is_a_call_of_what_was_stored() -> None:
    # Namespace() with {'append': mypkg.f} set by BUILD, then APPEND 1: pickle calls mypkg.f(1).
    data = b"\x80\x02cargparse\nNamespace\n)\x81}X\x06\x00\x00\x00appendcmypkg\nf\nsbK\x01a."
    _, u = loads(data)
    calls = [a for a in u.actions.values() if a.kind == "call"]
    assert [(a.name, a.example) for a in calls] == [("mypkg.f", "(1)")]
    assert ("dangerous", "dangerous-global") in _verdict(data)
    # Without a stored append (a list-like class of torch's), APPENDS only fills the object.
    assert _verdict(b"\x80\x02ctorch.nn.modules.container\nModuleList\n)\x81(K\x01e.") == [("info", "global")]


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x02csys\nmodules\nX\x01\x00\x00\x00kNs0N.",  # SETITEM: sys.modules['k'] = None
        b"\x80\x02csys\npath\nX\x02\x00\x00\x00/aa0N.",  # APPEND: sys.path.append('/a')
        b"\x80\x04ccopyreg\n_inverted_registry\n(K\x01\x900N.",  # ADDITEMS: its add(1)
    ],
    ids=["setitem", "append", "additems"],
)
def test_changing_a_global_in_place_is_dangerous_and_taints_later_names(data: bytes) -> None:
    _, u = loads(data)
    assert [a.kind for a in u.actions.values()] == ["mutate"]
    assert u.tainted
    codes = _verdict(data)
    assert ("dangerous", "mutate-global") in codes


def test_after_a_mutation_torch_names_are_not_trusted() -> None:
    data = b"\x80\x02csys\nmodules\nX\x01\x00\x00\x00kNs0ctorch._utils\n_rebuild_tensor_v2\nN\x85R."
    _, u = loads(data)
    assert ("call", "torch._utils._rebuild_tensor_v2") in {(a.kind, a.name) for a in u.actions.values()}


def test_a_failing_pickle_that_made_something_is_judged_by_its_names_too() -> None:
    # Namespace() made, logging.config.dictConfig named, then the pickle breaks: a stored function may have run.
    with pytest.raises(UnsafeError, match=r"logging\.config\.dictConfig"):
        loads(b"\x80\x02cargparse\nNamespace\n)\x81clogging.config\ndictConfig\n\xff")
    # The same name with nothing made stays a corrupt file.
    with pytest.raises(InputError) as info:
        loads(b"\x80\x02clogging.config\ndictConfig\n\xff")
    assert not isinstance(info.value, UnsafeError)


def test_torch_functions_pickled_through_getattr_are_names() -> None:
    tanh = pickle.dumps(torch.tanh, protocol=2)
    obj, u = loads(tanh)
    assert isinstance(obj, Global) and obj.qualname == "torch.tanh"
    assert findings_for(u.globals_seen, u.actions.values()) == []
    # Any other getattr is a call of getattr.
    for attr in (b"load", b"_import_dotted_name"):
        data = b"\x80\x02c__builtin__\ngetattr\nctorch._C\n_VariableFunctionsClass\nX%c\x00\x00\x00%s\x86R." % (
            len(attr),
            attr,
        )
        obj, _ = loads(data)
        assert isinstance(obj, Stub)
        assert ("dangerous", "dangerous-global") in _verdict(data)


# ---------------------------------------------------------------------------- files statecli does not read


def test_a_plain_pickle_without_a_payload_is_still_just_unsupported(tmp_path: Path) -> None:
    p = tmp_path / "model.pt"
    p.write_bytes(pickle.dumps({"a": [1, 2]}, protocol=2))
    with pytest.raises(InputError, match="plain pickle") as info:
        statecli.open_checkpoint(p)
    assert not isinstance(info.value, UnsafeError)


def test_a_legacy_tar_without_a_payload_is_still_just_unsupported(tmp_path: Path) -> None:
    import io
    import tarfile

    p = tmp_path / "model.pt"
    with tarfile.open(p, "w") as t:
        for name, data in [("storages", pickle.dumps(0) + pickle.dumps([])), ("tensors", pickle.dumps(0))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with pytest.raises(InputError, match="tar format") as info:
        statecli.open_checkpoint(p)
    assert not isinstance(info.value, UnsafeError)


def test_a_refused_zip_is_judged_by_every_data_pkl_torch_could_read(tmp_path: Path) -> None:
    import zipfile

    from make_hostile import _info, state_dict

    benign = state_dict(("w", lambda a: a.tensor()))
    p = tmp_path / "model.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr(_info("archive/Data.pkl"), benign)
        z.writestr(_info("archive/data.pkl"), benign)
        z.writestr(_info("archive/data/0"), bytes(16))
    with pytest.raises(InputError, match="without regard to case") as info:
        statecli.open_checkpoint(p)
    assert not isinstance(info.value, UnsafeError)  # both are benign: the structural refusal stands


# ------------------------------------------------------------------ where statecli stops and pickle goes on


def test_names_after_follows_the_strings_stack_global_takes() -> None:
    from statecli.safepickle import COMPUTED, names_after

    # memoized, fetched back, with a decoy popped in between: os.system, not collections.OrderedDict
    data = b"\x80\x04\x8c\x02os\x94\x8c\x0bcollections\x8c\x06system\x94000h\x00h\x01\x93)R."
    assert names_after(data, 0, 0) == ({("os", "system"): 1}, True)
    # operands that are no literal strings: a name computed at load time
    assert names_after(b"\x80\x04N\x8c\x01x\x93.", 0, 0) == ({(COMPUTED, "<unknown>"): 1}, False)
    # protocol 2 names are mapped as pickle maps them; names before ``stop`` are not counted
    data = b"\x80\x02c__builtin__\neval\nccollections\nOrderedDict\n."
    assert names_after(data, 0, 0)[0] == {("builtins", "eval"): 1, ("collections", "OrderedDict"): 1}
    assert names_after(data, 0, data.index(b"ccollections"))[0] == {("collections", "OrderedDict"): 1}


def test_a_pickle_over_a_limit_is_judged_by_what_it_names_after_it() -> None:
    from statecli.errors import LimitExceededError
    from statecli.safepickle import Limits

    big_int = b"\x8b" + (2000).to_bytes(4, "little") + b"\x01" * 2000 + b"0"
    with pytest.raises(UnsafeError, match=r"stopped reading.*os\.system"):
        loads(b"\x80\x02" + big_int + b"cos\nsystem\nX\x01\x00\x00\x00x\x85R.")
    # A benign rest stays a file over a limit (exit 3).
    with pytest.raises(LimitExceededError):
        loads(b"\x80\x02" + big_int + b"ccollections\nOrderedDict\n)R.")
    # Over the opcode limit before anything is read: all of it is judged.
    with pytest.raises(UnsafeError, match=r"os\.system"):
        loads(b"\x80\x02cos\nsystem\nX\x01\x00\x00\x00x\x85R.", limits=Limits(max_ops=10))
    # A name alone past the failure, with nothing that could call it, is no danger.
    with pytest.raises(LimitExceededError):
        loads(b"\x80\x02" + big_int + b"cos\nsystem\n.")


def test_a_torchbind_object_is_judged_by_the_class_its_state_names() -> None:
    def script_object(qualname: bytes) -> bytes:
        name = b"X" + len(qualname).to_bytes(4, "little") + qualname
        return b"\x80\x02ctorch\nScriptObject\n)\x81N" + name + b"\x86b."

    assert _verdict(script_object(b"__torch__.torch.classes.quantized.LinearPackedParamsBase")) == [("info", "global")]
    codes = _verdict(script_object(b"__torch__.torch.classes.aten.OpaqueObject"))
    assert ("dangerous", "dangerous-global") in codes
