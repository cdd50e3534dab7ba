"""Strict JSON for headers and indexes: duplicate keys and NaN/Infinity refused, one message per fault."""

from __future__ import annotations

import json
from typing import Any

from statecli.errors import InputError


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # dict() runs in C; the per-key search only happens on the error path. Headers have 100k+ objects.
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKeyError(k)
            seen.add(k)
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def load_object(raw: bytes, what: str, path: str) -> dict[str, Any]:
    """``raw`` parsed as one JSON object; ``what`` ("header", "index") names it in every error."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} is not valid UTF-8 (byte {e.start} of the {what})", path=path) from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except _DuplicateKeyError as e:
        raise InputError(f"duplicate key {e.key!r} in {what}", path=path) from None
    except RecursionError:
        raise InputError(f"{what} is not valid JSON (nested too deeply)", path=path) from None
    except ValueError as e:
        raise InputError(f"{what} is not valid JSON: {e}", path=path) from None
    if not isinstance(doc, dict):
        raise InputError(f"{what} is not a JSON object (got {type(doc).__name__})", path=path)
    return doc
