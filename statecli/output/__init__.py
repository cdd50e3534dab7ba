"""Presentation: every result's columns declared once (:mod:`~statecli.output.columns`), and the table
(:mod:`~statecli.output.table`, rich), the plain-text formats (:mod:`~statecli.output.formats`) and the
stdout/stderr sink (:mod:`~statecli.output.console`) derived from them; :mod:`~statecli.output.emit`
takes a command's result and writes it.

Below ``statecli.cli``, above the operations: nothing here imports ``statecli.cli`` or ``statecli.api``,
and nothing outside ``cli`` and ``output`` imports this package or rich. Empty on purpose, so importing a
submodule imports nothing else.
"""
