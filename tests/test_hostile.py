"""Every hostile input of tests/hostile/make_hostile.py through every command that reads a file.

Cases run in child processes (tests/hostile/run_case.py, a batch of cases each) under an audit hook and
an address-space cap, each in its own empty working folder: ``inspect``, ``inspect -f json``, ``check``,
``tree``, ``schema``, ``stats``, ``diff X X``, ``convert X -o <scratch>/out.safetensors`` (a scratch
folder outside the working folder) and the Python API's ``statecli.load(X)``.

For every case (test_hostile_input):

- nothing ran: no audit event for a process, exec/compile, an unexpected import, or a file opened for
  writing (convert alone may write, only into its scratch folder); the payload's marker file does not
  exist; the working folder is still empty; the input is unchanged;
- ``inspect``, ``inspect -f json`` and ``check`` give the outcome the case expects: an error (its exit
  code, one stderr line naming the problem, nothing on stdout, no traceback), or a report with the
  expected finding (a dangerous one makes ``inspect`` exit 0 and ``check`` exit 5), or a plain report.

For every case and every other command (test_hostile_command), the rule per command:

- an ``error`` case fails in every command with the same exit code and the same one-line message;
- on a ``finding`` or ``ok`` case no command crashes: ``tree`` and ``schema`` read metadata only, as
  inspect does, and exit 0; ``stats``, ``diff X X``, ``convert`` and ``statecli.load`` read values and
  exit 0, or 3 where values the report lists cannot be read (one ``statecli: error:`` line); ``diff X X``
  never exits 1 (a file that differs from itself was made up, not read); ``convert`` and ``load`` may exit
  2 with "nothing to convert" for a file without model tensors (the user's fix: ``--select``), and
  ``convert`` with "safetensors cannot store" for a dtype or a name that format cannot hold (the user's
  fix: a .pt output). None
  refuses a dangerous file (exit 5 is ``check``'s verdict): nothing of the pickle runs, and what they
  print is the tensors'. A convert that fails leaves its scratch folder empty; one that succeeds writes a
  file statecli reads back.

And for every command the work is bounded: under SECONDS_PER_COMMAND of CPU time (on a shared CI machine
the wall clock counts the neighbours' work too; a command that blocks or spins is stopped by a timer at
WALL_SECONDS and fails), its peak RSS at most RSS_GROWTH_KIB over the RSS before it, and its address
space capped at 1 GiB beyond what the process maps before it (the issue's 1 GB: a memory bomb ends in a
MemoryError, which fails the command).

The batches run in parallel (one per CPU, at most 8) once per session; a batch whose process crashes or
hangs is rerun case by case, so the failure lands on the case that caused it. test_the_harness_sees_code_run
is the positive control. Known statecli defects are KNOWN (make_hostile, a whole case) or KNOWN_COMMANDS
(one command of one case) entries, expected to fail strictly so that a fix shows.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from subproc import checkout_env

import statecli

HERE = Path(__file__).resolve().parent

from make_hostile import CASES, KNOWN, MARKER, Case, build_all  # noqa: E402

RUN_CASE = HERE / "hostile" / "run_case.py"
SECONDS_PER_COMMAND = 5.0  # CPU seconds; the slowest command here takes about one (tree of tied_tensor_fanout)
WALL_SECONDS = 20.0  # the child's timer: a command that blocks or spins is stopped here, and fails
RSS_GROWTH_KIB = 128 << 10  # peak RSS over the RSS before each command; the largest here needs ~60 MiB
TIMEOUT = 300  # for one process (a batch of cases); a hang in C shows as a timeout, a memory bomb as MemoryError


def snapshot(root: Path) -> dict[str, Any]:
    """Each path under ``root``: size, mtime and (for small files) a digest; symlinks by their target; a
    FIFO, socket or device by its type alone (opening a FIFO to read it waits for a writer, forever)."""
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
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if st.st_size < 16 << 20 else None
                out[rel] = (st.st_size, st.st_mtime_ns, digest)
    return out


def _env() -> dict[str, str]:
    return checkout_env(NO_COLOR="1", PYTHONDONTWRITEBYTECODE="1", STATECLI_HOSTILE_SECONDS=str(WALL_SECONDS))


def run_batch(cases: list[Case], base: Path, tag: str) -> dict[str, dict[str, Any]]:
    """Run ``cases`` in one process; each gets a record (a crash or hang leaves the later ones without)."""
    jobs = []
    for c in cases:
        cwd = base / "cwd" / tag / c.name
        cwd.mkdir(parents=True)
        scratch = base / "scratch" / tag / c.name
        scratch.mkdir(parents=True)
        jobs.append({"name": c.name, "path": str(c.path), "cwd": str(cwd), "scratch": str(scratch)})
    (base / f"jobs-{tag}.json").write_text(json.dumps(jobs))
    before = {c.name: snapshot(c.path.parent) for c in cases}
    try:
        proc = subprocess.run(
            [sys.executable, str(RUN_CASE), str(base / "warm" / tag), str(base / f"jobs-{tag}.json")],
            cwd=base,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        lines, failure = proc.stdout.splitlines(), proc.stderr[-3000:] if proc.returncode else None
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        lines, failure = out.splitlines(), f"no answer within {TIMEOUT} s"
    records = {}
    for line in lines:
        rec = json.loads(line)
        records[rec["name"]] = rec
    for c, job in zip(cases, jobs, strict=True):
        rec = records.setdefault(c.name, {"failure": failure or "no record"})
        rec["cwd_after"] = sorted(os.listdir(job["cwd"]))
        rec["scratch_after"] = sorted(os.listdir(job["scratch"]))
        rec["input_changed"] = snapshot(c.path.parent) != before[c.name]
    return records


@pytest.fixture(scope="session")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Case, dict[str, Any]]]:
    """Every case's record: the cases run in batches, one process per CPU; a batch whose process crashes
    or hangs is run again case by case, so the case that did it is the one that fails."""
    base = tmp_path_factory.mktemp("hostile")
    cases = build_all(base / "cases")
    workers = max(1, min(os.cpu_count() or 1, 8))
    batches = [cases[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(lambda ib: run_batch(ib[1], base, f"b{ib[0]}"), enumerate(batches)))
    records: dict[str, dict[str, Any]] = {}
    for batch, part in zip(batches, parts, strict=True):
        if any("failure" in r for r in part.values()):
            with ThreadPoolExecutor(max_workers=workers) as pool:
                singles = list(pool.map(lambda c: run_batch([c], base, f"s-{c.name}"), batch))
            for single in singles:
                part.update(single)
        records.update(part)
    return {c.name: (c, records[c.name]) for c in cases}


def _one_line(stderr: str) -> None:
    assert stderr.endswith("\n") and stderr.count("\n") == 1, f"not one line: {stderr!r}"


@pytest.mark.slow
@pytest.mark.xdist_group("hostile")  # the session fixtures run once per xdist worker
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN[n], strict=True)) if n in KNOWN else n for n in CASES]
)
def test_hostile_input(outcomes: dict[str, tuple[Case, dict[str, Any]]], name: str) -> None:
    case, rec = outcomes[name]
    exp = case.expected
    assert "failure" not in rec, f"{name}: the process reading it crashed or hung:\n{rec['failure']}"
    by = {r["command"]: r for r in rec["results"]}
    assert all(c in by for c in ("inspect", "inspect-json", "check")), f"stopped after {list(by)}"
    inspect, inspect_json, check = by["inspect"], by["inspect-json"], by["check"]
    for r in (inspect, inspect_json, check):
        _bounded(r)

    # Nothing ran, nothing was written (by any command).
    assert rec["events"] == [], rec["events"]
    assert MARKER not in rec["cwd_after"]
    assert rec["cwd_after"] == [], rec["cwd_after"]
    assert rec["scratch_after"] == [], rec["scratch_after"]
    assert not rec["input_changed"], "the input folder changed"

    if exp.kind == "error":
        for r in (inspect, inspect_json, check):
            _refused(case, r)
        return

    assert inspect["exit_code"] == 0, inspect["stderr"]
    assert inspect_json["exit_code"] == 0, inspect_json["stderr"]
    report = inspect_json["report"]
    assert report is not None, f"inspect -f json printed no JSON report: {inspect_json['stdout'][:500]!r}"
    findings = report["findings"]
    dangerous = [f for f in findings if f["level"] == "dangerous"]
    if exp.kind == "finding":
        hits = [f for f in findings if f["code"] == exp.code and exp.message in f["message"]]
        assert hits, f"no {exp.code} finding with {exp.message!r} in {findings}"
    else:
        assert exp.message in inspect["stdout"], inspect["stdout"][:2000]
    # Names are the file's text: on a terminal, a raw escape sequence in one rewrites the report.
    for r in (inspect, check):
        assert "\x1b" not in r["stdout"], "a raw escape sequence on stdout"
    if exp.dangerous:
        assert dangerous, findings
        assert check["exit_code"] == 5, check["stderr"] + check["stdout"][:2000]  # refused as unsafe
        assert "no_dangerous_globals" in check["stdout"]
        # inspect says so on stderr too, one line per dangerous finding.
        assert inspect["stderr"].count("statecli: warning:") >= len(dangerous)
    else:
        assert not dangerous, dangerous
        assert check["exit_code"] == 0, check["stderr"] + check["stdout"][:2000]
    assert report["tensor_count"] or any(f["code"] == "no-tensors" for f in findings)


def _bounded(r: dict[str, Any]) -> None:
    """The command ended by itself, in time and memory, without a crash or a raw control character."""
    cmd = r["command"]
    assert not r["timed_out"], f"{cmd}: still running after {WALL_SECONDS} s"
    assert r["exception"] is None, f"{cmd}: {r['exception']}"
    assert r["cpu_seconds"] < SECONDS_PER_COMMAND, f"{cmd} took {r['cpu_seconds']:.1f} s of CPU"
    assert r["rss_growth_kib"] < RSS_GROWTH_KIB, f"{cmd}: peak RSS grew by {r['rss_growth_kib'] >> 10} MiB"
    assert "Traceback" not in r["stderr"] and "internal error" not in r["stderr"], f"{cmd}: {r['stderr'][-2000:]}"
    assert "\x1b" not in r["stderr"] and "\r" not in r["stderr"], f"{cmd}: a raw control character on stderr"


def _refused(case: Case, r: dict[str, Any]) -> None:
    """An error case's answer: its exit code, nothing on stdout, one stderr line naming file and problem."""
    exp = case.expected
    cmd = r["command"]
    assert r["exit_code"] == exp.code, f"{cmd}: exit {r['exit_code']}: {r['stderr']!r}"
    assert r["stdout"] == "", f"{cmd}: {r['stdout'][:500]}"
    _one_line(r["stderr"])
    assert r["stderr"].startswith("statecli: error: "), f"{cmd}: {r['stderr']}"
    assert str(case.path) in r["stderr"] or case.path.is_dir(), f"{cmd}: {r['stderr']}"
    assert exp.message in r["stderr"], f"{cmd}: {exp.message!r} not in {r['stderr']!r}"


