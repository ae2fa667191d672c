"""MLflow logging: reports as metrics, params, tags and artifacts; a training callback.

Metrics are aggregates only, named ``dynaudit/<figure>/<scope>`` with scope ``all``,
``group/<third>`` or ``type/<layer type>``::

    measure: mean_distance  discrepancy  fidelity  fidelity_median  layers   (per scope)
             dynaudit/skipped  dynaudit/non_finite                            (counts)
    check:   change  change_std  noise  displacement  layers                 (per scope)
             dynaudit/verdict_pass (1 or 0)  dynaudit/findings  dynaudit/failing_groups
             dynaudit/failing_layers  dynaudit/non_finite  dynaudit/zeroed
             dynaudit/unchanged  dynaudit/refits                              (counts)

Per-layer figures are one table artifact, ``dynaudit/layers.json`` (``layers-step<N>.json``
with a step), in the "split" JSON MLflow's ``log_table`` writes (``columns`` and ``data``), but
replaced rather than appended to when logged again.
Group and type names come from checkpoints, so they are made valid MLflow names (letters,
digits, ``_ - . /`` and spaces; no ``..`` or ``//``; at most 250 characters, with a short hash
when a name had to be changed, so two names never collide).

Settings are params ``dynaudit.<name>``, and a check's gate policy ``dynaudit.policy.<name>``
(each logged once per run). Family / source / protocol version, and for a check verdict /
baseline / failing groups, are tags ``dynaudit.*``; the JSON and Markdown reports are artifacts
under ``dynaudit/``. A run dynaudit starts is named for what it did (``dynaudit check SOURCE vs
BASELINE``) and carries MLflow's context tags (``mlflow.source.name``, ``mlflow.source.type``,
``mlflow.user``, from MLflow's own context providers) and ``mlflow.source.git.commit``: the
commit of the git checkout the command runs in (MLflow's own git provider would look at the
directory of ``sys.argv[0]``, which for the CLI is dynaudit's installation, not the project).
A check of a registered model version (``models:/NAME/…``) also tags that version with
``dynaudit.verdict``, ``dynaudit.report_run`` and ``dynaudit.failing_groups``.

Every failure (server down or silent, access refused, an MLflow 3 file store, an artifact
store that cannot be written) is raised as a :class:`~dynaudit.errors.DynauditError` with one
scrubbed line, so a caller can treat logging as the side channel it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynaudit.errors import DynauditError
from dynaudit.schema import (
    Aggregate,
    CheckReport,
    LayerComparison,
    LayerResult,
    Report,
    ScopeKind,
)

__all__ = [
    "DynauditCallback",
    "log_or_warn",
    "log_report",
    "measure_and_log",
    "metric_name",
    "report_metrics",
    "tag_model_version",
]

if TYPE_CHECKING:  # built on first use: see __getattr__
    DynauditCallback: type[Any]

_INVALID = re.compile(r"[^A-Za-z0-9_\-. /]")
_MAX_KEY = 250
_MAX_RUN_NAME = 250  # the runs table's name column
_MAX_TAG = 5000  # MLflow 2's limit for a tag value (MLflow 3 allows more)
_BATCH = 900  # MLflow's batch limit is 1000 metrics, params and tags together
VERDICT_TAG = "dynaudit.verdict"
REPORT_RUN_TAG = "dynaudit.report_run"
FAILING_GROUPS_TAG = "dynaudit.failing_groups"


def metric_name(*parts: str) -> str:
    """A valid, collision-free MLflow metric name for ``parts`` joined by ``/``."""
    raw = "/".join(parts)
    segments = [_INVALID.sub("_", segment).strip() for segment in raw.split("/")]
    clean = "/".join(s if s.strip(".") else "_" for s in segments if s)  # no "", ".", ".."
    if clean != raw or len(clean) > _MAX_KEY:
        tag = hashlib.sha256(raw.encode()).hexdigest()[:8]
        clean = f"{clean[: _MAX_KEY - 9]}-{tag}"
    return clean


def report_metrics(report: Report | CheckReport, prefix: str = "dynaudit") -> dict[str, float]:
    """The report's aggregate figures and counts as ``{metric name: value}`` (no per-layer
    figure: those are the table of :func:`layer_table`)."""
    if isinstance(report, CheckReport):
        return _check_metrics(report, prefix)
    metrics: dict[str, float] = {}
    for kind, name, agg in report.summary.scopes():
        metrics.update(_aggregate_metrics(prefix, _scope_path(kind, name), agg))
    metrics[metric_name(prefix, "skipped")] = float(len(report.skipped))
    metrics[metric_name(prefix, "non_finite")] = float(len(report.non_finite))
    return metrics


def _scope_path(kind: ScopeKind, name: str) -> tuple[str, ...]:
    """A scope's part of a metric name: ``all``, ``group/<third>`` or ``type/<layer type>``."""
    return ("all",) if kind == "all" else (kind, name)


