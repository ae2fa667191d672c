"""What every source returns, and the options remote sources take."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynaudit.errors import EmptyCheckpoint, InputError, PickleRefused, RemoteNotFound
from dynaudit.tensors import INDEX_NAME, PICKLE_SUFFIXES, natural_key

__all__ = ["SIDE_FILES", "ResolvedSource", "SourceOptions", "weight_files"]

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
    cache_dir: Path | None = None  # where MLflow downloads are kept (default: dynaudit's cache)


@dataclass(frozen=True)
class ResolvedSource:
    """A checkpoint on local disk, and what its source told us about it."""

    uri: str
    path: Path
    revision: str | None = None  # Hub commit sha, MLflow model version or run id
    expected_sha256: Mapping[str, str] = field(default_factory=dict)  # file → sha256 vouched for


def weight_files(uri: str, names: Collection[str], read_index: Callable[[], Any]) -> list[str]:
    """Which of a remote checkpoint's files (paths relative to its root) to fetch, by the rules
    local directories follow: the index's shards, else ``model.safetensors``, else every
    top-level ``.safetensors``. Pickles are never fetched."""
    if INDEX_NAME in names:
        index = read_index()
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{uri}: {INDEX_NAME} has no 'weight_map'")
        shards = sorted({str(s) for s in weight_map.values()}, key=natural_key)
        missing = [s for s in shards if s not in names or "/" in s]
        if missing:
            raise RemoteNotFound(
                f"{uri}: {INDEX_NAME} names shard {missing[0]!r}, which is missing"
            )
        return shards
    if "model.safetensors" in names:
        return ["model.safetensors"]
    top = sorted((n for n in names if n.endswith(".safetensors") and "/" not in n), key=natural_key)
    if top:
        return top
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES) and "/" not in n)
    if pickles:
        raise PickleRefused(
            f"{uri}: only pickle weights ({pickles[0]}), which can execute code when loaded and "
            "are not downloaded; publish safetensors weights (save_pretrained(..., "
            "safe_serialization=True)) and audit those"
        )
    raise EmptyCheckpoint(f"{uri}: no .safetensors weights found")
