"""Carrying out a plan: read each storage once, cast it, write it, then read the output back.

torch is imported here and only here (lazily, by the callers): planning and ``--dry-run`` never need it.
Memory stays near the largest storage: one storage is read, cast and written before the next.
"""

from __future__ import annotations

import collections
import itertools
import os
import re
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from statecli import dtypes
from statecli.conversion.casting import CastStats, cast, one_thread, overflow_error, range_findings
from statecli.conversion.plan import (
    DEFAULT_SHARD_SIZE,
    INDEX_NAME,
    STORAGE_CLASS,
    Plan,
    PlanItem,
    parameters_keep_roles,
)
from statecli.conversion.quantized import QuantizedOut, quantizer_problem, same_channel_params
from statecli.dtypes import contiguous_strides
from statecli.errors import (
    CheckFailedError,
    InputError,
    OutputError,
    StatecliError,
    UnsafeError,
    UnsupportedFormatError,
    UsageError,
)
from statecli.formats import read
from statecli.formats.atomic import (
    PendingFile,
    check_destination,
    folder_problem,
    output_error,
    remove_leftovers,
    sync_folder,
)
from statecli.formats.dcpwrite import METADATA_NAME as DCP_METADATA
from statecli.formats.dcpwrite import DcpRecord, DcpTensor, dcp_file_name, write_dcp_file
from statecli.formats.repickle import STATE_DICT_INSTEAD, PersistentId, rewrite
from statecli.formats.safetensors import METADATA_KEY, roles_metadata
from statecli.formats.safetensors import header as st_header
from statecli.formats.sharded import index_bytes, shard_name, split_by_size
from statecli.formats.torchzip import (
    ParameterOut,
    QTensorOut,
    StorageOut,
    TensorOut,
    read_graph,
    write_archive,
    write_torch_zip,
)
from statecli.records import Finding, Report, TensorInfo
from statecli.tensors.quantized import channel_params
from statecli.tensors.quantized import make as make_quantized
from statecli.tensors.source import Source, byte_view, check_views, refuse_mixed_dtypes
from statecli.tensors.values import StorageReader
from statecli.tensors.views import storage_dtype, torch_dtype, view
from statecli.wording import count, name_list

if TYPE_CHECKING:
    import torch

Progress = Callable[[int, int], None]  # (bytes done, tensors done)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


@dataclass(slots=True)
class ConversionReport:
    """What ``convert`` did. ``to_dict()`` is ``--format json``; the table shows the same records."""

    plan: Plan
    files: list[str] = field(default_factory=list)
    stats: dict[str, CastStats] = field(default_factory=dict)  # by output name of each cast unit's leader
    bytes_written: int = 0
    values_verified: bool = False
    findings: list[Finding] = field(default_factory=list)
    jobs: int = 1  # worker processes on this machine
    world_size: int = 1  # torchrun ranks
    ranks: list[dict[str, Any]] = field(default_factory=list)  # each rank's output files

    def __post_init__(self) -> None:
        if not self.ranks:
            self.ranks = [{"rank": 0, "files": self.files}]

    def to_dict(self) -> dict[str, Any]:
        out = self.plan.to_dict()
        out["schema"] = "statecli.conversion/1"
        out["files"] = list(self.files)
        out["bytes_written"] = self.bytes_written
        out["values_verified"] = self.values_verified
        out["jobs"] = self.jobs
        out["world_size"] = self.world_size
        out["ranks"] = [{"rank": r["rank"], "files": list(r["files"])} for r in self.ranks]
        for t in out["tensors"]:
            s = self.stats.get(t["name"])
            t["overflow"] = s.overflow if s else 0
            t["underflow"] = s.underflow if s else 0
            t["nonfinite"] = s.nonfinite if s else 0
            t["inf_changed"] = s.inf_changed if s else 0
        out["notes"] = [f.to_dict() for f in [*self.plan.notes, *self.findings]]
        return out


# ---------------------------------------------------------------- units: storages converted as one


