"""safetensors, read from the header alone.

File layout: an 8-byte little-endian unsigned length ``N``, then ``N`` bytes of UTF-8 JSON (the header),
then the data section. The header maps each tensor name to ``{"dtype": code, "shape": [...],
"data_offsets": [begin, end]}`` (offsets relative to the data section), plus an optional
``"__metadata__"`` object of string -> string.

This module parses that itself: importing torch, numpy or the safetensors package would cost the inspect
path a second or more of start-up, and the header is all we need. Only the first ``8 + N`` bytes are
read. Everything the header claims is checked against the file before it is believed, the way
safetensors itself validates a file, and a little stricter (duplicate keys are an error here; the
Rust parser silently keeps the last one, so two readers could disagree on what the file holds).

statecli role metadata
----------------------
safetensors stores no roles, no ``requires_grad`` and cannot share storage between tensors. When
``statecli convert`` writes a safetensors file it records those facts in ``__metadata__["statecli"]``,
a JSON string holding an object::

    {
      "schema": "statecli.roles/1",
      "roles": {"<name>": "parameter" | "buffer" | "other", ...},
      "requires_grad": {"<name>": true | false, ...},
      "non_persistent": ["<name>", ...],
      "aliases": {"<alias name>": "<target name>", ...}
    }

- ``schema`` is required and must be exactly ``"statecli.roles/1"``; every other key is optional
  (missing means empty). Unknown keys are ignored so a later minor revision can add facts.
- ``roles`` gives the exact role of the tensors it names (evidence ``metadata``, ``exact`` true).
  Tensors it does not name are left to the role engine.
- ``requires_grad`` is given only where the original file stored it.
- ``non_persistent`` lists buffers that were not in the original ``state_dict`` (a whole pickled module
  keeps them). Being listed makes a tensor a buffer (``roles`` must not say otherwise) with
  ``persistent`` false; other buffers named in ``roles`` are persistent.
- ``aliases`` lists tensors that shared storage with another in the original (tied weights). The file
  holds the target once; the reader adds one tensor per alias, right after its target, with the
  target's dtype and shape, and gives both the storage key ``alias:<target>`` so the sharing is visible
  and counted once. An alias takes its role and ``requires_grad`` from its own entries when present,
  else from its target's.

Every name must be a tensor in the file, or an alias; an alias must not also be a stored tensor and its
target must be a stored tensor. If the value is not valid by these rules the file is still read: a
``bad-statecli-metadata`` warning is reported and roles are inferred as for any safetensors file, since
half-trusted metadata would present guesses as facts.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from operator import itemgetter
from typing import Any

from statecli.clip import describe, quote
from statecli.dtypes import DTYPES, SAFETENSORS_CODES, SAFETENSORS_DTYPES, contiguous_strides
from statecli.errors import InputError, LimitExceededError, UnsupportedFormatError
from statecli.files import open_regular
from statecli.formats._json import load_object
from statecli.records import ROLES, Container, Finding, RawCheckpoint, RawTensor

__all__ = [
    "MAX_DIMS",
    "MAX_HEADER_BYTES",
    "METADATA_KEY",
    "ROLES_SCHEMA",
    "header",
    "read_safetensors",
    "roles_metadata",
    "tensor_spans",
]

# The same cap safetensors applies (its MAX_HEADER_SIZE), so both accept the same files.
MAX_HEADER_BYTES = 100_000_000
# torch refuses more than 64 dimensions; beyond that a shape is corruption, not a model.
MAX_DIMS = 64
# numel and each dimension must fit torch's int64 sizes.
_MAX_NUMEL = 2**63 - 1

METADATA_KEY = "statecli"
ROLES_SCHEMA = "statecli.roles/1"


def _is_int(x: Any) -> bool:
    # json yields exactly int for integers; bool is an int subclass but not an integer in JSON.
    return type(x) is int


def _read_header(path: str) -> tuple[bytes, int, int]:
    """The raw header bytes, its length N, and the file size."""
    try:
        with open_regular(path) as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InputError(
                    f"file is {len(prefix)} bytes, too short for a safetensors header (needs at least 8)",
                    path=path,
                )
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise LimitExceededError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit", path=path)
            if n > file_size - 8:
                raise InputError(
                    f"header length {n} is larger than the {file_size - 8} bytes after the length prefix "
                    "(truncated or not a safetensors file)",
                    path=path,
                )
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror or e})", path=path) from e
    if len(raw) != n:
        # The file shrank between stat and read.
        raise InputError(f"header is {len(raw)} bytes, expected {n}", path=path)
    return raw, n, file_size


# Bytes per element of each dtype code, for the check that an entry's span holds its shape.
_ITEMSIZE = {code: DTYPES[name].itemsize for code, name in SAFETENSORS_DTYPES.items()}


def _entries(path: str, header: dict[str, Any]) -> list[tuple[int, int, str, str, tuple[int, ...]]]:
    """``(begin, end, name, dtype, shape)`` of every tensor entry, checked as :func:`_parse_entry` checks
    one. An entry in the usual form is checked here without a call (100,000 of them in a large sharded
    checkpoint); anything else goes to :func:`_parse_entry`, which takes the same entries and words the
    error for the rest."""
    codes = SAFETENSORS_DTYPES
    itemsize = _ITEMSIZE
    out = []
    append = out.append
    for name, entry in header.items():
        if type(entry) is dict:
            code = entry.get("dtype")
            shape = entry.get("shape")
            offsets = entry.get("data_offsets")
            if (
                type(code) is str
                and type(shape) is list
                and type(offsets) is list
                and len(offsets) == 2
                and len(shape) <= MAX_DIMS
                and code in codes
            ):
                begin, end = offsets
                if type(begin) is int and type(end) is int and 0 <= begin <= end:
                    numel = 1
                    for d in shape:
                        if type(d) is not int or d < 0 or d > _MAX_NUMEL:
                            break
                        numel *= d
                    else:
                        if numel <= _MAX_NUMEL and end - begin == numel * itemsize[code]:
                            append((begin, end, name, codes[code], tuple(shape)))
                            continue
        dtype, shape_t, begin, end = _parse_entry(path, name, entry)  # raises, worded, for a bad entry
        append((begin, end, name, dtype, shape_t))
    return out


def _parse_entry(path: str, name: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
    """Validate one header entry: (dtype name, shape, begin, end)."""
    if not isinstance(entry, dict):
        raise InputError(f"tensor {quote(name)}: entry is not an object", path=path)
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise InputError(f"tensor {quote(name)}: missing {key!r}", path=path)

    code = entry["dtype"]
    if not isinstance(code, str):
        raise InputError(f"tensor {quote(name)}: dtype must be a string, got {type(code).__name__}", path=path)
    dtype = SAFETENSORS_DTYPES.get(code)
    if dtype is None:
        raise UnsupportedFormatError(f"tensor {quote(name)}: unknown dtype code {quote(code)}", path=path)

    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise InputError(
            f"tensor {quote(name)}: shape must be a list of non-negative integers, got {describe(shape, limit=80)}",
            path=path,
        )
    if len(shape) > MAX_DIMS:
        raise LimitExceededError(
            f"tensor {quote(name)}: shape has {len(shape)} dimensions, more than {MAX_DIMS}", path=path
        )
    numel = 1
    for d in shape:
        if d > _MAX_NUMEL:
            raise LimitExceededError(f"tensor {quote(name)}: dimension {describe(d)} exceeds 2**63-1", path=path)
        numel *= d
    if numel > _MAX_NUMEL:
        raise LimitExceededError(f"tensor {quote(name)}: shape {shape} has more than 2**63-1 elements", path=path)

    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise InputError(
            f"tensor {quote(name)}: data_offsets must be [begin, end] integers with 0 <= begin <= end, "
            f"got {describe(offsets, limit=80)}",
            path=path,
        )
    begin, end = offsets
    need = numel * DTYPES[dtype].itemsize
    if end - begin != need:
        raise InputError(
            f"tensor {quote(name)}: data_offsets [{begin}, {end}] hold {end - begin} bytes but shape {shape} "
            f"of {code} needs {need}",
            path=path,
        )
    return dtype, tuple(shape), begin, end


def _parse_roles(raw: str, stored: dict[str, RawTensor]) -> dict[str, Any]:
    """Validate statecli's role metadata; raises ValueError with a reason when it is not usable."""
    try:
        doc = load_object(raw.encode("utf-8", "surrogatepass"), "the statecli entry", "")
    except InputError as e:
        raise ValueError(e.message) from None
    if doc.get("schema") != ROLES_SCHEMA:
        raise ValueError(f"schema is {describe(doc.get('schema'), limit=80)}, expected {ROLES_SCHEMA!r}")

    roles = doc.get("roles", {})
    requires_grad = doc.get("requires_grad", {})
    non_persistent = doc.get("non_persistent", [])
    aliases = doc.get("aliases", {})
    if not isinstance(roles, dict) or not all(r in ROLES for r in roles.values()):
        raise ValueError(f"'roles' must map names to one of {', '.join(ROLES)}")
    if not isinstance(requires_grad, dict) or not all(isinstance(v, bool) for v in requires_grad.values()):
        raise ValueError("'requires_grad' must map names to true or false")
    if not isinstance(non_persistent, list) or not all(isinstance(n, str) for n in non_persistent):
        raise ValueError("'non_persistent' must be a list of names")
    if not isinstance(aliases, dict) or not all(isinstance(t, str) for t in aliases.values()):
        raise ValueError("'aliases' must map alias names to target names")

    for alias, target in aliases.items():
        if alias in stored:
            raise ValueError(f"alias {quote(alias)} is also a stored tensor")
        if target not in stored:
            raise ValueError(f"alias {quote(alias)} points to {quote(target)}, which is not a stored tensor")
    known = stored.keys() | aliases.keys()
    for what, names in (
        ("roles", roles),
        ("requires_grad", requires_grad),
        ("non_persistent", non_persistent),
    ):
        for n in names:
            if n not in known:
                raise ValueError(f"{what!r} names {quote(n)}, which is not in the file")
    # Resolve each alias's facts from its target now, so the rest reads one flat table per fact.
    roles = dict(roles)
    requires_grad = dict(requires_grad)
    for alias, target in aliases.items():
        if alias not in roles and target in roles:
            roles[alias] = roles[target]
        if alias not in requires_grad and target in requires_grad:
            requires_grad[alias] = requires_grad[target]
    for n in non_persistent:
        # Only buffers can be non-persistent, so being listed is itself exact evidence of the role.
        role = roles.setdefault(n, "buffer")
        if role != "buffer":
            raise ValueError(f"{quote(n)} is listed as non-persistent but its role is {role!r}")
    return {
        "roles": roles,
        "requires_grad": requires_grad,
        "non_persistent": set(non_persistent),
        "aliases": aliases,
    }


