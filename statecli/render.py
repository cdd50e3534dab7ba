"""rich renderables for reports and trees. Every function returns a renderable; the caller prints it.

Strings that come from a checkpoint (tensor names, paths, keys, metadata, finding messages) are put in
:class:`rich.text.Text` objects, never into markup strings: rich then never reads ``[bold]`` or
``:emoji:`` in them, so ``layer[0].weight`` prints as itself (stronger than ``rich.markup.escape``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

if TYPE_CHECKING:
    from statecli.checking import CheckResult
    from statecli.conversion.execute import CastStats
    from statecli.conversion.plan import Plan, PlanItem
    from statecli.stats import StatsReport, TensorStats

from statecli.clip import describe, describe_name, printable
from statecli.records import Report, TensorInfo, Totals
from statecli.tree import TreeNode
from statecli.wording import count, name_list

EXACT_MARK = "●"
NON_PERSISTENT = "np"
INFERRED_MARK = "○"
UNKNOWN = "—"

ROLE_STYLES = {"parameter": "green", "buffer": "cyan", "other": "magenta"}
LEVEL_STYLES = {"info": "blue", "warning": "yellow", "dangerous": "bold red"}
GRAD_STYLES = {"trainable": "green", "frozen": "blue", "no grad": "dim", "requires grad": "yellow", UNKNOWN: "dim"}

BAR_CELLS = 10
_EIGHTHS = " ▏▎▍▌▋▊▉"
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


def bar(fraction: float, cells: int = BAR_CELLS) -> str:
    """``fraction`` (0..1) as ``cells`` characters of block elements, in eighths: ``████▌     ``."""
    fraction = max(0.0, min(1.0, fraction))
    eighths = max(round(fraction * cells * 8), 1 if fraction > 0 else 0)  # a non-empty part always shows
    full, part = divmod(eighths, 8)
    text = "█" * full + (_EIGHTHS[part] if part else "")
    return text.ljust(cells)


def role_label(t: TensorInfo) -> str:
    """``parameter ●`` (exact) or ``buffer ○`` (inferred); ``np`` after a non-persistent buffer."""
    label = f"{t.role} {EXACT_MARK if t.exact else INFERRED_MARK}"
    return f"{label} {NON_PERSISTENT}" if t.persistent is False else label


def role_text(t: TensorInfo) -> Text:
    """:func:`role_label`, coloured by role."""
    return Text(role_label(t), style=ROLE_STYLES.get(t.role, ""))


def shape_text(shape: Sequence[int]) -> str:
    """``64×3×3``; ``scalar`` for a 0-dim tensor."""
    return "×".join(str(d) for d in shape) if shape else "scalar"


def clean(text: str) -> str:
    """``text`` with control characters shown as escapes (``\\x1b``), so a name from a file cannot
    drive the terminal (hide what follows, set the clipboard, forge a line). Printable text is kept;
    the same rule as :func:`statecli.safepickle.printable`, which error messages use."""
    return printable(text)


def _width(text: str) -> int:
    # The marks statecli adds (● ○ × —) are one cell wide; only names from files may hold wide characters.
    return len(text) if text.isascii() else cell_len(text)


# Characters one terminal cell wide: printable ASCII and the marks statecli itself writes.
_ONE_CELL = frozenset(map(chr, range(0x20, 0x7F))) | frozenset("●○×—…→")


def _narrow(column: Iterable[str]) -> bool:
    """Every character of every cell is one cell wide, so ``len`` measures them."""
    text = "".join(column)
    return text.isascii() or set(text) <= _ONE_CELL


def measure_columns(headers: list[str], rows: list[list[str]]) -> tuple[list[int], bool]:
    """Each column's width in cells (its header's or its widest cell's), and whether every cell is narrow
    (one cell per character). A narrow column, nearly all of them, is measured with ``len`` in one pass
    instead of a Python call per cell."""
    widths = []
    narrow = True
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(headers)
    for h, col in zip(headers, columns, strict=True):
        fits = _narrow(col)
        narrow = narrow and fits
        widths.append(max(_width(h), max(map(len if fits else _width, col), default=0)))
    return widths, narrow


class TensorGrid:
    """The tensor table: a title, a header, a rule, one aligned line per tensor.

    Not a ``rich.table.Table``: that measures, wraps and pads every cell through several layers,
    1.4 ms a row here (three minutes for 100,000 tensors). This computes each column's width once,
    never wraps; on a terminal too narrow for it, it leaves out optional columns and shortens names (see :meth:`fit`).
    """

    GAP = "  "
    RIGHT = frozenset({5, 6})  # Numel, Size
    # Columns a narrow terminal may leave out, first to go first; the rest always show.
    OPTIONAL: tuple[str, ...] = ("Numel", "Evidence", "Grad", "Device", "Shares")

    def __init__(self, report: Report) -> None:
        self.title = report.path
        self.tensors = report.tensors
        shares = any(t.shares_with for t in report.tensors)
        self.headers = ["Name", "Role", "Evidence", "DType", "Shape", "Numel", "Size", "Device", "Grad"]
        if shares:
            self.headers.append("Shares")
        self.rows: list[list[str]] = []
        for t in report.tensors:
            row = [
                t.name or "''",  # torch allows a key '' (JSON and CSV keep it empty; a blank cell reads as missing)
                role_label(t),
                t.evidence,
                t.dtype,
                shape_text(t.shape),
                f"{t.numel:,}",
                human_bytes(t.nbytes),
                t.device if t.device is not None else UNKNOWN,
                t.trainable,
            ]
            if shares:
                # At most a few names a row: 100,000 tensors on one storage list 64 sharers each (JSON has them).
                row.append(name_list(t.shares_with, MAX_SHARERS_SHOWN))
            self.rows.append(row)
        self.widths, self.narrow = measure_columns(self.headers, self.rows)

    def total_width(self, widths: list[int] | None = None) -> int:
        widths = widths or self.widths
        return sum(widths) + len(self.GAP) * (len(widths) - 1)

    def _cleaned(self) -> None:
        """Escape control characters in every cell once, before anything is measured or printed."""
        if getattr(self, "_clean", False):
            return
        self._clean = True
        self.title = clean(self.title)
        if not "".join(c for row in self.rows for c in row).isprintable():
            self.rows = [[clean(c) for c in row] for row in self.rows]
            self.widths, self.narrow = measure_columns(self.headers, self.rows)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        self._cleaned()
        return Measurement(min(self.total_width(), 20), max(self.total_width(), cell_len(self.title)))

    def fit(self, max_width: int) -> tuple[list[int], list[int]]:
        """The columns shown in ``max_width`` cells (indices into the headers) and their widths.

        Too wide: first the names give up what they can spare down to a third of the width, then the
        :attr:`OPTIONAL` columns go (those holding only ``—`` first, then in order), and only then are the
        names shortened further, to 12 cells at least. Names cut short look alike (``…unning_mean``), and a
        table wider than the terminal wraps every row onto two lines: both are worse than a missing column.
        """
        cols = list(range(len(self.headers)))
        widths = list(self.widths)
        full = widths[0]

        def total(name: int) -> int:
            return name + sum(widths[i] for i in cols[1:]) + len(self.GAP) * (len(cols) - 1)

        if total(full) <= max_width:
            return cols, widths
        floor = min(full, max(24, max_width // 3))
        index = {h: i for i, h in enumerate(self.headers)}
        optional = [index[h] for h in self.OPTIONAL if h in index]
        blank = [i for i in optional if all(row[i] in (UNKNOWN, "") for row in self.rows)]
        for i in blank + [i for i in optional if i not in blank]:
            if total(floor) <= max_width:
                break
            cols.remove(i)
        widths[0] = max(12, min(full, full - (total(full) - max_width)))
        return cols, widths

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        self._cleaned()
        cols, widths = self.fit(options.max_width)
        hidden = [h for i, h in enumerate(self.headers) if i not in cols]
        yield Segment(self.title, _style("bold"))
        yield Segment.line()
        if hidden:
            note = f"(hidden to fit the width: {', '.join(hidden)})"
            yield Segment(note if len(note) <= options.max_width else f"(hidden: {', '.join(hidden)})", _style("dim"))
            yield Segment.line()
        last = cols[-1]
        for i in cols:
            h = self.headers[i]
            bare = i == last and i not in self.RIGHT
            yield Segment(h if bare else self._pad(h, widths[i], i), _style("bold"))
            yield Segment(self.GAP if i != last else "\n")
        yield Segment("─" * (sum(widths[i] for i in cols) + len(self.GAP) * (len(cols) - 1)) + "\n")
        plain = console.no_color or console.color_system is None
        every = len(cols) == len(self.headers)
        if plain and self.narrow and every and widths == self.widths:
            # Nothing to shorten and one cell per character: str.ljust / rjust pad in C, and one segment
            # per line keeps 100,000 rows well under a second.
            just = [str.rjust if i in self.RIGHT else str.ljust for i in range(last)]
            tail = str.rjust if last in self.RIGHT else None  # the last column only when right-aligned
            gap = self.GAP
            for row in self.rows:
                cells = [pad(c, w) for pad, w, c in zip(just, widths[:last], row[:last], strict=True)]
                cells.append(row[last] if tail is None else tail(row[last], widths[last]))
                yield Segment(gap.join(cells) + "\n")
            return
        for t, row in zip(self.tensors, self.rows, strict=True):
            # The last column is not padded unless right-aligned: no trailing blanks on every line.
            cells = [row[i] if i == last and i not in self.RIGHT else self._pad(row[i], widths[i], i) for i in cols]
            if plain:
                # No styles to carry: one segment per line keeps 100,000 rows to about a second.
                yield Segment(self.GAP.join(cells) + "\n")
                continue
            styles = self._styles(t, row)
            for k, (i, cell) in enumerate(zip(cols, cells, strict=True)):
                yield Segment(cell, styles[i])
                yield Segment(self.GAP if k < len(cells) - 1 else "\n")

    def _pad(self, text: str, width: int, column: int) -> str:
        used = _width(text)
        if used > width:  # only the name column is ever narrower than its cells
            text = "…" + text[len(text) - width + 1 :]
            used = width
        pad = " " * (width - used)
        return pad + text if column in self.RIGHT else text + pad

    @staticmethod
    def _styles(t: TensorInfo, row: list[str]) -> list[Style | None]:
        styles: list[Style | None] = [None] * len(row)
        styles[1] = _style(ROLE_STYLES.get(t.role, ""))
        styles[2] = _style("dim")
        styles[7] = _style("dim") if t.device is None else None
        styles[8] = _style(GRAD_STYLES.get(t.trainable, ""))
        return styles


_STYLE_CACHE: dict[str, Style | None] = {}


def _style(name: str) -> Style | None:
    if name not in _STYLE_CACHE:
        _STYLE_CACHE[name] = Style.parse(name) if name else None
    return _STYLE_CACHE[name]


class PlanGrid(TensorGrid):
    """The conversion plan, one line per output tensor: what it is, what it becomes, and why."""

    RIGHT = frozenset({5})
    OPTIONAL = ("Device", "Shape", "Role", "Size")

    def __init__(self, plan: Plan, stats: dict[str, CastStats] | None = None) -> None:
        self.title = f"{plan.report.path} → {plan.output} ({plan.output_format})"
        self.tensors = plan.items  # type: ignore[assignment]
        self.headers = ["Name", "Role", "From", "To", "Shape", "Size", "Device", "Why"]
        stats = stats or {}
        if stats:
            self.headers.append("Range")
        self.rows = []
        for i in plan.items:
            src_dev = i.source.device or UNKNOWN
            dst_dev = i.dst_device or UNKNOWN  # safetensors output stores no device
            row = [
                i.name,
                f"{i.role} {EXACT_MARK if i.exact else INFERRED_MARK}",
                i.src_dtype,
                i.dst_dtype if i.action == "cast" else "=",
                shape_text(i.shape),
                human_bytes(i.nbytes_out),
                src_dev if src_dev == dst_dev or i.dst_device is None else f"{src_dev} → {dst_dev}",
                f"same memory as {i.alias_of}" if i.alias_of else i.reason,
            ]
            if stats:
                row.append(_range_text(stats.get(i.name)))
            self.rows.append(row)
        self.widths, self.narrow = measure_columns(self.headers, self.rows)

    @staticmethod
    def _styles(t: PlanItem, row: list[str]) -> list[Style | None]:  # type: ignore[override]
        styles: list[Style | None] = [None] * len(row)
        styles[1] = _style(ROLE_STYLES.get(t.role, ""))
        styles[3] = _style("bold" if t.action == "cast" else "dim")
        styles[7] = _style("dim")
        if len(row) > 8:
            styles[8] = _style("yellow" if row[8] else "")
        return styles


def _num(v: float | None) -> str:
    if v is None:
        return UNKNOWN
    if v == 0:
        return "0"
    return f"{v:.4g}"


class StatsGrid(TensorGrid):
    """Value statistics, one line per tensor and a total line."""

    RIGHT = frozenset(range(3, 13))
    OPTIONAL = ("L2", "Absmax", "Zeros", "Std", "Shape", "Mean", "DType")

    def __init__(self, report: StatsReport) -> None:
        self.title = report.path
        self.tensors = [*report.tensors, report.total]  # type: ignore[list-item]
        self.headers = ["Name", "DType", "Shape", "Min", "Max", "Mean", "Std", "Absmax", "L2", "NaN", "+Inf", "-Inf"]
        self.headers.append("Zeros")
        self.rows = []
        for t in self.tensors:
            m = t.moments  # type: ignore[attr-defined]
            shape = shape_text(t.shape) if t.name != "(total)" else f"{t.numel:,} values"  # type: ignore[attr-defined]
            if t.skipped:  # type: ignore[attr-defined]
                cells = [t.name, t.dtype, shape, *([UNKNOWN] * 10)]
            else:
                cells = [
                    t.name,
                    t.dtype,
                    shape,
                    *(_num(v) for v in (t.min, t.max, t.mean, t.std, t.absmax, t.l2)),  # type: ignore[attr-defined]
                    f"{m.nan:,}",
                    f"{m.posinf:,}",
                    f"{m.neginf:,}",
                    f"{m.zeros:,}",
                ]
            self.rows.append(cells)
        self.widths, self.narrow = measure_columns(self.headers, self.rows)

    @staticmethod
    def _styles(t: TensorStats, row: list[str]) -> list[Style | None]:  # type: ignore[override]
        styles: list[Style | None] = [None] * len(row)
        if t.name == "(total)":
            return [_style("bold")] * len(row)
        for k in (9, 10, 11):
            if row[k] not in ("0", UNKNOWN):
                styles[k] = _style("bold red")
        styles[1] = _style("dim")
        return styles


_SPARK = " ▁▂▃▄▅▆▇█"


def histograms(report: StatsReport) -> Group:
    """Each tensor's value distribution as a row of bars between its lowest and highest value."""
    parts: list[RenderableType] = []
    shown = [t for t in report.tensors if t.histogram is not None]
    width = max((_width(t.name) for t in shown), default=0)
    for t in shown:
        assert t.histogram is not None
        counts, lo, hi = t.histogram
        top = max(counts) or 1
        bars = "".join(_SPARK[0 if c == 0 else max(1, round(c / top * (len(_SPARK) - 1)))] for c in counts)
        line = Text(clean(t.name).ljust(width) + "  ")
        line.append(f"{_num(lo):>10} ", style="dim")
        line.append(bars, style="cyan")
        line.append(f" {_num(hi)}", style="dim")
        parts.append(line)
    return Group(*parts)


