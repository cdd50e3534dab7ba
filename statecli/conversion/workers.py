"""A multi-file output written by several processes: ``--jobs`` workers on one machine, torchrun ranks on
several (DESIGN.md §8).

Which tensor goes to which file is decided before anything is written (:func:`execute.layout`), and each
file's bytes depend only on its own tensors: whoever writes a file writes the same bytes, so the output
is byte-identical whatever the parallelism. Files are shared out by size (:func:`assign`); each worker
writes whole files, flushes and reads each back, and hands them over unnamed. Only when every file of the
conversion is written and checked, and no value overflowed, do they get their names, and the index is
written last: a failure anywhere leaves no index and no named partial file.

Workers are forked after ``import torch`` where the platform allows (Linux), spawned elsewhere. Each runs
torch with one intra-op thread (DESIGN.md §7). A worker hands its finished files to the process that
started it under a hidden name (:func:`~statecli.formats.atomic.staging_name`) that carries the starter's
process id: if the starter is killed before it names them, the next conversion into the folder removes
them; if a worker is killed, its unfinished files were never linked anywhere and vanish with it.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
import secrets
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Protocol

from statecli.conversion.casting import CastStats, one_thread, overflow_error, range_findings
from statecli.conversion.execute import (
    ConversionReport,
    Layout,
    OutFile,
    Progress,
    _Feeder,
    _leftovers,
    _read_back,
    _Unit,
    _verify_values,
    build_units,
    layout,
    prepare_folder,
    write_dcp,
    write_shard,
)
from statecli.conversion.plan import Plan
from statecli.errors import OutputError, StatecliError
from statecli.formats.atomic import (
    PendingFile,
    commit_staged,
    discard_staged,
    output_error,
    staging_name,
    sync_folder,
)
from statecli.formats.dcp import read_dcp
from statecli.formats.dcpwrite import DcpRecord, metadata_bytes
from statecli.tensors.source import Source

# Below this much output per worker, starting a process costs more than it saves: the default --jobs
# gives each worker at least this much (an explicit --jobs is taken as asked).
MIN_BYTES_PER_WORKER = 32 << 20


class Group(Protocol):
    """The processes that share one conversion (torchrun ranks); see :mod:`statecli.conversion.distributed`."""

    rank: int
    size: int

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (JSON-able), in rank order, on every rank."""
        ...


@dataclass(slots=True)
class Written:
    """One output file, written, flushed and checked, not yet named."""

    index: int  # in Layout.files
    path: str
    nbytes: int
    stats: dict[str, CastStats]
    staged: str | None = None  # the hidden name a worker process gave it
    records: list[DcpRecord] = field(default_factory=list)  # a .distcp file's tensor spans, for the .metadata
    pending: PendingFile | None = field(default=None, repr=False)  # written by this process: still unnamed

    def commit(self) -> None:
        if self.pending is not None:
            self.pending.commit()
        elif self.staged is not None:
            commit_staged(self.staged, self.path)
            self.staged = None

    def discard(self) -> None:
        if self.pending is not None:
            self.pending.discard()
        elif self.staged is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.staged)
            self.staged = None


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def resolve_jobs(asked: int | None, files: Sequence[OutFile], distributed: bool) -> int:
    """How many worker processes write ``files``: as asked (never more than the files), or by default the
    usable cores, capped by the files and by the work; under torchrun the ranks are the parallelism, so
    each rank writes its own files itself unless ``--jobs`` says otherwise."""
    if asked is not None:  # at least 1: the plan refused anything less
        return max(1, min(asked, len(files)))
    if distributed:
        return 1
    by_work = sum(f.nbytes for f in files) // MIN_BYTES_PER_WORKER
    return max(1, min(usable_cores(), len(files), by_work))


def assign(files: Sequence[OutFile], workers: int) -> list[list[int]]:
    """File indexes for each worker: the biggest file first to the least loaded worker, so that workers
    finish together. Deterministic, and each worker's files in file order."""
    loads = [0] * workers
    out: list[list[int]] = [[] for _ in range(workers)]
    for k in sorted(range(len(files)), key=lambda k: (-files[k].nbytes, k)):
        w = min(range(workers), key=lambda w: (loads[w], w))
        out[w].append(k)
        loads[w] += files[k].nbytes
    return [sorted(ks) for ks in out]


