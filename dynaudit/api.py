"""The library's entry points; the CLI calls nothing else."""

from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from dynaudit import __version__
from dynaudit.config import FitSettings
from dynaudit.dynamics.kernel import fit_steps
from dynaudit.engine import Progress, matrix_shape, measure_plan
from dynaudit.errors import UsageError
from dynaudit.families import detect_family
from dynaudit.report import FamilyInfo, Report, SkippedLayer, SourceInfo, summarize
from dynaudit.sources import resolve
from dynaudit.tensors import Checkpoint

__all__ = ["InspectedLayer", "Inspection", "inspect", "measure", "settings_from"]


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
    progress: Progress | None = None,
    scales: dict[str, float] | None = None,
    **settings: Any,
) -> Report:
    """Fit every layer of a checkpoint and report its dynamical discrepancy.

    ``settings`` are :class:`~dynaudit.config.FitSettings` fields (``q_dim``, ``pieces``,
    ``steps``, ``seed``, ``seeds``, ``device``, ...). ``scales`` fixes the per-layer
    reference scale s (by tensor name); by default each matrix is scaled by its own RMS.
    """
    import torch

    from dynaudit.runtime import pick_device, torch_scope

    fit = settings_from(settings)
    started = time.perf_counter()
    resolved = resolve(source)
    device = pick_device(fit.device)
    with Checkpoint.open(resolved.path) as checkpoint:
        detection = detect_family(checkpoint, family)
        plan = detection.family.plan(checkpoint)
        with torch_scope(device, fit.threads):
            threads = torch.get_num_threads()
            layers, non_finite = measure_plan(
                checkpoint, plan, detection.family, fit, device, scales=scales, progress=progress
            )
        fingerprint = checkpoint.fingerprint()
    return Report(
        tool={"name": "dynaudit", "version": __version__},
        source=SourceInfo(
            uri=resolved.uri,
            path=str(resolved.path),
            revision=resolved.revision,
            files=fingerprint,
        ),
        family=FamilyInfo(
            name=detection.family.name,
            confidence=detection.confidence,
            detected_by=detection.how,
            depth_note=plan.depth_note,
        ),
        settings={**fit.numeric(), "device": device.type, "threads": threads},
        layers=[*layers, *(SkippedLayer(name=s.name, skipped=s.reason) for s in plan.skipped)],
        summary=summarize(layers),
        non_finite=non_finite,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        host=platform.node(),
        seconds=round(time.perf_counter() - started, 3),
    )


class InspectedLayer(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    type: str
    depth: int
    shape: list[int]
    dtype: str
    matrices: int
    neurons: int
    gflop: float  # fit cost at the given settings, all seeds


class Inspection(BaseModel):
    model_config = ConfigDict(frozen=True)

    uri: str
    files: list[str]
    family: FamilyInfo
    layers: list[InspectedLayer]
    skipped: list[SkippedLayer]
    tensors: int
    bytes: int
    parameters: int
    gflop: float


def inspect(
    source: str | os.PathLike[str], *, family: str | None = None, **settings: Any
) -> Inspection:
    """Headers only: family, layers, shapes, dtypes, size and the fit's cost. Reads no weights."""
    fit = settings_from(settings)
    resolved = resolve(source)
    with Checkpoint.open(resolved.path) as checkpoint:
        detection = detect_family(checkpoint, family)
        plan = detection.family.plan(checkpoint)
        layers = []
        for layer in plan.layers:
            info = checkpoint.tensors[layer.name]
            g, m, n = matrix_shape(layer, info.shape)
            flop = 6 * m * n * fit.q_dim * fit_steps(fit, m, n) * g * fit.seeds
            layers.append(
                InspectedLayer(
                    name=layer.name, type=layer.type, depth=layer.depth, shape=list(info.shape),
                    dtype=info.dtype, matrices=g, neurons=m + n, gflop=flop / 1e9,
                )
            )  # fmt: skip
        return Inspection(
            uri=resolved.uri,
            files=[str(f) for f in checkpoint.files],
            family=FamilyInfo(
                name=detection.family.name,
                confidence=detection.confidence,
                detected_by=detection.how,
                depth_note=plan.depth_note,
            ),
            layers=layers,
            skipped=[SkippedLayer(name=s.name, skipped=s.reason) for s in plan.skipped],
            tensors=len(checkpoint.tensors),
            bytes=checkpoint.total_bytes,
            parameters=sum(info.numel for info in checkpoint.tensors.values()),
            gflop=sum(layer.gflop for layer in layers),
        )
