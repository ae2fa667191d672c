"""Baselines and comparisons (SPEC §4.9, §5).

A **baseline** of a reference checkpoint holds, per layer, K cold fits (K seeds) and, for each,
its *null refit*: the warm-start procedure of a comparison applied to the reference itself. A
checkpoint is **compared** by warm-starting from each stored cold fit on its own weights (scaled
by the reference's s) and reading its mean distance against the matching null refit, so the
optimiser's own drift cancels: K relative changes give a mean ± std per layer.

On disk a baseline is a directory::

    baseline.json      what was measured, how (settings, protocol), from which files
    coords/NNNNN.safetensors   per layer: cold.<k> and null.<k> coordinates, (g, H, m + n, k),
                               and the sketch of its weights (dynamics.sketch)
    manifest.json      sha256 of every file above, verified on load

written in a staging directory next to the target and renamed into place when complete.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dynaudit.config import PROTOCOL_VERSION, FitSettings
from dynaudit.distributed import Ranks, assign
from dynaudit.dynamics import discrepancy, fit_coordinates
from dynaudit.dynamics.blocks import block_seed, block_shape, fit_flop, take_blocks
from dynaudit.dynamics.kernel import warm_steps
from dynaudit.dynamics.metrics import fidelity as fidelity_of
from dynaudit.dynamics.sketch import sketch, weight_figures
from dynaudit.engine import CoordsSink, Progress, layer_groups, load_layer
from dynaudit.errors import InputError, UsageError
from dynaudit.families import Family, Layer, LayerPlan
from dynaudit.families.base import matrix_shape
from dynaudit.policy import Change, Comparison, GroupComparison, LayerComparison
from dynaudit.report import DEPTH_GROUPS, FamilyInfo, Report, SourceInfo
from dynaudit.runtime import to_device
from dynaudit.tensors import Checkpoint, sha256_file

__all__ = [
    "Baseline",
    "BaselineError",
    "BaselineLayer",
    "BaselineWriter",
    "compare_plan",
    "load_baseline",
]

BASELINE_FILE = "baseline.json"
MANIFEST_FILE = "manifest.json"
COORDS_DIR = "coords"


# A writer's files, cold and null mean distances, by layer (exchanged between ranks).
Records = tuple[dict[str, str], dict[str, list[float]], dict[str, list[float]]]


class BaselineError(InputError):
    """A baseline that cannot be used: missing, tampered, or made with other settings."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BaselineLayer(_Model):
    name: str
    type: str
    depth: int
    group: Literal["bottom", "middle", "top"]
    shape: list[int] = Field(description="matrix shape (g, m, n) as fitted")
    scale: float | None
    coords: str | None = Field(description="file under coords/, null when not fitted")
    cold_mean_distance: list[float] = Field(default_factory=list, description="per seed")
    null_mean_distance: list[float] = Field(default_factory=list, description="per seed")
    reason: str | None = None


class Baseline(_Model):
    format_version: Literal[1] = 1
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


# -- writing ----------------------------------------------------------------------------


