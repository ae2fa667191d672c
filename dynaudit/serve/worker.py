"""Jobs to checks: a pool of worker threads, each claiming one job at a time from the store and
running ``dynaudit check`` on it in a process of its own.

A check runs as the CLI does in CI (the same baseline resolution, the same one-line errors),
in a new process group with a time limit: a poisoned checkpoint can exhaust that process's
memory or hang it, never the receiver. The verdict is read from the report the check writes
(``check.json``), never from the exit code: under torchrun a failed rank also exits 1.

Durability: a claimed job holds a lease that a heartbeat renews. If the receiver dies, the
lease runs out (or, on the same host, the next start sees the old process is gone) and the job
is queued again; the check process it left behind is stopped first. A job that keeps crashing
is given up after ``--max-attempts``, with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynaudit.errors import ExitCode, printable
from dynaudit.secrets import scrub
from dynaudit.serve.writeback import Interrupted, WriteBack

if TYPE_CHECKING:
    from dynaudit.schema import CheckReport
    from dynaudit.serve.settings import ServeSettings
    from dynaudit.serve.store import Job, Store

__all__ = ["Outcome", "Pool", "check_command", "run_check"]

log = logging.getLogger("dynaudit.serve")

LEASE_SECONDS = 60.0
HEARTBEAT_SECONDS = 15.0
POLL_SECONDS = 0.5
GRACE_SECONDS = 10.0  # SIGTERM, then SIGKILL
RETRY_DELAY_SECONDS = 5.0
# Exit codes that a second attempt cannot change: the flags, the checkpoint or the baseline.
_FINAL_EXITS = {ExitCode.USAGE, ExitCode.INPUT}
_UNREACHABLE = "cannot reach"  # what every SourceUnreachable message says: worth another try
# What the receiver keeps to itself: a check process never sees the webhook secrets.
_PRIVATE_VARIABLES = (
    "DYNAUDIT_SECRET",
    "DYNAUDIT_MLFLOW_WEBHOOK_SECRET",
    "DYNAUDIT_HUB_WEBHOOK_SECRET",
    "DYNAUDIT_OPS_TOKEN",
    "DYNAUDIT_SERVE_DB",  # may hold the job database's password
)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one check process ended: its report, or why there is none."""

    report: Path | None
    exit_code: int | None
    reason: str | None = None
    final: bool = False  # another attempt would end the same way

    def read(self) -> CheckReport:
        from dynaudit.schema import CheckReport

        assert self.report is not None
        return CheckReport.model_validate_json(self.report.read_bytes())


def check_command(source: str, folder: Path, settings: ServeSettings) -> list[str]:
    """The command line of one check: the receiver's own interpreter (or ``--launcher``,
    e.g. torchrun) running the CLI, the reports written into ``folder``."""
    launcher = list(settings.launcher) or [sys.executable]
    found = shutil.which(launcher[0]) or launcher[0]  # the check runs in another folder
    launcher[0] = os.path.abspath(found) if os.sep in found else found
    command = [*launcher, "-m", "dynaudit", "check", source, "--quiet"]
    command += ["--json", str(folder / "check.json"), "--markdown", str(folder / "check.md")]
    if settings.hf_endpoint:
        command += ["--hf-endpoint", settings.hf_endpoint]
    return command + list(settings.check_args)


def _environment(settings: ServeSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_VARIABLES}
    if settings.mlflow_uri:  # not on the command line: a password in it would show in ps
        env["MLFLOW_TRACKING_URI"] = settings.mlflow_uri
    if settings.hf_token:
        env["HF_TOKEN"] = settings.hf_token
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_check(
    command: Sequence[str],
    folder: Path,
    settings: ServeSettings,
    started: Callable[[subprocess.Popen[bytes]], None] = lambda process: None,
    stopping: threading.Event | None = None,
) -> Outcome:
    """Run one check in ``folder`` (its working directory: the receiver's own pyproject.toml
    cannot pick a baseline) in a new process group; stop the group at ``--job-timeout``, or
    when ``stopping`` is set (the receiver is shutting down)."""
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "check.log"
    with log_path.open("wb") as output:
        process = subprocess.Popen(
            list(command),
            cwd=folder,
            env=_environment(settings),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as one
        )
    started(process)
    deadline = time.monotonic() + settings.job_timeout
    while process.poll() is None:
        if stopping is not None and stopping.is_set():
            stop_group(process.pid)
            return Outcome(None, None, "the receiver stopped during the check")
        if time.monotonic() > deadline:
            stop_group(process.pid)
            return Outcome(None, None, f"the check did not finish in {settings.job_timeout:g} s")
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # what the check left behind (torchrun's ranks)
    code = process.returncode
    # The signal that stops the receiver may reach the check first (a process group, a
    # cgroup): the receiver's own handler gets a moment to say so.
    stopped = code in (ExitCode.INTERRUPTED, -signal.SIGTERM) and stopping is not None
    if stopped and stopping is not None and stopping.wait(2.0):
        return Outcome(None, code, "the receiver stopped during the check")
    report = folder / "check.json"
    if report.is_file() and code in (ExitCode.OK, ExitCode.GATE_FAILED):
        return Outcome(report, code)
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return Outcome(None, code, f"the check was killed by {name}")
    reason = last_error(log_path) or f"the check exited with {code}"
    final = code in _FINAL_EXITS and _UNREACHABLE not in reason  # a server may come back
    return Outcome(None, code, reason, final)


