"""Optimizer evidence: a torch optimizer's state dict beside the model says which tensors it trains.

A torch optimizer numbers its parameters (``param_groups[i]["params"]``: 0, 1, 2, ... in the order the
model's ``parameters()`` gave them) and keeps per-parameter state (``exp_avg``, ``momentum_buffer``) only
for those it has updated. ``model.parameters()`` and ``state_dict()`` list parameters in the same
order, buffers interleaved. So when the optimizer's parameter count equals the number of the model's
tensors that can be parameters (floating, not recognised as buffers), the i-th of those is parameter
``i``: evidence ``optimizer``. The match rests on that order, so the role is still marked inferred.
When the counts differ (a second optimizer, parameters frozen before the optimizer was made, tied
weights counted once), nothing is inferred and a finding says so.
"""

from __future__ import annotations

from typing import Any

from statecli.clip import describe, quote
from statecli.dtypes import DTYPES
from statecli.records import Finding, RawTensor
from statecli.roles import Neighbours, infer
from statecli.safepickle import PickledDict, Stub
from statecli.wording import name_list


def _mapping(obj: Any) -> dict[Any, Any] | None:
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, (PickledDict, Stub)):
        items = getattr(obj, "dictitems", None)
        return items if isinstance(items, dict) else None
    return None


def _optimizers(root: Any) -> list[tuple[str, dict[Any, Any]]]:
    """Torch optimizer state dicts at the top of a training checkpoint, with where they sit."""
    top = _mapping(root)
    if top is None:
        return []
    found = []
    for key, value in top.items():
        if not isinstance(value, (dict, Stub, list, tuple)):
            continue  # a tensor or a number: a state dict's top holds 100,000 of them
        name = key if type(key) is str else describe(key)  # str() of a pickled key can hang or overflow
        if isinstance(value, (list, tuple)):  # Lightning: optimizer_states = [opt0, opt1, ...]
            found += [(f"{name}.{i}", m) for i, v in enumerate(value) if (m := _opt(v)) is not None]
        elif (m := _opt(value)) is not None:
            found.append((name, m))
    return found


def _opt(obj: Any) -> dict[Any, Any] | None:
    m = _mapping(obj)
    if m is None or "state" not in m or "param_groups" not in m:
        return None
    return m


def _param_ids(opt: dict[Any, Any]) -> list[int] | None:
    groups = opt.get("param_groups")
    if not isinstance(groups, list):
        return None
    ids: list[int] = []
    for g in groups:
        params = (_mapping(g) or {}).get("params")
        if not isinstance(params, list) or not all(type(p) is int for p in params):
            return None  # FQN-keyed (named) optimizer state, or something else: not this scheme
        ids += params
    return ids


def _could_be_parameter(t: RawTensor, nb: Neighbours) -> bool:
    if t.group != "model" or t.role == "buffer":
        return False
    d = DTYPES.get(t.dtype)
    if d is None or d.kind not in ("float", "complex"):
        return False
    return t.role == "parameter" or infer(t, nb)[0] == "parameter"


def apply_optimizer_evidence(root: Any, tensors: list[RawTensor]) -> tuple[list[Finding], dict[str, str]]:
    """Mark the model tensors a single index-keyed optimizer names; findings say what was (not) done. Also
    returns, per optimizer-state prefix (``optimizer.state.3``), the name of the parameter it belongs to."""
    optimizers = _optimizers(root)
    if not optimizers:
        return [], {}
    if len(optimizers) > 1:
        where = name_list([w for w, _ in optimizers])
        return [Finding("info", "optimizer-evidence", f"{len(optimizers)} optimizers ({where}): not mapped")], {}
    where, opt = optimizers[0]
    ids = _param_ids(opt)
    if ids is None:
        return [], {}
    nb = Neighbours(tensors)  # the rules that look at siblings (old spectral_norm's weight_u, ...) count too
    candidates = [t for t in tensors if _could_be_parameter(t, nb)]
    if sorted(ids) != list(range(len(ids))) or len(ids) != len(candidates):
        return [
            Finding(
                "info",
                "optimizer-evidence",
                f"the optimizer in {quote(where)} has {len(ids)} parameters, the model {len(candidates)} tensors that "
                "could be parameters; they do not line up, so no role is taken from it",
            )
        ], {}
    state = _mapping(opt.get("state")) or {}
    stateless = []
    owners = {}
    for index, t in zip(ids, candidates, strict=True):
        owners[f"{where}.state.{index}"] = t.name
        if t.role is not None and t.exact:
            continue  # a fact from the file already
        t.role = "parameter"
        t.evidence = "optimizer"
        t.exact = False
        if index not in state:
            stateless.append(t.name)
    findings = [
        Finding(
            "info",
            "optimizer-evidence",
            f"{len(ids)} parameters matched to the optimizer in {quote(where)} by order (evidence 'optimizer')",
        )
    ]
    if stateless and len(stateless) < len(ids):
        names = name_list(stateless)
        findings.append(
            Finding(
                "info",
                "no-optimizer-state",
                f"{len(stateless)} parameters have no optimizer state (frozen, or never updated): {names}",
            )
        )
    return findings, owners
