"""The one output sink: data on stdout, every message on stderr.

Plain text (JSON, CSV, Markdown; see :mod:`statecli.output.formats`) is written with ``sys.stdout``
directly, never through rich, which wraps long lines at 80 columns when the output is piped. Tables and
trees go through a rich :class:`~rich.console.Console` that decides colour from the terminal and
``NO_COLOR``. rich is imported only when a console is made, so ``--format json`` stays light.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from statecli.errors import OutputError
from statecli.output.columns import clean
from statecli.records import Report

if TYPE_CHECKING:
    from rich.console import Console

PROG = "statecli"


def stdout_console(renderable: Any = None) -> Console:
    """A console on the current ``sys.stdout`` (looked up at each write, so test runners can swap it).

    Piped into a file or another program there is no terminal width to respect: the console is made
    as wide as ``renderable`` needs, so tensor names are never folded across lines.
    """
    from rich.console import Console  # deferred: rich is for tables; --format json/csv never loads it

    console = _console_class()(highlight=False)
    if console.is_terminal:
        return console
    width = None
    if renderable is not None and "COLUMNS" not in os.environ:
        from rich.measure import Measurement  # deferred: rich is for tables; --format json/csv never loads it

        wide = Console(highlight=False, width=10_000)
        needed = Measurement.get(wide, wide.options, renderable).maximum
        width = max(80, min(needed, 10_000))
    return _console_class()(highlight=False, width=width, file=_TrimmedLines(sys.stdout))


@functools.cache
def _console_class() -> type[Console]:
    """rich's Console, except that a closed stdout (``| head``) raises ``BrokenPipeError`` like any other
    write: rich would exit 1 itself, which for ``diff`` and ``check`` reads as "found a problem"."""
    from rich.console import Console  # deferred: rich is for tables; --format json/csv never loads it

    class StdoutConsole(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    return StdoutConsole


_CHUNK = 1 << 20


def stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what is still buffered does not
    fail again after statecli has said why (a closed pipe, a full disk)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)  # fd 1 holds it now
    except (OSError, ValueError):  # no file descriptor (a test runner's stream)
        pass


def stdout_failed(e: OSError) -> OSError | OutputError:
    """What a failed write to stdout becomes: a closed pipe stays itself (``| head``: exit 141, quietly);
    anything else (``> /dev/full``, an I/O error) is an :class:`OutputError`, exit 4, said in one line."""
    if e.errno == errno.EPIPE:
        return e
    stdout_to_devnull()
    return OutputError(f"cannot write to standard output ({e.strerror or e})")


class _TrimmedLines:
    """A text stream that drops the blanks rich pads lines with (a grid pads every row to its widest):
    in a file or a pipe they are noise for ``diff`` and ``grep``, and on a terminal they never show."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.pending = ""

    def write(self, text: str) -> int:
        # 100,000 table rows arrive as one string: trimmed a megabyte of whole lines at a time, so no
        # second copy of all of it is ever held.
        whole = self.pending + text if self.pending else text
        start = 0
        while start < len(whole):
            end = whole.rfind("\n", start, start + _CHUNK) + 1
            if end == 0:  # a line longer than a chunk
                end = whole.find("\n", start + _CHUNK) + 1
                if end == 0:
                    break
            piece = whole[start:end]
            if " \n" in piece:  # a C search; a regex over every padding blank costs 30 ms a megabyte
                piece = "\n".join(line.rstrip(" ") for line in piece.split("\n"))
            try:
                self.out.write(piece)
            except OSError as e:
                raise stdout_failed(e) from None
            start = end
        self.pending = whole[start:]
        return len(text)

    def flush(self) -> None:
        try:
            if self.pending:  # a line left open by its writer: kept as it is, it may go on later
                self.out.write(self.pending)
                self.pending = ""
            self.out.flush()
        except OSError as e:
            raise stdout_failed(e) from None

    def isatty(self) -> bool:
        return False


def stderr_console() -> Console:
    from rich.console import Console  # deferred: rich is for tables; --format json/csv never loads it

    return Console(stderr=True, highlight=False, soft_wrap=True)


def write(text: str) -> None:
    """Write plain data to stdout, as is."""
    write_pieces((text,))


def write_pieces(pieces: Iterable[str]) -> None:
    """Write plain data to stdout, as is, piece by piece (never joined: 30 MB of JSON is not copied again)."""
    try:
        out = sys.stdout
        for piece in pieces:
            out.write(piece)
        out.flush()
    except OSError as e:
        raise stdout_failed(e) from None


def message(kind: str, text: str, style: str = "") -> None:
    """One line on stderr: ``statecli: <kind>: <text>``; ``kind`` is coloured on a terminal only.

    ``text`` is printed literally (it may hold paths and names from the file); it never wraps.
    """
    from rich.text import Text  # deferred: rich is for tables; --format json/csv never loads it

    line = Text(f"{PROG}: ")
    line.append(f"{kind}:", style=style)
    line.append(f" {clean(text)}")  # one line, and nothing from a file reaches the terminal as a control code
    stderr_console().print(line, soft_wrap=True)


def error(text: str) -> None:
    message("error", text, "bold red")


def warning(text: str) -> None:
    message("warning", text, "yellow")


def note(text: str) -> None:
    message("note", text, "cyan")


class ByteProgress:
    """A progress bar on stderr counting bytes and items; see :func:`progress_bar`."""

    def __init__(self, verb: str, total_bytes: int, total_items: int | None = None) -> None:
        # deferred: rich is for tables; --format json/csv never loads it
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

        self.verb = verb
        self.items = total_items
        self.progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=stderr_console(),
            transient=True,
            refresh_per_second=4,  # the work shares two cores with this redraw
        )
        self.task = self.progress.add_task(verb, total=max(total_bytes, 1))
        self.progress.start()

    def update(self, done_bytes: int, done_items: int) -> None:
        count = f"{done_items}/{self.items}" if self.items is not None else f"{done_items}"
        self.progress.update(self.task, completed=done_bytes, description=f"{self.verb} {count}")

    def stop(self) -> None:
        self.progress.stop()


def progress_bar(
    verb: str, total_bytes: int, total_items: int | None = None, quiet: bool = False
) -> ByteProgress | None:
    """A progress bar when stderr is a terminal (and not ``quiet``); ``None`` otherwise."""
    if quiet or not sys.stderr.isatty():
        return None
    return ByteProgress(verb, total_bytes, total_items)


def warn_dangerous(report: Report) -> None:
    """Repeat every ``dangerous`` finding on stderr, whatever the output format."""
    for f in report.findings:
        if f.level == "dangerous":
            warning(f"{report.path}: {f.message} ({f.code})")
