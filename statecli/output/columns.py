"""Every result's columns, declared once: header, cell text, alignment, style, and when a narrow terminal
may leave the column out. The table, CSV and Markdown writers take a column set and derive everything
else from it, so no writer knows a column by its position.

Two kinds of set per result where the two differ: the table's (for people: ``2,368``, ``9.2 KiB``,
``parameter ●``) and the record's (for machines: ``2368``, ``9472``, ``parameter`` and ``true``). No rich
here: CSV and Markdown are written without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from statecli.clip import printable
from statecli.records import TensorInfo
from statecli.wording import name_list, shape_text

if TYPE_CHECKING:
    from statecli.checking import RuleResult
    from statecli.conversion import CastStats, PlanItem
    from statecli.diff import DiffReport, TensorDiff
    from statecli.stats import TensorStats

T = TypeVar("T")

EXACT_MARK = "●"
NON_PERSISTENT = "np"
INFERRED_MARK = "○"
UNKNOWN = "—"

ROLE_STYLES = {"parameter": "green", "buffer": "cyan", "other": "magenta"}
GRAD_STYLES = {"trainable": "green", "frozen": "blue", "no grad": "dim", "requires grad": "yellow", UNKNOWN: "dim"}
STATUS_STYLES = {
    "differs": "bold red",
    "only in A": "bold red",
    "only in B": "bold red",
    "close": "yellow",
    "unchecked": "yellow",
    "changed": "cyan",
    "identical": "dim",
}

MAX_SHARERS_SHOWN = 3  # names in a row's Shares cell

Style = str | Callable[[Any, str], str] | None


@dataclass(frozen=True, slots=True)
class Column(Generic[T]):
    """One column of a result: ``value`` makes a row's cell text from the row's item.

    ``style`` is a rich style name, or a function of the item and its cell text giving one (empty for
    none). ``hide`` marks a column a narrow terminal may leave out: the lowest number goes first;
    ``None`` always shows. ``own`` marks a column whose cells are the item's own (a name): a grid told what
    the other cells are made of (``same``) makes those once per distinct row, these once per item.
    """

    header: str
    value: Callable[[T], str]
    right: bool = False
    style: Style = None
    hide: int | None = None
    own: bool = False

    def style_of(self, item: T, cell: str) -> str:
        s = self.style
        if s is None:
            return ""
        return s if isinstance(s, str) else s(item, cell)


# --- cells ----------------------------------------------------------------------------------------

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_bytes(n: int) -> str:
    """``256 B``, ``1.5 KiB``, ``3.2 MiB`` (powers of 1024)."""
    if abs(n) < 1024:
        return f"{n} B"
    value = float(n)
    for unit in _UNITS:
        value /= 1024
        if abs(round(value, 1)) < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def clean(text: str) -> str:
    """``text`` with control characters shown as escapes (``\\x1b``), so a name from a file cannot
    drive the terminal (hide what follows, set the clipboard, forge a line). Printable text is kept;
    the same rule as :func:`statecli.safepickle.printable`, which error messages use."""
    return printable(text)


def role_label(t: TensorInfo) -> str:
    """``parameter ●`` (exact) or ``buffer ○`` (inferred); ``np`` after a non-persistent buffer."""
    label = f"{t.role} {EXACT_MARK if t.exact else INFERRED_MARK}"
    return f"{label} {NON_PERSISTENT}" if t.persistent is False else label


def number_text(x: float | None, digits: int = 3) -> str:
    """``3.2e-05``, ``0``, ``inf``; ``—`` when not computed."""
    if x is None:
        return UNKNOWN
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def stat_text(v: float | None) -> str:
    """A statistic in the stats table: four significant digits."""
    return number_text(v, 4)


def record_cell(value: Any) -> str:
    """A record's cell: empty for ``None``, ``true``/``false``, else ``str``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _role_style(t: Any, cell: str) -> str:
    return ROLE_STYLES.get(t.role, "")


# --- inspect ----------------------------------------------------------------------------------------

