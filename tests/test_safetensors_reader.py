"""read_safetensors: header-only, validated against the file, with safetensors itself as the oracle."""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from statecli.dtypes import DTYPES, SAFETENSORS_CODES, SAFETENSORS_DTYPES
from statecli.errors import InputError, LimitExceededError, UnsupportedFormatError
from statecli.formats import safetensors as safetensors_reader
from statecli.formats.safetensors import MAX_HEADER_BYTES, read_safetensors

# torch dtype -> safetensors code, for every dtype both torch and safetensors.torch can save.
TORCH_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_raw(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    """A file with an explicit length prefix (defaults to the header's true length)."""
    n = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


def write_header(path: Path, header: object, data: bytes | int = b"") -> Path:
    if isinstance(data, int):
        data = b"\0" * data
    return write_raw(path, json.dumps(header).encode(), data)


def oracle(path: Path) -> dict[str, tuple[str, list[int]]]:
    with safe_open(str(path), "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118


def ours(path: Path) -> dict[str, tuple[str, list[int]]]:
    raw = read_safetensors(str(path))
    return {t.name: (SAFETENSORS_CODES[t.dtype], list(t.shape)) for t in raw.tensors}


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return (
        torch.zeros(shape, dtype=torch.float32).to(dtype)
        if dtype.is_floating_point
        else torch.zeros(shape, dtype=dtype)
    )


# --- valid files -------------------------------------------------------------------------------------------


def test_every_dtype_matches_safetensors(tmp_path: Path) -> None:
    tensors = {f"t.{code}": zeros((2, 3), dt) for dt, code in TORCH_CODES.items()}
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path))
    assert ours(path) == oracle(path)
    raw = read_safetensors(str(path))
    for t in raw.tensors:
        ref = tensors[t.name]
        assert t.dtype == str(ref.dtype).removeprefix("torch.")
        assert t.dtype == SAFETENSORS_DTYPES[TORCH_CODES[ref.dtype]]
        assert t.shape == tuple(ref.shape)
        assert t.stride == ref.stride()
        assert t.storage_nbytes == ref.numel() * ref.element_size()
        assert (t.storage_offset, t.device, t.storage, t.group, t.file) == (0, None, None, "model", None)
        assert (t.role, t.exact, t.evidence, t.requires_grad, t.persistent) == (None, False, None, None, None)


def test_zero_dim_and_empty_tensors(tmp_path: Path) -> None:
    tensors = {
        "scalar": torch.tensor(3.0),
        "count": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0),
        "empty2d": torch.zeros(4, 0, 2, dtype=torch.float16),
        "w": torch.zeros(5, 3),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    assert ours(path) == oracle(path)
    got = {t.name: t for t in read_safetensors(str(path)).tensors}
    for name, ref in tensors.items():
        assert got[name].shape == tuple(ref.shape)
        assert got[name].stride == ref.stride(), name
        assert got[name].storage_nbytes == ref.numel() * ref.element_size()


