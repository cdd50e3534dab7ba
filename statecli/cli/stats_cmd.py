"""``statecli stats PATH``: min, max, mean, std, absmax, L2 norm and NaN/inf/zero counts per tensor."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from statecli.cli._common import open_selected
from statecli.cli.options import DtypeOpt, MatchOpt, PathArg, RoleOpt
from statecli.output import console, emit


class StatsFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


def stats_command(
    path: PathArg,
    role: RoleOpt = None,
    match: MatchOpt = None,
    dtype: DtypeOpt = None,
    fmt: Annotated[
        StatsFormat,
        typer.Option(
            "--format",
            "-f",
            metavar="FORMAT",
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
    from statecli.stats import compute  # reads values with torch: loaded by stats alone

    report = open_selected(path, role, match, dtype)
    bar = console.progress_bar("reading", sum(t.nbytes for t in report.tensors), len(report.tensors))
    try:
        result = compute(report, None, bins if histogram else 0, bar.update if bar else None)
    finally:
        if bar is not None:
            bar.stop()

    emit.stats(result, fmt.value, histogram)
