"""statecli.tree: names split on '.', totals per role, folding below --depth, shared storages counted
once, the tree/1 JSON."""

from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from clirun import run_cli
from factories import tensor_info
from rich.console import Console

import statecli
from statecli.records import Container, Report, Summary, TensorInfo
from statecli.tree import SCHEMA, Charge, TreeNode, build_tree, charges, tree_dict


def t(name: str, role: str = "parameter", numel: int = 4, itemsize: int = 4) -> TensorInfo:
    return tensor_info(name, role, "float32" if itemsize == 4 else "int64", (numel,))


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


def _report(tensors: tuple[TensorInfo, ...]) -> Report:
    return Report(
        path="m.pt",
        format="torch-zip",
        container=Container("state_dict", ""),
        tensors=tensors,
        summary=Summary.of(tensors),
    )


def test_tree_json_schema() -> None:
    report = _report(TENSORS)
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


# --- shared storages count once ------------------------------------------------------------------


def s(name: str, storage: str | None, numel: int = 4, role: str = "parameter") -> TensorInfo:
    """``t(name)`` on the storage ``storage``."""
    return dataclasses.replace(t(name, role, numel), storage=storage)


TIED = (
    s("embed.weight", "data/0", 16),
    s("block.fc.weight", "data/1", 8),
    s("block.fc.bias", None, 2),
    s("stats.mean", "data/2", 4, "buffer"),
    s("head.weight", "data/0", 16),  # tied to embed.weight
)


def paths_and_bytes(node: TreeNode) -> dict[str, int]:
    out = {node.path: node.nbytes}
    for c in node.children:
        out.update(paths_and_bytes(c))
    return out


def test_a_tied_tensor_adds_no_bytes_and_names_its_carrier() -> None:
    root = build_tree(TIED, depth=3)
    assert root.nbytes == Summary.of(TIED).storage_nbytes == 64 + 32 + 8 + 16
    assert root.logical_nbytes == sum(x.nbytes for x in TIED) == root.nbytes + 64
    assert (root.shared, root.shared_with) == (1, {})  # head.weight is listed under head, not here
    embed, block, stats, head = root.children
    assert embed.nbytes == 64 and embed.shared == 0 and embed.shared_with == {}
    assert head.nbytes == 0 and head.logical_nbytes == 64 and head.parameters.count == 1
    assert head.shared == 1 and head.shared_with == {"head.weight": "embed.weight"}
    assert sum(c.nbytes for c in root.children) == root.nbytes  # the shares add up to the whole
    assert block.nbytes == 40 and stats.buffers.nbytes == 16


def test_which_tensor_carries_a_storage_does_not_depend_on_depth() -> None:
    deep = paths_and_bytes(build_tree(TIED, depth=3))
    for depth in (0, 1, 2):
        shallow = paths_and_bytes(build_tree(TIED, depth))
        assert shallow == {p: n for p, n in deep.items() if p in shallow}
        assert build_tree(TIED, depth).shared == 1
    assert build_tree(TIED, 1).children[-1].shared == 1  # folded, still counted as shared


def test_a_view_carries_its_whole_storage_once() -> None:
    # x = arange(100); {"head.part": x[10:14], "body.w": ..., "body.alias": x[50:60]}: the file holds all of x
    tensors = (s("head.part", "data/0", 4), s("body.w", "data/1", 8), s("body.alias", "data/0", 10))
    sizes = {"data/0": 400, "data/1": 32}
    assert charges(tensors, sizes) == [Charge(400), Charge(32), Charge(0, "head.part")]
    root = build_tree(tensors, 3, sizes)
    assert root.nbytes == Summary.of(tensors, sizes).storage_nbytes == 432
    head, body = root.children
    assert head.storage_nbytes == {"head.part": 400} and head.nbytes == 400
    assert body.shared_with == {"body.alias": "head.part"} and body.nbytes == 32
    assert root.to_dict()["children"][0]["storage_nbytes"] == {"head.part": 400}


def test_without_a_known_size_a_storage_is_its_largest_tensor() -> None:
    # as Summary.of does: the first tensor carries the storage even when a later one is bigger
    tensors = (s("a", "k", 2), s("b", "k", 6), s("c", None, 3))
    assert charges(tensors) == [Charge(24), Charge(0, "a"), Charge(12)]
    assert build_tree(tensors).nbytes == Summary.of(tensors).storage_nbytes == 36


