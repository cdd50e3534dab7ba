"""statecli's zip writer: what it writes must read back in Python's zipfile, statecli's reader and torch,
with ZIP64 records too (forced here: real ones need files past 4 GiB)."""

from __future__ import annotations

import functools
import io
import os
import zipfile
from pathlib import Path

import pytest
import torch

from statecli import conversion as conv
from statecli.errors import InputError
from statecli.formats import zipwriter
from statecli.formats.zipdir import data_offset, read_central_directory
from statecli.formats.zipwriter import ALIGNMENT, ZipWriter

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


class FileSink:
    def __init__(self, f: io.BufferedRandom) -> None:
        self.f = f

    def write(self, data: bytes | memoryview) -> None:
        self.f.write(data)

    def pwrite(self, data: bytes, offset: int) -> None:
        here = self.f.tell()
        self.f.seek(offset)
        self.f.write(data)
        self.f.seek(here)


@pytest.mark.parametrize("zip64", [False, True])
def test_members_read_back_aligned_with_good_crcs(tmp_path: Path, zip64: bool) -> None:
    path = tmp_path / "a.zip"
    members = {"root/data.pkl": b"\x80\x02}q\x00.", "root/data/0": os.urandom(3000), "root/empty": b""}
    with open(path, "w+b") as f:
        w = ZipWriter(FileSink(f), force_zip64=zip64)
        for name, data in members.items():
            w.add(name, len(data), [data[:1000], data[1000:]] if data else [])
        w.close()
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        assert {n: z.read(n) for n in z.namelist()} == members
    found = read_central_directory(str(path))
    with open(path, "rb") as f:
        for name in members:
            assert data_offset(f, found[name], str(path)) % ALIGNMENT == 0


def test_announced_size_must_match(tmp_path: Path) -> None:
    with open(tmp_path / "a.zip", "w+b") as f:
        w = ZipWriter(FileSink(f))
        with pytest.raises(InputError, match="got 3 bytes, announced 5"):
            w.add("x", 5, [b"abc"])
        w.shutdown()


def test_torch_loads_a_zip64_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zipwriter, "ZipWriter", functools.partial(ZipWriter, force_zip64=True))
    out = tmp_path / "z.pt"
    conv.convert(SAMPLES / "tied_lm.pt", out, dtype="bf16")
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None
    sd = torch.load(out, weights_only=True)
    assert sd["embed.weight"].dtype == torch.bfloat16
    assert sd["embed.weight"].data_ptr() == sd["lm_head.weight"].data_ptr()
