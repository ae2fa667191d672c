"""MLflow is a side channel (SPEC §8): it is logged after every report file is written, and its
failure is one warning line while the verdict's exit code stands (issue 18). Before, an
unreachable server turned a measured report into exit 3, and a NaN verdict (exit 1) too, with
no report written."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

FAST = ["--q-dim", "16", "--pieces", "4", "--steps", "30"]


def _dead_server() -> str:
    """A local URL that refuses connections at once (a port bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _run(*args: str | Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ, "MLFLOW_TRACKING_URI": _dead_server(), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "DYNAUDIT_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "dynaudit", *map(str, args)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


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
