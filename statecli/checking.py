"""``statecli check``: rules a checkpoint must satisfy, for CI gates. No Typer, no rich here.

A policy is a list of rule sets. Each set has a scope (``match`` name globs and ``role``) and rules:

==========================  =====================================================================
``dtype = [..]``            every floating tensor in scope has one of these dtypes (others: when a dtype of
                            their kind is named; user spellings accepted)
``device = ".."``           every tensor is saved on this device (safetensors: loads to ``cpu``)
``no_nan = true``           no NaN value (reads values)
``no_inf = true``           no ±inf value (reads values)
``absmax = X``              no finite value with ``|v| > X`` (reads values)
``max_size = "2GB"``        the checkpoint's files hold at most this many bytes (global only)
``required = [globs]``      each glob matches at least one tensor
``forbidden = [globs]``     no tensor matches any glob
``require_exact_roles``     every tensor's role is stated by the file, not inferred
``allow_dangerous = true``  dangerous pickle globals are reported as allowed instead of failing the rule
``strict_globals = true``   also fail on every global outside statecli's allow lists (unknown-global
                            warnings: a model class of your own, another package's class), as
                            ``torch.load(weights_only=True)`` refuses them (global only)
``schema = "file"``         names, shapes, dtypes and roles match a ``statecli schema`` file (global)
``model = "mod:callable"``  the tensors load into this architecture, strict (global; runs user code)
``reference = "file"``      values within ``atol`` / ``rtol`` of another checkpoint (global)
==========================  =====================================================================

In ``statecli.toml`` the global set is ``[check]`` and scoped sets are ``[[check.rules]]`` with
``match`` / ``role``; in ``pyproject.toml`` the same lives under ``[tool.statecli.check]``.

A rule set that selects no tensor fails (rule ``selects_tensors``) when it has a scope or a tensor
rule: a typo in a glob, or an empty file, must not turn a gate into one that checks nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from statecli import dtypes
from statecli.clip import describe
from statecli.diff import diff
from statecli.errors import UsageError
from statecli.files import open_regular
from statecli.formats import read
from statecli.model_match import build_model, match
from statecli.records import ROLES, Report, TensorInfo
from statecli.schema import compare, load_schema
from statecli.sizes import parse_size as parse
from statecli.stats import compute

SCHEMA = "statecli.check/1"
# Rules whose failure refuses the file as unsafe (exit 5) rather than failing the check (exit 1).
UNSAFE_RULES = ("no_dangerous_globals", "no_unknown_globals")
VALUE_RULES = ("no_nan", "no_inf", "absmax")
GLOBAL_ONLY = ("max_size", "schema", "model", "reference", "atol", "rtol", "allow_dangerous", "strict_globals")
_SCOPED = ("dtype", "device", "no_nan", "no_inf", "absmax", "required", "forbidden", "require_exact_roles")
_KNOWN = {*_SCOPED, *GLOBAL_ONLY, "match", "role"}


@dataclass(slots=True)
class RuleSet:
    """Rules over the tensors whose name matches one of ``match`` (all when empty) and whose role is in
    ``roles`` (all when empty)."""

    match: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    dtype: tuple[str, ...] = ()
    device: str | None = None
    no_nan: bool = False
    no_inf: bool = False
    absmax: float | None = None
    required: tuple[str, ...] = ()
    forbidden: tuple[str, ...] = ()
    require_exact_roles: bool = False

    @property
    def has_tensor_rules(self) -> bool:
        return bool(
            self.dtype
            or self.device is not None
            or self.no_nan
            or self.no_inf
            or self.absmax is not None
            or self.required
            or self.forbidden
            or self.require_exact_roles
        )

    def covers(self, t: TensorInfo) -> bool:
        return (not self.match or any(fnmatchcase(t.name, g) for g in self.match)) and (
            not self.roles or t.role in self.roles
        )

    @property
    def scope(self) -> str:
        parts = []
        if self.match:
            parts.append("match " + ",".join(self.match))
        if self.roles:
            parts.append("role " + ",".join(self.roles))
        return "; ".join(parts) or "all tensors"


@dataclass(slots=True)
class Policy:
    sets: list[RuleSet] = field(default_factory=lambda: [RuleSet()])
    max_size: int | None = None
    schema: str | None = None
    model: str | None = None
    reference: str | None = None
    atol: float | None = None  # None: not set here (0 where nothing sets it), so a flag's 0 can override a file
    rtol: float | None = None
    allow_dangerous: bool = False
    strict_globals: bool = False
    source: str | None = None  # the policy file, for messages

    def merge(self, other: Policy) -> Policy:
        """``other`` (command-line flags) added to this policy (a file): sets are added, scalars win."""
        merged = Policy(
            sets=[*self.sets, *other.sets],
            max_size=other.max_size if other.max_size is not None else self.max_size,
            schema=other.schema or self.schema,
            model=other.model or self.model,
            reference=other.reference or self.reference,
            atol=other.atol if other.atol is not None else self.atol,
            rtol=other.rtol if other.rtol is not None else self.rtol,
            allow_dangerous=other.allow_dangerous or self.allow_dangerous,
            strict_globals=other.strict_globals or self.strict_globals,
            source=self.source,
        )
        return merged


# ----------------------------------------------------------------------------------------------- policy files


def _bad(where: str, message: str) -> UsageError:
    return UsageError(f"{where}: {message}")


def _strings(where: str, key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _bad(where, f"'{key}' must be a string or a list of strings, got {describe(value, limit=60)}")


def _number(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise _bad(where, f"'{key}' must be a non-negative number, got {describe(value, limit=60)}")
    return float(value)


def _flag(where: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(where, f"'{key}' must be true or false, got {describe(value, limit=60)}")
    return value


def canonical_dtypes(where: str, names: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for n in names:
        c = dtypes.canonical(n)
        if c is None:
            raise _bad(where, dtypes.unknown(n))
        out.append(c)
    return tuple(out)


def parse_size(where: str, value: Any) -> int:
    if isinstance(value, bool):
        raise _bad(where, f"'max_size' must be a size like \"2GB\" or a number of bytes, got {value!r}")
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str):
        try:
            return parse(value)
        except UsageError as e:
            raise _bad(where, e.message) from None
    raise _bad(where, f"'max_size' must be a size like \"2GB\" or a number of bytes, got {describe(value, limit=60)}")


def _rule_set(where: str, table: dict[str, Any], allow_global: bool) -> tuple[RuleSet, dict[str, Any]]:
    unknown = sorted(set(table) - _KNOWN)
    if unknown:
        raise _bad(where, f"unknown rule {unknown[0]!r} (known: {', '.join(sorted(_KNOWN))})")
    if not allow_global:
        misplaced = sorted(set(table) & set(GLOBAL_ONLY))
        if misplaced:
            raise _bad(where, f"{misplaced[0]!r} applies to the whole checkpoint: put it in the main [check] table")
    rs = RuleSet()
    if "match" in table:
        rs.match = _strings(where, "match", table["match"])
    if "role" in table:
        rs.roles = _strings(where, "role", table["role"])
        wrong = [r for r in rs.roles if r not in ROLES]
        if wrong:
            raise _bad(where, f"unknown role {wrong[0]!r} (parameter, buffer or other)")
    if "dtype" in table:
        rs.dtype = canonical_dtypes(where, _strings(where, "dtype", table["dtype"]))
    if "device" in table:
        if not isinstance(table["device"], str):
            raise _bad(where, f"'device' must be a string, got {describe(table['device'], limit=60)}")
        rs.device = table["device"]
    for key in ("no_nan", "no_inf", "require_exact_roles"):
        if key in table:
            setattr(rs, key, _flag(where, key, table[key]))
    if "absmax" in table:
        rs.absmax = _number(where, "absmax", table["absmax"])
    for key in ("required", "forbidden"):
        if key in table:
            setattr(rs, key, _strings(where, key, table[key]))
    return rs, {k: v for k, v in table.items() if k in GLOBAL_ONLY}


def policy_from_table(table: dict[str, Any], where: str) -> Policy:
    """A policy from the ``[check]`` table of a TOML file (already parsed)."""
    if not isinstance(table, dict):
        raise _bad(where, "the check table must be a table")
    body = dict(table)
    scoped = body.pop("rules", [])
    if not isinstance(scoped, list) or not all(isinstance(r, dict) for r in scoped):
        raise _bad(where, "'rules' must be an array of tables ([[check.rules]])")
    main, globals_ = _rule_set(where, body, allow_global=True)
    policy = Policy(sets=[main], source=where)
    for i, r in enumerate(scoped):
        policy.sets.append(_rule_set(f"{where} [[rules]] #{i + 1}", r, allow_global=False)[0])
    if "max_size" in globals_:
        policy.max_size = parse_size(where, globals_["max_size"])
    for key in ("schema", "model", "reference"):
        if key in globals_:
            if not isinstance(globals_[key], str):
                raise _bad(where, f"'{key}' must be a string, got {describe(globals_[key], limit=60)}")
            setattr(policy, key, globals_[key])
    for key in ("atol", "rtol"):
        if key in globals_:
            setattr(policy, key, _number(where, key, globals_[key]))
    if "allow_dangerous" in globals_:
        policy.allow_dangerous = _flag(where, "allow_dangerous", globals_["allow_dangerous"])
    if "strict_globals" in globals_:
        policy.strict_globals = _flag(where, "strict_globals", globals_["strict_globals"])
    if policy.schema and not os.path.isabs(policy.schema):
        # Paths in a policy file are relative to that file, as in pyproject.toml tools.
        policy.schema = os.path.join(os.path.dirname(os.path.abspath(where)), policy.schema)
    if policy.reference and not os.path.isabs(policy.reference):
        policy.reference = os.path.join(os.path.dirname(os.path.abspath(where)), policy.reference)
    return policy


def _toml(path: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib
    try:
        with open_regular(path) as f:
            return tomllib.load(f)
    except OSError as e:
        raise UsageError(f"{path}: cannot read policy file ({e.strerror or e})") from e
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML ({e})") from None
    except RecursionError:
        raise UsageError(f"{path}: not valid TOML (nested too deeply)") from None


def load_policy(path: str) -> Policy:
    """A policy file: ``statecli.toml`` (``[check]``) or ``pyproject.toml`` (``[tool.statecli.check]``)."""
    doc = _toml(path)
    if os.path.basename(path) == "pyproject.toml":
        table = doc.get("tool", {}).get("statecli", {}).get("check")
        if table is None:
            raise UsageError(f"{path}: no [tool.statecli.check] table")
    else:
        table = doc.get("check")
        if table is None:
            raise UsageError(f"{path}: no [check] table")
    return policy_from_table(table, path)


def discover_policy(folder: str = ".") -> str | None:
    """``statecli.toml`` in ``folder``, else a ``pyproject.toml`` there with ``[tool.statecli.check]``."""
    own = os.path.join(folder, "statecli.toml")
    if os.path.isfile(own):
        return own
    py = os.path.join(folder, "pyproject.toml")
    if os.path.isfile(py):
        try:
            doc = _toml(py)
        except UsageError:
            return None
        if "check" in doc.get("tool", {}).get("statecli", {}):
            return py
    return None


# ----------------------------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Failure:
    tensor: str | None  # None for a rule about the whole checkpoint
    message: str
    value: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "message": self.message, "value": self.value}


@dataclass(slots=True)
class RuleResult:
    rule: str  # "dtype", "no_nan", ...
    scope: str
    expected: str  # the rule in words: "dtype in bfloat16, float32"
    checked: int  # tensors (or items) the rule looked at
    failures: list[Failure] = field(default_factory=list)
    allowed: list[Failure] = field(default_factory=list)  # would fail, but the policy allows them: reported only
    unread: list[str] = field(default_factory=list)  # in scope, but their values could not be read: not checked

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def id(self) -> str:
        return self.rule if self.scope == "all tensors" else f"{self.rule} [{self.scope}]"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "scope": self.scope,
            "expected": self.expected,
            "checked": self.checked,
            "passed": self.passed,
            "failures": [f.to_dict() for f in self.failures],
            "allowed": [f.to_dict() for f in self.allowed],
            "unread": list(self.unread),
        }


@dataclass(slots=True)
class CheckResult:
    path: str
    format: str
    results: list[RuleResult]
    policy_source: str | None = None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def exit_code(self) -> int:
        """0 when every rule passes; 5 (refused as unsafe) when a pickle-globals rule fails; else 1."""
        if self.passed:
            return 0
        unsafe = any(not r.passed for r in self.results if r.rule in UNSAFE_RULES)
        return 5 if unsafe else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "path": self.path,
            "format": self.format,
            "policy": self.policy_source,
            "passed": self.passed,
            "rules": [r.to_dict() for r in self.results],
        }


class Unreadable:
    """A path given with others that could not be checked: the error stderr reported, kept for the report so
    that a CI report names every file it was given. Its exit code is the error's (3 unreadable, 5 unsafe)."""

    __slots__ = ("exit_code", "message", "path")

    def __init__(self, path: str, message: str, exit_code: int) -> None:
        self.path = path
        self.message = message
        self.exit_code = exit_code

    def to_dict(self) -> dict[str, Any]:
        # Additive to statecli.check/1: no "rules"; "passed" false, so a reader of "passed" alone still fails it.
        error = {"message": self.message, "exit_code": self.exit_code}
        return {"schema": SCHEMA, "path": self.path, "passed": False, "error": error}


