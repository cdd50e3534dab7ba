"""statecli.security.loads on hand-made pickles: Python's own ``pickle`` is the oracle for plain data;
for everything else the reader must build inert data, call nothing, and fail only with InputError."""

from __future__ import annotations

import contextlib
import os
import pickle
import pickletools
import struct
import sys
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statecli.dtypes import DTYPES, STORAGE_TYPES
from statecli.errors import InputError, LimitExceededError, UnsafeError
from statecli.safepickle import Global, Limits, StorageRef, Stub, TensorRef
from statecli.security import classify, findings_for, loads

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)


def same(a: Any, b: Any) -> bool:
    """Equal values of identical types, all the way down (``1 == True == 1.0`` is not good enough)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)  # tells -0.0 from 0.0
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def assert_like_pickle(data: bytes) -> Any:
    expected = pickle.loads(data)
    got, _ = loads(data)
    assert same(got, expected), (got, expected)
    return got


def opnames(data: bytes) -> set[str]:
    return {op.name for op, _, _ in pickletools.genops(data)}


def storage_for(pid: Any) -> StorageRef:
    """A minimal persistent_load for torch pickles: any well-formed storage id, sized as it claims."""
    if not (isinstance(pid, tuple) and len(pid) == 5 and type(pid[4]) is int):
        raise InputError(f"bad persistent id {pid!r}")
    _, stype, key, location, numel = pid
    dtype = STORAGE_TYPES.get(getattr(stype, "name", ""), "uint8")
    return StorageRef(str(key), dtype, str(location), numel, numel * DTYPES[dtype].itemsize)


def data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


# ------------------------------------------------------------------------------ plain data, pickle as oracle

shared = [1, 2]
PLAIN_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    255,
    256,
    65535,
    65536,
    2**31 - 1,
    -(2**31),
    2**63,
    -(2**64) - 1,
    10**40,
    0.0,
    -0.0,
    1.5,
    -2.25e-300,
    1e300,
    float("inf"),
    float("-inf"),
    "",
    "ascii",
    "naïve ünïcode ✓ 𝄞",
    "back\\slash and\nnewline and 'quotes' \"both\"",
    "x" * 300,
    b"\x00\x01\xff bytes",
    b"y" * 300,
    (),
    (1,),
    (1, 2),
    (1, 2, 3),
    (1, 2, 3, 4),
    [],
    [1, "a", None],
    {},
    {"a": 1, 2: "b", None: [], (1, 2): {"nested": (True, False)}, 1.5: b"k"},
    set(),
    {1, 2, 3, "s"},
    frozenset(),
    frozenset({1, "f", (2, 3)}),
    [shared, shared, (shared,)],  # memo: one object, three references
    {"k": [list(range(50)), {"deep": [[[["x"]]]]}]},
    [[i, str(i), float(i), bytes([i % 256]) * (i % 3 + 1)] for i in range(120)],
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("value", PLAIN_VALUES, ids=lambda v: type(v).__name__)
def test_plain_data_equals_pickle(protocol: int, value: Any) -> None:
    assert_like_pickle(pickle.dumps(value, protocol=protocol))


def test_shared_objects_stay_shared() -> None:
    for protocol in PROTOCOLS:
        got, _ = loads(pickle.dumps([shared, shared], protocol=protocol))
        assert got[0] is got[1], protocol


@pytest.mark.parametrize("protocol", [0, 1, 2])
def test_empty_bytes_text_protocols(protocol: int) -> None:
    assert_like_pickle(pickle.dumps(b"", protocol=protocol))


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_empty_bytes_binary_protocols(protocol: int) -> None:
    assert_like_pickle(pickle.dumps(b"", protocol=protocol))


def test_oracle_pickles_use_the_opcodes_under_test() -> None:
    """The corpus above really exercises protocol 0 text opcodes and protocol 4/5 framing."""
    corpus = PLAIN_VALUES
    p0 = set().union(*(opnames(pickle.dumps(v, 0)) for v in corpus))
    assert {"INT", "LONG", "FLOAT", "UNICODE", "PUT", "GET", "MARK", "DICT", "LIST", "TUPLE", "GLOBAL", "REDUCE"} <= p0
    p2 = set().union(*(opnames(pickle.dumps(v, 2)) for v in corpus))
    assert {"PROTO", "BININT1", "BININT2", "BININT", "LONG1", "BINFLOAT", "NEWTRUE", "NEWFALSE", "BINPUT"} <= p2
    assert {"GLOBAL", "BINGET", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_DICT", "SETITEMS", "APPENDS"} <= p2
    for protocol in (4, 5):
        ops = set().union(*(opnames(pickle.dumps(v, protocol)) for v in corpus))
        assert {"FRAME", "MEMOIZE", "SHORT_BINUNICODE", "SHORT_BINBYTES", "EMPTY_SET", "ADDITEMS", "FROZENSET"} <= ops


hashables = (
    st.none()
    | st.booleans()
    | st.integers(-(10**60), 10**60)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(min_size=1, max_size=20)
)


@st.composite
def plain_pickles(draw: st.DrawFn) -> bytes:
    protocol = draw(st.sampled_from(PROTOCOLS))
    # Integers stay under the 64-digit cap on protocol 0/1 LONG text lines (a deliberate limit).
    leaves = hashables | st.binary(max_size=20)
    value = draw(
        st.recursive(
            leaves,
            lambda c: (
                st.lists(c, max_size=4)
                | st.tuples(c, c)
                | st.tuples(c)
                | st.dictionaries(hashables, c, max_size=4)
                | st.sets(hashables, max_size=4)
                | st.frozensets(hashables, max_size=4)
            ),
            max_leaves=15,
        )
    )
    return pickle.dumps(value, protocol=protocol)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, database=None)
@given(data=plain_pickles())
def test_random_plain_data_equals_pickle(data: bytes) -> None:
    assert_like_pickle(data)


# ----------------------------------------------------------------------------------- nothing is ever called


class _System:
    """Pickles as a call of os.system (posix.system on Linux), as a hostile file would."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch statecli_pwned_marker",))


