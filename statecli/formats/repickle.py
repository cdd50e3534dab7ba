"""A torch pickle written back with new storage records and every other opcode as it was.

A whole training checkpoint (model, optimizer, scheduler, RNG state, a Lightning module's
hyper-parameters, custom classes) converts by re-emitting its own pickle: the bytes between storage
records are copied as they are, so every non-tensor value, every global name and every call comes back
exactly as it was read, and nothing is imported or called to write them. Only each storage's persistent
id (``('storage', torch.<Type>Storage, key, location, numel)``, where its dtype and device live) is
replaced.

torch's pickler writes a persistent id as ``MARK … TUPLE [BINPUT n] BINPERSID``; that span is what is
replaced. Its strings may be memoized and fetched again by a later persistent id (``'storage'``, the
location); the new spans are written with literals, so a memo entry made inside a span may be read only
inside spans. A pickle that reads one elsewhere, or builds a persistent id any other way, is refused
rather than guessed at. FRAME opcodes are left out (they are optional, and give lengths the new spans
change); MEMOIZE ones are kept in number, since their indices count.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from statecli.errors import UnsupportedFormatError
from statecli.safepickle.names import LENGTH_WIDTH, opcode_table

_MARK, _TUPLE, _BINPERSID, _FRAME, _MEMOIZE, _STOP = 0x28, 0x74, 0x51, 0x95, 0x94, 0x2E
_PUTS = {0x71: 1, 0x72: 4, 0x70: -1}  # BINPUT, LONG_BINPUT, PUT: width of the index (-1: text line)
_GETS = {0x68: 1, 0x6A: 4, 0x67: -1}  # BINGET, LONG_BINGET, GET


@dataclass(frozen=True, slots=True)
class PersistentId:
    """A storage's persistent id as the pickle holds it."""

    storage_type: str  # the name in ``torch``: FloatStorage, UntypedStorage, ...
    key: str
    location: str
    numel: int  # elements of the storage type (bytes for UntypedStorage)


class _Pids:
    """Writes persistent ids as a protocol-2 pickler would, with only the opcodes ``torch.load(weights_only=True)``
    reads. The parts every id repeats (``'storage'``, the storage class, the location) are memoized at indices
    past every index the pickle uses, so a hundred thousand ids cost a few bytes each, not forty; not in a
    pickle with MEMOIZE, whose indices count entries."""

    def __init__(self, first_free: int | None) -> None:
        self.next = first_free
        self.seen: dict[bytes, bytes] = {}

    def part(self, literal: bytes) -> bytes:
        got = self.seen.get(literal)
        if got is not None:
            return got
        if self.next is None or self.next >= 2**32:
            return literal
        index = struct.pack("<I", self.next)
        self.next += 1
        self.seen[literal] = b"j" + index  # LONG_BINGET
        return literal + b"r" + index  # LONG_BINPUT

    def __call__(self, pid: PersistentId) -> bytes:
        glob = b"c" + b"torch\n" + pid.storage_type.encode("ascii") + b"\n"
        return b"".join(
            (
                b"(",
                self.part(_unicode("storage")),
                self.part(glob),
                _unicode(pid.key),
                self.part(_unicode(pid.location)),
                _int(pid.numel),
                b"t",
            )
        )


