"""Pinned behaviour: what every command prints, and exits with, on every bundled sample.

Each case runs one command line through the CLI in-process, from a scratch folder that holds a copy of
`sample_models/` (so every path in the output is relative and the same on every machine), and records
its exit code, the sha256 of its stdout and stderr, and for `convert` the sha256 of every file written.

    python tests/golden/make_goldens.py            # rewrite tests/golden/goldens.json (after a deliberate change)
    python tests/golden/make_goldens.py --dump D   # also write each case's stdout to D/<case>.txt

`--dump` at two commits and `diff -r` shows what a change did to the outputs; `tests/test_golden.py`
fails on any case that no longer matches, and says which.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "sample_models"
GOLDENS = Path(__file__).resolve().parent / "goldens.json"
# Wide enough that no column is hidden, so the goldens pin content rather than the width policy.
ENV = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb", "STATECLI_DEBUG": ""}


def checkpoints() -> list[str]:
    """Every sample a user could point statecli at: checkpoint files and checkpoint folders."""
    skip = {".py", ".md"}
    files = [p for p in sorted(SAMPLES.iterdir()) if p.is_file() and p.suffix not in skip]
    folders = [p for p in sorted(SAMPLES.iterdir()) if p.is_dir() and not p.name.startswith("__")]
    return [f"sample_models/{p.name}" for p in files + folders]


def cases() -> Iterator[tuple[str, list[str]]]:
    table_json = ["table", "json"]
    four = ["table", "json", "csv", "markdown"]
    samples = checkpoints()
    for s in samples:
        for f in four:
            yield f"inspect {s} {f}", ["inspect", s, "--format", f]
        for f in table_json:
            yield f"tree {s} {f}", ["tree", s, "--format", f]
        for f in four:
            yield f"stats {s} {f}", ["stats", s, "--format", f]
        yield f"schema {s}", ["schema", s]
        for f in ["table", "json", "junit", "github"]:
            yield f"check {s} {f}", ["check", s, "--no-policy", "--no-nan", "--dtype", "fp32", "--format", f]
        for f in four:
            yield f"diff {s} self {f}", ["diff", s, s, "--format", f]
        for target in ["out.safetensors", "out.pt"]:
            for f in table_json:
                argv = ["convert", s, "-o", f"out/{target}", "--dtype", "bf16", "--format", f]
                yield f"convert {s} {target} {f}", argv
    # Pairs that differ, so diff's non-trivial rows are pinned too.
    pairs = [
        ("cnn_bn_state_dict.pt", "cnn_bn.safetensors"),
        ("cnn_bn_state_dict.pt", "cnn_bn_keep_vars.pt"),
        ("cnn_bn_module.pt", "legacy_cnn.pt"),
        ("quantized_static_state_dict.pt", "quantized_dynamic_state_dict.pt"),
        ("training_adam.pt", "training_rng.pt"),
        ("sharded", "transformer_buffers.safetensors"),
    ]
    for a, b in pairs:
        for f in four:
            yield f"diff {a} {b} {f}", ["diff", f"sample_models/{a}", f"sample_models/{b}", "--format", f]
    for f in ["table", "json", "junit", "github"]:
        argv = ["check", *samples[:6], "--no-policy", "--require-exact-roles", "--format", f]
        yield f"check several {f}", argv
    dry = ["convert", "sample_models/cnn_bn_module.pt", "-o", "out/x.pt", "--dtype", "fp16", "--dry-run"]
    yield "convert dry-run", dry


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _steady(text: str) -> str:
    """The text without what changes from run to run: convert's elapsed seconds (and torch's import)."""
    return re.sub(r"\b(in|import) \d+(\.\d+)? s\b", r"\1 N s", text)


def run_case(argv: list[str], scratch: Path) -> tuple[dict[str, object], str]:
    from typer.testing import CliRunner

    from statecli.cli.main import app

    out_dir = scratch / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    result = CliRunner().invoke(app, argv, env=ENV)
    stdout, stderr = _steady(result.stdout), _steady(result.stderr)
    written = {p.name: _digest(p.read_bytes()) for p in sorted(out_dir.rglob("*")) if p.is_file()}
    record: dict[str, object] = {
        "exit": result.exit_code,
        "stdout": _digest(stdout.encode()),
        "stderr": _digest(stderr.encode()),
    }
    if written:
        record["files"] = written
    return record, stdout + ("\n--- stderr ---\n" + stderr if stderr else "")


def scratch_copy(where: Path) -> Path:
    shutil.copytree(SAMPLES, where / "sample_models", ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    return where


def compute(scratch: Path, dump: Path | None = None) -> dict[str, dict[str, object]]:
    found: dict[str, dict[str, object]] = {}
    here = os.getcwd()
    os.chdir(scratch)
    try:
        for name, argv in cases():
            record, text = run_case(argv, scratch)
            found[name] = record
            if dump is not None:
                (dump / (name.replace("/", "_").replace(" ", "__") + ".txt")).write_text(text, encoding="utf-8")
    finally:
        os.chdir(here)
    return found


def main() -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dump", type=Path, help="also write each case's output to this folder")
    parser.add_argument("--check", action="store_true", help="compare with goldens.json instead of writing it")
    args = parser.parse_args()
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        found = compute(scratch_copy(Path(tmp)), args.dump)
    if args.check:
        pinned = json.loads(GOLDENS.read_text())
        bad = [k for k in pinned.keys() | found.keys() if pinned.get(k) != found.get(k)]
        print("\n".join(sorted(bad)) or f"all {len(found)} cases match")
        return 1 if bad else 0
    GOLDENS.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    print(f"{len(found)} cases written to {GOLDENS.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
