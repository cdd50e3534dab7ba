"""The plain records a pickle turns into under statecli's restricted reader (:mod:`statecli.safepickle`).

Values only: a global's name, an inert stub for what a call would have built, a storage and a tensor as
facts, the actions a pickle asks for. They sit on the ground floor so that everything that shows or
judges them (:mod:`statecli.clip`, the readers, :mod:`statecli.security`) can name them without the
reader itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# STACK_GLOBAL on operands that are not literal strings: the module "name" of such a global.
COMPUTED = "<computed>"


class Global:
    """A global the pickle names (``module``, ``name``). It is a name only: nothing is imported.

    ``handler`` is statecli's own pure function for an allowlisted name (``statecli.safepickle.HANDLERS``),
    which the reader attaches when it meets the name, so the REDUCE fast path needs no dictionary lookup.
    None for any other name, and for every name once the pickle patched a module's attributes (then a
    name may no longer be the function statecli knows).
    """

    __slots__ = ("handler", "module", "name")

    def __init__(self, module: str, name: str, handler: Callable[[tuple[Any, ...]], Any] | None = None) -> None:
        self.module = module
        self.name = name
        self.handler = handler

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return f"<global {self.qualname}>"


class Stub:
    """What the pickle would have built by calling or instantiating ``callee``; here it is inert data.

    ``kind`` is ``reduce``, ``newobj`` or ``inst``; ``state`` is what BUILD would have applied;
    ``items`` / ``dictitems`` what APPEND(S) / SETITEM(S) would have added.
    """

    __slots__ = ("args", "callee", "dictitems", "items", "kind", "state")

    def __init__(self, callee: Any, args: Any, kind: str) -> None:
        self.callee = callee
        self.args = args
        self.kind = kind
        self.state: Any = None
        self.items: list[Any] | None = None
        self.dictitems: dict[Any, Any] | None = None

    @property
    def class_name(self) -> str:
        c = self.callee
        if isinstance(c, Global):
            return c.qualname
        return "<computed>"

    def __repr__(self) -> str:
        return f"<stub {self.kind} {self.class_name}>"


class Action:
    """Something the pickle would make Python do under ``torch.load(weights_only=False)``, counted over every
    occurrence of the same ``kind`` and target. statecli does none of it; :mod:`statecli.security` judges it.

    ``kind``:

    - ``call``: REDUCE, INST or OBJ calls ``target`` (a :class:`Global`) with ``example`` as arguments;
    - ``instantiate``: NEWOBJ (or ``copyreg._reconstructor``, ``copyreg.__newobj__``) makes an instance of the
      class ``target`` without calling it: ``target.__new__`` runs, and ``setstate`` / ``fills`` say whether
      BUILD would call its ``__setstate__`` and SETITEM(S) / APPEND(S) its ``__setitem__`` / ``extend``;
    - ``call-on-value``: a call whose callee is not a global but a value the pickle built (a call's result,
      a string, a tensor): ``target`` is a text naming that value;
    - ``patch``: BUILD on a global (a module, class or function): pickle would set its attributes, so every
      name looked up after it may be something else (the overwritten-module attack);
    - ``build``: BUILD on the result of a call of ``target``, with a state that sets special (dunder)
      attributes (``__class__``, ``__setstate__``, ...), which can turn inert data into code.
    """

    __slots__ = ("count", "example", "fills", "kind", "setstate", "target")

    def __init__(self, kind: str, target: Any, example: str) -> None:
        self.kind = kind
        self.target = target  # a Global, or (call-on-value) a text naming the callee
        self.example = example  # the first occurrence's arguments (or state), as a bounded text
        self.count = 0
        self.setstate = False
        self.fills = False

    @property
    def name(self) -> str:
        t = self.target
        return t.qualname if isinstance(t, Global) else str(t)

    def __repr__(self) -> str:
        return f"<action {self.kind} {self.name} x{self.count}>"


class PickledDict(dict):  # type: ignore[type-arg]
    """A dict (or OrderedDict) from the pickle; ``attrs`` holds what BUILD set on it (``_metadata``)."""

    __slots__ = ("_attrs",)  # made on first use: a state dict holds one of these per tensor, nearly all bare

    @property
    def attrs(self) -> dict[str, Any]:
        try:
            return self._attrs
        except AttributeError:
            self._attrs: dict[str, Any] = {}
            return self._attrs


@dataclass(slots=True)
class StorageRef:
    """A tensor storage named by a persistent id; its bytes stay where they are."""

    key: str
    dtype: str
    location: str
    numel: int  # elements of ``dtype``
    nbytes: int


@dataclass(slots=True)
class QuantizerRef:
    """A quantized tensor's quantizer as ``_rebuild_qtensor``'s ``quantizer_params`` state it: ``scheme`` (a
    torch qscheme's name) with one ``scale`` and ``zero_point``, or with ``scales`` and ``zero_points``, tensors
    of their own, one entry per index along ``axis``."""

    scheme: str
    scale: float | None = None
    zero_point: int | None = None
    scales: TensorRef | None = None
    zero_points: TensorRef | None = None
    axis: int | None = None


@dataclass(slots=True)
class TensorRef:
    """A tensor as torch would rebuild it: facts only."""

    storage: StorageRef | None
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...] | None
    dtype: str
    requires_grad: bool | None
    is_parameter: bool = False
    layout: str = "strided"
    device: str | None = None  # only where no storage says it (meta tensors)
    extra: list[TensorRef] | tuple[()] = ()  # sparse components, quantizer params
    quantizer: QuantizerRef | None = None  # a quantized tensor's, when torch.load would accept it

    # Hashed by identity, as torch tensors are: a whole pickled optimizer keys its ``state`` by Parameter.
    __hash__ = object.__hash__

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


__all__ = ["COMPUTED", "Action", "Global", "PickledDict", "QuantizerRef", "StorageRef", "Stub", "TensorRef"]
