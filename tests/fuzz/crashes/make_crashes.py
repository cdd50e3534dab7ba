"""The inputs the structural fuzzer found that statecli still fails on, each cut down to its cause.

    PYTHONPATH=tests/fuzz python tests/fuzz/crashes/make_crashes.py   # (re)build every reproducer beside this script

(from the repository root; tests/fuzz holds the ``structures`` module it imports.)

Each reproducer is a folder ``<name>/`` holding the checkpoint (a file, or a DCP / sharded folder) as
``input`` or ``input.<suffix>``; :data:`CRASHES` says why it fails and where the fix belongs.
tests/test_trust_fuzz.py runs every command path on each (tests/fuzz/commands.py's property) and expects
the failure, strictly: a fix makes the test pass unexpectedly, and its entry here goes (the input can
then move to the hostile cases or a regression test). Deterministic; torch is used to write trusted
parts the way torch writes them.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from structures import DATE, PID, Call, G, NewObj, ODict, dumps, laughs

HERE = Path(__file__).resolve().parent


class Crash(NamedTuple):
    reason: str
    build: Callable[[Path], Path]  # writes the input into an empty folder, returns the path to read
    pt_output: bool = False  # convert to .pt (else .safetensors)
    expect: tuple[str, ...] = ()  # outcomes (tests/fuzz/commands.py) the fix must give besides the property
    needs_memory_cap: bool = False  # fails only where commands.memory_cap can cap the address space (Linux)
    fixed: bool = False  # the defect is fixed: the reproducer stays, as a regression test that must pass


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(zipfile.ZipInfo(name, DATE), data)
    return buf.getvalue()


def _tensor(key: str, numel: int, shape: tuple[int, ...], storage: str = "FloatStorage") -> Call:
    pid = PID(("storage", G("torch", storage), key, "cpu", numel))
    stride = tuple(int(x) for x in _contiguous(shape))
    return Call(G("torch._utils", "_rebuild_tensor_v2"), (pid, 0, shape, stride, False, ODict([])))


def _contiguous(shape: tuple[int, ...]) -> list[int]:
    out, step = [], 1
    for s in reversed(shape):
        out.append(step)
        step *= s
    return out[::-1]


# --------------------------------------------------------------------------------- duplicate names


def name_collision(d: Path) -> Path:
    import torch

    p = d / "input.pt"
    torch.save({"a.b": torch.ones(2), "a": {"b": torch.zeros(3)}}, p)
    return p


def module_parameter_and_buffer_of_one_name(d: Path) -> Path:
    state = {
        "training": True,
        "_parameters": ODict([("w", _tensor("0", 2, (2,)))]),
        "_buffers": ODict([("w", _tensor("1", 3, (3,)))]),
        "_non_persistent_buffers_set": set(),
        "_modules": ODict([]),
    }
    p = d / "input.pt"
    members = {"archive/data.pkl": dumps(NewObj(G("mymodels", "Net"), (), state))}
    members |= {"archive/byteorder": b"little", "archive/data/0": bytes(8), "archive/data/1": bytes(12)}
    p.write_bytes(_zip({**members, "archive/version": b"3\n"}))
    return p


def _safetensors(tensors: dict[str, int], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {}
    at = 0
    for name, n in tensors.items():
        header[name] = {"dtype": "F32", "shape": [n], "data_offsets": [at, at + 4 * n]}
        at += 4 * n
    header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(at)


def sharded_alias_in_two_shards(d: Path) -> Path:
    folder = d / "input"
    folder.mkdir()
    for i, (name, n) in enumerate((("a.w", 2), ("b.w", 3)), 1):
        table = {"schema": "statecli.roles/1", "aliases": {"tied.w": name}}
        shard = _safetensors({name: n}, {"format": "pt", "statecli": json.dumps(table)})
        (folder / f"model-0000{i}-of-00002.safetensors").write_bytes(shard)
    weight_map = {"a.w": "model-00001-of-00002.safetensors", "b.w": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _dcp_save(folder: Path, state: dict) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


def dcp_model_key_clash(d: Path) -> Path:
    import torch

    return _dcp_save(d / "input", {"model": {"w": torch.zeros(2)}, "w": torch.ones(3)})


# ------------------------------------------------------------------------------------------ DCP


Blocks = list[tuple[tuple[int, int], tuple[int, int]]]


def _dcp_chunked(folder: Path, chunks: Blocks, extra: dict | None = None, size: object = None) -> Path:
    """A DCP folder holding ``model.w`` (3 x 2 float32) as the given (offsets, sizes) chunks, each a
    torch.save archive of that block of ``arange(6)``, as DCP's TORCH_SAVE layout stores them."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    folder.mkdir()
    full = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    data = bytearray()
    storage = {}
    metas = []
    for offsets, sizes in chunks:
        buf = io.BytesIO()
        block = full[offsets[0] : offsets[0] + sizes[0], offsets[1] : offsets[1] + sizes[1]].clone()
        torch.save(block, buf)
        blob = buf.getvalue()
        storage[MetadataIndex("model.w", torch.Size(offsets))] = _StorageInfo("__0_0.distcp", len(data), len(blob))
        data += blob
        metas.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
    shape = torch.Size([3, 2]) if size is None else size
    sdm: dict = {"model.w": TensorStorageMetadata(TensorProperties(dtype=torch.float32), shape, metas)}
    sdm |= (extra or {}).get("sdm", {})
    md = Metadata(state_dict_metadata=sdm, planner_data={"model.w": ("model", "w")}, storage_data=storage)
    (folder / "__0_0.distcp").write_bytes(bytes(data))
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    return folder


