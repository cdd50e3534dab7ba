"""statecli.output.table: the renderables, checked as text on a fixed-width console."""

from __future__ import annotations

import io

import pytest
from factories import tensor_info
from rich.console import Console, RenderableType

from statecli.output import columns
from statecli.output import table as render
from statecli.records import Container, Finding, Report, Summary, TensorInfo
from statecli.tree import build_tree


def make_report(tensors: tuple[TensorInfo, ...], **kw: object) -> Report:
    fields: dict = {
        "path": "runs/[red]model[/red].pt",
        "format": "torch-zip",
        "container": Container("training", "state_dict", ("epoch", "optimizer")),
        "findings": (),
        "metadata": {},
        "file_size": 20480,
        **kw,
    }
    return Report(tensors=tensors, summary=Summary.of(tensors), **fields)


TENSORS = (
    tensor_info("conv.weight", shape=(64, 3, 3, 3), exact=True, evidence="module", requires_grad=True, device="cuda:0"),
    tensor_info("bn.running_mean", "buffer", shape=(64,), evidence="rule:batchnorm-stats", device="cuda:0"),
    tensor_info("bn.num_batches_tracked", "buffer", "int64", (), evidence="rule:batchnorm-stats", device="cuda:0"),
    tensor_info("layer[0].weight", shape=(10, 64), exact=True, evidence="keep-vars", requires_grad=False, device=None),
    tensor_info("opt.0.exp_avg", "other", shape=(64, 3, 3, 3), evidence="optimizer", group="optimizer.state.0"),
)
FINDINGS = (
    Finding("dangerous", "unsafe-global", "pickle would call os.system"),
    Finding("warning", "unknown-class", "stub for [b]foo.Bar[/b]"),
)


def text_of(renderable: RenderableType, width: int = 120) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    return "\n".join(line.rstrip() for line in out.splitlines())


EXPECTED_VIEW = """\
runs/[red]model[/red].pt
Name                    Role         Evidence              DType    Shape     Numel     Size  Device  Grad
───────────────────────────────────────────────────────────────────────────────────────────────────────────────
conv.weight             parameter ●  module                float32  64×3×3×3  1,728  6.8 KiB  cuda:0  trainable
bn.running_mean         buffer ○     rule:batchnorm-stats  float32  64           64    256 B  cuda:0  —
bn.num_batches_tracked  buffer ○     rule:batchnorm-stats  int64    scalar        1      8 B  cuda:0  —
layer[0].weight         parameter ●  keep-vars             float32  10×64       640  2.5 KiB  —       frozen
opt.0.exp_avg           other ○      optimizer             float32  64×3×3×3  1,728  6.8 KiB  cpu     —

Format      torch-zip · 20.0 KiB file
Container   training · state dict at state_dict · other keys: epoch, optimizer
Parameters  2 tensors  2,368 elements  9.2 KiB
Buffers     2 tensors     65 elements  264 B
Other       1 tensor   1,728 elements  6.8 KiB
DTypes      float32 4 tensors (16.2 KiB) · int64 1 tensor (8 B)
Devices     cuda:0 3 tensors (7.0 KiB) · — (not stored) 1 tensor (2.5 KiB) · cpu 1 tensor (6.8 KiB)
Roles       2 exact ● · 3 inferred ○
Metadata    format: pt · [i]source[/i]: x
Findings    dangerous  unsafe-global  pickle would call os.system
            warning    unknown-class  stub for [b]foo.Bar[/b]
● exact: the file states the role · ○ inferred: see Evidence · — not stored in the file"""


def test_report_view_exact_text() -> None:
    report = make_report(TENSORS, findings=FINDINGS, metadata={"format": "pt", "[i]source[/i]": "x"})
    assert text_of(render.report_view(report)) == EXPECTED_VIEW


def test_table_alone_without_summary_and_legend() -> None:
    report = make_report(TENSORS)
    text = text_of(render.report_view(report, with_summary=False, with_legend=False))
    assert text == "\n".join(EXPECTED_VIEW.splitlines()[:8])


def test_names_and_strings_from_the_file_print_literally() -> None:
    names = ("layer[0].weight", "[bold]x[/bold].bias", "emoji:smile:.w", "a\\[b].c")
    report = make_report(tuple(tensor_info(n) for n in names), path="[link=x]p[/link].pt")
    text = text_of(render.report_table(report))
    for n in names:
        assert n in text
    assert "[link=x]p[/link].pt" in text
    assert "😄" not in text


def test_shares_column_only_when_a_tensor_shares_storage() -> None:
    assert "Shares" not in text_of(render.report_table(make_report(TENSORS)))
    tied = (
        tensor_info("embed.weight", shares_with=("head.weight",), storage="0"),
        tensor_info("head.weight", shares_with=("embed.weight",), storage="0"),
    )
    text = text_of(render.report_table(make_report(tied)))
    assert "Shares" in text
    assert "head.weight" in text.splitlines()[3] and "embed.weight" in text.splitlines()[4]


