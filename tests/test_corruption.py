"""Damaged copies of every sample: statecli answers with its own error type or a report, never a crash."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import statecli

SAMPLES = sorted(
    p
    for p in (Path(__file__).resolve().parent.parent / "sample_models").rglob("*")
    if p.is_file() and p.suffix in (".pt", ".ckpt", ".safetensors")
)


def check(path: Path) -> None:
    try:
        statecli.open_checkpoint(path)
    except statecli.StatecliError as e:
        assert e.exit_code in (3, 5)


def test_zip_member_name_that_is_not_utf8(tmp_path: Path) -> None:
    data = bytearray(SAMPLES[0].read_bytes())
    central = data.rindex(b"PK\x01\x02")  # the last member's central directory entry
    data[central + 9] |= 0x08  # general-purpose flag bit 11: the name is UTF-8
    data[central + 46] = 0xFF  # ...and its first byte is not
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(statecli.InputError, match="not valid UTF-8"):
        statecli.open_checkpoint(bad)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    index=st.integers(0, len(SAMPLES) - 1),
    cut=st.one_of(st.none(), st.floats(0, 1)),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8),
)
def test_damaged_samples_fail_cleanly(
    tmp_path: Path, index: int, cut: float | None, flips: list[tuple[float, int]]
) -> None:
    src = SAMPLES[index]
    data = bytearray(src.read_bytes())
    if cut is not None:
        data = data[: int(cut * len(data))]
    for where, value in flips:
        if data:
            data[min(int(where * len(data)), len(data) - 1)] = value
    path = tmp_path / f"damaged{src.suffix}"
    path.write_bytes(bytes(data))
    check(path)
