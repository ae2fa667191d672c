"""What every source returns, and the options remote sources take."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dynaudit.errors import EmptyCheckpoint, InputError, PickleRefused, RemoteNotFound
from dynaudit.tensors import INDEX_NAME, PICKLE_SUFFIXES, natural_key

PICKLE_INDEX = "pytorch_model.bin.index.json"

__all__ = ["SIDE_FILES", "ResolvedSource", "SourceOptions", "redact_url", "weight_files"]

# Small files an audit reads besides the weights (the model card carries `base_model`).
SIDE_FILES = ("config.json", INDEX_NAME, "adapter_config.json", "README.md")


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


@dataclass(frozen=True)
class ResolvedSource:
    """A checkpoint on local disk, and what its source told us about it."""

    uri: str
    path: Path
    revision: str | None = None  # Hub commit sha, MLflow model version or run id
    expected_sha256: Mapping[str, str] = field(default_factory=dict)  # file → sha256 vouched for


def weight_files(
    uri: str,
    names: Collection[str],
    read_index: Callable[[str], Any],
    *,
    allow_pickle: bool = False,
) -> list[str]:
    """Which of a remote checkpoint's files (paths relative to its root) to fetch, by the rules
    local directories follow: the index's shards, else ``model.safetensors``, else every
    top-level ``.safetensors``. Pickle weights only with ``allow_pickle`` and no safetensors."""
    if INDEX_NAME in names:
        return _shards(uri, INDEX_NAME, names, read_index)
    if "model.safetensors" in names:
        return ["model.safetensors"]
    top = sorted((n for n in names if n.endswith(".safetensors") and "/" not in n), key=natural_key)
    if top:
        return top
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES) and "/" not in n)
    if pickles and allow_pickle:
        if PICKLE_INDEX in names:
            return [PICKLE_INDEX, *_shards(uri, PICKLE_INDEX, names, read_index)]
        return ["pytorch_model.bin"] if "pytorch_model.bin" in names else pickles
    if pickles:
        raise PickleRefused(
            f"{uri}: only pickle weights ({pickles[0]}), which can execute code when loaded and "
            "are not downloaded by default; publish safetensors weights, or pass --allow-pickle "
            "to read plain weights with torch.load(weights_only=True)"
        )
    raise EmptyCheckpoint(f"{uri}: no .safetensors weights found")


def _shards(
    uri: str, index_name: str, names: Collection[str], read_index: Callable[[str], Any]
) -> list[str]:
    index = read_index(index_name)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{uri}: {index_name} has no 'weight_map'")
    shards = sorted({str(s) for s in weight_map.values()}, key=natural_key)
    missing = [s for s in shards if s not in names or "/" in s]
    if missing:
        raise RemoteNotFound(f"{uri}: {index_name} names shard {missing[0]!r}, which is missing")
    return shards


def redact_url(url: str) -> str:
    """``url`` without the credentials a user may have put in it (``https://user:pw@host``)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))
