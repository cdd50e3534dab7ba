"""The one output sink: data on stdout, every message on stderr.

Plain text (JSON, CSV, Markdown) is written with ``sys.stdout`` directly, never through rich, which
wraps long lines at 80 columns when the output is piped. Tables and trees go through a rich
:class:`~rich.console.Console` that decides colour from the terminal and ``NO_COLOR``. rich is imported
only when a console is made, so ``--format json`` stays light.
"""

from __future__ import annotations

import csv
import errno
import functools
import io
import itertools
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from statecli.clip import printable
from statecli.records import Report, TensorInfo

if TYPE_CHECKING:
    from rich.console import Console

PROG = "statecli"

# The columns of --format csv and markdown, in order; one row per tensor.
COLUMNS = (
    "name",
    "role",
    "exact",
    "evidence",
    "persistent",
    "requires_grad",
    "dtype",
    "shape",
    "numel",
    "nbytes",
    "device",
    "shares_with",
    "group",
    "file",
)


def stdout_console(renderable: Any = None) -> Console:
    """A console on the current ``sys.stdout`` (looked up at each write, so test runners can swap it).

    Piped into a file or another program there is no terminal width to respect: the console is made
    as wide as ``renderable`` needs, so tensor names are never folded across lines.
    """
    from rich.console import Console

    console = _console_class()(highlight=False)
    if console.is_terminal:
        return console
    width = None
    if renderable is not None and "COLUMNS" not in os.environ:
        from rich.measure import Measurement

        wide = Console(highlight=False, width=10_000)
        needed = Measurement.get(wide, wide.options, renderable).maximum
        width = max(80, min(needed, 10_000))
    return _console_class()(highlight=False, width=width, file=_TrimmedLines(sys.stdout))


