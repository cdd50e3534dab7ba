#!/usr/bin/env python3
"""Benchmark `statecli convert --dtype bf16` against naive torch.load -> .to(bf16) -> save scripts.

Converts bench_inspect.py's synthetic fp32 ResNet-like ``.pt`` (default 2 GiB, ~250 tensors,
BatchNorm buffers included; the same cached file) to bf16, written as ``.safetensors`` and as
``.pt``, three ways each:

* naive: ``torch.load(weights_only=True)``, cast every floating tensor, ``save_file`` / ``torch.save``;
* the same with ``torch.load(mmap=True, weights_only=True)``;
* ``statecli convert IN -o OUT --dtype bf16 --force --quiet``.

Every command is a whole process run under ``/usr/bin/time -v``: wall time is ``time.perf_counter``
around it, peak RSS is time's "Maximum resident set size".  Without a usable ``/usr/bin/time`` a
fresh stdlib-only child runs the command and reports ``getrusage(RUSAGE_CHILDREN).ru_maxrss``.
One warm-up run per command (its output is checked), then medians of ``--runs`` measured runs.

Standard library + torch + safetensors only.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The synthetic checkpoint comes from bench_inspect.py, so both benchmarks build and cache the same file.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inspect import (
    FORMAT_VERSION,
    GIB,
    MIB,
    REPO_ROOT,
    _atomic_write,
    build_resnet,
    error_line,
    layout_bytes,
    log,
    machine_facts,
    print_header,
    resnet_spec,
)

TIME_BIN = "/usr/bin/time"
RSS_LINE = "Maximum resident set size (kbytes)"

# --------------------------------------------------------------------------------------------------
# Baseline scripts, each run as `python -c SCRIPT SRC DST`: what a user would write by hand.

LOAD_PLAIN = "import sys, torch\nsd = torch.load(sys.argv[1], weights_only=True)\n"
LOAD_MMAP = "import sys, torch\nsd = torch.load(sys.argv[1], mmap=True, weights_only=True)\n"
CAST = "out = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}\n"
SAVE = {
    ".safetensors": "from safetensors.torch import save_file\nsave_file(out, sys.argv[2])\n",
    ".pt": "torch.save(out, sys.argv[2])\n",
}
SAVE_LABEL = {".safetensors": "save_file", ".pt": "torch.save"}

# Targets from the issue: statecli / baseline, lower is better.  Reported, never enforced.
TARGET_WALL_VS_NAIVE = 0.5
TARGET_WALL_VS_MMAP = 0.8
TARGET_RSS_VS_NAIVE = 0.15

# Stands in for /usr/bin/time.  It is a fresh stdlib-only process, so the child it forks starts from
# its few MB: forked straight from this script (torch imported, checkpoint maybe just built), the
# child's ru_maxrss would inherit this script's high-water mark at exec.
RUSAGE_SRC = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL).wait()
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall_s": wall, "rc": rc, "ru_maxrss": ru.ru_maxrss, "ru_utime": ru.ru_utime,
                  "ru_stime": ru.ru_stime, "ru_majflt": ru.ru_majflt, "ru_minflt": ru.ru_minflt}))
"""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(I?B?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``2GiB`` -> 2*2**30, ``64MB`` -> 64*10**6, ``123`` -> bytes (the units statecli's --max-shard-size takes)."""
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"cannot read size {text!r} (examples: 2GiB, 64MB, 500MiB)")
    unit, suffix = m.group(2).upper(), m.group(3).upper()
    base = 1024 if suffix.startswith("I") else 1000
    size = int(float(m.group(1)) * base ** (" KMGT".index(unit) if unit else 0))
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


# --------------------------------------------------------------------------------------------------
# The input file


@dataclass
class Source:
    path: Path
    layout: list[tuple[str, tuple[int, ...], str]]
    built: bool

    @property
    def n_tensors(self) -> int:
        return len(self.layout)


def source_path(workdir: Path, size_bytes: int, n_tensors: int) -> tuple[Path, list[tuple[str, tuple[int, ...], str]]]:
    """The path and layout bench_inspect.py uses for `--size-gb size_bytes/2**30 --tensors n_tensors`."""
    # Mirrors bench_inspect.prepare_files (which also builds files this benchmark does not need), so
    # both benchmarks share one cached .pt.
    size_gb = size_bytes / GIB
    layout = resnet_spec(int(size_gb * GIB), n_tensors)
    return workdir / f"resnet_v{FORMAT_VERSION}_{size_gb:g}gib_{n_tensors}t.pt", layout


def prepare_source(path: Path, layout: list[tuple[str, tuple[int, ...], str]]) -> Source:
    if path.exists():
        return Source(path, layout, built=False)
    import torch

    t0 = time.perf_counter()
    sd = build_resnet(layout)
    _atomic_write(path, lambda p: torch.save(sd, p))
    log(f"built {path.name} in {time.perf_counter() - t0:.1f} s")
    return Source(path, layout, built=True)


# --------------------------------------------------------------------------------------------------
# Measuring whole processes


@dataclass
class Run:
    wall_s: float
    maxrss_kib: int | None
    rc: int
    raw: dict[str, Any] = field(default_factory=dict)  # time -v's report, or the rusage fields


def split_time_report(stderr: str) -> tuple[dict[str, str], str]:
    """(time -v's fields, the command's own stderr) from the stderr of `/usr/bin/time -v CMD`."""
    lines = stderr.splitlines()
    # time appends its report after the command has exited, so the last header is time's own even if
    # the command printed something that looks like one.
    start = max((i for i, ln in enumerate(lines) if ln.startswith("\tCommand being timed:")), default=None)
    if start is None:
        return {}, stderr
    report: dict[str, str] = {}
    for ln in lines[start:]:
        key, sep, value = ln.strip().partition(": ")
        if sep:
            report[key] = value
    own = lines[:start]
    if own and own[-1].startswith(("Command exited with non-zero status", "Command terminated by signal")):
        own = own[:-1]
    return report, "\n".join(own)


class Measurer:
    """Runs one command as a whole process and returns its wall time, peak RSS and exit status."""

    def __init__(self, mode: str, env: dict[str, str]) -> None:
        self.mode = mode  # "time" | "rusage"
        self.env = env

    @property
    def description(self) -> str:
        if self.mode == "time":
            return f'{TIME_BIN} -v, "{RSS_LINE}"'
        return "resource.getrusage(RUSAGE_CHILDREN).ru_maxrss, read in a fresh stdlib-only child per run"

    def run(self, argv: list[str], timeout: float) -> tuple[Run, str]:
        """Run argv once; return the Run and the command's stderr."""
        if self.mode == "time":
            wrapped = [TIME_BIN, "-v", *argv]
            stdout = subprocess.DEVNULL
        else:
            wrapped = [sys.executable, "-I", "-S", "-c", RUSAGE_SRC, *argv]
            stdout = subprocess.PIPE
        t0 = time.perf_counter()
        # A session of its own, so that a timeout kills the measured command too and not just its wrapper.
        proc = subprocess.Popen(
            wrapped,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Run(time.perf_counter() - t0, None, -int(signal.SIGKILL)), f"timed out after {timeout:g} s"
        wall = time.perf_counter() - t0
        err_text = err.decode(errors="replace")
        if self.mode == "time":
            report, own = split_time_report(err_text)
            rss = report.get(RSS_LINE)
            return Run(wall, int(rss) if rss else None, proc.returncode, dict(report)), own
        try:
            res = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            return Run(wall, None, proc.returncode or 1), err_text or "rusage helper printed no result"
        return Run(res.pop("wall_s"), res["ru_maxrss"], res.pop("rc"), res), err_text


def pick_measurer(requested: str, env: dict[str, str]) -> tuple[Measurer, str]:
    """The measurer to use, and why: /usr/bin/time -v when it works, else the rusage child."""
    if requested == "rusage":
        return Measurer("rusage", env), "requested with --rss-source rusage"
    why = f"{TIME_BIN} not found"
    if os.access(TIME_BIN, os.X_OK):
        # BusyBox and BSD `time` have no -v; only a probe tells them from GNU time.
        probe = subprocess.run([TIME_BIN, "-v", "true"], capture_output=True, text=True, check=False)
        if probe.returncode == 0 and RSS_LINE in probe.stderr:
            return Measurer("time", env), f"{TIME_BIN} -v works"
        why = f"{TIME_BIN} -v does not print {RSS_LINE!r}"
    if requested == "time":
        raise SystemExit(f"bench_convert: --rss-source time, but {why}")
    return Measurer("rusage", env), f"fallback: {why}"


# --------------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    ext: str  # output format: ".safetensors" | ".pt"
    kind: str  # "naive" | "mmap" | "statecli"
    label: str
    argv: list[str]
    dst: Path
    runs: list[Run] = field(default_factory=list)
    warmup: Run | None = None
    error: str | None = None
    check: str = ""
    stray: list[str] = field(default_factory=list)  # files other than dst found in the output folder

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


def make_cases(src: Path, outdir: Path, statecli_cmd: list[str]) -> list[Case]:
    py = sys.executable
    cases = []
    for ext in (".safetensors", ".pt"):
        save = SAVE_LABEL[ext]
        for kind, load, label in (
            ("naive", LOAD_PLAIN, f"torch.load -> .to(bf16) -> {save}"),
            ("mmap", LOAD_MMAP, f"torch.load(mmap=True) -> .to(bf16) -> {save}"),
        ):
            dst = outdir / f"{kind}{ext}"
            cases.append(Case(ext, kind, label, [py, "-c", load + CAST + SAVE[ext], str(src), str(dst)], dst))
        dst = outdir / f"statecli{ext}"
        argv = [*statecli_cmd, "convert", str(src), "-o", str(dst), "--dtype", "bf16", "--force", "--quiet"]
        cases.append(Case(ext, "statecli", "statecli convert --dtype bf16", argv, dst))
    return cases


@contextlib.contextmanager
def open_tensors(path: Path) -> Iterator[tuple[list[str], Callable[[str], Any]]]:
    """(names, name -> tensor) for a written output, one tensor in memory at a time where possible."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            yield list(f.keys()), f.get_tensor
    else:
        import torch

        sd = torch.load(path, mmap=True, weights_only=True)
        yield list(sd.keys()), sd.__getitem__


def check_output(path: Path, layout: list[tuple[str, tuple[int, ...], str]], ref: Path | None) -> str:
    """Names, shapes and dtypes against the layout, values against the naive output: a fast wrong
    conversion must not look like a win."""
    import torch

    want = {name: (shape, torch.int64 if kind == "count" else torch.bfloat16) for name, shape, kind in layout}
    try:
        with contextlib.ExitStack() as stack:
            names, get = stack.enter_context(open_tensors(path))
            ref_get = stack.enter_context(open_tensors(ref))[1] if ref is not None else None
            if set(names) != set(want):
                missing, extra = sorted(set(want) - set(names)), sorted(set(names) - set(want))
                return f"MISMATCH: names differ (missing {missing[:3]}, extra {extra[:3]})"
            for name in names:
                t = get(name)
                shape, dtype = want[name]
                if tuple(t.shape) != shape or t.dtype != dtype:
                    return f"MISMATCH: {name} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}"
                if ref_get is not None and not torch.equal(t, ref_get(name)):
                    return f"MISMATCH: {name} differs from the naive script's output"
    except Exception as e:  # any unreadable output is a finding to print, not a crash of the benchmark
        return f"MISMATCH: cannot read output ({type(e).__name__}: {e})"
    return f"ok ({len(names)} tensors{', = naive' if ref is not None else ''})"


def clear_outputs(outdir: Path, produced: Path | None = None, keep: frozenset[Path] = frozenset()) -> list[str]:
    """Delete the files in outdir except keep; return the names of those that are neither keep nor
    produced (a command's leftovers, such as a temporary file)."""
    stray = []
    for p in sorted(outdir.iterdir()):
        if p in keep:
            continue
        if p != produced:
            stray.append(p.name)
        if p.is_file() or p.is_symlink():
            p.unlink()
    return stray


def run_case(case: Case, measurer: Measurer, timeout: float, warmup: bool) -> Run | None:
    """One run of case; on failure records the error and returns None."""
    log(f"{case.ext}: {case.kind}{' (warm-up)' if warmup else ''}")
    run, stderr = measurer.run(case.argv, timeout)
    if run.rc != 0:
        what = "statecli failed" if case.kind == "statecli" else "command failed"
        when = "" if warmup else " on a measured run"
        case.error = f"{what}{when} (exit {run.rc}): {error_line(stderr.encode())}"
        log(case.error)
        return None
    if not case.dst.exists():
        case.error = f"exit 0 but {case.dst.name} was not written"
        log(case.error)
        return None
    return run


def measure_format(
    cases: list[Case],
    outdir: Path,
    layout: list[tuple[str, tuple[int, ...], str]],
    measurer: Measurer,
    runs: int,
    timeout: float,
    kept: set[Path] | None,
) -> None:
    """Warm up and check every case of one output format, then measure them round-robin.

    kept: None deletes every output after its run; a set (for --keep) collects the last round's
    outputs, which later clean-ups then leave alone."""
    ref = outdir / f"reference-naive{cases[0].ext}"
    for case in cases:
        case.warmup = run_case(case, measurer, timeout, warmup=True)
        if case.warmup is not None:
            case.check = check_output(case.dst, layout, ref if ref.exists() else None)
            log(f"  output check: {case.check}")
            if case.kind == "naive":
                case.dst.rename(ref)
        # Also after a failure: what a failed command leaves behind is its finding, not the next case's.
        case.stray += clear_outputs(outdir, case.dst, keep=frozenset({ref, *(kept or ())}))
    with contextlib.suppress(FileNotFoundError):
        ref.unlink()
    # Round-robin rather than case after case: a shared machine's slow minute then hits every case,
    # not just the one that happened to be running.
    for i in range(runs):
        for case in cases:
            if case.error is not None:
                continue
            run = run_case(case, measurer, timeout, warmup=False)
            if run is None:
                case.runs.clear()
            else:
                case.runs.append(run)
                if kept is not None and i == runs - 1:
                    kept.add(case.dst)
            case.stray += clear_outputs(outdir, case.dst, keep=frozenset(kept or ()))
    for case in cases:
        if case.ok:
            log(f"{case.ext}: {case.kind}: median {case.median_s:.3f} s, peak RSS {case.median_rss_mb:.1f} MB")


# --------------------------------------------------------------------------------------------------
# Reporting


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(cases: list[Case]) -> None:
    head = ("output", "case", "median s", "min s", "max s", "peak RSS MB", "n", "note")
    rows = []
    for c in cases:
        walls = [r.wall_s for r in c.runs] if c.ok else []
        note = c.error or c.check
        if c.stray:
            note += f"; left in the output folder: {', '.join(sorted(set(c.stray)))}"
        rows.append(
            (
                c.ext,
                f"{c.kind}: {c.label}",
                fmt(c.median_s, ".3f"),
                fmt(min(walls) if walls else None, ".3f"),
                fmt(max(walls) if walls else None, ".3f"),
                fmt(c.median_rss_mb, ".1f"),
                str(len(walls)),
                note,
            )
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    right = {2, 3, 4, 5, 6}

    def line(cells: tuple[str, ...] | list[str]) -> str:
        parts = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(cells[:-1])]
        return "  ".join([*parts, cells[-1]]).rstrip()

    print(line(head))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))


def ratios_for(cases: list[Case]) -> list[dict[str, Any]]:
    """statecli / baseline for wall and RSS, per output format, each against its target."""
    out = []
    for ext in dict.fromkeys(c.ext for c in cases):

        def get(kind: str, ext: str = ext) -> Case | None:
            return next((c for c in cases if c.ext == ext and c.kind == kind), None)

        sc, naive, mmap = get("statecli"), get("naive"), get("mmap")
        for name, num, den, target in (
            ("statecli wall / naive wall", sc and sc.median_s, naive and naive.median_s, TARGET_WALL_VS_NAIVE),
            ("statecli wall / mmap wall", sc and sc.median_s, mmap and mmap.median_s, TARGET_WALL_VS_MMAP),
            ("statecli RSS / naive RSS", sc and sc.median_rss_mb, naive and naive.median_rss_mb, TARGET_RSS_VS_NAIVE),
        ):
            value = num / den if num is not None and den else None
            status = "n/a" if value is None else ("pass" if value <= target else "miss")
            out.append({"output": ext, "ratio": name, "value": value, "target_max": target, "status": status})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Time `statecli convert --dtype bf16` (whole process, wall and peak RSS) against naive "
        "torch.load -> .to(bf16) -> save_file / torch.save scripts.",
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
        help="where the synthetic .pt lives (shared with bench_inspect.py); outputs go to WORKDIR/out "
        "(default: %(default)s)",
    )
    ap.add_argument(
        "--statecli",
        default=None,
        help="command that runs statecli, shell-split (default: '<this python> -m statecli')",
    )
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write every raw number here")
    ap.add_argument("--keep", action="store_true", help="keep the last run's outputs in WORKDIR/out")
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
    ckpt_bytes = src_path.stat().st_size if src_path.exists() else layout_bytes(layout)
    # Room for the bf16 outputs (half the input each) plus the kept naive reference they are checked
    # against, with margin; building the input and --keep (six outputs) need their own room on top.
    need = 3 * ckpt_bytes + (0 if src_path.exists() else ckpt_bytes) + (3 * ckpt_bytes if args.keep else 0)
    free = shutil.disk_usage(args.workdir).free
    if free < need:
        print(
            f"bench_convert: not enough free disk in {args.workdir}: {free / GIB:.2f} GiB free, "
            f"{need / GIB:.2f} GiB wanted (3x the {ckpt_bytes / GIB:.2f} GiB checkpoint"
            f"{', plus building it' if not src_path.exists() else ''}{', plus --keep' if args.keep else ''}). "
            "Free some space, pick another --workdir, or try a smaller --size.",
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
    outdir = args.workdir / "out"
    outdir.mkdir(exist_ok=True)
    stale = clear_outputs(outdir)  # an interrupted earlier run may have left files here
    if stale:
        log(f"removed files left in {outdir} by an earlier run: {', '.join(stale)}")

    cases = make_cases(source.path, outdir, statecli_cmd)
    kept: set[Path] | None = set() if args.keep else None
    for ext in (".safetensors", ".pt"):
        measure_format([c for c in cases if c.ext == ext], outdir, layout, measurer, args.runs, args.timeout, kept)

    facts = machine_facts(statecli_cmd)
    file_bytes = source.path.stat().st_size
    print_header("statecli convert benchmark (fp32 .pt -> bf16)", facts)
    print(
        f"input: {source.path}  {file_bytes / MIB:,.1f} MiB, {source.n_tensors} tensors"
        f"{' (built this run)' if source.built else ''}"
    )
    print(f"outputs: {outdir}/ ({'last run kept' if args.keep else 'deleted after every run'})")
    print(f"peak RSS: {measurer.description} ({measurer_why})")
    print("wall: perf_counter around the whole process" + (f" (and {TIME_BIN})" if measurer.mode == "time" else ""))
    print(
        f"runs: {args.runs} measured per case after 1 checked warm-up, round-robin over the cases of each "
        "output format; warm page cache for the input"
    )
    print()
    print_table(cases)

    ratios = ratios_for(cases)
    print()
    print("ratios (statecli median / baseline median; lower is better)")
    for r in ratios:
        print(
            f"  {r['status']:<4}  {r['output']:<12}  {r['ratio']:<27} {fmt(r['value'], '.3f'):>6}"
            f"   target <= {r['target_max']:g}"
        )
    if file_bytes < GIB:
        print(
            "  note: the targets are meant for the 2 GiB default; at this size interpreter and torch start-up "
            "dominate every case"
        )
    failed = [c for c in cases if c.error or not c.check.startswith("ok") or c.stray]
    for c in failed:
        stray = f"; left in the output folder: {', '.join(sorted(set(c.stray)))}" if c.stray else ""
        print(f"  note: {c.ext} {c.kind}: {c.error or c.check}{stray}")

    if args.json:
        doc = {
            "schema": "statecli.bench_convert/1",
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": facts,
            "input": {"path": str(source.path), "bytes": file_bytes, "tensors": source.n_tensors},
            "rss_source": {"mode": measurer.mode, "description": measurer.description, "why": measurer_why},
            "cases": [
                {
                    "output": c.ext,
                    "kind": c.kind,
                    "label": c.label,
                    "argv": c.argv,
                    "error": c.error,
                    "check": c.check or None,
                    "stray_files": c.stray,
                    "median_s": c.median_s,
                    "median_rss_mb": c.median_rss_mb,
                    "warmup": vars(c.warmup) if c.warmup else None,
                    "runs": [vars(r) for r in c.runs],
                }
                for c in cases
            ],
            "ratios": ratios,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {args.json}")
    # Targets never fail the run; a command that failed or wrote a wrong file does.
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
