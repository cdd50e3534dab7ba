"""The restricted reader's opcode loop: it builds inert data from a pickle without importing or calling
anything, within the limits of :class:`~statecli.safepickle.bounds.Limits`."""

from __future__ import annotations

import _compat_pickle
import struct
from collections.abc import Callable
from typing import Any

from statecli.clip import describe, describe_name
from statecli.errors import InputError, LimitExceededError
from statecli.pickled import COMPUTED, Action, Global, Stub
from statecli.safepickle.bounds import (
    _DICT_COST,
    _LIST_COST,
    _MEMO_BYTES,
    _MEMO_COST,
    _SET_COST,
    MAX_GLOBAL_NAME,
    MAX_GLOBALS,
    MAX_SAME_HASH,
    HashCounts,
    Limits,
    _check_items,
    _may_collide,
    check_key,
)
from statecli.safepickle.calls import Calls
from statecli.safepickle.fastpath import FastPath, _no_fast_path
from statecli.safepickle.handlers import HANDLERS, _h_rebuild_tensor_v2

_U32 = struct.Struct("<I").unpack_from


def _operand(v: Any) -> str:
    """How a STACK_GLOBAL operand that may not be a literal string is named in a finding."""
    if type(v) is str:
        return describe(v)
    if isinstance(v, Global):
        return f"the value of {describe_name(v.qualname)}"
    return f"the result of calling {describe_name(v.class_name)}"


