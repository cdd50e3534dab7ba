"""Bounded everywhere (issue #11): one clipped formatter for file-borne values, regular files only, linear
regexes over file text, capped findings. The hostile files for these live in tests/hostile/cases_bounded.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from statecli import clip, safepickle
from statecli.clip import describe, describe_name, quote
from statecli.safepickle import Global, StorageRef, Stub, TensorRef, fastpath


def _dag(depth: int = 64) -> Any:
    v: Any = None
    for _ in range(depth):
        v = [v, (v, v)]
    return v


def _deep(depth: int = 10**6) -> Any:
    v: Any = ()
    for _ in range(depth):
        v = (v,)
    return v


HOSTILE_VALUES = {
    "dag": _dag(),
    "deep": _deep(),
    "deep_list": [[[[[[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]]]]],
    "long_text": "x" * 10**7,
    "long_escapes": "\x1b" * 10**6,
    "long_bytes": b"y" * 10**6,
    "big_int": 7**5000,
    "big_dict": {i: i for i in range(10**5)},
    "big_set": frozenset(range(10**5)),
    "dict_of_dags": {(1, 2): _dag(), "k": {"k": _deep(1000)}},
    "stub": Stub(Global("os", "system" * 1000), ("touch x",), "reduce"),
    "tensor": TensorRef(None, 0, (1,), (1,), "float32", None),
    "storage": StorageRef("k" * 10**6, "float32", "cpu", 1, 4),
    "object": object(),
}


@pytest.mark.parametrize("name", list(HOSTILE_VALUES))
def test_describe_is_bounded_whatever_it_is_given(name: str) -> None:
    text = describe(HOSTILE_VALUES[name])
    assert len(text) <= clip.LIMIT
    assert text.isprintable(), text


@pytest.mark.parametrize("limit", [1, 5, 40, 1000])
def test_describe_keeps_to_any_limit(limit: int) -> None:
    for v in HOSTILE_VALUES.values():
        assert len(describe(v, limit=limit)) <= limit


def test_describe_reads_like_repr_for_small_values() -> None:
    small = [1, "a", (2,), {"k": None}, b"\x00", 2.5, True]
    assert describe(small) == repr(small)
    assert describe(set()) == "set()" and describe(frozenset()) == "frozenset()" and describe(()) == "()"
    assert describe(list(range(20))) == "[0, 1, 2, 3, 4, 5, 6, 7, … (20 items)]"
    assert describe(Global("torch", "float32")) == "torch.float32"
    assert describe(Stub(Global("os", "system"), (), "reduce")) == "<result of os.system>"
    assert describe(2**200) == "<201-bit integer>"
    assert describe("a\x1b[2Kb") == "'a\\x1b[2Kb'"


def test_names_are_clipped_before_they_are_escaped() -> None:
    assert describe_name("\x1b" * 10**6, 10) == "\\x1b" * 9 + "…"
    assert quote("a" * 1000, 10) == repr("a" * 9) + "…"
    assert quote("a'b") == repr("a'b")
    assert describe_name(("not", "a", "str")) == "('not', 'a', 'str')"


def test_safepickle_re_exports_the_one_formatter() -> None:
    assert safepickle.describe is clip.describe
    assert safepickle.describe_name is clip.describe_name


# ----------------------------------------------------------------------------- values in readers' messages

from cases_bounded import (  # noqa: E402
    _bytes_entry,
    _one_tensor,
    dag,
    dag_list,
    dcp_folder,
    module,
    size,
    storage,
    tensor_md,
    torchscript,
)
from make_hostile import Asm  # noqa: E402

from statecli.errors import StatecliError  # noqa: E402
from statecli.formats import read_raw  # noqa: E402

MAX_MESSAGE = 1000  # one line of a message: path, context, a clipped value or two


def _tuple_deep(a: Asm) -> Asm:
    # 100 times deeper than repr() goes; the formatter itself is tested on 10 ** 6 levels above (reading a
    # million opcodes here would take most of a second per test).
    return a.op("EMPTY_TUPLE").raw(b"\x85" * 10**5)  # TUPLE1


BIG = {"dag": dag, "dag_list": dag_list, "deep": _tuple_deep}


def _as_list(w: Any) -> Any:
    return lambda a: w(a.op("MARK")).op("LIST")


def _refused(path: Path, *words: str) -> str:
    with pytest.raises(StatecliError) as e:
        read_raw(str(path))
    message = str(e.value)
    assert len(message) < MAX_MESSAGE + len(str(path)), message[:2000]
    assert message.isprintable()
    for w in words:
        assert w in message, message
    return message


@pytest.mark.parametrize("value", list(BIG))
@pytest.mark.parametrize("slot", ["dims", "offsets", "sizes"])
def test_dcp_sizes_that_are_not_sizes_are_named_in_few_characters(tmp_path: Path, slot: str, value: str) -> None:
    folder = _one_tensor(tmp_path, **{slot: _as_list(BIG[value])})
    _refused(folder, "impossible value")


@pytest.mark.parametrize("value", list(BIG))
@pytest.mark.parametrize("field", ["offset", "length"])
def test_dcp_spans_that_are_not_numbers_are_named_in_few_characters(tmp_path: Path, field: str, value: str) -> None:
    start = BIG[value] if field == "offset" else (lambda a: a.int_(0))
    length = BIG[value] if field == "length" else (lambda a: a.int_(16))
    folder = dcp_folder(tmp_path, [("w", tensor_md())], [storage("w", size(0), "__0_0.distcp", start, length)])
    _refused(folder, f"impossible {field}")


def test_dcp_messages_clip_a_long_key(tmp_path: Path) -> None:
    folder = dcp_folder(tmp_path, [("k" * 10**6, tensor_md(dims=lambda a: a.str_("no")))], [])
    _refused(folder, "'kkkk", "…")


@pytest.mark.parametrize("value", list(BIG))
@pytest.mark.parametrize("where", ["pid", "key"])
def test_dcp_bytes_entries_with_odd_storages_are_unscanned_in_few_characters(
    tmp_path: Path, where: str, value: str
) -> None:
    a = Asm()
    if where == "pid":
        BIG[value](a)
    else:
        a.op("MARK").str_("storage").global_("torch", "FloatStorage")
        BIG[value](a).str_("cpu").int_(4).op("TUPLE")
    folder = _bytes_entry(tmp_path, a.op("BINPERSID").op("STOP").getvalue())
    raw = read_raw(str(folder))
    unscanned = [f for f in raw.findings if f.code == "unscanned-entry"]
    assert unscanned and "unexpected persistent id" in unscanned[0].message
    assert len(unscanned[0].message) < MAX_MESSAGE


@pytest.mark.parametrize("value", list(BIG))
def test_torchscript_traced_inputs_with_odd_storages_are_refused_in_few_characters(tmp_path: Path, value: str) -> None:
    path = torchscript(tmp_path, module(), traced=BIG[value](Asm()).op("BINPERSID").op("STOP").getvalue())
    _refused(path, "traced_inputs.pkl", "unexpected persistent id")


@pytest.mark.parametrize("value", list(BIG))
def test_legacy_version_that_is_not_a_number_is_named_in_few_characters(tmp_path: Path, value: str) -> None:
    path = tmp_path / "legacy.pt"
    path.write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19." + BIG[value](Asm()).op("STOP").getvalue())
    _refused(path, "legacy torch protocol")


# ----------------------------------------------------------------------------------------- capped findings

from statecli.records import MAX_FINDINGS_PER_CODE, Finding, FindingCap, cap_findings, is_summary  # noqa: E402


def test_findings_are_capped_per_code_and_counted() -> None:
    many = [Finding("info", "odd", f"tensor {i} is odd") for i in range(10**5)]
    out = cap_findings([*many, Finding("dangerous", "odd", "one is dangerous"), Finding("warning", "other", "x")])
    odd = [f for f in out if f.code == "odd"]
    assert len(odd) == MAX_FINDINGS_PER_CODE + 1
    assert odd[-1] == Finding("dangerous", "odd", "99,901 more odd findings not listed")  # the worst level it hides
    assert [f.message for f in out if f.code == "other"] == ["x"]


def test_a_capped_list_capped_again_keeps_its_count() -> None:
    once = cap_findings([Finding("info", "odd", str(i)) for i in range(250)])
    twice = cap_findings([*once, *(Finding("info", "odd", "more") for _ in range(10))])
    assert [f.message for f in twice if is_summary(f)] == ["160 more odd findings not listed"]


def test_findings_are_capped_in_all_most_severe_first() -> None:
    findings = [Finding("info", f"c{c}", "m") for c in range(30) for _ in range(100)]
    findings.append(Finding("dangerous", "bad", "kept whatever comes before it"))
    out = cap_findings(findings, total=1000)
    assert len(out) <= 1000 + 30
    assert Finding("dangerous", "bad", "kept whatever comes before it") in out
    assert sum(int(f.message.split()[0].replace(",", "")) for f in out if is_summary(f)) == 3000 - 999


def test_a_full_code_is_counted_without_its_message() -> None:
    cap = FindingCap(per_code=2)
    for i in range(5):
        if cap.full("odd"):
            cap.count("odd", "warning")
        else:
            cap.add(Finding("info", "odd", str(i)))
    assert [f.message for f in cap.findings()] == ["0", "1", "3 more odd findings not listed"]
    assert cap.findings()[-1].level == "warning"


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("findings_flood_unknown_globals", "unknown-global"),
        ("findings_flood_unindexed_tensors", "unindexed-tensor"),
        ("findings_flood_torchscript_shared", "shared-subtree"),
    ],
)
def test_a_flood_of_findings_is_a_hundred_and_a_count(tmp_path: Path, case: str, code: str) -> None:
    from make_hostile import build

    import statecli

    report = statecli.open_checkpoint(build(case, tmp_path).path)
    of_code = [f for f in report.findings if f.code == code]
    assert len(of_code) == MAX_FINDINGS_PER_CODE + 1
    assert is_summary(of_code[-1])


def test_dcp_chunk_whose_storage_location_is_a_dag_is_refused_when_values_are_read(tmp_path: Path) -> None:
    import io

    from make_hostile import torch_zip

    from statecli import open_checkpoint
    from statecli.stats import compute

    a = Asm().global_("torch._utils", "_rebuild_tensor_v2").op("MARK")
    a.op("MARK").str_("storage").global_("torch", "FloatStorage").str_("0")
    dag(a).int_(4).op("TUPLE").op("BINPERSID")  # the storage's location: a 2 ** 64-leaf DAG
    a.int_(0).ints((4,)).ints((1,)).op("NEWFALSE").op("EMPTY_DICT").op("TUPLE").op("REDUCE").op("STOP")
    chunk = torch_zip(io.BytesIO(), a.getvalue()).getvalue()  # type: ignore[arg-type]
    folder = dcp_folder(
        tmp_path,
        [("w", tensor_md())],
        [storage("w", size(0), "__0_0.distcp", lambda a: a.int_(0), lambda a: a.int_(len(chunk)))],
        chunk,
    )
    with pytest.raises(StatecliError, match="malformed storage record"):
        compute(open_checkpoint(folder))


# ------------------------------------------------------------------------------------ regular files only

import os  # noqa: E402
import subprocess  # noqa: E402

from subproc import checkout_env  # noqa: E402

from statecli.errors import InputError  # noqa: E402
from statecli.files import open_regular  # noqa: E402

fifo_only = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
SAMPLE = Path(__file__).resolve().parent.parent / "sample_models" / "tied_lm.pt"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """A real process, with a timeout: a file statecli waits on must fail the test, not hang the suite."""
    cmd = [sys.executable, "-m", "statecli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=checkout_env(NO_COLOR="1"), timeout=30)


@fifo_only
def test_open_regular_refuses_a_fifo_without_waiting_for_a_writer(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "f")
    with pytest.raises(InputError, match=r"is a FIFO, not a regular file"):
        open_regular(str(tmp_path / "f"))


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_open_regular_refuses_a_device_and_a_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"is a character device, not a regular file"):
        open_regular("/dev/zero")
    with pytest.raises(InputError, match=r"is a directory, not a regular file"):
        open_regular(str(tmp_path))


@pytest.mark.skipif(not hasattr(os, "mkfifo") or sys.platform == "win32", reason="no UNIX sockets here")
def test_open_regular_names_a_socket(tmp_path: Path) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "s"))
        with pytest.raises(InputError, match=r"is a socket, not a regular file"):
            open_regular(str(tmp_path / "s"))


def test_open_regular_reads_a_regular_file_in_blocking_mode(tmp_path: Path) -> None:
    (tmp_path / "r").write_bytes(b"abc")
    with open_regular(str(tmp_path / "r")) as f:
        assert f.read() == b"abc"
        if hasattr(os, "get_blocking"):
            assert os.get_blocking(f.fileno())


@fifo_only
@pytest.mark.parametrize(
    ("option", "name"), [("--policy", "statecli.toml"), ("--schema", "model.schema.json"), ("--reference", "ref.pt")]
)
def test_check_refuses_a_fifo_given_as_a_file_option(tmp_path: Path, option: str, name: str) -> None:
    os.mkfifo(tmp_path / name)
    r = _cli("check", str(SAMPLE), option, str(tmp_path / name))
    assert r.returncode == 3, r.stderr
    assert r.stderr == f"statecli: error: {tmp_path / name}: is a FIFO, not a regular file\n"


@pytest.mark.slow
@fifo_only
@pytest.mark.parametrize("case", ["dcp_metadata_fifo", "index_shard_fifo"])
@pytest.mark.parametrize("command", ["stats", "diff", "convert"])  # inspect and check: tests/test_hostile.py
def test_every_command_refuses_a_fifo_in_a_checkpoint(tmp_path: Path, case: str, command: str) -> None:
    from make_hostile import build

    path = str(build(case, tmp_path).path)
    args = {"diff": [path, str(SAMPLE)], "convert": [path, "-o", str(tmp_path / "out.safetensors")]}.get(
        command, [path]
    )
    r = _cli(command, *args)
    assert r.returncode == 3, r.stderr
    assert "is a FIFO, not a regular file" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "out.safetensors").exists()


# ----------------------------------------------------------------------------------- linear text scanning

import time  # noqa: E402

from statecli.formats import pt2 as pt2_reader  # noqa: E402
from statecli.formats.torchscript import parse_declarations  # noqa: E402
from statecli.roles import _QUANT_SEGMENT  # noqa: E402

MB = 1 << 20
BUDGET = 1.0  # seconds for 1 MB; a quadratic scan of 1 MB takes hours


def _within_budget(f: Any, *args: Any) -> Any:
    start = time.perf_counter()
    try:
        return f(*args)
    except ValueError:  # a malformed declaration is refused; only the time matters here
        return None
    finally:
        assert time.perf_counter() - start < BUDGET, f"{f.__name__} took {time.perf_counter() - start:.2f} s"


CODE_LINES = {
    "class_blanks": "class A" + " " * MB + "x",
    "class_blanks_paren": "class A" + " " * MB + "(" + " " * MB,
    "class_paren_unclosed": "class A(" + "a" * MB,
    "class_name": "class " + "a" * MB,
    "header_blanks": "class A(Module):\n" + " " * MB + "x",
    "header_tabs_def": "class A(Module):\n" + "\t" * MB + "de",
    "decl_blanks": "class A(Module):\n  __parameters__" + " " * MB + "x",
    "decl_blanks_eq": "class A(Module):\n  __parameters__ =" + " " * MB + "x",
    "decl_partial": "class A(Module):\n" + "  __parameters" * (MB // 14),
    "decl_strings": 'class A(Module):\n  __parameters__ = ["' + "\\" * MB,
    "many_lines": "class A(Module):\n" + "  \n" * (MB // 3),
    "dots": "." * MB,
}


@pytest.mark.parametrize("name", list(CODE_LINES))
def test_torchscript_declarations_are_read_in_linear_time(name: str) -> None:
    _within_budget(parse_declarations, CODE_LINES[name], "__torch__")


TENSOR_NAMES = {
    "a": "a" * MB + "observer",
    "dots": "." * MB + "observer",
    "dotted_a": "a." * (MB // 2) + "observer",
    "fake_quant_prefix": "fake_quan" * (MB // 9) + ".observer",
    "observer_prefix": "observe" * (MB // 7) + "x.fake_quant",
    "app_prefix": "activation_post_proces" * (MB // 22) + ".observer",
    "no_end": ("fake_quant" * (MB // 10)) + "\n",
}


@pytest.mark.parametrize("name", list(TENSOR_NAMES))
def test_role_rule_regex_is_linear_over_tensor_names(name: str) -> None:
    _within_budget(_QUANT_SEGMENT.search, TENSOR_NAMES[name])


@pytest.mark.parametrize("text", ["a" * MB, "." * MB, "a" * MB + "/", "-" * MB])
def test_pt2_name_regexes_are_linear(text: str) -> None:
    _within_budget(pt2_reader._PATH_NAME.match, text)
    _within_budget(pt2_reader._MODEL_NAME.match, text)


@pytest.mark.parametrize("data", [b"q\x00h\x00((" + b"h\x01" * (MB // 2), b"((" + b"K\x00" * (MB // 2), b"(" * MB])
def test_the_tensor_fast_path_regex_is_linear(data: bytes) -> None:
    _within_budget(fastpath._TENSOR_V2.match, data)
    _within_budget(fastpath._TENSOR_V2.search, data[: MB // 16])  # match is what runs; search is worse


@pytest.mark.slow
def test_a_million_deep_nest_in_a_reader_message_is_clipped(tmp_path: Path) -> None:
    deep_million = lambda a: a.op("MARK").op("EMPTY_TUPLE").raw(b"\x85" * 10**6).op("LIST")  # noqa: E731
    _refused(_one_tensor(tmp_path, dims=deep_million), "size [((((…),),),)] has an impossible value")
