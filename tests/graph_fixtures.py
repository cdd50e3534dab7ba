"""Trusted checkpoints for the whole-graph conversion oracle (tests/test_convert_graph.py).

Imported by its bare name (``tests`` is on pytest's ``pythonpath``), so what torch pickles from here is
named ``graph_fixtures.<Class>`` by a GLOBAL opcode, and ``torch.load(..., weights_only=False)`` of such a
file finds the class again. Everything is tiny and seeded: each builder returns the same object every time.

The builders (one per kind of checkpoint a user converts):

- :func:`training_dict`: a plain training dict (model, Adam after two real steps, epoch, scheduler, RNG
  states, an EMA copy, plain Python values, and a list referenced twice);
- :func:`lightning_ckpt`: what Lightning saves, ``hyper_parameters`` an :class:`AttributeDict` (a dict
  subclass, as Lightning's own) holding a tensor and a :class:`RunInfo` (a plain custom class);
- :func:`whole_module`: a :class:`BNNet` pickled whole (``torch.save(model)``);
- :func:`keep_vars_dict`: ``state_dict(keep_vars=True)``: ``nn.Parameter`` objects, one frozen;
- :func:`tied_state_dict` / :func:`tied_training_dict`: a :class:`TiedLM` whose embedding and head share
  one storage, alone and beside its optimizer.

:func:`save` writes one of them, with ``cuda_tagged=True`` as a GPU save would (every storage's location
``cuda:0``) on a machine without one, the way sample_models/make_samples.py made ``cuda_tagged.pt``.
"""

from __future__ import annotations

import contextlib
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BUILDERS",
    "AttributeDict",
    "BNNet",
    "RunInfo",
    "TiedLM",
    "keep_vars_dict",
    "lightning_ckpt",
    "save",
    "tied_state_dict",
    "tied_training_dict",
    "training_dict",
    "whole_module",
]


# ----------------------------------------------------------------------------------------------- classes


class AttributeDict(dict):  # type: ignore[type-arg]
    """A dict whose keys are attributes too, like ``lightning.fabric.utilities.data.AttributeDict`` (what
    Lightning's ``save_hyperparameters`` stores as ``hyper_parameters``)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(f"Missing attribute {key!r}") from e

    def __setattr__(self, key: str, val: Any) -> None:
        self[key] = val

    def __delattr__(self, item: str) -> None:
        if item not in self:
            raise KeyError(item)
        del self[item]


class RunInfo:
    """A plain custom object with attributes (pickled as NEWOBJ + BUILD of its ``__dict__``), one a tensor."""

    def __init__(self, name: str, seed: int, scale: torch.Tensor) -> None:
        self.name = name
        self.seed = seed
        self.scale = scale

    def __repr__(self) -> str:
        return f"RunInfo({self.name!r}, {self.seed}, {self.scale!r})"


class BNNet(nn.Module):
    """Conv -> BN -> ReLU -> Conv -> BN -> ReLU -> pool -> Linear: parameters, float and int64 buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TiedLM(nn.Module):
    """An embedding whose weight is also the output head's (one Parameter, one storage)."""

    def __init__(self, vocab: int = 16, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.embed(ids)))


# ----------------------------------------------------------------------------------------------- training


def _trained_bnnet(seed: int) -> tuple[BNNet, torch.optim.Adam, torch.optim.lr_scheduler.LRScheduler]:
    """A BNNet after two real Adam steps (so the optimizer holds step / exp_avg / exp_avg_sq and BatchNorm
    running statistics are not their initial values), its StepLR stepped twice, in eval mode."""
    torch.manual_seed(seed)
    model = BNNet()
    model.train()
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(adam, step_size=1, gamma=0.5)
    for _ in range(2):
        x, y = torch.randn(4, 3, 6, 6) * 2 + 0.5, torch.randint(0, 5, (4,))
        adam.zero_grad()
        F.cross_entropy(model(x), y).backward()
        adam.step()
        sched.step()
    model.eval()
    return model, adam, sched


