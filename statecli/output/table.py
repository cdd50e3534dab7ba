"""rich renderables for every result: grids built from :mod:`statecli.output.columns`, trees, views.
Every function returns a renderable; the caller prints it.

Strings that come from a checkpoint (tensor names, paths, keys, metadata, finding messages) are put in
:class:`rich.text.Text` objects, never into markup strings: rich then never reads ``[bold]`` or
``:emoji:`` in them, so ``layer[0].weight`` prints as itself (stronger than ``rich.markup.escape``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

if TYPE_CHECKING:
    from statecli.checking import CheckResult, Unreadable
    from statecli.conversion import CastStats, Plan
    from statecli.diff import DiffReport
    from statecli.stats import StatsReport

from statecli.clip import describe, describe_name
from statecli.output import columns as C
from statecli.output.columns import (
    EXACT_MARK,
    INFERRED_MARK,
    NON_PERSISTENT,
    ROLE_STYLES,
    UNKNOWN,
    Column,
    clean,
    human_bytes,
    role_label,
    shape_text,
    stat_text,
)
from statecli.output.formats import diff_summary
from statecli.records import Report, TensorInfo, Totals
from statecli.tree import TreeNode
from statecli.wording import count, name_list

LEVEL_STYLES = {"info": "blue", "warning": "yellow", "dangerous": "bold red"}

BAR_CELLS = 10
_EIGHTHS = " ▏▎▍▌▋▊▉"


def bar(fraction: float, cells: int = BAR_CELLS) -> str:
    """``fraction`` (0..1) as ``cells`` characters of block elements, in eighths: ``████▌     ``."""
    fraction = max(0.0, min(1.0, fraction))
    eighths = max(round(fraction * cells * 8), 1 if fraction > 0 else 0)  # a non-empty part always shows
    full, part = divmod(eighths, 8)
    text = "█" * full + (_EIGHTHS[part] if part else "")
    return text.ljust(cells)


def role_text(t: TensorInfo) -> Text:
    """:func:`role_label`, coloured by role."""
    return Text(role_label(t), style=ROLE_STYLES.get(t.role, ""))


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
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(headers)
    return _measure(headers, columns)


def _measure(headers: list[str], columns: Iterable[Sequence[str]]) -> tuple[list[int], bool]:
    """:func:`measure_columns` of the cells given column by column."""
    widths = []
    narrow = True
    for h, col in zip(headers, columns, strict=True):
        fits = _narrow(col)
        narrow = narrow and fits
        widths.append(max(_width(h), max(map(len if fits else _width, col), default=0)))
    return widths, narrow


class _SharedCells:
    """A grid's cells when most rows repeat each other's: the first column (and a last one marked ``own``)
    per item, the columns between once per distinct ``same(item)``. Items equal under ``same`` have equal
    cells in those columns (the column set says so); 100,000 tensors make a few dozen such rows."""

    def __init__(self, columns: Sequence[Column[Any]], items: Sequence[Any], same: Callable[[Any], Hashable]) -> None:
        tail = len(columns) > 2 and columns[-1].own
        self.middle = columns[1:-1] if tail else columns[1:]
        self.first = list(map(columns[0].value, items))
        self.last = list(map(columns[-1].value, items)) if tail else None
        keys = list(map(same, items))
        index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        self.ids = list(map(index.__getitem__, keys))  # each item's row of middle cells
        one = dict(zip(keys, items, strict=True))  # an item for each key: any one, their cells are equal
        self.distinct = [tuple(c.value(one[k]) for c in self.middle) for k in index]

    def columns(self) -> list[Sequence[str]]:
        """The cells column by column; the middle ones hold each distinct cell once."""
        middle = list(zip(*self.distinct, strict=True))
        return [self.first, *middle, *([self.last] if self.last is not None else [])]

    def rows(self) -> list[tuple[str, ...]]:
        distinct = self.distinct
        if self.last is None:
            return [(a, *distinct[i]) for a, i in zip(self.first, self.ids, strict=True)]
        return [(a, *distinct[i], z) for a, i, z in zip(self.first, self.ids, self.last, strict=True)]

    def printable(self) -> bool:
        return all("".join(cells).isprintable() for cells in (self.first, *self.distinct, self.last or ()))

    def text(self, widths: list[int], right: list[bool], gap: str) -> str:
        """Every row as a line, each cell padded to its column's width but the last one's (unless it is
        right-aligned): what the general path writes, one line per row, made in one pass."""
        last = len(widths) - 1

        def pad(cell: str, i: int) -> str:
            if i == last and not right[i]:
                return cell
            return cell.rjust(widths[i]) if right[i] else cell.ljust(widths[i])

        tail = self.last is not None
        middle = [
            gap + gap.join(pad(cell, i) for i, cell in enumerate(cells, 1)) + (gap if tail else "\n")
            for cells in self.distinct
        ]
        just = str.rjust if right[0] else str.ljust
        w = widths[0]
        if self.last is None:
            return "".join([just(a, w) + middle[i] for a, i in zip(self.first, self.ids, strict=True)])
        ends = [pad(cell, last) + "\n" for cell in self.last]
        return "".join([just(a, w) + middle[i] + z for a, i, z in zip(self.first, self.ids, ends, strict=True)])


NAME_MIN = 12  # cells a shortened name keeps at least
ELLIPSIS = "…"


def _head(text: str, cells: int) -> str:
    """The longest start of ``text`` that fits in ``cells``."""
    if text.isascii():
        return text[:cells]
    used = 0
    for i, ch in enumerate(text):
        used += cell_len(ch)
        if used > cells:
            return text[:i]
    return text


def _tail(text: str, cells: int) -> str:
    """The longest end of ``text`` that fits in ``cells``."""
    if cells <= 0:
        return ""
    if text.isascii():
        return text[-cells:]
    return _head(text[::-1], cells)[::-1]


def cut(text: str, width: int, head: int) -> str:
    """``text`` in ``width`` cells: its first ``head`` cells, ``…``, and as much of its end as fits."""
    if text.isascii():  # nearly every name: slices, no cell counting (100,000 names a pass)
        n = len(text)
        return text if n <= width else text[:head] + ELLIPSIS + text[n - (width - 1 - head) :]
    if _width(text) <= width:
        return text
    start = _head(text, head)
    return start + ELLIPSIS + _tail(text, width - 1 - _width(start))


def _heads(first: int, width: int) -> Iterator[int]:
    """Where to cut, nearest ``first`` first: ``first``, ``first + 1``, ``first - 1``, ..."""
    for step in range(width):
        for head in (first + step, first - step) if step else (first,):
            if 0 <= head < width:
                yield head


def _distinct(names: Iterable[str], width: int) -> tuple[dict[str, str], list[str]]:
    """Each name shortened to ``width`` cells so that no two look alike, and the names that no cut at
    this width tells apart (empty when none). A name is cut in the middle, a third of it kept from the
    start and the rest from the end (the module path and the tensor's own name); names that would look
    alike are cut elsewhere together, nearest that split first, until the part that tells them apart
    shows."""
    first = (width - 1) // 3
    last = width - 1 - first
    # cut() inlined for ASCII names: this pass runs over every name, a few times when names need room.
    shown = {
        n: (n if len(n) <= width else f"{n[:first]}{ELLIPSIS}{n[len(n) - last :]}")
        if n.isascii()
        else cut(n, width, first)
        for n in names
    }
    alike: dict[str, list[str]] = {}
    for name, text in shown.items():
        alike.setdefault(text, []).append(name)
    taken = set(alike)
    for text, group in alike.items():
        if len(group) == 1:
            continue
        taken.discard(text)
        trial = _split(group, width, taken)
        if trial is None:
            return shown, group
        shown.update(zip(group, trial, strict=True))
        taken.update(trial)
    return shown, []


def _split(group: list[str], width: int, taken: set[str]) -> list[str] | None:
    """``group`` cut at the split nearest a third of ``width`` that tells them apart from each other and
    from ``taken``; ``None`` when there is none."""
    for head in _heads((width - 1) // 3, width):
        trial = _apart(group, width, head, taken)
        if trial is not None:
            return trial
    return None


def _apart(group: list[str], width: int, head: int, taken: set[str]) -> list[str] | None:
    """``group`` cut at ``head``, when that makes them differ from each other and from ``taken``."""
    out = []
    seen = set()
    for name in group:
        text = cut(name, width, head)
        if text in seen or text in taken:
            return None  # most splits fail on the first few names: stop at the first clash
        seen.add(text)
        out.append(text)
    return out


def cut_names(names: Sequence[str], width: int) -> tuple[list[str], int]:
    """``names`` shortened to ``width`` cells, two different names never shown alike, and the width used:
    wider than ``width`` when names differ only where no single cut can show it (then the table is wider
    than the terminal: better than two rows a reader cannot tell apart)."""
    distinct = list(dict.fromkeys(names))
    longest = max(map(_width, distinct), default=0)
    if width >= longest:
        return list(names), longest
    shown, stuck = _distinct(distinct, width)
    if stuck:
        # A wider cut: found by halving (each try is a pass over every name, 100,000 of them at times),
        # so the least width that works, or one a cell or two wider where more room does not always help.
        low, high, shown = width, longest, {n: n for n in distinct}
        while high - low > 1:
            mid = (low + high) // 2
            trial, stuck = _distinct(distinct, mid)
            if stuck:
                low = mid
            else:
                high, shown = mid, trial
        width = high
    return [shown[n] for n in names], width


class Grid:
    """A result's table from its column set: a title, a header, a rule, one aligned line per item.

    Not a ``rich.table.Table``: that measures, wraps and pads every cell through several layers,
    1.4 ms a row here (three minutes for 100,000 tensors). This computes each column's width once,
    never wraps; on a terminal too narrow for it, it leaves out the columns marked ``hide`` and
    shortens the first column's names (see :meth:`fit`).
    """

    GAP = "  "

    def __init__(
        self,
        title: str,
        columns: Sequence[Column[Any]],
        items: Sequence[Any],
        row_style: Callable[[Any], str] | None = None,
        same: Callable[[Any], Hashable] | None = None,
    ) -> None:
        """``same``, where given, maps an item to what every cell but the first column's (and the last
        column's, when it is marked ``own``) is made of: rows alike in it are made once."""
        self.title = title
        self.columns = tuple(columns)
        self.items = items
        self.row_style = row_style
        self.headers = [c.header for c in columns]
        self.right = [c.right for c in columns]
        self._rows: list[Sequence[str]] | None = None
        self._shared: _SharedCells | None = None
        if same is not None and items and len(columns) > 1 and not any(c.own for c in columns[1:-1]):
            self._shared = _SharedCells(self.columns, items, same)
            self.widths, self.narrow = _measure(self.headers, self._shared.columns())
        else:
            # Column by column: one map per column is cheaper than a call per cell through a row function.
            cells = [list(map(c.value, items)) for c in columns]
            self._rows = list(zip(*cells, strict=True)) if items else []
            self.widths, self.narrow = measure_columns(self.headers, self._rows)

    @property
    def rows(self) -> list[Sequence[str]]:
        """Every row's cells (made from the shared cells on first use)."""
        if self._rows is None:
            assert self._shared is not None
            self._rows = list(self._shared.rows())
        return self._rows

    def _column(self, i: int) -> Iterable[str]:
        """Column ``i``'s cells (each distinct cell of a shared column once)."""
        if self._shared is not None:
            return self._shared.columns()[i]
        return (row[i] for row in self.rows)

    def total_width(self, widths: list[int] | None = None) -> int:
        widths = widths or self.widths
        return sum(widths) + len(self.GAP) * (len(widths) - 1)

    def _cleaned(self) -> None:
        """Escape control characters in every cell once, before anything is measured or printed."""
        if getattr(self, "_clean", False):
            return
        self._clean = True
        self.title = clean(self.title)
        if self._shared is not None:
            if self._shared.printable():
                return
            self._rows = self._shared.rows()  # rare: control characters in a name; cleaned row by row below
            self._shared = None
        if not "".join(c for row in self.rows for c in row).isprintable():
            self._rows = [[clean(c) for c in row] for row in self.rows]
            self.widths, self.narrow = measure_columns(self.headers, self._rows)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        self._cleaned()
        return Measurement(min(self.total_width(), 20), max(self.total_width(), cell_len(self.title)))

    def fit(self, max_width: int) -> tuple[list[int], list[int]]:
        """The columns shown in ``max_width`` cells (indices into the headers) and their widths.

        Too wide: the hideable columns go first (those holding only ``—`` first, then by their ``hide``
        number), and only when none is left are the names shortened, to :data:`NAME_MIN` cells at least
        (see :meth:`names`). A missing column is said under the title; a name cut short loses what tells
        it from its neighbours, and a table wider than the terminal wraps every row onto two lines.
        """
        self._cleaned()
        cols = list(range(len(self.headers)))
        widths = list(self.widths)

        def total() -> int:
            return sum(widths[i] for i in cols) + len(self.GAP) * (len(cols) - 1)

        if total() <= max_width:
            return cols, widths
        hideable = [i for i, c in enumerate(self.columns) if c.hide is not None]
        optional = sorted(hideable, key=lambda i: self.columns[i].hide)  # type: ignore[arg-type, return-value]
        blank = [i for i in optional if all(cell in (UNKNOWN, "") for cell in self._column(i))]
        for i in blank + [i for i in optional if i not in blank]:
            if total() <= max_width:
                break
            cols.remove(i)
        wanted = max(NAME_MIN, widths[0] - (total() - max_width))
        if wanted < widths[0]:
            widths[0] = self.names(wanted)[1]
        return cols, widths

    def names(self, width: int) -> tuple[list[str], int]:
        """The first column's cells shortened to ``width`` cells, all still different (see
        :func:`cut_names`), and the width they need; computed once per width."""
        cache = self.__dict__.setdefault("_names", {})
        if width not in cache:
            cache[width] = cut_names(list(self._column(0)), width)
        return cache[width]

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
        right = self.right
        for i in cols:
            h = self.headers[i]
            bare = i == last and not right[i]
            yield Segment(h if bare else self._pad(h, widths[i], i), _style("bold"))
            yield Segment(self.GAP if i != last else "\n")
        yield Segment("─" * (sum(widths[i] for i in cols) + len(self.GAP) * (len(cols) - 1)) + "\n")
        plain = console.no_color or console.color_system is None
        every = len(cols) == len(self.headers)
        if plain and self.narrow and every and widths == self.widths and self._shared is not None:
            # Nothing to shorten, one cell per character, rows alike made once: the whole grid in one text.
            yield Segment(self._shared.text(widths, right, self.GAP))
            return
        if plain and self.narrow and every and widths == self.widths:
            # Nothing to shorten and one cell per character: str.ljust / rjust pad in C, and one segment
            # per line keeps 100,000 rows well under a second.
            just = [str.rjust if right[i] else str.ljust for i in range(last)]
            tail = str.rjust if right[last] else None  # the last column only when right-aligned
            gap = self.GAP
            for row in self.rows:
                cells = [pad(c, w) for pad, w, c in zip(just, widths[:last], row[:last], strict=True)]
                cells.append(row[last] if tail is None else tail(row[last], widths[last]))
                yield Segment(gap.join(cells) + "\n")
            return
        rows: Iterable[Sequence[str]] = self.rows
        if widths[0] < self.widths[0]:
            names = self.names(widths[0])[0]
            rows = ((name, *row[1:]) for name, row in zip(names, self.rows, strict=True))
        for t, row in zip(self.items, rows, strict=True):
            # The last column is not padded unless right-aligned: no trailing blanks on every line.
            cells = [row[i] if i == last and not right[i] else self._pad(row[i], widths[i], i) for i in cols]
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
        pad = " " * (width - used)
        return pad + text if self.right[column] else text + pad

    def _styles(self, item: Any, row: Sequence[str]) -> list[Style | None]:
        whole = self.row_style(item) if self.row_style is not None else ""
        if whole:
            return [_style(whole)] * len(row)
        if not hasattr(self, "_fixed"):
            # Fixed styles parsed once; only the columns whose style depends on the row are asked per row.
            self._fixed = [_style(c.style or "") if not callable(c.style) else None for c in self.columns]
            self._varying = [(i, c.style) for i, c in enumerate(self.columns) if callable(c.style)]
        styles = list(self._fixed)
        for i, style in self._varying:
            styles[i] = _style(style(item, row[i]))
        return styles


_STYLE_CACHE: dict[str, Style | None] = {}


def _style(name: str) -> Style | None:
    if name not in _STYLE_CACHE:
        _STYLE_CACHE[name] = Style.parse(name) if name else None
    return _STYLE_CACHE[name]


def report_table(report: Report) -> Grid:
    """One row per tensor: Name, Role (● exact / ○ inferred), Evidence, DType, Shape, Numel, Size,
    Device, Grad, and Shares when any tensor shares its storage with another."""
    return Grid(report.path, C.inspect_table(report.tensors), report.tensors, same=C.inspect_same)


def plan_table(plan: Plan, stats: dict[str, CastStats] | None = None) -> Grid:
    """The conversion plan, one line per output tensor: what it is, what it becomes, and why."""
    title = f"{plan.report.path} → {plan.output} ({plan.output_format})"
    return Grid(title, C.plan_table(stats), plan.items)


def stats_table(report: StatsReport) -> Grid:
    """Value statistics, one line per tensor and a bold total line."""
    return Grid(report.path, C.STATS_TABLE, [*report.tensors, report.total], C.stats_row_style)


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
        line.append(f"{stat_text(lo):>10} ", style="dim")
        line.append(bars, style="cyan")
        line.append(f" {stat_text(hi)}", style="dim")
        parts.append(line)
    return Group(*parts)


def stats_view(report: StatsReport, with_histograms: bool) -> Group:
    """The statistics table, and each tensor's histogram under it when asked for."""
    parts: list[RenderableType] = [stats_table(report)]
    if with_histograms:
        parts += [Text(), histograms(report)]
    return Group(*parts)


def diff_view(report: DiffReport, show_all: bool = False) -> Group:
    """The grid of tensors that differ (all with ``show_all``) under an ``A → B`` title, then the summary line."""
    title = f"{report.path_a} → {report.path_b}"
    items = C.diff_items(report, show_all)
    parts: list[RenderableType] = [Grid(title, C.DIFF_TABLE, items), Text()] if items else [Text(title, style="bold")]
    verdict = Text(diff_summary(report), style="bold green" if report.same else "bold red")
    parts.append(Flow([("", verdict)]))  # a Flow wraps between words, under soft_wrap too
    return Group(*parts)


def check_view(result: CheckResult) -> Group:
    """One line per rule (✔ or ✘, what it asks, how many it looked at) and every failure under it."""
    table = Table(title=Text(clean(result.path), style="bold"), title_justify="left", box=None, pad_edge=False)
    for c in C.CHECK_TABLE:
        table.add_column(c.header, justify="right" if c.right else "left")
    table.columns[-1].overflow = "fold"
    for r in result.results:
        # Numbers go in as str, so rich's highlighter colours them in --format html as it always has.
        table.add_row(*(c.value(r) if c.right else _text(c, r) for c in C.CHECK_TABLE))
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


def _text(column: Column[Any], item: Any) -> Text:
    cell = column.value(item)
    return Text(cell, style=column.style_of(item, cell))


def unreadable_view(entry: Unreadable) -> Group:
    """The file's name and the error, in the place its rules would have been: a report kept as an artifact
    shows every file it was given."""
    return Group(
        Text(clean(entry.path), style="bold"),
        Text(f"✘ not checked (exit {entry.exit_code}): {clean(entry.message)}", style="bold red"),
        Text(),
    )


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
    table = report_table(report)
    parts: list[RenderableType] = [table]
    if with_summary:
        parts += [Text(), summary(report)]
    if with_legend:
        parts.append(Legend(table, False in {t.persistent for t in report.tensors}))  # True, False or None
    return Group(*parts)


class Flow:
    """Parts of a line on as few lines as the width allows, broken between parts and never inside one,
    unless a part is wider than a line by itself (then it breaks between its words).

    ``parts`` pairs each part with what joins it to the part before on one line (`` · ``); a line
    break drops the joint, so no line starts or ends with a dangling separator. ``alone`` parts start a
    line of their own whenever the whole does not fit on one line.
    """

    def __init__(self, parts: Sequence[tuple[str, Text]], alone: Iterable[int] = (), style: str = "") -> None:
        self.parts = parts
        self.alone = frozenset(alone)
        self.style = style

    def _lines(self, width: int) -> list[Text]:
        whole = self._whole()
        if whole.cell_len <= width:
            return [whole]
        lines: list[Text] = []
        line: Text | None = None
        for i, (joint, part) in enumerate(self.parts):
            if line is not None and i not in self.alone and line.cell_len + cell_len(joint) + part.cell_len <= width:
                line.append(joint, self.style)
                line.append_text(part)
                continue
            if line is not None:
                lines.append(line)
            line = part.copy()
        if line is not None:
            lines.append(line)
        return lines

    def _whole(self) -> Text:
        text = Text()
        for k, (joint, part) in enumerate(self.parts):
            if k:
                text.append(joint, self.style)
            text.append_text(part)
        return text

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        whole = self._whole().cell_len
        longest = max((max(map(cell_len, part.plain.split()), default=0) for _, part in self.parts), default=0)
        return Measurement(min(longest, whole), whole)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        # Wrapped here, not by the console: statecli prints with soft_wrap, which would leave a long line
        # to the terminal to break anywhere, inside a word too.
        width = options.max_width
        for line in self._lines(width):
            for piece in line.wrap(console, width, overflow="fold", no_wrap=False):
                yield from piece.render(console)
                yield Segment.line()


def legend_parts(shown: Collection[str], non_persistent: bool = False) -> list[str]:
    """What the inspect table's marks mean, for the columns ``shown`` (their headers): "see Evidence" only
    beside an Evidence column, ``—`` only when a column that may hold it (Device, Grad) is there, ``np``
    only when the table shows one."""
    parts = [f"{EXACT_MARK} exact: the file states the role"]
    if "Evidence" in shown:
        parts.append(f"{INFERRED_MARK} inferred: see Evidence")
    else:
        parts.append(f"{INFERRED_MARK} inferred: the file does not state it")
    if {"Device", "Grad"} & set(shown):
        parts.append(f"{UNKNOWN} not stored in the file")
    if non_persistent:
        parts.append(f"{NON_PERSISTENT}: non-persistent buffer, left out of state_dict()")
    return parts


def legend_text(shown: Collection[str], non_persistent: bool = False) -> str:
    """:func:`legend_parts` on one line."""
    return " · ".join(legend_parts(shown, non_persistent))


class Legend:
    """The lines under the inspect table that explain its marks, for the columns the table shows at the
    width it is printed in, wrapped between its entries."""

    def __init__(self, table: Grid, non_persistent: bool = False) -> None:
        self.table = table
        self.non_persistent = non_persistent

    def _flow(self, width: int) -> Flow:
        cols, _ = self.table.fit(width)
        parts = legend_parts({self.table.headers[i] for i in cols}, self.non_persistent)
        return Flow([(" · ", Text(p, style="dim")) for p in parts], style="dim")

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self._flow(options.max_width))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self._flow(options.max_width)


