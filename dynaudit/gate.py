"""The gate (docs/gate.md, "Policy"): a comparison's figures, the policy, and the pure decision
between them.

A comparison gives, per layer and per group, the relative change of the mean distance against
the baseline's null refits (mean ± std over the K baseline seeds), the noise it must beat and
the neurons' displacement. The policy is two-sided:

- **capacity loss** (the paper's signal): the all-layers mean distance drops by more than
  ``max_drop_all`` %, or a depth group's by more than ``max_drop_group`` %, *and* the drop is
  more than ``noise_multiple`` × its noise;
- **damage**: any layer's mean distance moves by more than ``max_layer_change`` % in either
  direction, or its neurons are displaced by more than ``max_displacement`` (in units of the
  reference's mean distance) — heavy noise, re-initialisation or pruning can *raise* the
  discrepancy while wrecking the layer; any layer's weights moved by more than
  ``max_weight_change`` % of their norm — a layer replaced by another with the same
  statistics (re-drawn, swapped) keeps its discrepancy but is √2 of its norm away; any layer
  whose weights moved by more than ``max_noise_change`` % in a noise-like way (a noise
  likeness ≥ ``min_noise_likeness``: random corruption, not a structured update); a layer
  that became all zeros; NaN/Inf weights.

:func:`decide` is a pure function of the comparison and the policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from dynaudit.config import PYPROJECT, read_toml
from dynaudit.errors import UsageError, listed
from dynaudit.schema import (
    Change,
    Comparison,
    Finding,
    LayerComparison,
    Policy,
    Verdict,
    scope_label,
)

__all__ = [
    "Policy",
    "decide",
    "layer_damage",
    "layer_undecided",
    "load_policy",
    "scope_undecided",
    "weight_damage",
]


def weight_damage(
    change: float | None, likeness: float | None, policy: Policy
) -> Literal["replaced", "noise"] | None:
    """What a layer's weight figures say under ``policy``: ``"replaced"`` (moved beyond
    ``max_weight_change``), ``"noise"`` (beyond ``max_noise_change`` with a noise likeness of
    at least ``min_noise_likeness``) or None."""
    if change is None:
        return None
    if policy.max_weight_change is not None and change > policy.max_weight_change / 100:
        return "replaced"
    if (
        policy.max_noise_change is not None
        and likeness is not None
        and change > policy.max_noise_change / 100
        and likeness >= policy.min_noise_likeness
    ):
        return "noise"
    return None


def decide(comparison: Comparison, policy: Policy) -> Verdict:
    """The gate's verdict: a pure function of the figures and the thresholds."""
    findings = [
        *_weight_findings(comparison),
        *_capacity_findings(comparison, policy),
        *_damage_findings(comparison, policy),
    ]
    if findings:
        groups = list(dict.fromkeys(g for f in findings for g in f.groups))
        layers = list(dict.fromkeys(n for f in findings for n in f.layers))
        return Verdict(
            verdict="fail",
            reasons=[f.message for f in findings],
            findings=findings,
            failing_groups=groups,
            failing_layers=layers,
        )
    return Verdict(verdict="pass", reasons=[_checked(policy)])


def _scopes_of(comparison: Comparison, names: list[str]) -> list[str]:
    """The scopes layers ``names`` belong to: "all", then their thirds and types."""
    by_name = {layer.name: layer for layer in comparison.layers}
    scopes = dict.fromkeys(["all"])  # ordered set: `in list` was quadratic in the names
    for name in names:
        layer = by_name.get(name)
        if layer is not None:
            scopes.update(dict.fromkeys((layer.group, layer.type)))
    return list(scopes)


def _weight_findings(comparison: Comparison) -> list[Finding]:
    """NaN/Inf weights, and layers that became all zeros."""
    findings = []
    if names := comparison.non_finite:
        message = f"non-finite weights (NaN/Inf) in {listed(names)}"
        groups = _scopes_of(comparison, names)
        findings.append(Finding(kind="non_finite", groups=groups, layers=names, message=message))
    if names := comparison.zeroed:
        message = f"damage: all-zero weights in {listed(names)}"
        groups = _scopes_of(comparison, names)
        findings.append(Finding(kind="damage", groups=groups, layers=names, message=message))
    return findings


