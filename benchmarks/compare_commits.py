#!/usr/bin/env python3
"""Time one statecli command at two git revisions, in alternating runs, and print the medians.

A shared machine's speed drifts from minute to minute; runs of the two revisions in turns (old new
old new ...) see the same drift, so their ratio holds when the absolute figures do not. With
``--instructions`` each revision is also run once under ``valgrind --tool=callgrind``: instruction
counts do not drift at all (they do not see memory or I/O stalls either).

    python benchmarks/compare_commits.py dc1023a HEAD -- inspect /tmp/statecli-bench/many_v1_100000.pt --format json
    python benchmarks/compare_commits.py dc1023a HEAD --runs 7 --instructions -- inspect many10k.pt --format json

Each revision is checked out with ``git worktree`` into a temporary folder, byte-compiled (as an
installed package is), and run as ``python -m statecli`` from outside the checkout with the worktree
first on ``PYTHONPATH``. Standard library only (and valgrind for ``--instructions``).
"""

from __future__ import annotations

import argparse
import compileall
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def worktree(rev: str, into: Path) -> Path:
    path = into / re.sub(r"[^A-Za-z0-9_.-]", "_", rev)
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
    compileall.compile_dir(str(path / "statecli"), quiet=1)
    return path


def env_for(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH")) if p)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # use the compiled bytecode, as an installed package does
    return env


def timed(argv: list[str], env: dict[str, str], cwd: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one run, its output discarded."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {err.strip()[-500:]}")
    return wall, usage.ru_maxrss / 1024


def instructions(argv: list[str], env: dict[str, str], cwd: str) -> int:
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    m = re.search(r"Collected : (\d+)", out.stderr)
    if m is None:
        raise SystemExit(f"callgrind gave no count: {out.stderr.strip()[-500:]}")
    return int(m.group(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        usage="%(prog)s [-h] [--runs N] [--instructions] OLD NEW -- STATECLI_ARGUMENTS...",
    )
    ap.add_argument("old", help="the revision to compare against (a commit, tag or branch)")
    ap.add_argument("new", help="the revision under test")
    ap.add_argument("--runs", type=int, default=5, help="measured runs per revision, after one warm-up each")
    ap.add_argument("--instructions", action="store_true", help="also count instructions under callgrind")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    command = argv[cut + 1 :]  # statecli's own arguments, after --
    if not command or args.runs < 1:
        ap.error("give --runs >= 1 and the statecli arguments after --")
    if args.instructions and shutil.which("valgrind") is None:
        ap.error("--instructions needs valgrind on PATH")

    scratch = Path(tempfile.mkdtemp(prefix="statecli-compare-"))
    trees: dict[str, Path] = {}
    try:
        for label, rev in (("old", args.old), ("new", args.new)):
            trees[label] = worktree(rev, scratch)
        argv_ = [sys.executable, "-m", "statecli", *command]
        cwd = str(scratch)  # not the checkout: `python -m` puts the working folder first on sys.path
        walls: dict[str, list[float]] = {"old": [], "new": []}
        rss: dict[str, list[float]] = {"old": [], "new": []}
        for label in walls:
            timed(argv_, env_for(trees[label]), cwd)  # warm-up: page cache, bytecode
        for _ in range(args.runs):
            for label in walls:
                w, r = timed(argv_, env_for(trees[label]), cwd)
                walls[label].append(w)
                rss[label].append(r)
        print(f"statecli {' '.join(command)}")
        print(f"{args.runs} alternating runs per revision, after one warm-up each; wall = spawn..reap")
        for label, rev in (("old", args.old), ("new", args.new)):
            ws = sorted(walls[label])
            print(
                f"  {label} {rev:>12}: median {statistics.median(ws):.3f} s (min {ws[0]:.3f}, max {ws[-1]:.3f}), "
                f"peak RSS {statistics.median(rss[label]):.1f} MB"
            )
        ratio = statistics.median(walls["new"]) / statistics.median(walls["old"])
        print(f"  new / old wall: {ratio:.2f}")
        if args.instructions:
            counts = {label: instructions(argv_, env_for(trees[label]), cwd) for label in trees}
            print(
                f"  instructions: old {counts['old'] / 1e9:.2f} G, new {counts['new'] / 1e9:.2f} G, "
                f"new / old {counts['new'] / counts['old']:.2f}"
            )
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