def test_summary_optional_rows() -> None:
    tied = (
        tensor_info("embed.weight", shares_with=("head.weight",), storage="0"),
        tensor_info("head.weight", shares_with=("embed.weight",), storage="0"),
    )
    report = make_report(
        tied, container=Container("module", "", (), "mypkg.Net", training=False), findings=(), metadata={}, file_size=0
    )
    text = text_of(render.summary(report))
    assert "Format      torch-zip\n" in text + "\n"
    assert "module · state dict at (root) · module class mypkg.Net · saved in eval mode" in text
    assert "Bytes       32 B logical · 16 B in storages" in text
    assert "Other" not in text and "Metadata" not in text and "Findings" not in text


def test_dangerous_findings_are_bold_red() -> None:
    console = Console(file=io.StringIO(), width=120, color_system="standard", force_terminal=True)
    console.print(render.summary(make_report(TENSORS, findings=FINDINGS)))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "\x1b[1;31mdangerous" in out


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (3355443, "3.2 MiB"),
        (1024**2 - 1, "1.0 MiB"),
        (5 * 1024**3, "5.0 GiB"),
    ],
)
def test_human_bytes(n: int, text: str) -> None:
    assert columns.human_bytes(n) == text


@pytest.mark.parametrize(
    ("fraction", "text"),
    [
        (0.0, " " * 10),
        (1.0, "█" * 10),
        (0.45, "████▌     "),
        (0.01, "▏         "),
        (0.001, "▏         "),
        (2.0, "█" * 10),
    ],
)
def test_bar(fraction: float, text: str) -> None:
    assert render.bar(fraction) == text
    assert len(render.bar(fraction)) == render.BAR_CELLS


def test_tree_exact_text() -> None:
    tensors = (
        tensor_info("conv.weight", shape=(64, 3, 3, 3), exact=True),
        tensor_info("bn.running_mean", "buffer", shape=(64,)),
        tensor_info("bn.num_batches_tracked", "buffer", "int64", ()),
        tensor_info("blocks.0.fc.weight", shape=(16, 64)),
    )
    text = text_of(render.tree(build_tree(tensors, depth=2), "[x].pt"))
    assert text == (
        "[x].pt  11.0 KiB  2 params 10.8 KiB · 2 buffers 264 B\n"
        "├── conv    ██████▏     61.3%  1 param 6.8 KiB\n"
        "│   └── weight  parameter ●  float32  64×3×3×3  6.8 KiB\n"
        "├── bn      ▎            2.3%  2 buffers 264 B\n"
        "│   ├── running_mean         buffer ○  float32  64      256 B\n"
        "│   └── num_batches_tracked  buffer ○  int64    scalar    8 B\n"
        "└── blocks  ███▋        36.3%  1 param 4.0 KiB\n"
        "    └── 0  ███▋        36.3%  1 param 4.0 KiB  (1 folded)"
    )


def test_non_persistent_buffer_is_marked_and_explained() -> None:
    kept = tensor_info("scale", role="buffer", exact=True, evidence="module")
    dropped = tensor_info("cache", role="buffer", exact=True, evidence="module", persistent=False)
    text = text_of(render.report_view(make_report((kept, dropped))), width=200)
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith(("scale", "cache"))}
    assert " np " in rows["cache"] and " np " not in rows["scale"]
    assert "np: non-persistent buffer, left out of state_dict()" in text
    assert "non-persistent" not in text_of(render.report_view(make_report((kept,))))


@pytest.mark.parametrize(
    ("role", "requires_grad", "label"),
    [
        ("parameter", True, "trainable"),
        ("parameter", False, "frozen"),
        ("buffer", False, "no grad"),
        ("buffer", True, "requires grad"),
        ("buffer", None, "—"),
        ("parameter", None, "—"),
    ],
)
def test_grad_labels(role: str, requires_grad: bool | None, label: str) -> None:
    assert tensor_info("x", role=role, requires_grad=requires_grad).trainable == label


def test_plain_table_fast_path_writes_what_the_general_path_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    # One cell per character (ASCII and statecli's marks): cells are padded with str.ljust/rjust.
    report = make_report(TENSORS)
    fast = text_of(render.report_table(report))
    monkeypatch.setattr(render, "_narrow", lambda column: False)  # every cell measured and padded one by one
    assert text_of(render.report_table(report)) == fast


