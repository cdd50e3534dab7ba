"""Cast maths: a dtype cast done in chunks, with overflow, underflow and NaN/inf counted, never guessed.

torch is imported when called; nothing here reads or writes a file.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from statecli.errors import CheckFailedError
from statecli.records import Finding, FindingCap
from statecli.tensors.views import torch_dtype
from statecli.wording import count

if TYPE_CHECKING:
    import torch

# Small enough that the range screen's second look at a chunk finds it in cache: the screen then costs a
# fraction of the cast instead of another trip through memory.
_CHUNK_ELEMENTS = 1 << 20


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch with one intra-op thread for the duration, the caller's count restored after.

    A conversion is a stream of memory-bound casts beside a reader and a sync thread: torch's own thread
    pool only adds contention (two threads on two cores measured twice as slow). Parallelism comes from
    worker processes over files instead. A library call must not leave the caller's setting changed."""
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(slots=True)
class CastStats:
    """What a cast did to the values: counted, never guessed."""

    overflow: int = 0  # finite values that became ±inf (±448 in float8_e4m3fn, NaN in the fnuz formats)
    underflow: int = 0  # finite non-zero values that became zero
    nonfinite: int = 0  # NaN/inf already in the input (reported, not created)
    inf_changed: int = 0  # of those, ±inf the target has no inf for: became ±max or NaN, not kept

    def add(self, other: CastStats) -> None:
        self.overflow += other.overflow
        self.underflow += other.underflow
        self.nonfinite += other.nonfinite
        self.inf_changed += other.inf_changed


def _real(dt: torch.dtype) -> torch.dtype:
    """The real dtype of a complex one's parts; a real dtype itself."""
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    return {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dt, dt)


def _checkable(t: torch.Tensor) -> torch.Tensor:
    """``t`` in a dtype whose reductions torch implements on CPU (not float8, not complex32)."""
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    if t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128):
        return t
    return t.to(torch.complex64 if t.is_complex() else torch.float32)


@functools.cache
def _limits(dst_dtype: torch.dtype) -> tuple[float, float | None, bool]:
    """(largest magnitude that surely survives the cast, saturation threshold or None, has an inf).

    float8_e4m3fn has no inf and torch's cast saturates at ±448: overflow leaves no inf to count, so it
    is counted from the input. Halfway to the next step above 448 (480) is where a value stops merely
    rounding to 448: beyond 464 the cast changed the value. Whether the target has an inf is asked of
    torch itself (float8_e4m3fn makes an inf ±448; float8_e4m3fnuz and float8_e5m2fnuz make it NaN).
    """
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    info = torch.finfo(_real(dst_dtype))
    has_inf = math.isinf(_inf_becomes(dst_dtype))
    return float(info.max), 464.0 if dst_dtype == torch.float8_e4m3fn else None, has_inf


@functools.cache
def _inf_becomes(dt: torch.dtype) -> float:
    """What torch's cast to ``dt`` makes of +inf: inf, the largest finite value (float8_e4m3fn) or NaN."""
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    return float(torch.tensor(float("inf")).to(_real(dt)).to(torch.float64))


def beyond_range(target: str) -> str:
    """What a value beyond ``target``'s range (and an inf) becomes: ``±inf``, ``±448`` or ``NaN``, as torch casts."""
    got = _inf_becomes(torch_dtype(target))
    if math.isinf(got):
        return "±inf"
    if math.isnan(got):
        return "NaN"
    return f"±{got:g}"


