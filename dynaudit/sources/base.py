"""What every source returns, and the options remote sources take."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dynaudit.errors import EmptyCheckpoint, InputError, PickleRefused, RemoteNotFound
from dynaudit.tensors import (
    PICKLE_INDEX,
    SIDE_FILES,
    WeightSelection,
    natural_key,
    select_weights,
)

__all__ = [
    "PICKLE_INDEX",
    "SIDE_FILES",
    "ResolvedSource",
    "SourceOptions",
    "redact_url",
    "weight_files",
    "weight_selection",
]


@dataclass(frozen=True)
class SourceOptions:
    """How to reach remote sources. Unset fields fall back to the clients' own environment
    variables (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``MLFLOW_TRACKING_URI``,
    MLflow's auth variables)."""

    hf_endpoint: str | None = None
    hf_token: str | None = field(default=None, repr=False)  # never printed or logged
    mlflow_uri: str | None = None
    cache_dir: Path | None = None  # MLflow downloads, converted pickles (default: dynaudit's)
    allow_pickle: bool = False  # read pickle weights with torch.load(weights_only=True)
    # The key of a pickle training checkpoint holding the model's weights (default: found by
    # dynaudit.sources.pickles.STATE_DICT_KEYS).
    state_dict_key: str | None = None

    def __post_init__(self) -> None:
        from dynaudit.secrets import remember

        remember(self.hf_token, self.mlflow_uri)  # scrubbed from every message from now on
        remember(uri=self.hf_endpoint)


@dataclass(frozen=True)
class ResolvedSource:
    """A checkpoint on local disk, and what its source told us about it."""

    uri: str
    path: Path
    revision: str | None = None  # Hub commit sha, MLflow model version or run id
    expected_sha256: Mapping[str, str] = field(default_factory=dict)  # file → sha256 vouched for
    # Which of the source's files are the weights (a remote listing's view, which also names
    # the weight files that were not downloaded), and what the source vouches those unread
    # files hold (file → sha256): the fingerprint covers them.
    selection: WeightSelection | None = None
    unread_sha256: Mapping[str, str] = field(default_factory=dict)


def weight_selection(
    uri: str,
    names: Collection[str],
    read_index: Callable[[str], Any],
    *,
    allow_pickle: bool = False,
    explicit: str | None = None,
) -> WeightSelection:
    """Which of a remote checkpoint's files (paths relative to its root) are its weights, by
    the rule local directories follow (:func:`dynaudit.tensors.select_weights`, the one
    transformers' ``from_pretrained`` follows). Pickle weights are refused unless
    ``allow_pickle``, before their index is read."""

    def shards(index_name: str) -> list[str]:
        if index_name == PICKLE_INDEX and not allow_pickle:
            raise _pickle_refused(uri, index_name)
        return _shards(uri, index_name, names, read_index)

    selection = select_weights(names, shards, explicit=explicit, where=uri)
    if selection.pickle and not allow_pickle:
        raise _pickle_refused(uri, selection.files[0])
    if not selection.files:
        raise EmptyCheckpoint(f"{uri}: no .safetensors weights found", uri=uri)
    return selection


def weight_files(
    uri: str,
    names: Collection[str],
    read_index: Callable[[str], Any],
    *,
    allow_pickle: bool = False,
    explicit: str | None = None,
) -> list[str]:
    """The files of a remote checkpoint to download for its weights: those
    :func:`weight_selection` chooses, and a pickle index (converted locally)."""
    selection = weight_selection(
        uri, names, read_index, allow_pickle=allow_pickle, explicit=explicit
    )
    index = [selection.index] if selection.pickle and selection.index else []
    return [*index, *selection.files]


def _pickle_refused(uri: str, name: str) -> PickleRefused:
    return PickleRefused(
        f"{uri}: the weights are pickles ({name}), which can execute code when loaded and "
        "are not downloaded by default; publish safetensors weights, or pass --allow-pickle "
        "to read plain weights with torch.load(weights_only=True)",
        uri=uri,
    )


def _shards(
    uri: str, index_name: str, names: Collection[str], read_index: Callable[[str], Any]
) -> list[str]:
    index = read_index(index_name)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{uri}: {index_name} has no 'weight_map'", uri=uri)
    shards = sorted({str(s) for s in weight_map.values()}, key=natural_key)
    missing = [s for s in shards if s not in names or "/" in s]
    if missing:
        raise RemoteNotFound(
            f"{uri}: {index_name} names shard {missing[0]!r}, which is missing", uri=uri
        )
    return shards


def redact_url(url: str) -> str:
    """``url`` without the credentials a user may have put in it (``https://user:pw@host``)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))