def _aggregate_metrics(prefix: str, scope: tuple[str, ...], agg: Aggregate) -> dict[str, float]:
    out = {}
    for figure in ("mean_distance", "discrepancy", "fidelity", "fidelity_median", "layers"):
        value = getattr(agg, figure)
        if value is not None:
            out[metric_name(prefix, figure, *scope)] = float(value)
    return out


def _check_metrics(report: CheckReport, prefix: str) -> dict[str, float]:
    comparison, verdict = report.comparison, report.verdict
    metrics: dict[str, float] = {}
    for kind, name, compared in comparison.scopes():
        figures = {"layers": compared.layers, "noise": compared.noise}
        figures["displacement"] = compared.displacement
        if compared.change is not None:
            figures |= {"change": compared.change.mean, "change_std": compared.change.std}
        for figure, value in figures.items():
            if value is not None:
                metrics[metric_name(prefix, figure, *_scope_path(kind, name))] = float(value)
    counts = {
        "verdict_pass": 1 if verdict.passed else 0,
        "findings": len(verdict.findings),
        "failing_groups": len(verdict.failing_groups),
        "failing_layers": len(verdict.failing_layers),
        "non_finite": len(comparison.non_finite),
        "zeroed": len(comparison.zeroed),
        "unchanged": len(comparison.unchanged) if comparison.unchanged is not None else None,
        "refits": comparison.refits,
    }
    for name, count in counts.items():
        if count is not None:
            metrics[metric_name(prefix, name)] = float(count)
    return metrics


_CHECK_COLUMNS = [
    "name",
    "type",
    "depth",
    "group",
    "shape",
    "baseline_mean_distance",
    "mean_distance",
    "change",
    "change_std",
    "noise",
    "displacement",
    "weight_change",
    "noise_likeness",
    "fidelity",
    "unchanged",
    "reason",
]
_MEASURE_COLUMNS = [
    "name",
    "type",
    "depth",
    "group",
    "shape",
    "mean_distance",
    "discrepancy",
    "fidelity",
    "scale",
    "seconds",
    "reason",
]


def layer_table(report: Report | CheckReport) -> tuple[list[str], list[list[Any]]]:
    """The per-layer figures as columns and rows (one row per layer, skipped layers too)."""
    if isinstance(report, CheckReport):
        return list(_CHECK_COLUMNS), [_check_row(layer) for layer in report.comparison.layers]
    rows = [_measure_row(layer) for layer in report.measured]
    blank = [None] * (len(_MEASURE_COLUMNS) - 2)
    rows += [[skipped.name, *blank, skipped.skipped] for skipped in report.skipped]
    return list(_MEASURE_COLUMNS), rows


def _check_row(moved: LayerComparison) -> list[Any]:
    change = moved.change
    return [
        *(moved.name, moved.type, moved.depth, moved.group, _shape(moved.shape)),
        *(moved.baseline_mean_distance, moved.mean_distance),
        *(change.mean if change else None, change.std if change else None),
        *(moved.noise, moved.displacement, moved.weight_change, moved.noise_likeness),
        *(moved.fidelity, bool(moved.unchanged), moved.reason),
    ]


def _measure_row(layer: LayerResult) -> list[Any]:
    return [
        *(layer.name, layer.type, layer.depth, layer.group, _shape(layer.shape)),
        *(layer.mean_distance, layer.discrepancy, layer.fidelity, layer.scale),
        *(layer.seconds, layer.reason),
    ]


def _shape(shape: list[int]) -> str:
    return "x".join(map(str, shape))


def report_params(report: Report | CheckReport) -> dict[str, str]:
    """The settings (``dynaudit.<name>``) and a check's policy (``dynaudit.policy.<name>``)."""
    params = {f"dynaudit.{k}": str(v) for k, v in report.settings.items() if k != "threads"}
    if isinstance(report, CheckReport):
        policy = report.policy.model_dump()
        params |= {f"dynaudit.policy.{k}": str(v) for k, v in policy.items()}
    return params


