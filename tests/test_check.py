"""statecli check and schema: each rule fails on a crafted bad checkpoint and passes on a good one; the
outputs parse (JUnit with xml.etree, JSON, GitHub annotations); bad policies are exit 2 with a message."""

from __future__ import annotations

import html
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from clirun import run_cli

import statecli
from statecli.checking import Policy, RuleSet, load_policy, run
from statecli.errors import InputError, UsageError
from statecli.schema import compare, load_schema, make_schema

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
CNN = SAMPLES / "cnn_bn_state_dict.pt"


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.pt"
    torch.save({"w": torch.ones(4), "b": torch.zeros(4), "bn.running_mean": torch.zeros(4)}, path)
    return path


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    path = tmp_path / "bad.pt"
    w = torch.ones(4)
    w[1] = float("nan")
    w[2] = float("inf")
    b = torch.tensor([1e6, -3.0, float("inf"), float("inf")])
    torch.save({"w": w, "b": b, "opt.m": torch.ones(2).double()}, path)
    return path


def rules(path: Path, policy: Policy) -> dict[str, list[str]]:
    result = run(statecli.open_checkpoint(path), policy)
    return {r.id: [f.message for f in r.failures] for r in result.results}


@pytest.mark.parametrize(
    ("rule", "kwargs", "expected_bad"),
    [
        ("dtype", {"dtype": ("float32",)}, ["opt.m: dtype float64, allowed float32"]),
        ("device", {"device": "cuda:0"}, None),
        ("no_nan", {"no_nan": True}, ["w: 1 NaN value"]),
        ("no_inf", {"no_inf": True}, ["w: 1 inf value", "b: 2 inf values"]),
        ("absmax", {"absmax": 10.0}, ["b: absmax 1e+06 > 10"]),
        ("required", {"required": ("bn.*",)}, ["no tensor matches required 'bn.*'"]),
        ("forbidden", {"forbidden": ("opt.*",)}, ["opt.m: matches forbidden 'opt.*'"]),
        ("require_exact_roles", {"require_exact_roles": True}, None),
    ],
)
def test_each_rule_fails_on_bad_and_passes_on_good(
    good: Path, bad: Path, rule: str, kwargs: dict, expected_bad: list[str] | None
) -> None:
    policy = Policy(sets=[RuleSet(**kwargs)])
    bad_failures = rules(bad, policy)[rule]
    assert bad_failures, rule
    if expected_bad is not None:
        assert bad_failures == expected_bad
    if rule in ("device", "require_exact_roles"):
        return  # a plain .pt saved on cpu with inferred roles fails these too; see the tests below
    assert rules(good, policy)[rule] == []


def test_device_and_exact_roles_pass_where_true(tmp_path: Path) -> None:
    assert rules(SAMPLES / "cuda_tagged.pt", Policy(sets=[RuleSet(device="cuda:0")]))["device"] == []
    assert (
        rules(SAMPLES / "cnn_bn_module.pt", Policy(sets=[RuleSet(require_exact_roles=True)]))["require_exact_roles"]
        == []
    )


def test_absmax_names_the_tensor_and_value(bad: Path) -> None:
    failures = rules(bad, Policy(sets=[RuleSet(absmax=0.5)]))["absmax"]
    assert failures == ["w: absmax 1 > 0.5", "b: absmax 1e+06 > 0.5", "opt.m: absmax 1 > 0.5"]  # finite values only


