"""MLflow logging, baselines stored in MLflow, and the training callback, against a real
`mlflow server` (MLflow 2.x and 3.x clients)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import dynaudit
from dynaudit.errors import DynauditError, InputError, SourceUnreachable, UsageError
from dynaudit.schema import CheckReport
from dynaudit.sources import SourceOptions
from dynaudit.sources.mlflow import major_version
from dynaudit.tracking import log_report, metric_name
from tests.cli import run_cli
from tests.mlflowserver import MlflowServer, free_port

FAST: dict[str, Any] = {"q_dim": 16, "pieces": 4, "steps": 60}
GATE: dict[str, Any] = {"q_dim": 32, "pieces": 4, "steps": 150}


@pytest.fixture(scope="module")
def checked(digits_mlp: Path) -> CheckReport:
    """A real check report: the digits MLP against itself (pass)."""
    return dynaudit.compare(digits_mlp, digits_mlp, cache=False, **FAST)


@pytest.fixture
def git_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The working directory is a fresh git checkout with one commit; returns the commit."""
    repo = tmp_path / "project"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "first"], check=True)
    monkeypatch.chdir(repo)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    return head.stdout.strip()


def artifact_json(server: MlflowServer, run_id: str, path: str, tmp_path: Path) -> Any:
    (tmp_path / "download").mkdir(exist_ok=True)  # MLflow 2 does not create it
    folder = client_for(server).download_artifacts(run_id, path, str(tmp_path / "download"))
    return json.loads(Path(folder).read_text())


def client_for(server: MlflowServer) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.url, registry_uri=server.url)


def test_metric_names_are_valid_and_distinct() -> None:
    from mlflow.utils.validation import _validate_metric_name

    names = ["model.layers.0.q_proj.weight", "evil\n::x:: / ../..//", "a b", "a_b", "x" * 400]
    keys = [metric_name("dynaudit", "mean_distance", "layer", n) for n in names]
    for key in keys:
        _validate_metric_name(key)
        assert len(key) <= 250
    assert keys[0] == "dynaudit/mean_distance/layer/model.layers.0.q_proj.weight"
    assert len(set(keys)) == len(keys)


