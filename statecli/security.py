"""What a pickle would do under ``torch.load(weights_only=False)``, judged against an allow list.

The restricted reader (:mod:`statecli.safepickle`) records every call, instantiation and BUILD the pickle
asks for as an :class:`~statecli.pickled.Action`, and every global it names. Here each becomes a
finding, by what it would *do*:

- a **call** (REDUCE, INST, OBJ) of a global is ``dangerous`` unless the global is on
  :data:`INERT_CALLABLES` (modelled on torch's own ``weights_only`` allow list: tensor rebuilds,
  ``OrderedDict``, ``set``, dtypes, ...). No module prefix is trusted: ``torch.`` holds helpers that shell
  out (``torch.utils.collect_env.run``) or ``exec`` source (``torch.fx``);
- a call on a **value** the pickle built (the result of an earlier call) is ``dangerous``: nothing says
  what that value is;
- an **instantiation** (NEWOBJ, ``copyreg._reconstructor``) of a class runs that class's ``__new__`` and,
  through BUILD, its ``__setstate__``. A class on :data:`INERT_CLASSES` (torch's module classes, its
  hooks, optimizers, DCP metadata; see tests/allowlist/make_allowlist.py) is information. Any other class
  of the standard library, torch or numpy is ``dangerous``: those namespaces are where gadget catalogues
  find classes whose ``__setstate__`` or ``__del__`` run commands or delete files. A class of any other
  package is the checkpoint's own code (``torch.save(model)`` pickles the model's class this way): an
  ``unknown-global`` warning, since torch.load would import and run that package and statecli cannot
  judge it (``check --strict-globals`` fails on it);
- **BUILD on a global** (setting attributes of a module, class or function) is ``dangerous``: every
  name looked up after it may have been replaced (the overwritten-module attack), so statecli trusts none;
- BUILD that sets special attributes (``__class__``, ``__setstate__``) is ``dangerous``;
- a global only *named* (passed as data) of the standard library, torch, numpy or torch's own
  dependencies is ``dangerous`` unless it is on the allow lists (or is data: dtypes, storage types,
  activation functions a module keeps). A name is one step from a call: pickle's APPEND calls an
  ``append`` the pickle stored on an inert ``Namespace``, ``dict()`` calls a stored ``keys``, torch's
  ``_set_obj_state`` a stored ``items``, numpy's RNG constructor its second argument; a named function is
  what such a gadget calls. A name of any other package is an ``unknown-global`` warning (the model's own
  code, which statecli cannot judge).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from statecli._torch_classes import TORCH_CLASSES
from statecli.clip import describe_name, printable
from statecli.errors import InputError, UnsafeError
from statecli.pickled import COMPUTED, Action, Global
from statecli.records import Finding
from statecli.safepickle import (
    ALLOWED_NAMES,
    HANDLERS,
    TORCH_FUNCTIONS,
    Limits,
    RestrictedUnpickler,
    names_after,
)


def _names(*qualnames: str) -> frozenset[tuple[str, str]]:
    return frozenset(tuple(q.rsplit(".", 1)) for q in qualnames)  # type: ignore[misc]


_PATHS = [f"{m}.{c}" for m in ("pathlib", "pathlib._local") for c in ("Path", "PosixPath", "WindowsPath", "PurePath")]
_PATHS += [f"{m}.{c}" for m in ("pathlib", "pathlib._local") for c in ("PurePosixPath", "PureWindowsPath")]
_NUMPY = [
    f"{m}.{n}" for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")
] + ["numpy.dtype", "numpy.ndarray"]
_NUMPY_RNG = [f"numpy.random._pickle.{n}" for n in ("__randomstate_ctor", "__bit_generator_ctor", "__generator_ctor")]
_PLAIN_TYPES = [f"builtins.{n}" for n in ("object", "dict", "list", "tuple", "str", "int", "float", "bool")]
_PLAIN_TYPES += [f"builtins.{n}" for n in ("bytes", "bytearray", "set", "frozenset", "complex", "slice", "range")]

# Names that are data, seen only named in checkpoints torch writes, and inert if a gadget called them:
# numpy's scalar types (a config's dtype), the constants Ellipsis and NotImplemented, torch.nn.init's
# initialisers (they fill the tensor they are given), numpy's bit generators (seeded from the OS when called
# with nothing; numpy pickles a Generator by naming its bit generator's class).
_NUMPY_SCALARS = (
    "bool", "bool_", "bytes_", "clongdouble", "complex128", "complex64", "datetime64", "float16", "float32",
    "float64", "int16", "int32", "int64", "int8", "intc", "intp", "longdouble", "longlong", "object_", "str_",
    "timedelta64", "uint16", "uint32", "uint64", "uint8", "uintc", "uintp", "ulonglong", "void",
)  # fmt: skip
_INIT_FUNCTIONS = (
    "calculate_gain", "constant_", "dirac_", "eye_", "kaiming_normal_", "kaiming_uniform_", "normal_", "ones_",
    "orthogonal_", "sparse_", "trunc_normal_", "uniform_", "xavier_normal_", "xavier_uniform_", "zeros_",
)  # fmt: skip
_BIT_GENERATORS = [
    ("numpy.random._mt19937", "MT19937"),
    ("numpy.random._pcg64", "PCG64"),
    ("numpy.random._pcg64", "PCG64DXSM"),
    ("numpy.random._philox", "Philox"),
    ("numpy.random._sfc64", "SFC64"),
    ("numpy.random.bit_generator", "SeedSequence"),
]
_DATA_NAMES = frozenset(
    [("numpy", n) for n in _NUMPY_SCALARS]
    + [("builtins", "Ellipsis"), ("builtins", "NotImplemented")]
    + [("torch.nn.init", n) for n in _INIT_FUNCTIONS]
    + _BIT_GENERATORS
)

# Callables whose call only builds data (no code, no files, no network, no imports of other modules):
# torch's weights_only allow list, plus the plain values training checkpoints carry (dates, paths, numpy
# RNG state, hyper-parameter namespaces). statecli's own handlers (HANDLERS) are on it by construction.
INERT_CALLABLES: frozenset[tuple[str, str]] = frozenset(HANDLERS) | _names(
    "collections.OrderedDict",
    "collections.Counter",
    "collections.defaultdict",  # stores its factory; calls it only when a missing key is read
    "collections.deque",
    "functools.partial",  # stores a callable and arguments; calls nothing
    "torch._tensor._rebuild_from_type_v2",  # its parts are judged one by one (safepickle._from_type)
    "torch._utils._rebuild_parameter_with_state",
    "torch._utils._rebuild_nested_tensor",
    "torch._utils._rebuild_wrapper_subclass",
    "torch._utils._rebuild_device_tensor_from_numpy",
    "torch.torch_version.TorchVersion",
    "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING",
    "datetime.datetime",
    "datetime.date",
    "datetime.time",
    "datetime.timedelta",
    "datetime.timezone",
    "decimal.Decimal",
    "fractions.Fraction",
    "types.SimpleNamespace",
    "argparse.Namespace",
    "uuid.UUID",
    # A random.Random pickled whole: Random() seeds from the OS; BUILD calls its own __setstate__, which only
    # sets the Mersenne Twister state (the C type checks it).
    "random.Random",
    # A torch.Generator pickled whole: Generator(device) makes a generator; its C++ __setstate__ sets the
    # seed and state tensor.
    "torch._C.Generator",
    *_PATHS,
    *_NUMPY,
    *_NUMPY_RNG,
    *_PLAIN_TYPES,
    # numpy's RNG constructors call a bit generator class with no arguments: seeded from the OS.
    *(f"{m}.{n}" for m, n in _BIT_GENERATORS),
    # Cython's unpickler of a SeedSequence: SeedSequence.__new__ of the type it is given (numpy refuses any
    # type but a SeedSequence), then typed fields set from the state.
    "numpy.random.bit_generator.__pyx_unpickle_SeedSequence",
)
# Classes a pickle may make with NEWOBJ and BUILD: torch's (generated, reviewed) and plain Python values.
INERT_CLASSES: frozenset[tuple[str, str]] = (
    frozenset((module, name) for module, names in TORCH_CLASSES.items() for name in names) | INERT_CALLABLES
)
# Functions a model stores as data and calls only in forward (TransformerEncoderLayer keeps F.relu as its
# ``activation``): named, they are no warning. Called at load, they would be judged like any call.
_STORED_FUNCTIONS = frozenset(
    [
        ("torch.nn.functional", n)
        for n in (
            "relu", "relu6", "gelu", "silu", "mish", "tanh", "sigmoid", "elu", "selu", "celu", "leaky_relu",
            "hardswish", "hardsigmoid", "hardtanh", "softplus", "softsign", "softmax", "log_softmax", "glu",
            "logsigmoid", "tanhshrink", "prelu", "rrelu",
        )
    ]
    + [("torch.nn.functional", n) for n in ("softmin", "_threshold", "normalize")]
    # F.gelu, F.softplus, F.logsigmoid, F.softshrink are torch._C._nn's builtins, and pickle names them so.
    + [("torch._C._nn", n) for n in ("gelu", "softplus", "log_sigmoid", "softshrink")]
    # torch.relu and its kind pickle as getattr(torch._C._VariableFunctionsClass, name): see
    # safepickle's _torch_function, which names them so.
    + [("torch", n) for n in TORCH_FUNCTIONS]
)  # fmt: skip
# Namespaces whose classes statecli judges by the allow list: gadget catalogues (picklescan's advisories,
# the ShadowPickle paper) find their classes and functions here. A class elsewhere is the model's own code.
STRICT_ROOTS: frozenset[str] = frozenset(sys.stdlib_module_names) | {
    "__builtin__",
    "torch",
    "functorch",
    "numpy",
    "pip",
    "setuptools",
    "pkg_resources",
    "_distutils_hack",
    "wheel",
    # Installed wherever torch is (its requirements and theirs): a gadget catalogue can count on them.
    # sympy's Lambda(x, text) sympifies the text, which evals it.
    "sympy",
    "mpmath",
    "networkx",
    "jinja2",
    "markupsafe",
    "filelock",
    "fsspec",
    "typing_extensions",
    "triton",
}

# A global only named, not called, is still dangerous when it is a well-known way to run code: a second
# line of defence for values a later call (in user code) might make (``defaultdict(os.system)``).
_NAMED_DANGER_MODULES = (
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
    "inspect",
    "pdb",
    "bdb",
    "timeit",
    "zipimport",
    "pkgutil",
    "site",
    "gc",
    "weakref",
    "pydoc",
    "cProfile",
    "profile",
    "doctest",
    "idlelib",
    "ensurepip",
    "pip",
    "torch.hub",
    "torch.jit",
    "torch.package",
    "torch.serialization",
    "torch._C",
    "torch.utils.collect_env",
    "torch.fx",
    "numpy.load",
    "numpy.lib.npyio",
    "numpy.testing",
)
_NAMED_DANGER_BUILTINS = frozenset(
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
_NAMED_DANGER = frozenset({("torch", "load"), ("torch", "save"), ("numpy", "load")})


def classify(module: str, name: str) -> str:
    """How a global only *named* is reported: ``allowed`` (no finding), ``dangerous`` (a well-known way to
    run code, a computed name, a dotted path that reaches through attributes, or any other name of the
    standard library, torch, numpy or torch's dependencies), ``info`` (on the allow lists) or ``unknown``
    (a warning: another package's, the model's own code)."""
    if (module, name) in ALLOWED_NAMES or (module, name) in _STORED_FUNCTIONS or (module, name) in _DATA_NAMES:
        return "allowed"
    if module == COMPUTED:
        return "dangerous"  # a name computed at load time: it could be anything
    if (module, name) in INERT_CLASSES:
        return "info"
    root = name.split(".", 1)[0]
    if module in ("builtins", "__builtin__") and root in _NAMED_DANGER_BUILTINS:
        return "dangerous"
    if (module, root) in _NAMED_DANGER:
        return "dangerous"
    full = f"{module}.{name}"
    for m in _NAMED_DANGER_MODULES:
        if module == m or module.startswith(m + ".") or full == m or full.startswith(m + "."):
            return "dangerous"
    if "." in name:
        # A dotted attribute path (``eval.__call__``) reaches through objects: pickle would getattr it.
        return "dangerous"
    if _root(module) in STRICT_ROOTS:
        # Named is nearly called: inert classes call what they hold (see the module docstring), and these
        # namespaces hold the functions gadget catalogues call (logging.config.dictConfig imports and calls
        # any dotted name in its dict).
        return "dangerous"
    return "unknown"


def classify_named_only(module: str, name: str) -> bool:
    """True for a name that is dangerous only because it is in a strict namespace and off the allow lists
    (not a well-known way to run code): its finding says how a name alone becomes a call."""
    if module == COMPUTED or "." in name:
        return False
    if module in ("builtins", "__builtin__") and name in _NAMED_DANGER_BUILTINS:
        return False
    if (module, name) in _NAMED_DANGER:
        return False
    full = f"{module}.{name}"
    return not any(module == m or module.startswith(m + ".") or full.startswith(m + ".") for m in _NAMED_DANGER_MODULES)


def _root(module: str) -> str:
    return module.split(".", 1)[0]


def _times(count: int) -> str:
    return f" ({count}×)" if count > 1 else ""


def _judge(a: Action) -> Finding | None:
    """The finding for one action, or None when it is on the allow list and unremarkable."""
    target = a.target
    times = _times(a.count)
    args = printable(a.example)
    if a.kind == "call-on-value":
        return Finding(
            "dangerous",
            "call-on-value",
            f"pickle would call {printable(str(target))} with {args}{times}: a call on a value the pickle built, "
            "which no allow list can vouch for; statecli did not run it",
        )
    assert isinstance(target, Global)
    key = (target.module, target.name)
    qual = describe_name(target.qualname)
    if target.module == COMPUTED:
        return Finding(
            "dangerous",
            "computed-global",
            f"pickle computes the name of a global at load time ({describe_name(target.name)}) and would call it "
            f"with {args}{times}; statecli cannot tell what it would import, and did not run it",
        )
    if a.kind == "patch":
        return Finding(
            "dangerous",
            "build-on-global",
            f"pickle would set state on the global {qual} (BUILD with {args}){times}: it overwrites attributes of a "
            "module, class or function, so any name looked up after it may be the attacker's; statecli did not "
            "run it",
        )
    if a.kind == "mutate":
        return Finding(
            "dangerous",
            "mutate-global",
            f"pickle would change the global {qual} in place (SETITEM, APPEND or ADDITEMS of {args}){times}: a "
            "registry such as copyreg._inverted_registry or sys.modules decides what later names resolve to, so "
            "any name after it may be the attacker's; statecli did not run it",
        )
    if a.kind == "build":
        return Finding(
            "dangerous",
            "dangerous-state",
            f"pickle would set special attributes on a {qual} object (state {args}){times}: setting __class__, "
            "__setstate__ or a non-text attribute can turn data into code; statecli did not run it",
        )
    if a.kind == "call":
        if key in INERT_CALLABLES:
            if target.handler is None and key in HANDLERS:
                return Finding(
                    "dangerous",
                    "dangerous-global",
                    f"pickle would call {qual}{args}{times} after it set state on a global: the name may no longer "
                    "be torch's function; statecli did not run it",
                )
            return None
        return Finding(
            "dangerous",
            "dangerous-global",
            f"pickle would call {qual}{args}{times}; statecli did not run it",
        )
    # An instantiation: cls.__new__, then (with BUILD) __setstate__, (with SETITEMS/APPENDS) __setitem__/extend.
    runs = ["__new__"] + (["__setstate__"] if a.setstate else []) + (["__setitem__/extend"] if a.fills else [])
    if key in INERT_CLASSES:
        return Finding("info", "global", f"pickle makes {qual}{times}, an allow-listed class; read as an inert stub")
    if _root(target.module) in STRICT_ROOTS or "." in target.name:
        return Finding(
            "dangerous",
            "dangerous-global",
            f"pickle would make a {qual}{times} and run its {', '.join(runs)}: a class outside statecli's allow "
            "list of inert classes, in a namespace where such classes can run commands or touch files; statecli "
            "did not run it",
        )
    return Finding(
        "warning",
        "unknown-global",
        f"pickle makes {qual}{times}: torch.load would import {describe_name(_root(target.module))} and run its "
        f"{', '.join(runs)}; read as an inert stub",
    )


def findings_for(globals_seen: Mapping[tuple[str, str], int], actions: Iterable[Action]) -> list[Finding]:
    """The findings for one pickle (or several): each action judged, then each global only named; dangerous
    ones first."""
    out: list[Finding] = []
    acted: set[tuple[str, str]] = set()
    for a in actions:
        finding = _judge(a)
        if finding is not None:
            out.append(finding)
        if isinstance(a.target, Global):
            acted.add((a.target.module, a.target.name))
    for (module, name), count in globals_seen.items():
        if (module, name) in acted:
            continue
        kind = classify(module, name)
        if kind == "allowed" or (kind == "info" and (module, name) in INERT_CALLABLES):
            continue
        qual = describe_name(f"{module}.{name}")
        times = _times(count)
        if module == COMPUTED:
            msg = (
                f"pickle computes the name of a global at load time ({describe_name(name)}){times}; statecli cannot "
                "tell what it would import, and did not run it"
            )
            out.append(Finding("dangerous", "computed-global", msg))
        elif kind == "dangerous":
            msg = f"pickle names {qual}{times}"
            if classify_named_only(module, name):
                msg += (
                    ", a function or class outside statecli's allow lists: the objects a pickle makes at load can "
                    "call what they hold (pickle's APPEND calls a stored `append`, dict() a stored `keys`)"
                )
            out.append(Finding("dangerous", "dangerous-global", f"{msg}; statecli did not run it"))
        elif kind == "info":
            out.append(Finding("info", "global", f"pickle names {qual}{times}; read as an inert stub"))
        else:
            msg = f"pickle names {qual}{times}, outside statecli's allow list; read as an inert stub"
            out.append(Finding("warning", "unknown-global", msg))
    order = {"dangerous": 0, "warning": 1, "info": 2}
    out.sort(key=lambda f: order.get(f.level, 3))
    return out


def refuse_if_dangerous(
    globals_seen: Mapping[tuple[str, str], int],
    actions: Iterable[Action],
    error: Any,
    later: Mapping[tuple[str, str], int] | None = None,
) -> None:
    """Raise :class:`UnsafeError` when a pickle that failed to parse (``error``) would already have done
    something dangerous before the failure: under torch.load the payload runs and only then does the load
    fail, so "corrupt" would hide an exploit. Only what would have *run* counts: a name alone imports a
    module, and a corrupt byte often turns a name into a dotted or odd one. Once the pickle has made or called
    anything, though, a dangerous name counts too: what it made may have called the named function before
    the failure (torch's ``_rebuild_parameter`` calls ``data.detach()``, a stored function, then fails).

    ``later``: the globals named after the point where statecli gave up, where an opcode could still call
    them (:func:`statecli.safepickle.names_after`); real pickle may not give up there (statecli's limits are
    its own), so a dangerous one among them counts too."""
    actions = list(actions)
    dangerous = [f.message for f in findings_for(globals_seen if actions else {}, actions) if f.level == "dangerous"]
    if later:
        dangerous += [
            f"past where statecli stopped reading (real pickle reads on), {f.message}"
            for f in findings_for(later, [])
            if f.level == "dangerous"
        ]
    if not dangerous:
        return
    more = f" (and {len(dangerous) - 1} more)" if len(dangerous) > 1 else ""
    reason = error.message if isinstance(error, InputError) else str(error)
    raise UnsafeError(f"{dangerous[0]}{more}; then the pickle fails ({reason})") from error


def loads(
    data: bytes,
    persistent_load: Callable[[Any], Any] | None = None,
    limits: Limits | None = None,
    fast_paths: bool = True,
    start: int = 0,
) -> tuple[Any, RestrictedUnpickler]:
    """Parse ``data`` from byte ``start`` with the restricted reader (a pickle stacked after another:
    ``start`` is the first's ``end``); returns the object and the unpickler (for ``globals_seen``,
    ``actions`` and ``end``). Every reader parses its pickles through this function.

    A pickle that fails after asking for something dangerous raises :class:`~statecli.errors.UnsafeError`
    (exit 5), not the parse error: torch.load would have run the payload before failing.

    ``fast_paths=False`` runs every opcode through the general loop (the tests compare both).
    """
    u = RestrictedUnpickler(data, persistent_load, limits, fast_paths, start)
    try:
        return u.load(), u
    except InputError as e:
        # Where statecli gives up (a limit, a SETITEM on a list, a value a handler refuses), real pickle may
        # go on: what the rest of the pickle names is judged as well.
        later, calls = names_after(data, start, u.stopped_at) if u.stopped_at is not None else ({}, False)
        if u.actions or u.globals_seen or later:
            refuse_if_dangerous(u.globals_seen, u.actions.values(), e, later if calls else {})
        raise
