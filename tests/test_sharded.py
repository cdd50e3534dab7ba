"""read_index: HF *.index.json over shards, with every shard path kept inside the checkpoint folder."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from statecli.errors import InputError, LimitExceededError, UnsafeError
from statecli.formats import sharded
from statecli.formats.safetensors import read_safetensors
from statecli.formats.sharded import read_index
from statecli.records import Container, Finding, RawCheckpoint, RawTensor

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


def write_index(
    folder: Path, weight_map: object, metadata: object = None, name: str = "model.safetensors.index.json"
) -> Path:
    doc: dict[str, object] = {"weight_map": weight_map}
    if metadata is not None:
        doc["metadata"] = metadata
    path = folder / name
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def two_shards(tmp_path: Path) -> Path:
    save_file({"embed.weight": torch.zeros(10, 4), "layer.0.weight": torch.zeros(4, 4)}, str(tmp_path / SHARD1))
    save_file(
        {"layer.1.weight": torch.zeros(4, 4, dtype=torch.bfloat16), "norm.weight": torch.ones(4)},
        str(tmp_path / SHARD2),
    )
    return tmp_path


class Recorder:
    """A read_shard that remembers what it was asked to read."""

    def __init__(self, inner: Callable[[str], RawCheckpoint] = read_safetensors) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __call__(self, path: str) -> RawCheckpoint:
        self.calls.append(path)
        return self.inner(path)


def test_two_shards(two_shards: Path) -> None:
    weight_map = {
        "embed.weight": SHARD1,
        "layer.1.weight": SHARD2,
        "layer.0.weight": SHARD1,
        "norm.weight": SHARD2,
    }
    index = write_index(two_shards, weight_map, {"total_size": 296, "format": "pt", "nested": {"a": [1]}})
    rec = Recorder()
    raw = read_index(str(index), rec)

    # Shards are read on worker threads: each once, begun in any order; the records come in the index's order.
    assert sorted(rec.calls) == [str(two_shards / SHARD1), str(two_shards / SHARD2)]
    assert raw.path == str(index)
    assert raw.format == "sharded-safetensors"
    assert raw.container == Container(kind="sharded", state_dict_at="", other_keys=())
    assert raw.metadata == {"total_size": "296", "format": "pt", "nested": '{"a": [1]}'}
    assert [(t.name, t.file) for t in raw.tensors] == [
        ("embed.weight", SHARD1),
        ("layer.0.weight", SHARD1),
        ("layer.1.weight", SHARD2),
        ("norm.weight", SHARD2),
    ]
    assert {t.name: t.dtype for t in raw.tensors}["layer.1.weight"] == "bfloat16"
    assert raw.file_size == sum(os.path.getsize(two_shards / n) for n in (SHARD1, SHARD2, index.name))
    assert raw.findings == []
    assert raw.storage_sizes == {}


def test_shard_in_subfolder_and_inner_dotdot_allowed(two_shards: Path) -> None:
    (two_shards / "sub").mkdir()
    os.replace(two_shards / SHARD2, two_shards / "sub" / SHARD2)
    weight_map = {
        "embed.weight": f"sub/../{SHARD1}",
        "layer.0.weight": f"sub/../{SHARD1}",
        "layer.1.weight": f"sub/{SHARD2}",
        "norm.weight": f"sub/{SHARD2}",
    }
    raw = read_index(str(write_index(two_shards, weight_map)), read_safetensors)
    assert [t.file for t in raw.tensors] == list(weight_map.values())


def test_symlink_inside_folder_allowed(two_shards: Path) -> None:
    os.symlink(SHARD1, two_shards / "link.safetensors")
    index = write_index(two_shards, {"embed.weight": "link.safetensors", "layer.0.weight": "link.safetensors"})
    raw = read_index(str(index), read_safetensors)
    assert [t.file for t in raw.tensors] == ["link.safetensors"] * 2


def test_relative_index_path(two_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = write_index(two_shards, {"embed.weight": SHARD1, "layer.0.weight": SHARD1})
    monkeypatch.chdir(two_shards)
    raw = read_index(index.name, read_safetensors)
    assert [t.name for t in raw.tensors] == ["embed.weight", "layer.0.weight"]


# --- unsafe shard paths ------------------------------------------------------------------------------------


def _refused(index: Path, message: str) -> None:
    rec = Recorder()
    with pytest.raises(UnsafeError) as info:
        read_index(str(index), rec)
    assert message in info.value.message
    assert info.value.exit_code == 5
    assert rec.calls == []  # refused before any shard was read


def test_dotdot_refused(two_shards: Path) -> None:
    ckpt = two_shards / "ckpt"
    ckpt.mkdir()
    save_file({"x": torch.zeros(1)}, str(two_shards / "x"))
    index = write_index(ckpt, {"x": "../x"})
    _refused(index, "shard path '../x' leaves the checkpoint folder")


def test_dotdot_refused_even_when_listed_after_a_good_shard(two_shards: Path) -> None:
    ckpt = two_shards / "ckpt"
    ckpt.mkdir()
    save_file({"a": torch.zeros(1)}, str(ckpt / "a.safetensors"))
    index = write_index(ckpt, {"a": "a.safetensors", "x": "sub/../../x"})
    _refused(index, "shard path 'sub/../../x' leaves the checkpoint folder")


@pytest.mark.parametrize("shard", ["/etc/passwd", "//server/share/x", "\\x.safetensors", "C:\\x.safetensors"])
def test_absolute_refused(tmp_path: Path, shard: str) -> None:
    index = write_index(tmp_path, {"x": shard})
    _refused(index, "is absolute and leaves the checkpoint folder")


def test_absolute_refused_even_inside_folder(two_shards: Path) -> None:
    index = write_index(two_shards, {"embed.weight": str(two_shards / SHARD1)})
    _refused(index, "is absolute")


def test_symlink_outside_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.safetensors"
    save_file({"x": torch.zeros(1)}, str(outside))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    os.symlink(outside, ckpt / "shard.safetensors")
    index = write_index(ckpt, {"x": "shard.safetensors"})
    _refused(index, "shard path 'shard.safetensors' leaves the checkpoint folder")


def test_symlinked_subfolder_outside_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_file({"x": torch.zeros(1)}, str(elsewhere / "s.safetensors"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    os.symlink(elsewhere, ckpt / "sub")
    _refused(write_index(ckpt, {"x": "sub/s.safetensors"}), "leaves the checkpoint folder")


def test_sibling_folder_with_common_prefix_refused(tmp_path: Path) -> None:
    # "/a/ckpt-evil" starts with "/a/ckpt" as a string; a prefix test would let it through.
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt-evil").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "ckpt-evil" / "s.safetensors"))
    _refused(write_index(tmp_path / "ckpt", {"x": "../ckpt-evil/s.safetensors"}), "leaves the checkpoint folder")


def test_index_in_symlinked_folder_reads(two_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    link = tmp_path_factory.mktemp("links") / "ckpt"
    os.symlink(two_shards, link)
    write_index(two_shards, {"embed.weight": SHARD1, "layer.0.weight": SHARD1})
    raw = read_index(str(link / "model.safetensors.index.json"), read_safetensors)
    assert len(raw.tensors) == 2


# --- bad indexes and shards --------------------------------------------------------------------------------


def test_missing_shard(two_shards: Path) -> None:
    index = write_index(two_shards, {"embed.weight": SHARD1, "w": "model-00003-of-00003.safetensors"})
    with pytest.raises(
        InputError, match=r"shard 'model-00003-of-00003\.safetensors' named in the index does not exist"
    ):
        read_index(str(index), read_safetensors)


def test_shard_is_a_folder(two_shards: Path) -> None:
    (two_shards / "d").mkdir()
    with pytest.raises(InputError, match="shard 'd' named in the index is a directory, not a regular file"):
        read_index(str(write_index(two_shards, {"w": "d"})), read_safetensors)


def test_tensor_missing_from_shard(two_shards: Path) -> None:
    index = write_index(two_shards, {"embed.weight": SHARD1, "norm.weight": SHARD1})
    with pytest.raises(InputError) as info:
        read_index(str(index), read_safetensors)
    assert f"tensor 'norm.weight' is mapped to shard '{SHARD1}'" in info.value.message
    assert "does not hold it" in info.value.message
    assert info.value.path == str(index)


def test_unindexed_tensor_is_a_warning(two_shards: Path) -> None:
    index = write_index(two_shards, {"embed.weight": SHARD1, "norm.weight": SHARD2, "layer.1.weight": SHARD2})
    raw = read_index(str(index), read_safetensors)
    assert [t.name for t in raw.tensors] == ["embed.weight", "norm.weight", "layer.1.weight"]
    assert [(f.level, f.code) for f in raw.findings] == [("warning", "unindexed-tensor")]
    assert "'layer.0.weight'" in raw.findings[0].message
    assert SHARD1 in raw.findings[0].message


def test_shard_errors_propagate(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(InputError, match="too short"):
        read_index(str(write_index(tmp_path, {"w": "bad.safetensors"})), read_safetensors)


BAD_INDEXES = {
    "not-json": (b"{weight_map", "index is not valid JSON"),
    "not-utf8": (b'{"weight_map": {"\xff": "a"}}', "not valid UTF-8"),
    "not-object": (b"[]", "index is not a JSON object (got list)"),
    "no-weight-map": (b'{"metadata": {}}', "index has no 'weight_map'"),
    "weight-map-list": (b'{"weight_map": ["a"]}', "'weight_map' is not an object (got list)"),
    "weight-map-null": (b'{"weight_map": null}', "'weight_map' is not an object (got NoneType)"),
    "shard-not-str": (b'{"weight_map": {"w": 3}}', "entry 'w' must name a shard file"),
    "shard-empty": (b'{"weight_map": {"w": ""}}', "entry 'w' must name a shard file"),
    "metadata-list": (b'{"weight_map": {}, "metadata": [1]}', "'metadata' is not an object (got list)"),
    "duplicate-tensor": (b'{"weight_map": {"w": "a", "w": "b"}}', "duplicate key 'w' in index"),
}


@pytest.mark.parametrize(("content", "message"), BAD_INDEXES.values(), ids=BAD_INDEXES.keys())
def test_bad_index(tmp_path: Path, content: bytes, message: str) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(content)
    with pytest.raises(InputError) as info:
        read_index(str(index), read_safetensors)
    assert type(info.value) is InputError
    assert message in info.value.message
    assert "\n" not in str(info.value)


def test_missing_index(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read index"):
        read_index(str(tmp_path / "absent.index.json"), read_safetensors)


def test_index_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sharded, "MAX_INDEX_BYTES", 16)
    index = write_index(tmp_path, {"a_long_tensor_name": "s.safetensors"})
    with pytest.raises(LimitExceededError, match="more than the 16-byte limit"):
        read_index(str(index), read_safetensors)


def test_empty_index_warns(tmp_path: Path) -> None:
    raw = read_index(str(write_index(tmp_path, {})), read_safetensors)
    assert raw.tensors == []
    assert [f.code for f in raw.findings] == ["empty-index"]


# --- storages, findings, formats ---------------------------------------------------------------------------


def fake_torch_shard(path: str) -> RawCheckpoint:
    """A torch-zip-like shard: storage keys "0", "1" repeat in every shard."""
    tensors = [
        RawTensor(name=f"{Path(path).stem}.a", dtype="float32", shape=(2,), storage="0", storage_nbytes=8),
        RawTensor(name=f"{Path(path).stem}.b", dtype="float32", shape=(2,), storage="0", storage_nbytes=8),
        RawTensor(name=f"{Path(path).stem}.c", dtype="int64", shape=(), storage="1", storage_nbytes=8),
        RawTensor(name=f"{Path(path).stem}.d", dtype="int64", shape=()),
    ]
    return RawCheckpoint(
        path=path,
        format="torch-zip",
        tensors=tensors,
        container=Container(kind="state_dict", state_dict_at=""),
        findings=[Finding("warning", "unsafe-global", "calls os.system")],
        metadata={"ignored": "yes"},
        file_size=100,
        storage_sizes={"0": 16, "1": 8},
    )


def test_storage_keys_are_prefixed_per_shard(tmp_path: Path) -> None:
    for stem in ("s1", "s2"):
        (tmp_path / f"{stem}.bin").write_bytes(b"x")
    weight_map = {f"{s}.{n}": f"{s}.bin" for s in ("s1", "s2") for n in "abcd"}
    index = write_index(tmp_path, weight_map, name="pytorch_model.bin.index.json")
    raw = read_index(str(index), fake_torch_shard)
    assert raw.format == "sharded-torch-zip"
    assert {t.name: t.storage for t in raw.tensors} == {
        "s1.a": "s1.bin:0",
        "s1.b": "s1.bin:0",
        "s1.c": "s1.bin:1",
        "s1.d": None,
        "s2.a": "s2.bin:0",
        "s2.b": "s2.bin:0",
        "s2.c": "s2.bin:1",
        "s2.d": None,
    }
    assert raw.storage_sizes == {"s1.bin:0": 16, "s1.bin:1": 8, "s2.bin:0": 16, "s2.bin:1": 8}
    assert raw.file_size == 200 + os.path.getsize(index)
    assert [(f.code, f.message) for f in raw.findings] == [
        ("unsafe-global", "s1.bin: calls os.system"),
        ("unsafe-global", "s2.bin: calls os.system"),
    ]
    assert raw.metadata == {}


def test_each_shard_read_once_in_first_appearance_order(tmp_path: Path) -> None:
    for stem in ("s1", "s2"):
        (tmp_path / f"{stem}.bin").write_bytes(b"x")
    weight_map = {"s2.a": "s2.bin", "s1.d": "s1.bin", "s2.b": "s2.bin", "s1.a": "s1.bin"}
    rec = Recorder(fake_torch_shard)
    raw = read_index(str(write_index(tmp_path, weight_map)), rec)
    assert sorted(rec.calls) == [str(tmp_path / "s1.bin"), str(tmp_path / "s2.bin")]  # begun in any order
    assert [t.name for t in raw.tensors] == ["s2.a", "s2.b", "s1.d", "s1.a"]
    unindexed = sorted(f.message.split("'")[1] for f in raw.findings if f.code == "unindexed-tensor")
    assert unindexed == ["s1.b", "s1.c", "s2.c", "s2.d"]


def test_aliases_and_shard_findings_through_safetensors(tmp_path: Path) -> None:
    roles = {"schema": "statecli.roles/1", "aliases": {"lm_head.weight": "embed.weight"}}
    save_file({"embed.weight": torch.zeros(3, 2)}, str(tmp_path / "a.safetensors"), {"statecli": json.dumps(roles)})
    save_file({"w": torch.zeros(1)}, str(tmp_path / "b.safetensors"), {"statecli": "{broken"})
    weight_map = {"embed.weight": "a.safetensors", "lm_head.weight": "a.safetensors", "w": "b.safetensors"}
    raw = read_index(str(write_index(tmp_path, weight_map)), read_safetensors)
    got = {t.name: t.storage for t in raw.tensors}
    assert got == {
        "embed.weight": "a.safetensors:alias:embed.weight",
        "lm_head.weight": "a.safetensors:alias:embed.weight",
        "w": None,
    }
    assert raw.storage_sizes == {"a.safetensors:alias:embed.weight": 24}
    assert [f.code for f in raw.findings] == ["bad-statecli-metadata"]
    assert raw.findings[0].message.startswith("b.safetensors: ")


def test_mixed_shard_formats(two_shards: Path) -> None:
    (two_shards / "s1.bin").write_bytes(b"x")

    def reader(path: str) -> RawCheckpoint:
        return fake_torch_shard(path) if path.endswith(".bin") else read_safetensors(path)

    index = write_index(two_shards, {"embed.weight": SHARD1, "layer.0.weight": SHARD1, "s1.a": "s1.bin"})
    raw = read_index(str(index), reader)
    assert raw.format == "sharded-mixed"
    assert "mixed-shard-formats" in [f.code for f in raw.findings]


# --- shards read on worker threads ------------------------------------------------------------------------


@pytest.fixture
def on_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every shard read on the worker threads, waits or not (see sharded.SHARD_WAIT)."""
    monkeypatch.setattr(sharded, "SHARD_PROBE", 0)
    monkeypatch.setattr(sharded, "SHARD_WAIT", -1.0)