def test_rules_are_scoped_by_glob_and_role(tmp_path: Path) -> None:
    policy = Policy(sets=[RuleSet(roles=("buffer",), dtype=("float32",)), RuleSet(match=("conv*",), absmax=0.01)])
    result = {r.id: r for r in run(statecli.open_checkpoint(CNN), policy).results}
    # float32 speaks of the floating buffers; the int64 counters are held to a dtype only when one is named.
    assert result["dtype [role buffer]"].failures == []
    assert result["dtype [role buffer]"].checked == 4
    named = Policy(sets=[RuleSet(roles=("buffer",), dtype=("float32", "int32"))])
    (r,) = [r for r in run(statecli.open_checkpoint(CNN), named).results if r.rule == "dtype"]
    assert [f.tensor for f in r.failures] == ["bn1.num_batches_tracked", "bn2.num_batches_tracked"]
    assert r.checked == 6
    assert {f.tensor for f in result["absmax [match conv*]"].failures} <= {
        "conv1.weight",
        "conv1.bias",
        "conv2.weight",
        "conv2.bias",
    }


def test_dangerous_file_is_exit_5_refused_as_unsafe() -> None:
    code, out, _ = run_cli("check", str(SAMPLES / "malicious_os_system.pt"), "--no-policy", "--dtype", "bf16")
    assert code == 5 and "no_dangerous_globals" in out  # worse than the failed dtype rule (1)
    assert run_cli("check", str(SAMPLES / "malicious_os_system.pt"), "--no-policy", "--allow-dangerous").exit_code == 0


def test_dangerous_globals_fail_by_default() -> None:
    result = run(statecli.open_checkpoint(SAMPLES / "malicious_os_system.pt"), Policy())
    assert not result.passed
    assert "posix.system" in result.results[0].failures[0].message
    assert run(statecli.open_checkpoint(SAMPLES / "malicious_os_system.pt"), Policy(allow_dangerous=True)).passed


def test_max_size(good: Path) -> None:
    assert rules(good, Policy(max_size=10))["max_size"][0].endswith("more than 10")
    assert rules(good, Policy(max_size=10**6))["max_size"] == []


# ----------------------------------------------------------------------------------------------- schema


