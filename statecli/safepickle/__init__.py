"""A restricted pickle reader: it builds inert data from a pickle without importing or calling anything.

Why our own opcode loop instead of ``pickle.Unpickler`` with ``find_class`` overridden: the C unpickler
grows its memo to twice the largest index it is given (one ``LONG_BINPUT 4294967295`` asks for 32 GiB),
has no limits on nesting or opcode count, and calls what ``find_class`` returns. Here:

- ``GLOBAL`` / ``STACK_GLOBAL`` / ``INST`` produce a :class:`Global`, a name and nothing more. Names
  are matched by exact string against :data:`HANDLERS`, never imported, never resolved by ``getattr``.
- ``REDUCE`` / ``NEWOBJ`` / ``OBJ`` on an allowlisted name run *our* pure function for it (building a
  :class:`TensorRef` for torch's tensor rebuild functions, a dict for ``OrderedDict``); on any other
  name they produce a :class:`Stub` recording the callee and its arguments. ``BUILD`` stores its state
  on the stub. Nothing the file names is ever called.
- Sizes the file claims are checked against the bytes that are there before anything is sliced.

Tensor bytes are never read: storages arrive through ``persistent_load`` as whatever the caller builds
(the torch zip reader validates them against the archive's members).

By job: :mod:`.machine` (the opcode loop, memo and limits accounting), :mod:`.bounds` (the limits and the
hash-flood guards), :mod:`.handlers` (statecli's functions for allowlisted names), :mod:`.calls` (what a
pickle's calls would do, recorded as actions), :mod:`.fastpath` (torch.save's usual tensor entry in one
regex step), :mod:`.names` (what a pickle names past a point, without building it). The records it builds
are in :mod:`statecli.pickled`. Readers call :func:`statecli.security.loads`, which runs this reader and
judges what a pickle that fails to parse had already asked for.
"""

from statecli.clip import describe, describe_name
from statecli.pickled import COMPUTED, Action, Global, PickledDict, StorageRef, Stub, TensorRef
from statecli.safepickle.bounds import MAX_GLOBAL_NAME, MAX_GLOBALS, MAX_KEY_VALUES, MAX_SAME_HASH, Limits, check_key
from statecli.safepickle.handlers import (
    ALLOWED_NAMES,
    HANDLERS,
    MAX_INDEX,
    TORCH_FUNCTIONS,
    TORCHBIND_CLASSES,
    checked_numel,
)
from statecli.safepickle.machine import RestrictedUnpickler
from statecli.safepickle.names import names_after

__all__ = [
    "ALLOWED_NAMES",
    "COMPUTED",
    "HANDLERS",
    "MAX_GLOBALS",
    "MAX_GLOBAL_NAME",
    "MAX_INDEX",
    "MAX_KEY_VALUES",
    "MAX_SAME_HASH",
    "TORCHBIND_CLASSES",
    "TORCH_FUNCTIONS",
    "Action",
    "Global",
    "Limits",
    "PickledDict",
    "RestrictedUnpickler",
    "StorageRef",
    "Stub",
    "TensorRef",
    "check_key",
    "checked_numel",
    "describe",
    "describe_name",
    "names_after",
]