def _apply_roles(tensors: list[RawTensor], facts: dict[str, Any], storage_sizes: dict[str, int]) -> list[RawTensor]:
    roles: dict[str, str] = facts["roles"]
    requires_grad: dict[str, bool] = facts["requires_grad"]
    non_persistent: set[str] = facts["non_persistent"]
    aliases: dict[str, str] = facts["aliases"]

    by_target: dict[str, list[str]] = {}
    for alias, target in aliases.items():
        by_target.setdefault(target, []).append(alias)

    def stamp(t: RawTensor, role: str | None, grad: bool | None) -> None:
        if role is not None:
            t.role = role
            t.exact = True
            t.evidence = "metadata"
            if role == "buffer":
                t.persistent = t.name not in non_persistent
        if grad is not None:
            t.requires_grad = grad

    out: list[RawTensor] = []
    for t in tensors:
        stamp(t, roles.get(t.name), requires_grad.get(t.name))
        out.append(t)
        # An alias sits right after its target: same bytes, same place in the file.
        for alias in by_target.get(t.name, ()):
            key = f"alias:{t.name}"
            t.storage = key
            storage_sizes[key] = t.storage_nbytes
            a = RawTensor(
                name=alias,
                dtype=t.dtype,
                shape=t.shape,
                stride=t.stride,
                storage_offset=t.storage_offset,
                device=t.device,
                storage=key,
                storage_nbytes=t.storage_nbytes,
                group=t.group,
            )
            stamp(a, roles.get(alias), requires_grad.get(alias))
            out.append(a)
    return out


