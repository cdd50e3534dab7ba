#!/usr/bin/env python3
"""Benchmark converting a whole training checkpoint (.pt to .pt, ``--dtype bf16``) against the script a user
would write: ``torch.load`` it, cast every floating tensor but the optimizer's ``step``, ``torch.save`` it.

Two synthetic checkpoints, made once and cached under ``benchmarks/.cache``:

* ``big``: a model of ``--model-mib`` MiB fp32 in 64 tensors, with Adam's ``exp_avg`` and ``exp_avg_sq`` for
  each (three times the model's bytes), an epoch, a scheduler and the RNG state;
* ``many``: ``--tensors`` small tensors with their Adam state: the per-tensor cost (statecli reads the pickle
  twice, once to plan and once to write it back with new storage records).

Each command runs as a whole process (``python -c``), once to warm up and check, then ``--runs`` times;
the medians of wall time and of the child's peak RSS (``getrusage(RUSAGE_CHILDREN)``, read by a stdlib-only
parent per run) are printed with the ratio statecli / baseline. Standard library + torch only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
MIB = 1 << 20

BASELINE = r"""
import sys, torch
src, dst = sys.argv[1], sys.argv[2]
ck = torch.load(src, map_location="cpu", weights_only=True)
def cast(o, key=None):
    if isinstance(o, torch.Tensor):
        return o.to(torch.bfloat16) if o.is_floating_point() and key != "step" else o
    if isinstance(o, dict):
        return type(o)((k, cast(v, k)) for k, v in o.items())
    if isinstance(o, (list, tuple)):
        return type(o)(cast(v) for v in o)
    return o
torch.save(cast(ck), dst)
"""

MEASURE = r"""
import resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
wall = time.perf_counter() - t
print(rc, wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def build(kind: str, model_mib: int, tensors: int) -> Path:
    import torch

    path = CACHE / (f"whole_big_{model_mib}.pt" if kind == "big" else f"whole_many_{tensors}.pt")
    if path.exists():
        return path
    CACHE.mkdir(exist_ok=True)
    torch.manual_seed(0)
    if kind == "big":
        per = model_mib * MIB // 4 // 64
        model = {f"layer{i}.weight": torch.randn(per) for i in range(64)}
    else:
        model = {f"block{i // 4}.p{i % 4}": torch.randn(8) for i in range(tensors)}
    state = {
        i: {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(t), "exp_avg_sq": torch.rand_like(t)}
        for i, t in enumerate(model.values())
    }
    groups = [{"lr": 1e-3, "betas": (0.9, 0.999), "params": list(range(len(model)))}]
    ck = {
        "model": model,
        "optimizer": {"state": state, "param_groups": groups},
        "epoch": 7,
        "lr_scheduler": {"last_epoch": 7, "base_lrs": [1e-3]},
        "rng_state": torch.get_rng_state(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(ck, tmp)
    os.replace(tmp, path)
    return path


def measure(cmd: list[str], runs: int) -> tuple[float, float]:
    walls, rss = [], []
    for k in range(runs + 1):
        out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True)
        rc, wall, peak = out.stdout.split()
        if rc != "0":
            raise SystemExit(f"failed ({rc}): {' '.join(cmd)}")
        if k:  # the first run warms the page cache
            walls.append(float(wall))
            rss.append(int(peak) / 1024)
    return statistics.median(walls), statistics.median(rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-mib", type=int, default=256)
    ap.add_argument("--tensors", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    started = time.time()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; medians of {args.runs} runs")
    print(f"{'checkpoint':<34} {'command':<10} {'wall s':>8} {'peak MiB':>9}  ratio (statecli / baseline)")
    for kind in ("big", "many"):
        src = build(kind, args.model_mib, args.tensors)
        size = src.stat().st_size / MIB
        label = f"{kind} ({size:,.0f} MiB)"
        out = CACHE / "out.pt"
        base = measure([sys.executable, "-c", BASELINE, str(src), str(out)], args.runs)
        ours = measure(
            [sys.executable, "-m", "statecli", "convert", str(src), "-o", str(out), "--dtype", "bf16", "-q", "--force"],
            args.runs,
        )
        print(f"{label:<34} {'baseline':<10} {base[0]:>8.2f} {base[1]:>9.0f}")
        print(f"{'':<34} {'statecli':<10} {ours[0]:>8.2f} {ours[1]:>9.0f}  wall {ours[0] / base[0]:.2f}×, "
              f"memory {ours[1] / base[1]:.2f}×")  # fmt: skip
        out.unlink(missing_ok=True)
    print(f"done in {time.time() - started:.0f} s; peak RSS of the child process (getrusage)")


if __name__ == "__main__":
    main()
