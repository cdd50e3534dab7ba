"""``statecli convert SRC.pt -o OUT.pt`` converts the WHOLE object graph (issue #13 item 1), with torch as
the oracle.

For each trusted checkpoint of tests/graph_fixtures.py (a training dict, a Lightning ``.ckpt``, a whole
pickled module, a keep_vars state dict, a tied LM alone and beside its optimizer) and each set of options,
the expected object is ``torch.load(src, map_location=device)`` with :func:`reference_cast` applied (the
rules of docs/convert.md, written here independently of statecli), and the actual one is
``torch.load(out)`` with no ``map_location``. :func:`assert_graph_equal` compares them deeply: exact types,
keys in order, ``_metadata`` and other attributes, non-tensor values, object identity (memo references),
tensor dtype/shape/stride/offset/device/values/requires_grad, and which tensors share a storage.

The comparator is proved first: it accepts torch's own save of the reference cast and rejects each
mutation of it (a dropped key, a reordered dict, a wrong dtype, ...). These files are made by the tests
themselves, so ``weights_only=False`` is allowed on them; never on sample_models/malicious_os_system.pt,
whose output is only scanned with ``pickletools.genops``.
"""

from __future__ import annotations

import copy
import os
import pickle
import pickletools
import shutil
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import graph_fixtures
import pytest
import torch
from clirun import run_cli
from torch import nn