# What each command that reads values may answer on a file inspect reads (see the module's docstring).
VALUE_EXITS = {"tree": {0}, "schema": {0}, "stats": {0, 3}, "diff": {0, 3}, "convert": {0, 2, 3}, "load": {0, 2, 3}}
USAGE_EXITS = ("nothing to convert: no model tensors", "safetensors cannot store")
# Statecli defects one command shows on one case: (case, command) -> why. Expected to fail, strictly.
KNOWN_COMMANDS: dict[tuple[str, str], str] = {}


def _command_params() -> list[Any]:
    out = []
    for n in CASES:
        for cmd in VALUE_EXITS:
            marks = []
            if n in KNOWN:
                marks.append(pytest.mark.xfail(reason=KNOWN[n], strict=False))
            elif (n, cmd) in KNOWN_COMMANDS:
                marks.append(pytest.mark.xfail(reason=KNOWN_COMMANDS[(n, cmd)], strict=True))
            out.append(pytest.param(n, cmd, marks=marks, id=f"{n}-{cmd}"))
    return out


@pytest.mark.slow
@pytest.mark.xdist_group("hostile")  # the session fixtures run once per xdist worker
@pytest.mark.parametrize(("name", "command"), _command_params())
def test_hostile_command(outcomes: dict[str, tuple[Case, dict[str, Any]]], name: str, command: str) -> None:
    case, rec = outcomes[name]
    exp = case.expected
    assert "failure" not in rec, f"{name}: the process reading it crashed or hung:\n{rec['failure']}"
    by = {r["command"]: r for r in rec["results"]}
    assert command in by, f"{command} did not run: an earlier command ran out of time ({list(by)})"
    r = by[command]
    _bounded(r)
    if exp.kind == "error":
        _refused(case, r)
        if command == "convert":
            assert r["scratch_after"] == [], f"a failed convert left {r['scratch_after']}"
        return
    code = r["exit_code"]
    assert code in VALUE_EXITS[command], f"{command}: exit {code}: {r['stderr'][-1000:]!r}"
    if code != 0:
        errors = [line for line in r["stderr"].splitlines() if line.startswith("statecli: error: ")]
        assert len(errors) == 1, f"{command}: exit {code} without one error line: {r['stderr'][-1000:]!r}"
        assert all(line.startswith("statecli: ") for line in r["stderr"].splitlines()), r["stderr"][-1000:]
        assert r["stdout"] == "", r["stdout"][:500]
        if code == 2:
            assert any(u in errors[0] for u in USAGE_EXITS), errors[0]
    if command == "convert":
        if code == 0:
            assert isinstance(r["read_back"], int), f"convert wrote a file statecli cannot read: {r['read_back']}"
        else:
            assert r["scratch_after"] == [], f"a failed convert left {r['scratch_after']}"
    if command in ("tree", "schema", "stats", "diff"):
        assert "\x1b" not in r["stdout"], f"{command}: a raw escape sequence on stdout"