@pytest.mark.parametrize("color", [None, "truecolor"])
@pytest.mark.parametrize("width", [200, 60])
def test_rows_alike_made_once_print_as_rows_made_one_by_one(color: str | None, width: int) -> None:
    # report_table makes the cells between Name and Shares once per kind of tensor: the same text, plain or
    # coloured, whole or cut to fit, as a grid that makes every cell of every row.
    many = tuple(tensor_info(f"blocks.{i}.bn.weight", device=None if i % 3 else "cuda:0") for i in range(6))
    tied = (
        tensor_info("embed.weight", shares_with=("head.weight",), storage="0"),
        tensor_info("head.weight", shares_with=("embed.weight",), storage="0"),
    )
    odd = (tensor_info("odd\x1b[2Jname"),)  # cleaned before it is printed, row by row
    for tensors in (TENSORS + many, TENSORS + many + tied, TENSORS + many + tied + odd):
        report = make_report(tensors)
        columns_ = columns.inspect_table(report.tensors)

        def text(grid: render.Grid) -> str:
            console = Console(file=io.StringIO(), width=width, color_system=color)  # type: ignore[arg-type]
            console.print(grid, soft_wrap=True)
            return console.file.getvalue()  # type: ignore[attr-defined]

        alike = render.Grid(report.path, columns_, report.tensors, same=columns.inspect_same)
        one_by_one = render.Grid(report.path, columns_, report.tensors)
        assert alike._shared is not None  # the path under test
        assert [tuple(r) for r in alike.rows] == [tuple(r) for r in one_by_one.rows]
        assert (alike.widths, alike.narrow) == (one_by_one.widths, one_by_one.narrow)
        assert text(alike) == text(one_by_one)


def test_wide_characters_in_names_keep_the_columns_aligned() -> None:
    from rich.cells import cell_len

    report = make_report((tensor_info("層.weight"), tensor_info("a.bias"), tensor_info("emoji😀.w")))
    lines = text_of(render.report_table(report)).splitlines()[3:]
    starts = {cell_len(line[: line.index("parameter")]) for line in lines}
    assert len(lines) == 3 and len(starts) == 1


# --- narrow terminals ----------------------------------------------------------------------------

BN_TENSORS = tuple(
    tensor_info(f"{block}.{kind}", "buffer" if "running" in kind else "parameter", evidence=evidence)
    for block in ("encoder.layers.0.bn1", "encoder.layers.0.bn2")
    for kind, evidence in (("weight", "default"), ("running_mean", "rule:batchnorm-stats"))
)


def test_a_narrow_terminal_hides_optional_columns_before_cutting_names() -> None:
    text = text_of(render.report_table(make_report(BN_TENSORS)), width=80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80  # no row wraps onto a second line
    assert lines[1] == "(hidden to fit the width: Evidence, Numel, Grad)"
    assert lines[2].split() == ["Name", "Role", "DType", "Shape", "Size", "Device"]
    # Whole names: cut to their ends, the two running_means would look alike.
    assert "encoder.layers.0.bn1.running_mean" in text and "encoder.layers.0.bn2.running_mean" in text


def test_blank_optional_columns_go_first() -> None:
    # Every Grad cell is "—" (not stored): it is the first to go, and Numel stays if that is enough.
    table = render.report_table(make_report(BN_TENSORS))
    full = table.total_width()
    cols, _ = table.fit(full - 1)
    assert [table.headers[i] for i in range(len(table.headers)) if i not in cols] == ["Grad"]


def test_a_wide_terminal_shows_every_column() -> None:
    table = render.report_table(make_report(BN_TENSORS))
    text = text_of(table, width=table.total_width())
    assert "hidden" not in text
    assert text.splitlines()[1].split() == table.headers


def test_names_are_cut_only_when_every_optional_column_is_gone() -> None:
    text = text_of(render.report_table(make_report(BN_TENSORS)), width=50)
    lines = text.splitlines()
    assert lines[1] == "(hidden: Evidence, Numel, Device, Grad)"  # the long form would not fit
    # Names shortened in the middle: the module path's start and the tensor's own name stay.
    assert lines[4].startswith("enco…bn1.weight ")
    assert max(len(line) for line in lines[2:]) <= 50


def test_summary_shows_short_metadata_values_and_sizes_long_ones() -> None:
    report = make_report(TENSORS, metadata={"format": "pt", "statecli": "x" * 500})
    assert "Metadata    format: pt · statecli: (500 characters)" in text_of(render.report_view(report))


def test_multi_file_checkpoints_count_their_files() -> None:
    shards = tuple(tensor_info(f"w{i}", file=f"model-0000{i % 2 + 1}-of-00002.safetensors") for i in range(4))
    text = text_of(render.report_view(make_report(shards, format="sharded-safetensors")))
    assert "Format      sharded-safetensors · 20.0 KiB in 3 files" in text


def test_an_empty_name_is_shown_as_two_quotes_not_a_blank_cell() -> None:
    report = make_report((tensor_info(""), tensor_info("w")), container=Container("training", "model", ("", "epoch")))
    lines = text_of(render.report_view(report)).splitlines()
    assert lines[3].startswith("''  ") and lines[4].startswith("w   ")
    assert "other keys: '', epoch" in text_of(render.report_view(report))
