"""A layer's weights remembered in a few kilobytes: a seeded two-sided random projection.

The discrepancy is a statistic of a layer, so it cannot see a layer replaced by another with
the same statistics: a re-drawn initialisation, two blocks swapped. A baseline therefore also
keeps ``L W R`` for each fitted matrix W (the seed-0 block, scaled by s), with L (a × m) and
R (n × b) Gaussian of variance 1/a and 1/b, a = min(m, SIDE) and b = min(n, SIDE) (a side
of at most SIDE is kept whole). Then ``‖L (W' − W) R‖ / ‖L W R‖`` estimates the relative
change ``‖W' − W‖ / ‖W‖`` without the reference's weights: both norms are unbiased in the
square. On the gate calibration's layers (128 × 128 to 128 × 344) the estimate is within
14 % of the exact ratio (experiments/weight_change.py); for a rank-1 change of a 512 × 512
matrix its spread is 11 % (docs/gate.md, "Weight change").

The sketch of the change, ``L (W' − W) R``, also says what *kind* of change it was:
:func:`noise_likeness` compares its effective rank with that of i.i.d. Gaussian noise seen
through the same L and R. Noise (and quantisation error) is ≈ 1; the calibration's real
fine-tunes, whose updates are structured, were ≤ 0.6 in every layer.

Two independent draws of a layer are √2 of its norm apart, and a layer replaced by anything
unrelated to it is at least its own norm away; the calibration's real fine-tunes moved a
layer by 43 % at most.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dynaudit.dynamics.kernel import matrix_seed

__all__ = ["SIDE", "noise_likeness", "relative_change", "sketch", "weight_figures"]

SIDE = 64  # 64 × 64 floats, 16 KiB per matrix


def _projection(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen).div_(rows**0.5)


def sketch(matrices: torch.Tensor, name: str, groups: Sequence[int] | None = None) -> torch.Tensor:
    """``L W R`` of each matrix of ``matrices`` (b, m, n) → (b, a, b'), float32 on the CPU.
    Each matrix's projections are seeded by the layer ``name`` and its ``groups`` index
    (default 0..b-1), so the sketch does not depend on batching, device or sharding."""
    count, m, n = matrices.shape
    groups = range(count) if groups is None else groups
    out = []
    for matrix, group in zip(matrices, groups, strict=True):
        seed = matrix_seed(0, f"{name}\x00sketch", group)
        w = matrix.float()
        if m > SIDE:  # (a, m) @ W; generated on the CPU so every device sees the same L and R
            w = _projection(SIDE, m, seed).to(w.device) @ w
        if n > SIDE:
            w = w @ _projection(SIDE, n, seed + 1).to(w.device).mT
        out.append(w.cpu())
    return torch.stack(out)


def relative_change(new: torch.Tensor, reference: torch.Tensor) -> float | None:
    """``‖new − reference‖ / ‖reference‖`` over all of a layer's sketches (None when the
    reference is all zeros)."""
    norm = float(reference.double().norm())
    if norm == 0.0:
        return None
    return float((new.double() - reference.double()).norm()) / norm


def _effective_rank(matrices: torch.Tensor) -> torch.Tensor:
    """(Σσ²)² / Σσ⁴ of each matrix: the participation ratio of its spectrum."""
    power = torch.linalg.svdvals(matrices.double()).square()
    ratio: torch.Tensor = power.sum(-1).square() / power.square().sum(-1).clamp_min(1e-300)
    return ratio


def noise_likeness(change: torch.Tensor, name: str, shape: tuple[int, int]) -> float:
    """How much a layer's change looks like i.i.d. noise: the effective rank of its sketch
    ``change`` (b, a, b') over that of Gaussian noise of the layer's ``shape`` (m, n) through
    the same projections, averaged over the layer's matrices. ≈ 1 for noise, lower for a
    structured change (a fine-tune's update, a low-rank edit)."""
    gen = torch.Generator().manual_seed(matrix_seed(0, f"{name}\x00noise", 0))
    # One matrix of noise at a time: a layer of many matrices never holds them all.
    reference = torch.cat(
        [
            sketch(torch.randn(1, *shape, generator=gen), name, groups=[group])
            for group in range(change.shape[0])
        ]
    )
    return float((_effective_rank(change) / _effective_rank(reference)).mean())


def weight_figures(
    matrices: torch.Tensor, reference: torch.Tensor, name: str
) -> tuple[float | None, float | None]:
    """The relative weight change of ``matrices`` (b, m, n) from the baseline's sketch
    ``reference``, and its noise likeness (None when nothing moved)."""
    new = sketch(matrices, name)
    change = relative_change(new, reference)
    if not change:
        return change, None
    return change, noise_likeness(new - reference, name, (matrices.shape[1], matrices.shape[2]))
