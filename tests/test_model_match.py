"""``--model module:callable``: loading the factory, building on meta, matching key by key.

torch's own ``load_state_dict(strict=False)`` is the oracle for missing / unexpected keys and size
mismatches: each perturbed state dict is saved with ``torch.save``, read by statecli, and loaded by torch.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import textwrap
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import statecli
from statecli.errors import UsageError
from statecli.model_match import ModelMatch, Rename, build_model, build_on_meta, load_factory, match

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
import sample_nets  # noqa: E402

SIZE_MISMATCH = re.compile(r"size mismatch for ([^:]+):")


# ----------------------------------------------------------------------------------------------- helpers

_counter = itertools.count()


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_factory puts the current folder on sys.path for good; keep that out of other tests."""
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Write a module of user code under a fresh name on sys.path; returns its name. Cleaned up after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []

    def write(source: str) -> str:
        name = f"statecli_user_mod_{next(_counter)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def save(tmp_path: Path, sd: dict[str, torch.Tensor], name: str = "ckpt.pt") -> Path:
    path = tmp_path / name
    torch.save(sd, path)
    return path


def oracle(model: nn.Module, path: Path) -> tuple[set[str], set[str], set[str]]:
    """(missing, unexpected, size-mismatched) as torch's load_state_dict reports them for this file."""
    sd = torch.load(path, weights_only=True, map_location="cpu")
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # size mismatches raise even with strict=False; missing/unexpected not then
        sized = set(SIZE_MISMATCH.findall(str(e)))
        assert sized, str(e)
        keys = set(model.state_dict())
        return keys - set(sd), set(sd) - keys, sized
    return set(result.missing_keys), set(result.unexpected_keys), set()


def matched(path: Path | str, spec_or_model: str | nn.Module) -> ModelMatch:
    model = build_model(spec_or_model) if isinstance(spec_or_model, str) else spec_or_model
    return match(statecli.open_checkpoint(path), model)


def nbt_keys(keys: set[str] | list[str]) -> set[str]:
    return {k for k in keys if k.endswith(".num_batches_tracked")}


# ----------------------------------------------------------------------------------- matching samples


@pytest.mark.parametrize(
    ("sample", "spec"),
    [
        ("cnn_bn_state_dict.pt", "sample_nets:SmallCNN"),
        ("cnn_bn_module.pt", "sample_nets:SmallCNN"),
        ("cnn_bn_keep_vars.pt", "sample_nets:SmallCNN"),
        ("cnn_bn.safetensors", "sample_nets:SmallCNN"),
        ("cuda_tagged.pt", "sample_nets:SmallCNN"),
        ("training_adam.pt", "sample_nets:SmallCNN"),  # the model state under "model"; optimizer ignored
        ("frozen_nonpersistent_module.pt", "sample_nets:FrozenNet"),
        ("tied_lm.pt", "sample_nets:TinyLM"),
        ("sharded/model.safetensors.index.json", "sample_nets:TinyLM"),
    ],
)
def test_matching_samples_are_ok(sample: str, spec: str) -> None:
    model = build_model(spec)
    m = matched(SAMPLES / sample, model)
    assert m.ok, m.to_dict()
    assert m.missing == m.unexpected == m.shape_mismatch == m.dtype_mismatch == []
    assert m.suggestions == [] and m.rename is None
    assert m.matched == m.file_keys == m.model_keys == len(model.state_dict())
    # Every tensor gets the model's exact role.
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    assert m.roles == {**dict.fromkeys(buffers, "buffer"), **dict.fromkeys(params, "parameter")}
    assert m.requires_grad == {n: t.requires_grad for n, t in {**buffers, **params}.items()}


def test_roles_and_requires_grad_come_from_the_model() -> None:
    m = matched(SAMPLES / "frozen_nonpersistent_module.pt", "sample_nets:FrozenNet")
    assert m.roles["backbone.0.weight"] == "parameter"
    assert m.requires_grad["backbone.0.weight"] is False  # frozen in FrozenNet.__init__
    assert m.requires_grad["head.weight"] is True
    assert m.roles["scale"] == "buffer" and m.requires_grad["scale"] is False
    # The non-persistent buffer: not expected in a state dict, listed, and its role still known.
    assert m.non_persistent == ["cache"]
    assert m.roles["cache"] == "buffer"
    assert m.file_keys == 7 and "cache" not in m.missing + m.unexpected

    cnn = matched(SAMPLES / "cnn_bn_state_dict.pt", "sample_nets:SmallCNN")
    assert cnn.roles["bn1.running_mean"] == "buffer"
    assert cnn.roles["bn1.num_batches_tracked"] == "buffer"
    assert cnn.roles["bn1.weight"] == "parameter"

    tied = matched(SAMPLES / "tied_lm.pt", "sample_nets:TinyLM")
    assert tied.roles["lm_head.weight"] == tied.roles["embed.weight"] == "parameter"
    assert tied.roles["position_ids"] == tied.roles["rotary_emb.inv_freq"] == "buffer"


