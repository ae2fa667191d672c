"""Verdicts back to the registries, and the promotion guard.

- **MLflow**: the report is logged to one run (found again by its ``dynaudit.job`` tag if an
  earlier attempt made it, so a crash between "run created" and "recorded" makes no second
  run), and the model version gets ``dynaudit.verdict``, ``dynaudit.report_run`` and
  ``dynaudit.failing_groups`` (:func:`dynaudit.tracking.log_report`). A check that could not
  run (no baseline declared, an unreadable checkpoint) tags ``dynaudit.verdict=error`` and
  ``dynaudit.error`` with the reason: never left silent.
- **Hub**: the report is the dynaudit discussion's comment, edited in place on later pushes
  (:func:`dynaudit.hub_comments.post_comment`). Only the check of the commit still at the head
  of its branch posts: with several workers the checks of two quick pushes can end out of
  order, and the older commit's report must not replace the newer one's (the verdict of a
  commit no longer at the head stays in ``/jobs`` and the log).
- Every registry call is retried with a bound (``--writeback-retries``, backoff up to 16 s);
  when the bound is reached the job ends in ``error`` with the reason, in ``/jobs`` and the log.
- **Guard** (``--guard ALIAS``): the registry does not say where an alias was before it
  moved, so the receiver keeps a ledger of the alias events it received. When an alias lands
  on a version whose verdict is ``fail``, and still points there, it is moved back to the
  version it pointed at before, unless that one failed too or is unknown; either way the
  failing version is tagged ``dynaudit.guard`` with what was done."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from dynaudit.errors import DynauditError, RemoteNotFound, printable
from dynaudit.secrets import scrub

if TYPE_CHECKING:
    from dynaudit.hub_comments import Posted
    from dynaudit.schema import CheckReport
    from dynaudit.serve.settings import ServeSettings
    from dynaudit.serve.store import Job, Store
    from dynaudit.sources import SourceOptions

__all__ = ["ERROR_TAG", "GUARD_TAG", "JOB_TAG", "Interrupted", "WriteBack", "WriteBackFailed"]

log = logging.getLogger("dynaudit.serve")

JOB_TAG = "dynaudit.job"  # on the report run: which job made it
ERROR_TAG = "dynaudit.error"
GUARD_TAG = "dynaudit.guard"
_MAX_TAG = 5000
_MAX_BACKOFF = 16.0
GUARD_POLL_SECONDS = 2.0

T = TypeVar("T")


class WriteBackFailed(Exception):
    """A registry call still failed after the bounded retries."""


class Interrupted(Exception):
    """The receiver is stopping: the job goes back to the queue for the next start."""


class Pool(Protocol):
    """What the write-back needs of the worker that holds a job (``worker.Pool``)."""

    owner: str

    def finish(
        self, job: Job, state: str, *, verdict: str | None, reason: str | None = None
    ) -> None: ...

    def update(self, job: Job, **fields: Any) -> None: ...


class WriteBack:
    def __init__(
        self, settings: ServeSettings, store: Store, stopping: threading.Event | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.stopping = stopping or threading.Event()
        self._repo_locks: dict[str, threading.Lock] = {}  # one Hub post per repository at once
        self._locks_lock = threading.Lock()

    # -- verdicts ------------------------------------------------------------------------

    def verdict(self, job: Job, pool: Pool) -> None:
        """Write a finished check's verdict back, then end the job."""
        from dynaudit.schema import CheckReport

        assert job.report_dir is not None
        report = CheckReport.model_validate_json((Path(job.report_dir) / "check.json").read_bytes())
        verdict = report.verdict.verdict
        try:
            if job.kind == "mlflow":
                run_id = self._bounded(
                    f"log the report of {_subject(job)} to MLflow",
                    lambda: self._log_run(job, report, pool),
                )
                where = f"run {run_id}"
            else:
                where = self._bounded(
                    f"post the report to {_subject(job)}", lambda: self._post(job, report)
                )
        except WriteBackFailed as exc:
            log.warning("job %s (%s): verdict %s, but %s", job.id, job.key, verdict, exc)
            self._fail_run(job)
            pool.finish(job, "error", verdict=verdict, reason=str(exc))
            return
        log.info("job %s: %s: %s (%s)", job.id, _subject(job), verdict, where)
        pool.finish(job, "done", verdict=verdict)

    def error(self, job: Job, pool: Pool) -> None:
        """A check that gave no verdict: say why on the model version (Hub: in the log and
        ``/jobs`` only), then end the job."""
        reason = job.reason or "the check gave no verdict"
        try:
            if job.kind == "mlflow":
                self._bounded(
                    f"tag {_subject(job)} with the error", lambda: self._tag_error(job, reason)
                )
            elif job.kind == "hub":
                self._bounded(
                    f"post the error to {_subject(job)}", lambda: self._post_error(job, reason)
                )
        except WriteBackFailed as exc:
            reason = f"{reason}; and {exc}"
        pool.finish(job, "error", verdict="error", reason=reason[:_MAX_TAG])

    def _log_run(self, job: Job, report: CheckReport, pool: Pool) -> str:
        from dynaudit.sources.mlflow import client, client_environment, mlflow_errors, start_run
        from dynaudit.tracking import log_report, run_name

        uri = self._uri()
        marker = _job_marker(job)
        with mlflow_errors("logging the report run", uri), client_environment(uri):
            tracking = client(uri)
            known = self.store.job(job.id)  # an earlier try may have made it
            run_id = (known.run_id if known else None) or _find_run(tracking, marker)
            if run_id is None:  # the marker is set with the run, so a retry finds it
                run_id = start_run(tracking, None, run_name(report), {JOB_TAG: marker})
            pool.update(job, run_id=run_id)
        log_report(report, run_id=run_id, tracking_uri=uri)  # metrics, reports, version tags
        with mlflow_errors("ending the report run", uri), client_environment(uri):
            client(uri).set_terminated(run_id)
        return run_id

    def _fail_run(self, job: Job) -> None:
        """A report run the write-back gave up on ends FAILED, not RUNNING (best effort)."""
        from dynaudit.sources.mlflow import client, client_environment

        known = self.store.job(job.id)
        if job.kind != "mlflow" or known is None or known.run_id is None:
            return
        with contextlib.suppress(Exception), client_environment(self._uri()):
            client(self._uri()).set_terminated(known.run_id, status="FAILED")

    def unchecked_versions(self, name: str) -> list[str]:
        """The versions of registered model ``name`` that are ready and carry no
        ``dynaudit.verdict`` tag."""
        from dynaudit.sources.mlflow import client, client_environment, mlflow_errors
        from dynaudit.tracking import VERDICT_TAG

        if "'" in name:  # cannot be quoted in MLflow's filter syntax
            raise ValueError("a model name with a quote cannot be searched")
        uri = self._uri()
        with mlflow_errors(f"the versions of {name}", uri), client_environment(uri):
            found = client(uri).search_model_versions(f"name = '{name}'")
        return sorted(
            (
                str(v.version)
                for v in found
                if VERDICT_TAG not in (v.tags or {}) and v.status == "READY"
            ),
            key=int,
        )

    def seed_guard(self) -> tuple[int, int]:
        """Read from the registry where each ``--guard`` alias points now, into the ledger
        (:meth:`Store.seed_alias`): after a restart the guard then knows the version to move
        an alias back to, which no event had told this receiver. Returns how many aliases
        were found and how many changed the ledger."""
        read_at = self.store.now()
        found = self._bounded("read the guarded aliases from the registry", self._guarded_now)
        new = sum(self.store.seed_alias(*where, read_at) for where in found)
        return len(found), new

    def _guarded_now(self) -> list[tuple[str, str, str]]:
        """``(model, alias, version)`` of every ``--guard`` alias set in the registry."""
        from dynaudit.sources.mlflow import client, client_environment, mlflow_errors

        uri, guarded, found = self._uri(), set(self.settings.guards), []
        with mlflow_errors("the registered models", uri), client_environment(uri):
            registry, token = client(uri), None
            while True:
                page = registry.search_registered_models(max_results=1000, page_token=token)
                for model in page:
                    for alias, version in (model.aliases or {}).items():
                        if alias in guarded:
                            found.append((str(model.name), str(alias), str(version)))
                token = page.token
                if not token:
                    return found

    def _tag_error(self, job: Job, reason: str) -> None:
        from dynaudit.sources.mlflow import client, client_environment, mlflow_errors
        from dynaudit.tracking import VERDICT_TAG

        uri = self._uri()
        name, version = job.subject["name"], str(job.subject["version"])
        with mlflow_errors(f"models:/{name}/{version}", uri), client_environment(uri):
            registry = client(uri)
            registry.set_model_version_tag(name, version, VERDICT_TAG, "error")
            registry.set_model_version_tag(name, version, ERROR_TAG, reason[:_MAX_TAG])

    def _post(self, job: Job, report: CheckReport) -> str:
        from dynaudit.hub_comments import post_comment

        return self._post_newest(job, post_comment, report, self._hub())

    def _post_error(self, job: Job, reason: str) -> str:
        from dynaudit.hub_comments import post_error

        source = f"hf://{job.subject['repo']}@{job.subject['sha']}"
        return self._post_newest(job, post_error, source, reason, self._hub())

    def _post_newest(self, job: Job, post: Callable[..., Posted], *args: Any) -> str:
        """``post(*args)`` under the repository's lock, within the Hub deadline, when the job's
        commit is still the head of the branch it was pushed to; else nothing is posted (a
        newer push's check posts, or has posted, its own). The lock is taken in the posting
        thread itself, so a retry after a stalled post waits for that post instead of racing
        it to open a second discussion."""
        from dynaudit.hub_comments import DEADLINE, _within

        repo = job.subject["repo"]
        with self._locks_lock:
            lock = self._repo_locks.setdefault(repo, threading.Lock())

        def locked() -> str:
            with lock:
                branch, head = self._head(job)
                if head != job.subject["sha"]:
                    return f"not posted: {branch} has moved on to {head[:12]}"
                posted = post(*args)
                return f"discussion {posted.action}: {posted.url}"

        return _within(DEADLINE, locked)

    def _head(self, job: Job) -> tuple[str, str]:
        """The branch a Hub job's commit was pushed to, and the commit at its head now."""
        from dynaudit.hub_comments import _api

        branch = job.subject["ref"].removeprefix("refs/heads/")
        info = _api(self._hub()).repo_info(job.subject["repo"], revision=branch)
        return branch, str(info.sha)

    def _hub(self) -> SourceOptions:
        from dynaudit.sources import SourceOptions

        return SourceOptions(hf_endpoint=self.settings.hf_endpoint, hf_token=self.settings.hf_token)

    def _uri(self) -> str:
        assert self.settings.mlflow_uri is not None  # validated at start-up
        return self.settings.mlflow_uri

    def _bounded(self, what: str, call: Callable[[], T]) -> T:
        """``call``, tried ``1 + --writeback-retries`` times with a growing pause; a thing
        that does not exist is not tried again."""
        tries = 1 + self.settings.writeback_retries
        for attempt in range(tries):
            try:
                return call()
            except RemoteNotFound as exc:
                raise WriteBackFailed(f"could not {what}: {_reason(exc)}") from exc
            except Exception as exc:  # the registry is away or refused: bounded retries
                if attempt + 1 == tries:
                    raise WriteBackFailed(
                        f"could not {what} after {tries} tries: {_reason(exc)}"
                    ) from exc
                pause = min(2.0**attempt, _MAX_BACKOFF)
                log.info("could not %s (%s); again in %g s", what, _reason(exc), pause)
                if self.stopping.wait(pause):
                    raise Interrupted from exc
        raise AssertionError("unreachable")

    # -- the promotion guard -------------------------------------------------------------

    def guard(self, job: Job, pool: Pool) -> None:
        """Act on an alias that moved to a version (see the module docstring)."""
        from dynaudit.serve.events import version_key

        name, alias = job.subject["name"], job.subject["alias"]
        version, previous = str(job.subject["version"]), job.subject.get("previous")
        checked = self.store.by_key(version_key(name, version))
        if checked is None or checked.state in ("queued", "running"):
            waited = time.time() - job.created
            limit = self.settings.job_timeout * (self.settings.max_attempts + 1)
            if waited > limit:
                pool.finish(
                    job,
                    "error",
                    verdict=None,
                    reason=f"version {version} was not checked in {limit:g} s",
                )
            else:  # waiting is not an attempt
                self.store.release(job.id, pool.owner, delay_s=GUARD_POLL_SECONDS, refund=True)
            return
        if checked.verdict != "fail":
            pool.finish(
                job, "done", verdict=checked.verdict, reason=f"{alias} kept on version {version}"
            )
            return
        moved: list[str] = []
        try:
            action = self._bounded(
                f"guard {name}@{alias}", lambda: self._revert(name, alias, version, previous, moved)
            )
        except WriteBackFailed as exc:
            log.warning("guard: %s", exc)
            pool.finish(job, "error", verdict="fail", reason=str(exc))
            return
        log.warning("guard: %s@%s: %s", printable(name), printable(alias), action)
        pool.finish(job, "done", verdict="fail", reason=action)

    def _revert(
        self, name: str, alias: str, version: str, previous: str | None, moved: list[str]
    ) -> str:
        """Move ``alias`` back (once: ``moved`` remembers it across retries) and tag why."""
        from dynaudit.serve.events import version_key
        from dynaudit.sources.mlflow import client, client_environment, mlflow_errors

        uri = self._uri()
        earlier = self.store.by_key(version_key(name, previous)) if previous else None
        with mlflow_errors(f"the {alias} alias of {name}", uri), client_environment(uri):
            registry = client(uri)
            now = str(registry.get_model_version_by_alias(name, alias).version)
            if moved and now == previous:  # an earlier try moved it, then a tag call failed
                now = version
            elif now != version:  # a person (or a later event) moved it: theirs, not ours
                return f"version {version} failed, but {alias} has moved on to {now}: left as it is"
            if previous is None or previous == version:
                action = f"kept on failing version {version}: no earlier version known"
            elif earlier is not None and earlier.verdict == "fail":
                action = f"kept on failing version {version}: version {previous} failed too"
            else:
                if not moved:
                    registry.set_registered_model_alias(name, alias, previous)
                    moved.append(previous)
                action = (
                    f"moved back from version {version} to {previous}: {version} failed the gate"
                )
            registry.set_model_version_tag(
                name, version, GUARD_TAG, f"{alias}: {action}"[:_MAX_TAG]
            )
            registry.set_registered_model_tag(name, f"{GUARD_TAG}.{alias}", f"{action}"[:_MAX_TAG])
        return action


def _find_run(tracking: Any, marker: str) -> str | None:
    """The report run an earlier attempt of this job created, by its ``dynaudit.job`` tag."""
    import os

    experiment = tracking.get_experiment_by_name(
        os.environ.get("MLFLOW_EXPERIMENT_NAME") or "dynaudit"
    )
    if experiment is None:
        return None
    found = tracking.search_runs(
        [experiment.experiment_id], f"tags.`{JOB_TAG}` = '{marker}'", max_results=1
    )
    return str(found[0].info.run_id) if found else None


def _job_marker(job: Job) -> str:
    """A tag value naming the job that any filter string can quote: hex only."""
    return hashlib.sha256(f"{job.key}\0{job.created!r}".encode()).hexdigest()[:24]


def _subject(job: Job) -> str:
    subject = job.subject
    if job.kind == "mlflow":
        return printable(f"models:/{subject['name']}/{subject['version']}")
    if job.kind == "hub":
        return printable(f"hf://{subject['repo']}@{subject['sha']}")
    return printable(job.key)


def _reason(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, DynauditError) else f"{type(exc).__name__}: {exc}"
    return scrub(printable(text))[:500]
