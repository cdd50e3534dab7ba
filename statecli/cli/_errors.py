"""Errors to messages and exit codes, in one place (DESIGN.md §6).

- :class:`statecli.errors.StatecliError`: one line ``statecli: error: <message>`` on stderr, exit
  ``err.exit_code`` (2 usage, 3 input, 4 output, 5 unsafe).
- Typer's own usage errors: Typer prints them, exit 2.
- Anything else is a bug: ``statecli: internal error: <type>: <msg> (re-run with --debug ...)``, exit 3.

``--debug`` adds the Python traceback above the line; the exit code stays the same.
"""

from __future__ import annotations

import errno
import sys
import traceback
from typing import Any

import typer
from typer.core import TyperGroup

from statecli.cli import _output
from statecli.errors import StatecliError

INTERNAL_EXIT = 3


def report_error(err: StatecliError, debug: bool = False) -> int:
    """Print ``err`` as one stderr line (a traceback first with ``debug``); return its exit code."""
    if debug:
        _print_traceback(err)
    _output.error(str(err))
    return err.exit_code


def report_internal(exc: BaseException, debug: bool = False) -> int:
    if debug:
        _print_traceback(exc)
    hint = "" if debug else " (re-run with --debug for a traceback)"
    _output.message("internal error", f"{type(exc).__name__}: {exc}{hint}", "bold red")
    return INTERNAL_EXIT


def _print_traceback(exc: BaseException) -> None:
    sys.stderr.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    sys.stderr.flush()


def _passes_through(exc: BaseException) -> bool:
    """Exceptions Typer itself turns into exits: usage errors (2), ``Exit``, ``Abort``, a closed pipe."""
    if isinstance(exc, (typer.Exit, typer.Abort, typer.TyperException)):
        return True
    return isinstance(exc, OSError) and exc.errno == errno.EPIPE


class StatecliGroup(TyperGroup):
    """The app's command group: every command runs inside this error mapping."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if _passes_through(exc):
                raise
            debug = bool(ctx.params.get("debug"))
            if isinstance(exc, StatecliError):
                raise typer.Exit(report_error(exc, debug)) from None
            raise typer.Exit(report_internal(exc, debug)) from None
