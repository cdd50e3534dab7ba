"""Every command path on one input, and the property they must all keep.

The property (issue #11, "an adversary in the test suite"): on any input, every command that reads a
file answers with its result or with a :class:`statecli.StatecliError` of exit code 3 (unreadable) or 5
(refused as unsafe); never another exception, never a different code for the same unreadable file in
different commands, never a file written on failure, never a change to the input. ``diff X X`` of a
readable file finds nothing changed (a value that differs from itself was made up, not read).

The paths, in order, each a Python API call (a CLI run costs ~10 ms more, all of it in typer):

- ``inspect``: ``open_checkpoint``, the JSON report and the rich table (rendered to a string);
- ``tree``: ``tree_dict`` and the rendered tree; ``schema``: the schema JSON;
- ``stats``: ``stats.compute`` (tensor values), with a histogram when asked;
- ``check``: the default policy and the value rules (``no_nan``, ``no_inf``, ``absmax``);
- ``diff``: ``diff.diff(X, X)``;
- ``convert``: ``statecli.convert(X, <scratch>/out.safetensors | out.pt)``; the output is read back, and a
  failed convert must leave the scratch folder empty;
- ``load``: ``statecli.load(X)``.

With ``cli=`` one command also runs through the real CLI (typer's runner): exit code as the API's, one
``statecli: error:`` line on stderr, no traceback, no "internal error".
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

COMMANDS = ("inspect", "tree", "schema", "stats", "check", "diff", "convert", "load")
CLI_COMMANDS = {
    "inspect": ["inspect"],
    "inspect-json": ["inspect", "-f", "json"],
    "tree": ["tree"],
    "schema": ["schema"],
    "stats": ["stats"],
    "check": ["check", "--no-nan", "--no-inf"],
    "diff": ["diff"],
    "convert": ["convert"],
}


class Violation(AssertionError):
    """The property failed: the message says which command and how."""


def snapshot(root: Path) -> dict[str, Any]:
    """Each path under ``root`` (a file's folder, or the folder itself): size, mtime, digest; a FIFO,
    socket or device by its type alone (opening a FIFO to read it waits for a writer, forever)."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            elif not stat.S_ISREG(st.st_mode):
                out[rel] = ("special", stat.S_IFMT(st.st_mode))
            else:
                out[rel] = (st.st_size, st.st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
    return out


# Usage errors (exit 2) convert may give on a file it read: no model tensors (the fix is the user's,
# ``--select`` names where the tensors are; load says the same), and what the chosen output format cannot
# hold (a dtype or a name safetensors cannot store: the fix is a .pt output; a cast a whole checkpoint's own
# pickle cannot say: the fix is --state-dict).
NOTHING_TO_CONVERT = "nothing to convert:"
USAGE_EXITS = (NOTHING_TO_CONVERT, "safetensors cannot store", "cannot cast ")
NO_COMPLEX = "has no complex counterpart"  # --dtype to a float with no complex twin: the user's choice


def _error(e: BaseException, command: str, codes: tuple[int, ...] = (3, 5)) -> int:
    from statecli.errors import StatecliError, UsageError

    if not isinstance(e, StatecliError):
        raise Violation(f"{command}: {type(e).__name__}: {str(e)[:300]}") from e
    if command in ("convert", "load") and isinstance(e, UsageError) and e.message.startswith(USAGE_EXITS):
        return e.exit_code
    if command == "convert" and isinstance(e, UsageError) and 1 in codes and NO_COMPLEX in e.message:
        return e.exit_code
    if e.exit_code not in codes:
        raise Violation(f"{command}: exit {e.exit_code} ({type(e).__name__}): {str(e)[:300]}") from e
    if "\n" in str(e) or "\r" in str(e):
        raise Violation(f"{command}: a message of several lines: {str(e)[:300]!r}") from e
    return e.exit_code


def _render(view: Any) -> str:
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=120, color_system=None, force_terminal=False).print(view, soft_wrap=True)
    return buf.getvalue()


class Slow(BaseException):  # not an Exception: statecli's own `except Exception` must not catch it
    """A command ran past its deadline (raised by the timer's signal handler)."""


def _vm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def memory_cap(extra: int | None) -> Iterator[None]:
    """Let the process map at most ``extra`` more bytes of address space while inside (Linux): a memory
    bomb then ends in a MemoryError, not in the machine's OOM killer. The limit is put back after."""
    now = _vm_bytes() if extra is not None else None
    if now is None:
        yield
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = now + extra if hard == resource.RLIM_INFINITY else min(now + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def deadline(seconds: float | None, what: str) -> Iterator[None]:
    """Raise :class:`Slow` in the main thread once the process has used ``seconds`` of CPU time (all
    threads; SIGPROF), or four times that of wall-clock time (SIGALRM: a command that blocks). CPU time is
    what a command costs; on a shared machine the wall clock also counts the neighbours' work. Unix only."""
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum: int, frame: object) -> None:
        kind = "CPU" if signum == signal.SIGPROF else "wall-clock"
        raise Slow(f"{what}: still running after {seconds if kind == 'CPU' else 4 * seconds} s of {kind} time")

    previous = signal.signal(signal.SIGPROF, alarm), signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    signal.setitimer(signal.ITIMER_REAL, 4 * seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGPROF, previous[0])
        signal.signal(signal.SIGALRM, previous[1])


def run_commands(
    path: Path,
    scratch: Path,
    commands: tuple[str, ...] = COMMANDS,
    *,
    cli: str | None = None,
    pt_output: bool = False,
    histogram: bool = False,
    dtype: str | None = None,
    seconds: float | None = None,
    memory: int | None = None,
) -> str:
    """Run ``commands`` on ``path``; return a short signature of what happened; raise :class:`Violation`.

    ``scratch`` must be an empty folder outside the input's; convert writes there (a ``.pt`` with
    ``pt_output``, cast to ``dtype`` when given, where values that overflow it stop it with exit 1, and a
    complex tensor without a complex counterpart with exit 2). Each command runs under
    a ``seconds`` deadline (:class:`Slow` past it) and all of them within ``memory`` more bytes of address
    space than the process had (a MemoryError past it, a violation like any other exception)."""
    with memory_cap(memory):
        return _run(path, scratch, commands, cli, pt_output, histogram, dtype, seconds)


def _run(
    path: Path,
    scratch: Path,
    commands: tuple[str, ...],
    cli: str | None,
    pt_output: bool,
    histogram: bool,
    dtype: str | None,
    seconds: float | None,
) -> str:
    import statecli
    from statecli import checking, schema, stats, tree
    from statecli import diff as diff_mod
    from statecli.output import table as render

    watched = path if path.is_dir() else path.parent
    before = snapshot(watched)
    outcome: dict[str, str] = {}
    report = None
    open_code: int | None = None
    try:
        with deadline(seconds, "open_checkpoint"):
            report = statecli.open_checkpoint(path)
    except Exception as e:
        open_code = _error(e, "open_checkpoint")
        outcome["open"] = f"E{open_code}"

    def step(name: str, fn: Any, codes: tuple[int, ...] = (3, 5)) -> Any:
        try:
            with deadline(seconds, name):
                value = fn()
        except Exception as e:
            code = _error(e, name, codes)
            if open_code is not None and code != open_code:
                raise Violation(f"{name}: exit {code}, but opening the file gives exit {open_code}: {e}") from e
            outcome[name] = f"E{code}"
            return None
        if open_code is not None:
            raise Violation(f"{name}: succeeded on a file open_checkpoint refuses (exit {open_code})")
        outcome[name] = "ok"
        return value

    def opened() -> Any:
        return report if report is not None else statecli.open_checkpoint(path)

    if "inspect" in commands:

        def inspect() -> None:
            r = opened()
            json.dumps(r.to_dict())
            _render(render.report_view(r))

        step("inspect", inspect)
    if "tree" in commands:

        def draw_tree() -> None:
            r = opened()
            json.dumps(tree.tree_dict(r, 2))
            _render(render.tree(tree.build_tree(r.tensors, 2, r.storage_sizes), r.path))

        step("tree", draw_tree)
    if "schema" in commands:
        step("schema", lambda: schema.dumps(schema.make_schema(opened())))
    if "stats" in commands:

        def values() -> None:
            result = stats.compute(opened(), None, 8 if histogram else 0)
            json.dumps(result.to_dict())
            _render(render.stats_table(result))

        step("stats", values)
    if "check" in commands:

        def check() -> None:
            r = opened()
            json.dumps(checking.run(r, checking.Policy()).to_dict())
            rules = checking.RuleSet(no_nan=True, no_inf=True, absmax=1e30)
            _render(render.check_view(checking.run(r, checking.Policy(sets=[rules]))))

        step("check", check)
    if "diff" in commands:
        d = step("diff", lambda: diff_mod.diff(path, path))
        if d is not None:
            json.dumps(d.to_dict())
            odd = [t.name for t in d.tensors if t.status not in (diff_mod.IDENTICAL, diff_mod.UNCHECKED)]
            if odd or d.only_in_a or d.only_in_b:
                raise Violation(f"diff X X: {len(odd)} tensors differ from themselves: {odd[:5]}")
    if "convert" in commands:
        out = scratch / "convert"
        out.mkdir(parents=True, exist_ok=True)
        target = out / ("out.pt" if pt_output else "out.safetensors")
        codes = (1, 3, 5) if dtype else (3, 5)
        result = step("convert", lambda: statecli.convert(path, target, dtype=dtype), codes)
        left = sorted(os.listdir(out))
        if result is None and left:
            raise Violation(f"convert failed and left {left} in its output folder")
        if result is not None:
            try:
                statecli.open_checkpoint(target)
            except Exception as e:
                raise Violation(f"convert wrote {target.name}, which statecli cannot read back: {e}") from e
        shutil.rmtree(out, ignore_errors=True)
    if "load" in commands:
        step("load", lambda: statecli.load(path))
    if cli is not None:
        with deadline(seconds, f"cli {cli}"):
            _run_cli(cli, path, scratch, open_code, outcome)
    after = snapshot(watched)
    if after != before:
        changed = sorted(set(after.items()) ^ set(before.items()), key=str)[:5]
        raise Violation(f"the input's folder changed: {changed}")
    return " ".join(f"{k}={v}" for k, v in outcome.items())


def _run_cli(command: str, path: Path, scratch: Path, open_code: int | None, outcome: dict[str, str]) -> None:
    from typer.testing import CliRunner

    from statecli.cli.main import app

    args = [*CLI_COMMANDS[command], str(path)]
    if command == "diff":
        args.append(str(path))
    if command == "convert":
        out = scratch / "cli-convert"
        out.mkdir(parents=True, exist_ok=True)
        args += ["-o", str(out / "out.safetensors"), "--quiet"]
    r = CliRunner().invoke(app, args, env={"NO_COLOR": "1", "COLUMNS": "120"})
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise Violation(f"cli {command}: {type(r.exception).__name__}: {r.exception}")
    err = r.stderr
    if "Traceback" in err or "internal error" in err:
        raise Violation(f"cli {command}: exit {r.exit_code}: {err[-500:]}")
    allowed = (
        {0, 3, 5}
        | ({1} if command in ("diff", "check") else set())
        | ({2} if command == "convert" and any(u in err for u in USAGE_EXITS) else set())
    )
    if r.exit_code not in allowed:
        raise Violation(f"cli {command}: exit {r.exit_code}: {err[-300:]!r}")
    # check's exit 5 on a file it read is its verdict (a dangerous finding): the report goes to stdout.
    verdict = command == "check" and open_code is None and r.exit_code == 5
    if r.exit_code in (3, 5) and not verdict:
        errors = [line for line in err.splitlines() if line.startswith("statecli: error:")]
        if len(errors) != 1 or r.stdout:
            raise Violation(f"cli {command}: exit {r.exit_code} without one error line: {err[-300:]!r}")
    if open_code is not None and r.exit_code != open_code:
        raise Violation(f"cli {command}: exit {r.exit_code}, but opening the file gives exit {open_code}")
    if command == "convert":
        out = scratch / "cli-convert"
        if r.exit_code != 0 and os.listdir(out):
            raise Violation(f"cli convert failed and left {sorted(os.listdir(out))}")
        shutil.rmtree(out, ignore_errors=True)
    outcome["cli-" + command] = str(r.exit_code)


def signature(outcome: str) -> str:
    """An outcome with numbers taken out, for counting distinct ones."""
    return re.sub(r"[0-9]+", "N", outcome)
