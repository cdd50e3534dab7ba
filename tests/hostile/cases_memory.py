"""Hostile pickles that buy the most memory per byte: each repeats the cheapest opcodes that make a costly object.

Measured with benchmarks/pickle_memory.py before the reader paid for its containers: one EMPTY_SET byte made
a 216-byte set (250 bytes of memory per pickle byte), one MEMOIZE byte an ~86-byte memo entry, one DUP byte
of a tensor in a list a tensor record of 3-8 KB by the time it was printed, and a tensor record under a
60,000-character key 60,000 characters of name, listed again beside each of its 64 sharers: a 60 KB file
took 15 GB and 77 s. Each case here is 160 KB to 1.6 MB; read as before (93b38be), each fails the harness
(over its 128 MiB or 5 s, or not the expected exit). Now each ends in exit 3 with one line, or is read, in
under 90 MiB and a second.
"""

from __future__ import annotations

import struct
from pathlib import Path

from make_hostile import _OPS, Asm, case, error, ok, state_dict, torch_zip


def _payload_list(a: Asm, unit: bytes, count: int, before: bytes = b"") -> None:
    """``before``, then a list of what ``unit`` pushes, ``count`` times (MARK ... LIST)."""
    a.raw(before).op("MARK").raw(unit * count).op("LIST")


def _file(d: Path, payload: object, proto: int = 4) -> Path:
    data = state_dict(("weight", lambda a: a.tensor()), ("payload", payload), proto=proto)  # type: ignore[arg-type]
    return torch_zip(d / "model.pt", data)


@case("memory_empty_sets", "resource", error(3, "sets, dicts and lists"))
def _(d: Path) -> Path:
    # 1 MB of EMPTY_SET: a million 216-byte sets.
    return _file(d, lambda a: _payload_list(a, _OPS["EMPTY_SET"], 1_000_000))


@case("memory_frozensets", "resource", error(3, "sets, dicts and lists"))
def _(d: Path) -> Path:
    # MARK FROZENSET: a 216-byte frozenset from two bytes (no item to pay for it).
    return _file(d, lambda a: _payload_list(a, _OPS["MARK"] + _OPS["FROZENSET"], 500_000))


@case("memory_empty_dicts_memoized", "resource", error(3, "sets, dicts and lists"))
def _(d: Path) -> Path:
    # EMPTY_DICT MEMOIZE: a 64-byte dict and a memo entry from two bytes.
    return _file(d, lambda a: _payload_list(a, _OPS["EMPTY_DICT"] + _OPS["MEMOIZE"], 500_000))


@case("memory_memoize", "resource", error(3, "memo exceeds"))
def _(d: Path) -> Path:
    # MEMOIZE of one value, over and over: a memo entry per byte.
    return _file(d, lambda a: a.op("NONE").raw(_OPS["MEMOIZE"] * 1_500_000))


@case("memory_tensor_per_byte", "resource", error(3, "names more tensors than it holds"))
def _(d: Path) -> Path:
    # DUP of one tensor in a list: a tensor record (with 64 names of the tensors it shares storage with) per byte.
    return _file(d, lambda a: a.op("MARK").tensor().raw(_OPS["DUP"] * 300_000).op("LIST"))


@case("memory_long_names", "resource", error(3, "names more tensors than it holds"))
def _(d: Path) -> Path:
    # One tensor, listed 20,000 times under a 60,000-character key (5 bytes each): 1.2 GB of names.
    def payload(a: Asm) -> None:
        a.tensor().put(1).op("POP")
        a.op("EMPTY_DICT").str_("k" * 60_000).op("MARK")
        a.raw((_OPS["LONG_BINGET"] + struct.pack("<I", 1)) * 20_000).op("LIST").op("SETITEM")

    return _file(d, payload)


@case("memory_shared_long_names", "resource", ok("weight"))
def _(d: Path) -> Path:
    # 400 tensors of one storage, each named by a 4,000-character key: shares_with would list 64 of those
    # names beside each of them (100 MB of JSON from a 1.6 MB file); it lists what fits in 512 characters.
    def entries(a: Asm) -> None:
        a.op("EMPTY_DICT").op("MARK")
        for i in range(400):
            a.str_(f"{i:04d}" + "n" * 3996).get(1)
        a.op("SETITEMS")

    def payload(a: Asm) -> None:
        a.tensor().put(1).op("POP")
        entries(a)

    return _file(d, payload)
