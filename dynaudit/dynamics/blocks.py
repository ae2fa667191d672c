"""Large matrices fitted on a seeded block of their rows and columns (docs/method.md, "large
matrices").

The fit costs 6·q_dim·steps FLOP per entry, so a 4096 × 11008 projection costs 14 times a
1024 × 1024 one. A matrix with more than ``max_entries`` entries is therefore fitted on a
block: ``r`` of its rows and ``c`` of its columns, drawn uniformly without replacement, with
``r/c`` close to ``m/n`` so the block keeps the matrix's mix of output and input neurons. The
block depends on the cold fit's seed: each of the K seeds sees another block, so the seed
spread includes the sampling variance and the mean over seeds averages it down; a comparison
refits each seed's stored coordinates on the same rows and columns of the new weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dynaudit.config import FitSettings
from dynaudit.dynamics.kernel import fit_steps, matrix_seed, warm_steps

__all__ = ["block_seed", "block_shape", "fit_flop", "take_blocks"]

# A side shorter than this is kept whole when the matrix is sampled (a 32 × 100 000 matrix is
# fitted on all 32 rows): a block of a few rows says little about the others.
_MIN_SIDE = 256


def block_shape(m: int, n: int, max_entries: int) -> tuple[int, int]:
    """Rows and columns fitted for an m × n matrix: (m, n) when ``m·n ≤ max_entries`` (or
    ``max_entries`` is 0), else a block of at most about ``max_entries`` entries."""
    if max_entries <= 0 or m * n <= max_entries:
        return m, n
    ratio = math.sqrt(max_entries / (m * n))
    rows = min(m, max(_MIN_SIDE, round(m * ratio)))
    cols = min(n, max(_MIN_SIDE, max_entries // rows))
    rows = min(m, max(rows, max_entries // cols))  # a short side kept whole frees entries
    return rows, cols


def fit_flop(settings: FitSettings, m: int, n: int, *, warm: bool = False) -> float:
    """FLOP of one cold fit (or, with ``warm``, one warm refit) of an m × n matrix: 6·q_dim
    per fitted entry and step. What inspect shows, what shards are balanced on and what the
    benchmarks count."""
    r, c = block_shape(m, n, settings.max_entries)
    steps = warm_steps(settings, r, c) if warm else fit_steps(settings, r, c)
    return 6.0 * settings.q_dim * r * c * steps


def block_seed(seed: int, name: str, group: int = 0) -> int:
    """The seed of one matrix's block in one cold fit (another stream than its init's)."""
    return matrix_seed(seed, f"{name}\x00block", group)


def take_blocks(target: torch.Tensor, shape: tuple[int, int], seeds: Sequence[int]) -> torch.Tensor:
    """Each matrix's seeded block, ``(b, r, c)``, rows and columns in their stored order; the
    target itself when ``shape`` is the whole matrix."""
    _, m, n = target.shape
    rows, cols = shape
    if (rows, cols) == (m, n):
        return target
    out = torch.empty(len(seeds), rows, cols, dtype=target.dtype, device=target.device)
    for i, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(seed)
        r = torch.randperm(m, generator=gen)[:rows].sort().values.to(target.device)
        c = torch.randperm(n, generator=gen)[:cols].sort().values.to(target.device)
        out[i] = target[i].index_select(0, r).index_select(1, c)
    return out
