"""Every command and option is documented, and the docs say what statecli does.

Non-empty help in the app; a page per command in docs/ that the README links to; every output block in
README.md and docs/ equal to what its command prints; docs/cli.md as Typer generates it today.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from clirun import run_cli

from statecli.cli.main import app

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
CLI_REFERENCE = DOCS / "cli.md"
REGENERATE_CLI = "typer statecli.cli.main utils docs --name statecli --output docs/cli.md"
# An output block: "(`statecli ...`)" (a colon may follow) closes a line, then a blank line and a bare fence.
OUTPUT_BLOCK = re.compile(r"\(`(statecli [^`\n]+)`\):?\n\n```\n(.*?)```\n", re.DOTALL)
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


def test_the_readme_is_a_landing_page() -> None:
    data = README.read_bytes()
    assert len(data) <= 12 * 1024, f"README.md is {len(data)} bytes; keep it under 12 KiB and move the rest to docs/"
    # .ci/run runs the README's test command, and a fresh machine starts from the first one.
    assert data.decode("utf-8").startswith(
        "# statecli\n\n```sh\n"
        "pip install torch==2.13.0 -e . && statecli inspect sample_models/cnn_bn_state_dict.pt\n"
        "pip install torch==2.13.0 -e '.[test]' && python -m pytest -q\n```\n"
    )


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_a_page_the_readme_links_to(name: str) -> None:
    page = DOCS / f"{name}.md"
    assert page.is_file(), f"statecli {name} has no page docs/{name}.md"
    assert page.read_text(encoding="utf-8").startswith(f"# `statecli {name}`\n"), f"docs/{name}.md has another title"
    readme = README.read_text(encoding="utf-8")
    assert re.search(rf"statecli {name}\b", readme), f"README.md does not mention `statecli {name}`"
    assert f"](docs/{name}.md)" in readme, f"README.md does not link to docs/{name}.md"


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_relative_links_lead_to_files(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        assert (page.parent / path).exists(), f"{page.name} links to {target}, which does not exist"


def test_every_page_is_in_the_site_navigation() -> None:
    nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r":\s*(\S+\.md)\s*$", nav, re.MULTILINE))
    assert listed == {p.name for p in PAGES}


def _output_blocks() -> list[tuple[str, str, str]]:
    return [
        (page.name, m[1], m[2]) for page in [README, *PAGES] for m in OUTPUT_BLOCK.finditer(page.read_text("utf-8"))
    ]


OUTPUT_BLOCKS = _output_blocks()


def test_the_readme_and_every_command_page_show_real_output() -> None:
    pages = {page for page, _, _ in OUTPUT_BLOCKS}
    assert {"README.md", *(f"{name}.md" for name in COMMANDS)} <= pages, sorted(pages)


@pytest.mark.parametrize(("page", "command", "shown"), OUTPUT_BLOCKS, ids=[f"{p}:{c}" for p, c, _ in OUTPUT_BLOCKS])
def test_the_readme_sample_outputs_are_what_statecli_prints(
    monkeypatch: pytest.MonkeyPatch, page: str, command: str, shown: str
) -> None:
    monkeypatch.chdir(REPO)
    result = run_cli(*shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    assert result.stdout == shown, f"{page}: paste what `{command}` prints today into the page"


def test_the_cli_reference_is_current(tmp_path: Path) -> None:
    # Typer renders this app's help as plain text (rich_markup_mode="markdown"), so the page does not
    # depend on the terminal; the environment is pinned anyway so that a later Typer cannot make it so.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STATECLI_", "TYPER_"))}
    env.update(COLUMNS="80", LINES="24", NO_COLOR="1", TERM="dumb", PYTHONIOENCODING="utf-8")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    out = tmp_path / "cli.md"
    command = ["typer", "statecli.cli.main", "utils", "docs", "--name", "statecli", "--output", str(out)]
    subprocess.run([sys.executable, "-m", *command], cwd=REPO, env=env, check=True, capture_output=True)
    assert out.read_text(encoding="utf-8") == CLI_REFERENCE.read_text(encoding="utf-8"), (
        f"docs/cli.md is stale: regenerate it with `{REGENERATE_CLI}`"
    )
