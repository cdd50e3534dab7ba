"""``statecli check PATH``: rules from flags and a policy file; exit 1 when any fails. For CI gates."""

from __future__ import annotations

import os
from enum import Enum
from typing import TYPE_CHECKING, Annotated

import typer

from statecli.api import open_checkpoint
from statecli.cli._errors import report_error
from statecli.cli.options import MatchOpt, ModelOpt, PathsArg, RoleOpt, complete_dtype
from statecli.errors import StatecliError
from statecli.output import console, emit

if TYPE_CHECKING:
    from statecli.checking import CheckResult, Unreadable

RULES = "Rules (apply to the tensors --match / --role select)"
CHECKPOINT = "Whole-checkpoint rules"


class CheckFormat(str, Enum):
    table = "table"
    json = "json"
    junit = "junit"
    github = "github"
    html = "html"


def check_command(
    ctx: typer.Context,
    paths: PathsArg,
    match: MatchOpt = None,
    role: RoleOpt = None,
    dtype: Annotated[
        list[str] | None,
        typer.Option(
            "--dtype",
            "-d",
            metavar="NAME",
            help="Allowed dtype of the floating tensors; repeatable. Integer, bool and quantized tensors are held "
            "to the list only when it names one of their kind (--dtype bf16 --dtype int64).",
            autocompletion=complete_dtype,
            rich_help_panel=RULES,
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option("--device", metavar="DEV", help="Every tensor saved on this device.", rich_help_panel=RULES),
    ] = None,
    no_nan: Annotated[
        bool, typer.Option("--no-nan", help="No NaN value (reads values).", rich_help_panel=RULES)
    ] = False,
    no_inf: Annotated[
        bool, typer.Option("--no-inf", help="No ±inf value (reads values).", rich_help_panel=RULES)
    ] = False,
    absmax: Annotated[
        float | None,
        typer.Option(
            "--absmax", metavar="X", min=0, help="No value with |v| > X (reads values).", rich_help_panel=RULES
        ),
    ] = None,
    require: Annotated[
        list[str] | None,
        typer.Option(
            "--require", metavar="GLOB", help="At least one tensor matches; repeatable.", rich_help_panel=RULES
        ),
    ] = None,
    forbid: Annotated[
        list[str] | None,
        typer.Option("--forbid", metavar="GLOB", help="No tensor matches; repeatable.", rich_help_panel=RULES),
    ] = None,
    require_exact_roles: Annotated[
        bool,
        typer.Option(
            "--require-exact-roles", help="Every role stated by the file, none inferred.", rich_help_panel=RULES
        ),
    ] = False,
    max_size: Annotated[
        str | None,
        typer.Option(
            "--max-size", metavar="SIZE", help="Files hold at most SIZE (2GB, 500MiB).", rich_help_panel=CHECKPOINT
        ),
    ] = None,
    schema: Annotated[
        str | None,
        typer.Option(
            "--schema",
            metavar="FILE",
            help="Match a `statecli schema` file: names, shapes, dtypes, roles.",
            rich_help_panel=CHECKPOINT,
        ),
    ] = None,
    model: ModelOpt = None,
    reference: Annotated[
        str | None,
        typer.Option(
            "--reference",
            metavar="FILE",
            help="Values within --atol/--rtol of this checkpoint.",
            rich_help_panel=CHECKPOINT,
        ),
    ] = None,
    atol: Annotated[
        float | None, typer.Option("--atol", min=0, help="Absolute tolerance for --reference (default 0).")
    ] = None,
    rtol: Annotated[
        float | None, typer.Option("--rtol", min=0, help="Relative tolerance for --reference (default 0).")
    ] = None,
    allow_dangerous: Annotated[
        bool,
        typer.Option(
            "--allow-dangerous",
            help="Report pickle globals that could run code as allowed (a warning on stderr, exit 0 if the rest "
            "passes) instead of refusing the file with exit 5, which is what happens without this flag.",
        ),
    ] = False,
    strict_globals: Annotated[
        bool,
        typer.Option(
            "--strict-globals",
            help="Also refuse (exit 5) every pickle global outside statecli's allow lists, such as your own "
            "model class in a whole pickled model: what torch.load(weights_only=True) refuses too.",
        ),
    ] = False,
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy",
            metavar="FILE",
            help="Rules from this statecli.toml ([check]) or pyproject.toml ([tool.statecli.check]). Without it, "
            "./statecli.toml or ./pyproject.toml's table is used when there is one.",
        ),
    ] = None,
    no_policy: Annotated[bool, typer.Option("--no-policy", help="Ignore policy files; flags only.")] = False,
    fmt: Annotated[
        CheckFormat,
        typer.Option(
            "--format",
            "-f",
            metavar="FORMAT",
            help="table: for people; json: statecli.check/1; junit: JUnit XML, one test case per rule; github: "
            "workflow annotations (::error); html: a self-contained report to keep as a CI artifact.",
        ),
    ] = CheckFormat.table,
) -> None:
    """Check a checkpoint against rules; exit 0 when all pass, 1 when one fails, 5 when it is unsafe. For CI gates.

    Rules come from flags and from a policy file, scoped by name glob and role. Every failure names
    the tensor, the rule and the value. A --match / --role scope (or a file) that selects no tensor
    fails, so a mistyped glob cannot turn the gate into a no-op. Pickle globals that could run code
    fail the check with exit 5 (refused as unsafe); with --allow-dangerous they are reported as
    allowed and warned about on stderr. Nothing is run from the file; --model runs your model factory.
    Several files (as pre-commit passes them): each is checked; a file that cannot be read is reported
    on stderr and as an error in the json, junit, github and html report, and the exit status is the
    worst (5 unsafe, 3 unreadable, 1 a rule failed).

    Examples:

        statecli check model.safetensors --dtype bf16 --no-nan --no-inf --device cpu --max-size 2GB
        statecli check release.pt --policy statecli.toml --format junit > report.xml
        statecli check release.pt --model mypkg.models:build_resnet
        statecli check new.pt --schema model.schema.json
        statecli check model.pt --role buffer --match '*running_var' --absmax 1e6 --format github
    """
    from statecli import checking as core  # policy parsing and value rules: loaded by check alone

    flags = core.RuleSet(
        match=tuple(match or ()),
        roles=tuple(r.value for r in role) if role else (),
        dtype=core.canonical_dtypes("--dtype", tuple(dtype or ())),
        device=device,
        no_nan=no_nan,
        no_inf=no_inf,
        absmax=absmax,
        required=tuple(require or ()),
        forbidden=tuple(forbid or ()),
        require_exact_roles=require_exact_roles,
    )
    from_flags = core.Policy(
        sets=[flags],
        max_size=core.parse_size("--max-size", max_size) if max_size is not None else None,
        schema=schema,
        model=model,
        reference=reference,
        atol=atol,
        rtol=rtol,
        allow_dangerous=allow_dangerous,
        strict_globals=strict_globals,
    )
    file = policy if policy is not None else (None if no_policy else core.discover_policy())
    if file is not None:
        if policy is None:
            console.note(f"using the policy in {file} (--no-policy to ignore it)")
        from_flags = core.load_policy(file).merge(from_flags)

    debug = bool(ctx.find_root().params.get("debug"))
    checked: list[CheckResult | Unreadable] = []
    for path in paths:
        try:
            report = open_checkpoint(path)
            if from_flags.allow_dangerous:
                console.warn_dangerous(report)  # allowed, yet a user must not miss it (as every other command)
            result = core.run(report, from_flags)
            emit.check_notes(result)
            checked.append(result)
        except StatecliError as err:
            if len(paths) == 1 and fmt is CheckFormat.table:
                raise  # the app's error mapping reports it; a CI report format gets the error in it below
            report_error(err, debug)  # an unreadable file fails the gate, the rest still run
            checked.append(core.Unreadable(os.fspath(path), str(err), err.exit_code))
    emit.check(checked, fmt.value, several=len(paths) > 1)
    code = core.exit_code(checked)
    if code:
        raise typer.Exit(code)
