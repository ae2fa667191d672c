"""Opening a resolved checkpoint: a ``.safetensors`` file, an HF-style or sharded directory,
or a PEFT adapter directory merged over its base."""

from __future__ import annotations

import os

from dynaudit.errors import UsageError
from dynaudit.sources.base import ResolvedSource, SourceOptions
from dynaudit.tensors import Checkpoint

__all__ = ["open_checkpoint"]


def open_checkpoint(
    resolved: ResolvedSource,
    base: str | os.PathLike[str] | None = None,
    options: SourceOptions | None = None,
) -> Checkpoint:
    """The checkpoint at a resolved source; a PEFT adapter directory opens merged over its
    base (``base``, or the adapter's ``base_model_name_or_path``, itself any SOURCE form)."""
    from dynaudit.adapters import ADAPTER_WEIGHTS, is_adapter, open_adapter

    if is_adapter(resolved.path):
        return open_adapter(resolved.path, base, options)
    if resolved.path.name == ADAPTER_WEIGHTS and is_adapter(resolved.path.parent):
        return open_adapter(
            resolved.path.parent, base, options
        )  # the adapter's weights file itself
    if base is not None:
        raise UsageError(f"{resolved.uri}: --base applies to LoRA adapter directories only")
    if options is not None and options.allow_pickle:
        from dynaudit.cache import cache_root
        from dynaudit.pickles import convert_pickles, is_pickle_only

        if is_pickle_only(resolved.path):
            return Checkpoint.open(convert_pickles(resolved.path, cache_root(options.cache_dir)))
    return Checkpoint.open(resolved.path)
