"""statecli: what state does this PyTorch checkpoint hold? Parameters vs buffers, with evidence."""

from __future__ import annotations

from statecli.api import open_checkpoint
from statecli.errors import (
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
    "open_checkpoint",
]
