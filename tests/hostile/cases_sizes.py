"""Hostile cases: size claims that the bytes do not back, archives inside archives, names and collisions.

A zip's central directory and each member's local header both describe the member (method, flags, CRC,
sizes, name); torch's reader (miniz) trusts the local header where statecli trusts the directory, so
every disagreement is a file that two readers read differently. Archives are written here byte by byte
(:func:`raw_zip`) so that each field can lie on its own. ``.pt2`` programs are written without torch
(:func:`pt2_archive`): only the members statecli reads, shaped as torch 2.13 writes them.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

from make_hostile import Asm, case, error, finding, state_dict, torch_zip

_LOCAL = struct.Struct("<4s5H3L2H")
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_EOCD = struct.Struct("<4s4H2LH")
_DOS_DATE = 0x21  # 1980-01-01


def entry(name: str, content: bytes, method: int = 0, **lies: Any) -> dict[str, Any]:
    """One member: ``content`` stored (0) or deflated (8); for any other method ``content`` is written as
    it is. ``lies`` override fields: ``local_<field>`` in the local header only, ``central_<field>`` in the
    directory only, ``<field>`` in both (fields: method, flags, crc, csize, usize, name); ``zip64_usize``
    puts a ZIP64 uncompressed size in the directory entry."""
    if method == 8:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        data = c.compress(content) + c.flush()
    else:
        data = content
    return {
        "name": name,
        "data": data,
        "fields": {
            "method": method,
            "flags": 0x800,
            "crc": zlib.crc32(content),
            "csize": len(data),
            "usize": len(content),
            "name": name,
        },
        "lies": lies,
    }


def _fields(e: dict[str, Any], where: str) -> dict[str, Any]:
    out = dict(e["fields"])
    for k, v in e["lies"].items():
        if k.startswith(f"{where}_"):
            out[k[len(where) + 1 :]] = v
        elif not k.startswith(("local_", "central_", "zip64_")):
            out[k] = v
    return out


def raw_zip(entries: list[dict[str, Any]]) -> bytes:
    """A zip archive of ``entries`` (see :func:`entry`), each field as given: nothing is made consistent."""
    out = bytearray()
    central = bytearray()
    for e in entries:
        offset = len(out)
        f = _fields(e, "local")
        name = f["name"].encode()
        out += _LOCAL.pack(
            b"PK\x03\x04", 20, f["flags"], f["method"], 0, _DOS_DATE, f["crc"], f["csize"], f["usize"], len(name), 0
        )
        out += name + e["data"]
        f = _fields(e, "central")
        name = f["name"].encode()
        usize, extra = f["usize"], b""
        if "zip64_usize" in e["lies"]:
            usize = 0xFFFFFFFF
            extra = struct.pack("<HHQ", 1, 8, e["lies"]["zip64_usize"])
        central += _CENTRAL.pack(
            b"PK\x01\x02", 20, 45 if extra else 20, f["flags"], f["method"], 0, _DOS_DATE, f["crc"], f["csize"],
            usize, len(name), len(extra), 0, 0, 0, 0, offset,
        )  # fmt: skip
        central += name + extra
    cd_offset = len(out)
    out += central
    out += _EOCD.pack(b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), cd_offset, 0)
    return bytes(out)


def torch_entries(pickle_bytes: bytes, root: str = "archive", **data_pkl_lies: Any) -> list[dict[str, Any]]:
    """A torch.save archive of one 4-element float32 storage, as :func:`raw_zip` entries."""
    method = data_pkl_lies.pop("method", 0)
    return [
        entry(f"{root}/data.pkl", pickle_bytes, method, **data_pkl_lies),
        entry(f"{root}/byteorder", b"little"),
        entry(f"{root}/data/0", bytes(range(16))),
        entry(f"{root}/version", b"3\n"),
    ]


def _one_tensor() -> bytes:
    return state_dict(("weight", lambda a: a.tensor()))


def _bare_tensor() -> bytes:
    return Asm(2).tensor().op("STOP").getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _compressed_by_zipfile(content: bytes, method: int) -> bytes:
    """``content`` as :mod:`zipfile` compresses it with ``method`` (bzip2, LZMA): a valid stream."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo("x", (1980, 1, 1, 0, 0, 0))
        info.compress_type = method
        z.writestr(info, content)
    data = buf.getvalue()
    (nlen, xlen) = struct.unpack_from("<HH", data, 26)
    csize = struct.unpack_from("<L", data, 18)[0]
    return data[30 + nlen + xlen : 30 + nlen + xlen + csize]


# ----------------------------------------------------------------------------------------- .pt2 programs

