"""Local sources: a ``.safetensors`` file, an HF-style directory, a sharded directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dynaudit.errors import CheckpointNotFound, UsageError
from dynaudit.tensors import Checkpoint

__all__ = ["ResolvedSource", "open_checkpoint", "resolve"]

_REMOTE_SCHEMES = ("hf://", "models:/", "runs:/")


@dataclass(frozen=True)
class ResolvedSource:
    uri: str
    path: Path
    revision: str | None = None


def resolve(source: str | os.PathLike[str]) -> ResolvedSource:
    """Map SOURCE to a local checkpoint. An existing local path always wins."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        return ResolvedSource(uri=text, path=path)
    if text.startswith(_REMOTE_SCHEMES):
        raise UsageError(
            f"{text}: Hugging Face and MLflow sources are not supported by this version yet; "
            "download the checkpoint and pass its directory"
        )
    raise CheckpointNotFound(f"{text}: no such file or directory", path=text)


def open_checkpoint(
    resolved: ResolvedSource, base: str | os.PathLike[str] | None = None
) -> Checkpoint:
    """The checkpoint at a resolved source; a PEFT adapter directory opens merged over its
    base (``base``, or the adapter's ``base_model_name_or_path``)."""
    from dynaudit.adapters import ADAPTER_WEIGHTS, is_adapter, open_adapter

    if is_adapter(resolved.path):
        return open_adapter(resolved.path, base)
    if resolved.path.name == ADAPTER_WEIGHTS and is_adapter(resolved.path.parent):
        return open_adapter(resolved.path.parent, base)  # the adapter's weights file itself
    if base is not None:
        raise UsageError(f"{resolved.uri}: --base applies to LoRA adapter directories only")
    return Checkpoint.open(resolved.path)
