"""Bad inputs through the real command, end to end: one stderr line naming the file, the exit code, no
traceback, nothing on stdout, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from subproc import checkout_env


def statecli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = checkout_env(NO_COLOR="1")  # this checkout, not whichever statecli is installed
    return subprocess.run(
        [sys.executable, "-m", "statecli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=60
    )


def make_bad(tmp: Path, kind: str) -> Path:
    if kind == "missing":
        return tmp / "nope.pt"
    if kind == "empty-folder":
        (tmp / "run").mkdir()
        (tmp / "run" / "notes.txt").write_text("hello\n")
        return tmp / "run"
    p = tmp / f"{kind}.pt"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "lfs":
        p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 1234\n")
    elif kind == "text":
        p.write_text("this is not a checkpoint\n")
    elif kind in ("truncated", "corrupt"):
        torch.save({"w": torch.ones(64)}, p)
        data = bytearray(p.read_bytes())
        if kind == "truncated":
            data = data[: len(data) // 2]
        else:
            with zipfile.ZipFile(p) as zf:
                info = zf.getinfo(f"{p.stem}/data.pkl")
            start = info.header_offset + 30 + len(info.filename) + len(info.extra)
            at = start + info.file_size // 2  # the middle of the pickle's bytes
            data[at : at + 4] = b"\xff\xff\xff\xff"
        p.write_bytes(bytes(data))
    elif kind == "legacy":
        torch.save({"w": torch.ones(2)}, p, _use_new_zipfile_serialization=False)
        p.write_bytes(p.read_bytes()[:-3])
    return p


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("missing", "no such file"),
        ("empty-folder", "holds no checkpoint"),
        ("empty", "empty file"),
        ("lfs", "Git LFS pointer"),
        ("text", "text file"),
        ("truncated", "zip"),
        ("corrupt", "corrupt"),
        ("legacy", "runs past the end of the file (truncated)"),
    ],
)
def test_bad_input_exit_3_one_line(tmp_path: Path, kind: str, words: str) -> None:
    path = make_bad(tmp_path, kind)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = statecli("inspect", str(path), cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(f"statecli: error: {path}: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert words in result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_debug_shows_a_traceback_for_a_bad_file(tmp_path: Path) -> None:
    path = make_bad(tmp_path, "text")
    result = statecli("--debug", "inspect", str(path), cwd=tmp_path)
    assert result.returncode == 3
    assert "Traceback" in result.stderr and "InputError" in result.stderr


def test_shard_outside_the_folder_is_refused_as_unsafe(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"w": "../secret.safetensors"}}))
    result = statecli("inspect", str(tmp_path / "ckpt"), cwd=tmp_path)
    assert result.returncode == 5
    assert "leaves the checkpoint folder" in result.stderr and "Traceback" not in result.stderr


def test_malicious_sample_runs_nothing(tmp_path: Path, samples_dir: Path) -> None:
    for fmt in ("table", "json"):
        result = statecli("inspect", str(samples_dir / "malicious_os_system.pt"), "-f", fmt, cwd=tmp_path)
        assert result.returncode == 0
        assert "dangerous" in result.stdout.lower() or fmt == "table"
        assert "posix.system" in result.stderr
    assert not (tmp_path / "statecli_pwned_marker").exists()
    assert list(tmp_path.iterdir()) == []


def test_bin_shards_with_an_index(tmp_path: Path) -> None:
    torch.save({"a.weight": torch.ones(2, 2), "bn.running_mean": torch.zeros(2)}, tmp_path / "pytorch_model-1.bin")
    torch.save({"b.weight": torch.ones(3)}, tmp_path / "pytorch_model-2.bin")
    weight_map = {
        "a.weight": "pytorch_model-1.bin",
        "bn.running_mean": "pytorch_model-1.bin",
        "b.weight": "pytorch_model-2.bin",
    }
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    result = statecli("inspect", str(tmp_path), "-f", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["format"] == "sharded-torch-zip"
    by = {t["name"]: t for t in data["tensors"]}
    assert list(by) == ["a.weight", "bn.running_mean", "b.weight"]
    assert by["bn.running_mean"]["role"] == "buffer" and by["b.weight"]["file"] == "pytorch_model-2.bin"
    assert by["a.weight"]["device"] == "cpu"


def test_an_index_whose_ninth_byte_is_a_brace_is_still_an_index(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "a.bin")
    # Byte 8 of this text is "{", which is what marks a safetensors header: the .json name must win.
    (tmp_path / "x.index.json").write_text('{"m":   {}, "weight_map": {"w": "a.bin"}}')
    result = statecli("inspect", str(tmp_path / "x.index.json"), "-f", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["format"] == "sharded-torch-zip"


# --- a file that exists but cannot be read (#13, item 2) ----------------------------------------------


def _as_nobody(argv: list[str], cwd: str) -> subprocess.CompletedProcess[bytes] | None:
    """``statecli argv`` run as user nobody (root can read every file); None where that cannot be done."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        return None
    drop = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
    env = checkout_env()
    if subprocess.run([*drop, "-c", "import statecli"], env=env, cwd=cwd, capture_output=True).returncode:
        return None  # the interpreter or the checkout is not readable by nobody here
    return subprocess.run([*drop, "-m", "statecli", *argv], env=env, cwd=cwd, capture_output=True, timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["table", "json", "junit", "github"])
def test_a_file_that_cannot_be_read_is_exit_3_and_in_the_report(samples_dir: Path, fmt: str) -> None:
    # Typer's own readable check answered exit 2 ("Invalid value for 'PATH...'") and dropped the report.
    folder = tempfile.mkdtemp(prefix="statecli-perm-")
    try:
        os.chmod(folder, 0o755)
        locked = os.path.join(folder, "locked.safetensors")
        shutil.copy(samples_dir / "cnn_bn.safetensors", locked)
        os.chmod(locked, 0)
        proc = _as_nobody(["check", locked, "--no-policy", "-f", fmt], folder)
        if proc is None:
            pytest.skip("needs root and setpriv to run statecli as a user who cannot read the file")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert proc.returncode == 3
    assert proc.stderr.decode() == f"statecli: error: {locked}: cannot read (Permission denied)\n"
    out = proc.stdout.decode()
    if fmt == "table":
        assert out == ""
    else:
        assert "cannot read (Permission denied)" in out


# --- shell completion (#13, item 4) -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("statecli inspect x.pt --dtype bf", ["bfloat16", "bf16"]),
        ("statecli convert a.pt -o b.pt --dtype fp", ["fp16", "fp32", "fp64"]),
        ("statecli check a.pt --dtype int6", ["int64"]),
        ("statecli inspect x.pt --format ", ["table", "json", "csv", "markdown"]),
        ("statecli stats x.pt --role p", ["parameter"]),
    ],
)
def test_completion_offers_the_choices(words: str, expected: list[str]) -> None:
    env = checkout_env(_STATECLI_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(len(words.split(" ")) - 1))
    proc = subprocess.run([sys.executable, "-m", "statecli"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.split() == expected


@pytest.mark.slow
def test_completion_installs_and_falls_back_to_file_names_for_paths() -> None:
    env = checkout_env(_STATECLI_COMPLETE="source_bash")
    proc = subprocess.run([sys.executable, "-m", "statecli"], env=env, capture_output=True, text=True, timeout=60)
    # A PATH argument offers no words of its own: `-o default` lets bash complete file names there.
    assert "complete -o default -F _statecli_completion statecli" in proc.stdout
    help_text = subprocess.run(
        [sys.executable, "-m", "statecli", "--help"], env=checkout_env(), capture_output=True, text=True, timeout=60
    ).stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text
