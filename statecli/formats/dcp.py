"""torch.distributed.checkpoint folders (``.metadata`` + ``*.distcp``). Not read yet."""

from __future__ import annotations

from statecli.errors import UnsupportedFormatError
from statecli.formats.base import RawCheckpoint


def read_dcp(folder: str) -> RawCheckpoint:
    raise UnsupportedFormatError("a torch.distributed.checkpoint folder: not read yet", path=folder)
