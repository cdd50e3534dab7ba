"""Evidence -> role. Exact sources (set by the readers) first, then named rules, then ``default``.

Each rule has a name (reported as ``rule:<name>``), a test in tests/test_roles.py and a line in the
README. A rule is a guess: its result is never marked exact.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from statecli.dtypes import DTYPES, nbytes
from statecli.formats.base import RawCheckpoint
from statecli.records import Finding, RawTensor, Report, Summary, TensorInfo

MAX_SHARERS = 64
# Characters of names one shares_with list may hold: every tensor of a storage lists the same names again, in
# the JSON and the table, so the listing is paid for once per tensor (a pickle names a tensor per ~37 bytes at
# most, see torchzip.RECORD_UNITS). Real ties are a few names of under 200 characters.
MAX_SHARES_CHARS = 512


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    role: str
    doc: str
    test: Callable[[str, str, RawTensor], bool]  # (last name segment, full name, tensor)


_BN_STATS = frozenset({"running_mean", "running_var", "num_batches_tracked"})
_QUANT_SEGMENT = re.compile(r"(^|\.)(activation_post_process[^.]*|[^.]*fake_quant[^.]*|[^.]*observer[^.]*)(\.|$)")


def _is_quant_observer(last: str, name: str, t: RawTensor) -> bool:
    # The substring test keeps the regex off the hot path for the 99.9% of names it cannot match.
    if "observer" not in name and "fake_quant" not in name and "activation_post_process" not in name:
        return False
    return _QUANT_SEGMENT.search(name) is not None


def _is_causal_mask(last: str, name: str, t: RawTensor) -> bool:
    # GPT-2 keeps its causal mask as ``attn.bias`` (1, 1, n, n); a real bias is 1-D, so rank decides.
    if last == "bias":
        return len(t.shape) == 4 and name.endswith("attn.bias")
    return last in ("masked_bias", "causal_mask", "attn_mask") and len(t.shape) in (0, 2, 4)


def _is_integral(last: str, name: str, t: RawTensor) -> bool:
    d = DTYPES.get(t.dtype)
    return d is not None and d.is_integral


RULES: tuple[Rule, ...] = (
    Rule(
        "batchnorm-stats",
        "buffer",
        "`running_mean`, `running_var`, `num_batches_tracked`: BatchNorm, SyncBatchNorm and InstanceNorm statistics",
        lambda last, name, t: last in _BN_STATS,
    ),
    Rule(
        "quant-observer",
        "buffer",
        "tensors under `activation_post_process*`, `*fake_quant*` or `*observer*`: quantization observer state",
        _is_quant_observer,
    ),
    Rule(
        "position-ids",
        "buffer",
        "`position_ids`, `token_type_ids`: index tables transformers register as buffers",
        lambda last, name, t: last in ("position_ids", "token_type_ids"),
    ),
    Rule(
        "rotary-inv-freq",
        "buffer",
        "`inv_freq`: rotary embedding frequencies",
        lambda last, name, t: last == "inv_freq",
    ),
    Rule(
        "causal-mask",
        "buffer",
        "`attn.bias` of rank 4 and `masked_bias`: GPT-2 style attention masks",
        _is_causal_mask,
    ),
    Rule(
        "integer-dtype",
        "buffer",
        "integer, bool and quantized dtypes: autograd cannot train them, so they are not parameters",
        _is_integral,
    ),
)


def infer(t: RawTensor) -> tuple[str, str]:
    """(role, evidence) for a tensor with no exact evidence: the first rule that matches, else default."""
    name = t.name
    last = name.rpartition(".")[2]
    for rule in RULES:
        if rule.test(last, name, t):
            return rule.role, f"rule:{rule.name}"
    return "parameter", "default"


def _listing(names: list[str], own: str | None) -> tuple[tuple[str, ...], bool]:
    """What shares_with lists for a tensor named ``own`` among ``names`` (its storage's first tensors, in file
    order): the others, at most :data:`MAX_SHARERS` of them and :data:`MAX_SHARES_CHARS` characters; and whether
    the characters cut it short."""
    out: list[str] = []
    chars = 0
    for x in names:
        if x == own:
            continue
        if len(out) == MAX_SHARERS:
            break
        chars += len(x)
        if chars > MAX_SHARES_CHARS:
            return tuple(out), True
        out.append(x)
    return tuple(out), False


class _Sharing:
    """One shared storage's listing, made once: the first names (a tensor among them lists the others) and
    what every other tensor lists (one tuple for all of them)."""

    __slots__ = ("common", "cut", "head", "in_head")

    def __init__(self, sharers: list[str]) -> None:
        self.head = sharers[: MAX_SHARERS + 1]
        self.in_head = frozenset(self.head)
        self.common, self.cut = _listing(self.head, None)


def resolve(raw: RawCheckpoint) -> Report:
    """Turn a reader's facts into the report: roles with evidence, shared storages, summary."""
    by_storage: dict[str, list[str]] = {}
    for t in raw.tensors:
        if t.storage is not None:
            by_storage.setdefault(t.storage, []).append(t.name)
    infos: list[TensorInfo] = []
    append = infos.append
    listed: dict[str, _Sharing] = {}  # shared storages, each listing made once
    for t in raw.tensors:
        role = t.role
        if role is not None:
            exact, evidence = t.exact, t.evidence or "reader"
        else:
            role, evidence = infer(t)
            exact = False
        persistent = t.persistent
        if persistent is None and t.group == "model" and role in ("parameter", "buffer"):
            persistent = True  # present in a saved state: it was persistent when saved
        n = 1
        for d in t.shape:
            n *= d
        storage = t.storage
        shares: tuple[str, ...] = ()
        if storage is not None:
            sharers = by_storage[storage]
            if len(sharers) > 1:
                # Listing every sharer beside every tensor is quadratic: 10,000 names for one storage would be
                # 100 million entries. The first ones show the tie; a finding gives the count.
                sharing = listed.get(storage)
                if sharing is None:
                    sharing = listed[storage] = _Sharing(sharers)
                shares = _listing(sharing.head, t.name)[0] if t.name in sharing.in_head else sharing.common
        # Positional: this runs once per tensor, and keyword calls cost more (the order is TensorInfo's).
        info = TensorInfo(
            t.name, role, exact, evidence, persistent, t.requires_grad, t.dtype, t.shape, n,
            nbytes(t.dtype, n), t.device, shares, t.group, t.stride, t.storage_offset, storage, t.layout, t.file,
        )  # fmt: skip
        append(info)
    findings = list(raw.findings)
    for key, names in by_storage.items():
        if len(names) > MAX_SHARERS:
            findings.append(
                Finding(
                    "warning",
                    "many-sharers",
                    f"{len(names):,} tensors share storage {key}; shares_with lists at most {MAX_SHARERS} of them",
                )
            )
    for key, sharing in listed.items():
        names = by_storage[key]
        if sharing.cut:
            findings.append(
                Finding(
                    "warning",
                    "many-sharers",
                    f"{len(names):,} tensors share storage {key}; their names are too long for shares_with to list "
                    f"them all (at most {MAX_SHARES_CHARS:,} characters)",
                )
            )
    return Report(
        path=raw.path,
        format=raw.format,
        container=raw.container,
        tensors=tuple(infos),
        summary=Summary.of(infos, raw.storage_sizes),
        findings=tuple(findings),
        metadata=dict(raw.metadata),
        file_size=raw.file_size,
        storage_sizes=dict(raw.storage_sizes),
    )
