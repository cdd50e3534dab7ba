#!/usr/bin/env python3
"""Benchmark `statecli inspect` against plain torch / safetensors listing scripts.

Builds synthetic checkpoints (cached between runs), then times whole processes:

* a ResNet-like state_dict (default 2 GiB fp32, ~250 tensors, BatchNorm buffers included) saved
  as ``.pt`` (torch.save) and as ``.safetensors`` (safetensors.torch.save_file);
* a ``.pt`` holding many small tensors (default 100,000).

Each command is its own process, started with ``subprocess.Popen`` and reaped with ``os.wait4`` so
that its wall time (``time.perf_counter`` around spawn + reap) and its peak RSS
(``rusage.ru_maxrss``) are its own.  One warm-up run per command comes first and is not counted,
so the medians are warm page-cache numbers unless ``--drop-caches`` is given.  The commands on one
file are measured in turns (A B C A B C ...), so the machine's drift reaches each of them alike.

Standard library + torch + safetensors only.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30
MIB = 1 << 20
FORMAT_VERSION = 1  # bump when the synthetic layout changes, so cached files are rebuilt

# --------------------------------------------------------------------------------------------------
# Baseline scripts, each run as `python -c SCRIPT PATH`.

PLAIN_SCRIPT = (
    "import torch,sys; sd=torch.load(sys.argv[1], weights_only=True); "
    "[print(k, tuple(v.shape), v.dtype) for k,v in sd.items()]"
)
MMAP_SCRIPT = (
    "import torch,sys; sd=torch.load(sys.argv[1], mmap=True, weights_only=True); "
    "[print(k, tuple(v.shape), v.dtype) for k,v in sd.items()]"
)
SAFE_OPEN_SCRIPT = (
    "import sys; from safetensors import safe_open\n"
    "with safe_open(sys.argv[1], 'pt') as f:\n"
    "    [print(k, f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()]"
)
# The same over every shard a Hugging Face index names, in the index's order of shards.
SHARDED_SCRIPT = (
    "import json, os, sys; from safetensors import safe_open\n"
    "index = sys.argv[1]; wm = json.load(open(index))['weight_map']\n"
    "for shard in dict.fromkeys(wm.values()):\n"
    "    with safe_open(os.path.join(os.path.dirname(index), shard), 'pt') as f:\n"
    "        [print(k, f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()]"
)

# Targets from the issue; the benchmark reports them, nothing fails on them.
TARGET_MMAP_RATIO = 8.0
TARGET_PLAIN_RATIO = 30.0
TARGET_SAFETENSORS_S = 0.2
TARGET_RSS_MB = 60.0
TARGET_MANY_S = 2.0
TARGET_MANY_TABLE_S = 2.5  # issue #14: the table piped (not a terminal)
TARGET_INDEX_S = 1.0  # issue #14: 1,000 shards x 100 tensors, --format json


# --------------------------------------------------------------------------------------------------
# Synthetic checkpoints


def _bn(prefix: str) -> list[tuple[str, tuple[int, ...] | None, str]]:
    return [
        (f"{prefix}.weight", None, "bn_weight"),
        (f"{prefix}.bias", None, "bn_bias"),
        (f"{prefix}.running_mean", None, "bn_mean"),
        (f"{prefix}.running_var", None, "bn_var"),
        (f"{prefix}.num_batches_tracked", (), "count"),
    ]


def resnet_layout(base: int, n_blocks: int, classes: int = 1000) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) for a ResNet-like stack: 4 stages of width base*[1, 2, 4, 8]."""
    per_stage = [n_blocks // 4] * 4
    for i in range(n_blocks % 4):  # extra blocks go to the middle stages first, as in ResNet-50/101
        per_stage[(2, 1, 3, 0)[i]] += 1
    out: list[tuple[str, tuple[int, ...], str]] = []

    def conv(name: str, c_out: int, c_in: int, k: int) -> None:
        out.append((name, (c_out, c_in, k, k), "conv"))

    def bn(prefix: str, c: int) -> None:
        for name, shape, kind in _bn(prefix):
            out.append((name, (c,) if shape is None else shape, kind))

    conv("conv1.weight", base, 3, 7)
    bn("bn1", base)
    c_in = base
    for s, blocks in enumerate(per_stage):
        c = base * (1 << s)
        for b in range(blocks):
            p = f"layer{s + 1}.{b}"
            conv(f"{p}.conv1.weight", c, c_in, 3)
            bn(f"{p}.bn1", c)
            conv(f"{p}.conv2.weight", c, c, 3)
            bn(f"{p}.bn2", c)
            if b == 0 and s > 0:
                conv(f"{p}.downsample.0.weight", c, c_in, 1)
                bn(f"{p}.downsample.1", c)
            c_in = c
    out.append(("fc.weight", (classes, c_in), "linear"))
    out.append(("fc.bias", (classes,), "bias"))
    return out


def layout_bytes(layout: list[tuple[str, tuple[int, ...], str]]) -> int:
    return sum((8 if kind == "count" else 4) * math.prod(shape) for _, shape, kind in layout)


def resnet_spec(size_bytes: int, n_tensors: int) -> list[tuple[str, tuple[int, ...], str]]:
    """A layout with about n_tensors tensors and about size_bytes bytes (conv widths scaled)."""
    # 6 (stem) + 12 per block + 6 per downsample (3 of them) + 2 (fc) = 26 + 12 * blocks
    n_blocks = max(4, round((n_tensors - 26) / 12))
    base = 64
    for _ in range(20):  # bytes grow ~ base**2: a few fixed-point steps settle it
        total = layout_bytes(resnet_layout(base, n_blocks))
        new = max(1, round(base * math.sqrt(size_bytes / total)))
        if new == base:
            break
        base = new
    return resnet_layout(base, n_blocks)


def _module_metadata(names: list[str], bn_version: int = 2) -> OrderedDict:
    """The `_metadata` torch.nn.Module.state_dict() attaches (one entry per module, with versions)."""
    meta: OrderedDict = OrderedDict()
    meta[""] = {"version": 1}
    for name in names:
        parts = name.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            if mod not in meta:
                is_bn = mod.split(".")[-1].startswith("bn") or mod.endswith("downsample.1")
                meta[mod] = {"version": bn_version if is_bn else 1}
    return meta


def build_resnet(layout: list[tuple[str, tuple[int, ...], str]]):
    """Materialise the layout with cheap deterministic values: a seeded 4 MiB randn block, tiled."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    block = torch.randn(1 << 20, generator=gen)
    sd: OrderedDict = OrderedDict()
    for i, (name, shape, kind) in enumerate(layout):
        if kind == "count":
            sd[name] = torch.tensor(1000 + i, dtype=torch.int64)
            continue
        t = torch.empty(shape, dtype=torch.float32)
        flat = t.view(-1)
        n = flat.numel()
        shift = (i * 7919) % block.numel()
        src = torch.roll(block, shift) if n < block.numel() else block
        for start in range(0, n, block.numel()):
            m = min(block.numel(), n - start)
            flat[start : start + m].copy_(src[:m])
        if kind == "conv" or kind == "linear":
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            flat.mul_(1.0 / math.sqrt(fan_in))
        elif kind == "bn_weight":
            flat.mul_(0.1).add_(1.0)
        elif kind == "bn_var":
            flat.abs_().mul_(0.1).add_(1.0)
        else:  # bn_bias, bn_mean, bias
            flat.mul_(0.1)
        sd[name] = t
    sd._metadata = _module_metadata(list(sd))
    return sd


def many_names(n: int) -> list[tuple[str, int, bool]]:
    """(name, numel, is_count) for n small BatchNorm-style tensors: 4-16 floats each."""
    kinds = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    out = []
    for i in range(n):
        block, k = divmod(i, len(kinds))
        kind = kinds[k]
        out.append((f"blocks.{block}.bn.{kind}", 4 + block % 13, kind == "num_batches_tracked"))
    return out


def build_many(n: int):
    import torch

    gen = torch.Generator().manual_seed(4321)
    block = torch.randn(4096, generator=gen)
    sd: OrderedDict = OrderedDict()
    for i, (name, numel, is_count) in enumerate(many_names(n)):
        if is_count:
            sd[name] = torch.tensor(i, dtype=torch.int64)
        else:
            off = (i * 31) % (block.numel() - 16)
            sd[name] = block[off : off + numel].clone()
    sd._metadata = _module_metadata(list(sd))
    return sd


_SHARD_KINDS = (
    ("weight", "F32", (2,)),
    ("bias", "F32", (2,)),
    ("running_mean", "F32", (2,)),
    ("running_var", "F32", (2,)),
    ("num_batches_tracked", "I64", ()),
)


def build_index(folder: Path, shards: int, per_shard: int) -> Path:
    """A Hugging Face sharded checkpoint of ``shards`` safetensors files of ``per_shard`` tiny tensors each
    (2 floats, or one int64: a few bytes) and its ``model.safetensors.index.json``; returns the index's path.

    Written with the standard library (the header is the format's 8-byte length and JSON), so 1,000 shards
    take about a second; statecli reads the headers alone, so the tensors' size does not matter."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for k in range(shards):
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        data = bytearray()
        for j in range(per_shard):
            block, kind = divmod(k * per_shard + j, len(_SHARD_KINDS))
            leaf, code, shape = _SHARD_KINDS[kind]
            name = f"model.blocks.{block}.bn.{leaf}"
            value = (block + 1).to_bytes(8, "little") if code == "I64" else bytes(8)
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [len(data), len(data) + len(value)]}
            data += value
            weight_map[name] = shard
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        body = len(raw).to_bytes(8, "little") + raw + data
        _atomic_write(folder / shard, lambda p, body=body: Path(p).write_bytes(body))
    total = len(weight_map) * 8
    index = folder / "model.safetensors.index.json"
    text = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    _atomic_write(index, lambda p: Path(p).write_text(text))
    return index


@dataclass
class Files:
    pt: Path
    st: Path
    many: Path
    resnet_tensors: int
    resnet_bytes: int
    many_tensors: int
    index: Path | None = None  # a sharded checkpoint's index.json (--shards)
    index_tensors: int = 0
    built: list[str] = field(default_factory=list)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def prepare_files(
    workdir: Path, size_gb: float, n_tensors: int, many: int, shards: int = 0, shard_tensors: int = 100
) -> Files:
    workdir.mkdir(parents=True, exist_ok=True)
    layout = resnet_spec(int(size_gb * GIB), n_tensors)
    tag = f"v{FORMAT_VERSION}_{size_gb:g}gib_{n_tensors}t"
    files = Files(
        pt=workdir / f"resnet_{tag}.pt",
        st=workdir / f"resnet_{tag}.safetensors",
        many=workdir / f"many_v{FORMAT_VERSION}_{many}.pt",
        resnet_tensors=len(layout),
        resnet_bytes=layout_bytes(layout),
        many_tensors=many,
    )
    if not (files.pt.exists() and files.st.exists()):
        import torch
        from safetensors.torch import save_file

        t0 = time.perf_counter()
        sd = build_resnet(layout)
        if not files.pt.exists():
            _atomic_write(files.pt, lambda p: torch.save(sd, p))
            files.built.append(files.pt.name)
        if not files.st.exists():
            _atomic_write(files.st, lambda p: save_file(dict(sd), p))
            files.built.append(files.st.name)
        del sd
        log(f"built {files.pt.name} / .safetensors in {time.perf_counter() - t0:.1f} s")
    if not files.many.exists():
        import torch

        t0 = time.perf_counter()
        sd = build_many(many)
        _atomic_write(files.many, lambda p: torch.save(sd, p))
        files.built.append(files.many.name)
        del sd
        log(f"built {files.many.name} in {time.perf_counter() - t0:.1f} s")
    if shards:
        folder = workdir / f"sharded_v{FORMAT_VERSION}_{shards}x{shard_tensors}"
        files.index = folder / "model.safetensors.index.json"
        files.index_tensors = shards * shard_tensors
        if not files.index.exists():  # written last: its presence means every shard is there
            t0 = time.perf_counter()
            build_index(folder, shards, shard_tensors)
            files.built.append(f"{folder.name}/")
            log(f"built {folder.name} ({shards} shards) in {time.perf_counter() - t0:.1f} s")
    return files


# --------------------------------------------------------------------------------------------------
# Measuring whole processes


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def drop_caches() -> str | None:
    """Write 3 to /proc/sys/vm/drop_caches; return an error string if that is not permitted."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


@dataclass
class Run:
    wall_s: float
    maxrss_kib: int
    rc: int


# Why a launcher: Linux charges a child's ru_maxrss with the RSS of the process it was forked from
# (execve records the old mm's high-water mark).  Forked from this script, which has imported torch
# and built the checkpoints, even `python -c pass` would report hundreds of MB.  So every measured
# command is forked by a tiny stdlib-only launcher process instead; its own RSS (a few MB, below
# that of any Python process) is the floor, and it is reported.
LAUNCHER_SRC = r"""
import json, os, signal, sys, time
def kill(signum, frame):
    if child:
        os.kill(child, signal.SIGKILL)
signal.signal(signal.SIGALRM, kill)
child = 0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print(json.dumps({"ready": True, "launcher_hwm_kib": int(hwm[0].split()[1]) if hwm else None}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    fin = os.open(os.devnull, os.O_RDONLY)
    fout = os.open(req["stdout"] or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    ferr = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    t0 = time.perf_counter()
    child = os.fork()
    if child == 0:
        try:
            os.dup2(fin, 0); os.dup2(fout, 1); os.dup2(ferr, 2)
            os.execvp(req["argv"][0], req["argv"])
        except BaseException as e:
            os.write(2, ("exec failed: %r\n" % (e,)).encode())
        os._exit(127)
    signal.setitimer(signal.ITIMER_REAL, req["timeout"])
    while True:
        try:
            _, status, ru = os.wait4(child, 0)
            break
        except InterruptedError:
            continue
    wall = time.perf_counter() - t0
    signal.setitimer(signal.ITIMER_REAL, 0)
    child = 0
    for fd in (fin, fout, ferr):
        os.close(fd)
    rc = os.waitstatus_to_exitcode(status)
    print(json.dumps({"wall_s": wall, "maxrss_kib": ru.ru_maxrss, "rc": rc}), flush=True)
"""


class Launcher:
    """A small long-lived process that forks, execs and reaps each measured command."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", LAUNCHER_SRC],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=REPO_ROOT,
            text=True,
        )
        hello = json.loads(self._readline())
        self.hwm_kib: int | None = hello.get("launcher_hwm_kib")
        self.tmp = tempfile.TemporaryDirectory(prefix="statecli-bench-")

    def _readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("benchmark launcher process died")
        return line

    def run(self, argv: list[str], timeout: float, capture: bool = False):
        """Run argv once; return (Run, stdout bytes or None, stderr bytes)."""
        assert self.proc.stdin is not None
        out = os.path.join(self.tmp.name, "stdout") if capture else None
        err = os.path.join(self.tmp.name, "stderr")
        req = {"argv": argv, "stdout": out, "stderr": err, "timeout": timeout}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        res = json.loads(self._readline())
        stdout = Path(out).read_bytes() if out else None
        return Run(res["wall_s"], res["maxrss_kib"], res["rc"]), stdout, Path(err).read_bytes()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.tmp.cleanup()


def error_line(stderr: bytes) -> str:
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    if not lines:
        return "(no stderr)"
    # For a traceback the first line says nothing; the last one names the exception.
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]


@dataclass
class Case:
    case: str  # which file
    label: str  # which command, in words
    argv: list[str]
    kind: str  # "statecli-json" | "statecli-table" | "plain" | "mmap" | "safe_open" | "floor"
    expect_tensors: int | None = None
    runs: list[Run] = field(default_factory=list)
    error: str | None = None
    check: str = ""
    runs_wanted: int | None = None  # None: --runs
    warmup: bool = True

    def walls(self) -> list[float]:
        return [r.wall_s for r in self.runs]

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.walls()) if self.runs and not self.error else None

    @property
    def median_rss_mb(self) -> float | None:
        if not self.runs or self.error:
            return None
        return statistics.median(r.maxrss_kib for r in self.runs) / 1024

    @property
    def max_rss_mb(self) -> float | None:
        return max(r.maxrss_kib for r in self.runs) / 1024 if self.runs and not self.error else None


