"""``statecli diff A B``: what differs between two checkpoints; exit 1 when they differ beyond tolerance."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

import statecli
from statecli.cli.options import OUTPUT, DtypeOpt, MatchOpt, RoleOpt
from statecli.output import console, emit

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
            metavar="A",
            help=f"The first checkpoint (the reference for max rel): {_CHECKPOINT}.",
            show_default=False,
            readable=False,  # statecli says why it cannot read a file (exit 3, not Typer's 2)
        ),
    ],
    path_b: Annotated[
        Path,
        typer.Argument(
            metavar="B",
            help=f"The second checkpoint, of any format: {_CHECKPOINT}.",
            show_default=False,
            readable=False,  # statecli says why it cannot read a file (exit 3, not Typer's 2)
        ),
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
    dtype: DtypeOpt = None,
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
            metavar="FORMAT",
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
    from statecli.diff import diff  # reads values with torch: loaded by diff alone

    report_a = statecli.open_checkpoint(path_a)
    report_b = statecli.open_checkpoint(path_b)
    console.warn_dangerous(report_a)  # never run, but a user must not miss them
    console.warn_dangerous(report_b)
    result = diff(
        report_a,
        report_b,
        atol=atol,
        rtol=rtol,
        normalize_prefixes=normalize_prefixes,
        roles=[r.value for r in role] if role else None,
        match=match,
        dtypes=dtype,
    )
    emit.diff(result, fmt.value, show_all)
    if not result.same:
        raise typer.Exit(1)