_F32_META = {
    "dtype": 7,
    "sizes": [{"as_int": 4}],
    "strides": [{"as_int": 1}],
    "storage_offset": {"as_int": 0},
    "requires_grad": True,
    "device": {"type": "cpu"},
    "layout": 7,
}


def pt2_entries(
    weight: bytes | list[dict[str, Any]] = bytes(16),
    use_pickle: bool = False,
    meta: dict[str, Any] | None = None,
    fqn: str = "w",
    root: str = "model",
    **weight_lies: Any,
) -> list[dict[str, Any]]:
    """A torch.export program with one parameter ``fqn`` stored in ``data/weights/weight_0``: raw bytes, or
    (``use_pickle``) a torch.save archive given as bytes or as :func:`raw_zip` entries."""
    program = {"graph_module": {"signature": {"input_specs": [{"parameter": {"parameter_name": fqn}}]}}}
    config = {
        "config": {
            fqn: {"path_name": "weight_0", "is_param": True, "use_pickle": use_pickle, "tensor_meta": meta or _F32_META}
        }
    }
    payload = weight if isinstance(weight, bytes) else raw_zip(weight)
    return [
        entry(f"{root}/archive_format", b"pt2"),
        entry(f"{root}/archive_version", b"0"),
        entry(f"{root}/models/model.json", json.dumps(program).encode()),
        entry(f"{root}/data/weights/model_weights_config.json", json.dumps(config).encode()),
        entry(f"{root}/data/weights/weight_0", payload, weight_lies.pop("method", 0), **weight_lies),
    ]


def pt2_archive(path: Path, entries: list[dict[str, Any]]) -> Path:
    return _write(path, raw_zip(entries))


def pickled_weight(pickle_bytes: bytes | None = None, **data_pkl_lies: Any) -> list[dict[str, Any]]:
    """What torch.export.save writes for a pickled weight: a whole torch.save archive (root ``archive``)."""
    return torch_entries(_one_tensor() if pickle_bytes is None else pickle_bytes, **data_pkl_lies)


def torchscript_entries(key: str = "w", depth: int = 1) -> list[dict[str, Any]]:
    """A TorchScript module ``__torch__.M`` holding one tensor attribute under ``depth`` nested dicts, each
    keyed ``key``: enough of what torch.jit.save writes for statecli to read it."""
    a = Asm(2).global_("__torch__", "M").op("EMPTY_TUPLE").op("NEWOBJ").op("EMPTY_DICT")
    a.str_("training").op("NEWTRUE").op("SETITEM").str_(key)
    for _ in range(depth - 1):
        a.op("EMPTY_DICT").str_(key)
    a.tensor()
    a.raw(b"s" * depth)  # SETITEM, innermost first
    a.op("BUILD").op("STOP")
    code = b"class M(Module):\n  __parameters__ = []\n  __buffers__ = []\n  training : bool\n"
    return [
        entry("m/data.pkl", a.getvalue()),
        entry("m/code/__torch__.py", code),
        entry("m/constants.pkl", Asm(2).op("EMPTY_TUPLE").op("STOP").getvalue()),
        entry("m/data/0", bytes(16)),
        entry("m/version", b"3\n"),
    ]


# ------------------------------------------------------------------- methods and flags torch never writes


@case("zip_lzma_data_pkl", "sizes", error(3, "uses LZMA compression, which torch archives never use"))
def _(d: Path) -> Path:
    # A valid LZMA stream: Python's zipfile reads it; torch's miniz cannot, so torch.load fails.
    pkl = _one_tensor()
    return _write(d / "model.pt", raw_zip(torch_entries(_compressed_by_zipfile(pkl, zipfile.ZIP_LZMA), method=14,
                                                        crc=zlib.crc32(pkl), usize=len(pkl))))  # fmt: skip


@case("zip_bzip2_data_pkl", "sizes", error(3, "uses bzip2 compression, which torch archives never use"))
def _(d: Path) -> Path:
    pkl = _one_tensor()
    stream = _compressed_by_zipfile(pkl, zipfile.ZIP_BZIP2)
    return _write(d / "model.pt", raw_zip(torch_entries(stream, method=12, crc=zlib.crc32(pkl), usize=len(pkl))))


@case("zip_encrypted_data_pkl", "sizes", error(3, "encrypted"))
def _(d: Path) -> Path:
    # General-purpose flag bit 0 on a member whose bytes are plain: torch cannot decrypt it (its reader
    # refuses encrypted records), so the bytes statecli would read are not what torch would.
    return _write(d / "model.pt", raw_zip(torch_entries(_one_tensor(), flags=0x801)))