def verify_json(stdout: bytes, expect: int | None) -> str:
    try:
        doc = json.loads(stdout)
    except ValueError as e:
        return f"output is not JSON ({e})"
    tensors = doc.get("tensors") if isinstance(doc, dict) else None
    if not isinstance(tensors, list):
        return "no 'tensors' list in JSON output"
    if expect is not None and len(tensors) != expect:
        return f"MISMATCH: {len(tensors)} tensors reported, {expect} expected"
    return f"ok ({len(tensors)} tensors)"


def _what(case: Case) -> str:
    return "statecli not runnable" if case.kind.startswith("statecli") else "command failed"


def warm_up(case: Case, launcher: Launcher, timeout: float, dropping: bool) -> None:
    """The unmeasured first run (and the JSON output check); sets ``case.error`` when it fails."""
    if not case.warmup:
        return
    if dropping:
        drop_caches()
    capture = case.kind == "statecli-json"
    warm, stdout, stderr = launcher.run(case.argv, timeout, capture=capture)
    if warm.rc != 0:
        case.error = f"{_what(case)} (exit {warm.rc}): {error_line(stderr)}"
        log(case.error)
        return
    if capture:
        case.check = verify_json(stdout or b"", case.expect_tensors)
        if not case.check.startswith("ok"):
            log(f"output check: {case.check}")


