"""What a person sees on a narrow terminal (#13 item 4): tables, legends, tree headers and ``--help`` at 60,
80 and 100 columns, run as a user runs them (``COLUMNS=80 statecli ...``).

- a legend wraps between words and describes only the columns that are shown;
- optional columns go before any name is shortened, and two different names never look the same;
- the tree's header breaks between its parts, never inside one;
- ``--help``: examples on their own lines, choices never split inside a word, no trailing blanks in a pipe.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main
from clirun import run_cli
from rich.cells import cell_len

from statecli.cli.main import app
from statecli.output import columns as C
from statecli.output import table as render

REPO = Path(__file__).resolve().parent.parent
WIDTHS = (60, 80, 100)
ROOT = typer.main.get_command(app)
COMMANDS = dict(ROOT.commands)  # type: ignore[attr-defined]
SAMPLES = [
    "cnn_bn_state_dict.pt",
    "training_adam.pt",
    "qat_observers.pt",
    "dcp_training",
    "transformer_buffers.safetensors",
    "frozen_nonpersistent_module.pt",
    "sharded",
]
HIDDEN_NOTE = re.compile(r"^\((?:hidden to fit the width|hidden): (.*)\)$")


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def show(*argv: str, width: int) -> str:
    result = run_cli(*argv, env={"COLUMNS": str(width), "NO_COLOR": "1"})
    assert result.exit_code in (0, 1), result.output
    return result.stdout


class Shown:
    """A grid as printed: the columns it hides, its headers, and its rows' name cells."""

    def __init__(self, text: str) -> None:
        lines = text.splitlines()
        rule = next(i for i, line in enumerate(lines) if line.startswith("─"))
        note = HIDDEN_NOTE.match(lines[rule - 2])
        self.hidden = note[1].split(", ") if note else []
        header = lines[rule - 1]
        self.headers = header.split()
        second = header.index(self.headers[1]) if len(self.headers) > 1 else len(header) + 2
        end = next((i for i in range(rule + 1, len(lines)) if not lines[i]), len(lines))
        self.rows = lines[rule + 1 : end]
        self.names = [row[: second - 2].rstrip() for row in self.rows]
        self.after = lines[end:]


def optional(table: tuple[C.Column, ...]) -> set[str]:
    return {c.header for c in table if c.hide is not None}


# Each table with the columns a narrow terminal may leave out.
GRIDS = [
    pytest.param(("inspect",), optional(C.inspect_table(())) | {"Shares"}, id="inspect"),
    pytest.param(("stats",), optional(C.STATS_TABLE), id="stats"),
    pytest.param(("convert", "-o", "/nonexistent/x.pt", "--dry-run"), optional(C.PLAN_TABLE), id="convert"),
]


@pytest.mark.parametrize("width", [60, 80])
@pytest.mark.parametrize(("argv", "optional_columns"), GRIDS)
@pytest.mark.parametrize("sample", SAMPLES)
def test_names_are_cut_only_after_every_optional_column_and_never_look_alike(
    sample: str, argv: tuple[str, ...], optional_columns: set[str], width: int
) -> None:
    shown = Shown(show(argv[0], f"sample_models/{sample}", *argv[1:], width=width))
    if any("…" in name for name in shown.names):
        assert optional_columns & set(shown.headers) == set(), shown.headers
    # Every row of these tables is a different tensor: no two may print the same name.
    assert len(set(shown.names)) == len(shown.names), [n for n in shown.names if shown.names.count(n) > 1]


@pytest.mark.parametrize("width", [60, 80])
def test_diff_rows_never_look_alike(width: int) -> None:
    text = show("diff", "sample_models/training_adam.pt", "sample_models/qat_observers.pt", width=width)
    shown = Shown(text)
    assert len(set(shown.names)) == len(shown.names)


def test_bn_counters_stay_apart_at_60_columns() -> None:
    # The case: both printed as "…um_batches_tracked".
    shown = Shown(show("inspect", "sample_models/training_adam.pt", width=60))
    counters = [n for n in shown.names if n.endswith("tracked")]
    assert len(counters) == 2 and counters[0] != counters[1]
    assert counters[0].startswith("bn1") and counters[1].startswith("bn2")