@pytest.mark.slow
@pytest.mark.xdist_group("hostile")  # the session fixtures run once per xdist worker
def test_the_harness_sees_code_run(tmp_path: Path) -> None:
    """Positive control: the same runner, made to unpickle a payload with the real pickle module, records
    the os.system event and the marker file appears. Without this, an empty event list proves nothing."""
    case = build_all(tmp_path / "cases", ["call_result_popped"])[0]
    env = {**_env(), "STATECLI_HOSTILE_CONTROL": "1"}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    job = {"name": case.name, "path": str(case.path), "cwd": str(cwd), "scratch": str(tmp_path / "scratch")}
    (tmp_path / "scratch").mkdir()
    (tmp_path / "jobs.json").write_text(json.dumps([job]))
    proc = subprocess.run(
        [sys.executable, str(RUN_CASE), str(tmp_path / "warm"), str(tmp_path / "jobs.json")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    control = json.loads(proc.stdout.splitlines()[0])
    assert control["name"] == "<control>"
    assert any(e[0] == "os.system" and MARKER in e[1] for e in control["events"]), control["events"]
    assert (cwd / MARKER).exists()


RUN_EXPLOIT = HERE / "hostile" / "run_exploit.py"
EXPLOITS = [n for n, (_, _, exp) in CASES.items() if exp.runs_under]


@pytest.fixture(scope="session")
def exploit_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Every exploit case loaded the unsafe way (its ``runs_under`` loader), each in its own scratch folder,
    all in one child process: the working folder of each afterwards and how its load ended."""
    base = tmp_path_factory.mktemp("exploits")
    cases = build_all(base / "cases", EXPLOITS)
    jobs = []
    for c in cases:
        cwd = base / "cwd" / c.name
        cwd.mkdir(parents=True)
        jobs.append({"name": c.name, "path": str(c.path.resolve()), "cwd": str(cwd), "loader": c.expected.runs_under})
    (base / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run(
        [sys.executable, str(RUN_EXPLOIT), str(base / "jobs.json")],
        cwd=base,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    records = {}
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        records[rec["name"]] = rec
    return {j["name"]: (Path(j["cwd"]), records.get(j["name"], {"error": proc.stderr[-2000:]})) for j in jobs}


@pytest.mark.slow
@pytest.mark.xdist_group("hostile")  # the session fixtures run once per xdist worker
@pytest.mark.parametrize("name", EXPLOITS)
def test_the_exploit_payload_really_runs(exploit_runs: dict[str, tuple[Path, dict[str, Any]]], name: str) -> None:
    """A case that claims to be an exploit is one: loaded the unsafe way, its payload leaves the marker. So
    statecli's dangerous verdict on it (test_hostile_input) is about a file that really runs code."""
    cwd, rec = exploit_runs[name]
    assert (cwd / MARKER).exists(), f"{name}: loaded with {CASES[name][2].runs_under}, no payload ran: {rec}"


# ------------------------------------------------------------------------------ the fixes, one by one
#
# Each limit added for a case above, at its boundary: what it refuses, and the ordinary input beside it
# that it must leave alone.

from statecli.clip import printable  # noqa: E402
from statecli.errors import InputError, LimitExceededError, UnsafeError  # noqa: E402
from statecli.safepickle import COMPUTED, MAX_GLOBALS, MAX_SAME_HASH, describe  # noqa: E402
from statecli.security import classify, findings_for, loads  # noqa: E402

DAG_TUPLE = b"N" + b"2\x86" * 64  # (x, x) sixty-four times over: 2**64 leaves


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x02}" + DAG_TUPLE + b"Ns.",  # SETITEM
        b"\x80\x02}(" + DAG_TUPLE + b"Nu.",  # SETITEMS
        b"\x80\x02(" + DAG_TUPLE + b"Nd.",  # DICT
        b"\x80\x04(" + DAG_TUPLE + b"\x91.",  # FROZENSET
        b"\x80\x04\x8f(" + DAG_TUPLE + b"\x90.",  # ADDITEMS
        b"\x80\x02ccollections\nOrderedDict\n((" + DAG_TUPLE + b"Ntl\x85R.",  # OrderedDict([(k, None)])
        b"\x80\x02cbuiltins\nset\n](" + DAG_TUPLE + b"e\x85R.",  # set([k])
        b"\x80\x02}" + b"N" + b"\x85" * 200_000 + b"Ns.",  # a 200,000-deep key: hashing it would segfault
    ],
    ids=["SETITEM", "SETITEMS", "DICT", "FROZENSET", "ADDITEMS", "OrderedDict", "set", "deep"],
)
def test_keys_too_costly_to_hash_are_refused(data: bytes) -> None:
    with pytest.raises(LimitExceededError, match="more than 10000 values"):
        loads(data)


