"""Every size claim checked against the bytes (issue #11): a zip's local headers and data descriptors
against its central directory, stored sizes against the bytes that hold them, archives inside a ``.pt2``
read by the same rules, storages read as long as they claim, names within their limit and never two
tensors under one name.

torch is the oracle where it reads the file (``torch.load``, ``torch.jit.load``, ``torch.export.load`` of
files built here from trusted tensors); the hostile files come from tests/hostile/cases_sizes.py.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from cases_sizes import LONG, entry, pickled_weight, pt2_archive, pt2_entries, raw_zip, torch_entries
from clirun import NO_COLOR, run_cli
from make_hostile import build, state_dict
from zip_members import member, rewrite

import statecli
from statecli.errors import InputError, LimitExceededError, UnsupportedFormatError, UsageError
from statecli.formats.zipdir import read_central_directory, read_member

WEIGHTS = "data/weights/model_weights_config.json"
CONSTANTS = "data/constants/model_constants_config.json"


def assert_input_error(args: tuple[str, ...], words: str) -> str:
    code, out, err = run_cli(*args, env=NO_COLOR)
    assert code == 3, (code, err)
    assert out == "" and words in err and "internal error" not in err, err
    return err


def torch_save_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def export_load(path: Path) -> torch.export.ExportedProgram:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.load(str(path))


def edited_config(src: Path, rel: str, fqn: str, **changes: Any) -> bytes:
    doc = json.loads(member(src, rel))
    doc["config"][fqn].update(changes)
    return json.dumps(doc).encode()


# ------------------------------------------------------------------ local headers and data descriptors


def _torch_file(tmp_path: Path) -> Path:
    path = tmp_path / "real.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, path)
    return path


def _descriptor_at(data: bytes, name: str) -> int:
    """Where the data descriptor torch writes after member ``name`` starts (its PK\\x07\\x08 signature)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = z.getinfo(name)
    nlen, xlen = struct.unpack_from("<HH", data, info.header_offset + 26)
    at = info.header_offset + 30 + nlen + xlen + info.compress_size
    assert data[at : at + 4] == b"PK\x07\x08"
    return at


def test_torch_archives_carry_data_descriptors_that_are_checked(tmp_path: Path) -> None:
    # torch writes zeros in each local header and the CRC and sizes in a descriptor after the bytes.
    path = _torch_file(tmp_path)
    members = read_central_directory(str(path))
    pkl = next(m for n, m in members.items() if n.endswith("/data.pkl"))
    assert pkl.flags & 0x8 and read_member(str(path), pkl, 1 << 20)
    data = bytearray(path.read_bytes())
    at = _descriptor_at(bytes(data), pkl.name)
    data[at + 8 : at + 12] = struct.pack("<L", pkl.compressed_size + 1)  # the descriptor's compressed size
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"the data descriptor of .*data\.pkl says"):
        statecli.open_checkpoint(bad)


def test_a_storage_descriptor_that_lies_stops_stats_and_load(tmp_path: Path) -> None:
    # inspect reads no storage bytes (nor their headers: one read per tensor on a 100 GB file); the commands
    # that read the bytes check the headers first.
    path = _torch_file(tmp_path)
    data = bytearray(path.read_bytes())
    m = read_central_directory(str(path))["real/data/0"]
    at = _descriptor_at(bytes(data), m.name)
    data[at + 4 : at + 8] = struct.pack("<L", m.crc ^ 1)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    assert run_cli("inspect", str(bad), env=NO_COLOR).exit_code == 0
    assert_input_error(("stats", str(bad)), "CRC mismatch: the data descriptor of real/data/0")
    with pytest.raises(InputError, match="data descriptor"):
        statecli.load(bad)


@pytest.mark.parametrize(
    ("lies", "words"),
    [
        ({"local_csize": 8, "local_usize": 8}, "the local header of archive/data/0 says compressed size 8, size 8"),
        ({"local_crc": 7}, "CRC mismatch: the local header of archive/data/0"),
        ({"local_method": 8}, "the local header of archive/data/0 says method 8"),
        ({"local_name": "archive/data/1"}, "local name differs"),
    ],
)
def test_a_storage_local_header_that_lies_stops_stats(tmp_path: Path, lies: dict[str, Any], words: str) -> None:
    entries = torch_entries(state_dict(("weight", lambda a: a.tensor())))
    entries[2]["lies"].update(lies)
    path = tmp_path / "model.pt"
    path.write_bytes(raw_zip(entries))
    assert_input_error(("stats", str(path)), words)


