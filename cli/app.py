"""The ``actsparse`` command: one typer app, its commands registered from ``actsparse.cli.commands``, and the one
place where errors become a line on stderr and an exit status."""

from __future__ import annotations

import importlib
import os
import pkgutil
import signal
import sys

import typer

from actsparse.cli.output import error_line
from actsparse.core.errors import ActsparseError, Interrupted

app = typer.Typer(
    help="Activation dataset pipeline and offline analyzer for FFN activation sparsity.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)


def _register_commands() -> None:
    import actsparse.cli.commands as pkg

    for mod in sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)):
        importlib.import_module(f"actsparse.cli.commands.{mod}").register(app)


_register_commands()


def main() -> None:
    """Console entry point: run the app; every failure is one ``error:`` line and a non-zero exit.

    Exit statuses: 0 success, 1 a check that found problems (``verify``) or a batch with failed jobs,
    2 bad input or a refused operation, 130 interrupted (Ctrl-C, or SIGTERM/SIGHUP, which are turned into the
    same, so that every ``with`` block cleans up what it started: locks, temporary files, spill directories).
    """
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except Interrupted as e:
        error_line(str(e))
        _exit_now(130)
    except ActsparseError as e:
        error_line(str(e))
        _exit_now(2)
    except OSError as e:
        from actsparse.core.files import disk_error

        error_line(str(disk_error(e, "running the command")))
        _exit_now(2)
    except KeyboardInterrupt:
        error_line("interrupted; rerun the same command to resume")
        _exit_now(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except _click_exceptions() as e:  # usage errors (unknown option, missing argument, bad number)
        ctx = getattr(e, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        error_line(f"{e.format_message()}{hint}")
        _exit_now(e.exit_code)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _exit_now(code: int) -> None:
    """Exit after an error without the interpreter's teardown: the work that failed may leave reads in
    flight (zarr's pending asyncio tasks print "Task was destroyed but it is pending!" when collected)
    or library threads mid-call (aborts with "terminate called without an active exception"), which
    would turn the one-line error into several lines or exit 134. Every ``with`` block has already
    closed what it opened while the error propagated."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _click_exceptions() -> tuple[type, ...]:
    """``ClickException`` of the click that typer runs on: recent typer releases (0.29) carry their own copy
    (``typer._click``), unrelated to an installed ``click``; both are caught."""
    found = [c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"]
    try:
        import click

        found.append(click.ClickException)
    except ImportError:
        pass
    return tuple(found)