def run_name(report: Report | CheckReport) -> str:
    """What the run did, e.g. ``dynaudit check ./ft vs meta-llama/Llama-2-7b``."""
    from dynaudit.sources.mlflow import run_label

    if isinstance(report, CheckReport):
        checked, baseline = report.source.uri, report.baseline.source.uri
        name = f"dynaudit check {run_label(checked)} vs {run_label(baseline)}"
    else:
        name = f"dynaudit measure {run_label(report.source.uri)}"
    return name[:_MAX_RUN_NAME]


def log_or_warn(report: Report | CheckReport, tracking_uri: str | None) -> None:
    """:func:`log_report` as a side channel: called after every report file is written, and a
    failure (server down, access refused) is one warning line while the verdict's exit code
    stands (docs/reliability.md)."""
    try:
        log_report(report, tracking_uri=tracking_uri)
    except Exception as exc:  # whatever broke, the reports are written and the verdict stands
        reason = exc.message if isinstance(exc, DynauditError) else f"{type(exc).__name__}: {exc}"
        logging.getLogger("dynaudit").warning(
            "could not log to MLflow (%s); the verdict stands", reason
        )


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
    "dynaudit"), which is then ended. A check of a registered model version also tags that
    version (:func:`tag_model_version`). Raises only :class:`~dynaudit.errors.DynauditError`."""
    from dynaudit.sources.mlflow import client_environment, mlflow_errors, start_run

    uri = _server(tracking_uri)
    with mlflow_errors("logging the report to MLflow", uri), client_environment(uri):
        import mlflow

        from dynaudit.sources.mlflow import client

        tracking = client(uri)
        active = mlflow.active_run()
        owned = False
        if run_id is None and active is not None:
            run_id = active.info.run_id
        if run_id is None:
            run_id = start_run(tracking, experiment, run_name(report))
            owned = True
        with _failed_unless_done(tracking, run_id if owned else None):
            _log_to_run(tracking, run_id, report, step, artifacts)
        if owned:
            tracking.set_terminated(run_id)
    if isinstance(report, CheckReport):
        tag_model_version(report, run_id, tracking_uri=uri)
    return run_id


def _log_to_run(
    tracking: Any, run_id: str, report: Report | CheckReport, step: int | None, artifacts: bool
) -> None:
    """Metrics, params and tags in batches, the layer table and (``artifacts``) the reports."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, step or 0) for key, value in report_metrics(report).items()]
    existing = tracking.get_run(run_id).data.params
    params = [Param(k, v) for k, v in report_params(report).items() if k not in existing]
    tags = [RunTag(k, v[:_MAX_TAG]) for k, v in _tags(report).items()]
    entities: list[Any] = [*params, *tags, *metrics]
    for chunk in range(0, len(entities), _BATCH):
        batch = entities[chunk : chunk + _BATCH]
        tracking.log_batch(
            run_id,
            metrics=[e for e in batch if isinstance(e, Metric)],
            params=[e for e in batch if isinstance(e, Param)],
            tags=[e for e in batch if isinstance(e, RunTag)],
        )
    suffix = f"-step{step}" if step is not None else ""
    _log_table(tracking, run_id, report, f"dynaudit/layers{suffix}.json")
    if artifacts:
        _log_artifacts(tracking, run_id, report, suffix)


@contextlib.contextmanager
def _failed_unless_done(tracking: Any, run_id: str | None) -> Iterator[None]:
    """A run dynaudit started and could not fill is ended as FAILED, not left RUNNING (best
    effort: the server may be the reason it failed)."""
    try:
        yield
    except BaseException:
        if run_id is not None:
            with contextlib.suppress(Exception):
                tracking.set_terminated(run_id, status="FAILED")
        raise


def _server(tracking_uri: str | None) -> str:
    """The tracking server: the argument, ``MLFLOW_TRACKING_URI``, else MLflow's default."""
    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return tracking_uri or os.environ["MLFLOW_TRACKING_URI"]
    from dynaudit.sources.mlflow import mlflow_errors

    with mlflow_errors("logging the report to MLflow", "MLflow's default tracking URI"):
        import mlflow

        return str(mlflow.get_tracking_uri())


def _tags(report: Report | CheckReport) -> dict[str, str]:
    tags = {"dynaudit.family": report.family.name, "dynaudit.source": report.source.uri}
    tags["dynaudit.protocol_version"] = str(report.protocol_version)
    if isinstance(report, CheckReport):
        tags[VERDICT_TAG] = report.verdict.verdict
        tags["dynaudit.baseline"] = report.baseline.ref
        tags[FAILING_GROUPS_TAG] = ",".join(report.verdict.failing_groups) or "none"
    return tags


