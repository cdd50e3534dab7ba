"""``statecli tree PATH``: the checkpoint's module hierarchy, where its bytes are, at a glance."""

from __future__ import annotations

from statecli import tree as tree_core
from statecli.cli._common import open_selected
from statecli.cli.options import (
    DepthOpt,
    DtypeOpt,
    MatchOpt,
    PathArg,
    RoleOpt,
    TreeFormat,
    TreeFormatOpt,
)
from statecli.output import emit


def tree_command(
    path: PathArg,
    role: RoleOpt = None,
    match: MatchOpt = None,
    dtype: DtypeOpt = None,
    depth: DepthOpt = tree_core.DEFAULT_DEPTH,
    fmt: TreeFormatOpt = TreeFormat.table,
) -> None:
    """Draw the module tree (tensor names split on '.') with each module's share of the bytes.

    Each module shows a bar and percentage of the checkpoint's bytes and its parameter, buffer and
    other totals; tensors within --depth show role mark, dtype, shape and size. Bytes are bytes in
    storages: a storage shared by tied or sliced tensors counts once, at the first of them in file
    order, and the others are marked with the tensor they share with. Filters apply first, so
    percentages are shares of what is selected.

    Examples:

        statecli tree model.pt
        statecli tree model.safetensors --depth 1 --role buffer
        statecli tree ckpt.pt --format json | jq '.root.children[].name'
    """
    emit.tree(open_selected(path, role, match, dtype), depth, fmt.value)
