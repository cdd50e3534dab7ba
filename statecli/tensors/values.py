"""Tensor values for the commands that need them (stats, diff, check, convert's --verify): one storage in
memory at a time.

Built on :class:`~statecli.tensors.source.Source`: tensors come from the file's bytes, never from ``torch.load``, so no
pickle runs and a whole pickled module reads like a state dict. torch is imported when called.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from statecli import dtypes
from statecli.dtypes import contiguous_strides
from statecli.records import Report, TensorInfo
from statecli.tensors.source import STREAM_CHUNK, Source, check_views, refuse_mixed_dtypes
from statecli.tensors.views import torch_dtype, typed, view_of

if TYPE_CHECKING:
    import torch

PIECE_BYTES = STREAM_CHUNK


def readable(t: TensorInfo) -> str | None:
    """Why ``t``'s values cannot be read here, or ``None`` when they can: a short reason that reads in
    parentheses after the tensor's name (stats' notes, diff's ``values not compared (A: …)``)."""
    kind = dtypes.DTYPES[t.dtype].kind if t.dtype in dtypes.DTYPES else None
    if kind == "quant" or t.layout == "quantized":
        return f"quantized {t.dtype}: scales live in the pickle"
    if kind is None:
        return f"unknown dtype {t.dtype}"
    if t.layout != "strided":
        return f"{t.layout} layout"
    if kind == "bits":
        return f"{t.dtype} holds raw bits, not numbers"
    if t.dtype == "float4_e2m1fn_x2":
        return "packed 4-bit floats are not decoded"
    return None


def iter_values(
    report: Report,
    keep: Callable[[TensorInfo], bool] | None = None,
    check_crc: bool = False,
) -> Iterator[tuple[TensorInfo, torch.Tensor | None]]:
    """Each tensor of ``report`` (those ``keep`` accepts) with its values on the CPU in its own dtype, in
    file order; ``None`` for a tensor :func:`readable` refuses. Tensors sharing a storage are read with
    it once. A yielded tensor may share memory with the next ones: copy it to keep it."""
    chosen = [t for t in report.tensors if keep is None or keep(t)]
    refuse_mixed_dtypes((t for t in chosen if readable(t) is None), report.path)
    by_storage: dict[str, list[TensorInfo]] = {}
    for t in chosen:
        if t.storage is not None:
            by_storage.setdefault(t.storage, []).append(t)
    with Source(report, check_crc=check_crc) as source:
        done: set[str] = set()
        for t in chosen:
            if readable(t) is not None:
                yield t, None
                continue
            if t.storage is not None:
                if t.storage in done:
                    continue
                done.add(t.storage)
                group = [g for g in by_storage[t.storage] if readable(g) is None]
            else:
                group = [t]
            base = typed(source.read(t), t.dtype)
            check_views(group, base.numel(), report.path)
            for g in group:
                yield g, view_of(base, g)


def iter_pieces(
    report: Report,
    keep: Callable[[TensorInfo], bool] | None = None,
    check_crc: bool = False,
) -> Iterator[tuple[TensorInfo, Iterable[torch.Tensor] | None]]:
    """Like :func:`iter_values`, but each tensor's values come as 1-D pieces, in element order. A tensor
    that is all of its storage and contiguous is streamed from the file a piece at a time, so memory
    stays at one piece whatever its size; others come as one piece. Consume each tensor's pieces
    before asking for the next tensor."""
    chosen = [t for t in report.tensors if keep is None or keep(t)]
    sharing: dict[str, int] = {}
    for t in report.tensors:
        if t.storage is not None:
            sharing[t.storage] = sharing.get(t.storage, 0) + 1
    whole = report.storage_sizes
    streamable = {
        t.name
        for t in chosen
        if readable(t) is None
        and (t.storage is None or (sharing.get(t.storage) == 1 and whole.get(t.storage) == t.nbytes))
        and t.storage_offset == 0
        and (t.stride is None or t.stride == contiguous_strides(t.shape) or t.numel <= 1)
    }
    rest = {t.name for t in chosen} - streamable
    # A set, not the list of records: membership is asked once per tensor (100,000 on large models).
    others = iter_values(report, lambda t: t.name in rest, check_crc) if rest else iter([])
    pending = {}
    with Source(report, check_crc=check_crc) as source:
        for t in chosen:
            if t.name in streamable:
                dtype = torch_dtype(t.dtype)
                yield t, (piece.view(dtype) for piece in source.chunks(t, PIECE_BYTES))
                continue
            while t.name not in pending:
                got, values = next(others)
                pending[got.name] = values
            values = pending.pop(t.name)
            yield t, None if values is None else [values.reshape(-1)]


class StorageReader:
    """Tensors by name, in any order: each storage read whole, the last one kept for the tensors that
    view it (diff's second side, convert's --verify of what it wrote)."""

    def __init__(self, report: Report, check_crc: bool = False) -> None:
        refuse_mixed_dtypes((t for t in report.tensors if readable(t) is None), report.path)
        self.source = Source(report, check_crc=check_crc)
        self._key: tuple[str, str] | None = None
        self._base: torch.Tensor | None = None

    def __enter__(self) -> StorageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._base = None
        self.source.__exit__(*exc)

    def values(self, t: TensorInfo) -> torch.Tensor:
        """``t``'s values on the CPU in its own dtype; they share memory with the storage read last."""
        key = (t.storage if t.storage is not None else f"\0{t.name}", t.dtype)
        if key != self._key:
            self._base = None  # let the previous storage go before reading the next
            self._base = typed(self.source.read(t), t.dtype)
            self._key = key
        assert self._base is not None
        check_views([t], self._base.numel(), self.source.report.path)
        return view_of(self._base, t)
