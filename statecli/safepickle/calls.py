"""What the restricted reader records of a pickle's calls, instantiations and BUILDs: one
:class:`~statecli.pickled.Action` per kind and target for :mod:`statecli.security` to judge, and the calls
statecli models by reading their arguments (``copyreg``'s constructors, ``_rebuild_from_type_v2``, numpy's
RNG constructors, ``getattr`` of a torch function). Nothing here calls what the file names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from statecli.clip import args_text, describe
from statecli.errors import InputError
from statecli.pickled import Action, Global, PickledDict, Stub, TensorRef
from statecli.safepickle.handlers import (
    _PLAIN_BASES,
    TORCH_FUNCTIONS,
    TORCHBIND_CLASSES,
    _h_rebuild_parameter,
    _subclass_layout,
)


def _dunder_keys(state: Any) -> list[str]:
    """Special attribute names (``__class__``, ``__setstate__``) that a BUILD state would set: ``setattr`` of
    those on an inert object can make it code (an instance ``__setstate__`` is what the next BUILD calls)."""
    parts = state if type(state) is tuple and len(state) == 2 else (state,)
    found = []
    for part in parts:
        if isinstance(part, dict):
            for k in part:
                if type(k) is not str or (k[:2] == "__" and k[-2:] == "__"):
                    found.append(describe(k))
                    if len(found) >= 3:
                        return found
    return found


class Calls:
    """The call model as a part of :class:`~statecli.safepickle.machine.RestrictedUnpickler`, which sets these."""

    actions: dict[tuple[str, str, str], Action]
    globals_seen: dict[tuple[str, str], int]
    tainted: bool
    _global: Callable[[str, str], Global]

    def _act(self, kind: str, target: Any, example: Any) -> Action:
        """The :class:`Action` for ``kind`` on ``target``, counted once more; ``example`` (arguments or state)
        is described only the first time, so a million calls cost a million counts and one text."""
        if type(target) is Global:
            key = (kind, target.module, target.name)
        else:
            # Keyed by the kind of value only: a million distinct strings called must not be a million actions.
            target = f"a value the pickle built ({describe(target)})" if type(target) is not Stub else describe(target)
            key = (kind, "", "")
        action = self.actions.get(key)
        if action is None:
            text = describe(example) if kind == "patch" else args_text(example)
            action = self.actions[key] = Action(kind, target, text)
        action.count += 1
        return action

    def _call(self, callee: Any, args: Any, kind: str) -> Any:
        if type(callee) is not Global:
            # A call on a value: the result of an earlier call, a string, a tensor. No allow list can vouch
            # for what that is (torch's dotted-name importer returns any function).
            self._act("call-on-value", callee, args)
            return Stub(callee, args, kind)
        handler = callee.handler
        if handler is not None:
            if not isinstance(args, tuple):
                raise InputError(f"corrupt pickle: arguments to {callee.qualname} are not a tuple")
            try:
                return handler(args)
            except IndexError as e:
                raise InputError(f"corrupt pickle: too few arguments to {callee.qualname}") from e
        special = _SPECIAL.get((callee.module, callee.name)) if not self.tainted else None
        if special is not None and type(args) is tuple:
            return special(self, callee, args, kind)
        return self._plain_call(callee, args, kind)

    def _plain_call(self, callee: Global, args: Any, kind: str) -> Stub:
        # NEWOBJ runs cls.__new__(cls, *args) and no __init__; INST, OBJ and REDUCE call the callee.
        self._act("instantiate" if kind == "newobj" else "call", callee, args)
        return Stub(callee, args, kind)

    def _instance(self, cls: Any, args: tuple[Any, ...]) -> Any:
        """An object made without calling its class (``cls.__new__``): BUILD / SETITEM on it are recorded."""
        if type(cls) is not Global:
            self._act("call-on-value", cls, args)
            return Stub(cls, args, "newobj")
        if cls.handler is not None:  # OrderedDict, set: statecli's own value, as NEWOBJ on them makes
            return self._call(cls, (), "newobj")
        self._act("instantiate", cls, args)
        return Stub(cls, args, "newobj")

    def _reconstructor(self, callee: Global, args: tuple[Any, ...], kind: str) -> Any:
        """``copyreg._reconstructor(cls, base, state)``: ``object.__new__(cls)`` when ``base`` is ``object``,
        else ``base.__new__(cls, state)`` and ``base.__init__``: how protocols 0 and 1 pickle an object."""
        if len(args) != 3:
            raise InputError("corrupt pickle: copyreg._reconstructor takes three arguments")
        cls, base = args[0], args[1]
        if not (type(base) is Global and (base.module, base.name) in _PLAIN_BASES):
            # Another base's __new__ and __init__ run with the pickle's state: a call of that base.
            self._act("call" if type(base) is Global else "call-on-value", base, (cls, args[2]))
        return self._instance(cls, ())

    def _newobj(self, callee: Global, args: tuple[Any, ...], kind: str) -> Any:
        """``copyreg.__newobj__(cls, *args)``: ``cls.__new__(cls, *args)``, as NEWOBJ."""
        if not args:
            raise InputError("corrupt pickle: copyreg.__newobj__ without a class")
        return self._instance(args[0], args[1:])

    def _newobj_ex(self, callee: Global, args: tuple[Any, ...], kind: str) -> Any:
        """``copyreg.__newobj_ex__(cls, args, kwargs)``: ``cls.__new__(cls, *args, **kwargs)``."""
        if len(args) != 3:
            raise InputError("corrupt pickle: copyreg.__newobj_ex__ takes three arguments")
        return self._instance(args[0], (args[1], args[2]))

    def _from_type(self, callee: Global, args: tuple[Any, ...], kind: str) -> Any:
        """``torch._tensor._rebuild_from_type_v2(func, new_type, args, state)``: torch calls ``func(*args)``,
        makes the result an instance of ``new_type`` and sets ``state`` on it. Each part is judged: ``func``
        is a call like any other (a gadget hides a call here), ``new_type`` an instantiation."""
        if len(args) < 3:
            raise InputError(f"corrupt pickle: too few arguments to {callee.qualname}")
        func, new_type, inner = args[0], args[1], args[2]
        if type(func) is Global and func.handler is not None and type(inner) is tuple:
            try:
                t = func.handler(inner)
            except IndexError as e:
                raise InputError(f"corrupt pickle: too few arguments to {func.qualname}") from e
        else:
            t = self._call(func, inner, "reduce")
        if type(new_type) is not Global:
            self._act("call-on-value", new_type, (t,))
        elif new_type.qualname not in ("torch.Tensor", "torch.nn.parameter.Parameter"):
            self._act("instantiate", new_type, ())
        if len(args) > 3 and _dunder_keys(args[3]):
            self._act("build", callee, args[3])
        if isinstance(t, TensorRef):
            _subclass_layout(t, new_type)
        return t

    def _param_with_state(self, callee: Global, args: tuple[Any, ...], kind: str) -> Any:
        """``torch._utils._rebuild_parameter_with_state(data, requires_grad, hooks, state)``: a Parameter whose
        extra attributes ``state`` sets with ``setattr``."""
        try:
            p = _h_rebuild_parameter(args)
        except IndexError as e:
            raise InputError(f"corrupt pickle: too few arguments to {callee.qualname}") from e
        if len(args) > 3 and _dunder_keys(args[3]):
            self._act("build", callee, args[3])
        return p

    def _rng_ctor(self, callee: Global, args: tuple[Any, ...], kind: str) -> Any:
        """``numpy.random._pickle.__randomstate_ctor`` / ``__generator_ctor(name='MT19937', ctor=...)``: numpy
        calls ``ctor(name)`` unless ``name`` is a bit generator already. numpy pickles them with ``ctor``
        its own ``__bit_generator_ctor`` (or none) and ``name`` a bit generator's name, class or instance;
        any other ``ctor`` is judged as the call it is (``__randomstate_ctor(cfg, logging.config.dictConfig)``
        calls dictConfig)."""
        stub = self._plain_call(callee, args, kind)
        name = args[0] if args else "MT19937"
        ctor = args[1] if len(args) > 1 else None
        if ctor is None or (type(ctor) is Global and (ctor.module, ctor.name) == _BIT_CTOR):
            self._bit_generator(name)
        else:
            self._call(ctor, (name,), "reduce")
        return stub

    def _bit_generator_ctor(self, callee: Global, args: tuple[Any, ...], kind: str) -> Any:
        """``numpy.random._pickle.__bit_generator_ctor(x)``: ``x()`` when ``x`` is a class, else a lookup of
        ``x`` among numpy's bit generator names."""
        stub = self._plain_call(callee, args, kind)
        self._bit_generator(args[0] if args else "MT19937")
        return stub

    def _bit_generator(self, name: Any) -> None:
        if type(name) is Global:
            self._call(name, (), "reduce")  # any class called with no arguments: judged like every call

    def _torch_function(self, callee: Global, args: tuple[Any, ...], kind: str) -> Any:
        """``getattr(torch._C._VariableFunctionsClass, 'relu')`` is how pickle writes ``torch.relu``: read as
        the name ``torch.relu`` (an activation a module stores), not as a call of getattr. Any other getattr is
        a call like any other (and a well-known way to reach any attribute)."""
        if len(args) == 2:
            owner, attr = args
            if (
                type(owner) is Global
                and (owner.module, owner.name) == ("torch._C", "_VariableFunctionsClass")
                and attr in TORCH_FUNCTIONS
            ):
                for key in ((callee.module, callee.name), (owner.module, owner.name)):
                    n = self.globals_seen.get(key, 0) - 1
                    if n > 0:
                        self.globals_seen[key] = n
                    else:
                        self.globals_seen.pop(key, None)
                return self._global("torch", attr)
        return self._plain_call(callee, args, kind)

    def _fill(self, target: Stub | Global, items: list[Any], methods: tuple[str, ...]) -> None:
        """APPEND(S) / ADDITEMS on something that is not a list or set: real pickle looks ``extend``,
        ``append`` or ``add`` up on the object and calls it with the items.

        On a global (a module's list or dict: ``sys.path``, ``copyreg._inverted_registry``) that changes
        what later names resolve to: a ``mutate`` action, and no name is trusted after it. On an object the
        pickle made, a method of that name the pickle put in its state (BUILD of ``{'append': f}`` on an
        inert ``Namespace``) is what pickle calls: judged as a call of that value."""
        if type(target) is Global:
            self._act("mutate", target, tuple(items))
            self.tainted = True
            return
        state = target.state
        parts = [p for p in (state if type(state) is tuple and len(state) == 2 else (state,)) if isinstance(p, dict)]
        for method in methods:
            planted = [p[method] for p in parts if method in p]
            if planted and items:
                # extend gets the list; append and add get each item (the first stands for all here).
                self._call(planted[-1], (list(items),) if method == "extend" else (items[0],), "reduce")
                break
        if target.items is None:
            target.items = []
            self._mark(target, "fills")
        target.items.extend(items)

    def _build(self, target: Any, state: Any) -> None:
        if isinstance(target, Stub):
            callee = target.callee
            if type(callee) is Global and (callee.module, callee.name) == ("torch", "ScriptObject"):
                self._torchbind(state)
            if target.state is not None or _dunder_keys(state):
                # A second BUILD calls whatever the first put in the instance's __setstate__; a special name
                # set by any BUILD can turn the object into something else.
                self._act("build", target.callee if type(target.callee) is Global else target, state)
            else:
                self._mark(target, "setstate")
            target.state = state
        elif isinstance(target, PickledDict):
            if isinstance(state, dict) and not _dunder_keys(state):
                target.attrs.update((k, v) for k, v in state.items() if isinstance(k, str))
            else:
                self._act("build", Global("collections", "OrderedDict"), state)
        elif type(target) is Global:
            # Real pickle would set attributes on a module, class or function: every name looked up after
            # this may be the attacker's (ShadowPickle-style overwritten modules), so none is trusted again.
            self._act("patch", target, state)
            self.tainted = True
        # BUILD on plain data (lists, dicts, tensors) fails or is ignored by real pickle: nothing runs.

    def _torchbind(self, state: Any) -> None:
        """BUILD of a ``torch.ScriptObject`` with ``(state, qualname)``: torch runs the ``__setstate__`` of the
        TorchBind class ``qualname`` names. Quantized packed weights repack tensors; other classes do what
        they do (``aten.OpaqueObject``'s base64-decodes its state and unpickles it with plain pickle): a call of
        that class's ``__setstate__``, judged like any call."""
        qualname = state[1] if type(state) is tuple and len(state) == 2 else None
        if qualname in TORCHBIND_CLASSES:
            return
        name = qualname if type(qualname) is str else "torch.ScriptObject"
        self._act("call", Global(name, "__setstate__"), (state[0] if qualname is not None else state,))

    def _mark(self, target: Stub, what: str) -> None:
        """Note on an instantiation's action that BUILD (``setstate``) or SETITEM/APPEND (``fills``) reach it."""
        callee = target.callee
        if target.kind == "newobj" and type(callee) is Global:
            action = self.actions.get(("instantiate", callee.module, callee.name))
            if action is not None:
                setattr(action, what, True)


# Calls statecli models by reading their arguments, because what they do depends on them.
_SPECIAL: dict[tuple[str, str], Callable[[Calls, Global, tuple[Any, ...], str], Any]] = {
    ("torch._tensor", "_rebuild_from_type_v2"): Calls._from_type,
    ("torch._utils", "_rebuild_parameter_with_state"): Calls._param_with_state,
    ("copyreg", "_reconstructor"): Calls._reconstructor,
    ("copyreg", "__newobj__"): Calls._newobj,
    ("copyreg", "__newobj_ex__"): Calls._newobj_ex,
    ("numpy.random._pickle", "__randomstate_ctor"): Calls._rng_ctor,
    ("numpy.random._pickle", "__generator_ctor"): Calls._rng_ctor,
    ("numpy.random._pickle", "__bit_generator_ctor"): Calls._bit_generator_ctor,
    ("builtins", "getattr"): Calls._torch_function,
}
_BIT_CTOR = ("numpy.random._pickle", "__bit_generator_ctor")
