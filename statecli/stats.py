"""Value statistics per tensor and in total: min, max, mean, std, absmax, L2 norm, NaN/±inf/zero counts.

Values are read one storage at a time (:mod:`statecli.values`) and reduced in chunks; chunk results
are combined in float64 with Chan's formula, so a 2 GB checkpoint costs one chunk of memory and the
mean and std of a billion values stay accurate. Statistics are over the finite values; NaN and ±inf
are counted apart. Complex tensors are summarised by magnitude; bool and integer tensors as numbers.
A value that was not computed (a tensor not read, or one without a finite value) is ``None``, never 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from statecli.records import Report, TensorInfo
from statecli.tensors.values import iter_pieces, iter_values, readable

if TYPE_CHECKING:
    import torch

SCHEMA = "statecli.stats/1"
_CHUNK = 1 << 20  # elements: small enough that float32 reductions inside a chunk stay accurate


@dataclass(slots=True)
class Moments:
    """Running statistics over finite values, mergeable across chunks and tensors."""

    count: int = 0  # finite values
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean
    min: float = math.inf
    max: float = -math.inf
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    zeros: int = 0

    def merge(self, o: Moments) -> None:
        if o.count:
            n = self.count + o.count
            delta = o.mean - self.mean
            self.mean += delta * o.count / n
            self.m2 += o.m2 + delta * delta * self.count * o.count / n
            self.count = n
            self.min = min(self.min, o.min)
            self.max = max(self.max, o.max)
        self.nan += o.nan
        self.posinf += o.posinf
        self.neginf += o.neginf
        self.zeros += o.zeros


def _count(name: str) -> Any:
    """A property: ``moments``' count ``name``, or None when the values were not read."""
    return property(lambda self: getattr(self.moments, name) if self.read else None)