import statecli

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
MALICIOUS = SAMPLES / "malicious_os_system.pt"
MARKER = "statecli_pwned_marker"  # what the malicious sample's os.system call would create in its cwd

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
COMPLEX_OF = {torch.float16: torch.complex32, torch.float32: torch.complex64, torch.float64: torch.complex128}
BN_BUFFERS = frozenset({"running_mean", "running_var", "num_batches_tracked"})


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def load_trusted(path: Path, **kw: Any) -> Any:
    """torch.load of a file a test made itself (never the malicious sample or its output)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, **kw)


# ----------------------------------------------------------------------------------------------- the reference


@dataclass(frozen=True)
class Options:
    """One way to call convert: the CLI arguments and what the reference does with them."""

    args: tuple[str, ...] = ()
    dtype: str | None = None
    device: str | None = None  # also: the source is saved with cuda:0 locations
    keep_buffers: bool = False
    keep_optimizer_dtype: bool = False

    @property
    def cuda_source(self) -> bool:
        return self.device is not None


OPTIONS = {
    "copy": Options(),
    "device_cpu": Options(("--device", "cpu"), device="cpu"),
    "device_cpu_bf16": Options(("--device", "cpu", "--dtype", "bf16"), dtype="bf16", device="cpu"),
    "bf16": Options(("--dtype", "bf16"), dtype="bf16"),
    "fp16_keep_buffers": Options(("--dtype", "fp16", "--keep-buffers"), dtype="fp16", keep_buffers=True),
    "bf16_keep_optimizer_dtype": Options(
        ("--dtype", "bf16", "--keep-optimizer-dtype"), dtype="bf16", keep_optimizer_dtype=True
    ),
}


@dataclass(frozen=True)
class _Place:
    key: object = None  # the key or attribute name the value sits under
    optimizer: bool = False  # inside an optimizer's "state"
    buffers: bool = False  # inside a module's _buffers


def _is_optimizer_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and "state" in obj and "param_groups" in obj


def _children(obj: object, place: _Place) -> Iterator[tuple[object, _Place]]:
    """The values inside ``obj`` (containers, module and custom-object attributes) with where they sit."""
    if isinstance(obj, (torch.Tensor, str, bytes, int, float, bool, type(None), type)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            optimizer = place.optimizer or (_is_optimizer_state_dict(obj) and k == "state")
            yield v, _Place(k, optimizer, place.buffers)
    elif type(obj) in (list, tuple):
        for v in obj:  # type: ignore[attr-defined]
            yield v, _Place(place.key, place.optimizer, place.buffers)
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict):
        for k, v in attrs.items():
            yield v, _Place(k, place.optimizer, place.buffers or (isinstance(obj, nn.Module) and k == "_buffers"))


def _target(t: torch.Tensor, place: _Place, opts: Options) -> torch.dtype | None:
    """The dtype the rules give ``t``, or None when it keeps its own."""
    if opts.dtype is None or t.is_quantized or not (t.is_floating_point() or t.is_complex()):
        return None
    if place.optimizer:
        if place.key == "step" or opts.keep_optimizer_dtype:
            return None  # Optimizer.load_state_dict keeps step; --keep-optimizer-dtype keeps it all
    else:
        leaf = place.key.rsplit(".", 1)[-1] if isinstance(place.key, str) else None
        if opts.keep_buffers and (place.buffers or leaf in BN_BUFFERS):
            return None
    target = DTYPES[opts.dtype]
    if t.is_complex():
        return COMPLEX_OF[target]  # KeyError for bf16: such a fixture has no place in this oracle
    return target if t.dtype != target else None


def reference_cast(obj: Any, opts: Options) -> Any:
    """Apply the dtype rules to every tensor of ``obj`` in place (torch as the engine), keeping which
    tensors share a storage, their strides and offsets, Parameter-ness and requires_grad. Returns ``obj``."""
    decided: dict[int, tuple[torch.Tensor, torch.dtype | None]] = {}
    seen: set[int] = set()
    stack: list[tuple[object, _Place]] = [(obj, _Place())]
    while stack:
        value, place = stack.pop()
        if isinstance(value, torch.Tensor):
            target = _target(value, place, opts)
            if id(value) in decided and decided[id(value)][1] != target:
                raise AssertionError(f"one tensor under two rules: {place}")
            decided[id(value)] = (value, target)
            continue
        if id(value) in seen:
            continue
        seen.add(id(value))
        stack.extend(_children(value, place))

    groups: dict[object, list[tuple[torch.Tensor, torch.dtype | None]]] = {}
    for t, target in decided.values():
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr()) if storage.nbytes() else ("empty", id(t))
        groups.setdefault(key, []).append((t, target))
    replacement: dict[int, torch.Tensor] = {}
    for members in groups.values():
        targets = {target for _, target in members}
        dtypes = {t.dtype for t, _ in members}
        if len(targets) != 1 or len(dtypes) != 1:
            raise AssertionError("tensors sharing one storage under different rules: the oracle has no answer")
        (target,) = targets
        if target is None:
            continue
        first = members[0][0]
        storage = first.untyped_storage()
        whole = torch.empty(0, dtype=first.dtype, device=first.device)
        whole.set_(storage, 0, (storage.nbytes() // first.element_size(),), (1,))
        cast = whole.to(target)  # the whole storage once: views of it stay views of the new one
        for t, _ in members:
            new = cast.as_strided(t.size(), t.stride(), t.storage_offset())
            if type(t) is nn.Parameter:
                new = nn.Parameter(new, requires_grad=t.requires_grad)
            elif type(t) is torch.Tensor:
                new.requires_grad_(t.requires_grad)
            else:
                raise AssertionError(f"no reference for tensor subclass {type(t).__name__}")
            new.__dict__.update(t.__dict__)
            replacement[id(t)] = new

    done: dict[int, object] = {}

    def replace(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return replacement.get(id(value), value)
        if id(value) in done:
            return done[id(value)]
        done[id(value)] = value
        if isinstance(value, dict):
            for k in list(value):
                value[k] = replace(value[k])
        elif type(value) is list:
            value[:] = [replace(v) for v in value]
        elif type(value) is tuple:
            items = tuple(replace(v) for v in value)
            if any(a is not b for a, b in zip(items, value, strict=True)):
                done[id(value)] = items
                return items
        attrs = getattr(value, "__dict__", None)
        if isinstance(attrs, dict) and not isinstance(value, type):
            for k in list(attrs):
                attrs[k] = replace(attrs[k])
        return value

    return replace(obj)


# ----------------------------------------------------------------------------------------------- the comparator


_ATOMS = (str, bytes, int, float, bool, type(None), complex)
_TORCH_VALUES = (torch.dtype, torch.device, torch.Size, torch.memory_format, torch.layout)


class _Comparator:
    def __init__(self) -> None:
        self.first_a: dict[int, str] = {}
        self.first_b: dict[int, str] = {}
        self.tensors: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def fail(self, path: str, why: str) -> None:
        raise AssertionError(f"{path}: {why}")

    def compare(self, a: Any, b: Any, path: str) -> None:
        if type(a) is not type(b):
            self.fail(path, f"type {type(a).__qualname__} != {type(b).__qualname__}")
        if isinstance(a, _ATOMS):
            same = repr(a) == repr(b) if isinstance(a, (float, complex)) else a == b  # NaN and -0.0 aware
            if not same:
                self.fail(path, f"{a!r} != {b!r}")
            return
        if isinstance(a, (*_TORCH_VALUES, type)):
            if a != b:
                self.fail(path, f"{a!r} != {b!r}")
            return
        # Object identity: the same object in two places (a memo reference) on one side only is a difference.
        if not (type(a) is tuple and len(a) == 0):
            pa = self.first_a.setdefault(id(a), path)
            pb = self.first_b.setdefault(id(b), path)
            if pa != pb:
                self.fail(path, f"identity differs: actual is the object at {pa}, expected the one at {pb}")
            if pa != path:
                return  # compared where first seen
        if isinstance(a, torch.Tensor):
            self.compare_tensor(a, b, path)
        elif isinstance(a, dict):
            ka, kb = [(type(k), k) for k in a], [(type(k), k) for k in b]
            if ka != kb:
                self.fail(path, f"keys {list(a)} != {list(b)}")
            for k in a:
                self.compare(a[k], b[k], f"{path}[{k!r}]")
        elif isinstance(a, (list, tuple)):
            if len(a) != len(b):
                self.fail(path, f"length {len(a)} != {len(b)}")
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                self.compare(x, y, f"{path}[{i}]")
        elif isinstance(a, (set, frozenset)):
            if a != b:
                self.fail(path, f"{a!r} != {b!r}")
        elif not hasattr(a, "__dict__"):
            self.fail(path, f"the comparator does not know {type(a).__qualname__}")
        self.compare_attributes(a, b, path)

    def compare_attributes(self, a: Any, b: Any, path: str) -> None:
        """Instance attributes: an OrderedDict's _metadata, a module's _parameters, a custom object's state."""
        da, db = getattr(a, "__dict__", None), getattr(b, "__dict__", None)
        if (da is None) != (db is None):
            self.fail(path, "attributes on one side only")
        if da is None:
            return
        if list(da) != list(db):
            self.fail(path, f"attributes {list(da)} != {list(db)}")
        for k in da:
            self.compare(da[k], db[k], f"{path}.{k}")

    def compare_tensor(self, a: torch.Tensor, b: torch.Tensor, path: str) -> None:
        for what in ("dtype", "shape", "device", "requires_grad", "is_quantized", "layout"):
            if getattr(a, what) != getattr(b, what):
                self.fail(path, f"{what} {getattr(a, what)} != {getattr(b, what)}")
        if a.stride() != b.stride() or a.storage_offset() != b.storage_offset():
            self.fail(path, f"layout {a.stride()}+{a.storage_offset()} != {b.stride()}+{b.storage_offset()}")
        if a.device.type != "meta" and not _same_values(a, b):
            self.fail(path, "values differ")
        self.tensors.append((path, a, b))

    def check_sharing(self) -> None:
        """The partition of tensors by storage must be the same on both sides."""

        def partition(side: int) -> dict[str, str]:
            first: dict[object, str] = {}
            out = {}
            for path, *pair in self.tensors:
                t = pair[side]
                storage = t.untyped_storage()
                key = (t.device, storage.data_ptr()) if storage.nbytes() and t.device.type != "meta" else path
                out[path] = first.setdefault(key, path)
            return out

        pa, pb = partition(0), partition(1)
        for path in pa:
            if pa[path] != pb[path]:
                self.fail(path, f"storage sharing differs: actual shares with {pa[path]}, expected with {pb[path]}")


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach(), b.detach()
    if torch.equal(a, b):
        return True
    if not (a.is_floating_point() or a.is_complex()):
        return False
    if a.is_complex():
        a, b = torch.view_as_real(a.to(torch.complex64)), torch.view_as_real(b.to(torch.complex64))
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])


