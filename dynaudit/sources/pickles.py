"""Pickle checkpoints (``pytorch_model.bin``, ``.pt``), read only with ``--allow-pickle``.

Even then they go through ``torch.load(weights_only=True)`` only: PyTorch's restricted
unpickler, which rebuilds tensors and plain containers and refuses every other global, so no
code from the file runs. Each pickle is converted once into a safetensors file in dynaudit's
cache (``<cache>/pickles/<sha256 of the pickles>/``, renamed into place when complete) and the
audit reads that like any other checkpoint. A converted shard is memory-mapped while it is
written, so only one shard's tensors are ever touched at a time.
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

from dynaudit.errors import EmptyCheckpoint, PickleRefused
from dynaudit.files import publish_dir, staged_dir
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

__all__ = ["PICKLE_INDEX", "convert_pickles", "is_pickle_only", "pickle_files"]

_SIDE_FILES = ("config.json", "README.md")
_WRAPPERS = ("state_dict", "model", "module")  # common training-script containers


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


def convert_pickles(path: Path, cache: Path, digest: Callable[[Path], str] | None = None) -> Path:
    """A directory of safetensors files holding the tensors of the pickle(s) at ``path``."""
    files = pickle_files(path)
    for file in files:
        require_regular(file, "a pickle weight file")
    digest = digest or sha256_file
    root = path if path.is_dir() else path.parent
    sides = [root / side for side in _SIDE_FILES if present(root / side, side)]
    material = [[f.name, digest(f)] for f in [*files, *sides]]
    key = hashlib.sha256(json.dumps(material).encode()).hexdigest()[:32]
    final = cache / "pickles" / key
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
            tensors = _load(file)
            _save(tensors, staging / name)
            weight_map.update(dict.fromkeys(tensors, name))
        if len(files) > 1:
            (staging / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
        for side in sides:
            shutil.copyfile(side, staging / side.name)
        publish_dir(staging, final)
    return final


def _load(file: Path) -> dict[str, Any]:
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
    for wrapper in _WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise PickleRefused(
            f"{file}: not a state dict (a mapping of tensor names to tensors)", path=str(file)
        )
    return state


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


def _save(tensors: dict[str, Any], out: Path) -> None:
    """Write ``tensors`` as safetensors; tensors sharing storage (tied weights) are copied,
    since safetensors stores each tensor on its own."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    plain = {}
    for name, tensor in tensors.items():
        tensor = tensor.contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        plain[name] = tensor.clone() if pointer in seen and tensor.numel() else tensor
        seen.add(pointer)
    save_file(plain, str(out))
