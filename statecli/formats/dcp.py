"""torch.distributed.checkpoint (DCP) folders: a ``.metadata`` pickle beside ``*.distcp`` data files.

``.metadata`` pickles a ``torch.distributed.checkpoint.metadata.Metadata`` dataclass; torch's own
``FileSystemReader.read_metadata`` opens it with plain ``pickle.load``. Here it goes through statecli's
restricted reader: the dataclasses come back as inert :class:`~statecli.safepickle.Stub` records whose
BUILD state is walked by name, nothing is imported or called.

What the file holds (torch 2.13, ``metadata.py`` / ``filesystem.py``):

- ``state_dict_metadata``: flattened key (``model.conv1.weight``, ``optim.state.conv1.weight.exp_avg``,
  ``epoch``) -> ``TensorStorageMetadata(properties=TensorProperties(dtype, ...), size, chunks)`` for a
  tensor, ``BytesStorageMetadata()`` for any other object. Each chunk is ``ChunkStorageMetadata(offsets,
  sizes)``: one block of the global tensor; several chunks mean the tensor was sharded (FSDP, DTensor).
- ``storage_data``: ``MetadataIndex(fqn, offset=<chunk offsets>)`` -> ``_StorageInfo(relative_path,
  offset, length)``: the byte span of one chunk (or bytes entry) in one ``.distcp`` file. Every span is
  checked before anything else: the file must resolve inside the folder (no absolute paths, no ``..``,
  no symlink out; :class:`~statecli.errors.UnsafeError`), exist, and hold ``offset + length`` bytes.
- ``planner_data``: flattened key -> its path in the saved dict (``('model', 'conv1.weight')``); used to
  find top-level keys and the original key order.
- ``storage_meta`` (save id, ``checkpoint_id`` as a ``pathlib`` path) and ``version``.

A chunk's span holds a ``torch.save`` archive of that chunk (the default TORCH_SAVE serialization), not
raw tensor bytes. A bytes entry's span holds a ``torch.save`` of a Python object that torch's DCP
loader opens with ``torch.load(weights_only=False)`` (``DefaultLoadPlanner.load_bytes``): those small
pickles are scanned here with the restricted reader too, so a payload hidden there is reported.
Tensor bytes are never read.

Role evidence: names (the rules of :mod:`statecli.roles`) and ``optimizer``; see :func:`_optimizer_evidence`.
"""

from __future__ import annotations

import io
import itertools
import os
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from statecli.clip import describe, describe_name, quote
from statecli.dtypes import DTYPES, STORAGE_TYPES, contiguous_strides, nbytes
from statecli.errors import InputError, LimitExceededError, StatecliError, UnsafeError, UnsupportedFormatError
from statecli.files import open_regular, regular_size
from statecli.formats.torchpickle import MODEL_KEYS, OPTIMIZER_KEYS
from statecli.formats.zipdir import read_directory_at, read_member_from
from statecli.records import MAX_FINDINGS_PER_CODE, Container, Finding, FindingCap, RawCheckpoint, RawTensor
from statecli.roles import looks_like_rng_state
from statecli.safepickle import MAX_INDEX, Action, Global, Limits, StorageRef, Stub
from statecli.security import findings_for, loads
from statecli.wording import count, name_list

__all__ = ["MAX_CHUNK_PICKLE", "MAX_METADATA_BYTES", "Chunk", "chunk_map", "read_dcp", "tiling_problem"]

METADATA_NAME = ".metadata"
MAX_METADATA_BYTES = 256 << 20  # ~1M chunk records; a bigger .metadata is not DCP's
MAX_BYTES_ENTRY = 16 << 20  # one pickled non-tensor entry scanned for globals
MAX_BYTES_TOTAL = 256 << 20  # all of them together
MAX_RANK = 64
MAX_CHUNK_PICKLE = 1 << 20  # a chunk archive's data.pkl describes one tensor: a few hundred bytes
# What a chunk's span may hold besides the block's bytes: its data.pkl and the zip records around them
# (a few hundred bytes each, plus 64-byte alignment padding, in what torch writes).
MAX_CHUNK_FRAMING = MAX_CHUNK_PICKLE + (1 << 20)

_MD = "torch.distributed.checkpoint.metadata"
_FS = "torch.distributed.checkpoint.filesystem"
METADATA = f"{_MD}.Metadata"
TENSOR_MD = f"{_MD}.TensorStorageMetadata"
BYTES_MD = f"{_MD}.BytesStorageMetadata"
CHUNK_MD = f"{_MD}.ChunkStorageMetadata"
PROPERTIES = f"{_MD}.TensorProperties"
INDEX = f"{_MD}.MetadataIndex"
STORAGE_INFO = f"{_FS}._StorageInfo"
STORAGE_META = f"{_MD}.StorageMeta"

# Names every DCP ``.metadata`` uses. They are the format's own vocabulary, not findings:
# - the metadata dataclasses and enum: instantiated by NEWOBJ (``cls.__new__``) and BUILD, which sets
#   fields (TensorProperties.__setstate__ is torch's own and only decodes a memory format);
# - ``torch.serialization._get_layout('torch.strided')``: how a ``torch.layout`` pickles; a lookup in a
#   dict of layouts (on the allow list too);
# - ``pathlib.PosixPath('ckpt')``: ``StorageMeta.checkpoint_id`` as FileSystemWriter records it. The
#   constructor only joins strings (an inert callable); a dotted name such as ``Path.write_text`` is a
#   different name, still reported.
# They are left out of the findings (not information worth a line). Any other global, and BUILD on a
# global, goes through security.findings_for.
DCP_NAMES = frozenset(
    [
        (_MD, n)
        for n in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
            "MetadataIndex",
            "StorageMeta",
        )
    ]
    + [(_FS, "_StorageInfo"), ("torch.serialization", "_get_layout")]
    + [
        (m, n)
        for m in ("pathlib", "pathlib._local")
        for n in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")
    ]
)
# Top-level keys whose tensors are optimizer state; schedulers and the like keep their own key as group.
OPTIMIZER_GROUP_KEYS = OPTIMIZER_KEYS - {"scheduler", "lr_scheduler", "lr_schedulers"}
_LEVELS = {"dangerous": 0, "warning": 1, "info": 2}


