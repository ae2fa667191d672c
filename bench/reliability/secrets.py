"""Secrets: the Hub token and MLflow credentials are used, and never written anywhere.

Distinctive fake credentials are set the ways users set them (``HF_TOKEN``, ``--hf-token``,
``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``) for runs against a local
Hugging Face–compatible endpoint that requires the token (tests/hubserver.py) and a real
``mlflow server`` (tests/mlflowserver.py) — successes and failures, so error messages and
``DYNAUDIT_DEBUG`` tracebacks are covered too. Then every place dynaudit writes is searched
for them: stdout, stderr, the reports asked for, every file of the Hugging Face cache and of
dynaudit's cache, and in MLflow every run's parameters, tags and artifacts, every model
version's tags and the server's own files.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.reliability.core import Case, Outcome, Run, Workspace, timed

__all__ = ["CASES"]

TABLE = "secrets"
FAST = ["--q-dim", "16", "--pieces", "4", "--steps", "30"]

HF_TOKEN = "hf_SECRETcanaryHUB7d3f9a1c5e8b2d4f6a"
FLAG_TOKEN = "hf_SECRETcanaryFLAG0b1c2d3e4f5a6b7c"  # given with --hf-token
MLFLOW_TOKEN = "mlflow-SECRETcanaryTOKEN-5c7e9a1b3d"
MLFLOW_USER = "canary-user-SECRET-u7"
MLFLOW_PASSWORD = "mlflow-SECRETcanaryPASSWORD-8f2a4c"
URL_PASSWORD = "SECRETcanaryURLpw3e5"  # in MLFLOW_TRACKING_URI, http://user:pw@host

SECRETS = {
    "HF_TOKEN": HF_TOKEN,
    "--hf-token": FLAG_TOKEN,
    "MLFLOW_TRACKING_TOKEN": MLFLOW_TOKEN,
    "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD,
    "MLflow basic auth": base64.b64encode(f"{MLFLOW_USER}:{MLFLOW_PASSWORD}".encode()).decode(),
    "password in the tracking URI": URL_PASSWORD,
}


@dataclass
class Findings:
    """Everything searched so far, and where a secret turned up."""

    runs: list[tuple[str, Run, int]] = field(default_factory=list)  # label, run, expected code
    places: int = 0
    found: list[str] = field(default_factory=list)

    def search(self, where: str, content: str | bytes) -> None:
        self.places += 1
        data = content.encode() if isinstance(content, str) else content
        for label, secret in SECRETS.items():
            if secret.encode() in data:
                self.found.append(f"{label} in {where}")

    def run(self, label: str, run: Run, expected: int) -> Run:
        self.runs.append((label, run, expected))
        self.search(f"stdout of {label}", run.stdout)
        self.search(f"stderr of {label}", run.stderr)
        return run

    def files(self, where: str, roots: Iterable[Path]) -> None:
        for root in roots:
            if not root.exists():
                continue
            for path in [root] if root.is_file() else sorted(root.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    self.search(f"{where} ({path.relative_to(root.parent)})", path.read_bytes())

    def outcome(self, name: str, family: str, seconds: float) -> Outcome:
        wrong = [f"{label}: exit {run.code} (expected {expected}): {run.message[:160]}"
                 for label, run, expected in self.runs if run.code != expected]  # fmt: skip
        found = sorted(set(self.found))
        actual = "found in " + "; ".join(found[:4]) if found else "not found"
        detail = (
            f"{len(self.runs)} runs ({sum(r.code != 0 for _, r, _ in self.runs)} failing on "
            f"purpose), {self.places} outputs, files and MLflow records searched"
        )
        if wrong:
            detail = "runs did not go as planned: " + "; ".join(wrong)
        return Outcome(TABLE, name, family, "not found", actual, not found and not wrong, detail,
                       seconds)  # fmt: skip


def _run(*args: str | Path, env: dict[str, str], timeout: float = 900) -> Run:
    """``python -m dynaudit ARGS`` with exactly the given extra environment (unlike
    :func:`bench.reliability.core.dynaudit`, which drops ``DYNAUDIT_DEBUG``)."""
    argv = [sys.executable, "-m", "dynaudit", *map(str, args)]
    child = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1"}
    for name in ("DYNAUDIT_DEBUG", "GITHUB_ACTIONS", "HF_TOKEN", "MLFLOW_TRACKING_URI"):
        child.pop(name, None)
    proc = subprocess.run(argv, env={**child, **env}, capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip
    return Run(argv, proc.returncode, proc.stdout, proc.stderr)


def _model(folder: Path) -> Path:
    """A small generic checkpoint (three Linear layers)."""
    gen = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {"fc1.weight": torch.randn(48, 24, generator=gen) * 0.1,
         "fc2.weight": torch.randn(48, 48, generator=gen) * 0.1,
         "fc3.weight": torch.randn(12, 48, generator=gen) * 0.1},
        str(folder / "model.safetensors"),
    )  # fmt: skip
    return folder


def _reports(folder: Path, name: str) -> tuple[list[str], list[Path]]:
    paths = [folder / f"{name}.json", folder / f"{name}.md"]
    return ["--json", str(paths[0]), "--markdown", str(paths[1])], paths


def _workspace(ws: Workspace, name: str) -> tuple[Path, dict[str, str]]:
    import shutil

    folder = ws.root / "secrets" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    caches = {"HF_HOME": str(folder / "hf-home"), "DYNAUDIT_CACHE_DIR": str(folder / "cache")}
    return folder, caches


def _hub_tokens(ws: Workspace) -> Outcome:
    """The Hub token from HF_TOKEN and from --hf-token, against a repository that needs it:
    measure, inspect (ranged header reads), check with every report, and failures (a wrong
    repo id, a wrong revision, the debug traceback)."""
    from tests.hubserver import LocalHub

    findings = Findings()
    with timed() as elapsed:
        folder, caches = _workspace(ws, "hub")
        (folder / "storage").mkdir()
        hub = LocalHub(folder / "storage").start()
        try:
            hub.add("org/private-model", _model(folder / "model"), token=HF_TOKEN)
            hub.add("org/flag-model", _model(folder / "model"), token=FLAG_TOKEN)
            endpoint = ["--hf-endpoint", hub.url]
            env = {**caches, "HF_TOKEN": HF_TOKEN}
            outputs: list[Path] = []
            flags, paths = _reports(folder, "measure")
            outputs += paths
            findings.run("measure", _run("measure", "hf://org/private-model", *endpoint, *flags,
                                         *FAST, env=env), 0)  # fmt: skip
            findings.run("inspect", _run("inspect", "hf://org/private-model", *endpoint, env=env),
                         0)  # fmt: skip
            flags, paths = _reports(folder, "check")
            junit = folder / "check.xml"
            outputs += [*paths, junit]
            findings.run("check", _run("check", "hf://org/private-model", "--baseline",
                                       "hf://org/private-model", *endpoint, *flags, "--junit",
                                       junit, env=env), 0)  # fmt: skip
            findings.run("wrong repo id", _run("measure", "hf://org/no-such-model", *endpoint,
                                               *FAST, env=env), 3)  # fmt: skip
            findings.run("wrong revision", _run("measure", "hf://org/private-model@v9",
                                                *endpoint, *FAST, env=env), 3)  # fmt: skip
            findings.run("wrong repo id, DYNAUDIT_DEBUG=1",
                         _run("measure", "hf://org/no-such-model", *endpoint, *FAST,
                              env={**env, "DYNAUDIT_DEBUG": "1"}), 3)  # fmt: skip
            flag = [*endpoint, "--hf-token", FLAG_TOKEN]
            findings.run("--hf-token measure", _run("measure", "hf://org/flag-model", *flag,
                                                    *FAST, env=caches), 0)  # fmt: skip
            findings.run("--hf-token on a repo it does not open",
                         _run("measure", "hf://org/private-model", *flag, *FAST, env=caches),
                         3)  # fmt: skip
            findings.run("--hf-token, DYNAUDIT_DEBUG=1",
                         _run("measure", "hf://org/no-such-model", *flag, *FAST,
                              env={**caches, "DYNAUDIT_DEBUG": "1"}), 3)  # fmt: skip
        finally:
            hub.stop()
        findings.files("reports", outputs)
        findings.files("HF cache", [Path(caches["HF_HOME"])])
        findings.files("dynaudit cache", [Path(caches["DYNAUDIT_CACHE_DIR"])])
    return findings.outcome("HF_TOKEN and --hf-token, Hub successes and failures", "generic",
                            elapsed())  # fmt: skip


def _search_mlflow(findings: Findings, url: str, folder: Path) -> None:
    """Every run's parameters, tags, metric names and artifacts, every model version's tags."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    client = MlflowClient(tracking_uri=url, registry_uri=url)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments]) if experiments else []
    for run in runs:
        where = f"MLflow run {run.info.run_name or run.info.run_id}"
        findings.search(f"{where} params", repr(sorted(run.data.params.items())))
        findings.search(f"{where} tags", repr(sorted(run.data.tags.items())))
        findings.search(f"{where} metric names", repr(sorted(run.data.metrics)))
        artifacts = folder / "downloaded" / run.info.run_id
        download_artifacts(run_id=run.info.run_id, dst_path=str(artifacts), tracking_uri=url)
        findings.files(f"{where} artifacts", [artifacts])
    for version in client.search_model_versions():
        findings.search(f"model version {version.name}/{version.version}",
                        repr((version.tags, version.source, version.description)))  # fmt: skip
    if not runs:
        findings.found.append("nothing: no MLflow run was logged")


