"""``torch.export`` samples (``.pt2``, ``torch.export.save``), made by ``make_samples.make_all()`` through :func:`make`.

    python sample_models/make_samples.py        # regenerates every sample, these included

Files (each well under 200 KB):

- ``export_frozen.pt2``: ``torch.export.export`` of :class:`WithConstant` around ``FrozenNet``. Its graph
  signature lists frozen parameters ``net.backbone.*`` (``requires_grad`` false), trainable ``net.norm.*``
  / ``net.head.*``, the persistent buffer ``net.scale``, the buffer ``net.cache`` with ``persistent``
  false (stored with the constants, not in the state dict) and the tensor constant ``offset`` (a plain
  tensor attribute the forward uses). ``data/sample_inputs/model.pt`` holds the example input.
- ``export_tied_lm.pt2``: ``TinyLM(tie=True)``: ``embed.weight`` and ``lm_head.weight`` are one storage
  (both name ``data/weights/weight_0``); int64 buffer ``position_ids`` and float32 ``rotary_emb.inv_freq``.

Determinism: seeds are fixed and everything runs on the CPU in one thread. Each graph node's
``stack_trace`` metadata (absolute paths of ``sample_nets.py`` and of torch's sources on this machine) is
removed before saving; nothing else is changed, and the file is plain ``torch.export.save`` output.
``.data/serialization_id`` depends only on the records' names and CRCs (see make_samples.py). The
generation runs in a child process with ``PYTHONHASHSEED=0`` so that no set order can leak into the JSON.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import sample_nets  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

SIZE_LIMIT = 200 * 1024
NAMES = ("export_frozen.pt2", "export_tied_lm.pt2")


class WithConstant(nn.Module):
    """``FrozenNet`` plus a plain tensor attribute used in ``forward``: export lifts it as a tensor constant."""

    def __init__(self, net: sample_nets.FrozenNet) -> None:
        super().__init__()
        self.net = net
        self.offset = torch.linspace(-1.0, 1.0, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.offset


def save_portable(ep: torch.export.ExportedProgram, path: Path) -> Path:
    """``torch.export.save`` without this machine's source paths in the nodes' metadata."""
    for node in ep.graph.nodes:
        node.meta.pop("stack_trace", None)
    torch.export.save(ep, str(path))  # the zip's top folder is the file's stem: save to the final name
    from make_samples import assert_portable

    return assert_portable(path)


def make(out_dir: Path) -> list[Path]:
    """Write the samples into ``out_dir``, generated in a child process with ``PYTHONHASHSEED=0`` that
    imports this module by name (so class names never depend on how the caller was started)."""
    from make_samples import generate_in_child

    generate_in_child("samples_pt2", out_dir)
    return [out_dir / n for n in NAMES]


def generate(out_dir: str) -> list[Path]:
    assert os.environ.get("PYTHONHASHSEED") == "0", "run through make()"
    folder = Path(out_dir)
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export's notes on buffer mutation and deprecated paths
        from make_samples import frozen_net

        frozen = WithConstant(frozen_net(seed=21))
        ep_frozen = torch.export.export(frozen, (torch.randn(2, 8, generator=torch.Generator().manual_seed(22)),))
        torch.manual_seed(23)
        lm = sample_nets.TinyLM(tie=True).eval()
        ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(24))
        ep_lm = torch.export.export(lm, (ids,))
        paths = [save_portable(ep, folder / name) for ep, name in zip((ep_frozen, ep_lm), NAMES, strict=True)]
    for p in paths:
        assert p.stat().st_size < SIZE_LIMIT, f"{p.name} is {p.stat().st_size} bytes"
    return paths


if __name__ == "__main__":
    sys.dont_write_bytecode = True
    for p in make(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(f"{p.stat().st_size:>8}  {p.name}")
