"""A real ``mlflow server`` for tests: sqlite backend, local artifacts, job execution off.

The server runs on this interpreter, or on ``DYNAUDIT_MLFLOW_SERVER_PYTHON`` when set: a client
environment with ``mlflow-skinny`` alone (an MLflow 2.x client, say) has no server, so the
compatibility runs point it at an interpreter that has one.

Webhooks (MLflow 3) need :data:`WEBHOOK_ENV` passed as ``env``: by default the server refuses
to deliver to ``http://`` or to a loopback address."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

STARTUP_SECONDS = 90

WEBHOOK_ENV: dict[str, str] = {
    # Deliveries go to a receiver on http://127.0.0.1, which MLflow refuses by default.
    "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
    "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
    # A test key, published here on purpose. It must be fixed: without one, each server process
    # encrypts webhook secrets with a key of its own, and after a restart every delivery fails
    # to decrypt its secret (InvalidToken in the server log) and is dropped without a word.
    "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": "Wj64ddUgXX6tpgmeMtoFU0VCJPu_eZ1TCt9zTq4PGDE=",
    # Seconds the server caches the webhook list of an event (an int; default 60): creating
    # or deleting a webhook does not clear it, so a test would otherwise wait a minute.
    "MLFLOW_WEBHOOK_CACHE_TTL": "1",
    # Attempts after the first on 429/5xx or a connection error (default 3), backoff 1 s doubling.
    "MLFLOW_WEBHOOK_REQUEST_MAX_RETRIES": "2",
}
"""Server environment for webhook tests: ``MlflowServer(workdir, env=WEBHOOK_ENV)``."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MlflowServer:
    """``MlflowServer(workdir).start()``; ``env`` adds variables to the server's environment."""

    def __init__(self, workdir: Path, env: Mapping[str, str] | None = None) -> None:
        self.workdir = workdir
        self.env = dict(env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> MlflowServer:
        artifacts = self.workdir / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            **self.env,
        }
        python = os.environ.get("DYNAUDIT_MLFLOW_SERVER_PYTHON") or sys.executable
        command = [
            python, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--artifacts-destination", artifacts.as_uri(),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        with self.log.open("ab") as log:  # appended: a restart keeps the earlier log
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
            )
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self) -> MlflowServer:
        """Stop, then start again on the same port with the same database and artifacts."""
        self.stop()
        return self.start()
