"""Plain-text output for machines and documents: JSON, CSV, Markdown, JUnit XML, GitHub workflow commands,
and the self-contained HTML report. CSV and Markdown are derived from a result's column set
(:mod:`statecli.output.columns`); no rich here except for HTML, which rich draws.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from statecli.output import columns as C
from statecli.output.columns import Column, clean
from statecli.records import Report
from statecli.util import gc_paused

if TYPE_CHECKING:
    from statecli.checking import CheckResult, Unreadable
    from statecli.diff import DiffReport
    from statecli.stats import StatsReport


# --- JSON -----------------------------------------------------------------------------------------


def to_json(data: Any) -> str:
    """Indented for a person at a terminal; compact when piped, where a script or ``jq`` reads it.

    Indenting switches ``json`` to its pure-Python encoder: 2.4 s instead of 0.6 s for 100,000 tensors.
    """
    with gc_paused():
        if sys.stdout.isatty():
            return json.dumps(data, indent=2) + "\n"
        return json.dumps(data) + "\n"


def reports_json(reports: Sequence[Report], many: bool) -> Iterator[str]:
    """:func:`to_json` of the reports' dicts (a list when ``many``), in pieces; through
    ``Report.json_pieces`` when piped, so that no copy of the whole text is made."""
    if sys.stdout.isatty():
        data = [r.to_dict() for r in reports]
        yield to_json(data if many else data[0])
        return
    if many:
        yield "["
    for i, r in enumerate(reports):
        if i:
            yield ", "
        yield from r.json_pieces()
    yield "]\n" if many else "\n"


# --- CSV ------------------------------------------------------------------------------------------

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


def rows_of(columns: Sequence[Column[Any]], items: Iterable[Any]) -> Iterable[Sequence[str]]:
    """Each item's cells, in the columns' order."""
    items = items if isinstance(items, Sequence) else list(items)
    # Column by column, zipped in C: a third faster than a row function for 100,000 tensors.
    return zip(*(map(c.value, items) for c in columns), strict=True)


def to_csv(columns: Sequence[Column[Any]], items: Iterable[Any]) -> str:
    """The columns' headers, then one row per item."""
    return csv_text([c.header for c in columns], rows_of(columns, items))


def inspect_csv(reports: Iterable[Report], with_path: bool = False) -> str:
    """A header and one row per tensor; ``with_path`` adds a leading ``path`` column (several files)."""
    cols = C.INSPECT_RECORD
    if not with_path:
        return to_csv(cols, (t for report in reports for t in report.tensors))
    rows = ([report.path, *row] for report in reports for row in rows_of(cols, report.tensors))
    return csv_text(["path", *(c.header for c in cols)], rows)


def stats_csv(report: StatsReport) -> str:
    """One row per tensor and the total, numbers as computed; empty where not read."""
    return to_csv(C.STATS_RECORD, (t.to_dict() for t in [*report.tensors, report.total]))


def diff_csv(report: DiffReport) -> str:
    """A row per common tensor (identical ones too) and per name on one side only; numbers as computed
    (``repr``), not rounded as in the table; empty where not computed or not on that side."""
    return to_csv(C.DIFF_RECORD, C.diff_items(report))


# --- Markdown -------------------------------------------------------------------------------------


def md_cell(cell: str) -> str:
    """A Markdown table cell: pipes escaped, on one line (CR and LF as blanks: a table row is one line), and
    any other control character or lone surrogate shown as its escape (``\\x1b``), as the table shows it:
    Markdown is read by people, and raw ESC or NUL would reach their terminal or break the UTF-8."""
    cell = cell.replace("|", "\\|").replace("\r", " ").replace("\n", " ")
    return cell if cell.isprintable() else clean(cell)


def code_span(text: str) -> str:
    """``text`` as a CommonMark code span, shown as is whatever backticks it holds.

    The fence is one backtick longer than the longest run inside. A space pads each side when the text
    starts or ends with a backtick (it would join the fence), or starts and ends with a blank (the one
    blank a renderer strips from each side would be the text's own).
    """
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = text[:1] == "`" or text[-1:] == "`" or (text[:1] == " " and text[-1:] == " " and text.strip(" ") != "")
    return f"{fence} {text} {fence}" if pad else f"{fence}{text}{fence}"


def markdown_table(columns: Sequence[Column[Any]], items: Iterable[Any], header: Callable[[str], str] = str) -> str:
    """A GitHub table of the columns: the first cell of each row (a tensor name) in a code span,
    right-aligned columns right-aligned; ``header`` spells each column's header."""
    lines = [
        "| " + " | ".join(md_cell(header(c.header)) for c in columns) + " |",
        "|" + "|".join("---:" if c.right else "---" for c in columns) + "|",
    ]
    for cells in rows_of(columns, items):
        first = code_span(md_cell(cells[0])) if cells and cells[0] else ""
        lines.append("| " + " | ".join([first, *(md_cell(c) for c in cells[1:])]) + " |")
    return "\n".join(lines) + "\n"


def inspect_markdown(report: Report, heading: bool) -> str:
    """The records as a GitHub table, under the file's name as a heading when several files are shown."""
    text = markdown_table(C.INSPECT_RECORD, report.tensors)
    return f"### {report.path}\n\n{text}" if heading else text


def stats_markdown(report: StatsReport) -> str:
    """The table's rows as a GitHub table."""
    return markdown_table(C.STATS_TABLE, [*report.tensors, report.total])


