"""Bad inputs: each gives a StatecliError with exit code 3 naming the problem and the path, writes nothing,
and the hostile sample is reported, never run."""

from __future__ import annotations

import hashlib
import pickle
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from subproc import audited_open

import statecli
from statecli import InputError, StatecliError, UnsupportedFormatError

GOOD = "cnn_bn_state_dict.pt"
MALICIOUS = "malicious_os_system.pt"
MARKER = "statecli_pwned_marker"


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a digest of its bytes (folders as ``dir``)."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def expect_error(
    path: Path,
    *words: str,
    cls: type[StatecliError] = InputError,
    root: Path | None = None,
) -> StatecliError:
    """open_checkpoint(path) raises ``cls`` with exit code 3, naming the path and every word given,
    and leaves the folder exactly as it was."""
    root = root if root is not None else path.parent
    before = snapshot(root)
    with pytest.raises(StatecliError) as info:
        statecli.open_checkpoint(path)
    err = info.value
    assert isinstance(err, cls), f"{type(err).__name__}: {err}"
    assert err.exit_code == 3
    assert err.path == str(path)
    text = str(err)
    assert str(path) in text
    for w in words:
        assert w.lower() in err.message.lower(), f"{w!r} not in {err.message!r}"
    assert snapshot(root) == before, "statecli wrote or changed something"
    return err


def copy_sample(samples_dir: Path, tmp_path: Path, name: str = GOOD) -> Path:
    dst = tmp_path / name
    shutil.copyfile(samples_dir / name, dst)
    return dst


def rewrite_zip(src: Path, dst: Path, change: Callable[[str, bytes], bytes]) -> None:
    """A valid zip with the same member names, in the same order, each member's bytes passed through ``change``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, change(info.filename, zin.read(info.filename)))


# ------------------------------------------------------------------------------ not a checkpoint at all


def test_missing_path(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.pt", "no such file", root=tmp_path)


def test_folder_without_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("trained on tuesday\n")
    (folder / "config.json").write_text("{}\n")
    expect_error(folder, "no checkpoint", root=tmp_path)


def test_empty_folder(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    expect_error(folder, "no checkpoint", root=tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "model.pt"
    p.write_bytes(b"")
    expect_error(p, "empty")


def test_git_lfs_pointer(tmp_path: Path) -> None:
    p = tmp_path / "model.pt"
    p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "ab" * 32 + "\nsize 123\n")
    expect_error(p, "git lfs")


def test_text_file(tmp_path: Path) -> None:
    p = tmp_path / "model.pt"
    p.write_text("This is not a checkpoint.\nIt is a note about one.\n")
    expect_error(p, "text")


def test_zip_without_data_pkl(tmp_path: Path) -> None:
    p = tmp_path / "model.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("model/readme.txt", "hello")
    expect_error(p, "data.pkl")


# --------------------------------------------------------------- a torch.distributed.checkpoint data file


@pytest.mark.parametrize("name", ["dcp_training/__0_0.distcp", "dcp_sharded/__1_0.distcp"])
def test_a_distcp_file_names_its_folder(samples_dir: Path, tmp_path: Path, name: str) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(samples_dir / Path(name).parent, folder)
    path = folder / Path(name).name
    err = expect_error(path, "torch.distributed.checkpoint data file", root=tmp_path)
    assert err.message.endswith(f"pass the folder ({folder}) or its .metadata")
    assert "zip" not in err.message


def test_a_distcp_file_alone_says_its_metadata_is_missing(samples_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "__0_0.distcp"
    shutil.copyfile(samples_dir / "dcp_training" / "__0_0.distcp", path)
    err = expect_error(path, "torch.distributed.checkpoint data file")
    assert err.message.endswith(f"pass the folder that holds the checkpoint's .metadata (there is none in {tmp_path})")


def test_a_renamed_data_file_beside_a_metadata_gets_a_hint(samples_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(samples_dir / "dcp_training", folder)
    path = folder / "weights.bin"
    (folder / "__0_0.distcp").rename(path)
    err = expect_error(path, "corrupt zip archive", root=tmp_path)
    assert err.message.endswith(
        "it sits beside a torch.distributed.checkpoint .metadata: if it is one of that checkpoint's data "
        f"files, pass the folder ({folder}) or its .metadata"
    )


def test_a_good_checkpoint_beside_a_metadata_is_read(samples_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(samples_dir / "dcp_training", folder)
    shutil.copyfile(samples_dir / GOOD, folder / GOOD)
    assert len(statecli.open_checkpoint(folder / GOOD).tensors) == 16


# ---------------------------------------------------------------------------------- damaged torch zips


@pytest.mark.parametrize("cut", ["half", "minus10", "minus1", "minus22", "first64", "third"])
def test_truncated_zip(samples_dir: Path, tmp_path: Path, cut: str) -> None:
    data = (samples_dir / GOOD).read_bytes()
    n = len(data)
    keep = {
        "half": n // 2,
        "minus10": n - 10,
        "minus1": n - 1,
        "minus22": n - 22,  # exactly the end-of-central-directory record gone
        "first64": 64,
        "third": n // 3,
    }[cut]
    p = tmp_path / "model.pt"
    p.write_bytes(data[:keep])
    err = expect_error(p)
    assert "truncated" in err.message or "corrupt" in err.message, err.message


def _data_pkl_span(path: Path) -> tuple[int, int]:
    """Where data.pkl's bytes lie in the file (after its local header)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data.pkl"))
    raw = path.read_bytes()
    h = info.header_offset
    name_len = int.from_bytes(raw[h + 26 : h + 28], "little")
    extra_len = int.from_bytes(raw[h + 28 : h + 30], "little")
    start = h + 30 + name_len + extra_len
    return start, start + info.compress_size


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_corrupted_zip_crc(samples_dir: Path, tmp_path: Path, where: str) -> None:
    src = samples_dir / GOOD
    start, end = _data_pkl_span(src)
    at = {"start": start + 2, "middle": (start + end) // 2, "end": end - 2}[where]
    data = bytearray(src.read_bytes())
    data[at] ^= 0xFF
    data[at + 1] ^= 0x5A
    p = tmp_path / "model.pt"
    p.write_bytes(bytes(data))
    expect_error(p, "crc", "data.pkl")


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x01 not a pickle \xff" * 4,
        bytes(range(256)),
        b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01",  # a pickle that stops half way
        b"\x80\x02K\x01K\x02\x93.",  # STACK_GLOBAL on integers
        b"\x80\x02h\x07.",  # BINGET of a memo entry that was never PUT
        b".",  # STOP on an empty stack
    ],
    ids=["binary", "all-bytes", "cut-short", "stack-global-ints", "missing-memo", "empty-stop"],
)
def test_corrupted_pickle_in_valid_zip(samples_dir: Path, tmp_path: Path, garbage: bytes) -> None:
    p = tmp_path / "model.pt"
    rewrite_zip(samples_dir / GOOD, p, lambda name, data: garbage if name.endswith("/data.pkl") else data)
    with zipfile.ZipFile(p) as z:
        assert z.testzip() is None  # the zip itself is sound; only the pickle is bad
    expect_error(p, "pickle")


