"""Rewriting members of a zip archive, for tests that build broken variants of a sample."""

from __future__ import annotations

import zipfile
from pathlib import Path


def rewrite(src: Path, dst: Path, changes: dict[str, bytes | None]) -> Path:
    """A copy of the zip ``src`` with members replaced (bytes) or dropped (None), names relative to the root."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        todo = {f"{root}/{k}": v for k, v in changes.items()}
        for info in zin.infolist():
            if info.filename in todo:
                data = todo.pop(info.filename)
                if data is not None:
                    zout.writestr(info.filename, data)
            else:
                zout.writestr(info, zin.read(info.filename))
        for name, data in todo.items():
            if data is not None:
                zout.writestr(name, data)
    return dst


def member(path: Path, rel: str) -> bytes:
    with zipfile.ZipFile(path) as z:
        root = z.namelist()[0].split("/", 1)[0]
        return z.read(f"{root}/{rel}")