def _count_range(s: torch.Tensor, o: torch.Tensor, dst_dtype: torch.dtype, stats: CastStats) -> None:
    """Add one chunk's overflow, underflow and NaN/inf counts (``o`` is ``s`` cast)."""
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    safe, saturate, has_inf = _limits(dst_dtype)
    sc = _checkable(s)
    oc = _checkable(o)
    size = sc.numel()
    if size:
        real = torch.view_as_real(sc) if sc.is_complex() else sc
        # One min/max pass clears almost every chunk: isfinite is ~30x slower than aminmax on CPU.
        # An inf fails it too, so counting infs the target cannot hold costs nothing in the common case.
        lo, hi = torch.aminmax(real)
        if not (float(lo) >= -safe and float(hi) <= safe):  # NaN fails both comparisons
            bad_in = size - int(torch.count_nonzero(torch.isfinite(sc)))
            stats.nonfinite += bad_in
            if bad_in and not has_inf:  # complex targets all have inf: only a real source gets here
                stats.inf_changed += int(torch.count_nonzero(torch.isinf(real)))
            if saturate is not None:
                stats.overflow += int(torch.count_nonzero((real.abs() > saturate) & torch.isfinite(real)))
            else:
                # A non-finite input stays non-finite (an inf may become NaN), so the difference is what
                # the cast broke.
                stats.overflow += size - int(torch.count_nonzero(torch.isfinite(oc))) - bad_in
    # A zero stays zero, so the difference is what flushed to zero; the input is scanned only when needed.
    zero_out = size - int(torch.count_nonzero(oc))
    if zero_out:
        stats.underflow += zero_out - (size - int(torch.count_nonzero(sc)))


@functools.cache
def _screen_bits(dst_dtype: torch.dtype) -> tuple[torch.dtype, int, int] | None:
    """(integer dtype of the same width, magnitude mask, bit pattern of +inf) for a target with an inf;
    None where a cast saturates or has no inf (float8_e4m3fn and the fnuz formats), which the screen
    below cannot see through."""
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    real = _real(dst_dtype)
    if not math.isinf(_inf_becomes(dst_dtype)) or not real.is_floating_point:
        return None
    width = torch.finfo(real).bits
    ints = {8: torch.int8, 16: torch.int16, 32: torch.int32, 64: torch.int64}
    inf_bits = int(torch.tensor(float("inf"), dtype=real).view(ints[width]).item())
    return ints[width], (1 << (width - 1)) - 1, inf_bits


_INTS = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


