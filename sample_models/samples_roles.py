"""Samples of model families whose roles a name alone gets wrong, made by ``make_samples.make_all()``
through :func:`make`, with torch's own quantization and parametrization APIs.

    python sample_models/make_samples.py        # regenerates every sample, these included

Each builder returns the live object the files were saved from; tests/test_trust_roles.py rebuilds it
and uses its ``named_parameters()`` / ``named_buffers()`` as the oracle for every tensor in the file.

Files (each a few KB):

- ``quantized_dynamic_state_dict.pt`` / ``quantized_dynamic_keep_vars.pt`` / ``quantized_dynamic_module.pt``:
  ``torch.ao.quantization.quantize_dynamic`` (qint8) of ``DynamicQuantNet`` over ``{nn.Linear, nn.LSTM}``;
  ``state_dict()``, ``state_dict(keep_vars=True)`` and the whole module. ``proj``'s bias is pickled as an
  ``nn.Parameter`` even in the plain state dict; the LSTM's weights sit in a TorchScript object.
- ``quantized_static_state_dict.pt`` / ``quantized_static_module.pt``: eager static quantization
  (``prepare``, one calibration pass, ``convert``; fbgemm qconfig) of ``StaticQuantNet``.
- ``qat_prepared_keep_vars.pt``: ``state_dict(keep_vars=True)`` of ``QatNet`` after ``prepare_qat`` and one
  training step's forward: Parameters beside fake-quant and observer buffers, every role provable.
- ``parametrized_state_dict.pt`` / ``parametrized_keep_vars.pt``: ``ParametrizedNet`` (a custom
  parametrization, ``orthogonal``, ``spectral_norm``, ``weight_norm`` from
  ``torch.nn.utils.parametrizations``) after one forward in train mode; torch refuses to pickle it whole.
- ``norm_hooks_state_dict.pt`` / ``norm_hooks_module.pt``: ``NormHookNet`` (the older
  ``torch.nn.utils.spectral_norm`` / ``weight_norm`` hooks) after one forward in train mode.
- ``training_rng.pt``: ``{"model", "optimizer" (SGD with momentum after one step), "epoch",
  "rng_state": torch.get_rng_state(), "cuda_rng_state": [16-byte states shaped like
  torch.cuda.get_rng_state_all() on two devices], "python_rng_state": random.getstate()}``.
- ``trainer_rng_state.pth``: what HF Trainer writes as ``rng_state.pth`` (``{"python", "cpu", "cuda"}``),
  without its ``numpy`` entry (numpy arrays pickle numpy globals, which torch's ``weights_only`` refuses).

Determinism: every builder seeds torch and runs on the CPU in one thread (make_samples.py pins the
thread count and the save options); quantization uses the fbgemm qconfig whatever the engine; the CUDA
states are built from their layout (seed then Philox offset, two little-endian 64-bit integers), not read
from a GPU. The files are written by a fresh child process (:func:`make`): ``norm_hooks_module.pt``
pickles its hooks' handle ids, a counter of every hook the process registered before.
"""

from __future__ import annotations

import random
import struct
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import sample_nets  # noqa: E402
import torch  # noqa: E402
import torch.ao.quantization as tq  # noqa: E402
from torch import nn  # noqa: E402

NAMES = (
    "quantized_dynamic_state_dict.pt",
    "quantized_dynamic_keep_vars.pt",
    "quantized_dynamic_module.pt",
    "quantized_static_state_dict.pt",
    "quantized_static_module.pt",
    "qat_prepared_keep_vars.pt",
    "parametrized_state_dict.pt",
    "parametrized_keep_vars.pt",
    "norm_hooks_state_dict.pt",
    "norm_hooks_module.pt",
    "training_rng.pt",
    "trainer_rng_state.pth",
)


@contextmanager
def _quiet() -> Iterator[None]:
    """Without deprecation noise (torch.ao.quantization, the norm hooks), and with the fbgemm engine that
    the qconfigs name where this CPU has it, so packed weights do not depend on the machine's default."""
    engine = torch.backends.quantized.engine
    if "fbgemm" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "fbgemm"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.quantized.engine = engine


def dynamic_quantized(seed: int = 21) -> nn.Module:
    torch.manual_seed(seed)
    model = sample_nets.DynamicQuantNet().eval()
    with _quiet():
        return tq.quantize_dynamic(model, {nn.Linear, nn.LSTM}, dtype=torch.qint8)