def _trained_tied_lm(seed: int) -> tuple[TiedLM, torch.optim.Adam, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = TiedLM()
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(adam, T_max=10)
    for _ in range(2):
        ids = torch.randint(0, 16, (2, 5))
        adam.zero_grad()
        F.cross_entropy(model(ids).reshape(-1, 16), ids.reshape(-1)).backward()
        adam.step()
        sched.step()
    model.eval()
    return model, adam, sched


# ----------------------------------------------------------------------------------------------- builders


def training_dict() -> dict[str, Any]:
    """(a) A plain training dict, every value weights_only can load."""
    model, adam, sched = _trained_bnnet(seed=11)
    torch.manual_seed(12)
    random.seed(13)
    flags = [True, None, (1, 2)]
    ema = OrderedDict(
        (k, v.detach().clone() * 0.5 if v.is_floating_point() else v.clone()) for k, v in model.state_dict().items()
    )
    return {
        "model": model.state_dict(),
        "optimizer": adam.state_dict(),
        "epoch": 7,
        "lr_scheduler": sched.state_dict(),
        "rng_state": torch.get_rng_state(),
        "py_rng": random.getstate(),
        "note": "text",
        "best": 0.25,
        "flags": flags,
        "ema": {"decay": 0.999, "num_updates": 2, "shadow": ema},
        "flags_again": flags,  # the same list object twice: a memo reference in the pickle
    }


def lightning_ckpt() -> dict[str, Any]:
    """(b) What a LightningModule's trainer saves, with a custom ``hyper_parameters`` dict subclass."""
    model, adam, sched = _trained_bnnet(seed=21)
    hparams = AttributeDict(
        lr=1e-3,
        width=4,
        class_weights=torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0]),
        run=RunInfo("baseline", 21, torch.tensor([0.5, 0.25], dtype=torch.float64)),
    )
    return {
        "epoch": 5,
        "global_step": 500,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": OrderedDict(("model." + k, v) for k, v in model.state_dict().items()),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 6, "completed": 5}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
                "monitor": "val_loss",
                "best_model_score": torch.tensor(0.25),
                "best_model_path": "epoch=4.ckpt",
                "best_k_models": {"epoch=4.ckpt": torch.tensor(0.25)},
            }
        },
        "optimizer_states": [adam.state_dict()],
        "lr_schedulers": [sched.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": hparams,
    }


def whole_module() -> BNNet:
    """(c) A whole pickled module: torch.save(model)."""
    model, _, _ = _trained_bnnet(seed=31)
    return model


def keep_vars_dict() -> OrderedDict[str, torch.Tensor]:
    """(d) ``state_dict(keep_vars=True)``: parameters are ``nn.Parameter`` objects, one frozen."""
    model, _, _ = _trained_bnnet(seed=41)
    model.conv1.weight.requires_grad_(False)
    return model.state_dict(keep_vars=True)


def tied_state_dict() -> OrderedDict[str, torch.Tensor]:
    """(e1) A tied LM's state dict: embed.weight and lm_head.weight are two tensors on one storage."""
    model, _, _ = _trained_tied_lm(seed=51)
    sd = model.state_dict()
    assert sd["embed.weight"].untyped_storage().data_ptr() == sd["lm_head.weight"].untyped_storage().data_ptr()
    return sd


def tied_training_dict() -> dict[str, Any]:
    """(e2) The tied LM beside its optimizer (the tied parameter appears once in the optimizer)."""
    model, adam, sched = _trained_tied_lm(seed=52)
    return {"model": model.state_dict(), "optimizer": adam.state_dict(), "scheduler": sched.state_dict(), "step": 2}


BUILDERS: dict[str, tuple[Callable[[], Any], str]] = {
    "training": (training_dict, ".pt"),
    "lightning": (lightning_ckpt, ".ckpt"),
    "module": (whole_module, ".pt"),
    "keep_vars": (keep_vars_dict, ".pt"),
    "tied_state_dict": (tied_state_dict, ".pt"),
    "tied_training": (tied_training_dict, ".pth"),
}


# ----------------------------------------------------------------------------------------------- saving


def _cuda0_tag(storage: Any) -> str | None:
    # A fresh string per call, as torch's own cuda tagger builds it: the pickle holds each tag in full.
    return "cuda" + ":" + str(0) if storage.device.type == "cpu" else None


def _no_deserialize(storage: Any, location: str) -> None:
    return None  # only tags while saving; loading defers to torch's own deserializers


@contextlib.contextmanager
def _cpu_storages_tagged_cuda0() -> Iterator[None]:
    """torch.save asks ``torch.serialization.location_tag`` for each storage's location, trying taggers in
    priority order; one ahead of cpu's that says "cuda:0" makes the pickle what a GPU save writes (the
    rebuild arguments and the storage bytes do not depend on the device)."""
    entry = (-1000, _cuda0_tag, _no_deserialize)
    torch.serialization.register_package(*entry)
    try:
        yield
    finally:
        torch.serialization._package_registry.remove(entry)


def save(obj: Any, path: Path, *, cuda_tagged: bool = False) -> Path:
    """torch.save ``obj`` to ``path``; with ``cuda_tagged`` every storage says it was saved on cuda:0."""
    if cuda_tagged:
        with _cpu_storages_tagged_cuda0():
            torch.save(obj, path)
    else:
        torch.save(obj, path)
    return path
