"""Every output dynaudit writes, as strict pydantic models: the measure report, the check
report with its comparison, policy and verdict, the inspection, and the baseline's record.

The models are strict (unknown fields are an error when writing); :func:`read_report` reads a
report under the format contract of :mod:`dynaudit.schemas` (newer minor versions welcome,
newer major versions refused). Each format's version and JSON Schema: docs/formats.md."""

from __future__ import annotations

import platform
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any, Final, Literal, Protocol, TypedDict, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from dynaudit._version import __version__
from dynaudit.config import PROTOCOL_VERSION, FitSettings
from dynaudit.schemas import FORMATS, minor_field, read_versioned, written_minor

__all__ = [
    "BASELINE_FORMAT",
    "DEPTH_GROUPS",
    "Aggregate",
    "Baseline",
    "BaselineInfo",
    "BaselineLayer",
    "BranchGain",
    "CacheInfo",
    "Change",
    "CheckReport",
    "Comparison",
    "DepthGroup",
    "Envelope",
    "ExpertAggregate",
    "ExpertSpread",
    "FamilyInfo",
    "FigureRange",
    "Finding",
    "GroupComparison",
    "InspectedLayer",
    "Inspection",
    "LayerComparison",
    "LayerResult",
    "PassThroughNode",
    "Policy",
    "Report",
    "ScopeKind",
    "SkippedLayer",
    "SourceInfo",
    "Spread",
    "StructuralClass",
    "Structure",
    "Summary",
    "Verdict",
    "depth_groups",
    "envelope",
    "read_report",
    "scope_label",
    "scoped",
    "summarize",
    "tool_info",
]

DepthGroup = Literal["bottom", "middle", "top"]  # thirds of a model's depth
DEPTH_GROUPS: tuple[DepthGroup, ...] = ("bottom", "middle", "top")
StructuralClass = Literal["non-augmented", "augmented", "bottleneck"]
# The layout of a baseline directory and of baseline.json: bump when an older dynaudit could
# not read a new baseline. A baseline without the field is format 1 (all baselines so far). A
# change an older dynaudit can read by ignoring fields bumps the minor instead.
BASELINE_FORMAT: Final = 1


# -- scopes -------------------------------------------------------------------------------

ScopeKind = Literal["all", "group", "type"]
_Figures = TypeVar("_Figures")
_Row = TypeVar("_Row", bound="_Placed")


class _Placed(Protocol):
    """A per-layer row: its depth third and its type place it in its scopes."""

    @property
    def group(self) -> str: ...

    @property
    def type(self) -> str: ...


def scoped(
    rows: list[_Row], figures: Callable[[list[_Row]], _Figures]
) -> tuple[_Figures, dict[str, _Figures], dict[str, _Figures]]:
    """``figures`` of every scope of ``rows``: all of them, each depth third present (bottom
    to top) and each layer type (sorted); rows keep their order within a scope. What
    :meth:`Summary.scopes` and :meth:`Comparison.scopes` list, built in one pass (a scan per
    type was quadratic: a generic checkpoint has a type per layer)."""
    by_group: dict[str, list[_Row]] = defaultdict(list)
    by_type: dict[str, list[_Row]] = defaultdict(list)
    for row in rows:
        by_group[row.group].append(row)
        by_type[row.type].append(row)
    groups: dict[str, _Figures] = {g: figures(by_group[g]) for g in DEPTH_GROUPS if g in by_group}
    return figures(rows), groups, {t: figures(by_type[t]) for t in sorted(by_type)}


def _scopes(
    all_: _Figures, groups: dict[str, _Figures], types: dict[str, _Figures]
) -> list[tuple[ScopeKind, str, _Figures]]:
    every: list[tuple[ScopeKind, str, _Figures]] = [("all", "all", all_)]
    every += [("group", name, figures) for name, figures in groups.items()]
    every += [("type", name, figures) for name, figures in types.items()]
    return every


def scope_label(kind: ScopeKind, name: str) -> str:
    """How a check report names a scope: ``all layers``, ``bottom third``, ``type attn``."""
    return {"all": "all layers", "group": f"{name} third", "type": f"type {name}"}[kind]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# -- measure ------------------------------------------------------------------------------


