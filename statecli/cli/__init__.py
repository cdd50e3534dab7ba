"""The command line: a Typer app (:mod:`statecli.cli.main`) and one thin module per command.

Commands parse arguments, call the core (:func:`statecli.open_checkpoint`, :mod:`statecli.tree`) and hand
the result to the output layer (:mod:`statecli.output.emit`). Nothing here
imports torch; rich is imported only when something is drawn.
"""
