"""``statecli diff A B``: what differs between two checkpoints; exit 1 when they differ beyond tolerance."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from statecli.cli import _output
from statecli.cli.options import OUTPUT, MatchOpt, RoleOpt

if TYPE_CHECKING:
    from rich.console import Group

    from statecli.diff import DiffReport

COMPARISON = "Comparison"

_CHECKPOINT = "a .pt/.pth/.bin/.ckpt file, a .safetensors file, a sharded *.index.json, or a folder holding one"


class DiffFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


def diff_command(
    path_a: Annotated[
        Path,
        typer.Argument(
            metavar="A", help=f"The first checkpoint (the reference for max rel): {_CHECKPOINT}.", show_default=False
        ),
    ],
    path_b: Annotated[
        Path,
        typer.Argument(metavar="B", help=f"The second checkpoint, of any format: {_CHECKPOINT}.", show_default=False),
    ],
    atol: Annotated[
        float,
        typer.Option(
            "--atol",
            min=0.0,
            metavar="X",
            help="Absolute tolerance: values pass when |a - b| <= atol + rtol * |b|.",
            rich_help_panel=COMPARISON,
        ),
    ] = 0.0,
    rtol: Annotated[
        float,
        typer.Option(
            "--rtol",
            min=0.0,
            metavar="X",
            help="Relative tolerance, relative to B's value (as torch.allclose). With both at 0 only exact "
            "equality passes.",
            rich_help_panel=COMPARISON,
        ),
    ] = 0.0,
    normalize_prefixes: Annotated[
        bool,
        typer.Option(
            "--normalize-prefixes",
            help="Strip a wrapper prefix (module. from DDP, _orig_mod. from torch.compile, model. from Lightning) "
            "from a side's model tensors when every one of them has it, so a wrapped checkpoint compares with a "
            "plain one.",
            rich_help_panel=COMPARISON,
        ),
    ] = False,
    role: RoleOpt = None,
    match: MatchOpt = None,
    show_all: Annotated[
        bool,
        typer.Option(
            "--all",
            "-a",
            help="List identical tensors in the table too (they are only counted by default).",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    fmt: Annotated[
        DiffFormat,
        typer.Option(
            "--format",
            "-f",
            help="table: the tensors that differ and a summary line, for people; json: the statecli.diff/1 schema; "
            "csv: one row per tensor, every common tensor and every name on one side, numbers unrounded; "
            "markdown: the summary line and the table's rows, to post in a pull request.",
            rich_help_panel=OUTPUT,
        ),
    ] = DiffFormat.table,
) -> None:
    """Compare two checkpoints tensor by tensor, across formats: names, shapes, dtypes, roles, devices, values.

    For each tensor on both sides: max abs and max relative difference, cosine similarity and exact
    equality, computed in float64 one tensor at a time (no pickle code runs). Exit 1 when a name is on
    one side only, a shape changed, values differ beyond --atol/--rtol, or the filters (--role,
    --match) leave no tensor on either side, so nothing was compared. A dtype change alone does not
    fail (an fp32 file and its bf16 copy pass at a tolerance that covers bf16 rounding); role, device and
    tied-weight changes are notes. NaN equals NaN at the same position.

    Examples:

        statecli diff model.pt model.safetensors
        statecli diff model.pt model-bf16.safetensors --atol 1e-2 --rtol 1e-2
        statecli diff ddp_run.pt plain.pt --normalize-prefixes --role parameter --role buffer
        statecli diff a.ckpt b.ckpt --format json | jq '.changed[] | select(.status == "differs") | .name'
    """
    import statecli
    from statecli.diff import diff

    report_a = statecli.open_checkpoint(path_a)
    report_b = statecli.open_checkpoint(path_b)
    _output.warn_dangerous(report_a)  # never run, but a user must not miss them
    _output.warn_dangerous(report_b)
    result = diff(
        report_a,
        report_b,
        atol=atol,
        rtol=rtol,
        normalize_prefixes=normalize_prefixes,
        roles=[r.value for r in role] if role else None,
        match=match,
    )
    for n in result.notes:
        (_output.warning if n.level == "warning" else _output.note)(n.message)
    if fmt is DiffFormat.json:
        _output.write(_output.to_json(result.to_dict()))
    elif fmt is DiffFormat.csv:
        _output.write(to_csv(result))
    elif fmt is DiffFormat.markdown:
        _output.write(to_markdown(result, show_all))
    else:
        view = diff_view(result, show_all)
        _output.stdout_console(view).print(view, soft_wrap=True)
    if not result.same:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------ the table

STATUS_STYLES = {
    "differs": "bold red",
    "only in A": "bold red",
    "only in B": "bold red",
    "close": "yellow",
    "unchecked": "yellow",
    "changed": "cyan",
    "identical": "dim",
}


@dataclass(frozen=True, slots=True)
class DiffRow:
    """One line of the diff table: a common tensor, or a name on one side only."""

    status: str
    cells: tuple[str, ...]


def number_text(x: float | None, digits: int = 3) -> str:
    """``3.2e-05``, ``0``, ``inf``; ``—`` when not computed."""
    from statecli.render import UNKNOWN

    if x is None:
        return UNKNOWN
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def diff_rows(report: DiffReport, show_all: bool = False) -> list[DiffRow]:
    """The changed tensors (every common tensor with ``show_all``) in A's order, then the names on one side."""
    from statecli.render import shape_text

    rows = []
    for t in report.tensors:
        status = t.status
        if status == "identical" and not show_all:
            continue
        dtype = t.dtype_a if t.dtype_a == t.dtype_b else f"{t.dtype_a} → {t.dtype_b}"
        shape = (
            shape_text(t.shape_a) if t.shape_a == t.shape_b else f"{shape_text(t.shape_a)} → {shape_text(t.shape_b)}"
        )
        cosine = number_text(t.cosine, 7) if t.cosine != 1.0 else "1"
        cells = (
            t.name,
            status,
            dtype,
            shape,
            number_text(t.max_abs),
            number_text(t.max_rel),
            cosine,
            "; ".join(t.notes),
        )
        rows.append(DiffRow(status, cells))
    for side, only in (("A", report.only_in_a), ("B", report.only_in_b)):
        for o in only:
            note = "" if o.group == "model" else f"{o.group} state"
            rows.append(
                DiffRow(f"only in {side}", (o.name, f"only in {side}", o.dtype, shape_text(o.shape), "", "", "", note))
            )
    return rows


