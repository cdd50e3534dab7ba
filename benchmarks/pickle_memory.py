#!/usr/bin/env python3
"""Peak memory per pickle byte of statecli reading a pickle, for every opcode pattern a hostile file can repeat.

    python benchmarks/pickle_memory.py --size 4MB --jobs 2      # every pattern, 4 MB pickles (the default)
    python benchmarks/pickle_memory.py --size 1MB --only empty_set,tensor_dup --modes loads,json
    python benchmarks/pickle_memory.py --modes tree,check       # the other commands that read the whole file
    python benchmarks/pickle_memory.py --root ../other-checkout # another revision's statecli
    python benchmarks/pickle_memory.py --list                   # the patterns and what each repeats

Each pattern is a short run of opcodes (``EMPTY_SET``, ``MARK DICT``, ``MEMOIZE``, a GET of a tensor...)
repeated until the pickle is ``--size`` bytes, inside a torch.save-like zip: ``{"weight": <a tensor>,
"payload": <the pattern's value>}``. Each mode is measured in a fresh child process:

- ``loads``: :func:`statecli.security.loads` of the zip's ``data.pkl`` bytes (with the zip's storage
  records, as ``inspect`` builds them);
- ``json``, ``table``, ``tree``, ``check``: the whole ``statecli inspect PATH --format json``, ``statecli
  inspect PATH``, ``statecli tree PATH``, ``statecli check PATH``, run in the child through the CLI's own
  entry (stdout to ``/dev/null``): the zip, the pickle, the walk that names tensors, roles, the report and
  its output.

For each: the peak of ``tracemalloc`` (Python's allocations only; skipped where the plain run took over
``--traced-within`` seconds) and the growth of the peak RSS over the RSS just before the call (the
kernel's high-water mark, reset through ``/proc/self/clear_refs``), both divided by the pickle's size:
**bytes per pickle byte**. A child runs under an address-space cap (``--cap``) and a timeout: a pattern
that exhausts either shows ``MemoryError`` or ``timeout``. A pattern that statecli refuses shows its exit
code and message; refusing early is the point.

Rows named ``real_*`` are checkpoints torch itself writes (a state dict of small tensors, a pickled
``nn.Module``, a training dict with an optimizer's state), saved with ``torch.save``.

Linux (``/proc``); standard library and statecli (torch for the ``real_*`` rows); the numbers are for the
Python that runs it. Results are recorded in benchmarks/RESULTS.md; benchmarks/README.md says more.
"""

from __future__ import annotations

import argparse
import json
import os
import pickletools
import resource
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OPS = {op.name: op.code.encode("latin1") for op in pickletools.opcodes}
DATE = (1980, 1, 1, 0, 0, 0)


def op(name: str, arg: bytes = b"") -> bytes:
    return OPS[name] + arg


def s(text: str) -> bytes:
    """A string: SHORT_BINUNICODE or BINUNICODE."""
    b = text.encode("utf-8", "surrogatepass")
    if len(b) < 256:
        return op("SHORT_BINUNICODE", bytes([len(b)]) + b)
    return op("BINUNICODE", struct.pack("<I", len(b)) + b)


def glob(module: str, name: str) -> bytes:
    return op("GLOBAL", f"{module}\n{name}\n".encode())


def put(i: int) -> bytes:
    return op("LONG_BINPUT", struct.pack("<I", i))


def get(i: int) -> bytes:
    return op("LONG_BINGET", struct.pack("<I", i))


def tensor(key: str = "0", numel: int = 4) -> bytes:
    """``_rebuild_tensor_v2`` over storage ``key`` (float32, ``numel`` elements), as torch writes it unmemoized."""
    pid = op("MARK") + s("storage") + glob("torch", "FloatStorage") + s(key) + s("cpu") + op("BININT1", bytes([numel]))
    return (
        glob("torch._utils", "_rebuild_tensor_v2")
        + op("MARK")
        + pid
        + op("TUPLE")
        + op("BINPERSID")
        + op("BININT1", b"\x00")
        + op("BININT1", bytes([numel]))
        + op("TUPLE1")
        + op("BININT1", b"\x01")
        + op("TUPLE1")
        + op("NEWFALSE")
        + glob("collections", "OrderedDict")
        + op("EMPTY_TUPLE")
        + op("REDUCE")
        + op("TUPLE")
        + op("REDUCE")
    )