def test_schema_round_trip_and_every_difference(tmp_path: Path) -> None:
    report = statecli.open_checkpoint(CNN)
    path = tmp_path / "s.json"
    code, out, _ = run_cli("schema", str(CNN))
    assert code == 0
    path.write_text(out)
    assert load_schema(path) == make_schema(report)
    assert compare(report, load_schema(path)) == []
    sd = torch.load(CNN, weights_only=True)
    del sd["fc.bias"]
    sd["extra"] = torch.ones(1)
    sd["fc.weight"] = torch.ones(3, 3)
    sd["conv1.bias"] = sd["conv1.bias"].half()
    torch.save(sd, tmp_path / "new.pt")
    diffs = {(d.name, d.what) for d in compare(statecli.open_checkpoint(tmp_path / "new.pt"), load_schema(path))}
    assert diffs == {("fc.bias", "missing"), ("extra", "unexpected"), ("fc.weight", "shape"), ("conv1.bias", "dtype")}
    code, out, _ = run_cli("check", str(tmp_path / "new.pt"), "--schema", str(path), "--no-policy", "-f", "json")
    assert code == 1
    (schema_rule,) = [r for r in json.loads(out)["rules"] if r["rule"] == "schema"]
    assert len(schema_rule["failures"]) == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not JSON"),
        ('{"schema": "other/1", "tensors": {}}', "'schema' is 'other/1'"),
        ('{"schema": "statecli.schema/1", "tensors": []}', "'tensors' must be an object"),
        ('{"schema": "statecli.schema/1", "tensors": {"w": {"dtype": "f32", "shape": [1]}}}', "schema entry 'w'"),
    ],
)
def test_a_schema_file_that_is_not_one(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "s.json"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_schema(path)
    code, out, err = run_cli("check", str(CNN), "--schema", str(path), "--no-policy")
    assert code == 3 and message.split("'")[0] in err and "Traceback" not in err and out == ""


# ----------------------------------------------------------------------------------------------- policy files


POLICY = """
[check]
dtype = ["fp32", "int64"]
no_nan = true
max_size = "1MB"
forbidden = ["optimizer.*"]

[[check.rules]]
match = ["*.running_var"]
role = "buffer"
absmax = 100.0
"""


def test_policy_file_and_pyproject(tmp_path: Path) -> None:
    (tmp_path / "statecli.toml").write_text(POLICY)
    policy = load_policy(str(tmp_path / "statecli.toml"))
    assert policy.max_size == 10**6
    assert policy.sets[0].dtype == ("float32", "int64")
    assert policy.sets[1].match == ("*.running_var",) and policy.sets[1].absmax == 100.0
    assert run(statecli.open_checkpoint(CNN), policy).passed
    (tmp_path / "pyproject.toml").write_text(POLICY.replace("[check]", "[tool.statecli.check]").replace(
        "[[check.rules]]", "[[tool.statecli.check.rules]]"
    ))  # fmt: skip
    assert load_policy(str(tmp_path / "pyproject.toml")).sets[1].roles == ("buffer",)


def test_policy_is_discovered_in_the_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "statecli.toml").write_text('[check]\ndtype = ["bf16"]\n')
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("check", str(CNN))
    assert code == 1 and "using the policy in ./statecli.toml" in err
    code, _, _ = run_cli("check", str(CNN), "--no-policy")
    assert code == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[check]\nno_nans = true\n", "unknown rule 'no_nans'"),
        ('[check]\ndtype = ["f33"]\n', "unknown dtype 'f33'"),
        ("[check]\nabsmax = -1\n", "'absmax' must be a non-negative number"),
        ('[check]\nno_nan = "yes"\n', "'no_nan' must be true or false"),
        ('[check]\nmax_size = "big"\n', "cannot read size 'big'"),
        ('[check]\n[[check.rules]]\nmax_size = "1GB"\n', "applies to the whole checkpoint"),
        ('[check]\n[[check.rules]]\nrole = "weights"\n', "unknown role 'weights'"),
        ("[nothing]\n", "no [check] table"),
        ("[check\n", "not valid TOML"),
    ],
)
def test_bad_policy_is_exit_2_with_a_message(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "statecli.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_policy(str(path))
    code, out, err = run_cli("check", str(CNN), "--policy", str(path))
    assert code == 2 and out == "" and "Traceback" not in err
    assert message in err


def test_unknown_dtype_flag_is_exit_2() -> None:
    code, _, err = run_cli("check", str(CNN), "--dtype", "f33", "--no-policy")
    assert code == 2 and "unknown dtype 'f33'" in err


# ----------------------------------------------------------------------------------------------- outputs


def test_junit_parses_with_one_case_per_rule(bad: Path) -> None:
    code, out, _ = run_cli("check", str(bad), "--no-nan", "--dtype", "fp32", "--no-policy", "-f", "junit")
    assert code == 1
    root = ET.fromstring(out)
    suite = root.find("testsuite")
    assert suite is not None
    cases = suite.findall("testcase")
    assert [c.get("name", "").split(":")[0] for c in cases] == ["no_dangerous_globals", "dtype", "no_nan"]
    failures = [c.find("failure") for c in cases]
    assert failures[0] is None and failures[1] is not None and failures[2] is not None
    assert "opt.m: dtype float64" in (failures[1].text or "")
    assert suite.get("failures") == "2" and suite.get("tests") == "3"


def test_github_annotations_escape_and_name_the_file(bad: Path) -> None:
    code, out, _ = run_cli("check", str(bad), "--no-nan", "--no-policy", "-f", "github")
    assert code == 1
    assert out == f"::error file={bad},title=statecli check%3A no_nan::w: 1 NaN value\n"
    code, out, _ = run_cli("check", str(CNN), "--no-policy", "-f", "github")
    assert code == 0 and out == f"::notice file={CNN},title=statecli check::1 rule passed\n"
    code, out, _ = run_cli("check", str(CNN), "--no-policy", "--no-nan", "-f", "github")
    assert code == 0 and out.endswith("::2 rules passed\n")


def test_html_is_a_self_contained_page(bad: Path) -> None:
    code, out, _ = run_cli("check", str(bad), "--no-nan", "--no-policy", "-f", "html")
    assert code == 1
    assert out.lstrip().startswith("<!DOCTYPE html>") and "w: 1 NaN value" in out and "<script" not in out


def test_json_and_table(bad: Path) -> None:
    code, out, _ = run_cli("check", str(bad), "--no-inf", "--no-policy", "-f", "json")
    doc = json.loads(out)
    assert code == 1 and doc["schema"] == "statecli.check/1" and doc["passed"] is False
    (inf,) = [r for r in doc["rules"] if r["rule"] == "no_inf"]
    assert inf["failures"][1] == {"tensor": "b", "message": "b: 2 inf values", "value": 2}
    code, out, _ = run_cli("check", str(bad), "--no-inf", "--no-policy")
    assert "✘  no_inf" in out and "b: 2 inf values" in out and "FAILED: 1 of 2 rules" in out


def test_missing_checkpoint_is_exit_3() -> None:
    code, out, err = run_cli("check", "no/such.pt", "--no-policy")
    assert code == 3 and out == "" and "no such file" in err


def test_python_api_mirrors_the_command(good: Path) -> None:
    result = statecli.check(good, Policy(sets=[RuleSet(no_nan=True)]))
    assert result.passed and os.fspath(good) == result.path


def test_several_files_as_pre_commit_passes_them(good: Path, bad: Path, tmp_path: Path) -> None:
    code, out, _ = run_cli("check", str(good), str(bad), "--no-nan", "--no-policy", "-f", "junit")
    assert code == 1
    suites = ET.fromstring(out).findall("testsuite")
    assert [s.get("failures") for s in suites] == ["0", "1"]
    code, out, err = run_cli("check", str(good), str(tmp_path / "gone.pt"), "--no-policy", "-f", "json")
    assert code == 3 and "gone.pt" in err
    docs = json.loads(out)
    assert [d["passed"] for d in docs] == [True, False] and docs[1]["error"]["exit_code"] == 3  # named, not dropped


def test_pre_commit_hook_runs_check(repo_root: Path) -> None:
    text = (repo_root / ".pre-commit-hooks.yaml").read_text()
    assert "id: statecli-check" in text and "entry: statecli check" in text
    assert r"files: \.(pt|pth|bin|ckpt|safetensors)$" in text


@pytest.fixture
def on_sample_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(SAMPLES))


