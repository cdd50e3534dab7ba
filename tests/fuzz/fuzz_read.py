"""Fuzz statecli's readers for a set time: every input must give a report or a StatecliError, quickly.

    export PYTHONPATH=.:tests/hostile    # from the repository root: this checkout's statecli, make_hostile
    python tests/fuzz/fuzz_read.py --seconds 60                  # atheris if installed, else random mutation
    python tests/fuzz/fuzz_read.py --seconds 600 --engine random --seed 7
    python tests/fuzz/fuzz_read.py --replay CRASH_FILE           # run one saved input again, with a traceback

This folder (``commands``, ``structures``) is on the path as the script's own folder; the child processes
it starts inherit PYTHONPATH.

Not a pytest test (pytest collects ``test_*.py`` only; tests/fuzz/conftest.py ignores this folder too);
tests/test_fuzz_properties.py runs it for three seconds to keep it working.

Targets (the first byte of an input picks one, the rest is its payload):

- ``pickle``: the payload is a torch.save archive's ``data.pkl``; it is zipped with the storage members
  every sample needs, so the restricted unpickler, the walker, the findings and the roles all run.
- ``zip``: the payload is a whole file read as ``model.pt``.
- ``safetensors``: the payload is a safetensors header; the length prefix is fixed and the data section
  sized from the header's own offsets when it parses, so the offset checks are reached.
- ``index``: the payload is a shard index (JSON) in a folder holding the sample shards.

Seeds: every sample checkpoint in sample_models/ and every hostile case of tests/hostile/make_hostile.py
(under 256 KB). Engines: ``atheris`` (coverage-guided libFuzzer, run in a child process; its stats are
parsed) or ``random`` (mutations: bit flips, opcode bytes, boundary integers, runs repeated, cuts,
splices; inputs with an outcome not seen before join the corpus). Each input is bounded (``--timeout``
seconds, an address-space cap); a violation is saved under ``--out`` with its traceback.

The last stdout line is a JSON summary: engine, seconds, executions, crashes, slow inputs, outcomes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SAMPLES = REPO / "sample_models"
TARGETS = ("pickle", "zip", "safetensors", "index")
MAX_SEED_BYTES = 256 * 1024
ADDRESS_SPACE_CAP = 4 << 30
_SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else None  # files written per input: keep them in memory


# ------------------------------------------------------------------------------------------- seeds


def _zip_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i.filename) for i in z.infolist()}


def load_seeds(workdir: Path) -> dict[str, list[bytes]]:
    """Seed inputs per target: the samples, the hostile cases, a few indexes."""
    seeds: dict[str, list[bytes]] = {t: [] for t in TARGETS}
    files = sorted(p for p in SAMPLES.rglob("*") if p.is_file() and p.stat().st_size <= MAX_SEED_BYTES)
    import make_hostile

    hostile_dir = workdir / "hostile"
    for name in make_hostile.CASES:
        if name in ("zip_bomb_member", "st_header_over_100mb") or name in make_hostile.KNOWN:
            continue  # a 128 MiB inflation, a sparse 100 MB file, and the problems already known
        case = make_hostile.build(name, hostile_dir)
        if case.path.is_file() and case.path.stat().st_size <= MAX_SEED_BYTES:
            files.append(case.path)
    for p in files:
        data = p.read_bytes()
        if zipfile.is_zipfile(p):
            seeds["zip"].append(data)
            try:
                members = _zip_members(p)
            except Exception:  # hostile seeds: encrypted members, LZMA, corrupt streams: zipfile raises anything
                continue
            seeds["pickle"] += [v for k, v in members.items() if k.endswith(".pkl") and len(v) <= MAX_SEED_BYTES]
        elif p.suffix == ".safetensors" and len(data) >= 8:
            (n,) = struct.unpack_from("<Q", data)
            if 0 < n <= MAX_SEED_BYTES and 8 + n <= len(data):
                seeds["safetensors"].append(data[8 : 8 + n])
        elif p.name.endswith(".index.json"):
            seeds["index"].append(data)
    seeds["index"] += [
        b'{"weight_map": {"w": "../x.safetensors"}}',
        b'{"weight_map": {"w": "model.safetensors.index.json"}}',
        b'{"metadata": {"total_size": 1}, "weight_map": {}}',
    ]
    return {t: v for t, v in seeds.items() if v}


# -------------------------------------------------------------------------------------- execution


class Runner:
    """Turns a (target, payload) into files in a scratch folder and reads them with statecli."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        scratch.mkdir(parents=True, exist_ok=True)
        # Storage members big enough for every sample's tensors, keyed as torch keys them.
        self.storages: dict[str, bytes] = {}
        for p in SAMPLES.glob("*"):
            if p.is_file() and zipfile.is_zipfile(p):
                for name, data in _zip_members(p).items():
                    key = name.split("/data/", 1)[1] if "/data/" in name else None
                    if key is not None and len(data) > len(self.storages.get(key, b"")):
                        self.storages[key] = bytes(len(data))
        shards = SAMPLES / "sharded"
        self.index_folder = scratch / "index"
        self.index_folder.mkdir(exist_ok=True)
        for p in shards.glob("*.safetensors"):
            shutil.copyfile(p, self.index_folder / p.name)
        self.storage_zip = self._storage_entries()

    def _storage_entries(self) -> list[tuple[str, bytes]]:
        return [(f"archive/data/{k}", v) for k, v in sorted(self.storages.items())]

    def files_for(self, target: str, payload: bytes) -> Path:
        if target == "pickle":
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as z:
                z.writestr("archive/data.pkl", payload)
                z.writestr("archive/byteorder", b"little")
                for name, data in self.storage_zip:
                    z.writestr(name, data)
                z.writestr("archive/version", b"3\n")
            p = self.scratch / "model.pt"
            p.write_bytes(buf.getvalue())
            return p
        if target == "zip":
            p = self.scratch / "model.pt"
            p.write_bytes(payload)
            return p
        if target == "safetensors":
            p = self.scratch / "model.safetensors"
            p.write_bytes(struct.pack("<Q", len(payload)) + payload + bytes(_data_size(payload)))
            return p
        p = self.index_folder / "model.safetensors.index.json"
        p.write_bytes(payload)
        return self.index_folder

    def run(self, target: str, payload: bytes) -> str:
        """The outcome's signature; raises AssertionError (or anything else) when the property fails."""
        import statecli
        from statecli.errors import StatecliError

        path = self.files_for(target, payload)
        try:
            report = statecli.open_checkpoint(path)
        except StatecliError as e:
            assert e.exit_code in (3, 5), f"exit code {e.exit_code} for {type(e).__name__}"
            assert "\n" not in str(e), f"a message of several lines: {str(e)!r}"
            return f"{target}:{type(e).__name__}:{re.sub(r'[0-9]+', 'N', e.message[:60])}"
        json.dumps(report.to_dict())
        codes = ",".join(sorted({f.code for f in report.findings}))
        return f"{target}:ok:{min(len(report.tensors), 3)}:{codes}"