def assert_graph_equal(actual: Any, expected: Any) -> None:
    comparator = _Comparator()
    comparator.compare(actual, expected, "root")
    comparator.check_sharing()


# ----------------------------------------------------------------------------------------------- pickle scanning


def data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        return zf.read(name)


def pickle_globals(path: Path) -> list[str]:
    """Every global the pickle names (GLOBAL or STACK_GLOBAL), as "module name", without unpickling it."""
    names: list[str] = []
    strings: list[object] = []  # what string pushes left, with memo gets, for STACK_GLOBAL
    memo: dict[object, object] = {}
    for op, arg, _ in pickletools.genops(data_pkl(path)):
        if op.name == "GLOBAL":
            names.append(str(arg))
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING"):
            strings.append(arg)
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = strings[-1] if strings else None
        elif op.name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            strings.append(memo.get(arg))
        elif op.name == "STACK_GLOBAL":
            names.append(f"{strings[-2]} {strings[-1]}")
    return names


def pickle_strings(path: Path) -> set[str]:
    return {arg for op, arg, _ in pickletools.genops(data_pkl(path)) if isinstance(arg, str) and "UNICODE" in op.name}


def graph_globals(path: Path) -> set[str]:
    """The globals apart from storage classes and the tensor rebuild's version, which a cast may change."""
    out = set()
    for name in pickle_globals(path):
        module, _, attr = name.partition(" ")
        if module == "torch" and attr.endswith("Storage"):
            continue
        out.add("torch._utils _rebuild_tensor" if attr in ("_rebuild_tensor_v2", "_rebuild_tensor_v3") else name)
    return out


