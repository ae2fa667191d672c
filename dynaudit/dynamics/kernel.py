"""Fit dynamical-neuron coordinates to weight matrices (docs/method.md §2–4, §7).

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
is about 25 aten calls (55 before), and the same calls run on CPU and CUDA. Rows
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
    "rows_per_tile",
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
    """Adam steps of a warm refit (docs/gate.md, "Protocol"), scaled like :func:`fit_steps`."""
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


def rows_per_tile(b: int, h: int, m: int, n: int, tile_bytes: int) -> int:
    """Rows of A per tile of a work buffer within ``tile_bytes``: the (b, H, rows, n) distance
    buffer is the only large allocation per tile."""
    return max(1, min(m, tile_bytes // max(1, 4 * b * h * n)))


class _Tile(NamedTuple):
    """Views of one row tile of A into the fit's buffers, made once per fit: a step then runs
    only the arithmetic (the ~40 views a step would otherwise make were a third of a small
    matrix's step)."""

    left: torch.Tensor  # (bH, k + 2, t): A's augmented rows (−2a, |a|², 1)
    left_t: torch.Tensor  # (bH, t, k + 2): the same, transposed
    dist: torch.Tensor  # (bH, t, n): distances, then σ·G in place
    pieces: torch.Tensor  # (b, H, t, n): the same memory
    negative: torch.Tensor  # (b, H/2, t, n): the pieces with σ = −1
    positive: torch.Tensor  # (b, H/2, t, n): those with σ = +1
    flat: torch.Tensor  # (b, H, t·n): the same memory, for the signed sum
    signed: torch.Tensor  # (b, 1, t·n): Σ_h σ_h E_h, then the residual r
    resid: torch.Tensor  # (b, 1, t, n): r, the same memory
    minus: torch.Tensor  # (b, 1, t, n): −r
    target: torch.Tensor  # (b, t, n)
    g_t: torch.Tensor  # (bH, n, t): Gᵀ
    gb: torch.Tensor  # (bH, k + 1, t): ((G·B)ᵀ; rowsum G)
    gb_sum: torch.Tensor  # (b, H, 1, t)
    gb_dot: torch.Tensor  # (b, H, k, t)
    grad: torch.Tensor  # (b, H, k, t): this tile's rows of ∇A
    coords: torch.Tensor  # (b, H, k, t): this tile's rows of A


class _Work:
    """Buffers of one fit and views into them, made once rather than per tile and step (glibc
    maps blocks of 16 MiB and more afresh, so a buffer allocated per step was faulted in again
    at every step: docs/performance.md, "allocation"). The fit works on coordinates laid out
    ``(b, H, k, N)`` (one row per dimension): both gradient products then read their operands
    in the orientation BLAS runs fastest, and each piece's augmented coordinates are one
    ``(k + 2, N)`` matrix whose constant rows are written once."""

    def __init__(self, coords: torch.Tensor, target: torch.Tensor, tile_bytes: int) -> None:
        bsz, h, k, total = coords.shape
        m = target.shape[1]
        n = total - m
        half = h // 2
        self.coords = coords
        self.rows = rows_per_tile(bsz, h, m, n, tile_bytes)

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=coords.dtype, device=coords.device)

        self.aug = empty(bsz, h, k + 2, total)
        self.aug[:, :, k + 1, :m] = 1.0
        self.aug[:, :, k, m:] = 1.0
        self.sigma = torch.ones(bsz, 1, h, dtype=coords.dtype, device=coords.device)
        self.sigma[..., :half] = -1.0
        self.grad = empty(bsz, h, k, total)
        self.grad_b = empty(bsz, h, k + 2, n)
        self.norms = empty(bsz, h, total)
        # One distance, residual and G·B buffer, shared by the row tiles in turn.
        shared = (
            empty(bsz * h * self.rows * n),
            empty(bsz * 2 * self.rows * n),
            empty(bsz * h * (k + 1) * self.rows),
        )
        flat = self.aug.view(bsz * h, k + 2, total)
        self.right = flat[..., m:]  # (bH, k + 2, n): B's rows (b, 1, |b|²)
        self.right_one = self.right[:, : k + 1]
        self.tiles = [self._tile(r0, flat, target, shared) for r0 in range(0, m, self.rows)]
        self.a_rows, self.b_rows = self.aug[:, :, :k, :m], self.aug[:, :, :k, m:]
        self.a_norms, self.b_norms = self.aug[:, :, k, :m], self.aug[:, :, k + 1, m:]
        self.a, self.b = coords[..., :m], coords[..., m:]
        self.norms_a, self.norms_b = self.norms[..., :m], self.norms[..., m:]
        self.grad_b_flat = self.grad_b.view(bsz * h, k + 2, n)
        self.colsum, self.gta = self.grad_b[:, :, k + 1 :], self.grad_b[:, :, :k]
        self.grad_tail = self.grad[..., m:]
        self.scale = 2.0 / (m * n)

    def _tile(
        self,
        r0: int,
        flat: torch.Tensor,
        target: torch.Tensor,
        shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> _Tile:
        """The views of the row tile that starts at row ``r0`` of A into the fit's buffers."""
        bsz, h, k, total = self.coords.shape
        m = target.shape[1]
        n = total - m
        t = min(m, r0 + self.rows) - r0
        dist, resid, gb = shared
        g = dist[: bsz * h * t * n].view(bsz * h, t, n)
        pieces = g.view(bsz, h, t, n)
        two = resid[: bsz * 2 * t * n].view(bsz, 2, t * n)
        tile_gb = gb[: bsz * h * (k + 1) * t].view(bsz * h, k + 1, t)
        by_piece = tile_gb.view(bsz, h, k + 1, t)
        left = flat[..., r0 : r0 + t]
        return _Tile(
            left=left,
            left_t=left.mT,
            dist=g,
            pieces=pieces,
            negative=pieces[:, : h // 2],
            positive=pieces[:, h // 2 :],
            flat=pieces.view(bsz, h, t * n),
            signed=two[:, 1:],
            resid=two[:, 1:].view(bsz, 1, t, n),
            minus=two[:, :1].view(bsz, 1, t, n),
            target=target[:, r0 : r0 + t],
            g_t=g.mT,
            gb=tile_gb,
            gb_sum=by_piece[:, :, k:],
            gb_dot=by_piece[:, :, :k],
            grad=self.grad[..., r0 : r0 + t],
            coords=self.coords[..., r0 : r0 + t],
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
    step = rows_per_tile(bsz, h, a.shape[2], b.shape[2], tile_bytes)
    parts = [
        _signed_sum(_distances(_augment(a[:, :, r0 : r0 + step], left=True), b_aug, eps2))
        for r0 in range(0, a.shape[2], step)
    ]
    return torch.cat(parts, dim=1)


def _gradient(work: _Work, eps2: torch.Tensor, mu: float) -> torch.Tensor:
    """∂L/∂coords for L = mean((Ŵ − T)²) + μ·mean_i ‖q_i‖², for the coordinates (laid out
    ``(b, H, k, N)``) and target ``work`` was made for; returns ``work.grad``.

    One pass per row tile of A: the distances E (one product of augmented coordinates), the
    residual r = Σ_h σ_h E_h − T (one product with the signs), σ_h·G_h = σ_h·r ⊘ E_h in place,
    then ∇A's tile and ∇B's share of it, each one product."""
    torch.mul(work.a, -2.0, out=work.a_rows)
    work.b_rows.copy_(work.b)
    torch.sum(work.coords.square(), dim=2, out=work.norms)  # (b, H, N)
    work.a_norms.copy_(work.norms_a)
    work.b_norms.copy_(work.norms_b)
    for i, tile in enumerate(work.tiles):
        torch.bmm(tile.left_t, work.right, out=tile.dist)
        tile.pieces.clamp_(min=eps2).sqrt_()
        torch.bmm(work.sigma, tile.flat, out=tile.signed)
        tile.resid.sub_(tile.target.unsqueeze(1)).mul_(work.scale)
        torch.neg(tile.resid, out=tile.minus)
        # σ_h·G_h = σ_h·r ⊘ E_h, over the distance buffer in place.
        torch.div(tile.minus, tile.negative, out=tile.negative)
        torch.div(tile.resid, tile.positive, out=tile.positive)
        # ∇A = rowsum(G)·A − G·B: the product (B; 1)ᵀ·Gᵀ gives (G·B)ᵀ and rowsum(G) at once.
        torch.bmm(work.right_one, tile.g_t, out=tile.gb)
        torch.mul(tile.gb_sum, tile.coords, out=tile.grad)
        tile.grad.sub_(tile.gb_dot)
        # ∇B = colsum(G)·B − Gᵀ·A: (−2A; |a|²; 1)·G gives −2·(Gᵀ·A)ᵀ and colsum(G).
        if i == 0:
            torch.bmm(tile.left, tile.dist, out=work.grad_b_flat)
        else:
            work.grad_b_flat.baddbmm_(tile.left, tile.dist)
    torch.mul(work.colsum, work.b, out=work.grad_tail)
    work.grad_tail.add_(work.gta, alpha=0.5)
    total = work.coords.shape[-1]
    return work.grad.add_(work.coords, alpha=2.0 * mu / total)


def fit_coordinates(
    target: torch.Tensor,
    settings: FitSettings,
    init: torch.Tensor,
    *,
    steps: int | None = None,
    lr: float | None = None,
) -> torch.Tensor:
    """Minimise the objective of docs/method.md §4 from ``init`` with Adam and a cosine schedule.

    ``target``: ``(b, m, n)`` float32, W/s. ``init``: ``(b, H, m + n, k)``. ``steps``
    defaults to :func:`fit_steps`. Returns the fitted coordinates (a new tensor).
    Deterministic for a given device and thread count.
    """
    bsz, m, n = target.shape
    steps = fit_steps(settings, m, n) if steps is None else steps
    lr = settings.lr if lr is None else lr
    size = rms(target).float().view(bsz, 1, 1, 1)
    eps2 = (size * _EPS) ** 2
    coords = init.transpose(2, 3).contiguous()  # the fit's layout, (b, H, k, N)
    avg = torch.zeros_like(coords)
    avg_sq = torch.zeros_like(coords)
    step_size = torch.empty_like(coords)
    work = _Work(coords, target, work_bytes(settings, bsz, m, n))
    for step in range(1, steps + 1):
        grad = _gradient(work, eps2, settings.mu)
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
