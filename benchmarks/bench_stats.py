#!/usr/bin/env python3
"""Benchmark `statecli stats` against a plain torch.load + per-tensor reductions script.

Reads bench_inspect.py's synthetic fp32 ResNet-like ``.pt`` (default 2 GiB, ~250 tensors, the same
cached file bench_convert.py uses) three ways:

* plain: ``torch.load(weights_only=True)``, then for every floating tensor min, max, mean, std,
  ``isnan().sum()`` and ``isinf().sum()``, one printed line per tensor;
* the same with ``torch.load(mmap=True, weights_only=True)``;
* ``statecli stats PATH --format json``.

Each command is a whole process run under ``/usr/bin/time -v`` (bench_convert.py's measurer): wall
time is ``time.perf_counter`` around it, peak RSS is time's "Maximum resident set size".  A
``python -c "import torch"`` floor is timed alongside, so that throughput can be shown with and
without interpreter + torch start-up, next to this machine's memory-copy bandwidth.  One warm-up run
per command, whose output is checked (statecli's numbers against the plain script's), then medians
of ``--runs`` measured runs, round-robin over the commands.

Standard library + torch + safetensors only.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import compileall
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

# bench_convert.py (and through it bench_inspect.py) provide the file, the measurer and the size parser,
# so all three benchmarks build, cache and measure the same way.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_convert import (
    LOAD_MMAP,
    LOAD_PLAIN,
    TIME_BIN,
    Measurer,
    Run,
    fmt,
    parse_size,
    pick_measurer,
    prepare_source,
    source_path,
)
from bench_inspect import GIB, MIB, REPO_ROOT, error_line, layout_bytes, log, machine_facts, print_header

# --------------------------------------------------------------------------------------------------
# Baseline scripts, each run as `python -c SCRIPT PATH`: what a user would write by hand.

# One line per floating tensor: name, numel, min, max, mean, std, NaN count, inf count.  Printing
# each value forces the reduction (nothing is optimised away) and gives the output check its
# reference.  float() of a float32 scalar is exact and print() writes repr, so min/max round-trip.
# std() is torch's default, Bessel-corrected (ddof=1), as a user would call it; the check rescales.
STATS = (
    "for k, v in sd.items():\n"
    "    if v.is_floating_point():\n"
    "        print(k, v.numel(), float(v.min()), float(v.max()), float(v.mean()), float(v.std()),\n"
    "              int(v.isnan().sum()), int(v.isinf().sum()))\n"
)
FLOOR = "import torch"

# Targets from the issue: statecli / plain script, lower is better.  Reported, never enforced.
TARGET_WALL_VS_PLAIN = 0.5
TARGET_RSS_VS_PLAIN = 0.2
REL_TOL = 1e-5  # mean/std agreement; min/max must be equal

GB = 10**9  # throughput and bandwidth are in decimal GB/s, as memory bandwidth is usually quoted
COPY_BYTES = 1 << 28  # 256 MiB: far past any CPU cache, so the copy measures DRAM, not L3
COPY_REPEATS = 5

# Every command's stdout goes to a file: the warm-up's is parsed, and the measured runs do exactly
# the same work.  `exec` keeps one process, so time's RSS and the timeout's kill see the command.
REDIRECT = 'out=$1; shift; exec "$@" >"$out"'


# --------------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    kind: str  # "floor" | "plain" | "mmap" | "statecli"
    label: str
    argv: list[str]
    stdout: Path
    runs: list[Run] = field(default_factory=list)
    warmup: Run | None = None
    error: str | None = None
    check: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.runs) and self.error is None

    @property
    def median_s(self) -> float | None:
        return statistics.median(r.wall_s for r in self.runs) if self.ok else None

    @property
    def median_rss_mb(self) -> float | None:
        rss = [r.maxrss_kib for r in self.runs if r.maxrss_kib is not None]
        return statistics.median(rss) / 1024 if self.ok and rss else None

    def wrapped(self) -> list[str]:
        return ["/bin/sh", "-c", REDIRECT, "sh", str(self.stdout), *self.argv]


def make_cases(src: Path, outdir: Path, statecli_cmd: list[str]) -> list[Case]:
    """The floor, the two scripts and statecli, in the order they run in every round."""
    py = sys.executable
    return [
        Case("floor", 'python -c "import torch"', [py, "-c", FLOOR], outdir / "floor.txt"),
        Case("plain", "torch.load -> per-tensor stats", [py, "-c", LOAD_PLAIN + STATS, str(src)], outdir / "plain.txt"),
        Case(
            "mmap",
            "torch.load(mmap=True) -> per-tensor stats",
            [py, "-c", LOAD_MMAP + STATS, str(src)],
            outdir / "mmap.txt",
        ),
        Case(
            "statecli",
            "statecli stats --format json",
            [*statecli_cmd, "stats", str(src), "--format", "json"],
            outdir / "statecli.json",
        ),
    ]


def get(cases: list[Case], kind: str) -> Case:
    return next(c for c in cases if c.kind == kind)


def run_case(case: Case, measurer: Measurer, timeout: float, warmup: bool) -> Run | None:
    """One run of case; on failure records the error and returns None."""
    log(f"{case.kind}{' (warm-up)' if warmup else ''}")
    run, stderr = measurer.run(case.wrapped(), timeout)
    if run.rc != 0:
        what = "statecli failed" if case.kind == "statecli" else "command failed"
        case.error = f"{what}{'' if warmup else ' on a measured run'} (exit {run.rc}): {error_line(stderr.encode())}"
        log(case.error)
        return None
    return run


# --------------------------------------------------------------------------------------------------
# Output check


class Stat(NamedTuple):
    numel: int
    min: float
    max: float
    mean: float
    std: float  # population (ddof=0), as statecli reports it
    nan: int
    inf: int


def parse_plain(text: str) -> dict[str, Stat]:
    """The plain script's lines, std converted from torch's ddof=1 to statecli's ddof=0."""
    out = {}
    for line in text.splitlines():
        name, numel, lo, hi, mean, std, nan, inf = line.split()
        n = int(numel)
        # population std = sample std * sqrt((n-1)/n); for one element torch gives nan and statecli 0.
        pop = float(std) * math.sqrt((n - 1) / n) if n > 1 else 0.0
        out[name] = Stat(n, float(lo), float(hi), float(mean), pop, int(nan), int(inf))
    return out