# ----------------------------------------------------------------------------------------------- cases

CASES = list(graph_fixtures.BUILDERS)


def make_source(folder: Path, case: str, opts: Options) -> Path:
    build, suffix = graph_fixtures.BUILDERS[case]
    return graph_fixtures.save(build(), folder / f"src{suffix}", cuda_tagged=opts.cuda_source)


def expected_of(src: Path, opts: Options) -> Any:
    return reference_cast(load_trusted(src, map_location=opts.device, weights_only=False), opts)


def weights_only_loads(path: Path, **kw: Any) -> bool:
    try:
        load_trusted(path, weights_only=True, **kw)
    except pickle.UnpicklingError:
        return False
    return True


# ----------------------------------------------------------------------------------------------- the comparator, proved


@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("case", CASES)
def test_comparator_accepts_torch_own_save_of_the_reference(tmp_path: Path, case: str, opt: str) -> None:
    opts = OPTIONS[opt]
    src = make_source(tmp_path, case, opts)
    expected = expected_of(src, opts)
    torch.save(expected_of(src, opts), tmp_path / "roundtrip.pt")
    assert_graph_equal(load_trusted(tmp_path / "roundtrip.pt", weights_only=False), expected)
    if not opts.dtype:  # no cast: the reference is the source itself
        assert_graph_equal(expected, load_trusted(src, map_location=opts.device, weights_only=False))


