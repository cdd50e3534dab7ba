"""``torch.export`` programs (``.pt2``, ``torch.export.save``), read without running anything and without torch.

What torch 2.13 writes (``torch/export/pt2_archive/_package.py``), under a top folder named after the
file's stem, for each program ``<m>`` (``model`` when one program is saved):

- ``models/<m>.json``: the serialized program. Its ``graph_module.signature.input_specs`` lists the
  lifted inputs: ``parameter`` (``parameter_name``), ``buffer`` (``buffer_name``, ``persistent``),
  ``tensor_constant`` (``tensor_constant_name``), ``custom_obj``, and the user inputs.
- ``data/weights/<m>_weights_config.json`` (the state dict: parameters and persistent buffers) and
  ``data/constants/<m>_constants_config.json`` (non-persistent buffers, tensor constants, custom
  objects): ``{"config": {fqn: {"path_name", "is_param", "use_pickle", "tensor_meta"}}}``, where
  ``tensor_meta`` holds the dtype code (``torch/_export/serde/schema.py`` ``ScalarType``), sizes,
  strides and storage offset as ``{"as_int": n}``, ``requires_grad``, device and layout code.
- ``data/weights/weight_<i>`` / ``data/constants/tensor_<i>``: the raw bytes of one untyped storage
  (aliased tensors name the same file), or, with ``use_pickle``, a whole ``torch.save`` archive (tensor
  subclasses). ``torch.export.load`` reads the latter with ``torch.load(weights_only=False)``, and
  opaque constants (``opaque_obj_<i>``) with ``pickle.loads``: statecli parses every such payload with
  its restricted reader and reports what it would run.
- ``data/sample_inputs/<m>.pt``: the example inputs, a ``torch.save`` archive (loaded by torch with a
  ``weights_only=False`` fallback); read the same way and listed as role ``other``.

Every size the JSON claims is checked against the member that holds the bytes before it is believed.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from statecli.clip import describe, quote
from statecli.dtypes import DTYPES, contiguous_strides
from statecli.errors import InputError, LimitExceededError, StatecliError, UnsupportedFormatError
from statecli.files import open_regular
from statecli.formats._json import load_object
from statecli.formats.torchpickle import MAX_PICKLE_BYTES, Storages, finish, join_key, raw_tensor
from statecli.formats.torchzip import archive_root
from statecli.formats.zipdir import Member, data_offset, read_directory_at, read_member, read_member_from
from statecli.records import Container, Finding, FindingCap, RawCheckpoint, RawTensor
from statecli.safepickle import (
    MAX_INDEX,
    Action,
    Global,
    RestrictedUnpickler,
    Stub,
    TensorRef,
    describe_name,
)
from statecli.security import findings_for, loads
from statecli.wording import name_list

EVIDENCE = "export"
MAX_JSON_BYTES = 1 << 30  # one program or config JSON
MAX_SMALL_RECORD = 4096  # archive_format, archive_version
MAX_DIMS = 64
WEIGHTS_DIR = "data/weights/"
CONSTANTS_DIR = "data/constants/"
SAMPLE_INPUTS_DIR = "data/sample_inputs/"
# torch/_export/serde/schema.py ScalarType and Layout.
SCALAR_TYPES: dict[int, str] = {
    1: "uint8",
    2: "int8",
    3: "int16",
    4: "int32",
    5: "int64",
    6: "float16",
    7: "float32",
    8: "float64",
    9: "complex32",
    10: "complex64",
    11: "complex128",
    12: "bool",
    13: "bfloat16",
    28: "uint16",
    29: "float8_e4m3fn",
    30: "float8_e5m2",
    31: "float8_e4m3fnuz",
    32: "float8_e5m2fnuz",
    33: "float8_e8m0fnu",
    34: "uint32",
    35: "uint64",
}
LAYOUTS: dict[int, str] = {
    1: "sparse_coo",
    2: "sparse_csr",
    3: "sparse_csc",
    4: "sparse_bsr",
    5: "sparse_bsc",
    6: "mkldnn",
    7: "strided",
}
_PATH_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}\Z")
_MODEL_NAME = re.compile(r"[^/\\]{1,255}\Z")


def read_pt2(path: str, members: Mapping[str, Member]) -> RawCheckpoint:
    """Read a ``torch.export.save`` archive's tensors and their exact roles without running anything."""
    try:
        return _Reader(path, members, _root(members, path)).read()
    except StatecliError as e:
        raise e.at(path) from None