def parse_statecli(text: str) -> dict[str, Stat]:
    """statecli's statecli.stats/1 JSON, floating tensors only (the plain script skips the others)."""
    doc = json.loads(text)
    out = {}
    for t in doc["tensors"]:
        if t["dtype"].startswith(("float", "bfloat")) and t.get("skipped") is None:
            out[t["name"]] = Stat(
                t["numel"], t["min"], t["max"], t["mean"], t["std"], t["nan"], t["posinf"] + t["neginf"]
            )
    return out


def close(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= REL_TOL * scale


def compare(ref: dict[str, Stat], got: dict[str, Stat], who: str) -> str:
    """Every floating tensor's numbers in got against the plain script's: min/max exactly, mean/std to
    REL_TOL.  A fast answer with wrong numbers must not look like a win."""
    if set(ref) != set(got):
        missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
        return f"MISMATCH: {who} float tensors differ (missing {missing[:3]}, extra {extra[:3]})"
    worst = 0.0
    for name, r in ref.items():
        g = got[name]
        exact_g, exact_r = (g.numel, g.min, g.max, g.nan, g.inf), (r.numel, r.min, r.max, r.nan, r.inf)
        if exact_g != exact_r:
            return f"MISMATCH: {name}: {who} numel/min/max/nan/inf {exact_g}, plain script {exact_r}"
        # The mean is measured against the spread, not against itself: these means sit near zero, where
        # a float32 reference sum is itself off by more than 1e-5 of the mean.
        mean_scale = max(abs(r.mean), r.std)
        std_scale = abs(r.std)
        if not close(g.mean, r.mean, mean_scale) or not close(g.std, r.std, std_scale):
            return f"MISMATCH: {name}: {who} mean/std {g.mean!r}/{g.std!r}, plain script {r.mean!r}/{r.std!r}"
        worst = max(worst, abs(g.mean - r.mean) / mean_scale if mean_scale else 0.0)
        worst = max(worst, abs(g.std - r.std) / std_scale if std_scale else 0.0)
    return f"ok ({len(ref)} float tensors: min/max/nan/inf equal, mean/std within {worst:.1e} <= {REL_TOL:g})"


def check_outputs(cases: list[Case]) -> None:
    """After the warm-ups: statecli and the mmap script against the plain script's printed numbers."""
    plain = get(cases, "plain")
    if plain.warmup is None:
        for c in cases:
            if c.kind in ("mmap", "statecli") and c.warmup is not None:
                c.check = "not checked: the plain script, the reference, failed"
        return
    try:
        ref = parse_plain(plain.stdout.read_text())
    except (OSError, ValueError) as e:
        plain.check = f"MISMATCH: cannot read the plain script's output ({type(e).__name__}: {e})"
        return
    plain.check = f"reference ({len(ref)} float tensors)"
    for kind, parse in (("mmap", parse_plain), ("statecli", parse_statecli)):
        case = get(cases, kind)
        if case.warmup is None:
            continue
        try:
            case.check = compare(ref, parse(case.stdout.read_text()), kind)
        except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable output is a finding, not a crash
            case.check = f"MISMATCH: cannot read {kind} output ({type(e).__name__}: {e})"
        log(f"  {kind} output check: {case.check}")


# --------------------------------------------------------------------------------------------------
# Memory-copy bandwidth


def copy_bandwidth(nbytes: int = COPY_BYTES, repeats: int = COPY_REPEATS) -> dict[str, Any]:
    """GB/s of copying nbytes between two buffers: torch's copy_ (its threads) and memoryview (1 thread).

    The rate is bytes copied per second; the memory traffic is twice that (every byte read and written).
    Both buffers are written once before timing, so page faults are not part of the figure."""
    import torch

    def rate(copy: Callable[[], object]) -> dict[str, float]:
        copy()  # fault the pages in
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            copy()
            times.append(time.perf_counter() - t0)
        return {"median_gbps": nbytes / statistics.median(times) / GB, "best_gbps": nbytes / min(times) / GB}

    def torch_rate() -> dict[str, float]:
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        return rate(lambda: dst.copy_(src))

    def memoryview_rate() -> dict[str, float]:
        a, b = bytearray(b"\x01") * nbytes, bytearray(nbytes)
        with memoryview(a) as ma, memoryview(b) as mb:

            def copy() -> None:
                mb[:] = ma

            return rate(copy)

    # One after the other, each in its own scope, so that only one pair of buffers is alive at a time.
    by_torch = torch_rate()
    by_memcpy = memoryview_rate()
    return {
        "bytes": nbytes,
        "repeats": repeats,
        "torch_copy": {**by_torch, "threads": torch.get_num_threads()},
        "memoryview_copy": {**by_memcpy, "threads": 1},
    }


# --------------------------------------------------------------------------------------------------
# Reporting


def print_table(cases: list[Case]) -> None:
    head = ("case", "median s", "min s", "max s", "peak RSS MB", "n", "note")
    rows = []
    for c in cases:
        walls = [r.wall_s for r in c.runs] if c.ok else []
        rows.append(
            (
                f"{c.kind}: {c.label}",
                fmt(c.median_s, ".3f"),
                fmt(min(walls) if walls else None, ".3f"),
                fmt(max(walls) if walls else None, ".3f"),
                fmt(c.median_rss_mb, ".1f"),
                str(len(walls)),
                c.error or c.check,
            )
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]

    def line(cells: tuple[str, ...]) -> str:
        parts = [cell.rjust(widths[i]) if i > 0 else cell.ljust(widths[i]) for i, cell in enumerate(cells[:-1])]
        return "  ".join([*parts, cells[-1]]).rstrip()

    print(line(head))
    print(line(tuple("-" * w for w in widths)))
    for r in rows:
        print(line(r))


def ratios_for(cases: list[Case]) -> list[dict[str, Any]]:
    """statecli / baseline for wall and RSS; the plain script has targets, the mmap one does not."""
    sc, plain, mmap, floor = (get(cases, k) for k in ("statecli", "plain", "mmap", "floor"))

    def div(num: float | None, den: float | None) -> float | None:
        return num / den if num is not None and den else None

    def net(c: Case) -> float | None:
        # Without start-up: what is left once every case's shared `import torch` is taken off.
        return c.median_s - floor.median_s if c.median_s is not None and floor.median_s is not None else None

    out = []
    for name, value, target in (
        ("statecli wall / plain wall", div(sc.median_s, plain.median_s), TARGET_WALL_VS_PLAIN),
        ("statecli RSS / plain RSS", div(sc.median_rss_mb, plain.median_rss_mb), TARGET_RSS_VS_PLAIN),
        ("statecli wall / mmap wall", div(sc.median_s, mmap.median_s), None),
        ("statecli RSS / mmap RSS", div(sc.median_rss_mb, mmap.median_rss_mb), None),
        ("(statecli - import) / (plain - import) wall", div(net(sc), net(plain)), None),
    ):
        if value is None:
            status = "n/a"
        elif target is None:
            status = "info"
        else:
            status = "pass" if value <= target else "miss"
        out.append({"ratio": name, "value": value, "target_max": target, "status": status})
    return out


def throughput_for(cases: list[Case], file_bytes: int) -> dict[str, float | None]:
    """Checkpoint bytes per second of whole-process wall time, and of wall time less `import torch`."""
    floor = get(cases, "floor").median_s
    out: dict[str, float | None] = {}
    for kind in ("statecli", "plain", "mmap"):
        wall = get(cases, kind).median_s
        out[f"{kind}_gbps"] = file_bytes / wall / GB if wall else None
        # A wall time at or below the floor leaves nothing to divide by: the run was all start-up.
        after = wall - floor if wall is not None and floor is not None else None
        out[f"{kind}_after_import_gbps"] = file_bytes / after / GB if after and after > 0 else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Time `statecli stats --format json` (whole process, wall and peak RSS) against a plain "
        "torch.load + per-tensor min/max/mean/std/isnan/isinf script, with and without mmap=True, and check "
        "that statecli's numbers agree with the script's.",
    )
    ap.add_argument(
        "--size",
        default="2GiB",
        help="synthetic fp32 checkpoint size: 2GiB, 64MB (10^6), 500MiB, or bytes (default: %(default)s); "
        "--size 2GiB reuses bench_inspect.py's default file",
    )
    ap.add_argument("--tensors", type=int, default=250, help="about this many tensors in it (default 250)")
    ap.add_argument("--runs", type=int, default=3, help="measured runs per case, after 1 warm-up (default 3)")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "statecli-bench",
        help="where the synthetic .pt lives (shared with bench_inspect.py and bench_convert.py; default: %(default)s)",
    )
    ap.add_argument(
        "--statecli",
        default=None,
        help="command that runs statecli, shell-split (default: '<this python> -m statecli')",
    )
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write every raw number here")
    ap.add_argument(
        "--rss-source",
        choices=("auto", "time", "rusage"),
        default="auto",
        help="peak RSS from /usr/bin/time -v, or from getrusage(RUSAGE_CHILDREN) in a fresh child "
        "(default auto: time when it works)",
    )
    ap.add_argument("--timeout", type=float, default=1800.0, help="kill a single run after this many s")
    args = ap.parse_args(argv)
    try:
        size_bytes = parse_size(args.size)
    except ValueError as e:
        ap.error(str(e))
    if args.runs < 1 or args.tensors < 1 or args.timeout <= 0:
        ap.error("--runs, --tensors and --timeout must be positive")

    args.workdir.mkdir(parents=True, exist_ok=True)
    src_path, layout = source_path(args.workdir, size_bytes, args.tensors)
    if not src_path.exists():
        # Only building the input needs disk (outputs are a few hundred KB); refuse early, not mid-write.
        need = layout_bytes(layout) * 11 // 10
        free = shutil.disk_usage(args.workdir).free
        if free < need:
            print(
                f"bench_stats: not enough free disk in {args.workdir} to build the checkpoint: "
                f"{free / GIB:.2f} GiB free, {need / GIB:.2f} GiB wanted. Pick another --workdir or a smaller --size.",
                file=sys.stderr,
            )
            return 2

    statecli_cmd = shlex.split(args.statecli) if args.statecli else [sys.executable, "-m", "statecli"]
    env = dict(os.environ)
    # Let `python -m statecli` find the package from a checkout that is not pip-installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    # Time statecli as installed software runs, with its bytecode cached (see bench_inspect.py).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    compileall.compile_dir(str(REPO_ROOT / "statecli"), quiet=1)
    measurer, measurer_why = pick_measurer(args.rss_source, env)
    log(f"peak RSS from {measurer.description} ({measurer_why})")

    source = prepare_source(src_path, layout)
    file_bytes = source.path.stat().st_size

    # Other work on the machine matters more than usual here: torch's OpenMP threads spin-wait for each
    # other, so on a busy core a small reduction can take tens of times longer. Record the load seen.
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="statecli-bench-stats-") as tmp:
        cases = make_cases(source.path, Path(tmp), statecli_cmd)
        for case in cases:
            case.warmup = run_case(case, measurer, args.timeout, warmup=True)
        check_outputs(cases)
        # Round-robin rather than case after case: a shared machine's slow minute then hits every case,
        # not just the one that happened to be running.
        for _ in range(args.runs):
            for case in cases:
                if case.error is not None:
                    continue
                run = run_case(case, measurer, args.timeout, warmup=False)
                if run is None:
                    case.runs.clear()
                else:
                    case.runs.append(run)
    for case in cases:
        if case.ok:
            log(f"{case.kind}: median {case.median_s:.3f} s, peak RSS {case.median_rss_mb:.1f} MB")

    load_after = os.getloadavg()
    # After the runs, so its 512 MiB of buffers are never resident while a command is measured.
    log(f"memory-copy bandwidth ({COPY_BYTES // MIB} MiB x {COPY_REPEATS})")
    bandwidth = copy_bandwidth()

    facts = machine_facts(statecli_cmd)
    print_header("statecli stats benchmark (fp32 .pt)", facts)
    print(
        f"input: {source.path}  {file_bytes / MIB:,.1f} MiB ({file_bytes / GB:.3f} GB), {source.n_tensors} tensors"
        f"{' (built this run)' if source.built else ''}"
    )
    print(f"peak RSS: {measurer.description} ({measurer_why})")
    print("wall: perf_counter around the whole process" + (f" (and {TIME_BIN})" if measurer.mode == "time" else ""))
    print(
        f"runs: {args.runs} measured per case after 1 warm-up, round-robin over the cases; "
        "warm page cache; stdout of every run to a file"
    )
    threads = bandwidth["torch_copy"]["threads"]
    print(
        f"load average (1/5/15 min): {'/'.join(f'{x:.2f}' for x in load_before)} before the runs, "
        f"{'/'.join(f'{x:.2f}' for x in load_after)} after; torch uses {threads} threads"
    )
    if load_before[0] >= 0.5:
        print(
            "  note: something else was running. torch's threads then wait on a busy core, and reductions can be "
            "many times slower; compare only runs made under a similar load"
        )
    print()
    print_table(cases)

    ratios = ratios_for(cases)
    print()
    print("ratios (statecli median / baseline median; lower is better)")
    for r in ratios:
        target = f"target <= {r['target_max']:g}" if r["target_max"] is not None else "no target"
        print(f"  {r['status']:<4}  {r['ratio']:<44} {fmt(r['value'], '.3f'):>6}   {target}")
    if file_bytes < GIB:
        print(
            "  note: the targets are meant for the 2 GiB default; at this size interpreter and torch start-up "
            "dominate every case"
        )

    tp = throughput_for(cases, file_bytes)
    tc, mc = bandwidth["torch_copy"], bandwidth["memoryview_copy"]
    print()
    print("throughput (checkpoint GB / s; 1 GB = 10^9 bytes)")
    for kind in ("statecli", "plain", "mmap"):
        print(
            f"  {kind:<9} whole process {fmt(tp[f'{kind}_gbps'], '.3f'):>7} GB/s   "
            f"less `import torch` {fmt(tp[f'{kind}_after_import_gbps'], '.3f'):>7} GB/s"
        )
    print(
        f"  memory copy ({COPY_BYTES // MIB} MiB, median of {COPY_REPEATS}; bytes copied / s, traffic is 2x): "
        f"torch copy_ {tc['median_gbps']:.2f} GB/s ({tc['threads']} threads), "
        f"memoryview {mc['median_gbps']:.2f} GB/s (1 thread)"
    )

    failed = [c for c in cases if c.error or c.check.startswith("MISMATCH")]
    for c in failed:
        print(f"  note: {c.kind}: {c.error or c.check}")

    if args.json:
        doc = {
            "schema": "statecli.bench_stats/1",
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": facts,
            "input": {"path": str(source.path), "bytes": file_bytes, "tensors": source.n_tensors},
            "rss_source": {"mode": measurer.mode, "description": measurer.description, "why": measurer_why},
            "cases": [
                {
                    "kind": c.kind,
                    "label": c.label,
                    "argv": c.argv,
                    "error": c.error,
                    "check": c.check or None,
                    "median_s": c.median_s,
                    "median_rss_mb": c.median_rss_mb,
                    "warmup": vars(c.warmup) if c.warmup else None,
                    "runs": [vars(r) for r in c.runs],
                }
                for c in cases
            ],
            "ratios": ratios,
            "throughput_gbps": tp,
            "copy_bandwidth": bandwidth,
            "loadavg": {"before": list(load_before), "after": list(load_after)},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {args.json}")
    # Targets never fail the run; a command that failed or numbers that disagree do.
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
