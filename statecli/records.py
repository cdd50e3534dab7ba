"""The records every command works on. Tables, CSV, Markdown and JSON are all views of these."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from typing import Any

SCHEMA = "statecli.report/1"


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("json", True))


# A field that a record carries for the commands, but that its JSON leaves out (see TensorInfo.quantizer).
NOT_IN_JSON = {"json": False}


def _plain(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    to_dict = getattr(v, "to_dict", None)
    return v if to_dict is None else to_dict()


def json_fields(record: Any) -> dict[str, Any]:
    """A record (a dataclass) as ``--format json`` writes it: its fields in declaration order, tuples as
    lists, nested records as their ``to_dict()``. Records whose JSON is exactly their fields use it, so a
    new field cannot be left out of the JSON."""
    return {name: _plain(getattr(record, name)) for name in _field_names(type(record))}


class JsonFields:
    """A record whose ``--format json`` is exactly its fields, in order (see :func:`json_fields`)."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        return json_fields(self)


ROLES = ("parameter", "buffer", "other")


@dataclass(frozen=True, slots=True)
class Finding(JsonFields):
    """Something about the file a user should know: ``level`` is info, warning or dangerous."""

    level: str
    code: str
    message: str


MAX_FINDINGS_PER_CODE = 100  # findings of one code listed one by one; the rest are counted in one more
MAX_FINDINGS = 1_000  # findings of one report in all
_LEVEL_ORDER = {"dangerous": 0, "warning": 1, "info": 2}
_SUMMARY = re.compile(r"([0-9,]+) more (\S+) findings? not listed\Z")  # what FindingCap.findings writes


class FindingCap:
    """Findings as they come, keeping at most ``per_code`` of each code and counting the rest: a reader
    that finds the same thing about a million entries holds a hundred findings, not a million."""

    __slots__ = ("kept", "left", "per_code", "seen")

    def __init__(self, per_code: int = MAX_FINDINGS_PER_CODE) -> None:
        self.per_code = per_code
        self.kept: list[Finding] = []
        self.seen: dict[str, int] = {}
        self.left: dict[str, list[Any]] = {}  # code -> [count, most severe level]

    def full(self, code: str) -> bool:
        """Whether a finding of ``code`` would only be counted (so its message need not be built)."""
        return self.seen.get(code, 0) >= self.per_code

    def add(self, f: Finding) -> None:
        if is_summary(f):
            # A summary from an earlier cap (a shard's, a nested reader's): its count joins this one's.
            _merge(self.left, f.code, f.level, int(f.message.split(" ", 1)[0].replace(",", "")))
            return
        n = self.seen.get(f.code, 0)
        self.seen[f.code] = n + 1
        if n < self.per_code:
            self.kept.append(f)
        else:
            _merge(self.left, f.code, f.level, 1)

    def count(self, code: str, level: str) -> None:
        """One more finding of ``code`` at ``level``, counted without its message (see :meth:`full`)."""
        _merge(self.left, code, level, 1)

    def extend(self, findings: Iterable[Finding]) -> None:
        for f in findings:
            self.add(f)

    def findings(self, total: int = MAX_FINDINGS) -> list[Finding]:
        """The findings kept, at most ``total`` (the most severe kept first), then one ``N more <code>
        findings`` per code for what was left out, at the level of the most severe one it stands for (a
        dangerous finding left out still fails ``check``)."""
        kept = self.kept
        left = {code: list(entry) for code, entry in self.left.items()}
        if len(kept) > total:
            ranked = sorted(kept, key=lambda f: _LEVEL_ORDER.get(f.level, 3))  # stable
            dropped = {id(f) for f in ranked[total:]}
            for f in ranked[total:]:
                _merge(left, f.code, f.level, 1)
            kept = [f for f in kept if id(f) not in dropped]
        return kept + [more_findings(code, level, n) for code, (n, level) in left.items()]


def _merge(left: dict[str, list[Any]], code: str, level: str, n: int) -> None:
    """Count ``n`` findings of ``code`` left out; the count keeps the most severe level among them."""
    entry = left.get(code)
    if entry is None:
        left[code] = [n, level]
        return
    entry[0] += n
    if _LEVEL_ORDER.get(level, 3) < _LEVEL_ORDER.get(entry[1], 3):
        entry[1] = level


