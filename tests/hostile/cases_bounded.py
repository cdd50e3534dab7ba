"""Hostile cases for statecli's bounds: values that hang str()/repr() in a message, paths that are not regular
files, and regexes that backtrack over file text.

Each case registers itself with :func:`make_hostile.case` when make_hostile imports this module.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

from make_hostile import (
    Asm,
    _info,
    _st_entry,
    case,
    error,
    finding,
    obj,
    ok,
    safetensors_file,
    torch_zip,
    with_payload,
)

Write = Callable[[Asm], object]

# --------------------------------------------------------------------------------------------- values


def dag(a: Asm, depth: int = 64) -> Asm:
    """``[x, x]`` nested ``depth`` deep over None, memoized (DUP): 2 ** depth leaves in a few hundred bytes.
    Any repr() of it never ends; a walk that does not remember where it has been neither."""
    a.op("NONE")
    for _ in range(depth):
        a.op("DUP").op("TUPLE2")
    return a


def dag_list(a: Asm, depth: int = 64) -> Asm:
    """The same as lists (``EMPTY_LIST`` + memo GETs): ``[[...], [...]]``."""
    a.op("NONE").put(0).op("POP")
    for level in range(depth):
        a.op("MARK").get(level).get(level).op("LIST").put(level + 1).op("POP")
    return a.get(depth)


def deep(a: Asm, depth: int = 5_000) -> Asm:
    """A tuple nested ``depth`` deep: short enough to pass the dict-key cost check (10,000 values), deep
    enough that str() of it raises RecursionError."""
    a.op("EMPTY_TUPLE")
    for _ in range(depth):
        a.op("TUPLE1")
    return a


# ------------------------------------------------------------------------------------------------ DCP

_MD = "torch.distributed.checkpoint.metadata"
_FS = "torch.distributed.checkpoint.filesystem"


def size(*dims: int) -> Write:
    return lambda a: a.global_("torch", "Size").ints(dims).op("TUPLE1").op("REDUCE")


def tensor_md(dims: Write | None = None, offsets: Write | None = None, sizes: Write | None = None) -> Write:
    """A ``TensorStorageMetadata`` of a float32 tensor of size (4,) in one chunk, or these size, offsets, sizes."""
    dims, offsets, sizes = dims or size(4), offsets or size(0), sizes or size(4)
    props = lambda a: (  # noqa: E731
        a.global_(_MD, "TensorProperties").op("EMPTY_TUPLE").op("NEWOBJ")
        .op("MARK").global_("torch", "float32").op("TUPLE").op("BUILD")
    )  # fmt: skip
    chunk = obj(_MD, "ChunkStorageMetadata", ("offsets", offsets), ("sizes", sizes))
    chunks = lambda a: chunk(a.op("EMPTY_LIST").op("MARK")) or a.op("APPENDS")  # noqa: E731
    return obj(_MD, "TensorStorageMetadata", ("properties", props), ("size", dims), ("chunks", chunks))


def _asm(w: Write) -> bytes:
    a = Asm(proto=0)
    w(a)
    return a.getvalue()


def storage(fqn: str, offset: Write | None, rel: str, start: Write, length: Write) -> tuple[Write, Write]:
    key = obj(_MD, "MetadataIndex", ("fqn", lambda a: a.str_(fqn)), ("offset", offset or (lambda a: a.op("NONE"))))
    info = obj(_FS, "_StorageInfo", ("relative_path", lambda a: a.str_(rel)), ("offset", start), ("length", length))
    return key, info


def dcp_folder(
    d: Path,
    entries: list[tuple[str, Write]],
    spans: list[tuple[Write, Write]],
    data: bytes = bytes(64),
) -> Path:
    """A torch.distributed.checkpoint folder: ``.metadata`` (a ``Metadata`` with these state_dict_metadata
    entries and storage_data spans) beside one ``__0_0.distcp`` holding ``data``."""

    def sdm(a: Asm) -> None:
        a.op("EMPTY_DICT").op("MARK")
        for k, w in entries:
            a.str_(k)
            w(a)
        a.op("SETITEMS")

    def sd(a: Asm) -> None:
        a.op("EMPTY_DICT")
        if spans:
            a.op("MARK")
            for k, v in spans:
                k(a)
                v(a)
            a.op("SETITEMS")

    a = Asm(proto=2)
    obj(_MD, "Metadata", ("state_dict_metadata", sdm), ("storage_data", sd))(a)
    a.op("STOP")
    folder = d / "ckpt"
    folder.mkdir()
    (folder / ".metadata").write_bytes(a.getvalue())
    (folder / "__0_0.distcp").write_bytes(data)
    return folder


def _int(n: int) -> Write:
    return lambda a: a.int_(n)


def _one_tensor(d: Path, **md: Write) -> Path:
    return dcp_folder(d, [("w", tensor_md(**md))], [storage("w", size(0), "__0_0.distcp", _int(0), _int(16))])


@case("dcp_size_laughs", "bounded", error(3, "size"))
def _(d: Path) -> Path:
    # A tensor's size holds a 2 ** 64-leaf DAG: the message naming the bad size repr()ed it.
    return _one_tensor(d, dims=lambda a: a.op("MARK").raw(_asm(dag)).op("LIST"))


@case("dcp_chunk_offsets_laughs", "bounded", error(3, "offsets"))
def _(d: Path) -> Path:
    return _one_tensor(d, offsets=lambda a: a.op("MARK").raw(_asm(dag)).op("LIST"))


@case("dcp_chunk_sizes_deep", "bounded", error(3, "sizes"))
def _(d: Path) -> Path:
    # A 5,000-deep tuple: repr() of it raises RecursionError (an "internal error" where it is not caught).
    return _one_tensor(d, sizes=lambda a: a.op("MARK").raw(_asm(deep)).op("LIST"))


@case("dcp_span_offset_laughs", "bounded", error(3, "offset"))
def _(d: Path) -> Path:
    return dcp_folder(d, [("w", tensor_md())], [storage("w", size(0), "__0_0.distcp", lambda a: dag(a), _int(16))])


@case("dcp_span_length_list_laughs", "bounded", error(3, "length"))
def _(d: Path) -> Path:
    return dcp_folder(d, [("w", tensor_md())], [storage("w", size(0), "__0_0.distcp", _int(0), dag_list)])


def _bytes_entry(d: Path, pickle_bytes: bytes) -> Path:
    """A DCP folder whose one non-tensor entry (BytesStorageMetadata) is ``pickle_bytes``, which torch's DCP
    loader would ``torch.load(weights_only=False)``: statecli scans it with the restricted reader."""
    data = bytes(16) + pickle_bytes
    return dcp_folder(
        d,
        [("w", tensor_md()), ("extra", obj(_MD, "BytesStorageMetadata"))],
        [
            storage("w", size(0), "__0_0.distcp", _int(0), _int(16)),
            storage("extra", None, "__0_0.distcp", _int(16), _int(len(pickle_bytes))),
        ],
        data,
    )


@case("dcp_bytes_entry_persistent_id_laughs", "bounded", finding("unscanned-entry", "extra"))
def _(d: Path) -> Path:
    # The pickled object names a storage whose persistent id is a DAG: the message about it str()ed it.
    return _bytes_entry(d, dag(Asm()).op("BINPERSID").op("STOP").getvalue())


@case("dcp_bytes_entry_storage_key_laughs", "bounded", finding("unscanned-entry", "extra"))
def _(d: Path) -> Path:
    # A well-formed storage record whose key is a DAG: str(key)[:64] built it whole before clipping.
    a = Asm().op("MARK").str_("storage").global_("torch", "FloatStorage")
    dag(a).str_("cpu").int_(4).op("TUPLE").op("BINPERSID").op("STOP")
    return _bytes_entry(d, a.getvalue())


# ---------------------------------------------------------------------------------------- TorchScript

_TS_CODE = b'class M(Module):\n  __parameters__ = ["weight", ]\n  __buffers__ = []\n  training : bool\n'


def torchscript(d: Path, data_pkl: bytes, traced: bytes | None = None, code: bytes = _TS_CODE) -> Path:
    """A torch.jit.save-like archive: a module ``__torch__.M`` declared in code/__torch__.py."""
    path = d / "scripted.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(_info("scripted/data.pkl"), data_pkl)
        z.writestr(_info("scripted/code/__torch__.py"), code)
        z.writestr(_info("scripted/data/0"), bytes(16))
        z.writestr(_info("scripted/constants.pkl"), Asm().op("EMPTY_TUPLE").op("STOP").getvalue())
        if traced is not None:
            z.writestr(_info("scripted/traced_inputs.pkl"), traced)
        z.writestr(_info("scripted/version"), b"3\n")
    return path


def module(*attrs: tuple[str, Write]) -> bytes:
    a = Asm().global_("__torch__", "M").op("EMPTY_TUPLE").op("NEWOBJ").op("EMPTY_DICT").op("MARK")
    a.str_("training").op("NEWTRUE").str_("weight").tensor()
    for k, w in attrs:
        a.str_(k)
        w(a)
    return a.op("SETITEMS").op("BUILD").op("STOP").getvalue()


@case("torchscript_traced_inputs_laughs", "bounded", error(3, "traced_inputs.pkl"))
def _(d: Path) -> Path:
    # traced_inputs.pkl names a storage by a DAG: the "unexpected persistent id" message str()ed it.
    return torchscript(d, module(), traced=dag(Asm()).op("BINPERSID").op("STOP").getvalue())


@case("torchscript_deep_key", "bounded", ok("weight"))
def _(d: Path) -> Path:
    # An attribute dict keyed by a 5,000-deep tuple: naming what is under it str()ed the key.
    return torchscript(d, module(("d", lambda a: deep(a.op("EMPTY_DICT")).op("NONE").op("SETITEM"))))


@case("torchscript_code_blank_run", "bounded", ok("weight"))
def _(d: Path) -> Path:
    # code/ holds a class header with a megabyte of blanks after the name: the header regex tried every way
    # to split them between its two \s* (hours).
    return torchscript(d, module(), code=_TS_CODE + b"class B" + b" " * (1 << 20) + b"x\n")


# ------------------------------------------------------------------------------------------ torch zip


@case("optimizer_key_deep", "bounded", ok("weight"))
def _(d: Path) -> Path:
    # An optimizer state dict under a 5,000-deep tuple key: the optimizer's place was named with str(key).
    def opt(a: Asm) -> None:
        a.op("EMPTY_DICT").op("MARK").str_("state").op("EMPTY_DICT").str_("param_groups").op("EMPTY_LIST")
        a.op("SETITEMS")

    a = Asm().op("EMPTY_DICT").op("MARK").str_("weight").tensor()
    deep(a)
    opt(a)
    a.op("SETITEMS").op("STOP")
    return torch_zip(d / "model.pt", a.getvalue())


# ------------------------------------------------------------------------------------------------ pt2

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


def pt2_with_sample_inputs(d: Path, pickle_bytes: bytes) -> Path:
    """The sample ``export_frozen.pt2`` with its sample inputs (a torch.save archive that torch.export.load
    unpickles) replaced by one whose data.pkl is ``pickle_bytes``."""
    inner = io.BytesIO()
    torch_zip(inner, pickle_bytes, storages={})  # type: ignore[arg-type]
    path = d / "program.pt2"
    with zipfile.ZipFile(SAMPLES / "export_frozen.pt2") as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/sample_inputs/model.pt"):
                data = inner.getvalue()
            out.writestr(_info(info.filename), data)
    return path


@case("pt2_sample_inputs_laughs", "bounded", ok("weight"))
def _(d: Path) -> Path:
    # Sample inputs that are a DAG of lists, 16 references wide and 12 deep: 16 ** 12 paths to walk.
    def laughs(a: Asm) -> None:
        a.op("NONE").put(0).op("POP")
        for level in range(12):
            a.op("MARK")
            for _ in range(16):
                a.get(level)
            a.op("LIST").put(level + 1).op("POP")
        a.get(12)

    a = Asm()
    laughs(a)
    return pt2_with_sample_inputs(d, a.op("STOP").getvalue())


@case("pt2_sample_inputs_deep_key", "bounded", ok("weight"))
def _(d: Path) -> Path:
    # A sample-input dict keyed by a 5,000-deep tuple: naming the value under it str()ed the key.
    a = deep(Asm().op("EMPTY_DICT")).op("EMPTY_LIST").op("SETITEM").op("STOP")
    return pt2_with_sample_inputs(d, a.getvalue())


# ------------------------------------------------------------------------------------- many findings
#
# One finding per odd entry is a report that grows with the file: each code is listed up to a hundred
# times and the rest counted in one "N more <code> findings not listed".


@case("findings_flood_unknown_globals", "bounded", finding("unknown-global", "more unknown-global findings"))
def _(d: Path) -> Path:
    # 9,000 different classes named (never called): one unknown-global warning each.
    def names(a: Asm) -> None:
        a.op("MARK")
        for i in range(9_000):
            a.global_("evil", f"C{i}")
        a.op("LIST")

    return torch_zip(d / "model.pt", with_payload(names))


@case(
    "findings_flood_dangerous_calls",
    "bounded",
    finding("dangerous-global", "50 more dangerous-global findings not listed", dangerous=True),
)
def _(d: Path) -> Path:
    # 150 different os functions called: the report lists 100 and counts the rest in one finding that is
    # dangerous itself, so check still refuses the file; inspect warns on stderr 101 times, not 150.
    def calls(a: Asm) -> None:
        a.op("MARK")
        for i in range(150):
            a.global_("os", f"f{i}").op("EMPTY_TUPLE").op("REDUCE")
        a.op("LIST")

    return torch_zip(d / "model.pt", with_payload(calls))


@case(
    "findings_flood_unindexed_tensors", "bounded", finding("unindexed-tensor", "19,899 more unindexed-tensor findings")
)
def _(d: Path) -> Path:
    # A shard of 20,000 tensors whose index names one: a finding for each of the others.
    n = 20_000
    header = {f"t{i}": _st_entry("F32", [1], 4 * i, 4 * i + 4) for i in range(n)}
    folder = d / "ckpt"
    folder.mkdir()
    safetensors_file(folder / "shard.safetensors", header, bytes(4 * n))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"t0": "shard.safetensors"}}))
    return folder / "model.safetensors.index.json"


@case("findings_flood_torchscript_shared", "bounded", finding("shared-subtree", "99,899 more shared-subtree findings"))
def _(d: Path) -> Path:
    # An attribute list holding one dict 100,000 times: a shared-subtree finding per reference.
    def shared(a: Asm) -> None:
        a.op("EMPTY_DICT").put(1).op("POP").op("MARK")
        for _ in range(100_000):
            a.get(1)
        a.op("LIST")

    return torchscript(d, module(("refs", shared)))


@case("other_keys_flood", "bounded", ok("k19, … (99,980 more)"))
def _(d: Path) -> Path:
    # 100,000 top-level keys beside the model: the summary line named every one of them.
    a = Asm().op("EMPTY_DICT").op("MARK").str_("model").op("EMPTY_DICT").op("MARK").str_("w").tensor()
    a.op("SETITEMS").op("SETITEMS").op("MARK")
    for i in range(100_000):
        a.str_(f"k{i}").op("NONE")
    a.op("SETITEMS").op("STOP")
    return torch_zip(d / "model.pt", a.getvalue())


# ---------------------------------------------------------------------------------- not regular files
#
# open() of a FIFO waits for a writer that never comes; /dev/zero never ends and says its size is 0.
# Every path statecli opens must be refused unless it is a regular file.

if hasattr(os, "mkfifo"):

    @case("fifo_passed_directly", "bounded", error(3, "is a FIFO, not a regular file"))
    def _(d: Path) -> Path:
        os.mkfifo(d / "model.pt")
        return d / "model.pt"

    @case("dcp_metadata_fifo", "bounded", error(3, "is a FIFO, not a regular file"))
    def _(d: Path) -> Path:
        folder = _one_tensor(d)
        (folder / ".metadata").unlink()
        os.mkfifo(folder / ".metadata")
        return folder

    @case("dcp_metadata_fifo_passed_directly", "bounded", error(3, "is a FIFO, not a regular file"))
    def _(d: Path) -> Path:
        folder = _one_tensor(d)
        (folder / ".metadata").unlink()
        os.mkfifo(folder / ".metadata")
        return folder / ".metadata"

    @case("dcp_data_file_fifo", "bounded", error(3, "'__0_0.distcp' named in .metadata is a FIFO"))
    def _(d: Path) -> Path:
        folder = _one_tensor(d)
        (folder / "__0_0.distcp").unlink()
        os.mkfifo(folder / "__0_0.distcp")
        return folder

    @case("index_shard_fifo", "bounded", error(3, "is a FIFO, not a regular file"))
    def _(d: Path) -> Path:
        folder = d / "ckpt"
        folder.mkdir()
        os.mkfifo(folder / "shard.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "shard.safetensors"}}))
        return folder / "model.safetensors.index.json"

    @case("index_fifo_in_folder", "bounded", error(3, "is a FIFO, not a regular file"))
    def _(d: Path) -> Path:
        folder = d / "ckpt"
        folder.mkdir()
        os.mkfifo(folder / "model.safetensors.index.json")
        return folder


if os.path.exists("/dev/zero"):

    @case("symlink_to_dev_zero", "bounded", error(3, "is a character device, not a regular file"))
    def _(d: Path) -> Path:
        os.symlink("/dev/zero", d / "model.safetensors")
        return d / "model.safetensors"

    @case("index_shard_symlink_to_dev_zero", "bounded", error(5, "leaves the checkpoint folder"))
    def _(d: Path) -> Path:
        folder = d / "ckpt"
        folder.mkdir()
        os.symlink("/dev/zero", folder / "shard.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "shard.safetensors"}}))
        return folder / "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------- legacy

_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


@case("legacy_version_laughs", "bounded", error(3, "legacy torch protocol"))
def _(d: Path) -> Path:
    # The protocol version pickled after the magic number is a DAG: the message repr()ed it.
    path = d / "legacy.pt"
    path.write_bytes(_LEGACY_MAGIC + dag(Asm()).op("STOP").getvalue())
    return path


__all__ = ["dag", "dag_list", "dcp_folder", "deep", "torchscript"]