def test_no_tensors(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    save_file({}, str(path), metadata={"format": "pt"})
    raw = read_safetensors(str(path))
    assert raw.tensors == []
    assert raw.metadata == {"format": "pt"}


def test_checkpoint_fields_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    meta = {"format": "pt", "note": "épreuve ✓", "empty": ""}
    save_file({"a": torch.zeros(2)}, str(path), metadata=meta)
    raw = read_safetensors(str(path))
    assert raw.path == str(path)
    assert raw.format == "safetensors"
    assert raw.metadata == meta
    assert raw.file_size == os.path.getsize(path)
    assert raw.findings == []
    assert raw.storage_sizes == {}
    assert raw.container.kind == "safetensors"
    assert raw.container.state_dict_at == ""
    assert raw.container.other_keys == ()


def test_tensors_come_in_file_order(tmp_path: Path) -> None:
    header = {
        "z_first": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "a_last": {"dtype": "U8", "shape": [2], "data_offsets": [6, 8]},
        "m_middle": {"dtype": "I16", "shape": [1], "data_offsets": [4, 6]},
    }
    path = write_header(tmp_path / "o.safetensors", header, 8)
    assert [t.name for t in read_safetensors(str(path)).tensors] == ["z_first", "m_middle", "a_last"]
    assert ours(path) == oracle(path)


def test_padded_header_and_null_metadata(tmp_path: Path) -> None:
    # safetensors pads the header with spaces and reads a null __metadata__ as absent.
    header = b'{"__metadata__":null,"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}    '
    path = write_raw(tmp_path / "p.safetensors", header, b"\0" * 4)
    raw = read_safetensors(str(path))
    assert raw.metadata == {}
    assert ours(path) == oracle(path)


def test_reads_only_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.zeros(256, 256)}, str(path))
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    read_total = 0
    real_open = safetensors_reader.open_regular

    class Counting:
        def __init__(self, f: BinaryIO) -> None:
            self.f = f

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def fileno(self) -> int:
            return self.f.fileno()

        def read(self, size: int = -1) -> bytes:
            nonlocal read_total
            assert size >= 0, "an unbounded read would pull in the tensor bytes"
            b = self.f.read(size)
            read_total += len(b)
            return b

    monkeypatch.setattr(safetensors_reader, "open_regular", lambda p: Counting(real_open(p)))
    read_safetensors(str(path))
    assert read_total == 8 + n