def test_tree_json_adds_the_sharing_fields() -> None:
    report = _report(TIED)
    root = json.loads(json.dumps(tree_dict(report, depth=3)))["root"]
    assert root["nbytes"] == report.summary.storage_nbytes and root["logical_nbytes"] == report.summary.logical_nbytes
    assert root["parameters"]["nbytes"] + root["buffers"]["nbytes"] == root["nbytes"]
    head = root["children"][-1]
    assert head["tensors"] == ["head.weight"] and head["shared_with"] == {"head.weight": "embed.weight"}
    assert (head["nbytes"], head["logical_nbytes"], head["shared"]) == (0, 64, 1)
    assert head["parameters"] == {"count": 1, "numel": 16, "nbytes": 0}


def test_tree_table_marks_shared_tensors_and_views() -> None:
    from statecli.output import table as render

    tensors = (*TIED, s("slice", "data/9", 2))
    text = text_of(render.tree(build_tree(tensors, 3, {"data/9": 40}), "m.pt"))
    assert text == (
        "m.pt  160 B  5 params 144 B · 1 buffer 16 B  (1 shared · 192 B logical)\n"
        "├── slice  parameter ○  float32  2  8 B  views a 40 B storage, counted here\n"
        "├── embed  ████        40.0%  1 param 64 B\n"
        "│   └── weight  parameter ○  float32  16  64 B\n"
        "├── block  ██▌         25.0%  2 params 40 B\n"
        "│   └── fc  ██▌         25.0%  2 params 40 B\n"
        "│       ├── weight  parameter ○  float32  8  32 B\n"
        "│       └── bias    parameter ○  float32  2   8 B\n"
        "├── stats  █           10.0%  1 buffer 16 B\n"
        "│   └── mean  buffer ○  float32  4  16 B\n"
        "└── head                0.0%  1 param 0 B  (1 shared)\n"
        "    └── weight  parameter ○  float32  16  64 B  shares storage with embed.weight (counted there)"
    )


# --- the real samples: the tree's bytes are inspect's bytes in storages ----------------------------


def text_of(renderable: Any, width: int = 120) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())  # type: ignore[attr-defined]