def test_reference_follows_the_rules(tmp_path: Path) -> None:
    src = make_source(tmp_path, "training", OPTIONS["bf16"])
    plain = expected_of(src, OPTIONS["bf16"])
    assert plain["model"]["conv1.weight"].dtype == torch.bfloat16
    assert plain["model"]["bn1.running_mean"].dtype == torch.bfloat16
    assert plain["model"]["bn1.num_batches_tracked"].dtype == torch.int64
    assert plain["ema"]["shadow"]["fc.bias"].dtype == torch.bfloat16
    assert plain["rng_state"].dtype == torch.uint8
    state = plain["optimizer"]["state"][0]
    assert (state["step"].dtype, state["exp_avg"].dtype, state["exp_avg_sq"].dtype) == (
        torch.float32,
        torch.bfloat16,
        torch.bfloat16,
    )
    assert plain["flags"] is plain["flags_again"]
    assert plain["model"]._metadata == load_trusted(src, weights_only=True)["model"]._metadata

    kept = expected_of(src, OPTIONS["bf16_keep_optimizer_dtype"])
    assert kept["model"]["conv1.weight"].dtype == torch.bfloat16
    assert {t.dtype for s in kept["optimizer"]["state"].values() for t in s.values()} == {torch.float32}

    buffers = expected_of(src, OPTIONS["fp16_keep_buffers"])
    assert buffers["model"]["bn1.running_var"].dtype == torch.float32
    assert buffers["model"]["bn1.weight"].dtype == torch.float16
    assert buffers["optimizer"]["state"][0]["exp_avg"].dtype == torch.float16

    (tmp_path / "m").mkdir()
    module = expected_of(make_source(tmp_path / "m", "module", OPTIONS["copy"]), OPTIONS["fp16_keep_buffers"])
    assert type(module.conv1.weight) is nn.Parameter and module.conv1.weight.dtype == torch.float16
    assert module.bn1.running_mean.dtype == torch.float32

    (tmp_path / "t").mkdir()
    tied = expected_of(make_source(tmp_path / "t", "tied_state_dict", OPTIONS["copy"]), OPTIONS["bf16"])
    assert tied["embed.weight"].untyped_storage().data_ptr() == tied["lm_head.weight"].untyped_storage().data_ptr()
    assert tied["embed.weight"].dtype == torch.bfloat16


def _drop_key(g: Any) -> None:
    del g["note"]


def _reorder(g: Any) -> None:
    g["epoch"] = g.pop("epoch")


def _wrong_dtype(g: Any) -> None:
    g["model"]["fc.weight"] = g["model"]["fc.weight"].to(torch.float32)


def _changed_float(g: Any) -> None:
    g["best"] = 0.2500000001


def _changed_tensor_value(g: Any) -> None:
    g["optimizer"]["state"][0]["exp_avg"].view(-1)[0] += 1


def _dict_for_ordered_dict(g: Any) -> None:
    g["model"] = dict(g["model"])


def _ordered_dict_for_dict(g: Any) -> None:
    g["lr_scheduler"] = OrderedDict(g["lr_scheduler"])


def _lost_metadata(g: Any) -> None:
    del g["model"]._metadata


def _changed_metadata(g: Any) -> None:
    g["model"]._metadata[""]["version"] = 99


def _tuple_for_list(g: Any) -> None:
    g["flags"][2] = [1, 2]


def _int_for_float(g: Any) -> None:
    g["epoch"] = 7.0


def _identity_broken(g: Any) -> None:
    g["flags_again"] = list(g["flags"])


def _step_cast(g: Any) -> None:
    g["optimizer"]["state"][1]["step"] = g["optimizer"]["state"][1]["step"].to(torch.bfloat16)


def _stride(g: Any) -> None:
    w = g["model"]["fc.weight"]
    g["model"]["fc.weight"] = w.t().contiguous().t()  # same values and shape, column-major


def _rng_tuple(g: Any) -> None:
    version, state, gauss = g["py_rng"]
    g["py_rng"] = (version, (*state[:-1], state[-1] + 1), gauss)


TRAINING_MUTATIONS: dict[str, tuple[Callable[[Any], None], str]] = {
    # what the comparator must say (a regex): each mutation is caught by the check meant for it
    "dropped key": (_drop_key, r"^root: keys"),
    "reordered dict": (_reorder, r"^root: keys"),
    "wrong dtype": (_wrong_dtype, r"fc.weight'\]: dtype"),
    "changed float": (_changed_float, r"\['best'\]: 0.2500000001 != 0.25"),
    "changed tensor value": (_changed_tensor_value, r"exp_avg'\]: values differ"),
    "dict for OrderedDict": (_dict_for_ordered_dict, r"\['model'\]: type dict != OrderedDict"),
    "OrderedDict for dict": (_ordered_dict_for_dict, r"\['lr_scheduler'\]: type OrderedDict != dict"),
    "lost _metadata": (_lost_metadata, r"\['model'\]: attributes \[\] != \['_metadata'\]"),
    "changed _metadata": (_changed_metadata, r"_metadata\[''\]\['version'\]: 99 != 1"),
    "list for tuple": (_tuple_for_list, r"\['flags'\]\[2\]: type list != tuple"),
    "float for int": (_int_for_float, r"\['epoch'\]: type float != int"),
    "memo identity broken": (_identity_broken, r"identity differs"),
    "optimizer step cast": (_step_cast, r"step'\]: dtype torch.bfloat16 != torch.float32"),
    "stride": (_stride, r"fc.weight'\]: layout \(1, 5\)"),
    "python rng state": (_rng_tuple, r"\['py_rng'\]\[1\]\[624\]"),
}


