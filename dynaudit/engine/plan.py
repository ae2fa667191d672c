"""Which layers of an opened checkpoint are fitted, and with which settings: the family's
plan, a ``--experts`` and a ``--layers`` selection, and the validated fit settings."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING

from pydantic import ValidationError

from dynaudit.config import FitSettings
from dynaudit.distributed import Ranks
from dynaudit.errors import NothingToAudit, UsageError, listed
from dynaudit.families import Detection, Family, Layer, LayerPlan, Skip, detect_family
from dynaudit.schema import FamilyInfo, SourceInfo, depth_groups
from dynaudit.sources.base import ResolvedSource
from dynaudit.tensors import Checkpoint

if TYPE_CHECKING:
    import torch

__all__ = [
    "Job",
    "Planned",
    "Progress",
    "experts_of",
    "family_info",
    "layer_groups",
    "pinned_thirds",
    "plan_checkpoint",
    "require_layers",
    "select_experts",
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
    checkpoint: Checkpoint,
    family: str | None,
    layers: str | None = None,
    experts: str | Collection[int] | None = None,
) -> Planned:
    """Detect (or take) the family and plan an opened checkpoint; ``experts`` (of a mixture
    of experts), then ``layers`` select."""
    detection = detect_family(checkpoint, family)
    plan = detection.family.plan(checkpoint)
    if layers is not None or experts is not None:
        plan = pinned_thirds(plan)
    plan = select_experts(plan, experts, detection.family.name)
    plan = select_layers(plan, layers)
    if layers is None and experts is None:  # a selection that matches nothing says so itself
        require_layers(plan, detection, str(checkpoint.root))
    return Planned(checkpoint, detection, plan)


def layer_groups(layers: list[Layer]) -> dict[str, str]:
    """Each layer's depth third: thirds of the distinct depths of the layers the family did
    not pin to a group (a stem is bottom and a head top, without shifting the blocks'),
    counted within each stack (an encoder's thirds apart from its decoder's)."""
    thirds = {
        stack: depth_groups(x.depth for x in layers if x.group is None and x.stack == stack)
        for stack in {layer.stack for layer in layers}
    }
    return {layer.name: layer.group or thirds[layer.stack][layer.depth] for layer in layers}


def pinned_thirds(plan: LayerPlan) -> LayerPlan:
    """Every layer pinned to the third it has in the whole plan, so that a selection
    (``--layers``, ``--experts``) reports each layer in its own third, not in a third of the
    selected depths."""
    groups = layer_groups(plan.layers)
    pinned = [dataclasses.replace(x, group=groups[x.name]) for x in plan.layers]  # type: ignore[arg-type]
    return dataclasses.replace(plan, layers=pinned)


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def experts_of(given: str | Collection[int]) -> list[int]:
    """Expert indices, sorted, from ``--experts`` text (``0,3``, ``0-7``, ``0,4-5``) or a
    collection of integers; anything else is a usage error (exit 2)."""
    if not isinstance(given, str):
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in given):
            raise UsageError(f"experts {sorted(given)!r}: not expert indices (integers ≥ 0)")
        return sorted(set(given))
    out: set[int] = set()
    for item in given.split(","):
        match = _RANGE.match(item.strip())
        if match is None or (match[2] is not None and int(match[2]) < int(match[1])):
            raise UsageError(
                f"--experts {given!r}: not a list of expert indices and ranges, like 0,3 or 0-7"
            )
        out.update(range(int(match[1]), int(match[2] or match[1]) + 1))
    return sorted(out)


def select_experts(plan: LayerPlan, given: str | Collection[int] | None, family: str) -> LayerPlan:
    """Only the layers of the experts ``given`` (by expert index, in every block); every other
    layer (attention, router, shared experts, dense blocks) joins the skipped list. None keeps
    every layer; an index that no layer has is a usage error (exit 2) listing the experts."""
    if given is None:
        return plan
    wanted = experts_of(given)
    present = sorted({x.expert for x in plan.layers if x.expert is not None})
    if not present:
        raise UsageError(
            f"--experts: family {family} planned no experts (not a mixture of experts)"
        )
    if not wanted:
        raise UsageError("--experts: no expert index given")
    absent = [x for x in wanted if x not in present]
    if absent:
        raise UsageError(
            f"--experts {_indices(wanted)}: no expert {_indices(absent)}; the checkpoint's "
            f"experts are {_indices(present)}"
        )
    chosen = set(wanted)
    kept = [layer for layer in plan.layers if layer.expert in chosen]
    dropped = [Skip(x.name, "not selected") for x in plan.layers if x.expert not in chosen]
    return dataclasses.replace(plan, layers=kept, skipped=[*plan.skipped, *dropped])


def _indices(values: list[int]) -> str:
    """Sorted indices as ranges: ``0-7``, ``0,3,5-6``."""
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def require_layers(plan: LayerPlan, detection: Detection, where: str) -> None:
    """A checkpoint without a single layer to fit has nothing to audit: an input error, not a
    report of zero layers that passes every gate."""
    if not plan.layers:
        skipped = [f"{s.name!r} ({s.reason})" for s in plan.skipped]
        raise NothingToAudit(
            f"{where}: no weight matrix to audit (family {detection.family.name} skipped every "
            f"tensor: {listed(skipped, 3) or 'there are none'})"
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
