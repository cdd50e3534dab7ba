"""statecli stats against torch: the same numbers from the file's bytes, chunk by chunk."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import torch
from clirun import run_cli
from factories import tensor_info

import statecli
from statecli import stats
from statecli.tensors import values

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def reference(t: torch.Tensor) -> dict[str, float | int]:
    v = (t.abs() if t.is_complex() else t).double().reshape(-1)
    fin = v[torch.isfinite(v)]
    return {
        "min": float(fin.min()),
        "max": float(fin.max()),
        "mean": float(fin.mean()),
        "std": float(fin.std(unbiased=False)),
        "absmax": float(fin.abs().max()),
        "l2": float(fin.norm()),
        "nan": int(torch.isnan(v).sum()),
        "posinf": int(torch.isposinf(v).sum()),
        "neginf": int(torch.isneginf(v).sum()),
        "zeros": int((v == 0).sum()),
    }


SD = {
    "big": torch.randn(300_000, generator=torch.Generator().manual_seed(0)) * 3 + 5,
    "special": torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 0.0, -2.0]),
    "ints": torch.arange(-5, 10, dtype=torch.int64),
    "flags": torch.tensor([True, False, True]),
    "cplx": torch.tensor([3 + 4j, 0j, -1j]),
    "half": torch.linspace(-3, 3, 101).half(),
    "bf": torch.linspace(-1, 1, 11).bfloat16(),
    "view": torch.arange(20.0).reshape(4, 5).t(),
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stats") / "s.pt"
    torch.save(SD, path)
    return path


@pytest.mark.parametrize(("chunk", "piece"), [(stats._CHUNK, values.PIECE_BYTES), (7, 1000)])
def test_numbers_match_torch(ckpt: Path, chunk: int, piece: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stats, "_CHUNK", chunk)
    monkeypatch.setattr(values, "PIECE_BYTES", piece)  # the 1.2 MB tensor streams in 1 kB pieces
    result = stats.compute(statecli.open_checkpoint(ckpt))
    got = {t.name: t.to_dict() for t in result.tensors}
    assert list(got) == list(SD)
    for name, tensor in SD.items():
        want = reference(tensor)
        for key, value in want.items():
            # float32 sums inside each chunk: about 1e-7 of the values' scale
            assert got[name][key] == pytest.approx(value, rel=2e-6, abs=1e-6), (name, key)


def test_total_combines_every_tensor(ckpt: Path) -> None:
    result = stats.compute(statecli.open_checkpoint(ckpt))
    everything = torch.cat([(t.abs() if t.is_complex() else t).double().reshape(-1) for t in SD.values()])
    want = reference(everything)
    total = result.total.to_dict()
    for key, value in want.items():
        assert total[key] == pytest.approx(value, rel=2e-6), key
    assert total["numel"] == sum(t.numel() for t in SD.values())


def test_no_pickle_runs(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    assert stats.compute(statecli.open_checkpoint(ckpt)).total.moments.nan == 1


def test_quantized_tensors_are_listed_not_read() -> None:
    result = stats.compute(statecli.open_checkpoint(SAMPLES / "all_dtypes.pt"))
    by_name = {t.name: t for t in result.tensors}
    assert "scales live in the pickle" in (by_name["qint8"].skipped or "")
    assert by_name["float8_e4m3fn"].skipped is None and by_name["float8_e4m3fn"].max is not None


def test_histogram_counts_every_finite_value(ckpt: Path) -> None:
    result = stats.compute(statecli.open_checkpoint(ckpt), histogram_bins=10)
    by_name = {t.name: t for t in result.tensors}
    counts, lo, hi = by_name["big"].histogram or ([], 0, 0)
    assert sum(counts) == 300_000 and len(counts) == 10
    assert lo == by_name["big"].min and hi == by_name["big"].max
    assert sum(by_name["special"].histogram[0]) == 3  # type: ignore[index]


def test_cli_json_csv_and_filters(ckpt: Path) -> None:
    code, out, err = run_cli("stats", str(ckpt), "--format", "json", "--match", "b*")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == "statecli.stats/1"
    assert [t["name"] for t in doc["tensors"]] == ["big", "bf"]
    assert doc["total"]["numel"] == 300_011
    code, out, _ = run_cli("stats", str(ckpt), "--format", "csv", "--role", "buffer")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["name"] for r in rows] == ["ints", "flags", "(total)"]
    assert rows[0]["min"] == "-5.0"


def test_cli_table_and_histogram(ckpt: Path) -> None:
    code, out, _ = run_cli("stats", str(ckpt), "--histogram", "--bins", "12", "--match", "half")
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split()[:4] == ["Name", "DType", "Shape", "Min"]
    row = next(line for line in lines if line.startswith("half "))
    assert "-3" in row and "3" in row
    assert any(line.startswith("(total)") for line in lines)
    spark = next(line for line in lines if (line.startswith("half") and "▁" in line) or "█" in line)
    assert len(spark.split()[2]) == 12 if len(spark.split()) > 2 else True


def test_cli_notes_unread_tensors() -> None:
    code, _, err = run_cli("stats", str(SAMPLES / "all_dtypes.pt"))
    assert code == 0
    assert "1 tensor not read: quint8 (quantized quint8: scales live in the pickle)" in err
    assert "2 tensors not read: qint8, qint8_per_channel (quantized qint8: scales live in the pickle)" in err
    assert "1 tensor not read: float4_e2m1fn_x2 (packed 4-bit floats are not decoded)" in err
    notes = [line for line in err.splitlines() if "not read" in line]
    assert notes and all(line.count("(") == 1 for line in notes), notes  # no parentheses inside parentheses


COMPUTED = ("min", "max", "mean", "std", "absmax", "l2", "nan", "posinf", "neginf", "zeros")


def test_cli_json_unread_tensor_is_null_not_zero() -> None:
    code, out, err = run_cli("stats", str(SAMPLES / "all_dtypes.pt"), "--format", "json", "--histogram")
    assert code == 0, err
    doc = json.loads(out)
    by_name = {t["name"]: t for t in doc["tensors"]}
    for name in ("quint8", "qint8_per_channel", "float4_e2m1fn_x2"):
        record = by_name[name]
        assert {k: record[k] for k in (*COMPUTED, "histogram")} == dict.fromkeys((*COMPUTED, "histogram")), name
        assert record["skipped"]
    # Read but with no value: the counts were measured (0), the value statistics cannot be.
    empty = by_name["empty_0x3"]
    assert [empty[k] for k in ("nan", "posinf", "neginf", "zeros")] == [0, 0, 0, 0]
    assert empty["min"] is None and empty["histogram"] is None and empty["skipped"] is None
    read = by_name["vector"]
    assert read["zeros"] == 1 and read["nan"] == 0 and read["histogram"]["counts"]
    assert doc["total"]["nan"] == 0 and doc["total"]["skipped"] is None and "histogram" in doc["total"]
    # The recipes in docs/stats.md: `select(.nan > 0)` cannot mistake an unread tensor for a clean one, and
    # `select(.skipped)` finds it.
    assert not [t for t in doc["tensors"] if t["nan"] == 0 and t["skipped"]]
    assert "quint8" in [t["name"] for t in doc["tensors"] if t["skipped"]]


def test_cli_csv_unread_tensor_has_empty_cells() -> None:
    code, out, err = run_cli("stats", str(SAMPLES / "all_dtypes.pt"), "--format", "csv")
    assert code == 0, err
    rows = {r["name"]: r for r in csv.DictReader(io.StringIO(out))}
    assert [rows["quint8"][k] for k in COMPUTED] == [""] * len(COMPUTED)
    assert rows["quint8"]["skipped"] == "quantized quint8: scales live in the pickle"
    assert [rows["vector"][k] for k in ("nan", "zeros", "skipped")] == ["0", "1", ""]


def test_total_of_nothing_read_is_null() -> None:
    code, out, err = run_cli("stats", str(SAMPLES / "all_dtypes.pt"), "--format", "json", "--match", "q*")
    assert code == 0, err
    total = json.loads(out)["total"]
    assert [total[k] for k in COMPUTED] == [None] * len(COMPUTED)
    assert total["skipped"] == "no tensor was read" and total["numel"] == 32
    assert "histogram" not in total  # none asked for
    code, out, _ = run_cli("stats", str(SAMPLES / "all_dtypes.pt"), "--match", "q*")
    assert code == 0
    assert next(line for line in out.splitlines() if line.startswith("(total)")).split()[1:3] == ["32", "values"]


def test_histogram_key_only_when_asked(ckpt: Path) -> None:
    code, out, _ = run_cli("stats", str(ckpt), "--format", "json")
    assert code == 0
    doc = json.loads(out)
    assert all("histogram" not in t for t in [*doc["tensors"], doc["total"]])


def test_cli_bad_input(tmp_path: Path) -> None:
    code, out, err = run_cli("stats", str(tmp_path / "missing.pt"))
    assert code == 3 and out == "" and "no such file" in err and "Traceback" not in err


def test_std_of_one_value_is_zero() -> None:
    t = stats.tensor_stats(
        tensor_info("x", shape=(1,), persistent=True),
        torch.tensor([2.5]),
    )
    assert t.std == 0 and t.l2 == 2.5 and not math.isnan(t.mean or 0)


def test_markdown_is_the_table_as_a_github_table() -> None:
    code, out, _ = run_cli("stats", str(SAMPLES / "cnn_bn_state_dict.pt"), "--format", "markdown")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "| Name | DType | Shape | Min | Max | Mean | Std | Absmax | L2 | NaN | +Inf | -Inf | Zeros |"
    assert lines[1] == "|---|---|---|" + "---:|" * 10
    assert lines[2].startswith("| `conv1.weight` | float32 | 8×3×3×3 | ")
    assert len(lines) == 2 + 16 + 1 and lines[-1].startswith("| `(total)` |  | 1,660 values |")


def test_a_constant_tensor_histogram_has_its_value_for_both_edges() -> None:
    result = stats.compute(statecli.open_checkpoint(SAMPLES / "cnn_bn_state_dict.pt"), histogram_bins=8)
    ones = next(t for t in result.tensors if t.name == "bn1.weight")  # BatchNorm weights start at 1
    assert ones.histogram == ([8, 0, 0, 0, 0, 0, 0, 0], 1.0, 1.0)
