"""tests/cli.py's in-process runner answers as a real ``python -m dynaudit`` would (the
converted tests rely on it), and leaves the test process as it found it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli import IMPORT_TIME_VARIABLES, run_cli


def real(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dynaudit", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--help"], {"GITHUB_ACTIONS": "true"}),  # typer colours its help in GitHub Actions
        (["measure", "{tmp}/nope"], {"DYNAUDIT_DEBUG": ""}),
        (["measure", "{tmp}", "--q-dim", "10"], {"DYNAUDIT_PIECES": "3"}),
        (["check"], {}),
    ],
)
def test_same_exit_code_and_output_as_a_real_process(
    args: list[str], env: dict[str, str], tmp_path: Path
) -> None:
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    expected, got = real(*argv, env=env), run_cli(*argv, env=env)
    assert (got.returncode, got.stdout, got.stderr) == (
        expected.returncode,
        expected.stdout,
        expected.stderr,
    )


def test_the_process_is_left_as_it_was(tmp_path: Path) -> None:
    """Environment, working directory, streams, SIGTERM handler and typer's colour switch."""
    from typer import rich_utils

    before = (dict(os.environ), os.getcwd(), sys.stdout, sys.stderr, sys.stdin)
    handler, colour = signal.getsignal(signal.SIGTERM), rich_utils.FORCE_TERMINAL
    (tmp_path / "empty").mkdir()
    changes = {"DYNAUDIT_STEPS": "5", "CI": None, "FORCE_COLOR": "1"}
    result = run_cli("measure", "empty", env=changes, cwd=tmp_path)
    assert result.returncode == 3 and "no .safetensors" in result.stderr  # found in cwd
    assert (dict(os.environ), os.getcwd(), sys.stdout, sys.stderr, sys.stdin) == before
    assert signal.getsignal(signal.SIGTERM) is handler
    assert rich_utils.FORCE_TERMINAL is colour


def test_warnings_and_library_log_lines_reach_the_captured_stderr() -> None:
    """A fresh process prints a library's warnings and log lines on its stderr; pytest would
    collect the first and a handler bound at import would print the second elsewhere."""
    import logging
    import warnings

    library = logging.getLogger("tests.cli-runner-library")
    library.addHandler(logging.StreamHandler(sys.stderr))
    library.propagate = False

    def noisy(argv: list[str]) -> int:
        warnings.warn("a library's FutureWarning", FutureWarning, stacklevel=1)
        library.warning("a library's log line")
        return 0

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("tests.cli.main", noisy)
        result = run_cli("anything")
    assert "FutureWarning: a library's FutureWarning" in result.stderr
    assert "a library's log line" in result.stderr


def test_variables_read_at_import_are_refused() -> None:
    for name in sorted(IMPORT_TIME_VARIABLES):
        with pytest.raises(ValueError, match=name):
            run_cli("--help", env={name: "1"})


def test_handlers_on_closed_streams_and_handlers_made_during_a_call() -> None:
    """Regression: a handler a library bound to a pytest ``capsys`` stream, closed since,
    made the runner fail ("I/O operation on closed file"); and a handler created during a call
    kept writing to that call's pipe afterwards."""
    import io
    import logging

    closed = io.StringIO()
    closed.close()
    stale_logger = logging.getLogger("tests.cli-runner-stale")
    stale = logging.StreamHandler(closed)
    made_logger = logging.getLogger("tests.cli-runner-made")
    made_logger.propagate = False
    stale_logger.addHandler(stale)

    def library(argv: list[str]) -> int:
        made_logger.addHandler(logging.StreamHandler(sys.stderr))
        made_logger.warning("said during the call")
        return 0

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("tests.cli.main", library)
            result = run_cli("anything")
        assert result.returncode == 0 and "said during the call" in result.stderr
        assert stale.stream is closed
        (made,) = made_logger.handlers
        assert isinstance(made, logging.StreamHandler) and made.stream is sys.stderr
    finally:
        stale_logger.removeHandler(stale)
        for handler in list(made_logger.handlers):
            made_logger.removeHandler(handler)
