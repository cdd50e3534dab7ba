"""What every reader checks of its answer: names that are short enough and unique."""

from __future__ import annotations

from statecli.clip import printable
from statecli.errors import InputError, LimitExceededError
from statecli.records import RawCheckpoint, RawTensor
from statecli.wording import shape_text

MAX_NAME_CHARS = 65_536  # a tensor's dotted name; real ones are a few hundred characters at most


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
    shape = shape_text(t.shape)
    return f"one {t.dtype} {shape}{storage}{where}"


def _clip(text: str) -> str:
    return printable(text if len(text) <= 120 else f"{text[:80]}…{text[-30:]}")
