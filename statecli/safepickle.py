"""A restricted pickle reader: it builds inert data from a pickle without importing or calling anything.

Why our own opcode loop instead of ``pickle.Unpickler`` with ``find_class`` overridden: the C unpickler
grows its memo to twice the largest index it is given (one ``LONG_BINPUT 4294967295`` asks for 32 GiB),
has no limits on nesting or opcode count, and calls what ``find_class`` returns. Here:

- ``GLOBAL`` / ``STACK_GLOBAL`` / ``INST`` produce a :class:`Global`, a name and nothing more. Names
  are matched by exact string against :data:`HANDLERS`, never imported, never resolved by ``getattr``.
- ``REDUCE`` / ``NEWOBJ`` / ``OBJ`` on an allowlisted name run *our* pure function for it (building a
  :class:`TensorRef` for torch's tensor rebuild functions, a dict for ``OrderedDict``); on any other
  name they produce a :class:`Stub` recording the callee and its arguments. ``BUILD`` stores its state
  on the stub. Nothing the file names is ever called.
- Sizes the file claims are checked against the bytes that are there before anything is sliced.

Tensor bytes are never read: storages arrive through ``persistent_load`` as whatever the caller builds
(the torch zip reader validates them against the archive's members).
"""

from __future__ import annotations

import _compat_pickle
import re
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from statecli.clip import describe, describe_name
from statecli.clip import printable as printable  # re-exported: where the readers have always found it
from statecli.dtypes import DTYPES, STORAGE_TYPES
from statecli.errors import InputError, LimitExceededError

MAX_INDEX = 2**62  # element counts, offsets and strides beyond this are not real tensors
_U32 = struct.Struct("<I").unpack_from
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
# STACK_GLOBAL on operands that are not literal strings: the module "name" of such a global.
COMPUTED = "<computed>"
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


class Global:
    """A global the pickle names (``module``, ``name``). It is a name only: nothing is imported.

    ``handler`` is statecli's own pure function for an allowlisted name, looked up once here so the
    REDUCE fast path needs no dictionary lookup.
    """

    __slots__ = ("handler", "module", "name")

    def __init__(self, module: str, name: str, trusted: bool = True) -> None:
        self.module = module
        self.name = name
        # Untrusted: named after the pickle patched a module's attributes, so the name may no longer be
        # the function statecli knows (see RestrictedUnpickler._build).
        self.handler: Callable[[tuple[Any, ...]], Any] | None = HANDLERS.get((module, name)) if trusted else None

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return f"<global {self.qualname}>"


class Stub:
    """What the pickle would have built by calling or instantiating ``callee``; here it is inert data.

    ``kind`` is ``reduce``, ``newobj`` or ``inst``; ``state`` is what BUILD would have applied;
    ``items`` / ``dictitems`` what APPEND(S) / SETITEM(S) would have added.
    """

    __slots__ = ("args", "callee", "dictitems", "items", "kind", "state")

    def __init__(self, callee: Any, args: Any, kind: str) -> None:
        self.callee = callee
        self.args = args
        self.kind = kind
        self.state: Any = None
        self.items: list[Any] | None = None
        self.dictitems: dict[Any, Any] | None = None

    @property
    def class_name(self) -> str:
        c = self.callee
        if isinstance(c, Global):
            return c.qualname
        return "<computed>"

    def __repr__(self) -> str:
        return f"<stub {self.kind} {self.class_name}>"


class Action:
    """Something the pickle would make Python do under ``torch.load(weights_only=False)``, counted over every
    occurrence of the same ``kind`` and target. statecli does none of it; :mod:`statecli.security` judges it.

    ``kind``:

    - ``call``: REDUCE, INST or OBJ calls ``target`` (a :class:`Global`) with ``example`` as arguments;
    - ``instantiate``: NEWOBJ (or ``copyreg._reconstructor``, ``copyreg.__newobj__``) makes an instance of the
      class ``target`` without calling it: ``target.__new__`` runs, and ``setstate`` / ``fills`` say whether
      BUILD would call its ``__setstate__`` and SETITEM(S) / APPEND(S) its ``__setitem__`` / ``extend``;
    - ``call-on-value``: a call whose callee is not a global but a value the pickle built (a call's result,
      a string, a tensor): ``target`` is a text naming that value;
    - ``patch``: BUILD on a global (a module, class or function): pickle would set its attributes, so every
      name looked up after it may be something else (the overwritten-module attack);
    - ``build``: BUILD on the result of a call of ``target``, with a state that sets special (dunder)
      attributes (``__class__``, ``__setstate__``, ...), which can turn inert data into code.
    """

    __slots__ = ("count", "example", "fills", "kind", "setstate", "target")

    def __init__(self, kind: str, target: Any, example: str) -> None:
        self.kind = kind
        self.target = target  # a Global, or (call-on-value) a text naming the callee
        self.example = example  # the first occurrence's arguments (or state), as a bounded text
        self.count = 0
        self.setstate = False
        self.fills = False

    @property
    def name(self) -> str:
        t = self.target
        return t.qualname if isinstance(t, Global) else str(t)

    def __repr__(self) -> str:
        return f"<action {self.kind} {self.name} x{self.count}>"