@pytest.mark.parametrize("mutation", list(TRAINING_MUTATIONS))
def test_comparator_rejects_a_mutated_training_dict(tmp_path: Path, mutation: str) -> None:
    opts = OPTIONS["bf16"]
    src = make_source(tmp_path, "training", opts)
    expected = expected_of(src, opts)
    actual = copy.deepcopy(expected)
    assert_graph_equal(actual, expected)  # the copy itself passes: the mutation is what fails
    mutate, reason = TRAINING_MUTATIONS[mutation]
    mutate(actual)
    with pytest.raises(AssertionError, match=reason):
        assert_graph_equal(actual, expected)


def _param_to_tensor(g: Any) -> None:
    g["fc.weight"] = g["fc.weight"].detach().clone()


def _requires_grad(g: Any) -> None:
    g["conv1.weight"].requires_grad_(True)


KEEP_VARS_MUTATIONS: dict[str, tuple[Callable[[Any], None], str]] = {
    "Parameter turned into a Tensor": (_param_to_tensor, r"fc.weight'\]: type Tensor != Parameter"),
    "requires_grad flipped": (_requires_grad, r"conv1.weight'\]: requires_grad True != False"),
}


@pytest.mark.parametrize("mutation", list(KEEP_VARS_MUTATIONS))
def test_comparator_rejects_a_mutated_keep_vars_dict(tmp_path: Path, mutation: str) -> None:
    opts = OPTIONS["fp16_keep_buffers"]
    src = make_source(tmp_path, "keep_vars", opts)
    expected = expected_of(src, opts)
    actual = copy.deepcopy(expected)
    assert_graph_equal(actual, expected)
    mutate, reason = KEEP_VARS_MUTATIONS[mutation]
    mutate(actual)
    with pytest.raises(AssertionError, match=reason):
        assert_graph_equal(actual, expected)


def test_comparator_rejects_broken_storage_sharing(tmp_path: Path) -> None:
    opts = OPTIONS["bf16"]
    src = make_source(tmp_path, "tied_training", opts)
    expected = expected_of(src, opts)
    actual = copy.deepcopy(expected)
    assert_graph_equal(actual, expected)
    actual["model"]["lm_head.weight"] = actual["model"]["lm_head.weight"].clone()  # same values, own storage
    with pytest.raises(AssertionError, match="storage sharing"):
        assert_graph_equal(actual, expected)


def test_comparator_rejects_a_custom_class_turned_into_its_base(tmp_path: Path) -> None:
    opts = OPTIONS["bf16"]
    src = make_source(tmp_path, "lightning", opts)
    expected = expected_of(src, opts)
    actual = copy.deepcopy(expected)
    assert_graph_equal(actual, expected)
    actual["hyper_parameters"] = dict(actual["hyper_parameters"])
    with pytest.raises(AssertionError, match="type"):
        assert_graph_equal(actual, expected)
    actual = copy.deepcopy(expected)
    actual["hyper_parameters"]["run"].seed = 22  # an attribute of a custom object
    with pytest.raises(AssertionError):
        assert_graph_equal(actual, expected)


def test_comparator_rejects_a_module_attribute_change(tmp_path: Path) -> None:
    opts = OPTIONS["copy"]
    src = make_source(tmp_path, "module", opts)
    expected = expected_of(src, opts)
    actual = copy.deepcopy(expected)
    assert_graph_equal(actual, expected)
    actual.bn1.momentum = 0.2
    with pytest.raises(AssertionError, match="momentum"):
        assert_graph_equal(actual, expected)
    actual = copy.deepcopy(expected)
    actual.train()
    with pytest.raises(AssertionError, match="training"):
        assert_graph_equal(actual, expected)