# ---------------------------------------------------------------- one process's share


def write_files(
    plan: Plan,
    units: list[_Unit],
    out: Layout,
    indexes: Sequence[int],
    progress: Progress | None,
    stage_for: tuple[int, str] | None = None,
) -> list[Written]:
    """Write ``indexes``'s files one after the other, each one's flush to disk overlapping the next one's
    work; read each back and check it (and its values with --verify). With ``stage_for`` (the starting
    process's id and the run's token) the files are handed over under hidden names."""
    files = [out.files[k] for k in indexes]
    views = collections.Counter(id(e.unit) for f in files for e in f.entries)
    written: list[Written] = []
    with Source(plan.report, check_crc=plan.options.verify) as source:
        feeder = _Feeder(source, ConversionReport(plan), progress)
        try:
            for k, f in zip(indexes, files, strict=True):
                pending = PendingFile(f.path, sync=plan.options.sync)
                feeder.report = ConversionReport(plan)  # each file's counts apart: merged in file order
                w = Written(k, f.path, 0, feeder.report.stats, pending=pending)
                written.append(w)
                if out.kind == "dcp":
                    w.nbytes, w.records = write_dcp(f, views, feeder, pending)
                else:
                    w.nbytes = write_shard(f, views, feeder, pending)
                pending.done_writing()
            for w in written:
                assert w.pending is not None
                w.pending.finish()
                if out.kind == "sharded":  # a .distcp file is read back with the .metadata that names its spans
                    _read_back(plan, [(w.pending, "safetensors")], out.files[w.index].items)
            if plan.options.verify:
                names = {i.name for f in files for i in f.items}
                pendings = [(w.pending, "safetensors") for w in written if w.pending is not None]
                _verify_values(plan, units, source, pendings, names)
            if stage_for is not None:
                for w in written:
                    assert w.pending is not None
                    pending, w.pending = w.pending, None
                    w.staged = pending.stage(staging_name(stage_for[0], stage_for[1], w.index))
        except BaseException as e:
            for w in written:
                w.discard()
            if isinstance(e, OSError):
                raise output_error(e, plan.output) from e
            raise
    return written


# ---------------------------------------------------------------- worker processes

_STATE: dict[str, Any] = {}  # in a worker: the plan, units and layout it writes from


class _Stopped(Exception):
    """Another worker failed: this one stops at its next piece instead of finishing for nothing."""


def _init_worker(plan: Plan | None, done: Any, stop: Any) -> None:
    import torch  # deferred: importing torch takes about a second, and metadata commands never need it

    torch.set_num_threads(1)  # this process's own setting: it ends with the process
    if plan is not None:  # spawned: nothing was inherited
        units = build_units(plan)
        _STATE.update(plan=plan, units=units, layout=layout(plan, units))
    _STATE.update(done=done, stop=stop, last=(0, 0))


def _progress(done_bytes: int, done_tensors: int) -> None:
    last_bytes, last_tensors = _STATE["last"]
    _STATE["last"] = (done_bytes, done_tensors)
    shared = _STATE["done"]
    with shared.get_lock():
        shared[0] += done_bytes - last_bytes
        shared[1] += done_tensors - last_tensors
    if _STATE["stop"].value:
        raise _Stopped


def _work(indexes: list[int], owner: int, run: str) -> list[Written]:
    try:
        return write_files(_STATE["plan"], _STATE["units"], _STATE["layout"], indexes, _progress, (owner, run))
    except _Stopped:
        return []