class BaselineWriter:
    r"""Collects cold fits and their null refits while the engine measures the reference
    (through :meth:`sink`), writing each layer's coordinates as soon as its last seed is done.
    Under torchrun every rank writes its own layers' files into the one staging directory
    (named by plan order, so they never collide) and rank 0 :meth:`absorb`\ s the others'
    records."""

    def __init__(self, staging: Path, settings: FitSettings, layers: list[str]) -> None:
        self.staging = staging
        self.settings = settings
        self._index = {name: i for i, name in enumerate(layers)}
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self.cold: dict[str, list[float]] = {}
        self.null: dict[str, list[float]] = {}
        self.files: dict[str, str] = {}

    @property
    def sink(self) -> CoordsSink:
        return self._take

    def _take(
        self,
        layers: list[Layer],
        owners: list[int],
        offset: int,
        coords: torch.Tensor,
        target: torch.Tensor,
    ) -> None:
        _, m, n = target.shape
        null = fit_coordinates(
            target, self.settings, coords, steps=warm_steps(self.settings, m, n),
            lr=self.settings.warm_lr,
        )  # fmt: skip
        _, cold_md = discrepancy(coords)
        _, null_md = discrepancy(null)
        for i, layer in enumerate(layers):
            rows = [j for j, owner in enumerate(owners) if owner == i]
            tensors = self._pending.setdefault(layer.name, {})
            tensors[f"cold.{offset}"] = coords[rows].cpu().contiguous()
            tensors[f"null.{offset}"] = null[rows].cpu().contiguous()
            if offset == 0:  # what the seed-0 fit saw, for the weight-change figure
                tensors["sketch"] = sketch(target[rows], layer.name)
            self.cold.setdefault(layer.name, []).append(float(cold_md[rows].mean()))
            self.null.setdefault(layer.name, []).append(float(null_md[rows].mean()))
            if offset == self.settings.seeds - 1:
                self._flush(layer.name)

    def _flush(self, name: str) -> None:
        from safetensors.torch import save_file

        file = f"{COORDS_DIR}/{self._index[name]:05d}.safetensors"
        save_file(self._pending.pop(name), str(self.staging / file))
        self.files[name] = file

    @property
    def records(self) -> Records:
        """What this writer wrote: files, cold and null mean distances, by layer."""
        return self.files, self.cold, self.null

    def absorb(self, parts: list[Records]) -> None:
        """Take in the records of every rank of a job (this one's included)."""
        for files, cold, null in parts:
            self.files.update(files)
            self.cold.update(cold)
            self.null.update(null)

    def finish(self, baseline: Baseline, out: Path) -> Path:
        """Write baseline.json and the manifest, then rename the staging directory to ``out``."""
        from dynaudit.cache import publish_dir

        (self.staging / BASELINE_FILE).write_text(baseline.model_dump_json(indent=1))
        manifest = {
            path.relative_to(self.staging).as_posix(): sha256_file(path)
            for path in sorted(self.staging.rglob("*"))
            if path.is_file()
        }
        (self.staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        if not publish_dir(self.staging, out):
            raise UsageError(f"{out}: written by another process meanwhile; not overwritten")
        return out


def refuse_existing(out: Path) -> None:
    """A baseline is never overwritten: ``out`` must not exist yet."""
    if out.exists():
        raise UsageError(
            f"{out}: already exists; a baseline is never overwritten (choose another --out)"
        )


def staging_for(out: Path) -> Path:
    """A fresh staging directory beside ``out`` (same filesystem, so the rename is atomic),
    created with its ``coords/``; ``out`` must not exist."""
    refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    (staging / COORDS_DIR).mkdir(parents=True)
    return staging


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


# -- reading ----------------------------------------------------------------------------


def is_baseline(path: Path) -> bool:
    return path.is_dir() and (path / BASELINE_FILE).is_file()


def load_baseline(path: Path) -> Baseline:
    """Read a baseline directory, verifying every file against the manifest."""
    manifest_path = path / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise BaselineError(f"{path}: no readable {MANIFEST_FILE} ({exc})", path=str(path)) from exc
    if not isinstance(manifest, dict) or BASELINE_FILE not in manifest:
        raise BaselineError(f"{manifest_path}: not a baseline manifest", path=str(path))
    for name, expected in manifest.items():
        file = path / str(name)
        if Path(str(name)).is_absolute() or ".." in Path(str(name)).parts or not file.is_file():
            raise BaselineError(
                f"{path}: manifest names {name!r}, which is missing", path=str(path)
            )
        if sha256_file(file) != expected:
            raise BaselineError(
                f"{file}: sha256 differs from the baseline's manifest (tampered or corrupt); "
                "re-create the baseline",
                path=str(file),
            )
    try:
        baseline = Baseline.model_validate_json((path / BASELINE_FILE).read_bytes())
    except (ValidationError, ValueError, RecursionError) as exc:
        raise BaselineError(
            f"{path / BASELINE_FILE}: not a valid baseline", path=str(path)
        ) from exc
    if baseline.protocol_version != PROTOCOL_VERSION:
        raise BaselineError(
            f"{path}: made with protocol v{baseline.protocol_version}, this dynaudit uses "
            f"v{PROTOCOL_VERSION}; re-create the baseline",
            path=str(path),
        )
    return baseline


def check_settings(baseline: Baseline, requested: dict[str, Any], where: str) -> None:
    """Fit settings given for a comparison must equal the baseline's (they are its settings)."""
    differ = [
        f"{key} {value!r} (baseline: {baseline.settings.get(key)!r})"
        for key, value in requested.items()
        if value is not None and key in baseline.settings and baseline.settings[key] != value
    ]
    if differ:
        raise BaselineError(
            f"{where}: settings differ from the baseline's: {', '.join(differ)}; compare with "
            "the baseline's settings (drop the flags) or re-create the baseline"
        )


def matrix_shapes(checkpoint: Checkpoint, plan: LayerPlan) -> dict[str, list[int]]:
    """(groups, m, n) of every planned layer, from the headers."""
    return {
        layer.name: list(matrix_shape(layer, checkpoint.tensors[layer.source].shape))
        for layer in plan.layers
    }


def check_architecture(
    baseline: Baseline, checkpoint: Checkpoint, plan: LayerPlan, uri: str
) -> None:
    """The checkpoint must have the baseline's layers with the same matrix shapes."""
    ours = matrix_shapes(checkpoint, plan)
    theirs = {layer.name: layer.shape for layer in baseline.layers}
    missing = sorted(set(theirs) - set(ours))
    extra = sorted(set(ours) - set(theirs))
    reshaped = sorted(n for n in set(ours) & set(theirs) if ours[n] != theirs[n])
    problems = []
    if missing:
        problems.append(f"{len(missing)} baseline layer(s) missing (e.g. {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} layer(s) not in the baseline (e.g. {extra[0]})")
    if reshaped:
        name = reshaped[0]
        problems.append(f"{name} is {'×'.join(map(str, ours[name]))}, the baseline's "
                        f"{'×'.join(map(str, theirs[name]))}")  # fmt: skip
    if problems:
        raise BaselineError(
            f"{uri}: architecture differs from the baseline ({baseline.source.uri}): "
            + "; ".join(problems)
        )


# -- comparing --------------------------------------------------------------------------


def compare_plan(
    checkpoint: Checkpoint,
    plan: LayerPlan,
    family: Family,
    baseline: Baseline,
    root: Path,
    device: torch.device,
    progress: Progress | None = None,
    ranks: Ranks | None = None,
) -> Comparison:
    """Warm-start every layer from the baseline's cold fits on this checkpoint's weights.
    With ``ranks`` (a torchrun job), this rank refits its share of the layers and every rank
    gets the whole comparison."""
    from safetensors.torch import load_file

    settings = baseline.fit_settings()
    scales = {layer.name: layer.scale for layer in baseline.layers if layer.scale is not None}
    by_name = {layer.name: layer for layer in baseline.layers}
    groups = layer_groups(plan.layers)
    mine = plan.layers
    if ranks is not None:
        costs = [_refit_cost(by_name[layer.name], settings) for layer in plan.layers]
        owners = assign(costs, ranks.size)
        mine = [x for x, owner in zip(plan.layers, owners, strict=True) if owner == ranks.rank]
    results: list[LayerComparison] = []
    per_seed: dict[str, list[float]] = {}
    non_finite: list[str] = []
    zeroed: list[str] = []
    for done, layer in enumerate(mine, start=1):
        started = time.perf_counter()
        ref = by_name[layer.name]
        loaded = load_layer(checkpoint, family, layer, scales)
        figures: dict[str, Any] = {}
        if loaded.non_finite:
            non_finite.append(layer.name)
            figures["reason"] = loaded.reason
        elif ref.coords is None:
            figures["reason"] = f"not fitted in the baseline ({ref.reason})"
        elif loaded.reason is not None:
            zeroed.append(layer.name)
            figures["reason"] = f"damage: {loaded.reason}"
        else:
            stored = load_file(str(root / ref.coords))
            target = loaded.matrices.div_(loaded.scale or 1.0)
            figures, changes = _warm_compare(target, stored, ref, settings, device)
            per_seed[layer.name] = changes
        results.append(
            LayerComparison(
                name=layer.name, type=layer.type, depth=layer.depth,
                group=groups[layer.name],
                shape=ref.shape,
                baseline_mean_distance=_mean(ref.null_mean_distance),
                mean_distance=figures.get("mean_distance"), change=figures.get("change"),
                displacement=figures.get("displacement"), null_drift=_null_drift(ref),
                weight_change=figures.get("weight_change"),
                noise_likeness=figures.get("noise_likeness"),
                noise=figures.get("noise"), fidelity=figures.get("fidelity"),
                reason=figures.get("reason"), seconds=round(time.perf_counter() - started, 3),
            )
        )  # fmt: skip
        if progress is not None:
            progress(done, len(mine), layer.name)
    if ranks is not None:
        parts = ranks.gather((results, per_seed, non_finite, zeroed))
        by_layer = {x.name: x for part in parts for x in part[0]}
        results = [by_layer[layer.name] for layer in plan.layers]
        per_seed = {name: v for part in parts for name, v in part[1].items()}
        flagged_nan = {name for part in parts for name in part[2]}
        flagged_zero = {name for part in parts for name in part[3]}
        non_finite = [x.name for x in plan.layers if x.name in flagged_nan]
        zeroed = [x.name for x in plan.layers if x.name in flagged_zero]
    return Comparison(
        layers=results,
        all=_group(results, per_seed),
        groups={
            g: _group([r for r in results if r.group == g], per_seed)
            for g in DEPTH_GROUPS
            if any(r.group == g for r in results)
        },
        types={
            t: _group([r for r in results if r.type == t], per_seed)
            for t in sorted({r.type for r in results})
        },
        non_finite=non_finite,
        zeroed=zeroed,
    )


def _refit_cost(ref: BaselineLayer, settings: FitSettings) -> float:
    """FLOP of a layer's warm refits, one per stored seed."""
    if ref.coords is None:
        return 0.0
    g, m, n = ref.shape
    return g * fit_flop(settings, m, n, warm=True) * len(ref.null_mean_distance)


def _warm_compare(
    target: torch.Tensor,
    stored: dict[str, torch.Tensor],
    ref: BaselineLayer,
    settings: FitSettings,
    device: torch.device,
) -> tuple[dict[str, Any], list[float]]:
    g, m, n = target.shape
    shape = block_shape(m, n, settings.max_entries)
    steps = warm_steps(settings, *shape)
    means, changes, absolute, moved = [], [], [], []
    fid = weight_change = noise_like = None
    for k in range(len(ref.null_mean_distance)):
        cold = stored[f"cold.{k}"].to(device)
        null = stored[f"null.{k}"].to(device)
        # The rows and columns this seed's cold fit saw (all of them below max_entries).
        seeds = [block_seed(settings.seed + k, ref.name, group) for group in range(g)]
        fitted = to_device(take_blocks(target, shape, seeds), device)
        warm = fit_coordinates(fitted, settings, cold, steps=steps, lr=settings.warm_lr)
        _, md = discrepancy(warm)
        new = float(md.mean())
        base = ref.null_mean_distance[k]
        means.append(new)
        absolute.append(new - base)
        changes.append((new - base) / base if base else 0.0)
        moved.append(displacement(warm, null) / base if base else 0.0)
        if k == 0:
            fid = float(fidelity_of(warm, fitted).mean())
            if "sketch" in stored:  # an older baseline has none: no weight-change figures
                weight_change, noise_like = weight_figures(fitted, stored["sketch"], ref.name)
    std = statistics.stdev(changes) if len(changes) > 1 else 0.0
    change = Change(
        mean=statistics.fmean(changes), std=std, absolute=statistics.fmean(absolute),
        seeds=len(changes),
    )  # fmt: skip
    figures = {
        "mean_distance": statistics.fmean(means),
        "change": change,
        "displacement": statistics.fmean(moved),
        "noise": max(std, _null_drift(ref) or 0.0),
        "fidelity": fid,
        "weight_change": weight_change,
        "noise_likeness": noise_like,
    }
    return figures, changes


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
    """A group's change is the mean of its layers' relative changes, per seed; mean ± std over
    seeds. Its noise is the larger of that std and the mean null drift of its layers."""
    measured = [layer for layer in layers if layer.name in per_seed]
    if not measured:
        return GroupComparison(layers=0, change=None, noise=None, displacement=None)
    seeds = len(per_seed[measured[0].name])
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
