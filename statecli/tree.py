"""The module tree of a checkpoint: tensor names split on ``.``, each node with its totals.

``layer1.0.conv1.weight`` is the tensor ``weight`` under the modules ``layer1`` > ``0`` > ``conv1``.
Every node carries the totals of everything below it, split by role. A node deeper than ``depth`` is
not drawn: its tensors count in the totals of its deepest drawn ancestor. Core code: no rich, no Typer.

Bytes are bytes in storages, as in the report's summary: each storage counts once, in full, at the
first tensor in file order that uses it (its *carrier*). A later tensor on the same storage (a tied
weight, a slice of another tensor) adds no bytes and records its carrier; a tensor that views part of
a bigger storage carries the whole storage, because the file holds all of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from statecli.records import Report, TensorInfo, Totals

SCHEMA = "statecli.tree/1"
DEFAULT_DEPTH = 3
_ZERO = Totals()


class Charge(NamedTuple):  # not a dataclass: this module is imported by every command, and those cost ~1 ms each
    """What one tensor adds to its modules' totals: ``nbytes`` of storage, or nothing when ``carrier``
    (an earlier tensor on the same storage) already counted it."""

    nbytes: int
    carrier: str | None = None


def charges(tensors: Iterable[TensorInfo], storage_sizes: Mapping[str, int] | None = None) -> list[Charge]:
    """Each tensor's :class:`Charge`, in order; they sum to ``Summary.of(tensors, storage_sizes).storage_nbytes``.

    A storage's size is ``storage_sizes[key]`` when the reader knows it, else the largest tensor on it
    (as :meth:`Summary.of` does); a tensor without a storage key is its own bytes.
    """
    return [Charge(n, carrier) for _, n, carrier in _charged(list(tensors), storage_sizes or {})]


def _charged(tensors: list[TensorInfo], sizes: Mapping[str, int]) -> Iterator[tuple[TensorInfo, int, str | None]]:
    """:func:`charges` as ``(tensor, nbytes, carrier)`` tuples: no Charge made per tensor in build_tree."""
    largest: dict[str, int] = {}
    for t in tensors:
        key = t.storage
        if key is not None and key not in sizes and largest.get(key, -1) < t.nbytes:
            largest[key] = t.nbytes
    carriers: dict[str, str] = {}
    for t in tensors:
        key = t.storage
        if key is None:
            yield t, t.nbytes, None
        elif key in carriers:
            yield t, 0, carriers[key]
        else:
            carriers[key] = t.name
            yield t, sizes[key] if key in sizes else largest[key], None


@dataclass(slots=True)
class TreeNode:
    """A module (a name prefix) with the totals of every tensor under it.

    ``tensors`` holds the tensors named directly under this module that are within the depth;
    ``folded`` counts the tensors under it that lie deeper and appear in the totals only. The role
    totals' ``nbytes`` are bytes in storages (see the module's doc); ``logical_nbytes`` sums the
    tensors' own sizes. ``shared`` counts the tensors under it whose storage an earlier tensor carries;
    ``shared_with`` names that carrier for each such tensor in ``tensors``, and ``storage_nbytes`` gives
    the bytes charged for each tensor in ``tensors`` that carries a storage of another size than itself.
    """

    name: str  # the last name part ("conv1"); "" for the root
    path: str  # the full prefix ("layer1.0.conv1"); "" for the root
    parameters: Totals = _ZERO  # Totals is frozen: one shared zero, not three new objects per node
    buffers: Totals = _ZERO
    other: Totals = _ZERO
    children: list[TreeNode] = field(default_factory=list)
    tensors: list[TensorInfo] = field(default_factory=list)
    folded: int = 0
    logical_nbytes: int = 0
    shared: int = 0
    shared_with: dict[str, str] = field(default_factory=dict)
    storage_nbytes: dict[str, int] = field(default_factory=dict)
    _by_name: dict[str, TreeNode] = field(default_factory=dict, repr=False, compare=False)
    _at: int = field(default=0, repr=False, compare=False)  # where build_tree keeps this node's counters

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
            "logical_nbytes": self.logical_nbytes,
            "shared": self.shared,
            "shared_with": dict(self.shared_with),
            "storage_nbytes": dict(self.storage_nbytes),
        }


_ROLE_AT = {"parameter": 0, "buffer": 3}  # where a role's counters start among a node's; other: 6
# A node's counters: count, numel, nbytes per role (parameter, buffer, other), logical bytes, shared.
_ZEROS = (0,) * 11


def build_tree(
    tensors: Iterable[TensorInfo], depth: int = DEFAULT_DEPTH, storage_sizes: Mapping[str, int] | None = None
) -> TreeNode:
    """The tree of ``tensors`` (children in file order), drawn ``depth`` levels deep.

    A tensor ``a.b.weight`` sits at level 3; with ``depth=2`` it is folded into ``a.b``'s totals,
    with ``depth=1`` into ``a``'s, with ``depth=0`` into the root's. Shared storages count once (see
    :func:`charges`); which tensor carries one does not depend on ``depth``, so neither do the totals.
    """
    if depth < 0:
        raise ValueError(f"depth must be >= 0, not {depth}")
    root = TreeNode("", "")
    # Every node's counters in one flat list, made into Totals at the end: a Totals per tensor per level,
    # or a list per node, leaves the garbage collector far more objects to walk at 100,000 tensors.
    acc = list(_ZEROS)
    for t, nbytes, carrier in _charged(list(tensors), storage_sizes or {}):
        *modules, _leaf = t.name.split(".")
        role_at = _ROLE_AT.get(t.role, 6)
        numel, own, shared = t.numel, t.nbytes, carrier is not None
        node = root
        ats = [0]
        for part in modules[:depth]:
            child = node._by_name.get(part)
            if child is None:
                child = node.child(part)
                child._at = len(acc)
                acc.extend(_ZEROS)
            node = child
            ats.append(child._at)
        for at in ats:
            i = at + role_at
            acc[i] += 1
            acc[i + 1] += numel
            acc[i + 2] += nbytes
            acc[at + 9] += own
            acc[at + 10] += shared
        if len(modules) < depth:
            node.tensors.append(t)
            if carrier is not None:
                node.shared_with[t.name] = carrier
            elif nbytes != own:
                node.storage_nbytes[t.name] = nbytes
        else:
            node.folded += 1
    stack = [root]
    while stack:
        n = stack.pop()
        at = n._at
        if acc[at]:
            n.parameters = Totals(acc[at], acc[at + 1], acc[at + 2])
        if acc[at + 3]:
            n.buffers = Totals(acc[at + 3], acc[at + 4], acc[at + 5])
        if acc[at + 6]:
            n.other = Totals(acc[at + 6], acc[at + 7], acc[at + 8])
        n.logical_nbytes, n.shared = acc[at + 9], acc[at + 10]
        stack.extend(n.children)
    return root


def tree_dict(report: Report, depth: int = DEFAULT_DEPTH) -> dict[str, Any]:
    """The ``statecli.tree/1`` JSON object for ``report``'s tensors."""
    return {
        "schema": SCHEMA,
        "path": report.path,
        "depth": depth,
        "root": build_tree(report.tensors, depth, report.storage_sizes).to_dict(),
    }