def _many_shards(folder: Path, n: int) -> Path:
    for k in range(n):
        (folder / f"s{k:02d}.bin").write_bytes(b"x")
    return write_index(folder, {f"s{k:02d}.{x}": f"s{k:02d}.bin" for k in range(n) for x in "dcba"})


def test_many_shards_read_on_threads_give_what_one_thread_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_threads: None
) -> None:
    index = _many_shards(tmp_path, 3 * sharded.SHARD_THREADS + 1)
    rec = Recorder(fake_torch_shard)
    raw = read_index(str(index), rec)
    assert sorted(rec.calls) == sorted(set(rec.calls)) and len(rec.calls) == 3 * sharded.SHARD_THREADS + 1
    monkeypatch.setattr(sharded, "SHARD_THREADS", 1)
    alone = read_index(str(index), fake_torch_shard)
    assert raw == alone
    assert [t.name for t in raw.tensors][:8] == ["s00.d", "s00.c", "s00.b", "s00.a", "s01.d", "s01.c", "s01.b", "s01.a"]


def test_the_first_bad_shard_in_the_index_is_the_one_reported(tmp_path: Path, on_threads: None) -> None:
    # Shards after a bad one may be read already, by other threads: the error is still the first one's.
    import threading

    index = _many_shards(tmp_path, 20)
    before = threading.active_count()

    def read(path: str) -> RawCheckpoint:
        stem = Path(path).stem
        if stem in ("s05", "s06", "s19"):
            raise InputError(f"{stem} is bad", path=path)
        return fake_torch_shard(path)

    for _ in range(5):
        with pytest.raises(InputError, match="s05 is bad"):
            read_index(str(index), read)
    assert threading.active_count() == before  # every worker thread ended with the read


