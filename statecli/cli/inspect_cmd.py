"""``statecli inspect PATH...``: every tensor with its role, the evidence for it, dtype, shape, device."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import typer

from statecli.cli._common import open_selected
from statecli.cli._errors import report_error
from statecli.cli.options import (
    DtypeOpt,
    FormatOpt,
    LegendOpt,
    MatchOpt,
    ModelOpt,
    OutputFormat,
    PathsArg,
    RoleOpt,
    SortKey,
    SortOpt,
    SummaryOpt,
)
from statecli.errors import StatecliError
from statecli.output import console, emit
from statecli.records import ROLES, Report, TensorInfo

_SORT_KEYS = {
    SortKey.name: lambda t: t.name,
    SortKey.size: lambda t: -t.nbytes,
    SortKey.numel: lambda t: -t.numel,
    SortKey.role: lambda t: ROLES.index(t.role) if t.role in ROLES else len(ROLES),
    SortKey.dtype: lambda t: t.dtype,
}


def sort_report(report: Report, key: SortKey) -> Report:
    """The same report with its tensors in ``key`` order (stable: ties keep file order)."""
    if key is SortKey.file:
        return report
    tensors: tuple[TensorInfo, ...] = tuple(sorted(report.tensors, key=_SORT_KEYS[key]))
    return dataclasses.replace(report, tensors=tensors)


def inspect_command(
    ctx: typer.Context,
    paths: PathsArg,
    role: RoleOpt = None,
    match: MatchOpt = None,
    dtype: DtypeOpt = None,
    sort: SortOpt = SortKey.file,
    fmt: FormatOpt = OutputFormat.table,
    summary: SummaryOpt = True,
    legend: LegendOpt = True,
    model: ModelOpt = None,
) -> None:
    """List every tensor in a checkpoint: parameter or buffer (with the evidence), dtype, shape, device.

    Reads metadata only: no tensor bytes, no pickle code run, no torch import. A role marked ● is
    stated by the file; ○ is inferred (the Evidence column says how).

    Several files: tables one after another, one JSON array, or one CSV with a leading path column.
    A file that cannot be read is reported on stderr, the others are still shown, and the exit
    status is the worst error's (3: unreadable input).

    Examples:

        statecli inspect model.pt
        statecli inspect model.pt --role buffer --dtype fp16
        statecli inspect ckpt.ckpt --format json | jq '.tensors[].name'
        statecli inspect a.safetensors b.safetensors --sort size --format csv
        statecli inspect model.pt --model mypkg.models:build_resnet
    """
    debug = bool(ctx.find_root().params.get("debug"))
    reports: list[Report] = []
    worst = 0
    adopt = _model_roles(model) if model is not None else None
    for path in paths:
        try:
            selected = sort_report(open_selected(path, role, match, dtype, adopt), sort)
        except StatecliError as err:
            if len(paths) == 1:
                raise  # the app's error mapping reports it
            worst = max(worst, report_error(err, debug))
            continue
        reports.append(selected)
        emit.report(selected, fmt.value, summary, legend, first=len(reports) == 1, several=len(paths) > 1)
    emit.reports(reports, fmt.value, several=len(paths) > 1)
    if worst:
        raise typer.Exit(worst)


def _model_roles(spec: str) -> Callable[[Report], Report]:
    """Build the model once; for each file, match it, say on stderr what would not load, take its roles."""
    from statecli.model_match import build_model, match, with_model_roles  # imports torch: --model only

    model = build_model(spec)

    def adopt(report: Report) -> Report:
        m = match(report, model)
        problems = [f"{len(m.missing)} missing", f"{len(m.unexpected)} unexpected"]
        problems.append(f"{len(m.shape_mismatch)} shape mismatch{'es' if len(m.shape_mismatch) != 1 else ''}")
        if m.ok:
            console.note(f"{report.path}: loads into {spec} (strict); roles from the model")
        else:
            console.warning(f"{report.path}: would not load into {spec}: {', '.join(problems)}")
            for name in m.missing[:10]:
                console.warning(f"missing: {name}")
            for name in m.unexpected[:10]:
                console.warning(f"unexpected: {name}")
            for sm in m.shape_mismatch[:10]:
                console.warning(f"shape: {sm.name} is {list(sm.file_shape)}, the model wants {list(sm.model_shape)}")
        for dm in m.dtype_mismatch:
            say = console.warning if dm.level == "warning" else console.note
            say(f"dtype: {dm.name} is {dm.file_dtype}, the model's is {dm.model_dtype}")
        if m.non_persistent:
            names = ", ".join(m.non_persistent[:8])
            console.note(f"the model's non-persistent buffers are not saved in state dicts (none needed): {names}")
        for tip in m.suggestions:
            console.note(tip)
        return with_model_roles(report, m)

    return adopt
