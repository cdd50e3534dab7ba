"""Legacy torch files (torch < 1.6 stream format) read through the restricted reader, torch as oracle."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch
from clirun import run_cli

import statecli
from statecli.errors import InputError

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
import sample_nets  # noqa: E402
import samples_legacy  # noqa: E402


def tload(path: Path) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, weights_only=False)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_the_sample_is_what_torch_reads() -> None:
    path = SAMPLES / "legacy_cnn.pt"
    ref = tload(path)
    report = statecli.open_checkpoint(path)
    assert report.format == "torch-legacy"
    assert [(t.name, t.dtype, t.shape) for t in report.tensors] == [
        (k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in ref.items()
    ]
    assert any(f.code == "legacy-format" for f in report.findings)
    sd = statecli.load(path)
    assert all(same_bits(sd[k], v) for k, v in ref.items())


def test_a_file_torch_itself_wrote(tmp_path: Path) -> None:
    tied = torch.randn(4, 3)
    sd = {"a": tied, "b": tied, "view": torch.arange(10.0)[2:7], "i": torch.arange(3), "h": torch.ones(2).half()}
    torch.save(sd, tmp_path / "l.pt", _use_new_zipfile_serialization=False)
    report = statecli.open_checkpoint(tmp_path / "l.pt")
    by_name = {t.name: t for t in report.tensors}
    assert by_name["a"].shares_with == ("b",)
    assert by_name["view"].storage_offset == 2 and by_name["view"].shape == (5,)
    got = statecli.load(tmp_path / "l.pt")
    assert all(same_bits(got[k], v) for k, v in sd.items())
    assert got["a"].data_ptr() == got["b"].data_ptr()


def test_a_whole_module_without_running_its_code(tmp_path: Path) -> None:
    torch.save(sample_nets.FrozenNet(), tmp_path / "m.pt", _use_new_zipfile_serialization=False)
    report = statecli.open_checkpoint(tmp_path / "m.pt")
    roles = {t.name: (t.role, t.exact, t.persistent, t.requires_grad) for t in report.tensors}
    assert roles["cache"] == ("buffer", True, False, False)
    assert roles["backbone.0.weight"] == ("parameter", True, True, False)
    assert report.container.module_class == "sample_nets.FrozenNet"


def test_convert_writes_the_current_format(tmp_path: Path) -> None:
    out = tmp_path / "cnn.pt"
    statecli.convert(SAMPLES / "legacy_cnn.pt", out, dtype="bf16", verify=True)
    assert statecli.open_checkpoint(out).format == "torch-zip"
    sample_nets.SmallCNN().bfloat16().load_state_dict(torch.load(out, weights_only=True))


def _legacy_with(obj: object) -> bytes:
    return samples_legacy.legacy_bytes(obj)


def test_hostile_global_is_a_finding_and_never_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Evil:
        def __reduce__(self) -> tuple:
            import os

            return (os.system, ("touch pwned",))

    path = tmp_path / "e.pt"
    path.write_bytes(_legacy_with({"w": torch.ones(2), "x": Evil()}))
    monkeypatch.chdir(tmp_path)
    report = statecli.open_checkpoint(path)
    assert any(f.level == "dangerous" and "system" in f.message for f in report.findings)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("cut", "message"),
    [(-1, "truncated"), (-40, "truncated"), (60, "truncated")],
)
def test_truncated_files_are_exit_3(tmp_path: Path, cut: int, message: str) -> None:
    data = (SAMPLES / "legacy_cnn.pt").read_bytes()
    path = tmp_path / "t.pt"
    path.write_bytes(data[:cut])
    with pytest.raises(InputError, match=message):
        statecli.open_checkpoint(path)
    result = run_cli("inspect", str(path))
    assert result.exit_code == 3 and "Traceback" not in result.stderr


def test_a_record_claiming_more_than_its_data(tmp_path: Path) -> None:
    data = _legacy_with({"w": torch.ones(4)})
    # the data section is the count (8 bytes) and 4 floats: say 2 elements instead of 4
    path = tmp_path / "c.pt"
    path.write_bytes(data[:-24] + (2).to_bytes(8, "little") + data[-16:])
    with pytest.raises(InputError, match="holds 2 elements, its record claims 4"):
        statecli.open_checkpoint(path)


def test_wrong_protocol_version(tmp_path: Path) -> None:
    data = pickle.dumps(samples_legacy.MAGIC_NUMBER, protocol=2) + pickle.dumps(999, protocol=2)
    path = tmp_path / "v.pt"
    path.write_bytes(data + b"\x80\x02}q\x00.")
    with pytest.raises(statecli.UnsupportedFormatError, match="protocol 999"):
        statecli.open_checkpoint(path)