def test_a_shard_that_is_an_index_is_refused_on_a_worker_thread(tmp_path: Path, on_threads: None) -> None:
    import statecli

    save_file({"w": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    save_file({"v": torch.zeros(2)}, str(tmp_path / "c.safetensors"))
    (tmp_path / "b.index.json").write_text('{"weight_map": {"u": "model.safetensors.index.json"}}')
    index = write_index(tmp_path, {"w": "a.safetensors", "u": "b.index.json", "v": "c.safetensors"})
    with pytest.raises(InputError, match="names another index") as info:
        statecli.open_checkpoint(index)
    assert info.value.path == str(index)


def test_threads_read_the_shards_only_where_reads_wait(tmp_path: Path) -> None:
    # The first shards are read on this thread and timed: threads take the rest only where those waited (a
    # network filesystem's round trips; here a sleep), not where they cost only CPU (a local, cached disk).
    import threading
    import time

    index = _many_shards(tmp_path, sharded.SHARD_PROBE + 3 * sharded.SHARD_THREADS)
    for wait, threaded in ((0.0, False), (0.005, True)):
        where: list[str] = []

        def read(path: str, wait: float = wait, where: list[str] = where) -> RawCheckpoint:
            where.append(threading.current_thread().name)
            time.sleep(wait)
            return fake_torch_shard(path)

        read_index(str(index), read)
        main = threading.current_thread().name
        assert where[: sharded.SHARD_PROBE] == [main] * sharded.SHARD_PROBE
        assert any(name != main for name in where) == threaded, wait
