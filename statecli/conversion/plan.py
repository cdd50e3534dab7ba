"""What a conversion will do, decided from the report alone: no torch, no tensor bytes.

The plan names every tensor of the input: the ones written (each with its output name, dtype and
device, and why a tensor keeps its dtype) and the ones left out (optimizer state, non-persistent
buffers, ...). ``--dry-run`` prints it; the engine carries it out.

Dtype rules are ``nn.Module.to(dtype)``'s, made safe: only floating tensors change; integer, bool and
quantized tensors never do; complex tensors go to the complex dtype of the same width or the
conversion stops. Tensors that share a storage (tied weights) are one unit: converted once, together.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase, translate
from typing import Any

from statecli import dtypes
from statecli.errors import InputError, StatecliError, UnsafeError, UnsupportedFormatError, UsageError
from statecli.formats.repickle import STATE_DICT_INSTEAD
from statecli.records import Finding, JsonFields, RawTensor, Report, TensorInfo
from statecli.roles import infer, keep_vars_proves
from statecli.tensors.quantized import unsupported as quantized_unsupported
from statecli.wording import count, name_list

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_SIZE = 5 * 10**9  # what transformers' save_pretrained uses
MAX_NAMED_LEFT_OUT = 3  # a note names the tensors it leaves out when there are this many or fewer

# The complex dtype that holds two of each float width; bf16 and fp8 have none.
COMPLEX_OF = {"float16": "complex32", "float32": "complex64", "float64": "complex128"}
_DEVICE = re.compile(r"^(cpu|meta|cuda(:\d{1,3})?)$")
# The evidence of readers that walk a module's own structure (formats/torchpickle.py, torchscript.py, pt2.py).
_MODULE_EVIDENCE = frozenset({"module-attribute", "torchscript", "export"})


@dataclass(frozen=True, slots=True)
class ConvertOptions:
    """Everything ``statecli convert`` can be asked; the Python API takes the same fields."""

    dtype: str | None = None  # target floating dtype, any spelling dtypes.canonical() accepts
    device: str | None = None  # cpu | cuda | cuda:N | meta
    keep_buffers: bool = False
    only: tuple[str, ...] = ()  # name globs: only these may change dtype
    exclude: tuple[str, ...] = ()  # name globs: these never change dtype
    select: str | None = None  # a sub-dict of the checkpoint (model, state_dict, ema, ...)
    strip_prefix: tuple[str, ...] = ()
    add_prefix: str = ""
    allow_overflow: bool = False
    max_shard_size: int | None = None
    output_format: str | None = None  # "safetensors" | "torch" | "sharded" | "dcp"; None: from the output path
    force: bool = False
    verify: bool = False
    untie: bool = False  # safetensors: write each tied name as its own tensor, not as an alias
    keep_optimizer_dtype: bool = False  # a whole training checkpoint: optimizer state keeps its dtype
    allow_dangerous: bool = False  # a whole .pt copies its pickle: one statecli flags as dangerous only with this
    state_dict: bool = False  # a .pt of the model's state dict even where the whole checkpoint could be written
    # How the output is written, not what it holds (the bytes are the same whatever these say):
    sync: bool = True  # flush every output file to disk before it gets its name (--no-sync: scratch outputs)
    jobs: int | None = None  # worker processes for a multi-file output; None: the usable cores, capped
    distributed: bool = False  # launched by torchrun: the ranks share the output files out


@dataclass(slots=True)
class PlanItem:
    """One tensor the output will hold."""

    name: str  # in the output
    source: TensorInfo  # in the input
    role: str
    exact: bool  # the role is a fact from the input, not a guess
    evidence: str
    src_dtype: str
    dst_dtype: str
    action: str  # "cast" | "keep"
    reason: str
    dst_device: str | None
    unit: str  # tensors with the same unit share memory and are converted together
    alias_of: str | None = None  # same memory, offset, shape and stride as this earlier output name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def numel(self) -> int:
        return self.source.numel

    @property
    def nbytes_out(self) -> int:
        return dtypes.nbytes(self.dst_dtype, self.source.numel)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source.name,
            "role": self.role,
            "exact": self.exact,
            "evidence": self.evidence,
            "from_dtype": self.src_dtype,
            "to_dtype": self.dst_dtype,
            "action": self.action,
            "reason": self.reason,
            "shape": list(self.shape),
            "from_device": self.source.device,
            "to_device": self.dst_device,
            "alias_of": self.alias_of,
        }


@dataclass(frozen=True, slots=True)
class Dropped(JsonFields):
    """A tensor of the input the output leaves out, and why."""

    name: str
    group: str
    reason: str


@dataclass(slots=True)
class Plan:
    report: Report
    output: str
    output_format: str  # "safetensors" | "torch" | "sharded" | "dcp"
    options: ConvertOptions
    items: list[PlanItem]
    dropped: list[Dropped]
    notes: list[Finding] = field(default_factory=list)
    # The whole object graph: the input's pickle is written back with new storage records (graph_mode).
    graph: bool = False

    @property
    def target_dtype(self) -> str | None:
        return dtypes.canonical(self.options.dtype) if self.options.dtype else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "statecli.plan/1",
            "input": self.report.path,
            "input_format": self.report.format,
            "output": self.output,
            "output_format": self.output_format,
            "whole_checkpoint": self.graph,
            "tensors": [i.to_dict() for i in self.items],
            "dropped": [d.to_dict() for d in self.dropped],
            "notes": [n.to_dict() for n in self.notes],
        }


def target_dtype(name: str | None) -> str | None:
    """The canonical floating dtype a user asked for; UsageError for an unknown or impossible one."""
    if name is None:
        return None
    canon = dtypes.canonical(name)
    if canon is None:
        raise UsageError(dtypes.unknown(name))
    kind = dtypes.DTYPES[canon].kind
    if kind != "float" or canon == "float4_e2m1fn_x2" or canon == "float8_e8m0fnu":
        raise UsageError(
            f"cannot convert to {canon}: only floating tensors change dtype, and only to a floating dtype "
            "(bf16, fp16, fp32, fp64, float8_e4m3fn, float8_e5m2); integer, bool and quantized tensors "
            "keep theirs, as nn.Module.to() does"
        )
    return canon


def check_device(device: str | None) -> str | None:
    if device is None:
        return None
    d = device.strip().lower()
    if not _DEVICE.match(d):
        raise UsageError(f"unknown device {device!r} (use cpu, cuda, cuda:N or meta)")
    return d


def output_format(output: str, options: ConvertOptions) -> str:
    """safetensors / torch / sharded, from ``--format``-like option or the output path."""
    if options.output_format is not None:
        fmt = options.output_format
        if fmt not in ("safetensors", "torch", "sharded", "dcp"):
            raise UsageError(f"unknown output format {fmt!r} (safetensors, torch, sharded or dcp)")
        if fmt == "dcp" and os.path.splitext(output.rstrip("/" + os.sep))[1].lower() in (
            SAFETENSORS_SUFFIX,
            *TORCH_SUFFIXES,
        ):
            raise UsageError(f"a DCP checkpoint is a folder: give a folder as -o (for example out/), not {output!r}")
        return fmt
    if output.endswith(os.sep) or output.endswith("/") or os.path.isdir(output):
        return "sharded"
    if options.max_shard_size is not None and not os.path.splitext(output)[1]:
        return "sharded"  # `-o out --max-shard-size 2GB`: a folder is the only thing that can be meant
    lower = output.lower()
    if lower.endswith(SAFETENSORS_SUFFIX):
        if options.max_shard_size is not None:
            raise UsageError("--max-shard-size writes a folder of shards: give a folder as -o (for example out/)")
        return "safetensors"
    if lower.endswith(TORCH_SUFFIXES):
        if options.max_shard_size is not None:
            raise UsageError("--max-shard-size writes sharded safetensors: give a folder as -o (for example out/)")
        return "torch"
    raise UsageError(
        f"cannot tell the output format from {output!r}: end it with .safetensors, .pt, .pth, .bin or .ckpt, "
        "or with / for a folder of safetensors shards"
    )


def _inside(t: TensorInfo, key: str | None, model_key: str | None) -> str | None:
    """``t``'s name inside ``--select key``, or None when the selection leaves it out.

    A key is what the user sees: the model's own key (the default), a top-level key of the checkpoint
    (``ema``, ``optimizer``; DCP's ``optim``, whose tensors the reader puts in the group ``optimizer``)
    or a sub-module of the model (``encoder``). A reader's group name selects its tensors too.
    """
    if key is None or key == model_key:
        return t.name if t.group == "model" else None
    prefix = key + "."
    if t.name.startswith(prefix):
        return t.name.removeprefix(prefix)
    return t.name if t.group == key else None


def _keeps(t: TensorInfo) -> str | None:
    """Why a selected tensor is still not written (None: it is)."""
    if t.persistent is False and t.role == "buffer":
        return "non-persistent buffer: state_dict() leaves it out"
    if t.role == "other" and _module_attribute(t):
        return "plain tensor attribute of a module: not in its state_dict()"
    return None


def select_keys(report: Report) -> list[str]:
    """The ``--select`` keys that give a non-empty output: the first part of a written tensor's name, the
    model's key, and a group name where no name shows it (``constants`` of a .pt2). A group whose names
    all start with another key (DCP's ``optimizer`` for ``optim.…``) is offered under that key alone."""
    keys: set[str] = set()
    group_tops: dict[str, set[str]] = {}
    model_key = report.container.state_dict_at
    for t in report.tensors:
        if _keeps(t) is not None:
            continue
        top, dot, _ = t.name.partition(".")
        if dot:
            keys.add(top)
        group_tops.setdefault(t.group, set()).add(top if dot else "")
        if t.group == "model" and model_key:
            keys.add(model_key)
    for group, tops in group_tops.items():
        if group not in keys and (len(tops) != 1 or "" in tops):
            keys.add(group)
    return sorted(keys)


def _select(report: Report, key: str | None) -> tuple[list[tuple[TensorInfo, str]], list[Dropped]]:
    """The tensors that form the output's state dict, each with its name inside the selection."""
    kept: list[tuple[TensorInfo, str]] = []
    dropped: list[Dropped] = []
    model_key = report.container.state_dict_at
    default = key is None or key == model_key
    for t in report.tensors:
        # The default selection inline: a call per tensor shows at 100,000 tensors.
        name = (t.name if t.group == "model" else None) if default else _inside(t, key, model_key)
        if name is None:
            dropped.append(Dropped(t.name, t.group, _why_not(t, key)))
            continue
        why = _keeps(t)
        if why is not None:
            dropped.append(Dropped(t.name, t.group, why))
            continue
        kept.append((t, name))
    if not kept and key is not None:
        keys = select_keys(report)
        hint = f"; try one of: {', '.join(keys[:20])}" if keys else ""
        raise UsageError(f"--select {key!r} names no tensors in {report.path}{hint}")
    return kept, dropped


def _all_roles_exact(items: list[PlanItem]) -> bool:
    return all(i.exact and i.role in ("parameter", "buffer") for i in items) and any(
        i.role == "parameter" for i in items
    )


def parameters_keep_roles(items: list[PlanItem]) -> bool:
    """Whether a .pt output of ``items`` holds nn.Parameter objects (``state_dict(keep_vars=True)``): only when
    every role is a known fact and a reader sees every role exact again (a buffer named ``weight`` would read
    back as a guess). Mixing in guesses would make them look like facts."""
    return _all_roles_exact(items) and keep_vars_proves(
        (i.name, i.dst_dtype, i.shape, i.role == "parameter") for i in items
    )


def _module_attribute(t: TensorInfo) -> bool:
    """A tensor the module holds that is neither a parameter nor a buffer: ``state_dict()`` leaves it out.

    Only readers that see the module itself (a pickled ``nn.Module``, a TorchScript archive, a ``.pt2``
    program) can say so, and they say it the same way: an exact role ``other`` in the model group. In a
    state dict (or a safetensors file whose metadata says ``other``) every tensor is a key of it and
    stays; so do the tensors of another group (constants, sample inputs) picked with ``--select``.
    """
    return t.group == "model" and t.role == "other" and t.exact and t.evidence in _MODULE_EVIDENCE


def _why_not(t: TensorInfo, key: str | None) -> str:
    if "optim" in t.group:
        return "optimizer state"
    if key is None:
        return f"not part of the model (under {t.group!r}; --select {t.group} converts it)"
    return f"outside --select {key}"


def _rename(name: str, options: ConvertOptions) -> str:
    for p in options.strip_prefix:
        if p and name.startswith(p):
            name = name[len(p) :]
            break
    return options.add_prefix + name


def _role(t: TensorInfo, selected_group: bool) -> tuple[str, bool, str]:
    """The role in the output. A sub-dict picked with --select was "other" in the container; as a
    state dict of its own its roles are inferred again from names and dtypes."""
    if not selected_group or t.role != "other" or t.evidence != "container":
        return t.role, t.exact, t.evidence
    probe = RawTensor(name=t.name, dtype=t.dtype, shape=t.shape)
    role, evidence = infer(probe)
    return role, False, evidence


def _dtype_decision(
    t: TensorInfo, names: tuple[str, ...], role: str, target: str | None, options: ConvertOptions, graph: bool = False
) -> tuple[str, str, str]:
    """(action, destination dtype, reason) for one tensor on its own, before ties are considered.

    ``--only`` / ``--exclude`` globs match any of ``names``: the output name (after --strip-prefix /
    --add-prefix), the name inside the --select'ed sub-dict and the name in the file. Users write the one
    they see, and a glob that silently matches nothing would cast what they meant to keep.
    """
    src = t.dtype
    kind = dtypes.DTYPES[src].kind if src in dtypes.DTYPES else "unknown"
    if kind == "quant" or t.layout == "quantized":
        # A whole checkpoint copies a quantized storage's bytes as they are: whatever torch can load, it can.
        why = None if graph else quantized_unsupported(t)
        if why is not None:
            raise UnsupportedFormatError(f"tensor {t.name!r} is quantized ({src}): {why}")
        return "keep", src, f"quantized {src}: never changes"
    if t.layout != "strided":
        if graph:
            return "keep", src, f"layout {t.layout}: written as saved"
        raise UnsupportedFormatError(f"tensor {t.name!r} has layout {t.layout}: convert handles strided tensors only")
    if target is None:
        return "keep", src, "no --dtype"
    if kind in ("int", "uint", "bool", "bits"):
        return "keep", src, f"{src} is not floating: never changes"
    if options.only and not any(fnmatchcase(n, g) for g in options.only for n in names):
        return "keep", src, "not matched by --only"
    if any(fnmatchcase(n, g) for g in options.exclude for n in names):
        return "keep", src, "matched by --exclude"
    if options.keep_buffers and role == "buffer":
        return "keep", src, "buffer: --keep-buffers"
    dst = target
    if kind == "complex":
        if target not in COMPLEX_OF:
            raise UsageError(
                f"tensor {t.name!r} is {src} and {target} has no complex counterpart; dropping the imaginary "
                f"part would lose data. Leave it as it is with --exclude '{t.name}'"
            )
        dst = COMPLEX_OF[target]
        if dst == src:
            return "keep", src, f"already {src}"
    if src == dst:
        return "keep", src, f"already {src}"
    if src in ("float8_e8m0fnu", "float4_e2m1fn_x2"):
        return "keep", src, f"{src} is a scale/packed format: never changes"
    return "cast", dst, f"{src} → {dst}"


def _quantized_modules(report: Report) -> set[str]:
    """Modules that hold a ``scale`` and a ``zero_point`` (quantized Conv, Linear, BatchNorm, LayerNorm,
    Quantize, fake-quant observers): their float tensors feed quantized kernels, which take float32 only,
    and ``nn.Module.to(dtype)`` has no meaning for a quantized model. Casting them would write a file that
    loads and then fails."""
    seen: dict[str, int] = {}
    for t in report.tensors:
        prefix, _, last = t.name.rpartition(".")
        if last == "scale":
            seen[prefix] = seen.get(prefix, 0) | 1
        elif last == "zero_point":
            seen[prefix] = seen.get(prefix, 0) | 2
    return {prefix for prefix, bits in seen.items() if bits == 3}


def _in_quantized(t: TensorInfo, quantized: set[str]) -> bool:
    """Whether ``t`` belongs to a quantized module (see :func:`_quantized_modules`) or lies below one (the
    float bias in a Linear's ``_packed_params``)."""
    name = t.name
    if t.evidence == "rule:quantized-module" or "_packed_params." in name or "_all_weight_values." in name:
        return True
    if not quantized:
        return False
    dot = name.find(".")
    while dot >= 0:
        if name[:dot] in quantized:
            return True
        dot = name.find(".", dot + 1)
    return False


class _NoStorageClass(UsageError):
    """A cast a whole-checkpoint .pt cannot hold (see :func:`_check_storage_types`)."""


def _refuse_quantized_on_meta(items: list[PlanItem]) -> None:
    """torch has no quantized tensors on the meta device: a .pt that puts one there would not load."""
    names = [i.name for i in items if i.dst_device == "meta" and i.source.quantizer is not None]
    if names:
        raise UsageError(
            f"torch cannot hold quantized tensors on the meta device ({', '.join(names[:5])}"
            f"{' …' if len(names) > 5 else ''}); choose cpu or cuda"
        )


def build_plan(report: Report, output: str, options: ConvertOptions) -> Plan:
    """Decide every tensor's fate. Raises UsageError for options that cannot apply to this input."""
    graph = graph_mode(report, output_format(output, options), options)
    try:
        return _build_plan(report, output, options, graph)
    except _NoStorageClass as e:
        if not graph or report.container.kind != "state_dict":
            raise UsageError(e.message) from None
    # A state dict holds nothing but tensors: written by statecli's own pickler it loses only the
    # per-module _metadata versions, which load_state_dict does not need.
    return _build_plan(report, output, options, graph=False)


def _build_plan(report: Report, output: str, options: ConvertOptions, graph: bool) -> Plan:
    target = target_dtype(options.dtype)
    device = check_device(options.device)
    if options.jobs is not None and options.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, not {options.jobs}")
    fmt = output_format(output, options)
    notes: list[Finding] = []

    if graph:
        notes.extend(_refuse_dangerous(report, options))
        selected, dropped = [(t, t.name) for t in report.tensors], []
    else:
        selected, dropped = _select(report, options.select)
    picked_other = options.select is not None and options.select != report.container.state_dict_at

    # Names first: a collision is an error before anything else is decided.
    names: dict[str, str] = {}
    for t, inner in selected:
        out = _rename(inner, options)
        if not out and inner:  # a key '' is legal in torch; only a rename that empties a name is refused
            raise UsageError(f"tensor {t.name!r} would have an empty name after --strip-prefix")
        if out in names:
            raise _collision(names[out], t.name, out, options)
        names[out] = t.name

    items: list[PlanItem] = []
    owners = report.optimizer_owners
    quantized = _quantized_modules(report)
    planned: dict[str, PlanItem] = {}
    for (t, inner), out in zip(selected, names, strict=True):
        # Beside the model, a whole checkpoint's EMA copy is a state dict of its own: its BatchNorm statistics
        # are buffers to --keep-buffers as the model's are.
        again = picked_other or (graph and t.group != "model" and "optim" not in t.group)
        role, exact, evidence = _role(t, again)
        action, dst, reason = _dtype_decision(t, (out, inner, t.name), role, target, options, graph)
        if action == "cast" and _in_quantized(t, quantized):
            action, dst, reason = "keep", t.dtype, f"{t.dtype} in a quantized module: its kernels take it as it is"
        if graph and "optim" in t.group:
            action, dst, reason = _optimizer_decision(t, (action, dst, reason), options, owners, planned)
        unit = t.storage if t.storage is not None else f"tensor:{t.file or ''}:{t.name}"
        dst_device = (device or t.device or "cpu") if fmt == "torch" else None  # safetensors stores none
        if graph and t.storage is None:
            # A meta tensor's dtype and device, a sparse tensor's layout, live in its rebuild call, which the
            # whole checkpoint copies as it is (its component storages, if any, move with --device).
            what = "meta tensor" if t.layout == "strided" else f"{t.layout} tensor"
            action, dst, dst_device = "keep", t.dtype, t.device
            reason = f"{what} with no storage of its own: written as saved"
        items.append(PlanItem(out, t, role, exact, evidence, t.dtype, dst, action, reason, dst_device, unit))
        planned[t.name] = items[-1]
    _refuse_quantized_on_meta(items)

    if options.untie and fmt == "torch":
        raise UsageError("--untie is for safetensors output: a .pt keeps a tie as one storage, as torch.save does")
    if fmt == "dcp":
        _refuse_for_dcp(items, options)
    # DCP has no aliases: dcp.load fills each key of the model's state dict, tied names included, from its own entry.
    _tie_units(items, untie=options.untie or fmt == "dcp")
    tied = [i for i in items if i.alias_of is not None]
    if tied and fmt != "torch":
        notes.append(Finding("warning", "tied-names", _tied_note(tied)))
    if fmt not in ("torch", "dcp"):  # a DCP entry is a torch.save archive: any plain dtype, any name
        unstorable = sorted({i.dst_dtype for i in items if i.dst_dtype not in dtypes.SAFETENSORS_CODES})
        if unstorable:
            names = ", ".join(i.name for i in items if i.dst_dtype in unstorable)
            raise UsageError(
                f"safetensors cannot store {', '.join(unstorable)} (tensors {names:.200}); write a .pt file instead"
            )
        # A pickled name may hold a lone surrogate (pickle decodes with surrogatepass); a safetensors header is
        # UTF-8 JSON, which cannot hold one. A .pt file can.
        unencodable = next((i.name for i in items if not _is_utf8(i.name)), None)
        if unencodable is not None:
            raise UsageError(
                f"safetensors cannot store the tensor name {unencodable[:80]!r}, which is not valid Unicode; "
                "write a .pt file instead"
            )
    if fmt != "torch":
        stores = "a DCP checkpoint" if fmt == "dcp" else "safetensors"
        if device is not None:
            notes.append(
                Finding("warning", "device-not-stored", f"{stores} stores no device: --device does not change the file")
            )
        elif any(i.source.device not in (None, "cpu") for i in items):
            saved = sorted({i.source.device for i in items if i.source.device not in (None, "cpu")})
            notes.append(
                Finding(
                    "info",
                    "device-not-stored",
                    f"the input was saved on {', '.join(saved)}; {stores} stores no device, so loaders "
                    "put these tensors on the CPU"
                    + (" (dcp.load: on the device of the state dict it fills)" if fmt == "dcp" else ""),
                )
            )
    if graph:
        _check_storage_types(items, report.path)
    if fmt == "torch" and not graph and _all_roles_exact(items) and not parameters_keep_roles(items):
        notes.append(
            Finding(
                "info",
                "roles-not-stored",
                "a .pt shows roles only as nn.Parameter objects beside plain buffers, and these buffers would read "
                "back as guesses (a buffer named like a parameter, or a quantized module): the output holds plain "
                "tensors; write .safetensors to keep the exact roles",
            )
        )
    if dropped:
        by_reason: dict[str, list[str]] = {}
        for d in dropped:
            by_reason.setdefault(d.reason, []).append(d.name)
        for reason, left in by_reason.items():
            notes.append(Finding("info", "dropped", _left_out(left, reason)))
    if not items:
        groups = sorted({t.group for t in report.tensors if t.group != "model"})  # each works as a --select key
        hint = f"; its tensors are under {', '.join(groups)} (--select {groups[0]})" if groups else ""
        raise UsageError(f"nothing to convert: no model tensors found in {report.path}{hint}")
    if options.only or options.exclude:
        triples = ((i.name, inner, t.name) for i, (t, inner) in zip(items, selected, strict=True))
        notes.extend(_check_globs(report, options, triples, dropped))
    return Plan(report, output, fmt, options, items, dropped, notes, graph=graph)


# Inputs whose whole pickle can be written back with new storage records (see formats/repickle.py).
GRAPH_FORMATS = frozenset({"torch-zip"})
# torch's typed storage class per dtype: a whole-checkpoint .pt keeps each storage's class, so a dtype
# without one (float8, uint16, ...: torch pickles those untyped, the dtype in each tensor's rebuild call)
# cannot be cast to or from there.
STORAGE_CLASS = {d: name for name, d in dtypes.STORAGE_TYPES.items() if name != "UntypedStorage"}


def graph_mode(report: Report, fmt: str, options: ConvertOptions) -> bool:
    """Whether the output is the whole object graph (a torch archive in, a .pt out, no sub-dict picked and no
    key renamed): every value of the input, with only its storages converted. Otherwise the output is a state
    dict (safetensors holds tensors only; ``--select`` and the prefix options are about a state dict's keys)."""
    return (
        fmt == "torch"
        and not options.state_dict
        and report.format in GRAPH_FORMATS
        and options.select is None
        and not options.strip_prefix
        and not options.add_prefix
    )


def _refuse_dangerous(report: Report, options: ConvertOptions) -> list[Finding]:
    """A whole-checkpoint .pt copies the input's pickle, calls included: one statecli flags as dangerous would
    be handed on to every later ``torch.load``. Refused unless the user asks for it by name, and then said."""
    dangerous = [f for f in report.findings if f.level == "dangerous"]
    if dangerous and options.allow_dangerous:
        return [
            Finding(
                "warning",
                "dangerous-copied",
                f"--allow-dangerous: the output's pickle holds what the input's does "
                f"({count(len(dangerous), 'dangerous finding')}); torch.load(weights_only=False) of it would run "
                "that code",
            )
        ]
    if dangerous:
        raise UnsafeError(
            f"{dangerous[0].message} ({dangerous[0].code}"
            + (f", and {len(dangerous) - 1} more" if len(dangerous) > 1 else "")
            + "). Converting the whole checkpoint to a .pt would copy that into the output, so it is refused: "
            "--allow-dangerous copies it through verbatim (statecli still never runs it); --state-dict, --select "
            "KEY or a .safetensors output writes only the tensors",
            path=report.path,
        )
    return []


def _optimizer_decision(
    t: TensorInfo,
    own: tuple[str, str, str],
    options: ConvertOptions,
    owners: dict[str, str],
    planned: dict[str, PlanItem],
) -> tuple[str, str, str]:
    """Optimizer state as ``Optimizer.load_state_dict`` treats it: ``step`` keeps its dtype; the rest follows
    its parameter's dtype (which is what it becomes at load anyway), unless ``--keep-optimizer-dtype``."""
    if own[0] != "cast":
        return own
    if t.name.rpartition(".")[2] == "step":
        return "keep", t.dtype, "optimizer step count: never changes (as Optimizer.load_state_dict)"
    if options.keep_optimizer_dtype:
        return "keep", t.dtype, "optimizer state: --keep-optimizer-dtype"
    owner = planned.get(owners.get(t.name.rpartition(".")[0], ""))
    if owner is None:
        return own
    if owner.action != "cast":
        return "keep", t.dtype, f"follows its parameter {owner.name} (kept)"
    return "cast", owner.dst_dtype, f"{t.dtype} → {owner.dst_dtype} (follows its parameter {owner.name})"


def _check_storage_types(items: list[PlanItem], path: str) -> None:
    """A cast in a whole-checkpoint .pt changes a storage's class: both dtypes need one (see STORAGE_CLASS)."""
    for i in items:
        if i.action == "cast" and (i.src_dtype not in STORAGE_CLASS or i.dst_dtype not in STORAGE_CLASS):
            odd = i.src_dtype if i.src_dtype not in STORAGE_CLASS else i.dst_dtype
            raise _NoStorageClass(
                f"cannot cast {i.name!r} ({i.src_dtype} → {i.dst_dtype}) inside a whole checkpoint: torch pickles "
                f"{odd} storages untyped, with the dtype in each tensor's rebuild call, which statecli copies "
                f"as it is; {STATE_DICT_INSTEAD}, or leave it as it is with --exclude '{i.name}'"
            )


def _collision(first: str, second: str, out: str, options: ConvertOptions) -> StatecliError:
    """Two tensors for one output name. Only the options the user gave can cause that (the readers refuse a
    file with two tensors of one name), and only they are named."""
    given = [
        flag
        for flag, on in (
            ("--select", options.select is not None),
            ("--strip-prefix", bool(options.strip_prefix)),
            ("--add-prefix", bool(options.add_prefix)),
        )
        if on
    ]
    if not given:
        return InputError(f"the input holds two tensors named {out!r}")
    return UsageError(
        f"tensors {first!r} and {second!r} would both be named {out!r} after {' and '.join(given)}; "
        f"change {' / '.join(given)} to tell them apart"
    )


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_globs(
    report: Report, options: ConvertOptions, names: Iterable[tuple[str, str, str]], dropped: list[Dropped]
) -> list[Finding]:
    """Every ``--only`` glob must match a tensor the output holds; an ``--exclude`` glob that matches none
    is a warning. A mistyped ``--only`` would otherwise write every tensor in its old dtype and exit 0;
    one exclude list is often applied to many models, so an exclude glob may fit only some of them.

    A glob matches as ``_dtype_decision`` matches: any of the output name, the name inside --select and
    the name in the file. The check is the same with or without --dtype, so a command line that passes
    a dry run without --dtype does not fail once --dtype is added.
    """
    globs = list(dict.fromkeys((*options.only, *options.exclude)))
    pending = [(g, re.compile(translate(g)).match) for g in globs]
    for triple in names:
        if not pending:
            break
        pending = [(g, m) for g, m in pending if not any(m(n) for n in triple)]
    unmatched = {g for g, _ in pending}
    bad_only = [g for g in options.only if g in unmatched]
    if bad_only:
        which = " and ".join(f"--only {g!r}" for g in bad_only)
        verb = "matches" if len(bad_only) == 1 else "match"
        left_out = [(g, d) for g in bad_only for d in dropped if fnmatchcase(d.name, g)]
        hint = ""
        if left_out:
            g, d = left_out[0]
            hint = f" ({g!r} matches only tensors left out: {d.name}, {d.reason})"
        raise UsageError(
            f"{which} {verb} no tensor in {report.path}{hint}: a mistyped glob would leave tensors in their "
            "dtype. A glob matches a tensor's name in the file, inside --select, or in the output (after "
            "--strip-prefix / --add-prefix); statecli inspect lists the names"
        )
    notes = [
        Finding("warning", "exclude-matches-nothing", f"--exclude {g!r} matches no tensor: it leaves nothing out")
        for g in options.exclude
        if g in unmatched
    ]
    if options.dtype is None and (options.only or options.exclude):
        notes.append(
            Finding(
                "warning",
                "globs-without-dtype",
                "--only / --exclude choose what --dtype casts; without --dtype nothing is cast",
            )
        )
    return notes


def _left_out(names: list[str], reason: str) -> str:
    """``1 tensor left out (anchor): <reason>``; a few names are worth a line, thirty optimizer moments
    are not (the JSON plan lists every one under ``dropped``)."""
    n = len(names)
    shown = f" ({', '.join(names)})" if n <= MAX_NAMED_LEFT_OUT else ""
    return f"{count(n, 'tensor')} left out{shown}: {reason}"


def _tied_note(tied: list[PlanItem]) -> str:
    """What a safetensors output does with tied names, and how a user gets them back."""
    loaders = "safetensors.torch.load_file and a strict load_state_dict will not see"
    if len(tied) == 1:
        (t,) = tied
        return (
            f"{t.name} shares memory with {t.alias_of} and is stored once, as statecli metadata: {loaders} it. "
            "statecli.load restores it, as does the model's tie_weights() after a non-strict load; --untie "
            "writes it as its own tensor"
        )
    shown = f" ({', '.join(t.name for t in tied)})" if len(tied) <= MAX_NAMED_LEFT_OUT else ""
    return (
        f"{len(tied):,} tensors{shown} share memory with others and are stored once, as statecli metadata: "
        f"{loaders} them. statecli.load restores them, as does the model's tie_weights() after a non-strict "
        "load; --untie writes each as its own tensor"
    )


def _refuse_for_dcp(items: list[PlanItem], options: ConvertOptions) -> None:
    """What a DCP checkpoint written by one process cannot hold, refused before any work."""
    if options.verify:
        raise UsageError(
            "--verify does not read DCP output back yet (names, shapes and dtypes are always checked); "
            "torch.distributed.checkpoint.format_utils.dcp_to_torch_save reads it for a check of its own"
        )
    quantized = [i.name for i in items if i.source.quantizer is not None]
    if quantized:
        raise UsageError(
            f"a DCP checkpoint holds plain tensors; {count(len(quantized), 'quantized tensor')} "
            f"({name_list(quantized)}) would lose its scales: write a .pt instead"
        )


def _tie_units(items: list[PlanItem], untie: bool = False) -> None:
    """Tensors sharing memory are converted once, together: if one changes dtype, all do. A second name
    for the same view becomes an alias of the first, unless ``untie`` asks for every name to be written."""
    by_unit: dict[str, list[PlanItem]] = {}
    for i in items:
        by_unit.setdefault(i.unit, []).append(i)
    for members in by_unit.values():
        if len(members) == 1:
            continue
        leader = next((m for m in members if m.action == "cast"), None)
        seen_views: dict[tuple[Any, ...], str] = {}
        for m in members:
            if leader is not None and m.action != "cast":
                m.action, m.dst_dtype = "cast", leader.dst_dtype
                m.reason = f"{m.src_dtype} → {m.dst_dtype} (shares memory with {leader.name})"
            view = (m.source.storage_offset, m.source.shape, m.source.stride, m.src_dtype)
            first = seen_views.get(view)
            if first is not None and not untie:
                m.alias_of = first
            else:
                seen_views[view] = m.name