class Pattern:
    """``prelude`` once, then ``unit(i)`` for i = 0, 1, ... until the size is reached, then ``close``: the
    bytes push exactly one value, the pattern's, under the key ``payload``."""

    def __init__(
        self,
        name: str,
        what: str,
        unit: Callable[[int], bytes],
        prelude: bytes = op("MARK"),
        close: bytes = op("LIST"),
        proto: int = 4,
    ) -> None:
        self.name, self.what, self.unit, self.prelude, self.close, self.proto = name, what, unit, prelude, close, proto

    def pickle(self, size: int) -> bytes:
        head = op("PROTO", bytes([self.proto])) + op("EMPTY_DICT") + op("MARK") + s("weight") + tensor()
        head += s("payload") + self.prelude
        tail = self.close + op("SETITEMS") + op("STOP")
        parts = [head]
        n = len(head) + len(tail)
        i = 0
        while n < size:
            u = self.unit(i)
            parts.append(u)
            n += len(u)
            i += 1
        parts.append(tail)
        return b"".join(parts)


def ops(*parts: str | bytes) -> bytes:
    """Opcodes by name (``"MARK"``, ``"EMPTY_TUPLE"``), or bytes kept as they are: ``ops("MARK", s("x"), "LIST")``."""
    return b"".join(p if isinstance(p, bytes) else OPS[p] for p in parts)


def each(*parts: str | bytes) -> Callable[[int], bytes]:
    """The same unit every time."""
    b = ops(*parts)
    return lambda i: b


def _u16(i: int) -> bytes:
    return op("BININT2", struct.pack("<H", i & 0xFFFF))


def binint(i: int) -> bytes:
    return op("BININT", struct.pack("<i", i))


GET0, GET1 = op("BINGET", b"\x00"), op("BINGET", b"\x01")
PUT0, PUT1 = op("BINPUT", b"\x00"), op("BINPUT", b"\x01")
# Memo slots the patterns' preludes use (the wrapper itself memoizes nothing).
T, G, A, K = 900_000_001, 900_000_002, 900_000_003, 900_000_004
UNKNOWN0 = ops(glob("mod", "Cls"), PUT0, "POP", "MARK")  # slot 0: a global outside the allowlist
TENSOR_MEMO = ops(tensor(), put(T), "POP")  # slot T: a tensor
# Slot G: _rebuild_tensor_v2; slot A: a whole argument tuple of it, so that each REDUCE makes a new tensor
# record from 11 bytes.
PID = ops("MARK", s("storage"), glob("torch", "FloatStorage"), s("0"), s("cpu"), "BININT1", b"\x04", "TUPLE")
TENSOR_ARGS = ops(glob("torch._utils", "_rebuild_tensor_v2"), put(G), "POP", "MARK", PID, "BINPERSID", "BININT1")
TENSOR_ARGS += ops(b"\x00", "BININT1", b"\x04", "TUPLE1", "BININT1", b"\x01", "TUPLE1", "NEWFALSE", "EMPTY_DICT")
TENSOR_ARGS += ops("TUPLE", put(A), "POP")
LONG_KEY = ops(s("k" * 60_000), put(K), "POP")  # slot K: a 60,000-character key

