"""The receiver's job store: every accepted webhook is a row before the receiver answers 202, so
a check survives a crash or a restart of the receiver, and replicas can share the queue.

Workers take jobs under a lease: :meth:`Store.claim` marks a job ``running`` for ``lease_s``
seconds on behalf of an owner (:func:`this_owner`: host, pid and the process's start time), the
owner renews it while the check runs, and :meth:`Store.requeue_stale` returns to the queue every
job whose lease ran out or whose owner process on this host is gone (so a kill -9 means a
re-run). A job's ``phase`` survives the requeue, which lets the next attempt skip the steps
already done.

Portability between SQLite and PostgreSQL comes from two habits, both plain SQLAlchemy Core:
every check-then-act is a conditional ``UPDATE`` whose ``WHERE`` repeats the condition and whose
row count says who won (compare-and-set), and every "already there?" is an ``INSERT`` that fails
with ``IntegrityError``. No upsert, no row locks, no dialect's SQL.

On SQLite, transactions that write start with ``BEGIN IMMEDIATE``: a deferred transaction that
has read cannot become a writer once another connection has committed (``SQLITE_BUSY_SNAPSHOT``,
which the busy timeout does not wait out), while one that takes the write lock first simply
queues behind the others for up to 30 s. Threads of one process also take a lock before writing,
so they queue in Python rather than in SQLite's sleeping busy handler.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

from dynaudit import secrets
from dynaudit.errors import UsageError

__all__ = [
    "SEEDED",
    "STATES",
    "Job",
    "JobState",
    "Store",
    "owner_alive",
    "process_token",
    "this_owner",
]

JobState = Literal["queued", "running", "done", "error"]
STATES: tuple[JobState, ...] = ("queued", "running", "done", "error")
VERDICTS = ("pass", "fail", "error")

_metadata = sa.MetaData()

_jobs = sa.Table(
    "jobs",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String, nullable=False, unique=True),
    sa.Column("kind", sa.String, nullable=False),
    sa.Column("subject", sa.JSON, nullable=False),
    sa.Column("state", sa.String, nullable=False),
    sa.Column("phase", sa.String, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("not_before", sa.Double, nullable=False),
    sa.Column("lease_owner", sa.String),
    sa.Column("lease_until", sa.Double),
    sa.Column("pid", sa.Integer),
    sa.Column("pid_start", sa.String),
    sa.Column("report_dir", sa.String),
    sa.Column("run_id", sa.String),
    sa.Column("verdict", sa.String),
    sa.Column("reason", sa.Text),
    sa.Column("created", sa.Double, nullable=False),
    sa.Column("updated", sa.Double, nullable=False),
    sa.Index("ix_jobs_state_id", "state", "id"),
)

# A delivery id seen once: a retried or replayed delivery is answered without a second job.
_deliveries = sa.Table(
    "deliveries",
    _metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("source", sa.String, nullable=False),
    sa.Column("received", sa.Double, nullable=False),
)

# The promotion guard's ledger: neither an alias event nor the registry says where an alias
# pointed before, so the receiver remembers it.
_aliases = sa.Table(
    "aliases",
    _metadata,
    sa.Column("model", sa.String, primary_key=True),
    sa.Column("alias", sa.String, primary_key=True),
    sa.Column("version", sa.String, nullable=False),
    sa.Column("previous", sa.String, nullable=True),  # what the last move replaced
    sa.Column("delivery", sa.String, nullable=True),  # the delivery that made the last move
    sa.Column("updated", sa.Double, nullable=False),
)

SEEDED = "(read from the registry)"  # the delivery of a ledger row read at start-up
_WRITE = "dynaudit_write"  # execution option: this connection's transaction will write
_UPDATABLE = frozenset(
    {"phase", "pid", "pid_start", "report_dir", "run_id", "verdict", "reason", "subject"}
)


@dataclass(frozen=True)
class Job:
    """One job as stored: what to check (``kind``, ``subject``), where it stands (``state``,
    and the worker's ``phase`` within ``running``), who holds it (the lease), the check
    subprocess to kill if its worker died (``pid`` with its ``pid_start`` token, so a reused
    pid is never killed), and the outcome."""

    id: int
    key: str
    kind: str
    subject: dict[str, Any]
    state: JobState
    phase: str
    attempts: int
    not_before: float
    lease_owner: str | None
    lease_until: float | None
    pid: int | None
    pid_start: str | None
    report_dir: str | None
    run_id: str | None
    verdict: str | None
    reason: str | None
    created: float
    updated: float

    def as_dict(self) -> dict[str, Any]:
        """Every field, as JSON can hold it (``subject`` is a copy)."""
        return dataclasses.asdict(self)


_FIELDS = tuple(field.name for field in dataclasses.fields(Job))


class Store:
    """The job queue, the delivery ids seen and the alias ledger, in one SQLAlchemy database.

    One instance is shared by the request handlers and every worker thread; each call is its
    own short transaction. An unusable ``url`` (unknown dialect, missing driver, unreachable
    server, a directory that cannot be created) raises :class:`~dynaudit.errors.UsageError`
    with a one-line message that shows the URL without its password. Later calls let
    ``sqlalchemy.exc.SQLAlchemyError`` through (``OperationalError`` while the database is
    down), for the caller to answer 503 or retry.

    ``clock`` gives the time in unix seconds; every stored time comes from it, so tests can
    move time instead of waiting.
    """

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        password = _password(url)
        if password:
            secrets.remember(token=password, uri=url)
        engine: Engine | None = None
        try:
            parsed = sa.make_url(url)
            engine, memory = _engine(parsed)
            _metadata.create_all(engine)
        except (sa.exc.SQLAlchemyError, ImportError, OSError, ValueError) as exc:
            if engine is not None:
                engine.dispose()
            raise UsageError(
                f"cannot use the job database {_shown(url)} (--db): {_reason(exc, password)}"
            ) from exc
        self._engine = engine
        sqlite = parsed.get_backend_name() == "sqlite"
        lock = threading.Lock()
        # An in-memory database is one connection shared by every thread: reads queue too.
        self._write_guard: AbstractContextManager[Any] = lock if sqlite else nullcontext()
        self._read_guard: AbstractContextManager[Any] = lock if memory else nullcontext()

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    def ping(self) -> bool:
        """Whether the database answers, for ``/health``."""
        try:
            with self._read() as conn:
                conn.execute(sa.select(1))
        except sa.exc.SQLAlchemyError:
            return False
        return True

    # -- deliveries ---------------------------------------------------------------------------

    def seen_delivery(self, delivery_id: str, source: str) -> bool:
        """Record a delivery id; True when it was recorded before (a duplicate delivery)."""
        try:
            with self._write() as conn:
                conn.execute(
                    sa.insert(_deliveries).values(
                        id=delivery_id, source=source, received=self._clock()
                    )
                )
        except sa.exc.IntegrityError:
            return True
        return False

    def delivery_seen(self, delivery_id: str) -> bool:
        """Whether a delivery id was recorded (read only: the id is recorded once the delivery
        was handled, so a sender retrying after a failure is not taken for a duplicate)."""
        with self._read() as conn:
            query = sa.select(_deliveries.c.id).where(_deliveries.c.id == delivery_id)
            return conn.execute(query).first() is not None

    # -- jobs ---------------------------------------------------------------------------------

    def enqueue(
        self,
        key: str,
        kind: str,
        subject: Mapping[str, Any],
        *,
        not_before: float | None = None,
    ) -> tuple[Job, bool]:
        """A new queued job and True, or the job that already has ``key`` and False, whatever
        its state: a key names its check's content, so one is never checked twice."""
        now = self._clock()
        try:
            with self._write() as conn:
                inserted = conn.execute(
                    sa.insert(_jobs).values(
                        key=key,
                        kind=kind,
                        subject=dict(subject),
                        state="queued",
                        phase="queued",
                        attempts=0,
                        not_before=now if not_before is None else not_before,
                        created=now,
                        updated=now,
                    )
                )
                primary_key = inserted.inserted_primary_key
                assert primary_key is not None  # a single-row INSERT reports its key
                job_id = int(primary_key[0])
                job = _one(conn, _jobs.c.id == job_id)
        except sa.exc.IntegrityError:
            existing = self.by_key(key)
            if existing is None:  # another constraint failed, not the key's
                raise
            return existing, False
        assert job is not None  # inserted in this very transaction
        return job, True

    def claim(self, owner: str, lease_s: float) -> Job | None:
        """Take the oldest queued job that may start now: ``running``, one more attempt,
        leased to ``owner`` until now + ``lease_s``. None when there is none.

        Each candidate is taken by an ``UPDATE`` that repeats ``state = 'queued'``; a row count
        of 0 means another thread or process took it first, and the next one is tried."""
        now = self._clock()
        with self._write() as conn:
            after = 0
            while True:
                candidate = conn.execute(
                    sa.select(_jobs.c.id)
                    .where(
                        _jobs.c.state == "queued",
                        _jobs.c.not_before <= now,
                        _jobs.c.id > after,
                    )
                    .order_by(_jobs.c.id)
                    .limit(1)
                ).scalar()
                if candidate is None:
                    return None
                taken = conn.execute(
                    sa.update(_jobs)
                    .where(_jobs.c.id == candidate, _jobs.c.state == "queued")
                    .values(
                        state="running",
                        attempts=_jobs.c.attempts + 1,
                        lease_owner=owner,
                        lease_until=now + lease_s,
                        updated=now,
                    )
                )
                if taken.rowcount == 1:
                    return _one(conn, _jobs.c.id == candidate)
                after = candidate

    def renew(self, job_id: int, owner: str, lease_s: float) -> bool:
        """Extend the lease to now + ``lease_s``; False when the job is no longer ``owner``'s
        (requeued after its lease ran out, or finished)."""
        now = self._clock()
        return self._change(job_id, owner, lease_until=now + lease_s, updated=now)

    def update(self, job_id: int, owner: str, **fields: Any) -> bool:
        """Set any of ``phase``, ``pid``, ``pid_start``, ``report_dir``, ``run_id``,
        ``verdict``, ``reason`` and ``subject`` while ``owner`` holds the job; False when it
        does not. An unknown field is a ``TypeError``, an unknown verdict a ``ValueError``."""
        unknown = sorted(set(fields) - _UPDATABLE)
        if unknown:
            raise TypeError(f"Store.update() cannot set {', '.join(unknown)}")
        if fields.get("verdict") not in (None, *VERDICTS):
            raise ValueError(f"unknown verdict {fields['verdict']!r}")
        if "subject" in fields:
            fields["subject"] = dict(fields["subject"])
        return self._change(job_id, owner, **fields, updated=self._clock())

    def finish(
        self,
        job_id: int,
        owner: str,
        state: Literal["done", "error"],
        *,
        verdict: str | None = None,
        reason: str | None = None,
    ) -> bool:
        """End the job: ``done`` or ``error``, lease and pid cleared.

        ``reason`` replaces the stored one, None included: a reason explains the state the job
        is in, so an earlier one (a postponement) must not outlive it. A ``verdict`` of None
        keeps the stored one: the verdict is the check's finding, which the worker may have
        recorded with :meth:`update` as soon as the check ended."""
        if state not in ("done", "error"):
            raise ValueError(f"a job finishes as done or error, not {state!r}")
        if verdict not in (None, *VERDICTS):
            raise ValueError(f"unknown verdict {verdict!r}")
        outcome: dict[str, Any] = {"reason": reason}
        if verdict is not None:
            outcome["verdict"] = verdict
        return self._change(
            job_id,
            owner,
            state=state,
            lease_owner=None,
            lease_until=None,
            pid=None,
            pid_start=None,
            updated=self._clock(),
            **outcome,
        )

    def release(
        self,
        job_id: int,
        owner: str,
        *,
        delay_s: float,
        reason: str | None = None,
        refund: bool = False,
    ) -> bool:
        """Put the job back in the queue for another try in ``delay_s`` seconds (the model
        version is not ready yet, the server is down), keeping its phase and its attempts,
        less this one when ``refund`` (a shutdown or a wait is not a failed attempt). A
        ``reason`` given replaces the stored one."""
        now = self._clock()
        outcome: dict[str, Any] = {} if reason is None else {"reason": reason}
        if refund:
            outcome["attempts"] = sa.case((_jobs.c.attempts > 0, _jobs.c.attempts - 1), else_=0)
        return self._change(
            job_id,
            owner,
            state="queued",
            not_before=now + delay_s,
            lease_owner=None,
            lease_until=None,
            pid=None,
            pid_start=None,
            updated=now,
            **outcome,
        )

    def requeue_stale(self, alive: Callable[[str], bool] | None = None) -> list[Job]:
        """Return to the queue every running job whose lease has run out, or whose owner
        ``alive(owner)`` declares dead (:func:`owner_alive`: a receiver killed on this host
        need not wait out its lease).

        The jobs come back as they were before the change, ``pid`` and ``pid_start``
        included, so the caller can kill a check subprocess the dead worker left running;
        the rows forget them. A job whose lease was renewed meanwhile is left alone."""
        now = self._clock()
        with self._read() as conn:
            running = [
                _job(row)
                for row in conn.execute(
                    sa.select(_jobs).where(_jobs.c.state == "running").order_by(_jobs.c.id)
                )
            ]
        verdicts: dict[str, bool] = {}  # one alive() per owner, however many jobs it holds

        def dead(owner: str | None) -> bool:
            if alive is None or owner is None:
                return False
            if owner not in verdicts:
                verdicts[owner] = alive(owner)
            return not verdicts[owner]

        stale = [
            job
            for job in running
            if job.lease_until is None or job.lease_until < now or dead(job.lease_owner)
        ]
        if not stale:
            return []
        moved = []
        with self._write() as conn:
            for job in stale:
                changed = conn.execute(
                    sa.update(_jobs)
                    .where(
                        _jobs.c.id == job.id,
                        _jobs.c.state == "running",
                        _same(_jobs.c.lease_owner, job.lease_owner),
                        _same(_jobs.c.lease_until, job.lease_until),
                    )
                    .values(
                        state="queued",
                        lease_owner=None,
                        lease_until=None,
                        pid=None,
                        pid_start=None,
                        updated=now,
                    )
                )
                if changed.rowcount == 1:
                    moved.append(job)
        return moved

    def job(self, job_id: int) -> Job | None:
        with self._read() as conn:
            return _one(conn, _jobs.c.id == job_id)

    def by_key(self, key: str) -> Job | None:
        with self._read() as conn:
            return _one(conn, _jobs.c.key == key)

    def jobs(self, *, state: str | None = None, limit: int = 100) -> list[Job]:
        """Up to ``limit`` jobs, newest first, all of them or those in ``state``."""
        if state is not None and state not in STATES:
            raise ValueError(f"unknown job state {state!r}; one of {', '.join(STATES)}")
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        query = sa.select(_jobs).order_by(_jobs.c.id.desc()).limit(limit)
        if state is not None:
            query = query.where(_jobs.c.state == state)
        with self._read() as conn:
            return [_job(row) for row in conn.execute(query)]

    def counts(self) -> dict[str, int]:
        """How many jobs are in each state; every state is present."""
        found: dict[str, int] = dict.fromkeys(STATES, 0)
        with self._read() as conn:
            for state, count in conn.execute(
                sa.select(_jobs.c.state, sa.func.count()).group_by(_jobs.c.state)
            ):
                found[state] = int(count)
        return found

    # -- the alias ledger ---------------------------------------------------------------------

    def move_alias(
        self, model: str, alias: str, version: str, delivery: str | None = None
    ) -> str | None:
        """Record that ``model@alias`` now points at ``version``; the version it pointed at
        before, or None when it pointed nowhere known or already at ``version``."""
        return self.record_alias(model, alias, version, delivery)[0]

    def record_alias(
        self, model: str, alias: str, version: str, delivery: str | None = None
    ) -> tuple[str | None, bool]:
        """:meth:`move_alias`, and whether this delivery moved the alias: False when it already
        pointed at ``version`` by another delivery (a second webhook, a re-sent event), which
        changes nothing. The same ``delivery`` again (a sender retrying after the receiver
        failed to answer) gets the first answer.

        Compare-and-set: the ``UPDATE`` repeats the version just read, and an ``INSERT`` that
        meets a row another writer inserted first reads again, so two moves at once each
        report the version the other replaced, never the same one twice."""
        where = (_aliases.c.model == model, _aliases.c.alias == alias)
        columns = (_aliases.c.version, _aliases.c.previous, _aliases.c.delivery)
        while True:
            now = self._clock()
            try:
                with self._write() as conn:
                    row = conn.execute(sa.select(*columns).where(*where)).first()
                    if row is not None and delivery is not None and row.delivery == delivery:
                        return (None if row.previous is None else str(row.previous)), True
                    if row is not None and str(row.version) == version:
                        if row.delivery != SEEDED:
                            return None, False  # said again: nothing moves
                        # the event of the move the start-up read found: a move from an
                        # unknown version, made once (this delivery now owns the row)
                        taken = conn.execute(
                            sa.update(_aliases)
                            .where(*where, _aliases.c.delivery == SEEDED)
                            .values(delivery=delivery, updated=now)
                        )
                        if taken.rowcount != 1:
                            continue  # another delivery took it since the read: read again
                        return None, True
                    before = None if row is None else str(row.version)
                    values = {"version": version, "previous": before, "delivery": delivery}
                    if row is None:
                        conn.execute(
                            sa.insert(_aliases).values(
                                model=model, alias=alias, updated=now, **values
                            )
                        )
                    else:
                        moved = conn.execute(
                            sa.update(_aliases)
                            .where(*where, _aliases.c.version == before)
                            .values(updated=now, **values)
                        )
                        if moved.rowcount != 1:
                            continue  # moved by another writer since the read: read again
            except sa.exc.IntegrityError:
                continue  # inserted by another writer since the read: read again
            return before, True

    def now(self) -> float:
        """The store's clock: what ``updated`` and ``received`` are measured with."""
        return self._clock()

    def seed_alias(self, model: str, alias: str, version: str, read_at: float) -> bool:
        """Record where the registry said ``model@alias`` points, in a read that began at
        ``read_at`` (:meth:`now`): the registry is right about moves this receiver missed
        while it was down, but an event recorded since the read began is newer and is kept.
        The row is marked :data:`SEEDED`, so that the event of that same move, if it is still
        on its way, is taken as a move (the guard checks the version) rather than as said
        again. True when the ledger changed."""
        where = (_aliases.c.model == model, _aliases.c.alias == alias)
        values = {"version": version, "previous": None, "delivery": SEEDED}
        try:
            with self._write() as conn:
                row = conn.execute(
                    sa.select(_aliases.c.version, _aliases.c.updated).where(*where)
                ).first()
                if row is None:
                    conn.execute(
                        sa.insert(_aliases).values(
                            model=model, alias=alias, updated=self._clock(), **values
                        )
                    )
                    return True
                if str(row.version) == version or row.updated >= read_at:
                    return False
                changed = conn.execute(
                    sa.update(_aliases)
                    .where(*where, _aliases.c.updated == row.updated)
                    .values(updated=self._clock(), **values)
                )
                return bool(changed.rowcount == 1)
        except sa.exc.IntegrityError:
            return False  # an event inserted it since the read: newer

    def alias_version(self, model: str, alias: str) -> str | None:
        with self._read() as conn:
            version = conn.execute(
                sa.select(_aliases.c.version).where(
                    _aliases.c.model == model, _aliases.c.alias == alias
                )
            ).scalar()
        return None if version is None else str(version)

    def forget_alias(self, model: str, alias: str) -> None:
        """Drop the alias from the ledger (the alias was deleted)."""
        with self._write() as conn:
            conn.execute(
                sa.delete(_aliases).where(_aliases.c.model == model, _aliases.c.alias == alias)
            )

    # -- plumbing -----------------------------------------------------------------------------

    def _change(self, job_id: int, owner: str, **values: Any) -> bool:
        """Set ``values`` on the job if ``owner`` holds it, in one conditional UPDATE."""
        with self._write() as conn:
            changed = conn.execute(
                sa.update(_jobs)
                .where(
                    _jobs.c.id == job_id,
                    _jobs.c.state == "running",
                    _jobs.c.lease_owner == owner,
                )
                .values(**values)
            )
        return changed.rowcount == 1

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._read_guard, self._engine.connect() as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._write_guard, self._engine.connect() as conn:
            conn.execution_options(**{_WRITE: True})
            with conn.begin():
                yield conn


def _engine(url: sa.URL) -> tuple[Engine, bool]:
    """The engine for ``url``, and whether it is an in-memory SQLite database."""
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True), False
    database = url.database or ""
    memory = database in ("", ":memory:") or "mode=memory" in database
    if memory:  # one connection, or each thread would see its own empty database
        engine = sa.create_engine(
            url, connect_args={"check_same_thread": False}, poolclass=StaticPool
        )
    else:
        if not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30.0})
    sa.event.listen(engine, "connect", _sqlite_connect)
    sa.event.listen(engine, "begin", _sqlite_begin)
    return engine, memory


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # The sqlite3 module's own transaction handling starts transactions late and never with
    # IMMEDIATE; turn it off so that _sqlite_begin decides (SQLAlchemy's documented recipe).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.execute("PRAGMA journal_mode = WAL")  # readers never wait for the writer
    finally:
        cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get(_WRITE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _one(conn: Connection, condition: sa.ColumnElement[bool]) -> Job | None:
    row = conn.execute(sa.select(_jobs).where(condition)).first()
    return None if row is None else _job(row)


def _job(row: sa.Row[Any]) -> Job:
    values = row._mapping
    return Job(**{name: values[name] for name in _FIELDS})


def _same(column: sa.ColumnElement[Any], value: Any) -> sa.ColumnElement[bool]:
    return column.is_(None) if value is None else column == value


# The text between a ':' and the next '@' of a URL: the password, found even in a URL that
# SQLAlchemy cannot parse.
_PASSWORD = re.compile(r"(?<=:)[^/@\s]*(?=@)")


def _password(url: str) -> str | None:
    try:
        return sa.make_url(url).password
    except (sa.exc.ArgumentError, ValueError):
        match = _PASSWORD.search(url)
        return match.group() if match else None


def _shown(url: str) -> str:
    """``url`` as a message may quote it: password hidden."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except (sa.exc.ArgumentError, ValueError):
        return _PASSWORD.sub("***", url)


def _reason(exc: BaseException, password: str | None) -> str:
    """The first line of what the driver (or SQLAlchemy) said, without the password."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None:
        exc = exc.orig
    if isinstance(exc, ImportError):
        text = f"its driver is not installed ({exc})"
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    else:
        text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if password:
        text = text.replace(password, "***")
    return _PASSWORD.sub("***", text)


# -- lease owners -----------------------------------------------------------------------------


def process_token(pid: int) -> str | None:
    """The start time of process ``pid`` (field 22 of ``/proc/<pid>/stat``, in clock ticks
    since boot): with the pid, it names one process, since a pid is reused but never at the
    same tick. None where the process is gone or there is no ``/proc``."""
    if pid <= 0:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces and ')': split after
    # the last ')'; the first field there is field 3.
    fields = stat.rpartition(b")")[2].split()
    return fields[19].decode("ascii", "replace") if len(fields) > 19 else None


def this_owner() -> str:
    """The lease owner name of this process: ``host:pid:start-token``. A worker thread may
    append ``/<anything>`` to tell the threads of one process apart."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{process_token(pid) or ''}"


def owner_alive(owner: str) -> bool:
    """Whether the process named by ``owner`` (from :func:`this_owner`) still runs.

    True whenever this host cannot tell (another host, an owner name of another form, no
    ``/proc``): then the lease alone decides. Two hosts with one hostname sharing a database
    (containers given the same name) would misjudge each other, so give them distinct ones."""
    parts = owner.split("/", 1)[0].rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return True
    host, pid_text, token = parts
    if host != socket.gethostname():
        return True
    pid = int(pid_text)
    if not token:  # named where /proc was missing: the pid is all there is
        return _pid_exists(pid)
    current = process_token(pid)
    if current is None and not Path("/proc/self/stat").exists():
        return True
    return current == token


def _pid_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