class Chunk(NamedTuple):
    """Where one block of a tensor lives: ``length`` bytes at ``offset`` of the ``.distcp`` file ``path``.

    ``path`` is joined to the checkpoint folder and was checked to stay inside it; the span was checked
    to lie inside that file. The span holds a ``torch.save`` archive (zip, stored members) of exactly
    this block, contiguous: its ``data.pkl`` names one storage, its ``data/<key>`` member the bytes.
    ``offsets`` / ``sizes`` place the block in the global tensor, one entry per dimension.
    """

    path: str
    offset: int
    length: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(slots=True)
class _Span:
    rel: str  # as the metadata names it
    path: str  # joined to the folder
    offset: int
    length: int
    transforms: tuple[str, ...]


@dataclass(slots=True)
class _TensorEntry:
    fqn: str
    dtype: str
    shape: tuple[int, ...]
    chunks: list[tuple[tuple[int, ...], tuple[int, ...]]]  # (offsets, sizes)


@dataclass(slots=True)
class _Parsed:
    """``.metadata`` read and every span checked: what read_dcp and chunk_map share."""

    folder: str
    meta_path: str
    tensors: list[_TensorEntry]
    byte_entries: list[str]
    unknown: list[tuple[str, str]]  # (key, what it is)
    tops: dict[str, str]  # key -> top-level key of the saved dict
    nested: set[str]  # keys that sit below their top-level key (not a top-level value themselves)
    spans: dict[tuple[str, tuple[int, ...] | None], _Span] | None
    file_sizes: dict[str, int]  # relative path -> size, for every file a span names
    findings: list[Finding] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    metadata_size: int = 0


def read_dcp(folder: str, limits: Limits | None = None, metadata_path: str | None = None) -> RawCheckpoint:
    """Read a torch.distributed.checkpoint folder's metadata without torch and without running its pickle.

    ``metadata_path``: read the ``.metadata`` from there instead (a conversion checks the one it wrote
    before giving it its name).

    Raises :class:`~statecli.errors.UnsafeError` (exit 5) for a data file that leaves the folder and
    :class:`~statecli.errors.InputError` (exit 3) for a corrupt, truncated or oversized ``.metadata``,
    a missing ``.distcp`` file, or a span or chunk that does not fit the bytes that are there.
    """
    p = _parse(folder, limits, metadata_path)
    findings = p.findings
    findings.extend(_scan_byte_entries(p))

    model_key, groups, other_keys = _containers(p)
    evidence = _optimizer_evidence(p, model_key, groups)
    optimizer_tops = _optimizer_state_tops(p)

    tensors: list[RawTensor] = []
    storage_sizes: dict[str, int] = {}
    shared_spans = _shared_spans(p)
    sharded: list[str] = []
    for e in p.tensors:
        spans = _spans_of(p, e)
        size = nbytes(e.dtype, _numel(e.shape))
        group = groups[e.fqn]
        name = e.fqn
        if group == "model" and model_key:
            # As for a torch.save training dict: the model's tensors are named inside the model.
            name = name.removeprefix(model_key + ".")
        raw = RawTensor(
            name=name,
            dtype=e.dtype,
            shape=e.shape,
            stride=contiguous_strides(e.shape),
            device=None,  # DCP stores no device: chunks are saved from CPU copies
            storage_nbytes=size,
            group=group,
            file=spans[0].rel if spans and spans[0] is not None else None,
        )
        first = spans[0] if len(spans) == 1 else None
        if first is not None and (first.rel, first.offset) not in shared_spans:
            raw.storage = f"{first.rel}:{first.offset}"
            storage_sizes[raw.storage] = size
        if len(e.chunks) > 1:
            sharded.append(f"{name} ({len(e.chunks)} chunks)")
        if group != "model":
            raw.role = "other"
            raw.evidence = "container"
            raw.exact = group == "optimizer" and p.tops[e.fqn] in optimizer_tops
        elif e.fqn in evidence:
            raw.role, raw.evidence, raw.exact = "parameter", "optimizer", False
        tensors.append(raw)

    if sharded:
        files = {s.rel for e in p.tensors if len(e.chunks) > 1 for s in _spans_of(p, e) if s is not None}
        findings.append(
            Finding(
                "info",
                "sharded-tensors",
                f"{count(len(sharded), 'tensor')} stored in several chunks (sharded, e.g. by FSDP or DTensor) "
                f"across {count(len(files), 'file')}, each listed once with its global shape: {name_list(sharded)}",
            )
        )
    if not tensors:
        keys = name_list(other_keys) or "none"
        findings.append(
            Finding("warning", "no-tensors", f"no tensors found in the checkpoint (top-level keys: {keys})")
        )
    if model_key is not None:
        state_dict_at: str | None = model_key
    else:
        state_dict_at = "" if any(g == "model" for g in groups.values()) else None
    findings.sort(key=lambda f: _LEVELS.get(f.level, 3))
    return RawCheckpoint(
        path=folder,
        format="dcp",
        tensors=tensors,
        container=Container(kind="dcp", state_dict_at=state_dict_at, other_keys=tuple(other_keys)),
        findings=findings,
        metadata=p.metadata,
        file_size=p.metadata_size + sum(p.file_sizes.values()),
        storage_sizes=storage_sizes,
    )