@case("zip_encrypted_storage", "sizes", error(3, "encrypted"))
def _(d: Path) -> Path:
    entries = torch_entries(_one_tensor())
    entries[2]["lies"]["flags"] = 0x801
    return _write(d / "model.pt", raw_zip(entries))


# ------------------------------------------------------------- local header against the central directory


@case("zip_local_method_differs", "sizes", error(3, "local header"))
def _(d: Path) -> Path:
    # The directory says stored, the local header deflated: miniz inflates what statecli reads raw.
    return _write(d / "model.pt", raw_zip(torch_entries(_one_tensor(), local_method=8)))


@case("zip_local_crc_differs", "sizes", error(3, "local header"))
def _(d: Path) -> Path:
    return _write(d / "model.pt", raw_zip(torch_entries(_one_tensor(), local_crc=0x12345678)))


@case("zip_local_size_differs", "sizes", error(3, "local header"))
def _(d: Path) -> Path:
    pkl = _one_tensor()
    return _write(d / "model.pt", raw_zip(torch_entries(pkl, local_csize=len(pkl) - 1, local_usize=len(pkl) - 1)))


# --------------------------------------------------------------------------- sizes the bytes do not back


@case("zip_stored_member_claims_1tib", "sizes", error(3, "stored with 16 bytes"))
def _(d: Path) -> Path:
    # The storage member holds 16 bytes; its (ZIP64) directory entry claims 1 TiB. A reader that sizes its
    # buffer from the claim allocates 1 TiB before it reads a byte.
    entries = torch_entries(_one_tensor())
    entries[2]["lies"]["zip64_usize"] = 1 << 40
    return _write(d / "model.pt", raw_zip(entries))


@case("zip_stored_data_pkl_claims_4gib", "sizes", error(3, "stored with"))
def _(d: Path) -> Path:
    return _write(d / "model.pt", raw_zip(torch_entries(_one_tensor(), central_usize=0xFFFFFFF0)))


# ------------------------------------------------------------------------------------- .pt2 nested archives


@case("pt2_weight_claims_1tib", "sizes", error(3, "stored with 16 bytes"))
def _(d: Path) -> Path:
    return pt2_archive(d / "model.pt2", pt2_entries(zip64_usize=1 << 40))


@case("pt2_nested_zip_bomb", "sizes", error(3, "zip bomb"))
def _(d: Path) -> Path:
    # A pickled weight (a torch.save archive) whose data.pkl deflates ~1000x: 256 MiB of NONE/POP pairs.
    body = Asm(2).op("EMPTY_DICT").getvalue() + b"N0" * (128 << 20) + b"."
    return pt2_archive(d / "model.pt2", pt2_entries(pickled_weight(body, method=8), use_pickle=True))


@case("pt2_nested_lzma", "sizes", error(3, "uses LZMA compression, which torch archives never use"))
def _(d: Path) -> Path:
    # A corrupt LZMA stream in the nested data.pkl: zipfile raises LZMAError on it.
    pkl = _one_tensor()
    nested = pickled_weight(b"\x09\x04\x05\x00" + b"\x5d\x00\x00\x80\x00" + b"\xff" * 64, method=14)
    nested[0]["lies"].update(crc=zlib.crc32(pkl), usize=len(pkl))
    return pt2_archive(d / "model.pt2", pt2_entries(nested, use_pickle=True))


@case("pt2_nested_bzip2", "sizes", error(3, "uses bzip2 compression, which torch archives never use"))
def _(d: Path) -> Path:
    pkl = _one_tensor()
    nested = pickled_weight(b"BZh9" + b"\x00" * 64, method=12)
    nested[0]["lies"].update(crc=zlib.crc32(pkl), usize=len(pkl))
    return pt2_archive(d / "model.pt2", pt2_entries(nested, use_pickle=True))


@case("pt2_nested_corrupt_deflate", "sizes", error(3, "corrupt zip member"))
def _(d: Path) -> Path:
    pkl = _one_tensor()
    nested = pickled_weight(b"\xff" * 64, method=8)
    nested[0]["data"] = b"\xff" * 64
    nested[0]["lies"].update(csize=64, crc=zlib.crc32(pkl), usize=len(pkl))
    return pt2_archive(d / "model.pt2", pt2_entries(nested, use_pickle=True))


@case("pt2_nested_encrypted", "sizes", error(3, "encrypted"))
def _(d: Path) -> Path:
    # zipfile raises RuntimeError ("password required") on this.
    return pt2_archive(d / "model.pt2", pt2_entries(pickled_weight(flags=0x801), use_pickle=True))


