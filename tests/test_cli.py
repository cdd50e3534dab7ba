"""The command line in-process (clirun.run_cli), with statecli.open_checkpoint replaced by a fake.

run_cli keeps the streams apart: ``result.stdout`` is data, ``result.stderr`` messages,
``result.output`` both interleaved.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from clirun import run_cli
from factories import tensor_info

import statecli
from statecli.errors import InputError, UnsafeError
from statecli.records import Container, Finding, Report, Summary, TensorInfo


def report(path: str, *tensors: TensorInfo, findings: tuple[Finding, ...] = ()) -> Report:
    return Report(
        path=path,
        format="torch-zip",
        container=Container("state_dict", ""),
        tensors=tensors,
        summary=Summary.of(tensors),
        findings=findings,
        file_size=4096,
    )


MODEL = report(
    "model.pt",
    tensor_info("conv.weight", shape=(64, 3, 3, 3), exact=True, evidence="module", requires_grad=True),
    tensor_info("bn.running_mean", "buffer", shape=(64,), evidence="rule:batchnorm-stats"),
    tensor_info("bn.num_batches_tracked", "buffer", "int64", (), evidence="rule:batchnorm-stats"),
    tensor_info("fc.weight", dtype="float16", shape=(10, 64), device="cuda:0", shares_with=("head.weight",)),
    tensor_info("head.weight", dtype="float16", shape=(10, 64), device="cuda:0", shares_with=("fc.weight",)),
)
SMALL = report("small.safetensors", tensor_info("w", shape=(2,), device=None))
MARKUP = report(
    "[bold]x[/bold].pt", tensor_info("layer[0].weight"), tensor_info("[red]b[/red].bias"), tensor_info("a:smile:")
)
DANGEROUS = report(
    "evil.pt",
    tensor_info("w"),
    findings=(
        Finding("dangerous", "unsafe-global", "pickle would call os.system"),
        Finding("info", "note", "nothing to see"),
    ),
)
CHECKPOINTS: dict[str, Report | Exception] = {
    "model.pt": MODEL,
    "small.safetensors": SMALL,
    "markup.pt": MARKUP,
    "evil.pt": DANGEROUS,
    "x.pt": InputError("not a checkpoint", path="x.pt"),
    "unsafe.pt": UnsafeError("refusing to run pickle code", path="unsafe.pt"),
    "bug.pt": RuntimeError("boom"),
}


@pytest.fixture(autouse=True)
def fake_open(monkeypatch: pytest.MonkeyPatch) -> Callable[[object], Report]:
    def open_checkpoint(path: object) -> Report:
        found = CHECKPOINTS[os.fspath(path)]  # type: ignore[call-overload]
        if isinstance(found, Exception):
            raise found
        return found

    monkeypatch.setattr(statecli, "open_checkpoint", open_checkpoint)
    return open_checkpoint


def names(data: dict) -> list[str]:
    return [t["name"] for t in data["tensors"]]


# --- JSON ------------------------------------------------------------------------------------------


def test_json_one_path_is_one_object() -> None:
    result = run_cli("inspect", "model.pt", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "statecli.report/1"
    assert data == MODEL.to_dict()
    assert result.stderr == ""


def test_json_is_not_wrapped_at_80_columns() -> None:
    long = "encoder." + ".".join(f"block{i}" for i in range(20)) + ".weight"
    CHECKPOINTS["long.pt"] = report("long.pt", tensor_info(long))
    try:
        result = run_cli("inspect", "long.pt", "-f", "json")
    finally:
        del CHECKPOINTS["long.pt"]
    assert f'"name": "{long}",' in result.stdout  # the whole name on one line
    assert result.stdout.count("\n") == 1  # piped: compact, one line per report
    assert json.loads(result.stdout)["tensors"][0]["name"] == long


def test_several_paths_give_a_json_array() -> None:
    result = run_cli("inspect", "model.pt", "small.safetensors", "-f", "json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert [d["path"] for d in data] == ["model.pt", "small.safetensors"]
    assert all(d["schema"] == "statecli.report/1" for d in data)


def test_one_failing_path_among_several_is_reported_and_the_rest_still_shown() -> None:
    result = run_cli("inspect", "model.pt", "x.pt", "unsafe.pt", "small.safetensors", "-f", "json")
    assert result.exit_code == 5  # the highest of 3 and 5
    assert [d["path"] for d in json.loads(result.stdout)] == ["model.pt", "small.safetensors"]
    assert result.stderr.splitlines() == [
        "statecli: error: x.pt: not a checkpoint",
        "statecli: error: unsafe.pt: refusing to run pickle code",
    ]


# --- filters and order -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--role", "buffer"], ["bn.running_mean", "bn.num_batches_tracked"]),
        (["-r", "buffer", "-r", "parameter"], [t.name for t in MODEL.tensors]),
        (["--match", "bn.*"], ["bn.running_mean", "bn.num_batches_tracked"]),
        (["-m", "*.weight", "-m", "bn.running_*"], ["conv.weight", "bn.running_mean", "fc.weight", "head.weight"]),
        (["--dtype", "fp16"], ["fc.weight", "head.weight"]),
        (["--dtype", "torch.int64", "-d", "half"], ["bn.num_batches_tracked", "fc.weight", "head.weight"]),
        (["--role", "parameter", "--dtype", "float32"], ["conv.weight"]),
    ],
)
def test_filters(args: list[str], expected: list[str]) -> None:
    result = run_cli("inspect", "model.pt", "-f", "json", *args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert names(data) == expected
    assert data["summary"]["parameters"]["count"] + data["summary"]["buffers"]["count"] == len(expected)


def test_filters_that_keep_nothing_say_so_on_stderr() -> None:
    result = run_cli("inspect", "model.pt", "-f", "json", "--match", "nothing*")
    assert result.exit_code == 0
    assert names(json.loads(result.stdout)) == []
    assert result.stderr == "statecli: note: model.pt: no tensor matches the filters (5 in the file)\n"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("size", ["conv.weight", "fc.weight", "head.weight", "bn.running_mean", "bn.num_batches_tracked"]),
        ("numel", ["conv.weight", "fc.weight", "head.weight", "bn.running_mean", "bn.num_batches_tracked"]),
        ("name", ["bn.num_batches_tracked", "bn.running_mean", "conv.weight", "fc.weight", "head.weight"]),
        ("role", ["conv.weight", "fc.weight", "head.weight", "bn.running_mean", "bn.num_batches_tracked"]),
        ("dtype", ["fc.weight", "head.weight", "conv.weight", "bn.running_mean", "bn.num_batches_tracked"]),
        ("file", [t.name for t in MODEL.tensors]),
    ],
)
def test_sort(key: str, expected: list[str]) -> None:
    result = run_cli("inspect", "model.pt", "-f", "json", "--sort", key)
    assert result.exit_code == 0, result.output
    assert names(json.loads(result.stdout)) == expected


def test_unknown_dtype_is_a_usage_error_naming_it() -> None:
    result = run_cli("inspect", "model.pt", "--dtype", "fp12")
    assert result.exit_code == 2
    assert "fp12" in result.stderr
    assert result.stdout == ""


def test_unknown_role_is_a_usage_error() -> None:
    result = run_cli("inspect", "model.pt", "--role", "weights")
    assert result.exit_code == 2
    assert "weights" in result.stderr


# --- csv and markdown ------------------------------------------------------------------------------

COLUMNS = [
    "name",
    "role",
    "exact",
    "evidence",
    "persistent",
    "requires_grad",
    "dtype",
    "shape",
    "numel",
    "nbytes",
    "device",
    "shares_with",
    "group",
    "file",
]


def test_csv() -> None:
    result = run_cli("inspect", "model.pt", "--format", "csv")
    assert result.exit_code == 0
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == COLUMNS
    assert rows[1] == [
        "conv.weight",
        "parameter",
        "true",
        "module",
        "",
        "true",
        "float32",
        "64×3×3×3",
        "1728",
        "6912",
        "cpu",
        "",
        "model",
        "",
    ]
    by_name = {r[0]: dict(zip(COLUMNS, r, strict=True)) for r in rows[1:]}
    assert by_name["bn.num_batches_tracked"]["shape"] == ""  # 0-dim
    assert by_name["fc.weight"]["shares_with"] == "head.weight"
    assert by_name["fc.weight"]["device"] == "cuda:0"
    assert len(rows) == 1 + len(MODEL.tensors)


def test_csv_of_several_paths_has_a_path_column() -> None:
    result = run_cli("inspect", "model.pt", "small.safetensors", "-f", "csv")
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["path", *COLUMNS]
    assert rows[-1][:2] == ["small.safetensors", "w"]
    assert rows[-1][COLUMNS.index("device") + 1] == ""


def test_markdown() -> None:
    result = run_cli("inspect", "markup.pt", "--format", "markdown")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |"
    assert lines[1].startswith("|---|---|")
    assert lines[2].startswith("| `layer[0].weight` | parameter | false | default |")
    assert len(lines) == 2 + len(MARKUP.tensors)


# --- table -----------------------------------------------------------------------------------------


def test_table_shows_every_tensor_summary_and_legend() -> None:
    result = run_cli("inspect", "model.pt", env={"COLUMNS": "160"})
    assert result.exit_code == 0
    out = result.stdout
    for t in MODEL.tensors:
        assert t.name in out
    assert "Shares" in out and "trainable" in out
    assert "Parameters" in out and "Format" in out
    assert "● exact" in out
    assert result.stderr == ""


def test_table_without_summary_and_legend() -> None:
    result = run_cli("inspect", "model.pt", "--no-summary", "--no-legend", env={"COLUMNS": "160"})
    assert "conv.weight" in result.stdout
    assert "Parameters" not in result.stdout and "● exact" not in result.stdout


def test_markup_looking_names_print_literally() -> None:
    result = run_cli("inspect", "markup.pt", env={"COLUMNS": "160"})
    assert result.exit_code == 0
    for text in ("layer[0].weight", "[red]b[/red].bias", "a:smile:", "[bold]x[/bold].pt"):
        assert text in result.stdout


def test_colour_follows_the_terminal_and_no_color() -> None:
    coloured = run_cli("inspect", "model.pt", env={"FORCE_COLOR": "1", "COLUMNS": "160"}).stdout
    assert "\x1b[32m" in coloured  # parameters in green
    plain = run_cli("inspect", "model.pt", env={"FORCE_COLOR": "1", "NO_COLOR": "1", "COLUMNS": "160"}).stdout
    assert "\x1b[32m" not in plain
    assert "\x1b[" not in run_cli("inspect", "model.pt").stdout  # not a terminal: no escapes at all


# --- findings and errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "csv", "markdown", "table"])
def test_dangerous_finding_warns_on_stderr_in_every_format(fmt: str) -> None:
    result = run_cli("inspect", "evil.pt", "-f", fmt)
    assert result.exit_code == 0
    assert result.stderr == "statecli: warning: evil.pt: pickle would call os.system (unsafe-global)\n"
    if fmt == "json":
        assert json.loads(result.stdout)["findings"][0]["level"] == "dangerous"


def test_input_error_is_one_line_and_exit_3() -> None:
    result = run_cli("inspect", "x.pt")
    assert result.exit_code == 3
    assert result.stderr == "statecli: error: x.pt: not a checkpoint\n"
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_unsafe_error_exit_5() -> None:
    result = run_cli("tree", "unsafe.pt")
    assert result.exit_code == 5
    assert result.stderr == "statecli: error: unsafe.pt: refusing to run pickle code\n"


def test_debug_shows_the_traceback() -> None:
    result = run_cli("--debug", "inspect", "x.pt")
    assert result.exit_code == 3
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().endswith("statecli: error: x.pt: not a checkpoint")


def test_unexpected_exception_is_an_internal_error() -> None:
    result = run_cli("inspect", "bug.pt")
    assert result.exit_code == 3
    assert result.stderr == ("statecli: internal error: RuntimeError: boom (re-run with --debug for a traceback)\n")
    debug = run_cli("--debug", "inspect", "bug.pt")
    assert debug.exit_code == 3
    assert "Traceback" in debug.stderr and "RuntimeError: boom" in debug.stderr


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["inspect"], "statecli: error: Missing argument 'PATH...' (see: statecli inspect --help)\n"),
        (["convert"], "statecli: error: Missing argument 'PATH' (see: statecli convert --help)\n"),
        (["nosuchcommand"], "statecli: error: No such command 'nosuchcommand' (see: statecli --help)\n"),
        (["inspect", "model.pt", "--nosuchoption"], "statecli: error: No such option: --nosuchoption"),
        (["inspect", "model.pt", "--dtype", "foo"], "statecli: error: Invalid value for '--dtype' / '-d': unknown"),
        (["diff", "a.pt", "b.pt", "--atol", "-1"], "statecli: error: Invalid value for '--atol': -1.0 is not"),
    ],
)
def test_usage_errors_are_one_line_on_stderr_exit_2(args: list[str], text: str) -> None:
    """Whatever finds a usage error (Typer's parser or statecli), it is one ``statecli: error:`` line on
    stderr, like every other error: no boxed panel, no help text on stdout."""
    result = run_cli(*args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(text)
    assert result.stderr.count("\n") == 1


def test_bare_statecli_shows_the_help_where_errors_go() -> None:
    # A bare `statecli` is a usage error (exit 2): its help goes to stderr and stdout stays empty, so
    # `statecli > out.json` with a forgotten command does not write the help into a data file.
    result = run_cli()
    assert result.exit_code == 2
    assert "Usage: statecli" in result.stderr and "inspect" in result.stderr
    assert result.stdout == ""


def test_stdin_is_not_read_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real reader says it
    result = run_cli("inspect", "-")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (
        "statecli: error: '-' (standard input) is not supported: checkpoints are read by random access; give a path\n"
    )


def test_debug_after_the_command_says_where_it_goes() -> None:
    result = run_cli("inspect", "sample_models/cnn_bn.safetensors", "--debug")
    assert result.exit_code == 2
    assert result.stderr == "statecli: error: --debug goes before the command: statecli --debug inspect ...\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "sample_models/cnn_bn.safetensors", "--dtype", "foo"],
        ["convert", "sample_models/cnn_bn.safetensors", "-o", "never.pt", "--dtype", "foo"],
        ["check", "sample_models/cnn_bn.safetensors", "--no-policy", "--dtype", "foo"],
    ],
    ids=lambda a: a[0],
)
def test_one_wording_for_an_unknown_dtype(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    result = run_cli(*argv)
    assert result.exit_code == 2
    assert (
        "unknown dtype 'foo' (try float32/fp32, bfloat16/bf16, float16/fp16, float64, float8_e4m3fn, int64, bool)"
        in (result.stderr)
    )
    assert not Path("never.pt").exists()


def test_version() -> None:
    result = run_cli("--version")
    assert result.exit_code == 0
    assert result.stdout == f"statecli {statecli.__version__}\n"


# --- tree ------------------------------------------------------------------------------------------


def test_tree_json() -> None:
    result = run_cli("tree", "model.pt", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "statecli.tree/1" and data["path"] == "model.pt"
    root = data["root"]
    assert [c["name"] for c in root["children"]] == ["conv", "bn", "fc", "head"]
    assert root["parameters"]["count"] == 3 and root["buffers"]["count"] == 2
    assert root["nbytes"] == sum(t.nbytes for t in MODEL.tensors)
    bn = root["children"][1]
    assert bn["tensors"] == ["bn.running_mean", "bn.num_batches_tracked"]
    assert bn["buffers"] == {"count": 2, "numel": 65, "nbytes": 264}


def test_tree_depth_folds_and_filters_apply() -> None:
    data = json.loads(run_cli("tree", "model.pt", "-f", "json", "--depth", "1", "--role", "buffer").stdout)
    root = data["root"]
    assert [c["name"] for c in root["children"]] == ["bn"]
    assert root["children"][0]["tensors"] == [] and root["children"][0]["folded"] == 2
    assert root["parameters"]["count"] == 0 and root["buffers"]["nbytes"] == 264
    data = json.loads(run_cli("tree", "model.pt", "-f", "json", "--depth", "0").stdout)
    assert data["root"]["children"] == [] and data["root"]["folded"] == 5
    assert run_cli("tree", "model.pt", "--depth", "-1").exit_code == 2


def test_tree_table() -> None:
    result = run_cli("tree", "model.pt", env={"COLUMNS": "160"})
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith("model.pt")
    conv = next(line for line in lines if "conv " in line)
    assert "█" in conv and "%" in conv
    assert any("running_mean" in line and "buffer ○" in line for line in lines)


# --- end to end: the real readers on the bundled samples, and a real process ------------------------


def test_real_samples_through_the_real_reader(monkeypatch: pytest.MonkeyPatch, samples_dir: Path) -> None:
    monkeypatch.undo()  # this test reads real files: no fake open_checkpoint
    result = run_cli("inspect", str(samples_dir / "cnn_bn_module.pt"), "-f", "json", "--role", "buffer")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert names(data) == [f"bn{i}.{n}" for i in (1, 2) for n in ("running_mean", "running_var", "num_batches_tracked")]
    assert {t["evidence"] for t in data["tensors"]} == {"module"}
    evil = run_cli("inspect", str(samples_dir / "malicious_os_system.pt"), "-f", "json")
    assert evil.exit_code == 0
    assert json.loads(evil.stdout)["findings"]
    assert evil.stderr.startswith("statecli: warning: ") and "system" in evil.stderr
    assert run_cli("tree", str(samples_dir / "tied_lm.pt")).exit_code == 0


def test_a_real_process_maps_errors_and_imports_neither_torch_nor_numpy(samples_dir: Path) -> None:
    code = (
        "import sys, runpy\n"
        "sys.argv = ['statecli'] + sys.argv[1:]\n"
        "try:\n"
        "    runpy.run_module('statecli', run_name='__main__')\n"
        "finally:\n"
        "    sys.stderr.write(repr(sorted(m for m in ('torch', 'numpy') if m in sys.modules)) + '\\n')\n"
    )
    sample = str(samples_dir / "cnn_bn_state_dict.pt")
    ok = subprocess.run([sys.executable, "-c", code, "inspect", sample, "-f", "json"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["schema"] == "statecli.report/1"
    assert ok.stderr == "[]\n"
    bad = subprocess.run(
        [sys.executable, "-m", "statecli", "inspect", "/nonexistent/x.pt"], capture_output=True, text=True
    )
    assert bad.returncode == 3
    assert bad.stderr.startswith("statecli: error: /nonexistent/x.pt: ") and bad.stderr.count("\n") == 1


@pytest.mark.parametrize("command", ["inspect", "tree", "stats", "diff"])
def test_dtype_filters_the_same_way_in_every_listing_command(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # --dtype keeps only tensors of a dtype in inspect and tree; stats and diff had no such filter.
    monkeypatch.undo()  # real files
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    sample = "sample_models/cnn_bn_state_dict.pt"
    argv = [command, sample, *([sample] if command == "diff" else []), "--dtype", "int64", "-f", "json"]
    result = run_cli(*argv)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    if command == "tree":
        text = json.dumps(doc)
        assert "num_batches_tracked" in text and "running_mean" not in text
        return
    if command == "diff":
        names = {r if isinstance(r, str) else r["name"] for r in doc["identical"]}
    else:
        names = {r["name"] for r in doc["tensors"] if r["name"] != "(total)"}
    assert names == {"bn1.num_batches_tracked", "bn2.num_batches_tracked"}