def read_safetensors(path: str) -> RawCheckpoint:
    """Read a safetensors file's header (never its tensor bytes) and validate it against the file.

    Raises :class:`~statecli.errors.InputError` (or its subclass ``LimitExceededError`` /
    ``UnsupportedFormatError``) naming the problem when the file is not a valid safetensors file.
    """
    raw, n, file_size = _read_header(path)
    header = load_object(raw, "header", path)

    # safetensors reads a null __metadata__ as "no metadata"; so do we.
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError("__metadata__ must be an object mapping strings to strings", path=path)

    entries = _entries(path, header)
    entries.sort(key=itemgetter(0, 1))

    data_size = file_size - 8 - n
    pos = 0
    for begin, end, name, _, _ in entries:
        if begin != pos:
            how = (
                f"leaving a gap after byte {pos}" if begin > pos else f"overlapping the previous tensor (ends at {pos})"
            )
            raise InputError(f"tensor {quote(name)} starts at byte {begin}, {how}", path=path)
        pos = end
    if pos != data_size:
        why = (
            f"tensors need {pos} bytes of data but the file holds {data_size} (truncated)"
            if pos > data_size
            else f"{data_size - pos} trailing bytes after the last tensor (data ends at byte {pos} of {data_size})"
        )
        raise InputError(why, path=path)

    # Positional (name, dtype, shape, stride, storage_offset, device, storage, storage_nbytes, group): one
    # record per tensor, and keyword calls cost more.
    tensors = [
        RawTensor(name, dtype, shape, contiguous_strides(shape), 0, None, None, end - begin, "model")
        for begin, end, name, dtype, shape in entries
    ]

    findings: list[Finding] = []
    storage_sizes: dict[str, int] = {}
    if METADATA_KEY in metadata:
        try:
            facts = _parse_roles(metadata[METADATA_KEY], {t.name: t for t in tensors})
        except ValueError as e:
            findings.append(
                Finding(
                    level="warning",
                    code="bad-statecli-metadata",
                    message=f"__metadata__[{METADATA_KEY!r}] is not usable ({e}); roles are inferred instead",
                )
            )
        else:
            tensors = _apply_roles(tensors, facts, storage_sizes)

    return RawCheckpoint(
        path=path,
        format="safetensors",
        tensors=tensors,
        container=Container(kind="safetensors", state_dict_at="", other_keys=()),
        findings=findings,
        metadata=metadata,
        file_size=file_size,
        storage_sizes=storage_sizes,
    )


