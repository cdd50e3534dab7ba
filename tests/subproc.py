"""Fresh Python processes that import this checkout's statecli: for what one test process cannot show
(which modules an inspect imports, what a hostile file makes Python do)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


# What tests/fuzz/fuzz_read.py imports beyond statecli and its own folder (see its docstring).
FUZZ_PATH = (REPO_ROOT / "tests" / "hostile",)


def checkout_env(*, path: tuple[Path, ...] = (), **extra: str) -> dict[str, str]:
    """This environment with the checkout first on ``PYTHONPATH`` (the suite may run uninstalled), then
    the folders in ``path``."""
    env = {**os.environ, **extra}
    first = [str(REPO_ROOT), *map(str, path)]
    env["PYTHONPATH"] = os.pathsep.join([*first, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run_python(code: str, *args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=checkout_env(),
        timeout=timeout,
    )


# Opens argv[2] first, a benign file: every module statecli imports lazily is loaded before the hook goes
# in, so the 'exec' and 'import' events can only come from reading argv[1].
AUDIT_SCRIPT = r"""
import json, sys
import statecli

statecli.open_checkpoint(sys.argv[2])

events = []
RUNS = ("os.system", "subprocess.Popen", "exec", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.startfile")

def hook(event, args):
    if event.startswith(RUNS):
        events.append([event, repr(args)[:200]])
    elif event == "import":
        events.append([event, str(args[0])])
    elif event == "open" and isinstance(args[0], str) and "statecli_pwned_marker" in args[0]:
        events.append([event, args[0]])

sys.addaudithook(hook)
report = statecli.open_checkpoint(sys.argv[1])
print(json.dumps({"events": events, "levels": [f.level for f in report.findings]}))
"""


def audited_open(target: Path, benign: Path, cwd: Path) -> dict[str, Any]:
    """``statecli.open_checkpoint(target)`` under an audit hook: ``{"events": [...], "levels": [...]}``."""
    proc = run_python(AUDIT_SCRIPT, str(target), str(benign), cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])
