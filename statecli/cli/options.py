"""Option types shared by the commands: ``Annotated`` aliases, choices as ``str`` Enums.

A command declares ``role: RoleOpt = None`` and gets the same flag, help text and checks as every other
command that filters by role.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from statecli import dtypes


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


class TreeFormat(str, Enum):
    table = "table"
    json = "json"


class Role(str, Enum):
    parameter = "parameter"
    buffer = "buffer"
    other = "other"


class SortKey(str, Enum):
    file = "file"
    name = "name"
    size = "size"
    numel = "numel"
    role = "role"
    dtype = "dtype"


def complete_dtype(incomplete: str) -> list[str]:
    """Shell completion for ``--dtype``: the dtype names and the short spellings users type."""
    names = [*dtypes.DTYPES, "bf16", "fp16", "fp32", "fp64"]
    return [n for n in names if n.startswith(incomplete)]


def _canonical_dtypes(values: list[str] | None) -> list[str] | None:
    """``--dtype`` accepts the spellings users type (``bf16``, ``torch.float32``, ``half``)."""
    if not values:
        return values
    out: list[str] = []
    for value in values:
        name = dtypes.canonical(value)
        if name is None:
            raise typer.BadParameter(dtypes.unknown(value))
        out.append(name)
    return out


FILTERS = "Filters"
OUTPUT = "Output"

_CHECKPOINT = (
    "a torch.save file (.pt .pth .bin .ckpt), a .safetensors file, a sharded *.index.json, "
    "or a folder that holds one checkpoint."
)

PathArg = Annotated[
    Path,
    typer.Argument(
        metavar="PATH",
        readable=False,  # statecli says why it cannot read a file, in every report (exit 3, not 2)
        help=f"The checkpoint: {_CHECKPOINT}",
        show_default=False,
    ),
]
PathsArg = Annotated[
    list[Path],
    typer.Argument(
        metavar="PATH...",
        readable=False,  # statecli says why it cannot read a file, in every report (exit 3, not 2)
        help=f"One or more checkpoints, each {_CHECKPOINT}",
        show_default=False,
    ),
]
RoleOpt = Annotated[
    list[Role] | None,
    typer.Option(
        "--role",
        "-r",
        metavar="ROLE",
        help="Only tensors with this role: parameter, buffer or other; repeat to keep several roles.",
        rich_help_panel=FILTERS,
        show_default=False,
    ),
]
MatchOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--match",
        "-m",
        metavar="GLOB",
        help="Only tensors whose full name matches this shell glob (e.g. 'encoder.*.weight'); "
        "repeat to keep names matching any of them.",
        rich_help_panel=FILTERS,
        show_default=False,
    ),
]
DtypeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--dtype",
        "-d",
        metavar="NAME",
        help="Only tensors of this dtype: torch names or usual spellings (float32, bf16, fp16, int64); "
        "repeat to keep several.",
        callback=_canonical_dtypes,
        autocompletion=complete_dtype,
        rich_help_panel=FILTERS,
        show_default=False,
    ),
]
FormatOpt = Annotated[
    OutputFormat,
    typer.Option(
        "--format",
        "-f",
        metavar="FORMAT",
        help="table: for people; json: the statecli.report/1 schema (an array for several files); "
        "csv, markdown: one row per tensor.",
        rich_help_panel=OUTPUT,
    ),
]
TreeFormatOpt = Annotated[
    TreeFormat,
    typer.Option(
        "--format",
        "-f",
        metavar="FORMAT",
        help="table: a drawn tree for people; json: the statecli.tree/1 schema.",
        rich_help_panel=OUTPUT,
    ),
]
SortOpt = Annotated[
    SortKey,
    typer.Option(
        "--sort",
        "-s",
        metavar="KEY",
        help="Order of the tensors: file (as stored), name, size or numel (largest first), role (parameters, "
        "buffers, other) or dtype.",
        rich_help_panel=OUTPUT,
    ),
]
SummaryOpt = Annotated[
    bool,
    typer.Option(
        "--summary/--no-summary",
        help="Show the summary under the table: container, totals per role, dtype and device, findings.",
        rich_help_panel=OUTPUT,
    ),
]
LegendOpt = Annotated[
    bool,
    typer.Option(
        "--legend/--no-legend",
        help="Explain the table's marks: ● exact role, ○ inferred role, — not stored in the file.",
        rich_help_panel=OUTPUT,
    ),
]
DepthOpt = Annotated[
    int,
    typer.Option(
        "--depth",
        "-L",
        min=0,
        help="Levels of the name hierarchy to draw; deeper modules and tensors are folded into "
        "their ancestor's totals.",
        rich_help_panel=OUTPUT,
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        metavar="MOD:CALLABLE",
        help="A model factory, given as package.module:callable, to match the checkpoint against, built on the "
        "meta device: exact roles, and missing / unexpected keys and shape mismatches as a strict "
        "load_state_dict would report them. This imports and runs your code.",
        show_default=False,
    ),
]