class SourceInfo(_Model):
    uri: str
    path: str
    revision: str | None = None
    files: dict[str, str] = Field(description="weight file → sha256")
    selection: str | None = Field(
        None,
        description="which weight files were audited and why, when others were present; "
        "where the weights were found (a training checkpoint's key, a sentence-transformers "
        "module); FP8 weights dequantized as read (absent when every weight file present was "
        "audited whole, as stored)",
        exclude_if=lambda value: value is None,
    )


class Envelope(TypedDict):
    """The fields every report shares: who made it, from what, when and where."""

    tool: dict[str, str]
    source: SourceInfo
    created_at: str
    host: str


def tool_info() -> dict[str, str]:
    """The ``tool`` of every output: this dynaudit's name and version."""
    return {"name": "dynaudit", "version": __version__}


def envelope(source: SourceInfo) -> Envelope:
    """The envelope of a report made now from ``source``, for ``Report(**envelope(source),
    ...)`` and ``CheckReport(...)``: the tool, the source, the time (UTC, to the second) and
    this host's name. A baseline takes its report's tool, source and time."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return Envelope(tool=tool_info(), source=source, created_at=now, host=platform.node())


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
    group: DepthGroup
    expert: int | None = Field(
        None,
        description="a mixture-of-experts layer's expert index (absent for other layers)",
        exclude_if=lambda value: value is None,
    )
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


class ExpertAggregate(_Model):
    """Means over the layers of one expert: expert ``expert`` of the block at ``depth``."""

    depth: int
    expert: int
    layers: int
    discrepancy: float | None
    mean_distance: float | None
    fidelity: float | None


class FigureRange(_Model):
    """How one figure ranges over the experts, each taken as the mean over its layers."""

    min: float
    max: float
    mean: float
    std: float = Field(description="population standard deviation over the experts")
    lowest: list[int] = Field(description="[depth, expert] of the expert with the minimum")
    highest: list[int] = Field(description="[depth, expert] of the expert with the maximum")


class ExpertSpread(_Model):
    """The spread across the experts of a mixture of experts (:class:`ExpertAggregate`)."""

    experts: int = Field(description="experts with figures (one per block and expert index)")
    mean_distance: FigureRange | None
    discrepancy: FigureRange | None
    fidelity: FigureRange | None


class Summary(_Model):
    all: Aggregate
    groups: dict[str, Aggregate]
    types: dict[str, Aggregate]
    table: dict[str, dict[str, Aggregate]] = Field(
        default_factory=dict,
        description="type → depth group → aggregate (the shape of the paper's Tables 2–3)",
    )
    experts: list[ExpertAggregate] | None = Field(
        None,
        description="mixture of experts: means over each expert's layers, one entry per block "
        "and expert index, in depth then expert order (absent without experts)",
        exclude_if=lambda value: value is None,
    )
    expert_spread: ExpertSpread | None = Field(
        None,
        description="mixture of experts: min, max, mean and std of the per-expert means, and "
        "which experts are lowest and highest (absent without experts)",
        exclude_if=lambda value: value is None,
    )

    def scopes(self) -> list[tuple[ScopeKind, str, Aggregate]]:
        """(kind, name, figures) of every scope in report order: all layers (named "all"),
        each depth third present, bottom to top, each layer type, sorted."""
        return _scopes(self.all, self.groups, self.types)


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

    def model_post_init(self, context: Any, /) -> None:
        written_minor(self, "measure", self.minor_needed())

    def minor_needed(self) -> int:
        """1 with a mixture of experts' fields (expert indices, per-expert aggregates)."""
        experts = any(getattr(x, "expert", None) is not None for x in self.layers)
        return int(experts or self.summary.experts is not None)


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
    """Means over layers: all, per depth third, per type (null metrics left out), and per
    type and third; with experts, per expert and their spread."""
    every, groups, types = scoped(layers, _aggregate)
    by_type: dict[str, list[LayerResult]] = defaultdict(list)
    for layer in layers:
        by_type[layer.type].append(layer)
    table = {t: scoped(by_type[t], _aggregate)[1] for t in sorted(by_type)}
    experts = _experts(layers)
    return Summary(
        all=every,
        groups=groups,
        types=types,
        table=table,
        experts=experts or None,
        expert_spread=_expert_spread(experts) if experts else None,
    )


