"""The ``_rebuild_tensor_v2`` fast path must build exactly what the general opcode loop builds."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import statecli
from statecli.formats.torchpickle import Storages as _Storages
from statecli.formats.zipdir import read_central_directory
from statecli.safepickle import Global, PickledDict, StorageRef, Stub, TensorRef
from statecli.security import loads


def canon(obj: Any, seen: dict[int, int] | None = None) -> Any:
    """A comparable form of what the reader built, sharing included (shared objects get one number)."""
    seen = {} if seen is None else seen
    if isinstance(obj, (TensorRef, StorageRef, Stub, PickledDict, dict, list)):
        if id(obj) in seen:
            return ("ref", seen[id(obj)])
        seen[id(obj)] = len(seen)
    if isinstance(obj, TensorRef):
        return ("tensor", canon(obj.storage, seen), obj.offset, obj.shape, obj.stride, obj.dtype, obj.requires_grad,
                obj.is_parameter, obj.layout, obj.device)  # fmt: skip
    if isinstance(obj, StorageRef):
        return ("storage", obj.key, obj.dtype, obj.location, obj.numel, obj.nbytes)
    if isinstance(obj, Global):
        return ("global", obj.module, obj.name)
    if isinstance(obj, Stub):
        return ("stub", canon(obj.callee, seen), canon(obj.args, seen), canon(obj.state, seen))
    if isinstance(obj, dict):
        attrs = canon(obj.attrs, seen) if isinstance(obj, PickledDict) else None
        return ("dict", [(canon(k, seen), canon(v, seen)) for k, v in obj.items()], attrs)
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [canon(v, seen) for v in obj])
    if isinstance(obj, (set, frozenset)):
        # Iteration order follows hashes (of stubs: addresses), so members are compared as sorted text,
        # each numbered on its own.
        return (type(obj).__name__, sorted(repr(canon(v, {})) for v in obj))
    return obj


def parse_both(path: Path) -> tuple[Any, Any, int]:
    members = read_central_directory(str(path))
    root = next(n for n in members if n.endswith("/data.pkl")).split("/")[0]
    with zipfile.ZipFile(path) as zf:
        data = zf.read(f"{root}/data.pkl")

    def parse(fast: bool) -> tuple[Any, int]:
        # A file torch wrote can still be refused (an expand()ed shape past 2**62 elements): then both
        # ways must refuse it with the same message.
        try:
            obj, unpickler = loads(data, _Storages(members, root, str(path)), fast_paths=fast)
        except statecli.StatecliError as e:
            return ("error", type(e).__name__, str(e)), 0
        return canon(obj), unpickler.fast_hits

    slow, _ = parse(False)
    fast, hits = parse(True)
    return slow, fast, hits


@pytest.mark.parametrize(
    "name",
    ["cnn_bn_state_dict.pt", "cnn_bn_module.pt", "cnn_bn_keep_vars.pt", "tied_lm.pt", "training_adam.pt",
     "lightning.ckpt", "all_dtypes.pt", "qat_observers.pt", "cuda_tagged.pt", "frozen_nonpersistent_module.pt"],
)  # fmt: skip
def test_samples_parse_the_same_both_ways(samples_dir: Path, name: str) -> None:
    slow, fast, hits = parse_both(samples_dir / name)
    assert fast == slow
    assert hits > 0  # the fast path really ran


def test_wide_ints_long_memo_and_ranks(tmp_path: Path) -> None:
    # > 256 memo entries (LONG_BINPUT / LONG_BINGET), sizes needing BININT2 and BININT, ranks 0..5,
    # views with offsets and strides, shared storages and requires_grad.
    sd: dict[str, torch.Tensor] = {}
    for i in range(150):
        rank = i % 6
        shape = tuple([1 + (i * 7 + d) % 3 for d in range(rank)])
        sd[f"layer{i}.weight"] = torch.zeros(shape)
    big = torch.zeros(70_000)
    sd["big"] = big
    sd["big_view"] = big[300:]  # offset needs BININT2
    sd["big_far"] = big[66_000:]  # offset > 65535: BININT
    sd["strided"] = big.view(100, 700)[:, ::3]
    sd["tied"] = sd["layer7.weight"]
    sd["grad"] = torch.nn.Parameter(torch.ones(3))
    path = tmp_path / "wide.pt"
    torch.save(sd, path)
    slow, fast, hits = parse_both(path)
    assert fast == slow
    assert hits >= 150


@settings(max_examples=30, deadline=None, database=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 70_000), max_size=4).map(tuple), min_size=1, max_size=12),
    protocol=st.sampled_from([2, 3, 4]),
)
def test_random_shapes_parse_the_same_both_ways(
    tmp_path_factory: pytest.TempPathFactory, shapes: list[tuple[int, ...]], protocol: int
) -> None:
    # expand() gives big shapes with zero strides over a one-byte storage: wide ints, no big files.
    one = torch.zeros(1, dtype=torch.int8)
    sd = {f"t{i}": one.view([1] * len(s)).expand(s) if s else one[0] for i, s in enumerate(shapes)}
    path = tmp_path_factory.mktemp("fp") / "r.pt"
    torch.save(sd, path, pickle_protocol=protocol)
    assert path.stat().st_size < 1_000_000
    slow, fast, _ = parse_both(path)
    assert fast == slow


def _rewrite_pickle(src: Path, dst: Path, edit: Any) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                data = edit(data)
            zout.writestr(info.filename.replace(src.stem, dst.stem, 1), data)


@pytest.mark.parametrize(
    ("what", "encoded"),
    [("shape", b"J\xff\xff\xff\xff\x85"), ("stride", b"J\xfe\xff\xff\xff\x85")],
)
def test_negative_sizes_in_the_fast_path_are_refused(tmp_path: Path, what: str, encoded: bytes) -> None:
    src = tmp_path / "src.pt"
    torch.save({"a": torch.zeros(2), "b": torch.zeros(2)}, src)
    dst = tmp_path / "dst.pt"

    def edit(data: bytes) -> bytes:
        # b's call: its shape tuple (K 2, TUPLE1) then stride tuple (K 1, TUPLE1), after offset K 0.
        at = data.rindex(b"QK\x00K\x02\x85")
        shape_at, stride_at = at + 3, data.index(b"K\x01\x85", at)
        target = shape_at if what == "shape" else stride_at
        return data[:target] + encoded + data[target + 3 :]

    _rewrite_pickle(src, dst, edit)
    with pytest.raises(statecli.InputError, match=f"{what} .* impossible value"):
        statecli.open_checkpoint(dst)


# Runs of entries: the fast path takes one state-dict entry after another without the opcode loop.
# Mutating real pickles byte by byte must never make it disagree with the general loop: the same
# objects, or the same error.


def _base_pickles() -> list[tuple[bytes, dict[str, Any], str]]:
    import io

    out = []
    big = torch.zeros(300)
    sd: dict[str, Any] = {f"layer{i}.wéight": torch.zeros(i % 3 + 1, 2) for i in range(40)}  # >256 memo slots
    sd.update({f"view{i}": big[i : i + 2] for i in range(3)})  # a storage's key the second time is a GET
    sd["tied"] = sd["layer3.wéight"]  # the same object: a GET of the result
    sd["count"] = torch.tensor(3)
    sd["storage"] = torch.ones(2)  # a key equal to the tag string
    cuda = {f"c{i}": torch.ones(2) for i in range(3)}
    for obj in (sd, cuda):
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        with zipfile.ZipFile(buf) as zf:
            pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
            root = pkl.split("/")[0]
            data = zf.read(pkl)
            members = {n: zf.getinfo(n).file_size for n in zf.namelist()}
        if obj is cuda:  # what a GPU save writes: the location as a fresh string in every call
            data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
        out.append((data, members, root))
    return out


_BASES = _base_pickles()


def _parse(data: bytes, members: dict[str, int], root: str, fast: bool) -> Any:
    from statecli.formats.zipdir import Directory, Member

    # The fast way over the directory reader's records (Storages' own short way to a storage record), the
    # general one over Member records (Storages' every check): the same objects, or the same error.
    infos: Any = {n: Member(n, 0, size, size, 0, 0) for n, size in members.items()}
    if fast:
        infos = Directory({n: (n, 0, size, size, 0, 0, 0, 1 << 63) for n, size in members.items()})
    try:
        obj, u = loads(data, _Storages(infos, root, "x.pt"), fast_paths=fast)
    except statecli.StatecliError as e:
        return ("error", type(e).__name__, str(e)), 0
    return canon(obj), u.fast_hits


def test_entry_runs_are_taken_from_the_bases() -> None:
    for data, members, root in _BASES:
        slow, _ = _parse(data, members, root, False)
        fast, hits = _parse(data, members, root, True)
        assert fast == slow
        assert hits >= 2  # all but the first call (which names the global): runs were taken


@settings(max_examples=300, deadline=None, database=None)
@given(
    base=st.integers(0, len(_BASES) - 1),
    edits=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=3),
)
def test_mutated_pickles_parse_the_same_both_ways(base: int, edits: list[tuple[int, int]]) -> None:
    data, members, root = _BASES[base]
    buf = bytearray(data)
    for at, value in edits:
        buf[at % len(buf)] = value
    slow, _ = _parse(bytes(buf), members, root, False)
    fast, _ = _parse(bytes(buf), members, root, True)
    assert fast == slow


@pytest.mark.parametrize(
    ("offset", "fits"),
    [(b"K\x01", True), (b"K\x02", False), (b"K\x05", False), (b"J\xff\xff\xff\xff", False)],
)
def test_a_view_past_its_storage_is_refused_in_the_fast_path(tmp_path: Path, offset: bytes, fits: bool) -> None:
    # b views 3 of its storage's 4 elements from offset 1: from offset 2 its last element would be the 5th.
    src = tmp_path / "src.pt"
    torch.save({"a": torch.zeros(2), "b": torch.zeros(4)[1:4], "c": torch.zeros(2)}, src)
    dst = tmp_path / "dst.pt"
    _rewrite_pickle(src, dst, lambda data: data.replace(b"QK\x01K\x03\x85", b"Q" + offset + b"K\x03\x85", 1))
    if fits:
        report = statecli.open_checkpoint(dst)
        assert [(t.name, t.storage_offset) for t in report.tensors] == [("a", 0), ("b", 1), ("c", 0)]
        return
    with pytest.raises(statecli.InputError, match=r"reaches element|impossible"):
        statecli.open_checkpoint(dst)


@pytest.mark.parametrize("offset", [b"K\x00", b"K\x01"])
def test_a_scalar_past_its_storage_is_refused_in_the_fast_path(tmp_path: Path, offset: bytes) -> None:
    src = tmp_path / "src.pt"
    torch.save({"a": torch.zeros(2), "b": torch.tensor(1.0), "c": torch.zeros(2)}, src)
    dst = tmp_path / "dst.pt"
    _rewrite_pickle(src, dst, lambda data: data.replace(b"QK\x00)", b"Q" + offset + b")", 1))
    if offset == b"K\x00":
        assert [t.name for t in statecli.open_checkpoint(dst).tensors] == ["a", "b", "c"]
        return
    with pytest.raises(statecli.InputError, match="reaches element 1 of storage"):
        statecli.open_checkpoint(dst)


def test_storage_records_are_the_same_the_short_way_and_the_long_way() -> None:
    # Storages takes the usual record from the directory reader's plain records in a few steps; every check
    # it makes there must agree with the full one, made over Member records.
    from statecli.formats.zipdir import Directory, Member
    from statecli.pickled import Global

    sizes = {"r/data/0": 16, "r/data/1": 8, "r/data/2": 0, "r/data/9": 20}
    float_storage, long_storage = Global("torch", "FloatStorage"), Global("torch", "LongStorage")
    odd = Global("os", "system")
    pids: list[Any] = [
        ("storage", float_storage, "0", "cpu", 4),
        ("storage", long_storage, "1", "cuda:0", 1),
        ("storage", float_storage, "2", "cpu", 0),
        ("storage", float_storage, "9", "cpu", 4),  # fewer bytes than the member holds
        ("storage", float_storage, "9", "cpu", 6),  # more
        ("storage", float_storage, "7", "cpu", 1),  # no such member
        ("storage", float_storage, "0", "c" * 65, 4),  # a location cut to 64 characters
        ("storage", float_storage, "0", "cpu", -1),
        ("storage", float_storage, "0", "cpu", 2**62 + 1),
        ("storage", float_storage, "0", "cpu", True),
        ("storage", float_storage, "0", 5, 4),
        ("storage", odd, "0", "cpu", 4),
        ("Storage", float_storage, "0", "cpu", 4),
        ("storage", float_storage, 0, "cpu", 4),
        ("storage", float_storage, "0", "cpu"),
    ]

    def outcome(storages: Any, pid: Any) -> Any:
        try:
            return storages(pid)
        except statecli.StatecliError as e:
            return type(e).__name__, str(e)

    for exact in (True, False):
        for pid in pids:
            records = {n: (n, 0, size, size, 0, 0, 0, 1 << 63) for n, size in sizes.items()}
            short = _Storages(Directory(records), "r", "x.pt", exact)
            long = _Storages({n: Member(*r) for n, r in records.items()}, "r", "x.pt", exact)
            for storages in (short, long):  # a storage type is checked once, then known: both ways
                outcome(storages, ("storage", float_storage, "0", "cpu", 4))
                outcome(storages, ("storage", long_storage, "1", "cpu", 1))
            assert outcome(short, pid) == outcome(long, pid), (exact, pid)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"optimizer": torch.zeros(2)},  # an optimizer's key holding a tensor: kept apart
        {"rng": torch.zeros(8, dtype=torch.uint8)},  # could be an RNG state
        {"callbacks": torch.zeros(2)},  # a Lightning marker
        {"w.weight": torch.nn.Parameter(torch.zeros(2))},  # keep-vars
        {"nested": {"a": torch.zeros(2)}},  # not flat
    ],
)
def test_a_flat_state_dict_is_walked_as_any_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any]
) -> None:
    # The walker tells a flat state dict (every value a tensor, none an optimizer's or an RNG state) in C and
    # hands it to the state-dict walk whole: the same records and container as the loop over its items.
    from statecli.formats import torchpickle

    path = tmp_path / "sd.pt"
    torch.save({"a.weight": torch.zeros(3), "a.bias": torch.zeros(3), "n": torch.tensor(2), **extra}, path)
    quick = statecli.open_checkpoint(path)
    monkeypatch.setattr(torchpickle, "_ONLY_TENSORS", set())  # every dict through the loop
    slow = statecli.open_checkpoint(path)
    assert quick == slow
