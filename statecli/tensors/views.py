"""One way to turn a storage's bytes and a tensor record into the tensor: the dtype, then the view.

Every command that reads values (stats, diff, check, convert's --verify, ``statecli.load``) goes through
:func:`typed` and :func:`view_of`, so a storage offset, a stride or an empty tensor means the same to all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from statecli.dtypes import contiguous_strides, torch_dtype
from statecli.records import TensorInfo

if TYPE_CHECKING:
    import torch


# The integers behind each quantized dtype: torch can view bytes as ``qint8`` but cannot copy, clone or
# make contiguous such a tensor unless it is a quantized one, with a quantizer.
INT_REPR = {"qint8": "int8", "quint8": "uint8", "qint32": "int32"}


def storage_dtype(dtype: str) -> torch.dtype:
    """The torch dtype a storage of ``dtype`` is read as: ``dtype`` itself, or for a quantized dtype its
    integer representation (``qint8`` as ``int8``), from which :mod:`statecli.tensors.quantized` makes the
    quantized tensor."""
    return torch_dtype(INT_REPR.get(dtype, dtype))


def typed(raw: torch.Tensor, dtype: str) -> torch.Tensor:
    """A flat uint8 storage read from the file, seen as ``dtype`` (no copy); quantized dtypes as their
    integers (see :func:`storage_dtype`)."""
    return raw.view(storage_dtype(dtype))


def view(base: torch.Tensor, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    """A view ``offset`` elements into ``base``. ``as_strided`` counts from the start of the storage,
    and ``base`` itself may start further in (a slice that ``contiguous()`` returned as it was)."""
    return base.as_strided(shape, stride, base.storage_offset() + offset)


def view_of(base: torch.Tensor, t: TensorInfo) -> torch.Tensor:
    """Tensor ``t`` inside ``base``, its storage seen in its dtype: offset, shape and stride as recorded."""
    return view(base, t.storage_offset, t.shape, t.stride or contiguous_strides(t.shape))
