"""Secrets echoed by a server never reach the user's terminal or CI log.

A local HTTP server that reflects the request's headers in its error responses — as sent, URL-
encoded and base64-encoded, the way a misconfigured proxy or a debugging endpoint does — is
the MLflow tracking server (and the Hugging Face endpoint) of a real ``dynaudit`` process. The
token and password the user set must not appear on its stdout or stderr in any of those forms,
and the run is an input error (exit 3).
"""

from __future__ import annotations

import base64
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from safetensors.torch import save_file

from dynaudit.secrets import REDACTED, scrub
from tests.cli import CliResult, run_cli

TOKEN = "mlflow-SECRET~canary/TOKEN+7d3f9a1c"
USER = "canary-user"
PASSWORD = "pw/SECRET+canary=42&x"
URL_PASSWORD = "SECRETurlPW3e5"
HF_FLAG_TOKEN = "hf_SECRETcanaryFLAG0b1c2d3e4f"


def forms(secret: str) -> list[str]:
    """What must not be printed: the secret, URL-encoded, and base64-encoded."""
    encoded = base64.b64encode(secret.encode()).decode()
    return [secret, quote(secret, safe=""), quote_plus(secret), encoded, encoded.rstrip("=")]


class _Echo(http.server.BaseHTTPRequestHandler):
    """Answers every request with ``status`` and a body that quotes the Authorization header
    three ways, then every other header."""

    status = 403

    def _answer(self) -> None:
        auth = self.headers.get("Authorization", "")
        body = (
            f"denied; Authorization: {auth} | quoted: {quote(auth, safe='')} | "
            f"encoded: {base64.b64encode(auth.encode()).decode()} | "
            + " | ".join(f"{k}: {v}" for k, v in self.headers.items())
        ).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_HEAD = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(params=[401, 403, 400], ids=lambda s: f"http{s}")
def echo(request: pytest.FixtureRequest) -> Iterator[str]:
    handler = type("Echo", (_Echo,), {"status": request.param})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # A short poll interval: shutdown() waits for one, and every test here stops a server.
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    import torch

    folder = tmp_path / "model"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    save_file({"fc1.weight": torch.randn(16, 8, generator=gen),
               "fc2.weight": torch.randn(4, 16, generator=gen)},
              str(folder / "model.safetensors"))  # fmt: skip
    return folder