def test_a_long_non_ascii_member_name_matches_its_local_header(tmp_path: Path) -> None:
    # Three bytes a character: the local header is read far enough for the whole name.
    name = "archive/" + "\u20ac" * 300
    path = tmp_path / "u.zip"
    path.write_bytes(raw_zip([entry(name, b"hello")]))
    assert read_member(str(path), read_central_directory(str(path))[name], 100) == b"hello"


@pytest.mark.parametrize(
    ("method", "flags", "words"),
    [
        (14, 0x800, "archive/data.pkl uses LZMA compression, which torch archives never use"),
        (12, 0x800, "archive/data.pkl uses bzip2 compression, which torch archives never use"),
        (93, 0x800, "uses Zstandard compression"),
        (77, 0x800, "uses zip compression method 77, which torch archives never use"),
        (0, 0x801, "archive/data.pkl is encrypted, which torch archives never are"),
        (0, 0x840, "is encrypted"),  # bit 6: strong encryption
    ],
)
def test_methods_and_encryption_torch_cannot_read_are_refused(
    tmp_path: Path, method: int, flags: int, words: str
) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(raw_zip(torch_entries(state_dict(("weight", lambda a: a.tensor())), method=method, flags=flags)))
    for command in ("inspect", "check"):
        assert_input_error((command, str(path)), words)


# ---------------------------------------------------------------------- sizes before any allocation


@pytest.mark.parametrize("name", ["zip_stored_member_claims_1tib", "pt2_weight_claims_1tib"])
def test_a_stored_member_claiming_a_tebibyte_is_refused_before_stats_allocates(tmp_path: Path, name: str) -> None:
    # Before: inspect read it (exit 0) and stats sized a buffer by the claim: 1 TiB, then "internal error".
    path = build(name, tmp_path).path
    for command in ("inspect", "stats"):
        assert_input_error((command, str(path)), "is stored with 16 bytes, directory says 1099511627776")


def test_a_torch_save_storage_record_of_another_size_is_refused_as_torch_load_refuses_it(tmp_path: Path) -> None:
    src = _torch_file(tmp_path)
    for n in (32, 8):
        bad = rewrite(src, tmp_path / f"r{n}.pt", {"data/0": bytes(n)})
        with pytest.raises(RuntimeError, match="record size"):
            torch.load(bad, weights_only=True)
        with pytest.raises(InputError, match=f"claims 24 bytes but data/0 holds {n}"):
            statecli.open_checkpoint(bad)


