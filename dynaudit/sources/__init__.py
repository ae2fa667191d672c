"""Where checkpoints come from: a local path, the Hugging Face Hub, or MLflow (SPEC §3).

Each source turns SOURCE into a local checkpoint directory (downloading only what is needed)
plus what it knows about it — revision, and the sha256 it vouches for per file — so the rest
of the pipeline only ever reads local files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from dynaudit.errors import CheckpointNotFound, CorruptCheckpoint
from dynaudit.sources.base import ResolvedSource, SourceOptions
from dynaudit.sources.local import open_checkpoint
from dynaudit.tensors import Checkpoint, sha256_file

__all__ = [
    "ResolvedSource",
    "SourceOptions",
    "open_checkpoint",
    "open_headers",
    "resolve",
    "verify_download",
]


def resolve(source: str | os.PathLike[str], options: SourceOptions | None = None) -> ResolvedSource:
    """Map SOURCE to a local checkpoint, fetching it first when it is remote.

    ``hf://`` always means the Hub and ``models:/``/``runs:/`` MLflow; otherwise an existing
    local path wins over a bare ``org/name``, which then means the Hub.
    """
    from dynaudit.sources import hub, mlflow

    options = options or SourceOptions()
    text = os.fspath(source)
    if text.startswith(mlflow.SCHEMES):
        return mlflow.fetch(text, options)
    path = Path(text).expanduser()
    if not text.startswith(hub.SCHEME) and path.exists():
        return ResolvedSource(uri=text, path=path)
    repo = hub.parse(text)
    if repo is not None:
        return hub.fetch(repo, options)
    raise CheckpointNotFound(f"{text}: no such file or directory", path=text)


def open_headers(
    source: str | os.PathLike[str], options: SourceOptions | None = None
) -> tuple[str, Checkpoint] | None:
    """A Hub checkpoint's tensor headers read remotely (ranged requests, no weights
    downloaded), as ``(uri, checkpoint)``; ``None`` when SOURCE is not a Hub model (or an
    adapter, whose base must be opened too): the caller then resolves it as usual."""
    from dynaudit.sources import hub

    text = os.fspath(source)
    if not text.startswith(hub.SCHEME) and Path(text).expanduser().exists():
        return None
    repo = hub.parse(text)
    if repo is None:
        return None
    return hub.open_remote_headers(repo, options or SourceOptions())


def verify_download(resolved: ResolvedSource, digest: Callable[[Path], str] | None = None) -> None:
    """Check downloaded files against the sha256 their source published (the Hub's LFS
    hashes); a mismatch is a corrupt download."""
    digest = digest or sha256_file
    for name, expected in resolved.expected_sha256.items():
        actual = digest(resolved.path / name)
        if actual != expected:
            raise CorruptCheckpoint(
                f"{resolved.uri}: {name} does not match the sha256 the source published "
                f"({expected[:12]}…, got {actual[:12]}…); delete it from the cache "
                f"({(resolved.path / name).resolve()}) and retry",
                path=str(resolved.path / name),
            )
