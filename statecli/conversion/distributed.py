"""More than one machine: the ranks of a ``torchrun`` launch share a folder output's files out.

``torchrun --nnodes N --nproc-per-node M -m statecli convert SRC -o OUT/ --distributed`` starts N×M
processes that each plan the same conversion, then (:func:`statecli.conversion.workers.execute_files`)
write their own share of the files on a filesystem they all see, agree that every rank succeeded, name
their files, and leave the index to rank 0. The ranks talk through ``torch.distributed`` with the gloo
backend (CPU only; NCCL is not needed): an existing engine, not a home-made one (DESIGN.md §8).

What the ranks exchange is JSON (cast counts, file names, errors) sent as byte tensors: nothing received
from another process is ever unpickled (``all_gather_object`` would unpickle it).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

from statecli.errors import UsageError

# A rank waits this long for the slowest one to finish its files before giving up. A rank that dies is
# noticed by torchrun itself, which stops the others at once; this only bounds a rank that hangs.
WAIT = datetime.timedelta(hours=6)
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
joined = False  # this process joined a group (the command line ends such a process without teardown)


def launched_by_torchrun() -> bool:
    """Whether the environment torchrun gives its workers is here."""
    return all(os.environ.get(k) for k in _ENV)


class TorchGroup:
    """The ranks of this launch, joined over gloo."""

    def __init__(self) -> None:
        if not launched_by_torchrun():
            missing = ", ".join(k for k in _ENV if not os.environ.get(k))
            raise UsageError(
                f"--distributed needs the environment torchrun sets ({missing} missing): run "
                "torchrun --nproc-per-node M [--nnodes N ...] -m statecli convert ... --distributed"
            )
        import torch.distributed as dist  # deferred: importing torch takes about a second

        if not dist.is_available():
            raise UsageError("--distributed: this torch build has no torch.distributed")
        global joined
        self._owned = not dist.is_initialized()
        if self._owned:
            dist.init_process_group(backend="gloo", timeout=WAIT)
            joined = True
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (JSON-able), in rank order, on every rank."""
        import torch
        import torch.distributed as dist

        from statecli.tensors.source import byte_view

        data = json.dumps(value, separators=(",", ":")).encode("utf-8")
        size = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(sizes, size)
        longest = max(int(s) for s in sizes)
        mine = torch.zeros(max(longest, 1), dtype=torch.uint8)
        if data:
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        theirs = [torch.zeros_like(mine) for _ in range(self.size)]
        dist.all_gather(theirs, mine)
        return [json.loads(bytes(byte_view(t[: int(n)]))) for t, n in zip(theirs, sizes, strict=True)]

    def close(self, together: bool = True) -> None:
        """Leave the group; ``together``: every rank is leaving at the same point (a result or an error they
        all raise), so they wait for each other first. A rank leaving alone must not wait for ranks that
        will never come: torchrun stops them once it exits."""
        import torch.distributed as dist

        if self._owned and dist.is_initialized() and not together:
            dist.destroy_process_group()
        elif self._owned and dist.is_initialized():
            # Every rank past its last exchange before any tears its connections down: a rank that leaves
            # while another still reads from it makes gloo abort the process ("terminate called without an
            # active exception"), failing a conversion that had succeeded.
            dist.barrier()
            dist.destroy_process_group()