class PickledDict(dict):  # type: ignore[type-arg]
    """A dict (or OrderedDict) from the pickle; ``attrs`` holds what BUILD set on it (``_metadata``)."""

    __slots__ = ("_attrs",)  # made on first use: a state dict holds one of these per tensor, nearly all bare

    @property
    def attrs(self) -> dict[str, Any]:
        try:
            return self._attrs
        except AttributeError:
            self._attrs: dict[str, Any] = {}
            return self._attrs


@dataclass(slots=True)
class StorageRef:
    """A tensor storage named by a persistent id; its bytes stay where they are."""

    key: str
    dtype: str
    location: str
    numel: int  # elements of ``dtype``
    nbytes: int


@dataclass(slots=True)
class TensorRef:
    """A tensor as torch would rebuild it: facts only."""

    storage: StorageRef | None
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...] | None
    dtype: str
    requires_grad: bool | None
    is_parameter: bool = False
    layout: str = "strided"
    device: str | None = None  # only where no storage says it (meta tensors)
    extra: list[TensorRef] | tuple[()] = ()  # sparse components, quantizer params

    # Hashed by identity, as torch tensors are: a whole pickled optimizer keys its ``state`` by Parameter.
    __hash__ = object.__hash__

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


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


def _as_int(v: Any, what: str) -> int:
    if type(v) is not int and not isinstance(v, bool):
        raise InputError(f"corrupt pickle: {what} is {type(v).__name__}, not an integer")
    return int(v)


def _as_shape(v: Any, what: str) -> tuple[int, ...]:
    if type(v) is tuple and len(v) <= 64:
        # The common case, checked without building anything new.
        for x in v:
            if type(x) is not int or x < 0 or x > MAX_INDEX:
                break
        else:
            return v
    if isinstance(v, Stub) and isinstance(v.callee, Global) and v.callee.qualname == "torch.Size":
        v = v.args[0] if v.args else ()
    if not isinstance(v, (tuple, list)):
        raise InputError(f"corrupt pickle: tensor {what} is {type(v).__name__}, not a tuple")
    if len(v) > 64:
        raise InputError(f"corrupt pickle: tensor {what} has {len(v)} dimensions")
    out = tuple(_as_int(x, what) for x in v)
    for x in out:
        if x < 0 or x > MAX_INDEX:
            raise InputError(f"corrupt pickle: tensor {what} {list(out)} has an impossible value")
    return out


def checked_numel(shape: tuple[int, ...]) -> int:
    """Element count of ``shape``, refusing products no real tensor has (Python ints never wrap)."""
    n = 1
    for s in shape:
        n *= s
        if n > MAX_INDEX:
            raise InputError(f"corrupt pickle: shape {list(shape)} overflows the element count")
    return n


def _dtype_name(v: Any) -> str:
    if isinstance(v, Global) and v.module == "torch" and v.name in DTYPES:
        return v.name
    raise InputError(f"corrupt pickle: expected a torch dtype, found {describe(v)}")


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None) -> TensorRef:
    if type(storage) is not StorageRef:
        raise InputError("corrupt pickle: a tensor's storage is not a storage record")
    if type(offset) is not int or offset < 0 or offset > MAX_INDEX:
        raise InputError(f"corrupt pickle: storage offset {describe(offset)} is impossible")
    return _checked_view(storage, offset, _as_shape(size, "shape"), _as_shape(stride, "stride"), dtype or storage.dtype)


def _checked_view(
    storage: StorageRef, offset: int, shape: tuple[int, ...], strides: tuple[int, ...], dt: str
) -> TensorRef:
    """A tensor record once its view is proven to stay inside ``storage`` (``shape`` and ``strides`` hold ints)."""
    if offset < 0 or offset > MAX_INDEX:
        raise InputError(f"corrupt pickle: storage offset {describe(offset)} is impossible")
    for x in shape:
        if x < 0 or x > MAX_INDEX:
            raise InputError(f"corrupt pickle: tensor shape {list(shape)} has an impossible value")
    if len(strides) != len(shape):
        raise InputError(f"corrupt pickle: tensor shape {list(shape)} and stride {list(strides)} differ in rank")
    numel = checked_numel(shape)
    if numel:
        # The last element a strided view touches must lie inside the storage it views.
        last = offset
        for s, st in zip(shape, strides, strict=True):
            if st < 0 or st > MAX_INDEX:
                raise InputError(f"corrupt pickle: tensor stride {list(strides)} has an impossible value")
            last += (s - 1) * st
        bits = DTYPES[dt].bits if dt in DTYPES else 8
        # Packed dtypes (quint4x2, quint2x4) hold several elements per storage byte.
        capacity = storage.nbytes // (bits // 8) if bits >= 8 else storage.nbytes * (8 // bits)
        if last >= capacity:
            raise InputError(
                f"corrupt pickle: a tensor of shape {list(shape)}, stride {list(strides)}, offset {offset} "
                f"reaches element {last} of storage {describe(storage.key)}, which holds {capacity} {dt} elements"
            )
    return TensorRef(storage, offset, shape, strides, dt, None)


