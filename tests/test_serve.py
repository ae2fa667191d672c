"""`dynaudit serve` end to end (issue 23): a real ``mlflow server`` with webhooks on delivers to
the receiver running as its own process; the local Hub endpoint of tests/hubserver.py delivers
pushes. Every check is a real ``dynaudit check`` on real checkpoints: a chain of Linear layers,
a gentle fine-tune (passes) and a damaged copy (two layers zeroed: fails).

The faults of the issue each have a test: a receiver killed during a job and restarted, a
duplicate delivery, a bad signature, an oversized body, a baseline that cannot be resolved, the
MLflow server refusing the tagging calls, a check that outlives its time limit. No secret may
appear in the receiver's log or in any check's log."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shlex
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dynaudit
from dynaudit.sources import SourceOptions
from tests.faultproxy import FaultProxy
from tests.hubserver import LocalHub
from tests.mlflowserver import WEBHOOK_ENV, MlflowServer
from tests.receiver import Receiver
from tests.test_hub_comments import FAST, _write

pytest.importorskip("starlette")
pytest.importorskip("sqlalchemy")

pytestmark = pytest.mark.slow

SECRET = "whsec-dynaudit-test-3f9a0c1e7b"
HUB_SECRET = "hub-webhook-secret-5d2e8a41"
OPS = "ops-token-8c7b6a5f4e3d"
HF_BOT = "hf_dynaudit_serve_bot_0123456789ab"
EVENTS = ["model_version.created", "model_version_alias.created"]


def sign(body: bytes, secret: str = SECRET, *, stamp: int | None = None) -> dict[str, str]:
    """The headers MLflow 3 sends with a signed delivery (computed here, independently)."""
    delivery, stamp = str(uuid.uuid4()), int(time.time()) if stamp is None else stamp
    digest = hmac.new(secret.encode(), f"{delivery}.{stamp}.".encode() + body, hashlib.sha256)
    return {
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": str(stamp),
        "X-MLflow-Signature": "v1," + base64.b64encode(digest.digest()).decode(),
    }


def _no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in (SECRET, HUB_SECRET, OPS, HF_BOT):
            assert secret not in text
            assert base64.b64encode(secret.encode()).decode() not in text


def _check_logs(receiver: Receiver) -> str:
    return "\n".join(p.read_text(errors="replace") for p in receiver.state_dir.rglob("check.log"))


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-models")
    return {kind: _write(root / kind, kind) for kind in ("base", "good", "damaged")}


@pytest.fixture(scope="module")
def registry(
    tmp_path_factory: pytest.TempPathFactory, chains: dict[str, Path]
) -> Iterator[dict[str, Any]]:
    """A real MLflow 3 server that delivers webhooks to localhost, with the base registered as
    version 1 of "gate-chain" and its baseline stored in MLflow (``dynaudit.baseline`` tag)."""
    root = tmp_path_factory.mktemp("serve-mlflow")
    server = MlflowServer(root, env=WEBHOOK_ENV).start()
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("DYNAUDIT_CACHE_DIR", str(root / "cache"))
            env.setenv("MLFLOW_TRACKING_URI", server.url)
            from mlflow import MlflowClient

            client = MlflowClient(server.url)
            client.create_registered_model("gate-chain")
            _register(client, chains["base"], "gate-chain", {})
            made = dynaudit.baseline(
                "models:/gate-chain/1",
                mlflow=True,
                seeds=2,
                sources=SourceOptions(mlflow_uri=server.url),
                **FAST,
            )
        yield {"server": server, "client": client, "baseline": made.stored_at}
    finally:
        server.stop()


def _register(client: Any, folder: Path, name: str, tags: dict[str, str]) -> str:
    experiment = client.get_experiment_by_name("uploads")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("uploads")
    run = client.create_run(experiment_id)
    # the weights alone, as a training job registers them; the tag names the baseline
    client.log_artifact(run.info.run_id, str(folder / "model.safetensors"), "checkpoint")
    client.set_terminated(run.info.run_id)
    made = client.create_model_version(
        name, source=f"runs:/{run.info.run_id}/checkpoint", run_id=run.info.run_id, tags=tags
    )
    return str(made.version)


def _launcher(delay: float) -> str:
    """A --launcher that waits ``delay`` seconds before the check starts (a slow model)."""
    return f"sh -c 'sleep {delay}; exec \"$@\"' sh {shlex.quote(sys.executable)}"


def _receiver(root: Path, mlflow_uri: str, *extra: str) -> Receiver:
    args = ["--mlflow-uri", mlflow_uri, "--secret", SECRET, "--ops-token", OPS, *extra]
    return Receiver(root, args, env={"DYNAUDIT_CACHE_DIR": str(root / "cache")})


def _hook(client: Any, receiver: Receiver, name: str = "dynaudit") -> Any:
    return client.create_webhook(name, f"{receiver.url}/hooks/mlflow", EVENTS, secret=SECRET)


def _guard_done(version: str) -> Any:
    """The finished guard job of the alias move onto ``version``."""
    return lambda job: (
        job["kind"] == "guard" and job["subject"]["version"] == version and job["state"] == "done"
    )


def _by_key(key: str) -> Any:
    return lambda job: job["key"] == key and job["state"] in ("done", "error")


# -- MLflow: verdicts, the guard, an unresolvable baseline -----------------------------------


def test_registered_versions_are_checked_tagged_and_the_guard_moves_the_alias_back(
    registry: dict[str, Any], chains: dict[str, Path], tmp_path: Path
) -> None:
    client, baseline = registry["client"], registry["baseline"]
    receiver = _receiver(tmp_path, registry["server"].url, "--guard", "champion").start()
    hooks = [_hook(client, receiver), _hook(client, receiver, "dynaudit-twice")]
    try:
        good = _register(client, chains["good"], "gate-chain", {"dynaudit.baseline": baseline})
        done = receiver.wait_job(_by_key(f"mlflow:gate-chain/{good}"), 180, OPS)
        assert done["state"] == "done" and done["verdict"] == "pass", receiver.tail()
        tags = client.get_model_version("gate-chain", good).tags
        assert tags["dynaudit.verdict"] == "pass" and tags["dynaudit.failing_groups"] == "none"
        run = client.get_run(tags["dynaudit.report_run"])
        assert run.data.tags["dynaudit.verdict"] == "pass" and run.info.status == "FINISHED"
        report = Path(
            client.download_artifacts(run.info.run_id, "dynaudit/check.md", str(tmp_path))
        )
        assert "pass" in report.read_text().lower()

        damaged = _register(
            client, chains["damaged"], "gate-chain", {"dynaudit.baseline": baseline}
        )
        done = receiver.wait_job(_by_key(f"mlflow:gate-chain/{damaged}"), 180, OPS)
        assert done["verdict"] == "fail", receiver.tail()
        tags = client.get_model_version("gate-chain", damaged).tags
        assert tags["dynaudit.verdict"] == "fail" and tags["dynaudit.failing_groups"] != "none"

        # two webhooks on one receiver: each version was checked once, into one run
        jobs = receiver.jobs(OPS)
        assert sum(j["key"] == f"mlflow:gate-chain/{good}" for j in jobs) == 1
        runs = client.search_runs(
            [client.get_experiment_by_name("dynaudit").experiment_id],
            f"tags.`dynaudit.source` = 'models:/gate-chain/{damaged}'",
        )
        assert len(runs) == 1

        client.set_registered_model_alias("gate-chain", "champion", good)
        receiver.wait_job(_guard_done(good), 60, OPS)
        client.set_registered_model_alias("gate-chain", "champion", damaged)
        guard = receiver.wait_job(_guard_done(damaged), 60, OPS)
        assert "moved back" in guard["reason"]
        guards = [j for j in receiver.jobs(OPS) if j["kind"] == "guard"]
        assert sum(j["subject"]["version"] == damaged for j in guards) == 1  # two webhooks, one
        assert client.get_model_version_by_alias("gate-chain", "champion").version == good
        assert (
            "champion: moved back"
            in client.get_model_version("gate-chain", damaged).tags["dynaudit.guard"]
        )
        assert "moved back from version" in receiver.log()

        # a version with no baseline declared is tagged with the reason, not left silent
        lost = _register(client, chains["good"], "gate-chain", {})
        done = receiver.wait_job(_by_key(f"mlflow:gate-chain/{lost}"), 120, OPS)
        assert done["state"] == "error" and done["attempts"] == 1
        tags = client.get_model_version("gate-chain", lost).tags
        assert tags["dynaudit.verdict"] == "error"
        assert "no baseline given and none declared" in tags["dynaudit.error"]

        # MLflow's own test delivery names a model that does not exist: the job ends there
        assert client.test_webhook(hooks[0].webhook_id).success
        example = receiver.wait_job(lambda j: j["subject"].get("name") == "example_model"
                                    and j["state"] == "error", 60, OPS)  # fmt: skip
        assert "not found" in example["reason"] and example["attempts"] == 1
    finally:
        for hook in hooks:
            client.delete_webhook(hook.webhook_id)
        receiver.stop()
    _no_secrets(receiver.log(), _check_logs(receiver))


def test_an_alias_set_before_the_receiver_started_is_where_the_guard_moves_it_back(
    registry: dict[str, Any], chains: dict[str, Path], tmp_path: Path
) -> None:
    """The receiver reads where the guarded aliases point when it starts: a failing version
    promoted next goes back there. Before, no event had told this receiver where the alias
    was, and the guard kept the failing version ("no earlier version known")."""
    client, baseline = registry["client"], registry["baseline"]
    client.create_registered_model("gate-seed")
    good = _register(client, chains["good"], "gate-seed", {"dynaudit.baseline": baseline})
    client.set_registered_model_alias("gate-seed", "champion", good)  # no receiver running
    receiver = _receiver(tmp_path, registry["server"].url, "--guard", "champion").start()
    hook = _hook(client, receiver)
    try:
        deadline = time.monotonic() + 30
        while "guarded alias(es) in the registry" not in receiver.log():
            assert time.monotonic() < deadline, receiver.tail()
            time.sleep(0.2)
        damaged = _register(client, chains["damaged"], "gate-seed", {"dynaudit.baseline": baseline})
        client.set_registered_model_alias("gate-seed", "champion", damaged)
        guard = receiver.wait_job(_guard_done(damaged), 180, OPS)
        assert guard["reason"] == f"moved back from version {damaged} to {good}: " + (
            f"{damaged} failed the gate"
        ), receiver.tail()
        assert client.get_model_version_by_alias("gate-seed", "champion").version == good
    finally:
        client.delete_webhook(hook.webhook_id)
        receiver.stop()


def test_a_receiver_killed_during_a_check_runs_it_again_once_after_a_restart(
    registry: dict[str, Any], chains: dict[str, Path], tmp_path: Path
) -> None:
    client, baseline = registry["client"], registry["baseline"]
    receiver = _receiver(tmp_path, registry["server"].url, "--launcher", _launcher(6)).start()
    hook = _hook(client, receiver)
    try:
        version = _register(client, chains["good"], "gate-chain", {"dynaudit.baseline": baseline})
        key = f"mlflow:gate-chain/{version}"
        running = receiver.wait_job(lambda j: j["key"] == key and j["phase"] == "checking", 60, OPS)
        child = running["pid"]
        os.kill(child, 0)  # the check process is there
        receiver.kill()  # SIGKILL: no clean-up
        os.kill(child, 0)  # and outlives its receiver
        receiver.start()
        done = receiver.wait_job(_by_key(key), 180, OPS)
        assert done["state"] == "done" and done["verdict"] == "pass" and done["attempts"] == 2
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)  # the leftover was stopped, not left to race the new attempt
        runs = client.search_runs(
            [client.get_experiment_by_name("dynaudit").experiment_id],
            f"tags.`dynaudit.source` = 'models:/gate-chain/{version}'",
        )
        assert len(runs) == 1
        assert client.get_model_version("gate-chain", version).tags["dynaudit.verdict"] == "pass"
    finally:
        client.delete_webhook(hook.webhook_id)
        receiver.stop()


def test_a_check_can_run_under_torchrun_across_ranks(
    registry: dict[str, Any], chains: dict[str, Path], tmp_path: Path
) -> None:
    """``--launcher torchrun``: the check of a version whose baseline is stored in MLflow is
    sharded over two ranks (the existing engine), and the verdict is read from its report."""
    client, baseline = registry["client"], registry["baseline"]
    ranks = tmp_path / "torchrun-logs"
    launcher = shlex.join([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "--log-dir", str(ranks)])  # fmt: skip
    receiver = _receiver(tmp_path, registry["server"].url, "--launcher", launcher).start()
    hook = _hook(client, receiver)
    try:
        version = _register(client, chains["good"], "gate-chain", {"dynaudit.baseline": baseline})
        done = receiver.wait_job(_by_key(f"mlflow:gate-chain/{version}"), 180, OPS)
        assert done["state"] == "done" and done["verdict"] == "pass", receiver.tail()
        assert client.get_model_version("gate-chain", version).tags["dynaudit.verdict"] == "pass"
    finally:
        client.delete_webhook(hook.webhook_id)
        receiver.stop()
    (attempt,) = [p for p in ranks.rglob("attempt_0") if p.is_dir()]
    assert sorted(p.name for p in attempt.iterdir()) == ["0", "1"]  # one folder per rank


def test_a_version_no_event_announced_is_found_by_the_sweep_of_a_watched_model(
    registry: dict[str, Any], chains: dict[str, Path], tmp_path: Path
) -> None:
    """MLflow drops a delivery after a few seconds of retries: a version registered while no
    receiver listened is found by ``--watch`` at start-up, checked and tagged."""
    client, baseline = registry["client"], registry["baseline"]
    client.create_registered_model("swept-chain")
    version = _register(client, chains["damaged"], "swept-chain", {"dynaudit.baseline": baseline})
    receiver = _receiver(tmp_path, registry["server"].url, "--watch", "swept-chain").start()
    try:
        done = receiver.wait_job(_by_key(f"mlflow:swept-chain/{version}"), 180, OPS)
        assert done["state"] == "done" and done["verdict"] == "fail", receiver.tail()
        assert client.get_model_version("swept-chain", version).tags["dynaudit.verdict"] == "fail"
        assert "found unchecked" in receiver.log()
    finally:
        receiver.stop()


def test_an_mlflow_server_refusing_the_tags_is_retried_with_a_bound_then_recorded(
    registry: dict[str, Any], chains: dict[str, Path], tmp_path: Path
) -> None:
    client, baseline = registry["client"], registry["baseline"]
    with FaultProxy(registry["server"].url) as proxy:
        receiver = _receiver(tmp_path, proxy.url, "--writeback-retries", "1").start()
        hook = _hook(client, receiver)
        try:
            proxy.arm(["/model-versions/set-tag"])
            version = _register(
                client, chains["good"], "gate-chain", {"dynaudit.baseline": baseline}
            )
            done = receiver.wait_job(_by_key(f"mlflow:gate-chain/{version}"), 180, OPS)
            assert done["state"] == "error" and done["verdict"] == "pass"
            assert "after 2 tries" in done["reason"] and proxy.refused >= 2
            assert "could not log the report" in receiver.log()
            run = client.get_run(done["run_id"])
            assert run.info.status == "FAILED"  # not left RUNNING

            proxy.arm(["/model-versions/set-tag"], times=1)  # down for one call only
            again = _register(client, chains["good"], "gate-chain", {"dynaudit.baseline": baseline})
            done = receiver.wait_job(_by_key(f"mlflow:gate-chain/{again}"), 180, OPS)
            assert done["state"] == "done", receiver.tail()
            assert client.get_model_version("gate-chain", again).tags["dynaudit.verdict"] == "pass"

            proxy.arm(["/runs/log-batch"], times=1)  # the run is made, then logging fails once
            third = _register(client, chains["good"], "gate-chain", {"dynaudit.baseline": baseline})
            done = receiver.wait_job(_by_key(f"mlflow:gate-chain/{third}"), 180, OPS)
            assert done["state"] == "done", receiver.tail()
            runs = client.search_runs(
                [client.get_experiment_by_name("dynaudit").experiment_id],
                f"tags.`dynaudit.source` = 'models:/gate-chain/{third}'",
            )
            assert len(runs) == 1 and runs[0].info.run_id == done["run_id"]  # the retry reused it
        finally:
            client.delete_webhook(hook.webhook_id)
            receiver.stop()


def test_a_check_past_its_time_limit_is_stopped_and_given_up(
    registry: dict[str, Any], tmp_path: Path
) -> None:
    receiver = _receiver(
        tmp_path,
        registry["server"].url,
        "--launcher",
        _launcher(60),
        "--job-timeout",
        "2",
        "--max-attempts",
        "1",
    ).start()
    try:
        body = json.dumps(
            {
                "entity": "model_version",
                "action": "created",
                "timestamp": "x",
                "data": {"name": "gate-chain", "version": "1", "tags": {}},
            }
        ).encode()
        assert receiver.post("/hooks/mlflow", body, sign(body))[0] == 202
        done = receiver.wait_job(_by_key("mlflow:gate-chain/1"), 60, OPS)
        assert done["state"] == "error" and "did not finish in 2 s" in done["reason"]
        assert done["pid"] is None
    finally:
        receiver.stop()


def _group_gone(pgid: int, seconds: float = 10) -> bool:
    """Whether process group ``pgid`` is empty within ``seconds`` (a killed member stays a
    zombie until init reaps it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _checking(job: dict[str, Any]) -> bool:
    return job["state"] == "running" and job["phase"] == "checking" and job["pid"] is not None


def test_a_shutdown_during_a_check_is_not_an_attempt(
    registry: dict[str, Any], tmp_path: Path
) -> None:
    """SIGTERM (a deploy, ``systemctl stop``) stops the check and queues the job again without
    counting an attempt, even when the signal reaches the check first; with
    ``--max-attempts 1`` the job still runs after two restarts."""
    receiver = _receiver(tmp_path, registry["server"].url, "--launcher", _launcher(600),
                         "--max-attempts", "1").start()  # fmt: skip
    try:
        body = _version_event("restarted", "1")
        assert receiver.post("/hooks/mlflow", body, sign(body))[0] == 202
        for _ in range(2):
            running = receiver.wait_job(_checking, 60, OPS)
            assert running["attempts"] == 1
            os.kill(running["pid"], signal.SIGTERM)  # the check first, as a process group would be
            receiver.stop()
            assert _group_gone(running["pid"])  # nothing of its process group is left (its sleep)
            receiver.start()
        again = receiver.wait_job(lambda j: j["key"] == "mlflow:restarted/1", 30, OPS)
        assert again["state"] in ("queued", "running") and again["attempts"] <= 1
    finally:
        receiver.stop()
    assert "gave up" not in receiver.log()


# -- requests that are refused -----------------------------------------------------------------


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    """A receiver whose checks never start (its launcher sleeps), for the request-level cases."""
    root = tmp_path_factory.mktemp("serve-idle")
    receiver = _receiver(
        root,
        "http://127.0.0.1:9",
        "--launcher",
        _launcher(600),
        "--hub-secret",
        HUB_SECRET,
        "--max-body",
        "4096",
    )
    receiver.start()
    yield receiver
    receiver.stop()


def _version_event(name: str, version: str) -> bytes:
    data = {"name": name, "version": version, "source": "models:/m-1", "run_id": None, "tags": {}}
    return json.dumps(
        {
            "entity": "model_version",
            "action": "created",
            "timestamp": "2026-11-26T14:03:44+00:00",
            "data": data,
        }
    ).encode()


def test_bad_signatures_are_refused_and_logged_without_the_secret(idle: Receiver) -> None:
    body = _version_event("signed", "1")
    stale = int(time.time()) - 3600
    cases = {
        "wrong secret": sign(body, "not-the-secret"),
        "stale": sign(body, stamp=stale),
        "tampered": sign(body + b" "),
        "no signature": {k: v for k, v in sign(body).items() if k != "X-MLflow-Signature"},
    }
    for case, headers in cases.items():
        status, answer = idle.post("/hooks/mlflow", body, headers)
        assert status == 401, case
        assert SECRET not in json.dumps(answer)
    assert idle.post("/hooks/hub", b"{}", {"X-Webhook-Secret": SECRET + "x"})[0] == 401
    assert not [j for j in idle.jobs(OPS) if j["key"] == "mlflow:signed/1"]
    assert idle.log().count("refused") >= 5
    _no_secrets(idle.log())


def test_a_duplicate_delivery_makes_one_job(idle: Receiver) -> None:
    body = _version_event("twice", "3")
    headers = sign(body)
    first, again = (
        idle.post("/hooks/mlflow", body, headers),
        idle.post("/hooks/mlflow", body, headers),
    )
    assert first[0] == again[0] == 202
    other = idle.post("/hooks/mlflow", body, sign(body))  # another webhook, the same version
    assert other[0] == 202
    assert sum(j["key"] == "mlflow:twice/3" for j in idle.jobs(OPS)) == 1


def test_oversized_and_malformed_bodies_are_refused_and_the_receiver_stays_up(
    idle: Receiver,
) -> None:
    big = b"{" + b" " * 10_000 + b"}"
    assert idle.post("/hooks/mlflow", big, sign(big))[0] == 413
    assert idle.post("/hooks/hub", big, {"X-Webhook-Secret": HUB_SECRET})[0] == 413
    chunked = _chunked(idle, "/hooks/mlflow", b"[" + b"0," * 5000 + b"0]")
    assert chunked == 413
    assert idle.post("/hooks/mlflow", b"not json", sign(b"not json"))[0] == 400
    tag = json.dumps(
        {
            "entity": "model_version_tag",
            "action": "set",
            "timestamp": "x",
            "data": {"name": "m", "version": "1", "key": "k", "value": "v"},
        }
    ).encode()
    status, answer = idle.post("/hooks/mlflow", tag, sign(tag))
    assert status == 200 and "ignored" in answer
    assert idle.get("/health") == (200, {"status": "ok"})


def _chunked(receiver: Receiver, path: str, body: bytes) -> int:
    """A body sent in chunks without Content-Length: refused once past the limit."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=30)
    try:
        connection.putrequest("POST", path)
        connection.putheader("Transfer-Encoding", "chunked")
        for key, value in sign(body).items():
            connection.putheader(key, value)
        connection.endheaders()
        for start in range(0, len(body), 1024):
            piece = body[start : start + 1024]
            connection.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        connection.send(b"0\r\n\r\n")
        return connection.getresponse().status
    except (BrokenPipeError, ConnectionResetError):
        return 413  # the receiver answered and closed before the last chunk
    finally:
        connection.close()


def test_jobs_need_the_ops_token_and_health_tells_nothing(idle: Receiver) -> None:
    assert idle.get("/jobs")[0] == 401
    assert idle.get("/jobs", "wrong")[0] == 401
    status, body = idle.get("/jobs", OPS)
    assert status == 200 and set(body["counts"]) == {"queued", "running", "done", "error"}
    status, body = idle.get("/health")
    assert status == 200 and body == {"status": "ok"}


def test_the_command_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    from tests.cli import run_cli

    result = run_cli("serve", "--state-dir", tmp_path, "--mlflow-uri", "http://127.0.0.1:9")
    assert result.returncode == 2 and "needs a webhook secret" in result.stderr


# -- the Hub: a push is checked and the report kept in one comment ---------------------------


def test_pushes_to_a_hub_repo_update_one_comment(
    hub: LocalHub, chains: dict[str, Path], tmp_path: Path
) -> None:
    """A push to main is checked against the base its card declares, and the report becomes
    the one comment of the repository's dynaudit discussion; the next push edits it; a
    replayed delivery or a wrong secret makes no job."""
    tuned = "org/serve-tuned"
    pushes = _hub_pushes(hub, chains, tmp_path, "org/serve-base")
    receiver = _hub_receiver(hub, tmp_path).start()
    webhook = hub.notify(f"{receiver.url}/hooks/hub", HUB_SECRET)
    try:
        first = hub.add(tuned, pushes["good"])
        done = receiver.wait_job(_by_key(f"hub:{tuned}@{first}"), 300, OPS)
        assert done["state"] == "done" and done["verdict"] == "pass", receiver.tail()
        (discussion,) = [d for d in hub.discussions(tuned) if d.author == "dynaudit-serve-bot"]
        (comment,) = discussion.comments
        assert comment.content.strip() == _rendered(done).strip()  # the report, as rendered
        assert "pass" in comment.content.lower() and first[:7] in comment.content

        second = hub.add(tuned, pushes["damaged"])
        done = receiver.wait_job(_by_key(f"hub:{tuned}@{second}"), 300, OPS)
        assert done["verdict"] == "fail", receiver.tail()
        (discussion,) = [d for d in hub.discussions(tuned) if d.author == "dynaudit-serve-bot"]
        (comment,) = discussion.comments
        assert comment.edits == 1 and comment.content.strip() == _rendered(done).strip()
        assert "fail" in comment.content.lower()

        replay = hub.deliver(f"{receiver.url}/hooks/hub", HUB_SECRET, tuned, second)
        assert replay == 202
        assert sum(j["key"] == f"hub:{tuned}@{second}" for j in receiver.jobs(OPS)) == 1
        assert hub.deliver(f"{receiver.url}/hooks/hub", "wrong", tuned, second) == 401

        # a push that cannot be checked (no base declared) says so in the same kind of comment
        orphan = tmp_path / "orphan"
        orphan.mkdir()
        (orphan / "model.safetensors").write_bytes(
            (chains["good"] / "model.safetensors").read_bytes()
        )
        third = hub.add("org/serve-orphan", orphan)
        done = receiver.wait_job(_by_key(f"hub:org/serve-orphan@{third}"), 120, OPS)
        assert done["state"] == "error" and "no baseline given" in done["reason"]
        (discussion,) = hub.discussions("org/serve-orphan")
        (comment,) = discussion.comments
        assert "could not be checked" in comment.content and "no baseline given" in comment.content
    finally:
        hub.forget(webhook)
        receiver.stop()
    _no_secrets(receiver.log(), _check_logs(receiver))


def test_an_older_commit_checked_last_does_not_replace_the_newer_report(
    hub: LocalHub, chains: dict[str, Path], tmp_path: Path
) -> None:
    """Two quick pushes, two workers, and the older commit's check ends last (its launcher
    holds it until told): the comment keeps the newer commit's report. Before, the older
    report replaced it, so the repository showed "pass" while its head had failed."""
    tuned = "org/serve-order"
    pushes = _hub_pushes(hub, chains, tmp_path, "org/serve-order-base")
    held = tmp_path / "go"
    held.mkdir()
    # each check waits for a file named after its commit, so the test decides the order
    wait = (
        "d=$1; shift; for a; do case $a in hf://*@*) s=${a##*@};; esac; done; "
        'while [ ! -e "$d/go-$s" ]; do sleep 0.1; done; exec "$@"'
    )
    hold = shlex.join(["sh", "-c", wait, "sh", str(held), sys.executable])
    receiver = _hub_receiver(hub, tmp_path, "--workers", "2", "--launcher", hold).start()
    webhook = hub.notify(f"{receiver.url}/hooks/hub", HUB_SECRET)
    try:
        older = hub.add(tuned, pushes["good"])
        newer = hub.add(tuned, pushes["damaged"])
        (held / f"go-{newer}").touch()
        done = receiver.wait_job(_by_key(f"hub:{tuned}@{newer}"), 300, OPS)
        assert done["verdict"] == "fail", receiver.tail()
        (held / f"go-{older}").touch()
        late = receiver.wait_job(_by_key(f"hub:{tuned}@{older}"), 300, OPS)
        assert late["state"] == "done" and late["verdict"] == "pass", receiver.tail()
        (discussion,) = [d for d in hub.discussions(tuned) if d.author == "dynaudit-serve-bot"]
        (comment,) = discussion.comments
        assert comment.edits == 0 and comment.content.strip() == _rendered(done).strip()
        assert f"not posted: main has moved on to {newer[:12]}" in receiver.log()
    finally:
        hub.forget(webhook)
        receiver.stop()


def _hub_pushes(hub: LocalHub, chains: dict[str, Path], root: Path, base: str) -> dict[str, Path]:
    """The base on the Hub, and two folders to push on top of each other: a good fine-tune
    and a damaged one, each with the card that declares ``base``."""
    hub.add_user("dynaudit-serve-bot", HF_BOT)
    hub.add(base, chains["base"])
    card = (chains["good"] / "README.md").read_text().replace("org/hc-base", base)
    pushes = {}
    for kind in ("good", "damaged"):  # what the two pushes hold: the card, then the weights
        pushes[kind] = root / kind
        pushes[kind].mkdir()
        (pushes[kind] / "README.md").write_text(card)
        weights = (chains[kind] / "model.safetensors").read_bytes()
        (pushes[kind] / "model.safetensors").write_bytes(weights)
    return pushes


def _hub_receiver(hub: LocalHub, root: Path, *extra: str) -> Receiver:
    return Receiver(
        root / "serve",
        ["--hub-secret", HUB_SECRET, "--hf-endpoint", hub.url, "--ops-token", OPS, *extra],
        env={"HF_TOKEN": HF_BOT, "DYNAUDIT_CACHE_DIR": str(root / "cache")},
    )


def _rendered(job: dict[str, Any]) -> str:
    """The comment ``check --hub-comment`` would post for the report the job's check wrote."""
    from dynaudit.hub_comments import render_comment
    from dynaudit.schema import CheckReport

    report = Path(job["report_dir"]) / "check.json"
    return render_comment(CheckReport.model_validate_json(report.read_bytes()))


