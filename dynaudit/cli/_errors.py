"""The one place where exceptions become a one-line message and an exit code: dynaudit's own
errors from their class's ``exit_code`` and ``hint`` (dynaudit/errors.py), the rest here."""

from __future__ import annotations

import errno
import os
import sys
import traceback

import click
import typer

from dynaudit.errors import DynauditError, ExitCode, printable

__all__ = ["ABORTS", "EXITS", "report_error"]

# Typer ≥ 0.22 parses the command line with its own copy of click, whose exceptions are not
# click's: both kinds must map to the same exit codes.
_PARSE_ERRORS: tuple[type[Exception], ...] = (click.ClickException,) + (
    (typer.TyperException,) if hasattr(typer, "TyperException") else ()
)
ABORTS: tuple[type[BaseException], ...] = (KeyboardInterrupt, click.exceptions.Abort, typer.Abort)
EXITS: tuple[type[BaseException], ...] = (click.exceptions.Exit, typer.Exit)

# OSErrors that say what the environment lacks (space, permissions, a writable filesystem), not
# that dynaudit has a bug: an input error (exit 3) wherever they surface.
_ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENOSPC",
        "EDQUOT",
        "EROFS",
        "EACCES",
        "EPERM",
        "EIO",
        "EFBIG",
        "EMFILE",
        "ENFILE",
        "ENAMETOOLONG",
    )
    if hasattr(errno, name)
)


_tracebacks = False  # -vv: this run shows the traceback of an internal error


def show_tracebacks(on: bool) -> None:
    global _tracebacks
    _tracebacks = on


def _debug() -> bool:
    return _tracebacks or os.environ.get("DYNAUDIT_DEBUG", "") not in ("", "0", "false")


def report_error(exc: BaseException) -> ExitCode:
    """Print one line for ``exc`` on stderr and return its exit code; the secrets the user
    set are scrubbed from it, and from a DYNAUDIT_DEBUG traceback (dynaudit.secrets)."""
    from dynaudit.secrets import scrubbed_output

    with scrubbed_output():
        return _report_error(exc)


def _report_error(exc: BaseException) -> ExitCode:
    if isinstance(exc, ABORTS):
        click.echo("dynaudit: interrupted", err=True)
        return ExitCode.INTERRUPTED
    if type(exc).__name__ == "NoArgsIsHelpError":  # bare `dynaudit` or a bare group
        click.echo(exc.ctx.get_help())  # type: ignore[attr-defined]
        return ExitCode.USAGE
    if isinstance(exc, _PARSE_ERRORS):
        click.echo(f"dynaudit: error: {_parse_message(exc)}", err=True)
        return ExitCode.USAGE
    if _debug():
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, DynauditError):
        hint = f" ({exc.hint})" if exc.hint else ""  # the class's next step, if any
        click.echo(f"dynaudit: error: {exc.message}{hint}", err=True)
        return exc.exit_code
    if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:
        where = f"{exc.filename}: " if exc.filename else ""
        reason = exc.strerror or str(exc)
        click.echo(f"dynaudit: error: {printable(f'{where}{reason}')}", err=True)
        return ExitCode.INPUT
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch's CUDA
        click.echo(
            "dynaudit: error: out of memory (lower --q-dim or the tile size, or use a GPU)",
            err=True,
        )
        return ExitCode.INPUT
    click.echo(
        f"dynaudit: internal error: {type(exc).__name__}: {printable(str(exc))} "
        "(re-run with DYNAUDIT_DEBUG=1 for the traceback, and report it)",
        err=True,
    )
    return ExitCode.INTERNAL


def _parse_message(exc: Exception) -> str:
    """One line for a command-line parsing error, naming the command's --help."""
    format_message = getattr(exc, "format_message", None)
    message = format_message() if callable(format_message) else str(exc)
    message = " ".join(message.split())
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", "") or "dynaudit COMMAND"
    return f"{message} (see `{command} --help`)"