@pytest.mark.parametrize("protocol", [2, 4])
def test_ordinary_tuple_keys_and_sets_are_kept(protocol: int) -> None:
    import pickle

    value = {(1, (2, "a")): 3, "s": frozenset({(1, 2), 3}), "t": {(i, i): i for i in range(1000)}}
    obj, _ = loads(pickle.dumps(value, protocol=protocol))
    assert obj == value


def _int_keys(keys: list[int]) -> bytes:
    body = b"".join(b"\x8a\x09" + k.to_bytes(9, "little", signed=True) + b"N" for k in keys)
    return b"\x80\x02}(" + body + b"u."


def test_hash_collision_flood_is_refused_at_the_limit() -> None:
    m = sys.hash_info.modulus
    loads(_int_keys([i * m for i in range(1, MAX_SAME_HASH + 1)]))  # 64 keys with hash 0: allowed
    with pytest.raises(LimitExceededError, match="share one hash"):
        loads(_int_keys([i * m for i in range(1, MAX_SAME_HASH + 2)]))


def test_ints_that_cannot_collide_are_not_counted() -> None:
    keys = [*range(-50_000, 50_000, 7), -1, -2]  # -1 and -2 share a hash, once: far below the limit
    obj, _ = loads(_int_keys(keys))
    assert len(obj) == len(keys)