def static_quantized(seed: int = 22) -> nn.Module:
    torch.manual_seed(seed)
    model = sample_nets.StaticQuantNet().eval()
    model.qconfig = tq.get_default_qconfig("fbgemm")
    with _quiet():
        tq.prepare(model, inplace=True)
        model(torch.randn(4, 1, 4, 4))  # calibration
        tq.convert(model, inplace=True)
    return model


def qat_prepared(seed: int = 23) -> nn.Module:
    torch.manual_seed(seed)
    model = sample_nets.QatNet().train()
    model.qconfig = tq.get_default_qat_qconfig("fbgemm")
    with _quiet():
        tq.prepare_qat(model, inplace=True)
        model(torch.randn(2, 1, 6, 6))
    return model.eval()


def parametrized(seed: int = 24) -> nn.Module:
    torch.manual_seed(seed)
    model = sample_nets.ParametrizedNet().train()
    with torch.no_grad():
        model(torch.randn(3, 4))  # spectral_norm's power iteration updates _u and _v
    return model.eval()


def norm_hooked(seed: int = 25) -> nn.Module:
    torch.manual_seed(seed)
    model = sample_nets.NormHookNet().train()
    with torch.no_grad(), _quiet():
        model(torch.randn(2, 1, 4, 4))
    return model.eval()


def cuda_rng_state(seed: int, offset: int) -> torch.Tensor:
    """A CUDA generator's state as ``torch.cuda.get_rng_state()`` returns it: 16 uint8 (seed, offset)."""
    return torch.tensor(list(struct.pack("<Qq", seed, offset)), dtype=torch.uint8)


def training_rng(seed: int = 26) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).train()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).square().mean().backward()
    sgd.step()
    return {
        "model": model.state_dict(),
        "optimizer": sgd.state_dict(),
        "epoch": 1,
        "rng_state": torch.get_rng_state(),
        "cuda_rng_state": [cuda_rng_state(seed, 0), cuda_rng_state(seed, 4)],
        "python_rng_state": random.Random(seed).getstate(),
    }


def trainer_rng_state(seed: int = 27) -> dict[str, Any]:
    torch.manual_seed(seed)
    return {
        "python": random.Random(seed).getstate(),
        "cpu": torch.get_rng_state(),
        "cuda": [cuda_rng_state(seed, 0), cuda_rng_state(seed, 8)],
    }


def saved_objects() -> dict[str, Any]:
    """Every file's name and the object saved to it."""
    dynamic = dynamic_quantized()
    static = static_quantized()
    param = parametrized()
    hooks = norm_hooked()
    return {
        "quantized_dynamic_state_dict.pt": dynamic.state_dict(),
        "quantized_dynamic_keep_vars.pt": dynamic.state_dict(keep_vars=True),
        "quantized_dynamic_module.pt": dynamic,
        "quantized_static_state_dict.pt": static.state_dict(),
        "quantized_static_module.pt": static,
        "qat_prepared_keep_vars.pt": qat_prepared().state_dict(keep_vars=True),
        "parametrized_state_dict.pt": param.state_dict(),
        "parametrized_keep_vars.pt": param.state_dict(keep_vars=True),
        "norm_hooks_state_dict.pt": hooks.state_dict(),
        "norm_hooks_module.pt": hooks,
        "training_rng.pt": training_rng(),
        "trainer_rng_state.pth": trainer_rng_state(),
    }


def make(out_dir: Path) -> list[Path]:
    """Write the samples into ``out_dir`` from a fresh child process: a pickled module holds its hooks'
    handle ids, which count every hook the process registered before (make_samples.generate_in_child)."""
    from make_samples import generate_in_child

    generate_in_child("samples_roles", out_dir)
    return [out_dir / n for n in NAMES]


def generate(out_dir: str) -> list[Path]:
    import make_samples  # noqa: F401  (pins the thread count and the save options)

    objects = saved_objects()
    assert tuple(objects) == NAMES
    paths = []
    for name, obj in objects.items():
        path = Path(out_dir) / name
        with _quiet():
            torch.save(obj, path)  # to the final name: the zip's top folder is the file's stem
        paths.append(path)
    return paths


if __name__ == "__main__":
    sys.dont_write_bytecode = True
    for p in make(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(f"{p.stat().st_size:>8}  {p.name}")
