"""The one place where exceptions become a one-line message and an exit code."""

from __future__ import annotations

import os
import sys
import traceback

import click

from dynaudit.errors import (
    CheckpointNotFound,
    CorruptCheckpoint,
    DynauditError,
    EmptyCheckpoint,
    NonFiniteWeights,
    PickleRefused,
    PluginError,
    RemoteNotFound,
    UnknownFamily,
    UsageError,
)

__all__ = ["EXIT_CODES", "report_error"]

EXIT_CODES = {
    0: "ok: measured, or the gate passed",
    1: "gate failed: capacity loss, damage, or non-finite (NaN/Inf) weights",
    2: "usage error: invalid flags or settings",
    3: "input error: checkpoint missing, unreadable or corrupt; unreachable server",
    4: "internal error: a bug in dynaudit (re-run with DYNAUDIT_DEBUG=1 and report it)",
    130: "interrupted: nothing half-written is left behind",
}

# Ordered: the first matching type gives the next thing for the user to try.
_NEXT_STEP: list[tuple[type[BaseException], str]] = [
    (UnknownFamily, "`dynaudit plugins` lists the installed families"),
    (UsageError, "see `dynaudit COMMAND --help`"),
    (RemoteNotFound, ""),  # remote sources say what to do in their own message
    (CheckpointNotFound, "check the path"),
    (EmptyCheckpoint, "point at a .safetensors file or a directory that holds one"),
    (PickleRefused, ""),
    (CorruptCheckpoint, "re-download or re-save the checkpoint"),
    (PluginError, "reinstall or uninstall that plugin; `dynaudit plugins` lists them"),
    (NonFiniteWeights, "the checkpoint is damaged; the report lists every layer"),
]


def _debug() -> bool:
    return os.environ.get("DYNAUDIT_DEBUG", "") not in ("", "0", "false")


def report_error(exc: BaseException) -> int:
    """Print one line for ``exc`` on stderr and return its exit code."""
    if isinstance(exc, KeyboardInterrupt | click.exceptions.Abort):
        click.echo("dynaudit: interrupted", err=True)
        return 130
    if isinstance(exc, click.ClickException):
        exc.show()
        return 2
    if _debug():
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, DynauditError):
        hint = next((h for t, h in _NEXT_STEP if isinstance(exc, t)), "")
        click.echo(f"dynaudit: error: {exc.message}" + (f" ({hint})" if hint else ""), err=True)
        return exc.exit_code
    if isinstance(exc, MemoryError):
        click.echo(
            "dynaudit: error: out of memory (lower --q-dim or the tile size, or use a GPU)",
            err=True,
        )
        return 3
    click.echo(
        f"dynaudit: internal error: {type(exc).__name__}: {exc} "
        "(re-run with DYNAUDIT_DEBUG=1 for the traceback, and report it)",
        err=True,
    )
    return 4
