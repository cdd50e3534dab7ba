"""Run statecli's commands on hostile inputs inside an audited, memory-capped process; print JSON lines.

    python tests/hostile/run_case.py WARM_DIR JOBS.json

``JOBS.json`` lists ``{"name", "path", "cwd"}`` objects. ``WARM_DIR`` receives benign files of every
format (see :func:`write_warmups`); each command is run on them first, so every module statecli loads
lazily is in memory before the audit hook goes in. Then, for each job, in its own (empty) working
folder, ``inspect``, ``inspect -f json`` and ``check`` run on its path, with a :func:`sys.addaudithook`
hook recording every event that means code ran, a module was imported, or something was written. Each
command runs under a SIGALRM timer, and each job's peak RSS is measured from its start (the kernel's
peak counter is reset per job); the whole process runs under an address-space cap, so a memory bomb ends
in a MemoryError here, not in the machine's OOM killer. Prints one JSON line per job: per command its
exit code, stdout, stderr and seconds; the audit events; the growth of peak RSS.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
from pathlib import Path

ADDRESS_SPACE_CAP = 3 << 30  # bytes of virtual memory the whole process may map
# Each command is stopped (SIGALRM) after this many seconds and the rest are skipped; a hang inside one C
# call (no signal is handled there) is left to the caller's timeout.
SECONDS = float(os.environ.get("STATECLI_HOSTILE_SECONDS", "5"))

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
# Imports that may legitimately happen late: text codecs (cp437 zip names) and statecli's own modules.
ALLOWED_IMPORTS = ("encodings.", "statecli.")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


sys.path.insert(0, str(Path(__file__).resolve().parent))


def write_warmups(folder: Path) -> list[Path]:
    """Benign files of every format statecli reads, and one it refuses; returns the paths."""
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
    # The other formats' readers (DCP, TorchScript, legacy, .pt2) define dataclasses, compiled on import.
    samples = Path(__file__).resolve().parents[2] / "sample_models"
    others = [samples / n for n in ("dcp_training", "torchscript_cnn.pt", "legacy_cnn.pt", "export_frozen.pt2")]
    paths = [pt, st, shards, bad, folder / "missing.pt", *others]
    # Case modules may add benign files of the formats their cases reach (a .pt2, a TorchScript archive).
    for name, module in sorted(sys.modules.items()):
        if name.startswith("cases_") and hasattr(module, "warmups"):
            paths += module.warmups(folder)
    return paths


def _cap_memory() -> None:
    try:
        import resource
    except ImportError:  # not on Windows
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = ADDRESS_SPACE_CAP if hard == resource.RLIM_INFINITY else min(ADDRESS_SPACE_CAP, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


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


def _reset_peak_rss() -> int:
    """Reset the process's peak RSS to its current RSS (Linux: ``5`` into clear_refs); return the new base.

    Where that is not possible the peak stays the highest since start, so a case's growth is measured
    against the warm-up's peak (never an overstatement)."""
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


COMMANDS = (("inspect",), ("inspect", "-f", "json"), ("check",))


def main(argv: list[str]) -> int:
    warm_dir, jobs = Path(argv[0]), json.loads(Path(argv[1]).read_text())
    _cap_memory()
    os.environ["NO_COLOR"] = "1"
    os.environ["COLUMNS"] = "200"
    from typer.testing import CliRunner

    from statecli.cli.main import app

    runner = CliRunner()
    for path in write_warmups(warm_dir):
        for cmd in COMMANDS:
            runner.invoke(app, [*cmd, str(path)])

    events: list[list[str]] = []
    measuring: list[bool] = []

    def hook(event: str, args: tuple) -> None:  # type: ignore[type-arg]
        if event == "open":
            path, mode, flags = (*args, None, None, None)[:3]
            if path == _CLEAR_REFS and measuring:
                return  # the runner's own reset of the peak-RSS counter
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
        if event.startswith(RUN_EVENTS):
            events.append([event, repr(args)[:200]])

    overtime: list[bool] = []

    def alarm(signum: int, frame: object) -> None:
        overtime.append(True)
        raise TimeoutError(f"still running after {SECONDS} s")

    use_alarm = hasattr(signal, "setitimer")
    if use_alarm:
        signal.signal(signal.SIGALRM, alarm)
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
        events.clear()
        overtime.clear()
        results = []
        measuring.append(True)
        base = _reset_peak_rss()
        measuring.clear()
        for cmd in COMMANDS:
            if overtime:
                break
            t0 = time.perf_counter()
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, SECONDS)
            try:
                r = runner.invoke(app, [*cmd, job["path"]])
            finally:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                seconds = time.perf_counter() - t0
            exc = None
            if r.exception is not None and not isinstance(r.exception, SystemExit):
                exc = f"{type(r.exception).__name__}: {str(r.exception)[:300]}"
            results.append(
                {
                    "command": list(cmd),
                    "exit_code": r.exit_code,
                    "stdout": r.stdout[:200_000],
                    "report": _summary(r.stdout) if "json" in cmd and r.exit_code == 0 else None,
                    "stdout_len": len(r.stdout),
                    "stderr": r.stderr[:20_000],
                    "seconds": seconds,
                    "timed_out": bool(overtime),
                    "exception": exc,
                }
            )
            # Its exc_info reaches the failed parse's frames, in reference cycles: free them before the next.
            del r
            gc.collect()
        growth = _peak_rss_kib() - base
        out = {"name": job["name"], "results": results, "events": list(events), "rss_growth_kib": growth}
        sys.__stdout__.write(json.dumps(out) + "\n")
        sys.__stdout__.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