def summary_text(report: DiffReport) -> str:
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


CSV_COLUMNS = (
    "name",
    "status",
    "dtype_a",
    "dtype_b",
    "shape_a",
    "shape_b",
    "max_abs",
    "max_rel",
    "cosine",
    "equal",
    "within_tolerance",
    "mismatched",
    "notes",
)


def _value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


def to_csv(report: DiffReport) -> str:
    """:data:`CSV_COLUMNS`, a row per common tensor (identical ones too) and per name on one side only; numbers
    as computed (``repr``), not rounded as in the table; empty where not computed or not on that side."""
    from statecli.cli._output import csv_text, shape_text

    rows: list[list[str]] = []
    for t in report.tensors:
        rows.append(
            [
                t.name,
                t.status,
                t.dtype_a,
                t.dtype_b,
                shape_text(t.shape_a),
                shape_text(t.shape_b),
                *map(_value, (t.max_abs, t.max_rel, t.cosine, t.equal, t.within_tolerance, t.mismatched)),
                "; ".join(t.notes),
            ]
        )
    for side, only in (("A", report.only_in_a), ("B", report.only_in_b)):
        for o in only:
            dtypes = (o.dtype, "") if side == "A" else ("", o.dtype)
            shapes = (shape_text(o.shape), "") if side == "A" else ("", shape_text(o.shape))
            note = "" if o.group == "model" else f"{o.group} state"
            rows.append([o.name, f"only in {side}", *dtypes, *shapes, "", "", "", "", "", "", note])
    return csv_text(CSV_COLUMNS, rows)


def to_markdown(report: DiffReport, show_all: bool = False) -> str:
    """The summary line under a heading naming both files, then the table's rows as a GitHub table: what a
    pull-request comment about a checkpoint change needs."""
    from statecli.cli._output import code_span, markdown_table, md_cell

    heading = f"**{code_span(md_cell(report.path_a))} → {code_span(md_cell(report.path_b))}**"
    lines = [f"{heading}: {md_cell(summary_text(report))}"]
    rows = diff_rows(report, show_all)
    if rows:
        headers = ("name", "status", "dtype", "shape", "max abs", "max rel", "cosine", "notes")
        lines += ["", markdown_table(headers, (r.cells for r in rows), right=(4, 5, 6)).rstrip("\n")]
    return "\n".join(lines) + "\n"


def diff_view(report: DiffReport, show_all: bool = False) -> Group:
    """The grid of tensors that differ (all with ``show_all``) under an ``A → B`` title, then the summary line."""
    from rich.console import Group
    from rich.text import Text

    title = f"{report.path_a} → {report.path_b}"
    rows = diff_rows(report, show_all)
    parts: list[Any] = [_grid_class()(title, rows), Text()] if rows else [Text(title, style="bold")]
    parts.append(Text(summary_text(report), style="bold green" if report.same else "bold red"))
    return Group(*parts)


@functools.cache
def _grid_class() -> type:
    """:class:`statecli.render.TensorGrid` for diff rows; made on first use so that rich is imported
    only by the table output."""
    from rich.style import Style

    from statecli.render import TensorGrid, measure_columns

    styles = {k: Style.parse(v) for k, v in STATUS_STYLES.items()}
    dim = Style.parse("dim")

    class DiffGrid(TensorGrid):
        """Name, Status, DType, Shape, Max abs, Max rel, Cosine, Notes: one aligned line per row."""

        RIGHT = frozenset({4, 5, 6})
        OPTIONAL = ("Cosine", "Max rel", "Shape", "DType", "Notes")

        def __init__(self, title: str, rows: list[DiffRow]) -> None:
            self.title = title
            self.tensors = rows  # type: ignore[assignment]
            self.headers = ["Name", "Status", "DType", "Shape", "Max abs", "Max rel", "Cosine", "Notes"]
            self.rows = [list(r.cells) for r in rows]
            self.widths, self.narrow = measure_columns(self.headers, self.rows)

        @staticmethod
        def _styles(t: DiffRow, row: list[str]) -> list[Style | None]:  # type: ignore[override]
            out: list[Style | None] = [None] * len(row)
            out[1] = styles.get(t.status)
            out[7] = dim
            return out

    return DiffGrid
