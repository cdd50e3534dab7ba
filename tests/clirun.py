"""The one way tests run the command line in-process: ``run_cli("inspect", path, "--format", "json")``.

It lives in a module rather than in conftest.py because tests/ holds two conftest.py files and pytest
imports both under the one name ``conftest``, so ``from conftest import ...`` may find the other one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from typer.testing import CliRunner

from statecli.cli.main import app

# For the tests whose expected text must not carry colour codes, whatever the calling terminal asks for.
NO_COLOR = {"NO_COLOR": "1"}


@dataclass(frozen=True)
class CliResult:
    """What one run printed, decoded strictly as UTF-8 and byte for byte: click's ``Result.stdout``
    turns CRLF into LF and bad bytes into U+FFFD, which would hide the very things some tests look for.

    ``code, out, err = run_cli(...)`` unpacks it; ``output`` is stdout and stderr interleaved.
    """

    exit_code: int
    stdout: str
    stderr: str
    output: str

    def __iter__(self) -> Iterator[int | str]:
        return iter((self.exit_code, self.stdout, self.stderr))


def run_cli(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> CliResult:
    # A piped table is as wide as it needs unless COLUMNS is set; pytest-xdist's workers (and some shells)
    # set it, which would hide columns. A test that wants a width passes COLUMNS in ``env``.
    unset: dict[str, str | None] = {"COLUMNS": None}
    result = CliRunner().invoke(app, [os.fspath(a) for a in args], env={**unset, **(env or {})})
    return CliResult(
        exit_code=result.exit_code,
        stdout=result.stdout_bytes.decode("utf-8"),
        stderr=result.stderr_bytes.decode("utf-8"),
        output=result.output_bytes.decode("utf-8"),
    )
