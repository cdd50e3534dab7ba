"""What a pickle names from a byte on, without building anything: where the restricted reader gave up
(a limit, a value it refuses to model), what real pickle would go on to import and call."""

from __future__ import annotations

import _compat_pickle
from typing import Any

from statecli.pickled import COMPUTED
from statecli.safepickle.bounds import MAX_GLOBAL_NAME


def _scan_table() -> dict[int, tuple[int, int, bool, int, bool]]:
    """Per opcode byte: (argument size or pickletools' negative code, items popped below a mark (or in all),
    whether it pops to a mark, items pushed, whether it pushes a mark)."""
    import pickletools

    table = {}
    for op in pickletools.opcodes:
        before, after = op.stack_before, op.stack_after
        marked = pickletools.markobject in before
        below = before.index(pickletools.markobject) if marked else len(before)
        size = op.arg.n if op.arg is not None else 0
        table[op.code.encode("latin-1")[0]] = (size, below, marked, len(after), pickletools.markobject in after)
    return table


_SCAN: dict[int, tuple[int, int, bool, int, bool]] = {}


def opcode_table() -> dict[int, tuple[int, int, bool, int, bool]]:
    """Per opcode byte: (argument size or pickletools' negative code, items popped below a mark (or in all),
    whether it pops to a mark, items pushed, whether it pushes a mark). Built once, on first use."""
    if not _SCAN:
        _SCAN.update(_scan_table())
    return _SCAN


_MARK = object()
_LONG = object()  # a string longer than any global's name
# Opcodes after which a value the pickle holds may be called (directly, or by pickle looking a method up):
# REDUCE, BUILD, NEWOBJ, NEWOBJ_EX, INST, OBJ, APPEND(S), SETITEM(S), ADDITEMS.
_CALLING = frozenset(b"Rb\x81\x92ioaesu\x90")
# SHORT_BINUNICODE, BINUNICODE, BINUNICODE8, SHORT_BINSTRING, BINSTRING: length-prefixed strings.
_STRINGS = frozenset(b"\x8cX\x8dUT")
LENGTH_WIDTH = {-2: 1, -3: 4, -4: 4, -5: 8}


def names_after(data: Any, start: int, stop: int) -> tuple[dict[tuple[str, str], int], bool]:
    """The globals the pickle at ``data[start:]`` names from byte ``stop`` on, and whether an opcode there
    can call anything: what real pickle would go on to do where the restricted reader gave up (a limit, a
    value it refuses to model). The opcodes are walked by their argument sizes (pickletools' table) without
    building any value; where the pickle can hold a STACK_GLOBAL, a stack of the strings it would take is
    kept. The walk ends at STOP or at the first byte that is no pickle. A STACK_GLOBAL whose operands are
    not literal strings names :data:`COMPUTED`."""
    table = opcode_table()
    n = len(data)
    names: dict[tuple[str, str], int] = {}
    calls = False
    track = data.find(b"\x93", start) >= 0  # no STACK_GLOBAL byte anywhere: no strings to follow
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    proto = 0
    pos = start
    try:
        while pos < n:
            code = data[pos]
            info = table.get(code)
            if info is None:
                break
            size, below, marked, pushed, mark_after = info
            at = pos
            pos += 1
            text: Any = None
            if code == 0x63 or code == 0x69:  # GLOBAL, INST: two lines
                end1 = data.find(b"\n", pos)
                end2 = data.find(b"\n", end1 + 1) if end1 >= 0 else -1
                if end2 < 0:
                    break
                if at >= stop:
                    module = data[pos:end1].decode("utf-8", "replace")
                    attr = data[end1 + 1 : end2].decode("utf-8", "replace")
                    if proto < 3:
                        mapped = _compat_pickle.NAME_MAPPING.get((module, attr))
                        module, attr = mapped if mapped else (_compat_pickle.IMPORT_MAPPING.get(module, module), attr)
                    names[(module, attr)] = names.get((module, attr), 0) + 1
                pos = end2 + 1
            elif size > 0:
                if code == 0x80:  # PROTO
                    proto = data[pos]
                elif track and code in (0x68, 0x6A, 0x71, 0x72):  # BINGET, LONG_BINGET, BINPUT, LONG_BINPUT
                    text = int.from_bytes(data[pos : pos + size], "little")
                pos += size
            elif size == -1:  # up to a newline: protocol 0's strings, numbers, memo indices, persistent ids
                end = data.find(b"\n", pos)
                if end < 0:
                    break
                if track and code in (0x56, 0x53, 0x67, 0x70):  # UNICODE, STRING, GET, PUT
                    arg = data[pos:end]
                    if code in (0x56, 0x53):
                        text = arg.decode("utf-8", "replace").strip("'\"") if len(arg) <= MAX_GLOBAL_NAME else _LONG
                    else:
                        text = int(arg)
                pos = end + 1
            elif size < 0:  # a length, then that many bytes
                width = LENGTH_WIDTH[size]
                length = int.from_bytes(data[pos : pos + width], "little", signed=size == -3)
                if length < 0:
                    break
                if track and code in _STRINGS:
                    text = _LONG
                    if length <= MAX_GLOBAL_NAME:
                        text = data[pos + width : pos + width + length].decode("utf-8", "replace")
                pos += width + length
            if pos > n:
                break
            if code in _CALLING and at >= stop:
                calls = True
            if code == 0x2E:  # STOP
                break
            if not track:
                continue
            if code == 0x93 and at >= stop:  # STACK_GLOBAL
                attr, module = (stack[-1] if stack else None), (stack[-2] if len(stack) > 1 else None)
                if module is not _LONG and attr is not _LONG:  # no module or attribute has such a name
                    key = (module, attr) if type(module) is str and type(attr) is str else (COMPUTED, "<unknown>")
                    names[key] = names.get(key, 0) + 1
            # The stack, as far as the strings STACK_GLOBAL takes go.
            if code in (0x94, 0x70, 0x71, 0x72):  # MEMOIZE, PUT, BINPUT, LONG_BINPUT
                memo[len(memo) if code == 0x94 else text] = stack[-1] if stack else None
            elif code == 0x32:  # DUP
                stack.append(stack[-1] if stack else None)
            elif code == 0x30 and stack and stack[-1] is _MARK:  # POP of a mark
                stack.pop()
            else:
                if marked:
                    while stack and stack.pop() is not _MARK:
                        pass
                if below:
                    del stack[max(0, len(stack) - below) :]
                if code in _STRINGS or code == 0x56 or code == 0x53:
                    stack.append(text)
                elif code in (0x67, 0x68, 0x6A):  # GET, BINGET, LONG_BINGET
                    stack.append(memo.get(text))
                elif mark_after:
                    stack.append(_MARK)
                elif pushed:
                    stack.extend([None] * pushed)
    except (ValueError, IndexError, KeyError):
        pass  # the first byte that is no pickle ends the walk
    return names, calls
