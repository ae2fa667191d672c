"""The library's entry points; the CLI calls nothing else."""

from __future__ import annotations

import functools
import math
import os
import platform
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dynaudit import __version__
from dynaudit.config import PROTOCOL_VERSION, FitSettings
from dynaudit.distributed import Ranks, current
from dynaudit.dynamics.blocks import fit_flop
from dynaudit.engine import CoordsSink, Progress, measure_plan
from dynaudit.errors import NothingToAudit, UsageError
from dynaudit.families import Detection, LayerPlan, detect_family, matrix_shape
from dynaudit.report import CacheInfo, FamilyInfo, Report, SkippedLayer, SourceInfo, summarize
from dynaudit.schemas import minor_field
from dynaudit.sources import SourceOptions, open_checkpoint, open_headers, resolve
from dynaudit.structure import StructuralClass
from dynaudit.tensors import Checkpoint, sha256_file

if TYPE_CHECKING:
    import torch

__all__ = [
    "InspectedLayer",
    "Inspection",
    "SourceOptions",
    "inspect",
    "measure",
    "settings_from",
]


def settings_from(overrides: dict[str, Any]) -> FitSettings:
    """Validated fit settings; invalid values are a usage error (exit 2)."""
    try:
        return FitSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}".replace("Value error, ", "")
            for e in exc.errors()
        )
        raise UsageError(f"invalid settings: {problems}") from exc


def measure(
    source: str | os.PathLike[str],
    *,
    family: str | None = None,
    base: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    scales: dict[str, float] | None = None,
    sources: SourceOptions | None = None,
    cache: bool = True,
    layers: str | None = None,
    **settings: Any,
) -> Report:
    """Fit every layer of a checkpoint and report its dynamical discrepancy.

    ``source`` is any SPEC §3 form: a local path, ``hf://org/name[@rev]`` or ``org/name``,
    ``models:/…`` or ``runs:/…``; ``sources`` says how to reach remote ones. ``settings``
    are :class:`~dynaudit.config.FitSettings` fields (``q_dim``, ``pieces``, ``steps``,
    ``seed``, ``seeds``, ``device``, ...). A LoRA adapter directory is measured as its merged
    weights over ``base`` (default: the adapter's ``base_model_name_or_path``). ``scales``
    fixes the per-layer reference scale s (by layer name); by default each matrix is scaled by
    its own RMS. With ``cache`` (the default), a checkpoint already measured with the same
    settings is not fitted again: the stored report is returned, marked as a cache hit.
    ``layers``, a regular expression, measures only the layers whose names it matches (the
    others are listed as skipped).
    """
    from dynaudit.cache import ResultCache, cache_root, result_key
    from dynaudit.runtime import pick_device

    fit = settings_from(settings)
    options = sources or SourceOptions()
    started = time.perf_counter()
    ranks = current()  # a torchrun job: joined before any device is chosen
    resolved = resolve(source, options)
    device = pick_device(fit.device)
    store = ResultCache(cache_root(options.cache_dir)) if cache else None
    # Without the cache's memo, still hash each file once (a download is verified, then
    # fingerprinted).
    digest = store.digest if store else functools.cache(sha256_file)
    with open_checkpoint(resolved, base, options, digest) as checkpoint:
        fingerprint = checkpoint.fingerprint(digest)
        source_info = SourceInfo(
            uri=resolved.uri, path=str(resolved.path), revision=resolved.revision,
            files=fingerprint, selection=checkpoint.selection_note,
        )  # fmt: skip
        key = result_key(
            fingerprint, fit.numeric(), family=family, scales=scales, version=__version__,
            protocol=PROTOCOL_VERSION, context={**cache_context(checkpoint), "layers": layers},
        )  # fmt: skip
        cached = store.load(key) if store else None
        if ranks is not None:  # rank 0's cache decides for the whole job
            cached = ranks.from_main(cached)
        if cached is not None:
            return cached.model_copy(
                update={
                    "source": source_info,
                    "cache": CacheInfo(hit=True, key=key, measured_at=cached.created_at),
                    "seconds": round(time.perf_counter() - started, 3),
                }
            )
        detection, plan = plan_checkpoint(checkpoint, family, layers)
        report = fit_report(
            checkpoint, source_info, detection, plan, fit, device, scales=scales,
            progress=progress, started=started, ranks=ranks,
        )  # fmt: skip
    if store is not None and (ranks is None or ranks.is_main):
        report = report.model_copy(
            update={"cache": CacheInfo(hit=False, key=key, measured_at=report.created_at)}
        )
        store.store(key, report)
    return report


def plan_checkpoint(
    checkpoint: Checkpoint, family: str | None, layers: str | None = None
) -> tuple[Detection, LayerPlan]:
    """Detect (or take) the family and plan an opened checkpoint; ``layers`` selects."""
    detection = detect_family(checkpoint, family)
    plan = select_layers(detection.family.plan(checkpoint), layers)
    if layers is None:  # a --layers selection that matches nothing says so itself
        require_layers(plan, detection, str(checkpoint.root))
    return detection, plan