def measure_once(case: Case, launcher: Launcher, timeout: float, dropping: bool) -> None:
    if dropping:
        drop_caches()
    r, _, stderr = launcher.run(case.argv, timeout)
    if r.rc != 0:
        first = not case.runs and not case.warmup
        case.error = (
            f"{_what(case)} (exit {r.rc}): {error_line(stderr)}"
            if first
            else f"exit {r.rc} on a measured run: {error_line(stderr)}"
        )
        log(case.error)
        return
    case.runs.append(r)


def measure_round_robin(group: list[Case], runs: int, launcher: Launcher, timeout: float, dropping: bool) -> None:
    """Measure the commands on one file in turns (A B C A B C ...), not one after another: this machine's
    speed drifts from minute to minute, and turns spread the drift over every command alike, so the
    ratios between them hold even when the absolute figures move."""
    for case in group:
        log(f"{case.case}: {case.label} ({'1 warm-up + ' if case.warmup else ''}{case.runs_wanted or runs} measured)")
        warm_up(case, launcher, timeout, dropping)
    for _ in range(max(c.runs_wanted or runs for c in group)):
        for case in group:
            if not case.error and len(case.runs) < (case.runs_wanted or runs):
                measure_once(case, launcher, timeout, dropping)
    for case in group:
        if case.runs and not case.error:
            log(f"  {case.case}: {case.label}: median {case.median_s:.3f} s, peak RSS {case.median_rss_mb:.1f} MB")


