#!/usr/bin/env python3
"""Benchmark statecli at scale (issue #14): sharded checkpoints, 100,000 tensors, parallel and torchrun converts.

Builds its inputs once and caches them under ``benchmarks/.cache/scale``:

* A: a Hugging Face index of 1,000 safetensors shards x 100 tiny tensors (``model.safetensors.index.json``);
* B: 16 shards x 64 MiB fp32 (1 GiB) with their index;
* C: a ``.pt`` state dict of 100,000 small tensors (``bench_inspect.py``'s generator);
* D: a 2 GiB fp32 ``.pt`` state dict (``bench_inspect.py``'s ResNet-like layout);
* E: a torch.distributed.checkpoint (DCP) folder of 1 GiB in 4 ``.distcp`` files (model + a small optimizer).

Six cases, each a set of whole processes run in turns (A B A B ...) after one unmeasured warm-up round
whose outputs are checked: the minimum wall time of ``--runs`` runs, the peak RSS (the largest
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` over the runs, read by a fresh stdlib-only measuring process:
the largest single process of the command's tree), and for converts the sampled peak of the whole tree's
PSS. The page cache is warm: nothing is dropped. Flags statecli does not have yet (``--jobs``,
``--no-sync``, ``--distributed``) are looked up once in ``statecli convert --help``; their rows are
skipped, not failed.

Standard library + torch + safetensors only.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inspect import (
    FORMAT_VERSION,
    GIB,
    MIB,
    MMAP_SCRIPT,
    REPO_ROOT,
    _atomic_write,
    build_many,
    build_resnet,
    error_line,
    log,
    machine_facts,
    print_header,
    resnet_spec,
    verify_json,
)

CACHE = Path(__file__).resolve().parent / ".cache" / "scale"
DATA_VERSION = 1  # bump when a layout below changes, so cached inputs are rebuilt

# --------------------------------------------------------------------------------------------------
# Baseline scripts, each run as `python -c SCRIPT ARGS...`: what a user would write by hand.

# Case 2: list every tensor of a sharded checkpoint, shard by shard.
INDEX_SCRIPT = """\
import json, os, sys
from safetensors import safe_open
index = sys.argv[1]
folder = os.path.dirname(index)
for shard in sorted(set(json.load(open(index))["weight_map"].values())):
    with safe_open(os.path.join(folder, shard), "pt") as f:
        for key in f.keys():
            s = f.get_slice(key)
            print(key, s.get_shape(), s.get_dtype())
"""

# Case 3: convert a sharded folder shard by shard, then write the index.
SHARDS_SCRIPT = """\
import json, os, sys, torch
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1], sys.argv[2]
index = json.load(open(os.path.join(src, "model.safetensors.index.json")))
os.makedirs(dst, exist_ok=True)
total = 0
for shard in sorted(set(index["weight_map"].values())):
    sd = load_file(os.path.join(src, shard))
    out = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}
    total += sum(v.numel() * v.element_size() for v in out.values())
    save_file(out, os.path.join(dst, shard), metadata={"format": "pt"})
index["metadata"] = {"total_size": total}
json.dump(index, open(os.path.join(dst, "model.safetensors.index.json"), "w"), indent=2)
"""

# The same, durable as statecli's default output is: each file flushed to disk (fsync) before the script ends.
SHARDS_SYNC_SCRIPT = SHARDS_SCRIPT.replace(
    'save_file(out, os.path.join(dst, shard), metadata={"format": "pt"})',
    'save_file(out, os.path.join(dst, shard), metadata={"format": "pt"})\n'
    "    fd = os.open(os.path.join(dst, shard), os.O_RDONLY); os.fsync(fd); os.close(fd)",
)

# Case 4: one .pt to one .safetensors.
PT_SCRIPT = """\
import sys, torch
from safetensors.torch import save_file
sd = torch.load(sys.argv[1], mmap=True, weights_only=True)
out = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}
save_file(out, sys.argv[2], metadata={"format": "pt"})
"""

PT_SYNC_SCRIPT = PT_SCRIPT + "import os\nfd = os.open(sys.argv[2], os.O_RDONLY); os.fsync(fd); os.close(fd)\n"

# Case 5: DCP to one .safetensors file (not sharded), through torch's own converter to a temporary .pt.
DCP_SCRIPT = """\
import os, sys, torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
tmp = os.path.join(dst, "full.pt")
dcp_to_torch_save(src, tmp)
sd = torch.load(tmp, mmap=True, weights_only=True)["model"]
out = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}
save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
os.remove(tmp)
"""

# Targets from issue #14. Reported, never enforced.
TARGET_MANY_JSON_S = 2.0
TARGET_MANY_TABLE_S = 2.5
TARGET_INDEX_S = 1.0
TARGET_SHARDS_SPEEDUP = 1.6  # naive / statecli
TARGET_SHARDS_RSS = 0.8  # statecli / naive
TARGET_PT_WALL = 0.5  # statecli / naive
TARGET_DCP_SPEEDUP = 1.5
TARGET_DCP_RSS = 0.3

# The measuring process: a fresh stdlib-only Python. Linux charges a forked child with its parent's RSS
# high-water mark, so the commands are forked from this small process, not from the benchmark (which has
# imported torch and built gigabytes). It reports the wall time around spawn + reap, the largest
# ru_maxrss among the reaped descendants, and, when asked, the sampled peak of the tree's summed PSS
# (proportional set size: shared pages split between the processes, so the sum is the tree's memory).
MEASURE = r"""
import json, os, resource, signal, subprocess, sys, threading, time
spec = json.loads(sys.stdin.read())