def test_a_torchscript_storage_longer_than_its_tensor_reads_as_torch_jit_load_reads_it(tmp_path: Path) -> None:
    # torch.jit.load takes the first bytes of a longer record. Before: stats read the whole member (8
    # zeros for a 4-element tensor), and convert wrote the extra bytes and then failed its read-back.
    src = tmp_path / "ts.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated; its archives are still read
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), src)
    big = rewrite(src, tmp_path / "ts_big.pt", {"data/0": struct.pack("<4f", 1, 2, 3, 4) + bytes(16)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = torch.jit.load(big).state_dict()
    got = statecli.load(big)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    code, out, err = run_cli("stats", str(big), "--format", "json", env=NO_COLOR)
    assert code == 0, err
    weight = next(t for t in json.loads(out)["tensors"] if t["name"] == "weight")
    assert (weight["zeros"], weight["max"]) == (0, 4.0)
    statecli.convert(big, tmp_path / "out.safetensors")
    assert torch.equal(statecli.load(tmp_path / "out.safetensors")["weight"], want["weight"])


# ------------------------------------------------------------------------- .pt2 pickled payloads


def _frozen_with_pickled(samples_dir: Path, tmp_path: Path, tensor: torch.Tensor, name: str = "p.pt2") -> Path:
    """export_frozen.pt2 with ``net.backbone.0.weight`` stored as torch.export.save stores a tensor subclass:
    a whole torch.save archive of ``tensor`` (use_pickle)."""
    src = samples_dir / "export_frozen.pt2"
    return rewrite(
        src,
        tmp_path / name,
        {
            WEIGHTS: edited_config(src, WEIGHTS, "net.backbone.0.weight", use_pickle=True),
            "data/weights/weight_0": torch_save_bytes(torch.nn.Parameter(tensor, requires_grad=False)),
        },
    )


def test_a_pickled_pt2_weight_is_read_from_its_own_storage(samples_dir: Path, tmp_path: Path) -> None:
    # Before: stats and load read the payload archive's bytes (the zip) as float32 values, and convert
    # stopped on an AssertionError ("wrote 2120 bytes, announced 512").
    want = export_load(samples_dir / "export_frozen.pt2").state_dict["net.backbone.0.weight"].detach().clone()
    path = _frozen_with_pickled(samples_dir, tmp_path, want)
    oracle = export_load(path).state_dict
    assert torch.equal(oracle["net.backbone.0.weight"], want)  # torch.export.load unpickles it
    got = statecli.load(path)
    assert set(got) == set(oracle)
    assert all(torch.equal(got[k], oracle[k].detach()) for k in oracle)
    code, out, err = run_cli("stats", str(path), "--format", "json", env=NO_COLOR)
    assert code == 0, err
    stats = next(t for t in json.loads(out)["tensors"] if t["name"] == "net.backbone.0.weight")
    assert stats["max"] == pytest.approx(float(want.max())) and stats["min"] == pytest.approx(float(want.min()))
    out_path = tmp_path / "out.pt"
    statecli.convert(path, out_path, verify=True)
    assert torch.equal(torch.load(out_path, weights_only=True)["net.backbone.0.weight"], want)


def test_a_pickled_pt2_constant_is_read_from_its_own_storage(samples_dir: Path, tmp_path: Path) -> None:
    src = samples_dir / "export_frozen.pt2"
    ep = export_load(src)
    want = ep.constants["offset"].clone()
    doc = json.loads(member(src, CONSTANTS))
    path_name = doc["config"]["offset"]["path_name"]
    doc["config"]["offset"]["use_pickle"] = True
    path = rewrite(
        src,
        tmp_path / "c.pt2",
        {CONSTANTS: json.dumps(doc).encode(), f"data/constants/{path_name}": torch_save_bytes(want)},
    )
    assert torch.equal(export_load(path).constants["offset"], want)
    got = statecli.load(path, select="constants")
    assert torch.equal(got["offset"], want)


def test_a_pickled_pt2_tensor_that_is_not_what_its_config_says_is_refused(samples_dir: Path, tmp_path: Path) -> None:
    # torch.export.load returns the pickled tensor whatever tensor_meta says: here float64 where the
    # config (and the graph) say float32.
    shape = export_load(samples_dir / "export_frozen.pt2").state_dict["net.backbone.0.weight"].shape
    path = _frozen_with_pickled(samples_dir, tmp_path, torch.ones(shape, dtype=torch.float64))
    assert export_load(path).state_dict["net.backbone.0.weight"].dtype == torch.float64
    for command in ("inspect", "stats"):
        assert_input_error((command, str(path)), "holds a float64 tensor of shape [16, 8]")
    path = _frozen_with_pickled(samples_dir, tmp_path, torch.ones(4), name="shape.pt2")
    assert_input_error(("inspect", str(path)), "holds a float32 tensor of shape [4]")


def test_a_pickled_pt2_payload_that_is_no_tensor_is_not_read(tmp_path: Path) -> None:
    path = pt2_archive(tmp_path / "m.pt2", pt2_entries(pickled_weight(), use_pickle=True))
    report = statecli.open_checkpoint(path)
    payload = [f for f in report.findings if f.code == "export-pickled-payload"]
    assert payload and "pickled {'weight': <tensor>}" in payload[0].message
    assert report.tensors[0].layout == "opaque"
    code, _, err = run_cli("stats", str(path), env=NO_COLOR)
    assert code == 0 and "not read: w (opaque layout)" in err
    with pytest.raises(UnsupportedFormatError, match="layout opaque"):
        statecli.load(path)


class _SubclassWeights(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torch.testing._internal.two_tensor import TwoTensor

        self.w = torch.nn.Parameter(TwoTensor(torch.arange(6.0).reshape(2, 3), torch.zeros(2, 3)))
        self.b = torch.nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.t() + self.b


def test_a_real_subclass_weight_is_not_read_as_numbers(tmp_path: Path) -> None:
    # What torch.export.save really pickles: a tensor subclass. Its values are two tensors, not one storage.
    pytest.importorskip("torch.testing._internal.two_tensor")
    path = tmp_path / "sub.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(_SubclassWeights(), (torch.randn(4, 3),)), str(path))
    assert json.loads(member(path, WEIGHTS))["config"]["w"]["use_pickle"] is True
    oracle = export_load(path).state_dict
    code, out, err = run_cli("stats", str(path), "--format", "json", env=NO_COLOR)
    assert code == 0, err
    rows = {t["name"]: t for t in json.loads(out)["tensors"]}
    assert rows["w"]["skipped"].startswith("subclass:") and rows["b"]["max"] == float(oracle["b"].max())
    with pytest.raises(UnsupportedFormatError, match="subclass"):
        statecli.load(path)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("pt2_nested_zip_bomb", "would inflate 260965 bytes to 268435460"),
        ("pt2_nested_lzma", "data/weights/weight_0: archive/data.pkl uses LZMA compression"),
        ("pt2_nested_encrypted", "data/weights/weight_0: archive/data.pkl is encrypted"),
        ("pt2_nested_local_method_differs", "the local header of archive/data.pkl says method 8"),
        ("pt2_nested_storage_claims_1tib", "archive/data/0 is stored with 16 bytes"),
    ],
)
def test_an_archive_inside_a_pt2_is_held_to_the_outer_rules(tmp_path: Path, name: str, words: str) -> None:
    # Before: zipfile read it (LZMAError, RuntimeError: "internal error"; the bomb inflated 256 MiB).
    path = build(name, tmp_path).path
    for command in ("inspect", "stats"):
        assert_input_error((command, str(path)), words)


def test_a_colon_in_a_torch_save_storage_key_names_a_member_not_a_nested_archive(tmp_path: Path) -> None:
    # Only a .pt2 names storages inside payload archives (``<member>:data/<key>``); in a torch.save archive a
    # colon is part of the member's name, and the bytes are that member's.
    from make_hostile import torch_zip

    path = torch_zip(
        tmp_path / "m.pt",
        state_dict(("weight", lambda a: a.tensor(key="0:data/0"))),
        {"0:data/0": struct.pack("<4f", 1, 2, 3, 4), "0": bytes(16)},
    )
    assert statecli.load(path)["weight"].tolist() == [1, 2, 3, 4]


def test_a_pt2_program_named_with_a_colon_is_refused(tmp_path: Path) -> None:
    entries = pt2_entries()
    for e in entries:
        e["lies"]["name"] = (
            e["name"]
            .replace("models/model.json", "models/a:b.json")
            .replace("weights/model_weights", "weights/a:b_weights")
        )
    path = pt2_archive(tmp_path / "m.pt2", entries)
    with pytest.raises(UnsupportedFormatError, match="a program named 'a:b'"):
        statecli.open_checkpoint(path)


def test_a_deflated_payload_archive_is_read_from_memory(tmp_path: Path) -> None:
    # The payload member itself deflated (torch stores it): its archive is checked the same way, in memory.
    path = pt2_archive(tmp_path / "m.pt2", pt2_entries(pickled_weight(), use_pickle=True, method=8))
    report = statecli.open_checkpoint(path)
    assert any(f.code == "export-pickled-payload" for f in report.findings)


def test_an_encrypted_dcp_bytes_entry_is_reported_unscanned(tmp_path: Path) -> None:
    # A non-tensor DCP entry is a torch.save archive inside a .distcp file; zipfile raised RuntimeError on
    # an encrypted member there ("internal error" from inspect).
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(2), "extra": {"a": 1}}, checkpoint_id=str(folder))
    (data_file,) = folder.glob("*.distcp")
    data = bytearray(data_file.read_bytes())
    pickle_of_1 = b"\x80\x02K\x01."
    central = next(
        h
        for h in range(len(data))
        if data[h : h + 4] == b"PK\x01\x02" and data[h + 46 : h + 62] == b"archive/data.pkl"
        and struct.unpack_from("<L", data, h + 24)[0] == len(pickle_of_1)
    )  # fmt: skip
    blob_start = bytes(data).rfind(b"PK\x05\x06", 0, central) + 1
    local = bytes(data).index(b"PK\x03\x04\x00\x00\x08\x08", blob_start)
    data[local + 6] |= 1
    data[central + 8] |= 1
    data_file.write_bytes(bytes(data))
    report = statecli.open_checkpoint(folder)
    assert any(f.code == "unscanned-entry" and "encrypted" in f.message for f in report.findings)