# --------------------------------------------------------------------------------------------------
# Reporting


def machine_facts(statecli_cmd: list[str], files: Files | None = None) -> dict:
    """The machine, the versions and the commit; with ``files``, each benchmark file's size and tensors."""
    import safetensors
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    git = None
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        git = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    facts = {
        "nproc": os.cpu_count(),
        "cpus_usable": affinity,
        "mem_total_gib": round(mem_total / GIB, 1) if mem_total else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "statecli_cmd": statecli_cmd,
        "repo_commit": git,
    }
    if files is not None:
        facts["files"] = {
            str(p): {"bytes": p.stat().st_size, "tensors": n}
            for p, n in (
                (files.pt, files.resnet_tensors),
                (files.st, files.resnet_tensors),
                (files.many, files.many_tensors),
            )
        }
        if files.index is not None:
            shards = [p for p in files.index.parent.iterdir() if p.suffix == ".safetensors"]
            facts["files"][str(files.index)] = {
                "bytes": sum(p.stat().st_size for p in shards),
                "tensors": files.index_tensors,
                "shards": len(shards),
            }
    return facts


def print_header(title: str, facts: dict) -> None:
    """The title and the lines that say where the figures come from."""
    print()
    print(title)
    print(
        f"machine: nproc={facts['nproc']} (usable {facts['cpus_usable']}), RAM {facts['mem_total_gib']} GiB, "
        f"{facts['platform']}"
    )
    print(
        f"python {facts['python']} ({facts['python_executable']}), torch {facts['torch']}, "
        f"safetensors {facts['safetensors']}, repo commit {facts['repo_commit'] or '(none)'}"
    )
    print(f"statecli command: {shlex.join(facts['statecli_cmd'])}")