# ----------------------------------------------------------------------------------------------- the oracle


@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("case", CASES)
def test_pt_to_pt_converts_the_whole_graph(tmp_path: Path, case: str, opt: str) -> None:
    opts = OPTIONS[opt]
    src = make_source(tmp_path, case, opts)
    out = tmp_path / f"out{src.suffix}"
    code, stdout, err = run_cli("convert", src, "-o", out, *opts.args)
    assert code == 0, err
    assert stdout == ""
    assert "left out" not in err, err  # .pt → .pt: nothing is left out

    expected = expected_of(src, opts)
    actual = load_trusted(out, weights_only=False)  # no map_location: the locations say where to load
    assert_graph_equal(actual, expected)

    if weights_only_loads(src, map_location=opts.device):
        assert_graph_equal(load_trusted(out, weights_only=True), actual)

    # statecli re-emits the source's pickle: the same classes and functions, only storages change.
    assert graph_globals(out) == graph_globals(src)
    if opts.device is not None:
        assert not {s for s in pickle_strings(out) if s.startswith("cuda")}, "a cuda location is left"

    code, _, err = run_cli("inspect", out, "--format", "json")
    assert code == 0, err


@pytest.mark.parametrize(
    ("case", "kwargs"),
    [
        ("training", {"dtype": "bf16", "keep_optimizer_dtype": True}),
        ("lightning", {"dtype": "fp16", "keep_buffers": True}),
        ("module", {"dtype": "bf16", "device": "cpu"}),
        ("tied_training", {"dtype": "fp16"}),
    ],
)
def test_python_api_converts_the_whole_graph(tmp_path: Path, case: str, kwargs: dict[str, Any]) -> None:
    opts = Options(
        dtype=kwargs.get("dtype"),
        device=kwargs.get("device"),
        keep_buffers=kwargs.get("keep_buffers", False),
        keep_optimizer_dtype=kwargs.get("keep_optimizer_dtype", False),
    )
    src = make_source(tmp_path, case, opts)
    out = tmp_path / f"out{src.suffix}"
    statecli.convert(src, out, **kwargs)
    assert_graph_equal(load_trusted(out, weights_only=False), expected_of(src, opts))


def test_complex_follows_the_width_of_the_target(tmp_path: Path) -> None:
    # complex64 under fp16 becomes complex32, which torch pickles untyped (the dtype in a _rebuild_tensor_v3
    # call): the checkpoint's own pickle cannot say it, so inside a training dict that is refused, clearly,
    # naming the ways out; as a state dict it is written.
    torch.manual_seed(61)
    obj = {"model": {"w": torch.randn(3), "z": torch.randn(2, dtype=torch.complex64)}, "epoch": 1}
    src = graph_fixtures.save(obj, tmp_path / "c.pt")
    out = tmp_path / "o.pt"
    code, _, err = run_cli("convert", src, "-o", out, "--dtype", "fp16")
    assert code == 2, err
    assert "cannot cast 'model.z' (complex64 → complex32) inside a whole checkpoint" in err or (
        "cannot cast 'z' (complex64 → complex32) inside a whole checkpoint" in err
    )
    assert "--state-dict" in err and not out.exists()
    code, _, err = run_cli("convert", src, "-o", out, "--dtype", "fp16", "--state-dict")
    assert code == 0, err
    got = load_trusted(out, weights_only=True)
    want = obj["model"]["z"].to(torch.complex32)
    assert got["z"].dtype == torch.complex32 and got["z"].view(torch.int16).equal(want.view(torch.int16))
    plain = graph_fixtures.save(obj["model"], tmp_path / "sd.pt")
    code, _, err = run_cli("convert", plain, "-o", tmp_path / "sd16.pt", "--dtype", "fp16")
    assert code == 0, err  # a plain state dict is written by statecli's own pickler, which can say it
    assert load_trusted(tmp_path / "sd16.pt", weights_only=True)["z"].dtype == torch.complex32


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder that is also the current directory: where the payload's marker would appear."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