def test_check_model_passes_and_fails_like_load_state_dict(on_sample_path: None, tmp_path: Path) -> None:
    code, out, err = run_cli("check", str(CNN), "--model", "sample_nets:SmallCNN", "--no-policy", "-f", "json")
    assert code == 0, err
    (rule,) = [r for r in json.loads(out)["rules"] if r["rule"] == "model"]
    assert rule["passed"] and rule["checked"] == 16
    code, out, _ = run_cli("check", str(SAMPLES / "lightning.ckpt"), "--model", "sample_nets:SmallCNN", "--no-policy")
    assert code == 1
    assert "conv1.weight: missing" in out and "model.conv1.weight: unexpected" in out
    assert "fix: all 16 keys match after stripping the prefix 'model.'" in out


def test_inspect_model_gives_exact_roles(on_sample_path: None) -> None:
    code, out, err = run_cli("inspect", str(CNN), "--model", "sample_nets:SmallCNN", "-f", "json")
    assert code == 0, err
    tensors = {t["name"]: t for t in json.loads(out)["tensors"]}
    assert tensors["bn1.running_mean"]["evidence"] == "model" and tensors["bn1.running_mean"]["exact"] is True
    assert tensors["fc.weight"]["role"] == "parameter" and tensors["fc.weight"]["exact"] is True
    assert "loads into sample_nets:SmallCNN (strict)" in err


