"""Records built by hand for tests that need no checkpoint: ``tensor_info("fc.weight", shape=(10, 4))``."""

from __future__ import annotations

import math
from typing import Any

from statecli.records import TensorInfo

_ITEMSIZE = {"float64": 8, "int64": 8, "float16": 2, "bfloat16": 2, "int16": 2, "int8": 1, "uint8": 1, "bool": 1}


def tensor_info(
    name: str,
    role: str = "parameter",
    dtype: str = "float32",
    shape: tuple[int, ...] = (4,),
    *,
    itemsize: int | None = None,
    **fields: Any,
) -> TensorInfo:
    """A CPU tensor with default evidence; ``numel`` and ``nbytes`` follow from ``shape`` and ``dtype``
    unless given. Any other ``TensorInfo`` field may be passed by name."""
    numel = math.prod(shape)
    nbytes = numel * (itemsize if itemsize is not None else _ITEMSIZE.get(dtype, 4))
    defaults: dict[str, Any] = {
        "exact": False,
        "evidence": "default",
        "persistent": None,
        "requires_grad": None,
        "device": "cpu",
        "numel": numel,
        "nbytes": nbytes,
    }
    return TensorInfo(name=name, role=role, dtype=dtype, shape=shape, **{**defaults, **fields})