def test_the_readme_start_command_starts_a_receiver(tmp_path: Path) -> None:
    """README's "In a registry" command, as written (the port and folders aside)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## In a registry", 1)[1].split("\n## ", 1)[0]
    (line,) = [ln for ln in section.splitlines() if ln.startswith("DYNAUDIT_")]
    variable, *argv = shlex.split(line)
    name, _ = variable.split("=", 1)
    assert name == "DYNAUDIT_MLFLOW_WEBHOOK_SECRET" and argv[:2] == ["dynaudit", "serve"]
    command = [sys.executable, "-m", "dynaudit", *argv[1:]]
    receiver = Receiver(tmp_path, [], env={name: SECRET}, command=command).start()
    try:
        assert receiver.get("/health") == (200, {"status": "ok"})
        body = _version_event("readme", "1")
        assert receiver.post("/hooks/mlflow", body, sign(body))[0] == 202
    finally:
        receiver.stop()
    assert "listening on http://127.0.0.1" in receiver.log()
    _no_secrets(receiver.log())


def test_an_alias_delivery_seen_before_does_not_move_the_ledger(tmp_path: Path) -> None:
    """MLflow sends from a thread pool and retries: an old alias delivery arriving again must
    not make the guard's "version before" a version the alias had left."""
    from dynaudit.serve import events
    from dynaudit.serve.app import _enqueue_mlflow
    from dynaudit.serve.store import Store

    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    moves = [("d-1", "1"), ("d-2", "2"), ("d-1", "1"), ("d-3", "3")]
    for delivery, version in moves:
        _enqueue_mlflow(store, events.AliasSet("m", "champion", version), delivery, {"champion"})
    guard = store.by_key(events.guard_key("m", "champion", "3", "d-3"))
    assert guard is not None and guard.subject["previous"] == "2"
    # the same move from a second webhook (another delivery id) makes no second guard
    _enqueue_mlflow(store, events.AliasSet("m", "champion", "3"), "d-3b", {"champion"})
    assert store.by_key(events.guard_key("m", "champion", "3", "d-3b")) is None
    assert store.by_key(events.guard_key("m", "champion", "1", "d-1")) is not None
    # a retry of a delivery the receiver failed to answer gets the same "before"
    assert store.move_alias("m", "champion", "4", "d-4") == "3"
    assert store.move_alias("m", "champion", "4", "d-4") == "3"