def dcp_overlapping_chunks(d: Path) -> Path:
    # Rows 0-1, then row 1 again: 4 + 2 elements add up to the tensor's 6, row 2 is never written.
    return _dcp_chunked(d / "input", [((0, 0), (2, 2)), ((1, 0), (1, 2))])


def dcp_key_with_a_newline(d: Path) -> Path:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    # A non-tensor entry without a storage_data record: the error names it, newline and all.
    return _dcp_chunked(d / "input", [((0, 0), (3, 2))], {"sdm": {"line\nbreak": BytesStorageMetadata()}})


def dcp_size_of_shared_lists(d: Path) -> Path:
    # model.w's size a list of two references to a list of two references ... 40 deep: 2**40 leaves,
    # a few hundred bytes of pickle (pickle memoizes the shared lists).
    return _dcp_chunked(d / "input", [((0, 0), (3, 2))], size=laughs(2, 40, 1))


# ------------------------------------------------------------------------------------------ zips


def pt2_stored_member_claims_4gib(d: Path) -> Path:
    """The sample program with the central directory's uncompressed size of a stored weight set to
    4 GiB - 4, a whole number of float32 elements (its compressed size, and the bytes there, stay 64)."""
    src = HERE.parent.parent.parent / "sample_models" / "export_frozen.pt2"
    data = bytearray(src.read_bytes())
    name = b"export_frozen/data/weights/weight_1"
    at = data.rfind(b"PK\x01\x02", 0, data.rfind(name))
    assert data[at + 46 : at + 46 + len(name)] == name
    struct.pack_into("<I", data, at + 24, 2**32 - 4)
    p = d / "input.pt2"
    p.write_bytes(bytes(data))
    return p


DUPLICATES = "issue #11, 4: tensor names must be unique in a report; "
CRASHES: dict[str, Crash] = {
    "name_collision": Crash(
        DUPLICATES + "a key 'a.b' beside {'a': {'b'}} (torch.save writes it) gives two tensors 'a.b': stats "
        "ends in a RuntimeError (StopIteration), convert in a usage error about --strip-prefix",
        name_collision,
        fixed=True,
    ),
    "module_parameter_and_buffer_of_one_name": Crash(
        DUPLICATES + "a pickled module with a parameter and a buffer both named 'w' gives two tensors 'w'",
        module_parameter_and_buffer_of_one_name,
        fixed=True,
    ),
    "sharded_alias_in_two_shards": Crash(
        DUPLICATES + "an alias statecli recorded in two shards' metadata is added once per shard: diff X X "
        "ends in a ValueError (shapes differ)",
        sharded_alias_in_two_shards,
        fixed=True,
    ),
    "dcp_model_key_clash": Crash(
        DUPLICATES + "DCP names a model tensor without its 'model.' key, so {'model': {'w'}, 'w'} (dcp.save "
        "writes it) gives two tensors 'w': the values commands take one's chunks for the other and exit 3",
        dcp_model_key_clash,
        expect=("stats=ok", "diff=ok", "convert=ok", "load=ok"),
        fixed=True,
    ),
    "dcp_overlapping_chunks": Crash(
        "issue #11, 4: DCP chunks that overlap while their sizes add up to the tensor's pass the check; "
        "values are read into torch.empty, so the row no chunk holds is uninitialised memory (diff X X differs "
        "when that memory was not zero); the fix refuses such chunks, so convert and load must exit 3",
        dcp_overlapping_chunks,
        expect=("convert=E3", "load=E3"),
        fixed=True,
    ),
    "dcp_key_with_a_newline": Crash(
        "issue #11, 2: error messages name keys unescaped (DCP's, and convert's overflow message): a newline in "
        "a key makes str(error) two lines; the CLI cleans what it prints, the Python API's callers get it raw",
        dcp_key_with_a_newline,
        fixed=True,
    ),
    "dcp_size_of_shared_lists": Crash(
        "issue #11, 2: a DCP size that is a DAG of shared lists reaches repr() in the error message: "
        "exponential time, then a MemoryError",
        dcp_size_of_shared_lists,
        fixed=True,
    ),
    "pt2_stored_member_claims_4gib": Crash(
        "issue #11, 3: a .pt2 weight stored with a central-directory size of 4 GiB over 64 bytes is believed "
        "(inspect counts 4 GiB in storages); stats allocates 4 GiB, a RuntimeError from torch's allocator under "
        "a 1 GiB address-space cap, instead of refusing the claim",
        pt2_stored_member_claims_4gib,
        needs_memory_cap=True,
        fixed=True,
    ),
}


def input_of(name: str) -> Path:
    """The reproducer's input, as built into this folder."""
    folder = HERE / name
    found = sorted(p for p in folder.iterdir() if p.name.startswith("input"))
    assert len(found) == 1, f"{folder}: {found}"
    return found[0]


def main(argv: list[str]) -> int:
    for name in argv or list(CRASHES):
        folder = HERE / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        path = CRASHES[name].build(folder)
        print(f"{name}: {path.relative_to(HERE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
