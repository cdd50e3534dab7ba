"""``statecli diff``: what differs between two checkpoints, tensor by tensor, across formats.

Names first (only in A, only in B), then for each common tensor its shape, dtype, role, device and
storage sharing, then its values: max abs and max relative difference, cosine similarity, exact
equality, and whether every element is within ``|a - b| <= atol + rtol * |b|`` (torch.allclose's rule;
NaN equals NaN at the same position). Values are compared in float64 (complex128 for complex tensors,
by the magnitude of the difference), in chunks, so memory stays near the largest tensor. Quantized tensors
are compared exactly, whatever the tolerance: their integers and their quantizer (scheme, scale and zero
point, or per-channel ones and the axis); the maxima and cosine are those of their real values.

What fails a diff: a name on one side only, a shape change, values beyond tolerance, and nothing to
compare (no tensor on either side after the filters: a gate must not pass having compared nothing). A dtype change
alone does not (``fp32.pt`` vs ``bf16.safetensors`` passes at a tolerance that covers bf16 rounding);
role, device and sharing changes are notes. Values are read with :func:`statecli.tensors.values.iter_values`
and :class:`statecli.tensors.source.Source`, never with ``torch.load``: no pickle code runs.
torch is imported only when values are compared.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from statecli import dtypes
from statecli.clip import describe_name, quote
from statecli.errors import UsageError
from statecli.formats import read
from statecli.records import Finding, FindingCap, JsonFields, Quantizer, Report, TensorInfo, cap_findings
from statecli.tensors.quantized import ChannelParams, channel_params, is_quantized, read_view, unsupported
from statecli.tensors.source import Source
from statecli.tensors.values import StorageReader, iter_values, readable
from statecli.wording import count, name_list

if TYPE_CHECKING:
    import torch

SCHEMA = "statecli.diff/1"
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP / DataParallel, torch.compile, Lightning
MAX_WRAPPERS = 4  # module._orig_mod.model. ... nested wrappers stripped at most this deep
CHUNK_ELEMENTS = 1 << 20  # elements per chunk of float64 work: ~8 MiB per temporary

_INTEGERS = ("int", "uint", "bool")

# Status of a common tensor, worst first.
DIFFERS = "differs"  # shape change or values beyond tolerance: the diff fails
UNCHECKED = "unchecked"  # values not read on a side (packed, raw bits) or quantized against plain: not compared
CLOSE = "close"  # values within tolerance but not all exactly equal
CHANGED = "changed"  # values equal; dtype, role, device or sharing changed
IDENTICAL = "identical"


def _json_number(x: float | None) -> float | str | None:
    """JSON has no inf/NaN: they are written as the strings ``"inf"`` / ``"nan"``."""
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


@dataclass(slots=True)
class TensorDiff:
    """One tensor present on both sides: its metadata on each, and how its values compare.

    ``equal``, ``within_tolerance``, ``max_abs``, ``max_rel`` and ``mismatched`` are ``None`` when the
    values were not compared (a shape change, or a dtype statecli does not read). ``cosine`` is ``None``
    also when it is undefined: an all-zero side, or NaN/inf among the values.
    """

    name: str  # the compared name (after --normalize-prefixes)
    name_a: str  # as stored in each file
    name_b: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    role_a: str
    role_b: str
    device_a: str | None
    device_b: str | None
    max_abs: float | None = None  # max |a - b|, over positions where neither is NaN
    max_rel: float | None = None  # max |a - b| / |b|  (0 where a == b, inf where b == 0 != a)
    cosine: float | None = None
    equal: bool | None = None  # every value exactly equal (NaN where NaN)
    within_tolerance: bool | None = None
    mismatched: int | None = None  # values beyond tolerance (NaN against a number included)
    differences: tuple[str, ...] = ()  # of "shape", "dtype", "values", "role", "device", "sharing"
    notes: tuple[str, ...] = ()

    @property
    def fails(self) -> bool:
        return "shape" in self.differences or self.within_tolerance is False

    @property
    def status(self) -> str:
        if self.fails:
            return DIFFERS
        if self.equal is None:
            return UNCHECKED
        if not self.equal:
            return CLOSE
        return CHANGED if self.differences else IDENTICAL

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "name_a": self.name_a,
            "name_b": self.name_b,
            "status": self.status,
            "differences": list(self.differences),
            "shape_a": list(self.shape_a),
            "shape_b": list(self.shape_b),
            "dtype_a": self.dtype_a,
            "dtype_b": self.dtype_b,
            "role_a": self.role_a,
            "role_b": self.role_b,
            "device_a": self.device_a,
            "device_b": self.device_b,
            "max_abs": _json_number(self.max_abs),
            "max_rel": _json_number(self.max_rel),
            "cosine": _json_number(self.cosine),
            "equal": self.equal,
            "within_tolerance": self.within_tolerance,
            "mismatched": self.mismatched,
            "notes": list(self.notes),
        }


@dataclass(frozen=True, slots=True)
class DiffSummary(JsonFields):
    tensors_a: int  # after the filters
    tensors_b: int
    common: int
    identical: int
    changed: int  # common tensors with any difference (the sum of the four below)
    differs: int
    close: int
    metadata_only: int  # status "changed": equal values, other metadata changed
    unchecked: int
    only_in_a: int
    only_in_b: int


@dataclass(slots=True)
class DiffReport:
    """Everything ``statecli diff`` found. ``to_dict()`` is ``--format json``; the table shows the same."""

    path_a: str
    path_b: str
    format_a: str
    format_b: str
    atol: float
    rtol: float
    prefix_a: str  # the wrapper prefix stripped from A's model names ("" when none)
    prefix_b: str
    tensors: tuple[TensorDiff, ...]  # the common tensors, in A's order
    only_in_a: tuple[TensorInfo, ...]  # named as compared (prefix stripped), in file order
    only_in_b: tuple[TensorInfo, ...]
    notes: tuple[Finding, ...] = ()
    tensors_a: int = 0
    tensors_b: int = 0

    @property
    def changed(self) -> list[TensorDiff]:
        return [t for t in self.tensors if t.status != IDENTICAL]

    @property
    def nothing_compared(self) -> bool:
        """Neither side kept a tensor (the filters matched none, or both files hold none)."""
        return not self.tensors_a and not self.tensors_b

    @property
    def same(self) -> bool:
        """Something was compared, no name on one side only, no shape change, every value within tolerance."""
        return (
            not self.nothing_compared
            and not self.only_in_a
            and not self.only_in_b
            and not any(t.fails for t in self.tensors)
        )

    @property
    def summary(self) -> DiffSummary:
        counts = {DIFFERS: 0, CLOSE: 0, CHANGED: 0, UNCHECKED: 0, IDENTICAL: 0}
        for t in self.tensors:
            counts[t.status] += 1
        return DiffSummary(
            tensors_a=self.tensors_a,
            tensors_b=self.tensors_b,
            common=len(self.tensors),
            identical=counts[IDENTICAL],
            changed=len(self.tensors) - counts[IDENTICAL],
            differs=counts[DIFFERS],
            close=counts[CLOSE],
            metadata_only=counts[CHANGED],
            unchecked=counts[UNCHECKED],
            only_in_a=len(self.only_in_a),
            only_in_b=len(self.only_in_b),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "paths": {"a": self.path_a, "b": self.path_b},
            "formats": {"a": self.format_a, "b": self.format_b},
            "prefixes": {"a": self.prefix_a, "b": self.prefix_b},
            "tolerance": {"atol": self.atol, "rtol": self.rtol},
            "only_in_a": [t.name for t in self.only_in_a],
            "only_in_b": [t.name for t in self.only_in_b],
            "changed": [t.to_dict() for t in self.changed],
            "identical": [t.name for t in self.tensors if t.status == IDENTICAL],
            "notes": [n.to_dict() for n in self.notes],
            "summary": self.summary.to_dict(),
            "same": self.same,
        }


# --------------------------------------------------------------------------------------- the API


def diff(
    a: Report | str | os.PathLike[str],
    b: Report | str | os.PathLike[str],
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    normalize_prefixes: bool = False,
    roles: Iterable[str] | None = None,
    match: Iterable[str] | None = None,
    dtypes: Iterable[str] | None = None,
) -> DiffReport:
    """Compare two checkpoints (paths of any format statecli reads, or reports already opened).

    ``normalize_prefixes`` strips a wrapper prefix (``module.``, ``_orig_mod.``, ``model.``) from a
    side's model tensors when every one of them has it, as deep as makes the most names match.
    ``roles``, ``match`` (shell globs on the compared names) and ``dtypes`` (canonical names) keep only some
    tensors, on each side by its own role and dtype.
    Raises :class:`~statecli.errors.UsageError` for a negative or non-finite tolerance, and a
    :class:`~statecli.errors.StatecliError` for a file or bytes that cannot be read.
    """

    _check_tolerance(atol, rtol)
    if not isinstance(a, Report):
        a = read(os.fspath(a))
    if not isinstance(b, Report):
        b = read(os.fspath(b))
    notes: list[Finding] = []
    prefix_a, prefix_b, hint = _choose_prefixes(a.tensors, b.tensors)
    if not normalize_prefixes:
        if hint:
            notes.append(Finding("info", "prefix-hint", hint))
        prefix_a = prefix_b = ""
    else:
        for side, prefix in (("A", prefix_a), ("B", prefix_b)):
            if prefix:
                stripped = f"{side}: {quote(prefix)} stripped from model tensor names"
                notes.append(Finding("info", "prefix-stripped", stripped))
    rename_a = _renamer(a.tensors, prefix_a)
    rename_b = _renamer(b.tensors, prefix_b)
    role_set = set(roles) if roles else None
    globs = list(match) if match else None
    dtype_set = set(dtypes) if dtypes else None

    def kept(tensors: tuple[TensorInfo, ...], rename: dict[str, str]) -> dict[str, TensorInfo]:
        return {
            rename[t.name]: t
            for t in tensors
            if (role_set is None or t.role in role_set)
            and (globs is None or any(fnmatchcase(rename[t.name], g) for g in globs))
            and (dtype_set is None or t.dtype in dtype_set)
        }

    side_a = kept(a.tensors, rename_a)
    side_b = kept(b.tensors, rename_b)
    if not side_a and not side_b:
        notes.append(Finding("warning", "nothing-compared", _nothing_compared(a, b, role_set, globs, dtype_set)))
    common = [n for n in side_a if n in side_b]
    diffs = {n: _metadata_diff(n, side_a[n], side_b[n], rename_a, rename_b) for n in common}
    _compare_values(a, b, side_a, side_b, diffs, atol, rtol)

    only_a = tuple(replace(t, name=n) for n, t in side_a.items() if n not in side_b)
    only_b = tuple(replace(t, name=n) for n, t in side_b.items() if n not in side_a)
    notes += _only_in_notes(only_a, side_a, rename_a, side_b, "A", "B")
    notes += _only_in_notes(only_b, side_b, rename_b, side_a, "B", "A")
    unchecked = [d for d in diffs.values() if d.status == UNCHECKED]
    if unchecked:
        notes.append(
            Finding(
                "warning",
                "values-not-compared",
                f"the values of {count(len(unchecked), 'tensor')} were not compared "
                f"({_listing([d.name for d in unchecked])}): see their notes",
            )
        )
    return DiffReport(
        path_a=a.path,
        path_b=b.path,
        format_a=a.format,
        format_b=b.format,
        atol=float(atol),
        rtol=float(rtol),
        prefix_a=prefix_a,
        prefix_b=prefix_b,
        tensors=tuple(diffs[n] for n in common),
        only_in_a=only_a,
        only_in_b=only_b,
        notes=tuple(cap_findings(notes)),
        tensors_a=len(side_a),
        tensors_b=len(side_b),
    )


def _nothing_compared(
    a: Report, b: Report, roles: set[str] | None, globs: list[str] | None, dtypes: set[str] | None = None
) -> str:
    """Why the diff has nothing to compare, naming the filters the way they are typed."""
    filters = [f"--role {r}" for r in sorted(roles or ())] + [f"--match {g!r}" for g in globs or ()]
    filters += [f"--dtype {d}" for d in sorted(dtypes or ())]
    if not filters:
        return "neither A nor B holds a tensor: nothing was compared"
    return (
        f"no tensor matches the filters ({' '.join(filters)}) in A ({count(len(a.tensors), 'tensor')}) "
        f"or B ({count(len(b.tensors), 'tensor')}): nothing was compared"
    )


def _check_tolerance(atol: float, rtol: float) -> None:
    for flag, value in (("--atol", atol), ("--rtol", rtol)):
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{flag} must be a finite number >= 0, not {value!r}")


def _listing(names: list[str], at_most: int = 3) -> str:
    shown = ", ".join(describe_name(n) for n in names[:at_most])
    return shown + (f" and {len(names) - at_most:,} more" if len(names) > at_most else "")


# ----------------------------------------------------------------------------------- names


def _model_names(tensors: Iterable[TensorInfo]) -> list[str]:
    return [t.name for t in tensors if t.group == "model"]


def _wrapper_levels(names: list[str]) -> list[str]:
    """The wrapper prefixes every name has, outermost first (``["module.", "_orig_mod."]``)."""
    levels: list[str] = []
    while names and len(levels) < MAX_WRAPPERS:
        prefix = next((p for p in WRAPPER_PREFIXES if all(n.startswith(p) and len(n) > len(p) for n in names)), None)
        if prefix is None:
            break
        levels.append(prefix)
        names = [n[len(prefix) :] for n in names]
    return levels


def _renamer(tensors: tuple[TensorInfo, ...], prefix: str) -> dict[str, str]:
    """Stored name -> compared name: ``prefix`` off the model tensors, other names as they are."""
    return {t.name: t.name[len(prefix) :] if prefix and t.group == "model" else t.name for t in tensors}


def _choose_prefixes(a: tuple[TensorInfo, ...], b: tuple[TensorInfo, ...]) -> tuple[str, str, str]:
    """(prefix for A, prefix for B, a hint when stripping would match more names than not).

    Each side may lose any depth of its own wrapper prefixes; the pair that makes the most names
    common wins, the least stripping on a tie. Stripping never merges two names into one.
    """
    names_a, names_b = _model_names(a), _model_names(b)
    levels_a, levels_b = _wrapper_levels(names_a), _wrapper_levels(names_b)
    if not levels_a and not levels_b:
        return "", "", ""
    rest_a = {t.name for t in a if t.group != "model"}
    rest_b = {t.name for t in b if t.group != "model"}
    best = (-1, 0, "", "")
    for i in range(len(levels_a) + 1):
        pa = "".join(levels_a[:i])
        stripped_a = {n[len(pa) :] for n in names_a}
        if stripped_a & rest_a:
            continue
        for j in range(len(levels_b) + 1):
            pb = "".join(levels_b[:j])
            stripped_b = {n[len(pb) :] for n in names_b}
            if stripped_b & rest_b:
                continue
            score = (len(stripped_a & stripped_b), -(i + j))
            if score > best[:2]:
                best = (*score, pa, pb)
    if best[0] < 0:
        return "", "", ""
    _, _, pa, pb = best
    matched = best[0]
    plain = len(set(names_a) & set(names_b))
    hint = ""
    if matched > plain:
        stripped = " and ".join(f"{side} {p!r}" for side, p in (("A", pa), ("B", pb)) if p)
        hint = (
            f"--normalize-prefixes would match {count(matched, 'model tensor')} by name "
            f"(stripping {stripped}); now {plain:,} match"
        )
    return pa, pb, hint


def _only_in_notes(
    only: tuple[TensorInfo, ...],
    side: dict[str, TensorInfo],
    rename: dict[str, str],
    other: dict[str, TensorInfo],
    here: str,
    there: str,
) -> list[Finding]:
    """Hints for the names on one side only: a tied weight saved once, or state that is not the model's."""
    notes = FindingCap()  # one per tensor: a million tied tensors only on one side would be a million notes
    for t in only:
        tied = [rename.get(s, s) for s in side[t.name].shares_with]
        kept = [s for s in tied if s in other]
        if kept and notes.full("tied-only-in"):
            notes.count("tied-only-in", "info")
        elif kept:
            notes.add(
                Finding(
                    "info",
                    "tied-only-in",
                    f"{describe_name(t.name)} is only in {here}, where it shares memory with {name_list(kept)}: "
                    f"a tied weight that {there} stores once?",
                )
            )
    transient = [t.name for t in only if t.persistent is False]
    if transient:
        notes.add(
            Finding(
                "info",
                "non-persistent-only-in",
                f"{count(len(transient), 'non-persistent buffer')} only in {here} ({name_list(transient)}): "
                "a whole module keeps non-persistent buffers, state_dict() and statecli convert leave them out",
            )
        )
    other_state = [t for t in only if t.role == "other"]
    if other_state and len(other_state) == len(only):
        groups = sorted({t.group for t in other_state})
        notes.add(
            Finding(
                "info",
                "not-model-state",
                f"the {count(len(only), 'tensor')} only in {here} are not model state ({name_list(groups)}); "
                "compare the model alone with --role parameter --role buffer",
            )
        )
    return notes.findings()


