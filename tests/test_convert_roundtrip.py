"""Random state dicts through pt → safetensors → pt: every value, dtype, name and tie survives.

Tensors stay tiny (a few elements): the property is about structure (dtypes, views, aliases, 0-dim and
empty tensors), and hypothesis runs many examples.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import statecli

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.uint8, torch.bool]
NAME = st.from_regex(r"[a-z]{1,6}(\.[a-z0-9_]{1,6}){0,3}", fullmatch=True)


@st.composite
def state_dicts(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
    names = draw(st.lists(NAME, min_size=1, max_size=8, unique=True))
    sd: dict[str, torch.Tensor] = {}
    ties: list[tuple[str, str]] = []
    for name in names:
        if sd and draw(st.integers(0, 4)) == 0:
            target = draw(st.sampled_from(sorted(sd)))
            sd[name] = sd[target]  # tied: the same tensor under two names
            ties.append((name, target))
            continue
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        seed = draw(st.integers(0, 2**16))
        g = torch.Generator().manual_seed(seed)
        if dtype.is_floating_point:
            t = (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)
        elif dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=g).bool()
        else:
            t = torch.randint(0, 100, shape, generator=g).to(dtype)
        if len(shape) == 2 and draw(st.booleans()):
            t = t.t()  # a non-contiguous view
        sd[name] = t
    return sd, ties


def bits(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().view(-1).view(torch.uint8).tolist()) if t.numel() else b""


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=state_dicts(), target=st.sampled_from([None, "fp16", "bf16", "fp32"]))
def test_pt_to_safetensors_to_pt(case: tuple[dict[str, torch.Tensor], list[tuple[str, str]]], target: str) -> None:
    sd, ties = case
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        torch.save(sd, folder / "in.pt")
        statecli.convert(folder / "in.pt", folder / "mid.safetensors", dtype=target, allow_overflow=True, verify=True)
        statecli.convert(folder / "mid.safetensors", folder / "out.pt", verify=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            back = torch.load(folder / "out.pt", weights_only=True)
    assert list(back) == list(sd) or set(back) == set(sd)
    want_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(target or "")
    for name, t in sd.items():
        expected = t.to(want_dtype) if want_dtype is not None and t.is_floating_point() else t
        assert back[name].dtype == expected.dtype, name
        assert back[name].shape == expected.shape, name
        assert bits(back[name]) == bits(expected), name
    for alias, target_name in ties:
        if sd[alias].numel():
            assert back[alias].data_ptr() == back[target_name].data_ptr(), (alias, target_name)
