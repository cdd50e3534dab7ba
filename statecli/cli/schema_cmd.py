"""``statecli schema PATH``: names, shapes, dtypes and roles as stable JSON, to commit beside a model."""

from __future__ import annotations

from statecli.api import open_checkpoint
from statecli.cli.options import PathArg
from statecli.output import console


def schema_command(path: PathArg) -> None:
    """Print the checkpoint's schema: each model tensor's dtype, shape and role, sorted by name, no values.

    Commit it next to the model; `statecli check NEW --schema FILE` then reports every difference
    (missing, unexpected, shape, dtype, role). Metadata only: no values read, no torch import.

    Examples:

        statecli schema model.pt > model.schema.json
        statecli check new.pt --schema model.schema.json
    """
    from statecli.schema import dumps, make_schema  # loaded by schema alone

    report = open_checkpoint(path)
    console.warn_dangerous(report)
    console.write(dumps(make_schema(report)))
