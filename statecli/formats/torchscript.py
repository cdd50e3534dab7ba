"""TorchScript archives (``torch.jit.save``), read without running TorchScript and without torch.

What torch 2.13 writes (``torch/csrc/jit/serialization/export_module.cpp``), under a top folder named
after the file's stem:

- ``data.pkl``: the module object, pickled by TorchScript's own pickler (protocol 2). Every module or
  TorchScript class is ``GLOBAL '__torch__.<qualified module> <Class>'``, ``NEWOBJ``, then ``BUILD`` with a
  dict of all its attributes: parameters, buffers, submodules, ``training`` and plain attributes side by
  side. Tensors are ``torch._utils._rebuild_tensor_v2`` over storages ``data/<key>``, exactly as in a
  ``torch.save`` archive, with ``requires_grad`` as the tensor had it. Typed lists and dicts are wrapped
  in ``torch.jit._pickle`` tags (``build_intlist``, ``restore_type_tag``, ...).
- ``code/__torch__/<module path>.py``: the generated TorchScript source. Each module class declares
  ``__parameters__ = ["weight", "bias", ]`` and ``__buffers__ = [...]``: the only place that tells a
  parameter from a buffer from a plain tensor attribute. Read here as text, line by line, never run.
- ``constants.pkl``: a tuple of tensor constants the code names ``CONSTANTS.c<i>`` (``torch.jit.freeze``
  moves a module's weights there), over storages ``constants/<key>``.
- ``traced_inputs.pkl`` (traced modules): example inputs, shapes only (their storages hold no bytes).

Every pickle goes through :func:`statecli.security.loads`; storages are validated against the
archive's members by :class:`statecli.formats.torchpickle.Storages`. TorchScript does not record whether
a buffer was registered ``persistent=False``: ``torch.jit.load`` gives every buffer back in
``state_dict()``, so every buffer is reported persistent (and a finding says so).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from statecli.dtypes import DTYPES, STORAGE_TYPES
from statecli.errors import InputError, LimitExceededError, StatecliError, UnsafeError, UnsupportedFormatError
from statecli.formats.torchpickle import MAX_PICKLE_BYTES, Storages, Visits, finish, join_key, raw_tensor
from statecli.formats.torchzip import archive_root
from statecli.formats.zipdir import Member, read_member
from statecli.records import Container, Finding, RawCheckpoint, RawTensor
from statecli.safepickle import COMPUTED, Action, Global, StorageRef, Stub, TensorRef, describe
from statecli.security import findings_for, loads
from statecli.wording import name_list

EVIDENCE = "torchscript"
CUSTOM_CLASS_PREFIX = "__torch__.torch.classes."  # C++ classes registered with torch (packed params, ...)
MAX_CODE_FILE_BYTES = 64 << 20  # one generated source file; real ones are kilobytes
MAX_CODE_TOTAL_BYTES = 512 << 20  # all source files read for one archive
# TorchScript's own type tags for lists and dicts (torch/jit/_pickle.py): the value is their first argument.
JIT_PICKLE_TAGS = frozenset(
    {
        "build_intlist",
        "build_tensorlist",
        "build_doublelist",
        "build_boollist",
        "build_tensor_from_id",
        "restore_type_tag",
    }
)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The line tests below are string scans, not regexes: a regex such as ``class (\w+)\s*(\(...\))?\s*:``
# backtracks over every split of a run of blanks between its two ``\s*`` (quadratic: a 20,000-blank line
# took a second), and the code/ text is the file's.
_LISTS = ("__parameters__", "__buffers__")
_ESCAPES = {"n": 10, "t": 9, "r": 13, "a": 7, "b": 8, "f": 12, "v": 11, "\\": 92, '"': 34, "'": 39, "0": 0}


@dataclass(frozen=True, slots=True)
class ClassDecl:
    """What a TorchScript class declares about its attributes. ``None`` lists: not a module class."""

    qualname: str
    parameters: frozenset[str] | None
    buffers: frozenset[str] | None
    setstate: bool = False  # defines __setstate__: TorchScript code torch.jit.load runs while loading

    @property
    def is_module(self) -> bool:
        return self.parameters is not None


def read_torchscript(path: str, members: Mapping[str, Member]) -> RawCheckpoint:
    """Read a ``torch.jit.save`` archive's tensors and their exact roles without running anything."""
    names = list(members)
    if not any(n.endswith("/data.pkl") and n.count("/") == 1 for n in names):
        if any(n.endswith("/model.json") or n.endswith("/attributes.pkl") for n in names):
            raise UnsupportedFormatError(
                "a TorchScript archive in the pre-1.4 layout (model.json + attributes.pkl): not read", path=path
            )
        raise InputError("TorchScript archive without a data.pkl", path=path)
    root = archive_root(names, path)
    reader = _Reader(path, members, root)
    try:
        return reader.read()
    except StatecliError as e:
        raise e.at(path) from None