def test_inspect_path_does_not_import_heavy_modules(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    code = (
        "import sys\n"
        "from statecli.formats.safetensors import read_safetensors\n"
        f"read_safetensors({str(path)!r})\n"
        "bad = sorted(m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    # This test process's sys.path finds statecli however the suite was started (installed or not).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)


# --- invalid files -----------------------------------------------------------------------------------------

F32_1 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
Z4 = b"\0" * 4


def _j(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _entry(**kw: object) -> bytes:
    return _j({"a": {**F32_1, **kw}})


def bad(
    id: str,
    header: bytes,
    message: str,
    *,
    data: bytes = b"",
    length: int | None = None,
    exc: type[InputError] = InputError,
    st_rejects: bool = True,
) -> object:
    """One invalid file; ``st_rejects`` False marks where statecli is stricter than safetensors on purpose."""
    return pytest.param(header, data, length, exc, message, st_rejects, id=id)


BAD = [
    bad("not-json", b"{nope", "not valid JSON"),
    bad("nan", b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', "not valid JSON", data=Z4),
    # safetensors 0.8's save_file({}, metadata={}) writes exactly this.
    bad("extra-data", b'{},"__metadata__":{}}', "not valid JSON: Extra data"),
    bad("bad-utf8", b'{"\xff":1}', "not valid UTF-8"),
    bad("not-object", b"[1, 2]", "not a JSON object (got list)"),
    bad(
        "dup-tensor",
        b'{"a":%s,"a":%s}' % (_j(F32_1), _j(F32_1)),
        "duplicate key 'a'",
        data=Z4,
        st_rejects=False,
    ),
    bad(
        "dup-field",
        b'{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        "key 'dtype'",
        data=Z4,
    ),
    bad("header-too-long", b"{}", "header length 1000000 is larger than", length=10**6),
    bad(
        "header-limit",
        b"{}",
        f"exceeds the {MAX_HEADER_BYTES}-byte limit",
        length=MAX_HEADER_BYTES + 1,
        exc=LimitExceededError,
    ),
    bad("entry-not-object", _j({"a": 5}), "tensor 'a': entry is not an object"),
    bad("no-dtype", _j({"a": {"shape": [1], "data_offsets": [0, 4]}}), "tensor 'a': missing 'dtype'", data=Z4),
    bad("no-shape", _j({"a": {"dtype": "F32", "data_offsets": [0, 4]}}), "missing 'shape'", data=Z4),
    bad("no-offsets", _j({"a": {"dtype": "F32", "shape": [1]}}), "missing 'data_offsets'", data=Z4),
    bad("dtype-int", _entry(dtype=3), "dtype must be a string", data=Z4),
    bad("dtype-unknown", _entry(dtype="XYZ"), "unknown dtype code 'XYZ'", data=Z4, exc=UnsupportedFormatError),
    bad("shape-negative", _entry(shape=[-1]), "non-negative integers", data=Z4),
    bad("shape-bool", _entry(shape=[True]), "non-negative integers", data=Z4),
    bad("shape-float", _entry(shape=[1.0]), "non-negative integers", data=Z4),
    bad("shape-not-list", _entry(shape=4), "non-negative integers", data=Z4),
    bad(
        "many-dims",
        _entry(shape=[1] * 65),
        "65 dimensions",
        data=Z4,
        exc=LimitExceededError,
        st_rejects=False,
    ),
    bad(
        "huge-numel",
        _entry(shape=[2**62, 2**62]),
        "more than 2**63-1 elements",
        data=Z4,
        exc=LimitExceededError,
    ),
    bad("huge-dim", _entry(shape=[0, 2**64], data_offsets=[0, 0]), "exceeds 2**63-1", exc=LimitExceededError),
    bad("offsets-three", _entry(data_offsets=[0, 4, 4]), "data_offsets must be [begin, end]", data=Z4),
    bad("offsets-reversed", _entry(data_offsets=[4, 0]), "0 <= begin <= end", data=Z4),
    bad("offsets-negative", _entry(data_offsets=[-4, 0]), "0 <= begin <= end", data=Z4),
    bad("offsets-str", _entry(data_offsets=["0", "4"]), "data_offsets must be", data=Z4),
    bad("size-mismatch", _entry(shape=[3], data_offsets=[0, 8]), "hold 8 bytes but shape [3] of F32 needs 12"),
    bad(
        "gap",
        _j({"a": F32_1, "b": {**F32_1, "data_offsets": [8, 12]}}),
        "tensor 'b' starts at byte 8, leaving a gap after byte 4",
        data=b"\0" * 12,
    ),
    bad("not-from-zero", _entry(data_offsets=[4, 8]), "leaving a gap after byte 0", data=b"\0" * 8),
    bad(
        "overlap",
        _j({"a": F32_1, "b": {**F32_1, "shape": [2], "data_offsets": [2, 10]}}),
        "overlapping the previous tensor",
        data=b"\0" * 10,
    ),
    bad("trailing", _j({"a": F32_1}), "3 trailing bytes", data=b"\0" * 7),
    bad(
        "truncated-data",
        _entry(shape=[4], data_offsets=[0, 16]),
        "need 16 bytes of data but the file holds 10",
        data=b"\0" * 10,
    ),
    bad(
        "meta-list",
        _j({"__metadata__": ["x"], "a": F32_1}),
        "__metadata__ must be an object mapping",
        data=Z4,
    ),
    bad(
        "meta-int-value",
        _j({"__metadata__": {"k": 1}, "a": F32_1}),
        "__metadata__ must be an object",
        data=Z4,
    ),
]


@pytest.mark.parametrize(("header", "data", "length", "exc", "message", "st_rejects"), BAD)
def test_invalid_header(
    tmp_path: Path,
    header: bytes,
    data: bytes,
    length: int | None,
    exc: type[InputError],
    message: str,
    st_rejects: bool,
) -> None:
    path = write_raw(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(exc) as info:
        read_safetensors(str(path))
    err = info.value
    assert isinstance(err, InputError)
    assert message in err.message
    assert "\n" not in str(err)
    assert err.path == str(path)
    if st_rejects:
        with pytest.raises(Exception):  # noqa: B017 - any safetensors error will do
            oracle(path)
    else:
        oracle(path)  # stricter than safetensors on purpose: it must still accept the file


@pytest.mark.parametrize("size", [0, 1, 7])
def test_file_too_short(tmp_path: Path, size: int) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01" * size)
    with pytest.raises(InputError, match=f"file is {size} bytes, too short"):
        read_safetensors(str(path))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"cannot read \("):
        read_safetensors(str(tmp_path / "absent.safetensors"))
    with pytest.raises(InputError, match="is a directory, not a regular file"):
        read_safetensors(str(tmp_path))


def test_unknown_dtype_code_is_named(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "f.safetensors", _entry(dtype="F7_MADEUP", data_offsets=[0, 1]), b"\0")
    with pytest.raises(InputError, match="unknown dtype code 'F7_MADEUP'"):
        read_safetensors(str(path))


def test_fnuz_float8_codes_are_known(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "f.safetensors", _entry(dtype="F8_E4M3FNUZ", data_offsets=[0, 1]), b"\0")
    assert read_safetensors(str(path)).tensors[0].dtype == "float8_e4m3fnuz"


# --- statecli role metadata --------------------------------------------------------------------------------


def save_with_roles(path: Path, tensors: dict[str, torch.Tensor], roles_doc: object, **extra: str) -> Path:
    meta = {"format": "pt", "statecli": roles_doc if isinstance(roles_doc, str) else json.dumps(roles_doc)}
    save_file(tensors, str(path), metadata={**meta, **extra})
    return path


def bn_tensors() -> dict[str, torch.Tensor]:
    return {
        "conv.weight": torch.zeros(4, 3),
        "bn.weight": torch.ones(4),
        "bn.running_mean": torch.zeros(4),
        "bn.num_batches_tracked": torch.tensor(0),
        "rope.cache": torch.zeros(8),
        "opt.exp_avg": torch.zeros(4, 3),
        "unlisted": torch.zeros(2),
    }


def test_role_metadata_is_exact(tmp_path: Path) -> None:
    doc = {
        "schema": "statecli.roles/1",
        "roles": {
            "conv.weight": "parameter",
            "bn.weight": "parameter",
            "bn.running_mean": "buffer",
            "bn.num_batches_tracked": "buffer",
            "rope.cache": "buffer",
            "opt.exp_avg": "other",
        },
        "requires_grad": {"conv.weight": False, "bn.weight": True},
        "non_persistent": ["rope.cache"],
        "future_key": {"ignored": True},
    }
    path = save_with_roles(tmp_path / "r.safetensors", bn_tensors(), doc, other="kept")
    raw = read_safetensors(str(path))
    assert raw.findings == []
    assert raw.metadata["other"] == "kept"
    assert "statecli" in raw.metadata
    got = {t.name: t for t in raw.tensors}
    facts = {n: (t.role, t.exact, t.evidence, t.requires_grad, t.persistent) for n, t in got.items()}
    assert facts == {
        "conv.weight": ("parameter", True, "metadata", False, None),
        "bn.weight": ("parameter", True, "metadata", True, None),
        "bn.running_mean": ("buffer", True, "metadata", None, True),
        "bn.num_batches_tracked": ("buffer", True, "metadata", None, True),
        "rope.cache": ("buffer", True, "metadata", None, False),
        "opt.exp_avg": ("other", True, "metadata", None, None),
        "unlisted": (None, False, None, None, None),
    }


def test_non_persistent_alone_means_buffer(tmp_path: Path) -> None:
    doc = {"schema": "statecli.roles/1", "non_persistent": ["rope.cache"]}
    raw = read_safetensors(str(save_with_roles(tmp_path / "r.safetensors", bn_tensors(), doc)))
    t = next(t for t in raw.tensors if t.name == "rope.cache")
    assert (t.role, t.exact, t.evidence, t.persistent) == ("buffer", True, "metadata", False)


def test_aliases_share_storage(tmp_path: Path) -> None:
    tensors = {"embed.weight": torch.zeros(10, 4, dtype=torch.bfloat16), "norm.weight": torch.ones(4)}
    doc = {
        "schema": "statecli.roles/1",
        "roles": {"embed.weight": "parameter", "norm.weight": "parameter"},
        "requires_grad": {"embed.weight": True},
        "aliases": {"lm_head.weight": "embed.weight"},
    }
    raw = read_safetensors(str(save_with_roles(tmp_path / "tied.safetensors", tensors, doc)))
    assert raw.findings == []
    names = [t.name for t in raw.tensors]
    assert names.index("lm_head.weight") == names.index("embed.weight") + 1
    got = {t.name: t for t in raw.tensors}
    target, alias = got["embed.weight"], got["lm_head.weight"]
    assert target.storage == alias.storage == "alias:embed.weight"
    assert raw.storage_sizes == {"alias:embed.weight": 80}
    for field in ("dtype", "shape", "stride", "storage_offset", "storage_nbytes", "device", "group"):
        assert getattr(alias, field) == getattr(target, field), field
    assert (alias.role, alias.exact, alias.evidence, alias.requires_grad) == (
        "parameter",
        True,
        "metadata",
        True,
    )
    assert got["norm.weight"].storage is None


def test_alias_with_its_own_facts(tmp_path: Path) -> None:
    doc = {
        "schema": "statecli.roles/1",
        "roles": {"a": "parameter", "b": "other"},
        "requires_grad": {"a": True, "b": False},
        "aliases": {"b": "a"},
    }
    raw = read_safetensors(str(save_with_roles(tmp_path / "t.safetensors", {"a": torch.zeros(3)}, doc)))
    b = next(t for t in raw.tensors if t.name == "b")
    assert (b.role, b.requires_grad) == ("other", False)


GOOD_DOC = {"schema": "statecli.roles/1", "roles": {"conv.weight": "parameter"}}
BAD_DOCS = {
    "not-json": "{roles",
    "not-object": json.dumps(["schema"]),
    "no-schema": json.dumps({"roles": {"conv.weight": "parameter"}}),
    "wrong-schema": json.dumps({**GOOD_DOC, "schema": "statecli.roles/9"}),
    "bad-role": json.dumps({**GOOD_DOC, "roles": {"conv.weight": "weight"}}),
    "roles-list": json.dumps({**GOOD_DOC, "roles": ["conv.weight"]}),
    "grad-not-bool": json.dumps({**GOOD_DOC, "requires_grad": {"conv.weight": 1}}),
    "non-persistent-str": json.dumps({**GOOD_DOC, "non_persistent": "rope.cache"}),
    "non-persistent-parameter": json.dumps({**GOOD_DOC, "non_persistent": ["conv.weight"]}),
    "unknown-name": json.dumps({**GOOD_DOC, "roles": {"ghost": "parameter"}}),
    "alias-missing-target": json.dumps({**GOOD_DOC, "aliases": {"lm_head.weight": "ghost"}}),
    "alias-shadows-tensor": json.dumps({**GOOD_DOC, "aliases": {"bn.weight": "conv.weight"}}),
    "alias-of-alias": json.dumps({**GOOD_DOC, "aliases": {"x": "conv.weight", "y": "x"}}),
    "duplicate-key": '{"schema": "statecli.roles/1", "roles": {}, "roles": {}}',
}


@pytest.mark.parametrize("value", BAD_DOCS.values(), ids=BAD_DOCS.keys())
def test_bad_role_metadata_is_a_warning(tmp_path: Path, value: str) -> None:
    raw = read_safetensors(str(save_with_roles(tmp_path / "r.safetensors", bn_tensors(), value)))
    assert [(f.level, f.code) for f in raw.findings] == [("warning", "bad-statecli-metadata")]
    assert "\n" not in raw.findings[0].message
    assert sorted(t.name for t in raw.tensors) == sorted(bn_tensors())
    assert all(t.role is None and not t.exact and t.storage is None for t in raw.tensors)
    assert raw.storage_sizes == {}
    assert raw.metadata["statecli"] == value


# --- properties --------------------------------------------------------------------------------------------

PROPERTY_DTYPES = list(TORCH_CODES)
names = st.text(alphabet="abcxyz._0123456789", min_size=1, max_size=10).filter(lambda s: s != "__metadata__")
specs = st.dictionaries(
    names,
    st.tuples(st.sampled_from(PROPERTY_DTYPES), st.lists(st.integers(0, 4), max_size=3)),
    max_size=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs, metadata=st.dictionaries(names, st.text(max_size=8), max_size=3), cut=st.floats(0, 1))
def test_roundtrip_and_truncation(
    spec: dict[str, tuple[torch.dtype, list[int]]], metadata: dict[str, str], cut: float
) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "h.safetensors"
        # `or None`: safetensors 0.8 writes a corrupt header for no tensors and metadata={} (we reject it).
        tensors = {n: zeros(tuple(shape), dt) for n, (dt, shape) in spec.items()}
        save_file(tensors, str(path), metadata=metadata or None)
        expected = {n: (TORCH_CODES[dt], shape) for n, (dt, shape) in spec.items()}
        assert ours(path) == expected == oracle(path)
        full = read_safetensors(str(path))
        assert full.metadata == metadata

        blob = path.read_bytes()
        at = int(cut * len(blob))
        path.write_bytes(blob[:at])
        try:
            short = read_safetensors(str(path))
        except InputError:
            return
        assert at == len(blob)
        assert short.tensors == full.tensors and short.metadata == full.metadata


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_corrupted_bytes_never_crash(data: st.DataObject) -> None:
    # Any byte-level damage gives a valid read or an InputError: never a KeyError, OverflowError, ...
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.safetensors"
        save_file({"a": torch.zeros(2, 3), "b": torch.tensor(1, dtype=torch.int64)}, str(path))
        blob = bytearray(path.read_bytes())
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
        path.write_bytes(bytes(blob))
        with contextlib.suppress(InputError):
            read_safetensors(str(path))


_dims = st.one_of(st.integers(0, 8), st.integers(-2, 2**64), st.booleans(), st.just(1.0), st.just("1"))


@st.composite
def _valid_entry(draw: st.DrawFn) -> dict[str, object]:
    code = draw(st.sampled_from(sorted(SAFETENSORS_DTYPES)))
    # Now and then a dimension that is no JSON integer but counts as one (true, 2.0): to be refused.
    shape = draw(st.lists(st.one_of(st.integers(0, 5), st.sampled_from([True, False, 2.0])), max_size=3))
    begin = draw(st.integers(0, 64))
    size = math.prod(int(d) for d in shape) * DTYPES[SAFETENSORS_DTYPES[code]].itemsize
    return {"dtype": code, "shape": shape, "data_offsets": [begin, begin + size]}


_header_entries = st.one_of(
    _valid_entry(),
    st.fixed_dictionaries(
        {
            "dtype": st.one_of(st.sampled_from(sorted(SAFETENSORS_DTYPES)), st.just("XYZ"), st.just(4)),
            "shape": st.one_of(st.lists(_dims, max_size=3), st.just([1] * 65), st.just(4)),
            "data_offsets": st.one_of(
                st.tuples(st.integers(-2, 40), st.integers(-2, 80)).map(list),
                st.just([0, 4, 4]),
                st.just(["0", "4"]),
                st.just([True, 4]),
            ),
        },
        optional={"extra": st.just(1)},
    ),
    st.none(),
    st.integers(),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(header=st.dictionaries(st.text(max_size=3), _header_entries, max_size=4))
def test_entries_are_checked_in_line_as_parse_entry_checks_them(header: dict[str, object]) -> None:
    # _entries() checks the usual entry itself and hands the rest to _parse_entry(): it must take exactly the
    # entries _parse_entry() takes, with the same values, and fail where it fails, with its error.
    expected: list[object] = []
    error: tuple[type, str] | None = None
    for name, entry in header.items():
        try:
            dtype, shape, begin, end = safetensors_reader._parse_entry("x", name, entry)
        except InputError as e:
            error = (type(e), e.message)
            break
        expected.append((begin, end, name, dtype, shape))
    try:
        got = safetensors_reader._entries("x", header)
    except InputError as e:
        assert (type(e), e.message) == error
    else:
        assert error is None
        assert got == expected
        assert [type(d) for e in got for d in e[4]] == [int for e in expected for d in e[4]]  # type: ignore[index]
