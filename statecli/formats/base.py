"""The one small interface every format reader implements."""

from __future__ import annotations

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
