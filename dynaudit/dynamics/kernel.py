"""Fit dynamical-neuron coordinates to weight matrices (SPEC §4, items 2, 3, 5, 6).

Coordinates of a batch of ``b`` same-shape matrices ``T`` (m × n, already divided by the
reference scale) live in one tensor ``P`` of shape ``(b, H, m + n, k)``: H pieces of k dims
for the m output neurons followed by the n input neurons. The reconstruction is

    Ŵ[i, j] = Σ_h σ_h ‖A_h[i] − B_h[j]‖,   A = P[:, :, :m], B = P[:, :, m:]

with σ_h = −1 for the first H/2 pieces and +1 for the rest. The paper alternates the signs,
(−1)^h; grouping them is the same function with the pieces relabelled, and lets the kernel sum
each half in one contiguous reduction.

The gradient is written by hand (autograd is ~3× slower here): with ``G = ∂L/∂Ŵ ⊘ E_h``,
``∇A_h = σ_h (rowsum(G)·A_h − G·B_h)`` and ``∇B_h = σ_h (colsum(G)ᵀ·B_h − Gᵀ·A_h)``. The fit
keeps each piece's coordinates as rows, ``(k, N)``, augmented to ``(k + 2, N)``: A's columns
``(−2a, |a|², 1)``, B's ``(b, 1, |b|²)``. One product of the two gives the squared distances,
one of B's first k + 1 rows with Gᵀ gives ``G·B`` and ``rowsum(G)``, and one of A's rows with
G gives ``−2·Gᵀ·A`` and ``colsum(G)``; the signed sum over pieces is a product with σ. A step
is about 25 aten calls (55 before protocol v3), and the same calls run on CPU and CUDA. Rows
of A are processed in tiles so that the work buffer stays under ``tile_bytes``.

Everything scales with ``r = RMS(T)``: the initial spread, the learning rate and the
clamping epsilon. Since the objective is homogeneous of degree 2 in (coordinates, target), the
whole trajectory is then exactly equivariant: fitting c·T yields c·P, so 𝒟(c·W) = c·𝒟(W).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from dynaudit.config import FitSettings

__all__ = [
    "fit_coordinates",
    "fit_steps",
    "init_coordinates",
    "matrix_seed",
    "reconstruct",
    "rms",
    "sum_squares",
    "warm_steps",
    "work_bytes",
]

_EPS = 1e-4  # smallest piece distance, in units of RMS(T); keeps 1/E finite
# β2 = 0.9 (not 0.999): the second moment must forget the early large gradients, or the
# slow μ-driven phase at the end of a fit crawls (docs/method.md, "optimiser").
_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.9, 1e-8


def fit_steps(settings: FitSettings, m: int, n: int) -> int:
    """Adam steps for an m × n matrix: ``settings.steps``, times up to 8 when the layer has
    more coordinates than entries to reproduce.

    With ρ = q_dim·(m + n)/(m·n) > 1/2 the fit is over-parameterised: the weights are matched
    early and what remains is a slow, μ-driven drift along a flat valley of exact fits, so a
    fixed budget would leave 𝒟 depending on the budget. Such matrices are small, so the extra
    steps cost at most what a matrix with ρ = 1/2 costs (docs/method.md, "step budget").
    """
    return settings.steps * _budget_factor(settings, m, n)


def warm_steps(settings: FitSettings, m: int, n: int) -> int:
    """Adam steps of a warm refit (SPEC §4.9), scaled like :func:`fit_steps`."""
    return settings.warm_steps * _budget_factor(settings, m, n)


def _budget_factor(settings: FitSettings, m: int, n: int) -> int:
    rho = settings.q_dim * (m + n) / (m * n)
    return min(8, max(1, round(2 * rho)))


def sum_squares(x: torch.Tensor) -> torch.Tensor:
    """Σ x² over the last two dims, per leading index, ``(b,)`` float64; in row chunks so that
    the float64 temporaries stay a few MiB however large the matrix."""
    x = x.reshape(-1, *x.shape[-2:]) if x.dim() >= 2 else x.reshape(1, 1, -1)
    rows = max(1, (1 << 20) // max(1, x.shape[0] * x.shape[2]))
    acc = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for r0 in range(0, x.shape[1], rows):
        acc += x[:, r0 : r0 + rows].double().square().sum(dim=(1, 2))
    return acc


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over the last two dims, ``(b,)`` float64."""
    return (sum_squares(x) / (x.shape[-1] * x.shape[-2])).sqrt()


