"""torch.distributed.checkpoint folders: ``.metadata`` through the restricted reader, spans kept inside the folder.

torch is the oracle here, and only here: its own reader opens the trusted samples (``FileSystemReader``
unpickles ``.metadata`` with plain pickle, so it never touches a file a test made hostile).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from clirun import NO_COLOR, run_cli
from subproc import audited_open
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

import statecli
from statecli.errors import InputError, LimitExceededError, UnsafeError, UnsupportedFormatError
from statecli.formats import dcp as dcp_reader
from statecli.formats import read_raw
from statecli.formats.dcp import chunk_map, read_dcp

TRAINING = "dcp_training"
SHARDED = "dcp_sharded"
MARKER = "statecli_pwned_marker"


class Evil:
    """Unpickling this calls os.system."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {MARKER}",))


def oracle_metadata(folder: Path) -> Metadata:
    """torch's own reading of a TRUSTED folder's .metadata (plain pickle.load inside)."""
    return FileSystemReader(str(folder)).read_metadata()


@pytest.fixture
def training_copy(samples_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(samples_dir / TRAINING, dst)
    return dst


def rewrite(folder: Path, change: Callable[[Metadata], Any]) -> Path:
    """Change a trusted copy's Metadata with torch's dataclasses and pickle it back, as DCP writes it."""
    md = oracle_metadata(folder)
    md.storage_meta = None  # read_metadata filled in a load id
    change(md)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return folder


def retarget(md: Metadata, fqn: str, **fields: Any) -> None:
    for index, info in md.storage_data.items():
        if index.fqn == fqn:
            md.storage_data[index] = dataclasses.replace(info, **fields)


def small_dcp(folder: Path, state: dict[str, Any]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


# --- against torch's own reading of the samples ----------------------------------------------------


def fqn(t: Any) -> str:
    """The key as DCP stores it: statecli names a model's tensors inside the model, like a torch.save dict."""
    return f"model.{t.name}" if t.group == "model" else t.name


@pytest.mark.parametrize("sample", [TRAINING, SHARDED])
def test_names_dtypes_shapes_match_torch(samples_dir: Path, sample: str) -> None:
    md = oracle_metadata(samples_dir / sample)
    expected = {
        k: (str(v.properties.dtype).removeprefix("torch."), tuple(v.size))
        for k, v in md.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }
    raw = read_dcp(str(samples_dir / sample))
    assert raw.format == "dcp"
    assert {fqn(t): (t.dtype, t.shape) for t in raw.tensors} == expected
    assert len(raw.tensors) == len(expected)
    # Listed in the saved dict's order (planner_data), not the order ranks reported their chunks in.
    assert [fqn(t) for t in raw.tensors] == [k for k in md.planner_data if k in expected]
    assert all(t.device is None and t.requires_grad is None for t in raw.tensors)


@pytest.mark.parametrize("sample", [TRAINING, SHARDED])
def test_chunk_map_matches_torch_and_holds_the_values(samples_dir: Path, sample: str) -> None:
    folder = samples_dir / sample
    md = oracle_metadata(folder)
    chunks = chunk_map(str(folder))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "... assuming the intent is to load in a single process"
        loaded = _load_state_dict_from_keys(checkpoint_id=str(folder))  # torch's DCP loader
    for name, entry in md.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            assert name not in chunks
            continue
        assert [(c.offsets, c.sizes) for c in chunks[name]] == [
            (tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks
        ]
        # Rebuild the global tensor from the spans chunk_map gives: each is a torch.save of one block.
        whole = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        for c in chunks[name]:
            info = md.storage_data[MetadataIndex(name, c.offsets)]
            assert (os.path.relpath(c.path, folder), c.offset, c.length) == (
                info.relative_path,
                info.offset,
                info.length,
            )
            with open(c.path, "rb") as f:
                f.seek(c.offset)
                block = torch.load(io.BytesIO(f.read(c.length)), weights_only=True)
            assert tuple(block.shape) == c.sizes
            view = whole
            for dim, (o, s) in enumerate(zip(c.offsets, c.sizes, strict=True)):
                view = view.narrow(dim, o, s)
            view.copy_(block)
        top, rest = md.planner_data[name][0], md.planner_data[name][1:]
        expected = loaded[top]
        for part in rest:
            expected = expected[part]
        assert torch.equal(whole, expected), name


# --- structure and roles ---------------------------------------------------------------------------


def test_training_sample_container_groups_and_roles(samples_dir: Path) -> None:
    report = statecli.open_checkpoint(samples_dir / TRAINING)
    assert report.format == "dcp"
    assert report.container.kind == "dcp"
    assert report.container.state_dict_at == "model"
    assert report.container.other_keys == ("optim", "epoch")
    by_name = {t.name: t for t in report.tensors}
    assert len(by_name) == 16 + 30

    w = by_name["conv1.weight"]
    assert (w.role, w.evidence, w.exact, w.group) == ("parameter", "optimizer", False, "model")
    assert (w.storage, w.file, w.stride) == (f"__0_0.distcp:{w_offset(samples_dir)}", "__0_0.distcp", (27, 9, 3, 1))
    assert w.persistent is True
    for name in ("bn1.running_mean", "bn1.running_var", "bn2.num_batches_tracked"):
        assert (by_name[name].role, by_name[name].evidence) == ("buffer", "rule:batchnorm-stats")
    params = [t.name for t in report.tensors if t.role == "parameter"]
    assert params == [
        n for n in by_name if by_name[n].group == "model" and not n.rpartition(".")[2].startswith(("running", "num"))
    ]
    assert all(by_name[n].evidence == "optimizer" for n in params)

    optim = [t for t in report.tensors if t.name.startswith("optim.")]
    assert len(optim) == 30
    assert all((t.group, t.role, t.evidence, t.exact) == ("optimizer", "other", "container", True) for t in optim)
    assert report.summary.parameters.count == 10 and report.summary.buffers.count == 6

    assert not [f for f in report.findings if f.level != "info"], report.findings
    (entries,) = [f for f in report.findings if f.code == "non-tensor-entries"]
    assert entries.message.startswith("13 non-tensor entries") and "optim.param_groups.0.lr" in entries.message
    assert report.metadata == {"version": "1.0.0", "save_id": "statecli-sample"}
    files = samples_dir / TRAINING
    assert report.file_size == sum(p.stat().st_size for p in files.iterdir())


def w_offset(samples_dir: Path) -> int:
    md = oracle_metadata(samples_dir / TRAINING)
    return md.storage_data[MetadataIndex("model.conv1.weight", (0, 0, 0, 0))].offset


def test_sharded_sample_one_logical_tensor_per_key(samples_dir: Path) -> None:
    raw = read_dcp(str(samples_dir / SHARDED))
    by_name = {t.name: t for t in raw.tensors}
    conv = by_name["conv1.weight"]
    assert conv.shape == (8, 3, 3, 3) and conv.storage is None and conv.file == "__0_0.distcp"
    assert conv.storage_nbytes == 8 * 27 * 4
    chunks = chunk_map(str(samples_dir / SHARDED))["model.conv1.weight"]
    assert [(c.offsets[0], c.sizes[0]) for c in chunks] == [(0, 3), (3, 3), (6, 2)]
    assert [os.path.basename(c.path) for c in chunks] == ["__0_0.distcp", "__1_0.distcp", "__2_0.distcp"]
    # Replicated buffers are written once: one chunk, so a storage key.
    assert by_name["bn1.running_mean"].storage is not None
    (sharded,) = [f for f in raw.findings if f.code == "sharded-tensors"]
    assert sharded.level == "info" and "10 tensors" in sharded.message and "3 files" in sharded.message
    assert "conv1.weight (3 chunks)" in sharded.message
    report = statecli.open_checkpoint(samples_dir / SHARDED)
    assert report.summary.parameters.count == 10 and report.summary.buffers.count == 6
    assert report.summary.storage_nbytes == report.summary.logical_nbytes


def test_metadata_path_reads_its_folder(samples_dir: Path) -> None:
    raw = read_raw(str(samples_dir / TRAINING / ".metadata"))
    assert raw.format == "dcp" and len(raw.tensors) == 46


def test_cli_inspect_json(samples_dir: Path) -> None:
    result = run_cli("inspect", str(samples_dir / TRAINING), "-f", "json", env=NO_COLOR)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "statecli.report/1" and data["format"] == "dcp"
    assert data["container"]["state_dict_at"] == "model"
    w = next(t for t in data["tensors"] if t["name"] == "fc.weight")
    assert (w["role"], w["evidence"], w["exact"], w["shape"], w["device"]) == (
        "parameter",
        "optimizer",
        False,
        [10, 16],
        None,
    )


def test_plain_state_dict_at_the_root(tmp_path: Path) -> None:
    state = {"enc.weight": torch.ones(2, 2), "bn.running_mean": torch.zeros(2), "steps": torch.tensor(3)}
    raw = read_dcp(str(small_dcp(tmp_path / "c", state)))
    assert raw.container.state_dict_at == "" and raw.container.other_keys == ()
    assert [(t.name, t.group, t.role) for t in raw.tensors] == [
        ("enc.weight", "model", None),
        ("bn.running_mean", "model", None),
        ("steps", "model", None),
    ]
    report = statecli.open_checkpoint(tmp_path / "c")
    assert [t.evidence for t in report.tensors] == ["default", "rule:batchnorm-stats", "rule:integer-dtype"]


def test_without_planner_data_top_keys_come_from_the_names(training_copy: Path) -> None:
    rewrite(training_copy, lambda md: setattr(md, "planner_data", None))
    raw = read_dcp(str(training_copy))
    assert raw.container.state_dict_at == "model" and raw.container.other_keys == ("optim", "epoch")
    assert {t.group for t in raw.tensors} == {"model", "optimizer"}
    assert sum(t.evidence == "optimizer" for t in raw.tensors) == 10


def test_optimizer_state_by_index_names_no_parameter(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    folder = small_dcp(tmp_path / "c", {"model": model.state_dict(), "optimizer": opt.state_dict()})
    raw = read_dcp(str(folder))
    momentum = [t for t in raw.tensors if t.group == "optimizer"]
    assert [t.name for t in momentum] == ["optimizer.state.0.momentum_buffer", "optimizer.state.1.momentum_buffer"]
    assert all(t.evidence is None for t in raw.tensors if t.group == "model")  # left to the rules


def test_other_top_level_tensors_keep_their_key_as_group(tmp_path: Path) -> None:
    state = {"model": {"w": torch.ones(2)}, "rng": torch.zeros(4, dtype=torch.uint8), "step": 7}
    raw = read_dcp(str(small_dcp(tmp_path / "c", state)))
    assert [(t.name, t.group, t.role) for t in raw.tensors] == [("w", "model", None), ("rng", "rng", "other")]
    assert raw.container.other_keys == ("rng", "step")


def test_a_tensor_beside_the_model_key_makes_the_top_the_state_dict(tmp_path: Path) -> None:
    # As torch.save's reader takes {'model': {'w'}, 'w'}: named inside the model, both would be 'w'.
    state = {"model": {"w": torch.ones(2)}, "w": torch.zeros(3)}
    raw = read_dcp(str(small_dcp(tmp_path / "c", state)))
    assert [(t.name, t.group) for t in raw.tensors] == [("model.w", "model"), ("w", "model")]


def test_stray_distcp_file_is_noted(training_copy: Path) -> None:
    (training_copy / "__7_0.distcp").write_bytes(b"old")
    raw = read_dcp(str(training_copy))
    assert any(f.code == "unreferenced-file" and "__7_0.distcp" in f.message for f in raw.findings)


# --- hostile files -----------------------------------------------------------------------------------


def test_os_system_inside_the_metadata_is_a_finding_and_never_runs(
    training_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rewrite(training_copy, lambda md: md.planner_data.__setitem__("payload", Evil()))
    monkeypatch.chdir(tmp_path)
    report = statecli.open_checkpoint(training_copy)
    dangerous = [f for f in report.findings if f.level == "dangerous"]
    assert dangerous and f"system('touch {MARKER}')" in dangerous[0].message
    assert len(report.tensors) == 46
    assert not (tmp_path / MARKER).exists()
    result = run_cli("check", str(training_copy), env=NO_COLOR)
    assert result.exit_code == 5  # refused as unsafe


def test_metadata_that_is_only_a_payload_is_refused(training_copy: Path, tmp_path: Path) -> None:
    (training_copy / ".metadata").write_bytes(pickle.dumps(Evil()))
    # torch's reader runs it before it looks at what it got: refused as unsafe, not merely "not DCP".
    with pytest.raises(UnsafeError, match=r"not a torch.distributed.checkpoint .metadata.*system"):
        read_dcp(str(training_copy))
    result = run_cli("inspect", str(training_copy), env=NO_COLOR)
    assert result.exit_code == 5 and "Traceback" not in result.output
    assert not (tmp_path / MARKER).exists() and not Path(MARKER).exists()


def test_payload_in_a_non_tensor_entry_is_a_finding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch's DCP loader would torch.load(weights_only=False) this entry and run it.
    folder = small_dcp(tmp_path / "c", {"model": {"w": torch.ones(2)}, "payload": Evil(), "epoch": 1})
    monkeypatch.chdir(tmp_path)
    report = statecli.open_checkpoint(folder)
    (danger,) = [f for f in report.findings if f.level == "dangerous"]
    assert danger.message.startswith("non-tensor entry 'payload': pickle would call")
    assert "system" in danger.message
    assert not (tmp_path / MARKER).exists()


def test_hostile_folder_triggers_no_audit_events(samples_dir: Path, tmp_path: Path) -> None:
    folder = small_dcp(tmp_path / "c", {"model": {"w": torch.ones(2)}, "payload": Evil()})
    rewrite(folder, lambda md: md.planner_data.__setitem__("payload2", Evil()))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = audited_open(folder, samples_dir / TRAINING, run_dir)
    assert result["events"] == []
    assert "dangerous" in result["levels"]
    assert list(run_dir.iterdir()) == []


@pytest.mark.parametrize(
    "relative_path",
    ["../secret.distcp", "/etc/passwd", "sub/../../secret.distcp", "link.distcp"],
)
def test_storage_outside_the_folder_is_unsafe(training_copy: Path, relative_path: str) -> None:
    outside = training_copy.parent / "secret.distcp"
    outside.write_bytes(b"\0" * 200_000)
    (training_copy / "link.distcp").symlink_to(outside)
    rewrite(training_copy, lambda md: retarget(md, "model.fc.bias", relative_path=relative_path))
    with pytest.raises(UnsafeError, match="leaves the checkpoint folder"):
        read_dcp(str(training_copy))
    result = run_cli("inspect", str(training_copy), env=NO_COLOR)
    assert result.exit_code == 5 and "leaves the checkpoint folder" in result.output


def test_symlinked_metadata_outside_is_unsafe(training_copy: Path) -> None:
    outside = training_copy.parent / "elsewhere.metadata"
    (training_copy / ".metadata").rename(outside)
    (training_copy / ".metadata").symlink_to(outside)
    with pytest.raises(UnsafeError):
        read_dcp(str(training_copy))


def test_subfolder_inside_is_fine(training_copy: Path) -> None:
    (training_copy / "sub").mkdir()
    shutil.copy(training_copy / "__0_0.distcp", training_copy / "sub" / "x.distcp")
    rewrite(training_copy, lambda md: retarget(md, "model.fc.bias", relative_path="sub/x.distcp"))
    by_name = {t.name: t for t in read_dcp(str(training_copy)).tensors}
    assert by_name["fc.bias"].file == "sub/x.distcp"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda md: retarget(md, "model.fc.bias", relative_path="__9_0.distcp"), "does not exist"),
        (lambda md: retarget(md, "model.fc.bias", offset=10**9), "which holds"),
        (lambda md: retarget(md, "epoch", length=10**9), "which holds"),
        (lambda md: retarget(md, "model.fc.bias", length=8), "needs 40 bytes"),
        (lambda md: md.storage_data.pop(MetadataIndex("model.fc.bias", (0,))), "no storage_data record"),
        (lambda md: setattr(md, "state_dict_metadata", [1, 2]), "not a mapping"),
    ],
)
def test_broken_storage_records_exit_3(training_copy: Path, change: Callable[[Metadata], Any], message: str) -> None:
    rewrite(training_copy, change)
    with pytest.raises(InputError, match=message) as info:
        read_dcp(str(training_copy))
    assert info.value.exit_code == 3


def absurd(md: Metadata, size: tuple[int, ...], chunk: tuple[int, ...] | None = None) -> None:
    entry = md.state_dict_metadata["model.fc.weight"]
    entry.size = torch.Size(size)
    entry.chunks = [ChunkStorageMetadata(torch.Size([0] * len(size)), torch.Size(chunk or size))]
    index = MetadataIndex("model.fc.weight", (0, 0))
    info = md.storage_data.pop(index)
    md.storage_data[MetadataIndex("model.fc.weight", (0,) * len(size))] = info


@pytest.mark.parametrize(
    ("size", "chunk", "message"),
    [
        ((2**40, 2**20), None, "needs 4611686018427387904 bytes"),
        ((2**40, 2**40), None, "overflows the element count"),
        ((10, 16), (11, 16), "reaches past its size"),
        ((10, -16), None, "impossible value"),
    ],
)
def test_absurd_sizes_exit_3(
    training_copy: Path, size: tuple[int, ...], chunk: tuple[int, ...] | None, message: str
) -> None:
    def change(md: Metadata) -> None:
        if min(size) < 0:
            md.state_dict_metadata["model.fc.weight"].size = (10, -16)  # torch.Size refuses negatives
        else:
            absurd(md, size, chunk)

    rewrite(training_copy, change)
    with pytest.raises(InputError, match=message):
        read_dcp(str(training_copy))
    assert run_cli("inspect", str(training_copy), env=NO_COLOR).exit_code == 3


def test_oversized_metadata_is_refused_before_reading(training_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dcp_reader, "MAX_METADATA_BYTES", 1000)
    with pytest.raises(LimitExceededError, match="more than the 1000-byte limit"):
        read_dcp(str(training_copy))


def test_truncated_metadata_exits_3(training_copy: Path) -> None:
    meta = training_copy / ".metadata"
    meta.write_bytes(meta.read_bytes()[:5000])
    with pytest.raises(InputError, match="truncated"):
        read_dcp(str(training_copy))
    result = run_cli("inspect", str(training_copy), env=NO_COLOR)
    assert result.exit_code == 3 and "Traceback" not in result.output


def test_a_pickled_dict_is_not_dcp_metadata(training_copy: Path) -> None:
    (training_copy / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    with pytest.raises(InputError, match=r"not a torch\.distributed\.checkpoint \.metadata"):
        read_dcp(str(training_copy))


def test_unknown_entry_types_are_a_warning(training_copy: Path) -> None:
    def change(md: Metadata) -> None:
        md.state_dict_metadata["extra"] = {"not": "a storage record"}

    rewrite(training_copy, change)
    raw = read_dcp(str(training_copy))
    assert any(f.code == "unknown-entry" and "extra" in f.message for f in raw.findings)
    assert "extra" in raw.container.other_keys


def test_bytes_entries_are_bytes_storage(samples_dir: Path) -> None:
    # The sample holds what sample_models/README.md says: 13 pickled non-tensor entries beside the tensors.
    md = oracle_metadata(samples_dir / TRAINING)
    assert sum(isinstance(v, BytesStorageMetadata) for v in md.state_dict_metadata.values()) == 13


@pytest.mark.parametrize("sample", [TRAINING, SHARDED])
def test_sample_folders_stay_small(samples_dir: Path, sample: str) -> None:
    assert sum(p.stat().st_size for p in (samples_dir / sample).iterdir()) < 200 * 1024


def test_stream_transforms_are_listed_but_not_mapped(training_copy: Path) -> None:
    rewrite(training_copy, lambda md: retarget(md, "model.fc.bias", transform_descriptors=["zstd"]))
    raw = read_dcp(str(training_copy))
    assert any(f.code == "stream-transforms" and "zstd" in f.message for f in raw.findings)
    with pytest.raises(UnsupportedFormatError, match="stream transforms zstd"):
        chunk_map(str(training_copy))


def test_chunks_naming_the_same_bytes_get_no_storage_key(training_copy: Path) -> None:
    def change(md: Metadata) -> None:
        weight = md.storage_data[MetadataIndex("model.fc.weight", (0, 0))]
        retarget(md, "model.fc.bias", offset=weight.offset, length=weight.length)

    rewrite(training_copy, change)
    by_name = {t.name: t for t in read_dcp(str(training_copy)).tensors}
    assert by_name["fc.weight"].storage is None and by_name["fc.bias"].storage is None
    assert by_name["conv1.weight"].storage is not None
    with pytest.raises(UnsupportedFormatError, match="shared span"):
        chunk_map(str(training_copy))


def test_missing_storage_data_lists_tensors_without_files(training_copy: Path) -> None:
    rewrite(training_copy, lambda md: setattr(md, "storage_data", None))
    raw = read_dcp(str(training_copy))
    assert len(raw.tensors) == 46 and all(t.file is None and t.storage is None for t in raw.tensors)
    assert any(f.code == "no-storage-data" and f.level == "warning" for f in raw.findings)
    with pytest.raises(InputError, match="no storage_data"):
        chunk_map(str(training_copy))


def test_bytes_after_the_pickle_are_a_warning(training_copy: Path) -> None:
    meta = training_copy / ".metadata"
    meta.write_bytes(meta.read_bytes() + b"junk")
    raw = read_dcp(str(training_copy))
    assert any(f.code == "trailing-pickle-data" and "4 bytes" in f.message for f in raw.findings)


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_a_distcp_file_given_alone_names_the_folder_to_pass(training_copy: Path, command: str) -> None:
    path = training_copy / "__0_0.distcp"
    before = sorted(p.name for p in training_copy.parent.rglob("*"))
    extra = ["-o", str(training_copy.parent / "out.safetensors")] if command == "convert" else []
    result = run_cli(command, str(path), *extra, env=NO_COLOR)
    assert result.exit_code == 3, result.stderr
    assert result.stdout == ""
    assert result.stderr == (
        f"statecli: error: {path}: a torch.distributed.checkpoint data file, which names none of its tensors: "
        f"pass the folder ({training_copy}) or its .metadata\n"
    )
    assert sorted(p.name for p in training_copy.parent.rglob("*")) == before
