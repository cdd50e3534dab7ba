"""Format detection: look at a path's first bytes and hand it to the one reader that fits."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from statecli.errors import InputError, UnsupportedFormatError
from statecli.formats.base import RawCheckpoint

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pt2")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# torch < 1.6 (or _use_new_zipfile_serialization=False) starts with the pickled magic number 0x1950a86a20f9469cfc6c.
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
LFS_PREFIX = b"version https://git-lfs"


def read_raw(path: str) -> RawCheckpoint:
    """Read ``path`` (a file, a shard index, or a folder holding one checkpoint) with the right reader."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError("no such file or directory", path=path) from None
    except OSError as e:
        raise InputError(f"cannot access ({e.strerror or e})", path=path) from None
    if stat.S_ISDIR(st.st_mode):
        return read_raw(_pick_in_folder(path))
    if not stat.S_ISREG(st.st_mode):
        raise InputError("not a regular file", path=path)
    if st.st_size == 0:
        raise InputError("empty file (0 bytes): not a checkpoint", path=path)
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror or e})", path=path) from None
    kind = sniff(path, head, st.st_size)
    if kind == "zip":
        from statecli.formats.torchzip import read_torch_zip
        from statecli.formats.zipdir import read_central_directory

        members = read_central_directory(path)
        _check_zip_kind(path, members)
        return read_torch_zip(path, members)
    if kind == "safetensors":
        from statecli.formats.safetensors_reader import read_safetensors

        return read_safetensors(path)
    if kind == "index":
        from statecli.formats.sharded import read_index

        return read_index(path, _read_shard)
    raise AssertionError(kind)  # sniff() raises for everything else


def _read_shard(path: str) -> RawCheckpoint:
    raw = read_raw(path)
    if raw.format.startswith("sharded"):
        raise InputError("a shard index names another index as a shard", path=path)
    return raw


def sniff(path: str, head: bytes, size: int) -> str:
    """``zip``, ``safetensors`` or ``index``; raises a clear error for anything else."""
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(LFS_PREFIX):
        raise InputError("a Git LFS pointer, not the checkpoint itself: run `git lfs pull`", path=path)
    if head.lstrip()[:1] == b"{" and path.endswith(".json"):
        return "index"  # before the safetensors test: a JSON text can have "{" at byte 8 too
    if len(head) >= 9 and head[8:].lstrip(b" \t\r\n")[:1] == b"{":
        n = int.from_bytes(head[:8], "little")
        if n <= size - 8:
            return "safetensors"
        raise InputError(f"safetensors header claims {n} bytes but the file holds {size - 8}", path=path)
    if head.startswith(LEGACY_MAGIC):
        raise UnsupportedFormatError(
            "legacy torch format (torch < 1.6, or _use_new_zipfile_serialization=False) is not read yet; "
            "re-save it with a current torch",
            path=path,
        )
    if len(head) >= 262 and head[257:262] == b"ustar":
        raise UnsupportedFormatError("legacy torch tar format (torch < 0.4) is not read yet", path=path)
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        raise UnsupportedFormatError(
            "a plain pickle, not a torch.save archive; statecli reads torch.save (zip) files", path=path
        )
    if _looks_like_text(head):
        raise InputError("a text file, not a checkpoint", path=path)
    if len(head) < 8:
        raise InputError(f"too short to be a checkpoint ({size} bytes)", path=path)
    raise InputError(f"unrecognised format (first bytes {head[:8].hex(' ')})", path=path)


def _check_zip_kind(path: str, names: Iterable[str]) -> None:
    """Refuse, by name, the zip-based formats that are not ``torch.save`` archives."""
    names = list(names)
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        raise UnsupportedFormatError("a TorchScript archive (torch.jit.save): not read yet", path=path)
    if any(n.endswith("/data.pkl") for n in names):
        return
    if any("models/" in n and n.endswith(".json") for n in names) or any(n.endswith("archive_format") for n in names):
        raise UnsupportedFormatError("a torch.export program (.pt2): not read yet", path=path)
    # Anything else without a data.pkl is refused by torchzip.archive_root, with its own message.


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def _pick_in_folder(folder: str) -> str:
    """The one checkpoint a folder holds: its shard index first, else its only checkpoint file."""
    try:
        entries = sorted(os.listdir(folder))
    except OSError as e:
        raise InputError(f"cannot list folder ({e.strerror or e})", path=folder) from None
    for name in INDEX_NAMES:
        if name in entries:
            return os.path.join(folder, name)
    indexes = [e for e in entries if e.endswith(".index.json")]
    if len(indexes) == 1:
        return os.path.join(folder, indexes[0])
    if ".metadata" in entries and any(e.endswith(".distcp") for e in entries):
        raise UnsupportedFormatError("a torch.distributed.checkpoint folder: not read yet", path=folder)
    files = [e for e in entries if e.endswith(CHECKPOINT_SUFFIXES) and os.path.isfile(os.path.join(folder, e))]
    if len(files) == 1 and not indexes:
        return os.path.join(folder, files[0])
    if not files and not indexes:
        raise InputError(
            "folder holds no checkpoint (looked for *.index.json, *.safetensors, *.pt, *.pth, *.bin, *.ckpt)",
            path=folder,
        )
    found = ", ".join(indexes + files)
    raise InputError(f"folder holds several checkpoints ({found}); name one", path=folder)


__all__ = ["read_raw", "sniff"]
