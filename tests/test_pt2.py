"""``torch.export`` programs (``.pt2``): torch is the oracle, statecli runs nothing.

What statecli reads from a sample must equal what ``torch.export.load`` rebuilds: the graph signature's
parameters, buffers (with their persistent flag) and tensor constants, each tensor's dtype, shape,
stride, offset, device and requires_grad, shared storages, the example inputs. Hostile and corrupt
variants are made from the samples by rewriting single zip members (configs, payloads, pickles).
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from clirun import NO_COLOR, run_cli
from torch_facts import facts, statecli_facts, tensors_of
from zip_members import member, rewrite

import statecli

SAMPLES = ("export_frozen.pt2", "export_tied_lm.pt2")
ROLE_OF_KIND = {"PARAMETER": "parameter", "BUFFER": "buffer", "CONSTANT_TENSOR": "other"}


# ----------------------------------------------------------------------------------------------- helpers


def export_load(path: Path) -> torch.export.ExportedProgram:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.load(str(path))


def flatten(obj: Any, prefix: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out: dict[str, torch.Tensor] = {}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}"))
    return out


WEIGHTS = "data/weights/model_weights_config.json"
CONSTANTS = "data/constants/model_constants_config.json"


def edited_config(src: Path, rel: str, fqn: str, **changes: Any) -> bytes:
    doc = json.loads(member(src, rel))
    entry = doc["config"][fqn]
    for k, v in changes.items():
        if k in ("sizes", "strides", "dtype", "storage_offset"):
            entry["tensor_meta"][k] = v
        else:
            entry[k] = v
    return json.dumps(doc).encode()


def inspect_json(path: Path) -> tuple[int, dict[str, Any] | None, str]:
    result = run_cli("inspect", str(path), "--format", "json", env=NO_COLOR)
    data = json.loads(result.stdout) if result.exit_code == 0 else None
    return result.exit_code, data, result.stderr


class Evil:
    """Unpickling this calls os.system. Only ever pickled here, never unpickled."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch statecli_pwned_marker",))


def torch_save_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- the samples


@pytest.mark.parametrize("name", SAMPLES)
def test_roles_and_facts_match_torch_export_load(samples_dir: Path, name: str) -> None:
    path = samples_dir / name
    assert path.stat().st_size < 200 * 1024
    ep = export_load(path)
    report = statecli.open_checkpoint(path)
    assert report.format == "torch-export"
    assert report.container.kind == "export"
    got = tensors_of(report)
    lifted = [s for s in ep.graph_signature.input_specs if s.kind.name in ROLE_OF_KIND]
    assert lifted
    for spec in lifted:
        tensor = ep.state_dict.get(spec.target, ep.constants.get(spec.target))
        assert isinstance(tensor, torch.Tensor), spec.target
        info = got[spec.target]
        assert (info.role, info.exact, info.evidence) == (ROLE_OF_KIND[spec.kind.name], True, "export"), spec.target
        assert statecli_facts(info) == facts(tensor), spec.target
        assert info.requires_grad is tensor.requires_grad, spec.target
        if spec.kind.name == "BUFFER":
            assert info.persistent is spec.persistent, spec.target
            assert (spec.target in ep.state_dict) is spec.persistent
        elif spec.kind.name == "PARAMETER":
            assert isinstance(ep.state_dict[spec.target], torch.nn.Parameter)
            assert info.persistent is True
        else:
            assert (info.persistent, info.group) == (None, "constants"), spec.target
    inputs = flatten(ep.example_inputs, "sample_inputs")
    for n, t in inputs.items():
        assert (got[n].role, got[n].group, got[n].exact) == ("other", "sample_inputs", True), n
        assert statecli_facts(got[n]) == facts(t), n
    assert set(got) == {s.target for s in lifted} | set(inputs)
    # Tensors that share memory after torch.export.load share a storage in the report, and only those.
    by_ptr: dict[int, set[str]] = {}
    for spec in lifted:
        t = ep.state_dict.get(spec.target, ep.constants.get(spec.target))
        by_ptr.setdefault(t.untyped_storage().data_ptr(), set()).add(spec.target)
    for group in by_ptr.values():
        for n in group:
            assert set(got[n].shares_with) == group - {n}, n


def test_frozen_sample_is_what_it_claims(samples_dir: Path) -> None:
    report = statecli.open_checkpoint(samples_dir / "export_frozen.pt2")
    got = tensors_of(report)
    assert (got["net.backbone.0.weight"].role, got["net.backbone.0.weight"].requires_grad) == ("parameter", False)
    assert (got["net.head.weight"].role, got["net.head.weight"].requires_grad) == ("parameter", True)
    assert (got["net.scale"].role, got["net.scale"].persistent) == ("buffer", True)
    assert (got["net.cache"].role, got["net.cache"].persistent) == ("buffer", False)
    assert got["net.cache"].storage == "data/constants/tensor_1"
    assert (got["offset"].role, got["offset"].group) == ("other", "constants")
    assert report.container.other_keys == ("sample_inputs",)
    assert not report.findings


