"""TorchScript archives (``torch.jit.save``), read without running TorchScript. Not read yet."""

from __future__ import annotations

from statecli.errors import UnsupportedFormatError
from statecli.formats.base import RawCheckpoint
from statecli.formats.zipdir import Member


def read_torchscript(path: str, members: dict[str, Member]) -> RawCheckpoint:
    raise UnsupportedFormatError("a TorchScript archive (torch.jit.save): not read yet", path=path)
