"""What torch and statecli say of the same tensors, in forms the oracle tests compare."""

from __future__ import annotations

from typing import Any

import torch

from statecli.records import Report, TensorInfo


def tensors_of(report: Report) -> dict[str, TensorInfo]:
    """The report's tensors by name; names must be unique."""
    names = [t.name for t in report.tensors]
    assert len(names) == len(set(names)), f"duplicate names in the report: {names}"
    return {t.name: t for t in report.tensors}


def facts(t: torch.Tensor) -> tuple[Any, ...]:
    """dtype, shape, stride, storage offset and device, as torch gives them."""
    return (str(t.dtype).removeprefix("torch."), tuple(t.shape), tuple(t.stride()), t.storage_offset(), str(t.device))


def statecli_facts(t: TensorInfo) -> tuple[Any, ...]:
    """The same facts as statecli reports them."""
    return (t.dtype, tuple(t.shape), tuple(t.stride or ()), t.storage_offset, t.device)
