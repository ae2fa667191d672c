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

import itertools
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from dynaudit.config import FitSettings
from dynaudit.dynamics.blocks import fit_flop
from dynaudit.engine.plan import family_info
from dynaudit.families.base import (
    Detection,
    Family,
    Layer,
    LayerPlan,
    matrix_shape,
    read_matrices,
)
from dynaudit.schema import (
    BranchGain,
    InspectedLayer,
    Inspection,
    PassThroughNode,
    SkippedLayer,
    StructuralClass,
    Structure,
)

if TYPE_CHECKING:
    import torch

    from dynaudit.tensors import Checkpoint

__all__ = [
    "RANK_RULE",
    "MatrixCheck",
    "chain_widths",
    "check_matrices",
    "check_matrix",
    "classify",
    "inspect_checkpoint",
    "path_widths",
    "rank_tolerance",
    "spectral_norm",
]

# Unit roundoff of each storage dtype: the rounding noise a stored weight carries.
# Unit roundoff of each storage dtype: 2^-(mantissa bits + 1). FP8 weights are dequantized with
# their scales, but the values carry FP8's rounding noise all the same.
_ROUNDOFF = {
    "F64": 2.0**-53,
    "F32": 2.0**-24,
    "F16": 2.0**-11,
    "BF16": 2.0**-8,
    "F8_E4M3": 2.0**-4,
    "F8_E4M3FNUZ": 2.0**-4,
    "F8_E5M2": 2.0**-3,
    "F8_E5M2FNUZ": 2.0**-3,
}
_EPS32 = 2.0**-23


def classify(widths: Sequence[int]) -> tuple[StructuralClass, str]:
    """The structural class of a path with these widths, and the reason in words."""
    if len(widths) < 2:
        return "non-augmented", "a single width"
    # The widest width before and after each position, in one pass each way (a slice's max
    # per position was quadratic in the number of layers).
    before = list(itertools.accumulate(widths, max))
    after = list(itertools.accumulate(reversed(widths), max))[::-1]
    for b in range(1, len(widths) - 1):
        if before[b - 1] > widths[b] < after[b + 1]:
            return (
                "bottleneck",
                f"width {widths[b]} between wider {before[b - 1]} and {after[b + 1]}",
            )
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
    rank: int | None  # numerical rank (the smallest over conv groups); None: not computed
    full_rank: int  # min(m, n)
    spectral_norm: float  # largest singular value (the largest over conv groups)
    tolerance: float | None

    @property
    def degenerate(self) -> bool:
        """Rank-deficient (False when the rank was not computed)."""
        return self.rank is not None and self.rank < self.full_rank


# Largest matrix whose rank is computed, as the work of one singular-value decomposition,
# m·n·min(m, n): 4096³, 3.5 s on one core. The values-only SVD is cubic and one LAPACK call:
# an 8192² matrix takes 30 s on one core, and took more than ten minutes with its threads
# competing for busy cores (issue 18). Above the limit the rank is "not computed" (null)
# rather than guessed: a rank counts the singular values above a tolerance, no cheap estimate
# counts them exactly, and a false "degenerate" (or a missed one) misleads more than no answer.
RANK_WORK = 4096**3
# Above the limit, the spectral norm is the Rayleigh–Ritz value of W on a block Krylov space
# of WᵀW (KRYLOV_BLOCK seeded start vectors, KRYLOV_STEPS products): a lower bound, equal to
# σ_max to float32 rounding (relative error below 1e-5) on Gaussian matrices from 5 × 3 to
# 8192², whose top singular values crowd together (the hard case), in about 3 s of one core
# for 8192².
KRYLOV_BLOCK, KRYLOV_STEPS = 8, 24
# Matrices above this many entries have their SVD run in a worker thread: Python handles
# Ctrl-C and SIGTERM only between bytecodes of the main thread, never inside one LAPACK call.
_WORKER_ENTRIES = 1 << 18


def check_matrices(
    checkpoint: Checkpoint, plan: LayerPlan, family: Family, rank_work: int | None = None
) -> dict[str, MatrixCheck]:
    """Singular values of every planned layer, one tensor at a time: the rank and spectral
    norm of each matrix whose ``m·n·min(m, n)`` is at most ``rank_work`` (default
    :data:`RANK_WORK`), an estimated spectral norm and no rank above it."""
    rank_work = RANK_WORK if rank_work is None else rank_work
    out = {}
    for layer in plan.layers:
        mats = read_matrices(family, layer, checkpoint)
        out[layer.name] = check_matrix(mats, checkpoint.tensors[layer.source].dtype, rank_work)
        del mats
    return out