def test_stack_global_on_a_call_result_is_a_computed_global() -> None:
    data = b"\x80\x04cos\nname\n\x8c\x06system\x93\x8c\x02hi\x85R."
    _, u = loads(data)
    assert any(module == COMPUTED for module, _ in u.globals_seen)
    findings = findings_for(u.globals_seen, u.actions.values())
    computed = [f for f in findings if f.code == "computed-global"]
    assert computed and computed[0].level == "dangerous"
    assert "the value of os.name" in computed[0].message and "'hi'" in computed[0].message
    assert classify(COMPUTED, "anything") == "dangerous"


def test_describe_is_bounded_whatever_it_is_given() -> None:
    dag: object = None
    for _ in range(64):
        dag = [dag, dag]
    deep: object = ()
    for _ in range(100_000):
        deep = (deep,)
    for v in (dag, deep, "x" * 10**6, b"y" * 10**6, 7**5000, {i: i for i in range(10**5)}):
        assert len(describe(v)) < 200


def test_printable_escapes_what_a_terminal_would_obey() -> None:
    assert printable("model.layers.0.weight") == "model.layers.0.weight"
    assert printable("a\x1b[2K\r\nb\udcff\x07") == "a\\x1b[2K\\r\\nb\\udcff\\x07"


def test_global_names_and_counts_are_capped() -> None:
    with pytest.raises(LimitExceededError, match="name of 2000 characters"):
        loads(b"\x80\x04\x8c\x02os" + b"X" + struct.pack("<I", 2000) + b"s" * 2000 + b"\x93.")
    many = b"".join(b"cm\nn%d\n0" % i for i in range(MAX_GLOBALS + 1))
    with pytest.raises(LimitExceededError, match="different globals"):
        loads(b"\x80\x02" + many + b"N.")
    loads(b"\x80\x02" + b"".join(b"cm\nn%d\n0" % i for i in range(MAX_GLOBALS)) + b"N.")