def _with_grad(t: TensorRef, requires_grad: Any) -> TensorRef:
    t.requires_grad = bool(requires_grad) if isinstance(requires_grad, bool) else None
    return t


def _h_rebuild_tensor(args: tuple[Any, ...]) -> TensorRef:
    return _tensor(args[0], args[1], args[2], args[3], None)


def _h_rebuild_tensor_v2(args: tuple[Any, ...]) -> TensorRef:
    return _with_grad(_tensor(args[0], args[1], args[2], args[3], None), args[4])


def _h_rebuild_tensor_v3(args: tuple[Any, ...]) -> TensorRef:
    return _with_grad(_tensor(args[0], args[1], args[2], args[3], _dtype_name(args[6])), args[4])


def _h_rebuild_qtensor(args: tuple[Any, ...]) -> TensorRef:
    t = _with_grad(_tensor(args[0], args[1], args[2], args[3], None), args[5])
    t.layout = "quantized"
    qparams = args[4]
    if isinstance(qparams, tuple):
        t.extra = [q for q in qparams if isinstance(q, TensorRef)]
    return t


def _h_rebuild_parameter(args: tuple[Any, ...]) -> TensorRef:
    data = args[0]
    if not isinstance(data, TensorRef):
        raise InputError("corrupt pickle: a Parameter wraps something that is not a tensor")
    p = TensorRef(data.storage, data.offset, data.shape, data.stride, data.dtype, None, True, data.layout, data.device)
    p.extra = data.extra
    return _with_grad(p, args[1])


def _h_rebuild_meta(args: tuple[Any, ...]) -> TensorRef:
    shape = _as_shape(args[1], "shape")
    checked_numel(shape)
    t = TensorRef(None, 0, shape, _as_shape(args[2], "stride"), _dtype_name(args[0]), None, device="meta")
    return _with_grad(t, args[3])


def _h_rebuild_sparse(args: tuple[Any, ...]) -> TensorRef:
    layout, data = args[0], args[1]
    parts = [d for d in data if isinstance(d, TensorRef)] if isinstance(data, tuple) else []
    size = next((d for d in reversed(data) if isinstance(d, (tuple, Stub))), ()) if parts else ()
    shape = _as_shape(size, "shape") if size else ()
    values = parts[1] if len(parts) > 1 else (parts[0] if parts else None)
    name = layout.name if isinstance(layout, Global) else "sparse"
    t = TensorRef(None, 0, shape, None, values.dtype if values else "float32", False, layout=name)
    t.extra = parts
    return t


def _subclass_layout(t: TensorRef, new_type: Any) -> None:
    """Mark ``t`` as the tensor class ``new_type`` (``_rebuild_from_type_v2``'s second argument)."""
    if isinstance(new_type, Global):
        if new_type.qualname == "torch.nn.parameter.Parameter":
            t.is_parameter = True
        elif new_type.qualname != "torch.Tensor":
            t.layout = f"subclass:{new_type.qualname}"


def _h_device_from_cpu(args: tuple[Any, ...]) -> Any:
    t = args[0]
    if isinstance(t, TensorRef) and isinstance(args[2], str):
        t.device = args[2][:64]
        return _with_grad(t, args[3])
    return Stub(Global("torch._utils", "_rebuild_device_tensor_from_cpu_tensor"), args, "reduce")


_LAYOUTS = frozenset(
    {"strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn", "jagged"}
)


def _h_get_layout(args: tuple[Any, ...]) -> Any:
    """``torch.serialization._get_layout('torch.sparse_coo')``: a lookup among torch's layout objects,
    which sparse and wrapper-subclass tensors pickle; it runs nothing, so it is not a finding."""
    name = args[0] if args else None
    if isinstance(name, str) and name.startswith("torch.") and name[6:] in _LAYOUTS:
        return Global("torch", name[6:])
    return Stub(Global("torch.serialization", "_get_layout"), args, "reduce")


def _h_ordered_dict(args: tuple[Any, ...]) -> PickledDict:
    d = PickledDict()
    if args and isinstance(args[0], (list, tuple)):
        counts = HashCounts("dict key")
        for kv in args[0]:
            if isinstance(kv, (list, tuple)) and len(kv) == 2:
                counts.add(kv[0])
                d[kv[0]] = kv[1]
    return d


