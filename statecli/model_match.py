"""``--model package.module:callable``: build the user's architecture on the meta device and match a
checkpoint against it key by key, the way ``model.load_state_dict(sd, strict=True)`` would.

This is the one place statecli runs user code (importing the module, calling the factory); it happens
only when the user names a model. torch is imported inside the functions, never at import time, so a
command can import this module without putting torch on the inspect path (DESIGN.md §7).

Three steps, each usable alone:

- :func:`load_factory` imports ``package.module`` (current folder first on ``sys.path``, as ``python -m``
  does) and resolves ``callable`` (a dotted attribute path such as ``Outer.build`` is allowed);
- :func:`build_on_meta` calls the factory under ``torch.device("meta")``: no memory, no real init;
- :func:`match` compares the checkpoint's model tensors with the model's state dict and returns a
  :class:`ModelMatch`: missing / unexpected keys, shape and dtype mismatches, the model's exact role
  (parameter / buffer) and ``requires_grad`` per tensor, and suggestions for the usual fixes.

Every bad spec and every failure of the user's code is a :class:`statecli.errors.UsageError` (exit 2).
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from statecli.dtypes import DTYPES
from statecli.errors import UsageError
from statecli.records import JsonFields, Report, Summary

if TYPE_CHECKING:
    from torch import nn

SCHEMA = "statecli.model_match/1"

# Prefixes wrappers put before every key, and who puts them there.
KNOWN_PREFIXES: dict[str, str] = {
    "module.": "DDP / DataParallel",
    "_orig_mod.": "torch.compile",
    "model.": "Lightning",
}

_NBT = "num_batches_tracked"
_EXTRA_STATE = "_extra_state"
_CASTS_CLEANLY = frozenset({"float", "int", "complex"})  # a cast within these kinds keeps the meaning


# --------------------------------------------------------------------------------------------------
# load_factory


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """Import ``package.module`` and return its ``callable`` (``package.module:callable``).

    The callable may be a dotted attribute path (``models:Outer.build``). The current working directory
    goes first on ``sys.path`` (as with ``python -m``) and stays there, so the factory can import its
    siblings when it runs; modules already on ``sys.path`` are found too. Importing runs the module's
    code: call this only when the user asked for it.

    Raises :class:`UsageError` (exit 2) for a malformed spec, a module that cannot be imported or
    raises while importing, a missing attribute, or an attribute that is not callable.
    """
    module_name, attr_path = _parse_spec(spec)
    _put_cwd_on_path()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise UsageError(
                f"model spec {spec!r}: cannot import module {module_name!r}: {_describe(e)} "
                f"(run from the folder that holds it, or put that folder on PYTHONPATH)"
            ) from e
        raise UsageError(f"model spec {spec!r}: importing {module_name!r} failed: {_describe(e)}") from e
    except (Exception, SystemExit) as e:  # the user's module raised while importing
        raise UsageError(f"model spec {spec!r}: importing {module_name!r} failed: {_describe(e)}") from e

    obj: Any = module
    done: list[str] = []
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            owner = f"module {module_name!r}" if not done else f"{module_name}:{'.'.join(done)}"
            hint = _close_names(part, obj)
            raise UsageError(f"model spec {spec!r}: {owner} has no attribute {part!r}{hint}") from e
        except Exception as e:  # a property or __getattr__ of the user's code raised
            raise UsageError(f"model spec {spec!r}: reading {part!r} failed: {_describe(e)}") from e
        done.append(part)
    if not callable(obj):
        raise UsageError(
            f"model spec {spec!r}: {attr_path!r} is not callable (its type is {type(obj).__name__!r}); "
            f"name a class or a function that returns an nn.Module"
        )
    return obj


def _parse_spec(spec: str) -> tuple[str, str]:
    module_name, sep, attr_path = spec.partition(":")
    module_name, attr_path = module_name.strip(), attr_path.strip()
    if not sep or not module_name or not attr_path:
        raise UsageError(
            f"model spec {spec!r}: expected 'package.module:callable' (e.g. 'mypkg.models:build_model'), "
            f"with a module and a callable on either side of ':'"
        )
    if "/" in module_name or "\\" in module_name or module_name.endswith(".py"):
        raise UsageError(
            f"model spec {spec!r}: {module_name!r} looks like a file path; give a module name instead "
            f"(models/net.py -> 'models.net:Net', run from the folder above 'models')"
        )
    for what, dotted in (("module", module_name), ("callable", attr_path)):
        if not all(part.isidentifier() for part in dotted.split(".")):
            raise UsageError(f"model spec {spec!r}: {dotted!r} is not a valid {what} name (dotted Python names)")
    return module_name, attr_path


def _put_cwd_on_path() -> None:
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def _close_names(name: str, obj: object) -> str:
    try:
        names = [n for n in dir(obj) if not n.startswith("_")]
    except Exception:
        return ""
    close = difflib.get_close_matches(name, names, n=3)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# --------------------------------------------------------------------------------------------------
# build_on_meta


def build_on_meta(factory: Callable[[], Any], name: str | None = None) -> nn.Module:
    """Call ``factory()`` under ``torch.device("meta")``: parameters and buffers get shapes and dtypes
    but no memory, and initialisers do no work. A factory that creates tensors on an explicit device
    (``device="cpu"``) still works; those tensors are just real.

    ``name`` (the spec) is used in messages. Raises :class:`UsageError` (exit 2) if the factory raises
    or returns something that is not an ``nn.Module``.
    """
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it
    from torch import nn

    label = name or getattr(factory, "__qualname__", None) or repr(factory)
    try:
        with torch.device("meta"):
            model = factory()
    except (Exception, SystemExit) as e:
        wants_args = isinstance(e, TypeError) and "argument" in str(e)
        hint = (
            " (the callable is called with no arguments: wrap it in a function that supplies them)"
            if wants_args
            else ""
        )
        raise UsageError(f"model {label!r} raised {_describe(e)}{hint}") from e
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"model {label!r} returned a {type(model).__module__}.{type(model).__qualname__}, not a torch.nn.Module"
        )
    return model


def build_model(spec: str) -> nn.Module:
    """:func:`load_factory` then :func:`build_on_meta`: the model ``--model spec`` names, on meta."""
    return build_on_meta(load_factory(spec), name=spec)


# --------------------------------------------------------------------------------------------------
# match


@dataclass(frozen=True, slots=True)
class ShapeMismatch:
    """A key in both file and model whose shapes differ: ``load_state_dict`` reports "size mismatch"."""

    name: str  # the name in the file
    file_shape: tuple[int, ...]
    model_shape: tuple[int, ...]
    model_name: str | None = None  # the model's name for it, when a prefix rename maps one to the other

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file_shape": list(self.file_shape),
            "model_shape": list(self.model_shape),
            "model_name": self.model_name,
        }


@dataclass(frozen=True, slots=True)
class DtypeMismatch(JsonFields):
    """A key whose dtype differs. ``load_state_dict`` copies with a cast, so a change within floating,
    integer or complex dtypes is ``info``; a change of kind (integer / bool / quantized vs floating,
    complex vs real) is a ``warning``."""

    name: str
    file_dtype: str
    model_dtype: str
    level: str  # "info" | "warning"
    model_name: str | None = None


@dataclass(frozen=True, slots=True)
class Rename:
    """Keys match after ``strip`` is removed from the file's names and ``add`` put in front."""

    strip: str = ""
    add: str = ""

    def apply(self, name: str) -> str:
        return self.add + name[len(self.strip) :]

    def to_dict(self) -> dict[str, str]:
        return {"strip": self.strip, "add": self.add}


