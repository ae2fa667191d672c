"""The family-plugin contract and its registry.

A family is a :class:`Family` subclass registered under the ``dynaudit.plugins`` entry-point
group — first-party families (``dynaudit_plugins``) exactly like third-party ones::

    [project.entry-points."dynaudit.plugins"]
    mynet = "mypackage.family:MyNetFamily"

Plugins are discovered lazily: nothing is imported until a family is needed.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, ClassVar, Literal

from dynaudit.errors import PluginError, StructureError, UnknownFamily

if TYPE_CHECKING:
    import torch

    from dynaudit.tensors import Checkpoint

__all__ = [
    "ENTRY_POINT_GROUP",
    "IDENTITY",
    "Detection",
    "Evidence",
    "Family",
    "Feed",
    "IndexMap",
    "Layer",
    "LayerPlan",
    "ResidualBlock",
    "Skip",
    "StructureError",
    "available_families",
    "check_layer",
    "check_plan",
    "detect_family",
    "get_family",
    "matrix_shape",
    "read_matrices",
    "weight_matrices",
]

_log = logging.getLogger("dynaudit")

ENTRY_POINT_GROUP = "dynaudit.plugins"
FALLBACK = "generic"


@dataclass(frozen=True)
class Layer:
    """One audited layer: a weight tensor (or rows of one) and how to read it as matrices."""

    name: str  # the layer's name in reports: the tensor name, plus ``[part]`` for a split
    type: str  # role in the user's words: query, value, fc1, conv, ...
    depth: int  # position along the network, 0 = closest to the input
    kind: Literal["linear", "conv"] = "linear"
    groups: int = 1  # conv groups: the layer is fitted as ``groups`` matrices
    transposed: bool = False  # stored (in, out), e.g. GPT-2 Conv1D
    tensor: str | None = None  # the stored tensor when it differs from ``name`` (fused qkv)
    # ranges [start, stop) of the matrix's output rows that form the layer (a fused projection's
    # part): rows of ``tensor`` as stored, its columns when ``transposed`` (GPT-2's fused c_attn)
    rows: tuple[tuple[int, int], ...] | None = None
    group: Literal["bottom", "middle", "top"] | None = None  # fixed third (stem, head)
    stack: str = ""  # the tower it belongs to (encoder, decoder, vision, text): thirds per stack
    expert: int | None = None  # a mixture-of-experts layer's expert index
    index: int | None = None  # the matrix at this position of a stacked 3-D tensor (fused experts)

    @property
    def source(self) -> str:
        """The checkpoint tensor this layer reads."""
        return self.tensor or self.name


@dataclass(frozen=True)
class Skip:
    """A tensor that is not audited, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class IndexMap:
    """π of the coupling term (docs/method.md §4): which predecessor output neuron each input neuron
    of a layer reads.

    Input neuron ``i`` of matrix group ``g`` reads channel ``c = g·C + i // repeat`` of the
    layer's input (``C`` channels per group; ``repeat`` = kh·kw for a conv, h·w after a
    flatten). With attention heads (``head_dim`` > 0), channel ``c`` belongs to query head
    ``c // head_dim``, which reads key/value head ``(c // head_dim) // group`` (GQA).
    """

    repeat: int = 1
    head_dim: int = 0
    group: int = 1

    def indices(self, groups: int, inputs: int) -> torch.Tensor:
        """Predecessor output index of every (group, input neuron) of the layer: ``(g, n)``."""
        import torch

        per_group = inputs // self.repeat
        group_start = torch.arange(groups).unsqueeze(1) * per_group
        channel = group_start + torch.arange(inputs) // self.repeat
        if self.head_dim:
            head, offset = channel // self.head_dim, channel % self.head_dim
            channel = (head // self.group) * self.head_dim + offset
        return channel


IDENTITY = IndexMap()


@dataclass(frozen=True)
class Feed:
    """The outputs of layer ``src`` reach the inputs of layer ``dst`` through ``index``."""

    src: str
    dst: str
    index: IndexMap = IDENTITY


@dataclass(frozen=True)
class ResidualBlock:
    """A residual block ``x + f(x)``: each branch lists the layers (and pass-through nodes)
    along one path of ``f``, from input to output; ``note`` says what the product of their
    norms leaves out."""

    name: str
    branches: dict[str, tuple[str, ...]]
    note: str = ""


@dataclass
class LayerPlan:
    """What a family makes of a checkpoint: layers in depth order, what it skipped, and how
    the layers connect.

    ``feeds`` and ``reads_input`` form the layer graph: every layer either reads the model's
    input (through the residual stream or an embedding, which is not audited) or is fed by at
    least one earlier layer. ``widths`` are the feature widths along the main path, from the
    input to the output, that decide the structural class (see :mod:`dynaudit.structure`);
    when empty, the layers are taken as a chain.

    ``pass_through`` are graph nodes that are not audited: a tensor listed in ``skipped``
    whose operation forwards its input channels one by one (a depthwise convolution: output
    channel c reads input channel c only). Feeds may start or end at one, and a residual
    branch may list one, so the graph stays true around what is not fitted. Plans without
    them are read exactly as before.
    """

    layers: list[Layer]
    skipped: list[Skip] = field(default_factory=list)
    depth_note: str = ""  # how depth was assigned, stated in the report
    feeds: list[Feed] = field(default_factory=list)
    reads_input: set[str] = field(default_factory=set)
    blocks: list[ResidualBlock] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # anything else the report should say
    pass_through: list[Layer] = field(default_factory=list)  # skipped, kept as graph nodes

    def fed_by(self) -> dict[str, list[str]]:
        """Layer (or pass-through node) name → the layers and nodes whose outputs feed it
        (empty for input-only layers)."""
        out: dict[str, list[str]] = {x.name: [] for x in (*self.layers, *self.pass_through)}
        for feed in self.feeds:
            out[feed.dst].append(feed.src)
        return out


@dataclass(frozen=True)
class Detection:
    """The family chosen for a checkpoint, and why."""

    family: Family
    confidence: float
    how: str


Evidence = float | tuple[float, str]


class Family(ABC):
    """Contract every family plugin implements. Keep it small: detect, plan, matrices.

    Every subclass's :meth:`plan` is checked on return by :func:`check_plan`, so a crafted
    checkpoint (a 1-D projection, a conv with 0 input channels) is an input error (exit 3)
    whatever the plugin, first- or third-party, did not check itself."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("plan")
        if callable(own) and not getattr(own, "_checked", False):
            cls.plan = _checked_plan(own)  # type: ignore[method-assign,assignment]

    @abstractmethod
    def detect(self, checkpoint: Checkpoint) -> Evidence:
        """Confidence in [0, 1] that this family describes ``checkpoint``, optionally with
        what it was recognised by: ``(0.95, "config.json model_type 'llama'")``. Headers and
        config.json only; never read tensor data here."""

    @abstractmethod
    def plan(self, checkpoint: Checkpoint) -> LayerPlan:
        """The layers to audit, in depth order, and every other tensor with a skip reason."""

    def matrices(self, layer: Layer, weight: torch.Tensor) -> torch.Tensor:
        """The layer's weight as ``(g, m, n)`` matrices (docs/method.md §1)."""
        return weight_matrices(layer, weight)


def _checked_plan(
    plan: Callable[[Family, Checkpoint], LayerPlan],
) -> Callable[[Family, Checkpoint], LayerPlan]:
    @functools.wraps(plan)
    def checked(self: Family, checkpoint: Checkpoint) -> LayerPlan:
        result = plan(self, checkpoint)
        check_plan(result, checkpoint, self.name)
        return result

    checked._checked = True  # type: ignore[attr-defined]
    return checked


_AXES = {
    "linear": ("output features", "input features"),
    "conv": ("output channels", "input channels", "kernel rows", "kernel columns"),
}


def check_layer(layer: Layer, shape: Sequence[int], family: str) -> None:
    """Refuse (:class:`StructureError`) a tensor that cannot be read as ``layer``'s matrices:
    a linear weight that is not 2-D, a conv weight that is not 4-D, an empty dimension, row
    ranges outside the tensor, output channels that the groups do not divide."""
    dims = list(shape)
    where = f"{family}: {layer.source} has shape {dims}"
    if layer.index is not None:  # one matrix of a stack: check the stack, then the matrix
        if layer.kind != "linear" or len(dims) != 3 or not 0 <= layer.index < dims[0]:
            raise StructureError(
                f"{where}; {layer.name} reads matrix {layer.index} of a 3-D stack of linear "
                "weights, which it is not"
            )
        dims = dims[1:]
    if layer.kind == "linear" and len(dims) != 2:
        raise StructureError(f"{where}; the weight of a linear layer ({layer.type}) is 2-D")
    if layer.kind == "conv" and len(dims) != 4:
        raise StructureError(
            f"{where}; the weight of a convolution ({layer.type}) is 4-D "
            "(out channels, in channels per group, kh, kw)"
        )
    if 0 in dims:
        axes = _AXES[layer.kind]
        empty = ", ".join(f"0 {axes[i]}" for i, size in enumerate(dims) if size == 0)
        raise StructureError(f"{where}: {empty}, nothing to audit")
    outputs = dims[1] if layer.transposed and layer.kind == "linear" else dims[0]
    for start, stop in layer.rows or ():
        if not 0 <= start < stop <= outputs:
            raise StructureError(f"{where}; rows [{start}, {stop}) of {layer.name} lie outside it")
    if layer.kind == "conv" and (layer.groups < 1 or dims[0] % layer.groups):
        raise StructureError(
            f"{where}; {dims[0]} output channels do not split into {layer.groups} groups"
        )


def check_plan(plan: LayerPlan, checkpoint: Checkpoint, family: str) -> None:
    """Every planned layer and pass-through node names a tensor of ``checkpoint`` that
    :func:`check_layer` accepts."""
    for layer in (*plan.layers, *plan.pass_through):
        info = checkpoint.tensors.get(layer.source)
        if info is None:
            raise StructureError(f"{family}: planned layer {layer.name!r} reads no tensor")
        check_layer(layer, info.shape, family)


def matrix_shape(layer: Layer, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(g, m, n)`` of a layer's matrices from its tensor's shape, without reading data."""
    if layer.index is not None:
        shape = shape[1:]
    if layer.rows is not None:
        selected = sum(stop - start for start, stop in layer.rows)
        transposed = layer.transposed and layer.kind == "linear"
        shape = (shape[0], selected) if transposed else (selected, *shape[1:])
    if layer.kind == "linear":
        m, n = (shape[1], shape[0]) if layer.transposed else (shape[0], shape[1])
        return 1, m, n
    return layer.groups, shape[0] // layer.groups, math.prod(shape[1:])


def read_matrices(family: Family, layer: Layer, checkpoint: Checkpoint) -> torch.Tensor:
    """``layer``'s matrices read from ``checkpoint`` through ``family.matrices``; one matrix
    of a stack (``layer.index``, fused experts) is read alone, not the whole stack."""
    if layer.index is None:
        return family.matrices(layer, checkpoint.read(layer.source))
    one = checkpoint.read(layer.source, layer.index)
    return family.matrices(dataclasses.replace(layer, index=None), one)


def weight_matrices(layer: Layer, weight: torch.Tensor) -> torch.Tensor:
    """Linear (out × in) as stored; Conv2d (C_out, C_in/g, kh, kw) with g groups as g
    matrices of (C_out/g) × (C_in/g · kh · kw); the matrix ``index`` of a 3-D stack (fused
    experts) first, then ``rows`` (fused projections): output rows, so the columns of a weight
    stored transposed (in, out)."""
    import torch

    if layer.index is not None:
        weight = weight[layer.index]
    if layer.rows is not None:
        if layer.transposed and layer.kind == "linear":
            weight = torch.cat([weight[:, start:stop] for start, stop in layer.rows], dim=1)
        else:
            weight = torch.cat([weight[start:stop] for start, stop in layer.rows])
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
    best: tuple[float, str, str] | None = None
    for name in sorted(_entry_points()):
        if name == FALLBACK:
            continue
        try:
            score, why = _evidence(_load(name).detect(checkpoint))
        except PluginError:
            continue  # reported by ``dynaudit plugins``; detection goes on without it
        except Exception as exc:  # a third-party detect() must not stop the others
            _log.warning("family plugin %r failed in detect(): %s", name, exc)
            continue
        if score > 0 and (best is None or score > best[0]):
            best = (score, name, why)
    if best is not None:
        score, name, why = best
        return Detection(_load(name), score, f"detected by {why}")
    return Detection(
        get_family(FALLBACK), 0.0, "fallback: no family plugin recognised this checkpoint"
    )


def _evidence(value: Evidence) -> tuple[float, str]:
    score, why = value if isinstance(value, tuple) else (value, "the plugin's detect()")
    return min(1.0, max(0.0, float(score))), why