INSPECT_TABLE: tuple[Column[TensorInfo], ...] = (
    # torch allows a key '' (JSON and CSV keep it empty; a blank cell reads as missing)
    Column("Name", lambda t: t.name or "''", own=True),
    Column("Role", role_label, style=_role_style),
    Column("Evidence", attrgetter("evidence"), style="dim", hide=2),
    Column("DType", attrgetter("dtype")),
    Column("Shape", lambda t: shape_text(t.shape)),
    Column("Numel", lambda t: f"{t.numel:,}", right=True, hide=1),
    Column("Size", lambda t: human_bytes(t.nbytes), right=True),
    Column(
        "Device",
        lambda t: t.device if t.device is not None else UNKNOWN,
        style=lambda t, _: "dim" if t.device is None else "",
        hide=4,
    ),
    Column("Grad", attrgetter("trainable"), style=lambda t, _: GRAD_STYLES.get(t.trainable, ""), hide=3),
)
# At most a few names a row: 100,000 tensors on one storage list 64 sharers each (JSON has them).
SHARES: Column[TensorInfo] = Column("Shares", lambda t: name_list(t.shares_with, MAX_SHARERS_SHOWN), hide=5, own=True)


def inspect_same(t: TensorInfo) -> tuple[Any, ...]:
    """Everything the inspect table's cells other than Name and Shares are made of (and their styles: Role's
    and Grad's by role, Device's by device): tensors alike in these show the same cells there."""
    # A tuple display, not an attrgetter: measured faster.
    return (t.role, t.exact, t.persistent, t.evidence, t.dtype, t.shape, t.numel, t.nbytes, t.device, t.requires_grad)


def inspect_table(tensors: Sequence[TensorInfo]) -> tuple[Column[TensorInfo], ...]:
    """:data:`INSPECT_TABLE`, and Shares when any tensor shares its storage with another."""
    return (*INSPECT_TABLE, SHARES) if any(map(attrgetter("shares_with"), tensors)) else INSPECT_TABLE


# --format csv and markdown: one row per tensor, the JSON record's fields as text.
INSPECT_RECORD: tuple[Column[TensorInfo], ...] = (
    Column("name", attrgetter("name")),
    Column("role", attrgetter("role")),
    Column("exact", lambda t: record_cell(t.exact)),
    Column("evidence", attrgetter("evidence")),
    Column("persistent", lambda t: record_cell(t.persistent)),
    Column("requires_grad", lambda t: record_cell(t.requires_grad)),
    Column("dtype", attrgetter("dtype")),
    Column("shape", lambda t: shape_text(t.shape, "")),
    Column("numel", lambda t: str(t.numel), right=True),
    Column("nbytes", lambda t: str(t.nbytes), right=True),
    Column("device", lambda t: record_cell(t.device)),
    Column("shares_with", lambda t: ";".join(t.shares_with)),
    Column("group", attrgetter("group")),
    Column("file", lambda t: record_cell(t.file)),
)


# --- convert --dry-run --------------------------------------------------------------------------


def _plan_device(i: PlanItem) -> str:
    src_dev = i.source.device or UNKNOWN
    dst_dev = i.dst_device or UNKNOWN  # safetensors output stores no device
    return src_dev if src_dev == dst_dev or i.dst_device is None else f"{src_dev} → {dst_dev}"


PLAN_TABLE: tuple[Column[PlanItem], ...] = (
    Column("Name", attrgetter("name")),
    Column("Role", lambda i: f"{i.role} {EXACT_MARK if i.exact else INFERRED_MARK}", style=_role_style, hide=3),
    Column("From", attrgetter("src_dtype")),
    Column(
        "To",
        lambda i: i.dst_dtype if i.action == "cast" else "=",
        style=lambda i, _: "bold" if i.action == "cast" else "dim",
    ),
    Column("Shape", lambda i: shape_text(i.shape), hide=2),
    Column("Size", lambda i: human_bytes(i.nbytes_out), right=True, hide=4),
    Column("Device", _plan_device, hide=1),
    Column("Why", lambda i: f"same memory as {i.alias_of}" if i.alias_of else i.reason, style="dim"),
)


