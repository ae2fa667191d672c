"""Opening a resolved checkpoint: a ``.safetensors`` file, an HF-style or sharded directory,
or a PEFT adapter directory merged over its base."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from dynaudit.errors import CorruptCheckpoint, UsageError
from dynaudit.sources.base import ResolvedSource, SourceOptions
from dynaudit.tensors import Checkpoint, require_regular, sha256_file

__all__ = ["open_checkpoint", "verify_download"]


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
    from dynaudit.adapters import ADAPTER_WEIGHTS, is_adapter, open_adapter

    options = options or SourceOptions()
    verify_download(resolved, digest)
    if is_adapter(resolved.path):
        return open_adapter(resolved.path, base, options, digest)
    if resolved.path.name == ADAPTER_WEIGHTS and is_adapter(resolved.path.parent):
        return open_adapter(resolved.path.parent, base, options, digest)  # its weights file
    if base is not None:
        raise UsageError(f"{resolved.uri}: --base applies to LoRA adapter directories only")
    if options.allow_pickle:
        from dynaudit.cache import cache_root
        from dynaudit.pickles import convert_pickles, is_pickle_only

        if is_pickle_only(resolved.path):
            cache = cache_root(options.cache_dir)
            return _as_resolved(
                Checkpoint.open(convert_pickles(resolved.path, cache, digest)), resolved
            )
    return _as_resolved(Checkpoint.open(resolved.path), resolved)


def _as_resolved(checkpoint: Checkpoint, resolved: ResolvedSource) -> Checkpoint:
    """The checkpoint with what its source knows beyond the downloaded files: the source's
    own weight selection (naming the weight files it did not download) and their sha256."""
    checkpoint.vouched = dict(resolved.unread_sha256)
    chosen = resolved.selection
    if (
        chosen is not None
        and checkpoint.selection is not None
        and chosen.files == checkpoint.selection.files
    ):
        checkpoint.selection = chosen
    return checkpoint


def verify_download(resolved: ResolvedSource, digest: Callable[[Path], str] | None = None) -> None:
    """Check downloaded files against the sha256 their source published (the Hub's LFS
    hashes); a mismatch is a corrupt download."""
    digest = digest or sha256_file
    for name, expected in resolved.expected_sha256.items():
        require_regular(resolved.path / name, "a downloaded file")
        actual = digest(resolved.path / name)
        if actual != expected:
            raise CorruptCheckpoint(
                f"{resolved.uri}: {name} does not match the sha256 the source published "
                f"({expected[:12]}…, got {actual[:12]}…); delete it from the cache "
                f"({(resolved.path / name).resolve()}) and retry",
                path=str(resolved.path / name),
            )
