"""The reliability suite's cases (bench/reliability, docs/reliability.md) as tests: false
alarms, damage detection, bad inputs, secrets and round two (issue 18), each through the real
command line (in this process, through tests/cli.py, unless a case needs a real one)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.reliability import CASES
from bench.reliability.core import Case, Run, Workspace, launched_by
from tests.cli import IMPORT_TIME_VARIABLES, run_cli


def _in_process(argv: list[str], env: dict[str, str | None], cwd: Path | None) -> Run | None:
    """``python -m dynaudit ARGS`` as tests/cli.py runs it; None (a child process) when the
    case sets a variable that is read at import time."""
    if IMPORT_TIME_VARIABLES.intersection(env):
        return None
    result = run_cli(*argv[3:], env=env, cwd=cwd)
    return Run(argv, int(result.returncode), result.stdout, result.stderr)


@pytest.fixture(autouse=True)
def _launch_in_process() -> Iterator[None]:
    with launched_by(_in_process):
        yield


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """Base models and baselines shared by every case (each is built once, when first used),
    at the quick fit settings."""
    return Workspace(Path(tmp_path_factory.mktemp("reliability")), quick=True)


def _param(case: Case) -> object:
    # A known miss is expected to fail, strictly: the day it passes, the test says so.
    known = case.known(quick=True)
    marks = [pytest.mark.xfail(strict=True, reason=known)] if known else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.slow
@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_case(case: Case, workspace: Workspace) -> None:
    outcome = case.run(workspace)
    assert outcome.ok, f"expected {outcome.expected}, got {outcome.actual}: {outcome.detail}"


def test_every_table_meets_the_issue_minimums() -> None:
    count = {table: sum(case.table == table for case in CASES) for table in ("alarms", "damage")}
    assert count["alarms"] >= 20 and count["damage"] >= 12
    assert len({case.family for case in CASES if case.table == "damage"}) == 3
    assert len({case.id for case in CASES}) == len(CASES)


def test_round_two_covers_every_failure_of_issue_18() -> None:
    """One group per item of the issue's list (1 false pass … 9 cost), each with its cases."""
    groups = {case.family for case in CASES if case.table == "round2"}
    assert sorted(groups) == [
        "1 false pass", "2 data loss", "3 hang", "4 baseline", "5 CI output", "6 exit code",
        "7 message", "8 secrets", "9 cost",
    ]  # fmt: skip
    assert sum(case.table == "round2" for case in CASES) >= 50
