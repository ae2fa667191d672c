"""Structure of a planned network: its class from layer widths, and — reading the weights —
degenerate (rank-deficient) matrices and the gain of every residual branch.

Classes (``../shared/papers/003``, feed-forward networks with full-rank matrices), from the
widths ``h0 … hL`` along the main path:

- **bottleneck**: some width ``hB`` has a larger width somewhere before it and after it;
- **augmented**: otherwise, when the widest layer is wider than the input ``h0``;
- **non-augmented**: otherwise (the widths never exceed the input's).

A network with a rank-deficient matrix is **degenerate** whatever its widths; that takes the
weights (``inspect --weights``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from dynaudit.families.base import Family, Layer, LayerPlan, matrix_shape

if TYPE_CHECKING:
    from dynaudit.tensors import Checkpoint

__all__ = [
    "MatrixCheck",
    "StructuralClass",
    "chain_widths",
    "check_matrices",
    "classify",
    "path_widths",
    "rank_tolerance",
]

StructuralClass = Literal["non-augmented", "augmented", "bottleneck"]

# Unit roundoff of each storage dtype: the rounding noise a stored weight carries.
_ROUNDOFF = {"F64": 2.0**-53, "F32": 2.0**-24, "F16": 2.0**-11, "BF16": 2.0**-8}
_EPS32 = 2.0**-23


def classify(widths: Sequence[int]) -> tuple[StructuralClass, str]:
    """The structural class of a path with these widths, and the reason in words."""
    if len(widths) < 2:
        return "non-augmented", "a single width"
    for b in range(1, len(widths) - 1):
        before, after = max(widths[:b]), max(widths[b + 1 :])
        if before > widths[b] < after:
            return "bottleneck", f"width {widths[b]} between wider {before} and {after}"
    widest = max(widths)
    if widest > widths[0]:
        return "augmented", f"widest {widest} > input {widths[0]}"
    return "non-augmented", f"no width exceeds the input's {widths[0]}"


def chain_widths(plan: LayerPlan, checkpoint: Checkpoint) -> list[int]:
    """The plan's main-path widths: as the family states them, or the layers as a chain."""
    return list(plan.widths) if plan.widths else path_widths(plan.layers, checkpoint)


def path_widths(path: Sequence[Layer], checkpoint: Checkpoint) -> list[int]:
    """Widths along layers taken in order (a chain, or a residual branch): the first layer's
    input, then each layer's outputs."""
    if not path:
        return []
    out = [_input_width(path[0], checkpoint)]
    for layer in path:
        g, m, _ = matrix_shape(layer, checkpoint.tensors[layer.source].shape)
        out.append(g * m)
    return out


def _input_width(layer: Layer, checkpoint: Checkpoint) -> int:
    shape = checkpoint.tensors[layer.source].shape
    if layer.kind == "conv":
        return shape[1] * layer.groups
    return matrix_shape(layer, shape)[2]


def rank_tolerance(sigma_max: float, rms: float, m: int, n: int, dtype: str) -> float:
    """Singular values at or below this are zero: the larger of the storage rounding noise's
    expected spectral norm, ``u·rms(W)·(√m + √n)`` (u the storage dtype's unit roundoff), and
    the float32 SVD's own floor ``σ_max·max(m, n)·ε_f32`` (NumPy's ``matrix_rank`` default)."""
    storage = _ROUNDOFF.get(dtype, 2.0**-24) * rms * (math.sqrt(m) + math.sqrt(n))
    return max(storage, sigma_max * max(m, n) * _EPS32)


@dataclass(frozen=True)
class MatrixCheck:
    rank: int  # numerical rank (the smallest over conv groups)
    full_rank: int  # min(m, n)
    spectral_norm: float  # largest singular value (the largest over conv groups)
    tolerance: float


def check_matrices(
    checkpoint: Checkpoint, plan: LayerPlan, family: Family
) -> dict[str, MatrixCheck]:
    """Singular values of every planned layer, one tensor at a time."""
    import torch

    out = {}
    for layer in plan.layers:
        mats = family.matrices(layer, checkpoint.read(layer.source))
        _, m, n = mats.shape
        sigma = torch.linalg.svdvals(mats)  # (g, min(m, n)), float32
        rms = float(mats.square().mean().sqrt())
        top = float(sigma[:, 0].max())
        tol = rank_tolerance(top, rms, m, n, checkpoint.tensors[layer.source].dtype)
        rank = int((sigma > tol).sum(dim=1).min())
        out[layer.name] = MatrixCheck(rank, min(m, n), top, tol)
        del mats, sigma
    return out
