"""MLflow is a side channel (SPEC §8): it is logged after every report file is written, and its
failure is one warning line while the verdict's exit code stands (issues 18 and 20). Before, an
unreachable server turned a measured report into exit 3, and a NaN verdict (exit 1) too, with
no report written; an MLflow 3 file store was exit 4; and MLflow's "View run" link went to
stdout, into `--json -`."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dynaudit.sources.mlflow import major_version
from tests.cli import CliResult, run_cli
from tests.mlflowserver import MlflowServer

FAST = ["--q-dim", "16", "--pieces", "4", "--steps", "30"]


def _dead_server() -> str:
    """A local URL that refuses connections at once (a port bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _run(*args: str | Path, tmp_path: Path, env: dict[str, str] | None = None) -> CliResult:
    """``dynaudit ARGS``; by default against a dead server, with retries set off by the user."""
    default = {
        "MLFLOW_TRACKING_URI": _dead_server(),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    }
    base: dict[str, str | None] = {k: None for k in os.environ if k.startswith("MLFLOW_")}
    base["DYNAUDIT_CACHE_DIR"] = str(tmp_path / "cache")
    return run_cli(*args, env=base | (default if env is None else env))


def _model(tmp_path: Path, name: str = "model") -> Path:
    torch.manual_seed(0)
    weights = {"fc1.weight": torch.randn(32, 16), "fc2.weight": torch.randn(8, 32)}
    model = tmp_path / name
    model.mkdir()
    save_file(weights, str(model / "model.safetensors"))
    return model


@pytest.mark.parametrize("poisoned", [False, True], ids=["healthy", "nan"])
def test_an_unreachable_mlflow_is_a_warning_and_the_verdict_stands(
    tmp_path: Path, poisoned: bool
) -> None:
    torch.manual_seed(0)
    weights = {"fc1.weight": torch.randn(32, 16), "fc2.weight": torch.randn(8, 32)}
    if poisoned:
        weights["fc2.weight"][0, 0] = float("nan")
    model = tmp_path / "model"
    model.mkdir()
    save_file(weights, str(model / "model.safetensors"))
    report = tmp_path / "report.json"
    proc = _run("measure", model, "--mlflow", "--json", report, "-q", *FAST, tmp_path=tmp_path)
    assert proc.returncode == (1 if poisoned else 0), proc.stderr
    assert json.loads(report.read_text())["layers"], "the report is written before MLflow"
    warnings = [line for line in proc.stderr.splitlines() if "MLflow" in line]
    assert len(warnings) == 1 and warnings[0].startswith("dynaudit: warning:"), proc.stderr
    assert "the verdict stands" in warnings[0]
    assert "Traceback" not in proc.stderr


def _check_with_every_report(tmp_path: Path, env: dict[str, str]) -> tuple[CliResult, list[Path]]:
    model = _model(tmp_path)
    reports = [tmp_path / "check.json", tmp_path / "check.md", tmp_path / "check.xml"]
    proc = _run(
        "compare", model, model, "--mlflow", "--json", reports[0], "--markdown",
        reports[1], "--junit", reports[2], "-q", *FAST, tmp_path=tmp_path, env=env,
    )  # fmt: skip
    return proc, reports


def test_check_against_a_dead_server_with_mlflows_default_retries(tmp_path: Path) -> None:
    """No MLFLOW_HTTP_* variable set: MLflow alone would retry for minutes (the test would
    hang); dynaudit bounds it, writes every report, warns once, exits 0."""
    proc, reports = _check_with_every_report(tmp_path, {"MLFLOW_TRACKING_URI": _dead_server()})
    assert proc.returncode == 0, proc.stderr
    assert all(path.stat().st_size > 0 for path in reports)
    (line,) = proc.stderr.splitlines()  # one line, nothing else (no retry chatter)
    assert line.startswith("dynaudit: warning: could not log to MLflow") and "cannot reach" in line


@pytest.mark.skipif(major_version() < 3, reason="MLflow 2 still writes file stores")
def test_check_with_an_mlflow_3_file_store_is_a_warning(tmp_path: Path) -> None:
    """Regression (issue 20): MLflow 3 refuses file stores; that was exit 4, "internal error"."""
    store = (tmp_path / "mlruns").as_uri()
    proc, reports = _check_with_every_report(tmp_path, {"MLFLOW_TRACKING_URI": store})
    assert proc.returncode == 0, proc.stderr
    assert all(path.stat().st_size > 0 for path in reports)
    (line,) = proc.stderr.splitlines()
    assert line.startswith("dynaudit: warning:") and "MLFLOW_ALLOW_FILE_STORE=true" in line


def test_the_json_report_on_stdout_stays_json_when_logging_to_mlflow(
    tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    """MLflow prints "View run <name> at: <url>" to stdout when a run ends: it goes to stderr.
    (`compare A B` is `check B --baseline A` with fit settings of its own.)"""
    model = _model(tmp_path)
    proc = _run("compare", model, model, "--mlflow", "--json", "-", *FAST,
                tmp_path=tmp_path, env={"MLFLOW_TRACKING_URI": mlflow_server.url})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["verdict"]["verdict"] == "pass"
    assert "View run dynaudit check" in proc.stderr