# -------------------------------------------------------------------------------- metadata


def _metadata_diff(
    name: str, ta: TensorInfo, tb: TensorInfo, rename_a: dict[str, str], rename_b: dict[str, str]
) -> TensorDiff:
    differences: list[str] = []
    notes: list[str] = []
    if ta.shape != tb.shape:
        differences.append("shape")
    if ta.dtype != tb.dtype:
        differences.append("dtype")
    if ta.role != tb.role:
        differences.append("role")
        notes.append(f"role {ta.role} → {tb.role}")
    # safetensors stores no device: a device is only compared where both files state one.
    if ta.device is not None and tb.device is not None and ta.device != tb.device:
        differences.append("device")
        notes.append(f"device {ta.device} → {tb.device}")
    shares_a = sorted({rename_a.get(s, s) for s in ta.shares_with})
    shares_b = sorted({rename_b.get(s, s) for s in tb.shares_with})
    if shares_a != shares_b:
        differences.append("sharing")
        only_a = [s for s in shares_a if s not in shares_b]
        only_b = [s for s in shares_b if s not in shares_a]
        if only_a:
            notes.append(f"shares memory with {name_list(only_a)} in A only")
        if only_b:
            notes.append(f"shares memory with {name_list(only_b)} in B only")
    return TensorDiff(
        name=name,
        name_a=ta.name,
        name_b=tb.name,
        shape_a=ta.shape,
        shape_b=tb.shape,
        dtype_a=ta.dtype,
        dtype_b=tb.dtype,
        role_a=ta.role,
        role_b=tb.role,
        device_a=ta.device,
        device_b=tb.device,
        within_tolerance=False if "shape" in differences else None,
        differences=tuple(differences),
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------------- values


@dataclass(slots=True)
class ValueStats:
    """How the values of two same-shaped tensors compare (see :class:`TensorDiff`)."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    cosine: float | None = None
    equal: bool = True
    mismatched: int = 0  # values beyond tolerance
    nan_mismatched: int = 0  # NaN on one side, a number on the other


@dataclass(slots=True)
class _Running:
    """How :func:`compare_tensors` compares (fixed for the tensor) and what it adds up chunk by chunk."""

    work: torch.dtype  # float64, or complex128 when a side is complex
    exact: torch.dtype | None  # the dtype that compares integers exactly, None for floating
    has_nan: bool
    atol: float
    rtol: float
    stats: ValueStats = field(default_factory=ValueStats)
    dot: float = 0.0
    norm_a: float = 0.0  # squared norms
    norm_b: float = 0.0
    finite: bool = True  # no NaN/inf seen: the cosine is defined


def _compare_values(
    a: Report,
    b: Report,
    side_a: dict[str, TensorInfo],
    side_b: dict[str, TensorInfo],
    diffs: dict[str, TensorDiff],
    atol: float,
    rtol: float,
) -> None:
    """Fill the value fields of ``diffs``: A streamed in file order, B read by name alongside."""
    compare = {t.name: n for n, t in side_a.items() if n in diffs and "shape" not in diffs[n].differences}
    quantized = {k: n for k, n in compare.items() if is_quantized(side_a[n]) or is_quantized(side_b[n])}
    if quantized:
        _compare_quantized(a, b, side_a, side_b, diffs, list(quantized.values()))
        compare = {k: n for k, n in compare.items() if k not in quantized}
    if not compare:
        return
    with warnings.catch_warnings(), StorageReader(b) as reader_b:
        warnings.filterwarnings("ignore", message="ComplexHalf support is experimental")
        for ta, values_a in iter_values(a, keep=lambda t: t.name in compare):
            name = compare[ta.name]
            d = diffs[name]
            tb = side_b[name]
            why = readable(ta) if values_a is None else readable(tb)
            if why is not None:
                side = "A" if values_a is None else "B"
                d.notes = (*d.notes, f"values not compared ({side}: {why})")
                continue
            assert values_a is not None
            stats = compare_tensors(values_a, reader_b.values(tb), atol, rtol)
            _fill(d, stats)


def _fill(d: TensorDiff, s: ValueStats) -> None:
    d.max_abs, d.max_rel, d.cosine = s.max_abs, s.max_rel, s.cosine
    d.equal = s.equal
    d.mismatched = s.mismatched
    d.within_tolerance = s.mismatched == 0
    notes = list(d.notes)
    if not s.equal:
        d.differences = (*d.differences, "values")
    if s.mismatched:
        notes.append(f"{count(s.mismatched, 'value')} beyond tolerance")
    if s.nan_mismatched:
        notes.append(f"{s.nan_mismatched:,} NaN where the other side has a number")
    d.notes = tuple(notes)


def _exact_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype | None:
    """The dtype to test integer equality in exactly (float64 loses integers beyond 2**53); ``None``
    where float64 (complex128) is exact already: any floating or complex side."""
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    kinds = {dtypes.DTYPES[str(x).removeprefix("torch.")].kind for x in (a, b)}
    if not kinds <= set(_INTEGERS):
        return None
    if a == b:
        return a
    if torch.uint64 in (a, b):
        return None  # torch does not promote uint64 with another integer; float64 decides
    return torch.int64


def compare_tensors(a: torch.Tensor, b: torch.Tensor, atol: float = 0.0, rtol: float = 0.0) -> ValueStats:
    """Compare two tensors of one shape, element by element, in chunks of :data:`CHUNK_ELEMENTS`.

    Elements are in float64 (complex128 when either side is complex: ``|a - b|`` is the magnitude).
    An element passes when it is exactly equal, NaN on both sides, or finite on both sides with
    ``|a - b| <= atol + rtol * |b|``; with both tolerances 0 only exact equality passes (integers are
    compared exactly, not through float64).
    """
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    work = torch.complex128 if a.is_complex() or b.is_complex() else torch.float64
    exact = _exact_dtype(a.dtype, b.dtype)
    has_nan = a.is_floating_point() or a.is_complex() or b.is_floating_point() or b.is_complex()
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)  # a copy only for a non-contiguous view
    run = _Running(work, exact, has_nan, atol, rtol)
    for start in range(0, flat_a.numel(), CHUNK_ELEMENTS):
        ra, rb = flat_a[start : start + CHUNK_ELEMENTS], flat_b[start : start + CHUNK_ELEMENTS]
        _compare_chunk(ra, rb, run)
    return _finish(run)


def _finish(run: _Running) -> ValueStats:
    """The stats once every chunk went through :func:`_compare_chunk`, with the cosine where it is defined."""
    stats = run.stats
    if run.finite and run.norm_a > 0 and run.norm_b > 0:
        if stats.equal:
            stats.cosine = 1.0
        else:
            cos = run.dot / (math.sqrt(run.norm_a) * math.sqrt(run.norm_b))
            stats.cosine = max(-1.0, min(1.0, cos)) if math.isfinite(cos) else None
    return stats


def _compare_chunk(ra: torch.Tensor, rb: torch.Tensor, run: _Running) -> None:
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    stats = run.stats
    work, exact, atol, rtol = run.work, run.exact, run.atol, run.rtol
    ca, cb = ra.to(work), rb.to(work)
    d = (ca - cb).abs()  # float64 also for complex: the magnitude
    d_max = float(d.max()) if d.numel() else 0.0  # NaN if any side has NaN or the same inf on both
    if not math.isfinite(d_max):
        _compare_nonfinite(ca, cb, d, ra, rb, run)
        return
    # Every value finite on both sides: one max decides equality, except for integers beyond 2**53.
    # unequal: how many differ, or -1 for "some, not counted yet"
    unequal = int(torch.count_nonzero(ra.to(exact) != rb.to(exact))) if exact is not None else -int(d_max != 0)
    if unequal:
        stats.equal = False
        stats.max_abs = max(stats.max_abs, d_max)
        mag_b = cb.abs()
        if atol == 0 and rtol == 0:
            stats.mismatched += unequal if unequal > 0 else int(torch.count_nonzero(d))
        else:
            stats.mismatched += int(torch.count_nonzero(d > mag_b * rtol + atol))
        rel = d.div_(mag_b).nan_to_num_(nan=0.0, posinf=math.inf)  # 0 / 0 = 0: equal; x / 0 = inf
        stats.max_rel = max(stats.max_rel, float(rel.max()))
    if run.finite:
        _accumulate_norms(ca, cb, run)


def _compare_nonfinite(
    ca: torch.Tensor, cb: torch.Tensor, d: torch.Tensor, ra: torch.Tensor, rb: torch.Tensor, run: _Running
) -> None:
    """A chunk with NaN or inf on a side: inf equals only the same inf, NaN only NaN; no cosine."""
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    stats = run.stats
    exact, has_nan, atol, rtol = run.exact, run.has_nan, run.atol, run.rtol
    run.finite = False
    eq = (ra.to(exact) == rb.to(exact)) if exact is not None else (ca == cb)
    if has_nan:
        nan_a, nan_b = ca.isnan(), cb.isnan()
        eq |= nan_a & nan_b
        stats.nan_mismatched += int(torch.count_nonzero(nan_a ^ nan_b))
    n = eq.numel()
    equal_count = int(torch.count_nonzero(eq))
    if equal_count == n:
        return
    stats.equal = False
    d.masked_fill_(eq, 0.0)  # inf == inf, and positions NaN on both sides
    mag_b = cb.abs()
    if atol == 0 and rtol == 0:
        ok_count = equal_count
    else:
        # inf passes only against the same inf (eq); NaN against a number fails (d is NaN)
        close = (d <= atol + rtol * mag_b) & torch.isfinite(ca) & torch.isfinite(cb)
        ok_count = int(torch.count_nonzero(eq | close))
    stats.mismatched += n - ok_count
    d.nan_to_num_(nan=0.0, posinf=math.inf)  # NaN against a number: counted, left out of the maxima
    stats.max_abs = max(stats.max_abs, float(d.max()))
    rel = torch.where(d == 0, 0.0, d / mag_b)  # x / 0 = inf
    rel.nan_to_num_(nan=math.inf, posinf=math.inf)  # inf / inf: an infinite difference
    stats.max_rel = max(stats.max_rel, float(rel.max()))


def _accumulate_norms(ca: torch.Tensor, cb: torch.Tensor, run: _Running) -> None:
    """Add a finite chunk to the dot product and squared norms behind the cosine."""
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    if ca.is_complex():
        # The real part of <a, b>: the cosine of the tensors seen as real vectors of (re, im) pairs.
        run.dot += float(torch.vdot(cb, ca).real)
        run.norm_a += float(torch.vdot(ca, ca).real)
        run.norm_b += float(torch.vdot(cb, cb).real)
    else:
        run.dot += float(torch.dot(ca, cb))
        run.norm_a += float(torch.dot(ca, ca))
        run.norm_b += float(torch.dot(cb, cb))


# ------------------------------------------------------------------------------- quantized values


@dataclass(slots=True)
class _Quantized:
    """A quantized tensor as the file holds it: its integers (CPU, its shape) and its quantizer."""

    t: TensorInfo
    q: Quantizer
    ints: torch.Tensor
    params: ChannelParams | None  # per channel: (scales, zero points)


def _compare_quantized(
    a: Report,
    b: Report,
    side_a: dict[str, TensorInfo],
    side_b: dict[str, TensorInfo],
    diffs: dict[str, TensorDiff],
    names: list[str],
) -> None:
    """Compare the quantized tensors among the common ones exactly: integers and quantizer (a new scale alone
    is a difference, whatever the tolerance). A quantized tensor against a plain one is not compared."""
    with Source(a, check_crc=False) as source_a, Source(b, check_crc=False) as source_b:
        for name in names:
            d, ta, tb = diffs[name], side_a[name], side_b[name]
            why = _not_comparable(ta, tb)
            if why is not None:
                d.notes = (*d.notes, f"values not compared ({why})")
                continue
            _fill_quantized(d, _read_quantized(source_a, ta), _read_quantized(source_b, tb))


def _read_quantized(source: Source, t: TensorInfo) -> _Quantized:
    q = t.quantizer
    assert q is not None  # _not_comparable: unsupported() is None
    return _Quantized(t, q, read_view(source, t), channel_params(source, q))


def _not_comparable(ta: TensorInfo, tb: TensorInfo) -> str | None:
    if not (is_quantized(ta) and is_quantized(tb)):
        return f"A is {_kind(ta)}, B is {_kind(tb)}: a quantized tensor is compared only with a quantized one"
    for side, t in (("A", ta), ("B", tb)):
        why = unsupported(t)
        if why is not None:
            return f"{side}: quantized {t.dtype}: {why}"
    return None


def _kind(t: TensorInfo) -> str:
    return f"quantized {t.dtype}" if is_quantized(t) else t.dtype


def _same(x: float | None, y: float | None) -> bool:
    return x == y or (x is not None and y is not None and math.isnan(x) and math.isnan(y))


def _differ(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elements that differ; a NaN stored on both sides is the same NaN."""
    return (x != y) & ~(x.isnan() & y.isnan()) if x.is_floating_point() else x != y


def _quantizer_notes(qa: _Quantized, qb: _Quantized) -> tuple[list[str], bool, torch.Tensor | None]:
    """What differs between the two quantizers, whether that changes every value, and (per channel, same axis
    and dtypes) which channels' scale or zero point differ."""
    a, b = qa.q, qb.q
    if a.per_channel != b.per_channel:
        return [f"qscheme {a.scheme} → {b.scheme}"], True, None
    if qa.params is None or qb.params is None:
        notes = [] if _same(a.scale, b.scale) else [f"scale {a.scale!r} → {b.scale!r}"]
        notes += [] if a.zero_point == b.zero_point else [f"zero point {a.zero_point} → {b.zero_point}"]
        return notes, bool(notes), None
    if a.axis != b.axis:
        return [f"per-channel axis {a.axis} → {b.axis}"], True, None
    pairs = list(zip(("scales", "zero points"), qa.params, qb.params, strict=True))
    # A dtype change (float zero points against integer ones) changes how every value is computed.
    notes = [f"per-channel {what} {_name(x)} → {_name(y)}" for what, x, y in pairs if x.dtype != y.dtype]
    if notes:
        return notes, True, None
    changed = [(what, _differ(x, y)) for what, x, y in pairs]
    for what, mask in changed:
        k = int(mask.sum())
        if k:
            notes.append(f"per-channel {what} differ in {k:,} of {mask.numel():,} channels")
    return notes, False, changed[0][1] | changed[1][1]


def _name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _channel_of(q: _Quantized, start: int, n: int) -> torch.Tensor | None:
    """The channel of each of the ``n`` flattened elements from ``start`` (None per tensor): in row-major
    order, element i lies in channel (i // inner) % channels, along the quantizer's axis."""
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    axis = q.q.axis
    if q.params is None or axis is None:
        return None
    inner = math.prod(q.t.shape[axis + 1 :])
    return torch.arange(start, start + n).floor_divide_(inner).remainder_(q.t.shape[axis])


def _dequantized(ints: torch.Tensor, q: _Quantized, channel: torch.Tensor | None) -> torch.Tensor:
    """The real values of a chunk of the flattened integers, in float64; ``channel``: :func:`_channel_of`."""
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    values = ints.to(torch.float64)
    if q.params is None or channel is None:
        return values.sub_(float(q.q.zero_point or 0)).mul_(float(q.q.scale or 0.0))
    scales, zero_points = q.params
    return values.sub_(zero_points.to(torch.float64)[channel]).mul_(scales.to(torch.float64)[channel])


def _fill_quantized(d: TensorDiff, qa: _Quantized, qb: _Quantized) -> None:
    """Fill ``d`` for two quantized tensors of one shape, in chunks of :data:`CHUNK_ELEMENTS`. A value differs
    where its integer, or the scale or zero point that applies to it, differs: ``equal``, ``mismatched`` and
    ``within_tolerance`` are exact, whatever --atol and --rtol. ``max_abs``, ``max_rel`` and ``cosine`` are
    those of the real (dequantized) values, as for any other tensor."""
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    notes, all_differ, channels = _quantizer_notes(qa, qb)
    flat_a, flat_b = qa.ints.reshape(-1), qb.ints.reshape(-1)  # a copy only for a non-contiguous view
    run = _Running(torch.float64, None, True, 0.0, 0.0)
    mismatched = ints_differ = 0
    for start in range(0, flat_a.numel(), CHUNK_ELEMENTS):
        ia, ib = flat_a[start : start + CHUNK_ELEMENTS], flat_b[start : start + CHUNK_ELEMENTS]
        channel_a, channel_b = _channel_of(qa, start, ia.numel()), _channel_of(qb, start, ib.numel())
        _compare_chunk(_dequantized(ia, qa, channel_a), _dequantized(ib, qb, channel_b), run)
        differ = ia.to(torch.int64) != ib.to(torch.int64)
        ints_differ += int(torch.count_nonzero(differ))
        if all_differ:
            mismatched += ia.numel()
            continue
        if channels is not None and channel_a is not None:  # same axis on both sides
            differ |= channels[channel_a]
        mismatched += int(torch.count_nonzero(differ))
    stats = _finish(run)
    d.max_abs, d.max_rel, d.cosine = stats.max_abs, stats.max_rel, stats.cosine
    d.equal = d.within_tolerance = mismatched == 0
    d.mismatched = mismatched
    if ints_differ:
        notes.append(f"{count(ints_differ, 'integer')} changed")
    if mismatched:
        d.differences = (*d.differences, "values")
        notes.append(f"quantized, compared exactly: {mismatched:,} of {count(flat_a.numel(), 'value')} changed")
    d.notes = (*d.notes, *notes)