def chunk_map(folder: str, limits: Limits | None = None) -> dict[str, list[Chunk]]:
    """Every tensor's chunks, by its key in ``.metadata``, in the order :func:`read_dcp` lists the tensors.

    This is what a converter needs to rebuild a tensor: read each chunk's span, take the block out of
    its ``torch.save`` archive, and place it at ``offsets``. The same checks as :func:`read_dcp` run
    first (every file inside the folder, every span inside its file, every chunk's bytes fit its span).
    A tensor saved whole has one chunk whose offsets are all zero and whose sizes are its shape.

    Raises :class:`~statecli.errors.UnsupportedFormatError` where a span is not a plain ``torch.save``
    archive of one block (DCP stream transforms such as compression, or several chunks naming the same
    bytes as the SAFETENSORS serialization does) and :class:`~statecli.errors.InputError` when the
    metadata carries no storage_data.
    """
    p = _parse(folder, limits)
    if p.spans is None:
        raise InputError(".metadata has no storage_data: the chunks' files are unknown", path=p.meta_path)
    shared = _shared_spans(p)
    out: dict[str, list[Chunk]] = {}
    for e in p.tensors:
        chunks = []
        for offsets, sizes in e.chunks:
            s = _span_of(p, e.fqn, offsets)
            assert s is not None  # _parse checked every chunk has a span
            if s.transforms or (s.rel, s.offset) in shared:
                how = f"through stream transforms {'/'.join(s.transforms)}" if s.transforms else "in a shared span"
                raise UnsupportedFormatError(
                    f"tensor {quote(e.fqn)} is stored {how}, not as one torch.save archive per chunk; not read yet",
                    path=p.meta_path,
                )
            chunks.append(Chunk(s.path, s.offset, s.length, offsets, sizes))
        out[e.fqn] = chunks
    return out


# ------------------------------------------------------------------------------------- parsing


def _parse(folder: str, limits: Limits | None, metadata_path: str | None = None) -> _Parsed:
    folder_real = os.path.realpath(folder)
    meta_path = metadata_path or os.path.join(folder, METADATA_NAME)
    if metadata_path is None:
        _inside(folder_real, meta_path, METADATA_NAME, meta_path)
    data = _read_metadata(meta_path)
    try:
        root, unpickler = loads(data, None, limits)
    except StatecliError as e:
        raise e.at(meta_path) from None
    seen = {k: n for k, n in unpickler.globals_seen.items() if k not in DCP_NAMES}
    findings = findings_for(seen, _not_dcp(unpickler.actions.values()))
    if unpickler.end < len(data):
        findings.append(
            Finding(
                "warning",
                "trailing-pickle-data",
                f".metadata has {len(data) - unpickler.end} bytes after the pickle's end; they were ignored",
            )
        )

    if not (isinstance(root, Stub) and root.class_name == METADATA):
        danger = [f.message for f in findings if f.level == "dangerous"]
        extra = f"; {danger[0]}" if danger else ""
        # torch's reader unpickles it before it looks at what it holds: a dangerous one is refused as unsafe.
        raise (UnsafeError if danger else InputError)(
            f"not a torch.distributed.checkpoint .metadata: the pickle holds {_describe(root)}{extra}", path=meta_path
        )
    md = _fields(root, METADATA, "the Metadata record", meta_path)
    sdm = md.get("state_dict_metadata")
    if not isinstance(sdm, dict):
        raise InputError(f"Metadata.state_dict_metadata is {_describe(sdm)}, not a mapping", path=meta_path)

    tensors: list[_TensorEntry] = []
    byte_entries: list[str] = []
    unknown: list[tuple[str, str]] = []
    for key, entry in sdm.items():
        if not isinstance(key, str):
            raise InputError(f"state_dict_metadata key {_describe(key)} is not a string", path=meta_path)
        cls = entry.class_name if isinstance(entry, Stub) else None
        if cls == TENSOR_MD:
            tensors.append(_tensor_entry(key, entry, meta_path))
        elif cls == BYTES_MD:
            byte_entries.append(key)
        else:
            unknown.append((key, _describe(entry)))

    tops, nested, order = _planner_paths(md.get("planner_data"), sdm)
    if order:
        rank = {k: i for i, k in enumerate(order)}
        tensors.sort(key=lambda e: rank.get(e.fqn, len(rank)))  # stable: unlisted keys keep their order

    p = _Parsed(folder, meta_path, tensors, byte_entries, unknown, tops, nested, None, {}, findings)
    p.metadata_size = len(data)
    _storage_spans(p, md.get("storage_data"), folder_real)
    _check_chunks(p)
    p.metadata.update(_meta_strings(md))
    if unknown:
        what = name_list([f"{k} ({w})" for k, w in unknown])
        p.findings.append(
            Finding("warning", "unknown-entry", f"entries of an unknown storage type, not listed: {what}")
        )
    _unreferenced_files(p, folder)
    return p


def _read_metadata(meta_path: str) -> bytes:
    try:
        with open_regular(meta_path) as f:  # a FIFO .metadata would block every command
            size = os.fstat(f.fileno()).st_size
            if size > MAX_METADATA_BYTES:
                raise LimitExceededError(
                    f".metadata is {size} bytes, more than the {MAX_METADATA_BYTES}-byte limit", path=meta_path
                )
            data = f.read(size + 1)  # what is there (+1 to see growth), not the limit: read() allocates it up front
    except FileNotFoundError:
        raise InputError(
            "no .metadata file: not a complete torch.distributed.checkpoint folder", path=meta_path
        ) from None
    except OSError as e:
        raise InputError(f"cannot read .metadata ({e.strerror or e})", path=meta_path) from None
    if len(data) > MAX_METADATA_BYTES:
        raise LimitExceededError(f".metadata grew past the {MAX_METADATA_BYTES}-byte limit while read", path=meta_path)
    if not data:
        raise InputError("empty .metadata (0 bytes)", path=meta_path)
    return data


def _describe(v: Any) -> str:
    if isinstance(v, Stub):
        return f"a {describe_name(v.class_name)} object"
    if isinstance(v, Global):
        return f"the global {describe_name(v.qualname)}"
    if isinstance(v, str):
        return quote(v, 60)
    return f"a {describe_name(type(v).__name__)}"


def _fields(obj: Any, cls: str, what: str, path: str) -> dict[str, Any]:
    """The field dict BUILD gave a dataclass stub of class ``cls``."""
    if not (isinstance(obj, Stub) and obj.class_name == cls):
        raise InputError(f"{what} is {_describe(obj)}, not a {cls.rpartition('.')[2]}", path=path)
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
        state = state[0]  # (dict, slotstate)
    if state is None:
        return {}
    if not isinstance(state, dict):
        raise InputError(f"{what} has {_describe(state)} as its fields", path=path)
    return state