def _capacity_findings(comparison: Comparison, policy: Policy) -> list[Finding]:
    """A drop of the mean distance over all layers or a depth third beyond its limit and
    beyond ``noise_multiple`` × its noise."""
    findings = []
    for kind, key, group in comparison.scopes():
        if kind == "type" or group.change is None or group.noise is None:
            continue  # capacity loss is judged over all layers and per depth third
        label, limit = scope_label(kind, key), policy.drop_limit(key)
        change, noise = group.change, max(group.noise, policy.noise_floor / 100)
        drop = -change.mean
        if drop > limit / 100 and drop > policy.noise_multiple * noise:
            message = (
                f"capacity loss: {label} mean distance {_pct(change.mean)}"
                f"{_spread(change)} (limit −{limit:g}%, noise {_pct(noise, False)})"
            )
            findings.append(
                Finding(kind="capacity_loss", groups=sorted({"all", key}), message=message)
            )
    return findings


def _damage_findings(comparison: Comparison, policy: Policy) -> list[Finding]:
    """One finding per damaged layer (:func:`layer_damage`)."""
    findings = []
    for layer in comparison.layers:
        problem = layer_damage(layer, policy)
        if problem is not None:
            groups = list(dict.fromkeys(["all", layer.group, layer.type]))
            findings.append(
                Finding(kind="damage", groups=groups, layers=[layer.name], message=problem)
            )
    return findings


def layer_damage(layer: LayerComparison, policy: Policy) -> str | None:
    """Why ``layer`` counts as damaged under ``policy``, or None: its mean distance moved
    beyond ``max_layer_change`` either way, its weights were replaced or noised
    (:func:`weight_damage`), or its neurons were displaced beyond ``max_displacement``. A
    mixture-of-experts layer is named with its expert."""
    moved = layer.change
    weights = weight_damage(layer.weight_change, layer.noise_likeness, policy)
    name = (
        layer.name
        if layer.expert is None
        else f"{layer.name} (expert {layer.expert}, depth {layer.depth})"
    )
    if moved is not None and abs(moved.mean) > policy.max_layer_change / 100:
        return (
            f"damage: {name} mean distance {_pct(moved.mean)}"
            f"{_spread(moved)} (limit ±{policy.max_layer_change:g}%)"
        )
    if weights == "replaced":
        return (
            f"damage: {name} weights moved by {layer.weight_change or 0:.0%} of "
            f"their norm (limit {policy.max_weight_change:g}%): replaced, not adapted"
        )
    if weights == "noise":
        return (
            f"damage: {name} weights moved by {layer.weight_change or 0:.0%} of "
            f"their norm like random noise (noise likeness {layer.noise_likeness:.2f}; "
            f"limit {policy.max_noise_change:g}%)"
        )
    if (
        policy.max_displacement is not None
        and layer.displacement is not None
        and layer.displacement > policy.max_displacement
    ):
        return (
            f"damage: {name} neurons displaced by {layer.displacement:.3g} "
            f"(limit {policy.max_displacement:g})"
        )
    return None


def _checked(policy: Policy) -> str:
    """What a passing verdict checked, in one line."""
    checked = (
        f"no drop beyond −{policy.max_drop_all:g}% (all) / −{policy.max_drop_group:g}% (thirds) "
        f"above {policy.noise_multiple:g}× noise; no layer beyond ±{policy.max_layer_change:g}%"
    )
    if policy.max_weight_change is not None:
        checked += f" or with weights moved beyond {policy.max_weight_change:g}%"
    if policy.max_noise_change is not None:
        checked += f" ({policy.max_noise_change:g}% if noise-like)"
    return checked


def layer_undecided(
    change: float, margin: float, displacement: float | None, share: float, policy: Policy
) -> bool:
    """Whether a layer's damage verdict could differ between its seed-0 figures and their
    means over all K seeds, when the mean change lies within ``margin`` of seed 0's and the
    mean displacement within ``share`` × ``max_displacement`` of seed 0's: its |change| is
    within ``margin`` of ``max_layer_change``, or its displacement within ``share`` of the
    bound. The weight figures come from seed 0 alone, whatever K: more seeds cannot move them."""
    if abs(abs(change) - policy.max_layer_change / 100) <= margin:
        return True
    bound = policy.max_displacement
    if bound is None or displacement is None:
        return False
    return abs(displacement - bound) <= share * bound