def test_to_dict_is_json_with_a_schema() -> None:
    m = matched(SAMPLES / "lightning.ckpt", "sample_nets:SmallCNN")
    d = json.loads(json.dumps(m.to_dict()))
    assert d["schema"] == "statecli.model_match/1"
    assert d["model"] == "sample_nets.SmallCNN"
    assert d["ok"] is False
    assert d["counts"] == {"file": 16, "model": 16, "matched": 0}
    assert d["rename"] == {"strip": "model.", "add": ""}
    assert set(d) == {
        "schema",
        "model",
        "ok",
        "counts",
        "missing",
        "unexpected",
        "shape_mismatch",
        "dtype_mismatch",
        "roles",
        "requires_grad",
        "non_persistent",
        "rename",
        "suggestions",
    }


# --------------------------------------------------------------------------------------- torch oracle


def _perturbations(sd: OrderedDict[str, torch.Tensor]) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    keys = list(sd)
    yield "as is", sd
    yield "drop first", OrderedDict((k, v) for k, v in sd.items() if k != keys[0])
    yield "drop last", OrderedDict((k, v) for k, v in sd.items() if k != keys[-1])
    yield "add root key", OrderedDict([*sd.items(), ("extra", torch.zeros(2))])
    yield "add nested key", OrderedDict([*sd.items(), (keys[0].rpartition(".")[0] + ".extra", torch.zeros(2))])
    yield "module. prefix", OrderedDict((f"module.{k}", v) for k, v in sd.items())
    yield "prefix and extra", OrderedDict([*((f"module.{k}", v) for k, v in sd.items()), ("step", torch.tensor(3))])
    first = keys[0]
    bigger = torch.zeros(*(s + 1 for s in sd[first].shape))
    yield "wrong shape", OrderedDict((k, bigger if k == first else v) for k, v in sd.items())


@pytest.mark.parametrize("cls", [sample_nets.SmallCNN, sample_nets.FrozenNet, sample_nets.TinyLM])
def test_missing_and_unexpected_equal_torch(cls: type[nn.Module], tmp_path: Path) -> None:
    torch.manual_seed(0)
    for what, sd in _perturbations(cls().state_dict()):
        path = save(tmp_path, sd, "p.pt")
        missing, unexpected, sized = oracle(cls(), path)
        m = matched(path, build_on_meta(cls))
        # torch's BatchNorm fills in an absent num_batches_tracked when the dict records no version 2 for
        # that module (a plain dict, or a prefix hiding the version): statecli lists those as missing.
        assert set(m.missing) - nbt_keys(m.missing) == missing - nbt_keys(missing), what
        assert nbt_keys(missing) <= nbt_keys(m.missing), what
        assert set(m.unexpected) == unexpected, what
        assert len(m.unexpected) == len(unexpected), what
        assert {s.name for s in m.shape_mismatch} == sized, what
        assert m.ok == (not m.missing and not unexpected and not sized), what


def test_num_batches_tracked_missing_equals_torch_when_the_version_is_recorded(tmp_path: Path) -> None:
    sd = sample_nets.SmallCNN().state_dict()  # keeps _metadata: BatchNorm version 2
    del sd["bn1.num_batches_tracked"]
    path = save(tmp_path, sd)
    missing, unexpected, _ = oracle(sample_nets.SmallCNN(), path)
    assert missing == {"bn1.num_batches_tracked"} and not unexpected
    m = matched(path, "sample_nets:SmallCNN")
    assert m.missing == ["bn1.num_batches_tracked"] and m.unexpected == []