@dataclass(slots=True)
class TensorStats:
    """One tensor's statistics (or the total's). ``skipped`` says why values were not read; then every
    statistic, counts included, is ``None``: a 0 would claim the values were checked."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    role: str
    moments: Moments = field(default_factory=Moments)
    skipped: str | None = None
    histogram: tuple[list[int], float, float] | None = None  # counts, low edge, high edge
    bins: int = 0  # histogram bins asked for: then every record carries ``histogram``, null where none was drawn

    @property
    def read(self) -> bool:
        return self.skipped is None

    nan = _count("nan")
    posinf = _count("posinf")
    neginf = _count("neginf")
    zeros = _count("zeros")

    @property
    def min(self) -> float | None:
        return self.moments.min if self.moments.count else None

    @property
    def max(self) -> float | None:
        return self.moments.max if self.moments.count else None

    @property
    def mean(self) -> float | None:
        return self.moments.mean if self.moments.count else None

    @property
    def std(self) -> float | None:
        m = self.moments
        return math.sqrt(max(m.m2, 0.0) / m.count) if m.count else None

    @property
    def absmax(self) -> float | None:
        m = self.moments
        return max(abs(m.min), abs(m.max)) if m.count else None

    @property
    def l2(self) -> float | None:
        m = self.moments
        return math.sqrt(max(m.m2 + m.count * m.mean * m.mean, 0.0)) if m.count else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "numel": self.numel,
            "role": self.role,
            "min": self.min,
            "max": self.max,
            "mean": self.mean,
            "std": self.std,
            "absmax": self.absmax,
            "l2": self.l2,
            "nan": self.nan,
            "posinf": self.posinf,
            "neginf": self.neginf,
            "zeros": self.zeros,
            "skipped": self.skipped,
        }
        if self.histogram is not None:
            counts, lo, hi = self.histogram
            out["histogram"] = {"counts": counts, "low": lo, "high": hi}
        elif self.bins:
            out["histogram"] = None
        return out


@dataclass(slots=True)
class StatsReport:
    path: str
    format: str
    tensors: list[TensorStats]
    total: TensorStats

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "path": self.path,
            "format": self.format,
            "tensors": [t.to_dict() for t in self.tensors],
            "total": self.total.to_dict(),
        }


def _as_real(chunk: torch.Tensor) -> torch.Tensor:
    """float32/float64 values torch can reduce quickly: magnitudes for complex, numbers for the rest."""
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    if chunk.is_complex():
        return chunk.to(torch.complex64).abs() if chunk.dtype == torch.complex32 else chunk.abs()
    if chunk.dtype in (torch.float32, torch.float64):
        return chunk
    if chunk.dtype in (torch.int64, torch.uint64, torch.int32, torch.uint32):
        return chunk.to(torch.float64)  # exact up to 2**53, where float32 is exact only to 2**24
    return chunk.to(torch.float32)


def _chunk_moments(x: torch.Tensor) -> Moments:
    """Moments of one 1-D chunk (already real)."""
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    m = Moments()
    n = x.numel()
    if n == 0:
        return m
    m.zeros = n - int(torch.count_nonzero(x))
    lo, hi = torch.aminmax(x)
    lo_f, hi_f = float(lo), float(hi)
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
        # Rare: only now pay for the masks (isnan/isinf cost ~20x a min/max pass on CPU).
        nan = torch.isnan(x)
        m.nan = int(torch.count_nonzero(nan))
        m.posinf = int(torch.count_nonzero(torch.isposinf(x)))
        m.neginf = int(torch.count_nonzero(torch.isneginf(x)))
        x = x[torch.isfinite(x)]
        n = x.numel()
        if n == 0:
            return m
        lo, hi = torch.aminmax(x)
        lo_f, hi_f = float(lo), float(hi)
    mean = float(x.sum()) / n
    d = x - mean
    m.count = n
    m.mean = mean
    # dot is a BLAS call: ~15x faster here than a float64 sum of squares; chunks keep it accurate.
    m.m2 = float(torch.dot(d, d))
    m.min, m.max = lo_f, hi_f
    return m


def tensor_stats(
    t: TensorInfo,
    values: torch.Tensor | list[torch.Tensor] | Iterator[torch.Tensor] | None,
    histogram_bins: int = 0,
) -> TensorStats:
    """Statistics of one tensor's ``values``: a tensor, or its 1-D pieces in order (``None``: not readable,
    see :func:`statecli.tensors.values.readable`). A histogram needs the values whole (one piece)."""
    ts = TensorStats(t.name, t.dtype, t.shape, t.numel, t.role, bins=histogram_bins)
    if values is None:
        ts.skipped = readable(t) or "not readable"
        return ts
    pieces = [values.reshape(-1)] if not isinstance(values, (list, Iterator)) else values
    flat = None
    for piece in pieces:
        flat = piece
        for lo in range(0, piece.numel(), _CHUNK):
            ts.moments.merge(_chunk_moments(_as_real(piece[lo : lo + _CHUNK])))
    if histogram_bins and ts.moments.count and flat is not None:
        ts.histogram = _histogram(flat, histogram_bins, ts.moments.min, ts.moments.max)
    return ts


def _histogram(flat: torch.Tensor, bins: int, lo: float, hi: float) -> tuple[list[int], float, float]:
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    # One value: histc needs a range, so the bins span [lo, lo + 1) and every value lands in the first;
    # the edges reported stay the values' own (low == high says "constant").
    top = hi if hi > lo else lo + 1.0
    counts = torch.zeros(bins, dtype=torch.int64)
    for start in range(0, flat.numel(), _CHUNK):
        x = _as_real(flat[start : start + _CHUNK]).to(torch.float64)
        x = x[torch.isfinite(x)]
        counts += torch.histc(x, bins=bins, min=lo, max=top).to(torch.int64)
    return [int(c) for c in counts], lo, hi


def compute(
    report: Report,
    keep: Callable[[TensorInfo], bool] | None = None,
    histogram_bins: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> StatsReport:
    """Statistics for each tensor of ``report`` that ``keep`` accepts, and their total."""
    tensors: list[TensorStats] = []
    done_bytes = 0
    # Streaming keeps memory at one piece; a histogram needs min and max first, so it reads tensors whole.
    source = iter_values(report, keep) if histogram_bins else iter_pieces(report, keep)
    for t, values in source:
        tensors.append(tensor_stats(t, values, histogram_bins))
        done_bytes += t.nbytes
        if progress is not None:
            progress(done_bytes, len(tensors))
    order = {t.name: i for i, t in enumerate(report.tensors)}
    tensors.sort(key=lambda s: order.get(s.name, 0))  # shared storages come out together; show file order
    total = total_of(tensors)
    total.bins = histogram_bins
    return StatsReport(report.path, report.format, tensors, total)


def total_of(tensors: Iterable[TensorStats]) -> TensorStats:
    """The tensors' statistics together: over the values read; ``numel`` counts every tensor's."""
    total = TensorStats("(total)", "", (), 0, "")
    seen = read = 0
    for t in tensors:
        seen += 1
        total.numel += t.numel
        if t.read:
            read += 1
            total.moments.merge(t.moments)
    if seen and not read:
        total.skipped = "no tensor was read"
    return total