# --------------------------------------------------------------------------------- names


def test_a_dcp_name_over_the_limit_is_refused(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({LONG: torch.ones(2)}, checkpoint_id=str(tmp_path / "ckpt"))
    with pytest.raises(LimitExceededError, match="a tensor name of 200000 characters"):
        statecli.open_checkpoint(tmp_path / "ckpt")


def test_a_name_at_the_limit_is_read(tmp_path: Path) -> None:
    name = "n" * 65_536
    header = json.dumps({name: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    assert statecli.open_checkpoint(path).tensors[0].name == name


def test_a_sample_input_name_is_bounded(tmp_path: Path) -> None:
    # A 40,000-character key at two levels of the example inputs: each key is short, the name is not.
    key = "k" * 40_000
    inputs = torch_save_bytes(({key: {key: torch.ones(2)}},))
    src = pt2_entries()
    src.append(entry("model/data/sample_inputs/model.pt", inputs))
    path = pt2_archive(tmp_path / "m.pt2", src)
    with pytest.raises(LimitExceededError, match="longer than 65536 characters"):
        statecli.open_checkpoint(path)


# ---------------------------------------------------------------------- two tensors under one name


def test_a_collision_in_the_file_is_an_input_error_naming_both(tmp_path: Path) -> None:
    # Before: inspect listed 'a.b' twice, and convert said "change --strip-prefix / --add-prefix", which
    # the user never passed (exit 2).
    path = build("name_collision_dotted_key", tmp_path).path
    err = assert_input_error(("convert", str(path), "-o", str(tmp_path / "o.safetensors")), "both named 'a.b'")
    assert "over data/0" in err and "over data/1" in err and "--strip-prefix" not in err
    assert not (tmp_path / "o.safetensors").exists()
    with pytest.raises(InputError, match=r"both named 'a\.b'"):
        statecli.load(path)


def test_a_collision_made_by_strip_prefix_names_only_that_option(tmp_path: Path) -> None:
    # A Lightning checkpoint whose state dict holds 'model.w' and 'w': they collide once model. is stripped.
    path = tmp_path / "run.ckpt"
    torch.save(
        {"state_dict": {"model.w": torch.ones(2), "w": torch.zeros(2)}, "pytorch-lightning_version": "2.0"}, path
    )
    with pytest.raises(UsageError) as e:
        statecli.convert(path, tmp_path / "o.safetensors", strip_prefix=("model.",))
    assert "after --strip-prefix;" in e.value.message and "--add-prefix" not in e.value.message
    assert "--select" not in e.value.message


def test_one_name_in_two_shards_is_an_input_error(tmp_path: Path) -> None:
    # Shard 2 declares 'a' a tied alias of its 'b'; shard 1 holds a tensor 'a' of its own.
    from safetensors.torch import save_file

    meta = {"statecli": json.dumps({"schema": "statecli.roles/1", "aliases": {"a": "b"}})}
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.zeros(2)}, str(tmp_path / "s2.safetensors"), metadata=meta)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    err = assert_input_error(("inspect", str(index)), "both named 'a'")
    assert "in s1.safetensors" in err and "in s2.safetensors" in err