def test_size_mismatch_of_a_wrong_architecture(tmp_path: Path, user_module: Callable[[str], str]) -> None:
    mod = user_module(
        """
        from sample_nets import SmallCNN

        def narrow():
            return SmallCNN(width=4, num_classes=3)
        """
    )
    m = matched(SAMPLES / "cnn_bn_state_dict.pt", f"{mod}:narrow")
    assert not m.ok and m.missing == [] and m.unexpected == []
    by_name = {s.name: s for s in m.shape_mismatch}
    assert by_name["conv1.weight"].file_shape == (8, 3, 3, 3)
    assert by_name["conv1.weight"].model_shape == (4, 3, 3, 3)
    assert by_name["fc.weight"].model_shape == (3, 8)
    assert "bn1.num_batches_tracked" not in by_name  # 0-dim in both
    _, _, sized = oracle(sample_nets.SmallCNN(width=4, num_classes=3), SAMPLES / "cnn_bn_state_dict.pt")
    assert set(by_name) == sized
    assert any("shape" in s for s in m.suggestions)


def test_a_legacy_one_element_tensor_loads_into_a_0_dim_buffer(tmp_path: Path) -> None:
    sd = sample_nets.SmallCNN().state_dict()
    sd["bn1.num_batches_tracked"] = torch.tensor([2])  # PyTorch 0.3 style: (1,) where the model has ()
    path = save(tmp_path, sd)
    assert oracle(sample_nets.SmallCNN(), path) == (set(), set(), set())
    assert matched(path, "sample_nets:SmallCNN").ok


# ----------------------------------------------------------------------------------------- dtypes


def test_dtype_mismatch_float_is_info_integer_is_warning(tmp_path: Path) -> None:
    sd = sample_nets.SmallCNN().state_dict()
    sd["fc.weight"] = sd["fc.weight"].half()
    sd["bn1.running_mean"] = sd["bn1.running_mean"].to(torch.int32)
    sd["bn2.num_batches_tracked"] = sd["bn2.num_batches_tracked"].to(torch.int32)
    path = save(tmp_path, sd)
    m = matched(path, "sample_nets:SmallCNN")
    assert m.ok  # load_state_dict casts on copy: dtype alone does not stop it
    levels = {d.name: (d.file_dtype, d.model_dtype, d.level) for d in m.dtype_mismatch}
    assert levels == {
        "fc.weight": ("float16", "float32", "info"),
        "bn1.running_mean": ("int32", "float32", "warning"),
        "bn2.num_batches_tracked": ("int32", "int64", "info"),
    }
    assert any("bn1.running_mean" in s and "int32" in s for s in m.suggestions)
    sample_nets.SmallCNN().load_state_dict(torch.load(path, weights_only=True))  # torch agrees: it loads


# ---------------------------------------------------------------------------------------- suggestions


def test_module_prefix_is_found_and_roles_follow_it(tmp_path: Path) -> None:
    sd = sample_nets.SmallCNN().state_dict()
    path = save(tmp_path, OrderedDict((f"module.{k}", v) for k, v in sd.items()))
    m = matched(path, "sample_nets:SmallCNN")
    assert not m.ok
    assert m.missing == list(sd) and m.unexpected == [f"module.{k}" for k in sd]  # what torch reports
    assert m.rename == Rename(strip="module.", add="")
    assert any("'module.'" in s and "DDP" in s and "--strip-prefix module." in s for s in m.suggestions)
    # The model still tells what each tensor is, under the file's names.
    assert m.roles["module.bn1.running_var"] == "buffer"
    assert m.roles["module.conv1.weight"] == "parameter"
    assert len(m.roles) == len(sd)


def test_prefix_mismatch_under_a_rename_is_still_compared(tmp_path: Path) -> None:
    sd = sample_nets.SmallCNN(num_classes=5).state_dict()
    path = save(tmp_path, OrderedDict((f"_orig_mod.{k}", v) for k, v in sd.items()))
    m = matched(path, "sample_nets:SmallCNN")
    assert m.rename == Rename(strip="_orig_mod.", add="")
    assert any("torch.compile" in s for s in m.suggestions)
    assert {(s.name, s.model_name) for s in m.shape_mismatch} == {
        ("_orig_mod.fc.weight", "fc.weight"),
        ("_orig_mod.fc.bias", "fc.bias"),
    }


def test_lightning_prefix_and_compound_prefix(tmp_path: Path) -> None:
    m = matched(SAMPLES / "lightning.ckpt", "sample_nets:SmallCNN")
    assert m.rename == Rename(strip="model.", add="")
    assert any("Lightning" in s for s in m.suggestions)
    assert m.roles["model.bn2.running_mean"] == "buffer"

    sd = sample_nets.SmallCNN().state_dict()
    path = save(tmp_path, OrderedDict((f"_orig_mod.module.{k}", v) for k, v in sd.items()))
    m = matched(path, "sample_nets:SmallCNN")
    assert m.rename == Rename(strip="_orig_mod.module.", add="")
    assert any("torch.compile, DDP / DataParallel" in s for s in m.suggestions)