def require_layers(plan: LayerPlan, detection: Detection, where: str) -> None:
    """A checkpoint without a single layer to fit has nothing to audit: an input error, not a
    report of zero layers that passes every gate."""
    if not plan.layers:
        raise NothingToAudit(
            f"{where}: no weight matrix to audit (family {detection.family.name}: only "
            "biases, norms or scalars?)"
        )


def fit_report(
    checkpoint: Checkpoint,
    source_info: SourceInfo,
    detection: Detection,
    plan: LayerPlan,
    fit: FitSettings,
    device: torch.device,
    *,
    scales: dict[str, float] | None = None,
    progress: Progress | None = None,
    sink: CoordsSink | None = None,
    started: float,
    ranks: Ranks | None = None,
) -> Report:
    """Fit the planned layers of an opened checkpoint: the report of ``measure`` (with
    ``ranks``, sharded over a torchrun job)."""
    import torch

    from dynaudit.runtime import torch_scope

    with torch_scope(device, fit.threads):
        threads = torch.get_num_threads()
        measured, non_finite = measure_plan(
            checkpoint, plan, detection.family, fit, device, scales=scales, progress=progress,
            sink=sink, ranks=ranks,
        )  # fmt: skip
    return Report(
        tool={"name": "dynaudit", "version": __version__},
        source=source_info,
        family=family_info(detection, plan),
        settings={**fit.numeric(), "device": device.type, "threads": threads},
        layers=[*measured, *(SkippedLayer(name=s.name, skipped=s.reason) for s in plan.skipped)],
        summary=summarize(measured),
        non_finite=non_finite,
        cache=None,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        host=platform.node(),
        seconds=round(time.perf_counter() - started, 3),
    )


class InspectedLayer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    type: str
    depth: int
    shape: list[int]
    dtype: str
    matrices: int
    neurons: int
    gflop: float  # fit cost at the given settings, all seeds
    inputs: list[str] = Field(description="layers whose outputs feed this layer's inputs")
    reads_input: bool = Field(description="reads the model's input (directly or via a stream)")
    rank: int | None = Field(
        None, description="numerical rank (--weights; null above the exact-rank size limit)"
    )
    full_rank: int | None = Field(None, description="min(m, n)")
    spectral_norm: float | None = Field(None, description="largest singular value (--weights)")


