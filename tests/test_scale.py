"""#14: a multi-file output written by worker processes (--jobs) and by torchrun ranks (--distributed).

The promise tested here: the bytes are the same whatever the parallelism; a worker or rank that dies, or
fails, leaves no index and no named file; torch's thread count is the caller's again afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

import statecli  # noqa: E402
from statecli.conversion import casting  # noqa: E402
from statecli.errors import CheckFailedError, UsageError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARDS = 6


def _sharded(folder: Path, shards: int = SHARDS, rows: int = 64, big: float | None = None) -> Path:
    """An HF index of ``shards`` shards, each a layer with weights, a BatchNorm's buffers, an int count."""
    folder.mkdir()
    weight_map = {}
    g = torch.Generator().manual_seed(1)
    for k in range(shards):
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        sd = {
            f"layers.{k}.proj.weight": torch.randn(rows, 32, generator=g),
            f"layers.{k}.proj.bias": torch.zeros(rows),
            f"layers.{k}.norm.running_var": torch.rand(rows, generator=g),
            f"layers.{k}.norm.num_batches_tracked": torch.tensor(7),
            f"layers.{k}.half": torch.randn(8, generator=g).to(torch.float16),
        }
        if big is not None and k == shards - 1:
            sd[f"layers.{k}.proj.weight"][0, 0] = big
        save_file(sd, str(folder / name))
        weight_map.update(dict.fromkeys(sd, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder / "model.safetensors.index.json"


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _everything(folder: Path) -> list[str]:
    """Every name in the folder, hidden ones included."""
    return sorted(os.listdir(folder)) if folder.exists() else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], script: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``torchrun`` with 2 ranks on this machine, on a free port; ``script`` instead of ``-m statecli``."""
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
    ]
    target = [script] if script is not None else ["-m", "statecli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    return subprocess.run([*launch, *target, *args], capture_output=True, text=True, timeout=timeout, env=env)


# ---------------------------------------------------------------- byte-identical whatever the parallelism


def test_jobs_and_ranks_write_the_same_bytes(tmp_path):
    index = _sharded(tmp_path / "in")
    one = statecli.convert(index, str(tmp_path / "one") + "/", dtype="bf16", jobs=1)
    two = statecli.convert(index, str(tmp_path / "two") + "/", dtype="bf16", jobs=2)
    assert one.jobs == 1 and two.jobs == 2
    assert _hashes(tmp_path / "one") == _hashes(tmp_path / "two")
    # A sharded input keeps its sharding: each tensor stays in its shard's place.
    assert len(one.files) == SHARDS + 1
    back = load_file(str(tmp_path / "two" / "model-00003-of-00006.safetensors"))
    assert back["layers.2.proj.weight"].dtype == torch.bfloat16
    assert back["layers.2.norm.num_batches_tracked"].dtype == torch.int64

    run = _torchrun(["convert", str(index), "-o", str(tmp_path / "ranks") + "/", "--dtype", "bf16", "--distributed",
                     "--format", "json"])  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert _hashes(tmp_path / "ranks") == _hashes(tmp_path / "one")
    report = json.loads(run.stdout)  # rank 0's report, alone on stdout
    assert report["world_size"] == 2
    per_rank = {r["rank"]: [os.path.basename(f) for f in r["files"]] for r in report["ranks"]}
    assert sorted(per_rank) == [0, 1]
    assert per_rank[0] and per_rank[1], "the work was not split"
    assert "model.safetensors.index.json" in per_rank[0]
    written = sorted(f for fs in per_rank.values() for f in fs)
    assert written == sorted(_hashes(tmp_path / "one"))


def test_max_shard_size_still_cuts_by_size(tmp_path):
    index = _sharded(tmp_path / "in")
    report = statecli.convert(index, str(tmp_path / "out") + "/", max_shard_size="8KB", jobs=2)
    sizes = [os.path.getsize(f) for f in report.files if f.endswith(".safetensors")]
    assert len(sizes) > SHARDS
    assert _hashes(tmp_path / "out") == _hashes(_convert_again(index, tmp_path / "again", max_shard_size="8KB"))


def _convert_again(index: Path, out: Path, **options: object) -> Path:
    statecli.convert(index, str(out) + "/", jobs=1, **options)
    return out


# ---------------------------------------------------------------- failures leave nothing named


def test_overflow_in_a_worker_writes_nothing(tmp_path):
    index = _sharded(tmp_path / "in", big=1e6)
    out = tmp_path / "out"
    with pytest.raises(CheckFailedError, match="overflow"):
        statecli.convert(index, str(out) + "/", dtype="fp16", jobs=2)
    assert not out.exists()  # the folder it made is gone again, with every file of every worker


KILL_WORKER = """
import os, signal, sys
import statecli
from statecli.conversion import execute, workers

real = workers.write_shard
def dying(f, *args):
    # The worker writing the last shard dies in the middle of it, after the others may have finished.
    if f.path.endswith("-00006-of-00006.safetensors"):
        args[-1].write(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(f, *args)
workers.write_shard = dying
try:
    statecli.convert(sys.argv[1], sys.argv[2], dtype="bf16", jobs=2)
except statecli.StatecliError as e:
    print(type(e).__name__, e.exit_code, e.message)
    sys.exit(e.exit_code)
"""


def test_a_killed_worker_leaves_no_index_and_no_file(tmp_path):
    index = _sharded(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()  # there already: only what statecli wrote could be in it
    script = tmp_path / "kill_worker.py"
    script.write_text(KILL_WORKER)
    run = subprocess.run(
        [sys.executable, str(script), str(index), str(out) + "/"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 4, run.stdout + run.stderr
    assert "worker process died" in run.stdout
    assert _everything(out) == []  # no index, no shard, no hidden staged file


KILL_RANK = """
import os, signal, sys
from statecli.conversion import workers
from statecli.cli.main import main

real = workers.write_shard
def dying(f, *args):
    if os.environ["RANK"] == "1":
        args[-1].write(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(f, *args)
workers.write_shard = dying
main()
"""


def test_a_killed_rank_leaves_no_index_and_no_file(tmp_path):
    index = _sharded(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "kill_rank.py"
    script.write_text(KILL_RANK)
    run = _torchrun(["convert", str(index), "-o", str(out) + "/", "--dtype", "bf16", "--distributed"], str(script))
    assert run.returncode != 0
    assert _everything(out) == []


FAIL_RANK = """
import os, sys
from statecli.conversion import workers
from statecli.cli.main import main
from statecli.errors import InputError

real = workers.write_shard
def failing(f, *args):
    if os.environ["RANK"] == "1":
        raise InputError("statecli_test: rank 1 cannot read this")
    return real(f, *args)
workers.write_shard = failing
main()
"""


def test_a_failing_rank_fails_every_rank(tmp_path):
    index = _sharded(tmp_path / "in")
    out = tmp_path / "out"
    script = tmp_path / "fail_rank.py"
    script.write_text(FAIL_RANK)
    run = _torchrun(["convert", str(index), "-o", str(out) + "/", "--dtype", "bf16", "--distributed"], str(script))
    assert run.returncode != 0
    # Rank 1 says its error, rank 0 says it once for everyone: the same message, twice, not once per file.
    assert run.stderr.count("rank 1 cannot read this") == 2, run.stderr
    assert not out.exists()  # made by rank 0, removed again


def test_distributed_needs_torchrun(tmp_path):
    index = _sharded(tmp_path / "in")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    run = subprocess.run(
        [sys.executable, "-m", "statecli", "convert", str(index), "-o", str(tmp_path / "o") + "/", "--distributed"],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert run.returncode == 2
    assert "torchrun" in run.stderr
    assert not (tmp_path / "o").exists()


def test_jobs_must_be_positive(tmp_path):
    index = _sharded(tmp_path / "in")
    with pytest.raises(UsageError, match="at least 1"):
        statecli.convert(index, str(tmp_path / "o") + "/", jobs=0)
    run = subprocess.run(
        [sys.executable, "-m", "statecli", "convert", str(index), "-o", str(tmp_path / "o") + "/", "--jobs", "0"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert run.returncode == 2
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- threads and syncing


def test_one_thread_during_and_the_callers_count_after(tmp_path, monkeypatch):
    index = _sharded(tmp_path / "in")
    seen = []
    real = casting.cast

    def spy(src, dst):
        seen.append(torch.get_num_threads())
        return real(src, dst)

    monkeypatch.setattr("statecli.conversion.execute.cast", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        statecli.convert(index, str(tmp_path / "a") + "/", dtype="bf16", jobs=1)
        statecli.convert(index, str(tmp_path / "a.safetensors"), dtype="bf16")
        statecli.load(index, dtype="bf16")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}


def test_no_sync_never_flushes(tmp_path, monkeypatch):
    index = _sharded(tmp_path / "in")
    calls = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda fd, real=real, name=name: (calls.append(name), real(fd))[1])
    statecli.convert(index, str(tmp_path / "s") + "/", dtype="bf16", jobs=1, sync=False)
    statecli.convert(index, str(tmp_path / "s.safetensors"), dtype="bf16", sync=False)
    assert calls == []
    statecli.convert(index, str(tmp_path / "d") + "/", dtype="bf16", jobs=1)
    assert calls.count("fsync") >= SHARDS + 1  # every shard and the index, then the folder


def test_ctrl_c_in_the_pool_leaves_nothing(tmp_path):
    """SIGINT reaches the workers too (one process group): each drops its unnamed files."""
    index = _sharded(tmp_path / "in", shards=4, rows=4096)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "statecli",
            "convert",
            str(index),
            "-o",
            str(out) + "/",
            "--jobs",
            "2",
            "--dtype",
            "bf16",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    import time

    time.sleep(2.0)  # torch imported, workers started or finished: either way nothing half-done may stay
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=120)
    names = _everything(out)
    assert not [n for n in names if n.startswith(".")], names  # no hidden file left behind
    if "model.safetensors.index.json" not in names:
        assert names == []  # interrupted: nothing named
    else:
        assert len(names) == 5  # it finished first: complete


def test_workers_report_progress(tmp_path):
    index = _sharded(tmp_path / "in", rows=2048)
    seen = []
    statecli.convert(index, str(tmp_path / "o") + "/", dtype="bf16", jobs=2, progress=lambda b, t: seen.append(b))
    assert seen and max(seen) > 0


def test_help_says_what_no_sync_risks():
    run = subprocess.run(
        [sys.executable, "-m", "statecli", "convert", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
        timeout=120,
    )
    text = " ".join(run.stdout.split())
    assert "--jobs" in text and "--distributed" in text
    assert "crash or power loss" in text


# ---------------------------------------------------------------- Hugging Face <-> DCP, under the pool and torchrun


def _dcp_load(folder: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import warnings

    import torch.distributed.checkpoint as dcp

    out = {k: torch.zeros_like(v) for k, v in like.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
        dcp.load(out, checkpoint_id=str(folder), no_dist=True)
    return out


def _state_dict(index: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(index.parent.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def test_hf_to_dcp_loads_with_dcp_load_whatever_the_parallelism(tmp_path):
    index = _sharded(tmp_path / "in")
    one = statecli.convert(index, str(tmp_path / "one") + "/", output_format="dcp", dtype="bf16", jobs=1)
    statecli.convert(index, str(tmp_path / "two") + "/", output_format="dcp", dtype="bf16", jobs=2)
    assert sorted(os.listdir(tmp_path / "one")) == [".metadata", *(f"__0_{k}.distcp" for k in range(SHARDS))]
    assert _hashes(tmp_path / "one") == _hashes(tmp_path / "two")
    assert one.bytes_written == sum(os.path.getsize(f) for f in one.files if f.endswith(".distcp"))

    expected = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in _state_dict(index).items()}
    got = _dcp_load(tmp_path / "one", expected)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k

    # torch's own way from a torch.save file gives the same tensors.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

    torch.save(expected, tmp_path / "sd.pt")
    torch_save_to_dcp(str(tmp_path / "sd.pt"), str(tmp_path / "theirs"))
    dcp_to_torch_save(str(tmp_path / "theirs"), str(tmp_path / "theirs.pt"))
    dcp_to_torch_save(str(tmp_path / "one"), str(tmp_path / "ours.pt"))
    theirs = torch.load(tmp_path / "theirs.pt", weights_only=True)
    ours = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in theirs)

    run = _torchrun(["convert", str(index), "-o", str(tmp_path / "ranks") + "/", "-t", "dcp", "--dtype", "bf16",
                     "--distributed", "--format", "json"])  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert _hashes(tmp_path / "ranks") == _hashes(tmp_path / "one")
    report = json.loads(run.stdout)
    assert [".metadata" in " ".join(r["files"]) for r in report["ranks"]] == [True, False]


def test_dcp_to_hf_matches_dcp_to_torch_save_under_the_pool(tmp_path):
    """A DCP folder (written by torch) to HF shards, by two workers, equals torch's own dcp_to_torch_save."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    g = torch.Generator().manual_seed(3)
    model = {f"layers.{k}.w": torch.randn(128, 64, generator=g) for k in range(8)}
    model["norm.running_mean"] = torch.randn(64, generator=g)
    model["norm.num_batches_tracked"] = torch.tensor(5)
    optim = {f"state.layers.{k}.w.exp_avg": torch.randn(128, 64, generator=g) for k in range(2)}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        writer = FileSystemWriter(str(tmp_path / "dcp"), thread_count=4)
        dcp.save({"model": model, "optim": optim}, storage_writer=writer, no_dist=True)
    assert len(list((tmp_path / "dcp").glob("*.distcp"))) == 4
    report = statecli.convert(tmp_path / "dcp", str(tmp_path / "hf") + "/", dtype="bf16", jobs=2)
    assert report.jobs == 2
    shards = [f for f in report.files if f.endswith(".safetensors")]
    assert len(shards) == 4  # as many shards as the folder had .distcp files
    dcp_to_torch_save(str(tmp_path / "dcp"), str(tmp_path / "theirs.pt"))
    theirs = torch.load(tmp_path / "theirs.pt", weights_only=True)["model"]
    ours = {}
    for f in shards:
        ours.update(load_file(f))
    ours = {k.removeprefix("model."): v for k, v in ours.items()}
    assert ours.keys() == theirs.keys()
    for k, v in theirs.items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert ours[k].dtype == want.dtype and torch.equal(ours[k], want), k
    statecli.convert(tmp_path / "dcp", str(tmp_path / "hf1") + "/", dtype="bf16", jobs=1)
    assert _hashes(tmp_path / "hf1") == _hashes(tmp_path / "hf")
    run = _torchrun(["convert", str(tmp_path / "dcp"), "-o", str(tmp_path / "ranks") + "/", "--dtype", "bf16",
                     "--distributed"])  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert _hashes(tmp_path / "ranks") == _hashes(tmp_path / "hf")


def test_dcp_output_refuses_what_it_cannot_hold(tmp_path):
    index = _sharded(tmp_path / "in")
    with pytest.raises(UsageError, match="folder"):
        statecli.convert(index, str(tmp_path / "x.safetensors"), output_format="dcp")
    with pytest.raises(UsageError, match="--verify"):
        statecli.convert(index, str(tmp_path / "d") + "/", output_format="dcp", verify=True)
    assert not (tmp_path / "d").exists()


SPAWN = """
import multiprocessing, sys
import statecli
from statecli.conversion import workers
workers._context = lambda: multiprocessing.get_context("spawn")  # what macOS and Windows get
if __name__ == "__main__":
    report = statecli.convert(sys.argv[1], sys.argv[2], dtype="bf16", jobs=2)
    print(report.jobs)
"""


def test_spawned_workers_write_the_same_bytes(tmp_path):
    """Where fork is not safe the workers are spawned: the plan travels to them, the bytes are the same."""
    index = _sharded(tmp_path / "in")
    script = tmp_path / "spawn.py"
    script.write_text(SPAWN)
    run = subprocess.run(
        [sys.executable, str(script), str(index), str(tmp_path / "spawned") + "/"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "2"
    statecli.convert(index, str(tmp_path / "one") + "/", dtype="bf16", jobs=1)
    assert _hashes(tmp_path / "spawned") == _hashes(tmp_path / "one")


def test_a_dcp_folder_is_not_converted_into_itself(tmp_path):
    import shutil

    folder = tmp_path / "dcp"
    shutil.copytree(ROOT / "sample_models" / "dcp_sharded", folder)
    before = _hashes(folder)
    with pytest.raises(statecli.OutputError, match="onto the input"):
        statecli.convert(folder, str(folder) + "/", output_format="dcp", force=True, dtype="bf16")
    assert _hashes(folder) == before
