"""statecli: what state does this PyTorch checkpoint hold? Parameters vs buffers, with evidence."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from statecli.api import open_checkpoint
from statecli.errors import (
    CheckFailedError,
    InputError,
    LimitExceededError,
    OutputError,
    StatecliError,
    UnsafeError,
    UnsupportedFormatError,
    UsageError,
)
from statecli.records import Container, Finding, Report, Summary, TensorInfo

if TYPE_CHECKING:
    import torch

    from statecli.checking import CheckResult, Policy
    from statecli.conversion import ConversionReport, Progress

__version__ = "0.1.0"


def convert(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], progress: Progress | None = None, **options: Any
) -> ConversionReport:
    """Convert ``src`` into ``dst``; see :func:`statecli.conversion.convert` (imports torch when called)."""
    from statecli.conversion import convert as run

    return run(src, dst, progress, **options)


def check(path: str | os.PathLike[str], policy: Policy | str | os.PathLike[str] | None = None) -> CheckResult:
    """Apply ``policy`` (a :class:`statecli.checking.Policy` or a policy file's path) to a checkpoint.

    With no policy only the default rule applies: no pickle global that could run code. Value rules
    import torch; the rest reads metadata only.
    """
    from statecli.checking import Policy, load_policy, run

    if policy is None:
        policy = Policy()
    elif not isinstance(policy, Policy):
        policy = load_policy(os.fspath(policy))
    return run(open_checkpoint(path), policy)


def load(
    path: str | os.PathLike[str],
    dtype: str | None = None,
    device: str | None = None,
    select: str | None = None,
    **options: Any,
) -> dict[str, torch.Tensor]:
    """A converted state dict; see :func:`statecli.conversion.load` (imports torch when called)."""
    from statecli.conversion import load as run

    return run(path, dtype=dtype, device=device, select=select, **options)


__all__ = [
    "CheckFailedError",
    "Container",
    "Finding",
    "InputError",
    "LimitExceededError",
    "OutputError",
    "Report",
    "StatecliError",
    "Summary",
    "TensorInfo",
    "UnsafeError",
    "UnsupportedFormatError",
    "UsageError",
    "__version__",
    "check",
    "convert",
    "load",
    "open_checkpoint",
]