def check_matrix(mats: torch.Tensor, dtype: str, rank_work: int = RANK_WORK) -> MatrixCheck:
    """Rank and spectral norm of ``(g, m, n)`` float32 matrices stored as ``dtype``."""
    import torch

    _, m, n = mats.shape
    full = min(m, n)
    if full == 0:
        return MatrixCheck(0, 0, 0.0, 0.0)
    if m * n * full > rank_work:
        return MatrixCheck(None, full, max(spectral_norm(w) for w in mats), None)
    sigma = _interruptible(torch.linalg.svdvals, mats, big=m * n > _WORKER_ENTRIES)
    rms = float(mats.square().mean().sqrt())
    top = float(sigma[:, 0].max())
    tol = rank_tolerance(top, rms, m, n, dtype)
    rank = int((sigma > tol).sum(dim=1).min())
    return MatrixCheck(rank, full, top, tol)


def spectral_norm(w: torch.Tensor, block: int = KRYLOV_BLOCK, steps: int = KRYLOV_STEPS) -> float:
    """σ_max of one matrix, estimated from below on a seeded block Krylov space of WᵀW (or
    WWᵀ, the smaller side). Each step is two matrix products, so Ctrl-C is handled between
    steps."""
    import torch

    w = w if w.shape[0] >= w.shape[1] else w.mT  # work on the smaller side, n
    n = w.shape[1]
    gen = torch.Generator().manual_seed(0)
    basis: list[torch.Tensor] = []
    v = torch.linalg.qr(torch.randn(n, min(block, n), generator=gen)).Q
    for _ in range(min(steps, max(1, n // max(1, block)))):
        basis.append(v)
        v = w.mT @ (w @ v)
        for q in basis:  # twice, against the loss of orthogonality in float32
            v = v - q @ (q.mT @ v)
        for q in basis:
            v = v - q @ (q.mT @ v)
        v = torch.linalg.qr(v).Q
    space = torch.cat(basis, dim=1)  # (n, block·steps), orthonormal columns
    return float(torch.linalg.svdvals(w @ space)[0])


_T = TypeVar("_T")


def _interruptible(call: Callable[..., _T], *args: Any, big: bool) -> _T:
    """``call(*args)`` in a daemon thread when ``big``, the main thread waiting in 0.1 s
    slices so that a signal stops ``inspect`` at once; the abandoned call ends with the
    process (torch releases the GIL inside LAPACK, so the wait loop keeps running)."""
    if not big or threading.current_thread() is not threading.main_thread():
        return call(*args)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call(*args)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    worker = threading.Thread(target=run, name="dynaudit-svd", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if "error" in box:
        raise box["error"]
    value: _T = box["value"]
    return value


RANK_RULE = (
    "rank = singular values above max(u·rms(W)·(√m+√n), σ_max·max(m,n)·ε_f32), u the storage "
    "dtype's unit roundoff; not computed when m·n·min(m,n) > 4096³ (the spectral norm is then "
    "a block-Krylov estimate)"
)


def inspect_checkpoint(
    checkpoint: Checkpoint,
    uri: str,
    detection: Detection,
    fit: FitSettings,
    *,
    weights: bool = False,
    rank_work: int | None = None,
) -> Inspection:
    """What ``dynaudit inspect`` reports of an opened checkpoint: its layer graph, shapes,
    structural class and fit cost from the headers, and with ``weights`` each layer's rank and
    spectral norm, the degenerate layers and the gain of every residual branch. Pass-through
    nodes (depthwise convolutions kept in the graph) are listed with what feeds them and,
    with ``weights``, the spectral norm they bring to a branch gain; they are never ranked."""
    plan = detection.family.plan(checkpoint)
    checks = check_matrices(checkpoint, plan, detection.family, rank_work) if weights else {}
    norms = {name: check.spectral_norm for name, check in checks.items()}
    if weights:
        norms.update(_node_norms(checkpoint, plan, detection.family))
    layers = _inspected_layers(checkpoint, plan, fit, checks)
    return Inspection(
        uri=uri,
        files=[str(f) for f in checkpoint.files],
        selection=checkpoint.selection_note,
        family=family_info(detection, plan),
        layers=layers,
        skipped=[SkippedLayer(name=s.name, skipped=s.reason) for s in plan.skipped],
        pass_through=_pass_through(checkpoint, plan, norms),
        structure=_structure(checkpoint, plan, checks if weights else None),
        gains=_branch_gains(plan, norms) if weights else [],
        tensors=len(checkpoint.tensors),
        bytes=checkpoint.total_bytes,
        parameters=sum(info.numel for info in checkpoint.tensors.values()),
        gflop=sum(layer.gflop for layer in layers),
    )


def _inspected_layers(
    checkpoint: Checkpoint, plan: LayerPlan, fit: FitSettings, checks: dict[str, MatrixCheck]
) -> list[InspectedLayer]:
    fed_by = plan.fed_by()
    layers = []
    for layer in plan.layers:
        info = checkpoint.tensors[layer.source]
        g, m, n = matrix_shape(layer, info.shape)
        check = checks.get(layer.name)
        layers.append(
            InspectedLayer(
                name=layer.name,
                type=layer.type,
                depth=layer.depth,
                expert=layer.expert,
                shape=[m, n] if layer.rows or layer.index is not None else list(info.shape),
                dtype=info.dtype,
                matrices=g,
                neurons=m + n,
                gflop=g * fit_flop(fit, m, n) * fit.seeds / 1e9,
                inputs=fed_by[layer.name],
                reads_input=layer.name in plan.reads_input,
                rank=check.rank if check else None,
                full_rank=min(m, n),
                spectral_norm=check.spectral_norm if check else None,
            )
        )
    return layers


def _node_norms(checkpoint: Checkpoint, plan: LayerPlan, family: Family) -> dict[str, float]:
    """The spectral norm of each pass-through node's matrices (the largest over groups: for a
    depthwise convolution, the largest norm of one channel's kernel)."""
    out = {}
    for node in plan.pass_through:
        info = checkpoint.tensors[node.source]
        mats = read_matrices(family, node, checkpoint)
        out[node.name] = check_matrix(mats, info.dtype).spectral_norm
    return out


def _pass_through(
    checkpoint: Checkpoint, plan: LayerPlan, norms: dict[str, float]
) -> list[PassThroughNode]:
    fed_by = plan.fed_by()
    reasons = {skip.name: skip.reason for skip in plan.skipped}
    return [
        PassThroughNode(
            name=node.name,
            type=node.type,
            depth=node.depth,
            shape=list(checkpoint.tensors[node.source].shape),
            dtype=checkpoint.tensors[node.source].dtype,
            inputs=fed_by[node.name],
            reads_input=node.name in plan.reads_input,
            skipped=reasons.get(node.source, ""),
            spectral_norm=norms.get(node.name),
        )
        for node in plan.pass_through
    ]


def _structure(
    checkpoint: Checkpoint, plan: LayerPlan, checks: dict[str, MatrixCheck] | None
) -> Structure:
    """The main path's class and widths, the residual branches' classes and, when the weights
    were read (``checks``), the degenerate and unranked layers."""
    widths = chain_widths(plan, checkpoint)
    kind, reason = classify(widths)
    by_name = {layer.name: layer for layer in (*plan.layers, *plan.pass_through)}
    branches: dict[str, int] = {}
    for block in plan.blocks:
        for names in block.branches.values():
            branch_kind, _ = classify(path_widths([by_name[n] for n in names], checkpoint))
            branches[branch_kind] = branches.get(branch_kind, 0) + 1
    return Structure(
        structural_class=kind,
        widths=widths,
        reason=reason,
        branches=branches,
        degenerate=None if checks is None else [n for n, c in checks.items() if c.degenerate],
        unranked=None if checks is None else [n for n, c in checks.items() if c.rank is None],
        rank_rule=None if checks is None else RANK_RULE,
    )


def _branch_gains(plan: LayerPlan, norms: dict[str, float]) -> list[BranchGain]:
    """The product of the spectral norms along each branch, pass-through nodes included."""
    return [
        BranchGain(
            block=block.name,
            branch=branch,
            layers=list(names),
            gain=math.prod(norms[name] for name in names),
            note=block.note,
        )
        for block in plan.blocks
        for branch, names in block.branches.items()
    ]
