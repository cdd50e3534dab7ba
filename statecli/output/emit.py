"""Each command's result handed to output: the data on stdout in the format asked for, and what a person
must not miss about it on stderr. Commands call one function here after the operation; ``fmt`` is the
``--format`` value. rich is imported only by the table formats (inside :mod:`statecli.output.table`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from statecli.output import console, formats
from statecli.output.columns import clean, human_bytes
from statecli.tree import build_tree, tree_dict
from statecli.util import gc_paused
from statecli.wording import count, name_list

if TYPE_CHECKING:
    from statecli.checking import CheckResult, Unreadable
    from statecli.conversion import ConversionReport, Plan
    from statecli.diff import DiffReport
    from statecli.records import Finding, Report
    from statecli.stats import StatsReport


def _print(view: Any, first: bool = True, soft_wrap: bool = True) -> None:
    out = console.stdout_console(view)
    if not first:
        out.print()
    # soft_wrap: the grids fit themselves to the width; rich's per-line cropping would only cost time.
    out.print(view, soft_wrap=soft_wrap)


def notes(findings: Sequence[Finding]) -> None:
    """Each finding on stderr, as a warning or a note by its level."""
    for n in findings:
        (console.warning if n.level == "warning" else console.note)(n.message)


# --- inspect ----------------------------------------------------------------------------------------


def report(report: Report, fmt: str, summary: bool, legend: bool, first: bool, several: bool) -> None:
    """One file's table or Markdown, as soon as it is read (JSON and CSV wait for all: see :func:`reports`)."""
    if fmt == "table":
        from statecli.output import table  # rich: only a table pays for importing it

        _print(table.report_view(report, summary, legend), first)
    elif fmt == "markdown":
        console.write(("" if first else "\n") + formats.inspect_markdown(report, several))


def reports(reports: Sequence[Report], fmt: str, several: bool) -> None:
    """Every file's records as one JSON document or one CSV table (a path column when ``several``)."""
    if fmt == "json":
        with gc_paused():  # the records' text is made as it is written: 100,000 tensors' worth
            console.write_pieces(formats.reports_json(reports, many=several))
    elif fmt == "csv":
        console.write(formats.inspect_csv(reports, with_path=several))


# --- tree, stats, diff --------------------------------------------------------------------------------


def tree(report: Report, depth: int, fmt: str) -> None:

    if fmt == "json":
        console.write(formats.to_json(tree_dict(report, depth)))
        return
    from statecli.output import table  # rich: only a table pays for importing it

    root = build_tree(report.tensors, depth, report.storage_sizes)
    _print(table.tree(root, report.path), soft_wrap=False)


def stats(result: StatsReport, fmt: str, histogram: bool) -> None:
    skipped: dict[str, list[str]] = {}
    for t in result.tensors:
        if t.skipped:
            skipped.setdefault(t.skipped, []).append(t.name)
    for reason, names in skipped.items():
        console.note(f"{count(len(names), 'tensor')} not read: {name_list(names)} ({reason})")
    if fmt == "json":
        console.write(formats.to_json(result.to_dict()))
    elif fmt == "csv":
        console.write(formats.stats_csv(result))
    elif fmt == "markdown":
        console.write(formats.stats_markdown(result))
    else:
        from statecli.output import table  # rich: only a table pays for importing it

        _print(table.stats_view(result, histogram))


def diff(result: DiffReport, fmt: str, show_all: bool) -> None:
    notes(result.notes)
    if fmt == "json":
        console.write(formats.to_json(result.to_dict()))
    elif fmt == "csv":
        console.write(formats.diff_csv(result))
    elif fmt == "markdown":
        console.write(formats.diff_markdown(result, show_all))
    else:
        from statecli.output import table  # rich: only a table pays for importing it

        _print(table.diff_view(result, show_all))


# --- check ------------------------------------------------------------------------------------------