@dataclass(slots=True)
class _Unit:
    """A storage and the plan items that view it. ``compact``: one view, written alone."""

    items: list[PlanItem]
    src_dtype: str
    dst_dtype: str
    compact: bool
    storage_numel: int  # in elements of the source dtype (the whole storage, or the compact view)
    streamable: bool = False  # one contiguous view over all of its bytes: can go through in pieces
    # A whole storage some of whose elements no tensor views: they are cast with the rest, but not counted.
    slack: bool = False
    whole_bytes: int = 0  # a whole storage's bytes (sub-byte dtypes count bytes, not elements)

    @property
    def leader(self) -> PlanItem:
        return self.items[0]

    def out_nbytes(self) -> int:
        if self.whole_bytes and self.dst_dtype == self.src_dtype:
            return self.whole_bytes
        return dtypes.nbytes(self.dst_dtype, self.storage_numel)

    def view_of(self, item: PlanItem) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
        """(offset, shape, stride) of ``item`` inside this unit's output storage."""
        t = item.source
        if self.compact:
            return 0, t.shape, contiguous_strides(t.shape)
        return t.storage_offset, t.shape, t.stride or contiguous_strides(t.shape)


def _extent(t: Any) -> int:
    """Elements from the storage offset to one past the last element ``t`` reaches."""
    if any(s == 0 for s in t.shape):
        return 0
    stride = t.stride or contiguous_strides(t.shape)
    return 1 + sum((s - 1) * st for s, st in zip(t.shape, stride, strict=True))


