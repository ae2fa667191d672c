"""Checkpoints derived from a base: damaged copies, re-saved copies, swapped blocks.

One place for what the gate calibration (experiments/calibrate_gate.py), the reliability suite
(bench/reliability) and the gate tests do to a base checkpoint. A :data:`Change` maps
``(tensor name, tensor)`` to the new tensor; :func:`derive` applies it file by file, keeping
the shard layout, the index and ``config.json``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "Change",
    "collapse",
    "derive",
    "grouped",
    "load_state",
    "matrices",
    "noise",
    "poison",
    "prune",
    "quantised",
    "reinit",
    "reshard",
    "shards",
    "swapped",
    "zero",
]

Change = Callable[[str, torch.Tensor], torch.Tensor]


def shards(checkpoint: Path) -> list[Path]:
    """The checkpoint's safetensors files, in name order."""
    return sorted(checkpoint.glob("*.safetensors"))


def load_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard (test-sized checkpoints only)."""
    state: dict[str, torch.Tensor] = {}
    for path in shards(checkpoint):
        state.update(load_file(str(path)))
    return state


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
    state = load_state(base)
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


def swapped(base: Path, out: Path, a: str, b: str) -> Path:
    """``base`` with every tensor of block ``a`` and block ``b`` exchanged (same shapes)."""
    state = load_state(base)

    def change(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if a in name:
            return state[name.replace(a, b)]
        if b in name:
            return state[name.replace(b, a)]
        return tensor

    return derive(base, out, change)


# -- damage --------------------------------------------------------------------------------


def matrices(change: Callable[[torch.Tensor], torch.Tensor], only: str = "") -> Change:
    """Apply ``change`` to every float tensor of ≥ 2 dims whose name contains ``only``."""

    def apply(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() < 2 or not tensor.is_floating_point() or only not in name:
            return tensor
        return change(tensor)

    return apply


def _generator(seed: int, gen: torch.Generator | None) -> torch.Generator:
    return gen if gen is not None else torch.Generator().manual_seed(seed)


def noise(level: float, seed: int = 0, gen: torch.Generator | None = None) -> Change:
    """Gaussian noise at ``level`` × each matrix's std (``gen``: draw from a shared stream)."""
    draws = _generator(seed, gen)
    return matrices(lambda w: w + level * w.std() * torch.randn(w.shape, generator=draws))


def prune(fraction: float) -> Change:
    """Magnitude pruning: the ``fraction`` smallest |w| of each matrix set to zero."""

    def apply(w: torch.Tensor) -> torch.Tensor:
        k = max(1, int(fraction * w.numel()))
        cut = w.abs().flatten().kthvalue(k).values
        return torch.where(w.abs() <= cut, torch.zeros_like(w), w)

    return matrices(apply)


def collapse(rank: int, only: str = "") -> Change:
    """Every matrix (conv kernels flattened to out × in·kh·kw) cut to ``rank``."""

    def apply(w: torch.Tensor) -> torch.Tensor:
        matrix = w.reshape(w.shape[0], -1).double()
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(w.shape).to(w.dtype)

    return matrices(apply, only)


def zero(only: str) -> Change:
    return matrices(torch.zeros_like, only)


def reinit(only: str, std: float, seed: int = 1, gen: torch.Generator | None = None) -> Change:
    """A fresh Gaussian draw (the producer's own initialiser scale) in place of the layer."""
    draws = _generator(seed, gen)
    return matrices(lambda w: torch.randn(w.shape, generator=draws) * std, only)


def poison(only: str, value: float) -> Change:
    """One entry of the matching matrices set to NaN or Inf."""

    def apply(w: torch.Tensor) -> torch.Tensor:
        w = w.clone()
        w.view(-1)[w.numel() // 2] = value
        return w

    return matrices(apply, only)


def bf16_round_trip(_: str, tensor: torch.Tensor) -> torch.Tensor:
    """A float tensor taken through bfloat16 and back: what a bf16 save of the same model
    carries (every other tensor unchanged)."""
    if not tensor.is_floating_point():
        return tensor
    return tensor.to(torch.bfloat16).to(tensor.dtype)


def quantised(bits: int) -> Change:
    """A round trip through symmetric per-row integer quantisation (absmax scaling), as a
    weight-only quantiser stores a matrix: the error a quantised copy carries."""
    levels = 2 ** (bits - 1) - 1

    def apply(w: torch.Tensor) -> torch.Tensor:
        rows = w.reshape(w.shape[0], -1)
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / levels
        return ((rows / scale).round().clamp(-levels, levels) * scale).reshape(w.shape)

    return matrices(apply)


def grouped(bits: int, group: int, symmetric: bool = True) -> Change:
    """A round trip through integer quantisation per group of ``group`` inputs of each row
    (the last group ragged), round to nearest, as GPTQ/AWQ-style int4 stores a matrix without
    their error-compensating search: symmetric (absmax, ±(2^(bits−1) − 1)) or asymmetric
    (min–max over 2^bits levels with a zero point). Computed in float32."""

    def apply(w: torch.Tensor) -> torch.Tensor:
        rows = w.reshape(w.shape[0], -1).float()
        out = torch.empty_like(rows)
        for start in range(0, rows.shape[1], group):
            part = rows[:, start : start + group]
            if symmetric:
                levels = 2 ** (bits - 1) - 1
                scale = part.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / levels
                out[:, start : start + group] = (part / scale).round().clamp(
                    -levels, levels
                ) * scale
            else:
                low, high = part.amin(dim=1, keepdim=True), part.amax(dim=1, keepdim=True)
                scale = (high - low).clamp_min(1e-12) / (2**bits - 1)
                zero = (-low / scale).round()
                q = ((part / scale).round() + zero).clamp(0, 2**bits - 1)
                out[:, start : start + group] = (q - zero) * scale
        return out.reshape(w.shape)

    return matrices(apply)