@functools.cache
def _console_class() -> type[Console]:
    """rich's Console, except that a closed stdout (``| head``) raises ``BrokenPipeError`` like any other
    write: rich would exit 1 itself, which for ``diff`` and ``check`` reads as "found a problem"."""
    from rich.console import Console

    class StdoutConsole(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    return StdoutConsole


_CHUNK = 1 << 20


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
            self.out.write(piece)
            start = end
        self.pending = whole[start:]
        return len(text)

    def flush(self) -> None:
        if self.pending:  # a line left open by its writer: kept as it is, it may go on later
            self.out.write(self.pending)
            self.pending = ""
        self.out.flush()

    def isatty(self) -> bool:
        return False


def stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def write(text: str) -> None:
    """Write plain data to stdout, as is."""
    sys.stdout.write(text)
    sys.stdout.flush()


def message(kind: str, text: str, style: str = "") -> None:
    """One line on stderr: ``statecli: <kind>: <text>``; ``kind`` is coloured on a terminal only.

    ``text`` is printed literally (it may hold paths and names from the file); it never wraps.
    """
    from rich.text import Text

    from statecli.render import clean

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


# --- plain-text formats: strings built from the same records the table shows ---------------------


def to_json(data: Any) -> str:
    """Indented for a person at a terminal; compact when piped, where a script or ``jq`` reads it.

    Indenting switches ``json`` to its pure-Python encoder: 2.4 s instead of 0.6 s for 100,000 tensors.
    """
    from statecli.util import gc_paused

    with gc_paused():
        if sys.stdout.isatty():
            return json.dumps(data, indent=2) + "\n"
        return json.dumps(data) + "\n"


def reports_json(reports: Sequence[Report], many: bool) -> str:
    """:func:`to_json` of the reports' dicts (a list when ``many``), through ``Report.to_json`` when piped."""
    if sys.stdout.isatty():
        data = [r.to_dict() for r in reports]
        return to_json(data if many else data[0])
    from statecli.util import gc_paused

    with gc_paused():
        texts = [r.to_json() for r in reports]
    return (f"[{', '.join(texts)}]" if many else texts[0]) + "\n"


def shape_text(shape: Sequence[int]) -> str:
    """``64x3x3``; a 0-dim tensor has the empty string."""
    return "x".join(str(d) for d in shape)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def row(t: TensorInfo) -> list[str]:
    """One tensor as the text cells of :data:`COLUMNS`."""
    return [
        t.name,
        t.role,
        _cell(t.exact),
        t.evidence,
        _cell(t.persistent),
        _cell(t.requires_grad),
        t.dtype,
        shape_text(t.shape),
        str(t.numel),
        str(t.nbytes),
        _cell(t.device),
        ";".join(t.shares_with),
        t.group,
        _cell(t.file),
    ]


def to_csv(reports: Iterable[Report], with_path: bool = False) -> str:
    """A header and one row per tensor; ``with_path`` adds a leading ``path`` column (several files)."""
    header = (["path"] if with_path else []) + list(COLUMNS)
    rows = (([report.path] if with_path else []) + row(t) for report in reports for t in report.tensors)
    return csv_text(header, rows)


_CSV_CHUNK = 4096


def csv_text(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """CSV with LF row ends that ``csv.reader`` reads back exactly, whatever the cells hold.

    A cell with a comma, a quote, LF or CR is quoted. Python's writer quotes only the characters of its
    own line terminator: with ``"\\n"`` it writes a CR bare, and a reader ends the row there. Rows are
    written a chunk at a time at C speed; a chunk that holds a CR (rare: it comes from a name) is written
    again a row at a time, its quoting decided with CR as a line character too.
    """
    pieces = [_lf_rows([header])]
    remaining = iter(rows)
    while chunk := list(itertools.islice(remaining, _CSV_CHUNK)):
        text = _lf_rows(chunk)
        pieces.append("".join(map(_crlf_safe_row, chunk)) if "\r" in text else text)
    return "".join(pieces)


def _lf_rows(rows: Sequence[Sequence[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _crlf_safe_row(cells: Sequence[str]) -> str:
    one = io.StringIO()
    csv.writer(one, lineterminator="\r\n").writerow(cells)  # quotes a cell with CR or LF
    return one.getvalue()[:-2] + "\n"


_RIGHT = {"numel", "nbytes"}


def md_cell(cell: str) -> str:
    """A Markdown table cell: pipes escaped, on one line (CR and LF as blanks: a table row is one line), and
    any other control character or lone surrogate shown as its escape (``\\x1b``), as the table shows it:
    Markdown is read by people, and raw ESC or NUL would reach their terminal or break the UTF-8."""
    cell = cell.replace("|", "\\|").replace("\r", " ").replace("\n", " ")
    return cell if cell.isprintable() else printable(cell)


def code_span(text: str) -> str:
    """``text`` as a CommonMark code span, shown as is whatever backticks it holds.

    The fence is one backtick longer than the longest run inside. A space pads each side when the text
    starts or ends with a backtick (it would join the fence), or starts and ends with a blank (the one
    blank a renderer strips from each side would be the text's own).
    """
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = text[:1] == "`" or text[-1:] == "`" or (text[:1] == " " and text[-1:] == " " and text.strip(" ") != "")
    return f"{fence} {text} {fence}" if pad else f"{fence}{text}{fence}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()) -> str:
    """A GitHub table: the first cell of each row (a tensor name) in a code span, columns ``right``
    (indices) right-aligned."""
    right = set(right)
    lines = [
        "| " + " | ".join(md_cell(h) for h in headers) + " |",
        "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|",
    ]
    for cells in rows:
        first = code_span(md_cell(cells[0])) if cells and cells[0] else ""
        lines.append("| " + " | ".join([first, *(md_cell(c) for c in cells[1:])]) + " |")
    return "\n".join(lines) + "\n"


def to_markdown(report: Report) -> str:
    """A GitHub table of :data:`COLUMNS`, one row per tensor; names in code spans, numbers right-aligned."""
    right = [i for i, c in enumerate(COLUMNS) if c in _RIGHT]
    return markdown_table(COLUMNS, (row(t) for t in report.tensors), right)