def tree_cli(*args: str) -> str:
    result = run_cli("tree", *args, env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    return "\n".join(line.rstrip() for line in result.stdout.splitlines())


def tree_json(*args: str) -> dict[str, Any]:
    result = run_cli("tree", *args, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def percentages(text: str) -> dict[str, float]:
    """The top-level modules' percentages in a tree table."""
    found = re.findall(r"^[├└]── (\S+) .*?(\d+\.\d)%", text, re.MULTILINE)
    return {name: float(pct) for name, pct in found}


def test_tied_lm_totals_are_inspects_bytes_in_storages(samples_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from statecli.output import columns
    from statecli.output import table as render

    monkeypatch.chdir(samples_dir)
    report = statecli.open_checkpoint("tied_lm.pt")
    storage = report.summary.storage_nbytes
    assert storage < report.summary.logical_nbytes  # the sample is tied
    for depth in range(4):
        data = tree_json("tied_lm.pt", "--depth", str(depth))
        root = data["root"]
        assert root["nbytes"] == storage and root["logical_nbytes"] == report.summary.logical_nbytes
        assert root["shared"] == 1
        if not depth:
            continue
        listed = sum(x.nbytes for x in report.tensors if x.name in root["tensors"])
        assert sum(c["nbytes"] for c in root["children"]) + listed == storage
    text = tree_cli("tied_lm.pt")
    inspect_line = next(x for x in text_of(render.summary(report)).splitlines() if "in storages" in x)
    assert f"{columns.human_bytes(storage)} in storages" in inspect_line
    assert text.splitlines()[0].startswith(f"tied_lm.pt  {columns.human_bytes(storage)}  ")
    assert "(1 shared · 17.0 KiB logical)" in text.splitlines()[0]
    lm_head = text.splitlines().index(next(x for x in text.splitlines() if x.startswith("└── lm_head")))
    assert text.splitlines()[lm_head + 1].endswith("4.0 KiB  shares storage with embed.weight (counted there)")
    pct = percentages(text)
    assert pct["lm_head"] == 0.0 and pct["embed"] == round(100 * 4096 / storage, 1)
    assert sum(pct.values()) <= 100.0
    assert "shares storage" not in tree_cli("tied_lm.pt", "--depth", "1")  # the tensor row is folded
    assert "lm_head  " in tree_cli("tied_lm.pt", "--depth", "1")


def test_a_filter_that_leaves_out_the_carrier_makes_the_next_one_carry(
    samples_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(samples_dir)
    report = statecli.open_checkpoint("tied_lm.pt").select(match=["lm_head.*", "block.*"])
    data = tree_json("tied_lm.pt", "-m", "lm_head.*", "-m", "block.*")
    assert data["root"]["nbytes"] == report.summary.storage_nbytes == report.summary.logical_nbytes
    assert data["root"]["shared"] == 0 and data["root"]["children"][-1]["nbytes"] == 4096


def test_a_saved_slice_counts_its_whole_storage(tmp_path: Path) -> None:
    import torch

    x = torch.arange(100, dtype=torch.float32)
    torch.save({"head.part": x[10:14], "body.w": torch.ones(8), "body.alias": x[50:60]}, tmp_path / "slice.pt")
    report = statecli.open_checkpoint(str(tmp_path / "slice.pt"))
    assert report.summary.storage_nbytes == 400 + 32
    data = tree_json(str(tmp_path / "slice.pt"))
    head, body = data["root"]["children"]
    assert data["root"]["nbytes"] == 432 and (head["nbytes"], body["nbytes"]) == (400, 32)
    assert body["shared_with"] == {"body.alias": "head.part"}
    text = tree_cli(str(tmp_path / "slice.pt"))
    assert "16 B  views a 400 B storage, counted here" in text
    assert sum(percentages(text).values()) == 100.0


def test_all_dtypes_slice_is_marked(samples_dir: Path) -> None:
    report = statecli.open_checkpoint(str(samples_dir / "all_dtypes.pt"))
    root = build_tree(report.tensors, 3, report.storage_sizes)
    assert root.nbytes == report.summary.storage_nbytes < report.summary.logical_nbytes
    assert root.shared_with == {"vector_slice": "vector"}


CNN_BN_TABLE = """\
cnn_bn_state_dict.pt  6.5 KiB  10 params 6.3 KiB · 6 buffers 208 B
├── conv1  █▍          13.5%  2 params 896 B
│   ├── weight  parameter ○  float32  8×3×3×3  864 B
│   └── bias    parameter ○  float32  8         32 B
├── bn1    ▎            2.0%  2 params 64 B · 3 buffers 72 B
│   ├── weight               parameter ○  float32  8       32 B
│   ├── bias                 parameter ○  float32  8       32 B
│   ├── running_mean         buffer ○     float32  8       32 B
│   ├── running_var          buffer ○     float32  8       32 B
│   └── num_batches_tracked  buffer ○     int64    scalar   8 B
├── conv2  ███████     70.3%  2 params 4.6 KiB
│   ├── weight  parameter ○  float32  16×8×3×3  4.5 KiB
│   └── bias    parameter ○  float32  16           64 B
├── bn2    ▍            4.0%  2 params 128 B · 3 buffers 136 B
│   ├── weight               parameter ○  float32  16      64 B
│   ├── bias                 parameter ○  float32  16      64 B
│   ├── running_mean         buffer ○     float32  16      64 B
│   ├── running_var          buffer ○     float32  16      64 B
│   └── num_batches_tracked  buffer ○     int64    scalar   8 B
└── fc     █           10.2%  2 params 680 B
    ├── weight  parameter ○  float32  10×16  640 B
    └── bias    parameter ○  float32  10      40 B"""

# `statecli tree cnn_bn_state_dict.pt -f json --depth 1`'s root before sharing was counted: unchanged
CNN_BN_CHILDREN = [
    ("conv1", {"count": 2, "numel": 224, "nbytes": 896}, {"count": 0, "numel": 0, "nbytes": 0}, 896, 2),
    ("bn1", {"count": 2, "numel": 16, "nbytes": 64}, {"count": 3, "numel": 17, "nbytes": 72}, 136, 5),
    ("conv2", {"count": 2, "numel": 1168, "nbytes": 4672}, {"count": 0, "numel": 0, "nbytes": 0}, 4672, 2),
    ("bn2", {"count": 2, "numel": 32, "nbytes": 128}, {"count": 3, "numel": 33, "nbytes": 136}, 264, 5),
    ("fc", {"count": 2, "numel": 170, "nbytes": 680}, {"count": 0, "numel": 0, "nbytes": 0}, 680, 2),
]


def test_a_file_without_shared_storage_is_unchanged(samples_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(samples_dir)
    assert tree_cli("cnn_bn_state_dict.pt") == CNN_BN_TABLE
    root = tree_json("cnn_bn_state_dict.pt", "--depth", "1")["root"]
    assert (root["parameters"], root["buffers"], root["nbytes"]) == (
        {"count": 10, "numel": 1610, "nbytes": 6440},
        {"count": 6, "numel": 50, "nbytes": 208},
        6648,
    )
    got = [(c["name"], c["parameters"], c["buffers"], c["nbytes"], c["folded"]) for c in root["children"]]
    assert got == CNN_BN_CHILDREN
    # the added fields say "nothing shared"
    for node in (root, *root["children"]):
        assert node["logical_nbytes"] == node["nbytes"] and node["shared"] == 0
        assert node["shared_with"] == {} and node["storage_nbytes"] == {}