def last_error(log_path: Path) -> str | None:
    """The check's own one-line error (``dynaudit: error: ...``), scrubbed, or None."""
    with contextlib.suppress(OSError):
        lines = log_path.read_text(errors="replace").splitlines()
        for line in reversed(lines):
            if line.startswith("dynaudit: error: "):
                return scrub(printable(line.removeprefix("dynaudit: error: ")))[:500]
    return None


def stop_group(pgid: int) -> None:
    """SIGTERM to a check's process group (the CLI leaves nothing half-written on it), then
    SIGKILL after a grace period."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_SECONDS
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pgid, os.WNOHANG)
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, ProcessLookupError):
        os.waitpid(pgid, 0)


def stop_leftover(job: Job) -> None:
    """After a crash: stop the check process a previous receiver left running for ``job``,
    if it is still the same process (its start token matches), not a reused pid."""
    from dynaudit.serve.store import process_token

    if job.pid is None or job.pid_start is None:
        return
    if process_token(job.pid) == job.pid_start:
        log.warning(
            "job %s: stopping the check process %s left by a previous receiver", job.id, job.pid
        )
        stop_group(job.pid)


class Pool:
    """``--workers`` threads taking jobs from the store, a heartbeat renewing their leases and
    a sweeper queueing again the jobs of receivers that died."""

    def __init__(self, store: Store, settings: ServeSettings, writeback: WriteBack) -> None:
        from dynaudit.serve.store import this_owner

        self.store = store
        self.settings = settings
        self.writeback = writeback
        self.owner = this_owner()
        self.stopping = writeback.stopping  # set at the first signal: no new claims
        self._held: set[int] = set()  # the jobs this receiver's workers hold: renewed
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self.recover()
        for number in range(self.settings.workers):
            self._spawn(self._work, f"dynaudit-worker-{number}")
        self._spawn(self._heartbeat, "dynaudit-heartbeat")
        if self.settings.watch:  # its own thread: a slow registry must not hold the leases
            self._spawn(self._sweeper, "dynaudit-sweep")
        if self.settings.guards and self.settings.mlflow_uri:
            self._spawn(self._seed, "dynaudit-seed")

    def stop(self) -> None:
        """Stop claiming; a check in progress is stopped and its job queued again."""
        self.stopping.set()
        deadline = time.monotonic() + GRACE_SECONDS + 5
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def recover(self) -> None:
        """Queue again every job whose receiver is gone, stopping what it left running."""
        from dynaudit.serve.store import owner_alive

        for job in self.store.requeue_stale(alive=owner_alive):
            stop_leftover(job)
            log.warning(
                "job %s (%s): interrupted (attempt %d); queued again", job.id, job.key, job.attempts
            )

    def sweep(self) -> None:
        """Queue a check for each version of a ``--watch`` model that has no verdict yet:
        MLflow gives up on a delivery after about ten seconds, so versions registered while
        the receiver was down (or unreachable) are found here instead."""
        from dynaudit.serve.events import version_key

        for name in self.settings.watch:
            try:
                versions = self.writeback.unchecked_versions(name)
            except Exception as exc:  # the registry is away: the next sweep tries again
                log.warning(
                    "cannot list the versions of %s: %s",
                    printable(name),
                    scrub(printable(str(exc)))[:300],
                )
                continue
            for version in versions:
                job, created = self.store.enqueue(
                    version_key(name, version), "mlflow", {"name": name, "version": version}
                )
                if created:
                    log.info(
                        "job %s: version %s of %s found unchecked; queued",
                        job.id,
                        version,
                        printable(name),
                    )

    def _seed(self) -> None:
        """The guard's ledger from the registry, once, beside the workers (an alias event
        recorded meanwhile is newer and is kept)."""
        try:
            found, new = self.writeback.seed_guard()
        except Interrupted:
            return
        except Exception as exc:  # the registry is away: the ledger fills from events
            log.warning(
                "guard: %s; an alias is moved back only to a version this receiver saw it on",
                scrub(printable(str(exc)))[:300],
            )
            return
        log.info("guard: %d guarded alias(es) in the registry, %d new to the ledger", found, new)

    def _sweeper(self) -> None:
        while not self.stopping.is_set():
            self.sweep()
            self.stopping.wait(self.settings.sweep_every)

    def _heartbeat(self) -> None:
        last_sweep = time.monotonic()
        while not self.stopping.wait(HEARTBEAT_SECONDS):
            with self._lock:
                held = list(self._held)
            for job_id in held:
                with contextlib.suppress(Exception):
                    self.store.renew(job_id, self.owner, LEASE_SECONDS)
            if time.monotonic() - last_sweep > LEASE_SECONDS:
                last_sweep = time.monotonic()
                with contextlib.suppress(Exception):
                    self.recover()

    def _work(self) -> None:
        while not self.stopping.is_set():
            try:
                job = self.store.claim(self.owner, LEASE_SECONDS)
            except Exception as exc:  # the database is away: wait, then try again
                log.warning("cannot claim a job: %s", scrub(printable(str(exc)))[:300])
                self.stopping.wait(RETRY_DELAY_SECONDS)
                continue
            if job is None:
                self.stopping.wait(POLL_SECONDS)
                continue
            with self._lock:
                self._held.add(job.id)
            try:
                self._handle(job)
            except Interrupted:  # the receiver is stopping: the next start takes it up
                self.store.release(job.id, self.owner, delay_s=0, refund=True,
                                   reason="interrupted by a shutdown")  # fmt: skip
            except Exception as exc:  # a bug here must not end the worker thread
                reason = scrub(printable(f"internal error: {type(exc).__name__}: {exc}"))[:500]
                log.exception("job %s (%s): %s", job.id, job.key, reason)
                with contextlib.suppress(Exception):  # still said where the reviewer looks
                    failed = dataclasses.replace(job, verdict="error", reason=reason)
                    self.writeback.error(failed, self)
                with contextlib.suppress(Exception):
                    self.store.finish(job.id, self.owner, "error", reason=reason)
            finally:
                with self._lock:
                    self._held.discard(job.id)

    # -- one job -------------------------------------------------------------------------

    def _handle(self, job: Job) -> None:
        if job.kind == "guard":
            self.writeback.guard(job, self)
            return
        if job.phase not in ("checked", "written"):
            if job.attempts > self.settings.max_attempts:
                last = job.reason or "no report"
                reason = f"gave up after {self.settings.max_attempts} attempts: {last}"
                self._give_up(job, reason)
                return
            outcome = self._check(job)
            if outcome.report is None:
                if outcome.final or job.attempts >= self.settings.max_attempts:
                    reason = outcome.reason or "no report"
                    if not outcome.final:
                        reason = f"gave up after {job.attempts} attempts: {reason}"
                    self._give_up(job, reason)
                else:
                    log.warning(
                        "job %s (%s): attempt %d failed: %s; retrying",
                        job.id,
                        job.key,
                        job.attempts,
                        outcome.reason,
                    )
                    self.store.release(
                        job.id, self.owner, delay_s=RETRY_DELAY_SECONDS, reason=outcome.reason
                    )
                return
            report = outcome.read()
            self.store.update(
                job.id,
                self.owner,
                phase="checked",
                report_dir=str(outcome.report.parent),
                verdict=report.verdict.verdict,
            )
            job = dataclasses.replace(
                job,
                phase="checked",
                report_dir=str(outcome.report.parent),
                verdict=report.verdict.verdict,
            )
        self.writeback.verdict(job, self)

    def _check(self, job: Job) -> Outcome:
        folder = (
            self.settings.state_dir.resolve() / "jobs" / str(job.id) / f"attempt-{job.attempts}"
        )
        source = source_of(job)
        command = check_command(source, folder, self.settings)
        log.info("job %s: checking %s (attempt %d)", job.id, printable(source), job.attempts)

        def started(process: subprocess.Popen[bytes]) -> None:
            from dynaudit.serve.store import process_token

            self.store.update(
                job.id,
                self.owner,
                phase="checking",
                pid=process.pid,
                pid_start=process_token(process.pid),
            )

        outcome = run_check(command, folder, self.settings, started, self.stopping)
        if self.stopping.is_set() and outcome.report is None:  # not the check's failure
            raise Interrupted
        return outcome

    def _give_up(self, job: Job, reason: str) -> None:
        log.warning("job %s (%s): %s", job.id, job.key, reason)
        self.store.update(job.id, self.owner, verdict="error", reason=reason)
        self.writeback.error(dataclasses.replace(job, verdict="error", reason=reason), self)

    # -- for the write-back --------------------------------------------------------------

    def finish(
        self, job: Job, state: str, *, verdict: str | None, reason: str | None = None
    ) -> None:
        self.store.finish(job.id, self.owner, state, verdict=verdict, reason=reason)  # type: ignore[arg-type]

    def update(self, job: Job, **fields: Any) -> None:
        self.store.update(job.id, self.owner, **fields)


def source_of(job: Job) -> str:
    """The SOURCE a job checks: the exact model version, or the pushed commit."""
    subject = job.subject
    if job.kind == "mlflow":
        return f"models:/{subject['name']}/{subject['version']}"
    if job.kind == "hub":
        return f"hf://{subject['repo']}@{subject['sha']}"
    raise ValueError(f"a {job.kind} job checks nothing")