def _experts(layers: list[LayerResult]) -> list[ExpertAggregate]:
    """Each expert's means over its layers (null metrics left out): an expert is one expert
    index of one block, since expert 3 of one block shares nothing with expert 3 of another."""
    by_expert: dict[tuple[int, int], list[LayerResult]] = defaultdict(list)
    for layer in layers:
        if layer.expert is not None:
            by_expert[layer.depth, layer.expert].append(layer)
    out = []
    for (depth, expert), members in sorted(by_expert.items()):
        figures = _aggregate(members)
        out.append(
            ExpertAggregate(
                depth=depth,
                expert=expert,
                layers=figures.layers,
                discrepancy=figures.discrepancy,
                mean_distance=figures.mean_distance,
                fidelity=figures.fidelity,
            )
        )
    return out


def _expert_spread(experts: list[ExpertAggregate]) -> ExpertSpread:
    def spread(figure: Literal["mean_distance", "discrepancy", "fidelity"]) -> FigureRange | None:
        values = [
            (v, [x.depth, x.expert]) for x in experts if (v := getattr(x, figure)) is not None
        ]
        if not values:
            return None
        low, high = min(values, key=lambda p: p[0]), max(values, key=lambda p: p[0])
        numbers = [v for v, _ in values]
        return FigureRange(
            min=low[0],
            max=high[0],
            mean=statistics.fmean(numbers),
            std=statistics.pstdev(numbers),
            lowest=low[1],
            highest=high[1],
        )

    return ExpertSpread(
        experts=sum(1 for x in experts if x.layers),
        mean_distance=spread("mean_distance"),
        discrepancy=spread("discrepancy"),
        fidelity=spread("fidelity"),
    )


# -- check --------------------------------------------------------------------------------


class Change(_Model):
    """Relative change of the mean distance against the baseline, over the K baseline seeds."""

    mean: float = Field(description="mean over seeds of (new − null) / null")
    std: float = Field(description="standard deviation over seeds (0 with one seed)")
    absolute: float = Field(description="mean over seeds of new − null, in units of s")
    seeds: int


class LayerComparison(_Model):
    name: str
    type: str
    depth: int
    group: DepthGroup
    expert: int | None = Field(
        None,
        description="a mixture-of-experts layer's expert index (absent for other layers)",
        exclude_if=lambda value: value is None,
    )
    shape: list[int]
    baseline_mean_distance: float | None = Field(description="mean of the K null refits")
    mean_distance: float | None = Field(description="mean of the K warm refits")
    change: Change | None
    displacement: float | None = Field(
        description="mean neuron displacement from the null refit after per-piece Procrustes "
        "alignment, in units of the baseline's mean distance (mean over seeds)"
    )
    null_drift: float | None = Field(description="|null − cold| / cold, mean over seeds")
    weight_change: float | None = Field(
        None,
        description="‖W − W_baseline‖ / ‖W_baseline‖ of the seed-0 block, estimated from the "
        "baseline's sketch of the weights (dynamics.sketch); null for baselines without one",
    )
    noise_likeness: float | None = Field(
        None,
        description="effective rank of the weight change over that of i.i.d. noise through the "
        "same sketch: ≈ 1 for noise, lower for a structured update; null when nothing moved",
    )
    noise: float | None = Field(description="max(std, null drift, floor): what a change must beat")
    fidelity: float | None
    reason: str | None = Field(None, description="why the figures are null (damage or NaN)")
    unchanged: bool | None = Field(
        None,
        description="true: the layer's float32 matrices are bit-equal to the baseline's (same "
        "digest): change 0, no refit",
        exclude_if=lambda value: value is None,
    )
    margin: float | None = Field(
        None,
        description="sequential seeds: how far from a threshold the seed-0 change had to be "
        "to stand for all K seeds (null: all seeds run, or no refit)",
        exclude_if=lambda value: value is None,
    )
    seconds: float = 0.0


class GroupComparison(_Model):
    layers: int
    change: Change | None = Field(description="mean of the layers' relative changes, per seed")
    noise: float | None
    displacement: float | None = Field(description="largest layer displacement in the group")


