"""Run the ``dynaudit`` command line inside the test process, as a user's shell would run it.

A real ``python -m dynaudit`` costs two to three seconds of imports (torch, transformers) per
call; :func:`run_cli` calls :func:`dynaudit.cli.main` instead and returns what a
``subprocess.run(..., capture_output=True, text=True)`` would: the exit code and the decoded
stdout and stderr. For the duration of the call it gives the command what a fresh process
would see, and puts everything back afterwards:

- the variables in ``env`` set (a ``None`` value removes one) and ``cwd`` as the working
  directory;
- new stdin, stdout and stderr that are not terminals, with a byte ``buffer`` like a pipe's,
  stdout strict UTF-8 and stderr ``backslashreplace`` as Python sets them for pipes;
- library loggers that bound ``sys.stderr`` when they were imported (transformers,
  huggingface_hub) writing to the new stderr, and their once-only warnings re-armed;
- Python's default warning filters, shown on stderr (pytest would otherwise collect them);
- no secrets remembered from an earlier call's ``--hf-token`` or ``--mlflow-uri``;
- typer's colour choice, which it reads from ``GITHUB_ACTIONS``/``FORCE_COLOR``/``PY_COLORS``
  once at import, recomputed from the environment of the call.

Variables that libraries read only when they are imported cannot be honoured in a running
process: :func:`run_cli` refuses them, and such a test keeps a real subprocess.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from dynaudit.cli import main

__all__ = ["IMPORT_TIME_VARIABLES", "CliResult", "run_cli"]

IMPORT_TIME_VARIABLES = frozenset(
    {
        *("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN_PATH", "TRANSFORMERS_OFFLINE"),
        *("TERMINAL_WIDTH", "TYPER_USE_RICH", "_TYPER_FORCE_DISABLE_TERMINAL"),
    }
)
"""Read once when huggingface_hub, transformers or typer is imported: a subprocess's job."""

_COLOUR_VARIABLES = ("GITHUB_ACTIONS", "FORCE_COLOR", "PY_COLORS")


@dataclass(frozen=True)
class CliResult:
    """What the command left: named like :class:`subprocess.CompletedProcess`'s fields, so
    an assertion reads the same whichever way the command ran."""

    returncode: int
    stdout: str
    stderr: str


class _Pipe:
    """One standard stream as a pipe: bytes underneath, decoded like ``text=True`` would."""

    def __init__(self, errors: str, data: bytes = b"") -> None:
        self.raw = io.BytesIO(data)
        self.text = io.TextIOWrapper(self.raw, encoding="utf-8", errors=errors, write_through=True)

    def read(self) -> str:
        """Everything written, with universal newlines as ``subprocess.run(text=True)``."""
        self.text.flush()
        data = self.raw.getvalue()
        return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", newline=None).read()


def run_cli(
    *argv: str | os.PathLike[str],
    env: Mapping[str, str | None] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    input: str | None = None,
) -> CliResult:
    """``dynaudit *argv`` in this process; see the module docstring for what it isolates."""
    changes = dict(env or {})
    refused = sorted(IMPORT_TIME_VARIABLES.intersection(changes))
    if refused:
        raise ValueError(f"{', '.join(refused)} is read at import time: run a real subprocess")
    stdin = _Pipe("strict", (input or "").encode())
    stdout, stderr = _Pipe("strict"), _Pipe("backslashreplace")
    with contextlib.ExitStack() as stack:
        stack.enter_context(_environment(changes))
        if cwd is not None:
            stack.enter_context(contextlib.chdir(cwd))
        stack.enter_context(_library_loggers(stdout.text, stderr.text))
        stack.enter_context(_streams(stdin, stdout, stderr))
        stack.enter_context(_python_warnings())
        stack.enter_context(_typer_colours())
        stack.enter_context(_fresh_secrets())
        code = main([os.fspath(arg) for arg in argv])
    return CliResult(code, stdout.read(), stderr.read())


@contextlib.contextmanager
def _environment(changes: Mapping[str, str | None]) -> Iterator[None]:
    saved = dict(os.environ)
    try:
        for key, value in changes.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _streams(stdin: _Pipe, stdout: _Pipe, stderr: _Pipe) -> Iterator[None]:
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = stdin.text, stdout.text, stderr.text
    try:
        yield
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved


@contextlib.contextmanager
def _library_loggers(stdout: io.TextIOWrapper, stderr: io.TextIOWrapper) -> Iterator[None]:
    """Plain ``StreamHandler``s (pytest's own capture handlers are subclasses, left alone)
    write to the new stdout if they wrote to stdout, else to the new stderr; transformers'
    ``warning_once`` forgets what it already said. Afterwards each handler gets its stream
    back, and one a library created during the call is bound to the streams of before."""
    real = {stdout: sys.stdout, stderr: sys.stderr}
    saved = {handler: handler.stream for handler in _stream_handlers()}
    for handler, stream in saved.items():
        _point(handler, _same_kind(stream, stdout, stderr))
    once = getattr(logging.Logger, "warning_once", None)
    if once is not None and hasattr(once, "cache_clear"):
        once.cache_clear()
    try:
        yield
    finally:
        for handler in _stream_handlers():
            if handler in saved:
                _point(handler, saved[handler])
            elif handler.stream in real:
                _point(handler, real[handler.stream])


def _stream_handlers() -> list[logging.StreamHandler[Any]]:
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return [
        handler
        for logger in loggers
        if isinstance(logger, logging.Logger)
        for handler in logger.handlers
        if type(handler) is logging.StreamHandler
    ]


def _point(handler: logging.StreamHandler[Any], stream: Any) -> None:
    """``handler`` writes to ``stream`` from now on. Not ``setStream``: it flushes the old
    stream, which may be closed (a pytest ``capsys`` stream a library bound at import)."""
    with handler.lock or contextlib.nullcontext():
        handler.stream = stream


def _same_kind(
    stream: object, stdout: io.TextIOWrapper, stderr: io.TextIOWrapper
) -> io.TextIOWrapper:
    """``stdout`` for a stream that is the process's stdout, ``stderr`` for any other."""
    is_stdout = stream in (sys.stdout, sys.__stdout__) or getattr(stream, "name", "") == "<stdout>"
    return stdout if is_stdout else stderr


@contextlib.contextmanager
def _python_warnings() -> Iterator[None]:
    """The filters of a ``python`` started without ``-W``, printing to the current stderr."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: object = None,
        line: str | None = None,
    ) -> None:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        quiet = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
        for category in quiet:
            warnings.filterwarnings("ignore", category=category, append=True)
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def _fresh_secrets() -> Iterator[None]:
    """A new process knows only the secrets of its own flags (dynaudit.secrets remembers
    them for the life of the process)."""
    from dynaudit import secrets

    remembered = [secrets._given, secrets._given_uris]
    saved = [set(values) for values in remembered]
    for values in remembered:
        values.clear()
    try:
        yield
    finally:
        for values, before in zip(remembered, saved, strict=True):
            values.clear()
            values.update(before)


@contextlib.contextmanager
def _typer_colours() -> Iterator[None]:
    """typer's ``FORCE_TERMINAL`` as its import would have set it in this environment."""
    from typer import rich_utils

    saved = rich_utils.FORCE_TERMINAL
    forced = any(os.environ.get(name) for name in _COLOUR_VARIABLES)
    rich_utils.FORCE_TERMINAL = True if forced else None
    try:
        yield
    finally:
        rich_utils.FORCE_TERMINAL = saved
