"""The job store on real SQLite files (and on PostgreSQL when DYNAUDIT_TEST_PG_URL names one):
one job per key, leases that only their owner can use, no job claimed twice by concurrent
workers, recovery after a crash, and errors that never show the database password."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sa = pytest.importorskip("sqlalchemy")

from dynaudit import secrets  # noqa: E402
from dynaudit.errors import ExitCode, UsageError  # noqa: E402
from dynaudit.serve import store as store_module  # noqa: E402
from dynaudit.serve.store import (  # noqa: E402
    Store,
    owner_alive,
    process_token,
    this_owner,
)

PG_URL = os.environ.get("DYNAUDIT_TEST_PG_URL")
HAS_PROC = Path("/proc/self/stat").exists()


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'serve.db'}"
    if not PG_URL:
        pytest.skip("DYNAUDIT_TEST_PG_URL is not set")
    engine = sa.create_engine(PG_URL)  # a fresh schema for every test
    store_module._metadata.drop_all(engine)
    engine.dispose()
    return PG_URL


@pytest.fixture
def store(url: str, clock: Clock) -> Iterator[Store]:
    opened = Store(url, clock=clock)
    yield opened
    opened.close()


def test_enqueue_twice_makes_one_job(store: Store) -> None:
    first, created = store.enqueue("mlflow:m/1", "mlflow", {"name": "m", "version": "1"})
    assert created
    assert (first.state, first.phase, first.attempts) == ("queued", "queued", 0)
    again, created = store.enqueue("mlflow:m/1", "mlflow", {"name": "other"})
    assert not created
    assert again == first  # the first subject is kept
    claimed = store.claim("w", 60)
    assert claimed is not None
    assert store.finish(claimed.id, "w", "done", verdict="pass")
    done, created = store.enqueue("mlflow:m/1", "mlflow", {})
    assert not created
    assert (done.state, done.verdict) == ("done", "pass")  # whatever its state
    assert len(store.jobs()) == 1


def test_claim_takes_the_oldest_ready_job(store: Store, clock: Clock) -> None:
    later, _ = store.enqueue("k:later", "mlflow", {}, not_before=clock.now + 10)
    first, _ = store.enqueue("k:first", "mlflow", {})
    second, _ = store.enqueue("k:second", "hub", {})
    job = store.claim("w", 60)
    assert job is not None
    assert job.id == first.id
    assert (job.state, job.attempts, job.lease_owner) == ("running", 1, "w")
    assert job.lease_until == clock.now + 60
    assert job.phase == "queued"  # the worker's to set
    job = store.claim("w", 60)
    assert job is not None and job.id == second.id
    assert store.claim("w", 60) is None  # "later" may not start yet
    clock.now += 10
    job = store.claim("w", 60)
    assert job is not None and job.id == later.id
    assert store.claim("w", 60) is None


def test_concurrent_workers_never_claim_one_job_twice(url: str, clock: Clock) -> None:
    # Two Store objects on one database stand for two processes; two threads share each.
    stores = [Store(url, clock=clock), Store(url, clock=clock)]
    expected = {stores[0].enqueue(f"k:{i}", "mlflow", {"i": i})[0].id for i in range(50)}
    claimed: list[list[int]] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(index: int) -> None:
        try:
            start.wait()
            while (job := stores[index % 2].claim(f"w{index}", 60)) is not None:
                claimed[index].append(job.id)
                assert job.lease_owner == f"w{index}"
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    every = [job_id for ids in claimed for job_id in ids]
    assert sorted(every) == sorted(expected)  # each once: no job twice, none left behind
    assert stores[1].counts() == {"queued": 0, "running": 50, "done": 0, "error": 0}
    assert {job.attempts for job in stores[1].jobs(limit=100)} == {1}
    for opened in stores:
        opened.close()


def test_only_the_owner_changes_a_leased_job(store: Store, clock: Clock) -> None:
    store.enqueue("k", "mlflow", {})
    job = store.claim("mine", 60)
    assert job is not None
    assert not store.renew(job.id, "theirs", 60)
    assert not store.update(job.id, "theirs", phase="checked")
    assert not store.finish(job.id, "theirs", "done")
    assert not store.release(job.id, "theirs", delay_s=5)
    assert store.job(job.id) == job  # untouched
    clock.now += 30
    assert store.renew(job.id, "mine", 60)
    renewed = store.job(job.id)
    assert renewed is not None and renewed.lease_until == clock.now + 60
    assert store.finish(job.id, "mine", "error", reason="crashed")
    # finished: nobody holds it any more, its owner included
    assert not store.renew(job.id, "mine", 60)
    assert not store.update(job.id, "mine", phase="x")
    assert not store.finish(job.id, "mine", "done")
    assert not store.renew(12345, "mine", 60)  # no such job


def test_update_sets_only_known_fields(store: Store) -> None:
    store.enqueue("k", "hub", {"repo": "a/b"})
    job = store.claim("w", 60)
    assert job is not None
    assert store.update(
        job.id,
        "w",
        phase="checked",
        pid=4321,
        pid_start="777",
        report_dir="/tmp/attempt-1",
        run_id="abc",
        verdict="fail",
        reason="damage",
        subject={"repo": "a/b", "discussion": 3},
    )
    updated = store.job(job.id)
    assert updated is not None
    assert (updated.phase, updated.pid, updated.pid_start) == ("checked", 4321, "777")
    assert (updated.report_dir, updated.run_id) == ("/tmp/attempt-1", "abc")
    assert (updated.verdict, updated.reason) == ("fail", "damage")
    assert updated.subject == {"repo": "a/b", "discussion": 3}
    with pytest.raises(TypeError, match="state"):
        store.update(job.id, "w", state="done")
    with pytest.raises(ValueError, match="verdict"):
        store.update(job.id, "w", verdict="maybe")


def test_finish_clears_the_lease_and_keeps_the_recorded_verdict(store: Store) -> None:
    store.enqueue("k", "mlflow", {})
    job = store.claim("w", 60)
    assert job is not None
    store.update(job.id, "w", pid=99, pid_start="5", verdict="pass", reason="old")
    assert store.finish(job.id, "w", "done")
    done = store.job(job.id)
    assert done is not None
    assert (done.state, done.verdict, done.reason) == ("done", "pass", None)
    assert (done.lease_owner, done.lease_until, done.pid, done.pid_start) == (None,) * 4
    with pytest.raises(ValueError, match="done or error"):
        store.finish(job.id, "w", "queued")  # type: ignore[arg-type]


def test_release_postpones_and_keeps_attempts(store: Store, clock: Clock) -> None:
    store.enqueue("k", "mlflow", {})
    job = store.claim("w", 60)
    assert job is not None
    store.update(job.id, "w", phase="checking", pid=7)
    assert store.release(job.id, "w", delay_s=30, reason="version not READY")
    released = store.job(job.id)
    assert released is not None
    assert (released.state, released.attempts, released.phase) == ("queued", 1, "checking")
    assert (released.lease_owner, released.pid, released.reason) == (
        None,
        None,
        "version not READY",
    )
    assert released.not_before == clock.now + 30
    assert store.claim("w", 60) is None
    clock.now += 30
    again = store.claim("w2", 60)
    assert again is not None and (again.id, again.attempts) == (job.id, 2)


def test_expired_lease_is_requeued_with_the_pid_to_kill(store: Store, clock: Clock) -> None:
    store.enqueue("k", "mlflow", {})
    job = store.claim("w", 60)
    assert job is not None
    store.update(job.id, "w", phase="checking", pid=4242, pid_start="99")
    clock.now += 60
    assert store.requeue_stale() == []  # the lease ends after 60 s, not at
    clock.now += 1
    stale = store.requeue_stale()
    assert [j.id for j in stale] == [job.id]
    assert (stale[0].state, stale[0].lease_owner) == ("running", "w")  # as it was
    assert (stale[0].pid, stale[0].pid_start) == (4242, "99")
    row = store.job(job.id)
    assert row is not None
    assert (row.state, row.lease_owner, row.lease_until) == ("queued", None, None)
    assert (row.pid, row.pid_start, row.phase) == (None, None, "checking")
    assert not store.renew(job.id, "w", 60)  # the old worker has lost it
    assert store.requeue_stale() == []
    again = store.claim("w2", 60)
    assert again is not None and again.attempts == 2


def test_dead_owner_is_requeued_at_once(store: Store) -> None:
    store.enqueue("a", "mlflow", {})
    store.enqueue("b", "mlflow", {})
    store.enqueue("c", "mlflow", {})
    for owner in ("dead", "dead", "alive"):
        assert store.claim(owner, 3600) is not None
    asked: list[str] = []

    def alive(owner: str) -> bool:
        asked.append(owner)
        return owner != "dead"

    stale = store.requeue_stale(alive)
    assert sorted(job.key for job in stale) == ["a", "b"]
    assert sorted(asked) == ["alive", "dead"]  # once per owner
    assert store.counts() == {"queued": 2, "running": 1, "done": 0, "error": 0}
    assert store.requeue_stale(lambda owner: True) == []


def test_seen_delivery_reports_duplicates(store: Store) -> None:
    assert not store.seen_delivery("d-1", "mlflow")
    assert store.seen_delivery("d-1", "mlflow")
    assert store.seen_delivery("d-1", "hub")  # one id space
    assert not store.seen_delivery("d-2", "hub")


def test_move_alias_returns_the_version_it_replaced(store: Store) -> None:
    assert store.alias_version("m", "champion") is None
    assert store.move_alias("m", "champion", "3") is None
    assert store.move_alias("m", "champion", "3") is None  # the same version
    assert store.move_alias("m", "champion", "7") == "3"
    assert store.alias_version("m", "champion") == "7"
    assert store.move_alias("m", "staging", "7") is None  # each alias its own
    assert store.move_alias("other", "champion", "1") is None  # each model its own
    store.forget_alias("m", "champion")
    assert store.alias_version("m", "champion") is None
    assert store.alias_version("m", "staging") == "7"
    store.forget_alias("m", "champion")  # forgetting twice is fine


def test_an_alias_read_at_start_up_is_the_version_a_later_move_replaced(
    store: Store, clock: Clock
) -> None:
    """The guard's ledger seeded from the registry: a later move reports the seeded version as
    the one to go back to; the registry corrects a ledger that missed moves (the receiver was
    down), but not an event recorded after the read began; the event of the seeded move
    itself, still on its way, counts once as a move from an unknown version."""
    read_at = store.now()
    assert store.seed_alias("m", "champion", "3", read_at)
    assert not store.seed_alias("m", "champion", "3", read_at)  # the same: nothing changes
    assert store.record_alias("m", "champion", "3", "d1") == (None, True)  # the seeded move
    assert store.record_alias("m", "champion", "3", "d1") == (None, True)  # its retry
    assert store.record_alias("m", "champion", "3", "d2") == (None, False)  # said again
    assert store.record_alias("m", "champion", "4", "d3") == ("3", True)

    store.move_alias("n", "champion", "2")  # then the receiver was down while it moved to 5
    clock.now += 60
    read_at = store.now()
    assert store.seed_alias("n", "champion", "5", read_at)
    assert store.record_alias("n", "champion", "6") == ("5", True)

    read_at = store.now()  # a read that began before an event was recorded
    clock.now += 1
    store.move_alias("n", "champion", "7")
    assert not store.seed_alias("n", "champion", "6", read_at)
    assert store.alias_version("n", "champion") == "7"


def test_counts_and_listing(store: Store) -> None:
    assert store.counts() == {"queued": 0, "running": 0, "done": 0, "error": 0}
    ids = [store.enqueue(f"k{i}", "mlflow", {})[0].id for i in range(4)]
    first = store.claim("w", 60)
    second = store.claim("w", 60)
    assert first is not None and second is not None
    store.finish(first.id, "w", "done", verdict="pass")
    assert store.counts() == {"queued": 2, "running": 1, "done": 1, "error": 0}
    assert [job.id for job in store.jobs()] == ids[::-1]  # newest first
    assert [job.id for job in store.jobs(limit=2)] == ids[:1:-1]
    assert [job.id for job in store.jobs(state="queued")] == ids[:1:-1]
    assert [job.id for job in store.jobs(state="done")] == [ids[0]]
    with pytest.raises(ValueError, match="unknown job state"):
        store.jobs(state="lost")
    with pytest.raises(ValueError, match="limit"):
        store.jobs(limit=0)


def test_as_dict_is_json(store: Store) -> None:
    job, _ = store.enqueue("hub:a/b@0123", "hub", {"repo": "a/b", "refs": ["main"]})
    data = job.as_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["subject"] == {"repo": "a/b", "refs": ["main"]}
    assert data["key"] == "hub:a/b@0123" and data["state"] == "queued"


def test_a_restarted_store_sees_the_jobs(url: str, clock: Clock) -> None:
    before = Store(url, clock=clock)
    queued, _ = before.enqueue("k:1", "mlflow", {"name": "m"})
    before.enqueue("k:2", "mlflow", {})
    running = before.claim("old", 60)
    before.seen_delivery("d", "mlflow")
    before.move_alias("m", "champion", "2")
    assert before.ping()
    before.close()
    after = Store(url, clock=clock)  # the tables exist: created once, kept
    assert after.job(queued.id) == running
    assert after.counts() == {"queued": 1, "running": 1, "done": 0, "error": 0}
    assert after.seen_delivery("d", "mlflow")
    assert after.alias_version("m", "champion") == "2"
    assert after.by_key("k:2") is not None and after.by_key("k:3") is None
    after.close()


def test_sqlite_file_uses_wal_and_creates_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "serve.db"
    opened = Store(f"sqlite:///{path}")
    opened.enqueue("k", "mlflow", {})
    assert path.exists()
    with opened._read() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    opened.close()


def test_in_memory_store_is_one_database_for_every_thread() -> None:
    opened = Store("sqlite://")
    opened.enqueue("k", "mlflow", {})
    found: list[object] = []
    thread = threading.Thread(target=lambda: found.append(opened.claim("w", 60)))
    thread.start()
    thread.join()
    assert found and found[0] is not None
    opened.close()


@pytest.fixture
def no_remembered_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets, "_given", set())
    monkeypatch.setattr(secrets, "_given_uris", set())


@pytest.mark.usefixtures("no_remembered_secrets")
@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("nosuchdialect://x", "nosuchdialect"),
        ("not a url", "could not parse"),
        ("postgresql://user:hunter2@127.0.0.1:1/db", "postgresql://user:***@127.0.0.1:1/db"),
        ("postgresql+psycopg://user:hunter2@127.0.0.1:1/db", "user:***@"),
        ("nosuchdialect://user:hunter2@host/db", "user:***@host"),
    ],
)
def test_an_unusable_url_is_a_one_line_usage_error(bad: str, says: str) -> None:
    # Without a PostgreSQL driver the error is the missing module; with one, the refused
    # connection to port 1. Either way one line, and never the password.
    with pytest.raises(UsageError) as caught:
        Store(bad)
    message = str(caught.value)
    assert caught.value.exit_code == ExitCode.USAGE
    assert "\n" not in message and "\\n" not in message
    assert "hunter2" not in message
    assert says.lower() in message.lower()
    assert message.startswith("cannot use the job database")
    if "hunter2" in bad:  # and the log scrubber now knows it
        assert "hunter2" in secrets.secret_values({})


def test_an_unwritable_path_is_a_usage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(UsageError, match="cannot use the job database") as caught:
        Store(f"sqlite:///{blocker / 'sub' / 'serve.db'}")
    assert "\n" not in str(caught.value)
    with pytest.raises(UsageError, match="cannot use the job database"):
        Store(f"sqlite:///{blocker}")  # a file that is not a database


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc")
def test_process_token_names_one_process() -> None:
    token = process_token(os.getpid())
    assert token is not None and token.isdigit()
    assert process_token(os.getpid()) == token  # stable
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_token(child.pid) is None  # gone (and reaped)
    assert process_token(0) is None
    assert process_token(-1) is None


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc")
def test_owner_alive() -> None:
    me = this_owner()
    host, pid, token = me.rsplit(":", 2)
    assert (host, int(pid)) == (socket.gethostname(), os.getpid()) and token
    assert owner_alive(me)
    assert owner_alive(f"{me}/worker-2")  # a thread's suffix
    assert not owner_alive(f"{host}:{pid}:{int(token) + 1}")  # the pid, reused
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not owner_alive(f"{host}:{child.pid}:{token}")  # gone
    assert owner_alive(f"another-{host}:{child.pid}:{token}")  # cannot tell: the lease decides
    assert owner_alive("w1")  # not a name this host can judge
    assert owner_alive(f"{host}:{os.getpid()}:")  # named without /proc: the pid is alive
    assert not owner_alive(f"{host}:{child.pid}:")


_CLAIMER = """
import sys
from dynaudit.serve.store import Store
store = Store(sys.argv[1])
sys.stdin.readline()  # start together
while (job := store.claim(sys.argv[2], 60)) is not None:
    print(job.id, flush=True)
"""


def test_processes_never_claim_one_job_twice(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    opened = Store(url)
    expected = {opened.enqueue(f"k:{i}", "mlflow", {})[0].id for i in range(60)}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    claimers = [
        subprocess.Popen(
            [sys.executable, "-c", _CLAIMER, url, f"p{i}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    for claimer in claimers:
        assert claimer.stdin is not None
        claimer.stdin.write("go\n")
        claimer.stdin.flush()
    outputs = [claimer.communicate(timeout=120)[0] for claimer in claimers]
    assert [claimer.returncode for claimer in claimers] == [0, 0]
    every = [int(line) for output in outputs for line in output.split()]
    assert sorted(every) == sorted(expected)
    assert {job.lease_owner for job in opened.jobs(limit=100)} <= {"p0", "p1"}
    opened.close()