class Comparison(_Model):
    layers: list[LayerComparison]
    all: GroupComparison
    groups: dict[str, GroupComparison]
    types: dict[str, GroupComparison]
    non_finite: list[str] = Field(default_factory=list)
    zeroed: list[str] = Field(default_factory=list, description="layers that became all zeros")
    unchanged: list[str] | None = Field(
        None,
        description="layers bit-equal to the baseline's (same digest): not refitted",
        exclude_if=lambda value: value is None,
    )
    refits: int | None = Field(
        None,
        description="warm refits run (one per layer and seed)",
        exclude_if=lambda value: value is None,
    )
    refits_full: int | None = Field(
        None,
        description="warm refits a check would run without digests and with all K seeds",
        exclude_if=lambda value: value is None,
    )
    seed_rule: Literal["sequential", "all"] | None = Field(
        None,
        description="sequential: seeds beyond the first only where a verdict was near a "
        "threshold; all: every seed for every changed layer",
        exclude_if=lambda value: value is None,
    )

    def scopes(self) -> list[tuple[ScopeKind, str, GroupComparison]]:
        """(kind, name, figures) of every scope, as :meth:`Summary.scopes` lists them."""
        return _scopes(self.all, self.groups, self.types)


class Policy(_Model):
    """Gate thresholds (percent unless stated). Defaults: docs/gate.md, from the calibration in
    experiments/calibrate_gate.py."""

    max_drop_all: float = Field(2.0, ge=0, description="% drop of the all-layers mean distance")
    max_drop_group: float = Field(3.0, ge=0, description="% drop of any depth group's")
    noise_multiple: float = Field(3.0, ge=0, description="a drop must exceed z × its noise")
    max_layer_change: float = Field(
        25.0, gt=0, description="% change of any layer, either direction (damage)"
    )
    max_displacement: float | None = Field(
        None, gt=0, description="neuron displacement bound (units of the mean distance); off"
    )
    max_weight_change: float | None = Field(
        80.0, gt=0, description="% change of any layer's weights, ‖ΔW‖/‖W‖ (damage); None: off"
    )
    max_noise_change: float | None = Field(
        20.0, gt=0, description="% change of any layer's weights that looks like noise; None: off"
    )
    min_noise_likeness: float = Field(
        0.8, gt=0, description="the noise likeness from which a change counts as noise-like"
    )
    noise_floor: float = Field(0.05, ge=0, description="the smallest noise assumed, %")

    def drop_limit(self, scope: str) -> float:
        """The largest drop, %, the scope ``all`` or a depth third may show."""
        return self.max_drop_all if scope == "all" else self.max_drop_group


class Finding(_Model):
    """One reason a check failed, with what it concerns (for annotations and JUnit)."""

    kind: Literal["capacity_loss", "damage", "non_finite"]
    groups: list[str] = Field(description="'all', depth thirds and layer types it concerns")
    layers: list[str] = Field(default_factory=list)
    message: str


class Verdict(_Model):
    verdict: Literal["pass", "fail"]
    reasons: list[str] = Field(description="why it failed; what was checked when it passed")
    findings: list[Finding] = Field(default_factory=list)
    failing_groups: list[str] = Field(default_factory=list)
    failing_layers: list[str] = Field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"


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

    def model_post_init(self, context: Any, /) -> None:
        needed = any(x.expert is not None for x in self.comparison.layers)
        written_minor(self, "check", int(needed))


# -- inspect ------------------------------------------------------------------------------


class InspectedLayer(_Model):
    name: str
    type: str
    depth: int
    expert: int | None = Field(
        None,
        description="a mixture-of-experts layer's expert index (absent for other layers)",
        exclude_if=lambda value: value is None,
    )
    shape: list[int]
    dtype: str
    matrices: int
    neurons: int
    gflop: float  # fit cost at the given settings, all seeds
    inputs: list[str] = Field(
        description="layers (and pass-through nodes) whose outputs feed this layer's inputs"
    )
    reads_input: bool = Field(description="reads the model's input (directly or via a stream)")
    rank: int | None = Field(
        None, description="numerical rank (--weights; null above the exact-rank size limit)"
    )
    full_rank: int | None = Field(None, description="min(m, n)")
    spectral_norm: float | None = Field(None, description="largest singular value (--weights)")


