"""Checkpoints built piece by piece: every container statecli reads, mostly valid, with targeted corruptions.

Byte mutation (fuzz_read.py's ``random`` engine, tests/test_fuzz_properties.py) rarely gets past a zip
CRC, a JSON parser or a pickle's first opcodes. These generators build the structures themselves: a
torch.save archive's pickle opcode by opcode (tensors, Parameters, modules, views of shared storages),
a torch.distributed.checkpoint folder (a ``.metadata`` pickled from torch's own dataclasses, ``.distcp``
files of chunk archives), a ``torch.export`` ``.pt2`` (program JSON, weight configs, raw and pickled
weights, sample inputs), a TorchScript archive (``data.pkl``, ``code/`` declarations, ``constants.pkl``,
``traced_inputs.pkl``), nested archives, a sharded index with its shards, and legacy files (the pre-1.6
pickle stream, the pre-0.4 tar). Each generator makes a valid structure and then applies a few
corruptions drawn from its family's list (sizes, offsets, overlaps, names, dtypes, counts, deep and
shared values, paths), so what it builds reaches the code behind the parsers.

Generators draw from a :class:`Draw`: :class:`RandomDraw` for timed runs (fuzz_read.py
``--engine structural``), :class:`HypothesisDraw` for the CI test (tests/test_trust_fuzz.py), where
hypothesis can shrink a failing example to its fewest corruptions. ``build(family, draw, folder)``
returns a :class:`Built`: the path to hand statecli and the corruptions applied.

Nothing here runs a pickle; torch is used only to pickle torch's own DCP dataclasses.
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")
DATE = (1980, 1, 1, 0, 0, 0)


# ------------------------------------------------------------------------------------------------ draws


class Draw:
    """Where a generator's choices come from. Subclasses give :meth:`int` and :meth:`flag`."""

    def int(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def flag(self, p: float) -> bool:
        """True with probability about ``p``; hypothesis shrinks it to False."""
        raise NotImplementedError

    def choice(self, seq: Sequence[T]) -> T:
        return seq[self.int(0, len(seq) - 1)]

    def seed(self) -> int:
        return self.int(0, 2**32 - 1)


class RandomDraw(Draw):
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def flag(self, p: float) -> bool:
        return self.rng.random() < p


class HypothesisDraw(Draw):
    """Draws through hypothesis's ``data`` object (``st.data()``), so examples shrink."""

    def __init__(self, data: Any) -> None:
        from hypothesis import strategies as st

        self.data = data
        self.st = st

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def flag(self, p: float) -> bool:
        return self.data.draw(self.st.integers(0, 99)) >= 100 - round(p * 100)


def corruptions(d: Draw, names: Sequence[str], most: int = 3) -> list[str]:
    """Up to ``most`` corruptions of a family (none about a quarter of the time: valid files matter too)."""
    n = d.int(0, most)
    return sorted({d.choice(names) for _ in range(n)})


# ----------------------------------------------------------------------------------------------- pickles


class G(NamedTuple):
    """A global, ``GLOBAL 'module name'``."""

    module: str
    name: str


class Call(NamedTuple):
    """``func(*args)``: GLOBAL (or any value) + args tuple + REDUCE."""

    func: Any
    args: tuple


class NewObj(NamedTuple):
    """``cls.__new__(cls, *args)`` then BUILD with ``state`` (no BUILD when state is None)."""

    cls: Any
    args: tuple
    state: Any


class PID(NamedTuple):
    """A persistent id: the value, then BINPERSID."""

    value: Any


class Pairs(NamedTuple):
    """A dict written from (key, value) pairs: keys Python could not hash, or repeated."""

    items: list


class ODict(NamedTuple):
    """``collections.OrderedDict()`` filled by SETITEMS, optionally BUILT with ``state`` as torch's state dicts are."""

    items: list
    state: Any = None


class Raw(NamedTuple):
    """Opcodes that leave exactly one value on the stack."""

    data: bytes


class Pickler:
    """A small protocol-2 pickler over plain values and the nodes above. Shared containers are memoized
    (BINPUT/BINGET), so a DAG of references stays small however many paths it has."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.memo: dict[int, int] = {}
        self.keep: list[Any] = []

    def dumps(self, obj: Any, proto: int = 2) -> bytes:
        self.out += b"\x80" + bytes([proto])
        self.w(obj)
        self.out += b"."
        return bytes(self.out)

    def _put(self, obj: Any) -> None:
        i = len(self.memo)
        self.memo[id(obj)] = i
        self.keep.append(obj)
        self.out += b"r" + struct.pack("<I", i)

    def _get(self, obj: Any) -> bool:
        i = self.memo.get(id(obj))
        if i is None:
            return False
        self.out += b"j" + struct.pack("<I", i)
        return True

    def w(self, x: Any) -> None:
        o = self.out
        if x is None:
            o += b"N"
        elif x is True:
            o += b"\x88"
        elif x is False:
            o += b"\x89"
        elif type(x) is int:
            if 0 <= x < 256:
                o += b"K" + bytes([x])
            elif -(2**31) <= x < 2**31:
                o += b"J" + struct.pack("<i", x)
            else:
                data = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)
                o += b"\x8a" + bytes([len(data)]) + data
        elif type(x) is float:
            o += b"G" + struct.pack(">d", x)
        elif type(x) is str:
            if self._get(x):
                return
            data = x.encode("utf-8", "surrogatepass")
            o += b"X" + struct.pack("<I", len(data)) + data
            if len(x) > 2:
                self._put(x)
        elif type(x) is bytes:
            o += b"B" + struct.pack("<I", len(x)) + x
        elif isinstance(x, G):
            if self._get(x):
                return
            o += b"c" + f"{x.module}\n{x.name}\n".encode("utf-8", "surrogatepass")
            self._put(x)
        elif isinstance(x, Call):
            if self._get(x):
                return
            self.w(x.func)
            self.w(tuple(x.args))
            o += b"R"
            self._put(x)
        elif isinstance(x, NewObj):
            if self._get(x):
                return
            self.w(x.cls)
            self.w(tuple(x.args))
            o += b"\x81"
            self._put(x)
            if x.state is not None:
                self.w(x.state)
                o += b"b"
        elif isinstance(x, PID):
            self.w(x.value)
            o += b"Q"
        elif isinstance(x, Raw):
            o += x.data
        elif isinstance(x, ODict):
            if self._get(x):
                return
            o += b"ccollections\nOrderedDict\n)R"
            self._put(x)
            self._items(x.items)
            if x.state is not None:
                self.w(x.state)
                o += b"b"
        elif isinstance(x, Pairs):
            if self._get(x):
                return
            o += b"}"
            self._put(x)
            self._items(x.items)
        elif type(x) is dict:
            if self._get(x):
                return
            o += b"}"
            self._put(x)
            self._items(list(x.items()))
        elif type(x) is list:
            if self._get(x):
                return
            o += b"]"
            self._put(x)
            if x:
                o += b"("
                for v in x:
                    self.w(v)
                o += b"e"
        elif type(x) is tuple:
            if self._get(x):
                return
            if not x:
                o += b")"
                return
            o += b"("
            for v in x:
                self.w(v)
            o += b"t"
            self._put(x)
        elif type(x) is set:
            o += b"c__builtin__\nset\n]("
            for v in x:
                self.w(v)
            o += b"e\x85R"
        else:
            raise TypeError(f"cannot pickle {type(x).__name__}")

    def _items(self, items: list) -> None:
        for i in range(0, len(items), 1000):
            self.out += b"("
            for k, v in items[i : i + 1000]:
                self.w(k)
                self.w(v)
            self.out += b"u"


def dumps(obj: Any, proto: int = 2) -> bytes:
    return Pickler().dumps(obj, proto)


# ------------------------------------------------------------------------------------------------ tensors

# dtype -> (legacy storage class, itemsize, safetensors code, pt2 scalar-type code)
DTYPES: dict[str, tuple[str | None, int, str | None, int | None]] = {
    "float32": ("FloatStorage", 4, "F32", 7),
    "float16": ("HalfStorage", 2, "F16", 6),
    "bfloat16": ("BFloat16Storage", 2, "BF16", 13),
    "float64": ("DoubleStorage", 8, "F64", 8),
    "int64": ("LongStorage", 8, "I64", 5),
    "int32": ("IntStorage", 4, "I32", 4),
    "int8": ("CharStorage", 1, "I8", 2),
    "uint8": ("ByteStorage", 1, "U8", 1),
    "bool": ("BoolStorage", 1, "BOOL", 12),
    "complex64": ("ComplexFloatStorage", 8, "C64", 10),
    "float8_e4m3fn": (None, 1, "F8_E4M3", 29),
    "float8_e5m2": (None, 1, "F8_E5M2", 30),
    "uint16": (None, 2, "U16", 28),
}
COMMON_DTYPES = ["float32"] * 6 + ["float16", "bfloat16", "int64", "float64", "bool", "uint8"]
ALL_DTYPES = list(DTYPES)
NAMES = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked", "inv_freq", "position_ids", "scale"]
MODULES = ["conv1", "bn1", "fc", "layers.0", "layers.1.attn", "encoder.norm", "head", "embed"]
# Names that have broken readers and printers elsewhere: escapes, dots, emptiness, length, odd code points.
ODD_NAMES = [
    "",
    ".",
    "a..b",
    "\x1b[2Kx",
    "line\nbreak",
    "tab\there",
    "\ud800lone",
    "名前",
    "x" * 300,
    "../../etc/passwd",
    "a/b\\c",
    "model.",
    "\x00nul",
    "*?[",
    "module.module.w",
]
HUGE = [2**31, 2**32 + 1, 2**62, 2**63 - 1, 2**63, 2**64, -1, -(2**63)]


@dataclass
class TSpec:
    """One tensor as a torch.save pickle would describe it."""

    name: str
    dtype: str
    shape: tuple
    stride: tuple
    offset: int
    key: str
    requires_grad: bool = False
    parameter: bool = False
    v3: bool = False  # _rebuild_tensor_v3 over an untyped storage, the dtype named apart
    location: str = "cpu"
    kind: str = "dense"  # dense | meta | qint8 | sparse


@dataclass
class Storage:
    dtype: str
    numel: int
    data: bytes


def contiguous(shape: Sequence[int]) -> tuple:
    out, step = [], 1
    for s in reversed(shape):
        out.append(step)
        step *= max(s, 1)
    return tuple(reversed(out))


def extent(shape: Sequence[int], stride: Sequence[int], offset: int) -> int:
    """Elements a view needs in its storage (0 for an empty tensor)."""
    if any(s == 0 for s in shape):
        return 0
    return offset + 1 + sum((s - 1) * st for s, st in zip(shape, stride, strict=False))


def values(d: Draw, n: int) -> bytes:
    """``n`` bytes of values: zeros, a pattern, or noise (some of which reads as NaN or inf)."""
    kind = d.int(0, 3)
    if kind == 0 or n == 0:
        return bytes(n)
    if kind == 1:
        return (bytes(range(1, 256)) * (n // 255 + 1))[:n]
    return random.Random(d.seed()).randbytes(n)


def gen_shape(d: Draw) -> tuple:
    rank = d.choice([0, 1, 1, 2, 2, 3, 4])
    return tuple(d.choice([0, 1, 2, 3, 4, 5, 8]) if d.flag(0.9) else d.choice([0, 1]) for _ in range(rank))


def gen_tensors(d: Draw, most: int = 6, names: Sequence[str] | None = None) -> tuple[list[TSpec], dict[str, Storage]]:
    """A state dict's tensors over their storages: own storages, views of an earlier one, tied names."""
    tensors: list[TSpec] = []
    storages: dict[str, Storage] = {}
    count = d.int(0, most)
    for i in range(count):
        if names is not None:
            name = names[i % len(names)] + ("" if i < len(names) else f".{i}")
        else:
            name = f"{d.choice(MODULES)}.{d.choice(NAMES)}"
            if any(t.name == name for t in tensors):
                name = f"{name}{i}"
        if tensors and d.flag(0.15):
            # A view of (or a tie to) an earlier tensor's storage.
            base = d.choice(tensors)
            if base.kind != "dense":
                base = tensors[0]
            st = storages.get(base.key)
            if st is not None and base.kind == "dense":
                shape = (d.int(0, max(st.numel, 1)),) if d.flag(0.6) else base.shape
                stride = contiguous(shape)
                offset = d.int(0, max(0, st.numel - max(1, extent(shape, stride, 0))))
                if extent(shape, stride, offset) <= st.numel:
                    tensors.append(TSpec(name, st.dtype, shape, stride, offset, base.key, v3=base.v3))
                    continue
        dtype = d.choice(COMMON_DTYPES if d.flag(0.8) else ALL_DTYPES)
        shape = gen_shape(d)
        stride = contiguous(shape)
        if len(shape) >= 2 and d.flag(0.15):  # a transposed view
            shape = (shape[1], shape[0], *shape[2:])
            stride = (stride[1], stride[0], *stride[2:])
        offset = d.int(0, 3) if d.flag(0.1) else 0
        numel = extent(shape, stride, offset) + (d.int(0, 4) if d.flag(0.2) else 0)
        key = str(len(storages))
        storages[key] = Storage(dtype, numel, values(d, numel * DTYPES[dtype][1]))
        v3 = DTYPES[dtype][0] is None or d.flag(0.1)
        kind = "dense"
        if d.flag(0.05):
            kind = d.choice(["meta", "qint8", "sparse"])
        t = TSpec(name, dtype, shape, stride, offset, key, v3=v3, kind=kind)
        t.parameter = d.flag(0.2)
        t.requires_grad = t.parameter and d.flag(0.8)
        if d.flag(0.05):
            t.location = d.choice(["cuda:0", "cuda:1", "mps", "meta", "xla:0"])
        tensors.append(t)
    return tensors, storages


TENSOR_CORRUPTIONS = [
    "storage-short",
    "storage-long",
    "numel-lie",
    "shape-past",
    "negative-dim",
    "huge-dim",
    "negative-stride",
    "zero-stride",
    "offset-past",
    "rank-mismatch",
    "shape-not-ints",
    "unknown-storage-type",
    "v3-bad-dtype",
    "key-not-text",
    "key-missing",
    "key-reused-other-dtype",
    "odd-location",
    "odd-name",
    "duplicate-name",
    "parameter-of-nontensor",
    "v3-short-args",
]


def corrupt_tensors(d: Draw, which: list[str], tensors: list[TSpec], storages: dict[str, Storage]) -> dict[str, Any]:
    """Apply the tensor-level corruptions in ``which``; returns per-tensor overrides for the pickle writer."""
    over: dict[str, Any] = {}
    if not tensors:
        return over
    for c in which:
        t = d.choice(tensors)
        st = storages.get(t.key)
        if c == "storage-short" and st is not None:
            st.data = st.data[: d.int(0, max(0, len(st.data) - 1))]
        elif c == "storage-long" and st is not None:
            st.data += bytes(d.choice([1, 3, 4, 4096]))
        elif c == "numel-lie" and st is not None:
            st.numel = d.choice([0, max(0, st.numel - 1), st.numel + 1, 2**40, 2**62])
        elif c == "shape-past" and t.shape:
            t.shape = (t.shape[0] + d.int(1, 100), *t.shape[1:])
        elif c == "negative-dim":
            t.shape = (*t.shape, -d.int(1, 3))
            t.stride = (*t.stride, 1)
        elif c == "huge-dim":
            t.shape = (*t.shape, d.choice(HUGE))
            t.stride = (*t.stride, 1)
        elif c == "negative-stride" and t.stride:
            t.stride = (-1, *t.stride[1:])
        elif c == "zero-stride" and t.stride:
            t.stride = (0, *t.stride[1:])
        elif c == "offset-past":
            t.offset = d.choice([st.numel if st else 1, 2**40, -1, 2**63])
        elif c == "rank-mismatch":
            t.stride = (*t.stride, 1)
        elif c == "shape-not-ints":
            over[t.name + "#shape"] = d.choice([[1, 2], (1.5,), ("3",), (True,), None, (None,), {"a": 1}])
        elif c == "unknown-storage-type":
            over[t.name + "#stype"] = G(
                d.choice(["torch", "torch.cuda", "evil"]), d.choice(["EvilStorage", "Storage", ""])
            )
        elif c == "v3-bad-dtype":
            t.v3 = True
            over[t.name + "#dtype"] = d.choice([G("torch", "float33"), "float32", G("os", "system"), None, 7])
        elif c == "key-not-text":
            over[t.name + "#key"] = d.choice([0, None, ("a",), b"0", 2**70])
        elif c == "key-missing" and st is not None:
            storages.pop(t.key, None)
        elif c == "key-reused-other-dtype":
            other = d.choice(tensors)
            if other is not t and other.kind == "dense":
                t.key = other.key
                t.dtype = d.choice(ALL_DTYPES)
                t.v3 = True
        elif c == "odd-location":
            t.location = d.choice(["", "cuda:99999999999", "x" * 5000, "cpu\n", "meta", "\x1b[31m"])
        elif c == "odd-name":
            t.name = d.choice(ODD_NAMES)
        elif c == "duplicate-name":
            t.name = tensors[0].name
        elif c == "parameter-of-nontensor":
            over[t.name + "#param"] = True
        elif c == "v3-short-args":
            over[t.name + "#short"] = True
    return over


def tensor_node(t: TSpec, storages: dict[str, Storage], over: dict[str, Any], memo: dict[str, Any]) -> Any:
    """The pickle node that rebuilds ``t`` as torch.save writes it."""
    st = storages.get(t.key)
    dtype = st.dtype if st is not None and not t.v3 else t.dtype
    stype_name = DTYPES[dtype][0] if dtype in DTYPES else None
    numel = st.numel if st is not None else 1
    if t.v3:
        stype: Any = G("torch", "UntypedStorage")
        numel = numel * DTYPES[st.dtype if st else t.dtype][1]
    else:
        stype = G("torch", stype_name or "FloatStorage")
    stype = over.get(t.name + "#stype", stype)
    key = over.get(t.name + "#key", t.key)
    shape = over.get(t.name + "#shape", tuple(t.shape))
    # One persistent-id tuple per storage, memoized like torch's pickler does.
    pid_key = (t.key, t.v3, repr(stype), repr(key), t.location)
    pid = memo.get(pid_key)
    if pid is None:
        pid = memo[pid_key] = PID(("storage", stype, key, t.location, numel))
    hooks = ODict([])
    if t.kind == "meta":
        node: Any = Call(
            G("torch._utils", "_rebuild_meta_tensor_no_storage"),
            (G("torch", t.dtype), shape, tuple(t.stride), t.requires_grad),
        )
    elif t.kind == "qint8":
        qparams = (G("torch", "per_tensor_affine"), 0.1, 0)
        node = Call(
            G("torch._utils", "_rebuild_qtensor"), (pid, t.offset, shape, tuple(t.stride), qparams, False, hooks)
        )
    elif t.kind == "sparse":
        idx = Call(G("torch._utils", "_rebuild_tensor_v2"), (pid, 0, (1, 0), (1, 1), False, hooks))
        node = Call(G("torch._utils", "_rebuild_sparse_tensor"), (G("torch", "sparse_coo"), (idx, idx, shape, True)))
    elif t.v3:
        dt = over.get(t.name + "#dtype", G("torch", t.dtype))
        args: tuple = (pid, t.offset, shape, tuple(t.stride), t.requires_grad, hooks, dt)
        if over.get(t.name + "#short"):
            args = args[:4]
        node = Call(G("torch._utils", "_rebuild_tensor_v3"), args)
    else:
        node = Call(
            G("torch._utils", "_rebuild_tensor_v2"), (pid, t.offset, shape, tuple(t.stride), t.requires_grad, hooks)
        )
    if t.parameter or over.get(t.name + "#param"):
        inner = node if not over.get(t.name + "#param") else [1, 2, 3]
        node = Call(G("torch._utils", "_rebuild_parameter"), (inner, t.requires_grad, ODict([])))
    return node


def laughs(width: int, depth: int, leaf: Any = "lol") -> Any:
    """A DAG of ``depth`` lists, each holding ``width`` references to the one below: width**depth leaves."""
    x = leaf
    for _ in range(depth):
        x = [x] * width
    return x


def deep(depth: int, leaf: Any = 0) -> Any:
    x = leaf
    for _ in range(depth):
        x = [x]
    return x


def odd_value(d: Draw) -> Any:
    """A non-tensor value of the kind that breaks walkers and printers: deep, shared, huge, odd."""
    k = d.int(0, 9)
    if k == 0:
        return laughs(d.choice([2, 10]), d.choice([10, 30, 60]))
    if k == 1:
        return deep(d.choice([50, 150, 250, 900]))
    if k == 2:
        return "x" * d.choice([100, 70_000, 1_000_000])
    if k == 3:
        return d.choice(HUGE) * 2 ** d.int(0, 400)
    if k == 4:
        return float(d.choice(["nan", "inf", "-inf", "1e308"]))
    if k == 5:
        x: list = []
        x.append(x)  # a list that holds itself
        return x
    if k == 6:
        return {d.choice(ODD_NAMES): i for i in range(3)}
    if k == 7:
        return G(d.choice(["collections", "builtins", "torch", "__main__"]), d.choice(["OrderedDict", "Foo", "len"]))
    if k == 8:
        return b"\x00" * d.choice([1, 1000])
    return {"epoch": d.int(0, 100), "lr": 0.1, "note": d.choice(ODD_NAMES)}


# --------------------------------------------------------------------------------------------- zip files


@dataclass
class ZipSpec:
    """Members of an archive, in order: (name, bytes, compressed?)."""

    members: list[tuple[str, bytes, bool]] = field(default_factory=list)
    comment: bytes = b""

    def add(self, name: str, data: bytes, deflate: bool = False) -> None:
        self.members.append((name, data, deflate))


def write_zip(spec: ZipSpec) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data, deflate in spec.members:
            info = zipfile.ZipInfo(name, DATE)
            info.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
            z.writestr(info, data)
        z.comment = spec.comment[:65535]
    return buf.getvalue()


ZIP_CORRUPTIONS = [
    "deflate-pickle",
    "deflate-storage",
    "bomb-member",
    "local-method-differs",
    "local-size-differs",
    "central-size-lie",
    "central-offset-lie",
    "crc-wrong",
    "truncate",
    "duplicate-member",
    "case-twin",
    "second-root",
    "odd-member-name",
    "comment",
    "prepend-bytes",
]


def _central_entries(data: bytes) -> list[int]:
    """Offsets of the central directory's entries, found from the end record (not by searching: a stored
    member may hold a zip of its own)."""
    end = data.rfind(b"PK\x05\x06")
    if end < 0 or end + 22 > len(data):
        return []
    count, _, at = struct.unpack_from("<HII", data, end + 10)
    out = []
    for _ in range(count):
        if at + 46 > len(data) or data[at : at + 4] != b"PK\x01\x02":
            break
        out.append(at)
        n, m, k = struct.unpack_from("<HHH", data, at + 28)
        at += 46 + n + m + k
    return out


def corrupt_zip_spec(d: Draw, which: list[str], spec: ZipSpec) -> None:
    """Corruptions applied to the member list before the archive is written."""
    if not spec.members:
        return
    for c in which:
        i = d.int(0, len(spec.members) - 1)
        name, data, deflate = spec.members[i]
        if c == "deflate-pickle":
            spec.members = [(n, b, b_ or n.endswith(".pkl")) for n, b, b_ in spec.members]
        elif c == "deflate-storage":
            spec.members[i] = (name, data, True)
        elif c == "bomb-member":
            spec.members[i] = (name, data + bytes(d.choice([1 << 16, 1 << 22])), True)
        elif c == "duplicate-member":
            spec.members.append((name, data[: len(data) // 2], deflate))
        elif c == "case-twin":
            spec.members.append((name.upper(), data, deflate))
        elif c == "second-root":
            spec.members.append(("other/" + name.split("/", 1)[-1], data, deflate))
        elif c == "odd-member-name":
            spec.members.append((d.choice(["../x", "/abs", "a\\b", "dir/", "x" * 300, "\x1b[2K"]), b"junk", False))
        elif c == "comment":
            spec.comment = d.choice([b"PK\x05\x06" + bytes(18), b"x" * 65535])


def corrupt_zip_bytes(d: Draw, which: list[str], data: bytes) -> bytes:
    """Corruptions of the written archive: fields that must agree, and do not."""
    out = bytearray(data)
    for c in which:
        entries = _central_entries(bytes(out))
        if not entries:
            break
        e = d.choice(entries)
        local = struct.unpack_from("<I", out, e + 42)[0]
        if c == "local-method-differs" and local + 30 <= len(out):
            struct.pack_into("<H", out, local + 8, 0 if struct.unpack_from("<H", out, local + 8)[0] else 8)
        elif c == "local-size-differs" and local + 30 <= len(out):
            struct.pack_into("<I", out, local + 18, d.choice([0, 1, 2**32 - 1]))
            struct.pack_into("<I", out, local + 22, d.choice([0, 7, 2**32 - 1]))
        elif c == "central-size-lie":
            struct.pack_into("<I", out, e + 24, d.choice([0, 1, 2**31, 2**32 - 1]))
            if d.flag(0.5):
                struct.pack_into("<I", out, e + 20, d.choice([0, 1, 2**32 - 1]))
        elif c == "central-offset-lie":
            struct.pack_into("<I", out, e + 42, d.choice([0, 1, local + 1, len(out), 2**32 - 1]))
        elif c == "crc-wrong":
            struct.pack_into("<I", out, e + 16, struct.unpack_from("<I", out, e + 16)[0] ^ 1)
        elif c == "truncate":
            del out[d.int(0, len(out)) :]
        elif c == "prepend-bytes":
            out[0:0] = b"\x00" * d.choice([1, 64])
    return bytes(out)


# ------------------------------------------------------------------------------------- torch.save archive


CONTAINER_CORRUPTIONS = [
    "deep-nesting",
    "billion-laughs",
    "self-reference",
    "odd-values",
    "shared-subtree",
    "non-text-keys",
    "name-collision",
    "long-name",
    "stacked-pickle",
    "trailing-bytes",
    "truncated-pickle",
    "unknown-global",
    "dangerous-global",
    "not-a-dict",
    "byteorder-big",
    "no-version",
]


def _nest(flat: list[tuple[str, Any]], d: Draw) -> Any:
    """The state dict as a training script saves it: plain, under a model key, with an optimizer, or a module."""
    shape = d.int(0, 4)
    state = ODict(flat, {"_metadata": ODict([("", {"version": 1})])}) if d.flag(0.7) else dict(flat)
    if shape == 0:
        return state
    if shape == 1:
        return {"model": state, "epoch": 3}
    if shape == 2:
        opt = {
            "state": {i: {"step": 1, "exp_avg": v} for i, (_, v) in enumerate(flat[:2])},
            "param_groups": [{"lr": 0.1, "params": list(range(len(flat)))}],
        }
        return {"state_dict": state, "optimizer": opt, "epoch": 1}
    if shape == 3:
        return {"state_dict": {f"model.{k}": v for k, v in flat}, "pytorch-lightning_version": "2.0", "callbacks": {}}
    # A whole nn.Module: _parameters, _buffers and _modules, pickled by copyreg.
    params = ODict([(str(k).replace(".", "_"), v) for k, v in flat[: len(flat) // 2]])
    buffers = ODict([(str(k).replace(".", "_"), v) for k, v in flat[len(flat) // 2 :]])
    module_state = {
        "training": True,
        "_parameters": params,
        "_buffers": buffers,
        "_non_persistent_buffers_set": set(),
        "_modules": ODict([]),
    }
    return NewObj(G("copyreg", "__newobj__") if d.flag(0.1) else G("sample_nets", "Net"), (), module_state)


def torch_save_pickle(
    d: Draw, tensors: list[TSpec], storages: dict[str, Storage], which: list[str], over: dict[str, Any]
) -> bytes:
    memo: dict[str, Any] = {}
    flat: list[tuple[Any, Any]] = [(t.name, tensor_node(t, storages, over, memo)) for t in tensors]
    for c in which:
        if c == "odd-values":
            flat.append((f"extra{len(flat)}", odd_value(d)))
        elif c == "deep-nesting":
            flat.append(("deep", deep(d.choice([150, 199, 201, 400]), flat[0][1] if flat else 0)))
        elif c == "billion-laughs":
            leaf = flat[0][1] if flat and d.flag(0.5) else "lol"
            flat.append(("laughs", laughs(d.choice([2, 3, 10]), d.choice([8, 20, 40, 64]), leaf)))
        elif c == "self-reference":
            x: list = [flat[0][1] if flat else 1]
            x.append(x)
            flat.append(("cycle", x))
        elif c == "shared-subtree" and flat:
            sub = {"a": flat[0][1], "b": [flat[-1][1]]}
            flat += [(f"shared{i}", sub) for i in range(d.choice([2, 5, 150]))]
        elif c == "non-text-keys" and flat:
            v = flat[0][1]
            flat[0] = (d.choice([0, -1, 2**70, 1.5, None, ("a", 1), b"k", True, G("torch", "float32")]), v)
        elif c == "name-collision" and flat:
            flat.append(("a.b", flat[0][1]))
            flat.append(("a", {"b": flat[-1][1]}))
        elif c == "long-name" and flat:
            flat.append(("n" * d.choice([1000, 65_536, 200_000]), flat[0][1]))
        elif c == "unknown-global":
            flat.append(("obj", Call(G("mypkg.mod", "Config"), ({"a": 1},))))
        elif c == "dangerous-global":
            flat.append(("x", Call(G("os", "system"), ("true",)) if d.flag(0.5) else G("builtins", "eval")))
    obj = _nest(flat, d) if flat else {}
    if "not-a-dict" in which:
        obj = d.choice([flat[0][1] if flat else 1, [v for _, v in flat], None, "text", 7])
    data = dumps(obj if not any(type(k) is not str for k, _ in flat) else Pairs(flat))
    if "stacked-pickle" in which:
        data += dumps(d.choice([1, G("os", "system"), {"a": [1, 2]}]))
    if "trailing-bytes" in which:
        data += d.choice([b"\x00", b"garbage", b"\x80\x02K\x01"])
    if "truncated-pickle" in which:
        data = data[: d.int(2, max(2, len(data) - 1))]
    return data


def torch_save_spec(
    d: Draw,
    tensors: list[TSpec],
    storages: dict[str, Storage],
    which: list[str],
    root: str = "archive",
    over: dict[str, Any] | None = None,
) -> ZipSpec:
    spec = ZipSpec()
    spec.add(f"{root}/data.pkl", torch_save_pickle(d, tensors, storages, which, over or {}))
    spec.add(f"{root}/byteorder", b"big" if "byteorder-big" in which else b"little")
    for key, st in storages.items():
        spec.add(f"{root}/data/{key}", st.data)
    if "no-version" not in which:
        spec.add(f"{root}/version", b"3\n")
    spec.add(f"{root}/.data/serialization_id", b"0" * 40)
    return spec


def torch_save_bytes(
    d: Draw, tensors: list[TSpec], storages: dict[str, Storage], which: list[str], root: str = "archive"
) -> bytes:
    over = corrupt_tensors(d, [c for c in which if c in TENSOR_CORRUPTIONS], tensors, storages)
    spec = torch_save_spec(d, tensors, storages, which, root, over)
    corrupt_zip_spec(d, [c for c in which if c in ZIP_CORRUPTIONS], spec)
    return corrupt_zip_bytes(d, [c for c in which if c in ZIP_CORRUPTIONS], write_zip(spec))


@dataclass
class Built:
    """What a generator made: the path to read and what was done to it."""

    family: str
    path: Path
    corruptions: list[str]


def gen_torchzip(d: Draw, folder: Path) -> Built:
    which = corruptions(d, TENSOR_CORRUPTIONS + CONTAINER_CORRUPTIONS + ZIP_CORRUPTIONS)
    tensors, storages = gen_tensors(d)
    root = d.choice(["archive", "model", "a.b", "x" * 100]) if d.flag(0.3) else "archive"
    p = folder / d.choice(["model.pt", "model.pth", "model.bin", "run.ckpt"])
    p.write_bytes(torch_save_bytes(d, tensors, storages, which, root))
    return Built("torchzip", p, which)


# ---------------------------------------------------------------------------------------------- nested


NESTED_CORRUPTIONS = [
    "inner-bomb",
    "inner-deflated",
    "inner-two-pickles",
    "inner-no-pickle",
    "inner-crc",
    "inner-truncated",
    "inner-dtype-lie",
    "inner-huge-claim",
]


def nested_archive(
    d: Draw, which: list[str], dtype: str | None = None, shape: tuple | None = None
) -> tuple[bytes, TSpec | None]:
    """A torch.save archive of one tensor (or small object), as DCP chunks, pt2 pickled weights and sample
    inputs hold them; ``which`` may corrupt it from inside."""
    dtype = dtype or d.choice(COMMON_DTYPES)
    shape = shape if shape is not None else gen_shape(d)
    stride = contiguous(shape)
    numel = extent(shape, stride, 0)
    saved_dtype = d.choice(ALL_DTYPES) if "inner-dtype-lie" in which else dtype
    t = TSpec("t", saved_dtype, shape, stride, 0, "0", v3=DTYPES[saved_dtype][0] is None)
    storages = {"0": Storage(saved_dtype, numel, values(d, numel * DTYPES[saved_dtype][1]))}
    if "inner-huge-claim" in which:
        storages["0"].numel = 2**40
    memo: dict[str, Any] = {}
    root = d.choice(["archive", "chunk", "model"])
    spec = ZipSpec()
    if "inner-no-pickle" not in which:
        spec.add(f"{root}/data.pkl", dumps(tensor_node(t, storages, {}, memo)), "inner-deflated" in which)
    if "inner-two-pickles" in which:
        spec.add(f"x{root}/data.pkl", dumps(1))
    spec.add(f"{root}/byteorder", b"little")
    data = storages["0"].data
    if "inner-bomb" in which:
        data += bytes(d.choice([1 << 20, 1 << 24]))
    spec.add(f"{root}/data/0", data, "inner-bomb" in which or "inner-deflated" in which)
    spec.add(f"{root}/version", b"3\n")
    out = write_zip(spec)
    if "inner-crc" in which:
        out = corrupt_zip_bytes(d, ["crc-wrong"], out)
    if "inner-truncated" in which:
        out = out[: d.int(0, len(out) - 1)]
    return out, t


def gen_nested(d: Draw, folder: Path) -> Built:
    """A torch.save archive whose storage members, or whose values, are archives themselves."""
    which = corruptions(d, NESTED_CORRUPTIONS + ZIP_CORRUPTIONS + ["outer-holds-zip-as-bytes", "zip-in-storage"])
    tensors, storages = gen_tensors(d, most=3)
    if not tensors:
        tensors, storages = [TSpec("w", "uint8", (0,), (1,), 0, "0")], {"0": Storage("uint8", 0, b"")}
    inner, _ = nested_archive(d, which)
    # The archive lies in a uint8 storage (as torch.save of a bytes tensor would), or in a pickled bytes value.
    key = str(len(storages))
    storages[key] = Storage("uint8", len(inner), inner)
    tensors.append(TSpec("blob", "uint8", (len(inner),), (1,), 0, key))
    if "zip-in-storage" in which:
        storages[tensors[0].key].data = inner
    extra: list[str] = ["odd-values"] if "outer-holds-zip-as-bytes" in which else []
    data = torch_save_bytes(d, tensors, storages, [c for c in which if c in ZIP_CORRUPTIONS] + extra)
    p = folder / "nested.pt"
    p.write_bytes(data)
    return Built("nested", p, which)


# ------------------------------------------------------------------------------------------------- DCP


DCP_CORRUPTIONS = [
    "chunk-overlap",
    "chunk-gap",
    "chunk-past-shape",
    "chunk-rank",
    "span-past-file",
    "span-short",
    "span-shared",
    "span-offset-huge",
    "path-dotdot",
    "path-absolute",
    "path-symlink-out",
    "path-missing",
    "path-is-dir",
    "path-nul",
    "metadata-trailing",
    "metadata-truncated",
    "metadata-not-metadata",
    "metadata-empty",
    "size-huge",
    "size-not-ints",
    "size-laughs",
    "dtype-odd",
    "chunks-not-list",
    "bytes-entry-global",
    "bytes-entry-laughs",
    "bytes-entry-zip",
    "bytes-entry-missing",
    "planner-odd",
    "storage-data-none",
    "transforms",
    "key-odd",
    "unknown-entry",
    "stray-file",
    "no-distcp",
    "chunk-archive-wrong-dtype",
    "chunk-archive-wrong-shape",
    "chunk-archive-corrupt",
    "chunk-archive-bomb",
    "chunk-archive-odd-size",
    "many-chunks",
]


def _dcp_blocks(d: Draw, shape: tuple, which: list[str]) -> list[tuple[tuple, tuple]]:
    """Chunks (offsets, sizes) tiling ``shape`` along dim 0, sometimes made to overlap or leave a gap."""
    if not shape or shape[0] < 2 or d.flag(0.5):
        return [((0,) * len(shape), tuple(shape))]
    cut = d.int(1, shape[0] - 1)
    a = ((0,) * len(shape), (cut, *shape[1:]))
    b = ((cut, *(0,) * (len(shape) - 1)), (shape[0] - cut, *shape[1:]))
    if "chunk-overlap" in which and cut >= 1:
        # The same element count, but the second chunk starts one row early: rows overlap, the last one is missed.
        b = ((cut - 1, *(0,) * (len(shape) - 1)), (shape[0] - cut, *shape[1:]))
    elif "chunk-gap" in which:
        b = ((cut, *(0,) * (len(shape) - 1)), (shape[0] - cut - 1, *shape[1:]))
    return [a, b]


def gen_dcp(d: Draw, folder: Path) -> Built:
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    which = corruptions(d, DCP_CORRUPTIONS, 4)
    ck = folder / "ckpt"
    ck.mkdir()
    nfiles = d.int(1, 3)
    files = [bytearray() for _ in range(nfiles)]
    names = [f"__{i}_0.distcp" for i in range(nfiles)]
    sdm: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    planner: dict[str, Any] = {}
    count = d.int(0, 5)
    top = d.choice(["model", "state_dict", "app"]) if d.flag(0.7) else None
    for i in range(count):
        name = f"{d.choice(MODULES)}.{d.choice(NAMES)}{i}"
        fqn = f"{top}.{name}" if top else name
        dtype = d.choice(COMMON_DTYPES)
        shape = gen_shape(d)
        blocks = _dcp_blocks(d, shape, which)
        if "chunk-past-shape" in which and i == 0:
            offs, sizes = blocks[-1]
            blocks[-1] = (offs, tuple(s + 1 for s in sizes))
        if "chunk-rank" in which and i == 0:
            offs, sizes = blocks[0]
            blocks[0] = ((*offs, 0), sizes)
        if "many-chunks" in which and i == 0:
            blocks = blocks * d.choice([2, 100])
        chunks = []
        for offs, sizes in blocks:
            f = d.int(0, nfiles - 1)
            which_inner = []
            if "chunk-archive-wrong-dtype" in which:
                which_inner.append("inner-dtype-lie")
            if "chunk-archive-corrupt" in which:
                which_inner.append(d.choice(["inner-crc", "inner-truncated", "inner-no-pickle", "inner-two-pickles"]))
            if "chunk-archive-bomb" in which:
                which_inner.append("inner-bomb")
            block_shape = tuple(sizes)
            if "chunk-archive-wrong-shape" in which:
                block_shape = (*block_shape, 1) if d.flag(0.5) else tuple(s + 1 for s in block_shape)
            try:
                blob, _ = nested_archive(d, which_inner, dtype, block_shape)
            except (OverflowError, MemoryError, ValueError):
                blob = b"PK\x05\x06" + bytes(18)
            if "chunk-archive-odd-size" in which:
                blob += b"\x00" * d.int(1, 3)
            offset = len(files[f])
            files[f] += blob
            length = len(blob)
            if "span-short" in which:
                length = max(0, length - d.int(1, 64))
            if "span-past-file" in which:
                length += d.choice([1, 4096, 2**40])
            if "span-offset-huge" in which:
                offset = d.choice([2**40, 2**63 - 1, -1])
            rel = names[f]
            if "span-shared" in which and chunks:
                offset, length = (
                    storage[MetadataIndex(fqn, chunks[0].offsets)].offset,
                    storage[MetadataIndex(fqn, chunks[0].offsets)].length,
                )
            storage[MetadataIndex(fqn, torch.Size(offs))] = _StorageInfo(rel, offset, length)
            chunks.append(ChunkStorageMetadata(torch.Size(offs), torch.Size(sizes)))
        size: Any = torch.Size(shape)
        if "size-huge" in which and i == 0:
            size = torch.Size((d.choice(HUGE[:4]), *shape))  # the chunks stay as they were: small
        if "size-not-ints" in which and i == 0:
            size = d.choice([[1.5], ("a",), None, [True], 7])
        if "size-laughs" in which and i == 0:
            size = laughs(2, d.choice([20, 40]), 1)
        props = TensorProperties(dtype=getattr(torch, dtype))
        if "dtype-odd" in which and i == 0:
            props.dtype = d.choice(["float32", None, 7, torch.float32])  # type: ignore[assignment]
        tsm = TensorStorageMetadata(props, size, chunks)
        if "chunks-not-list" in which and i == 0:
            tsm.chunks = d.choice([None, tuple(chunks), {"a": 1}, laughs(2, 30, 0)])  # type: ignore[assignment]
        sdm[fqn] = tsm
        planner[fqn] = (top, name) if top else (name,)
    # Non-tensor entries: pickled objects torch's loader unpickles unrestricted.
    nbytes_entries = d.int(0, 2)
    for j in range(nbytes_entries):
        fqn = d.choice(["epoch", "step", "optim.param_groups.0.lr", "rng", "config"]) + str(j)
        obj: Any = {"v": j}
        if "bytes-entry-global" in which:
            obj = Call(G("os", "system"), ("true",)) if d.flag(0.5) else Call(G("mypkg", "Thing"), (1,))
        if "bytes-entry-laughs" in which:
            obj = laughs(d.choice([2, 10]), d.choice([20, 40, 60]))
        blob = dumps(obj)
        if "bytes-entry-zip" in which:
            blob = write_zip(ZipSpec([("archive/data.pkl", blob, d.flag(0.5)), ("archive/version", b"3\n", False)]))
        f = d.int(0, nfiles - 1)
        offset = len(files[f])
        files[f] += blob
        sdm[fqn] = BytesStorageMetadata()
        if "bytes-entry-missing" not in which:
            storage[MetadataIndex(fqn)] = _StorageInfo(names[f], offset, len(blob))
        planner[fqn] = tuple(fqn.split("."))
    if "unknown-entry" in which:
        sdm["mystery"] = d.choice([1, "x", None, [1, 2]])
    if "key-odd" in which and sdm:
        k = next(iter(sdm))
        sdm[d.choice(ODD_NAMES) or "x"] = sdm.pop(k)
    # Paths that leave the folder, or name nothing usable.
    if storage and any(c.startswith("path-") for c in which):
        idx = d.choice(list(storage))
        info = storage[idx]
        if "path-dotdot" in which:
            (folder / "outside.distcp").write_bytes(bytes(files[0]))
            storage[idx] = _StorageInfo("../outside.distcp", info.offset, info.length)
        if "path-absolute" in which:
            storage[idx] = _StorageInfo(str((folder / "outside.distcp").resolve()), info.offset, info.length)
        if "path-symlink-out" in which:
            (folder / "outside.distcp").write_bytes(bytes(files[0]))
            os.symlink(os.path.join("..", "outside.distcp"), ck / "link.distcp")
            storage[idx] = _StorageInfo("link.distcp", info.offset, info.length)
        if "path-missing" in which:
            storage[idx] = _StorageInfo("__9_0.distcp", info.offset, info.length)
        if "path-is-dir" in which:
            (ck / "sub.distcp").mkdir()
            storage[idx] = _StorageInfo("sub.distcp", info.offset, info.length)
        if "path-nul" in which:
            storage[idx] = _StorageInfo("a\x00b.distcp", info.offset, info.length)
    if "transforms" in which and storage:
        idx = d.choice(list(storage))
        info = storage[idx]
        storage[idx] = _StorageInfo(
            info.relative_path, info.offset, info.length, transform_descriptors=d.choice([["zstd"], [1], "zstd"])
        )  # type: ignore[call-arg]
    md = Metadata(state_dict_metadata=sdm, planner_data=planner, storage_data=storage)
    if "planner-odd" in which:
        md.planner_data = d.choice([None, [1, 2], {"a": "b"}, {k: laughs(2, 20) for k in list(planner)[:1]}])
    if "storage-data-none" in which:
        md.storage_data = d.choice([None, [], "x"])
    data = _pickle_metadata(md)
    if "metadata-not-metadata" in which:
        data = dumps(d.choice([{"state_dict_metadata": {}}, [1], Call(G("os", "system"), ("true",)), 5]))
    if "metadata-trailing" in which:
        data += b"\x00trailing"
    if "metadata-truncated" in which:
        data = data[: d.int(0, max(0, len(data) - 1))]
    if "metadata-empty" in which:
        data = b""
    (ck / ".metadata").write_bytes(data)
    if "no-distcp" not in which:  # else a .metadata alone: not a DCP folder, and its spans name nothing
        for name, content in zip(names, files, strict=True):
            (ck / name).write_bytes(bytes(content))
    if "stray-file" in which:
        (ck / "__7_0.distcp").write_bytes(b"left over")
    target = ck if d.flag(0.8) else ck / ".metadata"
    return Built("dcp", target, which)


def _pickle_metadata(md: Any) -> bytes:
    """The Metadata as DCP's writer pickles it (plain pickle of torch's dataclasses). Corrupted fields hold
    values pickle can write as they are; anything else (a laughs DAG, a Call node) goes through our writer."""
    import pickle

    try:
        return pickle.dumps(md, protocol=2)
    except (TypeError, pickle.PicklingError, RecursionError, AttributeError):
        pass
    # A field holding one of this module's nodes: pickle torch's objects field by field with our writer.
    return dumps(_as_nodes(md, {}))


def _as_nodes(x: Any, memo: dict[int, Any]) -> Any:
    """torch's dataclasses (and torch.Size, dtypes) as pickle nodes, the way pickle writes them."""
    import copyreg

    import torch

    if id(x) in memo:
        return memo[id(x)]
    if isinstance(x, torch.Size):
        out: Any = Call(G("torch", "Size"), (tuple(x),))
    elif isinstance(x, torch.dtype):
        out = G("torch", str(x).removeprefix("torch."))
    elif (
        isinstance(x, (G, Call, NewObj, PID, Pairs, ODict, Raw))
        or x is None
        or isinstance(x, (int, float, str, bytes, bool))
    ):
        out = x
    elif isinstance(x, list):
        out = []
        memo[id(x)] = out
        out.extend(_as_nodes(v, memo) for v in x)
        return out
    elif isinstance(x, tuple):
        out = tuple(_as_nodes(v, memo) for v in x)
    elif isinstance(x, dict):
        out = Pairs([(_as_nodes(k, memo), _as_nodes(v, memo)) for k, v in x.items()])
    else:
        cls = type(x)
        reduce = x.__reduce_ex__(2)
        if isinstance(reduce, tuple) and reduce[0] is copyreg.__newobj__:
            state = reduce[2] if len(reduce) > 2 else None
            out = NewObj(
                G(cls.__module__, cls.__qualname__),
                tuple(_as_nodes(a, memo) for a in reduce[1][1:]),
                _as_nodes(state, memo),
            )
        else:
            out = Call(
                G(getattr(reduce[0], "__module__", "builtins"), reduce[0].__qualname__),
                tuple(_as_nodes(a, memo) for a in reduce[1]),
            )
    memo[id(x)] = out
    return out


# ------------------------------------------------------------------------------------------------- pt2


PT2_CORRUPTIONS = [
    "dtype-code",
    "sizes-symbolic",
    "sizes-huge",
    "sizes-odd",
    "stride-rank",
    "offset-past",
    "member-missing",
    "member-size-odd",
    "member-empty",
    "path-name-odd",
    "use-pickle-not-bool",
    "pickled-weight",
    "pickled-weight-wrong-dtype",
    "pickled-weight-bomb",
    "pickled-weight-bare",
    "pickled-weight-dangerous",
    "opaque-constant",
    "sample-inputs",
    "sample-inputs-deep",
    "sample-inputs-laughs",
    "signature-missing",
    "signature-odd",
    "spec-unnamed",
    "both-param-and-buffer",
    "listed-not-stored",
    "stored-not-listed",
    "in-both-configs",
    "config-not-object",
    "json-deep",
    "json-duplicate-keys",
    "json-huge-number",
    "json-invalid",
    "archive-format",
    "archive-version",
    "two-models",
    "model-name-odd",
    "aoti",
    "legacy-weights",
    "no-models",
    "device-odd",
]


def gen_pt2(d: Draw, folder: Path) -> Built:
    which = corruptions(d, PT2_CORRUPTIONS + ["zip:" + z for z in ZIP_CORRUPTIONS[:6]], 4)
    root = d.choice(["model", "archive", "export_x"])
    spec = ZipSpec()
    models = ["model"] if "two-models" not in which else ["model", "aux"]
    if "model-name-odd" in which:
        models = [d.choice(["", "a/b", "x" * 300, "..", "\x1b"])]
    for m in models:
        _pt2_model(d, which, spec, root, m)
    if "archive-format" not in which:
        spec.add(f"{root}/archive_format", b"pt2")
    else:
        spec.add(f"{root}/archive_format", d.choice([b"pt3", b"", b"x" * 10_000]))
    spec.add(f"{root}/archive_version", b"0" if "archive-version" not in which else d.choice([b"1", b"", b"\xff"]))
    spec.add(f"{root}/byteorder", b"little")
    spec.add(f"{root}/.data/version", b"1")
    if "aoti" in which:
        spec.members = [m for m in spec.members if "/models/" not in m[0]]
        spec.add(f"{root}/data/aotinductor/model/x.so", b"\x7fELF")
    if "legacy-weights" in which:
        spec.add(f"{root}/data/weights/model.pt", b"PK")
    if "no-models" in which:
        spec.members = [m for m in spec.members if "/models/" not in m[0]]
    zc = [c[4:] for c in which if c.startswith("zip:")]
    corrupt_zip_spec(d, zc, spec)
    p = folder / "program.pt2"
    p.write_bytes(corrupt_zip_bytes(d, zc, write_zip(spec)))
    return Built("pt2", p, which)


def _json_bytes(d: Draw, which: list[str], doc: Any) -> bytes:
    text = json.dumps(doc)
    if "json-deep" in which and d.flag(0.3):
        text = text[:-1] + ', "deep": ' + "[" * d.choice([100, 2000, 100_000]) + "]" * d.choice([0, 100, 2000]) + "}"
    if "json-duplicate-keys" in which and d.flag(0.3):
        text = text[:-1] + ', "config": {}}'
    if "json-huge-number" in which and d.flag(0.3):
        text = text.replace('"as_int": ', '"as_int": ' + "9" * d.choice([20, 5000]) + "0 * ", 1).replace("0 * ", "", 1)
    if "json-invalid" in which and d.flag(0.3):
        text = text[: d.int(0, len(text))]
    return text.encode("utf-8", "surrogatepass")


def _pt2_model(d: Draw, which: list[str], spec: ZipSpec, root: str, model: str) -> None:
    tensors, storages = gen_tensors(d, most=5)
    specs: list[dict[str, Any]] = []
    weights: dict[str, Any] = {}
    constants: dict[str, Any] = {}
    for i, t in enumerate(tensors):
        if t.kind != "dense":
            t.kind = "dense"
        st = storages.get(t.key)
        kind = d.choice(["parameter", "parameter", "buffer", "tensor_constant"])
        persistent = d.flag(0.8)
        if kind == "parameter":
            specs.append({"parameter": {"arg": {"name": f"p{i}"}, "parameter_name": t.name}})
        elif kind == "buffer":
            specs.append({"buffer": {"arg": {"name": f"b{i}"}, "buffer_name": t.name, "persistent": persistent}})
        else:
            specs.append({"tensor_constant": {"arg": {"name": f"c{i}"}, "tensor_constant_name": t.name}})
        into_weights = kind == "parameter" or (kind == "buffer" and persistent)
        folder = "weights" if into_weights else "constants"
        path_name = f"weight_{t.key}" if into_weights else f"tensor_{t.key}"
        tm: dict[str, Any] = {
            "dtype": DTYPES[st.dtype if st else t.dtype][3],
            "sizes": [{"as_int": s} for s in t.shape],
            "requires_grad": t.requires_grad,
            "device": {"type": "cpu", "index": None},
            "strides": [{"as_int": s} for s in t.stride],
            "storage_offset": {"as_int": t.offset},
            "layout": 7,
        }
        entry: dict[str, Any] = {
            "path_name": path_name,
            "is_param": kind == "parameter",
            "use_pickle": False,
            "tensor_meta": tm,
        }
        payload = st.data if st is not None else b""
        if i == 0:
            payload, entry = _pt2_corrupt_entry(d, which, entry, tm, payload, t)
        (weights if into_weights else constants)[t.name] = entry
        name = f"{root}/data/{folder}/{entry['path_name']}" if isinstance(entry.get("path_name"), str) else None
        missing = "member-missing" in which and i == 0
        if name is not None and not missing and not any(m[0] == name for m in spec.members):
            spec.add(name, payload)
    specs.append({"user_input": {"arg": {"as_tensor": {"name": "x"}}}})
    if "opaque-constant" in which:
        obj = Call(G("os", "system"), ("true",)) if d.flag(0.5) else {"k": 1}
        constants["opaque"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
        spec.add(f"{root}/data/constants/opaque_obj_0", dumps(obj) if d.flag(0.7) else dumps(obj)[:-3])
        specs.append({"custom_obj": {"arg": {"name": "obj"}, "custom_obj_name": "opaque"}})
    if "both-param-and-buffer" in which and tensors:
        specs.append({"buffer": {"arg": {"name": "dup"}, "buffer_name": tensors[0].name, "persistent": True}})
    if "listed-not-stored" in which:
        specs.append({"parameter": {"arg": {"name": "ghost"}, "parameter_name": "ghost.weight"}})
    if "stored-not-listed" in which and specs and specs[0].get("parameter"):
        specs.pop(0)
    if "spec-unnamed" in which:
        specs.append(d.choice([{"parameter": {"arg": {}}}, {"buffer": "x"}, {}, {"a": 1, "b": 2}, [1]]))
    if "in-both-configs" in which and weights:
        k = next(iter(weights))
        constants[k] = weights[k]
    signature: Any = {"input_specs": specs, "output_specs": [{"user_output": {"arg": {"as_tensor": {"name": "y"}}}}]}
    if "signature-odd" in which:
        signature = d.choice([{"input_specs": None}, {"input_specs": {"a": 1}}, [], {"input_specs": laughs_json(d)}])
    program: dict[str, Any] = {
        "graph_module": {"graph": {"nodes": []}, "signature": signature},
        "schema_version": {"major": 8, "minor": 0},
    }
    if "signature-missing" in which:
        program = {"graph_module": d.choice([{}, None, []])}
    spec.add(f"{root}/models/{model}.json", _json_bytes(d, which, program))
    wdoc: Any = {"config": weights}
    if "config-not-object" in which:
        wdoc = d.choice([{"config": []}, {}, {"config": {"w": 1}}, []])
    spec.add(f"{root}/data/weights/{model}_weights_config.json", _json_bytes(d, which, wdoc))
    if constants or d.flag(0.5):
        spec.add(f"{root}/data/constants/{model}_constants_config.json", _json_bytes(d, which, {"config": constants}))
    if any(c.startswith("sample-inputs") for c in which) or d.flag(0.2):
        spec.add(f"{root}/data/sample_inputs/{model}.pt", _pt2_sample_inputs(d, which))


def laughs_json(d: Draw) -> Any:
    """Nested JSON lists, 3**depth leaves: JSON cannot share, so the text holds every one of them."""
    x: Any = 1
    for _ in range(d.int(3, 8)):
        x = [x] * 3
    return x


def _pt2_corrupt_entry(
    d: Draw, which: list[str], entry: dict[str, Any], tm: dict[str, Any], payload: bytes, t: TSpec
) -> tuple[bytes, dict[str, Any]]:
    if "dtype-code" in which:
        tm["dtype"] = d.choice([0, 14, 99, -1, "7", None, 7.0, 2**70])
    if "sizes-symbolic" in which:
        tm["sizes"] = [{"as_expr": {"expr_str": "s0"}}]
    if "sizes-huge" in which:
        tm["sizes"] = [{"as_int": d.choice(HUGE)} for _ in range(d.int(1, 3))]
        tm["strides"] = [{"as_int": 1} for _ in tm["sizes"]]
    if "sizes-odd" in which:
        tm["sizes"] = d.choice([None, {"as_int": 1}, [1, 2], [{"as_int": 1, "x": 2}], [{"as_int": "3"}], [{}] * 65])
    if "stride-rank" in which:
        tm["strides"] = tm["strides"] + [{"as_int": 1}]
    if "offset-past" in which:
        tm["storage_offset"] = {"as_int": d.choice([len(payload), 2**40, -1])}
    if "device-odd" in which:
        tm["device"] = d.choice([{"type": "cuda", "index": 2**70}, {"type": "x" * 1000}, "cpu", {"type": None}])
    if "member-size-odd" in which:
        payload = payload + b"\x01"
    if "member-empty" in which:
        payload = b""
    if "path-name-odd" in which:
        entry["path_name"] = d.choice(["../weight_0", "", "/abs", "a" * 300, None, 5, "weight 0", ".hidden"])
    if "use-pickle-not-bool" in which:
        entry["use_pickle"] = d.choice(["yes", 1, None])
    if any(c.startswith("pickled-weight") for c in which):
        entry["use_pickle"] = True
        inner_which = []
        if "pickled-weight-wrong-dtype" in which:
            inner_which.append("inner-dtype-lie")
        if "pickled-weight-bomb" in which:
            inner_which.append("inner-bomb")
        payload, _ = nested_archive(d, inner_which, t.dtype if t.dtype in DTYPES else "float32", t.shape)
        if "pickled-weight-bare" in which:
            payload = dumps({"w": 1} if d.flag(0.5) else laughs(2, 30))
        if "pickled-weight-dangerous" in which:
            payload = dumps(Call(G("os", "system"), ("true",)))
    return payload, entry


def _pt2_sample_inputs(d: Draw, which: list[str]) -> bytes:
    tensors, storages = gen_tensors(d, most=2)
    memo: dict[str, Any] = {}
    args: Any = tuple(tensor_node(t, storages, {}, memo) for t in tensors)
    if "sample-inputs-deep" in which:
        args = deep(d.choice([60, 70, 500]), args)
    if "sample-inputs-laughs" in which:
        args = laughs(d.choice([2, 10]), d.choice([20, 40]), args)
    spec = ZipSpec()
    spec.add("model/data.pkl", dumps((args, {})))
    for k, st in storages.items():
        spec.add(f"model/data/{k}", st.data)
    spec.add("model/version", b"3\n")
    return write_zip(spec)


# ---------------------------------------------------------------------------------------------- TorchScript


TS_CORRUPTIONS = [
    "decl-missing",
    "decl-twice",
    "list-twice",
    "list-unreadable",
    "list-unterminated",
    "list-escapes",
    "spaces-run",
    "class-not-declared",
    "setstate",
    "custom-class",
    "jit-tags",
    "shared-submodule",
    "submodule-cycle",
    "root-not-module",
    "root-is-tensor",
    "state-not-dict",
    "constants",
    "constants-not-tuple",
    "constants-missing-storage",
    "traced-inputs",
    "traced-inputs-laughs",
    "traced-inputs-bad-pid",
    "code-huge",
    "code-not-utf8",
    "module-name-odd",
    "training-odd",
    "attribute-key-odd",
    "pre-1.4-layout",
    "dangerous-global",
    "deep-modules",
]


def gen_torchscript(d: Draw, folder: Path) -> Built:
    which = corruptions(d, TS_CORRUPTIONS + TENSOR_CORRUPTIONS[:10] + ["zip:" + z for z in ZIP_CORRUPTIONS[:6]], 4)
    root = d.choice(["model", "archive", "cnn"])
    tensors, storages = gen_tensors(d, most=5)
    for t in tensors:
        t.kind = "dense"
    over = corrupt_tensors(d, [c for c in which if c in TENSOR_CORRUPTIONS], tensors, storages)
    memo: dict[str, Any] = {}
    nodes = {t.name: tensor_node(t, storages, over, memo) for t in tensors}
    # Modules: the root and up to two children, each its own class in its own code file.
    nmods = d.int(1, 3)
    mod_names = ["Net", "Block", "Head"][:nmods]
    qual = (
        "__torch__.sample_nets"
        if "module-name-odd" not in which
        else d.choice(["__torch__", "__torch__.a-b", "__torch__." + "m." * 40 + "x", "__torch__.\x1b"])
    )
    attrs: dict[str, dict[str, Any]] = {
        m: {"training": d.flag(0.2) if "training-odd" not in which else d.choice([1, "yes", None])} for m in mod_names
    }
    params: dict[str, list[str]] = {m: [] for m in mod_names}
    buffers: dict[str, list[str]] = {m: [] for m in mod_names}
    for name, node in nodes.items():
        m = d.choice(mod_names)
        key = name.replace(".", "_")
        attrs[m][key] = node
        which_list = d.choice([params, params, buffers, None])
        if which_list is not None:
            which_list[m].append(key)
    objs: dict[str, NewObj] = {}
    for m in reversed(mod_names):
        objs[m] = NewObj(G(qual, m), (), attrs[m])
    for i, m in enumerate(mod_names[1:], 1):
        attrs[mod_names[0]][f"sub{i}"] = objs[m]
    if "shared-submodule" in which and nmods > 1:
        attrs[mod_names[0]]["again"] = objs[mod_names[1]]
    if "submodule-cycle" in which and nmods > 1:
        attrs[mod_names[1]]["parent"] = objs[mod_names[0]]
    if "deep-modules" in which:
        chain: Any = objs[mod_names[-1]]
        for _ in range(d.choice([50, 199, 250])):
            chain = NewObj(G(qual, mod_names[-1]), (), {"training": True, "child": chain})
        attrs[mod_names[0]]["chain"] = chain
    if "jit-tags" in which:
        attrs[mod_names[0]]["ints"] = Call(G("torch.jit._pickle", "build_intlist"), ([1, 2, 3],))
        attrs[mod_names[0]]["tl"] = Call(G("torch.jit._pickle", "build_tensorlist"), (list(nodes.values())[:2],))
        attrs[mod_names[0]]["tag"] = Call(G("torch.jit._pickle", "restore_type_tag"), ({"a": 1}, "Dict[str, int]"))
    if "custom-class" in which:
        attrs[mod_names[0]]["packed"] = NewObj(
            G("__torch__.torch.classes.quantized", "LinearPackedParamsBase"), (), (list(nodes.values())[:1], None)
        )
    if "attribute-key-odd" in which and nodes:
        attrs[mod_names[0]][d.choice(ODD_NAMES)] = next(iter(nodes.values()))
    if "state-not-dict" in which:
        objs[mod_names[-1]] = NewObj(
            G(qual, mod_names[-1]), (), d.choice([(1, 2), [next(iter(nodes.values()))] if nodes else [1], "state"])
        )
        if nmods > 1:
            attrs[mod_names[0]][f"sub{nmods - 1}"] = objs[mod_names[-1]]
    if "dangerous-global" in which:
        attrs[mod_names[0]]["evil"] = (
            Call(G("os", "system"), ("true",)) if d.flag(0.5) else Call(G("builtins", "eval"), ("1",))
        )
    root_obj: Any = objs[mod_names[0]]
    if "root-not-module" in which:
        root_obj = d.choice([{"a": 1}, [1], NewObj(G("mypkg", "Thing"), (), {})])
    if "root-is-tensor" in which and nodes:
        root_obj = NewObj(G(qual, mod_names[0]), (), next(iter(nodes.values())))
    if "class-not-declared" in which:
        root_obj = NewObj(G(qual, "Undeclared"), (), attrs[mod_names[0]])

    spec = ZipSpec()
    spec.add(f"{root}/data.pkl", dumps(root_obj))
    parts = qual.split(".")
    code_path = f"{root}/code/{'/'.join(parts)}.py"
    spec.add(code_path, _ts_code(d, which, mod_names, params, buffers), True)
    spec.add(code_path + ".debug_pkl", dumps((0, "", 0)), True)
    for key, st in storages.items():
        spec.add(f"{root}/data/{key}", st.data)
    if "constants" in which or "constants-not-tuple" in which or "constants-missing-storage" in which or d.flag(0.3):
        ctensors, cstorages = gen_tensors(d, most=3)
        for t in ctensors:
            t.kind = "dense"
        cnodes = tuple(tensor_node(t, cstorages, {}, {}) for t in ctensors)
        cobj: Any = cnodes if "constants-not-tuple" not in which else d.choice([{"c": 1}, "x", 5])
        spec.add(f"{root}/constants.pkl", dumps(cobj))
        for key, st in cstorages.items():
            if "constants-missing-storage" in which:
                continue
            spec.add(f"{root}/constants/{key}", st.data)
    if any(c.startswith("traced-inputs") for c in which):
        itensors, istorages = gen_tensors(d, most=2)
        inodes: Any = tuple(tensor_node(t, istorages, {}, {}) for t in itensors)
        if "traced-inputs-laughs" in which:
            inodes = laughs(d.choice([2, 10]), d.choice([20, 40, 60]), inodes)
        if "traced-inputs-bad-pid" in which:
            inodes = (
                PID(
                    d.choice(
                        [
                            ("storage", 1, 2, 3, 4),
                            ("storage",),
                            "x",
                            ("storage", G("torch", "FloatStorage"), "0", "cpu", -5),
                        ]
                    )
                ),
            )
        spec.add(f"{root}/traced_inputs.pkl", dumps({"forward": inodes}))
    if "pre-1.4-layout" in which:
        spec.members = [m for m in spec.members if not m[0].endswith("/data.pkl")]
        spec.add(f"{root}/model.json", b"{}")
    spec.add(f"{root}/version", b"3\n")
    spec.add(f"{root}/byteorder", b"little")
    if "constants.pkl" not in " ".join(m[0] for m in spec.members):
        spec.add(f"{root}/constants.pkl", dumps(()))
    zc = [c[4:] for c in which if c.startswith("zip:")]
    corrupt_zip_spec(d, zc, spec)
    p = folder / "scripted.pt"
    p.write_bytes(corrupt_zip_bytes(d, zc, write_zip(spec)))
    return Built("torchscript", p, which)


def _ts_string(name: str) -> str:
    out = []
    for ch in name:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _ts_code(
    d: Draw, which: list[str], mods: list[str], params: dict[str, list[str]], buffers: dict[str, list[str]]
) -> bytes:
    lines: list[str] = []
    for m in mods:
        if "decl-missing" in which and m == mods[-1]:
            continue
        lines.append(f"class {m}(Module):")
        p_list = "".join(_ts_string(n) + ", " for n in params[m])
        b_list = "".join(_ts_string(n) + ", " for n in buffers[m])
        if "list-escapes" in which:
            p_list += '"a\\"b\\x41\\101\\n\\u1234", '
        lines.append(f"  __parameters__ = [{p_list}]")
        lines.append(f"  __buffers__ = [{b_list}]")
        if "list-twice" in which and m == mods[0]:
            lines.append("  __buffers__ = []")
        if "list-unreadable" in which and m == mods[0]:
            lines[-1] = "  __buffers__ = [weight, ]"
        if "list-unterminated" in which and m == mods[0]:
            lines[-1] = '  __buffers__ = ["weight'
        if "spaces-run" in which and m == mods[0]:
            lines.append("  __parameters__" + " " * d.choice([10_000, 200_000]) + "x")
        lines.append("  training : bool")
        lines.append(f"  def forward(self: __torch__.sample_nets.{m},\n    x: Tensor) -> Tensor:")
        lines.append("    return x")
        if "setstate" in which and m == mods[0]:
            lines.append("  def __setstate__(self: __torch__.sample_nets.Net, state: Tuple[int]) -> None:")
            lines.append("    return None")
    if "decl-twice" in which:
        lines += [f"class {mods[0]}(Module):", "  __parameters__ = []", "  __buffers__ = []"]
    text = "\n".join(lines) + "\n"
    if "code-huge" in which:
        text += "# " + "x" * d.choice([1 << 20, 8 << 20]) + "\n"
    data = text.encode("utf-8", "surrogatepass")
    if "code-not-utf8" in which:
        data = b"\xff\xfe" + data
    return data


# ---------------------------------------------------------------------------------------------- sharded


SHARD_CORRUPTIONS = [
    "path-dotdot",
    "path-absolute",
    "path-symlink-out",
    "path-missing",
    "path-is-dir",
    "path-index",
    "path-self",
    "path-odd",
    "tensor-not-in-shard",
    "tensor-not-in-index",
    "same-name-two-shards",
    "weight-map-not-object",
    "weight-map-value-odd",
    "metadata-odd",
    "index-invalid-json",
    "index-deep-json",
    "index-duplicate-keys",
    "shard-header-lie",
    "shard-offsets-overlap",
    "shard-header-huge",
    "shard-dtype-odd",
    "shard-statecli-metadata",
    "shard-bad-statecli-metadata",
    "mixed-formats",
    "empty-weight-map",
    "many-shards",
]


def safetensors_bytes(
    d: Draw, tensors: list[tuple[str, str, tuple]], which: list[str], metadata: dict[str, str] | None = None
) -> bytes:
    header: dict[str, Any] = {}
    data = bytearray()
    for name, dtype, shape in tensors:
        n = extent(shape, contiguous(shape), 0) * DTYPES[dtype][1]
        begin = len(data)
        data += values(d, n)
        header[name] = {"dtype": DTYPES[dtype][2], "shape": list(shape), "data_offsets": [begin, begin + n]}
    if "shard-offsets-overlap" in which and len(header) >= 2:
        first, second = list(header)[:2]
        header[second]["data_offsets"] = list(header[first]["data_offsets"])
    if "shard-dtype-odd" in which and header:
        header[next(iter(header))]["dtype"] = d.choice(["F33", "", None, 7, "bf16", "F8_E4M3"])
    if "shard-header-lie" in which and header:
        header[next(iter(header))]["shape"] = d.choice([[2**40], [-1], [1.5], "x", [2**64]])
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode("utf-8", "surrogatepass")
    if "shard-header-huge" in which and d.flag(0.5):
        raw += b" " * d.choice([1 << 16, 1 << 22])
    return struct.pack("<Q", len(raw)) + raw + bytes(data)


def gen_sharded(d: Draw, folder: Path) -> Built:
    which = corruptions(d, SHARD_CORRUPTIONS, 4)
    ck = folder / "ckpt"
    ck.mkdir()
    nshards = d.int(1, 3) if "many-shards" not in which else 40
    torch_shards = "mixed-formats" in which or d.flag(0.2)
    shard_names = [
        f"model-{i + 1:05d}-of-{nshards:05d}."
        + ("bin" if torch_shards and (i % 2 or "mixed-formats" not in which) else "safetensors")
        for i in range(nshards)
    ]
    weight_map: dict[str, Any] = {}
    per_shard: dict[str, list[tuple[str, str, tuple]]] = {s: [] for s in shard_names}
    for i in range(d.int(0, 6)):
        name = f"{d.choice(MODULES)}.{d.choice(NAMES)}{i}"
        s = d.choice(shard_names)
        per_shard[s].append((name, d.choice(COMMON_DTYPES), gen_shape(d)))
        weight_map[name] = s
    if "tensor-not-in-shard" in which:
        weight_map["ghost.weight"] = shard_names[0]
    if "tensor-not-in-index" in which:
        per_shard[shard_names[0]].append(("stray.weight", "float32", (2,)))
    if "same-name-two-shards" in which and nshards > 1 and per_shard[shard_names[0]]:
        per_shard[shard_names[1]].append(per_shard[shard_names[0]][0])
    for s, ts in per_shard.items():
        meta = None
        if "shard-statecli-metadata" in which and ts:
            meta = {
                "statecli": json.dumps(
                    {"schema": "statecli.roles/1", "roles": {ts[0][0]: "buffer"}, "aliases": {"tied.w": ts[0][0]}}
                )
            }
        if "shard-bad-statecli-metadata" in which and ts:
            meta = {
                "statecli": d.choice(
                    [
                        "{",
                        json.dumps({"schema": "statecli.roles/1", "aliases": {ts[0][0]: ts[0][0]}}),
                        json.dumps({"schema": "x"}),
                        json.dumps({"schema": "statecli.roles/1", "roles": laughs_json(d)}),
                    ]
                )
            }
        if s.endswith(".bin"):
            specs = []
            storages: dict[str, Storage] = {}
            for name, dtype, shape in ts:
                key = str(len(storages))
                numel = extent(shape, contiguous(shape), 0)
                storages[key] = Storage(dtype, numel, values(d, numel * DTYPES[dtype][1]))
                specs.append(TSpec(name, dtype, shape, contiguous(shape), 0, key, v3=DTYPES[dtype][0] is None))
            (ck / s).write_bytes(torch_save_bytes(d, specs, storages, [], "archive"))
        else:
            (ck / s).write_bytes(safetensors_bytes(d, ts, which, meta))
    # Names in the weight map that must not be followed, or name nothing usable.
    if weight_map and any(c.startswith("path-") for c in which):
        k = d.choice(list(weight_map))
        if "path-dotdot" in which:
            (folder / "outside.safetensors").write_bytes((ck / shard_names[0]).read_bytes())
            weight_map[k] = d.choice(["../outside.safetensors", "sub/../../outside.safetensors"])
        if "path-absolute" in which:
            weight_map[k] = str((ck / shard_names[0]).resolve()) if d.flag(0.5) else "/etc/hostname"
        if "path-symlink-out" in which:
            (folder / "outside.safetensors").write_bytes((ck / shard_names[0]).read_bytes())
            os.symlink(os.path.join("..", "outside.safetensors"), ck / "link.safetensors")
            weight_map[k] = "link.safetensors"
        if "path-missing" in which:
            weight_map[k] = "model-00009-of-00009.safetensors"
        if "path-is-dir" in which:
            (ck / "dir.safetensors").mkdir()
            weight_map[k] = "dir.safetensors"
        if "path-index" in which:
            weight_map[k] = "model.safetensors.index.json"
        if "path-self" in which:
            weight_map[k] = "."
        if "path-odd" in which:
            weight_map[k] = d.choice(["a\x00b", "C:\\x", "\\\\server\\share", "x" * 5000, " ", "sub/"])
    index: dict[str, Any] = {"metadata": {"total_size": d.int(0, 10**6)}, "weight_map": weight_map}
    if "weight-map-not-object" in which:
        index["weight_map"] = d.choice([[], None, "x", 5])
    if "weight-map-value-odd" in which and weight_map and isinstance(index["weight_map"], dict):
        index["weight_map"][next(iter(weight_map))] = d.choice([None, 5, "", ["a"], {"a": 1}])
    if "metadata-odd" in which:
        index["metadata"] = d.choice([None, [], "x", {"total_size": laughs_json(d)}, {"k": "\x1b[2K"}])
    if "empty-weight-map" in which:
        index["weight_map"] = {}
    text = json.dumps(index)
    if "index-invalid-json" in which:
        text = text[: d.int(0, len(text))]
    if "index-deep-json" in which:
        text = text[:-1] + ', "deep": ' + "[" * d.choice([1000, 100_000]) + "]" * d.choice([0, 1000]) + "}"
    if "index-duplicate-keys" in which:
        text = text[:-1] + ', "weight_map": {}}'
    name = "pytorch_model.bin.index.json" if torch_shards and d.flag(0.5) else "model.safetensors.index.json"
    (ck / name).write_text(text, encoding="utf-8", errors="surrogatepass")
    target = ck if d.flag(0.5) else ck / name
    return Built("sharded", target, which)


# ----------------------------------------------------------------------------------------------- legacy

MAGIC = 0x1950A86A20F9469CFC6C

LEGACY_CORRUPTIONS = [
    "magic-wrong",
    "protocol-wrong",
    "big-endian",
    "sys-info-odd",
    "keys-missing-one",
    "keys-extra",
    "keys-duplicate",
    "keys-not-list",
    "count-short",
    "count-negative",
    "count-huge",
    "truncated-data",
    "trailing-data",
    "view-metadata",
    "pid-odd",
    "module-pid",
    "tar-format",
    "plain-pickle",
    "truncated-pickles",
]


def gen_legacy(d: Draw, folder: Path) -> Built:
    which = corruptions(d, LEGACY_CORRUPTIONS + TENSOR_CORRUPTIONS[:12] + CONTAINER_CORRUPTIONS[:10], 4)
    tensors, storages = gen_tensors(d, most=5)
    for t in tensors:
        t.kind = "dense"
        t.v3 = False
        if DTYPES[t.dtype][0] is None:
            t.dtype = "float32"
    for st in storages.values():
        if DTYPES[st.dtype][0] is None:
            st.dtype = "uint8"
    over = corrupt_tensors(d, [c for c in which if c in TENSOR_CORRUPTIONS], tensors, storages)
    p = folder / "legacy.pt"
    if "tar-format" in which:
        p.write_bytes(_legacy_tar(d, tensors, storages))
        return Built("legacy", p, which)
    flat = []
    for t in tensors:
        st = storages.get(t.key)
        stype = over.get(t.name + "#stype", G("torch", DTYPES[st.dtype if st else t.dtype][0] or "FloatStorage"))
        view = None if "view-metadata" not in which else (t.key, 0, 1)
        pid: Any = ("storage", stype, over.get(t.name + "#key", t.key), t.location, st.numel if st else 1, view)
        if "pid-odd" in which:
            pid = d.choice([("storage",), ("storage", stype, t.key, "cpu", -1, None), ("x", 1), "storage"])
        node: Any = Call(
            G("torch._utils", "_rebuild_tensor"),
            (PID(pid), t.offset, over.get(t.name + "#shape", tuple(t.shape)), tuple(t.stride)),
        )
        if t.parameter:
            node = Call(G("torch._utils", "_rebuild_parameter"), (node, t.requires_grad, ODict([])))
        flat.append((t.name, node))
    if "module-pid" in which:
        flat.append(("mod", PID(("module", G("sample_nets", "Net"), "net.py", "class Net: pass"))))
    for c in which:
        if c == "billion-laughs":
            flat.append(("laughs", laughs(2, d.choice([20, 40]))))
        elif c == "deep-nesting":
            flat.append(("deep", deep(d.choice([150, 250]))))
        elif c == "odd-values":
            flat.append(("odd", odd_value(d)))
        elif c == "self-reference":
            x: list = []
            x.append(x)
            flat.append(("cycle", x))
    obj = ODict(flat)
    keys = sorted(storages)
    if "keys-missing-one" in which and keys:
        keys = keys[1:]
    if "keys-extra" in which:
        keys = [*keys, "999"]
    if "keys-duplicate" in which and keys:
        keys = [*keys, keys[0]]
    sys_info: Any = {
        "protocol_version": 1001,
        "little_endian": "big-endian" not in which,
        "type_sizes": {"short": 2, "int": 4, "long": 8},
    }
    if "sys-info-odd" in which:
        sys_info = d.choice([None, [], laughs(2, 20), "x"])
    out = bytearray()
    out += dumps(MAGIC if "magic-wrong" not in which else d.choice([0, MAGIC + 1, "magic"]))
    out += dumps(1001 if "protocol-wrong" not in which else d.choice([1000, 1002, "1001", None]))
    out += dumps(sys_info)
    out += dumps(obj)
    out += dumps(keys if "keys-not-list" not in which else d.choice([tuple(keys), {"a": 1}, [1, 2], None]))
    if "truncated-pickles" in which:
        out = out[: d.int(0, len(out) - 1)]
    for k in keys:
        st = storages.get(k)
        n = st.numel if st else 0
        count = n
        if "count-short" in which:
            count = max(0, n - 1)
        if "count-negative" in which:
            count = -d.int(1, 10)
        if "count-huge" in which:
            count = d.choice([2**40, 2**62, 2**63 - 1])
        out += struct.pack("<q", count)
        out += st.data if st else b""
    if "truncated-data" in which:
        out = out[: d.int(0, len(out) - 1)]
    if "trailing-data" in which:
        out += b"\x00" * d.int(1, 100)
    if "plain-pickle" in which:
        out = bytearray(dumps(obj))
    p.write_bytes(bytes(out))
    return Built("legacy", p, which)


def _legacy_tar(d: Draw, tensors: list[TSpec], storages: dict[str, Storage]) -> bytes:
    """torch < 0.4's tar layout: sys_info, pickle, tensors, storages members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (
            ("sys_info", dumps({"little_endian": True})),
            ("pickle", dumps({"w": 1})),
            ("tensors", b"\x00" * 8),
            ("storages", b"\x00" * 8),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ safetensors


ST_CORRUPTIONS = [
    "alias-to-missing",
    "alias-to-alias",
    "alias-is-stored",
    "alias-to-itself",
    "alias-cycle",
    "roles-odd",
    "role-unknown-name",
    "non-persistent-parameter",
    "requires-grad-odd",
    "schema-odd",
    "metadata-not-json",
    "metadata-laughs",
    "metadata-not-strings",
    "many-aliases",
    "shard-offsets-overlap",
    "shard-dtype-odd",
    "shard-header-lie",
    "shard-header-huge",
]


def gen_safetensors(d: Draw, folder: Path) -> Built:
    """A safetensors file with the role table statecli's convert writes (roles, requires_grad,
    non_persistent, aliases), the table made inconsistent in targeted ways."""
    which = corruptions(d, ST_CORRUPTIONS, 4)
    tensors = [
        (f"{d.choice(MODULES)}.{d.choice(NAMES)}{i}", d.choice(COMMON_DTYPES), gen_shape(d)) for i in range(d.int(0, 5))
    ]
    names = [n for n, _, _ in tensors]
    roles: dict[str, Any] = {n: d.choice(["parameter", "buffer", "other"]) for n in names if d.flag(0.7)}
    aliases: dict[str, Any] = {}
    if names and d.flag(0.6):
        aliases[f"tied.{d.int(0, 9)}"] = d.choice(names)
    if "alias-to-missing" in which:
        aliases["ghost.alias"] = "ghost"
    if "alias-to-alias" in which and aliases:
        aliases["second.alias"] = next(iter(aliases))
    if "alias-is-stored" in which and names:
        aliases[names[0]] = names[-1]
    if "alias-to-itself" in which:
        aliases["self.alias"] = "self.alias"
    if "alias-cycle" in which:
        aliases.update({"a.x": "b.x", "b.x": "a.x"})
    if "many-aliases" in which and names:
        aliases.update({f"alias{i}": names[0] for i in range(d.choice([100, 5000]))})
    table: dict[str, Any] = {"schema": "statecli.roles/1", "roles": roles, "aliases": aliases}
    if names:
        table["requires_grad"] = {names[0]: d.choice([True, False])}
        if d.flag(0.3):
            table["non_persistent"] = [names[-1]]
    if "roles-odd" in which:
        table["roles"] = d.choice([[], "x", {n: d.choice(["weight", None, 1]) for n in names}])
    if "role-unknown-name" in which:
        table["roles"] = {**(roles if isinstance(roles, dict) else {}), "nobody": "buffer"}
    if "non-persistent-parameter" in which and names:
        table["roles"] = {names[0]: "parameter"}
        table["non_persistent"] = [names[0]]
    if "requires-grad-odd" in which:
        table["requires_grad"] = d.choice([[1], {"x": "yes"}, None])
    if "schema-odd" in which:
        table["schema"] = d.choice(["statecli.roles/2", None, 1])
    text = json.dumps(table)
    if "metadata-laughs" in which:
        table["aliases"] = laughs_json(d)
        text = json.dumps(table)
    if "metadata-not-json" in which:
        text = text[: d.int(0, len(text))]
    meta: Any = {"format": "pt", "statecli": text}
    if "metadata-not-strings" in which:
        meta = d.choice([{"statecli": table}, {"format": 1}, [], "x"])
    p = folder / "model.safetensors"
    p.write_bytes(safetensors_bytes(d, tensors, which, meta))
    return Built("safetensors", p, which)


# ------------------------------------------------------------------------------------------------ driver


FAMILIES: dict[str, Callable[[Draw, Path], Built]] = {
    "torchzip": gen_torchzip,
    "nested": gen_nested,
    "dcp": gen_dcp,
    "pt2": gen_pt2,
    "torchscript": gen_torchscript,
    "sharded": gen_sharded,
    "legacy": gen_legacy,
    "safetensors": gen_safetensors,
}


def build(family: str, d: Draw, folder: Path) -> Built:
    """Build one input of ``family`` in ``folder`` (an empty folder of its own)."""
    folder.mkdir(parents=True, exist_ok=True)
    return FAMILIES[family](d, folder)
