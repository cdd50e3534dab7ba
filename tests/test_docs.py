"""Every command and option is documented: non-empty help in the app, every command in the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main
from clirun import run_cli

from statecli.cli.main import app

README = Path(__file__).resolve().parent.parent / "README.md"
ROOT = typer.main.get_command(app)
COMMANDS = dict(ROOT.commands)  # type: ignore[attr-defined]


def test_there_are_commands() -> None:
    assert {"inspect", "tree"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_has_help_with_an_example(name: str) -> None:
    help_text = COMMANDS[name].help or ""
    assert help_text.strip(), f"statecli {name} has no help"
    assert f"statecli {name} " in help_text, f"statecli {name}'s help shows no example"


@pytest.mark.parametrize(
    ("command", "param"),
    [("statecli", p.name) for p in ROOT.params]
    + [(name, p.name) for name, cmd in sorted(COMMANDS.items()) for p in cmd.params],
)
def test_every_option_and_argument_has_help(command: str, param: str) -> None:
    cmd = ROOT if command == "statecli" else COMMANDS[command]
    (found,) = [p for p in cmd.params if p.name == param]
    assert (getattr(found, "help", None) or "").strip(), f"{command}: {param} has no help text"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_is_in_the_readme(name: str) -> None:
    text = README.read_text(encoding="utf-8")
    assert re.search(rf"statecli {name}\b", text), f"README.md does not mention `statecli {name}`"


@pytest.mark.parametrize(
    "command",
    [
        "statecli inspect sample_models/frozen_nonpersistent_module.pt",
        "statecli tree sample_models/cnn_bn_module.pt --depth 1",
    ],
)
def test_the_readme_sample_outputs_are_what_statecli_prints(monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    text = README.read_text(encoding="utf-8")
    start = text.index("```\n", text.index(f"(`{command}`)")) + 4
    shown = text[start : text.index("```", start)]
    monkeypatch.chdir(README.parent)
    result = run_cli(*command.split()[1:])
    assert result.exit_code == 0 and result.stdout == shown