def _data_size(header: bytes) -> int:
    """The data section a header describes (the largest end offset), when it parses; at most 1 MiB."""
    try:
        doc = json.loads(header)
    except (ValueError, RecursionError):
        return 0
    end = 0
    if isinstance(doc, dict):
        for v in doc.values():
            offs = v.get("data_offsets") if isinstance(v, dict) else None
            if isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs):
                end = max(end, offs[1])
    return min(max(end, 0), 1 << 20)


# ------------------------------------------------------------------------------------- mutation

INTERESTING = [
    b"\xff\xff\xff\xff",
    b"\xff\xff\xff\x7f",
    b"\x00\x00\x00\x80",
    b"\x00\x00\x00\x00\x00\x00\x00\x80",
    b"\xff" * 8,
    b"\x00\x00\x01\x00",
]
OPCODES = b"()0123.ABCGIJKLMNPQRSTUVXabcdeghijklopqrstu}\x80\x81\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f"
OPCODES += b"\x90\x91\x92\x93\x94\x95\x96"
SNIPPETS = [b"2\x86" * 40, b"(" * 50, b"\x85" * 200, b"h\x00" * 30, b"cos\nsystem\n", b"\x8c\x02os\x8c\x06system\x93"]


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        kind = rng.randrange(9)
        at = rng.randrange(len(out) + 1)
        if kind == 0 and out:
            out[min(at, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1 and out:
            out[min(at, len(out) - 1)] = rng.choice(OPCODES)
        elif kind == 2:
            out[at:at] = bytes([rng.choice(OPCODES)])
        elif kind == 3 and out:
            del out[at : at + rng.randint(1, 16)]
        elif kind == 4 and out:
            out[at:at] = out[at : at + rng.randint(1, 32)] * rng.randint(1, 8)
        elif kind == 5:
            v = rng.choice(INTERESTING)
            out[at : at + len(v)] = v
        elif kind == 6 and rng.random() < 0.2:
            del out[at:]
        elif kind == 7 and corpus:
            other = rng.choice(corpus)
            j = rng.randrange(len(other) + 1)
            out[at:at] = other[j : j + rng.randint(1, 256)]
        elif kind == 8:
            out[at:at] = rng.choice(SNIPPETS)
    return bytes(out[: 4 * MAX_SEED_BYTES])


# ---------------------------------------------------------------------------------------- engines


class Slow(Exception):
    pass


def _cap_memory() -> None:
    try:
        import resource
    except ImportError:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = ADDRESS_SPACE_CAP if hard == resource.RLIM_INFINITY else min(ADDRESS_SPACE_CAP, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def save(out: Path, kind: str, target: str, payload: bytes, detail: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(bytes([TARGETS.index(target)]) + payload).hexdigest()[:16]
    p = out / f"{kind}-{target}-{digest}.bin"
    p.write_bytes(bytes([TARGETS.index(target)]) + payload)
    p.with_suffix(".txt").write_text(detail)
    return p


def run_random(args: argparse.Namespace) -> dict[str, object]:
    _cap_memory()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="statecli-fuzz-", dir=_SCRATCH))
    try:
        seeds = load_seeds(work)
        runner = Runner(work / "scratch")
        corpus = {t: list(v) for t, v in seeds.items()}
        seen: set[str] = set()
        counts = {"executions": 0, "crashes": 0, "slow": 0}

        def alarm(signum: int, frame: object) -> None:
            raise Slow

        signal.signal(signal.SIGALRM, alarm)
        start = time.monotonic()
        last_report = start
        # The seeds themselves first, then mutants until the time is up.
        queue = [(t, s) for t, items in corpus.items() for s in items]
        while time.monotonic() - start < args.seconds:
            if queue:
                target, payload = queue.pop()
            else:
                target = rng.choice(list(corpus))
                payload = mutate(rng, rng.choice(corpus[target]), corpus[target])
            signal.setitimer(signal.ITIMER_REAL, args.timeout)
            try:
                outcome = runner.run(target, payload)
            except Slow:
                counts["slow"] += 1
                p = save(args.out, "slow", target, payload, f"still running after {args.timeout} s")
                print(f"SLOW {p}", file=sys.stderr)
                continue
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):
                    raise
                counts["crashes"] += 1
                p = save(args.out, "crash", target, payload, traceback.format_exc())
                print(f"CRASH {type(e).__name__}: {str(e)[:200]} -> {p}", file=sys.stderr)
                continue
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                counts["executions"] += 1
            if outcome not in seen:
                seen.add(outcome)
                if len(corpus[target]) < 2000:
                    corpus[target].append(payload)
            now = time.monotonic()
            if now - last_report > 10:
                last_report = now
                print(f"{now - start:6.0f} s  {counts}  outcomes {len(seen)}", file=sys.stderr, flush=True)
        return {
            "engine": "random",
            "seed": args.seed,
            "seconds": round(time.monotonic() - start, 1),
            **counts,
            "outcomes": len(seen),
            "corpus": {t: len(v) for t, v in corpus.items()},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_atheris_child(args: argparse.Namespace) -> None:
    """Runs inside the child process: libFuzzer drives TestOneInput until --seconds are up."""
    import atheris

    with atheris.instrument_imports(include=["statecli"]):
        import statecli
        import statecli.cli
        import statecli.formats.safetensors
        import statecli.formats.sharded
        import statecli.formats.torchzip  # noqa: F401
    work = args.workdir  # made and removed by the parent: libFuzzer ends this process with exit()
    runner = Runner(work / "scratch")
    corpus_dir = work / "corpus"
    corpus_dir.mkdir()
    for target, items in load_seeds(work).items():
        for s in items:
            payload = bytes([TARGETS.index(target)]) + s
            (corpus_dir / hashlib.sha1(payload).hexdigest()).write_bytes(payload)

    def test_one_input(data: bytes) -> None:
        if not data:
            return
        runner.run(TARGETS[data[0] % len(TARGETS)], data[1:])

    args.out.mkdir(parents=True, exist_ok=True)
    atheris.Setup(
        [
            sys.argv[0],
            str(corpus_dir),
            f"-max_total_time={int(args.seconds)}",
            f"-timeout={int(args.timeout)}",
            "-rss_limit_mb=3072",
            f"-max_len={4 * MAX_SEED_BYTES}",
            f"-artifact_prefix={args.out}/",
            f"-seed={args.seed}",
            "-print_final_stats=1",
        ],
        test_one_input,
    )
    atheris.Fuzz()


def run_atheris(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="statecli-fuzz-", dir=_SCRATCH))
    cmd = [sys.executable, __file__, "--engine", "atheris-child", "--seconds", str(args.seconds)]
    cmd += ["--timeout", str(args.timeout), "--seed", str(args.seed), "--out", str(args.out), "--workdir", str(work)]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + 600)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log = proc.stderr
    (args.out).mkdir(parents=True, exist_ok=True)
    (args.out / "atheris.log").write_text(log)

    def stat(name: str) -> int:
        m = re.search(rf"stat::{name}:\s*(\d+)", log)
        return int(m.group(1)) if m else 0

    crashes = sorted(p.name for p in args.out.glob("crash-*")) + sorted(p.name for p in args.out.glob("oom-*"))
    slow = sorted(p.name for p in args.out.glob("timeout-*")) + sorted(p.name for p in args.out.glob("slow-unit-*"))
    cov = re.findall(r"cov: (\d+) ft: (\d+)", log)
    return {
        "engine": "atheris",
        "seed": args.seed,
        "seconds": round(time.monotonic() - start, 1),
        "executions": stat("number_of_executed_units"),
        "crashes": len(crashes),
        "slow": len(slow),
        "artifacts": crashes + slow,
        "coverage": {"edges": int(cov[-1][0]), "features": int(cov[-1][1])} if cov else None,
        "exit_code": proc.returncode,
    }


