"""What a pickle *would* import or call, turned into findings. Classification is by name only."""

from __future__ import annotations

from typing import Any

from statecli.records import Finding
from statecli.safepickle import ALLOWED_NAMES, COMPUTED, Global, describe, describe_name, printable

# Modules whose every member can run code, touch files or the network, or load more pickles.
DANGEROUS_MODULES = (
    "os",
    "posix",
    "nt",
    "posixpath",
    "ntpath",
    "subprocess",
    "sys",
    "runpy",
    "importlib",
    "pickle",
    "_pickle",
    "cPickle",
    "dill",
    "marshal",
    "shutil",
    "socket",
    "ctypes",
    "code",
    "codeop",
    "pty",
    "multiprocessing",
    "webbrowser",
    "asyncio",
    "threading",
    "_thread",
    "signal",
    "tempfile",
    "pathlib",
    "io",
    "_io",
    "urllib",
    "http",
    "requests",
    "ftplib",
    "smtplib",
    "telnetlib",
    "types",
    "operator",
    "functools",
    "inspect",
    "pdb",
    "bdb",
    "timeit",
    "zipimport",
    "pkgutil",
    "site",
    "gc",
    "weakref",
    "builtins.__import__",
    "torch.hub",
    "torch.jit",
    "torch.package",
    "torch.serialization",
    "torch._C",
    "numpy.load",
    "numpy.lib.npyio",
)
# builtins that call, import, open, or reach into attributes.
DANGEROUS_BUILTINS = frozenset(
    {
        "eval",
        "exec",
        "compile",
        "getattr",
        "setattr",
        "delattr",
        "__import__",
        "open",
        "input",
        "breakpoint",
        "globals",
        "locals",
        "vars",
        "help",
        "memoryview",
        "exit",
        "quit",
        "apply",
        "execfile",
        "reload",
        "file",
    }
)
DANGEROUS_NAMES = frozenset({("torch", "load"), ("torch", "save"), ("numpy", "load")})
# Classes a whole-module pickle names by design; they are reported as information.
INFO_PREFIXES = ("torch.nn.", "torch.ao.", "torch.optim.", "numpy.", "collections.", "torch.")


def classify(module: str, name: str) -> str:
    """``allowed``, ``dangerous``, ``info`` (torch / numpy names) or ``unknown`` for one global."""
    if (module, name) in ALLOWED_NAMES:
        return "allowed"
    if module == COMPUTED:
        return "dangerous"  # a name computed at load time: it could be anything
    root = name.split(".", 1)[0]
    if module in ("builtins", "__builtin__") and root in DANGEROUS_BUILTINS:
        return "dangerous"
    full = f"{module}.{name}"
    if (module, root) in DANGEROUS_NAMES:
        return "dangerous"
    for m in DANGEROUS_MODULES:
        if module == m or module.startswith(m + ".") or full == m or full.startswith(m + "."):
            return "dangerous"
    if "." in name:
        # A dotted attribute path (``eval.__call__``) reaches through objects: pickle would getattr it.
        return "dangerous"
    if module == "builtins":
        return "unknown"
    if full.startswith(INFO_PREFIXES):
        return "info"
    return "unknown"


def _call_args(args: Any) -> str:
    """What a call would be given, as the call writes it (``('touch /tmp/x')``); each value bounded by
    :func:`describe`."""
    if not isinstance(args, tuple):
        return f"({describe(args, 1)})"
    inner = ", ".join(describe(x, 1) for x in args[:4])
    return f"({inner}{', …' if len(args) > 4 else ''})"


def findings_for(globals_seen: dict[tuple[str, str], int], calls: list[tuple[Global, Any]]) -> list[Finding]:
    """One finding per global outside the allowlist; dangerous ones first, naming what would run."""
    called: dict[tuple[str, str], str] = {}
    for g, args in calls:
        key = (g.module, g.name)
        if key not in called:
            called[key] = f"{g.qualname}{_call_args(args)}"
    out: list[Finding] = []
    for (module, name), count in globals_seen.items():
        kind = classify(module, name)
        if kind == "allowed":
            continue
        what = called.get((module, name))
        if what is not None:
            what = printable(what)
        qual = describe_name(f"{module}.{name}")
        times = f" ({count}×)" if count > 1 else ""
        if module == COMPUTED:
            call = f" and would call it with {what[len(COMPUTED) + 1 + len(name) :]}" if what else ""
            msg = (
                f"pickle computes the name of a global at load time ({name}){call}{times}; statecli cannot "
                "tell what it would import, and did not run it"
            )
            out.append(Finding("dangerous", "computed-global", msg))
        elif kind == "dangerous":
            action = f"would call {what}" if what else f"names {qual}"
            msg = f"pickle {action}{times}; statecli did not run it"
            out.append(Finding("dangerous", "dangerous-global", msg))
        elif kind == "unknown":
            msg = f"pickle names {qual}{times}, outside statecli's allowlist; read as an inert stub"
            out.append(Finding("warning", "unknown-global", msg))
        else:
            msg = f"pickle names {qual}{times}; read as an inert stub"
            out.append(Finding("info", "global", msg))
    # BUILD on a global (setting attributes on a module-level object) is recorded as a call.
    built = {(g.module, g.name) for g, _ in calls if g.name.endswith(".__setstate__")}
    for module, name in sorted(built):
        msg = f"pickle would set state on the global {describe_name(module + '.' + name[: -len('.__setstate__')])}"
        out.append(Finding("dangerous", "build-on-global", msg))
    order = {"dangerous": 0, "warning": 1, "info": 2}
    out.sort(key=lambda f: order.get(f.level, 3))
    return out