def test_add_prefix_when_the_model_wraps_the_net(user_module: Callable[[str], str]) -> None:
    mod = user_module(
        """
        from torch import nn
        from sample_nets import SmallCNN

        class Wrapper(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = SmallCNN()
        """
    )
    m = matched(SAMPLES / "cnn_bn_state_dict.pt", f"{mod}:Wrapper")
    assert m.rename == Rename(strip="", add="net.")
    assert any("adding the prefix 'net.'" in s and "--add-prefix net." in s for s in m.suggestions)
    assert m.roles["bn1.running_var"] == "buffer"

    # Strip one prefix and add another.
    m = matched(SAMPLES / "lightning.ckpt", f"{mod}:Wrapper")
    assert m.rename == Rename(strip="model.", add="net.")


def test_no_rename_when_some_keys_do_not_match(tmp_path: Path) -> None:
    sd = sample_nets.SmallCNN().state_dict()
    renamed = OrderedDict((f"module.{k}", v) for k, v in sd.items())
    renamed["module.head.weight"] = torch.zeros(2)
    m = matched(save(tmp_path, renamed), "sample_nets:SmallCNN")
    assert m.rename is None and m.roles == {}
    assert not any("prefix" in s for s in m.suggestions)
    assert not any("num_batches_tracked" in s for s in m.suggestions)  # not while everything is missing


