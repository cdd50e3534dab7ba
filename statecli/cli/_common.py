"""What every command does before its own work: open the checkpoint, apply the filters, warn."""

from __future__ import annotations

import os
from collections.abc import Callable

import statecli
from statecli.cli.options import Role
from statecli.output import console
from statecli.records import Report


def open_selected(
    path: str | os.PathLike[str],
    roles: list[Role] | None,
    match: list[str] | None,
    dtypes: list[str] | None,
    adopt: Callable[[Report], Report] | None = None,
) -> Report:
    """``statecli.open_checkpoint(path).select(...)``, saying on stderr what a user must not miss:
    every ``dangerous`` finding, and a filter that keeps none of the file's tensors."""
    full = statecli.open_checkpoint(path)
    if adopt is not None:
        full = adopt(full)  # e.g. roles from --model, before filtering by role
    report = full.select([r.value for r in roles] if roles else None, match, dtypes)
    console.warn_dangerous(report)
    if not report.tensors and full.tensors:
        console.note(f"{full.path}: no tensor matches the filters ({len(full.tensors)} in the file)")
    return report