def matrix_seed(seed: int, name: str, group: int = 0) -> int:
    """A seed for one matrix that does not depend on batching, ordering or sharding."""
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{group}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_coordinates(
    m: int, n: int, settings: FitSettings, seeds: Sequence[int], rms: torch.Tensor
) -> torch.Tensor:
    """Seeded Gaussian start, ``(b, H, m + n, k)``, spread ∝ RMS(T)/√k. Generated on the CPU
    so that the start is the same on every device."""
    h, k = settings.pieces, settings.piece_dim
    out = torch.empty(len(seeds), h, m + n, k)
    for i, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(seed)
        out[i] = torch.randn(h, m + n, k, generator=gen)
    out *= rms.cpu().view(-1, 1, 1, 1) / math.sqrt(k)
    return out.to(rms.device)


_MIN_WORK_BYTES = 16 * 1024 * 1024


def work_bytes(settings: FitSettings, b: int, m: int, n: int) -> int:
    """Memory for the fit's distance buffer: at most the batch's own float32 size (but at
    least 16 MiB, below which tiling only adds overhead), and never above ``tile_bytes``.
    Large matrices are then fitted in about H row tiles, keeping peak memory near 2–3× the
    matrix instead of H×."""
    return min(settings.tile_bytes, max(_MIN_WORK_BYTES, 4 * b * m * n))