@pytest.mark.parametrize(
    ("spec", "message"),
    [("no_colon", "model spec 'no_colon'"), ("nope:X", "cannot import module 'nope'"), ("sample_nets:Nope", "Nope")],
)
def test_bad_model_spec_is_exit_2(on_sample_path: None, spec: str, message: str) -> None:
    for command in ("inspect", "check"):
        code, out, err = run_cli(command, str(CNN), "--model", spec, *(("--no-policy",) if command == "check" else ()))
        assert code == 2, (command, err)
        assert message in err and "Traceback" not in err and out == ""


def test_reference_rule_uses_diff_tolerances(tmp_path: Path) -> None:
    bf16 = tmp_path / "cnn-bf16.safetensors"
    statecli.convert(CNN, bf16, dtype="bf16")
    code, _, err = run_cli("check", str(bf16), "--reference", str(CNN), "--rtol", "4e-3", "--no-policy")
    assert code == 0, err
    code, out, _ = run_cli("check", str(bf16), "--reference", str(CNN), "--atol", "1e-6", "--no-policy", "-f", "json")
    assert code == 1
    (rule,) = [r for r in json.loads(out)["rules"] if r["rule"] == "reference"]
    assert rule["failures"] and all("max abs diff" in f["message"] for f in rule["failures"])
    # values statecli does not read (quantized) are not failures
    same = str(SAMPLES / "all_dtypes.pt")
    assert run_cli("check", same, "--reference", same, "--no-policy").exit_code == 0