def _dims(v: Any, what: str, path: str) -> tuple[int, ...]:
    # torch.Size arrives as a tuple (safepickle's handler); a list is accepted too.
    if not isinstance(v, (tuple, list)):
        raise InputError(f"{what} is {_describe(v)}, not a size", path=path)
    if len(v) > MAX_RANK:
        raise InputError(f"{what} has {len(v)} dimensions", path=path)
    for x in v:
        if type(x) is not int or x < 0 or x > MAX_INDEX:
            raise InputError(f"{what} {describe(v)} has an impossible value", path=path)
    return tuple(v)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _dtype(props: Any, key: str, path: str) -> str:
    st = props.state if isinstance(props, Stub) and props.class_name == PROPERTIES else None
    # TensorProperties.__getstate__ gives (dtype, layout, requires_grad, memory format, pin_memory);
    # torch versions before it pickled the field dict.
    if isinstance(st, tuple) and st:
        dt = st[0]
    elif isinstance(st, dict):
        dt = st.get("dtype")
    else:
        raise InputError(f"tensor {quote(key)}: properties are {_describe(props)}, not TensorProperties", path=path)
    if isinstance(dt, Global) and dt.module == "torch" and dt.name in DTYPES:
        return dt.name
    raise InputError(f"tensor {quote(key)}: dtype is {_describe(dt)}, not a torch dtype", path=path)


def _tensor_entry(key: str, entry: Stub, path: str) -> _TensorEntry:
    st = _fields(entry, TENSOR_MD, f"entry {quote(key)}", path)
    dtype = _dtype(st.get("properties"), key, path)
    shape = _dims(st.get("size"), f"tensor {quote(key)}: size", path)
    numel = _numel(shape)
    if numel > MAX_INDEX:
        raise InputError(f"tensor {quote(key)}: size {list(shape)} overflows the element count", path=path)
    raw_chunks = st.get("chunks")
    if not isinstance(raw_chunks, list):
        raise InputError(f"tensor {quote(key)}: chunks are {_describe(raw_chunks)}, not a list", path=path)
    chunks = []
    for i, c in enumerate(raw_chunks):
        cs = _fields(c, CHUNK_MD, f"tensor {quote(key)}: chunk {i}", path)
        offsets = _dims(cs.get("offsets"), f"tensor {quote(key)}: chunk {i} offsets", path)
        sizes = _dims(cs.get("sizes"), f"tensor {quote(key)}: chunk {i} sizes", path)
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise InputError(
                f"tensor {quote(key)}: chunk {i} (offsets {list(offsets)}, sizes {list(sizes)}) does not match "
                f"the rank of its size {list(shape)}",
                path=path,
            )
        if any(o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
            raise InputError(
                f"tensor {quote(key)}: chunk {i} (offsets {list(offsets)}, sizes {list(sizes)}) reaches past "
                f"its size {list(shape)}",
                path=path,
            )
        chunks.append((offsets, sizes))
    return _TensorEntry(key, dtype, shape, chunks)


def _planner_paths(planner: Any, sdm: dict[str, Any]) -> tuple[dict[str, str], set[str], list[str]]:
    """(key -> top-level key, keys below their top-level key, the saved dict's key order).

    The default planner's ``planner_data`` maps each flattened key to its path in the saved dict
    (``'optim.state.fc.bias.step'`` -> ``('optim', 'state', 'fc.bias', 'step')``); without it the top-level
    key is the text before the first dot.
    """
    paths = planner if isinstance(planner, dict) else {}
    tops: dict[str, str] = {}
    nested: set[str] = set()
    for key in sdm:
        if not isinstance(key, str):
            continue
        path = paths.get(key)
        if isinstance(path, (tuple, list)) and path and isinstance(path[0], str):
            tops[key] = path[0]
            if len(path) > 1:
                nested.add(key)
        else:
            head, dot, _ = key.partition(".")
            tops[key] = head
            if dot:
                nested.add(key)
    order = [k for k in paths if isinstance(k, str) and k in sdm]
    return tops, nested, order


def _storage_spans(p: _Parsed, storage: Any, folder_real: str) -> None:
    """Every storage_data record, each file checked to stay inside the folder and hold its span."""
    if storage is None:
        p.findings.append(
            Finding("warning", "no-storage-data", ".metadata has no storage_data: the chunks' files are unknown")
        )
        return
    if not isinstance(storage, dict):
        raise InputError(f"Metadata.storage_data is {_describe(storage)}, not a mapping", path=p.meta_path)
    spans: dict[tuple[str, tuple[int, ...] | None], _Span] = {}
    checked: dict[str, str] = {}  # relative path -> full path
    for k, v in storage.items():
        ks = _fields(k, INDEX, "a storage_data key", p.meta_path)
        fqn = ks.get("fqn")
        if not isinstance(fqn, str):
            raise InputError(f"a storage_data key names {_describe(fqn)}, not a key", path=p.meta_path)
        off = ks.get("offset")
        offsets = None if off is None else _dims(off, f"storage_data key {quote(fqn)} offset", p.meta_path)
        vs = _fields(v, STORAGE_INFO, f"storage_data[{quote(fqn)}]", p.meta_path)
        rel, offset, length = vs.get("relative_path"), vs.get("offset"), vs.get("length")
        if not isinstance(rel, str) or not rel:
            raise InputError(f"storage_data[{quote(fqn)}] names {_describe(rel)} as its file", path=p.meta_path)
        for name, n in (("offset", offset), ("length", length)):
            if type(n) is not int or n < 0 or n > MAX_INDEX:
                raise InputError(
                    f"storage_data[{quote(fqn)}] has an impossible {name} {describe(n, limit=40)}", path=p.meta_path
                )
        td = vs.get("transform_descriptors")
        if td is not None and not (isinstance(td, (list, tuple)) and all(isinstance(x, str) for x in td)):
            raise InputError(f"storage_data[{quote(fqn)}] has transform descriptors {_describe(td)}", path=p.meta_path)
        full = checked.get(rel)
        if full is None:
            full = checked[rel] = _inside(folder_real, os.path.join(p.folder, rel), rel, p.meta_path)
            p.file_sizes[rel] = _file_size(full, rel, p.meta_path)
        size = p.file_sizes[rel]
        if offset + length > size:
            raise InputError(
                f"storage_data[{quote(fqn)}] spans bytes {offset}..{offset + length} of {quote(rel)}, "
                f"which holds {size}",
                path=p.meta_path,
            )
        spans[(fqn, offsets)] = _Span(rel, full, offset, length, tuple(td or ()))
    p.spans = spans


def _inside(folder_real: str, full: str, name: str, meta_path: str) -> str:
    """``full`` when it resolves inside the folder; :class:`UnsafeError` when it could reach outside."""
    if "\0" in name:
        raise UnsafeError(f"file name {quote(name)} contains a NUL byte", path=meta_path)
    # A leading "\" or a drive letter is absolute on Windows even where os.path.isabs says no.
    if os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[0].isalpha() and name[1] == ":"):
        raise UnsafeError(f"file {quote(name)} is an absolute path and leaves the checkpoint folder", path=meta_path)
    real = os.path.realpath(full)
    # realpath resolves both ".." and symlinks, so one comparison covers both escapes.
    if os.path.commonpath([real, folder_real]) != folder_real:
        raise UnsafeError(f"file {quote(name)} leaves the checkpoint folder", path=meta_path)
    return full


