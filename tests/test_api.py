"""The public API: typed keyword arguments and documented Args / Returns / Raises, like safetensors'."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

import statecli

PUBLIC = [statecli.open_checkpoint, statecli.convert, statecli.load, statecli.check]


@pytest.mark.parametrize("fn", PUBLIC, ids=lambda f: f.__name__)
def test_every_argument_is_named_and_typed(fn: object) -> None:
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    kinds = {p.kind for p in sig.parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds and inspect.Parameter.VAR_POSITIONAL not in kinds
    assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values())
    assert sig.return_annotation is not inspect.Signature.empty


@pytest.mark.parametrize("fn", PUBLIC, ids=lambda f: f.__name__)
def test_the_docstring_says_args_returns_raises(fn: object) -> None:
    doc = inspect.getdoc(fn) or ""
    for section in ("Args:", "Returns:", "Raises:"):
        assert section in doc, f"{fn.__name__} has no {section} section"  # type: ignore[attr-defined]
    for name in inspect.signature(fn).parameters:  # type: ignore[arg-type]
        assert f"{name}:" in doc, f"{fn.__name__}: {name} is not documented"  # type: ignore[attr-defined]


def test_a_misspelt_option_is_a_type_error_not_a_silent_default(tmp_path: Path) -> None:
    src = tmp_path / "a.pt"
    torch.save({"w": torch.ones(2)}, src)
    with pytest.raises(TypeError, match="dtpye"):
        statecli.convert(src, tmp_path / "b.safetensors", dtpye="bf16")  # type: ignore[call-arg]
    assert not (tmp_path / "b.safetensors").exists()
    with pytest.raises(TypeError):
        statecli.load(src, "bf16")  # type: ignore[misc]  # options are keyword-only


def test_convert_and_load_take_globs_and_sizes_as_users_write_them(tmp_path: Path) -> None:
    src = tmp_path / "a.pt"
    torch.save({"w": torch.ones(2), "b": torch.ones(2)}, src)
    report = statecli.convert(src, tmp_path / "out", dtype="bf16", only="w", max_shard_size="1KB")
    assert [Path(f).name for f in report.files] == ["model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    loaded = statecli.load(tmp_path / "out", dtype="fp16", exclude=["b"])
    assert loaded["w"].dtype == torch.float16 and loaded["b"].dtype == torch.float32


@pytest.mark.parametrize("fn", [statecli.convert, statecli.load], ids=lambda f: f.__name__)
def test_every_conversion_keyword_is_a_convert_option(fn: object) -> None:
    from statecli.conversion import ConvertOptions

    names = set(inspect.signature(fn).parameters) - {"src", "dst", "path", "progress"}  # type: ignore[arg-type]
    assert names <= set(ConvertOptions.__dataclass_fields__)


def test_load_warns_of_a_dangerous_global_and_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # statecli.load returned the weights of a file with a payload silently; the CLI says it on stderr.
    import warnings

    samples = Path(__file__).resolve().parent.parent / "sample_models"
    monkeypatch.chdir(tmp_path)  # where the payload would leave its marker
    with pytest.warns(statecli.DangerousPickleWarning, match=r"posix\.system"):
        sd = statecli.load(samples / "malicious_os_system.pt")
    assert list(sd) == ["weight"] and not (tmp_path / "statecli_pwned_marker").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", statecli.DangerousPickleWarning)
        with pytest.raises(statecli.DangerousPickleWarning):
            statecli.load(samples / "malicious_os_system.pt")
        statecli.load(samples / "cnn_bn_state_dict.pt")  # a benign file: no warning, so no error
