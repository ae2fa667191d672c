"""Pickle checkpoints (``pytorch_model.bin``, ``.pt``), read only with ``--allow-pickle``.

Even then they go through ``torch.load(weights_only=True)`` only: PyTorch's restricted
unpickler, which rebuilds tensors and plain containers and refuses every other global, so no
code from the file runs. Each pickle is converted once into a safetensors file in dynaudit's
cache (``<cache>/pickles/<sha256 of the pickles>/``, renamed into place when complete) and the
audit reads that like any other checkpoint. A converted shard is memory-mapped while it is
written, so only one shard's tensors are ever touched at a time.

A pickle whose top level is a training checkpoint (``{'model_state_dict': ...,
'optimizer_state_dict': ..., 'epoch': ...}``, a PyTorch Lightning ``.ckpt``) is audited from its
model weights: the value under ``--state-dict-key``, else the first of :data:`STATE_DICT_KEYS`
that is itself a mapping of names to tensors (the rule :mod:`dynaudit.sources.training` gives
safetensors training checkpoints too). Optimizer state and metadata are not read further. Which
key was used is kept in the converted file's metadata (:data:`WEIGHTS_NOTE`), for the report.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dynaudit.errors import EmptyCheckpoint, PickleRefused, StateDictKeyNotFound, listed
from dynaudit.files import publish_dir, staged_dir
from dynaudit.sources.training import STATE_DICT_KEYS, lightning_prefix, weights_note
from dynaudit.tensors import (
    INDEX_NAME,
    PICKLE_INDEX,
    PICKLE_SUFFIXES,
    SINGLE_NAME,
    local_selection,
    present,
    require_regular,
    sha256_file,
)

__all__ = [
    "PICKLE_INDEX",
    "STATE_DICT_KEYS",
    "WEIGHTS_NOTE",
    "convert_pickles",
    "is_pickle_only",
    "pickle_files",
]

_SIDE_FILES = ("config.json", "README.md")
# The converted file's metadata entry saying which part of a training checkpoint it holds.
WEIGHTS_NOTE = "dynaudit.weights"
_CONVERTER = 2  # in the cache key: conversions by an older rule are not reused


def is_pickle_only(path: Path) -> bool:
    """A pickle file, or a directory whose weights (by the loader's rule,
    :func:`dynaudit.tensors.select_weights`) are pickles."""
    if path.is_dir():
        return local_selection(path).pickle
    return path.suffix in PICKLE_SUFFIXES and path.is_file()


def pickle_files(path: Path) -> list[Path]:
    """The pickle weight files: the file itself, or the directory's by the loader's rule
    (``pytorch_model.bin``, the shards of ``pytorch_model.bin.index.json``, else every
    top-level pickle)."""
    if not path.is_dir():
        return [path]
    selection = local_selection(path)
    if not selection.pickle or not selection.files:
        raise EmptyCheckpoint(f"{path}: no pickle weights in this directory", path=str(path))
    return [path / name for name in selection.files]


def convert_pickles(
    path: Path,
    cache: Path,
    digest: Callable[[Path], str] | None = None,
    key: str | None = None,
) -> Path:
    """A directory of safetensors files holding the tensors of the pickle(s) at ``path``: the
    model weights under ``key`` of a training checkpoint (default: found by
    :data:`STATE_DICT_KEYS`). Cached by the files' content and ``key``."""
    files = pickle_files(path)
    for file in files:
        require_regular(file, "a pickle weight file")
    digest = digest or sha256_file
    root = path if path.is_dir() else path.parent
    sides = [root / side for side in _SIDE_FILES if present(root / side, side)]
    material: list[Any] = [[f.name, digest(f)] for f in [*files, *sides]]
    material.append({"converter": _CONVERTER, "state_dict_key": key})
    final = cache / "pickles" / hashlib.sha256(json.dumps(material).encode()).hexdigest()[:32]
    if final.is_dir():
        return final
    with staged_dir(final) as staging:
        names = (
            [SINGLE_NAME]
            if len(files) == 1
            else [
                f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)
            ]
        )
        weight_map: dict[str, str] = {}
        for file, name in zip(files, names, strict=True):
            tensors, note = _model_weights(file, _load(file), key)
            _save(tensors, staging / name, {WEIGHTS_NOTE: note} if note else {})
            weight_map.update(dict.fromkeys(tensors, name))
        if len(files) > 1:
            (staging / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
        for side in sides:
            shutil.copyfile(side, staging / side.name)
        publish_dir(staging, final)
    return final


def _load(file: Path) -> Any:
    """What ``torch.load(weights_only=True)`` rebuilds from ``file``; refused with the
    unpickler's reason when it holds anything else."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notes from the restricted unpickler
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                state = torch.load(file, map_location="cpu", weights_only=True)  # legacy format
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise PickleRefused(
            f"{file}: torch.load(weights_only=True) refused it ({_reason(exc)}); it holds more "
            "than plain weights, or is damaged: convert it to safetensors where you trust it",
            path=str(file),
        ) from exc
    return state


def _is_state_dict(value: object) -> bool:
    """A mapping of tensor names to tensors."""
    import torch

    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def _model_weights(file: Path, state: Any, key: str | None) -> tuple[dict[str, Any], str | None]:
    """The state dict in what ``file`` unpickled to, and the report's note saying where it was
    found: the top level itself, or the value under ``key`` (default: the first of
    :data:`STATE_DICT_KEYS` that is a non-empty state dict) of a training checkpoint."""
    if key is None and _is_state_dict(state):
        return state, None
    if not isinstance(state, dict):
        raise PickleRefused(
            f"{file}: not a state dict (a mapping of tensor names to tensors)", path=str(file)
        )
    keys = [str(k) for k in state]
    if key is None:
        key = next((k for k in STATE_DICT_KEYS if _is_state_dict(state.get(k)) and state[k]), None)
        if key is None:
            raise PickleRefused(
                f"{file}: not a state dict (a mapping of tensor names to tensors), nor a training "
                f"checkpoint holding one under {', '.join(STATE_DICT_KEYS)} (its keys: "
                f"{listed(keys, 8)}); --state-dict-key KEY names the key that holds the weights",
                path=str(file),
            )
    elif _is_state_dict(state):
        raise StateDictKeyNotFound(
            f"{file}: --state-dict-key {key}: this pickle is a plain state dict (tensor names "
            "at its top level); leave the flag out",
            path=str(file),
        )
    elif key not in state or not _is_state_dict(state[key]) or not state[key]:
        found = "no such key" if key not in state else "not a mapping of names to tensors"
        raise StateDictKeyNotFound(
            f"{file}: --state-dict-key {key}: {found}; the checkpoint's keys: {listed(keys, 12)}",
            path=str(file),
        )
    return _weights_under(state, key)


def _weights_under(state: dict[Any, Any], key: str) -> tuple[dict[str, Any], str]:
    """The state dict under ``key``, without a Lightning ``model.`` prefix on every name, and
    the note naming the key and what was not audited."""
    weights: dict[str, Any] = state[key]
    removed = lightning_prefix(key, weights)
    if removed:
        weights = {name.removeprefix(removed): t for name, t in weights.items()}
    return weights, weights_note(key, removed, (str(k) for k in state if k != key))


# Lines of torch's message that are advice, not the reason (it advises weights_only=False:
# the one thing not to do here).
_ADVICE = ("weights_only", "Weights only load failed", "Please file an issue", "Check the doc")


def _reason(exc: BaseException) -> str:
    """The unpickler's own reason (e.g. ``Trying to load unsupported GLOBAL posix.system``,
    ``Unsupported operand 149``) without torch's advice around it; torch puts the reason on
    the line after ``WeightsUnpickler error:`` or after the advice, depending on the version."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    for line in text.splitlines():
        line = line.strip()
        if line and not any(advice in line for advice in _ADVICE):
            return line.rstrip(".")[:200]
    return "not a weights file" if str(exc).strip() else type(exc).__name__


def _save(tensors: dict[str, Any], out: Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` (and ``metadata``) as safetensors; tensors sharing storage (tied
    weights) are copied, since safetensors stores each tensor on its own."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    plain = {}
    for name, tensor in tensors.items():
        tensor = tensor.contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        plain[name] = tensor.clone() if pointer in seen and tensor.numel() else tensor
        seen.add(pointer)
    save_file(plain, str(out), metadata=metadata or None)