P = Pattern
PATTERNS: list[Pattern] = [
    # -- containers from one or two bytes
    P("empty_set", "EMPTY_SET", each("EMPTY_SET")),
    P("empty_set_memoize", "EMPTY_SET MEMOIZE", each("EMPTY_SET", "MEMOIZE")),
    P("empty_dict", "EMPTY_DICT", each("EMPTY_DICT")),
    P("empty_dict_memoize", "EMPTY_DICT MEMOIZE", each("EMPTY_DICT", "MEMOIZE")),
    P("empty_list", "EMPTY_LIST", each("EMPTY_LIST")),
    P("empty_list_memoize", "EMPTY_LIST MEMOIZE", each("EMPTY_LIST", "MEMOIZE")),
    P("empty_tuple", "EMPTY_TUPLE", each("EMPTY_TUPLE")),
    P("mark_tuple", "MARK TUPLE", each("MARK", "TUPLE")),
    P("mark_tuple_memoize", "MARK TUPLE MEMOIZE", each("MARK", "TUPLE", "MEMOIZE")),
    P("mark_list", "MARK LIST", each("MARK", "LIST")),
    P("mark_dict", "MARK DICT", each("MARK", "DICT")),
    P("mark_frozenset", "MARK FROZENSET", each("MARK", "FROZENSET")),
    P("mark_frozenset_memoize", "MARK FROZENSET MEMOIZE", each("MARK", "FROZENSET", "MEMOIZE")),
    P("frozenset_of_one", "MARK BININT2 FROZENSET", lambda i: ops("MARK", _u16(i), "FROZENSET")),
    P("none_tuple1", "NONE TUPLE1", each("NONE", "TUPLE1")),
    # -- the stack and the memo
    P("dup", "DUP (in a list)", each("DUP"), prelude=ops("MARK", "NONE")),
    P("dup_tuple", "DUP, closed by TUPLE", each("DUP"), prelude=ops("MARK", "NONE"), close=ops("TUPLE")),
    P("memoize", "MEMOIZE of one value", each("MEMOIZE"), prelude=ops("NONE"), close=b""),
    P("long_binput_slots", "LONG_BINPUT to slot i", lambda i: put(i), prelude=ops("NONE"), close=b""),
    P(
        "long_binput_high",
        "LONG_BINPUT to slot 2**32-1-i",
        lambda i: put(2**32 - 1 - i),
        prelude=ops("NONE"),
        close=b"",
    ),
    P(
        "binput_cycle",
        "BINPUT to slots 0..255",
        lambda i: op("BINPUT", bytes([i & 255])),
        prelude=ops("NONE"),
        close=b"",
    ),
    P("binget", "BINGET of a list (in a list)", each(GET0), prelude=ops("EMPTY_LIST", PUT0, "POP", "MARK")),
    P("long_binget", "LONG_BINGET (in a list)", each(get(K)), prelude=ops("NONE", put(K), "POP", "MARK")),
    P(
        "binget_tuple",
        "BINGET, closed by TUPLE",
        each(GET0),
        prelude=ops("NONE", PUT0, "POP", "MARK"),
        close=ops("TUPLE"),
    ),
    # -- containers growing
    P(
        "appends_dup",
        "MARK NONE DUP*7 APPENDS on one list",
        each("MARK", "NONE", *["DUP"] * 7, "APPENDS"),
        prelude=ops("EMPTY_LIST"),
        close=b"",
    ),
    P("append", "NONE APPEND on one list", each("NONE", "APPEND"), prelude=ops("EMPTY_LIST"), close=b""),
    P(
        "setitem_int_keys",
        "BININT NONE SETITEM on one dict",
        lambda i: ops(binint(i), "NONE", "SETITEM"),
        prelude=ops("EMPTY_DICT"),
        close=b"",
    ),
    P(
        "additems_ints",
        "MARK BININT ADDITEMS on one set",
        lambda i: ops("MARK", binint(i), "ADDITEMS"),
        prelude=ops("EMPTY_SET"),
        close=b"",
    ),
    # -- scalars
    P("binint", "BININT", lambda i: binint(1000 + i)),
    P("long1_2", "LONG1 of 2 bytes", lambda i: op("LONG1", b"\x02" + struct.pack("<H", 300 + (i & 0x7FFF)))),
    P("long1_8", "LONG1 of 8 bytes", lambda i: op("LONG1", b"\x08" + struct.pack("<q", 2**40 + i))),
    P("binfloat", "BINFLOAT", lambda i: op("BINFLOAT", struct.pack(">d", i + 0.5))),
    P("short_binbytes_2", "SHORT_BINBYTES of 2", each("SHORT_BINBYTES", b"\x02ab")),
    P("short_binunicode_2", "SHORT_BINUNICODE of 2", each("SHORT_BINUNICODE", b"\x02ab")),
    P(
        "short_binunicode_ucs2",
        "SHORT_BINUNICODE of 1 non-Latin-1 character",
        each("SHORT_BINUNICODE", b"\x02\xc4\x80"),
    ),
    P(
        "short_binunicode_ucs4",
        "SHORT_BINUNICODE of 1 astral character",
        each("SHORT_BINUNICODE", b"\x04\xf0\x9f\x98\x80"),
    ),
    P("short_binstring_2", "SHORT_BINSTRING of 2 (protocol 2)", each("SHORT_BINSTRING", b"\x02ab"), proto=2),
    P("bytearray8_empty", "BYTEARRAY8 of 0 bytes", each("BYTEARRAY8", struct.pack("<Q", 0)), proto=5),
    # -- globals and calls
    P(
        "stack_global",
        "BINGET BINGET STACK_GLOBAL",
        each(GET0, GET1, "STACK_GLOBAL"),
        prelude=ops(s("mod"), PUT0, s("Cls"), PUT1, "POP", "POP", "MARK"),
    ),
    P("global_line", "GLOBAL 'm\\nC\\n'", each(glob("m", "C")), proto=2),
    P("reduce_unknown", "BINGET EMPTY_TUPLE REDUCE: a stub", each(GET0, "EMPTY_TUPLE", "REDUCE"), prelude=UNKNOWN0),
    P(
        "reduce_chain",
        "EMPTY_TUPLE REDUCE on the last result",
        each("EMPTY_TUPLE", "REDUCE"),
        prelude=glob("mod", "Cls"),
        close=b"",
    ),
    P("newobj_unknown", "BINGET EMPTY_TUPLE NEWOBJ", each(GET0, "EMPTY_TUPLE", "NEWOBJ"), prelude=UNKNOWN0),
    P("obj_unknown", "MARK BINGET OBJ", each("MARK", GET0, "OBJ"), prelude=UNKNOWN0),
    P(
        "reduce_build_dict",
        "a stub, EMPTY_DICT BUILD",
        each(GET0, "EMPTY_TUPLE", "REDUCE", "EMPTY_DICT", "BUILD"),
        prelude=UNKNOWN0,
    ),
    P(
        "reduce_appends",
        "a stub, MARK NONE APPENDS",
        each(GET0, "EMPTY_TUPLE", "REDUCE", "MARK", "NONE", "APPENDS"),
        prelude=UNKNOWN0,
    ),
    P(
        "reduce_setitem",
        "a stub, NONE NONE SETITEM",
        each(GET0, "EMPTY_TUPLE", "REDUCE", "NONE", "NONE", "SETITEM"),
        prelude=UNKNOWN0,
    ),
    P(
        "ordered_dict",
        "OrderedDict(): a PickledDict",
        each(GET0, "EMPTY_TUPLE", "REDUCE"),
        prelude=ops(glob("collections", "OrderedDict"), PUT0, "POP", "MARK"),
    ),
    P(
        "ordered_dict_attrs",
        "OrderedDict() BUILD {'_metadata': None}",
        each(GET0, "EMPTY_TUPLE", "REDUCE", "EMPTY_DICT", GET1, "NONE", "SETITEM", "BUILD"),
        prelude=ops(glob("collections", "OrderedDict"), PUT0, s("_metadata"), PUT1, "POP", "POP", "MARK"),
        proto=2,
    ),
    P(
        "set_reduce",
        "builtins.set([]) by REDUCE",
        each(GET0, "EMPTY_LIST", "TUPLE1", "REDUCE"),
        prelude=ops(glob("builtins", "set"), PUT0, "POP", "MARK"),
        proto=2,
    ),
    P(
        "set_reduce_no_args",
        "builtins.set() by REDUCE",
        each(GET0, "EMPTY_TUPLE", "REDUCE"),
        prelude=ops(glob("builtins", "set"), PUT0, "POP", "MARK"),
        proto=2,
    ),
    P(
        "frozenset_reduce",
        "builtins.frozenset([]) by REDUCE",
        each(GET0, "EMPTY_LIST", "TUPLE1", "REDUCE"),
        prelude=ops(glob("builtins", "frozenset"), PUT0, "POP", "MARK"),
        proto=2,
    ),
    P(
        "torch_size",
        "torch.Size((1, 2)) by REDUCE",
        each(GET0, GET1, "TUPLE1", "REDUCE"),
        prelude=ops(
            glob("torch", "Size"), PUT0, "BININT1", b"\x01", "BININT1", b"\x02", "TUPLE2", PUT1, "POP", "POP", "MARK"
        ),
        proto=2,
    ),
    P(
        "persistent_id",
        "BINGET of a storage id, BINPERSID",
        each(GET0, "BINPERSID"),
        prelude=ops(PID, PUT0, "POP", "MARK"),
    ),
    # -- tensors: the walk makes each one a record
    P("tensor_fresh", "a whole unmemoized _rebuild_tensor_v2 call", each(tensor())),
    P(
        "tensor_args_reduce",
        "LONG_BINGET callee, LONG_BINGET args, REDUCE: a new tensor each",
        each(get(G), get(A), "REDUCE"),
        prelude=ops(TENSOR_ARGS, "MARK"),
    ),
    P("tensor_get", "LONG_BINGET of one tensor", each(get(T)), prelude=ops(TENSOR_MEMO, "MARK")),
    P("tensor_dup", "DUP of one tensor", each("DUP"), prelude=ops("MARK", tensor())),
    # As many records as the walk's budget allows: a GET of one tensor, padded with NONE POP to 37 bytes.
    P(
        "tensor_get_padded",
        "LONG_BINGET of one tensor, then NONE POP * 16",
        each(get(T), *["NONE", "POP"] * 16),
        prelude=ops(TENSOR_MEMO, "MARK"),
    ),
    # The same under a 24-character key: 32-character names, so that shares_with lists 2,048 characters.
    P(
        "tensor_get_padded_named",
        "the same, in a list under a 24-character key",
        each(get(T), *["NONE", "POP"] * 16),
        prelude=ops(TENSOR_MEMO, "EMPTY_DICT", s("k" * 24), "MARK"),
        close=ops("LIST", "SETITEM"),
    ),
    P(
        "tensor_int_keys",
        "{BININT: BINGET of one tensor} by SETITEM",
        lambda i: ops(binint(i), GET0, "SETITEM"),
        prelude=ops(tensor(), PUT0, "POP", "EMPTY_DICT"),
        close=b"",
    ),
    P(
        "tensor_long_name",
        "LONG_BINGET of one tensor, in a list under a 60,000-character key",
        each(get(T)),
        prelude=ops(TENSOR_MEMO, LONG_KEY, "EMPTY_DICT", get(K), "MARK"),
        close=ops("LIST", "SETITEM"),
    ),
    P(
        "tensor_long_key_dicts",
        "{60,000-character key: one tensor} dicts",
        each("EMPTY_DICT", get(K), get(T), "SETITEM"),
        prelude=ops(TENSOR_MEMO, LONG_KEY, "MARK"),
    ),
    P(
        "shared_list_long_name",
        "one list holding a tensor under many keys, under a 60,000-character key",
        lambda i: ops(binint(i), GET0, "SETITEM"),
        prelude=ops("EMPTY_LIST", tensor(), "APPEND", PUT0, "POP", LONG_KEY, "EMPTY_DICT", get(K), "EMPTY_DICT"),
        close=ops("SETITEM"),
    ),
]


