"""``statecli convert`` as a user runs it: exit codes, messages on stderr, data on stdout, and what is on
disk afterwards (nothing, for every failure). Crashes are real processes: killed, or out of file size."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from clirun import run_cli
from subproc import checkout_env

import statecli

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
CNN = str(SAMPLES / "cnn_bn_state_dict.pt")


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_convert_prints_a_summary_line_on_stderr_and_writes(tmp_path: Path) -> None:
    code, out, err = run_cli("convert", CNN, "-o", str(tmp_path / "a.safetensors"), "--dtype", "bf16")
    assert code == 0, err
    assert out == ""  # the summary is a message: stdout carries data only
    assert err.startswith(f"wrote {tmp_path / 'a.safetensors'}: 16 tensors (14 cast to bfloat16)")
    assert err.rstrip("\n").endswith("; names, shapes, dtypes and roles checked")
    assert listing(tmp_path) == ["a.safetensors"]


def test_quiet_convert_prints_nothing(tmp_path: Path) -> None:
    code, out, err = run_cli("convert", CNN, "-o", str(tmp_path / "a.safetensors"), "-q")
    assert code == 0, err
    assert (out, err) == ("", "")
    assert listing(tmp_path) == ["a.safetensors"]


@pytest.mark.slow
def test_stdout_of_a_real_process_stays_empty(tmp_path: Path) -> None:
    # What a user's `statecli convert ... > out` keeps: no summary line in the file.
    proc = subprocess.run(
        [sys.executable, "-m", "statecli", "convert", CNN, "-o", str(tmp_path / "x.safetensors")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=checkout_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"wrote {tmp_path / 'x.safetensors'}: 16 tensors, ")


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path) -> None:
    out_path = tmp_path / "a.pt"
    code, out, err = run_cli("convert", CNN, "-o", str(out_path), "--dtype", "fp16", "--keep-buffers", "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{CNN} → {out_path} (torch)"
    assert lines[1].split() == ["Name", "Role", "From", "To", "Shape", "Size", "Device", "Why"]
    mean = next(line for line in lines if line.startswith("bn1.running_mean"))
    assert "buffer: --keep-buffers" in mean and " = " in mean
    nbt = next(line for line in lines if line.startswith("bn1.num_batches_tracked"))
    assert "int64 is not floating: never changes" in nbt
    w = next(line for line in lines if line.startswith("conv1.weight"))
    assert "float32  float16" in w and "float32 → float16" in w
    assert lines[-1].startswith("fc.bias")  # the plan is all of stdout
    assert "written" not in out
    assert (
        err
        == f"would write {out_path}: the whole checkpoint, 16 tensors (10 cast to float16); nothing written (dry run)\n"
    )
    assert listing(tmp_path) == []


def test_dry_run_never_says_tensors_were_written(tmp_path: Path) -> None:
    code, out, err = run_cli("convert", CNN, "-o", str(tmp_path / "a.safetensors"), "-n")
    assert code == 0, err
    assert err == f"would write {tmp_path / 'a.safetensors'}: 16 tensors; nothing written (dry run)\n"
    code, out, err = run_cli("convert", CNN, "-o", str(tmp_path / "a.safetensors"), "-n", "-q")
    assert code == 0, err
    assert err == ""  # -q: no summary, as after a real run
    assert "written" not in out and out.splitlines()[-1].startswith("fc.bias")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_what_is_left_out_is_the_same_note_on_stderr_with_or_without_dry_run(tmp_path: Path, fmt: str) -> None:
    src = str(SAMPLES / "training_adam.pt")
    dst = str(tmp_path / "a.safetensors")
    note = "statecli: note: 30 tensors left out: optimizer state\n"
    code, dry_out, dry_err = run_cli("convert", src, "-o", dst, "-n", "-f", fmt)
    assert code == 0, dry_err
    assert "left out" not in dry_out or fmt == "json"  # the JSON plan lists them under "dropped": data
    assert note in dry_err
    assert listing(tmp_path) == []
    code, real_out, real_err = run_cli("convert", src, "-o", dst, "-f", fmt)
    assert code == 0, real_err
    assert note in real_err
    assert "statecli: note:" not in real_out
    if fmt == "json":
        assert json.loads(dry_out)["schema"] == "statecli.plan/1"
        assert json.loads(real_out)["schema"] == "statecli.conversion/1"


def test_torchscript_attribute_left_out_is_named_on_stderr(tmp_path: Path) -> None:
    dst = tmp_path / "ts.safetensors"
    code, out, err = run_cli("convert", str(SAMPLES / "torchscript_frozen.pt"), "-o", str(dst))
    assert code == 0, err
    assert out == ""
    assert err.splitlines() == [
        "statecli: note: 1 tensor left out (anchor): plain tensor attribute of a module: not in its state_dict()",
        err.splitlines()[-1],
    ]
    assert err.splitlines()[-1].startswith(f"wrote {dst}: 8 tensors, ")


def test_dry_run_json_is_the_plan(tmp_path: Path) -> None:
    code, out, _ = run_cli(
        "convert", str(SAMPLES / "training_adam.pt"), "-o", str(tmp_path / "a.pt"), "-n", "-f", "json"
    )
    assert code == 0
    doc = json.loads(out)
    assert doc["schema"] == "statecli.plan/1"
    assert doc["output_format"] == "torch"
    assert doc["whole_checkpoint"] is True  # a .pt to a .pt: optimizer state and all
    assert len(doc["tensors"]) == 46 and doc["dropped"] == []
    code, out, _ = run_cli(
        "convert", str(SAMPLES / "training_adam.pt"), "-o", str(tmp_path / "a.pt"), "-n", "-f", "json", "--state-dict"
    )
    doc = json.loads(out)
    assert doc["whole_checkpoint"] is False and len(doc["tensors"]) == 16
    assert {d["reason"] for d in doc["dropped"]} == {"optimizer state"}
    assert listing(tmp_path) == []


def test_json_after_converting_has_the_counts(tmp_path: Path) -> None:
    torch.save({"t": torch.tensor([1e-10, 1.0, 7e4])}, tmp_path / "r.pt")
    code, out, err = run_cli(
        "convert", str(tmp_path / "r.pt"), "-o", str(tmp_path / "o.pt"), "--dtype", "fp16", "--allow-overflow", "-f",
        "json",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == "statecli.conversion/1"
    (t,) = doc["tensors"]
    assert (t["overflow"], t["underflow"], t["nonfinite"]) == (1, 1, 0)
    assert "statecli: warning: t: 1 value became ±inf in float16" in err
    assert "statecli: warning: t: 1 non-zero values became zero in float16" in err


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--dtype", "bf17"], 2, "unknown dtype 'bf17'"),
        (["--dtype", "int8"], 2, "cannot convert to int8: only floating tensors change dtype"),
        (["--device", "tpu"], 2, "unknown device 'tpu' (use cpu, cuda, cuda:N or meta)"),
        (["--select", "ema"], 2, "--select 'ema' names no tensors"),
        (["--max-shard-size", "lots"], 2, "cannot read size 'lots'"),
        (["--strip-prefix", "conv1.", "--add-prefix", ""], 0, ""),
    ],
)
def test_bad_options(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    got, out, err = run_cli("convert", CNN, "-o", str(tmp_path / "o.pt"), *args)
    assert got == code, err
    assert message in err
    if code:
        assert err.startswith("statecli: error: ") and "Traceback" not in err
        assert out == ""
        assert listing(tmp_path) == []


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_an_only_glob_that_matches_nothing_exits_2_and_writes_nothing(tmp_path: Path, dry_run: list[str]) -> None:
    # The review's case: it used to write every tensor in full precision and exit 0.
    tied = str(SAMPLES / "tied_lm.pt")
    args = ["-o", str(tmp_path / "nm.pt"), "--only", "nomatch*", "--dtype", "bf16", *dry_run]
    code, out, err = run_cli("convert", tied, *args)
    assert code == 2
    assert err.startswith(f"statecli: error: --only 'nomatch*' matches no tensor in {tied}: ")
    assert "Traceback" not in err and out == ""
    assert listing(tmp_path) == []


def test_an_exclude_glob_that_matches_nothing_is_a_warning_on_stderr(tmp_path: Path) -> None:
    args = ["--exclude", "head.*", "--exclude", "*.bias", "--dtype", "fp16", "-q"]
    code, out, err = run_cli("convert", CNN, "-o", str(tmp_path / "o.pt"), *args)
    assert code == 0, err
    assert err == "statecli: warning: --exclude 'head.*' matches no tensor: it leaves nothing out\n"
    assert out == "" and listing(tmp_path) == ["o.pt"]


def test_dcp_select_accepts_the_key_it_suggests(tmp_path: Path) -> None:
    dcp = str(SAMPLES / "dcp_training")
    code, _, err = run_cli("convert", dcp, "-o", str(tmp_path / "s.pt"), "--select", "nope")
    assert code == 2
    assert err.rstrip().endswith("try one of: bn1, bn2, conv1, conv2, fc, model, optim")
    code, _, err = run_cli("convert", dcp, "-o", str(tmp_path / "s.pt"), "--select", "optim", "-q")
    assert code == 0, err
    assert err == "statecli: note: 16 tensors left out: outside --select optim\n"
    sd = torch.load(tmp_path / "s.pt", weights_only=True)
    assert len(sd) == 30 and "state.conv1.weight.exp_avg" in sd


def test_unknown_output_extension(tmp_path: Path) -> None:
    code, _, err = run_cli("convert", CNN, "-o", str(tmp_path / "o.npz"))
    assert code == 2
    assert "cannot tell the output format from" in err and ".safetensors, .pt" in err
    assert listing(tmp_path) == []


def test_overflow_exits_1_naming_tensors(tmp_path: Path) -> None:
    torch.save({"big": torch.tensor([1e6, 2e6]), "ok": torch.ones(2)}, tmp_path / "r.pt")
    code, out, err = run_cli(
        "convert", str(tmp_path / "r.pt"), "-o", str(tmp_path / "o.safetensors"), "--dtype", "fp16"
    )
    assert code == 1
    assert "1 tensor would overflow to ±inf in float16: big (2 values). Nothing was written." in err
    assert out == ""
    assert listing(tmp_path) == ["r.pt"]


def test_an_inf_that_fp8_e4m3fn_cannot_hold_is_reported_as_changed(tmp_path: Path) -> None:
    # The review's case: the note said "2 NaN/inf values in the input, kept" while torch wrote 448 for the inf.
    x = torch.tensor([1e6, 448.0, 1.0, -1e6, float("nan"), float("inf")])
    torch.save({"big": x}, tmp_path / "ovf2.pt")
    args = ["convert", str(tmp_path / "ovf2.pt"), "-o", str(tmp_path / "o8.pt"), "--dtype", "fp8"]
    code, out, err = run_cli(*args)
    assert code == 1
    assert (
        "statecli: error: 1 tensor would overflow to ±448 in float8_e4m3fn, which has no inf: "
        "big (3 values, 1 of them ±inf). Nothing was written." in err
    )
    assert out == "" and listing(tmp_path) == ["ovf2.pt"]
    code, out, err = run_cli(*args, "--allow-overflow", "-q")
    assert code == 0, err
    assert err.splitlines() == [
        "statecli: warning: big: 2 values became ±448 in float8_e4m3fn",
        "statecli: warning: big: 1 ±inf value in the input became ±448 in float8_e4m3fn, which has no inf",
        "statecli: note: big: 1 NaN value in the input, kept",
    ]
    got = torch.load(tmp_path / "o8.pt", weights_only=True)["big"]
    assert torch.equal(got.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))
    assert float(got[5]) == 448.0  # what the warning says: torch saturates the inf


@pytest.mark.parametrize(
    ("make", "code", "message"),
    [
        (lambda p: p.write_bytes(b""), 3, "empty file"),
        (lambda p: p.write_bytes(b"PK\x03\x04garbage"), 3, ""),
        (lambda p: None, 3, "no such file"),
    ],
)
def test_bad_input_files(tmp_path: Path, make: object, code: int, message: str) -> None:
    src = tmp_path / "in.pt"
    make(src)  # type: ignore[operator]
    got, _, err = run_cli("convert", str(src), "-o", str(tmp_path / "o.safetensors"))
    assert got == code
    assert message in err and "Traceback" not in err
    assert "o.safetensors" not in listing(tmp_path)


def test_output_exists_and_force(tmp_path: Path) -> None:
    (tmp_path / "o.pt").write_bytes(b"old")
    code, _, err = run_cli("convert", CNN, "-o", str(tmp_path / "o.pt"))
    assert code == 4 and "output exists; pass --force to replace it" in err
    assert (tmp_path / "o.pt").read_bytes() == b"old"
    code, _, err = run_cli("convert", CNN, "-o", str(tmp_path / "o.pt"), "--force")
    assert code == 0, err
    assert (tmp_path / "o.pt").read_bytes() != b"old"


def test_output_folder_missing(tmp_path: Path) -> None:
    code, _, err = run_cli("convert", CNN, "-o", str(tmp_path / "no" / "o.pt"))
    assert code == 4 and "does not exist" in err


def tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: links with their target, files with their bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes().hex()
    return out


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("afile/o.pt", "output folder {t}/afile is not a folder (it is a file)"),
        ("afile/o.safetensors", "output folder {t}/afile is not a folder (it is a file)"),
        ("afile/sub/o.pt", "output folder {t}/afile/sub does not exist: {t}/afile is not a folder (it is a file)"),
        ("tofile/o.pt", "output folder {t}/tofile is not a folder (it is a symbolic link to the file afile)"),
        ("dangling/o.pt", "output folder {t}/dangling is not a folder (it is a broken symbolic link to nowhere)"),
        ("nowhere/o.pt", "output folder {t}/nowhere does not exist"),
        ("dangling.pt", "output path is a broken symbolic link (to nowhere.pt); pass --force to replace the link"),
    ],
)
def test_an_output_folder_that_is_not_one_is_named(tmp_path: Path, output: str, message: str) -> None:
    (tmp_path / "afile").write_bytes(b"a file")
    (tmp_path / "tofile").symlink_to("afile")
    (tmp_path / "dangling").symlink_to("nowhere")
    (tmp_path / "dangling.pt").symlink_to("nowhere.pt")
    before = tree(tmp_path)
    code, out, err = run_cli("convert", CNN, "-o", str(tmp_path / output))
    assert (code, out) == (4, "")
    assert err == f"statecli: error: {tmp_path / output}: {message.format(t=tmp_path)}\n"
    assert tree(tmp_path) == before


def test_force_replaces_a_broken_link_not_its_target(tmp_path: Path) -> None:
    (tmp_path / "o.pt").symlink_to("nowhere.pt")
    code, _, err = run_cli("convert", CNN, "-o", str(tmp_path / "o.pt"), "--force")
    assert code == 0, err
    assert listing(tmp_path) == ["o.pt"] and not (tmp_path / "o.pt").is_symlink()
    assert list(torch.load(tmp_path / "o.pt")) == list(torch.load(CNN))


def test_onto_the_input_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "m.pt"
    src.write_bytes(Path(CNN).read_bytes())
    code, _, err = run_cli("convert", str(src), "-o", str(src), "--force", "--dtype", "fp16")
    assert code == 4 and "refusing to convert onto the input file" in err
    assert src.read_bytes() == Path(CNN).read_bytes()


def test_dangerous_input_is_named_and_its_code_never_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the payload would touch statecli_pwned_marker here
    code, _, err = run_cli("convert", str(SAMPLES / "malicious_os_system.pt"), "-o", str(tmp_path / "m.safetensors"))
    assert code == 0, err
    assert "pickle would call posix.system" in err and "(dangerous-global)" in err
    assert listing(tmp_path) == ["m.safetensors"]


def test_help_names_the_options() -> None:
    code, out, _ = run_cli("convert", "--help")
    assert code == 0
    for opt in ("--dtype", "--device", "--keep-buffers", "--only", "--exclude", "--allow-overflow", "--select",
                "--strip-prefix", "--add-prefix", "--max-shard-size", "--force", "--verify", "--dry-run"):  # fmt: skip
        assert opt in out


# ----------------------------------------------------------------------------------------------- real crashes

_CHILD = textwrap.dedent(
    """
    import os, resource, signal, sys
    import statecli

    mode, src, dst = sys.argv[1:4]
    if mode == "fsize":
        limit = int(sys.argv[4])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        from statecli.cli.main import main
        sys.argv = ["statecli", "convert", src, "-o", dst]
        main()
    else:
        def die(done, tensors):
            if tensors >= 2:
                os.kill(os.getpid(), signal.SIGKILL)
        statecli.convert(src, dst, progress=die)
    """
)


@pytest.fixture
def big_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("big")
    path = folder / "big.pt"
    torch.save({f"w{i}": torch.full((256, 1024), float(i)) for i in range(6)}, path)  # 6 MiB
    return path


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_killed_process_leaves_no_file_at_all(tmp_path: Path, big_checkpoint: Path, suffix: str) -> None:
    dst = tmp_path / f"out{suffix}"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, "kill", str(big_checkpoint), str(dst)], capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert listing(tmp_path) == []  # not even a temporary name: the file was anonymous


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_file_size_limit_is_exit_4_and_leaves_nothing(tmp_path: Path, big_checkpoint: Path, suffix: str) -> None:
    dst = tmp_path / f"out{suffix}"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, "fsize", str(big_checkpoint), str(dst), str(1 << 20)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 4, proc.stderr
    assert "file size limit reached" in proc.stderr and "nothing was written" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert listing(tmp_path) == []


def test_shards_under_a_file_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_bytes(b"x")
    code, out, err = run_cli("convert", CNN, "-o", str(tmp_path / "afile" / "out") + "/", "--max-shard-size", "4KB")
    assert code == 4 and out == ""
    assert f"output folder {tmp_path / 'afile'} is not a folder (it is a file)" in err
    assert listing(tmp_path) == ["afile"]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_key_that_is_the_empty_string_converts_as_itself(tmp_path: Path, suffix: str) -> None:
    src = tmp_path / "e.pt"
    torch.save({"": torch.ones(2), "w": torch.zeros(1)}, src)
    dst = tmp_path / f"out{suffix}"
    code, _, err = run_cli("convert", str(src), "-o", str(dst), "-q")
    assert code == 0, err
    if suffix == ".pt":
        assert list(torch.load(dst, weights_only=True)) == ["", "w"]
    else:
        from safetensors.torch import load_file

        assert sorted(load_file(dst)) == ["", "w"]


# --- ties in safetensors (#13, item 3) ------------------------------------------------------------------


def test_a_tie_written_to_safetensors_is_named_on_stderr(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "lm.safetensors"
    code, _, err = run_cli("convert", str(SAMPLES / "tied_lm.pt"), "-o", str(out))
    assert code == 0
    assert "lm_head.weight shares memory with embed.weight and is stored once" in err
    assert "statecli.load restores it" in err and "--untie" in err
    assert "lm_head.weight" not in load_file(out)  # what the warning is about


def test_untie_writes_every_name_for_every_loader(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "lm.safetensors"
    code, _, err = run_cli("convert", str(SAMPLES / "tied_lm.pt"), "-o", str(out), "--untie")
    assert code == 0 and "tied-names" not in err and "shares memory" not in err
    got = load_file(out)
    want = torch.load(SAMPLES / "tied_lm.pt", weights_only=True)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert statecli.open_checkpoint(out).metadata.get("statecli", "").count("aliases") == 0


def test_untie_is_refused_for_a_pt_output(tmp_path: Path) -> None:
    code, _, err = run_cli("convert", str(SAMPLES / "tied_lm.pt"), "-o", str(tmp_path / "lm.pt"), "--untie")
    assert code == 2 and "--untie is for safetensors output" in err
    assert not (tmp_path / "lm.pt").exists()


@pytest.mark.slow
def test_the_closing_line_times_the_conversion_and_says_the_torch_import_apart(tmp_path: Path) -> None:
    # The closing line timed torch's import too, and read as the time the write took.
    out = tmp_path / "a.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "statecli", "convert", CNN, "-o", str(out), "--dtype", "bf16"],
        env=checkout_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"wrote {re.escape(str(out))}: 16 tensors \(14 cast to bfloat16\), 3\.3 KiB in \d+\.\d s "
        r"\(torch import \d+\.\d s\); names, shapes, dtypes and roles checked",
        line,
    ), line