def _h_set(args: tuple[Any, ...]) -> Any:
    items = args[0] if args else ()
    if not isinstance(items, (list, tuple, set, frozenset)):
        return set()
    _check_items(items)
    return set(items)


def _check_items(items: Any) -> None:
    counts = HashCounts("set item")
    for x in items:
        counts.add(x)


def _h_frozenset(args: tuple[Any, ...]) -> Any:
    return frozenset(_h_set(args))


def _h_codecs_encode(args: tuple[Any, ...]) -> Any:
    # Protocol 2 pickles bytes as _codecs.encode(text, 'latin1'); only that exact form is honoured.
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return args[0].encode("latin1")
    return Stub(Global("_codecs", "encode"), args, "reduce")


def _h_bytes(args: tuple[Any, ...]) -> Any:
    # Protocols 0-2 write b"" as bytes(); only that exact empty call is honoured.
    return b"" if args == () else Stub(Global("builtins", "bytes"), args, "reduce")


def _h_size(args: tuple[Any, ...]) -> Any:
    return tuple(args[0]) if args and isinstance(args[0], (tuple, list)) else ()


def _h_inert(args: tuple[Any, ...]) -> Any:
    return None


# torch.relu and its kind are methods of torch._C._VariableFunctionsClass; pickle writes each as
# ``getattr(torch._C._VariableFunctionsClass, 'relu')``. These names (activations a module stores) are read
# as the global ``torch.<name>``; any other getattr stays a call of getattr.
TORCH_FUNCTIONS = ("relu", "tanh", "sigmoid", "softmax", "log_softmax", "prelu", "hardshrink")
_TORCH_UTILS = ("torch._utils", "torch._tensor")
HANDLERS: dict[tuple[str, str], Callable[[tuple[Any, ...]], Any]] = {
    ("collections", "OrderedDict"): _h_ordered_dict,
    ("builtins", "set"): _h_set,
    ("builtins", "frozenset"): _h_frozenset,
    ("builtins", "bytes"): _h_bytes,
    ("_codecs", "encode"): _h_codecs_encode,
    ("torch", "Size"): _h_size,
    ("torch._utils", "_rebuild_tensor"): _h_rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _h_rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _h_rebuild_tensor_v3,
    ("torch._utils", "_rebuild_qtensor"): _h_rebuild_qtensor,
    ("torch._utils", "_rebuild_parameter"): _h_rebuild_parameter,
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): _h_rebuild_meta,
    ("torch._utils", "_rebuild_sparse_tensor"): _h_rebuild_sparse,
    ("torch._utils", "_rebuild_device_tensor_from_cpu_tensor"): _h_device_from_cpu,
    # torch.device('cuda', 0) and the like: harmless values statecli does not need.
    ("torch", "device"): _h_inert,
    ("torch.serialization", "_get_layout"): _h_get_layout,
}

# Names that are data, not behaviour: storage types, dtypes, layouts, qschemes. They stay Globals.
ALLOWED_NAMES: frozenset[tuple[str, str]] = frozenset(
    [("torch", n) for n in STORAGE_TYPES]
    + [("torch.cuda", n) for n in STORAGE_TYPES]
    + [("torch", n) for n in DTYPES]
    + [
        ("torch", n)
        for n in (
            "per_tensor_affine",
            "per_channel_affine",
            "per_channel_affine_float_qparams",
            "per_tensor_symmetric",
            "per_channel_symmetric",
            "sparse_coo",
            "sparse_csr",
            "sparse_csc",
            "sparse_bsr",
            "sparse_bsc",
            "strided",
            "_mkldnn",
            "jagged",
            "contiguous_format",
            "channels_last",
            "channels_last_3d",
            "preserve_format",
            "Tensor",
        )
    ]
    + [("torch.nn.parameter", "Parameter"), ("torch", "Tensor"), ("torch.storage", "UntypedStorage")]
    # Plain builtin types, named as data (``copyreg._reconstructor(cls, object, None)``, dict factories).
    + [("builtins", n) for n in ("object", "dict", "list", "tuple", "str", "int", "float", "bool", "bytes")]
    + list(HANDLERS)
    + [("torch._tensor", "_rebuild_from_type_v2"), ("torch._utils", "_rebuild_parameter_with_state")]
    + [("copyreg", "_reconstructor"), ("copyreg", "__newobj__"), ("copyreg", "__newobj_ex__")]
)
# TorchBind classes a ``torch.ScriptObject`` in a whole quantized model is made as: their C++ ``__setstate__``
# repacks the state's tensors (prepacked weights of quantized linear, conv, embedding and RNN cell layers).
TORCHBIND_CLASSES = frozenset(
    f"__torch__.torch.classes.{n}"
    for n in (
        "quantized.LinearPackedParamsBase",
        "quantized.Conv2dPackedParamsBase",
        "quantized.Conv3dPackedParamsBase",
        "quantized.EmbeddingPackedParamsBase",
        "rnn.CellParamsBase",
        "sparse.LinearPackedParamsBase",
    )
)
# ``base`` arguments of ``copyreg._reconstructor`` whose ``__new__`` / ``__init__`` only build plain data.
_PLAIN_BASES = frozenset(
    ("builtins", n)
    for n in ("object", "dict", "list", "tuple", "str", "int", "float", "bool", "bytes", "set", "frozenset", "complex")
)


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


