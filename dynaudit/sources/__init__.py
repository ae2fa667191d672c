"""Where checkpoints come from: a local path, the Hugging Face Hub, or MLflow (SPEC §3).

Each source turns SOURCE into a local checkpoint directory (downloading only what is needed)
plus what it knows about it — revision, and the sha256 it vouches for per file — so the rest
of the pipeline only ever reads local files.
"""

from __future__ import annotations

import os
from pathlib import Path

from dynaudit.errors import CheckpointNotFound, UsageError
from dynaudit.sources import hub
from dynaudit.sources.base import ResolvedSource, SourceOptions
from dynaudit.sources.local import open_checkpoint, verify_download
from dynaudit.tensors import Checkpoint

# Names that are files, not Hub repositories: a missing one is a typo, not a repo id.
LOCAL_SUFFIXES = (".safetensors", ".json", ".bin", ".pt", ".pth", ".ckpt", ".pkl")

__all__ = [
    "ResolvedSource",
    "SourceOptions",
    "open_checkpoint",
    "open_headers",
    "resolve",
    "verify_download",
    "with_revision",
]


def resolve(source: str | os.PathLike[str], options: SourceOptions | None = None) -> ResolvedSource:
    """Map SOURCE to a local checkpoint, fetching it first when it is remote.

    ``hf://`` always means the Hub and ``models:/``/``runs:/`` MLflow; otherwise an existing
    local path wins over a bare ``org/name``, which then means the Hub.
    """
    from dynaudit.sources import mlflow

    options = options or SourceOptions()
    text = os.fspath(source)
    if text.startswith(mlflow.SCHEMES):
        return mlflow.fetch(text, options)
    local = _local(text)
    if local is not None:
        return ResolvedSource(uri=text, path=local)
    return hub.fetch(_hub_repo(text), options)


def open_headers(
    source: str | os.PathLike[str], options: SourceOptions | None = None
) -> tuple[str, Checkpoint] | None:
    """A Hub checkpoint's tensor headers read remotely (ranged requests, no weights
    downloaded), as ``(uri, checkpoint)``; ``None`` when SOURCE is not a Hub model (or an
    adapter, whose base must be opened too): the caller then resolves it as usual."""
    from dynaudit.sources import mlflow

    text = os.fspath(source)
    if text.startswith(mlflow.SCHEMES) or _local(text) is not None:
        return None
    return hub.open_remote_headers(_hub_repo(text), options or SourceOptions())


def with_revision(source: str | os.PathLike[str], revision: str | None) -> str:
    """SOURCE with ``--revision REV`` folded in, as the ``hf://org/name@REV[/path]`` URI that
    every later step (and the report's ``source.uri``) reads; SOURCE itself when ``revision``
    is None. A usage error (exit 2) when SOURCE already names another revision, or is not a
    Hub source (a local path, an MLflow URI): the flag applies to SOURCE only, never to an
    adapter's base or a baseline."""
    from dynaudit.sources import mlflow

    text = os.fspath(source)
    if revision is None:
        return text
    if not revision.strip():
        raise UsageError("--revision: empty; name a branch, tag or commit")
    if text.startswith(mlflow.SCHEMES):
        raise UsageError(
            f"{text}: --revision applies to Hugging Face Hub sources; an MLflow URI names its "
            "version itself (models:/NAME/VERSION, models:/NAME@ALIAS)"
        )
    if _local(text) is not None:
        raise UsageError(
            f"{text}: a local path has no revision; write hf://{text} to mean the Hub repository"
        )
    repo = _hub_repo(text, revision)
    if repo.uri.startswith(hub.SCHEME) and hub.parse(repo.uri) == repo:
        return repo.uri  # already names this revision
    return repo.label


def _local(text: str) -> Path | None:
    """The local path SOURCE names, if it exists (``hf://`` never names one)."""
    path = Path(text).expanduser()
    return path if not text.startswith(hub.SCHEME) and path.exists() else None


def _hub_repo(text: str, revision: str | None = None) -> hub.HubRepo:
    """SOURCE as a Hub repository, unless it reads as a mistyped local path."""
    explicit = text.startswith(hub.SCHEME)
    first = Path(text.split("/", 1)[0]).expanduser()
    looks_local = text.endswith(LOCAL_SUFFIXES) or (first.exists() and first != Path(text))
    repo = None if looks_local and not explicit else hub.parse(text, revision)
    if repo is None:
        raise CheckpointNotFound(f"{text}: no such file or directory", path=text)
    return repo
