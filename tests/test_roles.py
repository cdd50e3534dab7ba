"""Each named role rule: what it matches, what it must not match, and that a guess is never exact."""

from __future__ import annotations

from pathlib import Path

import pytest

from statecli.records import Container, RawCheckpoint, RawTensor, Summary
from statecli.roles import RULES, infer, resolve


def raw(name: str, dtype: str = "float32", shape: tuple[int, ...] = (4,)) -> RawTensor:
    return RawTensor(name=name, dtype=dtype, shape=shape)


@pytest.mark.parametrize(
    ("name", "dtype", "shape", "evidence"),
    [
        ("bn1.running_mean", "float32", (8,), "rule:batchnorm-stats"),
        ("layer1.0.bn2.running_var", "float32", (8,), "rule:batchnorm-stats"),
        ("bn1.num_batches_tracked", "int64", (), "rule:batchnorm-stats"),
        ("encoder.sync_bn.running_mean", "float16", (8,), "rule:batchnorm-stats"),
        ("inorm.running_var", "float32", (3,), "rule:batchnorm-stats"),
        ("fc.activation_post_process.scale", "float32", (1,), "rule:quant-observer"),
        ("fc.weight_fake_quant.zero_point", "int32", (1,), "rule:quant-observer"),
        ("quant.activation_post_process_0.min_val", "float32", (), "rule:quant-observer"),
        ("conv.weight_fake_quant.activation_post_process.max_val", "float32", (), "rule:quant-observer"),
        ("embeddings.position_ids", "int64", (1, 512), "rule:position-ids"),
        ("embeddings.token_type_ids", "int64", (1, 512), "rule:position-ids"),
        ("model.layers.0.self_attn.rotary_emb.inv_freq", "float32", (64,), "rule:rotary-inv-freq"),
        ("h.0.attn.bias", "bool", (1, 1, 16, 16), "rule:causal-mask"),
        ("h.3.attn.bias", "float32", (1, 1, 1024, 1024), "rule:causal-mask"),
        ("h.0.attn.masked_bias", "float32", (), "rule:causal-mask"),
        ("embedding.codebook_index", "int64", (16,), "rule:integer-dtype"),
        ("mask", "bool", (4, 4), "rule:integer-dtype"),
        ("lookup", "uint8", (10,), "rule:integer-dtype"),
        ("lookup", "uint8", (5057,), "rule:integer-dtype"),  # a uint8 table of any other size
        ("enc.parametrizations.weight.0._u", "float32", (4,), "rule:parametrization-buffer"),
        ("enc.parametrizations.weight.0._v", "float32", (4,), "rule:parametrization-buffer"),
        ("parametrizations.weight.3.base", "float32", (4, 4), "rule:parametrization-buffer"),
    ],
)
def test_rule_marks_buffer(name: str, dtype: str, shape: tuple[int, ...], evidence: str) -> None:
    assert infer(raw(name, dtype, shape)) == ("buffer", evidence)


@pytest.mark.parametrize(
    ("name", "dtype", "shape", "evidence"),
    [
        ("fc.weight", "qint8", (4, 4), "rule:quantized-module"),  # quantized: neither parameter nor buffer
        ("conv.weight", "quint4x2", (4, 4), "rule:quantized-module"),
        ("fc._packed_params._packed_params.1", "float32", (4,), "rule:quantized-module"),
        ("_packed_params._packed_weight", "quint8", (4, 4), "rule:quantized-module"),
        ("rnn._all_weight_values.0.param.1.0", "float32", (16,), "rule:quantized-module"),
        ("rng_state", "uint8", (5056,), "rule:rng-state"),
        ("cpu", "uint8", (5056,), "rule:rng-state"),
        ("cuda.0", "uint8", (16,), "rule:rng-state"),  # HF Trainer: one per device
        ("cuda_rng_state", "uint8", (16,), "rule:rng-state"),
        ("torch_manual_seed", "uint8", (5056,), "rule:rng-state"),
        ("sampler.Generator", "uint8", (5056,), "rule:rng-state"),
        ("state", "uint8", (5056,), "rule:rng-state"),  # torch.get_rng_state()'s size alone
    ],
)
def test_rule_marks_other(name: str, dtype: str, shape: tuple[int, ...], evidence: str) -> None:
    assert infer(raw(name, dtype, shape)) == ("other", evidence)


@pytest.mark.parametrize(
    ("name", "dtype", "shape"),
    [
        ("rng_state", "uint8", (4, 4)),  # 2-D: no generator state
        ("rng_state", "int64", (5056,)),
        ("packed_params.weight", "float32", (4,)),  # not the `_packed_params` segment
        ("x._packed_paramsx.w", "float32", (4,)),
        ("parametrizations.weight.0.scale", "float32", (4,)),  # a user parametrization's own parameter
    ],
)
def test_near_misses_are_not_caught(name: str, dtype: str, shape: tuple[int, ...]) -> None:
    evidence = infer(raw(name, dtype, shape))[1]
    assert evidence in ("default", "rule:integer-dtype"), (name, evidence)