def _mlflow_credentials(ws: Workspace) -> Outcome:
    """MLflow credentials (token, user and password, a password in the URI) for a model
    version read, logged and stored as a baseline, checked, plus failures."""
    from mlflow import MlflowClient

    from tests.mlflowserver import MlflowServer

    findings = Findings()
    with timed() as elapsed:
        folder, caches = _workspace(ws, "mlflow")
        (folder / "server").mkdir()
        model = _model(folder / "model")
        server = MlflowServer(folder / "server").start()
        try:
            client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
            run = client.create_run(client.create_experiment("secrets-models"))
            client.log_artifacts(run.info.run_id, str(model), "checkpoint")
            client.set_terminated(run.info.run_id)
            client.create_registered_model("secret-model")
            client.create_model_version("secret-model", source=f"runs:/{run.info.run_id}/"
                                        "checkpoint", run_id=run.info.run_id)  # fmt: skip
            env = {
                **caches, "MLFLOW_TRACKING_URI": server.url,
                "MLFLOW_TRACKING_TOKEN": MLFLOW_TOKEN, "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
                "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD, "MLFLOW_EXPERIMENT_NAME": "secrets",
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            }  # fmt: skip
            outputs: list[Path] = []
            flags, paths = _reports(folder, "measure")
            outputs += paths
            findings.run("measure --mlflow", _run("measure", "models:/secret-model/1", "--mlflow",
                                                  *flags, *FAST, env=env), 0)  # fmt: skip
            # --out too: `baseline --mlflow` alone is refused by the CLI (it requires --out).
            findings.run("baseline --mlflow", _run("baseline", "models:/secret-model/1",
                                                   "--mlflow", "--out", folder / "baseline",
                                                   "--seeds", "1", *FAST, env=env),
                         0)  # fmt: skip
            flags, paths = _reports(folder, "check")
            junit = folder / "check.xml"
            outputs += [*paths, junit]
            findings.run("check --mlflow", _run("check", "models:/secret-model/1", "--mlflow",
                                                *flags, "--junit", junit, env=env), 0)  # fmt: skip
            findings.run("unknown model", _run("measure", "models:/no-such-model/1", *FAST,
                                               env=env), 3)  # fmt: skip
            findings.run("unknown version, DYNAUDIT_DEBUG=1",
                         _run("measure", "models:/secret-model/7", *FAST,
                              env={**env, "DYNAUDIT_DEBUG": "1"}), 3)  # fmt: skip
            in_uri = server.url.replace("://", f"://{MLFLOW_USER}:{URL_PASSWORD}@")
            findings.run("password in MLFLOW_TRACKING_URI, measure --mlflow",
                         _run("measure", "models:/secret-model/1", "--mlflow", "--no-cache",
                              *FAST, env={**env, "MLFLOW_TRACKING_URI": in_uri}), 0)  # fmt: skip
            findings.run("password in --mlflow-uri, dead server",
                         _run("measure", "models:/secret-model/1", "--mlflow-uri",
                              in_uri.rsplit(":", 1)[0] + ":9", *FAST, env=env), 3)  # fmt: skip
            _search_mlflow(findings, server.url, folder)
        finally:
            server.stop()
        findings.files("reports", outputs)
        findings.files("dynaudit cache", [Path(caches["DYNAUDIT_CACHE_DIR"])])
        findings.files("HF cache", [Path(caches["HF_HOME"])])
        findings.files("MLflow server files", [folder / "server"])
    return findings.outcome("MLflow token, user/password, password in URI", "generic",
                            elapsed())  # fmt: skip


CASES: list[Case] = [
    Case(TABLE, "hub tokens", "generic", _hub_tokens),
    Case(TABLE, "mlflow credentials", "generic", _mlflow_credentials),
]