def test_qat_names_are_cut_only_once_device_is_gone() -> None:
    # At 80 columns the observers' names were cut while Device was still shown, three of them alike.
    shown = Shown(show("inspect", "sample_models/qat_observers.pt", width=80))
    assert any("…" in n for n in shown.names)
    assert "Device" not in shown.headers and "Device" in shown.hidden


def _legend(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("● exact"))
    return lines[start:]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("sample", SAMPLES)
def test_the_legend_wraps_between_words_and_names_only_shown_columns(sample: str, width: int) -> None:
    text = show("inspect", f"sample_models/{sample}", width=width)
    shown = Shown(text)
    legend = _legend(text)
    assert all(cell_len(line) <= width for line in legend), legend
    words = [w for w in " ".join(legend).split() if w != "·"]
    assert ("Evidence" in words) == ("Evidence" in shown.headers)
    # Each entry whole on one line where it fits: no line ends inside "○ inferred: ...".
    assert not any(line.endswith(("●", "○", "—", "·")) for line in legend)
    # Every word whole, in order; a line break takes the place of a " · " between entries.
    expected = render.legend_text(set(shown.headers), "np:" in words)
    assert words == [w for w in expected.split() if w != "·"]


def test_the_legend_text_without_evidence_or_dashes() -> None:
    everything = render.legend_text({"Name", "Role", "Evidence", "Device", "Grad"}, True)
    assert everything == (
        "● exact: the file states the role · ○ inferred: see Evidence · — not stored in the file · "
        "np: non-persistent buffer, left out of state_dict()"
    )
    assert "Evidence" not in render.legend_text({"Name", "Role", "Device"}, False)
    assert "—" not in render.legend_text({"Name", "Role", "Size"}, False)


@pytest.mark.parametrize("width", [60, 80])
@pytest.mark.parametrize("sample", ["training_adam.pt", "transformer_buffers.safetensors", "tied_lm.pt"])
def test_the_tree_header_breaks_between_its_parts(sample: str, width: int) -> None:
    lines = show("tree", f"sample_models/{sample}", width=width).splitlines()
    header = lines[: next(i for i, line in enumerate(lines) if line.startswith(("├", "└")))]
    assert header[0].startswith(f"sample_models/{sample}  ")
    assert all(cell_len(line) <= width for line in header), header
    assert not any(line.startswith("·") or line.rstrip().endswith("·") for line in header), header
    # Each total ("6 buffers 208 B") whole on one line.
    for part in re.findall(r"[\d,]+ (?:params?|buffers?|other) [\d.]+ [KMGT]?i?B", " ".join(header)):
        assert any(part in line for line in header), (part, header)


@pytest.mark.parametrize("width", [60, 80])
def test_the_diff_summary_wraps_between_words(width: int) -> None:
    a, b = "sample_models/sharded", "sample_models/transformer_buffers.safetensors"
    wide = show("diff", a, b, width=200).splitlines()[-1]
    assert wide.startswith("different: ") and cell_len(wide) > 80
    summary = Shown(show("diff", a, b, width=width)).after[1:]
    assert all(cell_len(line) <= width for line in summary), summary
    assert " ".join(summary) == wide


# --- the grid's name cutting, unit by unit ------------------------------------------------------------


def test_a_cut_keeps_both_ends() -> None:
    (shown,), width = render.cut_names(["encoder.layers.0.bn1.running_mean"], 20)
    assert width == 20 and len(shown) == 20 and "…" in shown
    assert shown.startswith("enc") and shown.endswith("running_mean")


@pytest.mark.parametrize("width", range(12, 24))
def test_cut_names_are_distinct_at_every_width(width: int) -> None:
    names = [f"bn{i}.num_batches_tracked" for i in (1, 2)] + [
        f"optimizer.state.{i}.{k}" for i in range(12) for k in ("step", "exp_avg", "exp_avg_sq")
    ]
    shown, used = render.cut_names(names, width)
    # No single cut of 12 or 13 cells shows both the state's number and its kind ("…11.exp_avg_sq").
    assert used == max(width, 14)
    assert len(set(shown)) == len(names)
    assert all(cell_len(s) <= used for s in shown)