# ------------------------------------------------------------------------------ structural engine
#
# Inputs built by tests/fuzz/structures.py (one family after another), each run through every command
# path of tests/fuzz/commands.py. Input ``i`` of seed ``S`` is built from ``random.Random(f"{S}:{i}")``,
# so ``--replay-structural FAMILY:S:i`` builds it again. Children do the work; the parent watches each
# child's state file and, when a child stops answering (a hang in C, where no signal is handled), kills
# it, records the input it was on as a hang, and starts a new child after it.

STRUCTURAL_MEMORY = 1 << 30  # address space each input may add: the 1 GB
SAVED_PER_SIGNATURE = 3


def _structural_input(seed: int, i: int, families: list[str]) -> tuple[str, random.Random]:
    return families[i % len(families)], random.Random(f"{seed}:{i}")


def _violation_signature(family: str, e: BaseException) -> str:
    """What kind of failure, with the numbers, quoted text and paths of its message taken out; ``known:NAME``
    for a known defect (tests/fuzz/known.py)."""
    import known

    name = known.match(family, e)
    if name is not None:
        return f"{family}|known:{name}"
    sig = known.signature(family, e)
    return re.sub(r"'[^']*'|\"[^\"]*\"|/[^\s:,)|]+|[0-9]+", "_", sig)[:160]


