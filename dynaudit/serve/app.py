"""The receiver's HTTP side: five routes on Starlette, served by uvicorn.

A delivery is answered fast and never runs a check: the body is read up to ``--max-body``
(413 beyond it, before reading when ``Content-Length`` says so), the signature or secret is
verified (401, logged without the secret), the event is parsed (400 when malformed, 200
``ignored`` when not ours), and the job is stored in one transaction before the 202. A
database that cannot take it answers 503, which both senders retry.

- ``POST /hooks/mlflow``: MLflow 3 registry webhooks (HMAC-signed).
- ``POST /hooks/hub``: Hugging Face Hub webhooks (``X-Webhook-Secret``).
- ``GET /health``: liveness and the database, no details.
- ``GET /jobs`` and ``GET /jobs/{id}``: read-only, ``Authorization: Bearer <--ops-token>``.

uvicorn's access log is off: it prints query strings, and a misconfigured sender may put a
secret there. Each request is one line of our own instead (peer, route, status, why)."""

from __future__ import annotations

import contextlib
import hmac
import logging
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dynaudit.errors import ExitCode, UsageError, printable
from dynaudit.secrets import remember, scrub

if TYPE_CHECKING:
    from dynaudit.serve.settings import ServeSettings
    from dynaudit.serve.store import Store
    from dynaudit.serve.worker import Pool

__all__ = ["build_app", "serve_forever"]