class RestrictedUnpickler(Calls, FastPath):
    """Parse one pickle into inert data. ``persistent_load`` turns persistent ids into storage records.

    After :meth:`load`, ``globals_seen`` counts every global named, and ``actions`` records what the pickle
    *would* make Python do (calls, instantiations, BUILD on globals), one :class:`Action` per kind and
    target, for :mod:`statecli.security` to judge. Calls statecli's own handlers model are not recorded.
    """

    def __init__(
        self,
        data: bytes,
        persistent_load: Callable[[Any], Any] | None = None,
        limits: Limits | None = None,
        fast_paths: bool = True,
        start: int = 0,
    ) -> None:
        self.data = data
        self.persistent_load = persistent_load
        self.limits = limits or Limits()
        self.globals_seen: dict[tuple[str, str], int] = {}
        self.actions: dict[tuple[str, str, str], Action] = {}
        # Set once a BUILD patched a global: from then on no name is trusted to be what statecli knows.
        self.tainted = False
        self.proto = 0
        self.start = start
        self.end = 0  # offset just past STOP
        self.memo_top = -1  # the largest memo index the pickle put, once read to its STOP
        self.fast_paths = fast_paths
        self._hash_counts: dict[int, HashCounts] = {}
        self._max_memo = self.limits.max_memo
        self.fast_hits = 0  # tensors built by the fast path (the tests check it really runs)
        self.stopped_at: int | None = None  # where load() gave up, for a pickle it could not read to its end

    # The hot loop is one function with local variables and an if-chain ordered by how often torch
    # pickles use each opcode: a 100,000-tensor state dict runs about two million of them.
    def load(self) -> Any:
        data = self.data
        n = len(data)
        lim = self.limits
        stack: list[Any] = []
        marks: list[int] = []
        memo: dict[int, Any] = {}
        unpack_from = struct.unpack_from
        u32 = _U32
        # A memo entry costs 64-130 bytes, MEMOIZE one: see _MEMO_BYTES.
        max_memo = min(lim.max_memo, (n - self.start) // _MEMO_BYTES + lim.alloc_floor // _MEMO_COST)
        self._max_memo = max_memo
        budget = lim.alloc_per_byte * (n - self.start) + lim.alloc_floor
        alloc = budget  # what containers may still cost; each EMPTY_SET, DICT, LIST... takes its size
        max_depth = lim.max_depth
        max_str = lim.max_str
        persistent = self._persistent
        call = self._call
        fast = self._fast_tensors if self.fast_paths else _no_fast_path
        pos = self.start
        # Every opcode takes at least one byte, so the opcode count is bounded by the pickle's size,
        # which the caller caps; an explicit counter would cost ~10% of the loop.
        if n > lim.max_ops:
            self.stopped_at = self.start  # nothing read: all of it is what real pickle would go on to do
            raise LimitExceededError(f"pickle of {n} bytes could run more than {lim.max_ops} opcodes")
        try:
            while True:
                op = data[pos]
                pos += 1
                if op == 0x72:  # LONG_BINPUT
                    memo[u32(data, pos)[0]] = stack[-1]
                    pos += 4
                    if len(memo) > max_memo:
                        raise self._memo_error(max_memo)
                elif op == 0x68 or op == 0x6A:  # BINGET, LONG_BINGET
                    if op == 0x68:
                        v = memo[data[pos]]
                        pos += 1
                    else:
                        v = memo[u32(data, pos)[0]]
                        pos += 4
                    if type(v) is Global and v.handler is _h_rebuild_tensor_v2 and data[pos] == 0x28:
                        after = fast(v, pos, memo, stack)
                        if after:
                            pos = after
                            continue
                    stack.append(v)
                elif op == 0x4B:  # BININT1
                    stack.append(data[pos])
                    pos += 1
                elif op == 0x28:  # MARK
                    marks.append(len(stack))
                    if len(marks) > max_depth:
                        raise LimitExceededError(f"pickle nests deeper than {max_depth} levels")
                elif op == 0x58:  # BINUNICODE
                    size = u32(data, pos)[0]
                    pos += 4
                    end = pos + size
                    if size > max_str or end > n:
                        self._bytes(pos, size)  # raises the right error
                    stack.append(str(data[pos:end], "utf-8", "surrogatepass"))
                    pos = end
                elif op == 0x74:  # TUPLE
                    k = marks.pop()
                    t = tuple(stack[k:])
                    del stack[k:]
                    stack.append(t)
                elif op == 0x85:  # TUPLE1
                    stack[-1] = (stack[-1],)
                elif op == 0x52:  # REDUCE
                    args = stack.pop()
                    f = stack[-1]
                    if type(f) is Global and f.handler is not None and type(args) is tuple:
                        try:
                            stack[-1] = f.handler(args)
                        except IndexError as e:
                            raise InputError(f"corrupt pickle: too few arguments to {f.qualname}") from e
                    else:
                        stack[-1] = call(f, args, "reduce")
                elif op == 0x51:  # BINPERSID
                    stack[-1] = persistent(stack[-1])
                elif op == 0x89:  # NEWFALSE
                    stack.append(False)
                elif op == 0x29:  # EMPTY_TUPLE
                    stack.append(())
                elif op == 0x71:  # BINPUT
                    memo[data[pos]] = stack[-1]
                    pos += 1
                    if len(memo) > max_memo:
                        raise self._memo_error(max_memo)
                elif op == 0x86:  # TUPLE2
                    b = stack.pop()
                    stack[-1] = (stack[-1], b)
                elif op == 0x87:  # TUPLE3
                    c = stack.pop()
                    b = stack.pop()
                    stack[-1] = (stack[-1], b, c)
                elif op == 0x88:  # NEWTRUE
                    stack.append(True)
                elif op == 0x94:  # MEMOIZE
                    memo[len(memo)] = stack[-1]
                    if len(memo) > max_memo:
                        raise self._memo_error(max_memo)
                elif op == 0x75:  # SETITEMS
                    k = marks.pop()
                    items = stack[k:]
                    del stack[k:]
                    self._setitems(stack[-1], items)
                elif op == 0x73:  # SETITEM
                    v = stack.pop()
                    key = stack.pop()
                    self._setitems(stack[-1], [key, v])
                elif op == 0x4A:  # BININT
                    stack.append(unpack_from("<i", data, pos)[0])
                    pos += 4
                elif op == 0x4D:  # BININT2
                    stack.append(unpack_from("<H", data, pos)[0])
                    pos += 2
                elif op == 0x7D:  # EMPTY_DICT
                    stack.append({})
                    alloc -= _DICT_COST
                    if alloc < 0:
                        raise self._alloc_error(budget)
                elif op == 0x5D:  # EMPTY_LIST
                    stack.append([])
                    alloc -= _LIST_COST
                    if alloc < 0:
                        raise self._alloc_error(budget)
                elif op == 0x4E:  # NONE
                    stack.append(None)
                elif op == 0x8C:  # SHORT_BINUNICODE
                    size = data[pos]
                    pos += 1
                    stack.append(self._text(pos, size))
                    pos += size
                elif op == 0x63:  # GLOBAL
                    module, pos = self._line(pos)
                    name, pos = self._line(pos)
                    stack.append(self._global(module.decode("utf-8"), name.decode("utf-8")))
                elif op == 0x93:  # STACK_GLOBAL
                    name = stack.pop()
                    module = stack.pop()
                    if type(name) is not str or type(module) is not str:
                        stack.append(self._computed_global(module, name))
                    else:
                        stack.append(self._global(module, name))
                elif op == 0x62:  # BUILD
                    state = stack.pop()
                    self._build(stack[-1], state)
                elif op == 0x65:  # APPENDS
                    k = marks.pop()
                    items = stack[k:]
                    del stack[k:]
                    self._extend(stack[-1], items)
                elif op == 0x61:  # APPEND
                    v = stack.pop()
                    self._extend(stack[-1], [v])
                elif op == 0x81:  # NEWOBJ
                    args = stack.pop()
                    stack[-1] = self._call(stack[-1], args, "newobj")
                elif op == 0x92:  # NEWOBJ_EX
                    kwargs = stack.pop()
                    args = stack.pop()
                    stack[-1] = self._call(stack[-1], (args, kwargs), "newobj")
                elif op == 0x80:  # PROTO
                    self.proto = data[pos]
                    pos += 1
                elif op == 0x95:  # FRAME: the whole pickle is in memory already; just check the claim
                    (size,) = unpack_from("<Q", data, pos)
                    pos += 8
                    if size > n - pos:
                        raise InputError(f"corrupt pickle: frame of {size} bytes runs past the data")
                elif op == 0x2E:  # STOP
                    self.end = pos
                    self.memo_top = max(memo, default=-1)
                    if not stack:
                        raise InputError("corrupt pickle: STOP with an empty stack")
                    return stack.pop()
                elif op == 0x30:  # POP
                    if stack and (not marks or marks[-1] < len(stack)):
                        stack.pop()
                    else:
                        k = marks.pop()
                        del stack[k:]
                elif op == 0x31:  # POP_MARK
                    k = marks.pop()
                    del stack[k:]
                elif op == 0x32:  # DUP
                    stack.append(stack[-1])
                elif op == 0x64:  # DICT
                    k = marks.pop()
                    items = stack[k:]
                    del stack[k:]
                    d: dict[Any, Any] = {}
                    self._setitems(d, items)
                    stack.append(d)
                    alloc -= _DICT_COST
                    if alloc < 0:
                        raise self._alloc_error(budget)
                elif op == 0x6C:  # LIST
                    k = marks.pop()
                    lst = stack[k:]
                    del stack[k:]
                    stack.append(lst)
                    alloc -= _LIST_COST
                    if alloc < 0:
                        raise self._alloc_error(budget)
                elif op == 0x8F:  # EMPTY_SET
                    stack.append(set())
                    alloc -= _SET_COST
                    if alloc < 0:
                        raise self._alloc_error(budget)
                elif op == 0x90:  # ADDITEMS
                    k = marks.pop()
                    items = stack[k:]
                    del stack[k:]
                    target = stack[-1]
                    if isinstance(target, set):
                        collide = [x for x in items if _may_collide(x)]
                        if collide:
                            counts = self._counts_for(target, "set item", len(items))
                            for x in collide:
                                if counts is None:
                                    check_key(x, "set item")
                                else:
                                    counts.add(x)
                        target.update(items)
                    elif isinstance(target, (Stub, Global)):
                        # Real pickle calls ``target.add(item)`` for each: found on the instance, that is a
                        # function the pickle stored there.
                        self._fill(target, items, ("add",))
                    else:
                        raise InputError("corrupt pickle: ADDITEMS on something that is not a set")
                elif op == 0x91:  # FROZENSET
                    k = marks.pop()
                    items = stack[k:]
                    del stack[k:]
                    _check_items(items)
                    stack.append(frozenset(items))
                    alloc -= _SET_COST
                    if alloc < 0:
                        raise self._alloc_error(budget)
                elif op == 0x8A:  # LONG1
                    size = data[pos]
                    pos += 1
                    stack.append(int.from_bytes(self._bytes(pos, size), "little", signed=True))
                    pos += size
                elif op == 0x8B:  # LONG4
                    (size,) = unpack_from("<i", data, pos)
                    pos += 4
                    if size < 0 or size > lim.max_long_bytes:
                        raise LimitExceededError(f"pickle integer of {size} bytes exceeds the limit")
                    stack.append(int.from_bytes(self._bytes(pos, size), "little", signed=True))
                    pos += size
                elif op == 0x47:  # BINFLOAT
                    stack.append(unpack_from(">d", data, pos)[0])
                    pos += 8
                elif op == 0x43:  # SHORT_BINBYTES
                    size = data[pos]
                    pos += 1
                    stack.append(self._bytes(pos, size))
                    pos += size
                elif op == 0x42:  # BINBYTES
                    (size,) = unpack_from("<I", data, pos)
                    pos += 4
                    stack.append(self._bytes(pos, size))
                    pos += size
                elif op == 0x8E:  # BINBYTES8
                    (size,) = unpack_from("<Q", data, pos)
                    pos += 8
                    stack.append(self._bytes(pos, size))
                    pos += size
                elif op == 0x8D:  # BINUNICODE8
                    (size,) = unpack_from("<Q", data, pos)
                    pos += 8
                    stack.append(self._text(pos, size))
                    pos += size
                elif op == 0x96:  # BYTEARRAY8
                    (size,) = unpack_from("<Q", data, pos)
                    pos += 8
                    stack.append(bytearray(self._bytes(pos, size)))
                    pos += size
                elif op == 0x55:  # SHORT_BINSTRING
                    size = data[pos]
                    pos += 1
                    stack.append(self._bytes(pos, size).decode("latin1"))
                    pos += size
                elif op == 0x54:  # BINSTRING
                    (size,) = unpack_from("<i", data, pos)
                    pos += 4
                    if size < 0:
                        raise InputError("corrupt pickle: negative BINSTRING length")
                    stack.append(self._bytes(pos, size).decode("latin1"))
                    pos += size
                elif op == 0x50:  # PERSID (protocol 0)
                    pid, pos = self._line(pos)
                    stack.append(self._persistent(pid.decode("ascii")))
                elif op == 0x49:  # INT (protocol 0); also encodes True/False as 01/00
                    line, pos = self._line(pos)
                    if line == b"00":
                        stack.append(False)
                    elif line == b"01":
                        stack.append(True)
                    else:
                        stack.append(self._int_text(line))
                elif op == 0x4C:  # LONG (protocol 0)
                    line, pos = self._line(pos)
                    stack.append(self._int_text(line.rstrip(b"L")))
                elif op == 0x46:  # FLOAT (protocol 0)
                    line, pos = self._line(pos)
                    stack.append(float(line))
                elif op == 0x53:  # STRING (protocol 0): a quoted repr; keep the text between the quotes
                    line, pos = self._line(pos)
                    if len(line) < 2 or line[:1] != line[-1:] or line[:1] not in (b"'", b'"'):
                        raise InputError("corrupt pickle: badly quoted STRING")
                    stack.append(line[1:-1].decode("latin1"))
                elif op == 0x56:  # UNICODE (protocol 0)
                    line, pos = self._line(pos)
                    stack.append(line.decode("raw-unicode-escape"))
                elif op == 0x67:  # GET
                    line, pos = self._line(pos)
                    stack.append(memo[self._int_text(line)])
                elif op == 0x70:  # PUT
                    line, pos = self._line(pos)
                    memo[self._int_text(line)] = stack[-1]
                    if len(memo) > max_memo:
                        raise self._memo_error(max_memo)
                elif op == 0x69:  # INST
                    module, pos = self._line(pos)
                    name, pos = self._line(pos)
                    k = marks.pop()
                    args = tuple(stack[k:])
                    del stack[k:]
                    g = self._global(module.decode("utf-8"), name.decode("utf-8"))
                    stack.append(self._call(g, args, "inst"))
                elif op == 0x6F:  # OBJ
                    k = marks.pop()
                    items = stack[k:]
                    del stack[k:]
                    if not items:
                        raise InputError("corrupt pickle: OBJ without a class")
                    stack.append(self._call(items[0], tuple(items[1:]), "inst"))
                elif op in (0x82, 0x83, 0x84):  # EXT1, EXT2, EXT4
                    raise InputError("pickle uses copyreg extension codes, which statecli does not read")
                elif op in (0x97, 0x98):  # NEXT_BUFFER, READONLY_BUFFER
                    raise InputError("pickle uses out-of-band buffers, which statecli does not read")
                else:
                    raise InputError(f"corrupt pickle: unknown opcode 0x{op:02x} at byte {pos - 1}")
        except InputError:
            self.stopped_at = pos
            raise
        except (IndexError, KeyError, struct.error) as e:
            self.stopped_at = pos
            detail = "memo entry missing" if isinstance(e, KeyError) else "stack or data ran out"
            if pos >= n:
                raise InputError("corrupt pickle: data ends before STOP (truncated?)") from e
            raise InputError(f"corrupt pickle: {detail} near byte {pos}") from e
        except (TypeError, ValueError, UnicodeDecodeError, OverflowError) as e:
            self.stopped_at = pos
            raise InputError(f"corrupt pickle near byte {pos}: {e}") from e
        except RecursionError as e:  # here, not in each reader that calls this one
            self.stopped_at = pos
            raise InputError("corrupt pickle: structure nested too deeply") from e

    def _memo_error(self, max_memo: int) -> LimitExceededError:
        n = len(self.data) - self.start
        if max_memo < self.limits.max_memo:
            return LimitExceededError(
                f"pickle memo exceeds {max_memo} entries, more than a {n}-byte pickle may store (one per "
                f"{_MEMO_BYTES} bytes and {self.limits.alloc_floor // _MEMO_COST} more; torch's pickles store "
                "one per 7 bytes or more)"
            )
        return LimitExceededError(f"pickle memo exceeds {max_memo} entries")

    def _alloc_error(self, budget: int) -> LimitExceededError:
        n = len(self.data) - self.start
        return LimitExceededError(
            f"pickle builds more than {budget >> 20} MiB of sets, dicts and lists, more than a {n}-byte pickle may "
            f"({self.limits.alloc_per_byte} bytes per pickle byte and {self.limits.alloc_floor >> 20} MiB; "
            "torch's pickles need under 3 per byte)"
        )

    def _bytes(self, pos: int, size: int) -> bytes:
        if size > self.limits.max_str:
            raise LimitExceededError(f"pickle claims a {size}-byte string; the limit is {self.limits.max_str}")
        if pos + size > len(self.data):
            raise InputError(f"corrupt pickle: a {size}-byte string runs past the end of the data")
        return self.data[pos : pos + size]

    def _text(self, pos: int, size: int) -> str:
        return self._bytes(pos, size).decode("utf-8", "surrogatepass")

    def _line(self, pos: int) -> tuple[bytes, int]:
        end = self.data.find(b"\n", pos, pos + self.limits.max_line + 1)
        if end < 0:
            raise InputError("corrupt pickle: unterminated text line")
        return self.data[pos:end], end + 1

    def _int_text(self, line: bytes) -> int:
        if len(line) > 64:
            raise LimitExceededError("pickle integer text longer than 64 digits")
        return int(line)

    def _global(self, module: str, name: str) -> Global:
        for part in (module, name):
            if len(part) > MAX_GLOBAL_NAME:
                raise LimitExceededError(
                    f"pickle names a global with a name of {len(part)} characters; the limit is {MAX_GLOBAL_NAME}"
                )
        if self.proto < 3:
            # Overriding name lookup skips pickle's own protocol-2 mapping (__builtin__ -> builtins).
            mapped = _compat_pickle.NAME_MAPPING.get((module, name))
            if mapped is not None:
                module, name = mapped
            else:
                module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        self._count_global(module, name)
        return Global(module, name, None if self.tainted else HANDLERS.get((module, name)))

    def _count_global(self, module: str, name: str) -> None:
        key = (module, name)
        seen = self.globals_seen
        seen[key] = seen.get(key, 0) + 1
        if len(seen) > MAX_GLOBALS:
            raise LimitExceededError(f"pickle names more than {MAX_GLOBALS} different globals")

    def _computed_global(self, module: Any, name: Any) -> Global:
        """STACK_GLOBAL on operands that are not literal strings. Real pickle requires strings, but what
        the operands evaluate to at load time (``os.name`` is ``'posix'``, a call's result is anything) is
        unknowable here: such a global is recorded under :data:`COMPUTED` and reported as dangerous."""
        for v in (module, name):
            if type(v) is not str and not isinstance(v, (Global, Stub)):
                raise InputError("corrupt pickle: STACK_GLOBAL operands are not strings")
        what = f"module: {_operand(module)}; name: {_operand(name)}"
        self._count_global(COMPUTED, what)
        return Global(COMPUTED, what)

    def _persistent(self, pid: Any) -> Any:
        if self.persistent_load is None:
            raise InputError("pickle refers to external data (a persistent id) outside a torch archive")
        return self.persistent_load(pid)

    def _setitems(self, target: Any, items: list[Any]) -> None:
        if len(items) % 2:
            raise InputError("corrupt pickle: SETITEMS with an odd number of items")
        if type(target) is Global:
            # Real pickle stores into the global itself (``sys.modules[name] = obj``): see _fill.
            self._act("mutate", target, tuple(items[:2]))
            self.tainted = True
            return
        if isinstance(target, dict):
            d = target
        elif isinstance(target, Stub):
            if target.dictitems is None:
                target.dictitems = {}
                self._mark(target, "fills")
            d = target.dictitems
        else:
            raise InputError(f"corrupt pickle: SETITEM on a {type(target).__name__}")
        for i in range(0, len(items), 2):
            k = items[i]
            if type(k) is not str and _may_collide(k):
                counts = self._counts_for(d, "dict key", 1)
                if counts is None:
                    check_key(k, "dict key")
                else:
                    counts.add(k)
            d[k] = items[i + 1]

    def _counts_for(self, container: Any, what: str, adding: int) -> HashCounts | None:
        """The hash counts of one dict or set of this pickle's, by identity (containers stay alive), or None
        while it holds too few items to hold a flood: a counter for every small dict of float keys cost more
        than the dict. It is made, from the items already there, once ``adding`` would bring it to
        :data:`MAX_SAME_HASH` items. (Keys must still be proven cheap to hash: :func:`check_key`.)"""
        counts = self._hash_counts.get(id(container))
        if counts is None:
            if len(container) + adding < MAX_SAME_HASH:
                return None
            counts = self._hash_counts[id(container)] = HashCounts(what)
            for x in container:
                if _may_collide(x):
                    counts.add(x)
        return counts

    def _extend(self, target: Any, items: list[Any]) -> None:
        if isinstance(target, list):
            target.extend(items)
        elif isinstance(target, (Stub, Global)):
            self._fill(target, items, ("extend", "append"))
        else:
            raise InputError(f"corrupt pickle: APPEND on a {type(target).__name__}")
