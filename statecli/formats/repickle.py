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

_MARK, _TUPLE, _BINPERSID, _FRAME, _MEMOIZE, _STOP, _PROTO = 0x28, 0x74, 0x51, 0x95, 0x94, 0x2E, 0x80
_PUTS = {0x71: 1, 0x72: 4, 0x70: -1}  # BINPUT, LONG_BINPUT, PUT: width of the index (-1: text line)
_GETS = {0x68: 1, 0x6A: 4, 0x67: -1}  # BINGET, LONG_BINGET, GET


@dataclass(frozen=True, slots=True)
class PersistentId:
    """A storage's persistent id as the pickle holds it."""

    storage_type: str  # the name in ``torch``: FloatStorage, UntypedStorage, ...
    key: str
    location: str
    numel: int  # elements of the storage type (bytes for UntypedStorage)
    # The type's module as the input named it: torch pickles UntypedStorage as torch.storage.UntypedStorage,
    # the only name torch.load(weights_only=True) accepts for it (torch.UntypedStorage is refused).
    module: str = "torch"


class _Pids:
    """Writes persistent ids as a protocol-2 pickler would, with only the opcodes ``torch.load(weights_only=True)``
    reads. The parts every id repeats (``'storage'``, the storage type, the location) are memoized at indices
    just past the largest the pickle uses (``first_free``), so a hundred thousand ids cost a few bytes each,
    not forty. ``first_free`` None (a pickle with MEMOIZE, whose indices count entries): literals only."""

    def __init__(self, first_free: int | None) -> None:
        self.next = first_free
        self.seen: dict[bytes, bytes] = {}

    def part(self, literal: bytes) -> bytes:
        got = self.seen.get(literal)
        if got is not None:
            return got
        if self.next is None or self.next >= 2**31:
            return literal
        index = struct.pack("<I", self.next)
        self.next += 1
        self.seen[literal] = b"j" + index  # LONG_BINGET
        return literal + b"r" + index  # LONG_BINPUT

    def __call__(self, pid: PersistentId) -> bytes:
        glob = b"c" + pid.module.encode("ascii") + b"\n" + pid.storage_type.encode("ascii") + b"\n"
        parts = (self.part(_unicode("storage")), self.part(glob), _unicode(pid.key), self.part(_unicode(pid.location)))
        return b"".join((b"(", *parts, _int(pid.numel), b"t"))


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


# The way out of every cast or rewrite a whole checkpoint cannot hold: statecli's own state-dict writer.
STATE_DICT_INSTEAD = "convert the model's state dict instead (--state-dict, --select KEY, or a .safetensors output)"


def _refuse(why: str, path: str) -> UnsupportedFormatError:
    return UnsupportedFormatError(
        f"cannot write this pickle back with new storage records: {why}; {STATE_DICT_INSTEAD}", path=path
    )


# Opcodes that push one value written out in full: a string, a global's name, an int. A memo entry made of
# one may be written again as a literal where a read of it needs one.
_LITERALS = frozenset(b"X\x8c\x8dcKMJ\x8aUT")
# What torch's pickler writes between a persistent id's MARK and its TUPLE, each pushing one value (a literal,
# a memo read, STACK_GLOBAL of two of them) or nothing (a put, a FRAME). A span is only ever replaced when it
# holds nothing else: the reader and this walk then agree on which MARK the TUPLE takes (a POP of a MARK, a
# nested MARK or any opcode with an effect could make them disagree, and the bytes left outside the new span
# would run in the output with one item more on the stack than in the input: see tests/test_convert_attack.py).
_SPAN_OPS = _LITERALS | set(_PUTS) | set(_GETS) | {_MEMOIZE, _FRAME}
_STACK_GLOBAL = 0x93
# The largest pickle written back: what statecli's reader reads (Limits.max_ops), so what it reads back.
MAX_OUTPUT_BYTES = 200_000_000


def rewrite(
    data: bytes, start: int, end: int, pids: Sequence[PersistentId], path: str, first_free: int | None = None
) -> bytes:
    """The pickle ``data[start:end]`` (PROTO … STOP; what follows STOP is left out, as ``torch.load`` ignores it)
    with its ``k``-th persistent id replaced by ``pids[k]``. ``first_free``: a memo index past every one the
    pickle uses (None where it uses MEMOIZE), from which the new records memoize their repeated parts.

    The pickle was read to its end by the restricted reader first, so every opcode is a known one; the walk
    here only needs each opcode's length. Each old span's memo puts are written again after the new tuple,
    so the memo holds the same indices afterwards (MEMOIZE numbers them by count); a read elsewhere of a
    memo entry a span made (``{'device': 'cpu'}`` beside a cpu storage: pickle memoizes the one ``'cpu'``
    string) becomes the literal it was. Raises :class:`UnsupportedFormatError` where a persistent id is not
    built the way torch builds one, or such a read is of something other than a literal.

    One pass, written as it goes: memory is the output and one entry per memo index (as the reader's memo),
    never one per opcode (a pickle of memo reads would otherwise cost ~50 times its size)."""
    try:
        return _rewrite(data, start, end, pids, path, _Pids(first_free))
    except (ValueError, KeyError, IndexError) as e:  # the reader read it; a walk that cannot is refused
        raise _refuse(f"its opcodes cannot be walked ({e.__class__.__name__})", path) from None