def _root(members: Mapping[str, Member], path: str) -> str:
    roots = {n.split("/", 1)[0] for n in members if n.count("/") == 1 and n.endswith("/archive_format")}
    if not roots:
        roots = {n.split("/", 1)[0] for n in members if n.count("/") == 2 and n.split("/")[1] == "models"}
    if not roots:
        raise InputError("zip archive without archive_format or models/: not a torch.export program", path=path)
    if len(roots) > 1:
        raise InputError(f"zip archive with {len(roots)} archive roots ({', '.join(sorted(roots))})", path=path)
    return roots.pop()


def _inert_pid(pid: Any) -> Any:
    return ("persistent-id", pid)


class _Reader:
    def __init__(self, path: str, members: Mapping[str, Member], root: str) -> None:
        self.path = path
        self.members = members
        self.root = root
        self.tensors: list[RawTensor] = []
        # One per tensor or payload at most, capped: a program with a million odd weights is not a million lines.
        self.findings = FindingCap()
        self.security = FindingCap()
        self.storage_sizes: dict[str, int] = {}
        self.other_keys: list[str] = []
        self.nested_nbytes = 0  # storage bytes inside the last pickled archive read
        self.walked: set[int] = set()  # ids of the sample-input containers walked (all stay alive)

    def read(self) -> RawCheckpoint:
        fmt = self._small("archive_format")
        if fmt is not None and fmt != "pt2":
            raise UnsupportedFormatError(f"archive_format is {fmt[:40]!r}, not 'pt2'", path=self.path)
        version = self._small("archive_version")
        if version is not None and version != "0":
            raise UnsupportedFormatError(
                f"pt2 archive version {version[:40]!r}; statecli reads version '0' (what torch 2.13 writes)",
                path=self.path,
            )
        prefix = f"{self.root}/models/"
        models = sorted(
            n[len(prefix) : -len(".json")]
            for n in self.members
            if n.startswith(prefix) and n.endswith(".json") and _MODEL_NAME.match(n[len(prefix) : -len(".json")])
        )
        odd = next((m for m in models if ":" in m), None)
        if odd is not None:
            # A colon separates a payload member from a storage inside it (``<member>:data/<key>``).
            raise UnsupportedFormatError(
                f"a program named '{describe_name(odd)}': a colon in its name is not read", path=self.path
            )
        if not models:
            if any(n.startswith(f"{self.root}/data/aotinductor/") for n in self.members):
                raise UnsupportedFormatError(
                    "an AOTInductor package (compiled code, no exported program in models/): not read", path=self.path
                )
            raise InputError("pt2 archive without models/*.json: no exported program", path=self.path)
        for model in models:
            self._model(model, f"{model}." if len(models) > 1 else "")
        extra = f"{self.root}/extra/"
        self.other_keys.extend(n[len(self.root) + 1 :] for n in self.members if n.startswith(extra))
        order = {"dangerous": 0, "warning": 1, "info": 2}
        security = sorted(self.security.findings(), key=lambda f: order.get(f.level, 3))
        raw = RawCheckpoint(
            path=self.path,
            format="torch-export",
            tensors=self.tensors,
            container=Container("export", "", tuple(self.other_keys)),
            findings=security + self.findings.findings(),
            file_size=os.path.getsize(self.path),
            storage_sizes=self.storage_sizes,
        )
        # The programs' inputs are not a training checkpoint: there is no optimizer to take evidence from.
        return finish(raw, None, "the exported program holds no tensors")

    def _small(self, name: str) -> str | None:
        m = self.members.get(f"{self.root}/{name}")
        if m is None:
            return None
        return read_member(self.path, m, MAX_SMALL_RECORD).decode("utf-8", "replace").strip()

    def _json(self, rel: str) -> dict[str, Any]:
        m = self.members.get(f"{self.root}/{rel}")
        if m is None:
            raise InputError(f"{rel} is missing from the archive", path=self.path)
        return load_object(read_member(self.path, m, MAX_JSON_BYTES), rel, self.path)

    # -- one exported program

    def _model(self, model: str, prefix: str) -> None:
        program = f"models/{model}.json"
        roles = _signature(self._json(program), program, self.path)
        if f"{self.root}/{WEIGHTS_DIR}{model}.pt" in self.members:
            raise UnsupportedFormatError(
                f"legacy pt2 weights layout ({WEIGHTS_DIR}{model}.pt, from an older torch): not read", path=self.path
            )
        weights = _config(self._json(f"{WEIGHTS_DIR}{model}_weights_config.json"), model, "weights", self.path)
        constants_rel = f"{CONSTANTS_DIR}{model}_constants_config.json"
        constants: dict[str, Any] = {}
        if f"{self.root}/{constants_rel}" in self.members:
            constants = _config(self._json(constants_rel), model, "constants", self.path)
        both = weights.keys() & constants.keys()
        if both:
            raise InputError(f"{quote(min(both))} is in both the weights and the constants config", path=self.path)
        for fqn, (kind, _) in roles.items():
            if fqn not in weights and fqn not in constants:
                raise InputError(
                    f"{program} lists {kind} {quote(fqn)} but neither weights nor constants config holds it",
                    path=self.path,
                )
        unlisted: list[str] = []
        for folder, config in ((WEIGHTS_DIR, weights), (CONSTANTS_DIR, constants)):
            for fqn, meta in config.items():
                spec = roles.get(fqn)
                if spec is None:
                    unlisted.append(fqn)
                self._entry(prefix + fqn, fqn, meta, folder, spec)
        if unlisted:
            shown = name_list(unlisted, 5)
            self.findings.add(
                Finding(
                    "warning",
                    "export-unlisted",
                    f"{len(unlisted)} stored tensor(s) the graph signature does not name ({shown}); roles inferred",
                )
            )
        sample = f"{self.root}/{SAMPLE_INPUTS_DIR}{model}.pt"
        if sample in self.members and self.members[sample].size:
            obj = self._payload(sample, f"{SAMPLE_INPUTS_DIR}{model}.pt")
            start = len(self.tensors)
            self.walked = set()
            self._inputs(obj, f"{prefix}sample_inputs", 0, f"{SAMPLE_INPUTS_DIR}{model}.pt")
            if len(self.tensors) > start or obj is not None:
                self.other_keys.append(f"{prefix}sample_inputs")

    def _entry(self, name: str, fqn: str, meta: Any, folder: str, spec: tuple[str, bool | None] | None) -> None:
        where = f"{'weights' if folder == WEIGHTS_DIR else 'constants'} config entry {quote(fqn)}"
        if not isinstance(meta, dict):
            raise InputError(f"{where} is not an object", path=self.path)
        path_name = meta.get("path_name")
        if not isinstance(path_name, str) or not _PATH_NAME.match(path_name):
            raise InputError(f"{where} has an invalid path_name {describe(path_name, limit=80)}", path=self.path)
        rel = f"{folder}{path_name}"
        member = self.members.get(f"{self.root}/{rel}")
        if member is None:
            raise InputError(f"{where} points to {rel}, which is not in the archive", path=self.path)
        use_pickle = meta.get("use_pickle", False)
        if not isinstance(use_pickle, bool):
            raise InputError(f"{where}: use_pickle is not a boolean", path=self.path)
        tm = meta.get("tensor_meta")
        if tm is None:
            # A custom (TorchScript-bound) or opaque object, not a tensor: only its pickle is checked.
            self._payload(f"{self.root}/{rel}", rel)
            self.other_keys.append(name)
            return
        if not isinstance(tm, dict):
            raise InputError(f"{where}: tensor_meta is not an object", path=self.path)
        code = tm.get("dtype")
        dtype = SCALAR_TYPES.get(code) if type(code) is int else None
        if dtype is None:
            raise InputError(f"{where}: unknown dtype code {describe(tm.get('dtype'), limit=20)}", path=self.path)
        shape = _sym_ints(tm.get("sizes"), f"{where}: sizes", self.path)
        stride = _sym_ints(tm.get("strides"), f"{where}: strides", self.path)
        if len(stride) != len(shape):
            raise InputError(f"{where}: sizes {list(shape)} and strides {list(stride)} differ in rank", path=self.path)
        offset = _sym_int(tm.get("storage_offset"), f"{where}: storage_offset", self.path)
        requires_grad = tm.get("requires_grad")
        if not isinstance(requires_grad, bool):
            requires_grad = None
        layout_code = tm.get("layout")
        layout = LAYOUTS.get(layout_code, "strided") if type(layout_code) is int else "strided"
        numel = 1
        for s in shape:
            numel *= s
            if numel > MAX_INDEX:
                raise InputError(f"{where}: sizes {list(shape)} overflow the element count", path=self.path)
        itemsize = DTYPES[dtype].itemsize
        storage_nbytes = member.size
        storage = rel
        device = _device(tm.get("device"))
        if use_pickle:
            self.nested_nbytes = 0
            obj = self._payload(f"{self.root}/{rel}", rel)
            pickled_layout = _payload_layout(obj)
            if pickled_layout is None:
                # Not a tensor at all: torch.export.load would hand this object on as the weight. Its values
                # are not the payload's bytes, and no layout statecli reads describes it.
                pickled_layout = "opaque"
                self.findings.add(
                    Finding(
                        "warning",
                        "export-pickled-payload",
                        f"'{describe_name(name)}': {rel} is a pickled {describe(obj)}, not a tensor; "
                        "its values are not read",
                    )
                )
            layout = pickled_layout
            storage_nbytes = self.nested_nbytes  # the tensor bytes inside the pickled archive, not its size
            if isinstance(obj, TensorRef):
                # torch.export.load returns the unpickled tensor as it is, whatever tensor_meta says: the two
                # must agree, and its bytes are the nested archive's storage, not the payload member.
                _same_tensor(obj, dtype, shape, stride, offset, f"{where}: {rel}", self.path)
                if obj.storage is not None:
                    storage = f"{rel}:data/{obj.storage.key}"
                    storage_nbytes = obj.storage.nbytes
                    device = obj.device if obj.device is not None else obj.storage.location
        else:
            if member.size % itemsize:
                raise InputError(
                    f"{where}: {rel} holds {member.size} bytes, not a whole number of {dtype} elements",
                    path=self.path,
                )
            capacity = member.size // itemsize
            if capacity == 0 and numel:
                self.findings.add(
                    Finding(
                        "warning",
                        "export-empty-payload",
                        f"{quote(name)} claims {numel} elements but {rel} holds no bytes "
                        "(torch.export.load would make it zeros: a program saved with fake weights?)",
                    )
                )
            elif numel:
                last = offset + sum((s - 1) * st for s, st in zip(shape, stride, strict=True))
                if last >= capacity:
                    raise InputError(
                        f"{where}: a tensor of shape {list(shape)}, stride {list(stride)}, offset {offset} reaches "
                        f"element {last}, but {rel} holds {capacity} {dtype} elements ({member.size} bytes)",
                        path=self.path,
                    )
        raw = RawTensor(
            name=name,
            dtype=dtype,
            shape=shape,
            stride=stride,
            storage_offset=offset,
            device=device,
            storage=storage,
            storage_nbytes=storage_nbytes,
            group="model" if spec is None or spec[0] != "constant" else "constants",
            requires_grad=requires_grad,
            is_parameter=meta.get("is_param") is True,
            layout=layout,
        )
        if spec is not None:
            kind, persistent = spec
            raw.role = "other" if kind == "constant" else kind
            raw.exact = True
            raw.evidence = EVIDENCE
            raw.persistent = True if kind == "parameter" else persistent
        self.storage_sizes[storage] = storage_nbytes
        self.tensors.append(raw)

    def _inputs(self, obj: Any, prefix: str, depth: int, rel: str) -> None:
        if depth > 64:
            raise LimitExceededError(f"{rel}: sample inputs nest deeper than 64", path=self.path)
        if isinstance(obj, TensorRef):
            s = obj.storage
            raw = raw_tensor(obj, prefix, "sample_inputs", f"{rel}:data")
            raw.role, raw.evidence, raw.exact = "other", EVIDENCE, True
            self.tensors.append(raw)
            if s is not None:
                self.storage_sizes[f"{rel}:data/{s.key}"] = s.nbytes
        elif isinstance(obj, (dict, list, tuple)):
            # Each container once: a memoized DAG of lists has 2 ** depth paths but few containers.
            if id(obj) in self.walked:
                return
            self.walked.add(id(obj))
            if isinstance(obj, dict):
                for k, v in obj.items():
                    self._inputs(v, join_key(prefix, k), depth + 1, rel)
            else:
                for i, v in enumerate(obj):
                    self._inputs(v, join_key(prefix, i), depth + 1, rel)

    # -- pickled payloads

    def _payload(self, member_name: str, rel: str) -> Any:
        """A pickled payload (a ``torch.save`` archive or a bare pickle) parsed by the restricted reader.
        Its findings join the report's, each prefixed with ``rel``; the parsed object is returned."""
        m = self.members[member_name]
        try:
            with open_regular(self.path) as f:
                if m.method == 0:
                    # A stored archive is read where it lies, by the same zip reader as the outer one.
                    start = data_offset(f, m, self.path)
                    f.seek(start)
                    if f.read(4) == b"PK\x03\x04":
                        return self._nested_zip(f, start, m.size, rel)
                data = read_member_from(f, m, MAX_PICKLE_BYTES, self.path)
                if data[:4] == b"PK\x03\x04":
                    return self._nested_zip(io.BytesIO(data), 0, len(data), rel)
        except OSError as e:
            raise InputError(f"cannot read ({e.strerror or e})", path=self.path) from e
        return self._bare_pickle(data, rel)

    def _nested_zip(self, f: Any, start: int, size: int, rel: str) -> Any:
        """The ``torch.save`` archive of ``size`` bytes at ``start`` of ``f``: its directory, local headers,
        sizes, methods and deflate ratios are checked as the outer archive's are."""
        try:
            inner = read_directory_at(f, start, size, self.path)
            try:
                root = archive_root(list(inner), self.path)
            except InputError:
                raise InputError("a zip archive without a data.pkl", path=self.path) from None
            data = read_member_from(f, inner[f"{root}/data.pkl"], MAX_PICKLE_BYTES, self.path)
        except StatecliError as e:
            raise type(e)(f"{rel}: {e.message}", path=self.path) from None
        storages = Storages(inner, root, self.path)
        self.nested_nbytes = 0
        try:
            obj, unpickler = loads(data, storages)
        except StatecliError as e:
            raise type(e)(f"{rel}: {e.message}", path=self.path) from e
        self._add_security(unpickler.globals_seen, unpickler.actions.values(), rel)
        self.nested_nbytes = sum(s.nbytes for s in storages.cache.values())
        return obj

    def _bare_pickle(self, data: bytes, rel: str) -> Any:
        """A payload torch unpickles with plain ``pickle``: parsed for its findings. Where the restricted
        reader cannot follow it to the end, what follows the failure point is unchecked: that is a finding."""
        unpickler = RestrictedUnpickler(data, _inert_pid)
        obj = None
        try:
            obj = unpickler.load()
        except StatecliError as e:
            reason = e.message
            self.security.add(
                Finding(
                    "dangerous",
                    "unchecked-pickle",
                    f"{rel}: torch.export.load unpickles this without restrictions, and statecli could not read "
                    f"it to the end ({reason[:120]}); what follows was not checked",
                )
            )
        self._add_security(unpickler.globals_seen, unpickler.actions.values(), rel)
        return obj

    def _add_security(self, globals_seen: dict[tuple[str, str], int], actions: Iterable[Action], rel: str) -> None:
        for f in findings_for(globals_seen, actions):
            self.security.add(Finding(f.level, f.code, f"{rel}: {f.message}"))


