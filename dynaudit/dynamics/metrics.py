"""What is read off fitted coordinates: discrepancy, mean distance, fidelity (docs/method.md
§5–6)."""

from __future__ import annotations

import torch

from dynaudit.dynamics.kernel import reconstruct, rows_per_tile, sum_squares

__all__ = ["discrepancy", "fidelity", "squared_error"]


def discrepancy(
    coords: torch.Tensor, tile_bytes: int = 16 * 1024 * 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact 𝒟 = (1/N) Σ_{i,j} ‖q_i − q_j‖ over all N = m + n neurons, and 𝒟 / (N − 1).

    ``coords``: ``(b, H, N, k)``; a neuron's full coordinate concatenates its pieces. Computed
    in float64 row tiles whose pairwise block stays near ``tile_bytes``. Returns two ``(b,)``
    float64 tensors.
    """
    bsz, h, total, k = coords.shape
    tile_rows = max(1, tile_bytes // (8 * bsz * total))
    q = coords.permute(0, 2, 1, 3).reshape(bsz, total, h * k).double()
    sq = q.pow(2).sum(-1)
    acc = torch.zeros(bsz, dtype=torch.float64, device=coords.device)
    for r0 in range(0, total, tile_rows):
        block = q[:, r0 : r0 + tile_rows]
        d2 = torch.baddbmm(
            sq[:, r0 : r0 + tile_rows, None] + sq[:, None, :], block, q.mT, alpha=-2.0
        )
        acc += d2.clamp_(min=0).sqrt_().sum(dim=(1, 2))
    d = acc / total
    return d, d / max(1, total - 1)


def squared_error(
    coords: torch.Tensor, target: torch.Tensor, tile_bytes: int = 1 << 28
) -> torch.Tensor:
    """Σ (Ŵ − T)² per matrix, ``(b,)`` float64, computed in row tiles."""
    bsz, m, n = target.shape
    rows = rows_per_tile(bsz, coords.shape[1], m, n, tile_bytes)
    acc = torch.zeros(bsz, dtype=torch.float64, device=coords.device)
    for r0 in range(0, m, rows):
        part = reconstruct(coords, m, slice(r0, r0 + rows), tile_bytes)
        acc += sum_squares(part.sub_(target[:, r0 : r0 + rows]))
    return acc


def fidelity(coords: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − ‖Ŵ − T‖_F / ‖T‖_F per matrix (scale-free, so equal to 1 − ‖sŴ − W‖/‖W‖)."""
    norm = sum_squares(target).sqrt()
    return 1.0 - squared_error(coords, target).sqrt() / norm