# What a call's arguments look like in a finding: each value clipped (see describe), at most four.
def args_text(args: Any) -> str:
    if not isinstance(args, tuple):
        return f"({describe(args, 1)})"
    inner = ", ".join(describe(x, 1) for x in args[:4])
    return f"({inner}{', …' if len(args) > 4 else ''})"


def _dunder_keys(state: Any) -> list[str]:
    """Special attribute names (``__class__``, ``__setstate__``) that a BUILD state would set: ``setattr`` of
    those on an inert object can make it code (an instance ``__setstate__`` is what the next BUILD calls)."""
    parts = state if type(state) is tuple and len(state) == 2 else (state,)
    found = []
    for part in parts:
        if isinstance(part, dict):
            for k in part:
                if type(k) is not str or (k[:2] == "__" and k[-2:] == "__"):
                    found.append(describe(k))
                    if len(found) >= 3:
                        return found
    return found


def _operand(v: Any) -> str:
    """How a STACK_GLOBAL operand that may not be a literal string is named in a finding."""
    if type(v) is str:
        return describe(v)
    if isinstance(v, Global):
        return f"the value of {describe_name(v.qualname)}"
    return f"the result of calling {describe_name(v.class_name)}"


def _no_fast_path(g: Any, pos: int, memo: Any, stack: Any) -> int:
    return 0


def _at(short: bytes | None, long: bytes | None) -> int:
    """A memo index from whichever form matched: one byte (``h``/``q``) or four (``j``/``r``)."""
    return short[0] if short is not None else int.from_bytes(long, "little")  # type: ignore[arg-type]


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


