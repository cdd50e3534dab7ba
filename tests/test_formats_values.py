"""Tensor values of TorchScript and torch.export archives: stats, convert and load read them from the
archive's members (no TorchScript or pickle runs), equal to what torch's own loaders give."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import statecli
from statecli.stats import compute

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def jit_state(name: str) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: v.detach() for k, v in torch.jit.load(SAMPLES / name).state_dict().items()}


def export_state(name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in torch.export.load(SAMPLES / name).state_dict.items()}


@pytest.mark.parametrize(("name", "oracle"), [("torchscript_cnn.pt", jit_state), ("export_tied_lm.pt2", export_state)])
def test_load_equals_torchs_own_loader(name: str, oracle: object) -> None:
    want = oracle(name)  # type: ignore[operator]
    got = statecli.load(SAMPLES / name)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_export_ties_survive_convert(tmp_path: Path) -> None:
    out = tmp_path / "lm.pt"
    statecli.convert(SAMPLES / "export_tied_lm.pt2", out, dtype="bf16", verify=True)
    sd = torch.load(out, weights_only=True)
    assert sd["embed.weight"].data_ptr() == sd["lm_head.weight"].data_ptr()
    assert sd["embed.weight"].dtype == torch.bfloat16


def test_stats_on_torchscript_matches_torch() -> None:
    want = jit_state("torchscript_cnn.pt")
    got = {t.name: t for t in compute(statecli.open_checkpoint(SAMPLES / "torchscript_cnn.pt")).tensors}
    for key, value in want.items():
        if value.is_floating_point():
            assert got[key].max == pytest.approx(float(value.max()))
            assert got[key].mean == pytest.approx(float(value.double().mean()), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("name", ["export_tied_lm.pt2", "export_frozen.pt2"])
def test_pt2_sample_inputs_are_read_from_their_nested_archive(name: str) -> None:
    # The example inputs are a torch.save archive stored inside the .pt2: their bytes are read where they lie.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args, _ = torch.export.load(SAMPLES / name).example_inputs
    result = {t.name: t for t in compute(statecli.open_checkpoint(SAMPLES / name)).tensors}
    want = args[0]
    got = result["sample_inputs.0.0"]
    assert got.skipped is None
    assert (got.min, got.max) == (float(want.min()), float(want.max()))
    assert got.mean == pytest.approx(float(want.double().mean()))


def test_frozen_constants_need_select(tmp_path: Path) -> None:
    with pytest.raises(statecli.UsageError, match=r"--select constants"):
        statecli.convert(SAMPLES / "torchscript_freeze_constants.pt", tmp_path / "o.safetensors")
    statecli.convert(SAMPLES / "torchscript_freeze_constants.pt", tmp_path / "o.safetensors", select="constants")
    assert (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("name", ["dcp_training", "dcp_sharded"])
def test_dcp_values_equal_torchs_own_conversion(name: str, tmp_path: Path) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(SAMPLES / name, tmp_path / "ref.pt")  # torch's own reader, on our trusted sample
    ref = torch.load(tmp_path / "ref.pt", weights_only=False)
    ref = ref.get("model", ref)
    got = statecli.load(SAMPLES / name)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    out = tmp_path / "model.safetensors"
    statecli.convert(SAMPLES / name, out, dtype="bf16", verify=True)  # an FSDP-style folder to one file
    assert statecli.open_checkpoint(out).summary.parameters.count == 10
    stats = {t.name: t for t in compute(statecli.open_checkpoint(SAMPLES / name)).tensors}
    assert stats["conv1.weight"].max == pytest.approx(float(ref["conv1.weight"].max()))


def test_dcp_chunks_that_do_not_cover_a_tensor_are_refused(tmp_path: Path) -> None:
    import shutil

    from statecli.tensors.dcp import DcpValues

    folder = tmp_path / "d"
    shutil.copytree(SAMPLES / "dcp_sharded", folder)
    values = DcpValues(statecli.open_checkpoint(folder))
    values.chunks["model.conv1.weight"] = values.chunks["model.conv1.weight"][:2]  # drop a rank's rows
    t = next(t for t in statecli.open_checkpoint(folder).tensors if t.name == "conv1.weight")
    with pytest.raises(statecli.InputError, match=r"no chunk holds elements \[6:8, 0:3, 0:3, 0:3\]; not read"):
        values.read(t, lambda path, offset, n: b"")
