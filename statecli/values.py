"""Tensor values for the commands that need them (stats, diff, check): one storage in memory at a time.

Built on the conversion reader: tensors come from the file's bytes, never from ``torch.load``, so no
pickle runs and a whole pickled module reads like a state dict. torch is imported when called.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from statecli import dtypes
from statecli.conversion.source import Source
from statecli.formats.base import contiguous_strides
from statecli.records import Report, TensorInfo

if TYPE_CHECKING:
    import torch


def readable(t: TensorInfo) -> str | None:
    """Why ``t``'s values cannot be read here, or ``None`` when they can."""
    kind = dtypes.DTYPES[t.dtype].kind if t.dtype in dtypes.DTYPES else "unknown"
    if kind in ("quant", "unknown") or t.layout == "quantized":
        return f"{t.dtype} tensors are not read (their scales live in the pickle)"
    if t.layout != "strided":
        return f"{t.layout} layout is not read"
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
    import torch

    chosen = [t for t in report.tensors if keep is None or keep(t)]
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
            raw = source.read(t)
            base = raw.view(getattr(torch, t.dtype))
            for g in group:
                stride = g.stride or contiguous_strides(g.shape)
                yield g, base.as_strided(g.shape, stride, g.storage_offset)
