"""Writing so that no reader ever sees half a file or half a directory: the one place for
atomic file writes and staged directories, for the user's outputs (reports, plots, the demo
checkpoint; docs/reliability.md) and for dynaudit's own (the cache, converted pickles, MLflow
downloads, baselines).

- A **file** is written to a temporary name beside its target (same directory, so the same
  filesystem), flushed to disk and renamed over the target (:func:`replace_file`). An
  existing file keeps its mode, a new one gets the mode the umask gives; anything there that
  is not a regular file (a directory, a FIFO, a device, a symlink) is never replaced.
  :func:`write_bytes_atomic` adds what a *user's* output path may be: standard output, a FIFO
  or the null device, each written into, and one error line for each way it can fail.
- A **directory** is built under a staging name beside its final place (:func:`stage_dir`)
  and renamed into place when complete (:func:`publish_dir`), which refuses a target that
  exists: a directory that exists is whole. :func:`discard_staging` removes one that failed.

Every temporary name is ``.<name>.tmp-<32 hex digits>`` (``.trash-<hex>`` for a directory being
deleted), and only such names are swept by :func:`sweep_stale` once a killed process left them
more than a day old.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from dynaudit.errors import NoReader, OutputError, OutputRefused
from dynaudit.outputs import is_stdout, is_stream, output_file

__all__ = [
    "STALE_SECONDS",
    "discard_dir",
    "discard_staging",
    "publish_dir",
    "replace_file",
    "stage_dir",
    "staged_dir",
    "sweep_stale",
    "write_bytes_atomic",
    "write_new",
    "write_text_atomic",
]

# dynaudit's own temporary names, and only those: ``.<name>.tmp-<uuid>`` (and the older
# ``.tmp-<uuid>``) and ``.trash-<uuid>`` (an entry being deleted).
_TEMPORARY = re.compile(r"\.(?:.+\.)?tmp-[0-9a-f]{32}|\.trash-[0-9a-f]{32}", re.DOTALL)
STALE_SECONDS = 24 * 3600
# A path the user gave that cannot be a file: their error (exit 2), not the environment's.
_NOT_A_FILE = (errno.EISDIR, errno.ENOTDIR, errno.EEXIST)


def _temporary_name(target: Path) -> Path:
    """A fresh temporary name beside ``target``, of the form :func:`sweep_stale` recognises."""
    return target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")


# -- files ------------------------------------------------------------------------------


def write_new(path: Path, data: bytes, mode: int | None = None) -> None:
    """Create ``path``, which must not exist, holding ``data`` flushed to disk: a file inside a
    staging directory, or the temporary file of :func:`replace_file`. ``mode``: what the file
    gets (None: what the umask gives a new file)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o666 if mode is None else 0o600)
    with os.fdopen(fd, "wb") as fh:
        if mode is not None:
            os.fchmod(fh.fileno(), mode)
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def replace_file(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically: a temporary file beside it, flushed to disk,
    renamed over it. An existing regular file keeps its mode; anything else at ``target`` (a
    directory, FIFO, device, socket, symlink) is refused with :class:`FileExistsError`, never
    replaced. Raises :class:`OSError` and leaves nothing behind on failure."""
    mode: int | None = None  # a new file: what the umask gives
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(info.st_mode):
            raise FileExistsError(errno.EEXIST, "not a regular file; never replaced", str(target))
        mode = stat.S_IMODE(info.st_mode)
    temporary = _temporary_name(target)
    try:
        write_new(temporary, data, mode)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to the user's output ``path``: ``-`` or a path naming standard
    output writes there; a FIFO or the null device is written into where it is; anything else
    is replaced atomically (:func:`replace_file`; a symlink to a regular file replaces that
    file). Returns the path as given. A failure is one :class:`~dynaudit.errors.OutputError`
    (exit 3), a path that cannot be a file one :class:`~dynaudit.errors.OutputRefused` (exit 2)."""
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
        replace_file(target, data)
    except OSError as exc:
        raise _failed(given, exc) from exc
    return given


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to the user's output ``path`` (:func:`write_bytes_atomic`)."""
    if is_stdout(path):
        sys.stdout.write(text)
        sys.stdout.flush()
        return Path(os.fspath(path))
    return write_bytes_atomic(path, text.encode("utf-8"))


def _failed(path: Path, exc: OSError) -> OutputError | OutputRefused:
    reason = exc.strerror or str(exc)
    if exc.errno in _NOT_A_FILE:
        return OutputRefused(f"{path}: cannot be written as a file ({reason})", path=str(path))
    return OutputError(f"{path}: cannot write ({reason})", path=str(path))


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


# -- directories ------------------------------------------------------------------------


def stage_dir(final: Path) -> Path:
    """A fresh, empty staging directory beside ``final`` (same filesystem, so publishing is
    one rename), created with its parents; what killed processes left there is swept first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final.parent)
    staging = _temporary_name(final)
    staging.mkdir()
    return staging


def publish_dir(staging: Path, final: Path) -> bool:
    """Rename the complete ``staging`` directory to ``final``; False, with ``staging`` removed,
    when ``final`` is a directory already (published by another process first: a directory
    that exists is never replaced). Either way ``final`` is whole afterwards. Anything else at
    ``final`` (a file, a dangling link) and other failures raise OSError."""
    if os.path.lexists(final):
        discard_staging(staging)
        if final.is_dir():
            return False
        raise FileExistsError(errno.EEXIST, "exists and is not a directory", str(final))
    try:
        staging.rename(final)
    except OSError:
        discard_staging(staging)
        if final.is_dir():
            return False
        raise
    return True


def discard_staging(staging: Path) -> None:
    """Remove a staging directory that will not be published (nothing there: no error)."""
    shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """A staging directory for ``final`` (:func:`stage_dir`), removed on leaving unless it was
    published meanwhile (:func:`publish_dir`)."""
    staging = stage_dir(final)
    try:
        yield staging
    finally:
        discard_staging(staging)


def discard_dir(entry: Path) -> None:
    """Remove a published directory (a damaged cache entry): renamed aside first, one atomic
    step, so no reader sees it half deleted; then deleted. Best effort."""
    trash = entry.with_name(f".trash-{uuid.uuid4().hex}")
    try:
        entry.rename(trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def sweep_stale(parent: Path, now: float | None = None) -> None:
    """Remove what killed dynaudit processes left in ``parent``: entries with dynaudit's own
    temporary names (never anything else; no symlink, FIFO or other special file either) not
    changed for more than a day. A live staging directory is younger: its newest change is
    taken over it and its direct children (a baseline's coords/ gains a file per layer).
    Best effort: whatever cannot be listed or removed stays."""
    limit = (time.time() if now is None else now) - STALE_SECONDS
    try:
        entries = [entry for entry in os.scandir(parent) if _TEMPORARY.fullmatch(entry.name)]
    except OSError:
        return
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                if _newest_change(entry.path, info.st_mtime) < limit:
                    shutil.rmtree(entry.path, ignore_errors=True)
            elif stat.S_ISREG(info.st_mode) and info.st_mtime < limit:
                os.unlink(entry.path)
        except OSError:
            continue


def _newest_change(folder: str, mtime: float) -> float:
    with os.scandir(folder) as children:
        return max([mtime, *(c.stat(follow_symlinks=False).st_mtime for c in children)])