def scope_undecided(
    change: float, drift: float, margin: float, limit: float, policy: Policy
) -> bool:
    """Whether a scope's capacity-loss verdict (:func:`decide`: a drop beyond ``limit`` %
    and beyond ``noise_multiple`` × its noise) could differ between its seed-0 change and
    the mean over all K seeds, when that mean lies within ``margin`` of seed 0 and the std
    over seeds, which seed 0 alone cannot give, is at most ``margin``: undecided when both
    a failing and a passing verdict are reachable."""
    drop = -change
    floor = policy.noise_floor / 100
    quiet, loud = max(drift, floor), max(drift, floor, margin)  # noise without / with the std
    could_fail = drop + margin > limit / 100 and drop + margin > policy.noise_multiple * quiet
    could_pass = drop - margin <= limit / 100 or drop - margin <= policy.noise_multiple * loud
    return could_fail and could_pass


def load_policy(
    path: Path | None = None, *, settings: Path | None = None, **overrides: float | None
) -> Policy:
    """The policy from ``path`` (a TOML file with the fields under ``[tool.dynaudit.policy]``,
    under ``[policy]`` or at top level), else ``[tool.dynaudit.policy]`` of ./pyproject.toml,
    else the defaults; ``settings`` (``--config FILE``) replaces ./pyproject.toml, its policy
    table or none at all; ``overrides`` (flags) win. Invalid values are a usage error (exit 2)
    naming the key, the value, what is wrong with it, and where it came from: the flag or the
    file."""
    table: dict[str, Any] = {}
    origin: dict[str, str] = {}
    source = path or settings or PYPROJECT
    if path is not None or settings is not None or source.is_file():
        data = read_toml(source, "the policy")
        nested, where = _policy_table(data, source)
        if nested is not None:
            table = nested
        else:
            table, where = (data, f"--policy {source}") if path is not None else ({}, "")
        origin = dict.fromkeys(table, where)
    flags = {k: v for k, v in overrides.items() if v is not None}
    table = {**table, **flags}
    origin.update({key: f"--{key.replace('_', '-')}" for key in flags})
    try:
        return Policy(**table)
    except ValidationError as exc:
        problems = [_problem(error, origin) for error in exc.errors()]
        raise UsageError(f"invalid gate policy: {'; '.join(problems)}") from exc


def _policy_table(data: dict[str, Any], source: Path) -> tuple[dict[str, Any] | None, str]:
    """``[tool.dynaudit.policy]`` of a pyproject-style file, or ``[policy]`` of a settings file
    of its own (``--config``), with how to name it; None when the file has neither."""
    for keys in (("tool", "dynaudit", "policy"), ("policy",)):
        nested: Any = data
        for key in keys:
            nested = nested.get(key) if isinstance(nested, dict) else None
        if isinstance(nested, dict):
            return nested, f"[{'.'.join(keys)}] of {source}"
    return None, ""


def _problem(error: Any, origin: dict[str, str]) -> str:
    """One pydantic error as ``KEY = VALUE (from WHERE): WHAT IS WRONG``."""
    key = ".".join(map(str, error.get("loc", ()))) or "policy"
    where = origin.get(key.split(".")[0], "")
    value = error.get("input")
    if error.get("type") == "extra_forbidden":
        known = ", ".join(Policy.model_fields)
        return f"{key} ({where}) is not a policy setting; the settings are {known}"
    shown = repr(value) if not isinstance(value, (int, float)) else f"{value:g}"
    if where.startswith("--") and not where.startswith("--policy"):
        return f"{where} {shown}: {error.get('msg', 'invalid')}"
    return f"{key} = {shown} ({where}): {error.get('msg', 'invalid')}"


def _spread(change: Change) -> str:
    """`` ± std`` over the seeds, or `` (1 seed)`` when one seed gave the figure (sequential
    seeds decided it there): no spread to show."""
    return " (1 seed)" if change.seeds == 1 else f" ± {_pct(change.std, False)}"


def _pct(value: float, sign: bool = True) -> str:
    return f"{value * 100:+.2f}%" if sign else f"{value * 100:.2f}%"