def check_view(result: CheckResult) -> Group:
    """One line per rule (✔ or ✘, what it asks, how many it looked at) and every failure under it."""
    table = Table(title=Text(clean(result.path), style="bold"), title_justify="left", box=None, pad_edge=False)
    for name, justify in (("", "left"), ("Rule", "left"), ("Expects", "left"), ("Checked", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_column("Result", overflow="fold")
    for r in result.results:
        mark = Text("✔", style="green") if r.passed else Text("✘", style="bold red")
        outcome = Text("pass", style="green") if r.passed else Text(f"{len(r.failures)} failed", style="bold red")
        if r.passed and r.allowed:
            mark, outcome = Text("!", style="yellow"), Text(f"{len(r.allowed)} allowed", style="yellow")
        table.add_row(mark, Text(clean(r.id)), Text(clean(r.expected), style="dim"), f"{r.checked:,}", outcome)
    parts: list[RenderableType] = [table]
    for r in result.results:
        for head, items, style in ((f"✘ {r.id}", r.failures, "bold red"), (f"! {r.id} (allowed)", r.allowed, "yellow")):
            if not items:
                continue
            parts.append(Text())
            parts.append(Text(head, style=style))
            for f in items[:50]:
                parts.append(Text("  " + clean(f.message)))
            if len(items) > 50:
                parts.append(Text(f"  … and {len(items) - 50} more (--format json lists all)", style="dim"))
    failed = sum(1 for r in result.results if not r.passed)
    parts.append(Text())
    if failed:
        parts.append(Text(f"FAILED: {failed} of {count(len(result.results), 'rule')}", style="bold red"))
    else:
        parts.append(Text(f"passed: {count(len(result.results), 'rule')}", style="bold green"))
    return Group(*parts)


def _range_text(s: CastStats | None) -> str:
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


def report_table(report: Report) -> TensorGrid:
    """One row per tensor: Name, Role (● exact / ○ inferred), Evidence, DType, Shape, Numel, Size,
    Device, Grad, and Shares when any tensor shares its storage with another."""
    return TensorGrid(report)


def _tally(totals: dict[str, Totals], rename: dict[str, str] | None = None) -> Text:
    """``float32 5 tensors (5.0 KiB) · int64 1 tensor (8 B)``."""
    text = Text()
    for i, (key, tot) in enumerate(totals.items()):
        if i:
            text.append(" · ")
        text.append((rename or {}).get(key, key), style="bold")
        text.append(f" {count(tot.count, 'tensor')} ({human_bytes(tot.nbytes)})")
    return text or Text(UNKNOWN, style="dim")


def _role_rows(report: Report) -> list[tuple[str, Text]]:
    """``2 tensors  2,368 elements  9.2 KiB`` per role, numbers lined up; Other only when there is any."""
    s = report.summary
    rows = [("Parameters", s.parameters, "parameter"), ("Buffers", s.buffers, "buffer")]
    if s.other.count:
        rows.append(("Other", s.other, "other"))
    count_w = max(len(f"{tot.count:,}") for _, tot, _ in rows)
    numel_w = max(len(f"{tot.numel:,}") for _, tot, _ in rows)
    out = []
    for label, tot, role in rows:
        line = Text(f"{tot.count:>{count_w},} {'tensor ' if tot.count == 1 else 'tensors'}", ROLE_STYLES[role])
        line.append(f"  {tot.numel:>{numel_w},} elements  {human_bytes(tot.nbytes)}")
        out.append((label, line))
    return out


def _container_text(report: Report) -> Text:
    c = report.container
    text = Text(c.kind, style="bold")
    if c.state_dict_at is not None:
        text.append(" · state dict at ")
        text.append(clean(c.state_dict_at) or "(root)")
    if c.other_keys:
        text.append(" · other keys: ")
        text.append(name_list([k or "''" for k in c.other_keys], MAX_KEYS_SHOWN))  # a key may be the empty string
    if c.module_class:
        text.append(" · module class ")
        text.append(clean(c.module_class))
    if c.training is not None:
        text.append(" · saved in train mode" if c.training else " · saved in eval mode")
    return text


MAX_SHARERS_SHOWN = 3  # names in a row's Shares cell
MAX_METADATA_VALUE = 60  # longer values (statecli's own role table, a JSON config) are sized, not shown
MAX_KEYS_SHOWN = 20  # metadata entries and other keys in the summary; --format json has them all


def _metadata_text(metadata: dict[str, str]) -> Text:
    """``format: pt · statecli: (2,345 characters)``: short values as they are, long ones by their length
    (``--format json`` has them whole); the first :data:`MAX_KEYS_SHOWN` entries, then how many more."""
    parts = []
    for k, v in itertools.islice(metadata.items(), MAX_KEYS_SHOWN):
        shown = describe_name(v) if type(v) is str and len(v) <= MAX_METADATA_VALUE else _sized(v)
        parts.append(f"{describe_name(k, MAX_METADATA_VALUE)}: {shown}")
    if len(metadata) > MAX_KEYS_SHOWN:
        parts.append(f"… ({len(metadata) - MAX_KEYS_SHOWN:,} more)")
    return Text(" · ".join(parts))


def _sized(v: object) -> str:
    return f"({len(v):,} characters)" if type(v) is str else describe(v, limit=MAX_METADATA_VALUE)


def findings(report: Report) -> list[Text]:
    """One line per finding: level (coloured; ``dangerous`` in bold red), code, message; columns lined up."""
    level_w = max((len(f.level) for f in report.findings), default=0)
    code_w = max((len(f.code) for f in report.findings), default=0)
    lines = []
    for f in report.findings:
        line = Text(f.level.ljust(level_w), style=LEVEL_STYLES.get(f.level, ""))
        line.append(f"  {f.code.ljust(code_w)}", style="bold")
        line.append(f"  {clean(f.message)}")
        lines.append(line)
    return lines


def summary(report: Report) -> Table:
    """Format, container, totals per role, dtype and device, exact vs inferred roles, bytes on disk,
    metadata keys and findings, as a two-column grid."""
    s = report.summary
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    fmt = Text(report.format)
    if report.file_size:
        # Sharded and DCP checkpoints: the data files plus the index (or .metadata) they hang from.
        files = len({t.file for t in report.tensors if t.file is not None})
        fmt.append(
            f" · {human_bytes(report.file_size)} in {files + 1} files"
            if files
            else f" · {human_bytes(report.file_size)} file"
        )
    grid.add_row("Format", fmt)
    grid.add_row("Container", _container_text(report))
    for label, line in _role_rows(report):
        grid.add_row(label, line)
    grid.add_row("DTypes", _tally(s.by_dtype))
    grid.add_row("Devices", _tally(s.by_device, {"unknown": f"{UNKNOWN} (not stored)"}))
    roles = Text(f"{s.exact:,} exact {EXACT_MARK} · {s.inferred:,} inferred {INFERRED_MARK}")
    grid.add_row("Roles", roles)
    if s.storage_nbytes != s.logical_nbytes:
        grid.add_row(
            "Bytes",
            Text(
                f"{human_bytes(s.logical_nbytes)} logical · {human_bytes(s.storage_nbytes)} in storages "
                "(tensors share or view storage)"
            ),
        )
    if report.metadata:
        grid.add_row("Metadata", _metadata_text(report.metadata))
    for i, line in enumerate(findings(report)):
        grid.add_row("Findings" if i == 0 else "", line)
    return grid


def report_view(report: Report, with_summary: bool = True, with_legend: bool = True) -> Group:
    """What ``statecli inspect`` shows for one file: the table, then the summary and the legend."""
    parts: list[RenderableType] = [report_table(report)]
    if with_summary:
        parts += [Text(), summary(report)]
    if with_legend:
        parts.append(legend(any(t.persistent is False for t in report.tensors)))
    return Group(*parts)


def legend(non_persistent: bool = False) -> Text:
    """The line that explains the table's marks (``np`` only when the table shows one)."""
    np_note = f" · {NON_PERSISTENT}: non-persistent buffer, left out of state_dict()" if non_persistent else ""
    return Text(
        f"{EXACT_MARK} exact: the file states the role · {INFERRED_MARK} inferred: see Evidence · "
        f"{UNKNOWN} not stored in the file{np_note}",
        style="dim",
    )


# --- tree ---------------------------------------------------------------------------------------


def _sizes(node: TreeNode) -> Text:
    """``2 params 4.6 KiB · 3 buffers 520 B``, zero parts left out."""
    parts = [
        (node.parameters, "param", "parameter"),
        (node.buffers, "buffer", "buffer"),
        (node.other, "other", "other"),
    ]
    text = Text()
    for tot, word, role in parts:
        if not tot.count:
            continue
        if text:
            text.append(" · ")
        label = count(tot.count, word) if word != "other" else f"{tot.count:,} other"
        text.append(f"{label} {human_bytes(tot.nbytes)}", style=ROLE_STYLES[role])
    return text


def _notes(node: TreeNode, logical: bool = False) -> Text:
    """``  (2 folded · 1 shared)``: tensors counted but not listed, tensors whose bytes an earlier tensor
    carries, and (for the root) the logical bytes when shared storages make them differ; empty when
    there is nothing to say."""
    notes = []
    if node.folded:
        notes.append(f"{node.folded:,} folded")
    if node.shared:
        notes.append(f"{node.shared:,} shared")
    if logical and node.logical_nbytes != node.nbytes:
        notes.append(f"{human_bytes(node.logical_nbytes)} logical")
    return Text(f"  ({' · '.join(notes)})", style="dim") if notes else Text()


def _module_label(node: TreeNode, width: int, total: int) -> Text:
    fraction = node.nbytes / total if total else 0.0
    text = Text(clean(node.name).ljust(width), style="bold")
    text.append("  ")
    text.append(bar(fraction), style="magenta")
    text.append(f" {fraction * 100:5.1f}%  ")
    text.append_text(_sizes(node))
    text.append_text(_notes(node))
    return text


def _tensor_labels(node: TreeNode, width: int) -> list[Text]:
    """The node's own tensors: name, role and mark, dtype, shape and size, lined up in columns; then,
    for a tensor whose storage an earlier tensor carries, that tensor's name, and for one that carries
    a storage of another size than itself, the bytes it counts."""
    roles = [role_text(t) for t in node.tensors]
    dtypes = [t.dtype for t in node.tensors]
    shapes = [shape_text(t.shape) for t in node.tensors]
    sizes = [human_bytes(t.nbytes) for t in node.tensors]
    role_w, dtype_w, shape_w, size_w = (max(map(len, col), default=0) for col in (roles, dtypes, shapes, sizes))
    labels = []
    for t, role, dtype, shape, size in zip(node.tensors, roles, dtypes, shapes, sizes, strict=True):
        text = Text(clean(t.name.rsplit(".", 1)[-1]).ljust(width) + "  ")
        text.append_text(role)
        text.append(" " * (role_w - len(role) + 2))
        text.append(f"{dtype.ljust(dtype_w)}  {shape.ljust(shape_w)}  {size.rjust(size_w)}", style="dim")
        carrier = node.shared_with.get(t.name)
        if carrier is not None:
            text.append("  shares storage with ", style="yellow")
            text.append(clean(carrier), style="bold yellow")
            text.append(" (counted there)", style="yellow")
        elif t.name in node.storage_nbytes:
            text.append(f"  views a {human_bytes(node.storage_nbytes[t.name])} storage, counted here", style="yellow")
        labels.append(text)
    return labels


def _grow(branch: Tree, node: TreeNode, total: int) -> None:
    names = [t.name.rsplit(".", 1)[-1] for t in node.tensors] + [c.name for c in node.children]
    width = max(map(len, names), default=0)
    for label in _tensor_labels(node, width):
        branch.add(label)
    for child in node.children:
        _grow(branch.add(_module_label(child, width, total)), child, total)


def tree(root: TreeNode, title: str) -> Tree:
    """``root`` drawn with rich: each module with a bar for its share of all bytes (in storages: shared
    storages count once), then its totals; tensors within the depth with role mark, dtype, shape and
    size, and what they share storage with."""
    label = Text(clean(title), style="bold")
    label.append(f"  {human_bytes(root.nbytes)}  ")
    label.append_text(_sizes(root))
    label.append_text(_notes(root, logical=True))
    out = Tree(label, guide_style="dim")
    _grow(out, root, root.nbytes)
    return out
