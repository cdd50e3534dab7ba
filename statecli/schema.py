"""A checkpoint's schema: names, shapes, dtypes and roles, no values. Stable, so it can be committed
next to a model and a later checkpoint checked against it (``statecli check --schema``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from statecli import dtypes
from statecli.clip import describe, quote
from statecli.errors import InputError
from statecli.files import open_regular
from statecli.records import ROLES, Report

SCHEMA = "statecli.schema/1"


def make_schema(report: Report) -> dict[str, Any]:
    """The schema of ``report``'s model tensors, sorted by name so that re-saving gives the same text."""
    tensors = {
        t.name: {"dtype": t.dtype, "shape": list(t.shape), "role": t.role}
        for t in sorted(report.tensors, key=lambda t: t.name)
        if t.group == "model"
    }
    return {"schema": SCHEMA, "tensors": tensors}


def dumps(schema: dict[str, Any]) -> str:
    """One tensor per line: a reviewer reads a diff of the file line by line, one changed tensor each."""
    lines = [f"{json.dumps(name)}: {json.dumps(entry)}" for name, entry in schema["tensors"].items()]
    head = f'{{\n  "schema": {json.dumps(schema["schema"])},\n  "tensors": {{'
    if not lines:  # no blank-only line where the entries would be
        return f"{head}}}\n}}\n"
    body = ",\n    ".join(lines)
    return f"{head}\n    {body}\n  }}\n}}\n"


def load_schema(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a schema file; InputError (exit 3) naming what is wrong."""
    p = os.fspath(path)
    try:
        with open_regular(p) as f:
            raw = f.read(64 << 20)
    except OSError as e:
        raise InputError(f"cannot read schema file ({e.strerror or e})", path=p) from e
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"not a statecli schema: not JSON ({e})", path=p) from None
    except RecursionError:
        raise InputError("not a statecli schema: not JSON (nested too deeply)", path=p) from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise InputError(f"not a statecli schema: 'schema' is {describe(found, limit=60)}, expected {SCHEMA!r}", path=p)
    tensors = doc.get("tensors")
    if not isinstance(tensors, dict):
        raise InputError("not a statecli schema: 'tensors' must be an object of name -> entry", path=p)
    for name, entry in tensors.items():
        ok = (
            isinstance(entry, dict)
            and entry.get("dtype") in dtypes.DTYPES
            and isinstance(entry.get("shape"), list)
            and all(type(d) is int and d >= 0 for d in entry["shape"])
            and entry.get("role", "parameter") in ROLES
        )
        if not ok:
            raise InputError(
                f"schema entry {quote(name)} must be {{'dtype': <torch dtype>, 'shape': [ints], 'role': <role>}}",
                path=p,
            )
    return doc


@dataclass(frozen=True, slots=True)
class Difference:
    name: str
    what: str  # "missing" | "unexpected" | "shape" | "dtype" | "role"
    expected: Any
    found: Any

    @property
    def message(self) -> str:
        if self.what == "missing":
            return f"{self.name}: in the schema, not in the checkpoint"
        if self.what == "unexpected":
            return f"{self.name}: in the checkpoint, not in the schema"
        return f"{self.name}: {self.what} is {self.found}, the schema says {self.expected}"


def compare(report: Report, schema: dict[str, Any]) -> list[Difference]:
    """Every way the checkpoint's model tensors differ from ``schema``."""
    have = make_schema(report)["tensors"]
    want: dict[str, Any] = schema["tensors"]
    out: list[Difference] = []
    for name, w in want.items():
        h = have.get(name)
        if h is None:
            out.append(Difference(name, "missing", w, None))
            continue
        for key in ("shape", "dtype", "role"):
            if key in w and h[key] != w[key]:
                out.append(Difference(name, key, w[key], h[key]))
    out.extend(Difference(name, "unexpected", None, h) for name, h in have.items() if name not in want)
    return out