# --- tree ---------------------------------------------------------------------------------------


def _size_parts(node: TreeNode) -> list[Text]:
    """``2 params 4.6 KiB``, ``3 buffers 520 B``: one per role, zero parts left out."""
    parts = [
        (node.parameters, "param", "parameter"),
        (node.buffers, "buffer", "buffer"),
        (node.other, "other", "other"),
    ]
    out = []
    for tot, word, role in parts:
        if not tot.count:
            continue
        label = count(tot.count, word) if word != "other" else f"{tot.count:,} other"
        out.append(Text(f"{label} {human_bytes(tot.nbytes)}", style=ROLE_STYLES[role]))
    return out


def _sizes(node: TreeNode) -> Text:
    """``2 params 4.6 KiB · 3 buffers 520 B``, zero parts left out."""
    return Text(" · ").join(_size_parts(node))


def _notes(node: TreeNode, logical: bool = False) -> Text:
    """``(2 folded · 1 shared)``: tensors counted but not listed, tensors whose bytes an earlier tensor
    carries, and (for the root) the logical bytes when shared storages make them differ; empty when
    there is nothing to say."""
    notes = []
    if node.folded:
        notes.append(f"{node.folded:,} folded")
    if node.shared:
        notes.append(f"{node.shared:,} shared")
    if logical and node.logical_nbytes != node.nbytes:
        notes.append(f"{human_bytes(node.logical_nbytes)} logical")
    return Text(f"({' · '.join(notes)})", style="dim") if notes else Text()


def _module_label(node: TreeNode, width: int, total: int) -> Text:
    fraction = node.nbytes / total if total else 0.0
    text = Text(clean(node.name).ljust(width), style="bold")
    text.append("  ")
    text.append(bar(fraction), style="magenta")
    text.append(f" {fraction * 100:5.1f}%  ")
    text.append_text(_sizes(node))
    notes = _notes(node)
    if notes:
        text.append("  ")
        text.append_text(notes)
    return text


def _header(root: TreeNode, title: str) -> Flow:
    """The tree's first line, in bold: the path and its bytes, then the totals per role and the notes.
    Too wide for the terminal, the totals start a line of their own, broken between roles if need be."""
    parts = [("", Text(f"{clean(title)}  {human_bytes(root.nbytes)}"))]
    parts += [(" · " if k else "  ", part) for k, part in enumerate(_size_parts(root))]
    notes = _notes(root, logical=True)
    if notes:
        parts.append(("  ", notes))
    return Flow([(joint, Text(style="bold").append_text(part)) for joint, part in parts], alone=[1], style="bold")


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
    out = Tree(_header(root, title), guide_style="dim")
    _grow(out, root, root.nbytes)
    return out