def _info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, DATE)
    info.compress_type = zipfile.ZIP_STORED
    return info


def write_zip(path: Path, data: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(_info("archive/data.pkl"), data)
        z.writestr(_info("archive/byteorder"), b"little")
        z.writestr(_info("archive/data/0"), bytes(16))
        z.writestr(_info("archive/version"), b"3\n")


def real_checkpoints(folder: Path, size: int) -> list[tuple[str, str, Path]]:
    """Checkpoints torch writes: a state dict of small tensors, a whole module, a training dict with
    an optimizer's state; each sized to about ``size`` bytes of pickle."""
    try:
        import torch
    except ImportError:
        return []
    out = []
    n = max(10, size // 100)  # a state-dict entry is about 100 pickle bytes
    sd = {}
    for i in range(n // 5):
        for k in ("weight", "bias", "running_mean", "running_var"):
            sd[f"blocks.{i}.bn.{k}"] = torch.zeros(4 + i % 13)
        sd[f"blocks.{i}.bn.num_batches_tracked"] = torch.tensor(0)
    p = folder / "real_state_dict.pt"
    torch.save(sd, p)
    out.append(("real_state_dict", f"torch.save of a {len(sd):,}-tensor state dict", p))

    blocks = max(1, size // 3000)
    model = torch.nn.Sequential(
        *[torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)) for _ in range(blocks)]
    )
    p = folder / "real_module.pt"
    torch.save(model, p)
    out.append(("real_module", f"torch.save of a whole nn.Module ({blocks:,} Linear+BatchNorm blocks)", p))

    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(max(1, size // 250))]
    opt = torch.optim.Adam(params)
    for q in params:
        q.grad = torch.zeros(2)
    opt.step()
    p = folder / "real_training.pt"
    torch.save({"model": {f"p{i}": q.data for i, q in enumerate(params)}, "optimizer": opt.state_dict(), "epoch": 1}, p)
    out.append(("real_training", f"torch.save of a training dict ({len(params):,} parameters with Adam state)", p))
    return out


# ---------------------------------------------------------------------------------------- the child

CHILD = r"""
import gc, io, json, os, resource, sys, tracemalloc
path, mode, cap = sys.argv[1], sys.argv[2], int(sys.argv[3])

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmRSS")
    except OSError:
        return None

import statecli
assert statecli.__file__.startswith(sys.argv[5]), statecli.__file__
from statecli.errors import StatecliError
from statecli.formats.torchpickle import Storages as _Storages
from statecli.formats.torchzip import archive_root
from statecli.formats.zipdir import read_central_directory, read_member
from statecli.security import loads
from statecli.cli.main import app

def run_loads():
    members = read_central_directory(path)
    root = archive_root(list(members), path)
    data = read_member(path, members[f"{root}/data.pkl"], 1 << 30)
    return data, (lambda: loads(data, _Storages(members, root, path)))

def run_cli(fmt):
    def go():
        argv = {
            "json": ["inspect", path, "--format", "json"],
            "table": ["inspect", path],
            "tree": ["tree", path],
            "check": ["check", path],
        }[fmt]
        old = sys.stdout
        sys.stdout = open(os.devnull, "w")
        try:
            app(argv, prog_name="statecli")
        except SystemExit as e:
            return e.code
        finally:
            sys.stdout.close()
            sys.stdout = old
        return 0
    return go

# Warm up: every lazy import and cache the command touches, on a small file of the same kind.
warm = sys.argv[4]
sys.stderr = io.StringIO()
if mode == "loads":
    path_, path = path, warm
    run_loads()[1]()
    path = path_
    data, call = run_loads()
else:
    path_, path = path, warm
    run_cli(mode)()
    path = path_
    call = run_cli(mode)
gc.collect()
gc.disable()  # as statecli's CLI runs
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
out = {"rss": None, "traced": None, "result": "ok", "seconds": None}
import time
base = reset_peak()
t0 = time.perf_counter()
try:
    r = call()
    if mode != "loads" and r not in (0, None):
        err = sys.stderr.getvalue().strip().splitlines()
        out["result"] = f"exit {r}: " + (err[-1][:160] if err else "")
except MemoryError:
    out["result"] = "MemoryError"
except StatecliError as e:
    out["result"] = f"exit {e.exit_code}: {str(e)[:160]}"
out["seconds"] = round(time.perf_counter() - t0, 2)
if base is not None:
    out["rss"] = status("VmHWM") - base
r = None
gc.collect()
# tracemalloc slows the run down several times: skipped where the plain run took long already.
if (out["result"] == "ok" or out["result"].startswith("exit")) and out["seconds"] < float(sys.argv[6]):
    sys.stderr = io.StringIO()
    tracemalloc.start()
    try:
        call()
    except (MemoryError, StatecliError):
        pass
    out["traced"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
print(json.dumps(out), file=sys.__stdout__)
"""


def measure(
    path: Path, mode: str, cap: int, timeout: float, warm: Path, root: Path, traced_within: float
) -> dict[str, object]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    env["NO_COLOR"] = "1"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), mode, str(cap), str(warm), str(root), str(traced_within)],
            env=env,
            cwd=path.parent,  # not a checkout: ``-c`` puts the working folder first on sys.path
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"rss": None, "traced": None, "result": f"timeout ({timeout:.0f} s)", "seconds": None}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"rss": None, "traced": None, "result": f"child died ({proc.returncode}): {tail[:120]}", "seconds": None}
    return json.loads(lines[-1])


