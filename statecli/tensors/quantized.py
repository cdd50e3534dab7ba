"""Quantized tensors (``qint8``, ``quint8``, ``qint32``) from the file's bytes and the quantizer their pickle
states, the way torch's ``_rebuild_qtensor`` rebuilds them, without running it.

A quantized tensor is its integers (read like any storage, as their integer dtype: see
:func:`statecli.tensors.views.storage_dtype`) and a :class:`~statecli.records.Quantizer`: one scale and zero
point, or per-channel scales and zero points, which are tensors of the file read from their own storages.
torch is imported when called; :func:`unsupported` needs none, so planning a conversion does not either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from statecli.dtypes import DTYPES
from statecli.errors import InputError, UsageError
from statecli.records import Quantizer, TensorInfo
from statecli.tensors.views import INT_REPR, torch_dtype, typed, view_of

if TYPE_CHECKING:
    import torch

    from statecli.tensors.source import Source

ChannelParams = tuple["torch.Tensor", "torch.Tensor"]  # per-channel (scales, zero points)


def is_quantized(t: TensorInfo) -> bool:
    """A quantized tensor: pickled by ``_rebuild_qtensor``, or of a quantized dtype however it was stored."""
    return t.layout == "quantized" or (t.dtype in DTYPES and DTYPES[t.dtype].kind == "quant")


def unsupported(t: TensorInfo) -> str | None:
    """Why statecli cannot rebuild quantized tensor ``t`` (a phrase that follows its name), or None."""
    if t.dtype not in INT_REPR:
        return "several values packed into each byte, which statecli does not read"
    if t.layout != "quantized" or t.quantizer is None:
        return "its quantizer (a scheme, scales, zero points and an axis) is not one torch.load accepts"
    return None


def read_view(source: Source, t: TensorInfo) -> torch.Tensor:
    """``t`` on the CPU as the file holds it, a view of its storage read whole; a quantized tensor as its
    integers (``int8``, ``uint8``, ``int32``)."""
    from statecli.tensors.source import check_views  # deferred: planning imports this module, not the readers

    base = typed(source.read(t), t.dtype)
    check_views([t], base.numel(), source.report.path)
    return view_of(base, t)


def read_part(source: Source, part: TensorInfo) -> torch.Tensor:
    """A per-channel scales or zero points tensor, on the CPU, contiguous and in memory of its own."""
    return read_view(source, part).clone()


def channel_params(source: Source, q: Quantizer) -> ChannelParams | None:
    """The per-channel scales and zero points of ``q``, read from the file; None for a per-tensor quantizer."""
    if q.scales is None or q.zero_points is None:
        return None
    return read_part(source, q.scales), read_part(source, q.zero_points)


def make(
    base: torch.Tensor,
    offset: int,
    shape: tuple[int, ...],
    stride: tuple[int, ...],
    t: TensorInfo,
    params: ChannelParams | None,
) -> torch.Tensor:
    """Quantized tensor ``t`` over the integers of ``base`` (its storage, seen as ``t``'s integer dtype), on
    ``base``'s device, sharing its memory: what ``_rebuild_qtensor`` does with the storage torch.load read, so
    tensors that share a storage in the file share it here too. ``params``: :func:`channel_params`."""
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    q = t.quantizer
    if q is None or t.dtype not in INT_REPR:
        raise InputError(f"tensor {t.name!r} is quantized ({t.dtype}): {unsupported(t)}")
    device = base.device
    dtype = torch_dtype(t.dtype)
    empty = [0] * len(shape)  # no memory of its own: set_ points it at base's
    try:
        if params is not None:
            scales, zero_points = (p.to(device) for p in params)
            out = torch._empty_per_channel_affine_quantized(
                empty, scales=scales, zero_points=zero_points, axis=q.axis, dtype=dtype, device=device
            )
        else:
            out = torch._empty_affine_quantized(
                empty, scale=q.scale, zero_point=q.zero_point, dtype=dtype, device=device
            )
        out.set_(base.untyped_storage(), base.storage_offset() + offset, shape, stride)
    except (NotImplementedError, RuntimeError) as e:
        what = f"the quantized tensor {t.name!r} ({t.dtype}, {q.scheme})"
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if device.type != "cpu":
            raise UsageError(f"torch cannot make {what} on {device}: {first}") from None
        raise InputError(f"torch refuses {what}: {first}") from None
    return out