def _log_table(client: Any, run_id: str, report: Report | CheckReport, artifact: str) -> None:
    """The per-layer table as MLflow's "split" JSON (``columns`` and ``data``, what
    ``log_table`` writes), always through ``log_artifact``: ``log_table`` appends to a table
    already in the run (a second report would mix its rows in) and needs pandas, which
    ``mlflow-skinny`` lacks."""
    columns, rows = layer_table(report)
    folder, name = artifact.rsplit("/", 1)
    with tempfile.TemporaryDirectory(prefix="dynaudit-mlflow-") as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps({"columns": columns, "data": rows}))
        client.log_artifact(run_id, str(path), folder)


def _log_artifacts(client: Any, run_id: str, report: Report | CheckReport, suffix: str) -> None:
    from dynaudit.reports import render_markdown
    from dynaudit.reports.check import render_check_markdown

    name = "check" if isinstance(report, CheckReport) else "report"
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


def tag_model_version(
    report: CheckReport, run_id: str, *, tracking_uri: str | None = None
) -> str | None:
    """Tag the registered model version a check audited (``models:/NAME/VERSION``,
    ``@ALIAS`` or ``/latest``, as resolved when it was downloaded) with ``dynaudit.verdict``,
    ``dynaudit.report_run`` (the run holding the report) and ``dynaudit.failing_groups``
    ("none" when it passed), in the registry MLflow uses (``MLFLOW_REGISTRY_URI``, else the
    tracking server). Returns ``NAME/VERSION``, or None for any other source."""
    from dynaudit.sources.mlflow import client, client_environment, mlflow_errors, model_version
    from dynaudit.sources.mlflow import parse as parse_uri

    if not report.source.uri.startswith("models:/"):
        return None
    model = parse_uri(report.source.uri)
    if model.name is None:  # a logged model (models:/m-ID) has no version to tag
        return None
    uri = _server(tracking_uri)
    with mlflow_errors(f"tagging {model.uri} with the verdict", uri), client_environment(uri):
        registry = client(uri)
        version = model_version(registry, model, report.source.revision)
        tags = {VERDICT_TAG: report.verdict.verdict, REPORT_RUN_TAG: run_id}
        tags[FAILING_GROUPS_TAG] = ",".join(report.verdict.failing_groups) or "none"
        for key, value in tags.items():
            registry.set_model_version_tag(model.name, version, key, value[:_MAX_TAG])
    return f"{model.name}/{version}"


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


def __getattr__(name: str) -> Any:
    """``DynauditCallback`` is built on first use: its base class is transformers'
    ``TrainerCallback``, and importing transformers takes seconds, which ``import
    dynaudit.tracking`` must not cost."""
    if name == "DynauditCallback":
        callback = _build_callback()
        globals()[name] = callback
        return callback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build_callback() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:  # transformers is optional: the callback is then a plain object
        return type("DynauditCallback", (_CallbackLogic,), {"__module__": __name__})
    return type("DynauditCallback", (_CallbackLogic, TrainerCallback), {"__module__": __name__})


class _CallbackLogic:
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
            from dynaudit.sources.mlflow import (
                client,
                client_environment,
                mlflow_errors,
                start_run,
            )

            uri = _server(self.tracking_uri)
            with mlflow_errors("starting an MLflow run", uri), client_environment(uri):
                self.run_id = start_run(client(uri), name="dynaudit during training")
            self._owned = True
        report = measure_and_log(
            model,
            step,
            layers=self.layers,
            run_id=self.run_id,
            tracking_uri=self.tracking_uri,
            **self.settings,
        )
        self.reports.append((step, report))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self._measure_once(kwargs["model"], state)
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.every_epoch:
            self._measure_once(kwargs["model"], state)
        return control

    def _measure_once(self, model: Any, state: Any) -> None:
        """Rank 0 only (as transformers' own MLflow callback: every rank holds the same
        weights), and a step once: an epoch that ends on a multiple of N is one point."""
        if not getattr(state, "is_world_process_zero", True):
            return
        if self.reports and self.reports[-1][0] == state.global_step:
            return
        self._measure(model, state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._owned and self.run_id is not None:
            from dynaudit.sources.mlflow import client, client_environment, mlflow_errors

            uri = _server(self.tracking_uri)
            with mlflow_errors("ending the MLflow run", uri), client_environment(uri):
                client(uri).set_terminated(self.run_id)
        return control