def test_build_on_a_global_is_one_action_however_often_it_happens() -> None:
    data = b"\x80\x02ccollections\nOrderedDict\n" + b"2}b0" * 30_000 + b"."
    _, u = loads(data)
    [action] = u.actions.values()
    assert (action.kind, action.count) == ("patch", 30_000)
    builds = [f for f in findings_for(u.globals_seen, u.actions.values()) if f.code == "build-on-global"]
    assert len(builds) == 1 and "(30000×)" in builds[0].message


def test_a_storage_key_that_is_not_text_is_refused_before_it_is_hashed(tmp_path: Path) -> None:
    from make_hostile import Asm, state_dict, torch_zip

    def tensor(a: Asm) -> None:
        a.global_("torch._utils", "_rebuild_tensor_v2").op("MARK").op("MARK").str_("storage")
        a.global_("torch", "FloatStorage").raw(DAG_TUPLE).str_("cpu").int_(4).op("TUPLE").op("BINPERSID")
        a.int_(0).ints((4,)).ints((1,)).op("NEWFALSE").op("EMPTY_DICT").op("TUPLE").op("REDUCE")

    p = torch_zip(tmp_path / "m.pt", state_dict(("w", tensor)))
    with pytest.raises(InputError, match="malformed storage record"):
        statecli.open_checkpoint(p)