class Structure(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    structural_class: StructuralClass
    widths: list[int] = Field(description="feature widths along the main path, input first")
    reason: str
    branches: dict[str, int] = Field(description="residual branches per structural class")
    degenerate: list[str] | None = Field(
        None, description="rank-deficient layers (--weights; null when weights were not read)"
    )
    unranked: list[str] | None = Field(
        None,
        description="layers too large for an exact rank (--weights): rank not computed, "
        "spectral norm estimated",
    )
    rank_rule: str | None = None


class BranchGain(BaseModel):
    """Product of the spectral norms of the matrices along a residual branch: an indicator of
    the branch's gain, not a bound — activations, token mixing in attention, the softmax and
    the conv operator norm (up to √(kh·kw) × the reshaped kernel's) all stand between them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    block: str
    branch: str
    layers: list[str]
    gain: float
    note: str


class Inspection(BaseModel):
    """What ``dynaudit inspect`` finds; its JSON is the versioned "inspect" format
    (:mod:`dynaudit.schemas`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = Field(1, description="the format's major version")
    schema_minor: int = minor_field("inspect")
    uri: str
    files: list[str]
    family: FamilyInfo
    layers: list[InspectedLayer]
    skipped: list[SkippedLayer]
    structure: Structure
    gains: list[BranchGain] = Field(default_factory=list)
    tensors: int
    bytes: int
    parameters: int
    gflop: float


def inspect(
    source: str | os.PathLike[str],
    *,
    family: str | None = None,
    base: str | os.PathLike[str] | None = None,
    weights: bool = False,
    sources: SourceOptions | None = None,
    rank_work: int | None = None,
    **settings: Any,
) -> Inspection:
    """Headers only: family, layer graph, shapes, dtypes, size, structural class and the fit's
    cost. With ``weights=True`` also reads every layer for its rank and spectral norm, the
    degenerate layers and the gain of every residual branch. A Hub model's headers are read
    with ranged requests: no weights are downloaded unless ``weights=True``. Ranks are
    computed for matrices whose ``m·n·min(m, n)`` is at most ``rank_work`` (default
    :data:`dynaudit.structure.RANK_WORK`, 4096³); larger ones get an estimated spectral norm
    and are listed as ``unranked``."""
    from dynaudit.structure import chain_widths, check_matrices, classify, path_widths

    fit = settings_from(settings)
    options = sources or SourceOptions()
    remote = None if weights or base is not None else open_headers(source, options)
    if remote is not None:
        uri, opened = remote
    else:
        resolved = resolve(source, options)
        uri, opened = resolved.uri, open_checkpoint(resolved, base, options)
    with opened as checkpoint:
        detection = detect_family(checkpoint, family)
        plan = detection.family.plan(checkpoint)
        checks = check_matrices(checkpoint, plan, detection.family, rank_work) if weights else {}
        fed_by = plan.fed_by()
        layers = []
        for layer in plan.layers:
            info = checkpoint.tensors[layer.source]
            g, m, n = matrix_shape(layer, info.shape)
            flop = g * fit_flop(fit, m, n) * fit.seeds
            check = checks.get(layer.name)
            layers.append(
                InspectedLayer(
                    name=layer.name, type=layer.type, depth=layer.depth,
                    shape=[m, n] if layer.rows else list(info.shape), dtype=info.dtype,
                    matrices=g, neurons=m + n, gflop=flop / 1e9,
                    inputs=fed_by[layer.name],
                    reads_input=layer.name in plan.reads_input,
                    rank=check.rank if check else None,
                    full_rank=min(m, n),
                    spectral_norm=check.spectral_norm if check else None,
                )
            )  # fmt: skip
        widths = chain_widths(plan, checkpoint)
        kind, reason = classify(widths)
        by_name = {layer.name: layer for layer in plan.layers}
        branch_classes: dict[str, int] = {}
        gains = []
        for block in plan.blocks:
            for branch, names in block.branches.items():
                branch_kind, _ = classify(path_widths([by_name[n] for n in names], checkpoint))
                branch_classes[branch_kind] = branch_classes.get(branch_kind, 0) + 1
                if checks:
                    gains.append(
                        BranchGain(
                            block=block.name, branch=branch, layers=list(names),
                            gain=math.prod(checks[name].spectral_norm for name in names),
                            note=block.note,
                        )
                    )  # fmt: skip
        structure = Structure(
            structural_class=kind,
            widths=widths,
            reason=reason,
            branches=branch_classes,
            degenerate=[n for n, c in checks.items() if c.degenerate] if weights else None,
            unranked=[n for n, c in checks.items() if c.rank is None] if weights else None,
            rank_rule=RANK_RULE if weights else None,
        )
        return Inspection(
            uri=uri,
            files=[str(f) for f in checkpoint.files],
            family=family_info(detection, plan),
            layers=layers,
            skipped=[SkippedLayer(name=s.name, skipped=s.reason) for s in plan.skipped],
            structure=structure,
            gains=gains,
            tensors=len(checkpoint.tensors),
            bytes=checkpoint.total_bytes,
            parameters=sum(info.numel for info in checkpoint.tensors.values()),
            gflop=sum(layer.gflop for layer in layers),
        )


RANK_RULE = (
    "rank = singular values above max(u·rms(W)·(√m+√n), σ_max·max(m,n)·ε_f32), u the storage "
    "dtype's unit roundoff; not computed when m·n·min(m,n) > 4096³ (the spectral norm is then "
    "a block-Krylov estimate)"
)


def cache_context(checkpoint: Checkpoint) -> dict[str, Any]:
    """Besides the weight files, what a report depends on: the config the family plugins read,
    how an adapter is merged, and which plugins are installed (they decide the family)."""
    from dynaudit.adapters import AdapterCheckpoint
    from dynaudit.families import available_families

    merge = checkpoint.merge_plan() if isinstance(checkpoint, AdapterCheckpoint) else None
    return {"config": checkpoint.config, "merge": merge, "plugins": available_families()}


def select_layers(plan: LayerPlan, pattern: str | None) -> LayerPlan:
    """Only the layers whose names match ``pattern`` (a regular expression, searched); the
    others join the skipped list. None keeps every layer."""
    import dataclasses
    import re

    from dynaudit.families import Skip

    if pattern is None:
        return plan
    try:
        wanted = re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--layers {pattern!r}: not a regular expression ({exc})") from exc
    kept = [layer for layer in plan.layers if wanted.search(layer.name)]
    if not kept:
        raise UsageError(f"--layers {pattern!r} matches none of the {len(plan.layers)} layers")
    chosen = {layer.name for layer in kept}  # a set: `layer not in kept` was quadratic
    dropped = [
        Skip(layer.name, "not selected") for layer in plan.layers if layer.name not in chosen
    ]
    return dataclasses.replace(plan, layers=kept, skipped=[*plan.skipped, *dropped])


def family_info(detection: Detection, plan: LayerPlan) -> FamilyInfo:
    return FamilyInfo(
        name=detection.family.name,
        confidence=detection.confidence,
        detected_by=detection.how,
        depth_note=plan.depth_note,
        notes=plan.notes,
    )
