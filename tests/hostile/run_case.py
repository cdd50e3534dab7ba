"""Run every statecli command that reads a file on hostile inputs, audited and bounded; print JSON lines.

    python tests/hostile/run_case.py WARM_DIR JOBS.json

``JOBS.json`` lists ``{"name", "path", "cwd", "scratch"}`` objects. ``WARM_DIR`` receives benign files of
every format (see :func:`write_warmups`); every command is run on them (and on the sample checkpoints)
first, so every module statecli and torch load lazily is in memory before the audit hook goes in. Then,
for each job, in its own (empty) working folder, each of :data:`COMMANDS` runs on its path: ``inspect``,
``inspect -f json``, ``check``, ``tree``, ``schema``, ``stats``, ``diff X X``, ``convert X -o
<scratch>/out.safetensors`` (``scratch``: an empty folder outside the working folder) and the Python
API's ``statecli.load(X)``.

What is recorded, per command: exit code, stdout, stderr, seconds, the growth of peak RSS over the RSS
before it (the kernel's peak counter is reset before each command), its wall-clock and CPU seconds,
whether its timer fired; for
``convert``, what its scratch folder holds afterwards and whether statecli reads the output back. Per
job: the audit events (a :func:`sys.addaudithook` hook) that mean code ran, a module was imported, or
something was written. ``convert`` may write, and only into its scratch folder, only from statecli's
conversion code; everything else may write nothing. The harness's own housekeeping (resetting the peak
counter, emptying the scratch folder) is not audited.

Limits: each command runs under a SIGALRM timer (``STATECLI_HOSTILE_SECONDS`` of wall-clock time, a
backstop; its CPU time, all threads, is recorded for the limit the tests hold it to); before each command
the process's address space is capped at what it then maps plus :data:`ADDRESS_SPACE_HEADROOM` (the
issue's 1 GB, per command), so a memory bomb in any command ends in a MemoryError here, not in the
machine's OOM killer. A hang inside one C call (no signal is handled there) is left to the caller's
timeout.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

ADDRESS_SPACE_HEADROOM = 1 << 30  # bytes of address space a command may map beyond the warmed-up process
# Each command is stopped (SIGALRM) after this many seconds of wall-clock time. The limit a command is
# held to is on its CPU time (tests/test_hostile.py): on a shared machine the wall clock measures the
# neighbours too, so the timer is a backstop for a command that blocks or spins, well past the limit.
SECONDS = float(os.environ.get("STATECLI_HOSTILE_SECONDS", "20"))
REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "sample_models"

# Events that mean a payload ran, code was compiled or loaded, or the outside world was touched.
RUN_EVENTS = (
    "os.system",
    "os.exec",
    "os.spawn",
    "os.posix_spawn",
    "os.fork",
    "os.startfile",
    "os.kill",
    "os.putenv",
    "os.unsetenv",
    "subprocess.",
    "exec",
    "compile",
    "builtins.input",
    "code.",
    "pickle.",
    "marshal.",
    "ctypes.",
    "socket.",
    "urllib.",
    "http.",
    "webbrowser.",
    "shutil.",
    "tempfile.",
    "os.remove",
    "os.unlink",
    "os.rename",
    "os.replace",
    "os.rmdir",
    "os.mkdir",
    "os.symlink",
    "os.link",
    "os.chmod",
    "os.chown",
    "os.truncate",
    "os.utime",
    "import",
)
# Events that write, allowed to convert alone (see _convert_writes).
WRITE_EVENTS = (
    "open",
    "tempfile.mkstemp",
    "os.remove",
    "os.unlink",
    "os.rename",
    "os.replace",
    "os.rmdir",
    "os.mkdir",
    "os.link",
    "os.chmod",
)
# Imports that may legitimately happen late: text codecs (cp437 zip names) and statecli's own modules.
ALLOWED_IMPORTS = ("encodings.", "statecli.")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

# (name, arguments before the path, arguments after it). "load" is the Python API, not a command.
COMMANDS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("inspect", ("inspect",), ()),
    ("inspect-json", ("inspect", "-f", "json"), ()),
    ("check", ("check",), ()),
    ("tree", ("tree",), ()),
    ("schema", ("schema",), ()),
    ("stats", ("stats",), ()),
    ("diff", ("diff",), ("{path}",)),
    ("convert", ("convert",), ("-o", "{scratch}/out.safetensors", "--quiet")),
    ("load", (), ()),
)


def write_warmups(folder: Path) -> list[Path]:
    """Benign files of every format statecli reads, and one it refuses; returns them with the samples."""
    from make_hostile import _st_entry, safetensors_file, state_dict, torch_zip

    folder.mkdir(parents=True, exist_ok=True)
    pt = torch_zip(folder / "good.pt", state_dict(("weight", lambda a: a.tensor())))
    st = safetensors_file(folder / "good.safetensors", {"w": _st_entry("F32", [1], 0, 4)}, bytes(4))
    shards = folder / "sharded"
    shards.mkdir(exist_ok=True)
    safetensors_file(shards / "s1.safetensors", {"w": _st_entry("F32", [1], 0, 4)}, bytes(4))
    (shards / "model.safetensors.index.json").write_text('{"weight_map": {"w": "s1.safetensors"}}')
    bad = folder / "bad.pt"
    bad.write_bytes(b"\x00not a checkpoint")
    samples = [
        SAMPLES / n
        for n in (
            "all_dtypes.pt",
            "cnn_bn_module.pt",
            "training_adam.pt",
            "legacy_cnn.pt",
            "torchscript_cnn.pt",
            "export_frozen.pt2",
            "export_tied_lm.pt2",
            "dcp_training",
            "sharded",
            "transformer_buffers.safetensors",
        )
    ]
    paths = [pt, st, shards, bad, folder / "missing.pt", *(p for p in samples if p.exists())]
    # Case modules may add benign files of the formats their cases reach (a .pt2, a TorchScript archive).
    for name, module in sorted(sys.modules.items()):
        if name.startswith("cases_") and hasattr(module, "warmups"):
            paths += module.warmups(folder)
    return paths


_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _cap_memory() -> int | None:
    """Cap the address space at what is mapped now plus the headroom; returns the cap (None: not capped)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    vm = _status_kib("VmSize")
    if vm is None:
        return None
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm * 1024 + ADDRESS_SPACE_HEADROOM
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    return cap


