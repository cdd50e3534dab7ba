"""What torch's pickles hold, walked the same way for every container that carries one.

A ``torch.save`` zip, a legacy file, a TorchScript archive and a ``.pt2`` program all pickle tensors over
storages; here the unpickled stubs become tensor records (:class:`Walker`), storages are checked
(:class:`Storages`), and :func:`finish` is the one last step all of their readers share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from operator import attrgetter
from typing import Any

from statecli.clip import printable
from statecli.dtypes import DTYPES, STORAGE_TYPES
from statecli.dtypes import nbytes as dtype_nbytes
from statecli.errors import InputError, LimitExceededError
from statecli.formats.base import MAX_NAME_CHARS
from statecli.formats.optimizer import apply_optimizer_evidence
from statecli.formats.zipdir import MEMBER_SIZE as _MEMBER_SIZE
from statecli.formats.zipdir import Directory, Member
from statecli.pickled import QuantizerRef
from statecli.records import Container, Finding, Quantizer, RawCheckpoint, RawTensor, TensorInfo, more_findings
from statecli.roles import RNG_EVIDENCE, apply_keep_vars, looks_like_rng_state
from statecli.safepickle import Global, StorageRef, Stub, TensorRef, describe

MAX_PICKLE_BYTES = 1 << 30  # a data.pkl larger than this is not a checkpoint's metadata
MAX_WALK_DEPTH = 200
MAX_WALK_NODES = 20_000_000
MAX_SHARED_FINDINGS = 100  # "same object" findings listed one by one; the rest are counted
# What the tensor records a walk emits may cost, in units of about a byte of statecli's memory each: a record
# is RECORD_UNITS plus its name's length, and a pickle of n bytes may pay for WALK_UNITS_PER_BYTE * n +
# WALK_UNITS_FLOOR of them. A record costs 1-8 KB by the time it is printed (more when it shares its storage),
# and a hostile pickle names one per byte (DUP of a tensor in a list); torch's pickles take 72 bytes or more
# per tensor, and need under 4 units per byte (an optimizer's state; a state dict needs 2.5).
RECORD_UNITS = 256
WALK_UNITS_PER_BYTE = 8
WALK_UNITS_FLOOR = 2 << 20

# Keys under which training scripts keep the model's state, most specific first.
MODEL_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "model_state",
    "net",
    "network",
    "weights",
    "params",
)
OPTIMIZER_KEYS = frozenset(
    {
        "optimizer",
        "optimizers",
        "optimizer_state_dict",
        "optimizer_states",
        "optimizer_state",
        "optim",
        "optim_state",
        "opt",
        "opt_state",
        "scheduler",
        "lr_scheduler",
        "lr_schedulers",
    }
)
LIGHTNING_MARKERS = frozenset({"pytorch-lightning_version", "optimizer_states", "lr_schedulers", "callbacks"})
_ONLY_STR = {str}
_ONLY_TENSORS = {TensorRef}
_DTYPE = attrgetter("dtype")
_IS_PARAMETER = attrgetter("is_parameter")
MODULE_INTERNALS = frozenset(
    {"_parameters", "_buffers", "_non_persistent_buffers_set", "_modules", "training", "_version"}
)


def storage_dtype(stype: Any, key: Any, location: Any, numel: Any, path: str) -> str:
    """The dtype a storage record's type names, after checking the record's fields' types (a torch.save
    zip and a legacy stream name storages alike). Messages never repr() file values: that can hang."""
    if not (isinstance(stype, Global) and stype.module in ("torch", "torch.cuda", "torch.storage")):
        raise InputError(f"corrupt pickle: storage type {describe(stype)} is not a torch storage", path=path)
    dtype = STORAGE_TYPES.get(stype.name)
    if dtype is None:
        raise InputError(f"unknown storage type torch.{printable(stype.name)}", path=path)
    if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int:
        raise InputError("corrupt pickle: malformed storage record", path=path)
    return dtype


def _sizes(members: Mapping[str, Member]) -> Callable[[str], int | None]:
    """A member's size by name (None for no such member): a :class:`Directory` answers without making the
    member's record."""
    if isinstance(members, Directory):
        return members.size
    get = members.get
    return lambda name: None if (m := get(name)) is None else m.size