def check_notes(result: CheckResult) -> None:
    """What stderr says about one file's check beside the report: allowed globals of the reference, scopes
    that select nothing, values that could not be read."""
    for r in result.results:
        if r.rule == "no_dangerous_globals" and r.scope == "reference":
            for f in r.allowed:  # the checked file's own were warned about as it was opened
                console.warning(f.message)
        if r.rule == "selects_tensors":
            for f in r.failures:
                console.warning(f"{result.path}: {f.message}")
        if r.unread:
            console.note(
                f"{result.path}: {r.id}: {count(len(r.unread), 'tensor')} not checked, their values are not "
                f"read (quantized, packed or unknown dtypes): {name_list(r.unread, 5)}"
            )


def check(checked: Sequence[CheckResult | Unreadable], fmt: str, several: bool) -> None:
    from statecli.checking import Unreadable  # checking reads policy files: loaded by check alone

    if fmt == "json":
        docs = [c.to_dict() for c in checked]
        console.write(formats.to_json(docs if several else docs[0]))
    elif fmt == "junit":
        console.write(formats.junit(checked))
    elif fmt == "github":
        console.write("".join(formats.github(c) for c in checked))
    elif fmt == "html":
        console.write(formats.check_html(checked))
    else:
        from statecli.output import table  # rich: only a table pays for importing it

        results = [c for c in checked if not isinstance(c, Unreadable)]
        for i, r in enumerate(results):  # an unreadable file is on stderr, where a person reads it
            _print(table.check_view(r), first=i == 0)


# --- convert ----------------------------------------------------------------------------------------


def _casts(plan: Plan) -> str:
    """`` (14 cast to bfloat16)`` when a dtype was asked for."""
    if not plan.target_dtype:
        return ""
    casts = sum(1 for i in plan.items if i.action == "cast")
    return f" ({casts} cast to {plan.target_dtype})"


def _closing(line: str) -> None:
    """The closing line for people: a message, so on stderr (stdout stays the data's), unprefixed."""
    from rich.text import Text  # a person reads this line; --quiet and json runs never import rich for it

    console.stderr_console().print(Text(clean(line)), soft_wrap=True)


def _what(plan: Plan) -> str:
    """``12 tensors``, or ``the whole checkpoint, 46 tensors`` when every other value of it is written too."""
    tensors = count(len(plan.items), "tensor")
    return f"the whole checkpoint, {tensors}" if plan.graph else tensors


def plan(plan: Plan, fmt: str, quiet: bool) -> None:
    """A dry run: the plan is its data; what it leaves out, and that nothing was written, are messages, on
    stderr with the same words a real run uses."""
    if fmt == "json":
        console.write(formats.to_json(plan.to_dict()))
    else:
        from statecli.output import table  # rich: only a table pays for importing it

        _print(table.plan_table(plan))
    notes(plan.notes)
    if fmt == "table" and not quiet:
        _closing(f"would write {plan.output}: {_what(plan)}{_casts(plan)}; nothing written (dry run)")


def conversion(
    plan: Plan, result: ConversionReport, elapsed: float, fmt: str, quiet: bool, torch_import: float = 0.0
) -> None:
    """A conversion done: its findings, then the report (json) or the closing line. ``elapsed`` is the
    conversion's own time; ``torch_import``, spent before it, is said beside it when it counts."""
    notes([*result.findings, *plan.notes])
    if fmt == "json":
        console.write(formats.to_json(result.to_dict()))
    elif not quiet:
        stored = "names, shapes and dtypes" if plan.output_format == "dcp" else "names, shapes, dtypes and roles"
        checked = "values verified" if result.values_verified else f"{stored} checked"
        where = result.files[0] if len(result.files) == 1 else f"{plan.output} ({len(result.files)} files)"
        importing = f" (torch import {torch_import:.1f} s)" if torch_import >= 0.05 else ""
        by = []
        if result.world_size > 1:
            by.append(f"{result.world_size} ranks")
        if result.jobs > 1:
            by.append(f"{result.jobs} workers" + (" each" if result.world_size > 1 else ""))
        who = f" by {' of '.join(by)}" if by else ""
        _closing(
            f"wrote {where}: {_what(plan)}{_casts(plan)}, {human_bytes(result.bytes_written)} "
            f"in {elapsed:.1f} s{who}{importing}; {checked}"
        )
