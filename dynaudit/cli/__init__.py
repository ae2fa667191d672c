"""Command line: ``dynaudit measure | inspect | plugins | demo``."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence

from dynaudit.errors import ExitCode

__all__ = ["main"]


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the same clean-up and exit 130 as Ctrl-C


class _WarningLines(logging.Handler):
    """dynaudit's logged warnings (an unwritable cache, a plugin failing in ``detect()``) as
    one ``dynaudit: warning:`` line each on stderr, escaped like every message (a crafted
    name quoted by an exception can neither start a line nor drive the terminal) and with
    the user's secrets scrubbed (a server may quote them back)."""

    def emit(self, record: logging.LogRecord) -> None:
        from dynaudit.errors import printable
        from dynaudit.secrets import scrub

        try:
            text = scrub(printable(record.getMessage()))
            sys.stderr.write(f"dynaudit: {record.levelname.lower()}: {text}\n")
            sys.stderr.flush()
        except Exception:  # a warning must never become the run's failure
            self.handleError(record)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the process exit code (see ``--help``). SIGTERM
    (a cancelled CI job, ``docker stop``, ``timeout``, torchrun stopping the other ranks) is
    an interruption like Ctrl-C: nothing half-written is left behind."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminated)
    logger = logging.getLogger("dynaudit")
    level = logger.level  # -v/-vv lower it for this run only
    logger.setLevel(logging.WARNING)
    warnings = _WarningLines()
    logger.addHandler(warnings)
    try:
        return _main(argv)
    finally:
        logger.removeHandler(warnings)
        logger.setLevel(level)
        from dynaudit.cli._errors import show_tracebacks

        show_tracebacks(False)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    from dynaudit.cli._errors import EXITS, report_error

    try:
        from dynaudit.cli.app import app

        result = app(
            args=list(argv) if argv is not None else None,
            prog_name="dynaudit",
            standalone_mode=False,
        )
    except SystemExit as exc:  # --help and friends
        return exc.code if isinstance(exc.code, int) else ExitCode.OK
    except BaseException as exc:
        if isinstance(exc, EXITS):
            return int(getattr(exc, "exit_code", ExitCode.OK))
        return report_error(exc)
    if result == ExitCode.INTERRUPTED:  # Typer's silent Ctrl-C: no command returns 130
        return report_error(KeyboardInterrupt())
    return result if isinstance(result, int) else ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
