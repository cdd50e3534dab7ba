"""``torch.export`` programs (``.pt2``, ``torch.export.save``), read without running anything. Not read yet."""

from __future__ import annotations

from statecli.errors import UnsupportedFormatError
from statecli.formats.base import RawCheckpoint
from statecli.formats.zipdir import Member


def read_pt2(path: str, members: dict[str, Member]) -> RawCheckpoint:
    raise UnsupportedFormatError("a torch.export program (.pt2): not read yet", path=path)