@pytest.mark.parametrize("extra", [(), ("--dtype", "bf16"), ("--device", "cpu")])
def test_a_dangerous_source_is_refused(workdir: Path, extra: tuple[str, ...]) -> None:
    code, out, err = run_cli("convert", MALICIOUS, "-o", workdir / "m.pt", *extra)
    assert code == 5, err
    assert out == ""
    assert "system" in err  # says what the pickle would call
    assert listing(workdir) == []  # no output, no temporary file, no marker
    assert not (SAMPLES / MARKER).exists()


def test_a_dangerous_source_is_refused_by_the_python_api(workdir: Path) -> None:
    with pytest.raises(statecli.UnsafeError):
        statecli.convert(MALICIOUS, workdir / "m.pt")
    assert listing(workdir) == []


def test_allow_dangerous_copies_the_global_through_without_running_it(workdir: Path) -> None:
    out = workdir / "m.pt"
    code, _, err = run_cli("convert", MALICIOUS, "-o", out, "--allow-dangerous", "--dtype", "bf16")
    assert code == 0, err
    assert listing(workdir) == ["m.pt"]  # no marker: nothing ran
    src_globals, out_globals = pickle_globals(MALICIOUS), pickle_globals(out)
    dangerous = [g for g in src_globals if g.split(" ")[0] in ("posix", "nt", "os")]
    assert dangerous, src_globals
    assert set(dangerous) <= set(out_globals)
    assert graph_globals(out) == graph_globals(MALICIOUS)
    assert f"touch {MARKER}" in pickle_strings(out)  # the payload's argument, verbatim
    report = statecli.open_checkpoint(out)  # statecli's reader, not pickle
    assert any(f.level == "dangerous" for f in report.findings)
    assert {t.name: t.dtype for t in report.tensors}["weight"] == "bfloat16"
    assert listing(workdir) == ["m.pt"]


def test_allow_dangerous_in_the_python_api(workdir: Path) -> None:
    statecli.convert(MALICIOUS, workdir / "m.pt", allow_dangerous=True)
    assert listing(workdir) == ["m.pt"]
    assert set(pickle_globals(MALICIOUS)) <= set(pickle_globals(workdir / "m.pt"))


def test_a_copy_of_the_dangerous_sample_is_refused_beside_its_output(workdir: Path) -> None:
    # The same with the source in the output folder: only the source is left there.
    src = workdir / "evil.pt"
    shutil.copyfile(MALICIOUS, src)
    code, _, err = run_cli("convert", src, "-o", workdir / "out.pt")
    assert code == 5, err
    assert listing(workdir) == ["evil.pt"]


# ----------------------------------------------------------------------------------------------- unchanged meanings


def test_select_still_converts_one_sub_dict_as_a_state_dict(tmp_path: Path) -> None:
    src = make_source(tmp_path, "training", OPTIONS["bf16"])
    out = tmp_path / "model.pt"
    code, _, err = run_cli("convert", src, "-o", out, "--select", "model", "--dtype", "bf16")
    assert code == 0, err
    got = load_trusted(out, weights_only=True)
    want = expected_of(src, OPTIONS["bf16"])["model"]
    assert list(got) == list(want)
    for k, v in want.items():
        assert type(got[k]) is torch.Tensor and got[k].dtype == v.dtype and _same_values(got[k], v), k
    assert "left out" in err and "--select model" in err


@pytest.mark.parametrize("case", ["training", "lightning"])
def test_safetensors_output_takes_the_model_and_says_what_was_left_out(tmp_path: Path, case: str) -> None:
    src = make_source(tmp_path, case, OPTIONS["bf16"])
    out = tmp_path / "w.safetensors"
    code, _, err = run_cli("convert", src, "-o", out, "--dtype", "bf16")
    assert code == 0, err
    from safetensors.torch import load_file

    got = load_file(out)
    model = load_trusted(src, weights_only=False)
    names = list(model["model"] if case == "training" else model["state_dict"])
    assert sorted(got) == sorted(names)
    assert "left out" in err and "optimizer state" in err
