"""``torch.save`` zip archives (.pt .pth .bin .ckpt), read through the restricted pickle reader.

The archive's central directory gives each storage member's size; the pickle gives every tensor's
storage, offset, shape and stride. Nothing else is read: no tensor bytes, no module code.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from statecli import dtypes
from statecli.dtypes import torch_dtype
from statecli.errors import InputError, StatecliError
from statecli.formats.repickle import PersistentId
from statecli.formats.torchpickle import MAX_PICKLE_BYTES, Storages, Walker, finish
from statecli.formats.zipdir import Member, read_central_directory, read_member
from statecli.records import Finding, RawCheckpoint
from statecli.safepickle import Limits
from statecli.security import findings_for, loads
from statecli.wording import name_list

if TYPE_CHECKING:
    from statecli.formats.zipwriter import Sink

MAX_STACKED_PICKLES = 64  # pickles after data.pkl's first that are read for the globals they name


def archive_root(names: list[str], path: str) -> str:
    """The archive's top folder: the file stem when saved to a path, ``archive`` to a file object."""
    roots = {n[: -len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1}
    if not roots:
        raise InputError("zip archive without a data.pkl: not a torch.save checkpoint", path=path)
    if len(roots) > 1:
        raise InputError(f"zip archive with {len(roots)} archive roots ({', '.join(sorted(roots))})", path=path)
    root = roots.pop()
    # torch's zip reader (miniz) finds a record by name case-insensitively and takes the last match: beside
    # data.pkl, a DATA.pkl is what torch.load would unpickle, and not what statecli reads.
    pkl = f"{root}/data.pkl"
    low = pkl.lower()
    twins = [n for n in names if n[-1:] in "lL" and len(n) == len(pkl) and n != pkl and n.lower() == low]
    if twins:
        raise InputError(
            f"zip archive holds {pkl} and {', '.join(sorted(twins))}: torch matches record names without regard "
            "to case and could read the other one",
            path=path,
        )
    return root


def read_torch_zip(
    path: str, members: Mapping[str, Member] | None = None, limits: Limits | None = None
) -> RawCheckpoint:
    """Read a ``torch.save`` zip archive's metadata without torch and without running its pickle."""
    size = os.path.getsize(path)
    if members is None:
        members = read_central_directory(path)
    root = archive_root(list(members), path)
    data = read_member(path, members[f"{root}/data.pkl"], MAX_PICKLE_BYTES)
    storages = Storages(members, root, path)
    try:
        obj, unpickler = loads(data, storages, limits)
    except StatecliError as e:
        raise e.at(path) from None
    stacked = _stacked_pickles(data, unpickler, storages, limits)
    findings = findings_for(unpickler.globals_seen, unpickler.actions.values())
    if unpickler.end < len(data):
        also = f"; {stacked} more pickle(s) there were read only for the globals they name" if stacked else ""
        findings.append(
            Finding(
                "warning",
                "trailing-pickle-data",
                f"data.pkl has {len(data) - unpickler.end} bytes after the pickle's end; torch.load ignores them{also}",
            )
        )
    walker = Walker(path, unpickler.end - unpickler.start)
    try:
        container = walker.analyse(obj)
    except StatecliError as e:
        raise e.at(path) from None
    raw = walker.result(
        "torch-zip", container, findings, size, {f"data/{k}": s.nbytes for k, s in storages.cache.items()}
    )
    keys = name_list(container.other_keys) or "none"
    return finish(raw, obj, f"no tensors found in the checkpoint (top-level keys: {keys})")


@dataclass(slots=True)
class PickleGraph:
    """A torch archive's pickle as bytes, with the persistent id of each storage record in pickle order: what
    writing the same object graph back with other storages needs (see :mod:`statecli.formats.repickle`)."""

    path: str
    data: bytes
    start: int
    end: int
    pids: list[PersistentId]  # one per BINPERSID, in order (a storage named twice is here twice)
    root: Any  # the object, as the restricted reader built it
    # A memo index past every one the pickle puts, for the new records' repeated parts; None where MEMOIZE
    # may number entries by count (any 0x94 byte: a string holding one only costs the saving).
    first_free: int | None = None


def read_graph(path: str, limits: Limits | None = None) -> PickleGraph:
    """The pickle of the ``torch.save`` archive at ``path`` and its persistent ids, parsed once more by the
    restricted reader (nothing is run)."""
    members = read_central_directory(path)
    root = archive_root(list(members), path)
    data = read_member(path, members[f"{root}/data.pkl"], MAX_PICKLE_BYTES)
    storages = Storages(members, root, path)
    pids: list[PersistentId] = []
    first: dict[str, PersistentId] = {}

    def record(pid: Any) -> Any:
        ref = storages(pid)  # checks the id first: the fields below are the types it checked
        # A key read before is the storage read then, whatever the other fields say (torch.load caches by
        # key too), and the reader checked only the first record's fields.
        known = first.get(ref.key)
        if known is None:
            known = first[ref.key] = PersistentId(pid[1].name, pid[2], pid[3], pid[4], pid[1].module)
        pids.append(known)
        return ref

    try:
        obj, unpickler = loads(data, record, limits)
    except StatecliError as e:
        raise e.at(path) from None
    first_free = None if data.find(b"\x94", unpickler.start, unpickler.end) >= 0 else unpickler.memo_top + 1
    return PickleGraph(path, data, unpickler.start, unpickler.end, pids, obj, first_free)


def _stacked_pickles(data: bytes, first: Any, storages: Storages, limits: Limits | None) -> int:
    """Read the pickles stacked after data.pkl's first one (torch.load stops at the first STOP; a loader
    that reads on would run them) and merge the globals they name into ``first``'s; returns how many."""
    count = 0
    end = first.end
    while end < len(data) and count < MAX_STACKED_PICKLES:
        try:
            _, more = loads(data, storages, limits, start=end)
        except StatecliError:
            break  # trailing bytes that are no pickle: the trailing-data warning says they are there
        for key, n in more.globals_seen.items():
            first.globals_seen[key] = first.globals_seen.get(key, 0) + n
        for key, action in more.actions.items():
            mine = first.actions.get(key)
            if mine is None:
                first.actions[key] = action
            else:
                mine.count += action.count
        count += 1
        end = more.end
    return count


# ---------------------------------------------------------------- writing


class StorageOut:
    """A storage to write: its member key, dtype, device, size; pickled as torch.save pickles one."""

    __slots__ = ("dtype", "key", "location", "nbytes", "numel")

    def __init__(self, key: str, dtype: str, location: str, numel: int, nbytes: int) -> None:
        self.key, self.dtype, self.location, self.numel, self.nbytes = key, dtype, location, numel, nbytes


class TensorOut:
    """A tensor over a :class:`StorageOut`; pickles as torch's ``_rebuild_tensor_v2`` (or v3) call."""

    __slots__ = ("dtype", "offset", "shape", "storage", "stride")

    def __init__(self, storage: StorageOut, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride
        self.dtype = storage.dtype

    def __reduce_ex__(self, protocol: Any) -> Any:
        import torch  # deferred: importing torch takes about a second, and metadata commands never need it

        # Exactly the arguments torch's own Tensor.__reduce_ex__ gives, so torch.load reads it as its own.
        args = (self.storage, self.offset, self.shape, self.stride, False, collections.OrderedDict())
        dt = torch_dtype(self.dtype)
        if dt in torch.storage._new_dtypes():
            return torch._utils._rebuild_tensor_v3, (*args, dt)
        return torch._utils._rebuild_tensor_v2, args


class QTensorOut:
    """A quantized tensor over a :class:`StorageOut` of its quantized dtype (``qint8``, ...); pickles as torch's
    ``_rebuild_qtensor`` call. Per tensor: ``scale`` and ``zero_point``; per channel: ``scales`` and
    ``zero_points`` (tensors over storages of their own) and ``axis``."""

    __slots__ = ("axis", "scale", "scales", "tensor", "zero_point", "zero_points")

    def __init__(
        self,
        tensor: TensorOut,
        scale: float | None = None,
        zero_point: int | None = None,
        scales: TensorOut | None = None,
        zero_points: TensorOut | None = None,
        axis: int | None = None,
    ) -> None:
        self.tensor, self.scale, self.zero_point = tensor, scale, zero_point
        self.scales, self.zero_points, self.axis = scales, zero_points, axis

    def __reduce_ex__(self, protocol: Any) -> Any:
        import torch  # deferred: importing torch takes about a second, and metadata commands never need it

        # The quantizer tuple torch's Tensor._reduce_ex_internal writes. It names per_channel_affine for
        # per_channel_affine_float_qparams too: torch.load tells them apart by the zero points' dtype.
        if self.axis is None:
            params: tuple[Any, ...] = (torch.per_tensor_affine, self.scale, self.zero_point)
        else:
            params = (torch.per_channel_affine, self.scales, self.zero_points, self.axis)
        t = self.tensor
        args = (t.storage, t.offset, t.shape, t.stride, params, False, collections.OrderedDict())
        return torch._utils._rebuild_qtensor, args


class ParameterOut:
    """An ``nn.Parameter`` around a :class:`TensorOut` (``state_dict(keep_vars=True)``)."""

    __slots__ = ("data", "requires_grad")

    def __init__(self, data: TensorOut | QTensorOut, requires_grad: bool) -> None:
        self.data, self.requires_grad = data, requires_grad

    def __reduce_ex__(self, protocol: Any) -> Any:
        import torch  # deferred: importing torch takes about a second, and metadata commands never need it

        return torch._utils._rebuild_parameter, (self.data, self.requires_grad, collections.OrderedDict())


_LEGACY_STORAGE = {v: k for k, v in dtypes.STORAGE_TYPES.items() if k != "UntypedStorage"}


class _Pickler(pickle.Pickler):
    """Storages become persistent ids, as torch.save writes them; everything else pickles as itself."""

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is not StorageOut:
            return None
        import torch  # deferred: importing torch takes about a second, and metadata commands never need it

        name = _LEGACY_STORAGE.get(obj.dtype)
        if name is None or torch_dtype(obj.dtype) in torch.storage._new_dtypes():
            return ("storage", torch.UntypedStorage, obj.key, obj.location, obj.nbytes)
        return ("storage", getattr(torch, name), obj.key, obj.location, obj.numel)


def write_torch_zip(
    sink: Sink,
    root: str,
    state: Mapping[str, TensorOut | QTensorOut | ParameterOut],
    storages: Iterable[tuple[StorageOut, Iterable[bytes | memoryview]]],
) -> int:
    """Write ``state`` as ``torch.save`` writes a state dict: the pickle, then each storage's bytes as
    its member (streamed from its chunks, in order), under folder ``root``; returns the storage bytes."""
    return write_archive(sink, root, pickle_bytes(collections.OrderedDict(state)), storages)


def pickle_bytes(obj: Any) -> bytes:
    """``obj`` pickled as ``torch.save`` pickles its ``data.pkl``: protocol 2, each :class:`StorageOut` a
    persistent id. A DCP chunk (:mod:`statecli.formats.dcpwrite`) pickles one bare tensor, not a dict."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_archive(
    sink: Sink, root: str, data: bytes, storages: Iterable[tuple[StorageOut, Iterable[bytes | memoryview]]]
) -> int:
    """A ``torch.save`` archive of the pickle ``data`` and each storage's bytes as its member (streamed from its
    chunks, in order), under folder ``root``; returns the storage bytes."""
    from statecli.formats.zipwriter import ZipWriter  # the writer: inspect, which imports this module, never needs it

    writer = ZipWriter(sink)
    try:
        writer.add(f"{root}/data.pkl", len(data), [data])
        for name, value in ((".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", b"little")):
            writer.add(f"{root}/{name}", len(value), [value])
        written = 0
        for s, chunks in storages:
            writer.add(f"{root}/data/{s.key}", s.nbytes, chunks)
            written += s.nbytes
        writer.add(f"{root}/version", 2, [b"3\n"])
        sid = str(zlib.crc32(data)).rjust(20, "0").encode()
        writer.add(f"{root}/.data/serialization_id", len(sid), [sid])
        writer.close()
    finally:
        writer.shutdown()
    return written