def test_a_report_is_logged_with_aggregates_a_layer_table_params_tags_and_artifacts(
    mlflow_server: MlflowServer, digits_mlp: Path, git_checkout: str, tmp_path: Path
) -> None:
    """Regression (issue 20): one metric per layer and figure (~675 for a 7B model), every run
    named "dynaudit", and none of MLflow's context tags."""
    report = dynaudit.measure(digits_mlp, **FAST)
    run_id = log_report(report, tracking_uri=mlflow_server.url, experiment="dynaudit-tests")
    client = client_for(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"dynaudit measure {digits_mlp}"
    metrics = run.data.metrics
    assert metrics["dynaudit/mean_distance/all"] == pytest.approx(report.summary.all.mean_distance)
    assert metrics["dynaudit/layers/all"] == len(report.measured)
    assert metrics["dynaudit/skipped"] == len(report.skipped)
    assert "dynaudit/fidelity_median/group/bottom" in metrics
    assert not any("/layer/" in key for key in metrics)  # per-layer figures: the table
    assert run.data.params["dynaudit.q_dim"] == "16"
    tags = run.data.tags
    assert tags["dynaudit.family"] == report.family.name
    assert tags["mlflow.source.git.commit"] == git_checkout  # the working directory's
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"]
    assert tags["mlflow.source.name"] == sys.argv[0]
    listed = {a.path for a in client.list_artifacts(run_id, "dynaudit")}
    assert listed == {"dynaudit/report.json", "dynaudit/report.md", "dynaudit/layers.json"}
    table = artifact_json(mlflow_server, run_id, "dynaudit/layers.json", tmp_path)
    assert table["columns"][:2] == ["name", "type"]
    rows = {row[0]: dict(zip(table["columns"], row, strict=True)) for row in table["data"]}
    assert set(rows) == {layer.name for layer in report.layers}
    for layer in report.measured:
        assert rows[layer.name]["mean_distance"] == pytest.approx(layer.mean_distance)


def test_a_check_logs_its_policy_verdict_and_counts(
    mlflow_server: MlflowServer,
    checked: CheckReport,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # not a git checkout: no commit tag
    run_id = log_report(checked, tracking_uri=mlflow_server.url, experiment="dynaudit-checks")
    run = client_for(mlflow_server).get_run(run_id)
    source, baseline = checked.source.uri, checked.baseline.source.uri
    assert run.info.run_name == f"dynaudit check {source} vs {baseline}"
    assert "mlflow.source.git.commit" not in run.data.tags
    assert run.data.tags["dynaudit.verdict"] == "pass"
    assert run.data.tags["dynaudit.failing_groups"] == "none"
    params = run.data.params
    assert params["dynaudit.policy.max_drop_all"] == str(checked.policy.max_drop_all)
    assert params["dynaudit.policy.max_noise_change"] == str(checked.policy.max_noise_change)
    metrics = run.data.metrics
    assert metrics["dynaudit/verdict_pass"] == 1.0 and metrics["dynaudit/findings"] == 0.0
    assert metrics["dynaudit/layers/all"] == len(checked.comparison.layers)
    assert metrics["dynaudit/change/all"] == pytest.approx(0.0, abs=1e-9)
    assert not any("/layer/" in key for key in metrics)
    table = artifact_json(mlflow_server, run_id, "dynaudit/layers.json", tmp_path)
    assert [row[0] for row in table["data"]] == [x.name for x in checked.comparison.layers]
    assert "weight_change" in table["columns"]


def test_the_checked_model_version_is_tagged_in_the_registry_mlflow_names(
    mlflow_server: MlflowServer,
    checked: CheckReport,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``MLFLOW_REGISTRY_URI`` is the registry, as in MLflow (it was overridden by the tracking
    URI): the run goes to a local database, the version's tags to the server's registry."""
    pytest.importorskip("sqlalchemy", reason="a local database store needs the full mlflow")
    client = client_for(mlflow_server)
    client.create_registered_model("registry-elsewhere")
    run = client.create_run(client.create_experiment("registry-elsewhere"))
    client.create_model_version(
        "registry-elsewhere", source=f"runs:/{run.info.run_id}/m", run_id=run.info.run_id
    )
    client.set_model_version_tag("registry-elsewhere", "1", "dynaudit.failing_groups", "top")
    source = checked.source.model_copy(
        update={"uri": "models:/registry-elsewhere@champion", "revision": "registry-elsewhere/1"}
    )
    report = checked.model_copy(update={"source": source})
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server.url)
    monkeypatch.chdir(tmp_path)  # a database store keeps its artifacts in ./mlruns
    local = f"sqlite:///{tmp_path / 'runs.db'}"
    run_id = log_report(report, tracking_uri=local)
    tags = client.get_model_version("registry-elsewhere", "1").tags
    assert tags["dynaudit.verdict"] == "pass" and tags["dynaudit.report_run"] == run_id
    assert tags["dynaudit.failing_groups"] == "none"  # a stale value is replaced
    from mlflow import MlflowClient

    assert MlflowClient(tracking_uri=local).get_run(run_id).data.tags["dynaudit.verdict"] == "pass"


@pytest.fixture
def listening_silently() -> Iterator[str]:
    """A server that accepts connections and never answers (a hung proxy)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_dead_server_fails_in_seconds_as_one_error(checked: CheckReport) -> None:
    """MLflow retries 7 times with exponential back-off by default (minutes); bounded unless
    the user set the variables."""
    started = time.monotonic()
    with pytest.raises(SourceUnreachable, match="cannot reach the MLflow server"):
        log_report(checked, tracking_uri=f"http://127.0.0.1:{free_port()}")
    assert time.monotonic() - started < 60


def test_a_silent_server_times_out_with_the_users_settings(
    checked: CheckReport, listening_silently: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    started = time.monotonic()
    with pytest.raises(SourceUnreachable, match="cannot reach the MLflow server"):
        log_report(checked, tracking_uri=listening_silently)
    assert time.monotonic() - started < 9  # not dynaudit's 10 s × 3 attempts: the user's 1 s


def test_a_file_store_is_refused_in_one_line_by_mlflow_3(
    checked: CheckReport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    store = (tmp_path / "mlruns").as_uri()
    if major_version() < 3:  # MLflow 2 still writes file stores
        run_id = log_report(checked, tracking_uri=store)
        assert (tmp_path / "mlruns").is_dir() and run_id
        return
    with pytest.raises(InputError, match="MLFLOW_ALLOW_FILE_STORE=true") as raised:
        log_report(checked, tracking_uri=store)
    assert "\n" not in str(raised.value)


def test_an_unwritable_artifact_store_is_one_error(
    mlflow_server: MlflowServer, checked: CheckReport, tmp_path: Path
) -> None:
    """The artifact store's own failure (an OSError from a local store) is a DynauditError, and
    the run dynaudit started is ended as FAILED, not left RUNNING."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    client = client_for(mlflow_server)
    experiment = client.create_experiment(
        "unwritable", artifact_location=(blocker / "artifacts").as_uri()
    )
    with pytest.raises(DynauditError, match="artifact store failed: NotADirectoryError"):
        log_report(checked, tracking_uri=mlflow_server.url, experiment="unwritable")
    (run,) = client.search_runs([experiment])
    assert run.info.status == "FAILED"


def test_importing_the_tracking_module_does_not_import_transformers() -> None:
    """Regression (issue 20): the callback's base class was built at import, and importing
    transformers took seconds (~18 s on a laptop)."""
    code = (
        "import sys, dynaudit.tracking as t; assert 'transformers' not in sys.modules; "
        "from transformers import TrainerCallback; "
        "assert issubclass(t.DynauditCallback, TrainerCallback); "
        "assert t.DynauditCallback is t.DynauditCallback"
    )
    pytest.importorskip("transformers")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.skipif(major_version() >= 3, reason="MLflow 3 has logged models")
def test_a_logged_model_is_refused_in_one_line_by_mlflow_2() -> None:
    from dynaudit.sources.mlflow import fetch

    options = SourceOptions(mlflow_uri=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(UsageError, match="MLflow 3 logged model"):
        fetch("models:/m-0123abcd", options)


def test_credentials_in_the_tracking_uri_are_not_printed(
    mlflow_server: MlflowServer, write_checkpoint: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: MLflow prints "View run … at: <tracking URI>/#/…" when a run ends, so a
    password in MLFLOW_TRACKING_URI (http://user:pw@host) went to stdout — the CI log."""
    path = write_checkpoint({"a.weight": torch.randn(12, 10), "b.weight": torch.randn(10, 12)})
    report = dynaudit.measure(path, cache=False, **FAST)
    with_password = mlflow_server.url.replace("://", "://someone:s3cretPW@")
    run_id = log_report(report, tracking_uri=with_password, experiment="dynaudit-credentials")
    assert client_for(mlflow_server).get_run(run_id).info.status == "FINISHED"
    captured = capsys.readouterr()
    assert "s3cretPW" not in captured.out + captured.err
    log_report(report, tracking_uri=mlflow_server.url, experiment="dynaudit-credentials")
    captured = capsys.readouterr()
    assert "View run" in captured.err  # MLflow's link stays, on stderr: stdout is the report's
    assert "View run" not in captured.out


def test_compare_logs_to_mlflow_from_the_cli(mlflow_server: MlflowServer, digits_mlp: Path) -> None:
    """Regression: `compare` had no --mlflow (only `check` logged)."""
    fit = ["--q-dim", "16", "--pieces", "4", "--steps", "60"]
    mlflow = ["--mlflow", "--mlflow-uri", mlflow_server.url]
    env = {"MLFLOW_EXPERIMENT_NAME": "dynaudit-compare"}
    proc = run_cli("compare", digits_mlp, digits_mlp, *fit, *mlflow, "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr
    client = client_for(mlflow_server)
    experiment = client.get_experiment_by_name("dynaudit-compare")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["dynaudit.verdict"] == "pass"
    assert run.data.metrics["dynaudit/change/all"] == pytest.approx(0.0, abs=1e-9)


def test_a_baseline_into_mlflow_alone_from_the_cli(
    mlflow_server: MlflowServer, digits_mlp: Path
) -> None:
    """Regression: the CLI required --out, though `baseline SOURCE --mlflow` needs none."""
    fit = ["--q-dim", "16", "--pieces", "4", "--steps", "30", "--seeds", "1"]
    mlflow = ["--mlflow", "--mlflow-uri", mlflow_server.url]
    env = {"MLFLOW_EXPERIMENT_NAME": "dynaudit-baseline-cli"}
    proc = run_cli("baseline", digits_mlp, *mlflow, *fit, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "runs:/" in proc.stdout
    client = client_for(mlflow_server)
    experiment = client.get_experiment_by_name("dynaudit-baseline-cli")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["dynaudit.baseline"].startswith("runs:/")


def test_a_versions_baseline_tag_comes_before_its_model_card(
    mlflow_server: MlflowServer, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registered version whose card names a public base (unreachable here) and whose
    ``dynaudit.baseline`` tag names a stored baseline is checked against the tag's baseline.
    Before, the card won: the check went looking for the public base and gave no verdict."""
    import shutil

    options = SourceOptions(mlflow_uri=mlflow_server.url)
    stored = dynaudit.baseline(tiny_llama, mlflow=True, sources=options, **GATE).stored_at
    assert stored is not None
    carded = tmp_path / "carded"
    shutil.copytree(tiny_llama, carded)
    (carded / "README.md").write_text("---\nbase_model: org/public-base\n---\n# tuned\n")
    client = client_for(mlflow_server)
    run = client.create_run(client.create_experiment("dynaudit-carded"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)  # MLflow 2 uploads there
    client.log_artifacts(run.info.run_id, str(carded), "checkpoint")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("gate-carded")
    client.create_model_version(
        "gate-carded",
        source=f"runs:/{run.info.run_id}/checkpoint",
        run_id=run.info.run_id,
        tags={"dynaudit.baseline": stored},
    )
    report = dynaudit.check("models:/gate-carded/1", sources=options)
    assert report.baseline.resolved_from == "the MLflow model version's dynaudit.baseline tag"
    assert report.baseline.stored and report.verdict.passed, report.verdict.reasons


def test_a_baseline_stored_in_mlflow_is_found_and_read_back(
    mlflow_server: MlflowServer, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = SourceOptions(mlflow_uri=mlflow_server.url)
    client = client_for(mlflow_server)
    run = client.create_run(client.create_experiment("dynaudit-registry"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)  # MLflow 2 uploads there
    client.log_artifacts(run.info.run_id, str(tiny_llama), "checkpoint")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # dynaudit is given the server: options
    client.set_terminated(run.info.run_id)
    client.create_registered_model("gate-llama")
    client.create_model_version(
        "gate-llama", source=f"runs:/{run.info.run_id}/checkpoint", run_id=run.info.run_id
    )
    made = dynaudit.baseline("models:/gate-llama/1", mlflow=True, sources=options, **GATE)
    assert made.stored_at is not None and made.stored_at.startswith("runs:/")
    stored_run = client.get_run(made.stored_at.split("/")[1])
    assert stored_run.info.status == "FINISHED"
    assert stored_run.data.tags["dynaudit.baseline"] == made.stored_at
    version = client.get_model_version("gate-llama", "1")
    assert version.tags["dynaudit.baseline"] == made.stored_at
    report = dynaudit.check("models:/gate-llama/1", sources=options)
    assert report.baseline.resolved_from == "the MLflow model version's dynaudit.baseline tag"
    assert report.baseline.stored and report.verdict.passed, report.verdict.reasons
    logged = log_report(report, tracking_uri=mlflow_server.url)
    tags = client.get_run(logged).data.tags
    assert tags["dynaudit.verdict"] == "pass" and tags["dynaudit.baseline"] == made.stored_at
    assert stored_run.info.run_name == "dynaudit baseline models:/gate-llama/1"
    version = client.get_model_version("gate-llama", "1")  # the checked version, tagged
    assert version.tags["dynaudit.verdict"] == "pass"
    assert version.tags["dynaudit.report_run"] == logged


def test_the_callback_logs_a_trajectory_during_a_real_trainer_run(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from dynaudit.tracking import DynauditCallback

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    data = [{"input_ids": (ids := torch.randint(0, 64, (16,))), "labels": ids} for _ in range(16)]
    callback = DynauditCallback(
        every_n_steps=2, layers=r"q_proj|v_proj", tracking_uri=mlflow_server.url, **FAST
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
        learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=100,
        disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert [step for step, _ in callback.reports] == [2, 4]
    assert all(len(report.measured) == 4 for _, report in callback.reports)  # 2 blocks × q, v
    assert callback.run_id is not None
    history = client_for(mlflow_server).get_metric_history(
        callback.run_id, "dynaudit/mean_distance/all"
    )
    assert [point.step for point in history] == [2, 4]
    run = client_for(mlflow_server).get_run(callback.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "dynaudit during training"
    listed = {a.path for a in client_for(mlflow_server).list_artifacts(callback.run_id, "dynaudit")}
    assert listed == {"dynaudit/layers-step2.json", "dynaudit/layers-step4.json"}
