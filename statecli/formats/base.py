"""The one small interface every format reader implements."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from statecli.errors import InputError, LimitExceededError
from statecli.records import Container, Finding, RawTensor

MAX_NAME_CHARS = 65_536  # a tensor's dotted name; real ones are a few hundred characters at most


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


def check_names(raw: RawCheckpoint) -> None:
    """Every tensor has a name of at most :data:`MAX_NAME_CHARS` characters, and no two share one.

    Two tensors under one name are two entries of the file that a flat listing cannot tell apart (a key
    ``'a.b'`` beside ``{'a': {'b': ...}}``, a key ``''`` beside a prefix, one name in two shards): every
    command would show, compare or write one of them in place of the other."""
    names = [t.name for t in raw.tensors]
    longest = max(map(len, names), default=0)
    if longest > MAX_NAME_CHARS:
        name = next(n for n in names if len(n) == longest)
        raise LimitExceededError(
            f"a tensor name of {longest} characters ({_clip(name)}) is over the limit of {MAX_NAME_CHARS}",
            path=raw.path,
        )
    if len(set(names)) == len(names):
        return
    first: dict[str, RawTensor] = {}
    for t in raw.tensors:
        other = first.setdefault(t.name, t)
        if other is not t:
            raise InputError(
                f"two tensors are both named '{_clip(t.name)}': {_entry(other)} and {_entry(t)}; a key with "
                "dots beside nested keys that spell the same name, or an empty key, can do that",
                path=raw.path,
            )


def _entry(t: RawTensor) -> str:
    where = f" in {t.file}" if t.file else ""
    storage = f" over {_clip(t.storage)}" if t.storage else ""
    shape = "×".join(map(str, t.shape)) or "scalar"
    return f"one {t.dtype} {shape}{storage}{where}"


def _clip(text: str) -> str:
    from statecli.safepickle import printable

    return printable(text if len(text) <= 120 else f"{text[:80]}…{text[-30:]}")
