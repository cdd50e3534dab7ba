"""rich renderables for reports and trees. Every function returns a renderable; the caller prints it.

Strings that come from a checkpoint (tensor names, paths, keys, metadata, finding messages) are put in
:class:`rich.text.Text` objects, never into markup strings: rich then never reads ``[bold]`` or
``:emoji:`` in them, so ``layer[0].weight`` prints as itself (stronger than ``rich.markup.escape``).
"""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from statecli.records import Report, TensorInfo, Totals
from statecli.tree import TreeNode

EXACT_MARK = "●"
NON_PERSISTENT = "np"
INFERRED_MARK = "○"
UNKNOWN = "—"

ROLE_STYLES = {"parameter": "green", "buffer": "cyan", "other": "magenta"}
LEVEL_STYLES = {"info": "blue", "warning": "yellow", "dangerous": "bold red"}
GRAD_STYLES = {"trainable": "green", "frozen": "blue", UNKNOWN: "dim"}

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


def role_text(t: TensorInfo) -> Text:
    """``parameter ●`` (exact) or ``buffer ○`` (inferred), coloured by role; ``np`` for a non-persistent buffer."""
    mark = EXACT_MARK if t.exact else INFERRED_MARK
    text = Text(f"{t.role} {mark}", style=ROLE_STYLES.get(t.role, ""))
    if t.persistent is False:
        text.append(f" {NON_PERSISTENT}", style="dim")
    return text


def shape_text(shape: Sequence[int]) -> str:
    """``64×3×3``; ``scalar`` for a 0-dim tensor."""
    return "×".join(str(d) for d in shape) if shape else "scalar"


def report_table(report: Report) -> Table:
    """One row per tensor: Name, Role (● exact / ○ inferred), Evidence, DType, Shape, Numel, Size,
    Device, Grad, and Shares when any tensor shares its storage with another."""
    shares = any(t.shares_with for t in report.tensors)
    table = Table(
        title=Text(report.path),
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    # On a narrow terminal long cells wrap ("fold") instead of being cut short with an ellipsis.
    table.add_column("Name", overflow="fold")
    table.add_column("Role", no_wrap=True)
    table.add_column("Evidence", style="dim", overflow="fold")
    table.add_column("DType", no_wrap=True)
    table.add_column("Shape", overflow="fold")
    table.add_column("Numel", justify="right", no_wrap=True)
    table.add_column("Size", justify="right", no_wrap=True)
    table.add_column("Device", overflow="fold")
    table.add_column("Grad", overflow="fold")
    if shares:
        table.add_column("Shares", overflow="fold")
    for t in report.tensors:
        cells: list[RenderableType] = [
            Text(t.name),
            role_text(t),
            Text(t.evidence),
            Text(t.dtype),
            Text(shape_text(t.shape)),
            f"{t.numel:,}",
            human_bytes(t.nbytes),
            Text(t.device) if t.device is not None else Text(UNKNOWN, style="dim"),
            Text(t.trainable, style=GRAD_STYLES.get(t.trainable, "")),
        ]
        if shares:
            cells.append(Text(", ".join(t.shares_with)))
        table.add_row(*cells)
    return table


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def _tally(totals: dict[str, Totals], rename: dict[str, str] | None = None) -> Text:
    """``float32 5 tensors (5.0 KiB) · int64 1 tensor (8 B)``."""
    text = Text()
    for i, (key, tot) in enumerate(totals.items()):
        if i:
            text.append(" · ")
        text.append((rename or {}).get(key, key), style="bold")
        text.append(f" {_plural(tot.count, 'tensor')} ({human_bytes(tot.nbytes)})")
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
        text.append(c.state_dict_at or "(root)")
    if c.other_keys:
        text.append(" · other keys: ")
        text.append(", ".join(c.other_keys))
    if c.module_class:
        text.append(" · module class ")
        text.append(c.module_class)
    if c.training is not None:
        text.append(" · saved in train mode" if c.training else " · saved in eval mode")
    return text


def findings(report: Report) -> list[Text]:
    """One line per finding: level (coloured; ``dangerous`` in bold red), code, message; columns lined up."""
    level_w = max((len(f.level) for f in report.findings), default=0)
    code_w = max((len(f.code) for f in report.findings), default=0)
    lines = []
    for f in report.findings:
        line = Text(f.level.ljust(level_w), style=LEVEL_STYLES.get(f.level, ""))
        line.append(f"  {f.code.ljust(code_w)}", style="bold")
        line.append(f"  {f.message}")
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
        fmt.append(f" · {human_bytes(report.file_size)} file")
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
        grid.add_row("Metadata", Text(", ".join(report.metadata)))
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
        label = _plural(tot.count, word) if word != "other" else f"{tot.count:,} other"
        text.append(f"{label} {human_bytes(tot.nbytes)}", style=ROLE_STYLES[role])
    return text


def _module_label(node: TreeNode, width: int, total: int) -> Text:
    fraction = node.nbytes / total if total else 0.0
    text = Text(node.name.ljust(width), style="bold")
    text.append("  ")
    text.append(bar(fraction), style="magenta")
    text.append(f" {fraction * 100:5.1f}%  ")
    text.append_text(_sizes(node))
    if node.folded:
        text.append(f"  ({node.folded:,} folded)", style="dim")
    return text


def _tensor_labels(node: TreeNode, width: int) -> list[Text]:
    """The node's own tensors: name, role and mark, dtype, shape and size, lined up in columns."""
    roles = [role_text(t) for t in node.tensors]
    dtypes = [t.dtype for t in node.tensors]
    shapes = [shape_text(t.shape) for t in node.tensors]
    sizes = [human_bytes(t.nbytes) for t in node.tensors]
    role_w, dtype_w, shape_w, size_w = (max(map(len, col), default=0) for col in (roles, dtypes, shapes, sizes))
    labels = []
    for t, role, dtype, shape, size in zip(node.tensors, roles, dtypes, shapes, sizes, strict=True):
        text = Text(t.name.rsplit(".", 1)[-1].ljust(width) + "  ")
        text.append_text(role)
        text.append(" " * (role_w - len(role) + 2))
        text.append(f"{dtype.ljust(dtype_w)}  {shape.ljust(shape_w)}  {size.rjust(size_w)}", style="dim")
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
    """``root`` drawn with rich: each module with a bar for its share of all bytes, then its totals;
    tensors within the depth with role mark, dtype, shape and size."""
    label = Text(title, style="bold")
    label.append(f"  {human_bytes(root.nbytes)}  ")
    label.append_text(_sizes(root))
    if root.folded:
        label.append(f"  ({root.folded:,} folded)", style="dim")
    out = Tree(label, guide_style="dim")
    _grow(out, root, root.nbytes)
    return out
