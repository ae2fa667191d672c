"""MLflow logging: reports as metrics, params, tags and artifacts; a training callback.

Metric names (``dynaudit/<figure>/<scope>``)::

    dynaudit/mean_distance/all            dynaudit/change/all              (check)
    dynaudit/mean_distance/group/bottom   dynaudit/change/group/bottom
    dynaudit/mean_distance/type/query     dynaudit/change/type/query
    dynaudit/mean_distance/layer/<name>   dynaudit/change/layer/<name>
    (likewise discrepancy and fidelity)   dynaudit/verdict_pass (1 or 0)

Layer names come from checkpoints, so they are made valid MLflow names (letters, digits,
``_ - . /`` and spaces; no ``..`` or ``//``; at most 250 characters, with a short hash when
a name had to be changed, so two names never collide). Settings are params (``dynaudit.*``,
logged once per run), family / verdict / baseline / source are tags (``dynaudit.*``), and the
JSON and Markdown reports are artifacts under ``dynaudit/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dynaudit.report import Aggregate, CheckReport, Report

__all__ = ["DynauditCallback", "log_report", "measure_and_log", "metric_name"]

_INVALID = re.compile(r"[^A-Za-z0-9_\-. /]")
_MAX_KEY = 250


def metric_name(*parts: str) -> str:
    """A valid, collision-free MLflow metric name for ``parts`` joined by ``/``."""
    raw = "/".join(parts)
    segments = [_INVALID.sub("_", segment).strip() for segment in raw.split("/")]
    clean = "/".join(s if s.strip(".") else "_" for s in segments if s)  # no "", ".", ".."
    if clean != raw or len(clean) > _MAX_KEY:
        tag = hashlib.sha256(raw.encode()).hexdigest()[:8]
        clean = f"{clean[: _MAX_KEY - 9]}-{tag}"
    return clean


def _aggregate_metrics(prefix: str, scope: str, agg: Aggregate) -> dict[str, float]:
    out = {}
    for figure in ("mean_distance", "discrepancy", "fidelity"):
        value = getattr(agg, figure)
        if value is not None:
            out[metric_name(prefix, figure, *scope.split("/"))] = float(value)
    return out


def report_metrics(report: Report | CheckReport, prefix: str = "dynaudit") -> dict[str, float]:
    """The report's figures as ``{metric name: value}``."""
    metrics: dict[str, float] = {}
    if isinstance(report, CheckReport):
        comparison = report.comparison
        scopes = [("all", comparison.all)]
        scopes += [(f"group/{g}", c) for g, c in comparison.groups.items()]
        scopes += [(f"type/{t}", c) for t, c in comparison.types.items()]
        for scope, compared in scopes:
            if compared.change is not None:
                metrics[metric_name(prefix, "change", *scope.split("/"))] = compared.change.mean
                metrics[metric_name(prefix, "change_std", *scope.split("/"))] = compared.change.std
        for moved in comparison.layers:
            if moved.change is not None:
                metrics[metric_name(prefix, "change", "layer", moved.name)] = moved.change.mean
            if moved.displacement is not None:
                key = metric_name(prefix, "displacement", "layer", moved.name)
                metrics[key] = moved.displacement
            for figure in ("weight_change", "noise_likeness"):
                value = getattr(moved, figure)
                if value is not None:
                    metrics[metric_name(prefix, figure, "layer", moved.name)] = value
        metrics[metric_name(prefix, "verdict_pass")] = 1.0 if report.verdict.passed else 0.0
        return metrics
    summary = report.summary
    metrics.update(_aggregate_metrics(prefix, "all", summary.all))
    for group, agg in summary.groups.items():
        metrics.update(_aggregate_metrics(prefix, f"group/{group}", agg))
    for type_, agg in summary.types.items():
        metrics.update(_aggregate_metrics(prefix, f"type/{type_}", agg))
    for layer in report.measured:
        for figure in ("mean_distance", "discrepancy", "fidelity"):
            value = getattr(layer, figure)
            if value is not None:
                metrics[metric_name(prefix, figure, "layer", layer.name)] = float(value)
    return metrics


