"""The cast's range screen: skipping the exact count for a chunk must never change what is counted."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from statecli.conversion import casting  # noqa: E402
from statecli.conversion.casting import CastStats, _count_range, cast  # noqa: E402

SPECIALS = [0.0, -0.0, 1e-30, -1e-30, 1e-45, 7e4, -7e4, 1e39, float("inf"), float("-inf"), float("nan"), 500.0]


def _exact(src: torch.Tensor, dst: torch.dtype) -> CastStats:
    """The reference: the exact counter over the whole tensor, no screen."""
    stats = CastStats()
    _count_range(src.reshape(-1), src.reshape(-1).to(dst), dst, stats)
    return stats


@pytest.mark.parametrize(
    ("src_dtype", "dst_dtype"),
    [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.float64, torch.float32),
        (torch.float32, torch.float8_e5m2),
        (torch.float32, torch.float8_e4m3fn),
        (torch.complex128, torch.complex64),
        (torch.complex64, torch.complex32),
    ],
)
@pytest.mark.parametrize("special", SPECIALS)
def test_screen_counts_what_the_exact_count_does(monkeypatch, src_dtype, dst_dtype, special):
    monkeypatch.setattr(casting, "_CHUNK_ELEMENTS", 64)
    g = torch.Generator().manual_seed(0)
    src = (torch.rand(1000, generator=g, dtype=torch.float64) + 0.5).to(src_dtype)
    flat = src.view(-1)
    # One special value in one chunk only, the other chunks clean: a screen that looks at the wrong chunk,
    # or at too little of it, misses it.
    value = torch.tensor(special, dtype=torch.float64)  # 1e39 in a float32 source becomes inf, as torch stores it
    flat[700] = value.to(src_dtype)
    if src_dtype.is_complex:
        flat[300] = torch.complex(torch.tensor(1.0, dtype=torch.float64), value).to(src_dtype)
    out, got = cast(src, dst_dtype)
    assert torch.equal(
        out.view(-1).to(torch.complex128 if dst_dtype.is_complex else torch.float64).isnan(),
        src.to(dst_dtype).view(-1).to(torch.complex128 if dst_dtype.is_complex else torch.float64).isnan(),
    )
    assert got == _exact(src, dst_dtype)


def test_clean_input_is_counted_clean():
    src = torch.rand(5000, dtype=torch.float32) + 0.5
    _, got = cast(src, torch.bfloat16)
    assert got == CastStats()


@pytest.mark.parametrize("dst_dtype", [torch.float16, torch.bfloat16, torch.float8_e5m2])
def test_zeros_and_underflow_in_one_chunk(monkeypatch, dst_dtype):
    """A chunk with zeros of its own and values that flush to zero: only the flushed ones count."""
    monkeypatch.setattr(casting, "_CHUNK_ELEMENTS", 64)
    src = torch.rand(640, dtype=torch.float32) + 0.5
    src[[3, 70, 71, 500]] = torch.tensor([0.0, -0.0, 0.0, 0.0])
    src[[4, 72, 501]] = torch.tensor([1e-30, -1e-30, 1e-39])
    _, got = cast(src, dst_dtype)
    assert got == _exact(src, dst_dtype)
    assert got.underflow == int((src.to(dst_dtype) == 0).sum() - (src == 0).sum())
