"""Format detection: look at a path's first bytes and hand it to the one reader that fits."""

from __future__ import annotations

import os
import stat
import traceback
from collections.abc import Iterable

from statecli.errors import InputError, LimitExceededError, UnsupportedFormatError, UsageError
from statecli.files import not_regular, open_regular
from statecli.formats.base import check_names
from statecli.records import RawCheckpoint, Report
from statecli.roles import resolve
from statecli.util import gc_paused
from statecli.wording import name_list

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pt2")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# torch < 1.6 (or _use_new_zipfile_serialization=False) starts with the pickled magic number 0x1950a86a20f9469cfc6c.
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
LFS_PREFIX = b"version https://git-lfs"
DCP_DATA_SUFFIX = ".distcp"
DCP_METADATA = ".metadata"


def read(path: str) -> Report:
    """Read ``path``'s metadata with the right reader and resolve every tensor's role.

    A file that needs more memory than the process may have is :class:`LimitExceededError` (exit 3).
    """
    try:
        with gc_paused():
            return resolve(read_raw(path))
    except MemoryError:
        pass  # raised below, once leaving this block has let go of the frames that hold the memory
    raise LimitExceededError("out of memory: reading it needs more memory than this process may use", path=path)


def read_raw(path: str) -> RawCheckpoint:
    """Read ``path`` (a file, a shard index, or a folder holding one checkpoint) with the right reader."""
    raw = _read_raw(path)
    check_names(raw)
    return raw


def _read_raw(path: str) -> RawCheckpoint:
    if path == "-" and not os.path.lexists(path):
        # A checkpoint is read by random access (a zip's directory sits at its end): a pipe cannot give that.
        raise UsageError("'-' (standard input) is not supported: checkpoints are read by random access; give a path")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError("no such file or directory", path=path) from None
    except OSError as e:
        raise InputError(f"cannot access ({e.strerror or e})", path=path) from None
    if stat.S_ISDIR(st.st_mode):
        if is_dcp_folder(path):
            from statecli.formats.dcp import read_dcp  # loaded for this format only

            return read_dcp(path)
        return read_raw(_pick_in_folder(path))
    if not stat.S_ISREG(st.st_mode):
        raise not_regular(path, st.st_mode)
    if path.endswith(DCP_DATA_SUFFIX):
        # Its first bytes are often a torch.save zip with more stacked after it: read as one, it is "corrupt".
        raise InputError(
            f"a torch.distributed.checkpoint data file, which names none of its tensors: {_dcp_advice(path)}", path=path
        )
    try:
        return _read_file(path, st)
    except InputError as e:
        if e.path != path or os.path.basename(path) == DCP_METADATA or not _beside_dcp_metadata(path):
            raise
        # A data file renamed: read alone it is no checkpoint, and the message says where the checkpoint is.
        raise type(e)(
            f"{e.message}; it sits beside a torch.distributed.checkpoint {DCP_METADATA}: if it is one of that "
            f"checkpoint's data files, {_dcp_advice(path)}",
            path=path,
        ) from None


def _beside_dcp_metadata(path: str) -> bool:
    return os.path.isfile(os.path.join(os.path.dirname(path) or ".", DCP_METADATA))


def _dcp_advice(path: str) -> str:
    """What to pass instead of a torch.distributed.checkpoint data file."""
    folder = os.path.dirname(path) or "."
    if _beside_dcp_metadata(path):
        return f"pass the folder ({folder}) or its {DCP_METADATA}"
    return f"pass the folder that holds the checkpoint's {DCP_METADATA} (there is none in {folder})"


def _read_file(path: str, st: os.stat_result) -> RawCheckpoint:
    if st.st_size == 0:
        raise InputError("empty file (0 bytes): not a checkpoint", path=path)
    try:
        with open_regular(path) as f:
            head = f.read(512)
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror or e})", path=path) from None
    try:
        return _read_kind(path, head, st)
    except InputError as e:
        if not head.startswith(LFS_PREFIX):
            # torch.load would still unpickle what statecli refuses to read: a zip's data.pkl, any other
            # file from its first byte. A payload there makes the file unsafe, not merely unreadable.
            from statecli.formats.unread import refuse_if_torch_would_run

            # The failed parse's frames still hold its memo and objects (tens of MiB for a hostile pickle):
            # free them before the second parse, keeping the traceback's lines for --debug.
            traceback.clear_frames(e.__traceback__)
            refuse_if_torch_would_run(path, st.st_size, e, head.startswith(b"PK\x03\x04"))
        raise


def _read_kind(path: str, head: bytes, st: os.stat_result) -> RawCheckpoint:
    kind = sniff(path, head, st.st_size)
    if kind == "zip":
        from statecli.formats.torchzip import read_torch_zip  # loaded for this format only
        from statecli.formats.zipdir import read_central_directory

        members = read_central_directory(path)
        zip_kind = _check_zip_kind(path, members)
        if zip_kind == "torchscript":
            from statecli.formats.torchscript import read_torchscript  # loaded for this format only

            return read_torchscript(path, members)
        if zip_kind == "pt2":
            from statecli.formats.pt2 import read_pt2  # loaded for this format only

            return read_pt2(path, members)
        return read_torch_zip(path, members)
    if kind == "safetensors":
        from statecli.formats.safetensors import read_safetensors  # loaded for this format only

        return read_safetensors(path)
    if kind == "index":
        from statecli.formats.sharded import read_index  # loaded for this format only

        return read_index(path, _read_shard)
    if kind == "legacy":
        from statecli.formats.legacy import read_legacy  # loaded for this format only

        return read_legacy(path)
    if kind == "dcp-metadata":
        from statecli.formats.dcp import read_dcp  # loaded for this format only

        return read_dcp(os.path.dirname(path) or ".")
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
        return "legacy"
    if os.path.basename(path) == ".metadata" and is_dcp_folder(os.path.dirname(path) or "."):
        return "dcp-metadata"
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


def _check_zip_kind(path: str, names: Iterable[str]) -> str:
    """``torch`` (a torch.save archive), ``torchscript`` (torch.jit.save) or ``pt2`` (torch.export.save),
    by the members' names."""
    names = list(names)
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("/data.pkl") for n in names):
        return "torch"
    if any("models/" in n and n.endswith(".json") for n in names) or any(n.endswith("archive_format") for n in names):
        return "pt2"
    return "torch"  # without a data.pkl, torchzip.archive_root refuses it with its own message


def is_dcp_folder(folder: str) -> bool:
    """A torch.distributed.checkpoint folder: a ``.metadata`` file beside ``*.distcp`` files."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return False
    return ".metadata" in entries and any(e.endswith(".distcp") for e in entries)


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
    files = [e for e in entries if e.endswith(CHECKPOINT_SUFFIXES) and os.path.isfile(os.path.join(folder, e))]
    if len(files) == 1 and not indexes:
        return os.path.join(folder, files[0])
    if not files and not indexes:
        looked_for = ", ".join(f"*{s}" for s in (".index.json", *CHECKPOINT_SUFFIXES))
        raise InputError(
            f"folder holds no checkpoint (looked for {looked_for}, "
            "and a torch.distributed.checkpoint .metadata beside *.distcp files)",
            path=folder,
        )
    found = name_list(indexes + files)  # a folder of a million files: a few names and a count
    raise InputError(f"folder holds several checkpoints ({found}); name one", path=folder)


__all__ = ["read_raw", "sniff"]
