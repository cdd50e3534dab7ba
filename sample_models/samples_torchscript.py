"""TorchScript samples (``torch.jit.save``), made by ``make_samples.make_all()`` through :func:`make`.

    python sample_models/make_samples.py        # regenerates every sample, these included

Files (each well under 200 KB):

- ``torchscript_cnn.pt``: ``torch.jit.script`` of a ``SmallCNN`` with non-trivial BatchNorm statistics,
  saved in eval mode: 10 parameters, 6 buffers (``num_batches_tracked`` is int64).
- ``torchscript_frozen.pt``: ``torch.jit.script`` of ``FrozenNet``: frozen ``backbone.*`` parameters
  (requires_grad False), trainable ``norm`` / ``head``, persistent buffer ``scale``, buffer ``cache``
  registered with ``persistent=False`` (TorchScript does not keep that flag: after ``torch.jit.load`` it is
  in ``state_dict()``), a plain tensor attribute ``anchor`` (neither parameter nor buffer), and ``norm``
  left in train mode while the rest is in eval mode.
- ``torchscript_freeze_constants.pt``: ``torch.jit.freeze`` of the scripted ``SmallCNN``: no parameters or
  buffers left; the (BatchNorm-folded) weights are the tensor constants ``CONSTANTS.c0`` ... in
  ``constants.pkl``, over storages ``constants/<key>``.

Determinism:

- Scripting writes each class's ``Final`` constants in the iteration order of the module's
  ``__constants__`` set, so the generated ``code/`` depends on string hashing: :func:`make` runs the
  generation in a child process with ``PYTHONHASHSEED=0``.
- The scripted module is saved once to memory, its ``*.debug_pkl`` records (source ranges naming the
  absolute paths of ``sample_nets.py`` and of torch's own sources on this machine) are dropped, and the
  archive is loaded back with ``torch.jit.load`` and saved again with ``torch.jit.save``. The file on disk
  is plain ``torch.jit.save`` output whose debug records point into the archive's own ``code/``: the same
  bytes on any machine, for the same torch.
- ``.data/serialization_id`` depends only on the records' names and CRCs (see make_samples.py); seeds
  are fixed; everything runs on the CPU in one thread.
"""

from __future__ import annotations

import io
import os
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import sample_nets  # noqa: E402
import torch  # noqa: E402

SIZE_LIMIT = 200 * 1024
NAMES = ("torchscript_cnn.pt", "torchscript_frozen.pt", "torchscript_freeze_constants.pt")


def _frozen_net(seed: int) -> sample_nets.FrozenNet:
    from make_samples import frozen_net

    model = frozen_net(seed)
    model.anchor = torch.linspace(-1.0, 1.0, 5)  # a plain tensor attribute: scripted as an attribute
    model.norm.train()  # one submodule in train mode: the archive keeps each module's flag
    return model


def save_portable(module: torch.jit.ScriptModule, path: Path) -> Path:
    """``torch.jit.save`` without this machine's source paths in the debug records (see the docstring)."""
    first = io.BytesIO()
    torch.jit.save(module, first)
    stripped = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(first.getvalue())) as src, zipfile.ZipFile(stripped, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith(".debug_pkl"):
                dst.writestr(info, src.read(info.filename))
    reloaded = torch.jit.load(io.BytesIO(stripped.getvalue()))
    torch.jit.save(reloaded, str(path))  # the zip's top folder is the file's stem: save to the final name
    from make_samples import assert_portable

    return assert_portable(path)


def make(out_dir: Path) -> list[Path]:
    """Write the samples into ``out_dir``, generated in a child process with ``PYTHONHASHSEED=0`` that
    imports this module by name (so class names never depend on how the caller was started)."""
    from make_samples import generate_in_child

    generate_in_child("samples_torchscript", out_dir)
    return [out_dir / n for n in NAMES]


def generate(out_dir: str) -> list[Path]:
    assert os.environ.get("PYTHONHASHSEED") == "0", "run through make()"
    folder = Path(out_dir)
    torch.set_num_threads(1)
    from make_samples import trained_cnn

    cnn = torch.jit.script(trained_cnn(seed=11))
    frozen = torch.jit.freeze(cnn)  # freeze() wants eval mode: trained_cnn returns it so
    modules = (cnn, torch.jit.script(_frozen_net(seed=12)), frozen)
    paths = [save_portable(m, folder / name) for m, name in zip(modules, NAMES, strict=True)]
    for p in paths:
        assert p.stat().st_size < SIZE_LIMIT, f"{p.name} is {p.stat().st_size} bytes"
    return paths


if __name__ == "__main__":
    sys.dont_write_bytecode = True
    for p in make(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(f"{p.stat().st_size:>8}  {p.name}")
