"""What one pickle may cost the restricted reader: its limits, and the guards on what it hashes."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from statecli.errors import InputError, LimitExceededError

# A global's module or name longer than this is not a Python name (real ones are well under 200).
MAX_GLOBAL_NAME = 1024
# Distinct globals one pickle may name; a whole pickled model names a few hundred classes at most.
MAX_GLOBALS = 10_000
# Values a dict key or set item may hold (tuples inside tuples): Python hashes tuples without caching or a
# depth check, so a memoized DAG of nested tuples costs 2**depth and a million-deep one crashes the process.
MAX_KEY_VALUES = 10_000
# Keys of one dict (items of one set) that may share one hash. Only str and bytes hashes are randomized:
# ints past 2**61, floats and tuples can be made to collide, and each collision costs every later insert.
MAX_SAME_HASH = 64
_HASH_MODULUS = sys.hash_info.modulus


# What the containers a pickle builds in one or two bytes cost here (CPython 3.11, 64-bit): an empty set
# 216 bytes, a dict 64, a list 56; a memo entry 64 to 130 (its int key, its slot, the table's growth).
_SET_COST = sys.getsizeof(set())
_DICT_COST = sys.getsizeof({})
_LIST_COST = sys.getsizeof([])
_MEMO_COST = 64
# Pickle bytes per memo entry: what pickle memoizes takes 3 bytes or more with its MEMOIZE (an empty string),
# but for empty lists, dicts and sets, which the containers' budget pays for; torch's pickles take 7 or more.
_MEMO_BYTES = 4


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps on what one pickle may ask for. Defaults are far above any real checkpoint's needs.

    ``alloc_per_byte`` and ``alloc_floor``: the containers (sets, frozensets, dicts, lists) a pickle of
    ``n`` bytes builds may cost ``alloc_per_byte * n + alloc_floor`` bytes. They cost far more than the bytes
    that make them (``EMPTY_SET`` is one byte, a set 216); torch's pickles build under 2.2 bytes of them per
    pickle byte (a whole module saved with protocol 4; benchmarks/RESULTS.md), a hostile one 216. The memo
    may hold one entry per 4 bytes and ``alloc_floor / 64`` more (see ``_MEMO_BYTES``).
    """

    max_ops: int = 200_000_000
    max_memo: int = 20_000_000
    alloc_per_byte: int = 16
    alloc_floor: int = 8 << 20
    max_depth: int = 1_000  # open MARKs at once
    max_str: int = 256 * 1024 * 1024  # one string or bytes object
    max_long_bytes: int = 1_024  # LONG1/LONG4 payloads; real pickles use a few bytes
    max_line: int = 1024 * 1024  # protocol-0 text lines


def check_key(k: Any, what: str) -> int:
    """``hash(k)``, once ``k`` is proven cheap to hash (see :data:`MAX_KEY_VALUES`); raises for a key that is not."""
    if type(k) is tuple:
        todo = [k]
        count = 0
        while todo:
            v = todo.pop()
            count += 1
            if count > MAX_KEY_VALUES:
                raise LimitExceededError(
                    f"corrupt pickle: a {what} is a structure of more than {MAX_KEY_VALUES} values"
                )
            if type(v) is tuple:
                todo.extend(v)
    try:
        return hash(k)
    except TypeError:
        raise InputError(f"corrupt pickle: a {what} is a {type(k).__name__}, which cannot be one") from None


def _may_collide(k: Any) -> bool:
    """Whether key ``k`` needs counting by :class:`HashCounts`: not a str, bytes or small int. Checked before a
    counter is made for a container: a counter for every dict of int keys costs more than the dict."""
    t = type(k)
    if t is str or t is bytes:
        return False
    return not (t is int and -_HASH_MODULUS < k < _HASH_MODULUS and k != -1)


class HashCounts:
    """Counts the hashes of one dict's (or set's) keys that Python does not randomize; refuses a flood."""

    __slots__ = ("counts", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self.counts: dict[int, int] = {}

    def add(self, k: Any) -> None:
        t = type(k)
        if t is str or t is bytes:
            return  # randomized hashes (PYTHONHASHSEED): collisions cannot be planned
        h = check_key(k, self.what)
        if t is int and -_HASH_MODULUS < k < _HASH_MODULUS and k != -1:
            return  # ints below the hash modulus hash to themselves: no two collide
        n = self.counts.get(h, 0) + 1
        self.counts[h] = n
        if n > MAX_SAME_HASH:
            raise LimitExceededError(
                f"corrupt pickle: more than {MAX_SAME_HASH} {self.what}s share one hash (a hash-collision flood)"
            )


def _check_items(items: Any) -> None:
    counts = HashCounts("set item")
    for x in items:
        counts.add(x)