@dataclass(slots=True)
class ModelMatch:
    """How a checkpoint's model tensors line up with a model's state dict.

    ``missing`` and ``unexpected`` are what ``model.load_state_dict(sd, strict=True)`` reports, names
    as they are (no prefix fixing); ``missing`` follows the model's state-dict order, ``unexpected`` the
    file's. One difference from torch: BatchNorm fills in an absent ``num_batches_tracked`` by itself
    when the state dict records no module version >= 2 (PyTorch < 0.4.1 files, plain dicts, a prefix
    that hides the version); statecli cannot see those versions, so such keys are always listed here
    as missing, and a suggestion says strict=False is safe for them.

    ``roles`` / ``requires_grad`` are keyed by the file's tensor names and come from the model (exact,
    evidence ``model``): for keys the model has under the same name, or under the renamed name when
    ``rename`` holds (every key matches after a prefix fix). ``shape_mismatch`` and ``dtype_mismatch``
    compare the same pairs. ``non_persistent`` lists the model's non-persistent buffers: not expected
    in a state dict, listed for information.
    """

    model_class: str
    file_keys: int  # the file's model tensors that load_state_dict would see (persistent ones)
    model_keys: int  # entries in model.state_dict()
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[ShapeMismatch] = field(default_factory=list)
    dtype_mismatch: list[DtypeMismatch] = field(default_factory=list)
    roles: dict[str, str] = field(default_factory=dict)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    non_persistent: list[str] = field(default_factory=list)
    rename: Rename | None = None
    suggestions: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when ``load_state_dict(strict=True)`` would accept the keys and shapes as they are."""
        return not self.missing and not self.unexpected and not self.shape_mismatch

    @property
    def matched(self) -> int:
        """Keys present in both, under the same name."""
        return self.file_keys - len(self.unexpected)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "model": self.model_class,
            "ok": self.ok,
            "counts": {"file": self.file_keys, "model": self.model_keys, "matched": self.matched},
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "shape_mismatch": [m.to_dict() for m in self.shape_mismatch],
            "dtype_mismatch": [m.to_dict() for m in self.dtype_mismatch],
            "roles": dict(self.roles),
            "requires_grad": dict(self.requires_grad),
            "non_persistent": list(self.non_persistent),
            "rename": self.rename.to_dict() if self.rename is not None else None,
            "suggestions": list(self.suggestions),
        }


@dataclass(slots=True)
class _ModelState:
    """What matching needs from the model, read once."""

    keys: list[str]  # state_dict order
    shapes: dict[str, tuple[int, ...] | None]  # None: not a tensor (extra state) or a lazy parameter
    dtypes: dict[str, str]
    roles: dict[str, str]  # parameters and all buffers, persistent or not
    requires_grad: dict[str, bool]
    non_persistent: list[str]
    ties: dict[str, list[str]]  # state key -> other state keys holding the same tensor object


def _model_state(model: nn.Module) -> _ModelState:
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    sd = model.state_dict(keep_vars=True)
    roles: dict[str, str] = {}
    requires_grad: dict[str, bool] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        roles[name] = "parameter"
        requires_grad[name] = bool(p.requires_grad)
    for name, b in model.named_buffers(remove_duplicate=False):
        roles.setdefault(name, "buffer")
        requires_grad.setdefault(name, bool(b.requires_grad))
    non_persistent: list[str] = []
    for prefix, mod in model.named_modules(remove_duplicate=False):
        for b in sorted(getattr(mod, "_non_persistent_buffers_set", ())):
            if mod._buffers.get(b) is not None:
                non_persistent.append(f"{prefix}.{b}" if prefix else b)
    shapes: dict[str, tuple[int, ...] | None] = {}
    dtypes: dict[str, str] = {}
    by_object: dict[int, list[str]] = {}
    for key, value in sd.items():
        if isinstance(value, torch.Tensor):
            lazy = torch.nn.parameter.is_lazy(value)
            shapes[key] = None if lazy else tuple(int(s) for s in value.shape)
            dtypes[key] = str(value.dtype).removeprefix("torch.")
            by_object.setdefault(id(value), []).append(key)
        else:
            shapes[key] = None
    ties = {k: [o for o in group if o != k] for group in by_object.values() if len(group) > 1 for k in group}
    return _ModelState(list(sd), shapes, dtypes, roles, requires_grad, non_persistent, ties)


def _module_class(model: object) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _family(dtype: str) -> str:
    d = DTYPES.get(dtype)
    if d is None:
        return dtype
    return "int" if d.kind == "uint" else d.kind


def _is_nbt(key: str) -> bool:
    return key.rpartition(".")[2] == _NBT


def match(report: Report, model: nn.Module) -> ModelMatch:
    """Match the report's model tensors (``group == "model"``) against ``model``'s state dict.

    The reader has already found the model state in whole-module pickles, training dicts and Lightning
    checkpoints; tensors elsewhere in the file (optimizer state, callbacks) are not compared. A file
    tensor marked non-persistent (a pickled module's ``_non_persistent_buffers_set``) is not part of a
    state dict and is not compared either, though it still gets its role.
    """
    try:
        ms = _model_state(model)
    except Exception as e:  # state_dict hooks and get_extra_state are the user's code
        raise UsageError(f"reading the state dict of {_module_class(model)} failed: {_describe(e)}") from e
    model_set = set(ms.keys)
    model_tensors = [t for t in report.tensors if t.group == "model"]
    in_sd = [t for t in model_tensors if t.persistent is not False]
    file_names = [t.name for t in in_sd]
    file_set = set(file_names)

    result = ModelMatch(
        model_class=_module_class(model),
        file_keys=len(file_names),
        model_keys=len(ms.keys),
        missing=[k for k in ms.keys if k not in file_set],
        unexpected=[n for n in file_names if n not in model_set],
        non_persistent=list(ms.non_persistent),
    )
    if result.unexpected:  # with every file key in the model, a rename could only make things worse
        result.rename = _find_rename(file_names, ms.keys)

    to_model: Callable[[str], str] = result.rename.apply if result.rename is not None else _same
    for t in model_tensors:
        key = to_model(t.name)
        role = ms.roles.get(key)
        if role is None:
            continue
        result.roles[t.name] = role
        if key in ms.requires_grad:
            result.requires_grad[t.name] = ms.requires_grad[key]
        if t.persistent is False or key not in model_set:
            continue
        shown = key if key != t.name else None
        model_shape = ms.shapes.get(key)
        if model_shape is not None and not _shapes_load(t.shape, model_shape):
            result.shape_mismatch.append(ShapeMismatch(t.name, tuple(t.shape), model_shape, shown))
        model_dtype = ms.dtypes.get(key)
        if model_dtype is not None and model_dtype != t.dtype:
            family = _family(t.dtype)
            level = "info" if family == _family(model_dtype) and family in _CASTS_CLEANLY else "warning"
            result.dtype_mismatch.append(DtypeMismatch(t.name, t.dtype, model_dtype, level, shown))

    result.suggestions = _suggest(result, ms, file_set, len(model_tensors))
    return result


def _same(name: str) -> str:
    return name


def _shapes_load(file_shape: Iterable[int], model_shape: tuple[int, ...]) -> bool:
    file_shape = tuple(file_shape)
    # load_state_dict's backward compatibility: a (1,) tensor from PyTorch 0.3 loads into a 0-dim one.
    if model_shape == () and file_shape == (1,):
        return True
    return file_shape == model_shape


def _dotted_prefixes(keys: list[str]) -> list[str]:
    """Every dotted prefix (``a.``, ``a.b.``) that all ``keys`` share, shortest first."""
    if not keys:
        return []
    # The sorted list's first and last keys share exactly the prefix that all of them share.
    first, last = min(keys).split(".")[:-1], max(keys).split(".")[:-1]
    parts: list[str] = []
    for a, b in zip(first, last, strict=False):
        if a != b:
            break
        parts.append(a)
    return [".".join(parts[: i + 1]) + "." for i in range(len(parts))]


def _find_rename(file_names: list[str], model_keys: list[str]) -> Rename | None:
    """The prefix fix after which every file key is a model key and only ``num_batches_tracked`` may
    still be missing; ``None`` if there is none. Strip-only and add-only fixes are tried first."""
    n_file, n_model = len(file_names), len(model_keys)
    n_nbt = sum(1 for k in model_keys if _is_nbt(k))
    if not file_names or not n_model - n_nbt <= n_file <= n_model:
        return None  # a rename keeps the count: no prefix fix can make these sets match
    strips = ["", *_dotted_prefixes(file_names)]
    adds = ["", *_dotted_prefixes(model_keys)]
    candidates = sorted(
        ((s, a) for s in strips for a in adds if s != a),
        key=lambda sa: ((sa[0] != "") + (sa[1] != ""), len(sa[0]) + len(sa[1])),
    )
    model_set = set(model_keys)
    for strip, add in candidates:
        cut = len(strip)
        if all(add + f[cut:] in model_set for f in file_names):
            mapped = {add + f[cut:] for f in file_names}
            if len(mapped) == n_file and all(_is_nbt(k) for k in model_set - mapped):
                return Rename(strip, add)
    return None


def _label(prefix: str) -> str:
    whos = [KNOWN_PREFIXES[p + "."] for p in prefix.split(".")[:-1] if p + "." in KNOWN_PREFIXES]
    return f" ({', '.join(whos)})" if whos else ""


def _suggest(result: ModelMatch, ms: _ModelState, file_set: set[str], n_model_tensors: int) -> list[str]:
    out: list[str] = []
    if n_model_tensors == 0:
        out.append("the checkpoint holds no model tensors to match")
        return out
    rename = result.rename
    if rename is not None:
        steps, flags = [], []
        if rename.strip:
            steps.append(f"stripping the prefix {rename.strip!r}{_label(rename.strip)}")
            flags.append(f"--strip-prefix {rename.strip}")
        if rename.add:
            steps.append(f"adding the prefix {rename.add!r}{_label(rename.add)}")
            flags.append(f"--add-prefix {rename.add}")
        out.append(
            f"all {result.file_keys} keys match after {' and '.join(steps)}: "
            f"`statecli convert {' '.join(flags)}`, or rename the keys before load_state_dict"
        )

    # What is still missing once the rename (if any) is applied, sorted into harmless kinds.
    if rename is not None:
        present = {rename.apply(n) for n in file_set}
        still_missing = [k for k in ms.keys if k not in present]
        still_unexpected: list[str] = []
    else:
        present = file_set
        still_missing, still_unexpected = result.missing, result.unexpected
    nbt = [k for k in still_missing if _is_nbt(k)]
    tied = {k: [o for o in ms.ties[k] if o in present] for k in still_missing if k in ms.ties}
    tied = {k: v for k, v in tied.items() if v and not _is_nbt(k)}
    extra = [k for k in still_missing if k.rpartition(".")[2] == _EXTRA_STATE]
    other_missing = [k for k in still_missing if not _is_nbt(k) and k not in tied and k not in extra]
    harmless = not other_missing and not still_unexpected and not extra

    if nbt and harmless:  # worth saying only when nothing that matters is missing or unexpected
        out.append(
            f"BatchNorm `num_batches_tracked` is missing ({len(nbt)} key(s); checkpoints from before "
            f"PyTorch 0.4.1 lack it, and torch fills it in when the state dict records no module version): "
            f"loading with strict=False is safe for those keys"
        )
    for k, others in tied.items():
        out.append(
            f"{k!r} is tied to {others[0]!r} in the model (one tensor), so it loads with it: "
            f"strict=False is safe for it"
        )
    for k in extra:
        out.append(
            f"{k!r} is extra state (get_extra_state), which need not be a tensor; statecli lists tensors "
            f"only, so it may be in the file all the same"
        )
    non_persistent = set(ms.non_persistent)
    dropped = [n for n in still_unexpected if n in non_persistent]
    if dropped:
        names = ", ".join(repr(n) for n in dropped[:3]) + (", ..." if len(dropped) > 3 else "")
        out.append(
            f"{len(dropped)} unexpected key(s) are non-persistent buffers in the model ({names}): it builds "
            f"them itself; drop them from the checkpoint or load with strict=False"
        )
    if result.shape_mismatch:
        out.append(
            f"{len(result.shape_mismatch)} tensor(s) differ in shape: the model was built with a different "
            f"configuration or architecture (check the factory's arguments)"
        )
    warned = [m for m in result.dtype_mismatch if m.level == "warning"]
    if warned:
        m = warned[0]
        out.append(
            f"{len(warned)} tensor(s) change dtype kind on load (e.g. {m.name!r}: {m.file_dtype} in the file, "
            f"{m.model_dtype} in the model); load_state_dict casts them silently"
        )
    return out


def with_model_roles(report: Report, m: ModelMatch) -> Report:
    """``report`` with the roles the model states (exact, evidence ``model``) for the tensors it knows,
    and ``requires_grad`` from the model's parameters where the file stores none."""
    import dataclasses

    non_persistent = set(m.non_persistent)
    tensors = []
    for t in report.tensors:
        role = m.roles.get(t.name) if t.group == "model" else None
        if role is None:
            tensors.append(t)
            continue
        grad = t.requires_grad if t.requires_grad is not None else m.requires_grad.get(t.name)
        tensors.append(
            dataclasses.replace(
                t,
                role=role,
                exact=True,
                evidence="model",
                requires_grad=grad,
                persistent=t.name not in non_persistent if role in ("parameter", "buffer") else t.persistent,
            )
        )
    return dataclasses.replace(report, tensors=tuple(tensors), summary=Summary.of(tensors, report.storage_sizes))