_ITEMSIZE = {name: d.itemsize for name, d in DTYPES.items()}


class Storages:
    """Builds storage records from persistent ids, checking each against the archive's members."""

    def __init__(self, members: Mapping[str, Member], root: str, path: str, exact: bool = True) -> None:
        self.members = members
        self.size_of = _sizes(members)
        # The members' plain records, where the directory reader's are at hand (see __call__).
        self.entries = members.entries if isinstance(members, Directory) else None
        self.root = root
        self.path = path
        # torch.load refuses a record of any other size than its storage's; torch.jit.load reads the start
        # of a longer one.
        self.exact = exact
        self.cache: dict[str, StorageRef] = {}
        self.prefix = f"{root}/data/"
        self.dtypes: dict[Global, str] = {}  # storage type objects checked already (by identity)

    def __call__(self, pid: Any) -> StorageRef:
        # The usual record in as few steps as it takes (100,000 of them in a large state dict): a storage type
        # checked before, a str key read for the first time, a str location, an int numel, and a member of
        # exactly the bytes it claims. Anything else, an error included, is left to _record.
        if type(pid) is tuple and len(pid) == 5:
            tag, stype, key, location, numel = pid
            # The key's type is checked before it is hashed: a tuple key could cost anything to hash.
            if type(key) is str:
                hit = self.cache.get(key)
                if hit is not None:
                    return hit
                entries = self.entries
                if (
                    entries is not None
                    and type(stype) is Global
                    and type(location) is str
                    and type(numel) is int
                    and 0 <= numel <= 2**62
                    and tag == "storage"
                    and len(location) <= 64
                ):
                    dtype = self.dtypes.get(stype)
                    entry = entries.get(self.prefix + key) if dtype is not None else None
                    if entry is not None:
                        nbytes = numel * _ITEMSIZE[dtype]
                        if entry[_MEMBER_SIZE] == nbytes:
                            ref = self.cache[key] = StorageRef(key, dtype, location, numel, nbytes)
                            return ref
        return self._record(pid)

    def _record(self, pid: Any) -> StorageRef:
        """The storage record of ``pid`` after every check, each failure said in its own words."""
        # The key's type is checked before it is hashed: a tuple key could cost anything to hash.
        if type(pid) is tuple and len(pid) == 5 and type(pid[2]) is str:
            hit = self.cache.get(pid[2])
            if hit is not None:
                return hit
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise InputError(f"corrupt pickle: unexpected persistent id {describe(pid)}", path=self.path)
        _, stype, key, location, numel = pid
        # One check per storage type object: a state dict names the same few thousands of times.
        dtype = self.dtypes.get(stype) if type(stype) is Global else None
        if dtype is None or type(key) is not str or type(location) is not str or type(numel) is not int:
            dtype = storage_dtype(stype, key, location, numel, self.path)
            if type(stype) is Global:
                self.dtypes[stype] = dtype
        if numel < 0 or numel > 2**62:
            raise InputError(f"storage {describe(key)} claims {describe(numel)} elements", path=self.path)
        nbytes = numel * DTYPES[dtype].itemsize
        size = self.size_of(self.prefix + key)
        if size is None:
            raise InputError(
                f"storage {describe(key)} has no data/{printable(key)} member in the archive", path=self.path
            )
        if size < nbytes or (self.exact and size != nbytes):
            raise InputError(
                f"storage {describe(key)} claims {nbytes} bytes but data/{printable(key)} holds {size}",
                path=self.path,
            )
        ref = StorageRef(key, dtype, location if len(location) <= 64 else location[:64], numel, nbytes)
        self.cache[key] = ref
        return ref


def raw_tensor(t: TensorRef, name: str, group: str, folder: str = "data") -> RawTensor:
    """The record of pickled tensor ``t``: its storage named ``<folder>/<key>``, its device the storage's
    unless the tensor names its own (meta tensors). Roles are the caller's to set."""
    s = t.storage
    device = t.device if t.device is not None or s is None else s.location
    storage, nbytes = (f"{folder}/{s.key}", s.nbytes) if s is not None else (None, 0)
    # Positional (RawTensor's field order): this runs once per tensor, and keyword calls cost more.
    raw = RawTensor(name, t.dtype, t.shape, t.stride, t.offset, device, storage, nbytes,
                    group, t.requires_grad, None, None, False, None, t.is_parameter, t.layout)  # fmt: skip
    if t.quantizer is not None:
        raw.quantizer = _quantizer(t.quantizer, name, group, folder)
    return raw