def _context() -> multiprocessing.context.BaseContext:
    """fork where it is safe (Linux): workers start at once, with torch imported and the plan in memory;
    spawn elsewhere (macOS and Windows cannot fork a process that uses system frameworks safely)."""
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def run_pool(
    plan: Plan, units: list[_Unit], out: Layout, shares: list[list[int]], progress: Progress | None
) -> list[Written]:
    """Each share of files written by its own worker process; the files come back staged, unnamed."""
    ctx = _context()
    forked = ctx.get_start_method() == "fork"
    done = ctx.Array("q", 2)  # bytes and tensors written, all workers together, for the progress bar
    stop = ctx.Value("b", 0)
    run = secrets.token_hex(6)
    owner = os.getpid()
    folder = os.path.dirname(os.path.abspath(out.index_path))
    if forked:
        _STATE.update(plan=plan, units=units, layout=out)
    written: list[Written] = []
    failure: BaseException | None = None
    try:
        with ProcessPoolExecutor(
            max_workers=len(shares),
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(None if forked else plan, done, stop),
        ) as pool:
            futures = [pool.submit(_work, share, owner, run) for share in shares]
            waiting: set[Future[list[Written]]] = set(futures)
            while waiting:
                finished, waiting = wait(waiting, timeout=0.2, return_when=FIRST_EXCEPTION)
                if progress is not None:
                    progress(done[0], done[1])
                for fut in finished:
                    exc = fut.exception()
                    if exc is None:
                        written.extend(fut.result())
                    elif failure is None:
                        failure = exc
                        stop.value = 1  # the others stop at their next piece
        if progress is not None and failure is None:
            progress(done[0], done[1])  # the last pieces, counted after the last look
    except BaseException as e:  # Ctrl-C here: every worker has it too, and discards its files
        stop.value = 1
        failure = failure or e
    finally:
        _STATE.clear()
    if failure is not None:
        for w in written:
            w.discard()
        discard_staged(folder, owner, run)  # a worker that failed or died after staging some of its files
        if isinstance(failure, BrokenProcessPool):
            raise OutputError(
                "a worker process died before it finished (killed, or out of memory); nothing was kept",
                path=plan.output,
            ) from None
        raise failure
    return sorted(written, key=lambda w: w.index)


# ---------------------------------------------------------------- the whole multi-file conversion


def execute_files(
    plan: Plan, units: list[_Unit], progress: Progress | None, group: Group | None = None
) -> ConversionReport:
    """Write a sharded output with every core (and every rank of ``group``): the files, then the index."""
    started = time.time()
    report = ConversionReport(plan)
    out = layout(plan, units)
    rank, size = (group.rank, group.size) if group is not None else (0, 1)
    made_folder = None
    problem = None
    if rank == 0:
        try:
            made_folder = prepare_folder(plan, [*(f.path for f in out.files), out.index_path], report)
        except StatecliError as e:
            problem = e
    if group is not None:
        _agree(group, problem)  # every rank stops if rank 0 could not make the folder
    elif problem is not None:
        raise problem
    shares = assign(out.files, size)
    mine = shares[rank]
    jobs = resolve_jobs(plan.options.jobs, [out.files[k] for k in mine], group is not None)
    report.jobs = jobs
    written: list[Written] = []
    try:
        try:
            if jobs > 1:
                sub = assign([out.files[k] for k in mine], jobs)
                written = run_pool(plan, units, out, [[mine[j] for j in s] for s in sub], progress)
            elif mine:
                with one_thread():
                    written = write_files(plan, units, out, mine, progress)
            failure = None
        except StatecliError as e:
            failure = e
        stats, records, failure = _combine(plan, group, written, failure)
        if failure is not None:
            raise failure
        report.stats = stats
        # Overflow is known only once every value has been cast: the files are thrown away unnamed.
        err = None if plan.options.allow_overflow else overflow_error(stats, plan.target_dtype or "")
        if err is not None:
            raise err
        problem = None
        try:
            for w in written:
                w.commit()
        except StatecliError as e:
            if group is None:
                raise
            problem = e
        if group is not None:
            _agree(group, problem)  # every rank's files have their names before the index names them
    except BaseException:
        for w in written:
            w.discard()
        if made_folder is not None:
            with contextlib.suppress(OSError):
                os.rmdir(made_folder)  # fails, as it should, if anything else appeared in it
        raise
    report.files = [f.path for f in out.files]
    report.bytes_written = sum(r.length for r in records) if out.kind == "dcp" else sum(f.nbytes for f in out.files)
    report.ranks = [{"rank": r, "files": [out.files[k].path for k in share]} for r, share in enumerate(shares)]
    report.world_size = size
    folder = os.path.dirname(os.path.abspath(out.index_path))
    if rank == 0:
        problem = None
        try:
            _write_index(plan, out, records)
        except StatecliError as e:
            problem = e
        if group is None and problem is not None:
            raise problem
        if group is not None:
            _agree(group, problem)
    elif group is not None:
        _agree(group, None)
    report.files.append(out.index_path)
    report.ranks[0]["files"].append(out.index_path)
    report.findings.extend(_leftovers(folder, started))
    report.findings.extend(range_findings(report.stats, plan.target_dtype))
    return report