def _reset_peak_rss() -> int:
    """Reset the process's peak RSS to its current RSS (Linux: ``5`` into clear_refs); return the new base.

    Where that is not possible the peak stays the highest since start, so a command's growth is measured
    against an earlier peak (never an overstatement)."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return _peak_rss_kib()
    rss = _status_kib("VmRSS")
    return rss if rss is not None else _peak_rss_kib()


def _peak_rss_kib() -> int:
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS


def _summary(stdout: str) -> dict[str, object] | None:
    """What the tests need of a JSON report (its findings, how many tensors), however long the report is."""
    try:
        doc = json.loads(stdout)
    except ValueError:
        return None
    return {"findings": doc.get("findings"), "tensor_count": len(doc.get("tensors") or ())}


def _from_import() -> bool:
    """Whether the running event happens inside the import system (reading and running a module's code)."""
    f = sys._getframe(1)
    for _ in range(12):
        if f is None:
            return False
        if f.f_code.co_filename.startswith("<frozen importlib"):
            return True
        f = f.f_back
    return False


_ANNOTATION_FUNCS = ("get_annotations", "<dictcomp>", "_evaluate", "__init__", "get_type_hints")


def _from_annotations() -> bool:
    """Whether the running compile/exec evaluates an annotation string: typer reads each command's
    signature with ``inspect.get_annotations(eval_str=True)`` (or ``typing.get_type_hints``) per call."""
    f = sys._getframe(1)
    for _ in range(4):
        if f is None:
            return False
        code = f.f_code
        if code.co_filename.endswith(("inspect.py", "typing.py")) and code.co_name in _ANNOTATION_FUNCS:
            return True
        f = f.f_back
    return False


def _caller_in(parts: tuple[str, ...]) -> bool:
    """Whether the nearest frame of statecli's package above the hook (past the stdlib's own wrappers,
    such as tempfile's) is in one of its files named by ``parts`` (``formats/atomic.py``, ...)."""
    f = sys._getframe(2)
    for _ in range(8):
        if f is None:
            return False
        name = f.f_code.co_filename
        if name.startswith(_PACKAGE):
            return name.replace(os.sep, "/").endswith(parts)
        f = f.f_back
    return False


_PACKAGE = ""  # statecli's folder, with a trailing separator: set in main()


def _inside(path: Any, folder: str) -> bool:
    """A path argument of a write event that stays in ``folder``: under it, a name relative to a folder
    descriptor opened on it (``os.link(..., dst_dir_fd=...)``), a descriptor, or the /proc name of one."""
    if isinstance(path, int) or path is None:
        return True
    text = os.fsdecode(path) if isinstance(path, (str, bytes)) else str(path)
    if text.startswith("/proc/self/fd/"):
        return True
    if not os.path.isabs(text):
        return "/" not in text and text not in ("..", ".")
    return os.path.commonpath([os.path.abspath(text), folder]) == folder


def main(argv: list[str]) -> int:
    warm_dir, jobs = Path(argv[0]), json.loads(Path(argv[1]).read_text())
    os.environ["NO_COLOR"] = "1"
    os.environ["COLUMNS"] = "200"
    from typer.testing import CliRunner

    import statecli
    from statecli.cli.main import app
    from statecli.errors import StatecliError

    global _PACKAGE
    _PACKAGE = os.path.dirname(os.path.abspath(statecli.__file__)) + os.sep

    runner = CliRunner()
    scratch_now: list[str] = [""]

    def run(cmd: tuple[str, tuple[str, ...], tuple[str, ...]], path: str, scratch: str) -> dict[str, Any]:
        name, before, after = cmd
        if name == "load":
            try:
                statecli.load(path)
            except StatecliError as e:
                return {"exit_code": e.exit_code, "stdout": "", "stderr": f"statecli: error: {e}\n", "exception": None}
            except Exception as e:  # anything else is the bug being looked for
                return {"exit_code": None, "stdout": "", "stderr": "", "exception": f"{type(e).__name__}: {e}"[:300]}
            return {"exit_code": 0, "stdout": "", "stderr": "", "exception": None}
        args = [*before, path, *(a.format(path=path, scratch=scratch) for a in after)]
        r = runner.invoke(app, args)
        exc = None
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            exc = f"{type(r.exception).__name__}: {str(r.exception)[:300]}"
        out = {"exit_code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr, "exception": exc}
        # Its exc_info reaches the failed parse's frames, in reference cycles: free them before the next.
        del r
        return out

    warm_scratch = warm_dir / "scratch"
    for path in write_warmups(warm_dir):
        for cmd in COMMANDS:
            warm_scratch.mkdir(parents=True, exist_ok=True)
            run(cmd, str(path), str(warm_scratch))
            shutil.rmtree(warm_scratch, ignore_errors=True)
    gc.collect()
    gc.freeze()  # torch's objects and the rest of the warm-up: the collections after each command skip them

    events: list[list[str]] = []
    housekeeping: list[bool] = []
    converting: list[bool] = []

    def hook(event: str, args: tuple) -> None:  # type: ignore[type-arg]
        if housekeeping:
            return  # the runner's own reset of the peak-RSS counter and emptying of the scratch folder
        if converting and event.startswith(WRITE_EVENTS) and _convert_writes(event, args):
            return
        if event == "open":
            path, mode, flags = (*args, None, None, None)[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            if writing:
                events.append([event, repr(path)[:200]])
            return
        if event == "import":
            name = str(args[0])
            if not name.startswith(ALLOWED_IMPORTS):
                events.append([event, name])
            return
        if event in ("exec", "compile") and _from_annotations():
            return  # typer evaluates the commands' string annotations with eval() on every call
        if event in ("exec", "marshal.loads") and _from_import():
            return  # loading a module's code: the "import" event above already judged the import
        if event == "ctypes.cdata" and _caller_in(("tensors/source.py",)):
            return  # source.byte_view: a memoryview over a tensor statecli itself allocated
        if event.startswith(RUN_EVENTS):
            events.append([event, repr(args)[:200]])

    def _convert_writes(event: str, args: tuple) -> bool:  # type: ignore[type-arg]
        """A write by convert's own code (atomic.py, execute.py) whose paths stay in its scratch folder."""
        if not _caller_in(("formats/atomic.py", "conversion/execute.py", "formats/zipwriter.py")):
            return False
        paths = args[:2] if event in ("os.link", "os.rename", "os.replace") else args[:1]
        return all(_inside(p, scratch_now[0]) for p in paths)

    overtime: list[bool] = []

    def alarm(signum: int, frame: object) -> None:
        overtime.append(True)
        raise TimeoutError(f"still running after {SECONDS} s")

    use_alarm = hasattr(signal, "setitimer")
    if use_alarm:
        signal.signal(signal.SIGALRM, alarm)
    _cap_memory()  # the control below, and anything between the commands
    sys.addaudithook(hook)
    if os.environ.get("STATECLI_HOSTILE_CONTROL"):
        # The positive control (tests/test_hostile.py): what the hook records when a payload does run.
        import pickle

        from make_hostile import PAYLOAD, Asm

        os.chdir(jobs[0]["cwd"])
        pickle.loads(Asm(2).call("os", "system", lambda a: a.str_(PAYLOAD)).op("STOP").getvalue())
        sys.__stdout__.write(json.dumps({"name": "<control>", "events": list(events)}) + "\n")

    for job in jobs:
        os.chdir(job["cwd"])
        scratch_now[0] = os.path.abspath(job["scratch"])
        events.clear()
        overtime.clear()
        results = []
        for cmd in COMMANDS:
            if overtime:
                break
            housekeeping.append(True)
            cap = _cap_memory()  # from what is mapped now: memory an earlier command left mapped is not charged
            base = _reset_peak_rss()
            housekeeping.clear()
            if cmd[0] == "convert":
                converting.append(True)
            t0 = time.perf_counter()
            c0 = time.process_time()
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, SECONDS)
            try:
                r = run(cmd, job["path"], job["scratch"])
            except TimeoutError as e:  # the timer fired outside the runner's own exception handling
                r = {"exit_code": None, "stdout": "", "stderr": "", "exception": f"TimeoutError: {e}"}
            finally:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                seconds = time.perf_counter() - t0
                cpu = time.process_time() - c0
                converting.clear()
            growth = _peak_rss_kib() - base
            record = {
                "command": cmd[0],
                "exit_code": r["exit_code"],
                "stdout": r["stdout"][:200_000],
                "report": _summary(r["stdout"]) if cmd[0] == "inspect-json" and r["exit_code"] == 0 else None,
                "stdout_len": len(r["stdout"]),
                "stderr": r["stderr"][:20_000],
                "seconds": seconds,
                "cpu_seconds": cpu,
                "timed_out": bool(overtime),
                "exception": r["exception"],
                "rss_growth_kib": growth,
                "address_space_cap": cap,
            }
            if cmd[0] == "convert":
                housekeeping.append(True)
                left = sorted(os.listdir(job["scratch"]))
                record["scratch_after"] = left
                if r["exit_code"] == 0:
                    try:
                        back = statecli.open_checkpoint(os.path.join(job["scratch"], "out.safetensors"))
                        record["read_back"] = len(back.tensors)
                    except Exception as e:
                        record["read_back"] = f"{type(e).__name__}: {e}"[:300]
                for n in left:
                    p = os.path.join(job["scratch"], n)
                    shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
                housekeeping.clear()
            results.append(record)
            del r
            gc.collect()
        out = {"name": job["name"], "results": results, "events": list(events)}
        sys.__stdout__.write(json.dumps(out) + "\n")
        sys.__stdout__.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
