"""Where checkpoints come from: a local path, the Hugging Face Hub, or MLflow (docs/sources.md).

Each source turns SOURCE into a local checkpoint directory (downloading only what is needed)
plus what it knows about it — revision, and the sha256 it vouches for per file — so the rest
of the pipeline only ever reads local files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from dynaudit.errors import CheckpointNotFound, UsageError
from dynaudit.sources import hub
from dynaudit.sources.adapters import (
    ADAPTER_WEIGHTS,
    AdapterCheckpoint,
    is_adapter,
    merge_adapter,
    opening,
    read_adapter,
)
from dynaudit.sources.base import ResolvedSource, SourceOptions
from dynaudit.sources.local import open_local, verify_download
from dynaudit.sources.training import model_weights
from dynaudit.tensors import WEIGHT_SUFFIXES, Checkpoint

# Names that are files, not Hub repositories: a missing one is a typo, not a repo id.
LOCAL_SUFFIXES = (*WEIGHT_SUFFIXES, ".json")

__all__ = [
    "ResolvedSource",
    "SourceOptions",
    "open_adapter",
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


def open_checkpoint(
    resolved: ResolvedSource,
    base: str | os.PathLike[str] | None = None,
    options: SourceOptions | None = None,
    digest: Callable[[Path], str] | None = None,
) -> Checkpoint:
    """The checkpoint at a resolved source, after checking downloaded files against the hashes
    their source published. A PEFT adapter directory opens merged over its base (``base``, or
    the adapter's ``base_model_name_or_path``, itself any SOURCE form); a pickle-only checkpoint
    opens (converted) only with ``options.allow_pickle``. ``digest`` hashes a file (the result
    cache passes its memoised one)."""
    options = options or SourceOptions()
    verify_download(resolved, digest)
    if is_adapter(resolved.path):
        return open_adapter(resolved.path, base, options, digest)
    if resolved.path.name == ADAPTER_WEIGHTS and is_adapter(resolved.path.parent):
        return open_adapter(resolved.path.parent, base, options, digest)  # its weights file
    if base is not None:
        raise UsageError(f"{resolved.uri}: --base applies to LoRA adapter directories only")
    return open_local(resolved, options, digest)


def open_adapter(
    path: Path,
    base: str | os.PathLike[str] | None = None,
    options: SourceOptions | None = None,
    digest: Callable[[Path], str] | None = None,
) -> AdapterCheckpoint:
    """The adapter directory ``path`` merged over its base, which is opened like any SOURCE
    (checked against its source's hashes, pickles only with ``allow_pickle``). The base may be
    an adapter itself: the recursion lives here, guarded against cycles by
    :func:`~dynaudit.sources.adapters.opening`."""
    settings = read_adapter(path, base)
    assert settings.base is not None  # read_adapter refuses an adapter without one
    with opening(path):
        adapter = Checkpoint.open(path / ADAPTER_WEIGHTS)
        try:
            opened = open_checkpoint(resolve(settings.base, options), None, options, digest)
            return merge_adapter(path, settings, adapter, opened)
        except BaseException:
            adapter.close()
            raise


def open_headers(
    source: str | os.PathLike[str], options: SourceOptions | None = None
) -> tuple[str, Checkpoint] | None:
    """A Hub checkpoint's tensor headers read remotely (ranged requests, no weights
    downloaded), as ``(uri, checkpoint)`` — of a training checkpoint, its model weights, as
    :func:`open_checkpoint` would open it; ``None`` when SOURCE is not a Hub model (or an
    adapter, whose base must be opened too): the caller then resolves it as usual."""
    from dynaudit.sources import mlflow

    options = options or SourceOptions()
    text = os.fspath(source)
    if text.startswith(mlflow.SCHEMES) or _local(text) is not None:
        return None
    remote = hub.open_remote_headers(_hub_repo(text), options)
    if remote is None:
        return None
    uri, checkpoint = remote
    return uri, model_weights(checkpoint, options.state_dict_key)


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