def range_text(s: CastStats | None) -> str:
    """``3 overflow, 1 underflow``: what a cast did to the values; empty when nothing."""
    if s is None:
        return ""
    parts = []
    if s.overflow:
        parts.append(f"{s.overflow:,} overflow")
    if s.underflow:
        parts.append(f"{s.underflow:,} underflow")
    if s.nonfinite:
        parts.append(f"{s.nonfinite:,} NaN/inf in input")
    return ", ".join(parts)


def plan_table(stats: dict[str, CastStats] | None = None) -> tuple[Column[PlanItem], ...]:
    """:data:`PLAN_TABLE`, and Range when the casts' value statistics are known."""
    if not stats:
        return PLAN_TABLE
    found = stats
    rng: Column[PlanItem] = Column(
        "Range", lambda i: range_text(found.get(i.name)), style=lambda i, cell: "yellow" if cell else ""
    )
    return (*PLAN_TABLE, rng)


# --- stats ----------------------------------------------------------------------------------------

TOTAL = "(total)"


def _stat(name: str) -> Callable[[TensorStats], str]:
    get = attrgetter(name)
    return lambda t: UNKNOWN if t.skipped else stat_text(get(t))


def _tally(name: str) -> Callable[[TensorStats], str]:
    get = attrgetter(f"moments.{name}")
    return lambda t: UNKNOWN if t.skipped else f"{get(t):,}"


def _alarm(t: TensorStats, cell: str) -> str:
    return "bold red" if cell not in ("0", UNKNOWN) else ""


STATS_TABLE: tuple[Column[TensorStats], ...] = (
    Column("Name", attrgetter("name")),
    Column("DType", attrgetter("dtype"), style="dim", hide=7),
    Column("Shape", lambda t: shape_text(t.shape) if t.name != TOTAL else f"{t.numel:,} values", hide=5),
    Column("Min", _stat("min"), right=True),
    Column("Max", _stat("max"), right=True),
    Column("Mean", _stat("mean"), right=True, hide=6),
    Column("Std", _stat("std"), right=True, hide=4),
    Column("Absmax", _stat("absmax"), right=True, hide=2),
    Column("L2", _stat("l2"), right=True, hide=1),
    Column("NaN", _tally("nan"), right=True, style=_alarm),
    Column("+Inf", _tally("posinf"), right=True, style=_alarm),
    Column("-Inf", _tally("neginf"), right=True, style=_alarm),
    Column("Zeros", _tally("zeros"), right=True, hide=3),
)


def stats_row_style(t: TensorStats) -> str:
    """The total line is bold throughout."""
    return "bold" if t.name == TOTAL else ""


def _field(name: str) -> Column[dict[str, Any]]:
    def cell(d: dict[str, Any]) -> str:
        v = d[name]
        return shape_text(v, "") if isinstance(v, list) else record_cell(v)

    return Column(name, cell)


# One row per tensor and the total, from each record's JSON dict.
STATS_RECORD: tuple[Column[dict[str, Any]], ...] = tuple(
    _field(n)
    for n in (
        "name",
        "dtype",
        "shape",
        "numel",
        "role",
        "min",
        "max",
        "mean",
        "std",
        "absmax",
        "l2",
        "nan",
        "posinf",
        "neginf",
        "zeros",
        "skipped",
    )
)


# --- diff -----------------------------------------------------------------------------------------

ONLY = ("only in A", "only in B")


class OneSided:
    """A name on one side of a diff only, with :class:`statecli.diff.TensorDiff`'s fields, the other side
    ``None``, so one column set serves both kinds of row."""

    __slots__ = ("dtype_a", "dtype_b", "name", "notes", "shape_a", "shape_b", "status")
    max_abs = max_rel = cosine = equal = within_tolerance = mismatched = None

    def __init__(self, side: str, t: TensorInfo) -> None:
        self.name = t.name
        self.status = f"only in {side}"
        a = side == "A"
        self.dtype_a, self.dtype_b = (t.dtype, None) if a else (None, t.dtype)
        self.shape_a, self.shape_b = (t.shape, None) if a else (None, t.shape)
        self.notes = () if t.group == "model" else (f"{t.group} state",)


