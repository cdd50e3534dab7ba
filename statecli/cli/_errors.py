"""Errors to messages and exit codes, in one place (DESIGN.md §6).

- :class:`statecli.errors.StatecliError`: one line ``statecli: error: <message>`` on stderr, exit
  ``err.exit_code`` (2 usage, 3 input, 4 output, 5 unsafe).
- Usage errors found while parsing the command line (unknown option, bad value, missing path): the same
  one line, ``statecli: error: <what> (see: statecli <command> --help)``, exit 2.
- ``MemoryError``: the input needs more memory than the process may use, an input problem: one line, exit 3.
- Anything else is a bug: ``statecli: internal error: <type>: <msg> (re-run with --debug ...)``, exit 3.

``--debug`` adds the Python traceback above the line; the exit code stays the same.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback
from typing import Any

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError, NoSuchOption
from typer.core import TyperGroup

from statecli.cli._help import FittedHelp
from statecli.errors import InputError, OutputError, StatecliError
from statecli.output import console

INTERNAL_EXIT = 3


def report_error(err: StatecliError, debug: bool = False) -> int:
    """Print ``err`` as one stderr line (a traceback first with ``debug``); return its exit code. An error
    another torchrun rank met (``peer``) is said by that rank and by rank 0 only, not once per rank."""
    if debug:
        _print_traceback(err)
    if not getattr(err, "peer", False) or os.environ.get("RANK", "0") == "0":
        console.error(str(err))
    return err.exit_code


def report_internal(exc: BaseException, debug: bool = False) -> int:
    if debug:
        _print_traceback(exc)
    hint = "" if debug else " (re-run with --debug for a traceback)"
    console.message("internal error", f"{type(exc).__name__}: {exc}{hint}", "bold red")
    return INTERNAL_EXIT


def _out_of_memory(exc: MemoryError, debug: bool) -> int:
    """An input too big for the memory the process may use is an input problem (exit 3), not a bug."""
    if debug:
        _print_traceback(exc)
    exc.__traceback__ = None  # the frames it holds hold the memory; the line below needs a little of it
    return report_error(InputError("out of memory: the input needs more memory than this process may use"))


def _print_traceback(exc: BaseException) -> None:
    sys.stderr.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    sys.stderr.flush()


BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for `cat big | head -1`


def _passes_through(exc: BaseException) -> bool:
    """Exceptions Typer itself turns into exits: usage errors (2), ``Exit``, ``Abort``."""
    return isinstance(exc, (typer.Exit, typer.Abort, typer.TyperException))


def _closed_pipe() -> int:
    """The reader of stdout went away (``| head``): stop quietly. Typer would exit 1, which for ``diff`` and
    ``check`` means "found a problem"; a closed pipe is none, so exit as a process SIGPIPE ends does."""
    console.stdout_to_devnull()
    return BROKEN_PIPE_EXIT


def _stdout_failed(exc: OSError, debug: bool = False) -> int:
    """A write to stdout outside the commands (``--help``, ``--version``) failed: 141 for a closed pipe,
    else one line and exit 4, as a command's own output does."""
    err = console.stdout_failed(exc)
    return _closed_pipe() if isinstance(err, OSError) else report_error(err, debug)


_HELP_WRITERS = frozenset({"echo", "show_help", "format_help", "rich_format_help"})


def _writing_help(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while Typer wrote a command's help (Click's ``echo``, rich's help panels)."""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in _HELP_WRITERS and "/typer/" in code.co_filename.replace(os.sep, "/"):
            return True
        tb = tb.tb_next
    return False


def report_usage(exc: ClickException) -> int:
    """A command-line parsing error as one stderr line, like every other error; return its exit code."""
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, NoSuchOption) and exc.option_name == "--debug" and ctx is not None:
        # --debug is the app's option, before the command; after it, say where it goes rather than "no such".
        console.error(f"--debug goes before the command: statecli --debug {ctx.info_name} ...")
        return exc.exit_code
    where = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
    console.error(exc.format_message().rstrip(".") + where)
    return exc.exit_code


class StatecliGroup(FittedHelp, TyperGroup):
    """The app's command group: every command runs inside this error mapping; its help fits the width
    (:mod:`statecli.cli._help`)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        # Typer would print a usage error as a boxed panel with the usage above it; statecli's errors are
        # one line each, whatever found them. Everything else keeps Typer's standalone handling.
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        argv = args[0] if args else kwargs.get("args")
        completing = "_STATECLI_COMPLETE" in os.environ  # the shell asks for completions with no arguments
        if not (sys.argv[1:] if argv is None else argv) and not completing:
            # A bare ``statecli`` is a usage error: its help goes where errors go, stdout stays empty.
            with contextlib.redirect_stdout(sys.stderr):
                super().main(["--help"], standalone_mode=False, **{k: v for k, v in kwargs.items() if k != "args"})
            sys.exit(2)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as exc:
            sys.exit(exc.exit_code)  # bare ``statecli``: building the error printed the help already
        except ClickException as exc:
            sys.exit(report_usage(exc))
        except typer.Abort:
            console.error("aborted")
            sys.exit(1)
        except OSError as exc:  # the help or the version could not be written
            sys.exit(_stdout_failed(exc, "--debug" in sys.argv))
        except SystemExit as exc:
            # Typer answers a closed pipe under --help or --version with exit 1 itself; every command
            # answers it with 141, as a process that SIGPIPE ends.
            cause = exc.__context__
            if exc.code == 1 and isinstance(cause, OSError) and cause.errno == errno.EPIPE:
                sys.exit(_closed_pipe())
            raise
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if _passes_through(exc):
                raise
            if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
                raise typer.Exit(_closed_pipe()) from None
            debug = bool(ctx.params.get("debug"))
            if isinstance(exc, OSError) and _writing_help(exc):  # a command's --help could not be written
                raise typer.Exit(_stdout_failed(exc, debug)) from None
            if isinstance(exc, StatecliError):
                raise typer.Exit(report_error(exc, debug)) from None
            if isinstance(exc, MemoryError):
                raise typer.Exit(_out_of_memory(exc, debug)) from None
            if isinstance(exc, UnicodeEncodeError):
                # stdout set to ASCII or a legacy code page: the table's marks (● ○ ─) or a tensor's name
                # cannot be written. Replacing them would silently change names in CSV or Markdown.
                enc = getattr(sys.stdout, "encoding", None) or "unknown"
                err = OutputError(
                    f"standard output uses the {enc} encoding, which cannot write this output; "
                    "set PYTHONIOENCODING=utf-8 (JSON is always ASCII: --format json works with any encoding)"
                )
                raise typer.Exit(report_error(err, debug)) from None
            raise typer.Exit(report_internal(exc, debug)) from None