def _magnitudes(t: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``t``'s bits with the sign masked off, as integers of its width (a complex chunk's parts side by
    side): 0 only for ±0, at least the pattern of inf only for inf and NaN."""
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    width = t.element_size() // (2 if t.is_complex() else 1)
    raw = t.view(getattr(torch, _INTS[width]))
    if raw.numel() != t.numel():
        raw = raw.view(-1)
    return torch.bitwise_and(raw, (1 << (8 * width - 1)) - 1, out=scratch[: raw.numel()])


def _screen(
    o: torch.Tensor, bits: tuple[torch.dtype, int, int], scratch: torch.Tensor
) -> tuple[bool, bool, torch.Tensor]:
    """(any zero, any inf or NaN, the magnitudes) of the cast chunk ``o``, in one pass over its bits.

    With neither, nothing overflowed, nothing flushed to zero and the input had no NaN/inf: the exact
    counting can be skipped. That is a fifth of what counting zeros and a min/max of the input cost, and
    an input without zeros or non-finite values (almost every weight) never needs more."""
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    m = _magnitudes(o, scratch)
    lo, hi = torch.aminmax(m)
    return int(lo) == 0, int(hi) >= bits[2], m


def _zeros(m: torch.Tensor) -> int:
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    return m.numel() - int(torch.count_nonzero(m))


def cast(src: torch.Tensor, dst_dtype: torch.dtype) -> tuple[torch.Tensor, CastStats]:
    """``src`` (contiguous) cast to ``dst_dtype`` in chunks, counting overflow, underflow and NaN/inf."""
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ComplexHalf support is experimental": complex32 is what was asked
        out = torch.empty(src.shape, dtype=dst_dtype)  # the loop below copies into every element
    stats = CastStats()
    flat_s = src.reshape(-1)
    flat_o = out.view(-1)
    bits = _screen_bits(dst_dtype)
    parts = 2 if dst_dtype.is_complex else 1
    scratch = torch.empty(min(flat_o.numel(), _CHUNK_ELEMENTS) * parts, dtype=bits[0]) if bits else None
    src_scratch: torch.Tensor | None = None
    # A real source's zeros can be counted from its bits too (complex ones go the exact way).
    src_ints = None if src.is_complex() or not src.is_floating_point() else _INTS.get(src.element_size())
    for lo in range(0, flat_s.numel(), _CHUNK_ELEMENTS):
        s = flat_s[lo : lo + _CHUNK_ELEMENTS]
        o = flat_o[lo : lo + _CHUNK_ELEMENTS]
        o.copy_(s)
        if bits is None or scratch is None:
            _count_range(s, o, dst_dtype, stats)
            continue
        zeros, nonfinite, m = _screen(o, bits, scratch)
        if not zeros and not nonfinite:
            continue
        if nonfinite or src_ints is None:
            _count_range(s, o, dst_dtype, stats)
            continue
        # Zeros but nothing non-finite: no overflow and no NaN/inf in the input (the target has an inf, so
        # either would show); what flushed to zero is the zeros out less the zeros in.
        if src_scratch is None:
            src_scratch = torch.empty(min(flat_s.numel(), _CHUNK_ELEMENTS), dtype=getattr(torch, src_ints))
        stats.underflow += _zeros(m) - _zeros(_magnitudes(s, src_scratch))
    return out, stats


def overflow_error(stats: dict[str, CastStats], target: str) -> CheckFailedError | None:
    """The error that stops a conversion whose casts overflowed (exit 1), or None."""
    bad = [(name, s) for name, s in stats.items() if s.overflow or s.inf_changed]
    if not bad:
        return None
    beyond = beyond_range(target)
    no_inf = "" if beyond == "±inf" else ", which has no inf"
    lines = ", ".join(f"{name} ({_out_of_range(s)})" for name, s in bad[:20])
    more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
    return CheckFailedError(
        f"{count(len(bad), 'tensor')} would overflow to {beyond} in {target}{no_inf}: {lines}{more}. "
        "Nothing was written. Keep them in their dtype with --exclude GLOB (or --keep-buffers), convert to a "
        "wider dtype such as bf16, or accept it with --allow-overflow"
    )


def _out_of_range(s: CastStats) -> str:
    """``2 values``, ``1 ±inf value`` or ``3 values, 1 of them ±inf``: what the target cannot hold."""
    if not s.inf_changed:
        return count(s.overflow, "value")
    if not s.overflow:
        return count(s.inf_changed, "±inf value")
    return f"{s.overflow + s.inf_changed} values, {s.inf_changed} of them ±inf"


def range_findings(stats: dict[str, CastStats], target: str | None) -> list[Finding]:
    """Overflow (allowed), underflow, infinities the target has no inf for, and NaN/inf already in the
    input that the output keeps, one finding per tensor and kind."""
    out = FindingCap()  # a million tensors that all overflow: a hundred findings and a count
    for name, s in stats.items():
        beyond = beyond_range(target) if target and (s.overflow or s.nonfinite) else "±inf"
        if s.overflow:
            msg = f"{name}: {count(s.overflow, 'value')} became {beyond} in {target}"
            out.add(Finding("warning", "overflow", msg))
        if s.underflow:
            msg = f"{name}: {s.underflow} non-zero values became zero in {target}"
            out.add(Finding("warning", "underflow", msg))
        if s.inf_changed:
            infs = count(s.inf_changed, "±inf value")
            msg = f"{name}: {infs} in the input became {beyond} in {target}, which has no inf"
            out.add(Finding("warning", "inf-changed", msg))
        kept = s.nonfinite - s.inf_changed
        if kept:
            what = count(kept, "NaN/inf value" if beyond == "±inf" else "NaN value")  # without an inf only NaN is kept
            out.add(Finding("info", "nonfinite-input", f"{name}: {what} in the input, kept"))
    return out.findings()
