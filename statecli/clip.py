"""The one formatter for text that comes from a file: bounded whatever it is given.

A pickle can hold a memoized DAG of lists (``[x, x]`` nested 64 deep: 2**64 leaves in 200 bytes), a
tuple nested a million deep, a 256 MB string or a 8,000-bit integer. ``repr``, ``str``, ``format``
and ``json.dumps`` of such a value hang, overflow the stack or build gigabytes. Every message, finding
or label that shows a value from a file builds it here instead:

- :func:`describe`: any value as a short repr-like text (``[1, 2, [3, …], …]``), at most ``limit``
  characters. Containers are walked item by item only while there is room, so the work is bounded by
  the limit, never by the value's size, depth or sharing; ``repr`` is called on nothing but short
  strings, bytes, small ints, floats, bools and None. Text is clipped before it is escaped.
- :func:`describe_name`: a name (a key, a global, a member) clipped and escaped, without quotes.
- :func:`quote`: a name as ``repr`` would quote it, clipped first.
- :func:`printable`: control characters escaped; no clipping (tensor names in tables are shown whole).
- :func:`args_text`: a call's arguments, each value described, at most four.
"""

from __future__ import annotations

from contextlib import suppress
from itertools import islice
from typing import Any

from statecli.pickled import Global, StorageRef, Stub, TensorRef

LIMIT = 160  # characters of one value in a message
NAME_LIMIT = 200  # characters of one name in a message
MAX_DEPTH = 4  # containers shown inside containers; deeper ones are "…"
MAX_ITEMS = 8  # items shown of one container
MAX_INT_BITS = 128  # larger ints are shown by their size: str() of a big int is quadratic
ELLIPSIS = "…"


def printable(text: str) -> str:
    """``text`` with every character that is not printable escaped (``\\x1b``, ``\\n``, ``\\udcff``).

    Names in a file are the attacker's text: printed raw, an escape sequence in one can move the cursor,
    erase the warning line above it, or retitle the terminal, and a newline forges a message of its own.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def describe_name(name: str, limit: int = NAME_LIMIT) -> str:
    """``name`` (a global's, a key's) fit for a one-line message: clipped to ``limit`` characters, then
    escaped (an escape is at most 10 characters, so the result stays within ``10 * limit``)."""
    if type(name) is not str:
        return describe(name, limit=limit)
    return printable(name if len(name) <= limit else name[: limit - 1] + ELLIPSIS)


def quote(name: str, limit: int = NAME_LIMIT) -> str:
    """``repr(name)`` for a name of at most ``limit`` characters; a longer one is clipped first."""
    if type(name) is not str:
        return describe(name, limit=limit)
    return repr(name) if len(name) <= limit else repr(name[: limit - 1]) + ELLIPSIS


class _Full(Exception):
    """The text reached its limit: stop walking."""


class _Text:
    __slots__ = ("parts", "room")

    def __init__(self, limit: int) -> None:
        self.parts: list[str] = []
        self.room = limit

    def put(self, s: str) -> None:
        if len(s) >= self.room:
            self.parts.append(s[: max(self.room - 1, 0)] + ELLIPSIS)
            self.room = 0
            raise _Full
        self.parts.append(s)
        self.room -= len(s)


def describe(v: Any, depth: int = 0, limit: int = LIMIT) -> str:
    """A short text for any value a file holds, for messages and labels: at most ``limit`` characters
    (``depth`` levels of nesting are taken as already used), built without ``repr`` of a container, in
    work bounded by ``limit`` whatever ``v`` is (a billion-laughs DAG, a million-deep nest, 256 MB of
    text)."""
    out = _Text(max(limit, 1))
    with suppress(_Full):
        _put(out, v, depth)
    return "".join(out.parts)


def _put(out: _Text, v: Any, depth: int) -> None:
    t = type(v)
    if t is str:
        out.put(repr(v[: out.room]))
    elif v is None or t is bool or t is float:
        out.put(repr(v))
    elif t is int:
        out.put(repr(v) if v.bit_length() <= MAX_INT_BITS else f"<{v.bit_length()}-bit integer>")
    elif t is bytes or t is bytearray:
        out.put(repr(bytes(v)) if len(v) <= 16 else f"<{len(v)} bytes>")
    elif isinstance(v, (list, tuple, dict, set, frozenset)):
        _container(out, v, depth)
    else:
        out.put(_leaf(v))


_BRACKETS = {list: "[]", tuple: "()", set: "{}", frozenset: "{}"}


def _container(out: _Text, v: Any, depth: int) -> None:
    is_dict = isinstance(v, dict)
    kind = dict if is_dict else next((k for k in _BRACKETS if isinstance(v, k)), list)
    opening, closing = ("{", "}") if is_dict else _BRACKETS[kind]
    if kind is frozenset:
        opening, closing = "frozenset({", "})"
    if not v:
        out.put("{}" if is_dict else {set: "set()", frozenset: "frozenset()"}.get(kind, f"{opening}{closing}"))
        return
    if depth >= MAX_DEPTH:
        out.put(f"{opening}{ELLIPSIS}{closing}")
        return
    out.put(opening)
    items = islice(v.items() if is_dict else v, MAX_ITEMS)
    for i, item in enumerate(items):
        if i:
            out.put(", ")
        if is_dict:
            _put(out, item[0], depth + 1)
            out.put(": ")
            _put(out, item[1], depth + 1)
        else:
            _put(out, item, depth + 1)
    if len(v) > MAX_ITEMS:
        out.put(f", {ELLIPSIS} ({len(v):,} items)")
    elif kind is tuple and len(v) == 1:
        out.put(",")
    out.put(closing)


# What a call's arguments look like in a finding: each value clipped (see describe), at most four.
def args_text(args: Any) -> str:
    if not isinstance(args, tuple):
        return f"({describe(args, 1)})"
    inner = ", ".join(describe(x, 1) for x in args[:4])
    return f"({inner}{', …' if len(args) > 4 else ''})"


def _leaf(v: Any) -> str:
    """statecli's own records of pickled things by what they are; anything else by its type's name."""
    if isinstance(v, Global):
        return describe_name(v.qualname)
    if isinstance(v, Stub):
        return f"<result of {describe_name(v.class_name)}>"
    if isinstance(v, TensorRef):
        return "<tensor>"
    if isinstance(v, StorageRef):
        return f"<storage {quote(v.key, 60)}>"
    return f"<{describe_name(type(v).__name__, 60)}>"


__all__ = ["LIMIT", "NAME_LIMIT", "args_text", "describe", "describe_name", "printable", "quote"]
