"""MLflow logging, baselines stored in MLflow, and the training callback, against a real
`mlflow server`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import dynaudit
from dynaudit.sources import SourceOptions
from dynaudit.tracking import DynauditCallback, log_report, metric_name
from tests.mlflowserver import MlflowServer

FAST: dict[str, Any] = {"q_dim": 16, "pieces": 4, "steps": 60}
GATE: dict[str, Any] = {"q_dim": 32, "pieces": 4, "steps": 150}


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


def test_a_report_is_logged_with_metrics_params_tags_and_artifacts(
    mlflow_server: MlflowServer, digits_mlp: Path
) -> None:
    report = dynaudit.measure(digits_mlp, **FAST)
    run_id = log_report(report, tracking_uri=mlflow_server.url, experiment="dynaudit-tests")
    client = client_for(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["dynaudit/mean_distance/all"] == pytest.approx(report.summary.all.mean_distance)
    assert any(key.startswith("dynaudit/fidelity/layer/") for key in metrics)
    assert run.data.params["dynaudit.q_dim"] == "16"
    assert run.data.tags["dynaudit.family"] == report.family.name
    listed = {a.path for a in client.list_artifacts(run_id, "dynaudit")}
    assert listed == {"dynaudit/report.json", "dynaudit/report.md"}


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
    assert "View run" in capsys.readouterr().out  # without credentials, MLflow's link stays


def test_compare_logs_to_mlflow_from_the_cli(mlflow_server: MlflowServer, digits_mlp: Path) -> None:
    """Regression: `compare` had no --mlflow (only `check` logged)."""
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "dynaudit", "compare", str(digits_mlp), str(digits_mlp),
         "--q-dim", "16", "--pieces", "4", "--steps", "60", "--mlflow",
         "--mlflow-uri", mlflow_server.url, "--quiet"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "CI": "true", "MLFLOW_EXPERIMENT_NAME": "dynaudit-compare"},
    )  # fmt: skip
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
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "dynaudit", "baseline", str(digits_mlp), "--mlflow",
         "--mlflow-uri", mlflow_server.url, "--q-dim", "16", "--pieces", "4", "--steps", "30",
         "--seeds", "1"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "CI": "true", "MLFLOW_EXPERIMENT_NAME": "dynaudit-baseline-cli"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "runs:/" in proc.stdout
    client = client_for(mlflow_server)
    experiment = client.get_experiment_by_name("dynaudit-baseline-cli")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["dynaudit.baseline"].startswith("runs:/")


def test_a_baseline_stored_in_mlflow_is_found_and_read_back(
    mlflow_server: MlflowServer, tiny_llama: Path, tmp_path: Path
) -> None:
    options = SourceOptions(mlflow_uri=mlflow_server.url)
    client = client_for(mlflow_server)
    run = client.create_run(client.create_experiment("dynaudit-registry"))
    client.log_artifacts(run.info.run_id, str(tiny_llama), "checkpoint")
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


def test_the_callback_logs_a_trajectory_during_a_real_trainer_run(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

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
    assert client_for(mlflow_server).get_run(callback.run_id).info.status == "FINISHED"