def _rows_per_tile(b: int, h: int, m: int, n: int, tile_bytes: int) -> int:
    # The (b, H, rows, n) distance buffer is the only large allocation per tile.
    return max(1, min(m, tile_bytes // max(1, 4 * b * h * n)))


class _Work(NamedTuple):
    """Buffers of one fit, allocated once rather than per tile and step (glibc maps blocks of
    16 MiB and more afresh, so a buffer allocated per step was faulted in again at every step:
    docs/performance.md, "allocation"). The fit works on coordinates laid out ``(b, H, k, N)``
    (one row per dimension): both gradient products then read their operands in the
    orientation BLAS runs fastest, and each piece's augmented coordinates are one
    ``(k + 2, N)`` matrix whose constant rows are written once."""

    rows: int  # rows of A per tile
    aug: torch.Tensor  # (b, H, k + 2, N): A's columns (−2a, |a|², 1), B's (b, 1, |b|²)
    dist: torch.Tensor  # flat, (b, H, rows, n): distances, then σ·G in place
    resid: torch.Tensor  # flat, (b, 2, rows, n): the residual r and −r
    sigma: torch.Tensor  # (b, 1, H): the signs σ_h, for the signed sum as one product
    grad: torch.Tensor  # (b, H, k, N)
    grad_b: torch.Tensor  # (b, H, k + 2, n): Gᵀ·(−2A, |a|², 1) summed over tiles

    @classmethod
    def allocate(cls, b: int, h: int, k: int, m: int, n: int, tile_bytes: int, like: torch.Tensor
    ) -> _Work:  # fmt: skip
        rows = _rows_per_tile(b, h, m, n, tile_bytes)

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=like.dtype, device=like.device)

        aug = empty(b, h, k + 2, m + n)
        aug[:, :, k + 1, :m] = 1.0
        aug[:, :, k, m:] = 1.0
        sigma = torch.ones(b, 1, h, dtype=like.dtype, device=like.device)
        sigma[..., : h // 2] = -1.0
        return cls(
            rows,
            aug,
            empty(b * h * rows * n),
            empty(b * 2 * rows * n),
            sigma,
            empty(b, h, k, m + n),
            empty(b, h, k + 2, n),
        )


def _augment(x: torch.Tensor, *, left: bool) -> torch.Tensor:
    """Rows x → (−2x, |x|², 1) on the left side, (x, 1, |x|²) on the right: their inner
    product is the squared distance."""
    sq = x.pow(2).sum(-1, keepdim=True)
    one = torch.ones_like(sq)
    return torch.cat([x * -2.0, sq, one] if left else [x, one, sq], dim=-1)


def _distances(
    a_aug: torch.Tensor, b_aug: torch.Tensor, eps2: torch.Tensor, work: torch.Tensor | None = None
) -> torch.Tensor:
    """Piece distances E = ‖a − b‖ for augmented rows: (b, H, t, n), written into the front of
    the flat buffer ``work`` when one is given."""
    bsz, h, t, width = a_aug.shape
    n = b_aug.shape[2]
    out = None if work is None else work[: bsz * h * t * n].view(bsz * h, t, n)
    sq = torch.bmm(a_aug.reshape(bsz * h, t, width), b_aug.reshape(bsz * h, n, width).mT, out=out)
    sq = sq.view(bsz, h, t, n)
    return sq.clamp_(min=eps2).sqrt_()  # eps2 broadcasts per matrix: (b, 1, 1, 1)


def _signed_sum(dist: torch.Tensor) -> torch.Tensor:
    half = dist.shape[1] // 2
    return dist[:, half:].sum(1).sub_(dist[:, :half].sum(1))


def reconstruct(
    coords: torch.Tensor, m: int, rows: slice | None = None, tile_bytes: int = 1 << 28
) -> torch.Tensor:
    """Ŵ for fitted coordinates ``(b, H, m + n, k)`` (optionally only some rows)."""
    bsz, h, _, _ = coords.shape
    a, b = coords[:, :, :m], coords[:, :, m:]
    if rows is not None:
        a = a[:, :, rows]
    eps2 = torch.zeros(bsz, 1, 1, 1, device=coords.device, dtype=coords.dtype)
    b_aug = _augment(b, left=False)
    step = _rows_per_tile(bsz, h, a.shape[2], b.shape[2], tile_bytes)
    parts = [
        _signed_sum(_distances(_augment(a[:, :, r0 : r0 + step], left=True), b_aug, eps2))
        for r0 in range(0, a.shape[2], step)
    ]
    return torch.cat(parts, dim=1)


def _gradient(
    coords: torch.Tensor,
    target: torch.Tensor,
    eps2: torch.Tensor,
    mu: float,
    work: _Work,
) -> torch.Tensor:
    """∂L/∂coords for L = mean((Ŵ − T)²) + μ·mean_i ‖q_i‖², coordinates laid out
    ``(b, H, k, N)`` (the fit's layout, see :class:`_Work`); returns ``work.grad``.

    One pass per row tile of A: the distances E (one product of augmented coordinates), the
    residual r = Σ_h σ_h E_h − T (one product with the signs), σ_h·G_h = σ_h·r ⊘ E_h in place,
    then ∇A's tile and ∇B's share of it, each one product."""
    bsz, h, k, total = coords.shape
    m = target.shape[1]
    n = total - m
    half = h // 2
    aug, grad = work.aug, work.grad
    torch.mul(coords[..., :m], -2.0, out=aug[:, :, :k, :m])
    aug[:, :, :k, m:] = coords[..., m:]
    norms = coords.square().sum(dim=2)  # (b, H, N)
    aug[:, :, k, :m] = norms[..., :m]
    aug[:, :, k + 1, m:] = norms[..., m:]
    flat = aug.view(bsz * h, k + 2, total)
    right = flat[..., m:]  # (bH, k + 2, n): rows (b, 1, |b|²)
    grad_b = work.grad_b.view(bsz * h, k + 2, n)
    for r0 in range(0, m, work.rows):
        r1 = min(m, r0 + work.rows)
        t = r1 - r0
        left = flat[..., r0:r1]  # (bH, k + 2, t): rows (−2a, |a|², 1)
        dist = torch.bmm(left.mT, right, out=work.dist[: bsz * h * t * n].view(bsz * h, t, n))
        dist = dist.view(bsz, h, t, n).clamp_(min=eps2).sqrt_()
        resid = work.resid[: bsz * 2 * t * n].view(bsz, 2, t * n)
        torch.bmm(work.sigma, dist.view(bsz, h, t * n), out=resid[:, 1:])
        pos = resid[:, 1].view(bsz, t, n).sub_(target[:, r0:r1]).mul_(2.0 / (m * n))
        neg = torch.neg(pos, out=resid[:, 0].view(bsz, t, n))
        # σ_h·G_h = σ_h·r ⊘ E_h, over the distance buffer in place.
        torch.div(neg.unsqueeze(1), dist[:, :half], out=dist[:, :half])
        torch.div(pos.unsqueeze(1), dist[:, half:], out=dist[:, half:])
        g = dist.view(bsz * h, t, n)
        # ∇A = rowsum(G)·A − G·B: the product (B; 1)ᵀ·Gᵀ gives (G·B)ᵀ and rowsum(G) at once.
        gb = torch.bmm(right[:, : k + 1], g.mT).view(bsz, h, k + 1, t)
        tile = grad[..., r0:r1]
        torch.mul(gb[:, :, k:], coords[..., r0:r1], out=tile)
        tile.sub_(gb[:, :, :k])
        # ∇B = colsum(G)·B − Gᵀ·A: (−2A; |a|²; 1)·G gives −2·(Gᵀ·A)ᵀ and colsum(G).
        if r0 == 0:
            torch.bmm(left, g, out=grad_b)
        else:
            grad_b.baddbmm_(left, g)
    acc = work.grad_b
    tail = grad[..., m:]
    torch.mul(acc[:, :, k + 1 :], coords[..., m:], out=tail)
    tail.add_(acc[:, :, :k], alpha=0.5)
    return grad.add_(coords, alpha=2.0 * mu / total)


def fit_coordinates(
    target: torch.Tensor,
    settings: FitSettings,
    init: torch.Tensor,
    *,
    steps: int | None = None,
    lr: float | None = None,
) -> torch.Tensor:
    """Minimise the SPEC §4.5 objective from ``init`` with Adam and a cosine schedule.

    ``target``: ``(b, m, n)`` float32, W/s. ``init``: ``(b, H, m + n, k)``. ``steps``
    defaults to :func:`fit_steps`. Returns the fitted coordinates (a new tensor).
    Deterministic for a given device and thread count.
    """
    bsz, m, n = target.shape
    steps = fit_steps(settings, m, n) if steps is None else steps
    lr = settings.lr if lr is None else lr
    size = rms(target).float().view(bsz, 1, 1, 1)
    eps2 = (size * _EPS) ** 2
    h, k = settings.pieces, settings.piece_dim
    coords = init.transpose(2, 3).contiguous()  # the fit's layout, (b, H, k, N)
    avg = torch.zeros_like(coords)
    avg_sq = torch.zeros_like(coords)
    step_size = torch.empty_like(coords)
    work = _Work.allocate(bsz, h, k, m, n, work_bytes(settings, bsz, m, n), target)
    for step in range(1, steps + 1):
        grad = _gradient(coords, target, eps2, settings.mu, work)
        avg.lerp_(grad, 1 - _BETA1)
        avg_sq.mul_(_BETA2).addcmul_(grad, grad, value=1 - _BETA2)
        rate = lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / steps))
        bias1 = 1 - _BETA1**step
        bias2 = math.sqrt(1 - _BETA2**step)
        # Adam's step, with the learning rate and epsilon in units of RMS(T) (equivariance):
        # Δ = −rate·size·m̂ / (√v̂ + size·ε) = −rate·m̂ / (√v̂/size + ε), with both bias
        # corrections taken out of the big tensors and into the scalars.
        denom = torch.sqrt(avg_sq, out=step_size).div_(size).add_(_ADAM_EPS * bias2)
        coords.addcdiv_(avg, denom, value=-rate * bias2 / bias1)
    return coords.transpose(2, 3).contiguous()