def test_num_batches_tracked_suggestion(tmp_path: Path) -> None:
    sd = sample_nets.SmallCNN().state_dict()
    old = OrderedDict((k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    m = matched(save(tmp_path, old), "sample_nets:SmallCNN")
    assert not m.ok
    assert m.missing == ["bn1.num_batches_tracked", "bn2.num_batches_tracked"] and m.unexpected == []
    assert len(m.suggestions) == 1
    assert "num_batches_tracked" in m.suggestions[0] and "strict=False is safe" in m.suggestions[0]

    # Combined with a DDP prefix: both suggestions.
    ddp = OrderedDict((f"module.{k}", v) for k, v in old.items())
    m = matched(save(tmp_path, ddp, "ddp.pt"), "sample_nets:SmallCNN")
    assert m.rename == Rename(strip="module.", add="")
    assert len(m.suggestions) == 2 and "num_batches_tracked" in m.suggestions[1]


def test_tied_weight_missing_is_harmless(tmp_path: Path) -> None:
    sd = sample_nets.TinyLM().state_dict()
    del sd["lm_head.weight"]  # what a deduplicating safetensors save leaves
    path = save(tmp_path, sd)
    missing, _, _ = oracle(sample_nets.TinyLM(), path)
    m = matched(path, "sample_nets:TinyLM")
    assert m.missing == ["lm_head.weight"] == sorted(missing)
    assert any("tied to 'embed.weight'" in s for s in m.suggestions)


def test_unexpected_non_persistent_buffer(tmp_path: Path) -> None:
    sd = sample_nets.FrozenNet().state_dict()
    sd["cache"] = torch.zeros(4)  # persistent in an older version of the model
    path = save(tmp_path, sd)
    _, unexpected, _ = oracle(sample_nets.FrozenNet(), path)
    m = matched(path, "sample_nets:FrozenNet")
    assert m.unexpected == ["cache"] == sorted(unexpected)
    assert m.roles["cache"] == "buffer"
    assert any("non-persistent" in s and "'cache'" in s for s in m.suggestions)


def test_checkpoint_without_model_tensors(tmp_path: Path) -> None:
    path = save(tmp_path, {"epoch": 3})  # type: ignore[dict-item]
    m = matched(path, "sample_nets:SmallCNN")
    assert not m.ok and m.file_keys == 0 and len(m.missing) == 16
    assert m.suggestions == ["the checkpoint holds no model tensors to match"]


# ------------------------------------------------------------------------------------------ on meta


def test_factory_runs_on_meta() -> None:
    model = build_model("sample_nets:TinyLM")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.device.type for b in model.buffers()} == {"meta"}
    assert model.lm_head.weight is model.embed.weight  # ties survive


def test_factory_creating_cpu_tensors_still_works(user_module: Callable[[str], str]) -> None:
    mod = user_module(
        """
        import torch
        from torch import nn

        def build():
            net = nn.Linear(3, 2)
            net.register_buffer("table", torch.arange(4, device="cpu"))
            return net
        """
    )
    model = build_model(f"{mod}:build")
    assert model.weight.device.type == "meta"
    assert model.table.device.type == "cpu"


def test_dotted_callable_path(user_module: Callable[[str], str]) -> None:
    mod = user_module(
        """
        from sample_nets import SmallCNN

        class Outer:
            class Inner:
                @staticmethod
                def build():
                    return SmallCNN()
        """
    )
    factory = load_factory(f"{mod}:Outer.Inner.build")
    assert isinstance(build_on_meta(factory), sample_nets.SmallCNN)


def test_module_found_in_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"statecli_cwd_mod_{next(_counter)}"
    (tmp_path / f"{name}.py").write_text("from torch import nn\n\ndef build():\n    return nn.Linear(2, 2)\n")
    monkeypatch.chdir(tmp_path)
    sys.path[:] = [p for p in sys.path if p not in ("", str(tmp_path))]
    try:
        assert isinstance(build_model(f"{name}:build"), nn.Linear)
        assert sys.path[0] == str(tmp_path)
    finally:
        sys.modules.pop(name, None)


# --------------------------------------------------------------------------------------- bad specs


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("sample_nets", "expected 'package.module:callable'"),
        (":SmallCNN", "expected 'package.module:callable'"),
        ("sample_nets:", "expected 'package.module:callable'"),
        ("models/net.py:Net", "looks like a file path"),
        ("sample_nets:Small-CNN", "not a valid callable name"),
        (
            "statecli_no_such_module_xyz:build",
            "cannot import module 'statecli_no_such_module_xyz': ModuleNotFoundError: No module named",
        ),
        ("sample_nets.nope:build", "cannot import module 'sample_nets.nope'"),
        ("sample_nets:SmallCN", "module 'sample_nets' has no attribute 'SmallCN' (did you mean 'SmallCNN'"),
        ("sample_nets:SmallCNN.nope", "sample_nets:SmallCNN has no attribute 'nope'"),
        ("sample_nets:__all__", "'__all__' is not callable (its type is 'list')"),
    ],
)
def test_bad_spec_is_a_usage_error(spec: str, needle: str) -> None:
    with pytest.raises(UsageError) as info:
        load_factory(spec)
    message = str(info.value)
    assert needle in message, message
    assert f"model spec {spec!r}" in message
    assert "\n" not in message
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("raise RuntimeError('no GPU here')\n", "importing '{mod}' failed: RuntimeError: no GPU here"),
        ("import statecli_missing_dependency_xyz\n", "ModuleNotFoundError: No module named"),
        ("import sys\nsys.exit(4)\n", "SystemExit: 4"),
        ("def build(:\n", "SyntaxError"),
    ],
)
def test_errors_while_importing_the_module_are_usage_errors(
    source: str, needle: str, user_module: Callable[[str], str]
) -> None:
    mod = user_module(source)
    with pytest.raises(UsageError) as info:
        load_factory(f"{mod}:build")
    assert needle.format(mod=mod) in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("def build():\n    raise ValueError('bad config')\n", "raised ValueError: bad config"),
        ("def build(width):\n    pass\n", "raised TypeError: build() missing 1 required positional argument"),
        ("def build():\n    return {'w': 1}\n", "returned a builtins.dict, not a torch.nn.Module"),
        ("import torch\n\ndef build():\n    return torch.zeros(2)\n", "returned a torch.Tensor, not a torch.nn.Module"),
    ],
)
def test_bad_factory_is_a_usage_error(source: str, needle: str, user_module: Callable[[str], str]) -> None:
    mod = user_module(source)
    factory = load_factory(f"{mod}:build")
    with pytest.raises(UsageError) as info:
        build_on_meta(factory, name=f"{mod}:build")
    message = str(info.value)
    assert needle in message, message
    assert f"{mod}:build" in message
    assert info.value.exit_code == 2
    if "TypeError" in needle:
        assert "called with no arguments" in message


def test_importing_model_match_does_not_import_torch() -> None:
    # The CLI may import this module on the inspect path; torch must wait until --model is used.
    code = "import sys, statecli.model_match; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_state_dict_hook_raising_is_a_usage_error(user_module: Callable[[str], str]) -> None:
    mod = user_module(
        """
        from torch import nn

        class Odd(nn.Linear):
            def __init__(self):
                super().__init__(2, 2)

            def get_extra_state(self):
                raise RuntimeError("not on meta")
        """
    )
    with pytest.raises(UsageError, match=r"state dict of .*Odd failed: RuntimeError: not on meta"):
        matched(SAMPLES / "cnn_bn_state_dict.pt", f"{mod}:Odd")