def log_report(
    report: Report | CheckReport,
    *,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    step: int | None = None,
    artifacts: bool = True,
) -> str:
    """Log ``report`` to MLflow and return the run id. The run is ``run_id``, else the
    active run, else a new run in ``experiment`` (default ``MLFLOW_EXPERIMENT_NAME`` or
    "dynaudit"), which is then ended."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from dynaudit.sources.mlflow import client_environment, mlflow_errors

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    with client_environment(uri), mlflow_errors("logging the report to MLflow", uri):
        client = MlflowClient(tracking_uri=uri)
        active = mlflow.active_run()
        owned = False
        if run_id is None and active is not None:
            run_id = active.info.run_id
        if run_id is None:
            run_id = start_run(client, experiment)
            owned = True
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, value, now, step or 0) for key, value in report_metrics(report).items()
        ]
        existing = client.get_run(run_id).data.params
        params = [
            Param(f"dynaudit.{key}", str(value))
            for key, value in report.settings.items()
            if f"dynaudit.{key}" not in existing and key != "threads"
        ]
        for chunk in range(0, max(len(metrics), 1), 900):  # MLflow's batch limit is 1000
            client.log_batch(
                run_id, metrics=metrics[chunk : chunk + 900],
                params=params if chunk == 0 else [], tags=_tags(report) if chunk == 0 else [],
            )  # fmt: skip
        if artifacts:
            _log_artifacts(client, run_id, report, step)
        if owned:
            client.set_terminated(run_id)
    return run_id


def start_run(client: Any, experiment: str | None = None) -> str:
    """A new run in ``experiment`` (default ``MLFLOW_EXPERIMENT_NAME`` or "dynaudit")."""
    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "dynaudit"
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else client.create_experiment(name)
    return str(client.create_run(experiment_id, run_name="dynaudit").info.run_id)


def _tags(report: Report | CheckReport) -> list[Any]:
    from mlflow.entities import RunTag

    tags = {"dynaudit.family": report.family.name, "dynaudit.source": report.source.uri}
    tags["dynaudit.protocol_version"] = str(report.protocol_version)
    if isinstance(report, CheckReport):
        tags["dynaudit.verdict"] = report.verdict.verdict
        tags["dynaudit.baseline"] = report.baseline.ref
    return [RunTag(key, value[:5000]) for key, value in tags.items()]


def _log_artifacts(
    client: Any, run_id: str, report: Report | CheckReport, step: int | None
) -> None:
    from dynaudit.reports import render_markdown
    from dynaudit.reports.check import render_check_markdown

    name = "check" if isinstance(report, CheckReport) else "report"
    suffix = f"-step{step}" if step is not None else ""
    markdown = (
        render_check_markdown(report)
        if isinstance(report, CheckReport)
        else render_markdown(report)
    )
    with tempfile.TemporaryDirectory(prefix="dynaudit-mlflow-") as tmp:
        folder = Path(tmp)
        (folder / f"{name}{suffix}.json").write_text(report.model_dump_json(indent=2))
        (folder / f"{name}{suffix}.md").write_text(markdown)
        client.log_artifacts(run_id, str(folder), "dynaudit")


# -- during training --------------------------------------------------------------------


def measure_and_log(
    weights: Mapping[str, Any],
    step: int,
    *,
    config: Mapping[str, Any] | None = None,
    layers: str | None = None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    **settings: Any,
) -> Report:
    """Measure in-memory weights (a model or a state dict) and log the figures with ``step``:
    the plain-function form of :class:`DynauditCallback` for custom training loops.
    ``layers`` is a regular expression selecting layers by name (default: all)."""
    import dynaudit

    with _snapshot(weights, config) as folder:
        report = dynaudit.measure(folder, layers=layers, cache=False, **settings)
    log_report(report, run_id=run_id, tracking_uri=tracking_uri, step=step, artifacts=False)
    return report


@contextlib.contextmanager
def _snapshot(weights: Any, config: Mapping[str, Any] | None) -> Iterator[Path]:
    """The floating-point 2-D-and-up tensors of a model or state dict, written as a
    temporary safetensors checkpoint (with its config), for the usual pipeline to read."""
    import json

    import torch
    from safetensors.torch import save_file

    state = weights.state_dict() if hasattr(weights, "state_dict") else dict(weights)
    if config is None and hasattr(weights, "config") and hasattr(weights.config, "to_dict"):
        config = weights.config.to_dict()
    tensors = {}
    seen: set[int] = set()
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dim() >= 2:
            plain = tensor.detach().to("cpu", torch.float32).contiguous()
            pointer = plain.untyped_storage().data_ptr()
            tensors[name] = plain.clone() if pointer in seen else plain
            seen.add(pointer)
    with tempfile.TemporaryDirectory(prefix="dynaudit-snapshot-") as tmp:
        folder = Path(tmp)
        save_file(tensors, str(folder / "model.safetensors"))
        if config is not None:
            (folder / "config.json").write_text(json.dumps(dict(config), default=str))
        yield folder


def _callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:  # transformers is optional: the callback is then a plain object
        return object
    return TrainerCallback


class DynauditCallback(_callback_base()):  # type: ignore[misc]
    """A transformers ``TrainerCallback`` that measures the model every ``every_n_steps``
    steps (and/or at each epoch end) and logs the figures to MLflow with the global step, so
    the run shows the discrepancy trajectory. ``layers``: regex of layer names to measure."""

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_epoch: bool = False,
        layers: str | None = None,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        **settings: Any,
    ) -> None:
        if not every_n_steps and not every_epoch:
            every_epoch = True
        self.every_n_steps = every_n_steps
        self.every_epoch = every_epoch
        self.layers = layers
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.settings = settings
        self.reports: list[tuple[int, Report]] = []
        self._owned = False

    def _measure(self, model: Any, step: int) -> None:
        import mlflow

        if self.run_id is None and mlflow.active_run() is None:
            from mlflow import MlflowClient

            uri = self.tracking_uri or mlflow.get_tracking_uri()
            self.run_id, self._owned = start_run(MlflowClient(tracking_uri=uri)), True
        report = measure_and_log(
            model, step, layers=self.layers, run_id=self.run_id,
            tracking_uri=self.tracking_uri, **self.settings,
        )  # fmt: skip
        self.reports.append((step, report))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self._measure(kwargs["model"], state.global_step)
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.every_epoch:
            self._measure(kwargs["model"], state.global_step)
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._owned and self.run_id is not None:
            import mlflow
            from mlflow import MlflowClient

            from dynaudit.sources.mlflow import client_environment

            uri = self.tracking_uri or mlflow.get_tracking_uri()
            with client_environment(uri):
                MlflowClient(tracking_uri=uri).set_terminated(self.run_id)
        return control


# -- baselines in MLflow ----------------------------------------------------------------

BASELINE_TAG = "dynaudit.baseline"
BASELINE_ARTIFACTS = "dynaudit-baseline"


def store_baseline(
    folder: Path, source_uri: str, *, tracking_uri: str | None = None, experiment: str | None = None
) -> str:
    """Upload a baseline directory as the artifacts of a new run and return its ``runs:/`` URI.
    The run is marked finished and tagged ``dynaudit.baseline`` only after every artifact is
    uploaded; when the baseline's source is an MLflow model version, that version is tagged
    with the URI too, so `check models:/NAME/…` finds it."""
    from mlflow import MlflowClient

    from dynaudit.sources.base import SourceOptions
    from dynaudit.sources.mlflow import client_environment, mlflow_errors, parse
    from dynaudit.sources.mlflow import tracking_uri as server_of

    uri = server_of(SourceOptions(mlflow_uri=tracking_uri))
    with client_environment(uri), mlflow_errors("storing the baseline in MLflow", uri):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        run_id = start_run(client, experiment)
        try:
            client.log_artifacts(run_id, str(folder), BASELINE_ARTIFACTS)
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        ref = f"runs:/{run_id}/{BASELINE_ARTIFACTS}"
        client.set_tag(run_id, "dynaudit.source", source_uri)
        client.set_tag(run_id, BASELINE_TAG, ref)
        client.set_terminated(run_id)
        if source_uri.startswith("models:/"):
            model = parse(source_uri)
            if model.name is not None:
                version = _version_of(client, model)
                client.set_model_version_tag(model.name, version, BASELINE_TAG, ref)
    return ref


def _version_of(client: Any, model: Any) -> str:
    if model.alias is not None:
        return str(client.get_model_version_by_alias(model.name, model.alias).version)
    if model.version == "latest":
        versions = client.search_model_versions(f"name = '{model.name}'")
        return str(max(int(v.version) for v in versions))
    return str(model.version)


def fetch_baseline(ref: str, destination: Path, tracking_uri: str | None = None) -> Path:
    """Download a baseline stored as run artifacts (``runs:/<id>/dynaudit-baseline``)."""
    from mlflow.artifacts import download_artifacts

    from dynaudit.sources.base import SourceOptions
    from dynaudit.sources.mlflow import client_environment, mlflow_errors, parse
    from dynaudit.sources.mlflow import tracking_uri as server_of

    uri = server_of(SourceOptions(mlflow_uri=tracking_uri))
    with client_environment(uri), mlflow_errors(parse(ref).uri, uri):
        path = download_artifacts(artifact_uri=ref, dst_path=str(destination), tracking_uri=uri)
    return Path(path)


def declared_baseline(source_uri: str, tracking_uri: str | None = None) -> str | None:
    """The ``dynaudit.baseline`` tag of the MLflow model version ``source_uri`` names."""
    from mlflow import MlflowClient

    from dynaudit.sources.base import SourceOptions
    from dynaudit.sources.mlflow import client_environment, mlflow_errors, parse
    from dynaudit.sources.mlflow import tracking_uri as server_of

    model = parse(source_uri)
    if model.name is None:
        return None
    uri = server_of(SourceOptions(mlflow_uri=tracking_uri))
    with client_environment(uri), mlflow_errors(model.uri, uri):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        tags = client.get_model_version(model.name, _version_of(client, model)).tags or {}
    value = tags.get(BASELINE_TAG)
    return str(value) if value else None
