"""What every reliability case shares: running the real CLI, the outcome row, the workspace.

A case is a function ``(Workspace) -> Outcome``. The workspace builds each base model and its
baseline once, lazily, so that the command line and the tests run the same cases at the same
cost whether they run one case or all of them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Case",
    "Outcome",
    "Run",
    "Workspace",
    "delegated",
    "dynaudit",
    "launched_by",
    "timed",
]

# Every case runs on one thread, at dynaudit's default fit settings (K = 3 baselines, as a user
# gets them) or, in quick mode (the tests), at the small settings the gate tests use, which the
# gate calibration found to follow real damage too (docs/gate.md).
FIT = ["--threads", "1"]
QUICK_FIT = ["--q-dim", "32", "--pieces", "4", "--steps", "150"]


@dataclass(frozen=True)
class Run:
    """One finished ``dynaudit`` process."""

    argv: list[str]
    code: int
    stdout: str
    stderr: str

    @property
    def message(self) -> str:
        """The last non-empty line of stderr (where dynaudit writes its one-line errors)."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr + self.stdout


Launcher = Callable[[list[str], dict[str, str | None], Path | None], "Run | None"]
"""Runs ``dynaudit ARGS`` (the arguments, the environment changes, the working directory)
some other way than a child process, or returns None to leave it to one."""

_launcher: Launcher | None = None


@contextmanager
def launched_by(launcher: Launcher) -> Iterator[None]:
    """For the duration, :func:`dynaudit` asks ``launcher`` first: the tests run the cases'
    commands in their own process (tests/cli.py), which saves a torch import per command;
    ``python -m bench.reliability`` keeps real child processes."""
    global _launcher
    previous, _launcher = _launcher, launcher
    try:
        yield
    finally:
        _launcher = previous


def delegated(argv: list[str], changes: dict[str, str | None], cwd: Path | None) -> Run | None:
    """What :func:`launched_by`'s launcher made of the command; None without a launcher or
    when it leaves the command to a child process."""
    return _launcher(argv, changes, cwd) if _launcher is not None else None