def dynaudit(*args: str, env: dict[str, str]) -> CliResult:
    """No MLflow setting of the developer's, and no retries against the echoing server."""
    stray: dict[str, str | None] = {k: None for k in os.environ if k.startswith("MLFLOW_")}
    return run_cli(*args, env={**stray, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", **env})


def assert_not_leaked(run: CliResult, *secrets: str) -> None:
    output = run.stdout + run.stderr
    for secret in secrets:
        for form in forms(secret):
            assert form not in output, f"{form!r} printed:\n{output}"
    assert run.returncode == 3, output
    assert "internal error" not in output


@pytest.mark.parametrize("debug", ["", "1"], ids=["plain", "DYNAUDIT_DEBUG"])
def test_mlflow_token_echoed_by_the_server_is_not_printed(echo: str, debug: str) -> None:
    env = {"MLFLOW_TRACKING_URI": echo, "MLFLOW_TRACKING_TOKEN": TOKEN, "DYNAUDIT_DEBUG": debug}
    run = dynaudit("measure", "models:/secret-model/1", env=env)
    assert_not_leaked(run, TOKEN, f"Bearer {TOKEN}")
    assert "Authorization: Bearer ***" in run.stderr  # the server's text is still quoted


def test_mlflow_user_and_password_echoed_by_the_server_are_not_printed(echo: str) -> None:
    env = {
        "MLFLOW_TRACKING_URI": echo, "MLFLOW_TRACKING_USERNAME": USER,
        "MLFLOW_TRACKING_PASSWORD": PASSWORD, "DYNAUDIT_DEBUG": "1",
    }  # fmt: skip
    run = dynaudit("measure", "models:/secret-model/1", env=env)
    assert_not_leaked(run, PASSWORD, f"{USER}:{PASSWORD}")
    assert "Authorization: Basic ***" in run.stderr


def test_a_password_in_the_tracking_uri_echoed_by_the_server_is_not_printed(echo: str) -> None:
    uri = echo.replace("://", f"://{USER}:{URL_PASSWORD}@")
    run = dynaudit("measure", "models:/secret-model/1", "--mlflow-uri", uri,
                   env={"DYNAUDIT_DEBUG": "1"})  # fmt: skip
    assert_not_leaked(run, URL_PASSWORD, f"{USER}:{URL_PASSWORD}")


def test_logging_a_report_to_an_echoing_server_prints_no_token(echo: str, model: Path) -> None:
    """``--mlflow`` on a local checkpoint: the failure to log quotes the server, scrubbed."""
    env = {"MLFLOW_TRACKING_URI": echo, "MLFLOW_TRACKING_TOKEN": TOKEN}
    run = dynaudit("measure", str(model), "--mlflow", "--q-dim", "16", "--pieces", "4",
                   "--steps", "30", "--no-cache", env=env)  # fmt: skip
    output = run.stdout + run.stderr
    for form in forms(TOKEN) + forms(f"Bearer {TOKEN}"):
        assert form not in output, output
    assert "internal error" not in output and run.returncode in (0, 3)


def test_the_hub_token_flag_is_not_printed_by_a_debug_traceback(echo: str) -> None:
    run = dynaudit("measure", "hf://org/private-model", "--hf-endpoint", echo, "--hf-token",
                   HF_FLAG_TOKEN, env={"DYNAUDIT_DEBUG": "1"})  # fmt: skip
    assert_not_leaked(run, HF_FLAG_TOKEN, f"Bearer {HF_FLAG_TOKEN}")


def test_logged_warnings_are_scrubbed(tmp_path: Path) -> None:
    code = (
        "import logging; from dynaudit.secrets import scrub_logging; scrub_logging(); "
        f"logging.getLogger('dynaudit.cache').warning('server said: Bearer %s', {TOKEN!r})"
    )
    env = {**os.environ, "MLFLOW_TRACKING_TOKEN": TOKEN}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert TOKEN not in run.stderr and "server said: Bearer ***" in run.stderr


# -- the scrub itself -----------------------------------------------------------------


def test_every_form_of_a_secret_is_scrubbed() -> None:
    secret = "tok-SECRET/abc+def=123"
    for prefix in ("", "x", "xy", "Authorization: Bearer "):  # every base64 alignment
        blob = base64.b64encode(f"{prefix}{secret} and more".encode()).decode()
        assert scrub(f"<{blob}>", [secret]) != f"<{blob}>"
    for form in forms(secret):
        assert scrub(f"body: {form}.", [secret]) == f"body: {REDACTED}."
    lower = quote(secret, safe="").replace("%2F", "%2f")
    assert scrub(lower, [secret]) == REDACTED


def test_short_secrets_do_not_redact_everything() -> None:
    assert scrub("an ab error", ["ab"]) == "an ab error"  # under 4 characters: not scrubbed
    assert scrub("pass=abcd; abcdef", ["abcd"]) == f"pass={REDACTED}; abcdef"  # alone only
    assert scrub("xx-abcdefg-yy", ["abcdefg"]) == f"xx-{REDACTED}-yy"  # 6 or more: anywhere


def test_secrets_come_from_the_variables_the_user_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_SECRETvariable123")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://u:{quote(URL_PASSWORD)}@example.org")
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    text = f"{basic} {PASSWORD} hf_SECRETvariable123 {URL_PASSWORD} {USER}"
    assert scrub(text) == f"{REDACTED} {REDACTED} {REDACTED} {REDACTED} {USER}"
    assert scrub("nothing secret here") == "nothing secret here"