def exit_code(checked: list[CheckResult | Unreadable]) -> int:
    """The worst of the files' exit codes: 5 unsafe, 3 unreadable, 1 a rule failed, 0 all passed."""
    return max((c.exit_code for c in checked), default=0)


# ----------------------------------------------------------------------------------------------- running


def _g(v: float) -> str:
    return f"{v:.6g}"


def run(report: Report, policy: Policy, progress: Callable[[int, int], None] | None = None) -> CheckResult:
    """Apply ``policy`` to ``report``; values are read only when a value rule needs them."""
    results: list[RuleResult] = []
    tensors = report.tensors

    results.append(_dangerous_rule(report, policy, "all tensors"))
    if policy.strict_globals:
        unknown = [Failure(None, f.message, f.code) for f in report.findings if f.code == "unknown-global"]
        expected = "no pickle global outside statecli's allow lists"
        results.append(RuleResult("no_unknown_globals", "all tensors", expected, 1, failures=unknown))
    if policy.max_size is not None:
        r = RuleResult("max_size", "all tensors", f"at most {policy.max_size:,} bytes", 1)
        if report.file_size > policy.max_size:
            r.failures.append(
                Failure(None, f"{report.file_size:,} bytes on disk, more than {policy.max_size:,}", report.file_size)
            )
        results.append(r)

    stats = _value_stats(report, policy, progress)
    for rs in policy.sets:
        scoped = [t for t in tensors if rs.covers(t)]
        if not scoped and (rs.match or rs.roles or rs.has_tensor_rules):
            results.append(_empty_scope(rs, len(tensors)))
        results.extend(_apply(rs, scoped, stats, _replaced(rs, policy.sets, scoped)))

    if policy.schema is not None:
        diffs = compare(report, load_schema(policy.schema))
        r = RuleResult("schema", "all tensors", f"matches {policy.schema}", len(tensors))
        r.failures = [Failure(d.name, d.message, d.found) for d in diffs]
        results.append(r)
    if policy.model is not None:
        results.append(_model_rule(report, policy.model))
    if policy.reference is not None:
        results.extend(_reference_rules(report, policy))
    return CheckResult(report.path, report.format, results, policy.source)