def tensor_spans(path: str) -> dict[str, tuple[int, int]]:
    """Each stored tensor's bytes as absolute file offsets ``(begin, end)``, for readers of the data.

    Call it on a file :func:`read_safetensors` accepted; the entries are validated the same way.
    """
    raw, n, _ = _read_header(path)
    header = load_object(raw, "header", path)
    header.pop("__metadata__", None)
    spans = {}
    for name, entry in header.items():
        _, _, begin, end = _parse_entry(path, name, entry)
        spans[name] = (8 + n + begin, 8 + n + end)
    return spans


# ---------------------------------------------------------------- writing


def roles_metadata(roles: dict[str, str], grads: dict[str, bool], aliases: dict[str, str]) -> str:
    """statecli's own ``__metadata__`` entry: exact roles, ``requires_grad`` and tied names, which
    safetensors has no field for and the reader above reads back."""
    doc: dict[str, Any] = {"schema": ROLES_SCHEMA}
    if roles:
        doc["roles"] = roles
    if grads:
        doc["requires_grad"] = grads
    if aliases:
        doc["aliases"] = aliases
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def header(entries: Iterable[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """A safetensors header for ``(name, dtype, shape, nbytes)`` entries stored back to back, in order;
    the tensor bytes follow it in the same order."""
    doc: dict[str, Any] = {"__metadata__": metadata}
    pos = 0
    for name, dtype, shape, nbytes in entries:
        doc[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw
