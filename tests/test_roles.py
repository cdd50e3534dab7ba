"""Each named role rule: what it matches, what it must not match, and that a guess is never exact."""

from __future__ import annotations

import pytest

from statecli.formats.base import RawCheckpoint
from statecli.records import Container, RawTensor
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
        ("fc.weight", "qint8", (4, 4), "rule:integer-dtype"),  # quantized: not an autograd parameter
        ("conv.weight", "quint4x2", (4, 4), "rule:integer-dtype"),
    ],
)
def test_rule_marks_buffer(name: str, dtype: str, shape: tuple[int, ...], evidence: str) -> None:
    assert infer(raw(name, dtype, shape)) == ("buffer", evidence)


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


def test_every_rule_is_documented_in_readme() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for rule in RULES:
        assert f"rule:{rule.name}" in readme, rule.name


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
