"""Counts and name lists in messages, worded one way everywhere (core code: no rich, no Typer)."""

from __future__ import annotations

from collections.abc import Sequence

from statecli.clip import describe_name

NAME_CHARS = 200  # characters of one name in a list; a name from a file can be megabytes long


def count(n: int, one: str, many: str | None = None) -> str:
    """``1 tensor``, ``2 tensors``, ``1,024 files``; ``many`` for plurals that are not ``one + "s"``."""
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def name_list(names: Sequence[str], limit: int = 8) -> str:
    """The first ``limit`` names, comma-separated, then ``, … (N more)``: a finding names what it is about
    without growing with the checkpoint. Each name is clipped and escaped (:func:`statecli.clip.describe_name`)."""
    shown = ", ".join(describe_name(n, NAME_CHARS) for n in names[:limit])
    return shown + (f", … ({len(names) - limit:,} more)" if len(names) > limit else "")


def shape_text(shape: Sequence[int], scalar: str = "scalar") -> str:
    """``64×3×3``, the one way statecli writes a shape for people; ``scalar`` for a 0-dim tensor (records
    leave that cell empty: ``scalar=""``)."""
    return "×".join(str(d) for d in shape) if shape else scalar
