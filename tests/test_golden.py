"""Pinned behaviour: every command, in every --format, on every sample prints and exits as recorded.

The records are in tests/golden/goldens.json, written by tests/golden/make_goldens.py. A redesign must
leave them all equal; a deliberate change of output rewrites them, and its commit says why.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from golden import make_goldens

PINNED: dict[str, dict[str, object]] = json.loads(make_goldens.GOLDENS.read_text(encoding="utf-8"))

# One xdist worker computes every case once (the module fixture), rather than each worker all of them.
pytestmark = pytest.mark.xdist_group("golden")


@pytest.fixture(scope="module")
def found(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    return make_goldens.compute(make_goldens.scratch_copy(tmp_path_factory.mktemp("golden")))


def test_the_cases_are_the_pinned_cases(found: dict[str, dict[str, object]]) -> None:
    assert sorted(found) == sorted(PINNED)


@pytest.mark.parametrize("case", sorted(PINNED))
def test_output_is_as_pinned(found: dict[str, dict[str, object]], case: str) -> None:
    hint = "run `python tests/golden/make_goldens.py --dump DIR` here and at the last good commit, then diff -r"
    assert found.get(case) == PINNED[case], hint


def test_every_sample_is_covered() -> None:
    samples = {Path(s).name for s in make_goldens.checkpoints()}
    covered = {Path(k.split()[1]).name for k in PINNED if k.startswith("inspect ")}
    assert samples == covered and len(samples) >= 30
