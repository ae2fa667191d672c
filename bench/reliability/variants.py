"""Derived checkpoints: a copy of a base with every tensor passed through a function, shard
layout and ``config.json`` kept (or re-saved with another layout)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["Change", "derive", "reshard", "shards"]

Change = Callable[[str, torch.Tensor], torch.Tensor]


def shards(checkpoint: Path) -> list[Path]:
    """The checkpoint's safetensors files, in name order."""
    return sorted(checkpoint.glob("*.safetensors"))


def derive(base: Path, out: Path, change: Change) -> Path:
    """``out``: ``base`` with each tensor replaced by ``change(name, tensor)``; the same files."""
    shutil.copytree(base, out)
    for path in shards(out):
        state = load_file(str(path))
        save_file({k: change(k, v).contiguous() for k, v in state.items()}, str(path),
                  metadata={"format": "pt"})  # fmt: skip
    return out


def reshard(base: Path, out: Path, tensors_per_shard: int) -> Path:
    """``base`` re-saved with ``tensors_per_shard`` tensors per file and a fresh index, tensors
    in reverse order: the same weights in another layout."""
    out.mkdir(parents=True)
    state: dict[str, torch.Tensor] = {}
    for path in shards(base):
        state.update(load_file(str(path)))
    for extra in base.iterdir():
        if extra.suffix != ".safetensors" and not extra.name.endswith(".index.json"):
            shutil.copy2(extra, out / extra.name)
    names = sorted(state, reverse=True)
    groups = [names[i : i + tensors_per_shard] for i in range(0, len(names), tensors_per_shard)]
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: state[k] for k in group}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
    size = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out