class PassThroughNode(_Model):
    """A tensor that is not fitted but stays in the layer graph: an operation that forwards
    its input channels one by one (a depthwise convolution), between the layers it joins."""

    name: str
    type: str
    depth: int
    shape: list[int]
    dtype: str
    inputs: list[str] = Field(description="layers (and nodes) whose outputs feed it")
    reads_input: bool = Field(description="reads the model's input (directly or via a stream)")
    skipped: str = Field(description="why it is not fitted")
    spectral_norm: float | None = Field(
        None, description="largest norm of a channel's kernel (--weights; in branch gains)"
    )


class Structure(_Model):
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


class BranchGain(_Model):
    """Product of the spectral norms of the matrices along a residual branch: an indicator of
    the branch's gain, not a bound — activations, token mixing in attention, the softmax and
    the conv operator norm (up to √(kh·kw) × the reshaped kernel's) all stand between them."""

    block: str
    branch: str
    layers: list[str]
    gain: float
    note: str


class Inspection(_Model):
    """What ``dynaudit inspect`` finds; its JSON is the versioned "inspect" format
    (:mod:`dynaudit.schemas`)."""

    schema_version: Literal[1] = Field(1, description="the format's major version")
    schema_minor: int = minor_field("inspect")
    uri: str
    files: list[str]
    selection: str | None = Field(
        None,
        description="as the measure report's source.selection: which weight files were read, "
        "and where the weights were found in a training checkpoint (its key) (minor 1)",
        exclude_if=lambda value: value is None,
    )
    family: FamilyInfo
    layers: list[InspectedLayer]
    skipped: list[SkippedLayer]
    pass_through: list[PassThroughNode] = Field(
        default_factory=list,
        description="skipped tensors kept in the layer graph (depthwise convolutions), with "
        "what feeds them; the layers after them list them as inputs (minor 1)",
        exclude_if=lambda nodes: not nodes,
    )
    structure: Structure
    gains: list[BranchGain] = Field(default_factory=list)
    tensors: int
    bytes: int
    parameters: int
    gflop: float

    def model_post_init(self, context: Any, /) -> None:
        experts = any(x.expert is not None for x in self.layers)
        needed = bool(self.pass_through or self.selection is not None or experts)
        written_minor(self, "inspect", int(needed))


# -- baseline -----------------------------------------------------------------------------


class BaselineLayer(_Model):
    name: str
    type: str
    depth: int
    group: DepthGroup
    shape: list[int] = Field(description="matrix shape (g, m, n) as fitted")
    scale: float | None
    coords: str | None = Field(description="file under coords/, null when not fitted")
    cold_mean_distance: list[float] = Field(default_factory=list, description="per seed")
    null_mean_distance: list[float] = Field(default_factory=list, description="per seed")
    reason: str | None = None
    digest: str | None = Field(
        None,
        description="sha256 of the layer's float32 (g, m, n) matrices before scaling "
        "(engine.layer_digest); a checked layer with the same digest is not refitted. Absent "
        "from baselines made before digests: their layers are always refitted",
    )


class Baseline(_Model):
    format_version: Literal[1] = Field(BASELINE_FORMAT, description="the format's major version")
    format_minor: int = minor_field("baseline")
    protocol_version: int
    tool: dict[str, str]
    created_at: str
    source: SourceInfo
    family: FamilyInfo
    settings: dict[str, Any] = Field(description="the fit settings every comparison must use")
    seeds: int
    layers: list[BaselineLayer]
    report: Report = Field(description="the reference's own measurement (cold fits)")
    stored_at: str | None = Field(None, description="where it was stored (dir or runs:/ URI)")

    def fit_settings(self) -> FitSettings:
        return FitSettings(**self.settings)

    def model_post_init(self, context: Any, /) -> None:
        written_minor(self, "baseline", self.report.minor_needed())


def read_report(data: object, where: str) -> Report | CheckReport:
    """A measure or check report parsed from JSON (``kind`` says which), read under the format
    contract: unknown fields dropped with one warning, a newer major version refused in one
    line (:class:`~dynaudit.errors.InputError`, exit 3), as is anything that is not a report."""
    if isinstance(data, dict) and data.get("kind") == "check":
        return read_versioned(CheckReport, data, FORMATS["check"], where)
    return read_versioned(Report, data, FORMATS["measure"], where)