def roles_beside(*tensors: tuple[str, str]) -> dict[str, tuple[str, str]]:
    """(role, evidence) of each (name, dtype) when all of them are in one file: some rules look at siblings."""
    report = resolve(RawCheckpoint("x.pt", "torch-zip", [raw(n, d) for n, d in tensors], Container("state_dict", "")))
    return {t.name: (t.role, t.evidence) for t in report.tensors}


def test_a_quantized_module_takes_its_float_neighbours() -> None:
    got = roles_beside(
        ("conv.weight", "qint8"), ("conv.bias", "float32"), ("conv.scale", "float32"), ("conv.zero_point", "int64"),
        ("fc._packed_params._packed_params.0", "qint8"), ("fc.scale", "float32"), ("fc.zero_point", "int64"),
        ("ln.weight", "float32"), ("ln.bias", "float32"), ("ln.scale", "float32"), ("ln.zero_point", "int64"),
        ("conv2.bias", "float32"),
    )  # fmt: skip
    for n in ("conv.weight", "conv.bias", "conv.scale", "conv.zero_point", "fc.scale", "fc.zero_point"):
        assert got[n] == ("other", "rule:quantized-module"), n
    # A float LayerNorm beside them keeps its parameters; its quantization parameters are buffers.
    assert got["ln.weight"] == got["ln.bias"] == got["conv2.bias"] == ("parameter", "default")
    assert got["ln.scale"] == got["ln.zero_point"] == ("buffer", "rule:quant-params")


def test_scale_alone_is_no_quantization_parameter() -> None:
    assert roles_beside(("block.scale", "float32"))["block.scale"] == ("parameter", "default")
    assert infer(raw("quant.scale")) == ("parameter", "default")  # without the neighbours: no zero_point seen


def test_old_norm_hooks_are_told_apart_by_their_neighbours() -> None:
    got = roles_beside(
        ("sn.weight_orig", "float32"), ("sn.weight_u", "float32"), ("sn.weight_v", "float32"),
        ("wn.weight_g", "float32"), ("wn.weight_v", "float32"),
        ("other.weight_v", "float32"), ("other.weight_u", "float32"),
    )  # fmt: skip
    assert got["sn.weight_orig"] == ("parameter", "rule:parametrization-original")
    assert got["sn.weight_u"] == got["sn.weight_v"] == ("buffer", "rule:parametrization-buffer")
    assert got["wn.weight_g"] == got["wn.weight_v"] == ("parameter", "rule:parametrization-original")
    assert got["other.weight_v"] == got["other.weight_u"] == ("parameter", "default")  # no hook beside them


def test_parametrization_original_is_a_parameter_rule() -> None:
    for name in ("parametrizations.weight.original", "enc.parametrizations.bias.original1"):
        assert infer(raw(name)) == ("parameter", "rule:parametrization-original"), name
    assert infer(raw("enc.original")) == ("parameter", "default")  # not under parametrizations


def test_rng_state_gets_its_own_group() -> None:
    report = resolve(
        RawCheckpoint(
            "x.pt", "torch-zip", [raw("fc.weight"), raw("rng.cpu", "uint8", (5056,))], Container("state_dict", "")
        )
    )
    assert [(t.role, t.group) for t in report.tensors] == [("parameter", "model"), ("other", "rng")]


def test_rule_regexes_are_linear() -> None:
    """Names are the file's text: a 1 MB adversarial name is matched in well under a second."""
    import time

    names = [
        "parametrizations." + "a" * 1_000_000,
        "parametrizations." * 60_000 + "x._u",
        "_packed_param" * 80_000,
        ("." * 500_000) + "_orig",
    ]
    start = time.perf_counter()
    for name in names:
        for dtype, shape in (("float32", (4,)), ("uint8", (5,))):
            infer(raw(name, dtype, shape))
        roles_beside((name, "float32"), (name + "_orig", "float32"))
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize(
    ("name", "dtype", "shape"),
    [
        ("conv1.weight", "float32", (8, 3, 3, 3)),
        ("bn1.weight", "float32", (8,)),
        ("bn1.bias", "float32", (8,)),
        ("h.0.attn.c_attn.bias", "float32", (48,)),  # a real bias of an attention projection
        ("blocks.0.attn.bias", "float32", (16,)),  # 1-D: a Linear's bias named attn.bias
        ("layer_scale.scale", "bfloat16", (16,)),  # named like observer state but not under an observer
        ("lm_head.weight", "float8_e4m3fn", (4, 4)),
        ("freqs", "complex64", (4,)),
    ],
)
def test_parameters_stay_parameters(name: str, dtype: str, shape: tuple[int, ...]) -> None:
    assert infer(raw(name, dtype, shape)) == ("parameter", "default")


