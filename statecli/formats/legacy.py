"""Legacy torch files (torch < 1.6, or ``_use_new_zipfile_serialization=False``). Not read yet."""

from __future__ import annotations

from statecli.errors import UnsupportedFormatError
from statecli.formats.base import RawCheckpoint


def read_legacy(path: str) -> RawCheckpoint:
    raise UnsupportedFormatError(
        "legacy torch format (torch < 1.6, or _use_new_zipfile_serialization=False) is not read yet; "
        "re-save it with a current torch",
        path=path,
    )