def _quantizer(q: QuantizerRef, name: str, group: str, folder: str) -> Quantizer:
    """A quantized tensor's quantizer, its per-channel scales and zero points as records that name their
    storages the way the tensor's own record does, so that they are read like any tensor."""
    if q.scales is None or q.zero_points is None:
        return Quantizer(q.scheme, q.scale, q.zero_point)
    scales = _quantizer_part(q.scales, f"{name} (per-channel scales)", group, folder)
    zero_points = _quantizer_part(q.zero_points, f"{name} (per-channel zero points)", group, folder)
    return Quantizer(q.scheme, axis=q.axis, scales=scales, zero_points=zero_points)


def _quantizer_part(t: TensorRef, name: str, group: str, folder: str) -> TensorInfo:
    r = raw_tensor(t, name, group, folder)
    n = t.numel
    return TensorInfo(
        name, "other", False, "quantizer", None, None, t.dtype, t.shape, n, dtype_nbytes(t.dtype, n), r.device,
        (), group, r.stride, r.storage_offset, r.storage,
    )  # fmt: skip


def _module_state(obj: Any) -> dict[str, Any] | None:
    """The ``__dict__`` of a pickled ``nn.Module`` (a stub whose state has ``_parameters`` and ``_modules``)."""
    if not isinstance(obj, Stub):
        return None
    state = obj.state
    if isinstance(state, tuple) and state and isinstance(state[0], dict):
        state = state[0]
    if isinstance(state, dict) and "_parameters" in state and "_modules" in state:
        return state
    return None


def _script_object_state(obj: Any) -> Any:
    """What a pickled ``torch.ScriptObject`` holds (its ``__getstate__``: quantized packed params keep their
    weights there), or None for anything else. BUILD gives it ``(state, qualified class name)``."""
    if not (isinstance(obj, Stub) and isinstance(obj.callee, Global) and obj.callee.qualname == "torch.ScriptObject"):
        return None
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], str):
        return state[0]
    return None


def _opaque_quantized_state(obj: Any) -> Any:
    """The pickled state of a torch quantized module that pickles no ``__dict__`` (quantized Conv's
    ``__getstate__`` is a flat tuple holding its weight and bias), or None for anything else."""
    if not isinstance(obj, Stub) or _module_state(obj) is not None or not isinstance(obj.state, tuple):
        return None
    c = obj.callee
    if isinstance(c, Global) and c.module.startswith(("torch.ao.nn.", "torch.nn.")) and ".quantized." in c.module:
        return obj.state
    return None


def _as_mapping(obj: Any) -> dict[Any, Any] | None:
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, Stub) and _module_state(obj) is None:
        merged: dict[Any, Any] = {}
        if isinstance(obj.state, dict):
            merged.update(obj.state)
        if obj.dictitems:
            merged.update(obj.dictitems)
        return merged if merged else None
    return None


def _key(k: Any) -> str:
    if isinstance(k, str):
        return k
    if (type(k) is int and k.bit_length() <= 128) or isinstance(k, (bool, float)) or k is None:
        return str(k)
    if type(k) is TensorRef and k.storage is not None:
        # A whole pickled optimizer keys its state by Parameter: named by the storage it lives in, so two
        # parameters' moments never share a name.
        return f"<tensor {describe(k.storage.key)[1:-1]}{f'+{k.offset}' if k.offset else ''}>"
    return describe(k)  # bounded: str() of a key holding a 100 MB bytes object is 400 MB


def join_key(prefix: str | None, k: Any) -> str:
    """The name of key ``k`` under ``prefix`` (None at the root): joined by a dot, kept as is at the root."""
    key = _key(k)
    under = 0 if prefix is None else len(prefix)
    if under + len(key) >= MAX_NAME_CHARS:
        raise LimitExceededError(
            f"a tensor name would be longer than {MAX_NAME_CHARS} characters ({len(key)}-character key "
            f"under a {under}-character path)"
        )
    return key if prefix is None else f"{prefix}.{key}"


