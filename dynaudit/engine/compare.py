"""Compare a planned checkpoint with its baseline layer by layer: warm refits from the stored
cold fits, read against their null refits (docs/gate.md, docs/method.md).

A checkpoint is **compared** by warm-starting from each stored cold fit on its own weights
(scaled by the reference's s) and reading its mean distance against the matching null refit,
so the optimiser's own drift cancels: K relative changes give a mean ± std per layer. Layers
whose bytes equal the baseline's are not refitted; of the others, seed 0 runs first and the
other seeds only where a verdict is near a threshold.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

import torch

from dynaudit.baseline_store import SKETCH, check_architecture, check_settings, read_coords
from dynaudit.config import FitSettings
from dynaudit.distributed import Ranks, assign, current
from dynaudit.dynamics import discrepancy, fit_coordinates
from dynaudit.dynamics.blocks import block_seed, block_shape, fit_flop, take_blocks
from dynaudit.dynamics.kernel import warm_steps
from dynaudit.dynamics.metrics import fidelity as fidelity_of
from dynaudit.dynamics.sketch import weight_figures
from dynaudit.engine.measure import load_layer
from dynaudit.engine.plan import Job, Planned, Progress, layer_groups, require_layers
from dynaudit.errors import BaselineError, DynauditError
from dynaudit.families import Detection, Family, Layer, detect_family
from dynaudit.gate import layer_undecided, scope_undecided
from dynaudit.runtime import to_device
from dynaudit.schema import (
    Baseline,
    BaselineLayer,
    Change,
    Comparison,
    FamilyInfo,
    GroupComparison,
    LayerComparison,
    Policy,
    scoped,
)
from dynaudit.tensors import Checkpoint

__all__ = ["Compared", "compare_checkpoint", "compare_plan", "displacement"]

# -- comparing --------------------------------------------------------------------------

# Sequential seeds (docs/gate.md): a layer's seed-0 figures stand for all K seeds unless a
# verdict lies within a margin of its threshold. The margin of a change c is
# SEQUENTIAL_FACTOR × (the baseline's noise for the layer + CHANGE_SHARE × |c|): the seeds'
# changes differ by about the baseline's own spread, and by a share of the change that grows
# with it (at most 3 % of it in the calibration's damage; docs/gate.md). A displacement's
# margin is DISPLACEMENT_SHARE of the policy's bound (seeds' displacements differed by at most
# 0.033 units where the bound is 0.6).
SEQUENTIAL_FACTOR: Final = 4.0
CHANGE_SHARE: Final = 0.02
DISPLACEMENT_SHARE: Final = 0.25


@dataclass
class _Refits:
    """A layer's warm refits so far, one entry per seed run (seeds 0, 1, … in order), and
    the figures read off seed 0 alone."""

    means: list[float] = field(default_factory=list)
    changes: list[float] = field(default_factory=list)
    absolute: list[float] = field(default_factory=list)
    moved: list[float] = field(default_factory=list)
    fidelity: float | None = None
    weight_change: float | None = None
    noise_likeness: float | None = None


@dataclass
class _Outcome:
    """What comparing one layer gave: a reason for null figures (with the finding it raises),
    bit-equal weights, or refits."""

    reason: str | None = None
    finding: Literal["non_finite", "zeroed"] | None = None
    unchanged: bool = False
    refits: _Refits | None = None
    seconds: float = 0.0


@dataclass
class _Run:
    """What every stage of a comparison shares."""

    checkpoint: Checkpoint
    family: Family
    baseline: Baseline
    root: Path
    device: torch.device
    settings: FitSettings
    by_name: dict[str, BaselineLayer]
    scales: dict[str, float]

    @classmethod
    def of(
        cls,
        checkpoint: Checkpoint,
        family: Family,
        baseline: Baseline,
        root: Path,
        device: torch.device,
    ) -> _Run:
        """The comparison with ``baseline`` (stored at ``root``): its settings, its layers by
        name, and the reference scale of each layer it fitted."""
        scales = {x.name: x.scale for x in baseline.layers if x.scale is not None}
        by_name = {layer.name: layer for layer in baseline.layers}
        settings = baseline.fit_settings()
        return cls(checkpoint, family, baseline, root, device, settings, by_name, scales)


def compare_plan(
    planned: Planned,
    baseline: Baseline,
    root: Path,
    job: Job,
    *,
    policy: Policy | None = None,
    all_seeds: bool = False,
) -> Comparison:
    """Warm-start every changed layer from the baseline's cold fits on this checkpoint's
    weights; a layer whose digest equals the baseline's has change 0 and is not refitted.
    Sequential seeds (unless ``all_seeds``): every changed layer's seed 0 first, then seeds
    1 … K − 1 only for the layers whose verdict under ``policy`` (or whose depth third's or
    the whole model's) lies within its margin of a threshold (:func:`_undecided`). With
    ``ranks`` (a torchrun job), each rank refits its share of each stage and every rank gets
    the whole comparison."""
    chosen = policy or Policy()
    plan, progress, ranks = planned.plan, job.progress, job.ranks
    run = _Run.of(planned.checkpoint, planned.family, baseline, root, job.device)
    seeds = baseline.seeds
    first = seeds if all_seeds else min(1, seeds)
    mine = _share(plan.layers, run, first, ranks)
    outcomes: dict[str, _Outcome] = {}
    for done, layer in enumerate(mine, start=1):
        outcomes[layer.name] = _first_stage(run, layer, first)
        if progress is not None:
            progress(done, len(mine), layer.name)
    outcomes = _merged(outcomes, ranks)
    groups = layer_groups(plan.layers)
    margins = {
        name: _margin(run.by_name[name], outcome.refits.changes[0], chosen)
        for name, outcome in outcomes.items()
        if outcome.refits is not None and outcome.refits.changes
    }
    if first < seeds:
        more = _undecided(plan.layers, outcomes, margins, run, groups, chosen)
        outcomes.update(_second_stage(run, more, outcomes, len(mine), progress, ranks))
    fidelity = {x.name: x.fidelity for x in baseline.report.measured}
    results = [
        _layer_result(
            layer,
            run.by_name[layer.name],
            outcomes[layer.name],
            groups[layer.name],
            fidelity.get(layer.name),
            None if first == seeds else margins.get(layer.name),
        )
        for layer in plan.layers
    ]
    return _comparison(plan.layers, results, outcomes, seeds, all_seeds)


def _second_stage(
    run: _Run,
    layers: list[Layer],
    outcomes: dict[str, _Outcome],
    done: int,
    progress: Progress | None,
    ranks: Ranks | None,
) -> dict[str, _Outcome]:
    """The undecided ``layers``' outcomes with their other K − 1 seeds refitted (this rank's
    share, then every rank's); progress counts on from the ``done`` layers of the first
    stage."""
    if not layers:
        return {}
    seeds = run.baseline.seeds
    again = _share(layers, run, seeds - 1, ranks)
    extended: dict[str, _Outcome] = {}
    for count, layer in enumerate(again, start=done + 1):
        extended[layer.name] = _later_seeds(run, layer, outcomes[layer.name], seeds)
        if progress is not None:
            progress(count, done + len(again), layer.name)
    return _merged(extended, ranks)


def _share(layers: list[Layer], run: _Run, seeds: int, ranks: Ranks | None) -> list[Layer]:
    """This rank's share of ``layers`` (all of them outside a torchrun job), balanced by the
    cost of ``seeds`` warm refits each."""
    if ranks is None:
        return layers
    costs = [_refit_cost(run.by_name[layer.name], run.settings, seeds) for layer in layers]
    owners = assign(costs, ranks.size)
    return [x for x, owner in zip(layers, owners, strict=True) if owner == ranks.rank]


def _merged(outcomes: dict[str, _Outcome], ranks: Ranks | None) -> dict[str, _Outcome]:
    """Every rank's outcomes (this one's alone outside a torchrun job)."""
    if ranks is None:
        return outcomes
    return {name: x for part in ranks.gather(outcomes) for name, x in part.items()}


def _first_stage(run: _Run, layer: Layer, seeds: int) -> _Outcome:
    """Load a layer and settle it: null figures (NaN/Inf, not fitted, all zeros), unchanged
    (its digest is the baseline's), or warm refits from the first ``seeds`` stored cold fits."""
    started = time.perf_counter()
    outcome = _settle(run, layer, seeds)
    outcome.seconds = time.perf_counter() - started
    return outcome


def _settle(run: _Run, layer: Layer, seeds: int) -> _Outcome:
    ref = run.by_name[layer.name]
    loaded = load_layer(run.checkpoint, run.family, layer, run.scales)
    if loaded.non_finite:
        return _Outcome(reason=loaded.reason, finding="non_finite")
    if ref.coords is None:
        return _Outcome(reason=f"not fitted in the baseline ({ref.reason})")
    if loaded.reason is not None:
        return _Outcome(reason=f"damage: {loaded.reason}", finding="zeroed")
    if ref.digest is not None and loaded.digest == ref.digest:
        return _Outcome(unchanged=True)
    refits = _Refits()
    target = loaded.matrices.div_(loaded.scale or 1.0)
    _warm_refits(target, read_coords(run.root, run.baseline, ref), ref, run, range(seeds), refits)
    return _Outcome(refits=refits)


def _later_seeds(run: _Run, layer: Layer, outcome: _Outcome, seeds: int) -> _Outcome:
    """``outcome`` with the warm refits of seeds 1 … ``seeds`` − 1 added (the layer is read
    again: keeping every changed layer in memory between the stages would hold the model)."""
    started = time.perf_counter()
    ref = run.by_name[layer.name]
    assert outcome.refits is not None  # only refitted layers are undecided
    before = outcome.refits
    refits = replace(
        before,
        means=[*before.means],
        changes=[*before.changes],
        absolute=[*before.absolute],
        moved=[*before.moved],
    )
    loaded = load_layer(run.checkpoint, run.family, layer, run.scales)
    target = loaded.matrices.div_(loaded.scale or 1.0)
    stored = read_coords(run.root, run.baseline, ref)
    _warm_refits(target, stored, ref, run, range(len(refits.changes), seeds), refits)
    return replace(outcome, refits=refits, seconds=outcome.seconds + time.perf_counter() - started)


def _refit_cost(ref: BaselineLayer, settings: FitSettings, seeds: int) -> float:
    """FLOP of ``seeds`` warm refits of a layer."""
    if ref.coords is None:
        return 0.0
    g, m, n = ref.shape
    return g * fit_flop(settings, m, n, warm=True) * seeds


def _warm_refits(
    target: torch.Tensor,
    stored: dict[str, torch.Tensor],
    ref: BaselineLayer,
    run: _Run,
    seeds: range,
    refits: _Refits,
) -> None:
    """Warm-start from the stored cold fits of ``seeds`` on ``target`` (W / s) and add each
    one's figures to ``refits``; seed 0 also gives the fidelity and the weight figures."""
    settings = run.settings
    g, m, n = target.shape
    shape = block_shape(m, n, settings.max_entries)
    steps = warm_steps(settings, *shape)
    for k in seeds:
        cold = stored[f"cold.{k}"].to(run.device)
        null = stored[f"null.{k}"].to(run.device)
        # The rows and columns this seed's cold fit saw (all of them below max_entries).
        blocks = [block_seed(settings.seed + k, ref.name, group) for group in range(g)]
        fitted = to_device(take_blocks(target, shape, blocks), run.device)
        warm = fit_coordinates(fitted, settings, cold, steps=steps, lr=settings.warm_lr)
        _, md = discrepancy(warm)
        new = float(md.mean())
        base = ref.null_mean_distance[k]
        refits.means.append(new)
        refits.absolute.append(new - base)
        refits.changes.append((new - base) / base if base else 0.0)
        refits.moved.append(displacement(warm, null) / base if base else 0.0)
        if k == 0:
            refits.fidelity = float(fidelity_of(warm, fitted).mean())
            if SKETCH in stored:  # an older baseline has none: no weight-change figures
                refits.weight_change, refits.noise_likeness = weight_figures(
                    fitted, stored[SKETCH], ref.name
                )


def _margin(ref: BaselineLayer, change: float, policy: Policy) -> float:
    """How far a layer's mean change over all K seeds may lie from its seed-0 change (module
    constants above): the baseline's own noise for the layer — the relative spread of its K
    cold and of its K null mean distances, its null drift, at least the policy's noise floor
    — plus :data:`CHANGE_SHARE` of the change, times :data:`SEQUENTIAL_FACTOR`."""
    spread = max(_relative_spread(ref.cold_mean_distance), _relative_spread(ref.null_mean_distance))
    noise = max(spread, _null_drift(ref) or 0.0, policy.noise_floor / 100)
    return SEQUENTIAL_FACTOR * (noise + CHANGE_SHARE * abs(change))


def _relative_spread(values: list[float]) -> float:
    if len(values) < 2 or not statistics.fmean(values):
        return 0.0
    return statistics.stdev(values) / abs(statistics.fmean(values))


def _undecided(
    layers: list[Layer],
    outcomes: dict[str, _Outcome],
    margins: dict[str, float],
    run: _Run,
    groups: dict[str, str],
    policy: Policy,
) -> list[Layer]:
    """The refitted layers that need their other seeds, in plan order (every rank of a job
    computes the same list): those whose own verdict is near a threshold, and every refitted
    layer of a scope (all layers, a depth third) whose verdict is. Unchanged layers take part
    in their scopes with change 0 and margin 0."""
    seed0: dict[str, float] = {}
    near: set[str] = set()
    scopes: dict[str, list[str]] = {}
    for layer in layers:
        name, refits = layer.name, outcomes[layer.name].refits
        if refits is not None:
            seed0[name] = refits.changes[0]
            change, moved = refits.changes[0], refits.moved[0]
            if layer_undecided(change, margins[name], moved, DISPLACEMENT_SHARE, policy):
                near.add(name)
        if outcomes[name].unchanged or refits is not None:
            scopes.setdefault("all", []).append(name)
            scopes.setdefault(groups[name], []).append(name)
    for scope, names in scopes.items():
        limit = policy.drop_limit(scope)
        change = statistics.fmean(seed0.get(name, 0.0) for name in names)
        margin = statistics.fmean(margins.get(name, 0.0) for name in names)
        drift = statistics.fmean(_null_drift(run.by_name[name]) or 0.0 for name in names)
        if scope_undecided(change, drift, margin, limit, policy):
            near.update(name for name in names if name in seed0)
    return [layer for layer in layers if layer.name in near]


def _layer_result(
    layer: Layer,
    ref: BaselineLayer,
    outcome: _Outcome,
    group: str,
    fidelity: float | None,
    margin: float | None,
) -> LayerComparison:
    """A layer's row of the comparison. An unchanged layer has what a refit of the same
    weights gives — change 0, the null refits' mean distance, no displacement, no weight
    change — and the baseline's fidelity."""
    drift = _null_drift(ref)
    figures: dict[str, Any] = {"reason": outcome.reason}
    if outcome.unchanged:
        figures = {
            "mean_distance": _mean(ref.null_mean_distance),
            "change": Change(mean=0.0, std=0.0, absolute=0.0, seeds=len(ref.null_mean_distance)),
            "displacement": 0.0,
            "noise": drift or 0.0,
            "fidelity": fidelity,
            "weight_change": 0.0,
        }
    elif outcome.refits is not None:
        figures = _figures(outcome.refits, drift)
    return LayerComparison(
        name=layer.name,
        type=layer.type,
        depth=layer.depth,
        group=group,
        expert=layer.expert,
        shape=ref.shape,
        baseline_mean_distance=_mean(ref.null_mean_distance),
        mean_distance=figures.get("mean_distance"),
        change=figures.get("change"),
        displacement=figures.get("displacement"),
        null_drift=drift,
        weight_change=figures.get("weight_change"),
        noise_likeness=figures.get("noise_likeness"),
        noise=figures.get("noise"),
        fidelity=figures.get("fidelity"),
        reason=figures.get("reason"),
        unchanged=outcome.unchanged if outcome.reason is None else None,
        margin=margin if outcome.refits is not None else None,
        seconds=round(outcome.seconds, 3),
    )


def _figures(refits: _Refits, drift: float | None) -> dict[str, Any]:
    """A refitted layer's figures: means over the seeds run, and seed 0's fidelity and
    weight figures."""
    changes = refits.changes
    std = statistics.stdev(changes) if len(changes) > 1 else 0.0
    change = Change(
        mean=statistics.fmean(changes),
        std=std,
        absolute=statistics.fmean(refits.absolute),
        seeds=len(changes),
    )
    return {
        "mean_distance": statistics.fmean(refits.means),
        "change": change,
        "displacement": statistics.fmean(refits.moved),
        "noise": max(std, drift or 0.0),
        "fidelity": refits.fidelity,
        "weight_change": refits.weight_change,
        "noise_likeness": refits.noise_likeness,
    }


def _comparison(
    layers: list[Layer],
    results: list[LayerComparison],
    outcomes: dict[str, _Outcome],
    seeds: int,
    all_seeds: bool,
) -> Comparison:
    """The per-layer rows with their groups, findings and refit counts."""
    per_seed = {
        name: x.refits.changes if x.refits is not None else [0.0] * seeds
        for name, x in outcomes.items()
        if x.unchanged or x.refits is not None
    }
    every, groups, types = scoped(results, lambda rows: _group(rows, per_seed))
    return Comparison(
        layers=results,
        all=every,
        groups=groups,
        types=types,
        non_finite=[x.name for x in layers if outcomes[x.name].finding == "non_finite"],
        zeroed=[x.name for x in layers if outcomes[x.name].finding == "zeroed"],
        unchanged=[x.name for x in layers if outcomes[x.name].unchanged],
        refits=sum(len(x.refits.changes) for x in outcomes.values() if x.refits is not None),
        refits_full=seeds * len(per_seed),
        seed_rule="all" if all_seeds else "sequential",
    )


def displacement(coords: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean distance a neuron moved from ``reference``, after aligning each piece by
    translation and rotation (distances are invariant to both), averaged over matrices."""
    a = coords.double() - coords.double().mean(dim=2, keepdim=True)
    b = reference.double() - reference.double().mean(dim=2, keepdim=True)
    u, _, vh = torch.linalg.svd(a.mT @ b)  # (g, H, k, k): orthogonal Procrustes per piece
    aligned = a @ (u @ vh)
    per_neuron = (aligned - b).pow(2).sum(dim=(1, 3)).sqrt()  # (g, N), over pieces and dims
    return float(per_neuron.mean())


def _null_drift(ref: BaselineLayer) -> float | None:
    pairs = list(zip(ref.cold_mean_distance, ref.null_mean_distance, strict=False))
    if not pairs:
        return None
    return statistics.fmean(abs(null - cold) / cold for cold, null in pairs if cold)


def _group(layers: list[LayerComparison], per_seed: dict[str, list[float]]) -> GroupComparison:
    """A group's change is the mean of its layers' relative changes, per seed, over the seeds
    every member has (sequential seeds refit some layers once: then seed 0 alone); mean ± std
    over those seeds. Its noise is the larger of that std and the mean null drift of its
    layers."""
    measured = [layer for layer in layers if layer.name in per_seed]
    if not measured:
        return GroupComparison(layers=0, change=None, noise=None, displacement=None)
    seeds = min(len(per_seed[x.name]) for x in measured)
    by_seed = [statistics.fmean(per_seed[x.name][k] for x in measured) for k in range(seeds)]
    std = statistics.stdev(by_seed) if seeds > 1 else 0.0
    absolute = statistics.fmean(x.change.absolute for x in measured if x.change is not None)
    drift = statistics.fmean(x.null_drift or 0.0 for x in measured)
    moved = [x.displacement for x in measured if x.displacement is not None]
    return GroupComparison(
        layers=len(measured),
        change=Change(mean=statistics.fmean(by_seed), std=std, absolute=absolute, seeds=seeds),
        noise=max(std, drift),
        displacement=max(moved) if moved else None,
    )


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


@dataclass(frozen=True)
class Compared:
    """What comparing a checkpoint with its baseline gave, and how it ran (for the report)."""

    family: FamilyInfo
    settings: dict[str, object]
    comparison: Comparison


def compare_checkpoint(
    checkpoint: Checkpoint,
    uri: str,
    stored: Baseline,
    root: Path,
    *,
    ref: str,
    family: str | None,
    settings: Mapping[str, object],
    policy: Policy,
    all_seeds: bool,
    progress: Progress | None,
) -> Compared:
    """Refit the opened candidate's changed layers from the baseline ``stored`` at ``root``,
    with the baseline's settings (``device`` and ``threads`` as given) and its family unless
    ``family`` names another."""
    import torch

    from dynaudit.runtime import pick_device, torch_scope

    # Device and threads are where the refits run, not what they compute.
    runtime = {"device": settings.get("device", "auto"), "threads": settings.get("threads")}
    numeric = {k: v for k, v in settings.items() if k not in runtime}
    check_settings(stored, numeric, str(ref))
    fit = stored.fit_settings().model_copy(update=runtime)
    device = pick_device(fit.device)
    planned = _plan_like(checkpoint, uri, stored, family)
    job = Job(device, progress, current())  # a torchrun job: each rank refits its share
    with torch_scope(device, fit.threads):
        threads = torch.get_num_threads()
        comparison = compare_plan(planned, stored, root, job, policy=policy, all_seeds=all_seeds)
    settings_used = {**fit.numeric(), "device": device.type, "threads": threads}
    return Compared(planned.info(), settings_used, comparison)


def _plan_like(checkpoint: Checkpoint, uri: str, stored: Baseline, family: str | None) -> Planned:
    """The candidate planned as its baseline was: by the baseline's family (named so), unless
    the user chose ``family``. A candidate that family cannot plan has another architecture
    than the baseline's: a baseline error, unless the family was the user's choice."""
    detection = detect_family(checkpoint, family or stored.family.name)
    if family is None:  # not the user's choice: the baseline's family, named so
        detection = Detection(detection.family, 1.0, "the baseline's family")
    try:
        plan = detection.family.plan(checkpoint)
    except DynauditError as exc:
        if family is not None:  # the user's own --family: their error stands
            raise
        raise BaselineError(
            f"{uri}: architecture differs from the baseline ({stored.source.uri},"
            f" family {stored.family.name}): {exc.message}; check it against a baseline "
            "of its own base model",
            uri=uri,
        ) from exc
    require_layers(plan, detection, uri)
    check_architecture(stored, checkpoint, plan, uri)
    return Planned(checkpoint, detection, plan)
