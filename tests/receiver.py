"""``dynaudit serve`` as a real process, for end-to-end tests of the webhook receiver.

The receiver must survive what a real one meets: a kill in the middle of a job, a restart on
the same database, a client that gets 401 or 413. So the tests run the actual command line in
a subprocess, on a free port of 127.0.0.1, with its database and state in the test's folder,
and talk to it over HTTP with urllib, as MLflow or the Hub would. Its output goes to
``serve.log`` (appended across restarts), which every failure quotes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.mlflowserver import free_port

__all__ = ["Receiver", "serve_command"]

ROOT = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 60
STOP_SECONDS = 20
LOG_TAIL = 4000  # characters of serve.log quoted in a failure


def serve_command() -> list[str]:
    """How the receiver is started; a test may stand something else in (see the self-test)."""
    return [sys.executable, "-m", "dynaudit", "serve"]


class Receiver:
    """``Receiver(tmp_path, ["--secret", s]).start()``; then ``.url``, ``.post(...)``."""

    def __init__(
        self,
        workdir: Path,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        command: Sequence[str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.args = list(args)
        self.env = dict(env or {})
        self.command = list(command) if command is not None else serve_command()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = f"sqlite:///{workdir / 'serve.db'}"
        self.state_dir = workdir / "state"
        self.log_path = workdir / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    # -- the process ---------------------------------------------------------------------------
    def argv(self) -> list[str]:
        return [
            *self.command, "--host", "127.0.0.1", "--port", str(self.port),
            "--db", self.db, "--state-dir", str(self.state_dir), *self.args,
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        """This checkout first on the path: the venv's editable install may point elsewhere."""
        paths = [str(ROOT), str(ROOT / "plugins")]
        if inherited := os.environ.get("PYTHONPATH"):
            paths.append(inherited)
        return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **self.env}

    def start(self) -> Receiver:
        """Start it and wait until ``GET /health`` answers 200."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT,
                env=self.environment(), cwd=self.workdir,
            )  # fmt: skip
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if (code := self.process.poll()) is not None:
                raise RuntimeError(
                    f"dynaudit serve exited with {code} before /health:\n{self.tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.kill()
        raise RuntimeError(
            f"dynaudit serve did not answer /health in {STARTUP_SECONDS} s:\n{self.tail()}"
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM killer would: no clean-up runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait()

    def stop(self) -> None:
        """SIGTERM, as systemd or Kubernetes would; SIGKILL after :data:`STOP_SECONDS`."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self) -> Receiver:
        """Stop (if running) and start again: same port, same database, same state folder."""
        self.stop()
        return self.start()

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self) -> str:
        return self.log()[-LOG_TAIL:]

    # -- HTTP ----------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        """Status and JSON body (None when the body is not JSON); 4xx and 5xx do not raise."""
        request = urllib.request.Request(
            f"{self.url}{path}", data=body, headers=dict(headers or {}), method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, _json_or_none(response.read())
        except urllib.error.HTTPError as error:
            with error:
                return error.code, _json_or_none(error.read())

    def get(self, path: str, token: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return self.request("GET", path, headers=headers)

    def post(
        self, path: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        return self.request(
            "POST", path, body, {"Content-Type": "application/json", **(headers or {})}
        )

    def jobs(self, token: str | None = None) -> list[dict[str, Any]]:
        """``GET /jobs``: the job list, whether the body is a list or ``{"jobs": [...]}``."""
        status, body = self.get("/jobs?limit=1000", token)
        if status != 200:
            raise AssertionError(f"GET /jobs answered {status}: {body}\n{self.tail()}")
        jobs = body["jobs"] if isinstance(body, dict) else body
        return list(jobs)

    def wait_job(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 120,
        token: str | None = None,
    ) -> dict[str, Any]:
        """The first job (from ``GET /jobs``) that satisfies ``predicate``, polled until
        ``timeout`` seconds; a timeout or a dead receiver fails with the log's tail."""
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while True:
            if not self.alive():
                raise AssertionError(f"dynaudit serve is not running; jobs {seen}\n{self.tail()}")
            seen = self.jobs(token)
            for job in seen:
                if predicate(job):
                    return job
            if time.monotonic() > deadline:
                raise AssertionError(f"no job matched in {timeout} s; jobs {seen}\n{self.tail()}")
            time.sleep(0.5)


def _json_or_none(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None