def _write_index(plan: Plan, out: Layout, records: list[DcpRecord]) -> None:
    pending = PendingFile(out.index_path, sync=plan.options.sync)
    try:
        pending.write(out.index if out.index is not None else metadata_bytes(records))
        pending.finish()
        if out.kind == "dcp":
            _read_back_dcp(plan, pending)
        pending.commit()
    except BaseException:
        pending.discard()
        raise
    if plan.options.sync:
        sync_folder(os.path.dirname(os.path.abspath(out.index_path)))


def _read_back_dcp(plan: Plan, pending: PendingFile) -> None:
    """The folder read again through the .metadata just written, before it gets its name: every tensor
    there with its planned name, shape and dtype, every span inside its file, nothing else."""
    back = read_dcp(plan.output, metadata_path=pending.readable_path)
    seen = {t.name: t for t in back.tensors}
    problems = []
    for i in plan.items:
        t = seen.pop(i.name, None)
        if t is None:
            problems.append(f"{i.name} is missing")
        elif tuple(t.shape) != tuple(i.shape) or t.dtype != i.dst_dtype:
            problems.append(f"{i.name} is {t.dtype} {list(t.shape)}, expected {i.dst_dtype} {list(i.shape)}")
    problems.extend(f"{name} was not planned" for name in seen)
    if problems:
        raise OutputError(
            "the written checkpoint does not match the plan, so its .metadata was not kept: "
            + "; ".join(problems[:10]),
            path=plan.output,
        )


def _combine(
    plan: Plan, group: Group | None, written: list[Written], failure: StatecliError | None
) -> tuple[dict[str, CastStats], list[DcpRecord], StatecliError | None]:
    """Every file's cast counts in file order (whoever wrote it), every .distcp span, and the first
    failure of any rank."""
    if group is None:
        records = [r for w in written for r in w.records]
        return _in_file_order((w.index, w.stats) for w in written), records, failure
    mine = {
        "error": _error_dict(failure),
        # Only counts that say something travel: a tensor with none reads as zeros in the report anyway.
        "stats": [[w.index, {n: list(_fields(s)) for n, s in w.stats.items() if any(_fields(s))}] for w in written],
        "records": [list(r) for w in written for r in w.records],
    }
    everyone = group.gather(mine)
    for r, theirs in enumerate(everyone):
        if theirs["error"] is not None and failure is None:
            failure = _error_from(theirs["error"], r)
    per_file = (
        (k, {n: CastStats(*v) for n, v in stats.items()}) for theirs in everyone for k, stats in theirs["stats"]
    )
    records = [
        DcpRecord(n, dt, tuple(shape), path, offset, length)
        for theirs in everyone
        for n, dt, shape, path, offset, length in theirs["records"]
    ]
    return _in_file_order(per_file), records, failure


def _in_file_order(per_file: Any) -> dict[str, CastStats]:
    merged: dict[str, CastStats] = {}
    for _, stats in sorted(per_file, key=lambda kv: kv[0]):
        merged.update(stats)
    return merged


def _fields(s: CastStats) -> tuple[int, int, int, int]:
    return s.overflow, s.underflow, s.nonfinite, s.inf_changed


def _agree(group: Group, problem: StatecliError | None) -> None:
    """A point every rank passes together: if any rank met ``problem``, all raise the first one."""
    for r, err in enumerate(group.gather(_error_dict(problem))):
        if err is not None:
            raise problem if r == group.rank and problem is not None else _error_from(err, r)


def _error_dict(e: StatecliError | None) -> dict[str, Any] | None:
    if e is None:
        return None
    return {"type": type(e).__name__, "message": e.message, "path": e.path}


def _error_from(d: dict[str, Any], rank: int) -> StatecliError:
    """Another rank's error, raised here with the same class (so the same exit code)."""
    from statecli import errors

    cls = getattr(errors, str(d.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, StatecliError)):
        cls = OutputError
    err = cls(f"rank {rank}: {d.get('message')}", path=d.get("path"))
    err.peer = True  # type: ignore[attr-defined]  # said by the rank that met it; the others stay quiet
    return err
