"""Quantized tensors in a conversion: pickled into a .pt as torch.save pickles them, checked once written.

A quantized tensor keeps its dtype (its integers are copied byte for byte, like any kept tensor) and its
quantizer: one scale and zero point, written into the pickle, or per-channel scales and zero points, written
as storages of their own after the plan's, on the tensor's device as torch.save would put them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from statecli import dtypes
from statecli.conversion.plan import PlanItem
from statecli.dtypes import contiguous_strides
from statecli.formats.torchzip import QTensorOut, StorageOut, TensorOut
from statecli.records import Quantizer, TensorInfo
from statecli.tensors.quantized import read_part
from statecli.tensors.source import byte_view

if TYPE_CHECKING:
    from statecli.tensors.source import Source


class QuantizedOut:
    """The quantizers of the quantized tensors a .pt output holds. :meth:`wrap` each such tensor while the
    state dict is built, then write :meth:`storages` after the plan's (their keys follow ``first_key``)."""

    def __init__(self, source: Source, first_key: int) -> None:
        self.source = source
        self.next_key = first_key
        self.parts: list[tuple[StorageOut, TensorInfo]] = []
        # One output storage per input view and device: tensors tied in the input share their scales too.
        self.made: dict[tuple[object, ...], TensorOut] = {}

    def wrap(self, item: PlanItem, t: TensorOut) -> QTensorOut:
        q = item.source.quantizer
        assert q is not None, "the plan keeps only quantized tensors with a quantizer"
        if q.scales is None or q.zero_points is None:
            return QTensorOut(t, scale=q.scale, zero_point=q.zero_point)
        location = item.dst_device or "cpu"
        scales, zero_points = self._part(q.scales, location), self._part(q.zero_points, location)
        return QTensorOut(t, scales=scales, zero_points=zero_points, axis=q.axis)

    def _part(self, part: TensorInfo, location: str) -> TensorOut:
        key = (part.file, part.storage, part.storage_offset, part.shape, part.stride, part.dtype, location)
        made = self.made.get(key)
        if made is None:
            storage = StorageOut(
                str(self.next_key), part.dtype, location, part.numel, dtypes.nbytes(part.dtype, part.numel)
            )
            self.next_key += 1
            self.parts.append((storage, part))
            made = self.made[key] = TensorOut(storage, 0, part.shape, contiguous_strides(part.shape))
        return made

    def storages(self) -> Iterator[tuple[StorageOut, Iterable[memoryview]]]:
        """Each per-channel scales or zero points storage with its bytes, read when it is written (a few
        numbers per channel: whole, not streamed)."""
        for storage, part in self.parts:
            yield storage, [byte_view(read_part(self.source, part))]


def _plain(q: Quantizer | None) -> tuple[object, ...] | None:
    """What of a quantizer a reader sees again in the written file. torch.save writes
    ``per_channel_affine`` for ``per_channel_affine_float_qparams``, so per channel is one scheme here."""
    if q is None:
        return None
    if q.scales is None or q.zero_points is None:
        return (q.scheme, q.scale, q.zero_point)
    parts = [(p.dtype, p.shape) for p in (q.scales, q.zero_points)]
    return ("per_channel", q.axis, *parts)


def quantizer_problem(planned: TensorInfo, written: TensorInfo) -> str | None:
    """How the quantizer read back from the output differs from the input's, or None."""
    want, got = _plain(planned.quantizer), _plain(written.quantizer)
    if want == got:
        return None
    return f"has quantizer {got}, expected {want}"


def same_channel_params(source: Source, planned: TensorInfo, written_source: Source, written: TensorInfo) -> bool:
    """Whether the per-channel scales and zero points written hold the input's bytes (True per tensor)."""
    q, w = planned.quantizer, written.quantizer
    if q is None or q.scales is None or q.zero_points is None:
        return True
    if w is None or w.scales is None or w.zero_points is None:
        return False
    for a, b in ((q.scales, w.scales), (q.zero_points, w.zero_points)):
        if bytes(byte_view(read_part(source, a))) != bytes(byte_view(read_part(written_source, b))):
            return False
    return True
