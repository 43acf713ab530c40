"""The ``actsparse`` command line: a thin typer layer over the Python API (``app``), one output module
(``output``) and one command module per group of commands (``commands``)."""

from actsparse.cli.app import app, main

__all__ = ["app", "main"]