log = logging.getLogger("dynaudit.serve")
_NUMBER = re.compile(r"[1-9][0-9]{0,8}")  # a job id or a limit: ASCII digits, no overflow


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused past ``limit`` bytes: at once when ``Content-Length``
    announces more, else as soon as the stream (chunked, or lying) goes past it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not re.fullmatch(r"[0-9]{1,18}", declared):
            raise _Refused(400, "bad Content-Length")
        if int(declared) > limit:
            raise _Refused(413, f"body of {declared} bytes is over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _Refused(413, f"body over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(settings: ServeSettings, store: Store, pool: Pool | None) -> Starlette:
    """The routes over ``store``; ``pool`` (the workers) starts and stops with the app."""
    from dynaudit.serve import events
    from dynaudit.serve.verify import hub_secret_problem, mlflow_signature_problem

    guarded = set(settings.guards)

    def respond(request: Request, status: int, what: str, **body: Any) -> JSONResponse:
        peer = request.client.host if request.client else "?"
        detail = f" ({printable(what)})" if what else ""
        line = f"{peer} {request.method} {request.url.path} {status}{detail}"
        (log.warning if status in (401, 413) or status >= 500 else log.info)("%s", scrub(line))
        return JSONResponse(body or {"status": what}, status_code=status)

    async def receive(
        request: Request,
        label: str,
        secret: str | None,
        flag: str,
        verify: Callable[[str, bytes], str | None],
        parse: Callable[[bytes], Any],
        enqueue: Callable[[Any], str],
    ) -> Response:
        """One delivery: bounded body, authenticity, parsing, then the job stored."""
        if not secret:
            return respond(request, 404, f"{label}: webhooks off, no {flag}", error="not found")
        try:
            body = await _body(request, settings.max_body)
        except _Refused as refused:
            return respond(request, refused.status, refused.reason, error=refused.reason)
        problem = verify(secret, body)
        if problem:
            return respond(request, 401, f"refused {label}: {problem}", error="unauthorized")
        try:
            event = parse(body)
        except events.EventError as exc:
            return respond(request, 400, f"{label}: {exc}", error=str(exc))
        if isinstance(event, events.Ignored):
            return respond(request, 200, f"{label}: {event.reason}", ignored=event.reason)
        try:
            made = await run_in_threadpool(enqueue, event)
        except Exception as exc:  # the database: both senders retry a 5xx
            what = f"{label}: cannot store the job: {type(exc).__name__}"
            return respond(request, 503, what, error="job store unavailable")
        return respond(request, 202, f"{label}: {made}", accepted=made)

    async def mlflow_hook(request: Request) -> Response:
        delivery = printable(request.headers.get("x-mlflow-delivery-id", "?"))[:64]
        return await receive(
            request,
            f"MLflow delivery {delivery}",
            settings.mlflow_secret,
            "--mlflow-secret",
            lambda secret, body: mlflow_signature_problem(secret, body, request.headers),
            events.parse_mlflow,
            lambda event: _enqueue_mlflow(store, event, delivery, guarded),
        )

    async def hub_hook(request: Request) -> Response:
        return await receive(
            request,
            "Hub delivery",
            settings.hub_secret,
            "--hub-secret",
            lambda secret, body: hub_secret_problem(secret, request.headers),
            lambda body: events.parse_hub(body, settings.hub_branches),
            lambda pushes: _enqueue_hub(store, pushes),
        )

    async def health(request: Request) -> Response:
        ok = await run_in_threadpool(store.ping)
        return JSONResponse(
            {"status": "ok" if ok else "database unavailable"}, status_code=200 if ok else 503
        )

    def allowed(request: Request) -> Response | None:
        if not settings.ops_token:
            return respond(request, 404, "/jobs is off: no --ops-token", error="not found")
        given = request.headers.get("authorization", "")
        expected = f"Bearer {settings.ops_token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return respond(
                request, 401, "refused /jobs: missing or wrong token", error="unauthorized"
            )
        return None

    async def jobs(request: Request) -> Response:
        if (refused := allowed(request)) is not None:
            return refused
        state = request.query_params.get("state")
        limit = request.query_params.get("limit", "100")
        if state not in (None, "queued", "running", "done", "error") or not _NUMBER.fullmatch(
            limit
        ):
            return JSONResponse(
                {"error": "state is queued|running|done|error; limit a number from 1"},
                status_code=400,
            )
        found = await run_in_threadpool(
            lambda: store.jobs(state=state, limit=min(int(limit), 1000))
        )
        counts = await run_in_threadpool(store.counts)
        return JSONResponse(
            {"kind": "jobs", "counts": counts, "jobs": [_shown(job.as_dict()) for job in found]}
        )

    async def job(request: Request) -> Response:
        if (refused := allowed(request)) is not None:
            return refused
        raw = request.path_params["job_id"]
        found = await run_in_threadpool(store.job, int(raw)) if _NUMBER.fullmatch(raw) else None
        if found is None:
            return JSONResponse({"error": "no such job"}, status_code=404)
        return JSONResponse(_shown(found.as_dict()))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if pool is not None:
            await run_in_threadpool(pool.start)
        try:
            yield
        finally:
            if pool is not None:
                await run_in_threadpool(pool.stop)

    routes = [
        Route("/hooks/mlflow", mlflow_hook, methods=["POST"]),
        Route("/hooks/hub", hub_hook, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/jobs", jobs, methods=["GET"]),
        Route("/jobs/{job_id}", job, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def _shown(job: dict[str, Any]) -> dict[str, Any]:
    """A job as ``/jobs`` shows it: the reason scrubbed again (it quotes servers)."""
    if isinstance(job.get("reason"), str):
        job["reason"] = scrub(job["reason"])
    return job


def _enqueue_mlflow(store: Store, event: Any, delivery: str, guarded: set[str]) -> str:
    """One MLflow event to jobs; returns what was done, for the response and the log."""
    from dynaudit.serve import events

    if delivery != "?" and store.delivery_seen(delivery):
        return "a delivery handled before: nothing changed"  # an old alias move must not replay
    if isinstance(event, events.AliasDeleted):
        store.forget_alias(event.name, event.alias)
        made = f"{event.name}@{event.alias} deleted"
    elif isinstance(event, events.VersionCreated):
        job, created = store.enqueue(
            events.version_key(event.name, event.version),
            "mlflow",
            {"name": event.name, "version": event.version},
        )
        made = f"job {job.id} {'queued' if created else 'already known'}"
    else:  # AliasSet: a new alias or a moved one
        known = None if delivery == "?" else delivery
        # the same move said again (another webhook, a re-sent event) moves nothing: one guard
        previous, moved = store.record_alias(event.name, event.alias, event.version, known)
        job, created = store.enqueue(
            events.version_key(event.name, event.version),
            "mlflow",
            {"name": event.name, "version": event.version},
        )
        made = f"{event.name}@{event.alias} -> {event.version}; check job {job.id}"
        if event.alias in guarded and moved:
            subject = {
                "name": event.name,
                "alias": event.alias,
                "version": event.version,
                "previous": previous,
            }
            guard, _ = store.enqueue(
                events.guard_key(event.name, event.alias, event.version, delivery), "guard", subject
            )
            made += f"; guard job {guard.id}"
    if delivery != "?":
        store.seen_delivery(delivery, "mlflow")  # recorded once handled, not before
    return made


def _enqueue_hub(store: Store, pushes: list[Any]) -> str:
    from dynaudit.serve import events

    made = []
    for push in pushes:
        job, created = store.enqueue(
            events.hub_key(push.repo, push.sha),
            "hub",
            {"repo": push.repo, "sha": push.sha, "ref": push.ref},
        )
        made.append(f"job {job.id} {'queued' if created else 'already known'}")
    return ", ".join(made)


# -- running it ---------------------------------------------------------------------------


class _Lines(logging.Handler):
    """The receiver's log: one timestamped line per record on stderr, escaped and scrubbed."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
            text = scrub(printable(record.getMessage()))
            sys.stderr.write(f"{stamp} {record.levelname.lower()} {text}\n")
            sys.stderr.flush()
        except Exception:  # a log line must never end the receiver
            self.handleError(record)


def _logging() -> Callable[[], None]:
    handler = _Lines()
    names = ("dynaudit.serve", "uvicorn", "uvicorn.error")
    saved = []
    for name in names:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO if name == "dynaudit.serve" else logging.WARNING)

    def undo() -> None:
        for logger, level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate

    return undo


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, made here so a taken port is one line, not a uvicorn trace."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port"
        ) from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve_forever(settings: ServeSettings) -> ExitCode:
    from dynaudit.serve.store import Store
    from dynaudit.serve.worker import Pool
    from dynaudit.serve.writeback import WriteBack

    for secret in (
        settings.mlflow_secret,
        settings.hub_secret,
        settings.ops_token,
        settings.hf_token,
    ):
        remember(token=secret)  # scrubbed from every line, in every encoding
    undo = _logging()
    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        store = Store(settings.database)
        pool = Pool(store, settings, WriteBack(settings, store))
        if settings.mlflow_secret and settings.mlflow_secret == settings.hub_secret:
            log.warning(
                "one secret serves both webhooks (--secret): the Hub sends its secret as it "
                "is, so whoever can read a Hub webhook's settings could sign MLflow events; "
                "give each its own (--mlflow-secret, --hub-secret)"
            )
        sock = _listen(settings.host, settings.port)
        app = build_app(settings, store, pool)
        config = uvicorn.Config(
            app, access_log=False, log_config=None, lifespan="on", timeout_graceful_shutdown=5
        )
        hooks = [
            name
            for name, on in (
                ("/hooks/mlflow", settings.mlflow_secret),
                ("/hooks/hub", settings.hub_secret),
            )
            if on
        ]
        log.info(
            "dynaudit serve: listening on http://%s:%d (%s); %d worker(s); jobs in %s",
            settings.host,
            settings.port,
            ", ".join(hooks),
            settings.workers,
            _redacted(settings.database),
        )
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGTERM it handled
            _Server(config, pool).run(sockets=[sock])
        store.close()
        log.info("dynaudit serve: stopped")
    finally:
        undo()
    return ExitCode.OK


class _Server(uvicorn.Server):
    """uvicorn's server, telling the workers at the first signal: they stop claiming, and a
    check that the same signal reached (a process group, a cgroup) is an interruption, not a
    failed attempt."""

    def __init__(self, config: uvicorn.Config, pool: Pool) -> None:
        super().__init__(config)
        self.pool = pool

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.pool.stopping.set()
        super().handle_exit(sig, frame)


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    with contextlib.suppress(Exception):
        return make_url(url).render_as_string(hide_password=True)
    return "the database"