def test_tied_weights_share_one_storage(samples_dir: Path) -> None:
    got = tensors_of(statecli.open_checkpoint(samples_dir / "export_tied_lm.pt2"))
    assert got["embed.weight"].shares_with == ("lm_head.weight",)
    assert got["embed.weight"].storage == got["lm_head.weight"].storage == "data/weights/weight_0"
    assert (got["position_ids"].dtype, got["position_ids"].role) == ("int64", "buffer")


@pytest.mark.parametrize("name", SAMPLES)
def test_cli_inspect_json_and_check(samples_dir: Path, name: str) -> None:
    code, data, _ = inspect_json(samples_dir / name)
    assert code == 0
    assert data is not None and data["format"] == "torch-export"
    assert all(t["exact"] for t in data["tensors"]) and {t["evidence"] for t in data["tensors"]} == {"export"}
    result = run_cli("check", str(samples_dir / name), "--require-exact-roles", "--no-policy")
    assert result.exit_code == 0, result.output
    assert run_cli("tree", str(samples_dir / name)).exit_code == 0


# --------------------------------------------------------- a tensor-subclass weight: a pickled payload


class _SubclassWeight(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torch.testing._internal.two_tensor import TwoTensor

        self.w = torch.nn.Parameter(TwoTensor(torch.ones(2, 3), torch.zeros(2, 3)))
        self.b = torch.nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.t() + self.b


def test_tensor_subclass_weight_is_read_through_the_restricted_reader(tmp_path: Path) -> None:
    pytest.importorskip("torch.testing._internal.two_tensor")
    path = tmp_path / "subclass.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(_SubclassWeight(), (torch.randn(4, 3),)), str(path))
    assert json.loads(member(path, WEIGHTS))["config"]["w"]["use_pickle"] is True  # what this test is about
    ep = export_load(path)
    got = tensors_of(statecli.open_checkpoint(path))
    w = ep.state_dict["w"]
    assert (got["w"].role, got["w"].exact, got["w"].dtype, got["w"].shape) == ("parameter", True, "float32", (2, 3))
    assert got["w"].layout == f"subclass:{type(w).__module__}.{type(w).__qualname__}"
    assert got["w"].requires_grad is w.requires_grad
    assert got["w"].nbytes == 24
    assert got["b"].layout == "strided"


# ------------------------------------------------------------------------------ hostile and corrupt files


@pytest.mark.parametrize(
    ("rel", "make", "words"),
    [
        (
            WEIGHTS,
            lambda s: edited_config(s, WEIGHTS, "net.head.weight", sizes=[{"as_int": 2**40}, {"as_int": 16}]),
            "reaches element",
        ),
        (
            WEIGHTS,
            lambda s: edited_config(
                s, WEIGHTS, "net.head.weight", sizes=[{"as_int": 2**62}] * 2, strides=[{"as_int": 1}] * 2
            ),
            "overflow",
        ),
        (WEIGHTS, lambda s: edited_config(s, WEIGHTS, "net.head.weight", storage_offset={"as_int": 10**6}), "reaches"),
        (WEIGHTS, lambda s: edited_config(s, WEIGHTS, "net.head.weight", path_name="weight_999"), "not in the archive"),
        (
            WEIGHTS,
            lambda s: edited_config(s, WEIGHTS, "net.head.weight", path_name="../models/model.json"),
            "path_name",
        ),
        (WEIGHTS, lambda s: edited_config(s, WEIGHTS, "net.head.weight", dtype=99), "dtype code 99"),
        (WEIGHTS, lambda s: edited_config(s, WEIGHTS, "net.head.weight", sizes=[{"as_expr": "s0"}]), "symbolic"),
        (WEIGHTS, lambda s: b'{"config": {}, "config": {}}', "duplicate key"),
        (WEIGHTS, lambda s: b'{"config": [', "not valid JSON"),
        (WEIGHTS, lambda s: None, "is missing"),
        (CONSTANTS, lambda s: None, "neither weights nor constants"),
        (
            CONSTANTS,
            lambda s: json.dumps({"config": {**json.loads(member(s, WEIGHTS))["config"]}}).encode(),
            "in both the weights and the constants config",
        ),
        ("data/weights/weight_0", lambda s: b"\x00" * 7, "not a whole number"),
        ("data/weights/weight_4", lambda s: b"\x00" * 8, "reaches element"),
        ("models/model.json", lambda s: b'{"graph_module": {}}', "input_specs"),
        ("archive_version", lambda s: b"1", "archive version"),
        ("data/sample_inputs/model.pt", lambda s: b"PK\x03\x04 not really a zip", "sample_inputs"),
    ],
)
def test_corrupt_programs_exit_3(samples_dir: Path, tmp_path: Path, rel: str, make: Any, words: str) -> None:
    src = samples_dir / "export_frozen.pt2"
    bad = rewrite(src, tmp_path / "bad.pt2", {rel: make(src)})
    code, _, stderr = inspect_json(bad)
    assert code == 3, stderr
    assert words in stderr
    assert "Traceback" not in stderr


def test_truncated_program_exits_3(samples_dir: Path, tmp_path: Path) -> None:
    data = (samples_dir / "export_tied_lm.pt2").read_bytes()
    bad = tmp_path / "truncated.pt2"
    bad.write_bytes(data[: len(data) // 2])
    code, _, stderr = inspect_json(bad)
    assert code == 3 and "zip" in stderr


def test_fake_weights_are_a_warning(samples_dir: Path, tmp_path: Path) -> None:
    src = samples_dir / "export_frozen.pt2"
    bad = rewrite(src, tmp_path / "fake.pt2", {"data/weights/weight_0": b""})  # net.backbone.0.weight
    report = statecli.open_checkpoint(bad)
    assert any(f.code == "export-empty-payload" and "net.backbone.0.weight" in f.message for f in report.findings)


def assert_dangerous(path: Path, cwd: Path, where: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.chdir(cwd)
    code, data, stderr = inspect_json(path)
    assert code == 0, stderr
    assert data is not None
    dangerous = [f for f in data["findings"] if f["level"] == "dangerous"]
    assert dangerous, data["findings"]
    assert any(f["message"].startswith(where) and "system" in f["message"] for f in dangerous), dangerous
    assert run_cli("check", str(path), "--no-policy").exit_code == 5  # refused as unsafe
    assert not (cwd / "statecli_pwned_marker").exists()
    return data


def test_hostile_pickled_weight(samples_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.export.load would torch.load(weights_only=False) this payload: os.system would run.
    src = samples_dir / "export_frozen.pt2"
    payload = torch_save_bytes({"t": torch.zeros(16, 8), "x": Evil()})
    bad = rewrite(
        src,
        tmp_path / "evil.pt2",
        {
            WEIGHTS: edited_config(src, WEIGHTS, "net.backbone.0.weight", use_pickle=True),
            "data/weights/weight_0": payload,
        },
    )
    data = assert_dangerous(bad, tmp_path, "data/weights/weight_0", monkeypatch)
    names = {t["name"]: t for t in data["tensors"]}
    assert names["net.backbone.0.weight"]["role"] == "parameter"


def test_hostile_sample_inputs(samples_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.export.load falls back to torch.load(weights_only=False) for sample inputs it cannot load safely.
    payload = torch_save_bytes(((torch.zeros(2, 8),), {"x": Evil()}))
    bad = rewrite(samples_dir / "export_frozen.pt2", tmp_path / "evil.pt2", {"data/sample_inputs/model.pt": payload})
    assert_dangerous(bad, tmp_path, "data/sample_inputs/model.pt", monkeypatch)


def test_hostile_opaque_constant(samples_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.export.load runs pickle.loads on opaque constants.
    import pickle

    src = samples_dir / "export_frozen.pt2"
    doc = json.loads(member(src, CONSTANTS))
    doc["config"]["opaque"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    bad = rewrite(
        src,
        tmp_path / "evil.pt2",
        {CONSTANTS: json.dumps(doc).encode(), "data/constants/opaque_obj_0": pickle.dumps(Evil(), protocol=2)},
    )
    data = assert_dangerous(bad, tmp_path, "data/constants/opaque_obj_0", monkeypatch)
    assert "opaque" in data["container"]["other_keys"]


def test_unreadable_opaque_constant_is_dangerous(samples_dir: Path, tmp_path: Path) -> None:
    src = samples_dir / "export_frozen.pt2"
    doc = json.loads(member(src, CONSTANTS))
    doc["config"]["opaque"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    bad = rewrite(
        src, tmp_path / "odd.pt2", {CONSTANTS: json.dumps(doc).encode(), "data/constants/opaque_obj_0": b"\x80\x02(("}
    )
    report = statecli.open_checkpoint(bad)
    assert any(f.level == "dangerous" and f.code == "unchecked-pickle" for f in report.findings)


def test_aoti_package_is_unsupported(tmp_path: Path) -> None:
    bad = tmp_path / "aoti.pt2"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("aoti/archive_format", "pt2")
        z.writestr("aoti/archive_version", "0")
        z.writestr("aoti/data/aotinductor/model/model.cpp", "// compiled")
    code, _, stderr = inspect_json(bad)
    assert code == 3 and "AOTInductor" in stderr


def test_names_differing_only_in_case_are_refused(samples_dir: Path, tmp_path: Path) -> None:
    # torch's zip reader matches record names without regard to case: the twin could be what torch reads.
    src = samples_dir / "export_frozen.pt2"
    bad = rewrite(src, tmp_path / "twins.pt2", {"MODELS/MODEL.JSON": member(src, "models/model.json")})
    code, _, stderr = inspect_json(bad)
    assert code == 3 and "without regard to case" in stderr