# ------------------------------------------------------------------------------------------ type declarations


class _Declarations:
    """Class declarations from ``code/``, parsed on first use, one source file at a time."""

    def __init__(self, path: str, members: Mapping[str, Member], root: str) -> None:
        self.path = path
        self.members = members
        self.root = root
        self.files: dict[str, dict[str, ClassDecl]] = {}
        self.read_bytes = 0

    def lookup(self, g: Global) -> ClassDecl | None:
        module = g.module
        if module != "__torch__" and not module.startswith("__torch__."):
            return None
        decls = self.files.get(module)
        if decls is None:
            decls = self.files[module] = self._parse_module(module)
        return decls.get(g.name)

    def _parse_module(self, module: str) -> dict[str, ClassDecl]:
        parts = module.split(".")
        if not all(_IDENT.match(p) for p in parts):
            return {}
        member = self.members.get(f"{self.root}/code/{'/'.join(parts)}.py")
        if member is None:
            return {}
        self.read_bytes += member.size
        if self.read_bytes > MAX_CODE_TOTAL_BYTES:
            raise LimitExceededError(
                f"TorchScript code/ holds more than {MAX_CODE_TOTAL_BYTES} bytes of source", path=self.path
            )
        text = read_member(self.path, member, MAX_CODE_FILE_BYTES).decode("utf-8", "replace")
        try:
            return parse_declarations(text, module)
        except ValueError as e:
            raise InputError(f"code/{'/'.join(parts)}.py: {e}", path=self.path) from None


def parse_declarations(text: str, module: str) -> dict[str, ClassDecl]:
    """Each class in one generated TorchScript source file with its ``__parameters__`` / ``__buffers__``.

    A bounded line scanner, not a Python parser: class headers at column 0, the two declarations on
    indented lines of the class's attribute header (TorchScript prints them first, before any method;
    lines inside methods are never read as declarations). Nothing is evaluated.
    """
    out: dict[str, ClassDecl] = {}
    current: str | None = None
    header = False  # still in the class's attribute lines, before its first method
    setstate = False
    lists: dict[str, list[str]] = {}

    def close() -> None:
        if current is not None:
            if current in out:
                raise ValueError(f"class {current} is declared twice")
            params = lists.get("__parameters__")
            buffers = lists.get("__buffers__")
            is_module = params is not None or buffers is not None
            out[current] = ClassDecl(
                f"{module}.{current}",
                frozenset(params or ()) if is_module else None,
                frozenset(buffers or ()) if is_module else None,
                setstate,
            )

    for line in text.splitlines():
        if not line or line[0] in " \t":
            if current is not None and line.startswith("  def __setstate__("):
                setstate = True
            body = line.lstrip()
            indented = len(body) < len(line)
            if header and indented and (body[:1] == "@" or (body[:3] == "def" and body[3:4].isspace())):
                header = False
            elif header and indented:
                decl = _declaration(body)
                if decl is not None:
                    name, rest = decl
                    if name in lists:
                        raise ValueError(f"class {current} declares {name} twice")
                    lists[name] = _string_list(line, len(line) - len(rest), current)
            continue
        close()
        lists = {}
        current = _class_name(line)
        if current is not None:
            header = True
            setstate = False
    close()
    return out


def _class_name(line: str) -> str | None:
    """``A`` for a header ``class A:`` or ``class A(Base, ...):`` (blanks allowed around the parts)."""
    if not line.startswith("class "):
        return None
    m = _NAME.match(line, 6)
    if m is None:
        return None
    rest = line[m.end() :].lstrip()
    if rest[:1] == "(":
        end = rest.find(")")
        if end < 0:
            return None
        rest = rest[end + 1 :].lstrip()
    return m.group() if rest[:1] == ":" else None


def _declaration(body: str) -> tuple[str, str] | None:
    """(``__parameters__`` or ``__buffers__``, the text after its ``= [``) for a line (blanks stripped
    from its start) that declares one."""
    for name in _LISTS:
        if body.startswith(name):
            rest = body[len(name) :].lstrip()
            if rest[:1] == "=":
                rest = rest[1:].lstrip()
                if rest[:1] == "[":
                    return name, rest[1:]
    return None


