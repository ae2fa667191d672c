"""Atomic file output: a reader never sees half a report, and a failure leaves no debris.

Every file dynaudit writes for the user (reports, plots, the demo checkpoint) goes through
:func:`write_bytes_atomic` (SPEC §8): written to a temporary file in the same directory and
renamed over the target, with the mode the umask gives a new file (an existing file keeps its
own); a directory, device, socket or anything else that is not a regular file is never
replaced; a FIFO or the null device is written into; ``-`` (or a path naming stdout, such as
``/dev/stdout``) is standard output. A failed write is one
:class:`~dynaudit.errors.OutputError` (exit 3), a path that cannot be a file one
:class:`~dynaudit.errors.OutputRefused` (exit 2).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import tempfile
from pathlib import Path

from dynaudit.errors import NoReader, OutputError, OutputRefused
from dynaudit.outputs import is_stdout, is_stream, output_file
from dynaudit.schema import Report

__all__ = ["current_umask", "write_bytes_atomic", "write_json", "write_text_atomic"]

# A path the user gave that cannot be a file: their error (exit 2), not the environment's.
_NOT_A_FILE = (errno.EISDIR, errno.ENOTDIR, errno.EEXIST)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _failed(path: Path, exc: OSError) -> OutputError | OutputRefused:
    reason = exc.strerror or str(exc)
    if exc.errno in _NOT_A_FILE:
        return OutputRefused(f"{path}: cannot be written as a file ({reason})", path=str(path))
    return OutputError(f"{path}: cannot write ({reason})", path=str(path))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (``-``: standard output); returns the path."""
    if is_stdout(path):
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return Path(os.fspath(path))
    given = Path(path).expanduser()
    target = output_file(given)  # a symlink to a regular file: that file is replaced
    if is_stream(target):
        _write_stream(target, data)
        return given
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputRefused(
            f"{given}: a parent of it is not a directory", path=str(given)
        ) from None
    except OSError as exc:
        raise _failed(given, exc) from exc
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)  # an existing file keeps its mode
    except OSError:
        mode = 0o666 & ~current_umask()
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)  # mkstemp creates 0600
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise _failed(given, exc) from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return given


def _write_stream(path: Path, data: bytes) -> None:
    """Into a FIFO or the null device, where it is: nothing is replaced, and an atomic
    rename has no meaning for a stream. A FIFO nobody reads is an error, not a hang (opening
    it without O_NONBLOCK would wait for a reader forever)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise NoReader(
                f"{path}: no process is reading this FIFO; start the reader first", path=str(path)
            ) from exc
        raise _failed(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            os.set_blocking(fd, True)  # a reader slower than us must not fail the write
            fh.write(data)
    except OSError as exc:
        raise _failed(path, exc) from exc


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (``-``: standard output)."""
    if is_stdout(path):
        sys.stdout.write(text)
        sys.stdout.flush()
        return Path(os.fspath(path))
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json(report: Report, path: str | os.PathLike[str]) -> Path:
    return write_text_atomic(path, report.model_dump_json(indent=2) + "\n")
