"""Shared fixtures. Keep this small: most helpers belong in the test file that uses them."""

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
