"""Typed errors. Each kind carries the exit code DESIGN.md §6 promises, so the CLI maps them once."""

from __future__ import annotations


class StatecliError(Exception):
    """Base of every error statecli raises on purpose. ``exit_code`` is the process exit status."""

    exit_code: int = 3

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.message = message
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)

    def at(self, path: str) -> StatecliError:
        """This error, naming ``path`` unless it names a file already (readers below the format know none)."""
        if self.path is None:
            self.path = path
            self.args = (f"{path}: {self.message}",)
        return self


class CheckFailedError(StatecliError):
    """A check found a problem: a conversion would overflow, a diff beyond tolerance (exit 1)."""

    exit_code = 1


class UsageError(StatecliError):
    """The command line or arguments were wrong (exit 2)."""

    exit_code = 2


class InputError(StatecliError):
    """The input is missing, unreadable, corrupt or of an unsupported format (exit 3)."""

    exit_code = 3


class UnsupportedFormatError(InputError):
    """A recognised format that this version does not read yet (exit 3)."""


class LimitExceededError(InputError):
    """The file asks for more than statecli's safety limits allow (exit 3)."""


class OutputError(StatecliError):
    """The output could not be written (exit 4)."""

    exit_code = 4


class UnsafeError(StatecliError):
    """Refused because doing it would be unsafe (exit 5)."""

    exit_code = 5


class DangerousPickleWarning(UserWarning):
    """:func:`statecli.load` read weights from a file whose pickle names code that ``torch.load`` would
    run. statecli never runs it; the warning says what it is, as the CLI's stderr does, so a caller can
    turn it into an error (``warnings.simplefilter("error", DangerousPickleWarning)``)."""
