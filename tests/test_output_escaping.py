"""Machine-readable outputs stay valid whatever a tensor name holds (names come from untrusted files).

CSV reads back every name exactly through ``csv.reader``; Markdown shows it in a code span a CommonMark
renderer (markdown-it, which rich depends on) reads back; JUnit parses as XML 1.0; GitHub annotations
stay one line each with no control character; the HTML page is inert. And a file that cannot be read
still appears in every CI format.
"""

from __future__ import annotations

import csv
import html
import io
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from clirun import run_cli

from statecli.output import columns, formats

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
TIED = SAMPLES / "tied_lm.pt"

NAMES = [
    "plain.weight",
    "cr\rx",
    "lf\ny",
    "crlf\r\nz",
    "a,b",
    'q"uo"te',
    '"',
    "tab\tx",
    "nul\x00x",
    "esc\x1b[31mred",
    "ünï€😀",
    "`tick`",
    "``dbl``x",
    "a`b",
    " sp ",
    "|pipe|",
    "<b>&amp;</b>",
    "bidi\u202eevil",
    "100%",
    "",
]
# Characters outside XML 1.0 and anything a terminal or log viewer would obey.
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202e]")


@pytest.fixture
def named(tmp_path: Path) -> Path:
    path = tmp_path / "named.pt"
    torch.save({n: torch.tensor([float(i), float("nan")]) for i, n in enumerate(NAMES)}, path)
    return path


@pytest.fixture
def other(tmp_path: Path) -> Path:
    path = tmp_path / "other.pt"
    torch.save({n: torch.tensor([float(i) + 1, 0.0]) for i, n in enumerate(NAMES)}, path)
    return path


def json_names(*args: str) -> list[str]:
    code, out, _ = run_cli(*args, "-f", "json")
    assert code in (0, 1)
    return [t["name"] for t in json.loads(out)["tensors"]]


def csv_rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


# ----------------------------------------------------------------------------------------------- CSV


def test_inspect_csv_reads_back_every_name(named: Path) -> None:
    code, out, _ = run_cli("inspect", str(named), "-f", "csv")
    assert code == 0
    rows = csv_rows(out)
    names = json_names("inspect", str(named))
    assert {*NAMES} - {""} <= {*names}  # the JSON's names are the file's (the empty key is shown as "(root)")
    assert [r[0] for r in rows[1:]] == names
    assert all(len(r) == len(columns.INSPECT_RECORD) for r in rows)
    assert out.count("\r") == 2  # CR kept inside quoted cells, rows end in LF
    assert '"cr\rx",' in out and "\r\n" not in out.replace('"crlf\r\nz"', "")


def test_inspect_csv_of_several_paths_reads_back(named: Path, other: Path) -> None:
    code, out, _ = run_cli("inspect", str(named), str(other), "-f", "csv")
    assert code == 0
    rows = csv_rows(out)
    assert [r[1] for r in rows[1:]] == json_names("inspect", str(named)) * 2


def test_diff_csv_reads_back_every_name(named: Path, other: Path) -> None:
    code, out, _ = run_cli("diff", str(named), str(other), "-f", "csv")
    assert code == 1
    code, doc, _ = run_cli("diff", str(named), str(other), "-f", "json")
    expected = [t["name"] for t in json.loads(doc)["changed"]]
    rows = csv_rows(out)
    assert len(expected) == len(NAMES) and [r[0] for r in rows[1:]] == expected
    assert all(len(r) == 13 for r in rows)


def test_stats_csv_reads_back_every_name(named: Path) -> None:
    code, out, _ = run_cli("stats", str(named), "-f", "csv")
    assert code == 0
    rows = csv_rows(out)
    assert [r[0] for r in rows[1:]] == [*json_names("stats", str(named)), "(total)"]
    assert all(len(r) == 16 for r in rows)