def _dangerous_rule(report: Report, policy: Policy, scope: str) -> RuleResult:
    """``no_dangerous_globals`` for ``report``: failed by every dangerous global, or listing them as allowed."""
    where = "" if scope == "all tensors" else f"{scope} {report.path}: "
    dangerous = [Failure(None, f"{where}{f.message}", f.code) for f in report.findings if f.level == "dangerous"]
    if policy.allow_dangerous:
        # Allowed, not hidden: the result still names every global, so a report shows what was let through.
        expected = "no pickle global that could run code (allow_dangerous: reported, not failed)"
        return RuleResult("no_dangerous_globals", scope, expected, 1, allowed=dangerous)
    return RuleResult("no_dangerous_globals", scope, "no pickle global that could run code", 1, failures=dangerous)


def _value_stats(report: Report, policy: Policy, progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    wanted = [rs for rs in policy.sets if rs.no_nan or rs.no_inf or rs.absmax is not None]
    if not wanted:
        return {}

    def keep(t: TensorInfo) -> bool:
        return any(rs.covers(t) for rs in wanted)

    return {s.name: s for s in compute(report, keep, progress=progress).tensors}


def _empty_scope(rs: RuleSet, in_file: int) -> RuleResult:
    """A failed ``selects_tensors``: every rule of ``rs`` would pass having looked at nothing."""
    r = RuleResult("selects_tensors", rs.scope, "selects at least one tensor", in_file)
    if rs.match or rs.roles:
        among = f"among the {in_file:,} in the file" if in_file else "(the file holds no tensor)"
        message = f"no tensor matches the filters ({rs.scope}) {among}: the rules they scope checked nothing"
    else:
        message = "the checkpoint holds no tensor: the rules on all tensors checked nothing"
    r.failures.append(Failure(None, message, 0))
    return r


# The tensors a dtype rule constrains: those of a family the rule names. ``--dtype bf16`` speaks of the floating
# tensors (the ones ``convert --dtype`` changes); integer, bool and quantized tensors are held to a dtype only
# when the rule names one of theirs (``--dtype bf16 --dtype int64``).
_FAMILIES = {"float": "floating", "complex": "complex", "int": "integer", "uint": "integer", "bool": "bool",
             "quant": "quantized", "bits": "bits"}  # fmt: skip


def _family(dtype: str) -> str | None:
    """A dtype's family; None for a dtype statecli does not know, which every dtype rule holds to its list."""
    d = dtypes.DTYPES.get(dtype)
    return _FAMILIES[d.kind] if d is not None else None


# Rules a scoped set takes over, for the tensors it covers, from a set over all tensors: a policy's
# ``[[check.rules]] match = ["*.running_var"] dtype = "float32"`` replaces the top-level dtype for those
# tensors instead of adding a second rule that no tensor could pass.
_REPLACEABLE = {"dtype": lambda rs: bool(rs.dtype), "device": lambda rs: rs.device is not None,
                "absmax": lambda rs: rs.absmax is not None}  # fmt: skip


def _replaced(rs: RuleSet, sets: list[RuleSet], scoped: list[TensorInfo]) -> dict[str, set[str]]:
    """For a set over all tensors: rule -> names of the tensors a scoped set holds to its own rule."""
    if rs.match or rs.roles:
        return {}
    out: dict[str, set[str]] = {}
    for rule, defines in _REPLACEABLE.items():
        narrower = [o for o in sets if o is not rs and (o.match or o.roles) and defines(o)]
        if defines(rs) and narrower:
            out[rule] = {t.name for t in scoped if any(o.covers(t) for o in narrower)}
    return out


def _apply(
    rs: RuleSet, scoped: list[TensorInfo], stats: dict[str, Any], replaced: dict[str, set[str]]
) -> list[RuleResult]:
    out: list[RuleResult] = []
    n = len(scoped)

    def own(rule: str) -> list[TensorInfo]:
        """The tensors in scope that no scoped set holds to its own ``rule``."""
        names = replaced.get(rule)
        return [t for t in scoped if t.name not in names] if names else scoped

    if rs.dtype:
        families = {_family(d) for d in rs.dtype}  # the rule's dtypes are canonical: all known
        held = [t for t in own("dtype") if (f := _family(t.dtype)) is None or f in families]
        kinds = ", ".join(sorted(f for f in families if f is not None))
        r = RuleResult("dtype", rs.scope, f"dtype in {', '.join(rs.dtype)} ({kinds} tensors)", len(held))
        for t in held:
            if t.dtype not in rs.dtype:
                r.failures.append(Failure(t.name, f"{t.name}: dtype {t.dtype}, allowed {', '.join(rs.dtype)}", t.dtype))
        out.append(r)
    if rs.device is not None:
        want = rs.device
        mine = own("device")
        r = RuleResult("device", rs.scope, f"saved on {want}", len(mine))
        for t in mine:
            dev = t.device if t.device is not None else "cpu"  # safetensors: loaders put tensors on the CPU
            if dev != want:
                r.failures.append(Failure(t.name, f"{t.name}: saved on {dev}, expected {want}", dev))
        out.append(r)
    # Value rules count only the tensors whose values were read; the others (quantized, unknown dtypes) are
    # named in ``unread``, so a gate never reports as checked what it did not look at.
    read = [t for t in scoped if (s := stats.get(t.name)) is not None and not s.skipped]
    unread = [t.name for t in scoped if (s := stats.get(t.name)) is None or s.skipped] if len(read) < n else []
    for rule, key, word in (("no_nan", "nan", "NaN"), ("no_inf", None, "inf")):
        if not getattr(rs, rule):
            continue
        r = RuleResult(rule, rs.scope, f"no {word} value", len(read), unread=unread)
        for t in read:
            s = stats[t.name]
            count = s.moments.nan if key else s.moments.posinf + s.moments.neginf
            if count:
                r.failures.append(
                    Failure(t.name, f"{t.name}: {count:,} {word} value{'s' if count != 1 else ''}", count)
                )
        out.append(r)
    if rs.absmax is not None:
        bound = rs.absmax
        names = replaced.get("absmax", set())
        held = [t for t in read if t.name not in names]
        held_unread = [name for name in unread if name not in names]
        r = RuleResult("absmax", rs.scope, f"|value| <= {_g(bound)}", len(held), unread=held_unread)
        for t in held:
            s = stats.get(t.name)
            if s is not None and s.absmax is not None and s.absmax > bound:
                r.failures.append(Failure(t.name, f"{t.name}: absmax {_g(s.absmax)} > {_g(bound)}", s.absmax))
        out.append(r)
    if rs.required:
        r = RuleResult("required", rs.scope, "present: " + ", ".join(rs.required), len(rs.required))
        for g in rs.required:
            if not any(fnmatchcase(t.name, g) for t in scoped):
                r.failures.append(Failure(None, f"no tensor matches required {g!r}", g))
        out.append(r)
    if rs.forbidden:
        r = RuleResult("forbidden", rs.scope, "absent: " + ", ".join(rs.forbidden), n)
        for t in scoped:
            hit = next((g for g in rs.forbidden if fnmatchcase(t.name, g)), None)
            if hit is not None:
                r.failures.append(Failure(t.name, f"{t.name}: matches forbidden {hit!r}", hit))
        out.append(r)
    if rs.require_exact_roles:
        r = RuleResult("require_exact_roles", rs.scope, "every role stated by the file", n)
        for t in scoped:
            if not t.exact:
                r.failures.append(Failure(t.name, f"{t.name}: role {t.role} is inferred ({t.evidence})", t.evidence))
        out.append(r)
    return out


def _model_rule(report: Report, spec: str) -> RuleResult:
    m = match(report, build_model(spec))
    r = RuleResult("model", "all tensors", f"loads into {spec} (strict)", m.file_keys)
    for name in m.missing:
        r.failures.append(Failure(name, f"{name}: missing (the model has it, the file does not)", None))
    for name in m.unexpected:
        r.failures.append(Failure(name, f"{name}: unexpected (the file has it, the model does not)", None))
    for sm in m.shape_mismatch:
        msg = f"{sm.name}: shape {list(sm.file_shape)} in the file, {list(sm.model_shape)} in the model"
        r.failures.append(Failure(sm.name, msg, list(sm.file_shape)))
    for dm in m.dtype_mismatch:
        if dm.level == "warning":  # integer <-> floating: load_state_dict would copy it, but it is not this model's
            msg = f"{dm.name}: dtype {dm.file_dtype} in the file, {dm.model_dtype} in the model"
            r.failures.append(Failure(dm.name, msg, dm.file_dtype))
    if r.failures:
        r.failures.extend(Failure(None, f"fix: {tip}", None) for tip in m.suggestions)
    return r


def _reference_rules(report: Report, policy: Policy) -> list[RuleResult]:
    """The comparison with the reference, and the reference's own dangerous globals: a gate compares
    against a file it was handed, and a hostile one must not pass unseen (never run, but refused alike)."""

    assert policy.reference is not None
    reference = read(os.fspath(policy.reference))
    return [_dangerous_rule(reference, policy, "reference"), _reference_rule(report, reference, policy)]


def _reference_rule(report: Report, reference: Report, policy: Policy) -> RuleResult:
    assert policy.reference is not None
    atol, rtol = policy.atol or 0.0, policy.rtol or 0.0
    d = diff(report, reference, atol=atol, rtol=rtol).to_dict()
    where = f"within atol={_g(atol)} rtol={_g(rtol)} of {policy.reference}"
    r = RuleResult("reference", "all tensors", where, d["summary"]["common"])
    if not d["summary"]["tensors_a"] and not d["summary"]["tensors_b"]:
        r.failures.append(Failure(None, "neither this checkpoint nor the reference holds a tensor: nothing compared"))
    r.failures.extend(Failure(n, f"{n}: not in the reference", None) for n in d["only_in_a"])
    r.failures.extend(Failure(n, f"{n}: in the reference, not here", None) for n in d["only_in_b"])
    for c in d["changed"]:
        if c["status"] != "differs":
            continue  # close, metadata-only or not readable: within what the rule asks
        name = c["name"]
        if c["shape_a"] != c["shape_b"]:
            r.failures.append(Failure(name, f"{name}: shape {c['shape_a']}, the reference has {c['shape_b']}", None))
        else:
            msg = f"{name}: max abs diff {c['max_abs']}, max rel diff {c['max_rel']} ({c['mismatched']} values)"
            r.failures.append(Failure(name, msg, c["max_abs"]))
    return r