def build_structural(family: str, rng: random.Random, work: Path) -> Any:
    import structures

    return structures.build(family, structures.RandomDraw(rng), work / "case")


def run_structural_input(
    built: Any, rng: random.Random, work: Path, timeout: float, memory: int | None, cli_fraction: float
) -> str:
    """Run the commands on one built input: its outcome signature."""
    import commands

    cli = rng.choice(list(commands.CLI_COMMANDS)) if rng.random() < cli_fraction else None
    outcome = commands.run_commands(
        built.path,
        work / "scratch",
        cli=cli,
        pt_output=rng.random() < 0.5,
        histogram=rng.random() < 0.3,
        dtype=rng.choice([None, None, "bf16", "fp16", "float8_e4m3fn", "fp64"]),
        seconds=timeout,
        memory=memory,
    )
    return f"{built.family}:{commands.signature(outcome)}"


def _save_structural(out: Path, sig: str, family: str, seed: int, i: int, work: Path, detail: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", sig)[:80].strip("-")
    dest = out / slug / f"{family}-{seed}-{i}"
    if dest.exists():
        return dest
    dest.mkdir(parents=True)
    case = work / "case"
    if case.exists():
        shutil.copytree(
            case,
            dest / "input",
            symlinks=True,
            ignore=lambda d, names: [
                n for n in names if (Path(d) / n).is_file() and (Path(d) / n).stat().st_size > 64 << 20
            ],
        )
    replay = f"python tests/fuzz/fuzz_read.py --replay-structural {family}:{seed}:{i}"
    (dest / "detail.txt").write_text(f"{sig}\n\nreplay: {replay}\n\n{detail}", errors="replace")
    return dest


def run_structural_child(args: argparse.Namespace) -> dict[str, object]:
    import warnings

    warnings.filterwarnings("ignore", "Duplicate name", UserWarning)  # the generators write duplicate members
    import commands
    import torch  # noqa: F401 - stats and convert import it; once, before any input is timed

    families = args.families
    counts: dict[str, int] = {"executions": 0, "violations": 0, "slow": 0, "known": 0, "generator_errors": 0}
    signatures: dict[str, int] = {}
    saved: dict[str, list[str]] = {}
    outcomes: set[str] = set()
    start = time.monotonic()
    i = args.start
    state = Path(args.state)

    def write_state() -> None:
        tmp = state.with_suffix(".tmp")
        doc = {"i": i, "counts": counts, "signatures": signatures, "saved": saved, "outcomes": len(outcomes)}
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, state)

    while time.monotonic() - start < args.seconds:
        family, rng = _structural_input(args.seed, i, families)
        write_state()
        work = Path(tempfile.mkdtemp(prefix="statecli-sfuzz-", dir=_SCRATCH))
        try:
            try:
                built = build_structural(family, rng, work)
                outcomes.add(run_structural_input(built, rng, work, args.timeout, args.memory, args.cli_fraction))
            except (commands.Violation, commands.Slow, MemoryError) as e:
                sig = _violation_signature(family, e)
                kind = "known" if "|known:" in sig else "slow" if isinstance(e, commands.Slow) else "violations"
                counts[kind] += 1
                signatures[sig] = signatures.get(sig, 0) + 1
                if len(saved.setdefault(sig, [])) < SAVED_PER_SIGNATURE:
                    detail = "".join(traceback.format_exception(e))
                    saved[sig].append(str(_save_structural(args.out, sig, family, args.seed, i, work, detail)))
                    print(f"{kind.upper()} {sig} -> {saved[sig][-1]}", file=sys.stderr, flush=True)
            except Exception as e:  # a generator that could not build its input: the fuzzer's bug
                counts["generator_errors"] += 1
                print(f"GENERATOR {family}:{args.seed}:{i}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            counts["executions"] += 1
        finally:
            shutil.rmtree(work, ignore_errors=True)
        i += 1
    write_state()
    return {"i": i, "counts": counts, "signatures": signatures, "saved": saved, "outcomes": len(outcomes)}


def run_structural(args: argparse.Namespace) -> dict[str, object]:
    """Children (``--jobs``) each with its own seed; restarted past any input that hangs them."""
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="statecli-sfuzz-state-", dir=_SCRATCH))
    total: dict[str, int] = {"executions": 0, "violations": 0, "slow": 0, "known": 0, "generator_errors": 0, "hangs": 0}
    signatures: dict[str, int] = {}
    saved: dict[str, list[str]] = {}
    outcomes = 0
    stall = args.timeout * 8 + 60  # all eight commands at their limit, and a slow start (torch's import)

    def absorb(doc: dict[str, object]) -> None:
        nonlocal outcomes
        for k, v in doc["counts"].items():  # type: ignore[attr-defined]
            total[k] = total.get(k, 0) + v
        for k, v in doc["signatures"].items():  # type: ignore[attr-defined]
            signatures[k] = signatures.get(k, 0) + v
        for k, v in doc["saved"].items():  # type: ignore[attr-defined]
            saved.setdefault(k, []).extend(v)
        outcomes += doc["outcomes"]  # type: ignore[operator]

    def job(j: int) -> None:
        seed = args.seed + j
        i = 0
        state = work / f"state-{j}.json"
        while (left := args.seconds - (time.monotonic() - start)) > 1:
            cmd = [sys.executable, __file__, "--engine", "structural-child", "--seed", str(seed), "--start", str(i)]
            cmd += ["--seconds", str(left), "--timeout", str(args.timeout), "--out", str(args.out)]
            cmd += ["--state", str(state), "--families", ",".join(args.families), "--memory", str(args.memory)]
            cmd += ["--cli-fraction", str(args.cli_fraction)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
            last = time.monotonic()
            seen_i = None
            while proc.poll() is None:
                time.sleep(1)
                try:
                    doc = json.loads(state.read_text())
                except (OSError, ValueError):
                    continue
                if doc["i"] != seen_i:
                    seen_i, last = doc["i"], time.monotonic()
                elif time.monotonic() - last > stall:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
            out = proc.stdout.read() if proc.stdout else ""
            lines = out.strip().splitlines()
            if proc.returncode == 0 and lines:
                absorb(json.loads(lines[-1]))
                return
            # Killed, or died (a segfault, the OOM killer): the input it was on is the culprit.
            doc = json.loads(state.read_text())
            absorb(doc)
            family, _ = _structural_input(seed, doc["i"], args.families)
            sig = f"{family}|process {'stalled' if proc.returncode == -signal.SIGKILL else f'died ({proc.returncode})'}"
            total["hangs"] += 1
            total["executions"] += 1
            signatures[sig] = signatures.get(sig, 0) + 1
            dest = args.out / re.sub(r"[^A-Za-z0-9_.-]+", "-", sig) / f"{family}-{seed}-{doc['i']}"
            dest.mkdir(parents=True, exist_ok=True)
            (dest / "detail.txt").write_text(
                f"{sig}\n\nreplay: python tests/fuzz/fuzz_read.py --replay-structural {family}:{seed}:{doc['i']}\n"
            )
            saved.setdefault(sig, []).append(str(dest))
            print(f"HANG {sig} -> {dest}", file=sys.stderr, flush=True)
            i = doc["i"] + 1

    try:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(job, range(args.jobs)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "engine": "structural",
        "seed": args.seed,
        "jobs": args.jobs,
        "families": args.families,
        "seconds": round(time.monotonic() - start, 1),
        **total,
        "crashes": total["violations"] + total["slow"] + total["hangs"],
        "outcomes": outcomes,
        "signatures": dict(sorted(signatures.items(), key=lambda kv: -kv[1])),
        "saved": saved,
    }


def replay_structural(spec: str, timeout: float, keep: Path | None) -> int:
    """Build input ``FAMILY:SEED:I`` again and run the commands on it, with the traceback of a failure."""
    import commands

    family, seed, i = spec.split(":")
    _, rng = _structural_input(int(seed), int(i), [family])
    work = keep or Path(tempfile.mkdtemp(prefix="statecli-sreplay-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        built = build_structural(family, rng, work)
        print(built)
        try:
            outcome = run_structural_input(built, rng, work, timeout, STRUCTURAL_MEMORY, 0.0)
        except (commands.Violation, commands.Slow) as e:
            traceback.print_exception(e.__cause__ or e)
            print(f"VIOLATION: {e}")
            return 1
        print(outcome)
        print(f"{time.perf_counter() - t0:.3f} s", file=sys.stderr)
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def replay(path: Path, timeout: float) -> int:
    data = path.read_bytes()
    target = TARGETS[data[0] % len(TARGETS)]
    work = Path(tempfile.mkdtemp(prefix="statecli-replay-"))
    try:
        runner = Runner(work)
        t0 = time.perf_counter()
        print(runner.run(target, data[1:]))
        print(f"{time.perf_counter() - t0:.3f} s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz")
    ap.add_argument(
        "--engine",
        choices=["auto", "atheris", "random", "structural", "atheris-child", "structural-child"],
        default="auto",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds one input may take")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(tempfile.gettempdir()) / "statecli-fuzz-artifacts",
        help="where failing inputs (and atheris's log) are saved",
    )
    ap.add_argument("--replay", type=Path, help="run one saved input and show what happens")
    ap.add_argument("--replay-structural", metavar="FAMILY:SEED:I", help="build one structural input again and run it")
    ap.add_argument("--keep", type=Path, help="with --replay-structural: build it here and keep it")
    ap.add_argument("--families", type=lambda v: v.split(","), help="structural: these families (default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="structural: processes in parallel")
    ap.add_argument("--memory", type=int, default=STRUCTURAL_MEMORY, help="structural: bytes one input may add")
    ap.add_argument("--cli-fraction", type=float, default=0.1, help="structural: inputs also run through the CLI")
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)  # the atheris child's scratch folder
    args = ap.parse_args(argv)
    if args.replay:
        return replay(args.replay, args.timeout)
    if args.replay_structural:
        return replay_structural(args.replay_structural, args.timeout, args.keep)
    if args.engine in ("structural", "structural-child"):
        import structures

        args.families = args.families or list(structures.FAMILIES)
        if args.engine == "structural-child":
            print(json.dumps(run_structural_child(args)))
            return 0
        summary = run_structural(args)
        print(json.dumps(summary))
        return 1 if summary["crashes"] else 0
    if args.engine == "atheris-child":
        run_atheris_child(args)
        return 0
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "random"
    summary = run_atheris(args) if engine == "atheris" else run_random(args)
    print(json.dumps(summary))
    return 1 if summary["crashes"] or summary["slow"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