def diff_items(report: DiffReport, show_all: bool = True) -> list[TensorDiff | OneSided]:
    """The common tensors in A's order (the identical ones only with ``show_all``), then the names on one side."""
    items: list[TensorDiff | OneSided] = [t for t in report.tensors if show_all or t.status != "identical"]
    items += [OneSided("A", t) for t in report.only_in_a]
    items += [OneSided("B", t) for t in report.only_in_b]
    return items


def _change(a: Any, b: Any, text: Callable[[Any], str]) -> str:
    if a is None or b is None:
        return text(b if a is None else a)
    return text(a) if a == b else f"{text(a)} → {text(b)}"


def _common(text: Callable[[TensorDiff], str]) -> Callable[[TensorDiff | OneSided], str]:
    return lambda t: "" if t.status in ONLY else text(t)  # type: ignore[arg-type]


DIFF_TABLE: tuple[Column[TensorDiff | OneSided], ...] = (
    Column("Name", attrgetter("name")),
    Column("Status", attrgetter("status"), style=lambda t, _: STATUS_STYLES.get(t.status, "")),
    Column("DType", lambda t: _change(t.dtype_a, t.dtype_b, str), hide=4),
    Column("Shape", lambda t: _change(t.shape_a, t.shape_b, shape_text), hide=3),
    Column("Max abs", _common(lambda t: number_text(t.max_abs)), right=True),
    Column("Max rel", _common(lambda t: number_text(t.max_rel)), right=True, hide=2),
    Column("Cosine", _common(lambda t: number_text(t.cosine, 7) if t.cosine != 1.0 else "1"), right=True, hide=1),
    Column("Notes", lambda t: "; ".join(t.notes), style="dim", hide=5),
)


def _computed(v: Any) -> str:
    """Numbers as computed (``repr``), not rounded as in the table."""
    return repr(v) if isinstance(v, float) else record_cell(v)


def _side(name: str, text: Callable[[Any], str]) -> Column[TensorDiff | OneSided]:
    get = attrgetter(name)
    return Column(name, lambda t: "" if get(t) is None else text(get(t)))


DIFF_RECORD: tuple[Column[TensorDiff | OneSided], ...] = (
    Column("name", attrgetter("name")),
    Column("status", attrgetter("status")),
    _side("dtype_a", str),
    _side("dtype_b", str),
    _side("shape_a", lambda s: shape_text(s, "")),
    _side("shape_b", lambda s: shape_text(s, "")),
    *(
        Column(n, lambda t, get=attrgetter(n): _computed(get(t)))
        for n in ("max_abs", "max_rel", "cosine", "equal", "within_tolerance", "mismatched")
    ),
    Column("notes", lambda t: "; ".join(t.notes)),
)


# --- check ----------------------------------------------------------------------------------------


def _mark(r: RuleResult) -> str:
    return ("!" if r.allowed else "✔") if r.passed else "✘"


def _outcome(r: RuleResult) -> str:
    return (f"{len(r.allowed)} allowed" if r.allowed else "pass") if r.passed else f"{len(r.failures)} failed"


def _verdict_style(r: RuleResult, cell: str) -> str:
    return ("yellow" if r.allowed else "green") if r.passed else "bold red"


CHECK_TABLE: tuple[Column[RuleResult], ...] = (
    Column("", _mark, style=_verdict_style),
    Column("Rule", lambda r: clean(r.id)),
    Column("Expects", lambda r: clean(r.expected), style="dim"),
    Column("Checked", lambda r: f"{r.checked:,}", right=True),
    Column("Result", _outcome, style=_verdict_style),
)