def test_a_check_process_gets_none_of_the_receivers_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dynaudit.serve.settings import ServeSettings
    from dynaudit.serve.worker import _environment, check_command

    for name in ("DYNAUDIT_SECRET", "DYNAUDIT_MLFLOW_WEBHOOK_SECRET", "DYNAUDIT_HUB_WEBHOOK_SECRET",
                 "DYNAUDIT_OPS_TOKEN", "DYNAUDIT_SERVE_DB"):  # fmt: skip
        monkeypatch.setenv(name, "postgresql://u:hunter2-secret@db/x")
    uri = "http://user:mlflow-password@127.0.0.1:5000"
    settings = ServeSettings(mlflow_uri=uri, mlflow_secret=SECRET, hf_token=HF_BOT)
    env = _environment(settings)
    assert "hunter2-secret" not in json.dumps(env)
    assert env["MLFLOW_TRACKING_URI"] == uri and env["HF_TOKEN"] == HF_BOT  # what checks need
    command = check_command("models:/m/1", Path("/tmp/x"), settings)
    assert not [word for word in command if "mlflow-password" in word]  # not in `ps`


def test_jobs_parameters_are_checked(idle: Receiver) -> None:
    for query in ("limit=0", "limit=%C2%B2", "state=lost", "limit=99999999999999999999"):
        assert idle.get(f"/jobs?{query}", OPS)[0] == 400, query
    for job in ("%C2%B2", "99999999999999999999", "0"):
        assert idle.get(f"/jobs/{job}", OPS)[0] == 404, job


def test_without_the_serve_extra_the_command_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import importlib.util

    from tests.cli import run_cli

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a)
    )
    result = run_cli("serve", "--secret", SECRET, "--mlflow-uri", "http://127.0.0.1:9",
                     "--state-dir", tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert "needs uvicorn: install the serve extra" in result.stderr
    assert SECRET not in result.stderr + result.stdout