def _same_tensor(
    t: TensorRef, dtype: str, shape: tuple[int, ...], stride: tuple[int, ...], offset: int, where: str, path: str
) -> None:
    """Refuse a pickled tensor that is not the one its ``tensor_meta`` describes."""
    got_stride = t.stride if t.stride is not None else contiguous_strides(t.shape)
    if (t.dtype, t.shape, got_stride, t.offset) != (dtype, shape, stride, offset):
        raise InputError(
            f"{where} holds a {t.dtype} tensor of shape {list(t.shape)} (stride {list(got_stride)}, offset "
            f"{t.offset}), but its tensor_meta says {dtype}, shape {list(shape)} (stride {list(stride)}, offset "
            f"{offset}): torch.export.load would return the pickled one",
            path=path,
        )


def _payload_layout(obj: Any) -> str | None:
    """``subclass:<class>`` for a pickled wrapper subclass (``torch._utils._rebuild_wrapper_subclass``)."""
    if isinstance(obj, TensorRef):
        return obj.layout
    if isinstance(obj, Stub) and isinstance(obj.args, tuple) and obj.args:
        cls = obj.args[0]
        if isinstance(cls, Global):
            return f"subclass:{cls.qualname}"
    return None


def _signature(doc: dict[str, Any], what: str, path: str) -> dict[str, tuple[str, bool | None]]:
    """fqn -> (``parameter`` | ``buffer`` | ``constant``, persistent) from the program's graph signature."""
    try:
        specs = doc["graph_module"]["signature"]["input_specs"]
    except (KeyError, TypeError):
        raise InputError(f"{what} has no graph_module.signature.input_specs", path=path) from None
    if not isinstance(specs, list):
        raise InputError(f"{what}: input_specs is not a list", path=path)
    out: dict[str, tuple[str, bool | None]] = {}
    for spec in specs:
        if not isinstance(spec, dict) or len(spec) != 1:
            raise InputError(f"{what}: malformed input spec {describe(spec, limit=80)}", path=path)
        ((kind, body),) = spec.items()
        if not isinstance(body, dict):
            raise InputError(f"{what}: malformed {kind} input spec", path=path)
        if kind == "parameter":
            entry: tuple[str, bool | None] = ("parameter", True)
            fqn = body.get("parameter_name")
        elif kind == "buffer":
            persistent = body.get("persistent")
            entry = ("buffer", persistent if isinstance(persistent, bool) else None)
            fqn = body.get("buffer_name")
        elif kind == "tensor_constant":
            entry = ("constant", None)
            fqn = body.get("tensor_constant_name")
        else:
            continue  # user inputs, tokens, custom objects, constant inputs: not tensors the archive stores
        if not isinstance(fqn, str):
            raise InputError(f"{what}: a {kind} input spec without a name", path=path)
        if fqn in out and out[fqn] != entry:
            raise InputError(f"{what}: {quote(fqn)} is listed as both {out[fqn][0]} and {entry[0]}", path=path)
        out[fqn] = entry
    return out