def _file_size(full: str, rel: str, meta_path: str) -> int:
    try:
        return regular_size(full, f"data file {quote(rel)} named in .metadata")
    except FileNotFoundError:
        raise InputError(f"data file {quote(rel)} named in .metadata does not exist", path=meta_path) from None
    except OSError as e:
        raise InputError(f"cannot access data file {quote(rel)} ({e.strerror or e})", path=meta_path) from None
    except InputError as e:  # not a regular file: named in the error about the .metadata that names it
        raise InputError(e.message, path=meta_path) from None


def _span_of(p: _Parsed, fqn: str, offsets: tuple[int, ...] | None) -> _Span | None:
    return p.spans.get((fqn, offsets)) if p.spans is not None else None


def _spans_of(p: _Parsed, e: _TensorEntry) -> list[_Span | None]:
    return [_span_of(p, e.fqn, offsets) for offsets, _ in e.chunks]


def _check_chunks(p: _Parsed) -> None:
    """Each tensor's chunks tile it exactly, and each chunk has a span that fits its bytes.

    Both are checked for every tensor before any command reads a byte of one: a converter fills an empty
    buffer from the chunks, so a gap would be written with whatever memory held, and a span is read
    whole, so its length must be bounded by what the chunk can hold.
    """
    budget = TilingBudget(sum(len(e.chunks) for e in p.tensors))
    for e in p.tensors:
        try:
            problem = tiling_problem(e.shape, e.chunks, budget)
        except LimitExceededError as err:
            raise LimitExceededError(f"tensor {e.fqn!r}: {err.message}", path=p.meta_path) from None
        if problem is not None:
            raise InputError(
                f"tensor {e.fqn!r} (size {list(e.shape)}): {problem}; its chunks must cover it exactly once",
                path=p.meta_path,
            )
        if p.spans is None:
            continue
        for offsets, sizes in e.chunks:
            s = p.spans.get((e.fqn, offsets))
            if s is None:
                raise InputError(
                    f"tensor {quote(e.fqn)}: the chunk at offsets {list(offsets)} has no storage_data record",
                    path=p.meta_path,
                )
            if s.transforms:
                continue  # compressed or otherwise transformed: never read, so no bound to keep
            need = nbytes(e.dtype, _numel(sizes))
            # A torch.save archive of the chunk holds its bytes, plus a small pickle and a few records.
            if s.length < need:
                raise InputError(
                    f"tensor {quote(e.fqn)}: the chunk at offsets {list(offsets)} (sizes {list(sizes)}, {e.dtype}) "
                    f"needs {need} bytes but its span in {quote(s.rel)} holds {s.length}",
                    path=p.meta_path,
                )
            if s.length > need + MAX_CHUNK_FRAMING:
                raise InputError(
                    f"tensor {e.fqn!r}: the chunk at offsets {list(offsets)} (sizes {list(sizes)}, {e.dtype}) "
                    f"holds {need} bytes but its span in {s.rel!r} claims {s.length}, more than the "
                    f"{MAX_CHUNK_FRAMING} bytes a torch.save archive adds around them",
                    path=p.meta_path,
                )
    if p.spans is not None:
        missing = [k for k in p.byte_entries if (k, None) not in p.spans]
        if missing:
            raise InputError(
                f"non-tensor entries without a storage_data record: {name_list(missing)}", path=p.meta_path
            )
        transformed = sorted({"/".join(s.transforms) for s in p.spans.values() if s.transforms})
        if transformed:
            p.findings.append(
                Finding(
                    "info",
                    "stream-transforms",
                    f"data is stored through DCP stream transforms ({', '.join(transformed)}); "
                    "statecli lists it but does not read it",
                )
            )


def _shared_spans(p: _Parsed) -> set[tuple[str, int]]:
    """Spans that several chunks name (a safetensors-serialized DCP or a hand-made file): no storage key."""
    counts: dict[tuple[str, int], int] = {}
    for e in p.tensors:
        for offsets, _ in e.chunks:
            s = _span_of(p, e.fqn, offsets)
            if s is not None:
                counts[(s.rel, s.offset)] = counts.get((s.rel, s.offset), 0) + 1
    shared = {k for k, n in counts.items() if n > 1}
    if shared:
        where = name_list([f"{rel} at byte {off}" for rel, off in sorted(shared)])
        p.findings.append(
            Finding(
                "warning",
                "shared-span",
                f"several chunks name the same bytes ({where}); their layout is not DCP's TORCH_SAVE one",
            )
        )
    return shared