def test_a_long_key_that_names_no_tensor_is_fine(tmp_path: Path) -> None:
    from make_hostile import Asm, state_dict, torch_zip

    def model(a: Asm) -> None:
        a.op("EMPTY_DICT").str_("w").tensor().op("SETITEM").str_("k" * 100_000).int_(1).op("SETITEM")

    report = statecli.open_checkpoint(torch_zip(tmp_path / "m.pt", state_dict(("model", model))))
    assert [t.name for t in report.tensors] == ["w"]


def test_shared_references_past_the_first_hundred_are_counted(tmp_path: Path) -> None:
    from make_hostile import Asm, torch_zip

    a = Asm(2).op("EMPTY_DICT").op("MARK").str_("w0").op("EMPTY_LIST").tensor().op("APPEND").put(1)
    for i in range(1, 251):
        a.str_(f"w{i}").get(1)
    report = statecli.open_checkpoint(torch_zip(tmp_path / "m.pt", a.op("SETITEMS").op("STOP").getvalue()))
    shared = [f for f in report.findings if f.code == "shared-subtree"]
    assert len(shared) == 101
    assert shared[-1].message == "150 more shared-subtree findings not listed"


def test_trailing_bytes_that_are_no_pickle_stay_a_warning(tmp_path: Path) -> None:
    from make_hostile import state_dict, torch_zip

    p = torch_zip(tmp_path / "m.pt", state_dict(("w", lambda a: a.tensor())) + b"\x00garbage")
    report = statecli.open_checkpoint(p)
    trailing = [f for f in report.findings if f.code == "trailing-pickle-data"]
    assert trailing and "more pickle" not in trailing[0].message
    assert not [f for f in report.findings if f.level == "dangerous"]


def test_a_stored_member_whose_sizes_disagree_is_refused(tmp_path: Path) -> None:
    from make_hostile import state_dict, torch_zip

    p = torch_zip(tmp_path / "m.pt", state_dict(("w", lambda a: a.tensor())))
    data = bytearray(p.read_bytes())
    central = data.index(b"PK\x01\x02")  # data.pkl's entry: compressed size at +20
    size = struct.unpack_from("<I", data, central + 20)[0]
    struct.pack_into("<I", data, central + 20, size - 1)
    p.write_bytes(bytes(data))
    with pytest.raises(InputError, match="stored with"):
        statecli.open_checkpoint(p)


def test_deflated_members_within_the_ratio_are_read(tmp_path: Path) -> None:
    from make_hostile import _info, state_dict

    p = tmp_path / "m.pt"
    with zipfile.ZipFile(p, "w") as z:
        # torch never deflates, but torch.load reads a deflated data.pkl (a re-zipped .pt): so does statecli.
        z.writestr(_info("archive/data.pkl", zipfile.ZIP_DEFLATED), state_dict(("w", lambda a: a.tensor())))
        z.writestr(_info("archive/data/0"), bytes(16))
    assert [t.name for t in statecli.open_checkpoint(p).tensors] == ["w"]


def test_reading_a_small_index_allocates_little(tmp_path: Path) -> None:
    import tracemalloc

    from statecli.formats.sharded import _load_index

    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    tracemalloc.start()
    try:
        _load_index(str(tmp_path / "model.safetensors.index.json"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes to read a 20-byte index"


def test_an_index_that_names_an_index_is_refused_not_recursed(tmp_path: Path) -> None:
    (tmp_path / "a.index.json").write_text('{"weight_map": {"w": "b.index.json"}}')
    (tmp_path / "b.index.json").write_text('{"weight_map": {"w": "a.index.json"}}')
    with pytest.raises(InputError, match="names another index") as info:
        statecli.open_checkpoint(tmp_path / "a.index.json")
    assert not isinstance(info.value, UnsafeError)
    assert info.value.path == str(tmp_path / "a.index.json")
