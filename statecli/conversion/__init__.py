"""Conversion: dtype, device and file format, the way ``nn.Module.to()`` would, losing nothing.

``plan()`` needs no torch and reads no tensor bytes (``--dry-run``); ``convert()`` and ``load()``
import torch when called.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from statecli.conversion.casting import CastStats
from statecli.conversion.execute import ConversionReport, Progress, build_units, execute, load_units
from statecli.conversion.plan import ConvertOptions, Dropped, Plan, PlanItem, build_plan
from statecli.errors import UsageError
from statecli.formats import read
from statecli.sizes import parse_size
from statecli.util import gc_paused

if TYPE_CHECKING:
    import torch

__all__ = [
    "CastStats",
    "ConversionReport",
    "ConvertOptions",
    "Dropped",
    "Plan",
    "PlanItem",
    "Progress",
    "convert",
    "load",
    "parse_size",
    "plan",
]


def _options(options: dict[str, Any]) -> ConvertOptions:
    for key in ("only", "exclude", "strip_prefix"):
        value = options.get(key)
        if isinstance(value, str):
            options[key] = (value,)
        elif value is not None:
            options[key] = tuple(value)
    size = options.get("max_shard_size")
    if isinstance(size, str):
        options["max_shard_size"] = parse_size(size)
    try:
        return ConvertOptions(**options)
    except TypeError as e:
        raise UsageError(f"unknown conversion option: {e}") from None


def plan(src: str | os.PathLike[str], dst: str | os.PathLike[str], **options: Any) -> Plan:
    """What :func:`convert` would do, tensor by tensor; reads metadata only, writes nothing."""
    report = read(os.fspath(src))
    with gc_paused():
        return build_plan(report, os.fspath(dst), _options(options))


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    progress: Progress | None = None,
    **options: Any,
) -> ConversionReport:
    """Convert ``src`` into ``dst`` (a ``.safetensors`` or ``.pt`` file, or a folder for shards).

    ``options`` are :class:`ConvertOptions`' fields (``dtype="bf16"``, ``device="cpu"``,
    ``keep_buffers=True``, ``max_shard_size="2GB"``, ...). Raises a :class:`statecli.StatecliError`
    carrying its exit code: 1 overflow, 2 bad option, 3 bad input, 4 output not written.
    """
    return execute(plan(src, dst, **options), progress)


def load(
    path: str | os.PathLike[str],
    dtype: str | None = None,
    device: str | None = None,
    select: str | None = None,
    **options: Any,
) -> dict[str, torch.Tensor]:
    """A state dict read from ``path`` with the conversion rules applied, on ``device`` (default cpu).

    No pickle code runs: tensors are built from the file's bytes. Tied tensors share memory in the
    result as they did in the file. ``options`` takes the other :class:`ConvertOptions` fields
    (``keep_buffers``, ``only``, ``exclude``, ``strip_prefix``, ``allow_overflow``, ...).
    """
    p = plan(path, "statecli.load.pt", dtype=dtype, device=device, select=select, output_format="torch", **options)
    return load_units(p, build_units(p), device or "cpu")