def build_units(plan: Plan) -> list[_Unit]:
    refuse_mixed_dtypes((i.source for i in plan.items), plan.report.path)
    storage_sizes = plan.report.storage_sizes
    by_unit: dict[str, list[PlanItem]] = {}
    for i in plan.items:
        first = by_unit.setdefault(i.unit, [i])[0]
        if first is not i:
            by_unit[i.unit].append(i)
            if first.dst_device != i.dst_device:
                # A .pt storage has one location; a .pt2 can claim two for one weight member.
                raise InputError(
                    f"{first.source.name!r} and {i.source.name!r} share a storage but are saved on "
                    f"{first.dst_device} and {i.dst_device}; a storage lives on one device (--device picks one)",
                    path=plan.report.path,
                )
    units = []
    for key, items in by_unit.items():
        lead = items[0]
        itemsize = dtypes.DTYPES[lead.src_dtype].itemsize
        views = {(i.source.storage_offset, i.source.shape, i.source.stride) for i in items}
        whole = storage_sizes.get(key)
        t = lead.source
        contiguous_full = t.storage_offset == 0 and (t.stride in (None, contiguous_strides(t.shape)))
        if plan.graph and whole is not None:
            # The whole object graph keeps every storage whole, as torch.save does: one pass over its bytes.
            covered = any(
                i.source.storage_offset == 0
                and i.source.stride in (None, contiguous_strides(i.source.shape))
                and _extent(i.source) * itemsize == whole
                for i in items
            )
            # Uncast, the bytes go through as they are, whatever the views (packed quint4x2 counts halves).
            same = lead.dst_dtype == lead.src_dtype
            u = _Unit(items, lead.src_dtype, lead.dst_dtype, False, whole // itemsize, streamable=covered or same)
            u.slack, u.whole_bytes = not (covered or same), whole
            units.append(u)
        elif len(views) == 1 and (whole is None or not (contiguous_full and _extent(t) * itemsize == whole)):
            # No storage size: safetensors, where a tensor is exactly its own byte range.
            units.append(_Unit(items, lead.src_dtype, lead.dst_dtype, True, t.numel, streamable=whole is None))
        elif len(views) == 1:
            units.append(_Unit(items, lead.src_dtype, lead.dst_dtype, False, t.numel, streamable=True))
        else:
            numel = (whole if whole is not None else max(_extent(i.source) for i in items) * itemsize) // itemsize
            units.append(_Unit(items, lead.src_dtype, lead.dst_dtype, False, numel))
    return units


def materialize(source: Source, unit: _Unit) -> tuple[torch.Tensor, CastStats | None]:
    """The unit's output storage as a 1-D tensor of its destination dtype, and the cast's counts."""
    raw = source.read(unit.leader.source)
    src_dtype = storage_dtype(unit.src_dtype)
    t = unit.leader.source
    base = raw.view(src_dtype)
    check_views([i.source for i in unit.items], base.numel(), source.report.path)
    if unit.compact:
        values = view(base, t.storage_offset, t.shape, t.stride or contiguous_strides(t.shape)).contiguous().view(-1)
    else:
        values = base[: unit.storage_numel]
    if unit.dst_dtype == unit.src_dtype:
        return values, None
    out, stats = cast(values, torch_dtype(unit.dst_dtype))
    if unit.slack:
        # Elements no tensor views are cast too (the storage stays whole) but cannot overflow anything a user
        # sees: only the viewed ones count.
        _, stats = cast(values[_viewed(unit, values.numel())], torch_dtype(unit.dst_dtype))
    return out, stats


def _viewed(unit: _Unit, numel: int) -> torch.Tensor:
    """A mask of the storage elements some tensor of ``unit`` views."""
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    mask = torch.zeros(numel, dtype=torch.bool)
    for i in unit.items:
        offset, shape, stride = unit.view_of(i)
        view(mask, offset, shape, stride).fill_(True)
    return mask


def stream(
    source: Source, unit: _Unit, stats: CastStats, advance: Callable[[int], None]
) -> Generator[memoryview, None, None]:
    """A streamable unit's output bytes, piece by piece: memory stays at one piece, whatever the tensor.

    Each piece is valid until the next is asked for. ``stats`` fills in as the pieces go by;
    ``advance(n)`` is told of each ``n`` output bytes."""
    src_dtype = torch_dtype(unit.src_dtype)
    dst_dtype = torch_dtype(unit.dst_dtype)
    same = unit.src_dtype == unit.dst_dtype
    for piece in source.chunks(unit.leader.source):
        if same:
            mv = byte_view(piece)
        else:
            out, got = cast(piece.view(src_dtype), dst_dtype)
            stats.add(got)
            mv = byte_view(out)
        yield mv
        advance(len(mv))


# ---------------------------------------------------------------- writers


def _exact_module_roles(items: list[PlanItem]) -> bool:
    """Write nn.Parameter objects (state_dict(keep_vars=True)) only where a reader sees exact roles again."""
    return parameters_keep_roles(items)


def _write_torch(pending: PendingFile, plan: Plan, units: list[_Unit], feeder: _Feeder, root: str) -> int:
    storages: dict[int, StorageOut] = {}
    state: dict[str, TensorOut | QTensorOut | ParameterOut] = {}
    keep_vars = _exact_module_roles(plan.items)
    quantized = QuantizedOut(feeder.source, len(units))
    for k, u in enumerate(units):
        location = u.leader.dst_device or "cpu"
        numel = u.storage_numel
        storages[id(u)] = StorageOut(str(k), u.dst_dtype, location, numel, u.out_nbytes())
    for u in units:
        s = storages[id(u)]
        for item in u.items:
            offset, shape, stride = u.view_of(item)
            t: TensorOut | QTensorOut = TensorOut(s, offset, shape, stride)
            if item.source.quantizer is not None:
                t = quantized.wrap(item, t)
            if keep_vars and item.role == "parameter":
                grad = item.source.requires_grad
                state[item.name] = ParameterOut(t, True if grad is None else grad)
            else:
                state[item.name] = t
    # Restore plan order: units group items, the state dict keeps the input's order.
    ordered = {i.name: state[i.name] for i in plan.items}
    written = ((storages[id(u)], feeder.storage(u)) for u in units)
    return write_torch_zip(pending, root, ordered, itertools.chain(written, quantized.storages()))


def _write_graph(pending: PendingFile, plan: Plan, units: list[_Unit], feeder: _Feeder, root: str) -> int:
    """The input's own pickle, every storage record rewritten for its new dtype and device, then each
    storage's bytes (converted where its tensors are) in the order the pickle first names them."""
    graph = read_graph(plan.report.path)
    by_key = {u.leader.source.storage: u for u in units}
    new: dict[str, PersistentId] = {}
    pids = []
    for pid in graph.pids:
        made = new.get(pid.key)
        if made is None:
            u = by_key.get(f"data/{pid.key}")
            location = (u.leader.dst_device if u is not None else plan.options.device) or pid.location
            stype, module = pid.storage_type, pid.module
            if u is not None and u.dst_dtype != u.src_dtype:
                if STORAGE_CLASS.get(u.src_dtype) != stype:
                    # An untyped storage (or one whose type is not its tensors' dtype): the dtype torch
                    # rebuilds them with is in their rebuild calls, which are copied as they are.
                    raise UnsupportedFormatError(
                        f"cannot cast {u.leader.name!r} inside a whole checkpoint: its storage is saved as "
                        f"{pid.module}.{stype}, its dtype in its rebuild call, which statecli copies as it is; "
                        f"{STATE_DICT_INSTEAD}",
                        path=plan.report.path,
                    )
                stype, module = STORAGE_CLASS[u.dst_dtype], "torch"
            made = new[pid.key] = PersistentId(stype, pid.key, location, pid.numel, module)
        pids.append(made)
    data = rewrite(graph.data, graph.start, graph.end, pids, plan.report.path, graph.first_free)

    def storages() -> Iterator[tuple[StorageOut, Iterator[memoryview]]]:
        for key, pid in new.items():
            u = by_key.get(f"data/{key}")
            if u is not None:
                yield StorageOut(key, u.dst_dtype, pid.location, pid.numel, u.out_nbytes()), feeder.storage(u)
            else:  # viewed by no tensor the report lists (a per-channel quantizer's scales): copied as it is
                size = plan.report.storage_sizes[f"data/{key}"]
                yield StorageOut(key, "uint8", pid.location, size, size), feeder.bare(f"data/{key}", size)

    return write_archive(pending, root, data, storages())


@dataclass(slots=True)
class _StEntry:
    item: PlanItem
    unit: _Unit
    nbytes: int


def _safetensors_header(entries: list[_StEntry], items: list[PlanItem], aliases: dict[str, str]) -> bytes:
    roles = {i.name: i.role for i in items if i.exact}
    grads = {i.name: i.source.requires_grad for i in items if i.source.requires_grad is not None}
    metadata = {"format": "pt", METADATA_KEY: roles_metadata(roles, grads, aliases)}
    return st_header(((e.item.name, e.item.dst_dtype, e.item.shape, e.nbytes) for e in entries), metadata)


def _size(e: _StEntry) -> int:
    return e.nbytes


def _st_layout(plan: Plan, units: list[_Unit]) -> tuple[list[_StEntry], dict[str, str]]:
    """Stored tensors in file order (widest dtype first, so every tensor is aligned) and the aliases."""
    entries: list[_StEntry] = []
    aliases: dict[str, str] = {}
    for u in units:
        for i in u.items:
            if i.alias_of is not None:
                aliases[i.name] = i.alias_of
            else:
                entries.append(_StEntry(i, u, i.nbytes_out))
    order = {id(u): k for k, u in enumerate(units)}
    entries.sort(key=lambda e: (-dtypes.DTYPES[e.item.dst_dtype].itemsize, order[id(e.unit)]))
    return entries, aliases


# ---------------------------------------------------------------- the conversion


class _Feeder:
    """Hands out each unit's output bytes, streamed in pieces where it can, and keeps the counts and
    the progress. A unit with several distinct views is materialized once and kept only until its last
    view is written."""

    def __init__(self, source: Source, report: ConversionReport, progress: Progress | None) -> None:
        self.source = source
        self.report = report
        self.progress = progress
        self.done_bytes = 0
        self.done_tensors = 0
        self._bases: dict[int, tuple[Any, int]] = {}  # id(unit) -> (cast storage, views still to write)

    def _advance(self, n: int) -> None:
        self.done_bytes += n
        if self.progress is not None:
            self.progress(self.done_bytes, self.done_tensors)

    def _stats_for(self, u: _Unit) -> CastStats:
        stats = CastStats()
        if u.dst_dtype != u.src_dtype:
            self.report.stats[u.leader.name] = stats
        return stats

    def _whole(self, u: _Unit) -> Any:
        base, stats = materialize(self.source, u)
        if stats is not None:
            self.report.stats[u.leader.name] = stats
        return base

    def _pieces(self, mv: memoryview) -> Generator[memoryview, None, None]:
        step = 64 << 20
        for lo in range(0, len(mv), step):
            piece = mv[lo : lo + step]
            yield piece
            self._advance(len(piece))

    def storage(self, u: _Unit) -> Iterator[memoryview]:
        """All of ``u``'s output storage (a .pt member)."""
        if u.streamable:
            pieces = stream(self.source, u, self._stats_for(u), self._advance)
        else:
            pieces = self._pieces(byte_view(self._whole(u)))
        yield from self._exactly(pieces, u.out_nbytes(), u.leader.name)
        self.done_tensors += len(u.items)
        self._advance(0)

    def bare(self, storage: str, size: int) -> Iterator[memoryview]:
        """The bytes of a storage that no listed tensor views, as they are."""
        t = TensorInfo(
            name=f"storage {storage}",
            role="other",
            exact=False,
            evidence="",
            persistent=None,
            requires_grad=None,
            dtype="uint8",
            shape=(size,),
            numel=size,
            nbytes=size,
            device=None,
            storage=storage,
        )
        pieces = (byte_view(piece) for piece in self.source.chunks(t))
        yield from self._exactly(pieces, size, t.name)

    def _exactly(self, pieces: Generator[memoryview, None, None], n: int, name: str) -> Iterator[memoryview]:
        """``pieces`` when they add up to the ``n`` bytes the output's header announced; an error otherwise.

        Every output byte is one that was read from the input or computed from it: the writers append
        what they are given and nothing else, so a short storage would shift every later tensor."""
        got = 0
        try:
            for piece in pieces:
                got += len(piece)
                if got > n:
                    break
                yield piece
        finally:
            pieces.close()  # a reader thread must not go on filling a buffer nobody holds
        if got != n:
            raise InputError(
                f"the bytes of {name!r} came to {'more than ' if got > n else ''}{got}, not the {n} its "
                "dtype and shape need; nothing was written",
                path=self.source.report.path,
            )

    def tensor(self, u: _Unit, item: PlanItem, views: int, nbytes: int) -> Iterator[memoryview]:
        """``item``'s ``nbytes`` bytes alone, contiguous (a safetensors entry); ``views``: how many entries
        ``u`` has."""
        if u.streamable:
            yield from self._exactly(stream(self.source, u, self._stats_for(u), self._advance), nbytes, item.name)
        else:
            base, left = self._bases.get(id(u)) or (self._whole(u), views)
            offset, shape, stride = u.view_of(item)
            yield from self._exactly(
                self._pieces(byte_view(view(base, offset, shape, stride).contiguous())), nbytes, item.name
            )
            if left > 1:
                self._bases[id(u)] = (base, left - 1)
            else:
                self._bases.pop(id(u), None)
        self.done_tensors += 1
        self._advance(0)


@dataclass(slots=True)
class OutFile:
    """One file of a multi-file output: its tensors in file order, and every plan item it holds
    (aliases included), in plan order."""

    path: str
    entries: list[_StEntry]
    items: list[PlanItem]
    aliases: dict[str, str]
    nbytes: int


@dataclass(slots=True)
class Layout:
    """A multi-file output: which tensor goes to which file, decided before any is written, so that any
    number of workers or ranks writes the same bytes; the index comes last."""

    kind: str  # "sharded" (safetensors shards + model.safetensors.index.json) | "dcp" (.distcp + .metadata)
    files: list[OutFile]
    index_path: str
    index: bytes | None  # known before writing (sharded); a DCP .metadata needs every file's byte spans


def _groups(plan: Plan, entries: list[_StEntry]) -> list[list[_StEntry]]:
    """Tensors grouped into output files. ``--max-shard-size`` cuts by size; without it, a sharded input
    keeps its sharding (each tensor stays in its shard's place, so a 1,000-shard checkpoint gives 1,000
    shards that workers can write side by side), and a DCP folder is cut evenly into as many files as it
    has; anything else is cut at the default size."""
    limit = plan.options.max_shard_size
    fmt = plan.report.format
    if limit is None and fmt.startswith("sharded"):
        by_file: dict[str | None, list[_StEntry]] = {}
        for e in entries:
            by_file.setdefault(e.item.source.file, []).append(e)
        return [by_file[f] for f in sorted(by_file, key=lambda f: (f is None, f or ""))]
    total = sum(e.nbytes for e in entries)
    if limit is None and fmt == "dcp" and total:
        files = max(len({t.file for t in plan.report.tensors if t.file}), -(-total // DEFAULT_SHARD_SIZE))
        # In order, each tensor to the file its first byte falls in when the bytes are cut in equal parts.
        groups: list[list[_StEntry]] = [[] for _ in range(files)]
        done = 0
        for e in entries:
            groups[min(files - 1, done * files // total)].append(e)
            done += e.nbytes
        return [g for g in groups if g]
    return split_by_size(entries, _size, limit or DEFAULT_SHARD_SIZE)


def layout(plan: Plan, units: list[_Unit]) -> Layout:
    """The files of a sharded safetensors output and its index."""
    entries, aliases = _st_layout(plan, units)
    order = {id(u): k for k, u in enumerate(units)}
    groups = [g for g in _groups(plan, entries) if g]
    if not groups:
        groups = [[]]
    n = len(groups)
    folder = plan.output
    dcp = plan.output_format == "dcp"
    file_of: dict[str, int] = {}
    files = []
    for k, group in enumerate(groups):
        # Widest dtype first inside each file, so that every tensor's bytes are aligned to its element.
        group.sort(key=lambda e: (-dtypes.DTYPES[e.item.dst_dtype].itemsize, order[id(e.unit)]))
        for e in group:
            file_of[e.item.name] = k
        path = os.path.join(folder, dcp_file_name(k) if dcp else shard_name(k, n))
        files.append(OutFile(path, group, [], {}, sum(e.nbytes for e in group)))
    for a, target in aliases.items():
        files[file_of[target]].aliases[a] = target
        file_of[a] = file_of[target]
    for i in plan.items:
        k = file_of.get(i.name)
        if k is not None:
            files[k].items.append(i)
    if dcp:
        return Layout("dcp", files, os.path.join(folder, DCP_METADATA), None)
    weight_map = {e.item.name: os.path.basename(f.path) for f in files for e in f.entries}
    total = sum(f.nbytes for f in files)
    return Layout("sharded", files, os.path.join(folder, INDEX_NAME), index_bytes(total, weight_map))


def output_paths(plan: Plan) -> list[str]:
    """The files a plan will create (for sharded output, only known exactly once sizes are)."""
    if plan.output_format not in ("sharded", "dcp"):
        return [plan.output]
    out = layout(plan, build_units(plan))
    return [*(f.path for f in out.files), out.index_path]


def execute(plan: Plan, progress: Progress | None = None) -> ConversionReport:
    """Write the plan's output. Raises StatecliError (exit 1 overflow, 3 input, 4 output)."""
    with one_thread():
        return _execute(plan, progress)


def _execute(plan: Plan, progress: Progress | None) -> ConversionReport:
    units = build_units(plan)
    if plan.output_format in ("sharded", "dcp"):
        from statecli.conversion.workers import execute_files  # it imports this module

        if not plan.options.distributed:
            return execute_files(plan, units, progress)
        from statecli.conversion.distributed import TorchGroup

        group = TorchGroup()
        try:
            report = execute_files(plan, units, progress, group)
        except StatecliError:
            group.close()  # execute_files raises its errors on every rank at once
            raise
        except BaseException:
            group.close(together=False)
            raise
        group.close()
        return report
    if plan.options.distributed:
        raise UsageError("--distributed shares the files of a folder output out among ranks: give a folder as -o")
    started = time.time()
    report = ConversionReport(plan)
    check_destination(plan.output, plan.options.force, input_files(plan.report))
    with Source(plan.report, check_crc=plan.options.verify) as source:
        pendings: list[tuple[PendingFile, str]] = []
        try:
            p = PendingFile(plan.output, sync=plan.options.sync)
            if plan.output_format == "torch":
                pendings.append((p, "torch"))
                stem = os.path.splitext(os.path.basename(plan.output))[0]
                root = stem if _SAFE_NAME.match(stem) else "archive"
                feeder = _Feeder(source, report, progress)
                write = _write_graph if plan.graph else _write_torch
                report.bytes_written = write(p, plan, units, feeder, root)
            else:
                pendings.append((p, "safetensors"))
                _write_safetensors(plan, units, _Feeder(source, report, progress), report, p)
            # Overflow is known only once every value has been cast; the files are thrown away unnamed.
            err = None if plan.options.allow_overflow else overflow_error(report.stats, report.plan.target_dtype or "")
            if err is not None:
                raise err
            for p, _ in pendings:
                p.finish()
            _read_back(plan, pendings)
            if plan.options.verify:
                _verify_values(plan, units, source, pendings)
                report.values_verified = True
        except BaseException as e:
            for p, _ in pendings:
                p.discard()
            if isinstance(e, OSError):
                raise output_error(e, plan.output) from e
            raise
        # Everything is written and checked: only now do names appear, index last.
        try:
            for p, _ in pendings:
                p.commit()
                report.files.append(p.path)
        except StatecliError:
            for p, _ in pendings:
                p.discard()
            raise
        out_folder = os.path.dirname(os.path.abspath(report.files[0]))
        if plan.options.sync:
            sync_folder(out_folder)
    report.findings.extend(_leftovers(out_folder, started))
    report.findings.extend(range_findings(report.stats, plan.target_dtype))
    return report


def prepare_folder(plan: Plan, paths: list[str], report: ConversionReport) -> str | None:
    """Check a folder output before any work (each file's name, --force) or make it; return the folder
    when it was made here (removed again on failure), None when it was there."""
    folder = os.path.abspath(plan.output)
    if os.path.isdir(folder):
        inputs = input_files(plan.report)
        for p in paths:
            check_destination(p, plan.options.force, inputs)
        report.findings.extend(_stale_shards(folder, paths))
        return None
    if (problem := folder_problem(os.path.dirname(folder))) is not None:
        raise OutputError(problem, path=plan.output)
    if os.path.lexists(folder):
        raise OutputError("output path exists and is not a folder", path=plan.output)
    try:
        os.mkdir(folder)  # only the last level, like save_pretrained; removed again on failure
    except OSError as e:
        raise output_error(e, plan.output) from e
    return folder


def _leftovers(folder: str, started: float) -> list[Finding]:
    """Hidden files an earlier, killed conversion left in the output folder: removed, and said so."""
    removed = remove_leftovers(folder, started)
    if not removed:
        return []
    what = count(len(removed), "hidden temporary file")
    return [
        Finding(
            "info",
            "leftovers-removed",
            f"removed {what} that a killed statecli conversion left in {folder}: {name_list(removed)}",
        )
    ]


def _stale_shards(folder: str, paths: list[str]) -> list[Finding]:
    """Shards of an earlier conversion with another shard count: loaders follow the new index and
    ignore them, but a person listing the folder would not know."""
    ours = {os.path.basename(p) for p in paths}
    stale = sorted(n for n in os.listdir(folder) if _SHARD_NAME.match(n) and n not in ours)
    if not stale:
        return []
    return [
        Finding(
            "warning",
            "stale-shards",
            f"{len(stale)} shard file(s) of an earlier conversion stay in {folder} and are not in the new "
            f"index: {', '.join(stale[:5])}{' …' if len(stale) > 5 else ''}",
        )
    ]


def _write_safetensors(
    plan: Plan, units: list[_Unit], feeder: _Feeder, report: ConversionReport, pending: PendingFile
) -> None:
    entries, aliases = _st_layout(plan, units)
    views = collections.Counter(id(e.unit) for e in entries)
    report.bytes_written = write_shard(OutFile(plan.output, entries, plan.items, aliases, 0), views, feeder, pending)


def write_dcp(
    f: OutFile, views: collections.Counter[int], feeder: _Feeder, pending: PendingFile
) -> tuple[int, list[DcpRecord]]:
    """One ``.distcp`` data file: each tensor a ``torch.save`` archive of its own, back to back; the byte
    span of each, for the ``.metadata`` written once every file is."""
    name = os.path.basename(f.path)
    tensors = (
        DcpTensor(
            e.item.name,
            e.item.dst_dtype,
            e.item.shape,
            e.nbytes,
            feeder.tensor(e.unit, e.item, views[id(e.unit)], e.nbytes),
        )
        for e in f.entries
    )
    records = write_dcp_file(pending, name, tensors)
    return sum(r.length for r in records), records


def _pieces(feeder: _Feeder, e: _StEntry, views: collections.Counter[int]) -> Iterator[memoryview]:
    return feeder.tensor(e.unit, e.item, views[id(e.unit)], e.nbytes)


def write_shard(f: OutFile, views: collections.Counter[int], feeder: _Feeder, pending: PendingFile) -> int:
    """One safetensors file: its header, then each tensor's bytes. ``views``: how many entries of the
    files this process writes view each unit (a unit with several views is materialized once)."""
    pending.write(_safetensors_header(f.entries, f.items, f.aliases))
    for e in f.entries:
        for piece in feeder.tensor(e.unit, e.item, views[id(e.unit)], e.nbytes):
            pending.write(piece)
    return sum(e.nbytes for e in f.entries)


def input_files(report: Report) -> list[str]:
    """Every file the input reads from: no output may replace one (a DCP folder converted into itself
    would lose its own data files under --force)."""
    if report.format.startswith("sharded"):
        folder = os.path.dirname(report.path)
        return [report.path, *sorted({os.path.join(folder, t.file) for t in report.tensors if t.file})]
    if report.format == "dcp":
        folder = report.path if os.path.isdir(report.path) else os.path.dirname(report.path)
        files = {os.path.join(folder, t.file) for t in report.tensors if t.file}
        return [report.path, os.path.join(folder, DCP_METADATA), *sorted(files)]
    return [report.path]


# ---------------------------------------------------------------- checking what was written


def _read_back(plan: Plan, pendings: list[tuple[PendingFile, str]], items: list[PlanItem] | None = None) -> None:
    """Read output files with statecli's own readers and compare them with the plan's ``items`` (all of
    them by default: one file of a multi-file output holds its own)."""

    seen: dict[str, Any] = {}
    for p, kind in pendings:
        if kind == "index":
            continue
        back = read(p.readable_path)
        _same_verdict(plan, back)
        for t in back.tensors:
            seen[t.name] = t
    problems = []
    # A .pt keeps roles only as Parameter objects, written when every role is exact (see _exact_module_roles).
    roles_stored = plan.output_format not in ("torch", "dcp") or plan.graph or _exact_module_roles(plan.items)
    for i in plan.items if items is None else items:
        t = seen.pop(i.name, None)
        if t is None:
            problems.append(f"{i.name} is missing")
            continue
        if t.shape != i.shape:
            problems.append(f"{i.name} has shape {list(t.shape)}, expected {list(i.shape)}")
        if t.dtype != i.dst_dtype:
            problems.append(f"{i.name} is {t.dtype}, expected {i.dst_dtype}")
        if roles_stored and i.exact and (t.role != i.role or not t.exact):
            problems.append(f"{i.name} reads back as {t.role} ({t.evidence}), expected exact {i.role}")
        if plan.output_format == "torch" and t.device != i.dst_device:
            problems.append(f"{i.name} is saved on {t.device}, expected {i.dst_device}")
        if (problem := quantizer_problem(i.source, t)) is not None:
            problems.append(f"{i.name} {problem}")
    problems.extend(f"{name} was not planned" for name in seen)
    if problems:
        raise OutputError(
            "the written file does not match the plan, so it was not kept: " + "; ".join(problems[:10]),
            path=plan.output,
        )


def _same_verdict(plan: Plan, back: Report) -> None:
    """A whole checkpoint's output holds the pickle the writer read again, rewritten: it must do nothing
    dangerous where the plan's verdict on the input found nothing (a file changed between the two reads, or a
    rewrite that moved an opcode, would otherwise hand on a call no one was told of)."""
    if not plan.graph or any(f.level == "dangerous" for f in plan.report.findings):
        return  # refused at planning, or copied on --allow-dangerous, which says so
    bad = next((f for f in back.findings if f.level == "dangerous"), None)
    if bad is not None:
        raise UnsafeError(
            f"the written pickle would do what the input's, as judged, did not: {bad.message} ({bad.code}); "
            "it was not kept (the input changed while it was converted, or its pickle could not be written back "
            "faithfully)",
            path=plan.report.path,
        )


def _verify_values(
    plan: Plan,
    units: list[_Unit],
    source: Source,
    pendings: list[tuple[PendingFile, str]],
    names: set[str] | None = None,
) -> None:
    """--verify: every written tensor's bytes equal a fresh conversion of the input's (of ``names`` only,
    those the files in ``pendings`` hold, when given)."""
    written: dict[str, tuple[StorageReader, Any]] = {}
    readers = []
    try:
        for p, kind in pendings:
            if kind == "index":
                continue
            back = read(p.readable_path)
            reader = StorageReader(back, check_crc=True)
            readers.append(reader)
            for t in back.tensors:
                written[t.name] = (reader, t)
        for u in units:
            if names is not None and not any(i.name in names for i in u.items):
                continue
            expected, _ = materialize(source, u)
            for item in u.items:
                if names is not None and item.name not in names:
                    continue
                reader, t = written[item.name]
                offset, shape, stride = u.view_of(item)
                want = view(expected, offset, shape, stride).contiguous()
                have = reader.values(t).contiguous()
                same = bytes(byte_view(want)) == bytes(byte_view(have))
                if not same or not same_channel_params(source, item.source, reader.source, t):
                    raise OutputError(
                        f"--verify: the values of {item.name} in the output differ from the input's; "
                        "the output was not kept",
                        path=plan.output,
                    )
    finally:
        for reader in readers:
            reader.__exit__(None, None, None)


def load_units(plan: Plan, units: list[_Unit], device: str) -> dict[str, Any]:
    """The plan's tensors as a state dict on ``device``; each storage is moved once, so ties hold."""
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} is not available here: torch sees no CUDA GPU")
    report = ConversionReport(plan)
    out: dict[str, Any] = {}
    with Source(plan.report) as source, one_thread():
        for u in units:
            base, stats = materialize(source, u)
            if stats is not None:
                report.stats[u.leader.name] = stats
            if device != "cpu":
                base = base.to(device)
            elif base.untyped_storage().nbytes() != base.numel() * base.element_size():
                base = base.clone()  # do not keep a larger read buffer alive behind a small view
            for item in u.items:
                offset, shape, stride = u.view_of(item)
                q = item.source.quantizer
                if q is not None:  # a real quantized tensor over the same memory, as torch.load gives
                    params = channel_params(source, q)
                    out[item.name] = make_quantized(base, offset, shape, stride, item.source, params)
                else:
                    out[item.name] = view(base, offset, shape, stride)
    err = None if plan.options.allow_overflow else overflow_error(report.stats, report.plan.target_dtype or "")
    if err is not None:
        raise CheckFailedError(err.message.replace("Nothing was written. ", ""))
    return {i.name: out[i.name] for i in plan.items}