def _string_list(line: str, pos: int, cls: str) -> list[str]:
    """The strings of ``"a", "b", ]`` starting at ``pos`` (just after the ``[``); linear time."""
    items: list[str] = []
    n = len(line)
    while True:
        while pos < n and line[pos] in " \t":
            pos += 1
        if pos < n and line[pos] == "]":
            return items
        if pos >= n or line[pos] != '"':
            raise ValueError(f"class {cls}: unreadable attribute list {line.strip()[:80]!r}")
        pos += 1
        start = pos
        while pos < n and line[pos] != '"':
            pos += 2 if line[pos] == "\\" else 1
        if pos >= n:
            raise ValueError(f"class {cls}: unterminated string in {line.strip()[:80]!r}")
        items.append(_unescape(line[start:pos]))
        pos += 1
        while pos < n and line[pos] in " \t":
            pos += 1
        if pos < n and line[pos] == ",":
            pos += 1
        elif pos < n and line[pos] == "]":
            return items
        else:
            raise ValueError(f"class {cls}: unreadable attribute list {line.strip()[:80]!r}")


def _unescape(s: str) -> str:
    """A TorchScript string literal's body: C-style escapes (octal, ``\\x``) over UTF-8 bytes."""
    if "\\" not in s:
        return s
    out = bytearray()
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c != "\\" or i + 1 >= n:
            out += c.encode("utf-8")
            i += 1
            continue
        e = s[i + 1]
        if e in "01234567":
            j = i + 1
            while j < n and j < i + 4 and s[j] in "01234567":
                j += 1
            out.append(int(s[i + 1 : j], 8) & 0xFF)
            i = j
        elif e == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", s[i + 2 : i + 4]):
            out.append(int(s[i + 2 : i + 4], 16))
            i += 4
        else:
            out.append(_ESCAPES.get(e, ord(e) if ord(e) < 128 else 63))
            i += 2
    return out.decode("utf-8", "replace")


# ----------------------------------------------------------------------------------------------- the reader


class _Folder:
    """``members`` as ``Storages`` sees them, with ``<root>/data/<key>`` answered from ``<root>/<folder>/<key>``."""

    def __init__(self, members: Mapping[str, Member], root: str, folder: str) -> None:
        self.members = members
        self.prefix = f"{root}/data/"
        self.target = f"{root}/{folder}/"

    def get(self, name: str) -> Member | None:
        if not name.startswith(self.prefix):
            return None
        return self.members.get(self.target + name[len(self.prefix) :])


def _shapes_only(pid: Any) -> StorageRef:
    """Storages for ``traced_inputs.pkl``: torch keeps the inputs' shapes there, not their bytes, so the
    records are checked for form only and nothing is compared with the (empty) members."""
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
        raise InputError(f"corrupt pickle: unexpected persistent id {describe(pid)}")
    _, stype, key, location, numel = pid
    if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int or not 0 <= numel <= 2**62:
        raise InputError("corrupt pickle: malformed storage record")
    dtype = STORAGE_TYPES.get(stype.name, "uint8") if isinstance(stype, Global) else "uint8"
    return StorageRef(key, dtype, location[:64], numel, numel * DTYPES[dtype].itemsize)