def _commit(root: Path) -> str:
    out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return out.stdout.strip() or "not a git checkout"


def per_byte(v: object, size: int) -> str:
    return "-" if not isinstance(v, int) else f"{v / size:.1f}"


def parse_size(text: str) -> int:
    t = text.strip().upper()
    for suffix, mult in (
        ("GIB", 1 << 30),
        ("MIB", 1 << 20),
        ("KIB", 1 << 10),
        ("GB", 10**9),
        ("MB", 10**6),
        ("KB", 10**3),
    ):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4MB", help="pickle size per pattern (default 4MB)")
    ap.add_argument("--only", default="", help="comma-separated pattern names")
    ap.add_argument(
        "--modes",
        default="loads,json,table",
        help="what to measure: loads, json, table, tree, check (default the first 3)",
    )
    ap.add_argument("--cap", default="8GiB", help="address-space cap of each child (default 8GiB)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per child (default 300)")
    ap.add_argument("--no-real", action="store_true", help="skip the checkpoints torch writes")
    ap.add_argument(
        "--traced-within",
        type=float,
        default=30,
        help="measure tracemalloc's peak only where the plain run took less than this many seconds (default 30)",
    )
    ap.add_argument("--jobs", type=int, default=1, help="children measured at once (default 1)")
    ap.add_argument("--list", action="store_true", help="list the patterns and exit")
    ap.add_argument("--json", metavar="OUT", help="also write every measurement as JSON")
    ap.add_argument("--root", default=str(REPO), help="the statecli checkout to measure (default: this one)")
    args = ap.parse_args(argv)
    if args.list:
        for p in PATTERNS:
            print(f"{p.name:28} {p.what}")
        return 0
    size = parse_size(args.size)
    cap = parse_size(args.cap)
    root = Path(args.root).resolve()
    modes = [m for m in args.modes.split(",") if m]
    only = {n for n in args.only.split(",") if n}
    if only - {p.name for p in PATTERNS} - {"real_state_dict", "real_module", "real_training"}:
        ap.error(f"unknown pattern(s): {', '.join(sorted(only - {p.name for p in PATTERNS}))}")

    folder = Path(tempfile.mkdtemp(prefix="statecli-pickle-memory-"))
    warm = folder / "warm.pt"
    write_zip(warm, Pattern("warm", "", each("NONE")).pickle(64))
    cases: list[tuple[str, str, Path]] = []
    for p in PATTERNS:
        if only and p.name not in only:
            continue
        path = folder / f"{p.name}.pt"
        write_zip(path, p.pickle(size))
        cases.append((p.name, p.what, path))
    if not args.no_real:
        cases += [c for c in real_checkpoints(folder, size) if not only or c[0] in only]

    print(f"statecli at {root} ({_commit(root)}); Python {sys.version.split()[0]}, {sys.platform}")
    print(
        f"pickles of about {size:,} bytes; each child capped at {cap >> 20} MiB of address space, {args.timeout:.0f} s"
    )
    print("B/B = peak bytes per pickle byte: tracemalloc peak (traced) and peak-RSS growth (rss)")
    heads = ["pattern", "pickle bytes"] + [f"{m} {k}" for m in modes for k in ("traced", "rss")] + ["result"]
    print("| " + " | ".join(heads) + " |")
    print("|" + "---|" * len(heads))
    results = []
    worst: dict[str, tuple[float, str]] = {}
    sizes = {}
    for name, _, path in cases:
        with zipfile.ZipFile(path) as z:
            sizes[name] = next(i for i in z.infolist() if i.filename.endswith("/data.pkl")).file_size
    # Children run ``--jobs`` at a time; each measures its own process, so they do not disturb each other's figures.
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {
            (name, m): pool.submit(measure, path, m, cap, args.timeout, warm, root, args.traced_within)
            for name, _, path in cases
            for m in modes
        }
        for name, what, _ in cases:
            pkl = sizes[name]
            row: dict[str, object] = {"pattern": name, "what": what, "pickle_bytes": pkl}
            cells = [name, f"{pkl:,}"]
            notes = []
            for m in modes:
                r = futures[(name, m)].result()
                row[m] = r
                cells += [per_byte(r["traced"], pkl), per_byte(r["rss"], pkl)]
                result = str(r["result"])
                if result != "ok":
                    notes.append(f"{m}: {result}")
                elif isinstance(r.get("seconds"), float) and r["seconds"] > 5:
                    notes.append(f"{m}: {r['seconds']} s")
                for k in ("traced", "rss"):
                    v = r[k]
                    if isinstance(v, int) and (m not in worst or v / pkl > worst[m][0]):
                        worst[m] = (v / pkl, f"{name} ({k})")
                if result == "MemoryError" or result.startswith(("timeout", "child died")):
                    worst[m] = (float("inf"), f"{name} ({result})")
            cells.append("; ".join(notes) or "read")
            results.append(row)
            print("| " + " | ".join(cells) + " |", flush=True)
    print()
    for m in modes:
        if m in worst:
            v, where = worst[m]
            print(f"worst {m}: {v:.1f} bytes per pickle byte, {where}")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": size, "results": results}, indent=1))
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
