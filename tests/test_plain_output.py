"""What a file or a pipe receives from the table views: no blank padding at line ends, and rows that fit
the width they were given. A grid pads every row to its widest; in a file that is noise for diff and grep."""

from __future__ import annotations

from pathlib import Path

import pytest
from clirun import run_cli


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "all_dtypes.pt"],  # a summary line far longer than the others
        ["inspect", "tied_lm.pt"],  # a Shares column, empty on most rows
        ["inspect", "cnn_bn_module.pt"],  # findings
        ["tree", "cnn_bn_state_dict.pt"],
        ["check", "cnn_bn_state_dict.pt", "--no-nan"],
        ["schema", "torchscript_freeze_constants.pt"],
        ["stats", "cnn_bn_state_dict.pt"],
        ["diff", "cnn_bn_state_dict.pt", "cnn_bn.safetensors"],
    ],
)
def test_piped_tables_have_no_trailing_blanks(samples_dir: Path, args: list[str]) -> None:
    code, out, _ = run_cli(
        args[0], *[str(samples_dir / a) if a.endswith((".pt", ".safetensors")) else a for a in args[1:]]
    )
    assert code == 0, out
    padded = [line for line in out.splitlines() if line != line.rstrip()]
    assert padded == []


def test_columns_env_fits_the_table_without_wrapping(samples_dir: Path) -> None:
    path = samples_dir / "cnn_bn_state_dict.pt"
    code, out, _ = run_cli("inspect", str(path), "--no-summary", "--no-legend", env={"COLUMNS": "80"})
    assert code == 0
    lines = out.splitlines()
    assert lines[1].startswith("(hidden to fit the width: ")
    rows = [line for line in lines[4:] if line]
    assert len(rows) == 16 and all(len(line) <= 80 for line in rows)
    assert {line.split()[0] for line in rows} >= {"bn1.running_mean", "bn2.running_mean"}


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_trimmed_stream_keeps_every_character_but_trailing_blanks(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    import io

    from statecli.output import console

    monkeypatch.setattr(console, "_CHUNK", chunk)
    out = io.StringIO()
    stream = console._TrimmedLines(out)
    pieces = ["a  b   \nlong line without end ", "   still it  \n\n   \n", "x" * 30 + " \n", "open  "]
    for p in pieces:
        stream.write(p)
    stream.flush()
    text = "".join(pieces)
    expected = "\n".join(line.rstrip(" ") for line in text[: text.rfind("\n")].split("\n")) + "\nopen  "
    assert out.getvalue() == expected


@pytest.mark.parametrize(
    "args",
    [
        ["stats", "cnn_bn_state_dict.pt"],
        ["diff", "cnn_bn_state_dict.pt", "training_adam.pt", "--all"],
        ["convert", "training_adam.pt", "-o", "never-written.safetensors", "--dtype", "fp16", "--dry-run"],
    ],
)
def test_other_grids_fit_80_columns(samples_dir: Path, tmp_path: Path, args: list[str]) -> None:
    def arg(a: str) -> str:
        if a.startswith("never-written"):
            return str(tmp_path / a)
        return str(samples_dir / a) if a.endswith((".pt", ".safetensors")) else a

    code, out, _ = run_cli(args[0], *map(arg, args[1:]), env={"COLUMNS": "80"})
    assert code in (0, 1), out
    lines = out.splitlines()
    assert lines[1].startswith("(hidden to fit the width: ")
    grid = lines[2 : lines.index("")] if "" in lines else lines[2:]
    assert len(grid) > 3 and all(len(line) <= 80 for line in grid)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_ascii_stdout_gets_a_clear_error_not_a_crash(samples_dir: Path) -> None:
    import subprocess
    import sys

    from subproc import checkout_env

    env = checkout_env(PYTHONIOENCODING="ascii")
    sample = str(samples_dir / "tied_lm.pt")
    table = subprocess.run([sys.executable, "-m", "statecli", "inspect", sample], env=env, capture_output=True)
    assert table.returncode == 4
    assert table.stderr.decode().startswith("statecli: error: standard output uses the ascii encoding")
    assert table.stderr.count(b"\n") == 1 and b"internal error" not in table.stderr
    as_json = subprocess.run(
        [sys.executable, "-m", "statecli", "inspect", sample, "-f", "json"], env=env, capture_output=True
    )
    assert as_json.returncode == 0 and as_json.stdout.startswith(b'{"schema": "statecli.report/1"')


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_a_closed_pipe_exits_quietly_as_sigpipe_would(samples_dir: Path, fmt: str) -> None:
    # `statecli diff a b | head -1`: exit 1 would read as "different" under `set -o pipefail`.
    import subprocess
    import sys

    from subproc import checkout_env

    args = [sys.executable, "-m", "statecli", "inspect", str(samples_dir / "tied_lm.pt"), "-f", fmt]
    proc = subprocess.Popen(args, env=checkout_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before statecli writes a byte
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141
    assert err == b""


# --- a stdout that cannot take the output (#13, item 2) -----------------------------------------------

_STDOUT_CASES = [
    ["--help"],
    ["--version"],
    ["inspect", "--help"],
    ["inspect", "sample_models/tied_lm.pt"],
    ["inspect", "sample_models/tied_lm.pt", "-f", "json"],
    ["check", "sample_models/tied_lm.pt", "--no-policy", "-f", "junit"],
]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("argv", _STDOUT_CASES, ids=" ".join)
def test_a_full_stdout_is_exit_4_in_one_line(repo_root: Path, argv: list[str]) -> None:
    # `statecli --help > /dev/full` printed a traceback; a command said "internal error" (exit 3).
    import subprocess
    import sys

    from subproc import checkout_env

    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "statecli", *argv], cwd=repo_root, env=checkout_env(), stdout=full,
            stderr=subprocess.PIPE, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 4
    assert proc.stderr.decode() == "statecli: error: cannot write to standard output (No space left on device)\n"


@pytest.mark.slow
@pytest.mark.parametrize("argv", _STDOUT_CASES[:3], ids=" ".join)
def test_help_and_version_into_a_closed_pipe_exit_as_sigpipe_would(repo_root: Path, argv: list[str]) -> None:
    # `statecli --version | true` under `set -o pipefail`: Typer's own answer was exit 1.
    import os
    import subprocess
    import sys

    from subproc import checkout_env

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before statecli writes a byte
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "statecli", *argv], cwd=repo_root, env=checkout_env(), stdout=write_end,
            stderr=subprocess.PIPE, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, b"")
