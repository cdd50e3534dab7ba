"""Writing torch.distributed.checkpoint (DCP) folders: ``.distcp`` data files and the ``.metadata`` beside them.

The folder is what ``FileSystemWriter`` (torch 2.13, ``torch/distributed/checkpoint/filesystem.py``) writes
for one process with the default ``SerializationFormat.TORCH_SAVE``, so that
``torch.distributed.checkpoint.load(state_dict, checkpoint_id=folder)`` fills a model's state dict from it
(the way torchtitan starts training from a released model):

- Data files are named ``__{rank}_{k}.distcp`` (``FileSystemWriter.prepare_global_plan`` gives rank ``i``
  the prefix ``__{i}_``, ``write_data``'s ``gen_file`` appends a file count and ``DEFAULT_SUFFIX``); one
  writer is rank 0: ``__0_0.distcp``, ``__0_1.distcp``, ...
- Each tensor is one span of a data file holding a ``torch.save`` archive of that tensor alone
  (``_write_item``: ``torch.save(data, stream)`` at the stream's position; the span is ``offset``,
  ``stream.tell() - offset``). torch's reader slices the span out and ``torch.load``\\ s it
  (``FileSystemReader.read_data``), so the archive is self-contained: its zip offsets count from the span's
  start. Here the archive comes from statecli's own streaming zip writer (:func:`~statecli.formats.torchzip.
  write_archive`): a tensor's bytes go from its pieces to the file without ever being held whole, and the
  same inputs always give the same bytes (a fixed zip date, a serialization id hashed from the pickle).
- ``.metadata`` pickles a ``Metadata`` (``metadata.py``): per key a ``TensorStorageMetadata`` with
  ``TensorProperties(dtype)``, the size and one ``ChunkStorageMetadata`` at offset 0 (a whole tensor, as a
  single process saves it); ``storage_data`` maps ``MetadataIndex(fqn, offset)`` to
  ``_StorageInfo(relative_path, offset, length)``; ``planner_data`` maps each key to ``(key,)``, which is
  what ``DefaultSavePlanner`` records for a flat dict (``flatten_state_dict``'s mapping); ``version`` is
  ``CURRENT_DCP_VERSION``, which ``FileSystemWriter.finish`` sets. ``storage_meta`` is ``None``, not
  torch's ``StorageMeta(checkpoint_id=<path>, save_id=<uuid4>)``: a random id and the path written to
  would make two conversions of one input differ, and torch's reader puts a ``StorageMeta()`` in place of
  ``None`` itself (``FileSystemReader.read_metadata``).

Nothing here unpickles anything: the ``.metadata`` is pickled from objects built here. Reading a folder
back goes through statecli's restricted reader (:mod:`statecli.formats.dcp`), as for any DCP folder.

How the conversion engine uses it, files written in parallel and the metadata last::

    files = plan_files(tensors, lambda t: t.nbytes, max_file_size)   # [(name, [tensor, ...]), ...]
    # in any number of worker processes, one call per file:
    records = write_dcp_file(PendingFile(os.path.join(folder, name)), name, stream(group))
    # once every file is written, whatever order the workers finished in:
    PendingFile(os.path.join(folder, METADATA_NAME)).write(metadata_bytes(all_records))
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from statecli.dtypes import DTYPES, contiguous_strides, nbytes, torch_dtype
from statecli.errors import InputError, UnsupportedFormatError
from statecli.formats.sharded import split_by_size
from statecli.formats.torchzip import StorageOut, TensorOut, pickle_bytes, write_archive
from statecli.util import gc_paused

if TYPE_CHECKING:
    from statecli.formats.zipwriter import Sink

__all__ = [
    "DCP_VERSION",
    "METADATA_NAME",
    "SPAN_OVERHEAD",
    "DcpRecord",
    "DcpTensor",
    "dcp_file_name",
    "metadata_bytes",
    "plan_files",
    "write_dcp_file",
]

METADATA_NAME = ".metadata"  # filesystem.py: _metadata_fn
DCP_VERSION = "1.0.0"  # filesystem.py: CURRENT_DCP_VERSION, written by FileSystemWriter.finish
DATA_SUFFIX = ".distcp"  # filesystem.py: DEFAULT_SUFFIX
RANK = 0  # one writer: prepare_global_plan's prefix for the first (only) plan
ARCHIVE_ROOT = "archive"  # torch.save's top folder when it writes to a stream, as _write_item does
STORAGE_KEY = "0"  # torch.save names a tensor's one storage "0"
LOCATION = "cpu"  # _write_item saves CPU tensors only ("Tensor must be on CPU device")
# What one tensor's span holds besides its bytes, about: the pickle, seven zip members' headers padded to
# 64 bytes, the central directory (measured: 1,209 bytes around an empty tensor, up to 63 more of padding).
# A layout that counts it puts as many small tensors in a file as its size limit says.
SPAN_OVERHEAD = 1280
PICKLE_PROTOCOL = 4  # what torch's pickle.dump writes on Python 3.8 to 3.13; fixed so the bytes never change
_DATA_NAME = re.compile(r"__(\d+)_(\d+)\.distcp")

T = TypeVar("T")


class DcpTensor(NamedTuple):
    """One tensor to write: its key, statecli dtype name, shape, byte count, and its contiguous bytes in pieces
    (row-major, as ``tensor.contiguous()`` lays them out), in order, ``nbytes`` in all."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    pieces: Iterable[bytes | memoryview]