class RestrictedUnpickler:
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
        return Global(module, name, not self.tainted)

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

    def _act(self, kind: str, target: Any, example: Any) -> Action:
        """The :class:`Action` for ``kind`` on ``target``, counted once more; ``example`` (arguments or state)
        is described only the first time, so a million calls cost a million counts and one text."""
        if type(target) is Global:
            key = (kind, target.module, target.name)
        else:
            # Keyed by the kind of value only: a million distinct strings called must not be a million actions.
            target = f"a value the pickle built ({describe(target)})" if type(target) is not Stub else describe(target)
            key = (kind, "", "")
        action = self.actions.get(key)
        if action is None:
            text = describe(example) if kind == "patch" else args_text(example)
            action = self.actions[key] = Action(kind, target, text)
        action.count += 1
        return action

    def _call(self, callee: Any, args: Any, kind: str) -> Any:
        if type(callee) is not Global:
            # A call on a value: the result of an earlier call, a string, a tensor. No allow list can vouch
            # for what that is (torch's dotted-name importer returns any function).
            self._act("call-on-value", callee, args)
            return Stub(callee, args, kind)
        handler = callee.handler
        if handler is not None:
            if not isinstance(args, tuple):
                raise InputError(f"corrupt pickle: arguments to {callee.qualname} are not a tuple")
            try:
                return handler(args)
            except IndexError as e:
                raise InputError(f"corrupt pickle: too few arguments to {callee.qualname}") from e
        special = _SPECIAL.get((callee.module, callee.name)) if not self.tainted else None
        if special is not None and type(args) is tuple:
            return special(self, callee, args, kind)
        return self._plain_call(callee, args, kind)

    def _plain_call(self, callee: Global, args: Any, kind: str) -> Stub:
        # NEWOBJ runs cls.__new__(cls, *args) and no __init__; INST, OBJ and REDUCE call the callee.
        self._act("instantiate" if kind == "newobj" else "call", callee, args)
        return Stub(callee, args, kind)

    def _instance(self, cls: Any, args: tuple[Any, ...]) -> Any:
        """An object made without calling its class (``cls.__new__``): BUILD / SETITEM on it are recorded."""
        if type(cls) is not Global:
            self._act("call-on-value", cls, args)
            return Stub(cls, args, "newobj")
        if cls.handler is not None:  # OrderedDict, set: statecli's own value, as NEWOBJ on them makes
            return self._call(cls, (), "newobj")
        self._act("instantiate", cls, args)
        return Stub(cls, args, "newobj")

    def _reconstructor(self, callee: Global, args: tuple[Any, ...], kind: str) -> Any:
        """``copyreg._reconstructor(cls, base, state)``: ``object.__new__(cls)`` when ``base`` is ``object``,
        else ``base.__new__(cls, state)`` and ``base.__init__``: how protocols 0 and 1 pickle an object."""
        if len(args) != 3:
            raise InputError("corrupt pickle: copyreg._reconstructor takes three arguments")
        cls, base = args[0], args[1]
        if not (type(base) is Global and (base.module, base.name) in _PLAIN_BASES):
            # Another base's __new__ and __init__ run with the pickle's state: a call of that base.
            self._act("call" if type(base) is Global else "call-on-value", base, (cls, args[2]))
        return self._instance(cls, ())

    def _newobj(self, callee: Global, args: tuple[Any, ...], kind: str) -> Any:
        """``copyreg.__newobj__(cls, *args)``: ``cls.__new__(cls, *args)``, as NEWOBJ."""
        if not args:
            raise InputError("corrupt pickle: copyreg.__newobj__ without a class")
        return self._instance(args[0], args[1:])

    def _newobj_ex(self, callee: Global, args: tuple[Any, ...], kind: str) -> Any:
        """``copyreg.__newobj_ex__(cls, args, kwargs)``: ``cls.__new__(cls, *args, **kwargs)``."""
        if len(args) != 3:
            raise InputError("corrupt pickle: copyreg.__newobj_ex__ takes three arguments")
        return self._instance(args[0], (args[1], args[2]))

    def _from_type(self, callee: Global, args: tuple[Any, ...], kind: str) -> Any:
        """``torch._tensor._rebuild_from_type_v2(func, new_type, args, state)``: torch calls ``func(*args)``,
        makes the result an instance of ``new_type`` and sets ``state`` on it. Each part is judged: ``func``
        is a call like any other (a gadget hides a call here), ``new_type`` an instantiation."""
        if len(args) < 3:
            raise InputError(f"corrupt pickle: too few arguments to {callee.qualname}")
        func, new_type, inner = args[0], args[1], args[2]
        if type(func) is Global and func.handler is not None and type(inner) is tuple:
            try:
                t = func.handler(inner)
            except IndexError as e:
                raise InputError(f"corrupt pickle: too few arguments to {func.qualname}") from e
        else:
            t = self._call(func, inner, "reduce")
        if type(new_type) is not Global:
            self._act("call-on-value", new_type, (t,))
        elif new_type.qualname not in ("torch.Tensor", "torch.nn.parameter.Parameter"):
            self._act("instantiate", new_type, ())
        if len(args) > 3 and _dunder_keys(args[3]):
            self._act("build", callee, args[3])
        if isinstance(t, TensorRef):
            _subclass_layout(t, new_type)
        return t

    def _param_with_state(self, callee: Global, args: tuple[Any, ...], kind: str) -> Any:
        """``torch._utils._rebuild_parameter_with_state(data, requires_grad, hooks, state)``: a Parameter whose
        extra attributes ``state`` sets with ``setattr``."""
        try:
            p = _h_rebuild_parameter(args)
        except IndexError as e:
            raise InputError(f"corrupt pickle: too few arguments to {callee.qualname}") from e
        if len(args) > 3 and _dunder_keys(args[3]):
            self._act("build", callee, args[3])
        return p

    def _rng_ctor(self, callee: Global, args: tuple[Any, ...], kind: str) -> Any:
        """``numpy.random._pickle.__randomstate_ctor`` / ``__generator_ctor(name='MT19937', ctor=...)``: numpy
        calls ``ctor(name)`` unless ``name`` is a bit generator already. numpy pickles them with ``ctor``
        its own ``__bit_generator_ctor`` (or none) and ``name`` a bit generator's name, class or instance;
        any other ``ctor`` is judged as the call it is (``__randomstate_ctor(cfg, logging.config.dictConfig)``
        calls dictConfig)."""
        stub = self._plain_call(callee, args, kind)
        name = args[0] if args else "MT19937"
        ctor = args[1] if len(args) > 1 else None
        if ctor is None or (type(ctor) is Global and (ctor.module, ctor.name) == _BIT_CTOR):
            self._bit_generator(name)
        else:
            self._call(ctor, (name,), "reduce")
        return stub

    def _bit_generator_ctor(self, callee: Global, args: tuple[Any, ...], kind: str) -> Any:
        """``numpy.random._pickle.__bit_generator_ctor(x)``: ``x()`` when ``x`` is a class, else a lookup of
        ``x`` among numpy's bit generator names."""
        stub = self._plain_call(callee, args, kind)
        self._bit_generator(args[0] if args else "MT19937")
        return stub

    def _bit_generator(self, name: Any) -> None:
        if type(name) is Global:
            self._call(name, (), "reduce")  # any class called with no arguments: judged like every call

    def _torch_function(self, callee: Global, args: tuple[Any, ...], kind: str) -> Any:
        """``getattr(torch._C._VariableFunctionsClass, 'relu')`` is how pickle writes ``torch.relu``: read as
        the name ``torch.relu`` (an activation a module stores), not as a call of getattr. Any other getattr is
        a call like any other (and a well-known way to reach any attribute)."""
        if len(args) == 2:
            owner, attr = args
            if (
                type(owner) is Global
                and (owner.module, owner.name) == ("torch._C", "_VariableFunctionsClass")
                and attr in TORCH_FUNCTIONS
            ):
                for key in ((callee.module, callee.name), (owner.module, owner.name)):
                    n = self.globals_seen.get(key, 0) - 1
                    if n > 0:
                        self.globals_seen[key] = n
                    else:
                        self.globals_seen.pop(key, None)
                return self._global("torch", attr)
        return self._plain_call(callee, args, kind)

    def _persistent(self, pid: Any) -> Any:
        if self.persistent_load is None:
            raise InputError("pickle refers to external data (a persistent id) outside a torch archive")
        return self.persistent_load(pid)

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
                if from_bytes(loclen, "little") != len(loc):
                    break
                location = loc.decode("ascii")
                locput_at = from_bytes(locput[1:], "little")
            if from_bytes(klen, "little") != len(skey):
                break
            # Written out, not looped: this runs once per tensor.
            skput_at = from_bytes(skput[1:], "little")
            pidput_at = from_bytes(pidput[1:], "little")
            hput_at = from_bytes(hput[1:], "little")
            aput_at = from_bytes(aput[1:], "little")
            if skput_at in memo or pidput_at in memo or hput_at in memo or aput_at in memo:
                break
            if kput:
                kput_at = from_bytes(kput[1:], "little")
                if kput_at in memo:
                    break
                try:
                    key_s = str(key, "utf-8", "surrogatepass")  # type: ignore[arg-type]
                except UnicodeDecodeError:
                    break
            if shput:
                shput_at = from_bytes(shput[1:], "little")
                if shput_at in memo:
                    break
            if stput:
                stput_at = from_bytes(stput[1:], "little")
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
            args = (storage, off[1] if off[0] == 0x4B else _small_int(off), shape, stride, grad == b"\x88", hooks)
            memo[aput_at] = args
            if len(memo) > max_memo:
                raise LimitExceededError(f"pickle memo exceeds {max_memo} entries")
            if type(storage) is StorageRef:
                # shape and stride came out of _int_tuple: ints already, so only the bounds need checking.
                t = _checked_view(storage, args[1], shape, stride, storage.dtype)
                t.requires_grad = args[4]
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

    def _fill(self, target: Stub | Global, items: list[Any], methods: tuple[str, ...]) -> None:
        """APPEND(S) / ADDITEMS on something that is not a list or set: real pickle looks ``extend``,
        ``append`` or ``add`` up on the object and calls it with the items.

        On a global (a module's list or dict: ``sys.path``, ``copyreg._inverted_registry``) that changes
        what later names resolve to: a ``mutate`` action, and no name is trusted after it. On an object the
        pickle made, a method of that name the pickle put in its state (BUILD of ``{'append': f}`` on an
        inert ``Namespace``) is what pickle calls: judged as a call of that value."""
        if type(target) is Global:
            self._act("mutate", target, tuple(items))
            self.tainted = True
            return
        state = target.state
        parts = [p for p in (state if type(state) is tuple and len(state) == 2 else (state,)) if isinstance(p, dict)]
        for method in methods:
            planted = [p[method] for p in parts if method in p]
            if planted and items:
                # extend gets the list; append and add get each item (the first stands for all here).
                self._call(planted[-1], (list(items),) if method == "extend" else (items[0],), "reduce")
                break
        if target.items is None:
            target.items = []
            self._mark(target, "fills")
        target.items.extend(items)

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

    def _build(self, target: Any, state: Any) -> None:
        if isinstance(target, Stub):
            callee = target.callee
            if type(callee) is Global and (callee.module, callee.name) == ("torch", "ScriptObject"):
                self._torchbind(state)
            if target.state is not None or _dunder_keys(state):
                # A second BUILD calls whatever the first put in the instance's __setstate__; a special name
                # set by any BUILD can turn the object into something else.
                self._act("build", target.callee if type(target.callee) is Global else target, state)
            else:
                self._mark(target, "setstate")
            target.state = state
        elif isinstance(target, PickledDict):
            if isinstance(state, dict) and not _dunder_keys(state):
                target.attrs.update((k, v) for k, v in state.items() if isinstance(k, str))
            else:
                self._act("build", Global("collections", "OrderedDict"), state)
        elif type(target) is Global:
            # Real pickle would set attributes on a module, class or function: every name looked up after
            # this may be the attacker's (ShadowPickle-style overwritten modules), so none is trusted again.
            self._act("patch", target, state)
            self.tainted = True
        # BUILD on plain data (lists, dicts, tensors) fails or is ignored by real pickle: nothing runs.

    def _torchbind(self, state: Any) -> None:
        """BUILD of a ``torch.ScriptObject`` with ``(state, qualname)``: torch runs the ``__setstate__`` of the
        TorchBind class ``qualname`` names. Quantized packed weights repack tensors; other classes do what
        they do (``aten.OpaqueObject``'s base64-decodes its state and unpickles it with plain pickle): a call of
        that class's ``__setstate__``, judged like any call."""
        qualname = state[1] if type(state) is tuple and len(state) == 2 else None
        if qualname in TORCHBIND_CLASSES:
            return
        name = qualname if type(qualname) is str else "torch.ScriptObject"
        self._act("call", Global(name, "__setstate__"), (state[0] if qualname is not None else state,))

    def _mark(self, target: Stub, what: str) -> None:
        """Note on an instantiation's action that BUILD (``setstate``) or SETITEM/APPEND (``fills``) reach it."""
        callee = target.callee
        if target.kind == "newobj" and type(callee) is Global:
            action = self.actions.get(("instantiate", callee.module, callee.name))
            if action is not None:
                setattr(action, what, True)