def _label(path: str | None) -> str:
    """A walked container's path for a message: (root) for the root, else the path quoted ('' for a key '')."""
    return "(root)" if path is None else f"'{_clip(path)}'"


def _clip(name: str) -> str:
    return printable(name if len(name) <= 300 else f"{name[:150]}…{name[-100:]}")


def _is_rng_state(key: str, obj: Any) -> bool:
    """A top-level value that is a random generator's state, or a list of them (one per CUDA device)."""
    if isinstance(obj, TensorRef):
        return looks_like_rng_state(key, obj.dtype, obj.shape)
    if isinstance(obj, (list, tuple)) and 0 < len(obj) <= 4096:
        return all(isinstance(t, TensorRef) and looks_like_rng_state(key, t.dtype, t.shape) for t in obj)
    return False


def _is_optimizer_state(obj: Any) -> bool:
    return isinstance(obj, dict) and "state" in obj and "param_groups" in obj


class Visits:
    """A walk's bookkeeping over a pickled object graph, shared by the torch.save and TorchScript readers:
    depth and node limits, and each container listed once (a shared or self-referencing one is a finding,
    the first MAX_SHARED_FINDINGS named, the rest counted). The walker holds ``path``, ``findings``,
    ``seen``, ``nodes`` and ``shared``."""

    noun = "checkpoint"  # what the limit messages call the structure
    path: str
    findings: list[Finding]
    seen: dict[int, str | None]
    nodes: int
    shared: int

    def _enter(self, obj: Any, path: str | None, depth: int) -> bool:
        """Bookkeeping for each container visited; False when it was already listed elsewhere."""
        if depth > MAX_WALK_DEPTH:
            raise LimitExceededError(f"{self.noun} structure nests deeper than {MAX_WALK_DEPTH}", path=self.path)
        self.nodes += 1
        if self.nodes > MAX_WALK_NODES:
            raise LimitExceededError(f"{self.noun} structure has more than {MAX_WALK_NODES} nodes", path=self.path)
        first = self.seen.get(id(obj))
        if first is not None:
            self.shared += 1
            if self.shared <= MAX_SHARED_FINDINGS:
                self.findings.append(
                    Finding(
                        "info",
                        "shared-subtree",
                        f"{_label(path)} is the same object as {_label(first)}; listed once",
                    )
                )
            return False
        self.seen[id(obj)] = path
        return True

    def shared_summary(self) -> None:
        """One finding for the shared references beyond the first :data:`MAX_SHARED_FINDINGS`."""
        extra = self.shared - MAX_SHARED_FINDINGS
        if extra > 0:
            self.findings.append(more_findings("shared-subtree", "info", extra))