class DcpRecord(NamedTuple):
    """Where one written tensor lives: ``length`` bytes at ``offset`` of the data file ``relative_path``
    (relative to the folder). What :func:`metadata_bytes` needs, and small enough to send between processes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    relative_path: str
    offset: int
    length: int


def dcp_file_name(k: int) -> str:
    """The name torch's ``FileSystemWriter`` gives the ``k``-th data file of a one-process save
    (``__0_0.distcp``, ``__0_1.distcp``, ...), so the folder looks like any DCP folder to tools that list it."""
    if k < 0:
        raise ValueError(f"data file number {k} is negative")
    return f"__{RANK}_{k}{DATA_SUFFIX}"


def plan_files(tensors: Sequence[T], size: Callable[[T], int], max_file_size: int | None) -> list[tuple[str, list[T]]]:
    """``tensors`` in order, cut into data files of at most ``max_file_size`` bytes each, with the files' names.

    A file holds what ``size`` says each tensor takes (its bytes) plus :data:`SPAN_OVERHEAD`; a tensor larger
    than the limit gets a file alone; ``None`` puts every tensor in one file. The cut depends only on the
    tensors, their order and the limit, never on how many processes write the files: the output is the same
    whatever the parallelism, and each file can be written by a different process, the metadata after them.
    """
    if max_file_size is None:
        groups = [list(tensors)]
    else:
        if max_file_size <= 0:
            raise ValueError(f"max_file_size must be positive, got {max_file_size}")
        groups = split_by_size(tensors, lambda t: size(t) + SPAN_OVERHEAD, max_file_size)
    return [(dcp_file_name(k), group) for k, group in enumerate(groups)]


class _Span:
    """The sink seen from one archive: writes go on in order; patches land ``base`` bytes further on."""

    __slots__ = ("base", "sink", "written")

    def __init__(self, sink: Sink, base: int) -> None:
        self.sink, self.base, self.written = sink, base, 0

    def write(self, data: bytes | memoryview) -> None:
        self.sink.write(data)
        self.written += memoryview(data).nbytes

    def pwrite(self, data: bytes, offset: int) -> None:
        self.sink.pwrite(data, self.base + offset)


def _check_dtype(name: str, dtype: str) -> None:
    """Refuse what is not a plain tensor of a dtype torch knows, with a string for a key."""
    if not isinstance(name, str):
        raise InputError(f"tensor name {name!r} is not a string; DCP keys are strings")
    d = DTYPES.get(dtype)
    if d is None:
        raise InputError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if d.kind == "quant":
        # A quantized tensor pickles with its scale and zero point (_rebuild_qtensor): not a plain block of
        # bytes, and DCP's planners never shard one. Dequantize, or convert to a .pt file.
        raise UnsupportedFormatError(f"tensor {name!r} is quantized ({dtype}); DCP output takes plain tensors only")


def _check_tensor(name: str, dtype: str, shape: tuple[int, ...], size: int) -> int:
    """The tensor's element count, once its description is one torch can save and load back."""
    _check_dtype(name, dtype)
    numel = 1
    for s in shape:
        if type(s) is not int or s < 0:
            raise InputError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
        numel *= s
    if nbytes(dtype, numel) != size:
        raise InputError(f"tensor {name!r}: {dtype} {list(shape)} takes {nbytes(dtype, numel)} bytes, not {size}")
    return numel


