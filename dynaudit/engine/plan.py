"""Which layers of an opened checkpoint are fitted, and with which settings: the family's
plan, a ``--layers`` selection, and the validated fit settings."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from pydantic import ValidationError

from dynaudit.config import FitSettings
from dynaudit.distributed import Ranks
from dynaudit.errors import NothingToAudit, UsageError
from dynaudit.families import Detection, Family, LayerPlan, Skip, detect_family
from dynaudit.schema import FamilyInfo, SourceInfo
from dynaudit.sources.base import ResolvedSource
from dynaudit.tensors import Checkpoint

if TYPE_CHECKING:
    import torch

__all__ = [
    "Job",
    "Planned",
    "Progress",
    "family_info",
    "plan_checkpoint",
    "require_layers",
    "select_layers",
    "settings_from",
    "source_info_of",
]


def settings_from(overrides: Mapping[str, object]) -> FitSettings:
    """Validated fit settings (None keeps a default); invalid values are a usage error
    (exit 2)."""
    try:
        return FitSettings.model_validate({k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}".replace("Value error, ", "")
            for e in exc.errors()
        )
        raise UsageError(f"invalid settings: {problems}") from exc


Progress = Callable[[int, int, str], None]  # (layers done, layers in all, current layer)


@dataclasses.dataclass(frozen=True)
class Planned:
    """An opened checkpoint with its family and its plan: what every engine step works on."""

    checkpoint: Checkpoint
    detection: Detection
    plan: LayerPlan

    @property
    def family(self) -> Family:
        return self.detection.family

    def info(self) -> FamilyInfo:
        """The reports' ``family``: which one, how it was found, and its notes."""
        return family_info(self.detection, self.plan)


@dataclasses.dataclass(frozen=True)
class Job:
    """Where and how the fits run: the device, a progress callback (layers done, layers in
    all, current layer) and, in a torchrun job, this process's rank."""

    device: torch.device
    progress: Progress | None = None
    ranks: Ranks | None = None


def plan_checkpoint(
    checkpoint: Checkpoint, family: str | None, layers: str | None = None
) -> Planned:
    """Detect (or take) the family and plan an opened checkpoint; ``layers`` selects."""
    detection = detect_family(checkpoint, family)
    plan = select_layers(detection.family.plan(checkpoint), layers)
    if layers is None:  # a --layers selection that matches nothing says so itself
        require_layers(plan, detection, str(checkpoint.root))
    return Planned(checkpoint, detection, plan)


def require_layers(plan: LayerPlan, detection: Detection, where: str) -> None:
    """A checkpoint without a single layer to fit has nothing to audit: an input error, not a
    report of zero layers that passes every gate."""
    if not plan.layers:
        raise NothingToAudit(
            f"{where}: no weight matrix to audit (family {detection.family.name}: only "
            "biases, norms or scalars?)"
        )


def select_layers(plan: LayerPlan, pattern: str | None) -> LayerPlan:
    """Only the layers whose names match ``pattern`` (a regular expression, searched); the
    others join the skipped list. None keeps every layer."""
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


def source_info_of(
    resolved: ResolvedSource, checkpoint: Checkpoint, fingerprint: dict[str, str]
) -> SourceInfo:
    """The report's ``source``: where the checkpoint came from and which files were read."""
    return SourceInfo(
        uri=resolved.uri,
        path=str(resolved.path),
        revision=resolved.revision,
        files=fingerprint,
        selection=checkpoint.selection_note,
    )