def _meta_strings(md: dict[str, Any]) -> dict[str, str]:
    out = {}
    version = md.get("version")
    if isinstance(version, str):
        out["version"] = version[:100]
    sm = md.get("storage_meta")
    if isinstance(sm, Stub) and sm.class_name == STORAGE_META and isinstance(sm.state, dict):
        save_id = sm.state.get("save_id")
        if isinstance(save_id, str):
            out["save_id"] = save_id[:100]
    return out


def _unreferenced_files(p: _Parsed, folder: str) -> None:
    if p.spans is None:
        return
    try:
        present = sorted(e for e in os.listdir(folder) if e.endswith(".distcp"))
    except OSError:
        return
    stray = [e for e in present if e not in p.file_sizes]
    if stray:
        p.findings.append(
            Finding(
                "info",
                "unreferenced-file",
                f".distcp files that .metadata does not name (left from another save?): {name_list(stray)}",
            )
        )


# ------------------------------------------------------------------------------------- chunk tiling
#
# A tensor's chunks must tile it: every element in exactly one chunk. The sizes adding up to numel is not
# enough (two overlapping chunks can leave a gap of the same size), and a converter filling an empty
# buffer from the chunks would then write whatever memory held into the gap. So the check is exact, and it
# never walks elements: a checkpoint's tensors have billions of them.
#
# The verdict counts signed corners. A box's indicator function has, as its mixed difference over all
# dimensions, +1 or -1 at each of its 2**d corners and 0 elsewhere; the difference is linear and, for
# functions of bounded support, invertible (a running sum undoes it). So the chunks' indicators sum to the
# tensor's own indicator (each element covered exactly once) if and only if their signed corners, summed
# point by point, cancel everywhere except at the tensor's corners. Dimensions every chunk spans whole are
# dropped first, so the work is ``chunks * 2**split_dimensions``: FSDP and tensor-parallel shards split
# one or two. A tensor split along one dimension is checked by sorting its chunks along it instead.
# Only when the verdict is "no" is the culprit looked for, near the corner that did not cancel.

_Box = tuple[int, tuple[int, ...], tuple[int, ...]]  # (index in the chunk list, offsets, sizes), not empty
MAX_SPLIT_DIMS = 16  # dimensions along which one tensor's chunks may be split; real layouts use one to three
# Work of the signed-corner counts, in coordinates handled (corners times split dimensions): a shared
# allowance for the whole folder (about a second) plus what a three-dimension split of each chunk takes.
TILING_WORK = 1 << 22
TILING_WORK_PER_CHUNK = 8 * 3


class TilingBudget:
    """Work left for the tiling checks of one ``.metadata``: bounds a hostile many-dimension split."""

    def __init__(self, chunks: int) -> None:
        self.left = TILING_WORK + TILING_WORK_PER_CHUNK * chunks

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise LimitExceededError("checking that its chunks tile it takes more work than statecli allows")


def tiling_problem(
    shape: tuple[int, ...],
    chunks: list[tuple[tuple[int, ...], tuple[int, ...]]],
    budget: TilingBudget | None = None,
) -> str | None:
    """What keeps ``chunks`` (offsets, sizes) from covering a tensor of ``shape`` exactly once, or None.

    Every chunk must already lie inside ``shape`` (:func:`_tensor_entry` checks that). The answer names two
    overlapping chunks and elements both hold, or elements no chunk holds.
    """
    if _numel(shape) == 0:
        return None  # nothing to cover; every chunk is empty too
    boxes = [(i, o, s) for i, (o, s) in enumerate(chunks) if _numel(s) > 0]
    split = [d for d in range(len(shape)) if any(o[d] != 0 or s[d] != shape[d] for _, o, s in boxes)]
    if len(split) > MAX_SPLIT_DIMS:
        raise LimitExceededError(
            f"its chunks split it along {len(split)} dimensions; statecli checks at most {MAX_SPLIT_DIMS}"
        )
    if not split:  # every chunk is the whole tensor
        if len(boxes) == 1:
            return None
        if not boxes:
            return _gap(shape, [], tuple(0 for _ in shape), [])
        return _overlap(shape, boxes[0], boxes[1])
    if len(split) == 1:
        return _tiles_line(shape, boxes, split[0])
    if budget is not None:  # the corner counts, then at worst the search for the culprit
        n = len(split)
        budget.spend(((len(boxes) + 1) << n) * n + len(boxes) * n * n)
    left = _uncancelled(shape, boxes, split)
    return _culprit(shape, boxes, split, left) if left else None


def _tiles_line(shape: tuple[int, ...], boxes: list[_Box], d: int) -> str | None:
    """Chunks that differ along dimension ``d`` only: sorted, each must start where the one before ended."""
    ordered = sorted(boxes, key=lambda b: (b[1][d], b[1][d] + b[2][d]))
    end = 0
    last = None
    for b in ordered:
        start = b[1][d]
        if start > end:
            return _gap(shape, boxes, tuple(end if k == d else 0 for k in range(len(shape))), [d])
        if start < end:
            assert last is not None
            return _overlap(shape, last, b)
        end = start + b[2][d]
        last = b
    if end < shape[d]:
        return _gap(shape, boxes, tuple(end if k == d else 0 for k in range(len(shape))), [d])
    return None


def _uncancelled(shape: tuple[int, ...], boxes: list[_Box], split: list[int]) -> dict[tuple[int, ...], int]:
    """The chunks' signed corners minus the tensor's, in the ``split`` dimensions: the points left non-zero."""
    # product() enumerates corners with the first dimension's choice as the highest bit of the index;
    # the sign only depends on how many upper ends were chosen, whatever the order.
    signs = [-1 if i.bit_count() & 1 else 1 for i in range(1 << len(split))]
    whole = [(0, shape[d]) for d in split]
    total: dict[tuple[int, ...], int] = {}
    get = total.get
    for ends, flip in [(whole, -1)] + [([(o[d], o[d] + s[d]) for d in split], 1) for _, o, s in boxes]:
        for point, sign in zip(itertools.product(*ends), signs, strict=True):
            v = get(point, 0) + sign * flip
            if v:
                total[point] = v
            else:
                del total[point]
    return total