def write_dcp_file(
    sink: Sink, relative_path: str, tensors: Iterable[DcpTensor | tuple[str, str, tuple[int, ...], int, Iterable]]
) -> list[DcpRecord]:
    """Write one ``.distcp`` data file to ``sink`` (a fresh file, at offset 0): each tensor, in order, as the
    ``torch.save`` archive of that tensor alone that torch's ``FileSystemWriter`` writes per item.

    ``sink`` appends with ``write`` and patches each zip member's CRC with ``pwrite`` (offsets from the
    file's start): :class:`~statecli.formats.atomic.PendingFile` is one. The CRC is patched rather than
    computed first so each tensor's pieces are read once and never held whole. ``relative_path`` is the
    file's name in the folder (from :func:`plan_files`), recorded for :func:`metadata_bytes`.

    Returns one :class:`DcpRecord` per tensor, in order. Raises :class:`~statecli.errors.InputError` when a
    tensor's pieces do not add up to its ``nbytes`` or its description is inconsistent, and
    :class:`~statecli.errors.UnsupportedFormatError` for a quantized dtype.
    """
    if _DATA_NAME.fullmatch(relative_path) is None:
        raise ValueError(f"{relative_path!r} is not a DCP data file name (see dcp_file_name)")
    records: list[DcpRecord] = []
    offset = 0
    for name, dtype, shape, size, pieces in tensors:
        shape = tuple(shape)
        numel = _check_tensor(name, dtype, shape, size)
        storage = StorageOut(STORAGE_KEY, dtype, LOCATION, numel, size)
        data = pickle_bytes(TensorOut(storage, 0, shape, contiguous_strides(shape)))
        span = _Span(sink, offset)
        write_archive(span, ARCHIVE_ROOT, data, [(storage, pieces)])
        records.append(DcpRecord(name, dtype, shape, relative_path, offset, span.written))
        offset += span.written
    return records


def _own(s: str) -> str:
    """An equal string no one else holds. pickle memoizes strings by identity: a name that happened to be the
    same object as a string pickled before it (an interned ``"size"``, ``"torch"``) would be written as a
    back reference, and one conversion's ``.metadata`` would differ from another's by chance."""
    return (s + "\0")[:-1]


def _order(r: DcpRecord) -> tuple[int, int, int]:
    m = _DATA_NAME.fullmatch(r.relative_path)
    if m is None:
        raise ValueError(f"{r.relative_path!r} is not a DCP data file name (see dcp_file_name)")
    return int(m.group(1)), int(m.group(2)), r.offset


def metadata_bytes(records: Iterable[DcpRecord]) -> bytes:
    """The folder's ``.metadata``: a pickled ``torch.distributed.checkpoint.metadata.Metadata`` naming every
    record's tensor (dtype, size, one whole chunk) and its span, as ``FileSystemWriter.finish`` pickles it.

    Keys are listed in file order then offset order, whatever order the records come in (workers may finish
    in any order), so the bytes depend only on what was written. They are deterministic: no save id, no path,
    no time. Raises :class:`~statecli.errors.InputError` when two records share a name.
    """
    import torch  # here, not at the top: only convert writes DCP, and importing torch takes about a second
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    # Hundreds of thousands of small objects, none in a cycle: the collector would rescan them over and over
    # (measured: 5.9 s instead of 2.5 s for 100,000 tensors).
    with gc_paused():
        ordered = sorted(records, key=_order)
        state: dict[str, TensorStorageMetadata] = {}
        storage: dict[MetadataIndex, _StorageInfo] = {}
        planner: dict[str, tuple[str, ...]] = {}
        paths: dict[str, str] = {}
        for r in ordered:
            if r.name in state:
                raise InputError(f"tensor {r.name!r} is written twice; DCP keys must be unique")
            _check_dtype(r.name, r.dtype)
            name = _own(r.name)
            path = paths.get(r.relative_path)
            if path is None:
                path = paths[r.relative_path] = _own(r.relative_path)
            zeros = [0] * len(r.shape)
            state[name] = TensorStorageMetadata(
                properties=TensorProperties(dtype=torch_dtype(r.dtype)),
                size=torch.Size(r.shape),
                chunks=[ChunkStorageMetadata(offsets=torch.Size(zeros), sizes=torch.Size(r.shape))],
            )
            storage[MetadataIndex(name, zeros, 0)] = _StorageInfo(path, r.offset, r.length)
            planner[name] = (name,)
        md = Metadata(
            state_dict_metadata=state,
            planner_data=planner,
            storage_data=storage,
            storage_meta=None,
            version=DCP_VERSION,
        )
        return pickle.dumps(md, protocol=PICKLE_PROTOCOL)