# Calls statecli models by reading their arguments, because what they do depends on them.
_SPECIAL: dict[tuple[str, str], Callable[[RestrictedUnpickler, Global, tuple[Any, ...], str], Any]] = {
    ("torch._tensor", "_rebuild_from_type_v2"): RestrictedUnpickler._from_type,
    ("torch._utils", "_rebuild_parameter_with_state"): RestrictedUnpickler._param_with_state,
    ("copyreg", "_reconstructor"): RestrictedUnpickler._reconstructor,
    ("copyreg", "__newobj__"): RestrictedUnpickler._newobj,
    ("copyreg", "__newobj_ex__"): RestrictedUnpickler._newobj_ex,
    ("numpy.random._pickle", "__randomstate_ctor"): RestrictedUnpickler._rng_ctor,
    ("numpy.random._pickle", "__generator_ctor"): RestrictedUnpickler._rng_ctor,
    ("numpy.random._pickle", "__bit_generator_ctor"): RestrictedUnpickler._bit_generator_ctor,
    ("builtins", "getattr"): RestrictedUnpickler._torch_function,
}
_BIT_CTOR = ("numpy.random._pickle", "__bit_generator_ctor")


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
_MARK = object()
_LONG = object()  # a string longer than any global's name
# Opcodes after which a value the pickle holds may be called (directly, or by pickle looking a method up):
# REDUCE, BUILD, NEWOBJ, NEWOBJ_EX, INST, OBJ, APPEND(S), SETITEM(S), ADDITEMS.
_CALLING = frozenset(b"Rb\x81\x92ioaesu\x90")
# SHORT_BINUNICODE, BINUNICODE, BINUNICODE8, SHORT_BINSTRING, BINSTRING: length-prefixed strings.
_STRINGS = frozenset(b"\x8cX\x8dUT")
_LENGTH_WIDTH = {-2: 1, -3: 4, -4: 4, -5: 8}