def dynaudit(
    *args: str | Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 900,
) -> Run:
    """``python -m dynaudit ARGS`` as a child process, quiet (CI=true), one torch thread, no
    debug tracebacks and no GitHub Actions output (or through :func:`launched_by`'s launcher)."""
    argv = [sys.executable, "-m", "dynaudit", *map(str, args)]
    changes: dict[str, str | None] = {"CI": "true", "OMP_NUM_THREADS": "1", **(env or {})}
    changes |= {"DYNAUDIT_DEBUG": None, "GITHUB_ACTIONS": None}
    if (run := delegated(argv, changes, cwd)) is not None:
        return run
    child = {**os.environ, **changes}
    proc = subprocess.run(
        argv,
        env={k: v for k, v in child.items() if v is not None},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Run(argv, proc.returncode, proc.stdout, proc.stderr)


@dataclass(frozen=True)
class Outcome:
    """A row of one of the suite's tables."""

    table: str  # "alarms", "damage", "inputs" or "secrets"
    case: str
    family: str
    expected: str
    actual: str
    ok: bool
    detail: str = ""
    seconds: float = 0.0
    known_miss: str = ""
    seeds: dict[str, Any] | None = None  # sequential vs all seeds (Workspace.compare_seeds)

    def as_dict(self) -> dict[str, Any]:
        return {
            "table": self.table, "case": self.case, "family": self.family,
            "expected": self.expected, "actual": self.actual, "ok": self.ok,
            "detail": self.detail, "seconds": round(self.seconds, 2),
            "known_miss": self.known_miss,
            **({"seeds": self.seeds} if self.seeds is not None else {}),
        }  # fmt: skip


@dataclass(frozen=True)
class Case:
    """A named check of one table; ``run`` builds what it needs in the workspace."""

    table: str
    name: str
    family: str
    run: Callable[[Workspace], Outcome]
    known_miss: str = ""  # why dynaudit does not (yet) give the expected answer, if it does not
    known_in: tuple[str, ...] = ()  # at which settings: "default", "quick"

    def known(self, quick: bool) -> str:
        """The known-miss reason at these settings ("" when the case is expected to hold)."""
        return self.known_miss if ("quick" if quick else "default") in self.known_in else ""

    @property
    def id(self) -> str:
        return f"{self.table}/{self.family}/{self.name}".replace(" ", "-")


@contextmanager
def timed() -> Iterator[Callable[[], float]]:
    started = time.perf_counter()
    yield lambda: time.perf_counter() - started


@dataclass
class Workspace:
    """A scratch directory with lazily built base models and baselines. With
    ``compare_seeds``, every :meth:`check` runs twice: as ``check`` runs by default
    (sequential seeds) and with ``--all-seeds``."""

    root: Path
    quick: bool = False
    compare_seeds: bool = False
    _made: dict[str, Path] = field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        out = self.root.joinpath(*parts)
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def once(self, key: str, make: Callable[[Path], Path]) -> Path:
        """``make(dir)`` the first time ``key`` is asked for; its result afterwards. Built under
        a temporary name and renamed, so a kept ``--workdir`` only ever holds complete ones
        and a second run reuses them."""
        if key not in self._made:
            target = self.path("made", key.replace("/", "-").replace(" ", "-").replace("%", ""))
            if not target.exists():
                partial = target.with_name(target.name + ".partial")
                shutil.rmtree(partial, ignore_errors=True)
                make(partial).rename(target)
            self._made[key] = target
        return self._made[key]

    def base(self, family: str) -> Path:
        from bench.reliability.models import BUILDERS

        return self.once(f"base/{family}", BUILDERS[family])

    def baseline(self, family: str, seed: int = 0) -> Path:
        """``dynaudit baseline`` of the family's base model (K = 3) with fit seed ``seed``."""

        def make(out: Path) -> Path:
            fit = [*FIT, *(QUICK_FIT if self.quick else [])]
            run = dynaudit("baseline", self.base(family), "--out", out, "--seed", str(seed), *fit)
            if run.code != 0:
                raise RuntimeError(f"baseline of the {family} base failed: {run.stderr[-2000:]}")
            return out

        return self.once(f"baseline/{family}/{seed}" + ("/quick" if self.quick else ""), make)

    def check(self, source: Path, family: str, *extra: str | Path, seed: int = 0) -> Check:
        """``dynaudit check SOURCE --baseline <family's baseline>`` with a JSON report (and,
        with ``compare_seeds``, the same check with ``--all-seeds``)."""
        run, data = self._check(source, family, *extra, seed=seed)
        if not self.compare_seeds:
            return Check(run, data)
        full_run, full = self._check(source, family, *extra, "--all-seeds", seed=seed)
        return Check(run, data, full_run, full)

    def _check(
        self, source: Path, family: str, *extra: str | Path, seed: int
    ) -> tuple[Run, dict[str, Any] | None]:
        report = self.path("reports", f"{source.name}-{seed}-{time.monotonic_ns()}.json")
        run = dynaudit(
            "check", source, "--baseline", self.baseline(family, seed), "--no-cache",
            "--json", report, *FIT, *extra,
        )  # fmt: skip
        return run, json.loads(report.read_text()) if report.exists() else None


@dataclass(frozen=True)
class Check:
    """A finished check: the process and its JSON report (None when it wrote none); with
    :attr:`Workspace.compare_seeds`, also the same check with ``--all-seeds``."""

    run: Run
    report: dict[str, Any] | None
    full_run: Run | None = None
    full: dict[str, Any] | None = None

    @property
    def seeds(self) -> dict[str, Any] | None:
        """Sequential seeds against all seeds (experiments.calibrate_gate.seed_comparison);
        None without the second check, or when either wrote no report (then their exit codes
        are compared by :attr:`same_as_all_seeds`)."""
        from experiments.calibrate_gate import seed_comparison

        if self.report is None or self.full is None:
            return None
        return seed_comparison(self.report, self.full)

    @property
    def same_as_all_seeds(self) -> bool:
        """The sequential check's verdict (or exit code) equals the all-seeds one's (true
        without the second check)."""
        if self.full_run is None:
            return True
        seeds = self.seeds
        return bool(seeds["same"]) if seeds is not None else self.run.code == self.full_run.code

    @property
    def seeds_note(self) -> str:
        """One phrase for a table's detail column ("" without the second check)."""
        if self.full_run is None:
            return ""
        seeds = self.seeds
        if not self.same_as_all_seeds:
            full = seeds["verdict_all_seeds"] if seeds else f"exit {self.full_run.code}"
            return f"sequential seeds {self.verdict}, all seeds {full}: DIFFER"
        if seeds is None:
            return "sequential = all seeds"
        refits = seeds["refits_sequential"], seeds["refits_all_seeds"], seeds["refits_full"]
        return "sequential = all seeds, refits {} (all seeds {}, full {})".format(*refits)

    @property
    def verdict(self) -> str:
        if self.run.code in (0, 1) and self.report is not None:
            return str(self.report["verdict"]["verdict"])
        return f"exit {self.run.code}"

    @property
    def reasons(self) -> list[str]:
        if self.report is None:
            return [self.run.message]
        return list(self.report["verdict"]["reasons"])

    @property
    def change(self) -> float | None:
        """All-layers relative change of the mean distance, %, mean over seeds."""
        if self.report is None:
            return None
        return float(self.report["comparison"]["all"]["change"]["mean"]) * 100
