"""Sharded checkpoints: a Hugging Face ``*.index.json`` and the shard files it names.

The index is ``{"metadata": {...}, "weight_map": {tensor name: shard file name}}`` (as written for
``model.safetensors.index.json`` and ``pytorch_model.bin.index.json``). Each shard is read by the reader
for its format, passed in by the caller, so this module knows nothing of any one format.

An index is just text anyone can write, so every shard name is checked before any file is touched:
absolute paths, ``..`` escapes and symlinks that resolve outside the index's folder are refused as
unsafe. A peer that followed them would read (and, on convert, write) arbitrary files.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from statecli.clip import describe, quote
from statecli.errors import InputError, LimitExceededError, UnsafeError
from statecli.files import kind_of, open_regular
from statecli.formats._json import load_object
from statecli.formats.base import MAX_NAME_CHARS
from statecli.records import Container, Finding, FindingCap, RawCheckpoint, RawTensor, cap_findings, is_summary

__all__ = ["MAX_INDEX_BYTES", "read_index"]

# Real indexes are a few MB even for 100B-parameter models; anything near this is not an index.
MAX_INDEX_BYTES = 100_000_000
# Indexes being read on this thread: a shard that is itself an index (the index itself, or a cycle of
# them) would otherwise recurse until Python's stack runs out.
_reading = threading.local()
# Shards read at once. Reading a header is a few small reads and opens, each a round trip on a network
# filesystem: threads overlap those waits (parsing holds the GIL, so more would only take turns).
SHARD_THREADS = 8
# Threads only pay where the reads wait: on a local disk, in the page cache, 1,000 headers took twice the CPU
# on 8 threads (the GIL changes hands at every system call) as on one. So the first SHARD_PROBE shards are
# read on this thread, and threads take the rest only if those waited SHARD_WAIT seconds each, on average,
# for something other than this thread's own work.
SHARD_PROBE = 8
SHARD_WAIT = 0.00025


def _load_index(path: str) -> dict[str, Any]:
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_INDEX_BYTES:
                raise LimitExceededError(
                    f"index is {size} bytes, more than the {MAX_INDEX_BYTES}-byte limit", path=path
                )
            raw = f.read(size + 1)  # not MAX_INDEX_BYTES + 1: read(n) allocates n bytes up front
    except OSError as e:
        raise InputError(f"cannot read index: {e.strerror or e}", path=path) from e
    doc = load_object(raw, "index", path)
    if "weight_map" not in doc:
        raise InputError("index has no 'weight_map'", path=path)
    weight_map = doc["weight_map"]
    if not isinstance(weight_map, dict):
        raise InputError(f"index 'weight_map' is not an object (got {type(weight_map).__name__})", path=path)
    for name, shard in weight_map.items():
        if len(name) > MAX_NAME_CHARS:
            raise LimitExceededError(
                f"index 'weight_map' names a tensor of {len(name)} characters; the limit is {MAX_NAME_CHARS}", path=path
            )
        if not isinstance(shard, str) or not shard:
            raise InputError(
                f"index 'weight_map' entry {quote(name)} must name a shard file, got {describe(shard, limit=80)}",
                path=path,
            )
    metadata = doc.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise InputError(f"index 'metadata' is not an object (got {type(metadata).__name__})", path=path)
    return doc


def _shard_path(index_path: str, folder_real: str, shard: str) -> tuple[str, int | None]:
    """The shard's path on disk, refusing any name that could reach outside the index's folder, and its
    mode where that was learnt on the way (None when not)."""
    if "\0" in shard:
        raise UnsafeError(f"shard path {quote(shard)} contains a NUL byte", path=index_path)
    # A leading "\" or a drive letter is absolute on Windows even where os.path.isabs says no.
    if (
        os.path.isabs(shard)
        or shard.startswith(("/", "\\"))
        or (len(shard) > 1 and shard[0].isalpha() and shard[1] == ":")
    ):
        raise UnsafeError(f"shard path {quote(shard)} is absolute and leaves the checkpoint folder", path=index_path)
    full = os.path.join(os.path.dirname(index_path), shard)
    if shard not in (".", "..") and os.sep not in shard and (os.altsep is None or os.altsep not in shard):
        # A file name in the folder itself (nearly every index): it stays inside unless it is a symlink, which
        # one lstat tells; realpath would stat every folder on the way (1,000 shards, a round trip each).
        try:
            mode = os.lstat(full).st_mode
        except OSError:
            mode = None  # missing or unreadable: said when it is opened, like any other shard
        if mode is None or not stat.S_ISLNK(mode):
            return full, mode
    real = os.path.realpath(full)
    # realpath resolves both ".." and symlinks, so one comparison covers both escapes.
    if os.path.commonpath([real, folder_real]) != folder_real:
        raise UnsafeError(f"shard path {quote(shard)} leaves the checkpoint folder", path=index_path)
    return full, None


T = TypeVar("T")
R = TypeVar("R")


def _in_turn(work: Callable[[T], R], items: list[T]) -> Iterator[R]:
    """``work`` of each item, in order: the first :data:`SHARD_PROBE` on this thread, and the rest on up to
    :data:`SHARD_THREADS` threads where those waited (see :data:`SHARD_WAIT`), else on this thread too. On
    threads: a few items to a task (a task costs a hand-off between threads) and at most twice as many
    tasks ahead as threads; a failure is raised where it falls in that order (the items after it may have
    been done, never taken); closing the iterator waits for the tasks still going and drops the rest."""
    probe = items[:SHARD_PROBE]
    wall, cpu = time.perf_counter(), time.thread_time()
    yield from map(work, probe)
    waited = (time.perf_counter() - wall) - (time.thread_time() - cpu)  # the consumer's own work cancels out
    rest = items[len(probe) :]
    threads = min(SHARD_THREADS, len(rest))
    if threads < 2 or waited < SHARD_WAIT * len(probe):
        yield from map(work, rest)
        return
    size = max(1, min(64, len(rest) // (8 * threads)))
    tasks = iter([rest[i : i + size] for i in range(0, len(rest), size)])

    def run(task: list[T]) -> list[R]:
        return [work(item) for item in task]

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="statecli-shard")
    try:
        ahead: collections.deque[Future[list[R]]] = collections.deque(
            pool.submit(run, task) for task in itertools.islice(tasks, 2 * threads)
        )
        while ahead:
            done = ahead.popleft()
            task = next(tasks, None)
            if task is not None:
                ahead.append(pool.submit(run, task))
            yield from done.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _json_str(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def read_index(path: str, read_shard: Callable[[str], RawCheckpoint]) -> RawCheckpoint:
    """Read a sharded checkpoint from its ``*.index.json``, reading each shard once with ``read_shard``.

    Tensors come shard by shard (in order of each shard's first mention), in ``weight_map`` order within
    a shard, each with ``file`` set to its shard's name. Raises :class:`~statecli.errors.UnsafeError`
    for a shard name that leaves the index's folder and :class:`~statecli.errors.InputError` for a bad
    index, a missing shard, or a tensor its shard does not hold.
    """
    outer = getattr(_reading, "path", None)
    if outer is not None:
        raise InputError(f"a shard index names another index as a shard ({os.path.basename(path)})", path=outer)
    _reading.path = path
    try:
        return _read_index(path, read_shard)
    finally:
        _reading.path = None


def _read_index(path: str, read_shard: Callable[[str], RawCheckpoint]) -> RawCheckpoint:
    doc = _load_index(path)
    weight_map: dict[str, str] = doc["weight_map"]
    folder_real = os.path.realpath(os.path.dirname(path) or ".")

    # Shard name -> the tensor names it should hold, in weight_map order; dict order = first mention.
    wanted: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        wanted.setdefault(shard, []).append(name)

    # Every name is checked before any shard is opened, so a hostile index cannot make us read anything.
    # (On threads: on a network filesystem each check is a round trip.)
    checks = _in_turn(lambda shard: _shard_path(path, folder_real, shard), list(wanted))
    checked = dict(zip(wanted, checks, strict=True))
    paths = {shard: full for shard, (full, _) in checked.items()}
    for shard, (full, known) in checked.items():
        try:
            mode = known if known is not None else os.stat(full).st_mode
        except FileNotFoundError:
            raise InputError(f"shard {quote(shard)} named in the index does not exist", path=path) from None
        except OSError as e:
            raise InputError(f"cannot access shard {quote(shard)} ({e.strerror or e})", path=path) from None
        if not stat.S_ISREG(mode):
            # A FIFO would block the read, a device never end: refused before any shard is opened.
            what = kind_of(mode)
            raise InputError(f"shard {quote(shard)} named in the index is {what}, not a regular file", path=path)

    try:
        file_size = os.path.getsize(path)
    except OSError as e:
        raise InputError(f"cannot read index: {e.strerror or e}", path=path) from e

    tensors: list[RawTensor] = []
    findings = FindingCap()  # a finding per stray tensor of a million-tensor shard would be a million
    storage_sizes: dict[str, int] = {}
    formats: list[str] = []
    outer = _reading.path

    def read(shard_path: str) -> RawCheckpoint:
        # A shard that is an index is refused on a worker thread as on this one. (The workers end with this
        # read_index; on this thread, where shards are read when there is only one, it is already set.)
        _reading.path = outer
        return read_shard(shard_path)

    reads = _in_turn(read, list(paths.values()))
    try:
        for (shard, names), raw in zip(wanted.items(), reads, strict=True):
            if raw.format not in formats:
                formats.append(raw.format)
            file_size += raw.file_size
            for f in cap_findings(raw.findings):
                findings.add(f if is_summary(f) else Finding(f.level, f.code, f"{shard}: {f.message}"))
            # Storage keys are only unique within one file; the shard name keeps two shards' "0" apart.
            storage_sizes.update({f"{shard}:{k}": v for k, v in raw.storage_sizes.items()})

            held = {t.name: t for t in raw.tensors}
            take = held.pop
            append = tensors.append
            for name in names:
                t = take(name, None)
                if t is None:
                    raise InputError(
                        f"tensor {quote(name)} is mapped to shard {quote(shard)} by the index but that shard does not "
                        "hold it",
                        path=path,
                    )
                t.file = shard
                if t.storage is not None:
                    t.storage = f"{shard}:{t.storage}"
                if t.quantizer is not None:
                    t.quantizer = t.quantizer.moved(lambda key, shard=shard: f"{shard}:{key}", shard)
                append(t)
            for name, t in held.items():
                target = t.storage.removeprefix("alias:") if t.storage and t.storage.startswith("alias:") else None
                if target is not None and weight_map.get(target) == shard:
                    # A tied tensor statecli recorded in the shard's metadata: HF indexes list stored tensors only.
                    t.file = shard
                    t.storage = f"{shard}:{t.storage}"
                    tensors.append(t)
                    continue
                if findings.full("unindexed-tensor"):
                    findings.count("unindexed-tensor", "warning")
                    continue
                findings.add(
                    Finding(
                        level="warning",
                        code="unindexed-tensor",
                        message=f"tensor {quote(name)} in shard {quote(shard)} is not in the index's weight_map; "
                        "loaders that follow the index will not see it",
                    )
                )

    finally:
        reads.close()  # a shard's failure, or a bad one: the reads still going are waited for, no more begun

    if not weight_map:
        findings.add(Finding(level="warning", code="empty-index", message="the index lists no tensors"))
    if len(formats) > 1:
        findings.add(
            Finding(
                level="warning",
                code="mixed-shard-formats",
                message=f"shards are in different formats: {', '.join(formats)}",
            )
        )
    if len(formats) == 1:
        fmt = "sharded-" + formats[0]
    elif formats:
        fmt = "sharded-mixed"
    else:
        fmt = "sharded"

    metadata = {str(k): _json_str(v) for k, v in (doc.get("metadata") or {}).items()}
    return RawCheckpoint(
        path=path,
        format=fmt,
        tensors=tensors,
        container=Container(kind="sharded", state_dict_at="", other_keys=()),
        findings=findings.findings(),
        metadata=metadata,
        file_size=file_size,
        storage_sizes=storage_sizes,
    )


# ---------------------------------------------------------------- writing


def shard_name(k: int, n: int) -> str:
    """The name of shard ``k`` (from 0) of ``n``, as transformers' ``save_pretrained`` names them."""
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def split_by_size(entries: Sequence[T], size: Callable[[T], int], max_size: int) -> list[list[T]]:
    """``entries`` in order, cut into shards of at most ``max_size`` bytes (a bigger entry alone)."""
    shards: list[list[T]] = [[]]
    total = 0
    for e in entries:
        n = size(e)
        if shards[-1] and total + n > max_size:
            shards.append([])
            total = 0
        shards[-1].append(e)
        total += n
    return shards


def index_bytes(total_size: int, weight_map: dict[str, str]) -> bytes:
    """A ``model.safetensors.index.json`` body: each tensor's shard, and the bytes of all of them."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    return (json.dumps(index, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
