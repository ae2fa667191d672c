"""MLflow: ``models:/name/version``, ``models:/name@alias``, ``models:/name/latest``,
``models:/m-<id>`` and ``runs:/<run_id>/path``, through the MLflow client.

The tracking server comes from ``--mlflow-uri`` or ``MLFLOW_TRACKING_URI``; the registry is
``MLFLOW_REGISTRY_URI`` when set, else the tracking server (MLflow's own rule); MLflow's own auth
variables apply. Retries and timeouts are bounded unless the user set MLflow's variables, so a
dead server fails in seconds. MLflow 2.x and 3.x clients both work; ``models:/m-<id>`` (a logged
model) exists only in MLflow 3. Only the files an audit reads are
downloaded, into dynaudit's cache, keyed by the server, the artifact location and the listing,
so a second audit of the same model version does not download it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynaudit.errors import (
    AccessDenied,
    DynauditError,
    InputError,
    RemoteNotFound,
    SourceUnreachable,
    UsageError,
)
from dynaudit.files import publish_dir, staged_dir
from dynaudit.sources.base import (
    SIDE_FILES,
    ResolvedSource,
    SourceOptions,
    redact_url,
    weight_files,
)
from dynaudit.tensors import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, read_json

__all__ = [
    "BASELINE_ARTIFACTS",
    "BASELINE_TAG",
    "SCHEMES",
    "MlflowRef",
    "client_environment",
    "context_tags",
    "declared_baseline",
    "fetch",
    "fetch_baseline",
    "git_commit",
    "mlflow_errors",
    "model_version",
    "parse",
    "run_label",
    "server_uri",
    "start_run",
    "store_baseline",
]

SCHEMES = ("models:/", "runs:/")
# Bounded unless set by the user: MLflow's defaults retry for minutes against a dead server.
RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",  # per socket read: large downloads still work
}
_MAX_FILES = 10_000  # an artifact tree larger than this is not a checkpoint

# models:/m-<id> is a logged model only as the whole URI, as in MLflow: models:/m-x/1 is version
# 1 of a registered model named "m-x".
_MODEL = re.compile(
    r"^models:/(?:(?P<model_id>m-[0-9a-f]+)/?$"
    r"|(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+|latest))(?:/(?P<path>.*))?$)"
)
_RUN = re.compile(r"^runs:/(?P<run_id>[0-9a-zA-Z]+)(?:/(?P<path>.*))?$")


@dataclass(frozen=True)
class MlflowRef:
    uri: str
    name: str | None = None
    version: str | None = None  # digits or "latest"
    alias: str | None = None
    model_id: str | None = None
    run_id: str | None = None
    path: str = ""


# The tag naming a model version's (or a baseline run's) baseline: written by
# `dynaudit baseline --mlflow`, read when `check` is given none.
BASELINE_TAG = "dynaudit.baseline"


def parse(uri: str) -> MlflowRef:
    if match := _MODEL.match(uri):
        return MlflowRef(
            uri,
            name=match["name"],
            version=match["version"],
            alias=match["alias"],
            model_id=match["model_id"],
            path=(match["path"] or "").strip("/"),
        )
    if match := _RUN.match(uri):
        return MlflowRef(uri, run_id=match["run_id"], path=(match["path"] or "").strip("/"))
    raise UsageError(
        f"{uri}: not an MLflow model URI; use models:/NAME/VERSION, models:/NAME@ALIAS, "
        "models:/NAME/latest, models:/m-ID or runs:/RUN_ID/PATH"
    )


def tracking_uri(options: SourceOptions) -> str:
    uri = options.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UsageError(
            "no MLflow tracking server given: set MLFLOW_TRACKING_URI or pass --mlflow-uri"
        )
    return uri


# One MLflow call at a time changes the process-wide state client_environment sets (two
# threads interleaving would leave stdout, the tracking URI or the retry bounds wrong).
_CLIENT_LOCK = threading.RLock()


@contextlib.contextmanager
def client_environment(uri: str | None = None) -> Iterator[None]:
    """For the duration: MLflow's HTTP retries bounded and, in CI logs and pipes, its download
    progress bars off, each only where the user has not set the variable; the process's
    tracking URI is ``uri`` (MLflow 2 clients resolve ``mlflow-artifacts:/`` locations against
    it, whatever server the client was given); and what MLflow prints to stdout (its "View run
    at <url>" lines) goes to stderr, scrubbed of secrets, since stdout may be a report
    (``--json -``) and the URL may carry the password of ``http://user:password@host``."""
    import mlflow

    from dynaudit.console import interactive
    from dynaudit.secrets import remember, scrub_logging

    remember(uri=uri)  # a password in it is scrubbed from every message
    remember(uri=mlflow.get_registry_uri())  # and one in MLFLOW_REGISTRY_URI's
    scrub_logging()  # MLflow's handlers exist now that it is imported
    defaults = dict(RETRY_DEFAULTS)
    if not interactive():
        defaults["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    with _CLIENT_LOCK:  # the environment, the tracking URI and stdout are the process's
        added = [k for k in defaults if k not in os.environ]
        os.environ.update({k: defaults[k] for k in added})
        try:
            with _process_tracking_uri(uri), _stdout_to_stderr():
                yield
        finally:
            for key in added:
                os.environ.pop(key, None)


@contextlib.contextmanager
def _process_tracking_uri(uri: str | None) -> Iterator[None]:
    """The process-wide tracking URI set to ``uri``, then put back exactly as it was (MLflow's
    own ``set_tracking_uri`` would also write, or delete, ``MLFLOW_TRACKING_URI``)."""
    if uri is None:
        yield
        return
    from mlflow.tracking._tracking_service import utils as tracking_state

    saved = tracking_state._tracking_uri
    tracking_state._tracking_uri = uri  # type: ignore[assignment]
    try:
        yield
    finally:
        tracking_state._tracking_uri = saved


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    from dynaudit.secrets import scrub

    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            yield
    finally:
        if held.getvalue():
            sys.stderr.write(scrub(held.getvalue()))
            sys.stderr.flush()


def client(uri: str) -> Any:
    """An MLflow client for the tracking server ``uri``; its registry is MLflow's choice
    (``MLFLOW_REGISTRY_URI`` or ``mlflow.set_registry_uri``, else the tracking server)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def major_version() -> int:
    """The installed MLflow client's major version (2 or 3)."""
    import mlflow

    return int(mlflow.__version__.split(".")[0])


def fetch(uri: str, options: SourceOptions) -> ResolvedSource:
    """Resolve ``uri`` on the tracking server and download the checkpoint's files."""
    ref = parse(uri)
    server = tracking_uri(options)

    with mlflow_errors(ref.uri, server), client_environment(server):
        # Imported here, after the checks above: importing MLflow takes seconds.
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        location, revision = _artifact_location(client(server), ref)
        repo = get_artifact_repository(location)  # resolved against the process's server
        listing = _list_files(repo, ref)
        root = _checkpoint_root(ref, listing, options.allow_pickle)
        names = {p[len(root) + 1 :] if root else p for p in listing if _under(p, root)}

        def read_index(name: str) -> Any:
            path = _join(root, name)
            return read_json(_download(repo, [path], options, server, location, listing))

        weights = weight_files(uri, names, read_index, allow_pickle=options.allow_pickle)
        wanted = [_join(root, n) for n in [*SIDE_FILES, *weights] if n in names]
        folder = _download(repo, wanted, options, server, location, listing)
    path = folder / root if root else folder
    return ResolvedSource(uri=uri, path=path, revision=revision)


def _artifact_location(client: Any, ref: MlflowRef) -> tuple[str, str]:
    """Where the artifacts live, and the immutable revision (version number, model or run id)."""
    if ref.run_id is not None:
        run = client.get_run(ref.run_id)
        return _join(run.info.artifact_uri, ref.path), ref.run_id
    if ref.model_id is not None:
        if major_version() < 3:
            import mlflow

            raise UsageError(
                f"{ref.uri}: models:/m-ID names an MLflow 3 logged model, and the installed "
                f"MLflow client is {mlflow.__version__}; install mlflow>=3, or name a "
                "registered version (models:/NAME/VERSION)"
            )
        return _join(client.get_logged_model(ref.model_id).artifact_location, ref.path), (
            ref.model_id
        )
    assert ref.name is not None
    version = model_version(client, ref)
    location = client.get_model_version_download_uri(ref.name, version)
    return _join(location, ref.path), f"{ref.name}/{version}"


def model_version(client: Any, ref: MlflowRef, revision: str | None = None) -> str:
    """The version number ``models:/NAME/VERSION``, ``@ALIAS`` or ``/latest`` names: the one
    ``revision`` (``NAME/VERSION``, as a source resolved it at download) names when it is one
    of this model's, so a report or baseline tags the version it was made from, not where an
    alias or ``latest`` points by now; else the one the registry names now."""
    assert ref.name is not None
    name, _, number = (revision or "").rpartition("/")
    if name == ref.name and number.isdigit():
        return number
    if ref.alias is not None:
        return str(client.get_model_version_by_alias(ref.name, ref.alias).version)
    if ref.version == "latest":
        versions = client.search_model_versions(f"name = '{ref.name}'")
        if not versions:
            raise RemoteNotFound(f"{ref.uri}: registered model {ref.name!r} has no versions")
        return str(max(int(v.version) for v in versions))
    return str(client.get_model_version(ref.name, ref.version).version)


def _list_files(repo: Any, ref: MlflowRef) -> dict[str, int]:
    """Every file under the artifact location (path → size), breadth first, bounded."""
    files: dict[str, int] = {}
    pending, seen = [""], {""}
    while pending:
        folder = pending.pop(0)
        for info in repo.list_artifacts(folder or None):
            # A folder strictly below the one listed, once: a store that lists a folder in
            # itself (or its parent) must not walk forever; folders count toward the bound.
            below = not folder or info.path.startswith(folder.rstrip("/") + "/")
            if info.is_dir and below and info.path not in seen:
                seen.add(info.path)
                pending.append(info.path)
            elif not info.is_dir:
                files[info.path] = int(info.file_size or 0)
            if len(files) + len(seen) > _MAX_FILES:
                raise InputError(f"{ref.uri}: more than {_MAX_FILES} artifacts; not a checkpoint")
    if not files:
        raise RemoteNotFound(f"{ref.uri}: no artifacts at this location (wrong path?)")
    return files


def _checkpoint_root(ref: MlflowRef, listing: dict[str, int], allow_pickle: bool) -> str:
    """The folder that holds the weights: the location itself, or its one sub-folder with
    safetensors weights (e.g. ``model/`` of a transformers-flavour model) — or, with
    ``allow_pickle`` and no safetensors anywhere, pickle weights."""
    folders = sorted({p.rpartition("/")[0] for p in listing if p.endswith(SAFETENSORS_SUFFIXES)})
    if not folders and allow_pickle:
        folders = sorted({p.rpartition("/")[0] for p in listing if p.endswith(PICKLE_SUFFIXES)})
    folders.sort(key=lambda f: (f.count("/"), f))
    if "" in folders or not folders:
        if not folders and any(p.endswith(PICKLE_SUFFIXES) for p in listing):
            weight_files(ref.uri, set(listing), lambda _: {})  # raises the pickle refusal
        return ""
    shallow = [f for f in folders if f.count("/") == folders[0].count("/")]
    if len(shallow) > 1:
        raise UsageError(
            f"{ref.uri}: several checkpoints in these artifacts ({', '.join(shallow)}); "
            f"name one, e.g. {ref.uri.rstrip('/')}/{shallow[0]}"
        )
    return shallow[0]


def _download(
    repo: Any,
    paths: list[str],
    options: SourceOptions,
    server: str,
    location: str,
    listing: dict[str, int],
) -> Path:
    """Download ``paths`` into a cache folder keyed by server, location and the files' sizes;
    return the folder (for a single JSON file, the file). A folder is published by renaming a
    complete staging folder, so one that exists is whole and is reused as is."""
    from dynaudit.cache import cache_root

    files = sorted((p, listing.get(p, -1)) for p in paths)
    key = hashlib.sha256(json.dumps([server, location, files]).encode()).hexdigest()[:32]
    downloads = cache_root(options.cache_dir) / "mlflow"
    final = downloads / key
    if not final.is_dir():
        with staged_dir(final) as staging:
            for path in paths:
                repo.download_artifacts(path, dst_path=str(staging))
            publish_dir(staging, final)
    return final / paths[0] if len(paths) == 1 and paths[0].endswith(".json") else final


def _join(root: str, path: str) -> str:
    return f"{root.rstrip('/')}/{path}" if root and path else root or path


def _under(path: str, root: str) -> bool:
    return not root or path.startswith(root + "/")


def _quoted(exc: BaseException, limit: int) -> str:
    """The first line of what a server or client said, secrets scrubbed before it is cut
    (a cut must not leave half a token to recognise), then at most ``limit`` characters."""
    from dynaudit.secrets import scrub

    text = scrub(str(getattr(exc, "message", exc))).strip()
    return text.splitlines()[0][:limit] if text else ""


@contextlib.contextmanager
def mlflow_errors(what: str, server: str) -> Iterator[None]:
    """Every failure of the MLflow client, its HTTP stack or an artifact store's own client as
    one DynauditError naming ``what`` (a model URI, or the action) and what to do; what the
    server said is quoted scrubbed of the user's secrets."""
    try:
        yield
    except DynauditError:
        raise
    except Exception as exc:
        raise translated(exc, what, redact_url(server)) from exc


def translated(exc: Exception, what: str, server: str) -> DynauditError:
    """The DynauditError that says what went wrong in ``exc`` (see :func:`mlflow_errors`)."""
    import requests

    lowered = str(exc).lower()
    why = next((w for w in ("timed out", "refused") if w in lowered), type(exc).__name__)
    unreachable = SourceUnreachable(
        f"{what}: cannot reach the MLflow server at {server} ({why}); check "
        "--mlflow-uri / MLFLOW_TRACKING_URI and that the server is up"
    )
    if isinstance(exc, requests.RequestException | TimeoutError | ConnectionError):
        return unreachable
    if isinstance(exc, ImportError):
        return InputError(
            f"{what}: MLflow needs the Python package {exc.name!r}, which is not installed "
            "(e.g. boto3 for s3://, google-cloud-storage for gs://); install it"
        )
    if not _is_mlflow_exception(exc):  # the artifact store's own client (cloud SDKs, ...)
        text = _quoted(exc, 200)
        return InputError(
            f"{what}: the artifact store failed: {type(exc).__name__}"
            + (f": {text}" if text else "")
        )
    code = getattr(exc, "error_code", "")
    text = _quoted(exc, 300)
    said = text.lower()  # the first line: an echoing server's headers say "Connection" too
    if code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in said:
        return RemoteNotFound(f"{what}: not found on {server} ({text})")
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return AccessDenied(
            f"{what}: {server} refused the credentials ({text}); check "
            "MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD"
        )
    if "MLFLOW_ALLOW_FILE_STORE" in str(exc):
        return InputError(
            f"{what}: MLflow 3 no longer writes to a file store ({server}); use a tracking "
            "server or a database (e.g. MLFLOW_TRACKING_URI=sqlite:///mlflow.db), or set "
            "MLFLOW_ALLOW_FILE_STORE=true"
        )
    if any(word in said for word in ("max retries", "connection", "timed out", "timeout")):
        return unreachable
    return InputError(f"{what}: MLflow error from {server}: {text}")


def _is_mlflow_exception(exc: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException)


def declared_baseline(source_uri: str, server: str | None = None) -> str | None:
    """The ``dynaudit.baseline`` tag of the MLflow model version ``source_uri`` names."""
    model = parse(source_uri)
    if model.name is None:
        return None
    uri = server_uri(server)
    with mlflow_errors(model.uri, uri), client_environment(uri):
        registry = client(uri)
        tags = registry.get_model_version(model.name, model_version(registry, model)).tags or {}
    value = tags.get(BASELINE_TAG)
    return str(value) if value else None


# -- runs and baselines stored in MLflow ------------------------------------------------
# Below the facade (dynaudit.api stores and fetches baselines here); dynaudit.tracking, above
# it, logs reports into runs started by :func:`start_run`.


def server_uri(given: str | None) -> str:
    """The tracking server: ``given`` (``--mlflow-uri``), else ``MLFLOW_TRACKING_URI``."""
    return tracking_uri(SourceOptions(mlflow_uri=given))


def run_label(uri: str) -> str:
    """``uri``, its end kept when it is long (the end names the checkpoint)."""
    return uri if len(uri) <= 100 else "…" + uri[-99:]


def start_run(
    client: Any,
    experiment: str | None = None,
    name: str = "dynaudit",
    tags: dict[str, str] | None = None,
) -> str:
    """A new run ``name`` in ``experiment`` (default ``MLFLOW_EXPERIMENT_NAME`` or
    "dynaudit"), with MLflow's context tags (:func:`context_tags`) and ``tags``, set in the
    same call that creates it."""
    experiment_name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "dynaudit"
    found = client.get_experiment_by_name(experiment_name)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment_name)
    run = client.create_run(experiment_id, run_name=name, tags={**context_tags(), **(tags or {})})
    return str(run.info.run_id)


def context_tags() -> dict[str, str]:
    """MLflow's context tags, as its own providers set them (user, source name and type, and
    those of Databricks or ``MLFLOW_RUN_CONTEXT``), with the git commit of the working
    directory in place of that of ``sys.argv[0]``'s directory."""
    from mlflow.tracking.context.git_context import GitRunContext
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    # MLflow annotates ``ignore`` as instances, but matches classes (isinstance).
    resolved = resolve_tags(ignore=[GitRunContext])  # type: ignore[list-item]
    tags = {k: str(v) for k, v in resolved.items()}
    commit = git_commit(Path.cwd())
    if commit is not None:
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def git_commit(folder: Path) -> str | None:
    """The commit checked out in the git work tree that holds ``folder``, if any (no git, not
    a checkout, or a repository git refuses to read: none)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--verify", "-q", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


BASELINE_ARTIFACTS = "dynaudit-baseline"


def store_baseline(
    folder: Path,
    source_uri: str,
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    revision: str | None = None,
) -> str:
    """Upload a baseline directory as the artifacts of a new run and return its ``runs:/`` URI.
    The run is marked finished and tagged ``dynaudit.baseline`` only after every artifact is
    uploaded; when the baseline's source is an MLflow model version, that version is tagged
    with the URI too, so `check models:/NAME/…` finds it: the version measured (``revision``,
    ``NAME/VERSION`` as the source resolved it), not where an alias points by now."""
    uri = server_uri(tracking_uri)
    with mlflow_errors("storing the baseline in MLflow", uri), client_environment(uri):
        tracking = client(uri)
        run_id = start_run(tracking, experiment, f"dynaudit baseline {run_label(source_uri)}")
        ref = f"runs:/{run_id}/{BASELINE_ARTIFACTS}"
        try:
            tracking.log_artifacts(run_id, str(folder), BASELINE_ARTIFACTS)
            tracking.set_tag(run_id, "dynaudit.source", source_uri)
            tracking.set_tag(run_id, BASELINE_TAG, ref)
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to report
                tracking.set_terminated(run_id, status="FAILED")
            raise
        tracking.set_terminated(run_id)
        if source_uri.startswith("models:/"):
            model = parse(source_uri)
            if model.name is not None:
                version = model_version(tracking, model, revision)
                tracking.set_model_version_tag(model.name, version, BASELINE_TAG, ref)
    return ref


def fetch_baseline(ref: str, destination: Path, tracking_uri: str | None = None) -> Path:
    """Download a baseline stored as run artifacts (``runs:/<id>/dynaudit-baseline``)."""
    stored = parse(ref)
    uri = server_uri(tracking_uri)
    with mlflow_errors(stored.uri, uri), client_environment(uri):
        if stored.run_id is None:
            raise UsageError(f"{ref}: a baseline in MLflow is runs:/RUN_ID/{BASELINE_ARTIFACTS}")
        destination.mkdir(parents=True, exist_ok=True)  # MLflow 2 does not create it
        path = client(uri).download_artifacts(stored.run_id, stored.path, str(destination))
    return Path(path)