def names_after(data: Any, start: int, stop: int) -> tuple[dict[tuple[str, str], int], bool]:
    """The globals the pickle at ``data[start:]`` names from byte ``stop`` on, and whether an opcode there
    can call anything: what real pickle would go on to do where the restricted reader gave up (a limit, a
    value it refuses to model). The opcodes are walked by their argument sizes (pickletools' table) without
    building any value; where the pickle can hold a STACK_GLOBAL, a stack of the strings it would take is
    kept. The walk ends at STOP or at the first byte that is no pickle. A STACK_GLOBAL whose operands are
    not literal strings names :data:`COMPUTED`."""
    if not _SCAN:
        _SCAN.update(_scan_table())
    table = _SCAN
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
                width = _LENGTH_WIDTH[size]
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


def loads(
    data: bytes,
    persistent_load: Callable[[Any], Any] | None = None,
    limits: Limits | None = None,
    fast_paths: bool = True,
    start: int = 0,
) -> tuple[Any, RestrictedUnpickler]:
    """Parse ``data`` from byte ``start`` (a pickle stacked after another: ``start`` is the first's
    ``end``); returns the object and the unpickler (for ``globals_seen``, ``actions`` and ``end``).

    A pickle that fails after asking for something dangerous raises :class:`~statecli.errors.UnsafeError`
    (exit 5), not the parse error: torch.load would have run the payload before failing.

    ``fast_paths=False`` runs every opcode through the general loop (the tests compare both).
    """
    u = RestrictedUnpickler(data, persistent_load, limits, fast_paths, start)
    try:
        return u.load(), u
    except InputError as e:
        # Imported here: security judges what this module records, so it imports this module.
        from statecli.security import refuse_if_dangerous

        # Where statecli gives up (a limit, a SETITEM on a list, a value a handler refuses), real pickle may
        # go on: what the rest of the pickle names is judged as well.
        later, calls = names_after(data, start, u.stopped_at) if u.stopped_at is not None else ({}, False)
        if u.actions or u.globals_seen or later:
            refuse_if_dangerous(u.globals_seen, u.actions.values(), e, later if calls else {})
        raise