@pytest.mark.parametrize("chunk", [1, 2, 3, 1000])
def test_csv_text_quotes_cr_in_any_chunk(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(formats, "_CSV_CHUNK", chunk)
    rows = [["a", "b"], ["c\rd", "e"], ["f", "g,h"], ["", "i\r"], ["j", "\r\n"], ["k", ""]]
    text = formats.csv_text(["x", "y"], iter(rows))
    assert csv_rows(text) == [["x", "y"], *rows]
    assert text.startswith("x,y\na,b\n") and text.endswith("\nk,\n")  # ordinary rows as before: unquoted, LF
    assert '"c\rd",e\n' in text and ',"i\r"\n' in text


def test_csv_text_with_no_rows() -> None:
    assert formats.csv_text(["x", "y"], []) == "x,y\n"


# ------------------------------------------------------------------------------------------ Markdown


def rendered_first_cells(text: str) -> list[str]:
    """The first cell of each body row as a CommonMark + GFM-tables renderer reads it (a code span's text)."""
    from markdown_it import MarkdownIt

    cells = []
    first = False
    for token in MarkdownIt("commonmark").enable("table").parse(text):
        if token.type == "tr_open":
            first = True
        elif token.type == "inline" and first:
            first = False
            if token.children and token.children[0].type == "code_inline":
                assert len(token.children) == 1, token.content  # the whole cell is one code span
                cells.append(token.children[0].content)
            else:
                cells.append(token.content)
    return cells[1:]  # the header row


def shown(name: str) -> str:
    """A name as a Markdown cell shows it: CR and LF as blanks (a row is one line), any other control
    character or lone surrogate as its escape, as the table shows it."""
    from statecli.clip import printable

    one_line = name.replace("\r", " ").replace("\n", " ")
    return one_line if one_line.isprintable() else printable(one_line)


def test_inspect_markdown_shows_every_name(named: Path) -> None:
    code, out, _ = run_cli("inspect", str(named), "-f", "markdown")
    assert code == 0
    assert "\r" not in out and len(out.splitlines()) == 2 + len(NAMES)
    assert rendered_first_cells(out) == [shown(n) for n in json_names("inspect", str(named))]
    assert "| `` `tick` `` | " in out and "| ``` ``dbl``x ``` |" in out and "| ``a`b`` |" in out


def test_diff_markdown_shows_every_name(named: Path, tmp_path: Path) -> None:
    ticked = tmp_path / "`b`.pt"
    torch.save({"w": torch.ones(1)}, ticked)
    code, out, _ = run_cli("diff", str(named), str(ticked), "-f", "markdown")
    assert code == 1
    assert out.startswith(f"**`{named}` → ``{ticked.parent}/`b`.pt``**")
    names = json_names("inspect", str(named))
    assert "\r" not in out and rendered_first_cells(out) == [shown(n) for n in [*names, "w"]]


def test_stats_markdown_shows_every_name(named: Path) -> None:
    code, out, _ = run_cli("stats", str(named), "-f", "markdown")
    assert code == 0
    assert "\r" not in out
    assert rendered_first_cells(out) == [shown(n) for n in [*json_names("stats", str(named)), "(total)"]]


@pytest.mark.parametrize(
    "text", ["x", "`", "``", "a`b", "`a", "a`", "a``b`", " a ", " a", "a ", "  ", " ", " `` ", "a\\b", "x\\"]
)
def test_code_span_reads_back(text: str) -> None:
    cell = formats.code_span(text)
    assert rendered_first_cells(f"| h |\n|---|\n| {cell} |\n") == [text]


def test_md_cell_puts_a_cell_on_one_line() -> None:
    assert formats.md_cell("a|b\rc\nd\r\ne") == "a\\|b c d  e"


# --------------------------------------------------------------------------------------------- check


def test_junit_is_xml_1_0_whatever_the_names(named: Path) -> None:
    code, out, _ = run_cli("check", str(named), "--no-nan", "--no-policy", "-f", "junit")
    assert code == 1
    assert not CONTROL.search(out)
    root = ET.fromstring(out)  # well-formed
    failure = root.find("testsuite/testcase[@classname='statecli.check.no_nan']/failure")
    assert failure is not None and failure.text is not None
    lines = failure.text.split("\n")
    assert len(lines) == len(NAMES)  # one per offender: no name breaks a line
    for text in ("esc\\x1b[31mred", "nul\\x00x", "cr\\rx", "lf\\ny", "crlf\\r\\nz", "tab\\tx", "bidi\\u202eevil"):
        assert f"{text}: 1 NaN value" in lines
    assert "<b>&amp;</b>: 1 NaN value" in lines and 'q"uo"te: 1 NaN value' in lines
    assert (failure.get("message") or "").startswith(f"{len(NAMES)} failures: ")


def test_junit_and_github_with_a_control_character_in_the_path(tmp_path: Path) -> None:
    path = tmp_path / "e\x1b[2Jvil\n.pt"
    torch.save({"w\x07": torch.tensor([float("nan")])}, path)
    code, out, _ = run_cli("check", str(path), "--no-nan", "--no-policy", "-f", "junit")
    assert code == 1 and not CONTROL.search(out)
    suite = ET.fromstring(out).find("testsuite")
    assert suite is not None and suite.get("name") == f"statecli check {tmp_path}/e\\x1b[2Jvil\\n.pt"
    code, out, _ = run_cli("check", str(path), "--no-nan", "--no-policy", "-f", "github")
    assert code == 1 and not CONTROL.search(out)
    file = str(tmp_path).replace(":", "%3A").replace(",", "%2C")
    assert out == f"::error file={file}/e\\x1b[2Jvil\\n.pt,title=statecli check%3A no_nan::w\\x07: 1 NaN value\n"


def test_github_annotations_are_one_line_each(named: Path) -> None:
    code, out, _ = run_cli("check", str(named), "--no-nan", "--no-policy", "-f", "github")
    assert code == 1
    assert not CONTROL.search(out) and "\r" not in out
    lines = out.splitlines()
    assert len(lines) == len(NAMES) and all(line.startswith("::error file=") for line in lines)
    assert any(line.endswith("::lf\\ny: 1 NaN value") for line in lines)
    assert any(line.endswith("::100%25: 1 NaN value") for line in lines)  # GitHub decodes %25 back to %


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.attrs: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs.update(a for a, _ in attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_is_inert_whatever_the_names(named: Path) -> None:
    code, out, _ = run_cli("check", str(named), "--no-nan", "--no-policy", "-f", "html")
    assert code == 1
    assert not CONTROL.search(out)
    page = _Page()
    page.feed(out)
    page.close()
    assert page.tags == {"html", "head", "meta", "style", "body", "pre", "code", "span"}  # no <b> from a name
    assert page.attrs <= {"charset", "style"}
    text = "".join(page.text)
    for name in ("<b>&amp;</b>", "esc\\x1b[31mred", "nul\\x00x", "lf\\ny", "bidi\\u202eevil", 'q"uo"te'):
        assert f"{name}: 1 NaN value" in text


# ------------------------------------------------------------------------------ files that cannot be read


@pytest.fixture
def junk(tmp_path: Path) -> Path:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"\x01\x02garbage")
    return path


def unreadable(junk: Path) -> str:
    return f"{junk}: unrecognised format (first bytes 01 02 67 61 72 62 61 67)"


@pytest.mark.parametrize("fmt", ["json", "junit", "github", "html", "table"])
def test_an_unreadable_file_is_in_every_ci_report(junk: Path, fmt: str) -> None:
    code, out, err = run_cli("check", str(junk), str(TIED), "--no-policy", "-f", fmt)
    message = unreadable(junk)
    assert code == 3 and err == f"statecli: error: {message}\n"  # as before
    if fmt == "json":
        doc = json.loads(out)
        assert doc[0] == {
            "schema": "statecli.check/1",
            "path": str(junk),
            "passed": False,
            "error": {"message": message, "exit_code": 3},
        }
        assert doc[1]["path"] == str(TIED) and doc[1]["passed"] is True
    elif fmt == "junit":
        root = ET.fromstring(out)
        assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("2", "0", "1")
        first, second = root.findall("testsuite")
        assert first.get("name") == f"statecli check {junk}" and first.get("errors") == "1"
        error = first.find("testcase/error")
        assert error is not None and error.get("message") == message and error.text == message
        assert second.get("name") == f"statecli check {TIED}" and second.get("errors") == "0"
    elif fmt == "github":
        assert out.splitlines() == [
            f"::error file={junk},title=statecli check%3A not checked::{message}",
            f"::notice file={TIED},title=statecli check::1 rule passed",
        ]
    elif fmt == "html":
        page = _Page()
        page.feed(out)
        text = " ".join("".join(page.text).split())  # the page folds long lines
        assert f"✘ not checked (exit 3): {message}" in text and str(TIED) in text
        assert text.index(str(junk)) < text.index(str(TIED))  # in the order given
    else:
        assert str(junk) not in out and str(TIED) in out  # a person reads the error on stderr


def test_an_unreadable_file_still_fails_the_gate_when_the_others_fail(junk: Path, named: Path) -> None:
    code, out, _ = run_cli("check", str(named), str(junk), "--no-nan", "--no-policy", "-f", "json")
    assert code == 3
    assert [("error" in d, d["passed"]) for d in json.loads(out)] == [(False, False), (True, False)]


def test_one_unreadable_file_alone_in_a_table_is_an_error_with_nothing_on_stdout(junk: Path) -> None:
    code, out, err = run_cli("check", str(junk), "--no-policy")
    assert code == 3 and out == "" and err == f"statecli: error: {unreadable(junk)}\n"


@pytest.mark.parametrize("fmt", ["json", "junit", "github", "html"])
def test_one_unreadable_file_alone_still_gets_its_ci_report(junk: Path, fmt: str) -> None:
    # An empty report.xml breaks the GitHub Actions recipe: the report holds the error, as for several files.
    code, out, err = run_cli("check", str(junk), "--no-policy", "-f", fmt)
    assert code == 3 and err == f"statecli: error: {unreadable(junk)}\n"
    if fmt == "json":
        doc = json.loads(out)
        assert doc["passed"] is False and doc["error"]["exit_code"] == 3 and doc["path"] == str(junk)
    elif fmt == "junit":
        suite = ET.fromstring(out)
        assert suite.get("errors") == "1" and suite.find(".//error") is not None
    elif fmt == "github":
        assert out.startswith(f"::error file={junk}") and out.endswith("\n")
    else:
        assert "<html" in out.lower() and html.escape(str(junk)) in out


def test_markdown_of_a_lone_surrogate_name_is_valid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "s.pt"
    torch.save({"bad\udcffname": torch.ones(1)}, path)  # pickle keeps it (surrogatepass); UTF-8 cannot
    result = run_cli("inspect", str(path), "-f", "markdown")
    assert result.exit_code == 0
    text = result.stdout  # run_cli decodes strictly: raises on a raw surrogate byte
    assert "| `bad\\udcffname` |" in text
