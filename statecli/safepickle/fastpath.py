"""The restricted reader's fast path: one regex step for each ``_rebuild_tensor_v2`` call in torch.save's
usual form, instead of ~25 trips through the opcode loop. It builds exactly what the general loop
builds (tests/test_safepickle_fastpath.py compares the two on the same bytes); anything off that form is
left to the general loop.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from typing import Any

from statecli.dtypes import DTYPES
from statecli.errors import LimitExceededError
from statecli.pickled import Global, PickledDict, StorageRef, TensorRef
from statecli.safepickle.bounds import Limits
from statecli.safepickle.handlers import MAX_INDEX, _checked_view, _h_ordered_dict, _h_rebuild_tensor_v2

_U32 = struct.Struct("<I").unpack_from
# A BINUNICODE's 4-byte length for each length a storage key (20 digits) or location (64) may have.
_LENGTHS = tuple(i.to_bytes(4, "little") for i in range(65))
# Bytes per element of the dtypes of whole bytes: their views' bounds are checked in line.
_WHOLE_ITEMSIZE = {name: d.bits // 8 for name, d in DTYPES.items() if d.bits >= 8}


# One ``_rebuild_tensor_v2`` call as torch.save writes it once the names it uses are memoized: the
# argument tuple (storage persistent id, offset, shape, stride, requires_grad, hooks) and the REDUCE.
# Matched in one regex step instead of ~25 trips through the opcode loop; anything else (first use of a
# name, metadata, LONG1 sizes, hostile bytes) does not match and takes the general loop. Memo operations
# are captured whole (``h`` + 1 byte or ``j`` + 4): the index is the little-endian number after the opcode.
_INT = rb"(?:K.|M..|J....)"
_GET = rb"(h.|j....)"
_PUT = rb"(q.|r....)"
_TUPLE = rb"(\)|" + _INT + rb"[\x85]|" + _INT + rb"{2}\x86|" + _INT + rb"{3}\x87|\(" + _INT + rb"{0,64}t)"
_OPT_PUT = rb"(q.|r....)?"  # pickle does not memoize the empty tuple of a 0-dim tensor
_TENSOR_V2_BODY = (
    rb"\(\("
    + _GET  # 'storage'
    + _GET  # storage type
    + rb"X(....)([0-9]{1,20})"  # storage key (decimal)
    + _PUT
    # location: memoized ('cpu' after its first use) or written afresh each time (CUDA saves)
    + rb"(?:(h.|j....)|X(....)([\x20-\x7e]{1,64}?)(q.|r....))"
    + rb"("
    + _INT
    + rb")t"  # numel, TUPLE
    + _PUT
    + rb"Q("
    + _INT
    + rb")"  # BINPERSID, storage offset
    + _TUPLE
    + _OPT_PUT
    + _TUPLE
    + _OPT_PUT
    + rb"([\x88\x89])"  # requires_grad
    + _GET  # OrderedDict
    + rb"\)R"
    + _PUT
    + rb"t"
    + _PUT
    + rb"R"
)
# One state-dict entry: the key's PUT, the GET of ``_rebuild_tensor_v2`` and the call (the key itself is
# read in Python); matched where the call starts, after a GET the opcode loop took, the first two are absent.
_TENSOR_V2 = re.compile(rb"(?:" + _PUT + _GET + rb")?" + _TENSOR_V2_BODY, re.DOTALL)


def _no_fast_path(g: Any, pos: int, memo: Any, stack: Any) -> int:
    return 0


def _small_int(b: bytes) -> int:
    op = b[0]
    if op == 0x4B:
        return b[1]
    if op == 0x4D:
        return b[1] | b[2] << 8
    return int.from_bytes(b[1:5], "little", signed=True)


def _int_tuple(b: bytes) -> tuple[int, ...]:
    """The ints of a matched tuple: ``)``, ints + TUPLE1/2/3, or ``(`` ints ``t``."""
    if len(b) == 3 and b[0] == 0x4B:  # (K n) TUPLE1: every 1-D tensor below 256 elements
        return (b[1],)
    out = []
    i = 1 if b[0] == 0x28 else 0
    end = len(b) - 1
    while i < end:
        op = b[i]
        width = 2 if op == 0x4B else 3 if op == 0x4D else 5
        out.append(_small_int(b[i : i + width]))
        i += width
    return tuple(out)


class FastPath:
    """The fast path as a part of :class:`~statecli.safepickle.machine.RestrictedUnpickler`, which sets these."""

    data: bytes
    persistent_load: Callable[[Any], Any] | None
    limits: Limits
    fast_hits: int
    _max_memo: int

    def _fast_tensors(self, g: Global, pos: int, memo: dict[int, Any], stack: list[Any]) -> int:
        """Build the ``_rebuild_tensor_v2`` call at ``pos`` (just after the GET of ``g``) and, while the bytes
        keep to torch's form, the state-dict entries after it (the result's PUT, the next key, its PUT, a GET
        of ``g``, the call), pushing keys and tensors on ``stack``. Returns the position after the last byte
        taken, or 0 when the first call is not in the common form (then nothing changed).

        Every PUT taken here must name a slot the memo does not hold yet, as torch's do: then no GET can
        read a value stored during the run, so the GETs' values (checked once per run) stay valid, and no
        GET in an entry can read that entry's own PUTs. Anything else is left to the general loop.
        """
        data = self.data
        n = len(data)
        persistent = self.persistent_load
        if persistent is None:
            return 0
        from_bytes = int.from_bytes
        max_memo = self._max_memo
        max_str = self.limits.max_str
        match = _TENSOR_V2.match
        whole = _WHOLE_ITEMSIZE
        m = match(data, pos)
        if m is None or m.group(1) is not None:
            return 0
        key = None
        checked: dict[tuple[Any, ...], tuple[Global, str]] = {}
        hits = 0
        while m is not None:
            (kput, get, tag, st, klen, skey, skput, locget, loclen, loc, locput, numel, pidput, off, shape_b, shput,
             stride_b, stput, grad, od, hput, aput) = m.groups()  # fmt: skip
            gets = (tag, st, locget, od, get)
            known = checked.get(gets)
            if known is None:
                # The first entry of the run with these GET slots: look the values up and check them.
                at = {x: from_bytes(x[1:], "little") for x in gets if x}
                if get and memo.get(at[get]) is not g:
                    break
                stype = memo.get(at[st])
                if memo.get(at[tag]) != "storage" or type(stype) is not Global:
                    break
                odict = memo.get(at[od])
                if type(odict) is not Global or odict.handler is not _h_ordered_dict:
                    break
                location = memo.get(at[locget]) if locget else ""
                if type(location) is not str:
                    break
                known = checked[gets] = (stype, location)
            stype, location = known
            if locget is None:
                if loclen != _LENGTHS[len(loc)]:
                    break
                location = loc.decode("ascii")
                locput_at = from_bytes(locput, "little") >> 8
            if klen != _LENGTHS[len(skey)]:
                break
            # Written out, not looped: this runs once per tensor. A memo operation is its opcode and then its
            # index, little-endian: the index is the whole read as one number, shifted past the opcode.
            skput_at = from_bytes(skput, "little") >> 8
            pidput_at = from_bytes(pidput, "little") >> 8
            hput_at = from_bytes(hput, "little") >> 8
            aput_at = from_bytes(aput, "little") >> 8
            if skput_at in memo or pidput_at in memo or hput_at in memo or aput_at in memo:
                break
            if kput:
                kput_at = from_bytes(kput, "little") >> 8
                if kput_at in memo:
                    break
                try:
                    key_s = str(key, "utf-8", "surrogatepass")  # type: ignore[arg-type]
                except UnicodeDecodeError:
                    break
            if shput:
                shput_at = from_bytes(shput, "little") >> 8
                if shput_at in memo:
                    break
            if stput:
                stput_at = from_bytes(stput, "little") >> 8
                if stput_at in memo:
                    break
            if locget is None and locput_at in memo:
                break
            # Every check passed: from here on the entry is taken, memo entries stored in file order.
            skey_s = skey.decode("ascii")
            pid = ("storage", stype, skey_s, location, numel[1] if numel[0] == 0x4B else _small_int(numel))
            shape = (shape_b[1],) if len(shape_b) == 3 and shape_b[0] == 0x4B else _int_tuple(shape_b)
            stride = (stride_b[1],) if len(stride_b) == 3 and stride_b[0] == 0x4B else _int_tuple(stride_b)
            hooks = PickledDict()
            if kput:
                memo[kput_at] = key_s
                stack.append(key_s)
            memo[skput_at] = skey_s
            if locget is None:
                memo[locput_at] = location
            memo[pidput_at] = pid
            if shput:
                memo[shput_at] = shape
            if stput:
                memo[stput_at] = stride
            memo[hput_at] = hooks
            storage = persistent(pid)
            offset = off[1] if off[0] == 0x4B else _small_int(off)
            requires_grad = grad == b"\x88"
            args = (storage, offset, shape, stride, requires_grad, hooks)
            memo[aput_at] = args
            if len(memo) > max_memo:
                raise LimitExceededError(f"pickle memo exceeds {max_memo} entries")
            if type(storage) is StorageRef:
                # shape and stride came out of _int_tuple: ints already, so only the bounds need checking. The
                # usual 1-D and 0-D views in line; any other, or one out of bounds, by _checked_view.
                dt = storage.dtype
                t = None
                size = whole.get(dt)
                if size is not None and 0 <= offset <= MAX_INDEX and len(stride) == len(shape) < 2:
                    end = storage.nbytes // size  # elements the storage holds
                    if not shape:
                        if offset < end:
                            t = TensorRef(storage, offset, shape, stride, dt, requires_grad)
                    else:
                        d = shape[0]
                        step = stride[0]
                        if 0 < d <= MAX_INDEX and 0 <= step <= MAX_INDEX and offset + (d - 1) * step < end:
                            t = TensorRef(storage, offset, shape, stride, dt, requires_grad)
                if t is None:
                    t = _checked_view(storage, offset, shape, stride, dt)
                    t.requires_grad = requires_grad
            else:
                t = _h_rebuild_tensor_v2(args)  # the general path raises the right error
            stack.append(t)
            pos = m.end()
            hits += 1
            # The result's PUT: a whole opcode, taken alone; a slot already used ends the run after it.
            op = data[pos] if pos < n else 0
            if op == 0x71:
                i = data[pos + 1]
                pos += 2
            elif op == 0x72 and pos + 5 <= n:
                i = _U32(data, pos + 1)[0]
                pos += 5
            else:
                break
            fresh = i not in memo
            memo[i] = t
            if len(memo) > max_memo:
                raise LimitExceededError(f"pickle memo exceeds {max_memo} entries")
            if not fresh or pos + 5 > n or data[pos] != 0x58:  # the next entry's key is a BINUNICODE
                break
            size = _U32(data, pos + 1)[0]
            kend = pos + 5 + size
            if size > max_str or kend > n:
                break
            key = data[pos + 5 : kend]
            m = match(data, kend)
            if m is not None and m.group(1) is None:
                break  # the next entry must begin with the key's PUT
        self.fast_hits += hits
        return pos if hits else 0
