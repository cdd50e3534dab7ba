"""The one place dtype names, sizes and kinds live.

Names are torch's (``torch.bfloat16`` -> ``"bfloat16"``) so a report reads the way a torch user writes.
Nothing here imports torch: the inspect path must stay free of it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class DType:
    name: str
    bits: int  # per element; sub-byte dtypes (float4_e2m1fn_x2 packs two) are whole bytes in torch
    kind: str  # "float" | "complex" | "int" | "uint" | "bool" | "quant" | "bits"

    @property
    def itemsize(self) -> int:
        return max(1, self.bits // 8)

    @property
    def is_integral(self) -> bool:
        return self.kind in ("int", "uint", "bool", "quant", "bits")


_ALL = [
    DType("float64", 64, "float"),
    DType("float32", 32, "float"),
    DType("float16", 16, "float"),
    DType("bfloat16", 16, "float"),
    DType("float8_e4m3fn", 8, "float"),
    DType("float8_e5m2", 8, "float"),
    DType("float8_e4m3fnuz", 8, "float"),
    DType("float8_e5m2fnuz", 8, "float"),
    DType("float8_e8m0fnu", 8, "float"),
    DType("float4_e2m1fn_x2", 8, "float"),
    DType("complex128", 128, "complex"),
    DType("complex64", 64, "complex"),
    DType("complex32", 32, "complex"),
    DType("int64", 64, "int"),
    DType("int32", 32, "int"),
    DType("int16", 16, "int"),
    DType("int8", 8, "int"),
    DType("uint64", 64, "uint"),
    DType("uint32", 32, "uint"),
    DType("uint16", 16, "uint"),
    DType("uint8", 8, "uint"),
    DType("bool", 8, "bool"),
    DType("qint8", 8, "quant"),
    DType("quint8", 8, "quant"),
    DType("qint32", 32, "quant"),
    DType("quint4x2", 4, "quant"),  # two elements per byte
    DType("quint2x4", 2, "quant"),  # four elements per byte
    DType("bits8", 8, "bits"),
    DType("bits16", 16, "bits"),
    DType("bits1x8", 8, "bits"),
    DType("bits2x4", 8, "bits"),
    DType("bits4x2", 8, "bits"),
]

DTYPES: dict[str, DType] = {d.name: d for d in _ALL}

# Legacy typed-storage class names as torch.save writes them (``GLOBAL 'torch FloatStorage'``).
STORAGE_TYPES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
    # Untyped storages count bytes; the tensor's real dtype comes from _rebuild_tensor_v3.
    "UntypedStorage": "uint8",
}

# safetensors header dtype codes.
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "C64": "complex64",
    "C128": "complex128",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
SAFETENSORS_CODES: dict[str, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# Spellings users type on the command line.
ALIASES: dict[str, str] = {
    "fp64": "float64",
    "double": "float64",
    "f64": "float64",
    "fp32": "float32",
    "float": "float32",
    "f32": "float32",
    "fp16": "float16",
    "half": "float16",
    "f16": "float16",
    "bf16": "bfloat16",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
    "long": "int64",
    "int": "int32",
    "short": "int16",
    "byte": "uint8",
    "cfloat": "complex64",
    "cdouble": "complex128",
    "chalf": "complex32",
}


def get(name: str) -> DType:
    """The dtype called ``name`` (``"torch.float32"``, ``"fp32"`` and ``"float32"`` all work)."""
    key = canonical(name)
    if key is None:
        raise KeyError(name)
    return DTYPES[key]


def canonical(name: str) -> str | None:
    """torch's name for a user's spelling, or ``None`` when it names no dtype."""
    key = name.strip().lower().removeprefix("torch.")
    key = ALIASES.get(key, key)
    return key if key in DTYPES else None


def nbytes(dtype: str, numel: int) -> int:
    """Bytes ``numel`` elements occupy; packed sub-byte dtypes round up to whole bytes."""
    d = DTYPES.get(dtype)
    if d is None:
        return 0
    return numel * d.itemsize if d.bits >= 8 else (numel * d.bits + 7) // 8


@functools.lru_cache(maxsize=4096)
def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``, as torch computes them."""
    # torch treats size-0 dimensions as 1 here; matching it keeps strides equal to what torch reports.
    strides = []
    acc = 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a canonical dtype name (``bfloat16`` -> ``torch.bfloat16``)."""
    import torch  # here, not at the top: inspect and friends must not pay for importing torch

    return getattr(torch, name)


def unknown(name: str) -> str:
    """The one way statecli says it does not know a dtype a user typed, whichever command was given it."""
    return (
        f"unknown dtype {name!r} (try float32/fp32, bfloat16/bf16, float16/fp16, float64, float8_e4m3fn, int64, bool)"
    )
