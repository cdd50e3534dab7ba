"""Shared fixtures. Keep this small: most helpers belong in the test file that uses them.

Shared helpers that tests import live beside it as plain modules (pytest imports every conftest.py
as ``conftest``, so it is no place to import from): clirun.run_cli runs the command line in-process,
factories.tensor_info builds a TensorInfo by hand, subproc runs a fresh Python.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO_ROOT / "sample_models"


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The folder of tiny sample checkpoints (see sample_models/README.md)."""
    return SAMPLES_DIR


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


# ------------------------------------------------------------------ no false alarm on what the tests save
#
# Every checkpoint a test writes with torch.save is benign unless it carries one of the payload markers:
# at the end of the session each one still on disk is read, and a dangerous finding on any fails the run.
# This is the "no false alarm on real checkpoints: run it on every checkpoint the tests build".

_SAVED: list[str] = []
_PAYLOAD_MARKERS = (b"statecli_pwned_marker", b"statecli_hostile_marker", b"statecli_marker")


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch
    except ImportError:  # the suite runs without torch too; nothing to record then
        return
    import functools
    import os

    real_save = torch.save

    @functools.wraps(real_save)
    def recording_save(obj: object, f: object, *args: object, **kwargs: object) -> object:
        result = real_save(obj, f, *args, **kwargs)  # type: ignore[arg-type]
        if isinstance(f, (str, os.PathLike)):
            _SAVED.append(os.path.abspath(os.fspath(f)))
        return result

    torch.save = recording_save


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import os

    import statecli
    from statecli.errors import StatecliError

    false_alarms = []
    for path in dict.fromkeys(_SAVED):
        try:
            if not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                data = f.read()
            if any(m in data for m in _PAYLOAD_MARKERS):
                continue  # a test's own exploit
            report = statecli.open_checkpoint(path)
        except (OSError, StatecliError):
            continue  # rewritten or corrupted by its test on purpose
        dangerous = [f.message for f in report.findings if f.level == "dangerous"]
        if dangerous:
            false_alarms.append(f"{path}: {dangerous[0]}")
    if false_alarms:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = ["dangerous findings on checkpoints the tests saved with torch.save (false alarms):", *false_alarms]
        if reporter is not None:
            reporter.write_line("\n".join(lines), red=True)
        else:
            print("\n".join(lines))