def test_a_flag_tolerance_of_0_overrides_the_policy_file(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(f'[check]\nreference = "{CNN}"\natol = 1.0\n')
    bf16 = tmp_path / "cnn-bf16.safetensors"
    statecli.convert(CNN, bf16, dtype="bf16")
    assert run_cli("check", str(bf16), "--policy", str(tmp_path / "p.toml")).exit_code == 0
    assert run_cli("check", str(bf16), "--policy", str(tmp_path / "p.toml"), "--atol", "0").exit_code == 1


def test_check_model_fails_an_integer_tensor_where_the_model_has_floats(on_sample_path: None, tmp_path: Path) -> None:
    sd = torch.load(CNN, weights_only=True)
    sd["fc.bias"] = sd["fc.bias"].long()
    torch.save(sd, tmp_path / "m.pt")
    code, out, _ = run_cli("check", str(tmp_path / "m.pt"), "--model", "sample_nets:SmallCNN", "--no-policy")
    assert code == 1 and "fc.bias: dtype int64 in the file, float32 in the model" in out


def test_sparse_tensors_are_not_a_dangerous_finding(tmp_path: Path) -> None:
    # torch pickles a sparse tensor's layout as torch.serialization._get_layout('torch.sparse_coo'): a lookup
    # among torch's layouts that runs nothing, so it must not make `check` refuse the file.
    torch.save({"s": torch.eye(3).to_sparse(), "w": torch.ones(2)}, tmp_path / "sparse.pt")
    report = statecli.open_checkpoint(tmp_path / "sparse.pt")
    assert not [f for f in report.findings if f.level == "dangerous"]
    assert {t.name: t.layout for t in report.tensors} == {"s": "sparse_coo", "w": "strided"}
    assert run_cli("check", str(tmp_path / "sparse.pt"), "--no-policy").exit_code == 0


# ------------------------------------------------------------------------------------ scopes that select nothing

SAFETENSORS = SAMPLES / "cnn_bn.safetensors"
EMPTY_SCOPE = (
    "no tensor matches the filters (match nothing*) among the 16 in the file: the rules they scope checked nothing"
)


@pytest.mark.parametrize("fmt", ["table", "json", "junit", "github", "html"])
def test_a_glob_that_matches_nothing_fails_in_every_format(fmt: str) -> None:
    code, out, err = run_cli("check", str(SAFETENSORS), "--match", "nothing*", "--no-nan", "--no-policy", "-f", fmt)
    assert code == 1
    assert err == f"statecli: warning: {SAFETENSORS}: {EMPTY_SCOPE}\n"
    if fmt == "json":
        doc = json.loads(out)
        assert doc["passed"] is False
        (rule,) = [r for r in doc["rules"] if r["rule"] == "selects_tensors"]
        assert rule == {
            "rule": "selects_tensors",
            "scope": "match nothing*",
            "expected": "selects at least one tensor",
            "checked": 16,
            "passed": False,
            "failures": [{"tensor": None, "message": EMPTY_SCOPE, "value": 0}],
            "allowed": [],
            "unread": [],
        }
    elif fmt == "junit":
        suite = ET.fromstring(out).find("testsuite")
        assert suite is not None and suite.get("failures") == "1"
        failure = suite.find("testcase[@classname='statecli.check.selects_tensors']/failure")
        assert failure is not None and failure.text == EMPTY_SCOPE
    elif fmt == "github":
        assert out == f"::error file={SAFETENSORS},title=statecli check%3A selects_tensors [match nothing*]::" + (
            EMPTY_SCOPE + "\n"
        )
    else:
        assert "selects_tensors" in out and EMPTY_SCOPE in out
        if fmt == "table":
            assert "FAILED: 1 of 3 rules" in out


def test_a_role_or_policy_scope_that_selects_nothing_fails(tmp_path: Path) -> None:
    code, out, err = run_cli("check", str(SAFETENSORS), "--role", "other", "--no-policy")
    assert code == 1 and "✘  selects_tensors [role other]" in out
    assert "no tensor matches the filters (role other) among the 16 in the file" in err
    (tmp_path / "p.toml").write_text('[check]\n[[check.rules]]\nmatch = ["*.runing_var"]\nabsmax = 1e6\n')
    code, out, err = run_cli("check", str(CNN), "--policy", str(tmp_path / "p.toml"), "-f", "json")
    assert code == 1
    failed = [(r["rule"], r["scope"]) for r in json.loads(out)["rules"] if not r["passed"]]
    assert failed == [("selects_tensors", "match *.runing_var")]
    assert "(match *.runing_var)" in err
    # a scope that selects a tensor adds nothing
    code, out, err = run_cli(
        "check", str(CNN), "--match", "*.running_var", "--absmax", "1e6", "--no-policy", "-f", "json"
    )
    assert code == 0 and err == ""
    assert [r["rule"] for r in json.loads(out)["rules"]] == ["no_dangerous_globals", "absmax"]


def test_a_file_without_tensors_fails_the_rules_on_tensors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 3}, empty)
    code, out, err = run_cli("check", str(empty), "--no-nan", "--no-policy", "-f", "json")
    assert code == 1
    message = "the checkpoint holds no tensor: the rules on all tensors checked nothing"
    assert err == f"statecli: warning: {empty}: {message}\n"
    (rule,) = [r for r in json.loads(out)["rules"] if r["rule"] == "selects_tensors"]
    assert rule["scope"] == "all tensors" and rule["failures"][0]["message"] == message
    # no rule on tensors asked for: nothing to fail
    assert run_cli("check", str(empty), "--max-size", "1MB", "--no-policy").exit_code == 0
    code, out, _ = run_cli("check", str(empty), "--match", "w*", "--no-policy")
    assert code == 1 and "(match w*) (the file holds no tensor)" in out