def test_names_that_differ_only_deep_inside_get_a_wider_column() -> None:
    names = ["a" * 20 + "1" + "b" * 20, "a" * 20 + "2" + "b" * 20]
    shown, used = render.cut_names(names, 12)
    assert used > 12 and len(set(shown)) == 2 and all(cell_len(s) <= used for s in shown)


def test_names_with_wide_characters_are_cut_by_cells() -> None:
    names = ["層" * 10 + ".weight", "層" * 10 + ".bias"]
    shown, used = render.cut_names(names, 14)
    assert used == 14 and len(set(shown)) == 2 and all(cell_len(s) <= 14 for s in shown)


# --- --help -------------------------------------------------------------------------------------------

HELP = [[], *([name] for name in sorted(COMMANDS))]


def _help(argv: list[str], width: int) -> str:
    result = run_cli(*argv, "--help", env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("argv", HELP, ids=lambda a: " ".join(a) or "statecli")
def test_piped_help_has_no_trailing_blanks(argv: list[str], width: int) -> None:
    out = _help(argv, width)
    assert [n for n, line in enumerate(out.splitlines(), 1) if line != line.rstrip()] == []


def _examples(name: str) -> list[str]:
    text = COMMANDS[name].help or ""
    return [line.strip() for line in text.split("Examples:", 1)[1].splitlines() if line.strip()]


def _shown_commands(out: str) -> list[tuple[str, list[str]]]:
    """Every command line the help shows, its continuation lines (after `` \\``) joined."""
    lines = [line.strip() for line in out.splitlines()]
    found = []
    i = 0
    while i < len(lines):
        if lines[i].startswith("statecli "):
            block = [lines[i]]
            while block[-1].endswith(" \\") and i + 1 < len(lines):
                i += 1
                block.append(lines[i])
            found.append((" ".join(part.removesuffix(" \\") for part in block), block))
        i += 1
    return found


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_examples_start_on_their_own_lines_and_break_only_between_words(name: str, width: int) -> None:
    out = _help([name], width)
    shown = dict(_shown_commands(out))
    for example in _examples(name):
        assert example in shown, f"{example!r} is not shown whole at {width} columns:\n{out}"
        assert all(cell_len(line) <= width for line in shown[example])


def _choices(name: str) -> list[tuple[str, list[str]]]:
    return [
        (p.name or "", list(p.type.choices))  # type: ignore[attr-defined]
        for p in COMMANDS[name].params
        if hasattr(p.type, "choices")
    ]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_never_splits_a_choice(name: str, width: int) -> None:
    out = _help([name], width)
    words = set(re.findall(r"[\w-]+", out))
    for param, choices in _choices(name):
        for choice in choices:
            assert choice in words, f"--{param}: {choice!r} is not shown whole at {width} columns"
            # a piece of it alone ("markd", "own") is a choice cut in two
            pieces = {choice[:k] for k in range(2, len(choice))} | {choice[k:] for k in range(2, len(choice) - 1)}
            assert not pieces & (words - set(choices) - _prose_words()), (param, choice, pieces & words)


def _prose_words() -> set[str]:
    # Words the help texts use on their own that happen to be part of a choice name (e.g. "on" of "json").
    helps = [c.help or "" for c in COMMANDS.values()]
    helps += [getattr(p, "help", "") or "" for c in COMMANDS.values() for p in c.params]
    text = " ".join(helps)
    return set(re.findall(r"[\w-]+", text))


@pytest.mark.parametrize("width", [30, 44, 56, 76])
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_broken_example_is_still_the_same_shell_command(name: str, width: int) -> None:
    import shlex

    from statecli.cli._help import break_command

    for example in _examples(name):
        lines = break_command(example, width)
        assert all(line.endswith(" \\") for line in lines[:-1]) and not lines[-1].endswith("\\")
        parts = [line.removesuffix(" \\") for line in lines]
        for part in parts:
            shlex.split(part)  # quotes balanced on every line: no break inside a quoted word
        assert shlex.split(" ".join(parts)) == shlex.split(example)
        # Longer than the width only where one word is: '.changed[] | select(...)' is not cut.
        assert all(len(line) <= width or len(shlex.split(line.removesuffix(" \\"))) <= 2 for line in lines)
