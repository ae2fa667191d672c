"""Opening a resolved local checkpoint: a ``.safetensors`` file or an HF-style or sharded
directory (a pickle-only one converted when allowed; a training checkpoint as its model
weights), checked against the hashes its source published. Adapters are opened over their
base by :func:`dynaudit.sources.open_checkpoint`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dynaudit.cache import cache_root
from dynaudit.errors import CorruptCheckpoint
from dynaudit.sources.base import ResolvedSource, SourceOptions
from dynaudit.sources.pickles import WEIGHTS_NOTE, convert_pickles, is_pickle_only
from dynaudit.sources.training import model_weights
from dynaudit.tensors import Checkpoint, require_regular, sha256_file

__all__ = ["open_local", "verify_download"]


def open_local(
    resolved: ResolvedSource,
    options: SourceOptions | None = None,
    digest: Callable[[Path], str] | None = None,
) -> Checkpoint:
    """The checkpoint at a resolved source that is not an adapter: a ``.safetensors`` file or
    a directory of them; a pickle-only one converted only with ``options.allow_pickle`` (from
    the model weights of a training checkpoint: ``options.state_dict_key``, else found). A
    safetensors training checkpoint (names flattened, ``model_state_dict.…`` beside optimizer
    state) opens as its model weights too (:func:`~dynaudit.sources.training.model_weights`)."""
    options = options or SourceOptions()
    if options.allow_pickle and is_pickle_only(resolved.path):
        converted = convert_pickles(
            resolved.path, cache_root(options.cache_dir), digest, key=options.state_dict_key
        )
        checkpoint = _as_resolved(Checkpoint.open(converted), resolved)
        checkpoint.weights_note = checkpoint.metadata.get(WEIGHTS_NOTE)
        return checkpoint
    opened = Checkpoint.open(resolved.path)
    try:
        return _as_resolved(model_weights(opened, options.state_dict_key), resolved)
    except BaseException:
        opened.close()
        raise


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
                uri=resolved.uri,
            )
