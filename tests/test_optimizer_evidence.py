"""Optimizer evidence: an index-keyed torch optimizer beside the model names its parameters by order."""

from __future__ import annotations

from pathlib import Path

import torch

import statecli

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
import sample_nets  # noqa: E402


def roles(path: Path) -> dict[str, tuple[str, str]]:
    return {t.name: (t.role, t.evidence) for t in statecli.open_checkpoint(path).tensors if t.group == "model"}


def codes(path: Path) -> list[str]:
    return [f.message for f in statecli.open_checkpoint(path).findings if "optimizer" in f.code]


def test_adam_names_every_parameter() -> None:
    got = roles(SAMPLES / "training_adam.pt")
    assert got["conv1.weight"] == ("parameter", "optimizer")
    assert got["fc.bias"] == ("parameter", "optimizer")
    assert got["bn1.running_mean"] == ("buffer", "rule:batchnorm-stats")
    assert any("10 parameters matched" in m for m in codes(SAMPLES / "training_adam.pt"))


def test_lightning_single_optimizer() -> None:
    got = roles(SAMPLES / "lightning.ckpt")
    assert got["model.conv1.weight"] == ("parameter", "optimizer")


def _train(tmp_path: Path, freeze: str | None, subset: bool) -> Path:
    torch.manual_seed(0)
    model = sample_nets.SmallCNN()
    if freeze:
        getattr(model, freeze).weight.requires_grad_(False)
    params = list(model.parameters())[:4] if subset else model.parameters()
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    loss = model(torch.randn(2, 3, 8, 8)).sum()
    loss.backward()
    opt.step()
    path = tmp_path / "t.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}, path)
    return path


def test_a_frozen_parameter_has_no_state(tmp_path: Path) -> None:
    path = _train(tmp_path, freeze="conv2", subset=False)
    got = roles(path)
    assert got["conv2.weight"] == ("parameter", "optimizer")
    assert any("1 parameters have no optimizer state" in m and "conv2.weight" in m for m in codes(path))


def test_counts_that_do_not_line_up_infer_nothing(tmp_path: Path) -> None:
    path = _train(tmp_path, freeze=None, subset=True)
    got = roles(path)
    assert got["conv1.weight"] == ("parameter", "default")
    assert any("do not line up" in m for m in codes(path))


def test_the_legacy_format_gets_the_same_optimizer_evidence_as_the_zip_format(tmp_path: Path) -> None:
    # DESIGN §3: the legacy format is the same checkpoint in another container. Its reader once repeated
    # torchzip's last steps and left out the optimizer evidence ("default" where the zip said "optimizer").
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    obj = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    torch.save(obj, tmp_path / "zip.pt")
    torch.save(obj, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    zip_report = statecli.open_checkpoint(tmp_path / "zip.pt")
    legacy_report = statecli.open_checkpoint(tmp_path / "legacy.pt")
    assert legacy_report.format == "torch-legacy"

    def facts(r: statecli.Report) -> list[tuple[str, str, str]]:
        return [(t.name, t.role, t.evidence) for t in r.tensors]

    assert facts(legacy_report) == facts(zip_report)
    assert ("0.weight", "parameter", "optimizer") in facts(legacy_report)
    optimizer_findings = [f.message for f in zip_report.findings if "optimizer" in f.code]
    assert optimizer_findings
    assert [f.message for f in legacy_report.findings if "optimizer" in f.code] == optimizer_findings
