"""torch.distributed.checkpoint (DCP) sample folders, deterministically. Called by ``make_samples.py``.

    python sample_models/make_samples.py        # regenerates these and every other sample

``make(out_dir)`` writes two folders, each a ``.metadata`` pickle beside ``*.distcp`` data files:

* ``dcp_training/``: one process, no process group (``dcp.save(..., no_dist=True)``), the state
  ``{"model": SmallCNN state dict, "optim": Adam state from get_state_dict (FQN-keyed), "epoch": 3}``.
  DCP flattens it to keys such as ``model.conv1.weight``, ``optim.state.conv1.weight.exp_avg`` and
  stores non-tensors (``epoch``, ``optim.param_groups.0.lr``, ...) as pickled bytes entries.
* ``dcp_sharded/``: three gloo ranks on the CPU, each holding a ``Shard(0)`` DTensor slice of a
  SmallCNN's parameters (the layout FSDP2 writes) and replicated buffers. Parameters are split into
  three chunks (8 -> 3 + 3 + 2 rows, uneven on purpose) in three files ``__0_0.distcp`` ...
  ``__2_0.distcp``; DCP writes each replicated buffer once.

Determinism: the data files are ``torch.save`` archives of each chunk (their serialization id is a
hash of their content, see ``make_samples.py``); the only varying fields of ``.metadata`` are
``storage_meta.save_id`` (a fresh uuid4 per save) and ``storage_meta.checkpoint_id`` (the path saved
to). :class:`_FixedWriter` pins both: a fixed id and the folder's bare name as a ``pathlib`` path, which
is what a save to a relative path records. Each folder is removed before it is written, so no stale
``.distcp`` file from an earlier layout survives.

Never open ``.metadata`` with ``torch.distributed.checkpoint.FileSystemReader`` on a file you did not
make: it unpickles with plain ``pickle.load``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import sample_nets  # noqa: E402
import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.filesystem import FileSystemWriter  # noqa: E402
from torch.distributed.checkpoint.metadata import StorageMeta  # noqa: E402

TRAINING = "dcp_training"
SHARDED = "dcp_sharded"
SHARDED_RANKS = 3
SAVE_ID = "statecli-sample"
SIZE_LIMIT = 200 * 1024  # per folder


class _FixedWriter(FileSystemWriter):
    """A FileSystemWriter whose ``.metadata`` names a fixed save id and the folder's bare name."""

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=Path(Path(self.path).name), save_id=SAVE_ID)


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def make_training(out_dir: Path) -> Path:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = _fresh(out_dir / TRAINING)
    torch.set_num_threads(1)
    from make_samples import adam_trained_cnn

    model, adam = adam_trained_cnn()
    model_sd, optim_sd = get_state_dict(model, adam)
    # get_state_dict keys the optimizer state by parameter name ("conv1.weight"), not by index.
    assert "conv1.weight" in optim_sd["state"], list(optim_sd["state"])[:3]
    with warnings.catch_warnings():
        # "torch.distributed is disabled ... assuming the intent is to save in a single process": it is.
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model_sd, "optim": optim_sd, "epoch": 3}, storage_writer=_FixedWriter(folder), no_dist=True)
    return folder


def _sharded_rank(rank: int, world: int, store: str, folder: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(9)  # the same full tensors on every rank; each keeps its own slice
        model = sample_nets.SmallCNN()
        model.train()
        with torch.no_grad():
            model(torch.randn(4, 3, 8, 8))  # non-trivial BatchNorm statistics
        params = {name for name, _ in model.named_parameters()}
        state = {
            name: distribute_tensor(t, mesh, [Shard(0)] if name in params else [Replicate()])
            for name, t in model.state_dict().items()
        }
        dcp.save({"model": state}, storage_writer=_FixedWriter(folder))
    finally:
        dist.destroy_process_group()


def make_sharded(out_dir: Path) -> Path:
    import torch.multiprocessing as mp

    folder = _fresh(out_dir / SHARDED)
    with tempfile.TemporaryDirectory() as tmp:
        store = f"file://{os.path.join(tmp, 'store')}"
        mp.spawn(_sharded_rank, args=(SHARDED_RANKS, store, str(folder)), nprocs=SHARDED_RANKS)
    return folder


def make(out_dir: Path) -> list[Path]:
    """Write both DCP folders under ``out_dir``; returns every file written."""
    files: list[Path] = []
    for folder in (make_training(out_dir), make_sharded(out_dir)):
        written = sorted(p for p in folder.iterdir() if p.is_file())
        total = sum(p.stat().st_size for p in written)
        if total >= SIZE_LIMIT:
            raise SystemExit(f"{folder.name} holds {total} bytes, over the {SIZE_LIMIT}-byte sample limit")
        files.extend(written)
    return files


if __name__ == "__main__":
    for path in make(HERE):
        print(f"{path.stat().st_size:>8}  {path.relative_to(HERE)}")