def _unicode(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogatepass")  # as the reader decoded it
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes((n,))
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes((len(raw),)) + raw


def _refuse(why: str, path: str) -> UnsupportedFormatError:
    return UnsupportedFormatError(
        f"cannot write this pickle back with new storage records: {why}; convert the model's state dict "
        "instead (--state-dict, --select KEY, or a .safetensors output)",
        path=path,
    )


# Opcodes that push one value written out in full: a string, a global's name, an int. A memo entry made of
# one may be written again as a literal where a read of it needs one.
_LITERALS = frozenset(b"X\x8c\x8dcKMJ\x8aUT")


@dataclass(slots=True)
class _Walk:
    """What one pass over the pickle found: each persistent id's span and the memo's uses."""

    spans: list[tuple[int, int, list[bytes]]]  # (MARK of the id's tuple, BINPERSID position, the puts inside)
    frames: list[tuple[int, int]]  # FRAME opcodes: (position, end)
    # (position, end, is a put, index, the value as a literal opcode or None), in order
    memo: list[tuple[int, int, bool, int, bytes | None]]
    stop: int  # one past STOP
    top: int  # the largest memo index used
    memoize: bool  # whether MEMOIZE numbers entries by count


def _walk(data: bytes, start: int, end: int, path: str) -> _Walk:
    table = opcode_table()
    spans: list[tuple[int, int, list[bytes]]] = []
    frames: list[tuple[int, int]] = []
    memo: list[tuple[int, int, bool, int, bytes | None]] = []
    literal_of: dict[int, bytes | None] = {}  # each memo entry's value, where it is a literal
    marks: list[int] = []
    last_tuple: tuple[int, int] | None = None  # (its MARK, one past TUPLE) while only puts follow it
    pushed: bytes | None = None  # the value the last opcode pushed, where it is a literal
    pos = start
    while pos < end:
        at = pos
        code = data[pos]
        size, _, to_mark, _, _ = table[code]
        pos += 1
        index = -1
        if code == 0x63 or code == 0x69:  # GLOBAL, INST: two lines
            pos = data.index(b"\n", data.index(b"\n", pos) + 1) + 1
        elif size > 0:
            if code in _PUTS or code in _GETS:
                index = int.from_bytes(data[pos : pos + size], "little")
            pos += size
        elif size == -1:  # protocol 0: up to a newline
            line_end = data.index(b"\n", pos)
            if code in _PUTS or code in _GETS:
                index = int(data[pos:line_end])
            pos = line_end + 1
        elif size < 0:
            width = LENGTH_WIDTH[size]
            pos += width + int.from_bytes(data[pos : pos + width], "little", signed=size == -3)
        if code == _MEMOIZE:
            index = len(literal_of)
        if code in _PUTS or code == _MEMOIZE:
            literal_of[index] = pushed
            memo.append((at, pos, True, index, pushed))
            continue  # a put between TUPLE and BINPERSID memoizes the id itself: still its span
        pushed = data[at:pos] if code in _LITERALS else None
        if code in _GETS:
            memo.append((at, pos, False, index, None))
            pushed = literal_of.get(index)
        elif code == _FRAME:
            frames.append((at, pos))
            continue
        elif code == _BINPERSID:
            if last_tuple is None:
                raise _refuse(f"the persistent id at byte {at} is not a tuple built just before it", path)
            lead = last_tuple[0]
            if spans and spans[-1][1] >= lead:
                raise _refuse(f"the persistent id at byte {at} holds another one", path)
            spans.append((lead, at, _puts_in(data, lead, at, memo)))
        elif code == _STOP:
            top = max(literal_of, default=-1)
            return _Walk(spans, frames, memo, pos, top, any(data[e[0]] == _MEMOIZE for e in memo))
        if code == _MARK:
            marks.append(at)
        elif to_mark:
            lead = marks.pop() if marks else -1
            if code == _TUPLE:
                last_tuple = (lead, pos)
                continue
        last_tuple = None
    raise _refuse("the pickle has no STOP", path)


def _puts_in(data: bytes, lo: int, hi: int, memo: list[tuple[int, int, bool, int, bytes | None]]) -> list[bytes]:
    """The put opcodes between ``lo`` and ``hi``, as bytes, in order (the latest are at the memo's end)."""
    found = []
    for at, stop, is_put, _, _ in reversed(memo):
        if at < lo:
            break
        if is_put and at < hi:
            found.append(data[at:stop])
    found.reverse()
    return found


def rewrite(data: bytes, start: int, end: int, pids: Sequence[PersistentId], path: str) -> bytes:
    """The pickle ``data[start:end]`` (PROTO … STOP; what follows STOP is left out, as ``torch.load`` ignores it)
    with its ``k``-th persistent id replaced by ``pids[k]``.

    The pickle was read to its end by the restricted reader first, so every opcode is a known one; the walk
    here only needs each opcode's length. Each old span's memo puts are written again after the new tuple,
    so the memo holds the same indices afterwards (MEMOIZE numbers them by count); a read elsewhere of a
    memo entry a span made (``{'device': 'cpu'}`` beside a cpu storage: pickle memoizes the one ``'cpu'``
    string) becomes the literal it was. Raises :class:`UnsupportedFormatError` where a persistent id is not
    built the way torch builds one, or such a read is of something other than a literal."""
    try:
        w = _walk(data, start, end, path)
    except (ValueError, KeyError, IndexError) as e:  # the reader read it; a walk that cannot is refused
        raise _refuse(f"its opcodes cannot be walked ({e.__class__.__name__})", path) from None
    if len(w.spans) != len(pids):
        raise _refuse(f"{len(w.spans)} persistent ids found where the reader saw {len(pids)}", path)
    write = _Pids(None if w.memoize else w.top + 1)
    cuts = sorted(
        [(lo, hi + 1, write(pids[k]) + b"".join(puts) + b"Q") for k, (lo, hi, puts) in enumerate(w.spans)]
        + [(lo, hi, b"") for lo, hi in w.frames]
        + _literal_reads(w, path)
    )
    view = memoryview(data)
    out: list[bytes | memoryview] = []
    copied = start
    for lo, hi, new in cuts:
        if lo < copied:
            continue  # a FRAME inside a span: the span's replacement covers it
        out.append(view[copied:lo])
        out.append(new)
        copied = hi
    out.append(view[copied : w.stop])
    return b"".join(out)


def _literal_reads(w: _Walk, path: str) -> list[tuple[int, int, bytes]]:
    """Reads outside the spans of memo entries a span made, each as (start, end, the literal to write instead):
    the new spans build their values from literals, and the puts written again hold the new tuple."""
    made_inside: dict[int, bytes | None] = {}
    spans = w.spans
    reads = []
    k = 0
    for at, stop, is_put, index, literal in w.memo:
        while k < len(spans) and spans[k][1] < at:
            k += 1
        inside = k < len(spans) and spans[k][0] <= at < spans[k][1]
        if is_put:
            if inside:
                made_inside[index] = literal
            else:
                made_inside.pop(index, None)
        elif not inside and index in made_inside:
            value = made_inside[index]
            if value is None:
                raise _refuse(f"memo entry {index} is made inside a storage record and read outside one", path)
            reads.append((at, stop, value))
    return reads
