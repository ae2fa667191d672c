"""The report: JSON schema v1 (SPEC §5) as pydantic models, its aggregates, and its reader.

The models are strict (unknown fields are an error when writing); :func:`read_report` reads a
report under the format contract of :mod:`dynaudit.schemas` (newer minor versions welcome,
newer major versions refused)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dynaudit.config import PROTOCOL_VERSION
from dynaudit.policy import Comparison, Policy, Verdict
from dynaudit.schemas import FORMATS, minor_field, read_versioned

__all__ = [
    "DEPTH_GROUPS",
    "Aggregate",
    "BaselineInfo",
    "CacheInfo",
    "CheckReport",
    "FamilyInfo",
    "LayerResult",
    "Report",
    "SkippedLayer",
    "SourceInfo",
    "Spread",
    "Summary",
    "depth_groups",
    "read_report",
    "summarize",
]

DEPTH_GROUPS = ("bottom", "middle", "top")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SourceInfo(_Model):
    uri: str
    path: str
    revision: str | None = None
    files: dict[str, str] = Field(description="weight file → sha256")
    selection: str | None = Field(
        None,
        description="which weight files were audited and why, when others were present "
        "(absent when every weight file present was audited)",
        exclude_if=lambda value: value is None,
    )


class CacheInfo(_Model):
    hit: bool = Field(description="true: these numbers were reused from the result cache")
    key: str = Field(description="sha256 of the fingerprint, settings, family and protocol")
    measured_at: str = Field(description="when the numbers were computed")


class FamilyInfo(_Model):
    name: str
    confidence: float
    detected_by: str
    depth_note: str
    notes: list[str] = Field(default_factory=list)


class Spread(_Model):
    """Spread of a layer's figures over independent cold fits (different seeds)."""

    seeds: int
    discrepancy_std: float
    mean_distance_std: float
    relative: float = Field(description="mean_distance_std / mean_distance")


class LayerResult(_Model):
    name: str
    type: str
    depth: int
    group: Literal["bottom", "middle", "top"]
    shape: list[int]
    matrices: int = Field(description="matrices fitted for the layer (conv groups)")
    neurons: int = Field(description="N = m + n per matrix (r + c when sampled)")
    block: list[int] | None = Field(
        None, description="[r, c] rows and columns fitted when the matrix was sampled"
    )
    q_dim: int
    steps: int = Field(description="Adam steps of each cold fit (see docs/method.md)")
    discrepancy: float | None
    mean_distance: float | None
    fidelity: float | None
    scale: float | None
    scale_source: Literal["self", "reference"]
    spread: Spread | None = None
    digest: str | None = Field(
        None,
        description="sha256 of the layer's float32 (g, m, n) matrices before scaling "
        "(engine.layer_digest): a check skips the refits of a layer whose digest equals its "
        "baseline's",
    )
    reason: str | None = Field(None, description="why the metrics are null")
    seconds: float = 0.0

    @property
    def shape_text(self) -> str:
        """The shape as reports show it, with the fitted block when the matrix was sampled."""
        text = "×".join(map(str, self.shape))
        return f"{text} (block {self.block[0]}×{self.block[1]})" if self.block else text


class SkippedLayer(_Model):
    name: str
    skipped: str


class Aggregate(_Model):
    layers: int
    discrepancy: float | None
    mean_distance: float | None
    fidelity: float | None
    fidelity_median: float | None


class Summary(_Model):
    all: Aggregate
    groups: dict[str, Aggregate]
    types: dict[str, Aggregate]
    table: dict[str, dict[str, Aggregate]] = Field(
        default_factory=dict,
        description="type → depth group → aggregate (the shape of the paper's Tables 2–3)",
    )


