"""``statecli stats PATH``: min, max, mean, std, absmax, L2 norm and NaN/inf/zero counts per tensor."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from statecli.cli import _output
from statecli.cli._common import open_selected
from statecli.cli.options import MatchOpt, PathArg, RoleOpt
from statecli.wording import count, name_list


class StatsFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


_CSV = ("name", "dtype", "shape", "numel", "role", "min", "max", "mean", "std", "absmax", "l2")
_CSV_COUNTS = ("nan", "posinf", "neginf", "zeros", "skipped")


def stats_command(
    path: PathArg,
    role: RoleOpt = None,
    match: MatchOpt = None,
    fmt: Annotated[
        StatsFormat,
        typer.Option(
            "--format",
            "-f",
            help="table: for people; json: the statecli.stats/1 schema; csv: one row each; markdown: the table's "
            "rows as a GitHub table.",
        ),
    ] = StatsFormat.table,
    histogram: Annotated[
        bool,
        typer.Option("--histogram", help="Draw each tensor's value distribution under the table (or add it to JSON)."),
    ] = False,
    bins: Annotated[int, typer.Option("--bins", min=2, max=200, help="Bars in each histogram.")] = 40,
) -> None:
    """Value statistics per tensor and in total: min, max, mean, std (population), absmax, L2 norm, NaN/inf/zeros.

    Reads values one storage at a time straight from the file (no pickle runs; torch is imported).
    Statistics are over finite values; NaN and infinities are counted apart. Complex tensors are
    summarised by magnitude. Quantized tensors are listed but not read: in JSON their statistics and
    counts are null (empty in CSV, — in the table), never 0, and `skipped` says why.

    Examples:

        statecli stats model.safetensors
        statecli stats model.pt --role buffer --match '*running_var'
        statecli stats ckpt.pt --histogram --match 'layer1.*'
        statecli stats model.pt --format json | jq '.tensors[] | select(.nan > 0) | .name'
        statecli stats model.pt --format json | jq '.tensors[] | select(.skipped) | .name'
    """
    from statecli.stats import compute

    report = open_selected(path, role, match, None)
    bar = _output.progress_bar("reading", sum(t.nbytes for t in report.tensors), len(report.tensors))
    try:
        result = compute(report, None, bins if histogram else 0, bar.update if bar else None)
    finally:
        if bar is not None:
            bar.stop()

    skipped: dict[str, list[str]] = {}
    for t in result.tensors:
        if t.skipped:
            skipped.setdefault(t.skipped, []).append(t.name)
    for reason, names in skipped.items():
        _output.note(f"{count(len(names), 'tensor')} not read: {name_list(names)} ({reason})")

    if fmt is StatsFormat.json:
        _output.write(_output.to_json(result.to_dict()))
    elif fmt is StatsFormat.csv:
        dicts = (t.to_dict() for t in [*result.tensors, result.total])
        _output.write(_output.csv_text(_CSV + _CSV_COUNTS, ([_cell(d[c]) for c in _CSV + _CSV_COUNTS] for d in dicts)))
    elif fmt is StatsFormat.markdown:
        from statecli import render

        grid = render.StatsGrid(result)
        _output.write(_output.markdown_table(grid.headers, grid.rows, grid.RIGHT))
    else:
        from rich.console import Group
        from rich.text import Text

        from statecli import render

        parts = [render.StatsGrid(result)]
        if histogram:
            parts += [Text(), render.histograms(result)]
        view = Group(*parts)
        _output.stdout_console(view).print(view, soft_wrap=True)


def _cell(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, list):
        return "x".join(str(x) for x in v)
    return str(v)