def _rewrite(data: bytes, start: int, end: int, pids: Sequence[PersistentId], path: str, write: _Pids) -> bytes:
    table = opcode_table()
    view = memoryview(data)
    out = bytearray()
    copied = start  # data[start:copied] is in ``out`` (or was left out)
    literal_of: dict[int, bytes | None] = {}  # each memo entry's value, where it is a literal
    made_inside: dict[int, bytes | None] = {}  # memo entries whose latest put is inside a span
    lead = -1  # the MARK that may open a persistent id's span (-1: none)
    lead_out = 0  # where that MARK is in ``out``
    values = 0  # values pushed since ``lead``
    tupled = False  # its TUPLE came: only puts, then BINPERSID
    span_puts = bytearray()
    span_entries: list[tuple[int, bytes | None]] = []
    bad_read = -1  # a read inside the candidate span that must be refused if it is no span after all
    k = 0
    pushed: bytes | None = None  # the value the last opcode pushed, where it is a literal
    pos = start
    while pos < end:
        at = pos
        code = data[pos]
        size = table[code][0]
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
        if code == _PROTO and at != start:
            # A GLOBAL written again as a literal after it would be read under another protocol, whose
            # name mapping differs (commands.Popen is subprocess.Popen below protocol 3). torch never does this.
            raise _refuse(f"the pickle changes its protocol at byte {at}", path)
        if code in _PUTS or code == _MEMOIZE:
            if code == _MEMOIZE:
                index = len(literal_of)
            literal_of[index] = pushed
            made_inside.pop(index, None)  # put again here; if this is a span, its end says so
            if lead >= 0:
                span_puts += view[at:pos]
                span_entries.append((index, pushed))
            continue  # a put between TUPLE and BINPERSID memoizes the id itself: still its span
        if lead >= 0 and not (
            code == _BINPERSID
            if tupled
            else (code in _SPAN_OPS or code == _TUPLE or (code == _STACK_GLOBAL and values >= 2))
        ):  # STACK_GLOBAL's two operands must be the span's own
            if bad_read >= 0:
                raise _refuse(f"a memo entry made inside a storage record is read outside one at byte {bad_read}", path)
            lead = -1  # no span: what it held is copied as it is
        pushed = data[at:pos] if code in _LITERALS else None
        if code in _GETS:
            pushed = literal_of.get(index)
            if index in made_inside:
                value = made_inside[index]
                if value is None and lead < 0:
                    raise _refuse(f"memo entry {index} is made inside a storage record and read outside one", path)
                if value is None:
                    bad_read = at
                else:
                    out += view[copied:at]
                    out += value
                    copied = pos
                    if len(out) > MAX_OUTPUT_BYTES:
                        raise _refuse(
                            f"written back with literals it would exceed {MAX_OUTPUT_BYTES:,} bytes, more than "
                            "statecli reads",
                            path,
                        )
        elif code == _FRAME:  # optional, and its length would be wrong: left out
            out += view[copied:at]
            copied = pos
            pushed = None
            continue
        if lead >= 0:
            if code == _STACK_GLOBAL:
                values -= 1
            elif code == _TUPLE:
                tupled = values == 5
                if not tupled:
                    lead = -1
                    continue
            elif code != _BINPERSID:
                values += 1
        if code == _MARK:
            lead, lead_out, values, tupled, bad_read = at, len(out) + at - copied, 0, False, -1
            span_puts.clear()
            span_entries.clear()
        elif code == _BINPERSID:
            if lead < 0 or not tupled:
                raise _refuse(f"the persistent id at byte {at} is not a tuple built just before it", path)
            if k >= len(pids):
                raise _refuse(f"more persistent ids than the reader saw ({len(pids)})", path)
            out += view[copied:at]
            del out[lead_out:]
            out += write(pids[k])
            out += span_puts
            out += b"Q"
            copied = pos
            k += 1
            for i, literal in span_entries:
                made_inside[i] = literal
            lead = -1
        elif code == _STOP:
            out += view[copied:pos]
            if k != len(pids):
                raise _refuse(f"{k} persistent ids found where the reader saw {len(pids)}", path)
            return bytes(out)
    raise _refuse("the pickle has no STOP", path)