def more_findings(code: str, level: str, n: int) -> Finding:
    """The one finding that stands for ``n`` findings of ``code`` left out of a report."""
    return Finding(level, code, f"{n:,} more {code} finding{'s' if n != 1 else ''} not listed")


def is_summary(f: Finding) -> bool:
    """Whether ``f`` is a ``N more <code> findings`` count written by :class:`FindingCap`."""
    m = _SUMMARY.match(f.message) if f.message.endswith(" not listed") else None
    return m is not None and m.group(2) == f.code


def cap_findings(
    findings: Iterable[Finding], per_code: int = MAX_FINDINGS_PER_CODE, total: int = MAX_FINDINGS
) -> list[Finding]:
    """``findings`` with at most ``per_code`` of each code and ``total`` in all, in their order; what is left
    out is counted (see :class:`FindingCap`). A file with a million odd tensors gives a report of a few
    hundred lines, not a million."""
    cap = FindingCap(per_code)
    cap.extend(findings)
    return cap.findings(total)


@dataclass(slots=True)
class RawTensor:
    """What a format reader knows of one tensor before the role engine has looked at it.

    ``role``/``evidence``/``exact`` are filled by readers only from exact sources (a pickled module,
    Parameter objects, statecli's own metadata); everything else is left to :mod:`statecli.roles`.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...] | None = None
    storage_offset: int = 0
    device: str | None = None
    storage: str | None = None  # identifies the storage; equal keys mean shared memory
    storage_nbytes: int = 0
    group: str = "model"
    requires_grad: bool | None = None
    role: str | None = None
    evidence: str | None = None
    exact: bool = False
    persistent: bool | None = None
    is_parameter: bool = False  # an nn.Parameter object in the pickle
    layout: str = "strided"
    file: str | None = None  # the shard holding it, for sharded checkpoints
    quantizer: Quantizer | None = None  # a quantized tensor's, as its pickle states it


@dataclass(slots=True)
class TensorInfo(JsonFields):
    """One tensor with its role and the evidence for that role. Treat it as read-only.

    Not ``frozen``: a frozen dataclass's ``__init__`` goes through ``object.__setattr__`` per field,
    which more than doubles the cost of building 100,000 records.
    """

    name: str
    role: str
    exact: bool
    evidence: str
    persistent: bool | None
    requires_grad: bool | None
    dtype: str
    shape: tuple[int, ...]
    numel: int
    nbytes: int
    device: str | None
    shares_with: tuple[str, ...] = ()
    group: str = "model"
    stride: tuple[int, ...] | None = None
    storage_offset: int = 0
    storage: str | None = None
    layout: str = "strided"
    file: str | None = None
    # What convert, load and diff need to rebuild a quantized tensor; not in the JSON report, whose schema
    # (statecli.report/1) it would change for every reader of it.
    quantizer: Quantizer | None = field(default=None, metadata=NOT_IN_JSON)

    @property
    def trainable(self) -> str:
        """``trainable`` / ``frozen`` for parameters, ``no grad`` / ``requires grad`` for the rest,
        ``—`` when the file does not store it. A buffer without grad is normal, not "frozen"."""
        if self.requires_grad is None:
            return "—"
        if self.role == "parameter":
            return "trainable" if self.requires_grad else "frozen"
        return "requires grad" if self.requires_grad else "no grad"


@dataclass(frozen=True, slots=True)
class Quantizer:
    """How a quantized tensor's integers ``q`` stand for real numbers, ``(q - zero_point) * scale``, as its
    pickle (torch's ``_rebuild_qtensor``) states it.

    ``per_tensor_affine``: one ``scale`` and ``zero_point``. ``per_channel_affine`` (and
    ``per_channel_affine_float_qparams``): one of each per index along ``axis``, in ``scales`` and
    ``zero_points``, tensors of the file like any other (not listed among its tensors), read from their
    own storages.
    """

    scheme: str
    scale: float | None = None
    zero_point: int | None = None
    axis: int | None = None
    scales: TensorInfo | None = None
    zero_points: TensorInfo | None = None

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def moved(self, storage: Callable[[str], str], file: str | None = None) -> Quantizer:
        """The same quantizer once a reader renames storages (``data/0`` → ``legacy/0``, a shard's prefix):
        the scales and zero points live beside the tensor and are renamed with it."""
        if self.scales is None or self.zero_points is None:
            return self
        scales, zero_points = (
            dataclasses.replace(t, storage=storage(t.storage) if t.storage is not None else None, file=file or t.file)
            for t in (self.scales, self.zero_points)
        )
        return dataclasses.replace(self, scales=scales, zero_points=zero_points)


@dataclass(frozen=True, slots=True)
class Totals:
    count: int = 0
    numel: int = 0
    nbytes: int = 0

    def add(self, t: TensorInfo) -> Totals:
        return Totals(self.count + 1, self.numel + t.numel, self.nbytes + t.nbytes)

    def to_dict(self) -> dict[str, int]:
        return {"count": self.count, "numel": self.numel, "nbytes": self.nbytes}


@dataclass(frozen=True, slots=True)
class Summary:
    parameters: Totals
    buffers: Totals
    other: Totals
    by_dtype: dict[str, Totals]
    by_device: dict[str, Totals]
    exact: int  # tensors whose role is exact
    inferred: int
    logical_nbytes: int  # sum over tensors
    storage_nbytes: int  # bytes of distinct storages: what the tensors occupy on disk

    @classmethod
    def of(cls, tensors: Iterable[TensorInfo], storage_sizes: dict[str, int] | None = None) -> Summary:
        # Tensors are counted per (role, dtype, device) combination first, a few dozen of them, and the
        # combinations summed after: one lookup per tensor instead of three.
        combos: dict[tuple[str, str, str | None], list[int]] = {}
        exact = logical = unshared = 0
        n = 0
        seen: dict[str, int] = {}
        sizes = storage_sizes or {}
        for t in tensors:
            n += 1
            size = t.nbytes
            key = (t.role, t.dtype, t.device)
            acc = combos.get(key)
            if acc is None:
                acc = combos[key] = [0, 0, 0]
            acc[0] += 1
            acc[1] += t.numel
            acc[2] += size
            if t.exact:
                exact += 1
            logical += size
            storage = t.storage
            if storage is None:
                unshared += size
            elif storage in sizes:
                seen[storage] = sizes[storage]
            elif seen.get(storage, -1) < size:
                seen[storage] = size
        return cls.from_counts(combos, n, exact, logical, unshared + sum(seen.values()))

    @classmethod
    def from_counts(
        cls,
        combos: dict[tuple[str, str, str | None], list[int]],
        n: int,
        exact: int,
        logical: int,
        storage_nbytes: int,
    ) -> Summary:
        """The summary of ``n`` tensors counted as :meth:`of` counts them: ``[count, numel, nbytes]`` per
        (role, dtype, device), how many roles are exact, their bytes, and the bytes of distinct storages."""
        inferred = n - exact
        roles: dict[str, list[int]] = {r: [0, 0, 0] for r in ROLES}
        by_dtype: dict[str, list[int]] = {}
        by_device: dict[str, list[int]] = {}
        for (role, dtype, device), (count, numel, nbytes) in combos.items():
            for acc in (
                roles[role],
                by_dtype.setdefault(dtype, [0, 0, 0]),
                by_device.setdefault(device if device is not None else "unknown", [0, 0, 0]),
            ):
                acc[0] += count
                acc[1] += numel
                acc[2] += nbytes
        return cls(
            parameters=Totals(*roles["parameter"]),
            buffers=Totals(*roles["buffer"]),
            other=Totals(*roles["other"]),
            by_dtype={k: Totals(*v) for k, v in by_dtype.items()},
            by_device={k: Totals(*v) for k, v in by_device.items()},
            exact=exact,
            inferred=inferred,
            logical_nbytes=logical,
            storage_nbytes=storage_nbytes,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "parameters": self.parameters.to_dict(),
            "buffers": self.buffers.to_dict(),
            "other": self.other.to_dict(),
            "by_dtype": {k: v.to_dict() for k, v in self.by_dtype.items()},
            "by_device": {k: v.to_dict() for k, v in self.by_device.items()},
            "exact": self.exact,
            "inferred": self.inferred,
            "logical_nbytes": self.logical_nbytes,
            "storage_nbytes": self.storage_nbytes,
        }


@dataclass(frozen=True, slots=True)
class Container:
    """Where in the file the model's state was found, and what else the file holds."""

    kind: str  # "state_dict" | "module" | "training" | "lightning" | "safetensors" | "sharded" | "empty"
    state_dict_at: str | None = None  # key path of the model state ("state_dict", "model"), "" for the root
    other_keys: tuple[str, ...] = ()  # top-level keys besides the model state (epoch, optimizer, ...)
    module_class: str | None = None  # the pickled nn.Module's class, when there is one
    training: bool | None = None  # the pickled module's ``training`` flag

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "state_dict_at": self.state_dict_at,
            "other_keys": list(self.other_keys),
            "module_class": self.module_class,
            "training": self.training,
        }


@dataclass(frozen=True, slots=True)
class Report:
    """Everything ``statecli inspect`` knows about one checkpoint."""

    path: str
    format: str
    container: Container
    tensors: tuple[TensorInfo, ...]
    summary: Summary
    findings: tuple[Finding, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    file_size: int = 0
    storage_sizes: dict[str, int] = field(default_factory=dict)
    # optimizer-state prefix (``optimizer.state.3``) -> the model parameter it belongs to, where the reader
    # matched the optimizer's parameters to the model's (see formats/optimizer.py)
    optimizer_owners: dict[str, str] = field(default_factory=dict)

    def select(
        self,
        roles: Iterable[str] | None = None,
        match: Iterable[str] | None = None,
        dtypes: Iterable[str] | None = None,
    ) -> Report:
        """A report over the tensors that pass every filter given; the summary follows the selection."""
        from fnmatch import fnmatchcase

        if not roles and not match and not dtypes:
            return self
        role_set = set(roles) if roles else None
        globs = list(match) if match else None
        dtype_set = set(dtypes) if dtypes else None
        kept = tuple(
            t
            for t in self.tensors
            if (role_set is None or t.role in role_set)
            and (globs is None or any(fnmatchcase(t.name, g) for g in globs))
            and (dtype_set is None or t.dtype in dtype_set)
        )
        return Report(
            path=self.path,
            format=self.format,
            container=self.container,
            tensors=kept,
            summary=Summary.of(kept, self.storage_sizes),
            findings=self.findings,
            metadata=self.metadata,
            file_size=self.file_size,
            storage_sizes=self.storage_sizes,
            optimizer_owners=self.optimizer_owners,
        )

    def to_json(self) -> str:
        """``json.dumps(self.to_dict())``, the same text, written without the tensors' dicts: at 100,000
        tensors building and encoding those dicts cost more than reading the file's pickle."""
        return "".join(self.json_pieces())

    def json_pieces(self) -> Iterator[str]:
        """:meth:`to_json`'s text in pieces of about a megabyte, in order: written one by one, 100,000
        tensors' 30 MB of text is never joined into one string (each copy of it cost page faults)."""
        fields = self._fields(None)
        keys = list(fields)
        at = keys.index("tensors")
        head = json.dumps({k: fields[k] for k in keys[:at]})
        tail = json.dumps({k: fields[k] for k in keys[at + 1 :]})
        yield f'{head[:-1]}, "tensors": ['
        yield from _tensors_json(self.tensors)
        yield f"], {tail[1:]}"

    def to_dict(self) -> dict[str, Any]:
        return self._fields([t.to_dict() for t in self.tensors])

    def _fields(self, tensors: Any) -> dict[str, Any]:
        """The JSON document's fields in order, with ``tensors`` as given."""
        return {
            "schema": SCHEMA,
            "path": self.path,
            "format": self.format,
            "file_size": self.file_size,
            "container": self.container.to_dict(),
            "metadata": dict(self.metadata),
            "tensors": tensors,
            "summary": self.summary.to_dict(),
            "findings": [f.to_dict() for f in self.findings],
        }


_TENSOR_JSON = '{"name": %s, %s"shares_with": [%s], %s"storage_offset": %d, "storage": %s, %s"file": %s}'


def _j(v: str | bool | None) -> str:
    if v is None or type(v) is bool:
        return json.dumps(v)
    return encode_basestring_ascii(v)


def _ints(values: tuple[int, ...]) -> str:
    return f"[{', '.join(map(str, values))}]"


_JSON_BATCH = 4096  # tensors to a piece of text: about a megabyte
_NO_FILE = object()  # no tensor's file (None is one)


def _tensors_json(tensors: Sequence[TensorInfo]) -> Iterator[str]:
    """The tensors as ``json.dumps`` writes their ``to_dict()``s, joined by ``", "``, in pieces."""
    # Every field but the name, the storage, its sharers and the file comes from a small set (roles, dtypes, a
    # few dozen shapes and strides): the text of each combination is made once, so a tensor costs one lookup
    # and one format. The key holds what the text is made of, so equal keys make equal texts. The file (a
    # shard's name, one of thousands) is kept apart: tensors come shard by shard, so its text is the last one's.
    known: dict[tuple[Any, ...], tuple[str, str, str, str]] = {}
    get = known.get
    enc = encode_basestring_ascii
    general = _TENSOR_JSON
    file: Any = _NO_FILE
    file_text = ""
    parts: list[str] = []
    append = parts.append
    for t in tensors:
        if len(parts) == _JSON_BATCH:
            yield ", ".join(parts) + ", "
            parts.clear()
        # A tuple display, not an attrgetter: measured faster for 13 fields.
        key = (t.role, t.exact, t.evidence, t.persistent, t.requires_grad, t.dtype, t.shape, t.numel, t.nbytes,
               t.device, t.group, t.stride, t.layout)  # fmt: skip
        fixed = get(key)
        if fixed is None:
            stride = t.stride
            head = (
                f'"role": {_j(t.role)}, "exact": {_j(t.exact)}, "evidence": {_j(t.evidence)}, '
                f'"persistent": {_j(t.persistent)}, "requires_grad": {_j(t.requires_grad)}, "dtype": {_j(t.dtype)}, '
                f'"shape": {_ints(t.shape)}, "numel": {t.numel:d}, "nbytes": {t.nbytes:d}, "device": {_j(t.device)}, '
            )
            middle = f'"group": {_j(t.group)}, "stride": {"null" if stride is None else _ints(stride)}, '
            tail = f'"layout": {_j(t.layout)}, '
            # The usual tensor, which shares its storage with none and starts it: a format of three texts (the
            # file's own text escaped, so a % in it stays a %).
            h, m, z = (x.replace("%", "%%") for x in (head, middle, tail))
            usual = f'{{"name": %s, {h}"shares_with": [], {m}"storage_offset": 0, "storage": %s, {z}"file": %s}}'
            fixed = known[key] = (head, middle, tail, usual)
        if t.file is not file:
            file = t.file
            file_text = _j(file)
        shares = t.shares_with
        storage = t.storage
        offset = t.storage_offset
        if not shares and offset == 0:
            append(fixed[3] % (enc(t.name), "null" if storage is None else enc(storage), file_text))
            continue
        append(
            general
            % (
                enc(t.name),
                fixed[0],
                ", ".join(map(enc, shares)),
                fixed[1],
                offset,
                "null" if storage is None else enc(storage),
                fixed[2],
                file_text,
            )
        )
    yield ", ".join(parts)


@dataclass(slots=True)
class RawCheckpoint:
    """A reader's answer: tensors with the facts the file states, before roles are resolved."""

    path: str
    format: str  # "torch-zip" | "safetensors" | "sharded-safetensors" | "sharded-torch" | ...
    tensors: list[RawTensor]
    container: Container
    findings: list[Finding] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    file_size: int = 0
    # storage key -> bytes that storage holds on disk, for "bytes on disk vs logical bytes"
    storage_sizes: dict[str, int] = field(default_factory=dict)
    # optimizer-state prefix (``optimizer.state.3``) -> the model parameter it belongs to, where known
    optimizer_owners: dict[str, str] = field(default_factory=dict)