def tree(root):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d, "rb") as f:
                    s = f.read()
            except OSError:
                continue
            kids.setdefault(int(s[s.rindex(b")") + 2:].split()[1]), []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out

def pss(pid):
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0

peak = {"tree_pss_kib": 0, "procs": 0}
stop = threading.Event()

def sample(root):
    while not stop.wait(spec["interval"]):
        pids = tree(root)
        peak["tree_pss_kib"] = max(peak["tree_pss_kib"], sum(pss(p) for p in pids))
        peak["procs"] = max(peak["procs"], len(pids))

out = open(spec["stdout"], "wb") if spec["stdout"] else subprocess.DEVNULL
err = open(spec["stderr"], "wb")
t = time.perf_counter()
p = subprocess.Popen(spec["cmd"], stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=spec["env"],
                     start_new_session=True)
timed_out = []
def kill():
    timed_out.append(1)
    os.killpg(p.pid, signal.SIGKILL)
timer = threading.Timer(spec["timeout"], kill)
timer.start()
if spec["interval"]:
    threading.Thread(target=sample, args=(p.pid,), daemon=True).start()
rc = p.wait()
wall = time.perf_counter() - t
timer.cancel()
stop.set()
try:
    os.killpg(p.pid, signal.SIGKILL)  # anything the command left running
except OSError:
    pass
peak.update(rc="timeout" if timed_out else rc, wall=wall,
            maxrss_kib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps(peak))
"""

# --------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Sizes:
    index_shards: int
    index_tensors: int
    shards: int
    shard_mib: float
    many: int
    pt_mib: float
    dcp_mib: float
    dcp_files: int


FULL = Sizes(1000, 100, 16, 64, 100_000, 2048, 1024, 4)
SMALL = Sizes(50, 20, 16, 1, 2000, 16, 16, 4)


def _fresh_dir(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _expert_name(layer: int, j: int) -> str:
    if j == 0:
        return f"model.layers.{layer}.input_layernorm.weight"
    e, k = divmod(j - 1, 3)
    return f"model.layers.{layer}.mlp.experts.{e}.{('gate', 'up', 'down')[k]}_proj.weight"


def build_index(sizes: Sizes) -> Path:
    """A: ``index_shards`` safetensors files of ``index_tensors`` tiny fp32 tensors (4x4), one layer each."""
    import torch
    from safetensors.torch import save_file

    n, per = sizes.index_shards, sizes.index_tensors
    final = CACHE / f"A_v{DATA_VERSION}_index_{n}x{per}"
    if final.exists():
        return final / "model.safetensors.index.json"
    t0 = time.perf_counter()
    tmp = _fresh_dir(final)
    weight_map: dict[str, str] = {}
    for s in range(n):
        shard = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        sd = {_expert_name(s, j): torch.full((4, 4), float(j % 7)) for j in range(per)}
        save_file(sd, str(tmp / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(sd, shard))
    index = {"metadata": {"total_size": 64 * len(weight_map)}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, final)
    log(f"built {final.name} ({n} shards, {len(weight_map)} tensors) in {time.perf_counter() - t0:.1f} s")
    return final / "model.safetensors.index.json"


def llama_layout(layers: int, layer_bytes: float) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of ``layers`` attention blocks: 4 square projections (fp32) and 2 norms each."""
    h = max(8, round((layer_bytes / 16) ** 0.5))
    out = []
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [(f"{p}.self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        out += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]
    return out


def llama_tensors(layout: list[tuple[str, tuple[int, ...]]], seed: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=gen) * 0.02 if len(shape) > 1 else torch.ones(shape)
        for name, shape in layout
    }


def build_shards(sizes: Sizes) -> Path:
    """B: ``shards`` safetensors files of ``shard_mib`` MiB fp32 (one layer each) and their index."""
    from safetensors.torch import save_file

    n = sizes.shards
    final = CACHE / f"B_v{DATA_VERSION}_shards_{n}x{sizes.shard_mib:g}mib"
    if final.exists():
        return final
    t0 = time.perf_counter()
    tmp = _fresh_dir(final)
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(n):
        shard = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        layout = [
            (name.replace("layers.0.", f"layers.{s}."), shape) for name, shape in llama_layout(1, sizes.shard_mib * MIB)
        ]
        sd = llama_tensors(layout, seed=s)
        save_file(sd, str(tmp / shard), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in sd.values())
        weight_map.update(dict.fromkeys(sd, shard))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, final)
    log(f"built {final.name} ({total / MIB:,.0f} MiB) in {time.perf_counter() - t0:.1f} s")
    return final


def build_many_pt(sizes: Sizes) -> Path:
    """C: bench_inspect.py's many-small-tensors state dict, under its own name."""
    import torch

    path = CACHE / f"many_v{FORMAT_VERSION}_{sizes.many}.pt"
    if not path.exists():
        t0 = time.perf_counter()
        sd = build_many(sizes.many)
        _atomic_write(path, lambda p: torch.save(sd, p))
        log(f"built {path.name} in {time.perf_counter() - t0:.1f} s")
    return path


def pt_layout(sizes: Sizes) -> list[tuple[str, tuple[int, ...], str]]:
    return resnet_spec(int(sizes.pt_mib * MIB), 250)


def build_pt(sizes: Sizes) -> Path:
    """D: bench_inspect.py's ResNet-like fp32 state dict of ``pt_mib`` MiB, as one torch.save file."""
    import torch

    path = CACHE / f"D_v{DATA_VERSION}_resnet_{sizes.pt_mib:g}mib.pt"
    if not path.exists():
        t0 = time.perf_counter()
        sd = build_resnet(pt_layout(sizes))
        _atomic_write(path, lambda p: torch.save(sd, p))
        del sd
        log(f"built {path.name} in {time.perf_counter() - t0:.1f} s")
    return path


def dcp_layout(sizes: Sizes) -> list[tuple[str, tuple[int, ...]]]:
    return [(name.removeprefix("model."), shape) for name, shape in llama_layout(16, sizes.dcp_mib * MIB / 16)]


def build_dcp(sizes: Sizes) -> Path:
    """E: ``{"model": ..., "optim": ...}`` saved by ``dcp.save`` in one process, no process group.

    ``FileSystemWriter(thread_count=N)`` splits one rank's items into N buckets of about equal bytes
    (``filesystem._split_by_size_and_type``), each written to its own ``__0_<k>.distcp``. The optimizer
    state is Adam's for the norm weights only (small), with the param groups."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    final = CACHE / f"E_v{DATA_VERSION}_dcp_{sizes.dcp_mib:g}mib_{sizes.dcp_files}f"
    if final.exists():
        return final
    t0 = time.perf_counter()
    tmp = _fresh_dir(final)
    model = llama_tensors(dcp_layout(sizes), seed=99)
    norms = [k for k in model if k.endswith("norm.weight")]
    state = {
        k: {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(model[k]), "exp_avg_sq": torch.ones_like(model[k])}
        for k in norms
    }
    optim = {"state": state, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "params": list(model)}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming a single process"
        dcp.save(
            {"model": model, "optim": optim},
            storage_writer=FileSystemWriter(str(tmp), thread_count=sizes.dcp_files),
            no_dist=True,
        )
    os.replace(tmp, final)
    files = sorted(p.name for p in final.glob("*.distcp"))
    log(f"built {final.name} ({len(files)} .distcp files) in {time.perf_counter() - t0:.1f} s")
    if len(files) != sizes.dcp_files:
        log(f"warning: {len(files)} .distcp files, not {sizes.dcp_files}")
    return final


def disk_needed(sizes: Sizes, only: set[str], keep: bool) -> int:
    """Bytes of the inputs still to build, plus the outputs alive at once (all of them with --keep)."""
    shards_mib = sizes.shards * sizes.shard_mib
    inputs = {  # case: (cache entry, MiB)
        "1": (CACHE / f"many_v{FORMAT_VERSION}_{sizes.many}.pt", sizes.many * 1e-3),
        "2": (CACHE / f"A_v{DATA_VERSION}_index_{sizes.index_shards}x{sizes.index_tensors}", 1e-3),
        "3": (CACHE / f"B_v{DATA_VERSION}_shards_{sizes.shards}x{sizes.shard_mib:g}mib", shards_mib),
        "4": (CACHE / f"D_v{DATA_VERSION}_resnet_{sizes.pt_mib:g}mib.pt", sizes.pt_mib),
        "5": (CACHE / f"E_v{DATA_VERSION}_dcp_{sizes.dcp_mib:g}mib_{sizes.dcp_files}f", sizes.dcp_mib),
    }
    if "6" in only:
        only = only | {"3"}
    build = sum(mib for key, (path, mib) in inputs.items() if key in only and not path.exists())
    # bf16 outputs are half the input; case 5's baseline also writes a whole fp32 .pt first.
    outputs = {"3": shards_mib / 2 * (5 if keep else 1), "4": sizes.pt_mib, "5": sizes.dcp_mib * 1.5}
    if "6" in only:
        outputs["6"] = shards_mib if keep else 0
    live = [mib for key, mib in outputs.items() if key in only]
    return int((build + (sum(live) if keep else max(live, default=0)) + 256) * MIB)


def tree_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------
# Output checks (standard library: a safetensors header is 8 bytes of length and JSON)

ST_DTYPE = {"float32": "BF16", "int64": "I64"}


def st_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for f in files:
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        header.pop("__metadata__", None)
        out.update({k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()})
    return out


def check_convert(out: Path, expect: dict[str, tuple[str, tuple[int, ...]]]) -> str:
    """``ok (N tensors, K files)`` when the output's names, dtypes and shapes are ``expect``'s."""
    if not out.exists():
        return "MISMATCH: no output"
    try:
        got = st_tensors(out)
    except (OSError, ValueError, KeyError) as e:
        return f"MISMATCH: unreadable output ({e})"
    if got.keys() != expect.keys():
        missing, extra = sorted(expect.keys() - got.keys()), sorted(got.keys() - expect.keys())
        return f"MISMATCH: {len(missing)} names missing (e.g. {missing[:1]}), {len(extra)} extra (e.g. {extra[:1]})"
    bad = [k for k in expect if got[k] != expect[k]]
    if bad:
        return f"MISMATCH: {len(bad)} tensors differ, e.g. {bad[0]}: {got[bad[0]]} != {expect[bad[0]]}"
    n_files = 1 if out.is_file() else sum(1 for p in out.rglob("*") if p.is_file())
    return f"ok ({len(got)} tensors, {n_files} file{'s' if n_files > 1 else ''})"


def check_lines(stdout: Path, expect: int) -> str:
    with open(stdout, "rb") as f:
        n = sum(1 for _ in f)
    return f"ok ({n} lines)" if n >= expect else f"MISMATCH: {n} lines, {expect} tensors"


def hash_tree(out: Path) -> dict[str, str]:
    files = [out] if out.is_file() else sorted(p for p in out.rglob("*") if p.is_file())
    hashes = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        hashes[f.name if out.is_file() else str(f.relative_to(out))] = h.hexdigest()
    return hashes


# --------------------------------------------------------------------------------------------------
# Commands and runs


@dataclass
class Cmd:
    label: str
    argv: list[str]
    kind: str  # "baseline" | "statecli"
    out: Path | None = None  # removed before and after every run (--keep: not after the last)
    expect: dict | None = None  # convert: the output's tensors; inspect: None
    expect_lines: int | None = None  # inspect baseline: at least this many lines
    expect_json: int | None = None  # inspect --format json: this many tensors
    workers: int | None = None
    workers_note: str = ""
    skip: str | None = None
    error: str | None = None
    check: str = ""
    runs: list[dict] = field(default_factory=list)
    compare: bool = False  # hash the output (cases 3 and 6: byte-identical whatever the parallelism)
    hashes: dict[str, str] | None = None

    @property
    def ok(self) -> bool:
        return bool(self.runs) and not self.error and not self.skip

    @property
    def min_s(self) -> float | None:
        return min(r["wall"] for r in self.runs) if self.ok else None

    @property
    def rss_mib(self) -> float | None:
        return max(r["maxrss_kib"] for r in self.runs) / 1024 if self.ok else None

    @property
    def tree_mib(self) -> float | None:
        vals = [r["tree_pss_kib"] for r in self.runs if r.get("tree_pss_kib")]
        return max(vals) / 1024 if self.ok and vals else None

    @property
    def procs(self) -> int | None:
        vals = [r["procs"] for r in self.runs if r.get("procs")]
        return max(vals) if self.ok and vals else None


@dataclass
class Case:
    key: str
    title: str
    cmds: list[Cmd]
    input_bytes: int | None = None  # converts: for the throughput
    skip: str | None = None


class Runner:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        self.env.pop("COLUMNS", None)

    def once(self, cmd: Cmd, keep_stdout: bool, sample: bool) -> dict:
        if cmd.out is not None:
            _remove(cmd.out)
        stdout = self.tmp / "stdout" if keep_stdout else None
        spec = {
            "cmd": cmd.argv,
            "stdout": str(stdout) if stdout else None,
            "stderr": str(self.tmp / "stderr"),
            "timeout": self.args.timeout,
            "interval": 0.1 if sample else 0,
            "env": self.env,
        }
        res = subprocess.run(
            [sys.executable, "-S", "-c", MEASURE], input=json.dumps(spec), capture_output=True, text=True
        )
        if res.returncode != 0:
            raise SystemExit(f"the measuring process failed: {res.stderr.strip()}")
        run = json.loads(res.stdout)
        if run["rc"] != 0:
            what = "timed out" if run["rc"] == "timeout" else f"exit {run['rc']}"
            cmd.error = f"{what}: {error_line((self.tmp / 'stderr').read_bytes())}"
        return run

    def warm_up(self, cmd: Cmd, sample: bool) -> None:
        """The unmeasured first run; its output is checked (and hashed), then removed."""
        self.once(cmd, keep_stdout=cmd.expect_lines is not None or cmd.expect_json is not None, sample=sample)
        if cmd.error:
            return
        if cmd.expect_json is not None:
            cmd.check = verify_json((self.tmp / "stdout").read_bytes(), cmd.expect_json)
        elif cmd.expect_lines is not None:
            cmd.check = check_lines(self.tmp / "stdout", cmd.expect_lines)
        elif cmd.expect is not None and cmd.out is not None:
            cmd.check = check_convert(cmd.out, cmd.expect)
            if cmd.compare and cmd.check.startswith("ok"):
                cmd.hashes = hash_tree(cmd.out)
        if cmd.out is not None:
            _remove(cmd.out)

    def case(self, case: Case) -> None:
        sample = case.input_bytes is not None
        live = [c for c in case.cmds if not c.skip]
        for c in live:
            log(f"case {case.key}: warm-up {c.label}")
            self.warm_up(c, sample)
        live = [c for c in live if not c.error]
        for r in range(self.args.runs):
            for c in live:  # in turns: A B A B ...
                run = self.once(c, keep_stdout=False, sample=sample)
                if not c.error:  # a failed run drops the command from the later rounds (its row: FAILED)
                    c.runs.append(run)
                if c.out is not None and not (self.args.keep and r == self.args.runs - 1):
                    _remove(c.out)  # one output on disk at a time
            live = [c for c in live if not c.error]
            log(f"case {case.key}: run {r + 1}/{self.args.runs} done")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def convert_flags(statecli: list[str], env: dict) -> tuple[set[str], int | None, str | None]:
    """The flags of interest that ``statecli convert --help`` lists, the --jobs default if it prints one,
    and an error line when the help could not be had."""
    env = dict(env, COLUMNS="300", NO_COLOR="1", TERM="dumb")
    res = subprocess.run([*statecli, "convert", "--help"], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return set(), None, error_line(res.stderr.encode())
    text = res.stdout
    flags = {f for f in ("--jobs", "--no-sync", "--distributed") if re.search(re.escape(f) + r"\b", text)}
    m = re.search(r"--jobs[^\[]*?\[default:\s*(\d+)", text, re.S)
    return flags, int(m.group(1)) if m else None, None


# --------------------------------------------------------------------------------------------------
# Reporting


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_case(case: Case) -> None:
    """One row per command: min wall, peak RSS per process, for converts the tree's PSS, the processes seen,
    the workers and the throughput per worker; the ratios to the case's baseline; the output check."""
    print()
    print(f"case {case.key}: {case.title}")
    if case.skip:
        print(f"  skipped ({case.skip})")
        return
    base = next((c for c in case.cmds if c.kind == "baseline"), None)
    convert = case.input_bytes is not None
    width = max(len(c.label) for c in case.cmds)
    head = f"  {'command':<{width}} {'min s':>8} {'RSS/proc':>9}"
    if convert:
        head += f" {'tree PSS':>9} {'procs':>5} {'workers':>7} {'MiB/s/wkr':>10}"
    print(head + f" {'wall x':>7} {'RSS x':>6}  check")
    for c in case.cmds:
        row = f"  {c.label:<{width}} "
        if c.skip or c.error:
            print(row + (f"skipped ({c.skip})" if c.skip else f"FAILED: {c.error}"))
            continue
        row += f"{c.min_s:>8.3f} {c.rss_mib:>9.1f}"
        if convert:
            tput = case.input_bytes / MIB / c.min_s / c.workers if c.workers else None
            workers = f"{c.workers}{c.workers_note}" if c.workers else "-"
            row += f" {fmt(c.tree_mib, '.1f'):>9} {fmt(c.procs, 'd'):>5} {workers:>7} {fmt(tput, '.1f'):>10}"
        if c is not base and base is not None and base.ok:
            row += f" {c.min_s / base.min_s:>7.2f} {c.rss_mib / base.rss_mib:>6.2f}"
        else:
            row += f" {'':>7} {'':>6}"
        print(row + f"  {c.check}")
    if convert and any(c.workers_note for c in case.cmds if c.ok):
        print(
            "  * workers: statecli's default --jobs, taken as min(cpus, output files); "
            "it also gives each worker at least 32 MiB of output"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="1,2,3,4,5,6", help="comma list of the cases to run (default: all six)")
    ap.add_argument("--small", action="store_true", help="tiny inputs and --runs 1: a smoke test, not a benchmark")
    ap.add_argument("--runs", type=int, default=None, help="measured runs per command (default 3; 1 with --small)")
    ap.add_argument("--json", metavar="OUT", type=Path, help="also write every run's numbers and the targets as JSON")
    ap.add_argument("--keep", action="store_true", help="keep each command's last output (path printed at the end)")
    ap.add_argument(
        "--statecli", default=None, help="the command that runs statecli (default: this python -m statecli)"
    )
    ap.add_argument("--timeout", type=float, default=1800.0, help="kill a single run after this many seconds")
    g = ap.add_argument_group("input sizes (defaults: the issue's; --small shrinks the ones not given)")
    g.add_argument("--index-shards", type=int, help=f"A: shards in the index (default {FULL.index_shards})")
    g.add_argument("--index-tensors", type=int, help=f"A: tensors per shard (default {FULL.index_tensors})")
    g.add_argument("--shards", type=int, help=f"B: fp32 shards (default {FULL.shards})")
    g.add_argument("--shard-mib", type=float, help=f"B: MiB per shard (default {FULL.shard_mib:g})")
    g.add_argument("--many", type=int, help=f"C: tensors in the .pt (default {FULL.many})")
    g.add_argument("--pt-mib", type=float, help=f"D: MiB of the single .pt (default {FULL.pt_mib:g})")
    g.add_argument("--dcp-mib", type=float, help=f"E: MiB of the DCP model (default {FULL.dcp_mib:g})")
    g.add_argument("--dcp-files", type=int, help=f"E: .distcp files (default {FULL.dcp_files})")
    args = ap.parse_args(argv)
    base_sizes = SMALL if args.small else FULL
    sizes = Sizes(**{k: getattr(args, k) if getattr(args, k) is not None else v for k, v in vars(base_sizes).items()})
    if args.runs is None:
        args.runs = 1 if args.small else 3
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if args.runs < 1 or not only <= set("123456"):
        ap.error("--runs must be positive and --only a comma list of 1-6")

    py = sys.executable
    statecli = shlex.split(args.statecli) if args.statecli else [py, "-m", "statecli"]
    torchrun = str(Path(py).with_name("torchrun"))
    started = time.time()

    # Inputs (built once, cached), and a disk check for them and the outputs.
    CACHE.mkdir(parents=True, exist_ok=True)
    need = disk_needed(sizes, only, args.keep)
    free = shutil.disk_usage(CACHE).free
    if free < need:
        print(f"not enough disk under {CACHE}: {free / GIB:.1f} GiB free, need about {need / GIB:.1f} GiB")
        return 2
    index = build_index(sizes) if "2" in only else None
    shards = build_shards(sizes) if only & {"3", "6"} else None
    many = build_many_pt(sizes) if "1" in only else None
    pt = build_pt(sizes) if "4" in only else None
    dcp_dir = build_dcp(sizes) if "5" in only else None

    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))  # outputs: on the cache's disk
    runner = Runner(args, tmp)
    flags, jobs_default, help_error = convert_flags(statecli, runner.env)
    facts = machine_facts(statecli)
    facts["load_avg_before"] = os.getloadavg()
    where = subprocess.run(
        [py, "-c", "import statecli; print(statecli.__file__)"], capture_output=True, text=True, env=runner.env
    )
    facts["statecli_module"] = where.stdout.strip() or error_line(where.stderr.encode())
    print_header("bench_scale.py: statecli at scale (issue #14)", facts)
    print(f"python -m statecli (the default, and under torchrun) runs: {facts['statecli_module']}")
    print(
        f"torchrun: {torchrun}; convert flags found in --help: {', '.join(sorted(flags)) or 'none'}"
        + (f" (--help failed: {help_error})" if help_error else "")
    )
    print(
        f"page cache: warm (nothing dropped; each command runs once unmeasured first); runs per command: "
        f"{args.runs}, in turns; min wall s; peak RSS = largest process (getrusage RUSAGE_CHILDREN), MiB; "
        f"tree PSS = sampled peak (0.1 s) of the whole process tree"
    )
    if args.small:
        print("--small: tiny inputs, a smoke test; the targets are for the full sizes and mean nothing here")

    def missing(*need: str) -> str | None:
        gone = [f for f in need if f not in flags]
        if need and help_error:
            return f"statecli convert --help failed: {help_error}"
        return f"flag missing: {', '.join(gone)}" if gone else None

    conv = ["--dtype", "bf16", "--force", "--quiet"]
    cpus = os.cpu_count() or 1
    cases: list[Case] = []
    if "1" in only:
        assert many is not None
        n = sizes.many
        cases.append(
            Case(
                "1",
                f"inspect a {n:,}-tensor .pt ({many.stat().st_size / MIB:,.0f} MiB)",
                [
                    Cmd(
                        "torch.load(mmap=True, weights_only=True) + print",
                        [py, "-c", MMAP_SCRIPT, str(many)],
                        "baseline",
                        expect_lines=n,
                    ),
                    Cmd(
                        "statecli inspect --format json > /dev/null",
                        [*statecli, "inspect", str(many), "--format", "json"],
                        "statecli",
                        expect_json=n,
                    ),
                    Cmd(
                        "statecli inspect (table) > /dev/null",
                        [*statecli, "inspect", str(many)],
                        "statecli",
                        expect_lines=n,
                    ),
                ],
            )
        )
    if "2" in only:
        assert index is not None
        n = sizes.index_shards * sizes.index_tensors
        cases.append(
            Case(
                "2",
                f"inspect a {sizes.index_shards:,}-shard index ({n:,} tensors)",
                [
                    Cmd(
                        "safe_open loop over the shards + print",
                        [py, "-c", INDEX_SCRIPT, str(index)],
                        "baseline",
                        expect_lines=n,
                    ),
                    Cmd(
                        "statecli inspect INDEX --format json > /dev/null",
                        [*statecli, "inspect", str(index), "--format", "json"],
                        "statecli",
                        expect_json=n,
                    ),
                ],
            )
        )
    shard_expect = None
    if shards is not None:
        shard_expect = {k: ("BF16", v[1]) for k, v in st_tensors(shards).items()}
    if "3" in only:
        assert shards is not None and shard_expect is not None
        nfiles = sizes.shards
        auto = min(jobs_default or cpus, nfiles)
        auto_note = "*" if "--jobs" in flags and not jobs_default else ""

        def sc(label: str, extra: list[str], need: list[str], workers: int, note: str = "") -> Cmd:
            out = tmp / ("c3-" + "-".join(re.findall(r"[a-z0-9]+", label.removeprefix("statecli convert"))))
            return Cmd(
                label,
                [*statecli, "convert", str(shards), "-o", f"{out}/", *conv, *extra],
                "statecli",
                out=out,
                expect=shard_expect,
                workers=workers,
                workers_note=note,
                skip=missing(*need),
                compare=True,
            )

        naive_out = tmp / "c3-naive"
        cases.append(
            Case(
                "3",
                f"{nfiles}-shard folder -> bf16 ({nfiles} x {sizes.shard_mib:g} MiB fp32)",
                [
                    Cmd(
                        "naive per-shard load_file/cast/save_file",
                        [py, "-c", SHARDS_SCRIPT, str(shards), str(naive_out)],
                        "baseline",
                        out=naive_out,
                        expect=shard_expect,
                        workers=1,
                    ),
                    Cmd(
                        "the same + fsync of each file (durable)",
                        [py, "-c", SHARDS_SYNC_SCRIPT, str(shards), str(naive_out)],
                        "reference",
                        out=naive_out,
                        expect=shard_expect,
                        workers=1,
                    ),
                    sc("statecli convert (default jobs)", [], [], auto if "--jobs" in flags else 1, auto_note),
                    sc("statecli convert --jobs 1", ["--jobs", "1"], ["--jobs"], 1),
                    sc("statecli convert --jobs 2", ["--jobs", "2"], ["--jobs"], 2),
                    sc(
                        "statecli convert --no-sync",
                        ["--no-sync"],
                        ["--no-sync"],
                        auto if "--jobs" in flags else 1,
                        auto_note,
                    ),
                ],
                input_bytes=tree_bytes(shards),
            )
        )
    if "4" in only:
        assert pt is not None
        layout = pt_layout(sizes)
        expect = {
            name: (ST_DTYPE["int64" if kind == "count" else "float32"], tuple(shape)) for name, shape, kind in layout
        }
        out_n, out_s = tmp / "c4-naive.safetensors", tmp / "c4-statecli.safetensors"
        cases.append(
            Case(
                "4",
                f"single {pt.stat().st_size / MIB:,.0f} MiB fp32 .pt -> bf16 .safetensors",
                [
                    Cmd(
                        "torch.load + cast + save_file (naive)",
                        [py, "-c", PT_SCRIPT.replace("mmap=True, ", ""), str(pt), str(out_n)],
                        "baseline",
                        out=out_n,
                        expect=expect,
                        workers=1,
                    ),
                    Cmd(
                        "torch.load(mmap=True) + cast + save_file",
                        [py, "-c", PT_SCRIPT, str(pt), str(out_n)],
                        "reference",
                        out=out_n,
                        expect=expect,
                        workers=1,
                    ),
                    Cmd(
                        "the same + fsync (durable)",
                        [py, "-c", PT_SYNC_SCRIPT, str(pt), str(out_n)],
                        "reference",
                        out=out_n,
                        expect=expect,
                        workers=1,
                    ),
                    Cmd(
                        "statecli convert X.pt -o X.safetensors",
                        [*statecli, "convert", str(pt), "-o", str(out_s), *conv],
                        "statecli",
                        out=out_s,
                        expect=expect,
                        workers=1,
                    ),
                    Cmd(
                        "statecli convert ... --no-sync",
                        [*statecli, "convert", str(pt), "-o", str(out_s), *conv, "--no-sync"],
                        "statecli",
                        out=out_s,
                        expect=expect,
                        workers=1,
                        skip=missing("--no-sync"),
                    ),
                ],
                input_bytes=pt.stat().st_size,
            )
        )
    if "5" in only:
        assert dcp_dir is not None
        expect = {name: ("BF16", shape) for name, shape in dcp_layout(sizes)}
        nfiles = len(list(dcp_dir.glob("*.distcp")))
        out_n, out_s = tmp / "c5-naive", tmp / "c5-statecli"
        cases.append(
            Case(
                "5",
                f"DCP ({nfiles} .distcp, {tree_bytes(dcp_dir) / MIB:,.0f} MiB) -> HF bf16 safetensors",
                [
                    Cmd(
                        "dcp_to_torch_save + torch.load + cast + save_file (1 file)",
                        [py, "-c", DCP_SCRIPT, str(dcp_dir), str(out_n)],
                        "baseline",
                        out=out_n,
                        expect=expect,
                        workers=1,
                    ),
                    Cmd(
                        "statecli convert DCP/ -o OUT/",
                        [*statecli, "convert", str(dcp_dir), "-o", f"{out_s}/", *conv],
                        "statecli",
                        out=out_s,
                        expect=expect,
                        workers=min(jobs_default or cpus, nfiles) if "--jobs" in flags else 1,
                        workers_note="*" if "--jobs" in flags and not jobs_default else "",
                    ),
                ],
                input_bytes=tree_bytes(dcp_dir),
            )
        )
    if "6" in only:
        assert shards is not None and shard_expect is not None
        out_1, out_t = tmp / "c6-jobs1", tmp / "c6-torchrun"
        skip = missing("--distributed", "--jobs")
        cases.append(
            Case(
                "6",
                f"torchrun 2 ranks vs 1 process, case 3's data ({sizes.shards} shards)",
                [
                    Cmd(
                        "statecli convert --jobs 1",
                        [*statecli, "convert", str(shards), "-o", f"{out_1}/", *conv, "--jobs", "1"],
                        "baseline",
                        out=out_1,
                        expect=shard_expect,
                        workers=1,
                        compare=True,
                    ),
                    Cmd(
                        "torchrun --nproc-per-node 2 ... --distributed",
                        [
                            torchrun,
                            "--standalone",
                            "--nproc-per-node",
                            "2",
                            "-m",
                            "statecli",
                            "convert",
                            str(shards),
                            "-o",
                            f"{out_t}/",
                            *conv,
                            "--distributed",
                        ],
                        "statecli",
                        out=out_t,
                        expect=shard_expect,
                        workers=2,
                        compare=True,
                    ),
                ],
                input_bytes=tree_bytes(shards),
                skip=skip,
            )
        )

    failed = False
    try:
        for case in cases:
            if not case.skip:
                runner.case(case)
            print_case(case)
            sys.stdout.flush()
            failed |= any(c.error or (c.check and not c.check.startswith("ok")) for c in case.cmds)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    # Byte-identical outputs across the parallelism (cases 3 and 6): sha256 of every output file.
    hashed = [
        (f"{c.label} (case {case.key})", c.hashes) for case in cases if case.key in "36" for c in case.cmds if c.hashes
    ]
    identical = None
    if len(hashed) >= 2:
        ref = hashed[0][1]
        diffs = [f"{label}: {sorted(set(ref.items()) ^ set(h.items()))[:1]}" for label, h in hashed[1:] if h != ref]
        identical = not diffs
        print()
        print(f"output sha256 of every file, {len(ref)} files, compared across: " + "; ".join(lab for lab, _ in hashed))
        print("  byte-identical: " + ("yes" if identical else "NO: " + " | ".join(diffs)))

    # Targets.
    by = {(case.key, c.label): c for case in cases for c in case.cmds}

    def get(key: str, label: str) -> Cmd | None:
        c = by.get((key, label))
        return c if c is not None and c.ok else None

    targets: list[dict] = []

    def target(name: str, value: float | None, ok: bool | None, shown: str) -> None:
        verdict = "n/a" if value is None else ("PASS" if ok else "MISS")
        targets.append({"target": name, "value": value, "verdict": verdict})
        print(f"  {verdict:<5} {name}: {shown if value is not None else 'not measured'}")

    print()
    print(
        "targets (issue #14)"
        + (" -- --small: sizes are not the issue's, read nothing into these" if args.small else "")
    )
    j = get("1", "statecli inspect --format json > /dev/null")
    t = get("1", "statecli inspect (table) > /dev/null")
    target(
        f"1 inspect .pt json <= {TARGET_MANY_JSON_S} s",
        j and j.min_s,
        j and j.min_s <= TARGET_MANY_JSON_S,
        f"{j.min_s:.3f} s" if j else "",
    )
    target(
        f"1 inspect .pt table <= {TARGET_MANY_TABLE_S} s",
        t and t.min_s,
        t and t.min_s <= TARGET_MANY_TABLE_S,
        f"{t.min_s:.3f} s" if t else "",
    )
    i = get("2", "statecli inspect INDEX --format json > /dev/null")
    target(
        f"2 inspect index json <= {TARGET_INDEX_S} s",
        i and i.min_s,
        i and i.min_s <= TARGET_INDEX_S,
        f"{i.min_s:.3f} s" if i else "",
    )
    for key, base_label, ours_label, speed, rss in (
        (
            "3",
            "naive per-shard load_file/cast/save_file",
            "statecli convert (default jobs)",
            TARGET_SHARDS_SPEEDUP,
            TARGET_SHARDS_RSS,
        ),
        (
            "4",
            "torch.load + cast + save_file (naive)",  # the issue's baseline (bench_convert.py's naive, 0.62x)
            "statecli convert X.pt -o X.safetensors",
            1 / TARGET_PT_WALL,
            None,
        ),
        (
            "5",
            "dcp_to_torch_save + torch.load + cast + save_file (1 file)",
            "statecli convert DCP/ -o OUT/",
            TARGET_DCP_SPEEDUP,
            TARGET_DCP_RSS,
        ),
    ):
        b, o = get(key, base_label), get(key, ours_label)
        both = b is not None and o is not None
        sp = b.min_s / o.min_s if both else None
        target(
            f"{key} naive / statecli wall >= {speed:g}x (statecli / naive <= {1 / speed:.3g})",
            sp,
            sp is not None and sp >= speed,
            f"{sp:.2f}x ({o.min_s:.2f} s vs {b.min_s:.2f} s)" if both else "",
        )
        if rss is not None:
            r = o.rss_mib / b.rss_mib if both else None
            target(
                f"{key} statecli / naive peak RSS <= {rss:g}",
                r,
                r is not None and r <= rss,
                f"{r:.2f} ({o.rss_mib:.0f} vs {b.rss_mib:.0f} MiB per process; tree PSS "
                f"{fmt(o.tree_mib, '.0f')} vs {fmt(b.tree_mib, '.0f')} MiB)"
                if both
                else "",
            )
    one, tr = get("6", "statecli convert --jobs 1"), get("6", "torchrun --nproc-per-node 2 ... --distributed")
    if one and tr:
        print(
            f"  info  6 torchrun 2 ranks / 1 process wall: {tr.min_s / one.min_s:.2f} ({tr.min_s:.2f} s vs "
            f"{one.min_s:.2f} s; no target)"
        )
    target(
        "3/6 outputs byte-identical across --jobs / --no-sync / torchrun",
        None if identical is None else 1.0,
        identical,
        "yes" if identical else "no",
    )

    facts["load_avg_after"] = os.getloadavg()
    print()
    print(f"load average before {facts['load_avg_before']}, after {facts['load_avg_after']}")
    if args.keep:
        print(f"outputs kept in {tmp}")
    print(f"done in {time.time() - started:.0f} s")
    if args.json:
        doc = {
            "facts": facts,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "sizes": vars(sizes),
            "flags": sorted(flags),
            "cases": [
                {
                    "case": case.key,
                    "title": case.title,
                    "skip": case.skip,
                    "input_bytes": case.input_bytes,
                    "commands": [
                        {
                            "label": c.label,
                            "argv": c.argv,
                            "kind": c.kind,
                            "skip": c.skip,
                            "error": c.error,
                            "check": c.check,
                            "workers": c.workers,
                            "min_s": c.min_s,
                            "peak_rss_mib": c.rss_mib,
                            "tree_pss_mib": c.tree_mib,
                            "runs": c.runs,
                            "sha256": c.hashes,
                        }
                        for c in case.cmds
                    ],
                }
                for case in cases
            ],
            "identical": identical,
            "targets": targets,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
