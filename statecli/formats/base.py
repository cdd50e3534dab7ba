"""The one small interface every format reader implements."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from statecli.records import Container, Finding, RawTensor


@dataclass(slots=True)
class RawCheckpoint:
    """A reader's answer: tensors with the facts the file states, before roles are resolved."""

    path: str
    format: str  # "torch-zip" | "safetensors" | "sharded-safetensors" | "sharded-torch" | ...
    tensors: list[RawTensor]
    container: Container
    findings: list[Finding] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    file_size: int = 0
    # storage key -> bytes that storage holds on disk, for "bytes on disk vs logical bytes"
    storage_sizes: dict[str, int] = field(default_factory=dict)


@functools.lru_cache(maxsize=4096)
def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``, as torch computes them."""
    # torch treats size-0 dimensions as 1 here; matching it keeps strides equal to what torch reports.
    strides = []
    acc = 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))
