"""statecli: what state does this PyTorch checkpoint hold? Parameters vs buffers, with evidence."""

from __future__ import annotations

from statecli.api import check, convert, load, open_checkpoint
from statecli.errors import (
    CheckFailedError,
    DangerousPickleWarning,
    InputError,
    LimitExceededError,
    OutputError,
    StatecliError,
    UnsafeError,
    UnsupportedFormatError,
    UsageError,
)
from statecli.records import Container, Finding, Report, Summary, TensorInfo

__version__ = "0.1.0"

__all__ = [
    "CheckFailedError",
    "Container",
    "DangerousPickleWarning",
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
