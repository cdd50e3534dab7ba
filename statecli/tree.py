"""The module tree of a checkpoint: tensor names split on ``.``, each node with its totals.

``layer1.0.conv1.weight`` is the tensor ``weight`` under the modules ``layer1`` > ``0`` > ``conv1``.
Every node carries the totals of everything below it, split by role. A node deeper than ``depth`` is
not drawn: its tensors count in the totals of its deepest drawn ancestor. Core code: no rich, no Typer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from statecli.records import Report, TensorInfo, Totals

SCHEMA = "statecli.tree/1"
DEFAULT_DEPTH = 3


@dataclass(slots=True)
class TreeNode:
    """A module (a name prefix) with the totals of every tensor under it.

    ``tensors`` holds the tensors named directly under this module that are within the depth;
    ``folded`` counts the tensors under it that lie deeper and appear in the totals only.
    """

    name: str  # the last name part ("conv1"); "" for the root
    path: str  # the full prefix ("layer1.0.conv1"); "" for the root
    parameters: Totals = field(default_factory=Totals)
    buffers: Totals = field(default_factory=Totals)
    other: Totals = field(default_factory=Totals)
    children: list[TreeNode] = field(default_factory=list)
    tensors: list[TensorInfo] = field(default_factory=list)
    folded: int = 0
    _by_name: dict[str, TreeNode] = field(default_factory=dict, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        return self.parameters.nbytes + self.buffers.nbytes + self.other.nbytes

    @property
    def count(self) -> int:
        return self.parameters.count + self.buffers.count + self.other.count

    def child(self, name: str) -> TreeNode:
        """The child module called ``name``, made (after its elder siblings) when it is new."""
        node = self._by_name.get(name)
        if node is None:
            node = self._by_name[name] = TreeNode(name, f"{self.path}.{name}" if self.path else name)
            self.children.append(node)
        return node

    def add(self, t: TensorInfo) -> None:
        if t.role == "parameter":
            self.parameters = self.parameters.add(t)
        elif t.role == "buffer":
            self.buffers = self.buffers.add(t)
        else:
            self.other = self.other.add(t)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "parameters": self.parameters.to_dict(),
            "buffers": self.buffers.to_dict(),
            "other": self.other.to_dict(),
            "nbytes": self.nbytes,
            "children": [c.to_dict() for c in self.children],
            "tensors": [t.name for t in self.tensors],
            "folded": self.folded,
        }


def build_tree(tensors: Iterable[TensorInfo], depth: int = DEFAULT_DEPTH) -> TreeNode:
    """The tree of ``tensors`` (children in file order), drawn ``depth`` levels deep.

    A tensor ``a.b.weight`` sits at level 3; with ``depth=2`` it is folded into ``a.b``'s totals,
    with ``depth=1`` into ``a``'s, with ``depth=0`` into the root's.
    """
    if depth < 0:
        raise ValueError(f"depth must be >= 0, not {depth}")
    root = TreeNode("", "")
    for t in tensors:
        *modules, _leaf = t.name.split(".")
        node = root
        node.add(t)
        for part in modules[:depth]:
            node = node.child(part)
            node.add(t)
        if len(modules) < depth:
            node.tensors.append(t)
        else:
            node.folded += 1
    return root


def tree_dict(report: Report, depth: int = DEFAULT_DEPTH) -> dict[str, Any]:
    """The ``statecli.tree/1`` JSON object for ``report``'s tensors."""
    return {
        "schema": SCHEMA,
        "path": report.path,
        "depth": depth,
        "root": build_tree(report.tensors, depth).to_dict(),
    }
