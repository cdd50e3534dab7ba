"""A folder without a checkpoint: the message lists every kind of folder statecli really accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
from clirun import run_cli

import statecli
from statecli.formats import CHECKPOINT_SUFFIXES

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_empty_folder_message_names_every_accepted_kind(tmp_path: Path, command: str) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("no checkpoint here\n")
    args = [command, str(folder)] + (["-o", str(tmp_path / "o.safetensors")] if command == "convert" else [])
    result = run_cli(*args)
    assert result.exit_code == 3
    assert result.stdout == ""
    err = result.stderr
    assert err.startswith(f"statecli: error: {folder}: folder holds no checkpoint (looked for *.index.json, ")
    for suffix in CHECKPOINT_SUFFIXES:
        assert f"*{suffix}," in err, suffix
    assert "torch.distributed.checkpoint .metadata beside *.distcp files" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing written


def test_what_the_message_names_is_accepted() -> None:
    # A DCP folder, a shard folder: both read when given as a folder.
    assert statecli.open_checkpoint(SAMPLES / "dcp_sharded").format == "dcp"
    assert statecli.open_checkpoint(SAMPLES / "sharded").tensors