def _config(doc: dict[str, Any], model: str, kind: str, path: str) -> dict[str, Any]:
    config = doc.get("config")
    if not isinstance(config, dict):
        raise InputError(f'{model}_{kind}_config.json has no "config" object', path=path)
    return config


def _sym_int(v: Any, what: str, path: str) -> int:
    if isinstance(v, dict) and len(v) == 1:
        n = v.get("as_int")
        if type(n) is int and 0 <= n <= MAX_INDEX:
            return n
        if "as_expr" in v:
            raise InputError(f"{what} is symbolic, not a stored size", path=path)
    raise InputError(f"{what}: {describe(v, limit=60)} is not a size", path=path)


def _sym_ints(v: Any, what: str, path: str) -> tuple[int, ...]:
    if not isinstance(v, list):
        raise InputError(f"{what} is not a list", path=path)
    if len(v) > MAX_DIMS:
        raise InputError(f"{what} has {len(v)} dimensions", path=path)
    return tuple(_sym_int(x, what, path) for x in v)


def _device(v: Any) -> str | None:
    if not isinstance(v, dict) or not isinstance(v.get("type"), str):
        return None
    kind = v["type"][:32]
    index = v.get("index")
    return f"{kind}:{index}" if type(index) is int else kind


__all__ = ["LAYOUTS", "SCALAR_TYPES", "read_pt2"]