# Made before any test patches os.system (pickle names the function it is given).
SYSTEM_PICKLES = {p: pickle.dumps({"payload": _System()}, protocol=p) for p in PROTOCOLS}


@pytest.fixture
def no_system(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Make os.system / posix.system record any call (the reader must never make one)."""
    called: list[Any] = []

    def fake(*a: Any, **k: Any) -> int:
        called.append(a)
        return 0

    monkeypatch.setattr(os, "system", fake)
    native = sys.modules.get(os.name)  # posix / nt: where os.system really lives
    if native is not None and hasattr(native, "system"):
        monkeypatch.setattr(native, "system", fake)
    return called


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_reduce_of_os_system_gives_inert_stub(protocol: int, no_system: list[Any], tmp_path: Path) -> None:
    obj, u = loads(SYSTEM_PICKLES[protocol])
    stub = obj["payload"]
    assert isinstance(stub, Stub)
    assert stub.kind == "reduce"
    assert isinstance(stub.callee, Global)
    assert stub.callee.qualname in ("posix.system", "os.system", "nt.system")
    assert stub.args == ("touch statecli_pwned_marker",)
    [action] = u.actions.values()
    assert (action.kind, action.name, action.count) == ("call", stub.callee.qualname, 1)
    assert action.example == "('touch statecli_pwned_marker')"
    assert (stub.callee.module, stub.callee.name) in u.globals_seen
    assert no_system == []
    assert not (tmp_path / "statecli_pwned_marker").exists()
    findings = findings_for(u.globals_seen, u.actions.values())
    assert [f.level for f in findings] == ["dangerous"]
    assert "system('touch statecli_pwned_marker')" in findings[0].message


def test_hand_made_global_reduce(no_system: list[Any]) -> None:
    obj, u = loads(b"cos\nsystem\n(S'echo hi'\ntR.")
    assert isinstance(obj, Stub)
    assert obj.class_name == "os.system"
    assert obj.args == ("echo hi",)
    assert [(a.kind, a.name, a.example) for a in u.actions.values()] == [("call", "os.system", "('echo hi')")]
    assert no_system == []


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"(S'echo hi'\nios\nsystem\n.", "inst"),  # INST
        (b"(cos\nsystem\nS'echo hi'\no.", "inst"),  # OBJ
        (b"\x80\x02cos\nsystem\nX\x07\x00\x00\x00echo hi\x85\x81.", "newobj"),  # NEWOBJ
        (b"\x80\x04\x8c\x02os\x8c\x06system\x93X\x07\x00\x00\x00echo hi\x85}\x92.", "newobj"),  # NEWOBJ_EX
    ],
    ids=["INST", "OBJ", "NEWOBJ", "NEWOBJ_EX"],
)
def test_every_call_opcode_gives_stub(data: bytes, kind: str, no_system: list[Any]) -> None:
    obj, u = loads(data)
    assert isinstance(obj, Stub)
    assert obj.kind == kind
    assert obj.class_name == "os.system"
    # NEWOBJ makes an instance (cls.__new__); INST and OBJ call. Either way os.system is not on an allow list.
    assert [(a.kind, a.name) for a in u.actions.values()] == [
        ("call" if kind == "inst" else "instantiate", "os.system")
    ]
    assert [f.level for f in findings_for(u.globals_seen, u.actions.values())] == ["dangerous"]
    assert no_system == []


def test_build_on_stub_and_on_global() -> None:
    # BUILD on an instance: the state is kept on the stub; nothing runs __setstate__.
    obj, _ = loads(b"\x80\x02cmypkg\nMyNet\n)\x81}X\x01\x00\x00\x00aK\x01sb.")
    assert isinstance(obj, Stub) and obj.class_name == "mypkg.MyNet" and obj.state == {"a": 1}
    # BUILD on a bare global would set attributes on a module-level object: recorded, reported.
    _, u = loads(b"\x80\x02cos\nenviron\n}X\x01\x00\x00\x00aK\x01sb.")
    assert [(a.kind, a.name) for a in u.actions.values()] == [("patch", "os.environ")]
    assert any(f.code == "build-on-global" for f in findings_for(u.globals_seen, u.actions.values()))


def test_allowlisted_names_run_statecli_handlers() -> None:
    from collections import OrderedDict

    obj, u = loads(pickle.dumps(OrderedDict([("a", 1), ("b", [2])]), protocol=2))
    assert dict(obj) == {"a": 1, "b": [2]}
    assert list(obj) == ["a", "b"]
    assert u.actions == {}


# --------------------------------------------------------------------------------------- malformed pickles


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x04K\x01K\x02\x93.",
        b"\x80\x04\x8c\x02osK\x02\x93.",
        b"\x80\x04K\x01\x8c\x06system\x93.",
        b"\x80\x04N\x8c\x06system\x93.",
    ],
    ids=["int-int", "str-int", "int-str", "none-str"],
)
def test_stack_global_with_non_string_operands(data: bytes) -> None:
    with pytest.raises(InputError, match="STACK_GLOBAL"):
        loads(data)


def test_long_binput_max_index_uses_no_memory() -> None:
    data = b"\x80\x02K\x05r\xff\xff\xff\xffj\xff\xff\xff\xff\x86."
    tracemalloc.start()
    try:
        obj, _ = loads(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert obj == (5, 5)
    assert peak < 1 << 20, f"peak {peak} bytes for a 2**32-1 memo index"


@pytest.mark.parametrize(
    "data",
    [b"\x80\x02K\x01h\x07.", b"\x80\x02K\x01j\x00\x01\x00\x00.", b"I1\np0\ng1\n."],
    ids=["BINGET", "LONG_BINGET", "GET"],
)
def test_get_of_missing_memo(data: bytes) -> None:
    with pytest.raises(InputError, match="memo"):
        loads(data)


@pytest.mark.parametrize(
    "header",
    [
        b"\x80\x04X\xff\xff\xff\xff",  # BINUNICODE, 4 GiB - 1
        b"\x80\x04\x8d\x00\x00\x00\x00\x01\x00\x00\x00",  # BINUNICODE8, 4 GiB
        b"\x80\x04\x8e\x00\x00\x00\x00\x02\x00\x00\x00",  # BINBYTES8, 8 GiB
        b"\x80\x04B\xff\xff\xff\xff",  # BINBYTES
        b"\x80\x05\x96\x00\x00\x00\x00\x01\x00\x00\x00",  # BYTEARRAY8
        b"\x80\x02T\xff\xff\xff\x7f",  # BINSTRING
    ],
    ids=["BINUNICODE", "BINUNICODE8", "BINBYTES8", "BINBYTES", "BYTEARRAY8", "BINSTRING"],
)
@pytest.mark.parametrize("max_str", [None, 1 << 40], ids=["default-limits", "huge-max_str"])
def test_huge_declared_length_on_tiny_pickle(header: bytes, max_str: int | None) -> None:
    data = (header + b"abcdefghijklmnopqrst")[:20]
    assert len(data) == 20
    limits = Limits() if max_str is None else Limits(max_str=max_str)
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as info:
            loads(data, limits=limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # the claimed length was never allocated
    if max_str is None:
        assert isinstance(info.value, LimitExceededError)
    else:
        assert "past the end" in info.value.message


@pytest.mark.parametrize("protocol", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("value", ["s" * 17, b"b" * 17, "é" * 9], ids=["str", "bytes", "utf8"])
def test_string_above_max_str(protocol: int, value: Any) -> None:
    data = pickle.dumps([value], protocol=protocol)
    loads(data, limits=Limits(max_str=18))  # at the limit: fine
    with pytest.raises(LimitExceededError):
        loads(data, limits=Limits(max_str=16))


def test_long4_above_max_long_bytes() -> None:
    data = pickle.dumps(1 << (8 * 300), protocol=2)
    assert "LONG4" in opnames(data)
    assert loads(data)[0] == 1 << (8 * 300)
    with pytest.raises(LimitExceededError):
        loads(data, limits=Limits(max_long_bytes=256))


def _nested(depth: int) -> list[Any]:
    v: list[Any] = [0, 0]
    for _ in range(depth - 1):
        v = [v, 0]
    return v


def test_mark_nesting_limit() -> None:
    limits = Limits(max_depth=50)
    with pytest.raises(LimitExceededError):
        loads(b"(" * 51 + b"t.", limits=limits)
    loads(b"(" * 50 + b")" + b"t" * 50 + b".", limits=limits)  # 50 open marks are allowed
    deep = pickle.dumps(_nested(60), protocol=2)
    with pytest.raises(LimitExceededError):
        loads(deep, limits=limits)
    ok = pickle.dumps(_nested(40), protocol=2)
    assert loads(ok, limits=limits)[0] == _nested(40)


def test_max_ops_limit() -> None:
    data = pickle.dumps(list(range(1000)), protocol=2)
    with pytest.raises(LimitExceededError):
        loads(data, limits=Limits(max_ops=len(data) - 1))
    assert loads(data, limits=Limits(max_ops=len(data)))[0] == list(range(1000))


def test_memo_limit() -> None:
    data = pickle.dumps([[i] for i in range(100)], protocol=2)
    with pytest.raises(LimitExceededError):
        loads(data, limits=Limits(max_memo=50))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["cnn_bn_state_dict.pt", "frozen_nonpersistent_module.pt", "tied_lm.pt", "all_dtypes.pt", "malicious_os_system.pt"],
)
def test_every_prefix_of_a_torch_pickle_is_an_input_error(samples_dir: Path, name: str) -> None:
    data = data_pkl(samples_dir / name)
    if name != "all_dtypes.pt":  # all_dtypes' full pickle trips the quint4x2 bug (test_torch_oracle)
        obj, _ = loads(data, storage_for)
        assert obj is not None
    for i in range(len(data)):
        try:
            loads(data[:i], storage_for)
        except InputError:
            continue
        except UnsafeError as e:
            # Past the payload's REDUCE: torch.load would run it before it meets the truncation.
            assert name == "malicious_os_system.pt" and "posix.system" in e.message, e
            continue
        except Exception as e:  # pragma: no cover - the failure message is the point
            pytest.fail(f"prefix of {i} bytes raised {type(e).__name__}: {e}")
        pytest.fail(f"prefix of {i} bytes of {len(data)} loaded without error")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_prefix_of_a_plain_pickle_is_an_input_error(protocol: int) -> None:
    data = pickle.dumps(PLAIN_VALUES[:-1], protocol=protocol)
    for i in range(len(data)):
        with pytest.raises(InputError):
            loads(data[:i])


@settings(max_examples=300, deadline=None, database=None)
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
def test_corrupted_torch_pickle_never_raises_anything_else(edits: list[tuple[int, int]]) -> None:
    data = bytearray(_TORCH_PICKLE)
    for at, byte in edits:
        data[at % len(data)] = byte
    with contextlib.suppress(InputError, UnsafeError):  # any other exception fails the test
        loads(bytes(data), storage_for)


_TORCH_PICKLE = data_pkl(Path(__file__).resolve().parent.parent / "sample_models" / "cnn_bn_module.pt")


# ------------------------------------------------------------------------------- protocol-2 name mapping


def test_protocol2_builtin_names_are_mapped() -> None:
    obj, u = loads(b"\x80\x02c__builtin__\nset\n]K\x01aK\x02a\x85R.")
    assert obj == {1, 2}
    assert ("builtins", "set") in u.globals_seen
    assert not any(m == "__builtin__" for m, _ in u.globals_seen)
    obj, u = loads(b"\x80\x02c__builtin__\neval\nX\x01\x00\x00\x001\x85R.")
    assert isinstance(obj, Stub) and obj.class_name == "builtins.eval"
    assert classify("builtins", "eval") == "dangerous"
    _, u = loads(b"\x80\x02ccopy_reg\n_reconstructor\n.")
    assert list(u.globals_seen) == [("copyreg", "_reconstructor")]
    # protocol 0 has no PROTO opcode: mapped as well
    obj, _ = loads(b"c__builtin__\nfrozenset\n((lp0\nI1\naI2\natR.")
    assert obj == frozenset({1, 2})


def test_protocol3_names_are_not_mapped() -> None:
    # pickle itself maps only for protocol < 3, so a protocol-3 '__builtin__' is a different (unknown) module.
    obj, u = loads(b"\x80\x03c__builtin__\nset\n]K\x01a\x85R.")
    assert isinstance(obj, Stub)
    assert ("__builtin__", "set") in u.globals_seen


# ------------------------------------------------------------------------------------------- classify


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("posix", "system"),
        ("os", "system"),
        ("nt", "system"),
        ("builtins", "eval"),
        ("builtins", "exec"),
        ("builtins", "getattr"),
        ("builtins", "eval.__call__"),
        ("__builtin__", "eval"),
        ("subprocess", "Popen"),
        ("subprocess", "check_output"),
        ("runpy", "_run_code"),
        ("importlib", "import_module"),
        ("pickle", "loads"),
        ("_pickle", "loads"),
        ("marshal", "loads"),
        ("shutil", "copy"),
        ("shutil", "rmtree"),
        ("operator", "attrgetter"),
        ("torch.utils.collect_env", "run"),
        ("pydoc", "pipepager"),
        ("torch", "load"),
    ],
)
def test_classify_dangerous(module: str, name: str) -> None:
    assert classify(module, name) == "dangerous"


@pytest.mark.parametrize(
    ("module", "name", "kind"),
    [
        ("torch._utils", "_rebuild_tensor_v2", "allowed"),
        ("torch._utils", "_rebuild_parameter", "allowed"),
        ("collections", "OrderedDict", "allowed"),
        ("torch", "FloatStorage", "allowed"),
        ("torch", "bfloat16", "allowed"),
        ("torch.nn.modules.conv", "Conv2d", "info"),
        ("torch.nn.modules.batchnorm", "BatchNorm2d", "info"),
        # functools.partial only stores a callable: making one is inert (what it stores is judged by name).
        ("functools", "partial", "info"),
        ("mypkg", "MyNet", "unknown"),
        ("sample_nets", "SmallCNN", "unknown"),
    ],
)
def test_classify_others(module: str, name: str, kind: str) -> None:
    assert classify(module, name) == kind


def test_tensor_rebuild_gives_tensor_ref() -> None:
    # ('storage', FloatStorage, '0', 'cpu', 6) -> _rebuild_tensor_v2(storage, 2, (2, 2), (2, 1), True, OrderedDict())
    data = (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
        b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQK\x02K\x02K\x02\x86K\x02K\x01\x86\x88"
        b"ccollections\nOrderedDict\n)RtR."
    )
    t, u = loads(data, storage_for)
    assert isinstance(t, TensorRef)
    assert (t.dtype, t.shape, t.stride, t.offset, t.requires_grad) == ("float32", (2, 2), (2, 1), 2, True)
    assert t.storage is not None and (t.storage.key, t.storage.location, t.storage.nbytes) == ("0", "cpu", 24)
    assert u.actions == {}
    # the same tensor reaching past its storage is refused
    with pytest.raises(InputError, match="storage"):
        loads(data.replace(b"K\x06tQ", b"K\x05tQ"), storage_for)