class _Reader(Visits):
    noun = "module"

    def __init__(self, path: str, members: Mapping[str, Member], root: str) -> None:
        self.path = path
        self.members = members
        self.root = root
        self.decls = _Declarations(path, members, root)
        self.tensors: list[RawTensor] = []
        self.findings: list[Finding] = []
        self.storage_sizes: dict[str, int] = {}
        self.globals_seen: dict[tuple[str, str], int] = {}
        self.actions: list[Action] = []
        self.seen: dict[int, str | None] = {}
        self.nodes = 0
        self.missing_decls: set[str] = set()
        self.training: dict[str | None, bool] = {}  # module path (None: the root) -> training flag
        self.buffers = 0
        self.shared = 0  # references to objects walked already

    def read(self) -> RawCheckpoint:
        obj = self._pickle("data.pkl", "data")
        if not (isinstance(obj, Stub) and isinstance(obj.callee, Global) and self._is_ts_class(obj.callee)):
            what = obj.class_name if isinstance(obj, Stub) else type(obj).__name__
            self._refuse(f"data.pkl does not hold a TorchScript module (found {what})")
        elif self.decls.lookup(obj.callee) is None:
            self._refuse(f"data.pkl holds {obj.class_name}, which no file in code/ declares: not a TorchScript module")
        self._object(obj, None, 0)  # None: the root, whose attributes are named as they are
        other: list[str] = []
        if f"{self.root}/constants.pkl" in self.members:
            constants = self._pickle("constants.pkl", "constants")
            if isinstance(constants, (tuple, list)):
                if constants:
                    other.append("CONSTANTS")
                for i, c in enumerate(constants):
                    self._generic(c, f"CONSTANTS.c{i}", "constants", 1)
            elif constants is not None:
                raise InputError("constants.pkl does not hold a tuple of constants", path=self.path)
        if f"{self.root}/traced_inputs.pkl" in self.members:
            self._pickle("traced_inputs.pkl", None)  # for its findings; it holds shapes, not state
            other.append("traced_inputs")
        self.shared_summary()
        findings = self._security_findings() + self.findings
        findings.extend(self._notes())
        raw = RawCheckpoint(
            path=self.path,
            format="torchscript",
            tensors=self.tensors,
            container=Container("module", "", tuple(other), obj.class_name, self.training.get(None)),
            findings=findings,
            file_size=os.path.getsize(self.path),
            storage_sizes=self.storage_sizes,
        )
        return finish(raw, obj)

    def _refuse(self, message: str) -> None:
        """Raise for a data.pkl that is not a module, naming what its pickle would run, if anything."""
        dangerous = [f.message for f in findings_for(self.globals_seen, self.actions) if f.level == "dangerous"]
        if dangerous:
            raise UnsafeError(f"{message}; " + "; ".join(dangerous[:3]), path=self.path)
        raise InputError(message, path=self.path)

    # -- pickles

    def _pickle(self, name: str, folder: str | None) -> Any:
        data = read_member(self.path, self.members[f"{self.root}/{name}"], MAX_PICKLE_BYTES)
        if folder == "data":
            storages: Any = Storages(self.members, self.root, self.path, exact=False)
        elif folder is not None:
            folder_members = _Folder(self.members, self.root, folder)
            storages = Storages(folder_members, self.root, self.path, exact=False)  # type: ignore[arg-type]
        else:
            storages = _shapes_only
        try:
            obj, unpickler = loads(data, storages)
        except StatecliError as e:
            message = e.message
            if folder not in (None, "data"):
                # Storages names the data/ folder; this pickle's storages live in its own.
                message = message.replace("data/", f"{folder}/")
            raise type(e)(f"{name}: {message}", path=self.path) from e
        for key, count in unpickler.globals_seen.items():
            self.globals_seen[key] = self.globals_seen.get(key, 0) + count
        self.actions.extend(unpickler.actions.values())
        if unpickler.end < len(data):
            self.findings.append(
                Finding(
                    "warning",
                    "trailing-pickle-data",
                    f"{name} has {len(data) - unpickler.end} bytes after the pickle's end; they were ignored",
                )
            )
        if folder is not None:
            for k, s in storages.cache.items():
                self.storage_sizes[f"{folder}/{k}"] = s.nbytes
        return obj

    @staticmethod
    def _is_ts_class(g: Global) -> bool:
        return g.module == "__torch__" or g.module.startswith("__torch__.")

    def _security_findings(self) -> list[Finding]:
        """findings_for over every global, less the names TorchScript itself writes: its class types
        (declared in code/, resolved by torch.jit.load from there, never imported) and its list/dict tags."""
        declared: list[str] = []
        setstate: list[str] = []
        custom: list[str] = []
        kept: dict[tuple[str, str], int] = {}
        for (module, name), count in self.globals_seen.items():
            g = Global(module, name)
            if self._is_ts_class(g):
                if module.startswith(CUSTOM_CLASS_PREFIX) and "." not in name:
                    custom.append(g.qualname)
                    continue
                decl = self.decls.lookup(g) if _IDENT.match(name) else None
                if decl is not None:
                    declared.append(g.qualname)
                    if decl.setstate:
                        setstate.append(g.qualname)
                    continue
            if module == "torch.jit._pickle" and name in JIT_PICKLE_TAGS:
                continue
            kept[(module, name)] = count
        actions = [
            a
            for a in self.actions
            # Patches and dangerous state are never TorchScript's own: only its calls and types are left out.
            if a.kind in ("patch", "build", "call-on-value")
            or (a.target.module, a.target.name) in kept
            or a.target.module == COMPUTED
        ]
        out = findings_for(kept, actions)
        if declared:
            out.append(
                Finding(
                    "info",
                    "torchscript-types",
                    f"data.pkl names {len(declared)} TorchScript class type(s), all declared in code/; "
                    "their declarations were read as text, never compiled or run",
                )
            )
        for q in sorted(setstate):
            out.append(
                Finding(
                    "warning",
                    "torchscript-setstate",
                    f"TorchScript class {q} defines __setstate__: torch.jit.load runs that TorchScript code "
                    "while loading; statecli did not",
                )
            )
        for q in sorted(custom):
            out.append(
                Finding(
                    "info",
                    "torchscript-custom-class",
                    f"pickle names the TorchScript custom class {q} (C++, registered with torch); "
                    "read as an inert stub",
                )
            )
        order = {"dangerous": 0, "warning": 1, "info": 2}
        out.sort(key=lambda f: order.get(f.level, 3))
        return out

    def _notes(self) -> list[Finding]:
        out = []
        for cls in sorted(self.missing_decls):
            out.append(
                Finding(
                    "warning",
                    "torchscript-undeclared",
                    f"no declaration of {cls} in code/: the roles of its tensors are inferred",
                )
            )
        if self.buffers:
            out.append(
                Finding(
                    "info",
                    "torchscript-persistence",
                    "TorchScript does not record persistent=False: torch.jit.load puts every buffer in "
                    "state_dict(), so all are reported persistent",
                )
            )
        root = self.training.get(None)
        if root is not None:
            odd = [n for n, t in self.training.items() if n is not None and t is not root]
            if odd:
                shown = name_list(odd, 5)
                mode = "train" if not root else "eval"
                out.append(Finding("info", "training-mixed", f"submodules in {mode} mode: {shown}"))
        return out

    # -- walking

    def _object(self, stub: Stub, prefix: str | None, depth: int) -> None:
        """A TorchScript object (module or class instance): its BUILD state holds its attributes."""
        if not self._enter(stub, prefix, depth):
            return
        decl = self.decls.lookup(stub.callee) if isinstance(stub.callee, Global) else None
        state = stub.state
        if not isinstance(state, dict):
            # A class with __getstate__ (custom C++ classes, packed params): whatever it returned.
            self._generic(state, prefix, "model", depth + 1)
            return
        if decl is None and not stub.class_name.startswith(CUSTOM_CLASS_PREFIX):
            self.missing_decls.add(stub.class_name)
        elif decl.is_module:
            training = state.get("training")
            if isinstance(training, bool):
                self.training[prefix] = training
        params = decl.parameters if decl is not None and decl.parameters is not None else frozenset()
        buffers = decl.buffers if decl is not None and decl.buffers is not None else frozenset()
        for key, value in state.items():
            name = join_key(prefix, key)
            if isinstance(value, TensorRef):
                if decl is None:
                    self._emit(name, value, "model", None)
                elif key in params:
                    self._emit(name, value, "model", "parameter")
                elif key in buffers:
                    self._emit(name, value, "model", "buffer")
                else:
                    self._emit(name, value, "model", "other")  # a plain tensor attribute
            else:
                self._generic(value, name, "model", depth + 1)

    def _generic(self, obj: Any, prefix: str | None, group: str, depth: int) -> None:
        if isinstance(obj, TensorRef):
            # Not declared a parameter or buffer: an attribute or constant. A None prefix: the root object's
            # __getstate__ returned a bare tensor, named as a bare tensor torch.save'd is.
            self._emit("tensor" if prefix is None else prefix, obj, group, "other")
            return
        if isinstance(obj, Stub):
            callee = obj.callee
            if isinstance(callee, Global):
                if callee.module == "torch.jit._pickle" and callee.name in JIT_PICKLE_TAGS:
                    args = obj.args
                    if isinstance(args, tuple) and args:
                        self._generic(args[0], prefix, group, depth)
                    return
                if self._is_ts_class(callee):
                    self._object(obj, prefix, depth)
                    return
            if self._enter(obj, prefix, depth):
                for part in (obj.args, obj.state, obj.items, obj.dictitems):
                    if part is not None:
                        self._generic(part, prefix, group, depth + 1)
            return
        if isinstance(obj, dict):
            if self._enter(obj, prefix, depth):
                for k, v in obj.items():
                    self._generic(v, join_key(prefix, k), group, depth + 1)
        elif isinstance(obj, (list, tuple)) and self._enter(obj, prefix, depth):
            for i, v in enumerate(obj):
                self._generic(v, join_key(prefix, i), group, depth + 1)

    def _emit(self, name: str, t: TensorRef, group: str, role: str | None) -> None:
        raw = raw_tensor(t, name, group, "constants" if group == "constants" else "data")
        if role is not None:
            raw.role = role
            raw.exact = True
            raw.evidence = EVIDENCE
            if role == "buffer":
                self.buffers += 1
            raw.persistent = True if role in ("parameter", "buffer") else None
        self.tensors.append(raw)


__all__ = ["ClassDecl", "parse_declarations", "read_torchscript"]
