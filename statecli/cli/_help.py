"""``--help`` that reads right at any width, on a terminal or in a pipe.

Typer draws the help with rich. Two things it leaves to us:

- Examples are a Markdown code block, which rich wraps wherever the width runs out, so the rest of a
  long example lands on a line of its own and reads as another command. Here each example is broken
  before rich sees it, between shell words and never inside quotes, with a `` \\`` at the end of
  every line but its last, so it can still be pasted as it is.
- rich pads every line to the width; in a pipe or a file those blanks are noise for ``diff`` and
  ``grep``. They are dropped when stdout is not a terminal.

Choice options name their values in their help text and show a metavar (``FORMAT``): a list such as
``<table|json|csv|markdown>`` is one word to rich, which cuts it anywhere when the column is narrow.
"""

from __future__ import annotations

import contextlib
import io
import sys
from typing import Any

from typer.core import TyperCommand

EXAMPLE = "statecli "
CODE_INDENT = "    "  # a Markdown code block: the examples in every command's docstring
CONTINUED = " \\"
# What Typer and rich put around a code block's text: a one-cell margin each side of the help, and
# the block's own padding of one cell each side.
CODE_MARGIN = 4


def shell_words(line: str) -> list[str]:
    """``line`` split at blanks outside quotes: ``jq '.a | .b'`` is two words."""
    words: list[str] = []
    word = ""
    quote = ""
    for ch in line:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == " ":
            if word:
                words.append(word)
            word = ""
            continue
        word += ch
    if word:
        words.append(word)
    return words


def _units(words: list[str]) -> list[str]:
    """``words`` with each option kept beside its value (``--format json``) and each redirection beside
    its file (``> report.xml``): a line break between them reads as two things."""
    units: list[str] = []
    for word in words:
        if units and _takes_next(units[-1]) and not word.startswith("-") and word != "|":
            units[-1] += " " + word
        else:
            units.append(word)
    return units


def _takes_next(unit: str) -> bool:
    return " " not in unit and (unit.startswith("-") or unit in (">", ">>", "<"))


def break_command(line: str, width: int) -> list[str]:
    """A shell command in lines of at most ``width`` characters, broken between words, every line but the
    last ending in `` \\`` and the later ones indented: still one command to a shell. A word longer than
    a line stays whole on a line of its own."""
    if len(line) <= width:
        return [line]
    lines: list[str] = []
    current = ""
    words = _units(shell_words(line))
    for k, word in enumerate(words):
        last = k == len(words) - 1
        room = width - (0 if last else len(CONTINUED))
        if current and len(current) + 1 + len(word) > room:
            lines.append(current + CONTINUED)
            current = CODE_INDENT + word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return lines


def fit_examples(help_text: str, width: int) -> str:
    """``help_text`` with each example (a code-block line that runs ``statecli``) broken to ``width``."""
    out = []
    for line in help_text.split("\n"):
        if line.startswith(CODE_INDENT) and line.strip().startswith(EXAMPLE):
            out += [CODE_INDENT + part for part in break_command(line.strip(), width)]
        else:
            out.append(line)
    return "\n".join(out)


def _help_width() -> int:
    """The width Typer's help console will have (``COLUMNS``, the terminal, or 80)."""
    from rich.console import Console  # deferred: only --help needs it
    from typer import rich_utils

    return Console(width=getattr(rich_utils, "MAX_WIDTH", None)).width


class FittedHelp:
    """Mixed into the app's group and commands: their ``--help`` as the module docstring says."""

    help: str | None

    def format_help(self, ctx: Any, formatter: Any) -> None:
        original = self.help
        if original:
            self.help = fit_examples(original, _help_width() - CODE_MARGIN)
        try:
            if sys.stdout.isatty():
                super().format_help(ctx, formatter)  # type: ignore[misc]
                return
            drawn = io.StringIO()
            with contextlib.redirect_stdout(drawn):
                super().format_help(ctx, formatter)  # type: ignore[misc]
            text = drawn.getvalue()
            sys.stdout.write("\n".join(line.rstrip() for line in text.split("\n")))
        finally:
            self.help = original


class StatecliCommand(FittedHelp, TyperCommand):
    """Every ``statecli`` command: Typer's, with :class:`FittedHelp`."""
