"""Measure a planned checkpoint layer by layer: read, scale, fit, read off the metrics.

Tensors are streamed: only the layers of the batch being fitted are in memory. Layers whose
matrices share a shape are fitted together (one batched kernel call) while the batch's work
buffer stays within ``settings.tile_bytes``; batching never changes a layer's numbers, because
every matrix has its own seed (:func:`~dynaudit.dynamics.kernel.matrix_seed`).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from dynaudit.baseline_store import CoordsSink
from dynaudit.config import FitSettings
from dynaudit.distributed import Ranks, assign
from dynaudit.dynamics import discrepancy, fit_coordinates, init_coordinates
from dynaudit.dynamics.blocks import block_seed, block_shape, fit_flop, take_blocks
from dynaudit.dynamics.kernel import fit_steps, matrix_seed, rms, sum_squares, work_bytes
from dynaudit.dynamics.metrics import squared_error
from dynaudit.engine.plan import Job, Planned, layer_groups
from dynaudit.families import Family, Layer, LayerPlan
from dynaudit.families.base import matrix_shape, read_matrices
from dynaudit.runtime import to_device
from dynaudit.schema import (
    LayerResult,
    Report,
    SkippedLayer,
    SourceInfo,
    Spread,
    envelope,
    summarize,
)
from dynaudit.tensors import Checkpoint

__all__ = [
    "Loaded",
    "layer_digest",
    "load_layer",
    "measure_plan",
]


@dataclass
class Loaded:
    layer: Layer
    matrices: torch.Tensor  # (g, m, n) float32, W as stored
    scale: float | None
    reason: str | None = None  # why the layer gets null metrics
    non_finite: bool = False
    digest: str | None = None  # layer_digest of the matrices as loaded (before scaling)


# Versioned: a change to what is hashed must change the header, so that an old baseline's
# digests never match a new definition by accident (they would only cost a refit).
DIGEST_HEADER = "dynaudit.layer-digest/1 float32-le"
DIGEST_CHUNK_BYTES = 4 << 20


def layer_digest(matrices: torch.Tensor) -> str:
    """sha256 (hex) of a layer's matrices as fitted: float32 ``(g, m, n)``, before scaling,
    row-major, little-endian, after a header holding the shape. Two checkpoints that store a
    layer in different dtypes or layouts have the same digest exactly when the float32 values
    the fit sees are bit-equal (``check`` then skips the layer's refits). Hashed in row chunks
    so that a transposed view is never copied whole."""
    g, m, n = matrices.shape
    digest = hashlib.sha256(f"{DIGEST_HEADER} {g}x{m}x{n}\n".encode())
    rows = max(1, DIGEST_CHUNK_BYTES // (4 * max(n, 1)))
    for matrix in matrices.detach().to("cpu", torch.float32):
        for start in range(0, m, rows):
            chunk = matrix[start : start + rows].contiguous().numpy()
            digest.update(chunk.astype("<f4", copy=False))
    return digest.hexdigest()


Shapes = dict[str, tuple[int, int, int]]  # layer → (matrices, m, n), from the headers


# A batch's coordinates stay within this many bytes. Each Adam step walks the coordinates, their
# gradient and two moment buffers: kept in cache-sized batches, thousands of small same-shape
# layers cost the same per layer as a few hundred (one batch of 5,000 2 × 2 layers at the
# default settings took 38.8 ms per layer, batches of 500 took 23.4; bench.layers).
BATCH_COORD_BYTES = 1 << 20


def _batches(layers: list[Layer], shapes: Shapes, settings: FitSettings) -> Iterator[list[Layer]]:
    """Same-shape layers together, each batch's distance buffer within ``tile_bytes`` and its
    coordinates within :data:`BATCH_COORD_BYTES` (a batch holds at least one layer). A
    sampled layer (above ``max_entries``) is fitted alone: its blocks are small enough for an
    efficient kernel call, and batching it would hold several large matrices at once."""
    ordered = sorted(layers, key=lambda layer: (shapes[layer.name][1:], layer.depth))
    batch: list[Layer] = []
    count = 0  # matrices in the batch, kept as it grows (re-summing it was quadratic)
    for layer in ordered:
        g, m, n = shapes[layer.name]
        sampled = block_shape(m, n, settings.max_entries) != (m, n)
        if batch and (
            sampled
            or shapes[batch[0].name][1:] != (m, n)
            or 4 * (count + g) * settings.pieces * m * n > settings.tile_bytes
            or 4 * (count + g) * settings.q_dim * (m + n) > BATCH_COORD_BYTES
        ):
            yield batch
            batch, count = [], 0
        batch.append(layer)
        count += g
        if sampled:
            yield batch
            batch, count = [], 0
    if batch:
        yield batch


def _batch_cost(batch: list[Layer], shapes: Shapes, settings: FitSettings) -> float:
    """Fit FLOP of a batch, to balance the ranks of a job."""
    cost = 0.0
    for layer in batch:
        g, m, n = shapes[layer.name]
        cost += g * fit_flop(settings, m, n)
    return cost


def load_layer(
    checkpoint: Checkpoint, family: Family, layer: Layer, scales: dict[str, float] | None
) -> Loaded:
    """Read a layer's matrices (float32, as stored: the caller scales them) with its scale —
    the reference's from ``scales``, else its own RMS — its digest (:func:`layer_digest`),
    and why it gets null metrics, if it does."""
    weight = read_matrices(family, layer, checkpoint)
    digest = layer_digest(weight)
    # One float64 pass in row chunks answers three questions: a NaN or ±Inf makes the sum
    # non-finite (a float32 value squared never overflows float64), an all-zero matrix sums to
    # exactly 0, and the sum gives the RMS. torch.isfinite would allocate a float copy and
    # two masks of the whole matrix: 1.75× a float32 matrix at the peak (docs/performance.md).
    total = float(sum_squares(weight.reshape(1, -1, weight.shape[-1]))[0])
    if not math.isfinite(total):
        return Loaded(
            layer, weight, None, "non-finite weights (NaN/Inf)", non_finite=True, digest=digest
        )
    if scales is not None and layer.name in scales:
        scale = scales[layer.name]
    else:
        scale = math.sqrt(total / weight.numel()) if weight.numel() else 0.0
    reason = None
    if total == 0.0:
        reason = "all-zero matrix"
    elif scale == 0.0:
        reason = "reference matrix is all zeros (scale 0)"
    return Loaded(layer, weight, scale, reason, digest=digest)


def measure_plan(
    planned: Planned,
    settings: FitSettings,
    job: Job,
    *,
    scales: dict[str, float] | None = None,
    sink: CoordsSink | None = None,
) -> tuple[list[LayerResult], list[str]]:
    """Fit every planned layer; returns results in plan order and the non-finite tensors.
    ``sink`` receives every cold fit's coordinates (baselines store them). With ``ranks``
    (a torchrun job), this rank fits its share of the batches and every rank gets all
    results."""
    checkpoint, plan, family = planned.checkpoint, planned.plan, planned.family
    device, progress, ranks = job.device, job.progress, job.ranks
    groups = layer_groups(plan.layers)
    results: dict[str, LayerResult] = {}
    non_finite: set[str] = set()
    batches = _my_batches(checkpoint, plan, settings, ranks)
    total = sum(len(batch) for batch in batches)
    done = 0
    for batch in batches:
        started = time.perf_counter()
        loaded = [load_layer(checkpoint, family, layer, scales) for layer in batch]
        fit = [item for item in loaded if item.reason is None]
        metrics = _fit_batch(fit, settings, device, sink) if fit else {}
        seconds = (time.perf_counter() - started) / len(batch)
        for item in loaded:
            name = item.layer.name
            if item.non_finite:
                non_finite.add(name)
            shape = checkpoint.tensors[item.layer.source].shape
            results[name] = _layer_result(
                item, shape, groups[name], metrics.get(name), settings, scales, seconds
            )
            done += 1
            if progress is not None:
                progress(done, total, name)
        del loaded, fit
    if ranks is not None:
        for part, flagged in ranks.gather((results, sorted(non_finite))):
            results.update(part)
            non_finite.update(flagged)
    order = [layer.name for layer in plan.layers]
    return [results[name] for name in order], [name for name in order if name in non_finite]


def _my_batches(
    checkpoint: Checkpoint, plan: LayerPlan, settings: FitSettings, ranks: Ranks | None
) -> list[list[Layer]]:
    """The planned layers in batches (:func:`_batches`); in a torchrun job, this rank's share
    of them, balanced by their fit FLOP."""
    shapes = {
        layer.name: matrix_shape(layer, checkpoint.tensors[layer.source].shape)
        for layer in plan.layers
    }
    batches = list(_batches(plan.layers, shapes, settings))
    if ranks is None:
        return batches
    owners = assign([_batch_cost(b, shapes, settings) for b in batches], ranks.size)
    return [b for b, owner in zip(batches, owners, strict=True) if owner == ranks.rank]


Metrics = tuple[float, float, float, Spread | None]  # 𝒟, mean distance, fidelity, spread


def _layer_result(
    item: Loaded,
    stored_shape: Sequence[int],
    group: str,
    values: Metrics | None,
    settings: FitSettings,
    scales: dict[str, float] | None,
    seconds: float,
) -> LayerResult:
    """A measured layer's row of the report (null figures when it was not fitted)."""
    layer = item.layer
    g, m, n = item.matrices.shape
    r, c = block_shape(m, n, settings.max_entries)
    return LayerResult(
        name=layer.name,
        type=layer.type,
        depth=layer.depth,
        group=group,
        expert=layer.expert,
        shape=[m, n] if layer.rows or layer.index is not None else list(stored_shape),
        matrices=g,
        neurons=r + c,
        block=[r, c] if (r, c) != (m, n) else None,
        q_dim=settings.q_dim,
        steps=fit_steps(settings, r, c),
        discrepancy=values[0] if values else None,
        mean_distance=values[1] if values else None,
        fidelity=values[2] if values else None,
        scale=item.scale,
        scale_source="reference" if scales and layer.name in scales else "self",
        spread=values[3] if values else None,
        digest=item.digest,
        reason=item.reason,
        seconds=seconds,
    )


def _fit_batch(
    items: list[Loaded], settings: FitSettings, device: torch.device, sink: CoordsSink | None
) -> dict[str, Metrics]:
    """Cold-fit a batch of same-shape layers once per seed; per layer: 𝒟, mean distance,
    fidelity (of the first seed's fit) and the spread over seeds."""
    # The loaded matrices are private float32 copies: scale them in place, and concatenate
    # only real batches, so a large layer is held once, not twice.
    for item in items:
        item.matrices.div_(item.scale or 1.0)
    target = items[0].matrices if len(items) == 1 else torch.cat([i.matrices for i in items])
    owners = [i for i, item in enumerate(items) for _ in range(item.matrices.shape[0])]
    group_index = [g for item in items for g in range(item.matrices.shape[0])]
    names = [items[o].layer.name for o in owners]
    # Above max_entries, each seed fits its own block of rows and columns (dynamics.blocks).
    _, m, n = target.shape
    shape = block_shape(m, n, settings.max_entries)
    per_seed: list[tuple[list[float], list[float]]] = []
    fidelity: list[float] = []
    matrices = list(zip(names, group_index, strict=True))
    for offset in range(settings.seeds):
        seed = settings.seed + offset
        seeds = [matrix_seed(seed, name, g) for name, g in matrices]
        blocks = take_blocks(target, shape, [block_seed(seed, name, g) for name, g in matrices])
        fitted = to_device(blocks, device)  # only the fitted rows and columns are moved
        init = init_coordinates(*shape, settings, seeds, rms(fitted).float().clamp_min(1e-30))
        coords = fit_coordinates(fitted, settings, init)
        if sink is not None:
            sink([item.layer for item in items], owners, offset, coords, fitted)
        d, md = discrepancy(coords)
        per_seed.append(
            (_per_layer_mean(d, owners, len(items)), _per_layer_mean(md, owners, len(items)))
        )
        if offset == 0:
            err = squared_error(coords, fitted, work_bytes(settings, len(owners), *shape))
            norm = sum_squares(fitted)
            bounds = list(itertools.accumulate((i.matrices.shape[0] for i in items), initial=0))
            errs, norms = _segment_sums(err, bounds), _segment_sums(norm, bounds)
            fidelity = [1.0 - math.sqrt(e / s) for e, s in zip(errs, norms, strict=True)]
        del coords, init
    out = {}
    for i, item in enumerate(items):
        ds = [seed[0][i] for seed in per_seed]
        mds = [seed[1][i] for seed in per_seed]
        spread = None
        if len(ds) > 1:
            md_std = statistics.stdev(mds)
            spread = Spread(
                seeds=len(ds),
                discrepancy_std=statistics.stdev(ds),
                mean_distance_std=md_std,
                relative=md_std / statistics.fmean(mds) if statistics.fmean(mds) else 0.0,
            )
        out[item.layer.name] = (statistics.fmean(ds), statistics.fmean(mds), fidelity[i], spread)
    return out


def _per_layer_mean(values: torch.Tensor, owners: list[int], count: int) -> list[float]:
    sums = [0.0] * count
    counts = [0] * count
    for value, owner in zip(values.tolist(), owners, strict=True):
        sums[owner] += value
        counts[owner] += 1
    return [s / c for s, c in zip(sums, counts, strict=True)]


def _segment_sums(values: torch.Tensor, bounds: list[int]) -> list[float]:
    """Sums of ``values`` over the consecutive segments ``bounds[i]:bounds[i + 1]`` (a batch's
    layers own consecutive matrices). One pass over the batch: a mask per layer made the
    batch's bookkeeping quadratic in its number of layers."""
    flat = values.tolist()
    return [
        flat[a] if b - a == 1 else float(values[a:b].sum()) for a, b in itertools.pairwise(bounds)
    ]


def fit_report(
    planned: Planned,
    source_info: SourceInfo,
    fit: FitSettings,
    job: Job,
    *,
    scales: dict[str, float] | None = None,
    sink: CoordsSink | None = None,
    started: float,
) -> Report:
    """Fit the planned layers of an opened checkpoint: the report of ``measure`` (with
    ``ranks``, sharded over a torchrun job)."""
    import torch

    from dynaudit.runtime import torch_scope

    with torch_scope(job.device, fit.threads):
        threads = torch.get_num_threads()
        measured, non_finite = measure_plan(planned, fit, job, scales=scales, sink=sink)
    skipped = [SkippedLayer(name=s.name, skipped=s.reason) for s in planned.plan.skipped]
    return Report(
        **envelope(source_info),
        family=planned.info(),
        settings={**fit.numeric(), "device": job.device.type, "threads": threads},
        layers=[*measured, *skipped],
        summary=summarize(measured),
        non_finite=non_finite,
        cache=None,
        seconds=round(time.perf_counter() - started, 3),
    )