def _culprit(shape: tuple[int, ...], boxes: list[_Box], split: list[int], left: dict[tuple[int, ...], int]) -> str:
    """The overlap or gap behind corners that did not cancel (``left``, from :func:`_uncancelled`).

    At a point ``p`` where the signed corners of the chunks and of the tensor differ, the coverage counts
    of the ``2**n`` elements ``p - e`` (``e`` in {0, 1}**n) differ too, for at least one of them: the
    signed sum at ``p`` is a combination of exactly those counts. Only chunks whose closure holds ``p``
    can hold any of those elements.
    """
    n = len(split)
    p = min(left)  # the smallest, so that a message does not change from run to run
    near = [b for b in boxes if all(b[1][d] <= p[k] <= b[1][d] + b[2][d] for k, d in enumerate(split))]
    for mask in range(1 << n):
        x = [0] * len(shape)
        for k, d in enumerate(split):
            x[d] = p[k] - ((mask >> k) & 1)
        if not all(0 <= x[d] < shape[d] for d in split):
            continue
        holders = [b for b in near if all(b[1][d] <= x[d] < b[1][d] + b[2][d] for d in split)]
        if len(holders) > 1:
            return _overlap(shape, holders[0], holders[1])
        if not holders:
            return _gap(shape, boxes, tuple(x), split)
    raise AssertionError("signed corners differ but every element near them is covered once")


def _overlap(shape: tuple[int, ...], a: _Box, b: _Box) -> str:
    lo = tuple(max(x, y) for x, y in zip(a[1], b[1], strict=True))
    hi = tuple(min(x + s, y + t) for x, s, y, t in zip(a[1], a[2], b[1], b[2], strict=True))
    i, j = sorted((a[0], b[0]))
    return f"chunks {i} and {j} overlap: both hold {_region(shape, lo, hi)}"


def _gap(shape: tuple[int, ...], boxes: list[_Box], x: tuple[int, ...], split: list[int]) -> str:
    """A box of elements no chunk holds, grown from the uncovered element ``x`` one dimension at a time.

    Growing along a dimension stops at the nearest chunk that meets the box in every other dimension, so
    the box stays empty: a chunk reaching into it would have held an element of the box before it grew.
    """
    # Every chunk spans the other dimensions whole: only the split ones can bound the box.
    lo, hi = [0] * len(shape), list(shape)
    for d in split:
        lo[d], hi[d] = x[d], x[d] + 1
    for d in split:
        below, above = 0, shape[d]
        for _, o, s in boxes:
            if all(o[k] < hi[k] and lo[k] < o[k] + s[k] for k in split if k != d):
                if o[d] + s[d] <= x[d]:
                    below = max(below, o[d] + s[d])
                elif o[d] > x[d]:
                    above = min(above, o[d])
        lo[d], hi[d] = below, above
    return f"no chunk holds {_region(shape, tuple(lo), tuple(hi))}"


def _region(shape: tuple[int, ...], lo: tuple[int, ...], hi: tuple[int, ...]) -> str:
    if not shape:
        return "its one element"
    return "elements [" + ", ".join(f"{a}:{b}" for a, b in zip(lo, hi, strict=True)) + "]"


# ------------------------------------------------------------------------------------- structure


def _containers(p: _Parsed) -> tuple[str | None, dict[str, str], list[str]]:
    """(the model's top-level key or None, tensor key -> group, top-level keys besides the model)."""
    tensor_tops: dict[str, None] = {}
    for e in p.tensors:
        if e.fqn in p.nested:
            tensor_tops.setdefault(p.tops[e.fqn], None)
    model_key = next((k for k in tensor_tops if k in MODEL_KEYS), None)
    if model_key is not None and any(
        e.fqn not in p.nested and not looks_like_rng_state(e.fqn, e.dtype, e.shape) for e in p.tensors
    ):
        # A tensor at the top beside a "model" key (an RNG state aside): the top is the state dict, as the
        # torch.save reader takes such a dict ({'model': {'w'}, 'w'} would otherwise name two tensors 'w').
        model_key = None
    groups: dict[str, str] = {}
    for e in p.tensors:
        top = p.tops[e.fqn]
        if e.fqn in p.nested and top in OPTIMIZER_GROUP_KEYS and top != model_key:
            groups[e.fqn] = "optimizer"
        elif model_key is None or top == model_key:
            groups[e.fqn] = "model"
        else:
            groups[e.fqn] = top
    others: dict[str, None] = {}
    for key in [e.fqn for e in p.tensors] + p.byte_entries + [k for k, _ in p.unknown]:
        top = p.tops.get(key, key.partition(".")[0])
        if top == model_key or (model_key is None and groups.get(key) == "model"):
            continue
        others.setdefault(top, None)
    if p.byte_entries:
        p.findings.append(
            Finding(
                "info",
                "non-tensor-entries",
                f"{count(len(p.byte_entries), 'non-tensor entry', 'non-tensor entries')} stored as pickled "
                f"objects, scanned but not loaded: {name_list(p.byte_entries)}",
            )
        )
    return model_key, groups, list(others)


def _optimizer_state_tops(p: _Parsed) -> set[str]:
    """Top-level keys holding both ``state.*`` and ``param_groups.*``: structurally an optimizer state dict."""
    state: set[str] = set()
    groups: set[str] = set()
    for key in [e.fqn for e in p.tensors] + p.byte_entries:
        top = p.tops.get(key)
        if top is None or key not in p.nested:
            continue
        rest = key[len(top) + 1 :]
        if rest.startswith("state."):
            state.add(top)
        elif rest.startswith("param_groups."):
            groups.add(top)
    return state & groups