def test_a_reference_rule_that_compares_nothing_fails(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pt"
    torch.save({}, empty)
    failures = rules(empty, Policy(reference=str(empty)))["reference"]
    assert failures == ["neither this checkpoint nor the reference holds a tensor: nothing compared"]


# ------------------------------------------------------------------------------------ --allow-dangerous

MALICIOUS = SAMPLES / "malicious_os_system.pt"
POSIX = "pickle would call posix.system('touch statecli_pwned_marker'); statecli did not run it"


@pytest.mark.parametrize("fmt", ["table", "json", "junit", "github", "html"])
def test_allow_dangerous_reports_the_global_as_allowed(fmt: str) -> None:
    code, out, err = run_cli("check", str(MALICIOUS), "--allow-dangerous", "--no-policy", "-f", fmt)
    assert code == 0
    assert err == f"statecli: warning: {MALICIOUS}: {POSIX} (dangerous-global)\n"  # as inspect and stats say it
    if fmt == "json":
        doc = json.loads(out)
        assert doc["passed"] is True
        (rule,) = doc["rules"]
        assert rule["rule"] == "no_dangerous_globals" and rule["passed"] is True and rule["failures"] == []
        assert rule["allowed"] == [{"tensor": None, "message": POSIX, "value": "dangerous-global"}]
        assert "allow_dangerous" in rule["expected"]
    elif fmt == "junit":
        root = ET.fromstring(out)
        assert root.get("tests") == "1" and root.get("failures") == "0"
        case = root.find("testsuite/testcase[@classname='statecli.check.no_dangerous_globals']")
        assert case is not None and case.find("failure") is None
        assert case.findtext("system-out") == f"allowed: {POSIX}"
    elif fmt == "github":
        lines = out.splitlines()
        assert lines[0] == (
            f"::warning file={MALICIOUS},title=statecli check%3A no_dangerous_globals (allowed)::{POSIX}"
        )
        assert lines[1].startswith("::notice ")
    else:
        out = html.unescape(out)
        assert "1 allowed" in out and POSIX in out
        if fmt == "table":
            assert "!  no_dangerous_globals" in out and "passed: 1 rule" in out


def test_without_allow_dangerous_the_file_is_still_refused() -> None:
    code, out, err = run_cli("check", str(MALICIOUS), "--no-policy", "-f", "json")
    assert code == 5 and err == ""
    (rule,) = json.loads(out)["rules"]
    assert rule["passed"] is False and rule["allowed"] == [] and rule["failures"][0]["message"] == POSIX


def test_allow_dangerous_help_says_what_it_does() -> None:
    code, out, _ = run_cli("check", "--help")
    assert code == 0
    text = " ".join(out.replace("│", " ").split())
    assert "on by default" not in text
    assert "instead of refusing the file with exit 5" in text


def test_value_rules_count_only_the_tensors_they_read() -> None:
    # all_dtypes.pt holds quantized and packed-fp4 tensors whose values statecli does not read: a gate must
    # not report them as checked, and says which they are.
    code, out, err = run_cli(
        "check", str(SAMPLES / "all_dtypes.pt"), "--no-policy", "--no-nan", "--absmax", "1e9", "-f", "json"
    )
    assert code == 0
    rules = {r["rule"]: r for r in json.loads(out)["rules"]}
    unread = {"quint8", "qint8", "qint32", "quint4x2", "qint8_per_channel", "float4_e2m1fn_x2"}
    for name in ("no_nan", "absmax"):
        assert set(rules[name]["unread"]) == unread
        assert rules[name]["checked"] == 32 - len(unread)
    assert rules["no_dangerous_globals"]["unread"] == []
    assert err.count("statecli: note: ") == 2 and "6 tensors not checked, their values are not read" in err
    # A file whose every tensor is read: nothing unread, no note.
    code, out, err = run_cli("check", str(CNN), "--no-policy", "--no-nan", "-f", "json")
    assert code == 0 and err == ""
    assert all(r["unread"] == [] for r in json.loads(out)["rules"])


def test_a_dangerous_reference_is_refused_like_a_dangerous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where the payload would create its marker
    code, out, err = run_cli("check", str(CNN), "--no-policy", "--reference", str(MALICIOUS), "-f", "json")
    assert code == 5 and err == ""
    rules = {(r["rule"], r["scope"]): r for r in json.loads(out)["rules"]}
    ref = rules[("no_dangerous_globals", "reference")]
    assert ref["passed"] is False and ref["failures"][0]["message"] == f"reference {MALICIOUS}: {POSIX}"
    assert rules[("no_dangerous_globals", "all tensors")]["passed"] is True
    # Allowed: reported on stderr and as allowed, no longer refused (the comparison itself still fails here).
    code, out, err = run_cli(
        "check", str(CNN), "--no-policy", "--reference", str(MALICIOUS), "--allow-dangerous", "-f", "json"
    )
    assert code == 1
    assert err == f"statecli: warning: reference {MALICIOUS}: {POSIX}\n"
    ref = next(r for r in json.loads(out)["rules"] if r["scope"] == "reference")
    assert ref["passed"] is True and ref["allowed"][0]["message"] == f"reference {MALICIOUS}: {POSIX}"
    assert list(tmp_path.iterdir()) == []  # nothing ran


# --- dtype rules mean what users mean (#13, item 2) ---------------------------------------------------


@pytest.mark.parametrize("target", ["bf16", "fp16"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_what_convert_writes_passes_check_with_the_same_dtype(tmp_path: Path, target: str, suffix: str) -> None:
    # The int64 num_batches_tracked counters are not floating: convert keeps them, and check does not ask
    # them to be bf16 (it did, so a correctly converted BatchNorm model could never pass).
    out = tmp_path / f"model{suffix}"
    assert run_cli("convert", str(CNN), "-o", str(out), "--dtype", target).exit_code == 0
    result = run_cli("check", str(out), "--no-policy", "--dtype", target)
    assert result.exit_code == 0, result.stdout
    assert "(floating tensors)" in result.stdout


def test_a_dtype_of_another_kind_holds_that_kind_only_when_named(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(2, dtype=torch.bfloat16), "step": torch.tensor(3, dtype=torch.int32)}, path)
    assert run_cli("check", str(path), "--no-policy", "--dtype", "bf16").exit_code == 0
    named = run_cli("check", str(path), "--no-policy", "--dtype", "bf16", "--dtype", "int64")
    assert named.exit_code == 1 and "step: dtype int32, allowed bfloat16, int64" in named.stdout


def test_a_scoped_dtype_replaces_the_top_level_one_for_its_tensors(tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    assert run_cli("convert", str(CNN), "-o", str(out), "--dtype", "bf16", "--keep-buffers").exit_code == 0
    report = statecli.open_checkpoint(out)
    top = RuleSet(dtype=("bfloat16", "int64"))
    stats_fp32 = RuleSet(match=("*.running_mean", "*.running_var"), roles=("buffer",), dtype=("float32",))
    alone = run(report, Policy(sets=[top]))
    assert {f.tensor for r in alone.results for f in r.failures} == {
        "bn1.running_mean",
        "bn1.running_var",
        "bn2.running_mean",
        "bn2.running_var",
    }
    both = run(report, Policy(sets=[top, stats_fp32]))
    assert both.passed, [f.message for r in both.results for f in r.failures]
    (top_rule,) = [r for r in both.results if r.rule == "dtype" and r.scope == "all tensors"]
    assert top_rule.checked == 12  # 16 tensors, less the 4 statistics the scoped set holds to float32


def test_the_docs_policy_passes_on_what_the_docs_convert_command_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "check.md").read_text(encoding="utf-8")
    command = page[page.index("`statecli convert model.pt") + 1 :].split("`", 1)[0].split()
    policy = page[page.index("```toml\n[check]") + len("```toml\n") :].split("```", 1)[0]
    model = tmp_path / "model.pt"
    model.write_bytes(CNN.read_bytes())
    monkeypatch.chdir(tmp_path)
    assert run_cli(*command[1:]).exit_code == 0
    (tmp_path / "model.schema.json").write_text(run_cli("schema", "model-bf16.safetensors").stdout)
    (tmp_path / "statecli.toml").write_text(policy)
    result = run_cli("check", "model-bf16.safetensors", "--policy", "statecli.toml")
    assert result.exit_code == 0, result.stdout
