"""The family-plugin contract and its registry.

A family is a :class:`Family` subclass registered under the ``dynaudit.plugins`` entry-point
group — first-party families (``dynaudit_plugins``) exactly like third-party ones::

    [project.entry-points."dynaudit.plugins"]
    mynet = "mypackage.family:MyNetFamily"

Plugins are discovered lazily: nothing is imported until a family is needed.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, ClassVar, Literal

from dynaudit.errors import PluginError, UnknownFamily

if TYPE_CHECKING:
    import torch

    from dynaudit.tensors import Checkpoint

__all__ = [
    "ENTRY_POINT_GROUP",
    "Detection",
    "Family",
    "Layer",
    "LayerPlan",
    "Skip",
    "available_families",
    "detect_family",
    "get_family",
]

ENTRY_POINT_GROUP = "dynaudit.plugins"
FALLBACK = "generic"


@dataclass(frozen=True)
class Layer:
    """One audited layer: a weight tensor and how to read it as matrices."""

    name: str  # tensor name in the checkpoint
    type: str  # role in the user's words: query, value, fc1, conv, ...
    depth: int  # position along the network, 0 = closest to the input
    kind: Literal["linear", "conv"] = "linear"
    groups: int = 1  # conv groups: the layer is fitted as ``groups`` matrices
    transposed: bool = False  # stored (in, out), e.g. GPT-2 Conv1D


@dataclass(frozen=True)
class Skip:
    """A tensor that is not audited, and why."""

    name: str
    reason: str


@dataclass
class LayerPlan:
    """What a family makes of a checkpoint: layers in depth order, and what it skipped."""

    layers: list[Layer]
    skipped: list[Skip] = field(default_factory=list)
    depth_note: str = ""  # how depth was assigned, stated in the report


@dataclass(frozen=True)
class Detection:
    """The family chosen for a checkpoint, and why."""

    family: Family
    confidence: float
    how: str


class Family(ABC):
    """Contract every family plugin implements. Keep it small: detect, plan, matrices."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    @abstractmethod
    def detect(self, checkpoint: Checkpoint) -> float:
        """Confidence in [0, 1] that this family describes ``checkpoint`` (headers and
        config.json only; never read tensor data here)."""

    @abstractmethod
    def plan(self, checkpoint: Checkpoint) -> LayerPlan:
        """The layers to audit, in depth order, and every other tensor with a skip reason."""

    def matrices(self, layer: Layer, weight: torch.Tensor) -> torch.Tensor:
        """The layer's weight as ``(g, m, n)`` matrices (SPEC §4.1)."""
        return weight_matrices(layer, weight)


def weight_matrices(layer: Layer, weight: torch.Tensor) -> torch.Tensor:
    """Linear (out × in) as stored; Conv2d (C_out, C_in/g, kh, kw) with g groups as g
    matrices of (C_out/g) × (C_in/g · kh · kw)."""
    if layer.kind == "linear":
        mat = weight.mT if layer.transposed else weight
        return mat.reshape(1, *mat.shape)
    c_out = weight.shape[0]
    if c_out % layer.groups:
        raise ValueError(f"{layer.name}: {c_out} output channels not divisible by {layer.groups}")
    return weight.reshape(layer.groups, c_out // layer.groups, -1)


@cache
def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


@cache
def _load(name: str) -> Family:
    ep = _entry_points()[name]
    try:
        obj = ep.load()
    except Exception as exc:  # a broken third-party plugin must not take the tool down
        raise PluginError(f"family plugin {name!r} ({ep.value}) failed to import: {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, Family)):
        raise PluginError(
            f"family plugin {name!r} ({ep.value}) is not a subclass of dynaudit.families.Family"
        )
    return obj()


def available_families() -> dict[str, str]:
    """Installed family names and where each comes from (``module:Class [distribution]``)."""
    out = {}
    for name, ep in sorted(_entry_points().items()):
        dist = f" [{ep.dist.name} {ep.dist.version}]" if ep.dist is not None else ""
        out[name] = f"{ep.value}{dist}"
    return out


def get_family(name: str) -> Family:
    """The family registered as ``name``; unknown names suggest close ones."""
    names = list(_entry_points())
    if name not in names:
        raise UnknownFamily(name, difflib.get_close_matches(name, names, n=3), sorted(names))
    return _load(name)


def detect_family(checkpoint: Checkpoint, override: str | None = None) -> Detection:
    """The most confident family for ``checkpoint``; the generic one when none claims it."""
    if override is not None:
        return Detection(get_family(override), 1.0, "chosen with --family")
    best: tuple[float, str] | None = None
    for name in sorted(_entry_points()):
        if name == FALLBACK:
            continue
        try:
            score = _load(name).detect(checkpoint)
        except PluginError:
            continue  # reported by ``dynaudit plugins``; detection goes on without it
        if score > 0 and (best is None or score > best[0]):
            best = (score, name)
    if best is not None:
        return Detection(_load(best[1]), best[0], "detected from config.json and tensor names")
    return Detection(
        get_family(FALLBACK), 0.0, "fallback: no family plugin recognised this checkpoint"
    )