def test_storage_shorter_than_claimed(samples_dir: Path, tmp_path: Path) -> None:
    src = samples_dir / GOOD
    with zipfile.ZipFile(src) as z:
        root = next(n for n in z.namelist() if n.endswith("/data.pkl")).split("/")[0]
        victim = f"{root}/data/3"
        full = len(z.read(victim))
    p = tmp_path / "model.pt"
    rewrite_zip(src, p, lambda name, data: data[: len(data) // 2] if name == victim else data)
    err = expect_error(p, "data/3", "claims")
    assert str(full) in err.message and str(full // 2) in err.message, err.message


def test_storage_member_missing(samples_dir: Path, tmp_path: Path) -> None:
    src = samples_dir / GOOD
    p = tmp_path / "model.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(p, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith("/data/0"):
                zout.writestr(info.filename, zin.read(info.filename))
    expect_error(p, "data/0")


def test_truncated_legacy_torch_format(tmp_path: Path) -> None:
    p = tmp_path / "old.pt"
    torch.save({"w": torch.zeros(3)}, p, _use_new_zipfile_serialization=False)
    p.write_bytes(p.read_bytes()[:-5])  # legacy files are read (tests/test_legacy.py); a cut one is refused
    expect_error(p, "truncated")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_pickle(tmp_path: Path, protocol: int) -> None:
    p = tmp_path / "model.pt"
    with open(p, "wb") as f:
        pickle.dump({"weight": [1.0, 2.0], "epoch": 3}, f, protocol=protocol)
    err = expect_error(p)
    if protocol >= 2:  # protocols 0 and 1 have no PROTO opcode to recognise them by
        assert isinstance(err, UnsupportedFormatError)
        assert "pickle" in err.message


# ------------------------------------------------------------------------------------ the hostile sample


def test_malicious_sample_is_reported_not_run(
    samples_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    report = statecli.open_checkpoint(samples_dir / MALICIOUS)
    dangerous = [f for f in report.findings if f.level == "dangerous"]
    assert dangerous, report.findings
    assert any("posix.system" in f.message or "os.system" in f.message for f in dangerous), dangerous
    assert not (tmp_path / MARKER).exists()
    assert list(tmp_path.iterdir()) == []
    assert [t.name for t in report.tensors] == ["weight"]
    assert "payload" in report.container.other_keys


def test_malicious_sample_triggers_no_audit_events(samples_dir: Path, tmp_path: Path) -> None:
    result = audited_open(samples_dir / MALICIOUS, samples_dir / GOOD, tmp_path)
    assert result["events"] == [], result["events"]
    assert "dangerous" in result["levels"]
    assert not (tmp_path / MARKER).exists()
    assert list(tmp_path.iterdir()) == []


def test_member_names_that_differ_only_in_case_are_refused(tmp_path: Path) -> None:
    # torch finds records case-insensitively: a second `Data/0` could be the bytes torch loads instead.
    src = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(2)}, src)
    p = tmp_path / "twins.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(p, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
            if info.filename.endswith("/data/0"):
                zout.writestr(info.filename.replace("/data/0", "/DATA/0"), b"\x00" * 8)
    expect_error(p, "without regard to case")