def _optimizer_evidence(p: _Parsed, model_key: str | None, groups: dict[str, str]) -> set[str]:
    """Model tensors that have optimizer state: ``<optim>.state.<param fqn>.<name>`` names them.

    ``get_state_dict`` (torch.distributed.checkpoint.state_dict) keys optimizer state by the parameter's
    fully qualified name, the same name the model state dict uses, so ``optim.state.fc.weight.exp_avg``
    points at ``model.fc.weight``. The tensor then gets role ``parameter`` with evidence ``optimizer``,
    ``exact: false`` (DESIGN.md §2 lists ``optimizer`` among the inferred sources). It is strong
    evidence, but not a record of the role: the link is a naming convention of get_state_dict rather
    than something the file states (a hand-built dict can use any names, an index-keyed optimizer
    ``optim.state.0.exp_avg`` names nothing), and what it shows is that the optimizer *updated* the
    tensor when saved, not that it is an ``nn.Parameter`` of the model today (a tied parameter has state
    under one name only). Its absence proves nothing either: a frozen parameter, or one that never got
    a gradient, has no state. Integer and bool tensors never take it (autograd cannot train them).
    """
    model_names = {e.fqn: e for e in p.tensors if groups.get(e.fqn) == "model"}
    found: set[str] = set()
    for e in p.tensors:
        top = p.tops.get(e.fqn)
        if groups.get(e.fqn) != "optimizer" or top is None:
            continue
        rest = e.fqn.removeprefix(f"{top}.state.")
        if rest == e.fqn:
            continue
        param = rest.rpartition(".")[0]  # drop the state's own name (exp_avg, step, momentum_buffer, ...)
        target = f"{model_key}.{param}" if model_key is not None else param
        t = model_names.get(target)
        if t is not None and t.dtype in DTYPES and not DTYPES[t.dtype].is_integral:
            found.add(target)
    return found


# ------------------------------------------------------------------------------------- bytes entries


def _inert_storage(pid: Any) -> StorageRef:
    """A storage record for a pickled object's tensor: named, never read or checked against a file."""
    if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], Global):
        dtype = STORAGE_TYPES.get(pid[1].name, "uint8")
        numel = pid[4] if type(pid[4]) is int and 0 <= pid[4] <= MAX_INDEX else 0
        key, location = pid[2], pid[3]
        if type(key) is str and type(location) is str:
            return StorageRef(key[:64], dtype, location[:64], numel, nbytes(dtype, numel))
    raise InputError(f"unexpected persistent id {describe(pid)}")


def _pickles_of(blob: bytes) -> list[bytes]:
    """The pickles torch.load would unpickle from a bytes entry: a torch.save archive's data.pkl, or
    up to five pickles back to back (the pre-1.6 format: magic, protocol, sys info, object, keys)."""
    if blob[:4] == b"PK\x03\x04":
        # statecli's zip reader, not zipfile: encrypted or LZMA members, lying headers and zip bombs are each
        # an InputError here (the entry is then reported unscanned), never an exception zipfile chose.
        f = io.BytesIO(blob)
        members = read_directory_at(f, 0, len(blob), "")
        pkls = [n for n in members if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise InputError(f"a zip archive with {len(pkls)} data.pkl members")
        return [read_member_from(f, members[pkls[0]], MAX_BYTES_ENTRY, "")]
    return [blob]


def _not_dcp(actions: Iterable[Action]) -> list[Action]:
    """The actions other than making DCP's own metadata objects (the format's vocabulary, see DCP_NAMES)."""
    return [
        a
        for a in actions
        if a.kind in ("patch", "build", "call-on-value") or (a.target.module, a.target.name) not in DCP_NAMES
    ]


def _scan_blob(blob: bytes) -> tuple[dict[tuple[str, str], int], list[Action]]:
    seen: dict[tuple[str, str], int] = {}
    calls: list[Action] = []
    for data in _pickles_of(blob):
        rest = data
        for _ in range(5):
            _, u = loads(rest, _inert_storage)
            for k, n in u.globals_seen.items():
                seen[k] = seen.get(k, 0) + n
            calls.extend(u.actions.values())
            rest = rest[u.end :]
            if rest[:1] != b"\x80":
                break
    return seen, calls


def _scan_byte_entries(p: _Parsed) -> list[Finding]:
    """Findings for the pickled objects torch's DCP loader would ``torch.load(weights_only=False)``."""
    if p.spans is None or not p.byte_entries:
        return []
    by_message: dict[tuple[str, str, str], list[str]] = {}
    out = FindingCap()  # a million entries naming a million different globals: a hundred findings
    per_code: dict[str, int] = {}
    unscanned: list[str] = []
    total = 0
    handles: dict[str, Any] = {}
    try:
        for key in p.byte_entries:
            s = p.spans[(key, None)]
            if s.transforms or s.length > MAX_BYTES_ENTRY or total + s.length > MAX_BYTES_TOTAL:
                unscanned.append(f"{key} (transformed or too large)" if s.transforms else f"{key} ({s.length} bytes)")
                continue
            total += s.length
            try:
                f = handles.get(s.path)
                if f is None:
                    f = handles[s.path] = open_regular(s.path)  # closed below
                f.seek(s.offset)
                blob = f.read(s.length)
                seen, calls = _scan_blob(blob)
            except (StatecliError, zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
                unscanned.append(
                    f"{describe_name(key, 80)} ({describe_name(getattr(e, 'message', None) or str(e), 120)})"
                )
                continue
            seen = {k: n for k, n in seen.items() if k not in DCP_NAMES}
            for finding in findings_for(seen, _not_dcp(calls)):
                k = (finding.level, finding.code, finding.message)
                keys = by_message.get(k)
                if keys is not None:
                    keys.append(key)
                elif per_code.get(finding.code, 0) >= MAX_FINDINGS_PER_CODE:
                    out.count(finding.code, finding.level)  # a new message no one would read: counted only
                else:
                    by_message[k] = [key]
                    per_code[finding.code] = per_code.get(finding.code, 0) + 1
    finally:
        for h in handles.values():
            h.close()
    for (level, code, message), keys in by_message.items():
        more = f" (and {count(len(keys) - 1, 'more entry', 'more entries')})" if len(keys) > 1 else ""
        out.add(Finding(level, code, f"non-tensor entry {quote(keys[0])}{more}: {message}"))
    if unscanned:
        out.add(
            Finding(
                "warning",
                "unscanned-entry",
                "non-tensor entries statecli could not scan; torch's DCP loader unpickles them with "
                f"torch.load(weights_only=False): {name_list(unscanned)}",
            )
        )
    return out.findings()


# ------------------------------------------------------------------------------------- text