@case("pt2_nested_local_method_differs", "sizes", error(3, "local header"))
def _(d: Path) -> Path:
    return pt2_archive(d / "model.pt2", pt2_entries(pickled_weight(local_method=8), use_pickle=True))


@case("pt2_nested_storage_claims_1tib", "sizes", error(3, "stored with 16 bytes"))
def _(d: Path) -> Path:
    nested = pickled_weight()
    nested[2]["lies"]["zip64_usize"] = 1 << 40
    return pt2_archive(d / "model.pt2", pt2_entries(nested, use_pickle=True))


@case("pt2_pickled_tensor_wrong_dtype", "sizes", error(3, "holds a float64 tensor of shape [2]"))
def _(d: Path) -> Path:
    # The config says float32 [4]; the pickled tensor (what torch.export.load returns) is float64 [2]. Read
    # by the config, the payload archive's own bytes came out as made-up float32 values.
    pkl = Asm(2).tensor(numel=2, shape=(2,), storage_type="DoubleStorage").op("STOP").getvalue()
    return pt2_archive(d / "model.pt2", pt2_entries(pickled_weight(pkl), use_pickle=True))


@case("pt2_pickled_not_a_tensor", "sizes", finding("export-pickled-payload", "not a tensor"))
def _(d: Path) -> Path:
    # A pickled weight that is a dict: its values are nobody's bytes.
    return pt2_archive(d / "model.pt2", pt2_entries(pickled_weight(), use_pickle=True))


# ----------------------------------------------------------------------------------- names over the limit

LONG = "n" * 200_000  # the documented limit is 64 KiB (65,536 characters)


@case("long_name_pickle_key", "sizes", error(3, "65536"))
def _(d: Path) -> Path:
    return torch_zip(d / "model.pt", state_dict((LONG, lambda a: a.tensor())))


@case("long_name_safetensors", "sizes", error(3, "65536"))
def _(d: Path) -> Path:
    header = json.dumps({LONG: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    return _write(d / "model.safetensors", struct.pack("<Q", len(header)) + header + bytes(16))


@case("long_name_index", "sizes", error(3, "65536"))
def _(d: Path) -> Path:
    header = json.dumps({LONG: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    _write(d / "model-00001-of-00001.safetensors", struct.pack("<Q", len(header)) + header + bytes(16))
    index = {"metadata": {}, "weight_map": {LONG: "model-00001-of-00001.safetensors"}}
    return _write(d / "model.safetensors.index.json", json.dumps(index).encode())


@case("long_name_pt2", "sizes", error(3, "65536"))
def _(d: Path) -> Path:
    return pt2_archive(d / "model.pt2", pt2_entries(fqn=LONG))


@case("long_name_torchscript_nested", "sizes", error(3, "65536"))
def _(d: Path) -> Path:
    # Four 20,000-character attribute names, one inside the other: each is short; the dotted name is not.
    return _write(d / "model.pt", raw_zip(torchscript_entries("k" * 20_000, depth=4)))


# ------------------------------------------------------------------------ two tensors under one name


@case("name_collision_dotted_key", "sizes", error(3, "two tensors are both named 'a.b'"))
def _(d: Path) -> Path:
    # {'a.b': t, 'a': {'b': t2}}: torch.load gives back both; flattened, both are named a.b.
    def nested(a: Asm) -> None:
        a.op("EMPTY_DICT").str_("b").tensor(key="1").op("SETITEM")

    storages = {"0": bytes(16), "1": bytes(16)}
    return torch_zip(d / "model.pt", state_dict(("a.b", lambda a: a.tensor()), ("a", nested)), storages)


@case("name_collision_empty_key", "sizes", error(3, "two tensors are both named 'x.'"))
def _(d: Path) -> Path:
    # {'x.': t, 'x': {'': t2}}: the key '' under x is named 'x.' too.
    def nested(a: Asm) -> None:
        a.op("EMPTY_DICT").str_("").tensor(key="1").op("SETITEM")

    storages = {"0": bytes(16), "1": bytes(16)}
    return torch_zip(d / "model.pt", state_dict(("x.", lambda a: a.tensor()), ("x", nested)), storages)


def warmups(folder: Path) -> list[Path]:
    """Benign files of the formats these cases reach, for tests/hostile/run_case.py to read before its audit
    hook goes in (so that importing their readers is not mistaken for code a case ran)."""
    return [
        pt2_archive(folder / "good.pt2", pt2_entries()),
        pt2_archive(folder / "pickled.pt2", pt2_entries(pickled_weight(_bare_tensor()), use_pickle=True)),
        _write(folder / "good_torchscript.pt", raw_zip(torchscript_entries())),
    ]
