"""A baseline made from an opened checkpoint: K cold fits and their null refits, measured
into a staging directory beside the target and renamed into place (docs/gate.md)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from dynaudit.baseline_store import BaselineWriter, matrix_shapes, staging_for
from dynaudit.config import PROTOCOL_VERSION, FitSettings
from dynaudit.distributed import Ranks
from dynaudit.engine.measure import fit_report
from dynaudit.engine.plan import Job, Progress, plan_checkpoint, source_info_of
from dynaudit.errors import UsageError
from dynaudit.files import discard_staging
from dynaudit.schema import Baseline, BaselineLayer, LayerResult, Report
from dynaudit.sources.base import ResolvedSource
from dynaudit.tensors import Checkpoint

__all__ = ["write_baseline"]


def write_baseline(
    checkpoint: Checkpoint,
    resolved: ResolvedSource,
    target: Path,
    fit: FitSettings,
    *,
    family: str | None,
    digest: Callable[[Path], str],
    progress: Progress | None = None,
    started: float | None = None,
    ranks: Ranks | None = None,
) -> Baseline:
    """Measure an opened checkpoint into a new baseline directory ``target``, staged beside it
    and renamed into place: an interruption or an error leaves nothing behind. With ``ranks``
    (a torchrun job) each rank fits its share into rank 0's staging directory, which must be
    on a filesystem every rank sees, and rank 0 completes and renames it."""
    from dynaudit.runtime import pick_device

    started = time.perf_counter() if started is None else started
    main = ranks is None or ranks.is_main
    staging = _staging(target, ranks)
    try:
        source_info = source_info_of(resolved, checkpoint, checkpoint.fingerprint(digest))
        planned = plan_checkpoint(checkpoint, family)
        writer = BaselineWriter(staging, fit, [layer.name for layer in planned.plan.layers])
        job = Job(pick_device(fit.device), progress, ranks)
        report = fit_report(planned, source_info, fit, job, sink=writer.sink, started=started)
        if ranks is not None:
            writer.absorb(ranks.gather(writer.records))
        made = _baseline_record(report, fit, matrix_shapes(checkpoint, planned.plan), writer)
        if main:
            writer.finish(made, target)
    except BaseException:
        if main:
            discard_staging(staging)
        raise
    return made


def _staging(target: Path, ranks: Ranks | None) -> Path:
    """The staging directory beside ``target``; in a torchrun job rank 0's, which every rank
    must see (a usage error otherwise)."""
    if ranks is None:
        return staging_for(target)
    main = ranks.is_main
    staging = Path(ranks.from_main(str(staging_for(target)) if main else ""))
    if not staging.is_dir():
        raise UsageError(
            f"{target}: rank {ranks.rank} cannot see rank 0's staging directory "
            f"{staging}; under torchrun --out must be on a filesystem every rank shares"
        )
    return staging


def _baseline_record(
    report: Report, fit: FitSettings, shapes: dict[str, list[int]], writer: BaselineWriter
) -> Baseline:
    """The baseline's record (baseline.json) of a measured report and its stored fits."""
    return Baseline(
        protocol_version=PROTOCOL_VERSION,
        tool=report.tool,
        created_at=report.created_at,
        source=report.source,
        family=report.family,
        settings=fit.numeric(),
        seeds=fit.seeds,
        layers=[_baseline_layer(layer, shapes[layer.name], writer) for layer in report.measured],
        report=report,
    )


def _baseline_layer(layer: LayerResult, shape: list[int], writer: BaselineWriter) -> BaselineLayer:
    return BaselineLayer(
        name=layer.name,
        type=layer.type,
        depth=layer.depth,
        group=layer.group,
        shape=shape,
        scale=layer.scale,
        coords=writer.files.get(layer.name),
        cold_mean_distance=writer.cold.get(layer.name, []),
        null_mean_distance=writer.null.get(layer.name, []),
        reason=layer.reason,
        digest=layer.digest,
    )
