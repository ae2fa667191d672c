"""The test servers the ``dynaudit serve`` end-to-end tests stand on, each proved on its own:
an MLflow server that delivers webhooks to localhost (also after a restart), the fault proxy,
the receiver's process harness, and the local Hub's webhooks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.faultproxy import FaultProxy
from tests.hubserver import LocalHub
from tests.mlflowserver import WEBHOOK_ENV, MlflowServer
from tests.receiver import Receiver


class Listener:
    """A stdlib endpoint that answers 200 to every POST and keeps (path, headers, body)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self._arrived = threading.Condition()
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with listener._arrived:
                    listener.received.append((self.path, dict(self.headers.items()), body))
                    listener._arrived.notify_all()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def wait(self, n: int, timeout: float = 30) -> list[tuple[str, dict[str, str], bytes]]:
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.received) >= n, timeout):
                raise AssertionError(f"{len(self.received)} deliveries arrived, not {n}")
            return list(self.received)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.stop()


# -- MlflowServer with WEBHOOK_ENV ---------------------------------------------------------------
@pytest.mark.slow
def test_mlflow_delivers_webhooks_to_localhost_and_after_a_restart(
    tmp_path: Path, listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The two traps: a default server refuses http://127.0.0.1, and one without a fixed key
    cannot read its webhook secrets after a restart."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = MlflowServer(tmp_path, env=WEBHOOK_ENV).start()
    try:
        client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
        hook = client.create_webhook(
            "dynaudit", listener.url, ["model_version.created"], secret="s3cret"
        )
        client.create_registered_model("m")
        run = client.create_run(client.create_experiment("e"))
        client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
        path, headers, body = listener.wait(1)[0]
        assert path == "/hook" and "X-MLflow-Signature" in headers
        assert json.loads(body)["data"]["version"] == "1"

        server.restart()
        assert client.test_webhook(hook.webhook_id).success  # the secret still decrypts
        client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
        arrived = listener.wait(3)
        assert [json.loads(b)["data"]["version"] for _, _, b in arrived[1:]] == ["1", "2"]
    finally:
        server.stop()
    assert "InvalidToken" not in server.log.read_text()


# -- FaultProxy ----------------------------------------------------------------------------------
def test_fault_proxy_forwards_and_refuses_armed_routes(
    mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with FaultProxy(mlflow_server.url) as proxy:
        client = MlflowClient(tracking_uri=proxy.url)
        experiment = client.create_experiment("through-the-proxy")

        proxy.arm(["/experiments/create"])
        with pytest.raises(MlflowException):
            client.create_experiment("refused")
        assert proxy.refused == 1
        assert client.get_experiment(experiment).name == "through-the-proxy"  # others pass

        proxy.disarm()
        client.create_experiment("after")
        assert proxy.refused == 1

        # An artifact upload is a PUT of the file, its download a GET: both go through whole.
        data = bytes(range(256)) * 12_000  # 3 MB
        (tmp_path / "blob.bin").write_bytes(data)
        run = client.create_run(experiment)
        client.log_artifact(run.info.run_id, str(tmp_path / "blob.bin"))
        fetched = client.download_artifacts(run.info.run_id, "blob.bin", str(tmp_path / "out"))
        assert Path(fetched).read_bytes() == data
        assert {"PUT", "GET", "POST"} <= {r.method for r in proxy.requests}


def test_fault_proxy_refuses_a_bounded_number_of_times(mlflow_server: MlflowServer) -> None:
    with FaultProxy(mlflow_server.url) as proxy:
        proxy.arm(["/health"], status=500, times=2)
        statuses = []
        for _ in range(3):
            try:
                with urllib.request.urlopen(f"{proxy.url}/health?x=1", timeout=10) as response:
                    statuses.append(response.status)
            except urllib.error.HTTPError as error:
                statuses.append(error.code)
        assert statuses == [500, 500, 200]
        head = urllib.request.Request(f"{proxy.url}/health", method="HEAD")
        with urllib.request.urlopen(head, timeout=10) as response:
            assert response.status == 200 and response.read() == b""
        assert proxy.refused == 2


def test_fault_proxy_answers_502_when_the_target_is_gone() -> None:
    from tests.mlflowserver import free_port

    with FaultProxy(f"http://127.0.0.1:{free_port()}") as proxy:
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(f"{proxy.url}/anything", timeout=10)
        assert raised.value.code == 502


# -- Receiver ------------------------------------------------------------------------------------
STUB = textwrap.dedent(
    """
    # Stands in for `dynaudit serve` to test the harness: same flags, a few routes.
    import argparse, json, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from pathlib import Path

    parser = argparse.ArgumentParser()
    for flag in ("--host", "--port", "--db", "--state-dir"):
        parser.add_argument(flag)
    parser.add_argument("--fail", action="store_true")
    args = parser.parse_args()
    if args.fail:
        sys.exit("stub: told to fail")
    state = Path(args.state_dir)
    state.mkdir(exist_ok=True)
    starts = len(list(state.iterdir())) + 1
    (state / f"start{starts}").write_text(args.db)
    born = time.monotonic()

    class Handler(BaseHTTPRequestHandler):
        def answer(self, status, data):
            body = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                self.answer(200, {"status": "ok", "starts": starts})
            elif self.path.startswith("/jobs"):
                if self.headers.get("Authorization") != "Bearer tok":
                    self.answer(401, {"error": "unauthorized"})
                else:
                    late = time.monotonic() - born > 1
                    self.answer(200, {"jobs": [{"id": 1, "state": "done" if late else "running"}]})
            else:
                self.answer(404, {"error": "no such route"})

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            self.answer(202, {"bytes": len(body), "secret": self.headers.get("X-Webhook-Secret")})

    print("stub listening", flush=True)
    ThreadingHTTPServer((args.host, int(args.port)), Handler).serve_forever()
    """
)


@pytest.fixture
def stub(tmp_path: Path) -> list[str]:
    script = tmp_path / "stub_serve.py"
    script.write_text(STUB)
    return [sys.executable, str(script)]


def test_receiver_harness_starts_talks_restarts_and_kills(tmp_path: Path, stub: list[str]) -> None:
    receiver = Receiver(tmp_path / "r", [], command=stub).start()
    try:
        assert receiver.get("/health") == (200, {"status": "ok", "starts": 1})
        assert receiver.get("/nope")[0] == 404  # no exception on 4xx
        assert receiver.get("/jobs", token="wrong") == (401, {"error": "unauthorized"})
        status, body = receiver.post("/hooks/hub", b"{}", {"X-Webhook-Secret": "s"})
        assert (status, body) == (202, {"bytes": 2, "secret": "s"})
        assert receiver.wait_job(lambda job: job["state"] == "done", token="tok")["id"] == 1
        with pytest.raises(AssertionError, match="no job matched"):
            receiver.wait_job(lambda job: job["state"] == "error", timeout=1, token="tok")

        port = receiver.port
        receiver.restart()
        assert receiver.port == port and receiver.get("/health")[1]["starts"] == 2
        db = (tmp_path / "r" / "state" / "start2").read_text()
        assert db == f"sqlite:///{tmp_path / 'r' / 'serve.db'}"

        receiver.kill()
        assert not receiver.alive()
        with pytest.raises(AssertionError, match="not running"):
            receiver.wait_job(lambda job: True, token="tok")
        assert receiver.log().count("stub listening") == 2  # the log is kept across starts
    finally:
        receiver.stop()


def test_receiver_that_exits_early_fails_with_its_log(tmp_path: Path, stub: list[str]) -> None:
    with pytest.raises(RuntimeError, match=r"exited with 1 before /health:\n.*told to fail"):
        Receiver(tmp_path, ["--fail"], command=stub).start()


def _serve_exists(tmp_path: Path) -> bool:
    harness = Receiver(tmp_path, [])
    proc = subprocess.run(
        [*harness.command, "--help"],
        capture_output=True, env=harness.environment(), timeout=120,
    )  # fmt: skip
    return proc.returncode == 0


def test_receiver_reports_a_refused_flag_of_the_real_cli(tmp_path: Path) -> None:
    if not _serve_exists(tmp_path):
        pytest.skip("`dynaudit serve` is not in this checkout yet")
    with pytest.raises(RuntimeError, match="no-such-flag"):
        Receiver(tmp_path, ["--no-such-flag"]).start()


# -- LocalHub webhooks ---------------------------------------------------------------------------
def test_a_push_to_the_local_hub_delivers_its_webhook(
    hub: LocalHub, listener: Listener, tmp_path: Path
) -> None:
    from huggingface_hub import HfApi

    hub.add_user("pusher", "push-token")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    repo_id = "org/webhooked"
    first = hub.add(repo_id, tmp_path / "model")
    webhook = hub.notify(listener.url, "hub-secret")
    try:
        already = len(hub.deliveries)
        api = HfApi(endpoint=hub.url, token="push-token")
        info = api.upload_file(path_or_fileobj=b"notes", path_in_repo="notes.txt", repo_id=repo_id)
        _, headers, body = listener.wait(1)[0]
        payload = json.loads(body)
        head = hub.repos[repo_id].refs["main"]
        assert head == info.oid != first
        assert headers["X-Webhook-Secret"] == "hub-secret"
        assert payload["event"] == {"action": "update", "scope": "repo.content"}
        assert payload["updatedRefs"] == [
            {"ref": "refs/heads/main", "oldSha": first, "newSha": head}
        ]
        assert payload["repo"]["name"] == repo_id and payload["repo"]["headSha"] == head
        assert payload["repo"]["type"] == "model" and payload["webhook"]["version"] == 3
        assert hub.wait_deliveries(already + 1)[-1] == (200, payload)

        # A pull request's commit moves refs/pr/N: delivered too, main's head unchanged.
        api.upload_file(
            path_or_fileobj=b"pr", path_in_repo="pr.txt", repo_id=repo_id, create_pr=True
        )
        pr = json.loads(listener.wait(2)[1][2])
        assert [r["ref"] for r in pr["updatedRefs"]] == ["refs/pr/1"]
        assert pr["updatedRefs"][0]["oldSha"] is None and pr["repo"]["headSha"] == head

        # The test helper publishes like a push; publishing the same files again moves nothing.
        hub.add(repo_id, tmp_path / "model")
        assert json.loads(listener.wait(3)[2][2])["updatedRefs"][0]["newSha"] == first
        hub.add(repo_id, tmp_path / "model")
        assert hub.wait_deliveries(already + 3) and len(hub.deliveries) == already + 3
    finally:
        hub.forget(webhook)


def test_deliver_posts_one_hub_payload(hub: LocalHub, listener: Listener) -> None:
    sha = "a" * 40
    status = hub.deliver(
        listener.url, "s", "org/ds", sha, ref="refs/heads/dev", repo_type="dataset"
    )
    assert status == 200
    _, headers, body = listener.wait(1)[0]
    payload: dict[str, Any] = json.loads(body)
    assert headers["X-Webhook-Secret"] == "s"
    assert payload["updatedRefs"] == [{"ref": "refs/heads/dev", "oldSha": None, "newSha": sha}]
    assert payload["repo"]["url"]["api"].endswith("/api/datasets/org/ds")
    assert hub.deliver(listener.url, None, "org/ds", None) == 200  # a deleted ref, no secret
    assert "X-Webhook-Secret" not in listener.wait(2)[1][1]
