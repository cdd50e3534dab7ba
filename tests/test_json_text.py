"""``Report.to_json`` writes the text ``json.dumps(report.to_dict())`` writes, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import statecli
from statecli.records import Container, Finding, Report, Summary, TensorInfo

SAMPLES = sorted(
    p.name
    for p in (Path(__file__).parent.parent / "sample_models").iterdir()
    if p.suffix not in (".py", ".md") and p.name[0] != "."
)


@pytest.mark.parametrize("name", SAMPLES)
def test_every_sample(samples_dir: Path, name: str) -> None:
    report = statecli.open_checkpoint(samples_dir / name)
    assert report.to_json() == json.dumps(report.to_dict())


text = st.text(st.characters(), max_size=12)  # control characters, quotes, astral-plane text, lone surrogates
maybe_text = st.none() | text
maybe_flag = st.none() | st.booleans()
ints = st.lists(st.integers(0, 2**63), max_size=5).map(tuple)


@st.composite
def tensors(draw: st.DrawFn) -> TensorInfo:
    return TensorInfo(
        name=draw(text),
        role=draw(st.sampled_from(["parameter", "buffer", "other"])),
        exact=draw(st.booleans()),
        evidence=draw(text),
        persistent=draw(maybe_flag),
        requires_grad=draw(maybe_flag),
        dtype=draw(text),
        shape=draw(ints),
        numel=draw(st.integers(0, 2**64)),
        nbytes=draw(st.integers(0, 2**64)),
        device=draw(maybe_text),
        shares_with=tuple(draw(st.lists(text, max_size=3))),
        group=draw(text),
        stride=draw(st.none() | ints),
        storage_offset=draw(st.integers(0, 2**62)),
        storage=draw(maybe_text),
        layout=draw(text),
        file=draw(maybe_text),
    )


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(items=st.lists(tensors(), max_size=6), path=text, metadata=st.dictionaries(text, text, max_size=3))
def test_any_report(items: list[TensorInfo], path: str, metadata: dict[str, str]) -> None:
    report = Report(
        path=path,
        format="torch-zip",
        container=Container("state_dict", "", ("epoch",)),
        tensors=tuple(items),
        summary=Summary.of(items),
        findings=(Finding("info", "x", 'a "quoted" \x00 message'),),
        metadata=metadata,
    )
    assert report.to_json() == json.dumps(report.to_dict())


def test_percent_signs_in_the_file_text_stay_as_they_are() -> None:
    # The JSON of the usual tensor is a format made from the file's own text: a % there must not become a slot.
    items = [
        TensorInfo("w%s", "parameter", False, "default", True, None, "float32", (2,), 2, 8, "cuda:%d", group="g%%s"),
        TensorInfo("b", "buffer", True, "e%", None, False, "%s", (), 1, 4, None, storage="s%s", file="f%"),
    ]
    report = Report("p%s", "torch-zip", Container("state_dict", ""), tuple(items), Summary.of(items))
    assert report.to_json() == json.dumps(report.to_dict())


@pytest.mark.parametrize("count", [0, 1, 3, 4, 7])
def test_pieces_join_at_every_batch_edge(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    # The tensors' text comes in batches (4096 tensors each): none is lost or doubled at an edge.
    import statecli.records

    monkeypatch.setattr(statecli.records, "_JSON_BATCH", 3)
    items = [
        TensorInfo(f"t{i}", "parameter", False, "default", True, None, "float32", (i,), i, 4 * i, "cpu")
        for i in range(count)
    ]
    report = Report("p", "torch-zip", Container("state_dict", ""), tuple(items), Summary.of(items))
    assert report.to_json() == json.dumps(report.to_dict())