def diff_summary(report: DiffReport) -> str:
    """``different: 2 differ beyond tolerance, 1 only in A, 13 identical (atol 0, rtol 0)``."""
    s = report.summary
    parts = [
        (s.differs, "differs beyond tolerance" if s.differs == 1 else "differ beyond tolerance"),
        (s.only_in_a, "only in A"),
        (s.only_in_b, "only in B"),
        (s.close, "within tolerance"),
        (s.metadata_only, "equal in value, metadata changed"),
        (s.unchecked, "not compared"),
        (s.identical, "identical"),
    ]
    counts = ", ".join(f"{n:,} {what}" for n, what in parts if n) or "no tensors"
    verdict = "nothing compared" if report.nothing_compared else "same" if report.same else "different"
    return f"{verdict}: {counts} (atol {report.atol:g}, rtol {report.rtol:g})"


def diff_markdown(report: DiffReport, show_all: bool = False) -> str:
    """The summary line under a heading naming both files, then the table's rows as a GitHub table: what a
    pull-request comment about a checkpoint change needs."""
    heading = f"**{code_span(md_cell(report.path_a))} → {code_span(md_cell(report.path_b))}**"
    lines = [f"{heading}: {md_cell(diff_summary(report))}"]
    items = C.diff_items(report, show_all)
    if items:
        lines += ["", markdown_table(C.DIFF_TABLE, items, str.lower).rstrip("\n")]
    return "\n".join(lines) + "\n"


# --- check: JUnit, GitHub, HTML --------------------------------------------------------------------


def junit(checked: Sequence[CheckResult | Unreadable]) -> str:
    """JUnit XML: a suite per checkpoint, a test case per rule, a failure listing each offender; a file that
    could not be checked is a suite whose one case is an ``error``.

    Every text from a file (tensor names in messages, paths, globs) goes through :func:`clean`: XML 1.0
    cannot hold most control characters, even as references, so they are written as ``\\x1b`` text.
    """
    import xml.etree.ElementTree as ET  # pyexpat: only --format junit needs it

    from statecli.checking import Unreadable  # checking reads policy files: loaded by check alone

    results = [c for c in checked if not isinstance(c, Unreadable)]
    errors = len(checked) - len(results)
    tests = sum(len(res.results) for res in results) + errors
    failed = sum(1 for res in results for r in res.results if not r.passed)
    suites = ET.Element("testsuites", name="statecli check", tests=str(tests), failures=str(failed), errors=str(errors))
    for res in checked:
        name = f"statecli check {clean(res.path)}"
        if isinstance(res, Unreadable):
            suite = ET.SubElement(suites, "testsuite", name=name, tests="1", failures="0", errors="1")
            case = ET.SubElement(suite, "testcase", classname="statecli.check.read", name=f"read: {clean(res.path)}")
            error = ET.SubElement(case, "error", message=clean(res.message), type=f"exit {res.exit_code}")
            error.text = clean(res.message)
            continue
        n_failed = sum(1 for r in res.results if not r.passed)
        suite = ET.SubElement(
            suites, "testsuite", name=name, tests=str(len(res.results)), failures=str(n_failed), errors="0"
        )
        for r in res.results:
            case = ET.SubElement(
                suite, "testcase", classname=f"statecli.check.{r.rule}", name=clean(f"{r.id}: {r.expected}")
            )
            if not r.passed:
                head = f"{len(r.failures)} failure{'s' if len(r.failures) != 1 else ''}: {r.failures[0].message}"
                fail = ET.SubElement(case, "failure", message=clean(head), type=r.rule)
                fail.text = "\n".join(clean(f.message) for f in r.failures)
            if r.allowed:
                # JUnit has no "passed with a warning"; the case passes and its output names what was allowed.
                out = ET.SubElement(case, "system-out")
                out.text = "\n".join(f"allowed: {clean(f.message)}" for f in r.allowed)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _gh_escape(text: str, prop: bool = False) -> str:
    """A workflow-command value on one line. Control characters are shown as ``\\x1b`` text first: the
    command is printed in the job's log, where an escape sequence from a name would be obeyed."""
    text = clean(text).replace("%", "%25")  # clean leaves no CR or LF to encode as %0D, %0A
    if prop:
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


def github(result: CheckResult | Unreadable) -> str:
    """GitHub Actions workflow commands: one ``::error`` per failure, one ``::warning`` per allowed finding,
    a ``::notice`` when all pass; one ``::error`` for a file that could not be checked."""
    from statecli.checking import Unreadable  # checking reads policy files: loaded by check alone

    file = _gh_escape(result.path, prop=True)
    if isinstance(result, Unreadable):
        return f"::error file={file},title=statecli check%3A not checked::{_gh_escape(result.message)}\n"
    lines = []
    for r in result.results:
        for f in r.failures:
            title = _gh_escape(f"statecli check: {r.id}", prop=True)
            lines.append(f"::error file={file},title={title}::{_gh_escape(f.message)}")
        for f in r.allowed:
            title = _gh_escape(f"statecli check: {r.id} (allowed)", prop=True)
            lines.append(f"::warning file={file},title={title}::{_gh_escape(f.message)}")
    if result.passed:
        n = len(result.results)
        lines.append(f"::notice file={file},title=statecli check::{n} rule{'' if n == 1 else 's'} passed")
    return "\n".join(lines) + "\n"


def check_html(checked: Sequence[CheckResult | Unreadable]) -> str:
    """The table view of every file, as a self-contained HTML page with inline styles."""
    from rich.console import Console  # only this format draws with rich

    from statecli.checking import Unreadable  # checking reads policy files: loaded by check alone
    from statecli.output import table  # rich: only this format pays for it

    console = Console(record=True, width=120, file=io.StringIO(), force_terminal=True)
    for c in checked:
        console.print(table.unreadable_view(c) if isinstance(c, Unreadable) else table.check_view(c))
    return console.export_html(inline_styles=True, theme=None)