class Report(_Model):
    schema_version: Literal[1] = Field(1, description="the format's major version")
    schema_minor: int = minor_field("measure")
    tool: dict[str, str]
    protocol_version: int = PROTOCOL_VERSION
    source: SourceInfo
    family: FamilyInfo
    settings: dict[str, Any]
    layers: list[LayerResult | SkippedLayer]
    summary: Summary
    non_finite: list[str] = Field(default_factory=list, description="tensors with NaN/Inf")
    cache: CacheInfo | None = Field(None, description="result cache use (null: cache disabled)")
    created_at: str
    host: str
    seconds: float

    @property
    def measured(self) -> list[LayerResult]:
        return [layer for layer in self.layers if isinstance(layer, LayerResult)]

    @property
    def skipped(self) -> list[SkippedLayer]:
        return [layer for layer in self.layers if isinstance(layer, SkippedLayer)]

    def numbers(self) -> dict[str, Any]:
        """The report without timings, timestamps, host or thread count: two runs on the same
        inputs and settings must agree on this exactly."""
        data = self.model_dump(exclude={"created_at", "host", "seconds", "cache"})
        data["settings"] = {k: v for k, v in data["settings"].items() if k != "threads"}
        for layer in data["layers"]:
            layer.pop("seconds", None)
        return data


def depth_groups(depths: Iterable[int]) -> dict[int, str]:
    """Thirds of the distinct depths: bottom, middle, top (fewer than 3 depths: bottom first)."""
    ordered = sorted(set(depths))
    count = len(ordered)
    return {d: DEPTH_GROUPS[min(2, (3 * i) // max(1, count))] for i, d in enumerate(ordered)}


def _aggregate(layers: list[LayerResult]) -> Aggregate:
    ok = [layer for layer in layers if layer.discrepancy is not None]

    def mean(values: list[float]) -> float | None:
        return statistics.fmean(values) if values else None

    fids = [layer.fidelity for layer in ok if layer.fidelity is not None]
    return Aggregate(
        layers=len(ok),
        discrepancy=mean([layer.discrepancy for layer in ok if layer.discrepancy is not None]),
        mean_distance=mean(
            [layer.mean_distance for layer in ok if layer.mean_distance is not None]
        ),
        fidelity=mean(fids),
        fidelity_median=statistics.median(fids) if fids else None,
    )


def summarize(layers: list[LayerResult]) -> Summary:
    """Means over layers: all, per depth third, per type (null metrics left out)."""
    by_group: dict[str, list[LayerResult]] = defaultdict(list)
    by_type: dict[str, list[LayerResult]] = defaultdict(list)
    by_cell: dict[tuple[str, str], list[LayerResult]] = defaultdict(list)
    for layer in layers:
        by_group[layer.group].append(layer)
        by_type[layer.type].append(layer)
        by_cell[(layer.type, layer.group)].append(layer)
    return Summary(
        all=_aggregate(layers),
        groups={g: _aggregate(by_group[g]) for g in DEPTH_GROUPS if g in by_group},
        types={t: _aggregate(by_type[t]) for t in sorted(by_type)},
        table={
            t: {g: _aggregate(by_cell[(t, g)]) for g in DEPTH_GROUPS if (t, g) in by_cell}
            for t in sorted(by_type)
        },
    )


class BaselineInfo(_Model):
    ref: str = Field(description="the baseline as given or found")
    resolved_from: str = Field(description="where it came from (--baseline, adapter base, ...)")
    source: SourceInfo = Field(description="the checkpoint the baseline was made from")
    created_at: str
    seeds: int
    stored: bool = Field(
        description="false: measured from the checkpoint for a check (then kept in the cache)"
    )


class CheckReport(_Model):
    """The result of `dynaudit check` / `compare` (JSON schema v1, kind "check")."""

    schema_version: Literal[1] = Field(1, description="the format's major version")
    schema_minor: int = minor_field("check")
    kind: Literal["check"] = "check"
    tool: dict[str, str]
    protocol_version: int = PROTOCOL_VERSION
    source: SourceInfo
    baseline: BaselineInfo
    family: FamilyInfo
    settings: dict[str, Any]
    policy: Policy
    comparison: Comparison
    verdict: Verdict
    created_at: str
    host: str
    seconds: float


def read_report(data: object, where: str) -> Report | CheckReport:
    """A measure or check report parsed from JSON (``kind`` says which), read under the format
    contract: unknown fields dropped with one warning, a newer major version refused in one
    line (:class:`~dynaudit.errors.InputError`, exit 3), as is anything that is not a report."""
    if isinstance(data, dict) and data.get("kind") == "check":
        return read_versioned(CheckReport, data, FORMATS["check"], where)
    return read_versioned(Report, data, FORMATS["measure"], where)