def fmt_value(value: float, unit: str) -> str:
    return f"{value:.1f}x" if unit == "x" else f"{value:.3f} {unit}"


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(cases: list[Case]) -> None:
    head = ("case", "command", "median s", "min s", "max s", "med RSS MB", "n", "note")
    rows = []
    for c in cases:
        w = c.walls()
        ok = bool(w) and not c.error
        rows.append(
            (
                c.case,
                c.label,
                fmt(c.median_s, ".3f"),
                fmt(min(w) if ok else None, ".3f"),
                fmt(max(w) if ok else None, ".3f"),
                fmt(c.median_rss_mb, ".1f"),
                str(len(c.runs)) if ok else "0",
                c.error or c.check,
            )
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    right = {2, 3, 4, 5, 6}

    def line(cells) -> str:
        parts = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(cells[:-1])]
        return "  ".join([*parts, cells[-1]]).rstrip()

    print(line(head))
    print(line(["-" * w for w in widths[:-1]] + ["-" * widths[-1]]))
    for r in rows:
        print(line(r))


def ratio(num: Case | None, den: Case | None) -> float | None:
    if num is None or den is None or num.median_s is None or den.median_s is None or den.median_s == 0:
        return None
    return num.median_s / den.median_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Time `statecli inspect` (whole process) against torch.load / safe_open scripts.",
    )
    ap.add_argument("--size-gb", type=float, default=2.0, help="synthetic checkpoint size, GiB (default 2)")
    ap.add_argument("--tensors", type=int, default=250, help="about this many tensors in it (default 250)")
    ap.add_argument("--many", type=int, default=100_000, help="tensors in the many-tensor .pt (default 1e5)")
    ap.add_argument(
        "--shards",
        type=int,
        default=1000,
        help="shards of the sharded safetensors checkpoint (HF index); 0 leaves it out (default 1000)",
    )
    ap.add_argument("--shard-tensors", type=int, default=100, help="tiny tensors per shard (default 100)")
    ap.add_argument("--prepare-only", action="store_true", help="build the files (or find them) and stop")
    ap.add_argument("--runs", type=int, default=5, help="measured runs per command, after 1 warm-up")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "statecli-bench",
        help="where the synthetic files live; reused when present (default: %(default)s)",
    )
    ap.add_argument(
        "--statecli",
        default=None,
        help="command that runs statecli, shell-split (default: '<this python> -m statecli')",
    )
    ap.add_argument(
        "--table-runs",
        type=int,
        default=1,
        help="measured runs of the default table format, no warm-up: the json warm-up read the file (default 1)",
    )
    ap.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write raw results here")
    ap.add_argument("--skip-baselines", action="store_true", help="skip the torch / safe_open scripts")
    ap.add_argument(
        "--drop-caches",
        action="store_true",
        help="write 3 to /proc/sys/vm/drop_caches before every run (needs root); cold-cache numbers",
    )
    ap.add_argument("--timeout", type=float, default=600.0, help="kill a single run after this many s")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.table_runs < 1 or args.size_gb <= 0 or args.tensors < 1 or args.many < 1:
        ap.error("--runs, --table-runs, --size-gb, --tensors and --many must be positive")
    if args.shards < 0 or args.shard_tensors < 1:
        ap.error("--shards must be 0 or more and --shard-tensors positive")

    statecli_cmd = shlex.split(args.statecli) if args.statecli else [sys.executable, "-m", "statecli"]
    env = dict(os.environ)
    # Let `python -m statecli` find the package from a checkout that is not pip-installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    # Measure statecli as installed software runs: with its bytecode cached. Some environments set
    # PYTHONDONTWRITEBYTECODE, which makes every run recompile statecli's sources (about 50 ms here).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    compileall.compile_dir(str(REPO_ROOT / "statecli"), quiet=1)

    files = prepare_files(args.workdir, args.size_gb, args.tensors, args.many, args.shards, args.shard_tensors)
    if args.prepare_only:
        for p in (files.pt, files.st, files.many, files.index):
            if p is not None:
                print(p)
        return 0
    dropping = False
    drop_note = "not requested: warm page cache (1 unmeasured warm-up run per command, then medians)"
    if args.drop_caches:
        err = drop_caches()
        if err:
            drop_note = f"requested but not permitted ({err}); continuing with a warm page cache"
        else:
            dropping = True
            drop_note = "page cache dropped before every run: cold-cache numbers"
    log(f"drop_caches: {drop_note}")

    py = sys.executable
    pt_name = f"{args.size_gb:g} GiB .pt"
    st_name = f"{args.size_gb:g} GiB .safetensors"
    many_name = f"{args.many} tensors .pt"
    cases: list[Case] = []

    def add_statecli(case: str, path: Path, expect: int) -> None:
        cases.append(
            Case(
                case,
                "statecli inspect --format json",
                [*statecli_cmd, "inspect", str(path), "--format", "json"],
                "statecli-json",
                expect,
            )
        )
        cases.append(
            Case(
                case,
                "statecli inspect (table)",
                [*statecli_cmd, "inspect", str(path)],
                "statecli-table",
                runs_wanted=args.table_runs,
                warmup=False,  # the json case just read the same file: the cache is warm
            )
        )

    add_statecli(pt_name, files.pt, files.resnet_tensors)
    if not args.skip_baselines:
        cases.append(Case(pt_name, "torch.load(mmap=True) + print", [py, "-c", MMAP_SCRIPT, str(files.pt)], "mmap"))
        cases.append(Case(pt_name, "torch.load + print", [py, "-c", PLAIN_SCRIPT, str(files.pt)], "plain"))
    add_statecli(st_name, files.st, files.resnet_tensors)
    if not args.skip_baselines:
        cases.append(Case(st_name, "safe_open(pt) + print", [py, "-c", SAFE_OPEN_SCRIPT, str(files.st)], "safe_open"))
    add_statecli(many_name, files.many, files.many_tensors)
    if not args.skip_baselines:
        cases.append(Case(many_name, "torch.load(mmap=True) + print", [py, "-c", MMAP_SCRIPT, str(files.many)], "mmap"))
        cases.append(Case(many_name, "torch.load + print", [py, "-c", PLAIN_SCRIPT, str(files.many)], "plain"))
    index_name = f"{args.shards} shards x {args.shard_tensors} tensors (HF index)"
    if files.index is not None:
        add_statecli(index_name, files.index, files.index_tensors)
        if not args.skip_baselines:
            argv_ = [py, "-c", SHARDED_SCRIPT, str(files.index)]
            cases.append(Case(index_name, "safe_open each shard + print", argv_, "safe_open"))
    cases.append(Case("(none)", "python -c pass (start-up floor)", [py, "-c", "pass"], "floor"))

    launcher = Launcher(env)
    launcher_mb = launcher.hwm_kib / 1024 if launcher.hwm_kib else None
    try:
        groups: dict[str, list[Case]] = {}
        for c in cases:
            groups.setdefault(c.case, []).append(c)
        for group in groups.values():
            measure_round_robin(group, args.runs, launcher, args.timeout, dropping)
    finally:
        launcher.close()

    def find(case: str, kind: str) -> Case | None:
        return next((c for c in cases if c.case == case and c.kind == kind), None)

    facts = machine_facts(statecli_cmd, files)
    print_header("statecli inspect benchmark", facts)
    for p, info in facts["files"].items():
        print(f"file: {p}  {info['bytes'] / MIB:,.1f} MiB, {info['tensors']} tensors")
    if files.built:
        print(f"built this run: {', '.join(files.built)}")
    print(f"page cache: {drop_note}")
    print(
        f"runs: {args.runs} measured per command after 1 warm-up, in turns with the other commands on the "
        f"same file; table format {args.table_runs}, no warm-up (the json warm-up read the file)"
    )
    print("wall = fork..reap (perf_counter); RSS = ru_maxrss")
    print(
        f"RSS floor: commands are forked from a launcher of {fmt(launcher_mb, '.1f')} MB peak RSS; "
        "ru_maxrss never reads below that"
    )
    print()
    print_table(cases)

    floor = find("(none)", "floor")
    sj_pt, sj_st, sj_many = (
        find(pt_name, "statecli-json"),
        find(st_name, "statecli-json"),
        find(many_name, "statecli-json"),
    )
    ratios = {
        f"{pt_name}: mmap / statecli": ratio(find(pt_name, "mmap"), sj_pt),
        f"{pt_name}: plain / statecli": ratio(find(pt_name, "plain"), sj_pt),
        f"{st_name}: safe_open / statecli": ratio(find(st_name, "safe_open"), sj_st),
        f"{many_name}: mmap / statecli": ratio(find(many_name, "mmap"), sj_many),
        f"{many_name}: plain / statecli": ratio(find(many_name, "plain"), sj_many),
    }
    sj_index = find(index_name, "statecli-json")
    if sj_index is not None:
        ratios[f"{index_name}: safe_open / statecli"] = ratio(find(index_name, "safe_open"), sj_index)
    print()
    print("ratios (baseline median / statecli --format json median; higher = statecli faster)")
    wide = max(48, *map(len, ratios))
    for k, v in ratios.items():
        print(f"  {k:<{wide}} {fmt(v, '.1f')}{'x' if v is not None else '  (not measured)'}")

    statecli_cases = [c for c in cases if c.kind.startswith("statecli")]
    rss_vals = [c.max_rss_mb for c in statecli_cases if c.max_rss_mb is not None]
    max_rss = max(rss_vals) if rss_vals else None
    rss_name = "statecli peak RSS, max over all statecli runs"
    if rss_vals and len(rss_vals) < len(statecli_cases):
        rss_name = f"statecli peak RSS, max over {len(rss_vals)} of {len(statecli_cases)} cases"

    def target(name: str, value: float | None, ok, unit: str, need: str) -> dict:
        status = "n/a" if value is None else ("PASS" if ok(value) else "FAIL")
        return {"target": name, "need": need, "value": value, "unit": unit, "status": status}

    st_s = sj_st.median_s if sj_st else None
    targets = [
        target(
            f"{pt_name}: mmap script / statecli",
            ratios[f"{pt_name}: mmap / statecli"],
            lambda v: v >= TARGET_MMAP_RATIO,
            "x",
            f">= {TARGET_MMAP_RATIO:g}x",
        ),
        target(
            f"{pt_name}: plain torch.load / statecli",
            ratios[f"{pt_name}: plain / statecli"],
            lambda v: v >= TARGET_PLAIN_RATIO,
            "x",
            f">= {TARGET_PLAIN_RATIO:g}x",
        ),
        target(
            f"{st_name}: statecli whole process",
            st_s,
            lambda v: v <= TARGET_SAFETENSORS_S,
            "s",
            f"<= {TARGET_SAFETENSORS_S:g} s",
        ),
        target(
            rss_name,
            max_rss,
            lambda v: v <= TARGET_RSS_MB,
            "MB",
            f"<= {TARGET_RSS_MB:g} MB",
        ),
        target(
            f"{many_name}: statecli whole process",
            sj_many.median_s if sj_many else None,
            lambda v: v <= TARGET_MANY_S,
            "s",
            f"<= {TARGET_MANY_S:g} s",
        ),
    ]
    st_many = find(many_name, "statecli-table")
    targets.append(
        target(
            f"{many_name}: statecli table, piped",
            st_many.median_s if st_many else None,
            lambda v: v <= TARGET_MANY_TABLE_S,
            "s",
            f"<= {TARGET_MANY_TABLE_S:g} s",
        )
    )
    if sj_index is not None:
        targets.append(
            target(
                f"{index_name}: statecli whole process",
                sj_index.median_s,
                lambda v: v <= TARGET_INDEX_S,
                "s",
                f"<= {TARGET_INDEX_S:g} s",
            )
        )
    print()
    print("targets (statecli measured with --format json unless named a table; medians)")
    wide = max(52, *(len(t["target"]) for t in targets))
    for t in targets:
        val = "not measured" if t["value"] is None else fmt_value(t["value"], t["unit"])
        print(f"  {t['status']:<5} {t['target']:<{wide}} need {t['need']:<10} measured {val}")
    if floor and floor.median_s is not None:
        print(
            f"  note: bare interpreter start-up (python -c pass) is {floor.median_s:.3f} s median here, "
            f"{floor.median_rss_mb:.1f} MB RSS"
            + (f"; statecli .safetensors minus that floor: {st_s - floor.median_s:.3f} s" if st_s else "")
        )
    for c in statecli_cases:
        if c.error:
            print(f"  note: {c.case}: {c.label}: {c.error}")

    if args.json:
        doc = {
            "schema": "statecli.bench_inspect/1",
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": facts,
            "page_cache": drop_note,
            "launcher_peak_rss_mb": launcher_mb,
            "cases": [
                {
                    "case": c.case,
                    "command": c.label,
                    "kind": c.kind,
                    "argv": c.argv,
                    "error": c.error,
                    "check": c.check or None,
                    "median_s": c.median_s,
                    "median_rss_mb": c.median_rss_mb,
                    "runs": [vars(r) for r in c.runs],
                }
                for c in cases
            ],
            "ratios": ratios,
            "targets": targets,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