class Walker(Visits):
    """Finds the model's tensors in whatever the pickle holds and names every tensor by its path."""

    def __init__(self, path: str, pickle_bytes: int) -> None:
        self.path = path
        self.pickle_bytes = pickle_bytes
        self.units_left = WALK_UNITS_PER_BYTE * pickle_bytes + WALK_UNITS_FLOOR  # see RECORD_UNITS
        self.tensors: list[RawTensor] = []
        self.findings: list[Finding] = []
        self.seen: dict[int, str | None] = {}  # container id -> first path: cycles and shared subtrees once
        self.nodes = 0
        self.module_class: str | None = None
        self.training: bool | None = None
        self.holds: dict[tuple[int, int], bool] = {}  # (id, depth) -> _holds_tensors: DAGs cost their size
        self.shared = 0
        self.nested: set[int] = set()  # ids of the records of tensors found in a list, tuple or ScriptObject

    def result(
        self, fmt: str, container: Container, findings: list[Finding], size: int, storage_sizes: dict[str, int]
    ) -> RawCheckpoint:
        """The reader's answer once the walk is done: its findings after the reader's own."""
        self.shared_summary()
        findings.extend(self.findings)
        return RawCheckpoint(self.path, fmt, self.tensors, container, findings, {}, size, storage_sizes)

    def analyse(self, root: Any) -> Container:
        # The walk's prefix is None at the state dict's root and a string below it, '' included: a key ''
        # is a name like any other (``{'': t}`` names t '', ``{'a': {'': t}}`` 'a.', ``{'': {'x': t}}`` '.x').
        if isinstance(root, TensorRef):
            self._emit("tensor", root, "model")
            return Container(kind="tensor", state_dict_at="")
        state = _module_state(root)
        if state is not None:
            self._module(root, None, 0)
            return Container("module", "", (), self.module_class, self.training)
        if _opaque_quantized_state(root) is not None:
            self._opaque_quantized(root, None, 0)
            return Container("module", "", (), root.class_name, None)
        mapping = _as_mapping(root)
        if mapping is None:
            if isinstance(root, (list, tuple)):
                self._generic(root, None, "model", 0)
                return Container(kind="list", state_dict_at="")
            return Container(kind="empty", state_dict_at=None)
        keys = list(mapping) if set(map(type, mapping)) <= _ONLY_STR else [_key(k) for k in mapping]
        lightning = bool(LIGHTNING_MARKERS & set(keys))
        # An RNG state beside the model (``{"model": …, "rng_state": get_rng_state()}``) is no model tensor.
        direct = any(isinstance(v, TensorRef) and not _is_rng_state(_key(k), v) for k, v in mapping.items())
        model_key = None
        if not direct:
            model_key = next((k for k in mapping if _key(k) in MODEL_KEYS and self._holds_tensors(mapping[k], 0)), None)
        if model_key is not None:
            model = mapping[model_key]
            if _module_state(model) is not None:
                self._module(model, None, 0)
            else:
                self._state_dict(model, None)
            for k, v in mapping.items():
                if k is not model_key:
                    self._other(v, _key(k), _key(k), _is_rng_state(_key(k), v))
            kind = "lightning" if lightning else "training"
            other = tuple(k for k in keys if k != _key(model_key))
            return Container(kind, _key(model_key), other, self.module_class, self.training)
        values = mapping.values()
        if (
            set(map(type, values)) == _ONLY_TENSORS
            and OPTIMIZER_KEYS.isdisjoint(keys)
            and "uint8" not in set(map(_DTYPE, values))
        ):
            # A flat state dict: every value a tensor, none under an optimizer's key, none that could be an RNG
            # state (1-D uint8). What the loop below would make of it, told in C.
            self._state_dict(mapping, None)
            return Container("lightning" if lightning else "state_dict", "", (), self.module_class, self.training)
        # The root itself is the state dict, perhaps nested; optimizer-like keys are kept apart.
        model_items = {}
        other_keys = []
        for k, v in mapping.items():
            name = k if type(k) is str else _key(k)
            if name in OPTIMIZER_KEYS:
                other_keys.append(name)
                self._other(v, name, name)
            elif type(v) is TensorRef:
                # One check per tensor of a flat state dict: only a 1-D uint8 tensor can be an RNG state.
                if v.dtype == "uint8" and len(v.shape) == 1 and _is_rng_state(name, v):
                    other_keys.append(name)
                    self._other(v, name, name, True)
                else:
                    model_items[k] = v
            elif isinstance(v, (list, tuple)) and _is_rng_state(name, v):
                other_keys.append(name)
                self._other(v, name, name, True)
            elif _is_optimizer_state(v):
                other_keys.append(name)
                self._other(v, name, name)
            elif isinstance(v, TensorRef) or self._holds_tensors(v, 0):
                model_items[k] = v
            else:
                other_keys.append(name)
        self._state_dict(model_items, None)
        kind = "training" if other_keys and not direct else "state_dict"
        if lightning:
            kind = "lightning"
        return Container(kind, "", tuple(other_keys), self.module_class, self.training)

    def _holds_tensors(self, obj: Any, depth: int) -> bool:
        if depth > 8:
            return False
        if isinstance(obj, TensorRef) or _module_state(obj) is not None:
            return True
        # Memoized by identity and depth: a memoized DAG (a list of 16 references to a list of 16 references
        # to ...) would otherwise be walked once per path, 16 ** 8 times.
        key = (id(obj), depth)
        hit = self.holds.get(key)
        if hit is not None:
            return hit
        self.holds[key] = False  # a cycle back to here finds nothing new
        found = False
        script = _script_object_state(obj)
        if script is not None:
            found = self._holds_tensors(script, depth + 1)
            self.holds[key] = found
            return found
        m = _as_mapping(obj)
        if m is not None:
            found = any(self._holds_tensors(v, depth + 1) for v in list(m.values())[:10_000])
        elif isinstance(obj, (list, tuple)):
            found = any(self._holds_tensors(v, depth + 1) for v in obj[:10_000])
        self.holds[key] = found
        return found

    def _over_budget(self) -> None:
        n = self.pickle_bytes
        raise LimitExceededError(
            f"a {n}-byte pickle names more tensors than it holds: {len(self.tensors) + 1:,} so far, each "
            f"costing {RECORD_UNITS} plus its name's length against {WALK_UNITS_PER_BYTE} per pickle byte and "
            f"{WALK_UNITS_FLOOR >> 20} Mi more (torch's checkpoints need under 4 per byte)",
            path=self.path,
        )

    def _state_dict(self, obj: Any, prefix: str | None) -> None:
        start = len(self.tensors)
        self._generic(obj, prefix, "model", 0)
        mine = self.tensors[start:]
        if any(map(_IS_PARAMETER, mine)):
            apply_keep_vars(mine, self.nested)
        for t in mine:
            if t.evidence is None:
                t.requires_grad = None  # state_dict() detaches: the stored flag says nothing

    def _other(self, obj: Any, prefix: str, group: str, rng: bool = False) -> None:
        start = len(self.tensors)
        self._generic(obj, prefix, group, 0)
        exact = _is_optimizer_state(obj) or (
            isinstance(obj, (list, tuple)) and bool(obj) and all(_is_optimizer_state(o) for o in obj)
        )
        for t in self.tensors[start:]:
            if t.role is None:
                t.role = "other"
                t.exact = exact
                t.evidence = RNG_EVIDENCE if rng else "container"
                t.requires_grad = None if not t.is_parameter else t.requires_grad

    def _generic(self, obj: Any, prefix: str | None, group: str, depth: int, nested: bool = False) -> None:
        if isinstance(obj, TensorRef):
            r = self._emit("tensor" if prefix is None else prefix, obj, group)  # None: analyse() names a bare tensor
            if nested:
                self.nested.add(id(r))
            return
        if _module_state(obj) is not None:
            self._module(obj, prefix, depth)
            return
        script = _script_object_state(obj)
        if script is not None:
            # Named by its path in the object's state: ``param.1.0`` is ``param.__getstate__()[0][1][0]``.
            if isinstance(script, (dict, list, tuple, Stub, TensorRef)):
                self._generic(script, prefix, group, depth + 1, True)
            return
        mapping = _as_mapping(obj)
        if mapping is not None:
            if self._enter(obj, prefix, depth):
                dot = "" if prefix is None else f"{prefix}."
                room = MAX_NAME_CHARS - len(dot)
                left = self.units_left  # the walk's budget, kept in a local while this loop runs
                record = self.tensors.append
                for k, v in mapping.items():
                    if type(v) is TensorRef:
                        # The common case, without a call per name or a recursive call per tensor: what _emit
                        # does for a tensor without a role, and raw_tensor for a tensor over a storage
                        # without a quantizer, written out.
                        name = dot + k if type(k) is str and len(k) < room else join_key(prefix, k)
                        left -= RECORD_UNITS + len(name)
                        if left < 0:
                            self._over_budget()
                        s = v.storage
                        if s is None or v.quantizer is not None:
                            record(raw_tensor(v, name, group))
                            continue
                        # Positional (RawTensor's field order), as in raw_tensor.
                        device = s.location if v.device is None else v.device
                        record(RawTensor(
                            name, v.dtype, v.shape, v.stride, v.offset, device, f"data/{s.key}", s.nbytes, group,
                            v.requires_grad, None, None, False, None, v.is_parameter, v.layout,
                        ))  # fmt: skip
                    elif isinstance(v, (dict, list, tuple, Stub)):  # leaves (numbers, text) need no name
                        self.units_left = left
                        self._generic(v, join_key(prefix, k), group, depth + 1)
                        left = self.units_left
                self.units_left = left
        elif isinstance(obj, (list, tuple)) and self._enter(obj, prefix, depth):
            for i, v in enumerate(obj):
                if isinstance(v, (TensorRef, dict, list, tuple, Stub)):
                    self._generic(v, join_key(prefix, i), group, depth + 1, True)

    def _module(self, stub: Stub, prefix: str | None, depth: int) -> None:
        if not self._enter(stub, prefix, depth):
            return
        state = _module_state(stub)
        assert state is not None
        if self.module_class is None:
            self.module_class = stub.class_name
            training = state.get("training")
            self.training = training if isinstance(training, bool) else None
        for name, t in self._items(state.get("_parameters")):
            if isinstance(t, TensorRef):
                self._emit(join_key(prefix, name), t, "model", "parameter", True)
        non_persistent = state.get("_non_persistent_buffers_set")
        np_names = {n for n in non_persistent if isinstance(n, str)} if isinstance(non_persistent, set) else set()
        for name, t in self._items(state.get("_buffers")):
            if isinstance(t, TensorRef):
                self._emit(join_key(prefix, name), t, "model", "buffer", name not in np_names)
        for name, v in state.items():
            if name in MODULE_INTERNALS:
                continue
            if isinstance(v, TensorRef):
                # A tensor kept as a plain attribute is neither saved by state_dict() nor moved by .to().
                r = self._emit(join_key(prefix, name), v, "model", "other", None)
                r.evidence = "module-attribute"
            elif _script_object_state(v) is not None:
                # Quantized packed params: neither parameters nor buffers, yet the module's own
                # _save_to_state_dict writes them, so they are model state (not a plain attribute).
                start = len(self.tensors)
                self._generic(v, join_key(prefix, name), "model", depth + 1)
                for r in self.tensors[start:]:
                    if r.role is None:
                        r.role, r.exact, r.evidence = "other", True, "module"
        for name, child in self._items(state.get("_modules")):
            if _module_state(child) is not None:
                self._module(child, join_key(prefix, name), depth + 1)
            elif _opaque_quantized_state(child) is not None:
                self._opaque_quantized(child, join_key(prefix, name), depth + 1)

    def _opaque_quantized(self, stub: Stub, prefix: str | None, depth: int) -> None:
        """A quantized module whose pickle is a tuple, not its ``__dict__``: its tensors (weight, bias) are
        named by their place in that tuple. torch keeps them out of named_parameters() and named_buffers(),
        but nothing in the file registers them, so the role comes from the class: a rule, not a fact."""
        start = len(self.tensors)
        self._generic(stub.state, prefix, "model", depth + 1, True)
        for r in self.tensors[start:]:
            if r.role is None:
                r.role, r.exact, r.evidence = "other", False, "rule:quantized-module"

    @staticmethod
    def _items(d: Any) -> Iterator[tuple[str, Any]]:
        if isinstance(d, dict):
            for k, v in d.items():
                yield _key(k), v

    def _emit(
        self,
        name: str,
        t: TensorRef,
        group: str,
        role: str | None = None,
        persistent: bool | None = None,
    ) -> RawTensor:
        raw = raw_tensor(t, name, group)
        left = self.units_left - len(name) - RECORD_UNITS
        self.units_left = left
        if left < 0:
            self._over_budget()
        if role is not None:
            raw.role = role
            raw.exact = True
            raw.evidence = "module"
            raw.persistent = True if role == "parameter" else persistent
        self.tensors.append(raw)
        return raw


def finish(raw: RawCheckpoint, root: Any, empty: str | None = None) -> RawCheckpoint:
    """The last step of every torch-pickle reader (zip, legacy, TorchScript, ``.pt2``): the optimizer's
    evidence for the model's parameters, and a warning ``empty`` when no tensor was found.

    One step for all of them, so the same object graph gets the same roles in every container."""
    findings, raw.optimizer_owners = apply_optimizer_evidence(root, raw.tensors)
    raw.findings.extend(findings)
    if not raw.tensors and empty is not None:
        raw.findings.append(Finding("warning", "no-tensors", empty))
    return raw
