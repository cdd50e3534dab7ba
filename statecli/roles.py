"""Evidence -> role. Exact sources (set by the readers) first, then named rules, then ``default``.

Each rule has a name (reported as ``rule:<name>``), a test in tests/test_roles.py and a line in
docs/roles.md. A rule is a guess: its result is never marked exact.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass

from statecli.dtypes import DTYPES, nbytes
from statecli.records import Finding, FindingCap, RawCheckpoint, RawTensor, Report, Summary, TensorInfo

MAX_SHARERS = 64
# Characters of names one shares_with list may hold: every tensor of a storage lists the same names again, in
# the JSON and the table, so the listing is paid for once per tensor (a pickle names a tensor per ~37 bytes at
# most, see torchpickle.RECORD_UNITS). Real ties are a few names of under 200 characters.
MAX_SHARES_CHARS = 512


_QUANTIZED = frozenset(n for n, d in DTYPES.items() if d.kind == "quant")
# Where torch's quantized modules keep their packed weights: Linear and Embedding under ``_packed_params``
# (a tuple, or a TorchScript object), the dynamic RNNs under ``_all_weight_values``.
_PACKED = re.compile(r"(^|\.)(_packed_params|_all_weight_values)(\.|$)")
_QUANT_MEMBERS = frozenset({"weight", "bias", "scale", "zero_point"})
_RNG_NAME = re.compile(r"rng|random|seed|generator", re.IGNORECASE)
_RNG_KEYS = frozenset({"cpu", "cuda", "mps", "xpu", "npu", "hpu"})  # HF Trainer's rng_state.pth, per device
CPU_RNG_STATE_BYTES = 5056  # torch.get_rng_state(): the CPU mt19937 generator's state
RNG_EVIDENCE = "rule:rng-state"
_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.[^.]+\.(original\d*|\d+\.(_u|_v|base))$")
# Leaf names torch's own modules give their parameters (Linear, Conv, norms, RNNs, MultiheadAttention, the
# weight_norm / spectral_norm hooks): a plain tensor named so is evidence against "every plain tensor is a buffer".
_PARAMETER_LEAF = re.compile(
    r"(weight|bias|in_proj_weight|in_proj_bias|[qkv]_proj_weight|bias_[kv]|weight_orig|weight_g"
    r"|(weight|bias)_(ih|hh|hr)_l\d+(_reverse)?)"
)


def _parent(name: str, last: str) -> str:
    """The module path of tensor ``name`` whose last segment is ``last`` (``''`` at the root)."""
    return name[: len(name) - len(last) - 1] if len(name) > len(last) else ""


class Neighbours:
    """What some rules must know about the other tensors of the same file: a tensor's role can depend on
    its siblings (a quantized module's ``bias`` is no parameter; ``weight_v`` is a buffer beside
    ``weight_orig`` and a parameter beside ``weight_g``). Built in one pass over the names."""

    __slots__ = ("hook_g", "hook_orig", "plain", "qparams", "quantized")

    def __init__(self, tensors: Iterable[RawTensor] = ()) -> None:
        quantized: set[str] = set()
        scales: set[str] = set()
        zero_points: set[str] = set()
        orig: set[str] = set()
        g: set[str] = set()
        tensors = list(tensors)
        if not _may_have_neighbours(tensors):
            tensors = []  # no name or dtype the loop below looks for: every set stays empty
        for t in tensors:
            name = t.name
            if t.dtype in _QUANTIZED:
                quantized.add(name.rpartition(".")[0])
            if "_packed_params" in name or "_all_weight_values" in name:
                m = _PACKED.search(name)
                if m is not None:
                    quantized.add(name[: m.start()])
            if name.endswith(("scale", "zero_point", "_orig", "_g")):
                head, _, last = name.rpartition(".")
                if last == "scale":
                    scales.add(head)
                elif last == "zero_point":
                    zero_points.add(head)
                elif last.endswith("_orig"):
                    orig.add(name[:-5])
                elif last.endswith("_g"):
                    g.add(name[:-2])
        self.quantized = frozenset(quantized)  # modules holding quantized or packed weights
        self.qparams = frozenset(scales & zero_points)  # modules with a ``scale`` and a ``zero_point``
        self.hook_orig = frozenset(orig)  # ``X`` for every ``X_orig`` (torch.nn.utils.spectral_norm)
        self.hook_g = frozenset(g)  # ``X`` for every ``X_g`` (torch.nn.utils.weight_norm)
        # No sibling-dependent rule can fire: roles depend on each tensor alone (see infer's memo).
        self.plain = not (self.quantized or self.qparams or self.hook_orig or self.hook_g)

    def in_quantized_module(self, name: str) -> bool:
        """``name`` is a weight, bias, scale or zero point of a quantized module, or inside its packed weights."""
        head, _, last = name.rpartition(".")
        if last in _QUANT_MEMBERS and head in self.quantized:
            return True
        return ("_packed_params" in name or "_all_weight_values" in name) and _PACKED.search(name) is not None


def _may_have_neighbours(tensors: list[RawTensor]) -> bool:
    """Whether any tensor has a quantized dtype or a name :class:`Neighbours` looks at: tested on all the
    names at once, in C, so that a file without any (nearly all) costs no Python step per tensor. A yes
    may be wrong (a name holding a newline); the loop then finds what is really there."""
    if not _QUANTIZED.isdisjoint({t.dtype for t in tensors}):
        return True
    names = "\n".join([t.name for t in tensors]) + "\n"
    return any(mark in names for mark in _NEIGHBOUR_MARKS)


# What Neighbours.__init__ looks for in a name: a substring, or (with the newline) an ending.
_NEIGHBOUR_MARKS = ("_packed_params", "_all_weight_values", "scale\n", "zero_point\n", "_orig\n", "_g\n")

NO_NEIGHBOURS = Neighbours()


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    role: str
    doc: str
    test: Callable[[str, str, RawTensor, Neighbours], bool]  # (last name segment, full name, tensor, neighbours)


_BN_STATS = frozenset({"running_mean", "running_var", "num_batches_tracked"})
_QUANT_SEGMENT = re.compile(r"(^|\.)(activation_post_process[^.]*|[^.]*fake_quant[^.]*|[^.]*observer[^.]*)(\.|$)")


def _is_quant_observer(last: str, name: str, t: RawTensor, nb: Neighbours) -> bool:
    # The substring test keeps the regex off the hot path for the 99.9% of names it cannot match.
    if "observer" not in name and "fake_quant" not in name and "activation_post_process" not in name:
        return False
    return _QUANT_SEGMENT.search(name) is not None


def _is_quantized_state(last: str, name: str, t: RawTensor, nb: Neighbours) -> bool:
    # torch's quantized Linear / Conv / Embedding / RNNs keep weights in packed params and scale / zero
    # point as plain attributes: named_parameters() and named_buffers() list none of them.
    if t.dtype in _QUANTIZED:
        return True
    if last in _QUANT_MEMBERS and nb.quantized and _parent(name, last) in nb.quantized:
        return True
    return ("_packed_params" in name or "_all_weight_values" in name) and _PACKED.search(name) is not None


def _is_quant_params(last: str, name: str, t: RawTensor, nb: Neighbours) -> bool:
    # Quantize (a converted QuantStub), quantized BatchNorm / LayerNorm / GroupNorm / InstanceNorm and
    # activations register ``scale`` and ``zero_point`` as buffers.
    return (last == "scale" or last == "zero_point") and _parent(name, last) in nb.qparams


def looks_like_rng_state(name: str, dtype: str, shape: tuple[int, ...]) -> bool:
    """A random generator's state (``torch.get_rng_state()``, ``torch.cuda.get_rng_state()``: 1-D uint8),
    by its name or its size: training state, not model state."""
    if dtype != "uint8" or len(shape) != 1:
        return False
    if shape[0] == CPU_RNG_STATE_BYTES or name.partition(".")[0] in _RNG_KEYS:
        return True
    return _RNG_NAME.search(name[:1000]) is not None


def _is_rng_state(last: str, name: str, t: RawTensor, nb: Neighbours) -> bool:
    return looks_like_rng_state(name, t.dtype, t.shape)


def _is_parametrization_buffer(last: str, name: str, t: RawTensor, nb: Neighbours) -> bool:
    if last in ("_u", "_v", "base"):
        m = _PARAMETRIZED.search(name)
        return m is not None and m.group(3) is not None
    # torch.nn.utils.spectral_norm (the hook): weight_orig is the parameter, weight_u / weight_v buffers.
    if last.endswith(("_u", "_v")) and nb.hook_orig:
        return name[:-2] in nb.hook_orig
    return False


def _is_parametrization_original(last: str, name: str, t: RawTensor, nb: Neighbours) -> bool:
    if last.startswith("original"):
        m = _PARAMETRIZED.search(name)
        return m is not None and m.group(3) is None
    if last.endswith("_orig") and len(last) > 5:
        return True
    # torch.nn.utils.weight_norm (the hook): weight_g and weight_v are both parameters.
    return bool(nb.hook_g) and last.endswith(("_g", "_v")) and name[:-2] in nb.hook_g


def _is_causal_mask(last: str, name: str, t: RawTensor, nb: Neighbours) -> bool:
    # GPT-2 keeps its causal mask as ``attn.bias`` (1, 1, n, n); a real bias is 1-D, so rank decides.
    if last == "bias":
        return len(t.shape) == 4 and name.endswith("attn.bias")
    return last in ("masked_bias", "causal_mask", "attn_mask") and len(t.shape) in (0, 2, 4)


def _is_integral(last: str, name: str, t: RawTensor, nb: Neighbours) -> bool:
    d = DTYPES.get(t.dtype)
    return d is not None and d.is_integral


RULES: tuple[Rule, ...] = (
    Rule(
        "batchnorm-stats",
        "buffer",
        "`running_mean`, `running_var`, `num_batches_tracked`: BatchNorm, SyncBatchNorm and InstanceNorm statistics",
        lambda last, name, t, nb: last in _BN_STATS,
    ),
    Rule(
        "quant-observer",
        "buffer",
        "tensors under `activation_post_process*`, `*fake_quant*` or `*observer*`: quantization observer state",
        _is_quant_observer,
    ),
    Rule(
        "quantized-module",
        "other",
        "quantized dtypes (`qint8`, `quint8`, …), anything under `_packed_params` or `_all_weight_values`, and "
        "the `weight`, `bias`, `scale`, `zero_point` of a module holding those: torch's quantized Linear, Conv, "
        "Embedding and RNNs keep them outside `named_parameters()` and `named_buffers()`",
        _is_quantized_state,
    ),
    Rule(
        "quant-params",
        "buffer",
        "`scale` and `zero_point` side by side (and no quantized weight beside them): a converted QuantStub, "
        "quantized norms and activations register them as buffers",
        _is_quant_params,
    ),
    Rule(
        "position-ids",
        "buffer",
        "`position_ids`, `token_type_ids`: index tables transformers register as buffers",
        lambda last, name, t, nb: last in ("position_ids", "token_type_ids"),
    ),
    Rule(
        "rotary-inv-freq",
        "buffer",
        "`inv_freq`: rotary embedding frequencies",
        lambda last, name, t, nb: last == "inv_freq",
    ),
    Rule(
        "causal-mask",
        "buffer",
        "`attn.bias` of rank 4 and `masked_bias`: GPT-2 style attention masks",
        _is_causal_mask,
    ),
    Rule(
        "rng-state",
        "other",
        "a 1-D `uint8` tensor named for a random generator (`rng`, `random`, `seed`, `generator`), under a "
        "device key (`cpu`, `cuda`, … as in HF Trainer's `rng_state.pth`) or of 5056 bytes (`torch.get_rng_state()`)",
        _is_rng_state,
    ),
    Rule(
        "parametrization-buffer",
        "buffer",
        "`parametrizations.<name>.<i>._u` / `._v` (spectral_norm) and `.base` (orthogonal); `<name>_u` / "
        "`<name>_v` beside `<name>_orig` (the `torch.nn.utils.spectral_norm` hook)",
        _is_parametrization_buffer,
    ),
    Rule(
        "parametrization-original",
        "parameter",
        "`parametrizations.<name>.original` / `original<i>`; `<name>_orig` (the spectral_norm hook); `<name>_g` "
        "and `<name>_v` beside `<name>_g` (the `torch.nn.utils.weight_norm` hook)",
        _is_parametrization_original,
    ),
    Rule(
        "integer-dtype",
        "buffer",
        "integer, bool and bit dtypes: autograd cannot train them, so they are not parameters",
        _is_integral,
    ),
)


# Substrings of a name that some rule looks for. A name with none of them, in a file whose neighbours
# trigger no rule, gets a role that depends only on its last segment, dtype and rank: memoized per pattern
# (last segment, dtype, rank). One search for all of them: a loop over the marks cost more than the rules.
_NAME_MARKS = ("observer", "fake_quant", "activation_post_process", "_packed_params", "_all_weight_values")
_NAME_MARKS += ("parametrizations", "attn.bias")
_MARKED = re.compile("|".join(map(re.escape, _NAME_MARKS))).search  # literals: linear in the name
_MEMO: dict[tuple[str, str, int], tuple[str, str]] = {}
_MEMO_LIMIT = 100_000  # distinct (last, dtype, rank); a file of random names must not grow it without end


def infer(t: RawTensor, nb: Neighbours = NO_NEIGHBOURS) -> tuple[str, str]:
    """(role, evidence) for a tensor with no exact evidence: the first rule that matches, else default.

    ``nb`` describes the tensors beside ``t``; without it the rules that look at siblings do not fire."""
    name = t.name
    last = name.rpartition(".")[2]
    plain = (
        t.dtype != "uint8"  # rng-state looks at the whole name of uint8 tensors
        and nb.plain
        and _MARKED(name) is None
        and not last.startswith("original")
    )
    if plain:
        key = (last, t.dtype, len(t.shape))
        hit = _MEMO.get(key)
        if hit is not None:
            return hit
    for rule in RULES:
        if rule.test(last, name, t, nb):
            found = rule.role, f"rule:{rule.name}"
            break
    else:
        found = "parameter", "default"
    if plain and len(_MEMO) < _MEMO_LIMIT:
        _MEMO[key] = found
    return found


def plain_tensor_is_buffer_like(t: RawTensor, nb: Neighbours) -> bool:
    """Whether plain tensor ``t`` fits ``state_dict(keep_vars=True)``, where every parameter is an
    ``nn.Parameter`` and plain tensors are buffers: a rule calls it a buffer, or it is a floating tensor no
    rule names and its name is not one torch gives parameters (``weight``, ``bias``, ``weight_ih_l0``, …)."""
    role, evidence = infer(t, nb)
    if role == "buffer":
        return True
    last = t.name.rpartition(".")[2]
    return evidence == "default" and _PARAMETER_LEAF.fullmatch(last) is None


def apply_keep_vars(tensors: list[RawTensor], nested: Container[int] = ()) -> None:
    """Exact roles from ``nn.Parameter`` objects in one state dict (``tensors``; ``nested`` holds the ids of
    those found inside a list, tuple or TorchScript object rather than as a value of the dict).

    A Parameter is a parameter when it is a value of the dict and not part of a quantized module: those
    pickle their bias as a Parameter even in a plain ``state_dict()``, and packed params hold Parameters in
    tuples. Plain tensors beside the Parameters are buffers only when the whole dict reads as
    ``state_dict(keep_vars=True)``: no quantized module, no Parameter inside a tuple or list, and every plain
    tensor buffer-like (see :func:`plain_tensor_is_buffer_like`). One Parameter never makes the rest exact.
    """
    nb = Neighbours(tensors)
    params = []
    plain = []
    doubt = bool(nb.quantized)
    for t in tensors:
        if t.role is not None:
            continue
        if not t.is_parameter:
            plain.append(t)
        elif id(t) in nested or nb.in_quantized_module(t.name):
            doubt = True
        else:
            params.append(t)
    if not params:
        return
    for t in params:
        t.role, t.exact, t.evidence = "parameter", True, "keep-vars"
    if doubt or not all(plain_tensor_is_buffer_like(t, nb) for t in plain):
        return
    for t in plain:
        t.role, t.exact, t.evidence, t.persistent = "buffer", True, "keep-vars", True


def keep_vars_proves(tensors: Iterable[tuple[str, str, tuple[int, ...], bool]]) -> bool:
    """Whether a state dict of (name, dtype, shape, is a Parameter object) reads back with every role exact
    (what :func:`apply_keep_vars` decides): ``convert`` writes Parameter objects only then."""
    probe = [RawTensor(name, dtype, shape, is_parameter=param) for name, dtype, shape, param in tensors]
    apply_keep_vars(probe)
    return all(t.exact for t in probe)


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


def _all_plain(tensors: list[RawTensor], nb: Neighbours) -> bool:
    """Whether a memoized role found for a tensor's pattern is the one :func:`infer` gives it, told for all of
    ``tensors`` at once: no sibling rule fires and no name holds a mark. (A uint8 tensor's or an ``original*``
    name's pattern is never memoized, so a lookup of theirs misses and infer() decides.)"""
    return nb.plain and _MARKED("\n".join([t.name for t in tensors])) is None


def _shared_storages(tensors: list[RawTensor]) -> dict[str, list[str]]:
    """The storages more than one tensor names, each with its tensors' names in file order (a file whose
    storages are all distinct, nearly every one, is told in one pass in C)."""
    keys = [t.storage for t in tensors]
    distinct = set(keys)
    if len(distinct) + max(0, keys.count(None) - 1) == len(keys):
        return {}
    by_storage: dict[str, list[str]] = {}
    for t in tensors:
        if t.storage is not None:
            by_storage.setdefault(t.storage, []).append(t.name)
    return {key: names for key, names in by_storage.items() if len(names) > 1}


# Bytes per element of the whole-byte dtypes; the packed ones (quint4x2, ...) go through nbytes().
_ITEMSIZE = {name: d.bits // 8 for name, d in DTYPES.items() if d.bits >= 8}


def resolve(raw: RawCheckpoint) -> Report:
    """Turn a reader's facts into the report: roles with evidence, shared storages, summary."""
    tensors = raw.tensors
    by_storage = _shared_storages(tensors)
    infos: list[TensorInfo] = []
    append = infos.append
    nb: Neighbours | None = None
    listed: dict[str, _Sharing] = {}  # shared storages, each listing made once
    # The summary's counts, kept here rather than by a second pass over the records (see Summary.of).
    combos: dict[tuple[str, str, str | None], list[int]] = {}
    exact_count = logical = unshared = 0
    seen: dict[str, int] = {}
    sizes = raw.storage_sizes
    itemsize = _ITEMSIZE
    prod = math.prod
    memo = _MEMO
    plain = False  # every tensor's inferred role depends on its pattern alone (see _all_plain)
    for t in tensors:
        role = t.role
        group = t.group
        if role is not None:
            exact, evidence = t.exact, t.evidence or "reader"
            if exact:
                exact_count += 1
        else:
            if nb is None:
                nb = Neighbours(tensors)
                plain = _all_plain(tensors, nb)
            found = memo.get((t.name.rpartition(".")[2], t.dtype, len(t.shape))) if plain else None
            role, evidence = found if found is not None else infer(t, nb)
            exact = False
            if evidence == RNG_EVIDENCE:
                group = t.name.partition(".")[0]  # not model state: it lives under its own key
        persistent = t.persistent
        if persistent is None and group == "model" and (role == "parameter" or role == "buffer"):
            persistent = True  # present in a saved state: it was persistent when saved
        dtype = t.dtype
        n = prod(t.shape)
        size = itemsize.get(dtype)
        size = n * size if size is not None else nbytes(dtype, n)
        storage = t.storage
        shares: tuple[str, ...] = ()
        if storage is None:
            unshared += size
        else:
            if by_storage:
                sharers = by_storage.get(storage)
                if sharers is not None:
                    # Listing every sharer beside every tensor is quadratic: 10,000 names for one storage would
                    # be 100 million entries. The first ones show the tie; a finding gives the count.
                    sharing = listed.get(storage)
                    if sharing is None:
                        sharing = listed[storage] = _Sharing(sharers)
                    shares = _listing(sharing.head, t.name)[0] if t.name in sharing.in_head else sharing.common
            if storage in sizes:
                seen[storage] = sizes[storage]
            elif seen.get(storage, -1) < size:
                seen[storage] = size
        device = t.device
        key = (role, dtype, device)
        acc = combos.get(key)
        if acc is None:
            acc = combos[key] = [0, 0, 0]
        acc[0] += 1
        acc[1] += n
        acc[2] += size
        logical += size
        # Positional: this runs once per tensor, and keyword calls cost more (the order is TensorInfo's).
        append(TensorInfo(
            t.name, role, exact, evidence, persistent, t.requires_grad, dtype, t.shape, n, size, device, shares,
            group, t.stride, t.storage_offset, storage, t.layout, t.file, t.quantizer,
        ))  # fmt: skip
    findings = FindingCap()
    findings.extend(raw.findings)
    for key, names in by_storage.items():
        if len(names) > MAX_SHARERS:
            findings.add(
                Finding(
                    "warning",
                    "many-sharers",
                    f"{len(names):,} tensors share storage {key}; shares_with lists at most {MAX_SHARERS} of them",
                )
            )
    for key, sharing in listed.items():
        names = by_storage[key]
        if sharing.cut:
            findings.add(
                Finding(
                    "warning",
                    "many-sharers",
                    f"{len(names):,} tensors share storage {key}; their names are too long for shares_with to list "
                    f"them all (at most {MAX_SHARES_CHARS:,} characters)",
                )
            )
    summary = Summary.from_counts(combos, len(infos), exact_count, logical, unshared + sum(seen.values()))
    return Report(
        path=raw.path,
        format=raw.format,
        container=raw.container,
        tensors=tuple(infos),
        summary=summary,
        findings=tuple(findings.findings()),
        metadata=dict(raw.metadata),
        file_size=raw.file_size,
        storage_sizes=dict(raw.storage_sizes),
        optimizer_owners=dict(raw.optimizer_owners),
    )
