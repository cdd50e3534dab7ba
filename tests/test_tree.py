"""statecli.tree: names split on '.', totals per role, folding below --depth, the tree/1 JSON."""

from __future__ import annotations

import json

import pytest

from statecli.records import Container, Report, Summary, TensorInfo
from statecli.tree import SCHEMA, TreeNode, build_tree, tree_dict


def t(name: str, role: str = "parameter", numel: int = 4, itemsize: int = 4) -> TensorInfo:
    return TensorInfo(
        name=name,
        role=role,
        exact=False,
        evidence="default",
        persistent=None,
        requires_grad=None,
        dtype="float32" if itemsize == 4 else "int64",
        shape=(numel,),
        numel=numel,
        nbytes=numel * itemsize,
        device="cpu",
    )


TENSORS = (
    t("conv1.weight", numel=100),
    t("bn1.weight"),
    t("bn1.running_mean", "buffer"),
    t("bn1.num_batches_tracked", "buffer", numel=1, itemsize=8),
    t("layer1.0.conv1.weight", numel=50),
    t("layer1.0.bn1.running_var", "buffer", numel=2),
    t("fc.weight", numel=10),
    t("step", "other", numel=1, itemsize=8),
)


def test_totals_by_role_at_every_level() -> None:
    root = build_tree(TENSORS, depth=3)
    assert [c.name for c in root.children] == ["conv1", "bn1", "layer1", "fc"]  # file order
    assert root.parameters.count == 4 and root.parameters.numel == 164
    assert root.buffers.count == 3 and root.buffers.nbytes == 16 + 8 + 8
    assert root.other.nbytes == 8
    assert root.nbytes == sum(x.nbytes for x in TENSORS)
    assert [x.name for x in root.tensors] == ["step"]  # a top-level tensor sits on the root
    bn1 = root.children[1]
    assert (bn1.parameters.count, bn1.buffers.count, bn1.buffers.nbytes) == (1, 2, 24)
    assert [x.name for x in bn1.tensors] == ["bn1.weight", "bn1.running_mean", "bn1.num_batches_tracked"]
    layer1 = root.children[2]
    assert layer1.path == "layer1" and layer1.nbytes == 200 + 8
    block = layer1.children[0]
    assert (block.name, block.path) == ("0", "layer1.0")
    # layer1.0.conv1.weight is at level 4: folded into layer1.0.conv1 (level 3), not listed
    conv = block.children[0]
    assert conv.path == "layer1.0.conv1" and conv.tensors == [] and conv.folded == 1
    assert conv.parameters.nbytes == 200
    assert conv.children == []


BN1 = ["bn1.weight", "bn1.running_mean", "bn1.num_batches_tracked"]


@pytest.mark.parametrize(
    ("depth", "listed", "paths"),
    [
        (0, [], [""]),
        (1, ["step"], ["", "conv1", "bn1", "layer1", "fc"]),
        (2, ["step", "conv1.weight", *BN1, "fc.weight"], ["", "conv1", "bn1", "layer1", "layer1.0", "fc"]),
    ],
)
def test_depth_folds_deeper_nodes_into_their_ancestor(depth: int, listed: list[str], paths: list[str]) -> None:
    root = build_tree(TENSORS, depth)
    seen_paths: list[str] = []
    seen_tensors: list[str] = []

    def walk(node: TreeNode) -> None:
        seen_paths.append(node.path)
        seen_tensors.extend(x.name for x in node.tensors)
        for c in node.children:
            walk(c)

    walk(root)
    assert seen_paths == paths
    assert seen_tensors == listed
    # folding never loses anything: the root's totals are the whole checkpoint's
    assert root.nbytes == sum(x.nbytes for x in TENSORS)
    assert root.count == len(TENSORS)


def test_depth_zero_keeps_only_the_root_totals() -> None:
    root = build_tree(TENSORS, 0)
    assert root.children == [] and root.tensors == [] and root.folded == len(TENSORS)
    assert root.nbytes == sum(x.nbytes for x in TENSORS)


def test_negative_depth_is_refused() -> None:
    with pytest.raises(ValueError, match="depth"):
        build_tree(TENSORS, -1)


def test_tree_json_schema() -> None:
    report = Report(
        path="m.pt",
        format="torch-zip",
        container=Container("state_dict", ""),
        tensors=TENSORS,
        summary=Summary.of(TENSORS),
    )
    data = json.loads(json.dumps(tree_dict(report, depth=1)))
    assert data["schema"] == SCHEMA == "statecli.tree/1"
    assert data["path"] == "m.pt" and data["depth"] == 1
    root = data["root"]
    assert set(root) >= {"name", "parameters", "buffers", "other", "nbytes", "children", "tensors"}
    assert root["parameters"] == {"count": 4, "numel": 164, "nbytes": 656}
    assert root["tensors"] == ["step"]
    bn1 = root["children"][1]
    assert bn1["name"] == "bn1" and bn1["tensors"] == [] and bn1["folded"] == 3
    assert bn1["buffers"] == {"count": 2, "numel": 5, "nbytes": 24}
    assert bn1["children"] == []