def test_observer_named_module_is_a_documented_false_positive() -> None:
    # The rule matches path segments containing "observer"; a user module named that way is caught too.
    assert infer(raw("observer_head.weight", "float32", (4, 4))) == ("buffer", "rule:quant-observer")


def test_every_rule_is_documented() -> None:
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "roles.md").read_text(encoding="utf-8")
    for rule in RULES:
        assert f"rule:{rule.name}" in page, f"rule:{rule.name} is not in docs/roles.md"


def test_guess_is_never_exact_and_exact_sources_win() -> None:
    tensors = [
        raw("bn.running_mean"),
        raw("fc.weight"),
        RawTensor("odd.running_mean", "float32", (4,), role="parameter", exact=True, evidence="module"),
    ]
    report = resolve(RawCheckpoint("x.pt", "torch-zip", tensors, Container("state_dict", "")))
    by = {t.name: t for t in report.tensors}
    assert (by["bn.running_mean"].role, by["bn.running_mean"].exact) == ("buffer", False)
    assert (by["fc.weight"].role, by["fc.weight"].exact, by["fc.weight"].evidence) == ("parameter", False, "default")
    # A module said so: the name-based rule must not override exact evidence.
    assert (by["odd.running_mean"].role, by["odd.running_mean"].exact) == ("parameter", True)
    assert by["odd.running_mean"].evidence == "module"
    assert report.summary.exact == 1 and report.summary.inferred == 2


def test_shared_storage_and_bytes_on_disk() -> None:
    a = RawTensor("embed.weight", "float32", (4, 4), storage="data/0", storage_nbytes=64)
    b = RawTensor("lm_head.weight", "float32", (4, 4), storage="data/0", storage_nbytes=64)
    c = RawTensor("bias", "float32", (4,), storage="data/1", storage_nbytes=16)
    report = resolve(
        RawCheckpoint(
            "x.pt", "torch-zip", [a, b, c], Container("state_dict", ""), storage_sizes={"data/0": 64, "data/1": 16}
        )
    )
    by = {t.name: t for t in report.tensors}
    assert by["embed.weight"].shares_with == ("lm_head.weight",)
    assert by["lm_head.weight"].shares_with == ("embed.weight",)
    assert by["bias"].shares_with == ()
    assert report.summary.logical_nbytes == 64 + 64 + 16
    assert report.summary.storage_nbytes == 64 + 16


def test_resolve_counts_its_summary_as_summary_of_does(samples_dir: Path) -> None:
    # resolve() counts the summary as it makes the records, Summary.of() from the records: the same figures.
    import statecli

    for path in sorted(samples_dir.iterdir()):
        if path.suffix in (".py", ".md") or path.name.startswith((".", "__")):
            continue
        report = statecli.open_checkpoint(path)
        assert report.summary == Summary.of(report.tensors, report.storage_sizes), path.name
    odd = [
        RawTensor("a", "quint4x2", (5,), storage="data/0"),  # packed: 3 bytes
        RawTensor("b", "no-such-dtype", (2,)),  # 0 bytes
        RawTensor("c", "float32", (3,), storage="data/0"),
        RawTensor("d", "int64", (), role="buffer", exact=True, evidence="module"),
    ]
    report = resolve(RawCheckpoint("x.pt", "torch-zip", odd, Container("state_dict", "")))
    assert report.summary == Summary.of(report.tensors, report.storage_sizes)


@pytest.mark.parametrize(
    "odd",
    [
        raw("net.observer.scale"),  # a mark in one name
        raw("h.0.attn.bias", "float32", (1, 1, 4, 4)),
        raw("parametrizations.weight.original"),
        raw("rng", "uint8", (16,)),
        raw("m.weight_orig"),  # a sibling rule
        raw("q.weight", "qint8", (4,)),
        raw("enc.original_size"),
    ],
)
def test_roles_found_for_all_names_at_once_are_each_names_own(odd: RawTensor) -> None:
    # resolve() tells whether every tensor's role depends on its pattern alone for all of them at once;
    # one name that does not must not change what the others get, nor get another role than infer() gives.
    from statecli.roles import _MEMO, Neighbours

    names = [raw(f"blocks.{i}.{leaf}") for i in range(3) for leaf in ("weight", "bias", "running_mean")]
    twin = raw(f"twin.{odd.name.rpartition('.')[2]}", odd.dtype, odd.shape)  # same pattern, seen first
    tensors = [*names, twin, odd]
    _MEMO.clear()
    report = resolve(RawCheckpoint("x.pt", "torch-zip", tensors, Container("state_dict", "")))
    _MEMO.clear()
    nb = Neighbours(tensors)
    assert [(t.role, t.evidence) for t in report.tensors] == [infer(t, nb) for t in tensors]
