"""statecli's own pure functions for the names a pickle may call: torch's tensor rebuilds and the few
stdlib constructors torch's pickles use. Each turns the call's arguments into inert records (a
:class:`~statecli.pickled.TensorRef`, a dict, a set), checking every size against the storage it views;
none imports or calls anything the file names. Also the names that are data (dtypes, layouts) and the
TorchBind classes whose state is plain tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from statecli.clip import describe
from statecli.dtypes import DTYPES, STORAGE_TYPES
from statecli.errors import InputError
from statecli.pickled import Global, PickledDict, QuantizerRef, StorageRef, Stub, TensorRef
from statecli.safepickle.bounds import HashCounts, _check_items

MAX_INDEX = 2**62  # element counts, offsets and strides beyond this are not real tensors


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
        t.quantizer = _quantizer(qparams, t.shape)
    return t


_PER_CHANNEL = ("per_channel_affine", "per_channel_affine_float_qparams")
_INT64 = 1 << 63


def _quantizer(params: tuple[Any, ...], shape: tuple[int, ...]) -> QuantizerRef | None:
    """The quantizer ``torch._utils._rebuild_qtensor`` builds from ``params``, or None where torch.load would
    refuse them, or they take a form torch.save does not write (per-channel scales as lists: statecli reads
    tensors only). Not an error here: inspecting such a file needs none of it; converting it says so."""
    scheme = params[0] if params else None
    if not (isinstance(scheme, Global) and scheme.module == "torch"):
        return None
    if scheme.name == "per_tensor_affine" and len(params) == 3:
        scale, zero_point = params[1], params[2]
        if type(scale) in (float, int) and type(zero_point) is int and -_INT64 <= zero_point < _INT64:
            return QuantizerRef(scheme.name, scale=float(scale), zero_point=zero_point)
        return None
    if scheme.name in _PER_CHANNEL and len(params) == 4:
        scales, zero_points, axis = params[1], params[2], params[3]
        if type(scales) is not TensorRef or type(zero_points) is not TensorRef or type(axis) is not int:
            return None
        # torch.load checks the axis and the lengths too (torch._utils._rebuild_qtensor).
        if not 0 <= axis < len(shape) or scales.storage is None or zero_points.storage is None:
            return None
        if scales.shape != (shape[axis],) or zero_points.shape != (shape[axis],):
            return None
        kinds = (DTYPES[scales.dtype].kind, DTYPES[zero_points.dtype].kind)
        if kinds[0] != "float" or kinds[1] not in ("float", "int"):
            return None
        return QuantizerRef(scheme.name, scales=scales, zero_points=zero_points, axis=axis)
    return None


def _h_rebuild_parameter(args: tuple[Any, ...]) -> TensorRef:
    data = args[0]
    if not isinstance(data, TensorRef):
        raise InputError("corrupt pickle: a Parameter wraps something that is not a tensor")
    p = TensorRef(data.storage, data.offset, data.shape, data.stride, data.dtype, None, True, data.layout, data.device)
    p.extra = data.extra
    p.quantizer = data.quantizer
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
