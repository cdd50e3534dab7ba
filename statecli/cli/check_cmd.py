"""``statecli check PATH``: rules from flags and a policy file; exit 1 when any fails. For CI gates."""

from __future__ import annotations

import io
import os
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from statecli.cli import _output
from statecli.cli._errors import report_error
from statecli.cli.options import MatchOpt, ModelOpt, PathsArg, RoleOpt
from statecli.errors import StatecliError
from statecli.wording import count, name_list

if TYPE_CHECKING:
    from statecli.checking import CheckResult

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
        typer.Option("--dtype", "-d", metavar="NAME", help="Allowed dtype; repeatable.", rich_help_panel=RULES),
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
    from statecli import checking as core
    from statecli import open_checkpoint

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
            _output.note(f"using the policy in {file} (--no-policy to ignore it)")
        from_flags = core.load_policy(file).merge(from_flags)

    debug = bool(ctx.find_root().params.get("debug"))
    checked: list[CheckResult | Unreadable] = []
    worst = 0
    for path in paths:
        try:
            report = open_checkpoint(path)
            if from_flags.allow_dangerous:
                _output.warn_dangerous(report)  # allowed, yet a user must not miss it (as every other command)
            result = core.run(report, from_flags)
            for r in result.results:
                if r.rule == "no_dangerous_globals" and r.scope == "reference":
                    for f in r.allowed:  # the checked file's own were warned about above
                        _output.warning(f.message)
                if r.rule == "selects_tensors":
                    for f in r.failures:
                        _output.warning(f"{result.path}: {f.message}")
                if r.unread:
                    _output.note(
                        f"{result.path}: {r.id}: {count(len(r.unread), 'tensor')} not checked, their values are not "
                        f"read (quantized, packed or unknown dtypes): {name_list(r.unread, 5)}"
                    )
            checked.append(result)
        except StatecliError as err:
            if len(paths) == 1:
                raise  # the app's error mapping reports it
            worst = max(worst, report_error(err, debug))  # an unreadable file fails the gate, the rest still run
            checked.append(Unreadable(os.fspath(path), str(err), err.exit_code))
    _render(checked, fmt, several=len(paths) > 1)
    results = [c for c in checked if not isinstance(c, Unreadable)]
    unsafe = any(
        not r.passed for res in results for r in res.results if r.rule in ("no_dangerous_globals", "no_unknown_globals")
    )
    failed = 0 if all(r.passed for r in results) else (5 if unsafe else 1)  # 5: refused as unsafe
    code = max(worst, failed)
    if code:
        raise typer.Exit(code)


class Unreadable:
    """A path given with others that could not be checked: the error stderr reported, kept for the report so
    that a CI report names every file it was given."""

    # A plain class: a dataclass is built at import, and every command pays for check's imports.
    __slots__ = ("exit_code", "message", "path")

    def __init__(self, path: str, message: str, exit_code: int) -> None:
        self.path = path
        self.message = message
        self.exit_code = exit_code

    def to_dict(self) -> dict[str, Any]:
        from statecli.checking import SCHEMA

        # Additive to statecli.check/1: no "rules"; "passed" false, so a reader of "passed" alone still fails it.
        error = {"message": self.message, "exit_code": self.exit_code}
        return {"schema": SCHEMA, "path": self.path, "passed": False, "error": error}


def _render(checked: list[CheckResult | Unreadable], fmt: CheckFormat, several: bool) -> None:
    results = [c for c in checked if not isinstance(c, Unreadable)]
    if fmt is CheckFormat.json:
        docs = [c.to_dict() for c in checked]
        _output.write(_output.to_json(docs if several else docs[0]))
    elif fmt is CheckFormat.junit:
        _output.write(junit(checked))
    elif fmt is CheckFormat.github:
        _output.write("".join(github(c) for c in checked))
    elif fmt is CheckFormat.html:
        from rich.console import Console

        from statecli import render

        console = Console(record=True, width=120, file=io.StringIO(), force_terminal=True)
        for c in checked:
            console.print(_unreadable_view(c) if isinstance(c, Unreadable) else render.check_view(c))
        _output.write(console.export_html(inline_styles=True, theme=None))
    else:
        from statecli import render

        for i, r in enumerate(results):  # an unreadable file is on stderr, where a person reads it
            view = render.check_view(r)
            console = _output.stdout_console(view)
            if i:
                console.print()
            console.print(view, soft_wrap=True)


def _unreadable_view(entry: Unreadable) -> Any:
    """The file's name and the error, in the place its rules would have been: a report kept as an artifact
    shows every file it was given."""
    from rich.console import Group
    from rich.text import Text

    from statecli.render import clean

    return Group(
        Text(clean(entry.path), style="bold"),
        Text(f"✘ not checked (exit {entry.exit_code}): {clean(entry.message)}", style="bold red"),
        Text(),
    )


def junit(checked: list[CheckResult | Unreadable]) -> str:
    """JUnit XML: a suite per checkpoint, a test case per rule, a failure listing each offender; a file that
    could not be checked is a suite whose one case is an ``error``.

    Every text from a file (tensor names in messages, paths, globs) goes through :func:`statecli.render.clean`:
    XML 1.0 cannot hold most control characters, even as references, so they are written as ``\\x1b`` text.
    """
    import xml.etree.ElementTree as ET

    from statecli.render import clean

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
    from statecli.render import clean

    text = clean(text).replace("%", "%25")  # clean leaves no CR or LF to encode as %0D, %0A
    if prop:
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


def github(result: CheckResult | Unreadable) -> str:
    """GitHub Actions workflow commands: one ``::error`` per failure, one ``::warning`` per allowed finding,
    a ``::notice`` when all pass; one ``::error`` for a file that could not be checked."""
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
