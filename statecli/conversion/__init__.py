"""Conversion: dtype, device and file format, the way ``nn.Module.to()`` would, losing nothing.

``plan()`` needs no torch and reads no tensor bytes (``--dry-run``); ``convert()`` and ``load()``
import torch when called.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import TYPE_CHECKING, Any

from statecli.conversion import execute as _execute  # the module: its function must not shadow it here
from statecli.conversion.casting import CastStats
from statecli.conversion.execute import ConversionReport, Progress, build_units, load_units
from statecli.conversion.plan import ConvertOptions, Dropped, Plan, PlanItem, build_plan
from statecli.errors import DangerousPickleWarning, UsageError
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
    "options",
    "parse_size",
    "plan",
]


def options(**fields: Any) -> ConvertOptions:
    """:class:`ConvertOptions` from the public API's keywords: one glob or several, sizes as ``"2GB"``."""
    for key in ("only", "exclude", "strip_prefix"):
        value = fields.get(key)
        if isinstance(value, str):
            fields[key] = (value,)
        elif value is not None:
            fields[key] = tuple(value)
    size = fields.get("max_shard_size")
    if isinstance(size, str):
        fields["max_shard_size"] = parse_size(size)
    try:
        return ConvertOptions(**fields)
    except TypeError as e:
        raise UsageError(f"unknown conversion option: {e}") from None


def plan(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], opts: ConvertOptions | None = None, **fields: Any
) -> Plan:
    """What :func:`convert` would do, tensor by tensor; reads metadata only, writes nothing. ``opts``, or
    the fields of :class:`ConvertOptions` as keywords."""
    report = read(os.fspath(src))
    with gc_paused():
        return build_plan(report, os.fspath(dst), opts if opts is not None else options(**fields))


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    progress: Progress | None = None,
    opts: ConvertOptions | None = None,
    **fields: Any,
) -> ConversionReport:
    """Convert ``src`` into ``dst`` (see :func:`statecli.convert`, which documents every option): ``opts``,
    or the fields of :class:`ConvertOptions` as keywords."""
    return _execute.execute(plan(src, dst, opts, **fields), progress)


def load(path: str | os.PathLike[str], opts: ConvertOptions | None = None, **fields: Any) -> dict[str, torch.Tensor]:
    """A state dict with the conversion rules applied (see :func:`statecli.load`); each storage is
    moved once, so ties hold."""
    if opts is None:
        opts = options(output_format="torch", **fields)
    # A state dict is what load returns, whatever a .pt conversion of the same file would write.
    p = plan(path, "statecli.load.pt", dataclasses.replace(opts, state_dict=True))
    for f in p.report.findings:
        if f.level == "dangerous":  # never run, but a caller must not miss it, as the CLI's stderr says it
            warnings.warn(f"{p.report.path}: {f.message} ({f.code})", DangerousPickleWarning, stacklevel=3)
    return load_units(p, build_units(p), opts.device or "cpu")
