"""Helpers for writing family plugins: build a :class:`LayerPlan` with its layer graph.

A family walks the checkpoint's names, adds layers with what feeds them, and lets the builder
skip every tensor it did not use, with a reason. The residual stream is a :class:`Stream`: the
set of layers whose outputs have been added to it so far (plus the model's input).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from dynaudit.families.base import (
    IDENTITY,
    Feed,
    IndexMap,
    Layer,
    LayerPlan,
    ResidualBlock,
    Skip,
    StructureError,
    check_layer,
    matrix_shape,
)
from dynaudit.families.naming import skip_reason
from dynaudit.tensors import Checkpoint

__all__ = [
    "VALUE_PATH",
    "PlanBuilder",
    "Stream",
    "StructureError",
    "add_transformer_block",
    "chain_index",
    "config_int",
    "index_blocks",
    "require_blocks",
    "require_weight",
]


@dataclass
class Stream:
    """A residual stream: the layers whose outputs it sums, and whether it carries the input."""

    producers: list[str] = field(default_factory=list)
    reads_input: bool = True

    def add(self, *layers: str) -> None:
        self.producers.extend(layers)


class PlanBuilder:
    """Accumulates layers, feeds and skips; :meth:`build` skips every tensor left unused."""

    def __init__(self, checkpoint: Checkpoint, family: str) -> None:
        self.checkpoint = checkpoint
        self.family = family
        self.plan = LayerPlan(layers=[])
        self._used: set[str] = set()
        self._planned: dict[str, Layer] = {}

    def shape(self, layer: Layer | str) -> tuple[int, int, int]:
        """``(g, m, n)`` of a planned layer or pass-through node (by object or name)."""
        if isinstance(layer, str):
            layer = self._planned[layer]
        return matrix_shape(layer, self.checkpoint.tensors[layer.source].shape)

    def outputs(self, name: str) -> int:
        g, m, _ = self.shape(name)
        return g * m

    def add(
        self,
        layer: Layer,
        fed_by: Stream | Iterable[str] = (),
        index: IndexMap = IDENTITY,
    ) -> Layer:
        """Plan ``layer``, fed by the given layers (or a stream) through ``index``."""
        self._check(layer)
        self._used.add(layer.source)
        self.plan.layers.append(layer)
        self._connect(layer, fed_by, index)
        return layer

    def pass_through(
        self,
        node: Layer,
        reason: str,
        fed_by: Stream | Iterable[str] = (),
        index: IndexMap = IDENTITY,
    ) -> Layer:
        """Keep ``node`` in the graph without auditing it: its tensor is skipped with
        ``reason``, and it is fed like a layer. For an operation that forwards its input
        channels one by one (a depthwise convolution), so that the layers after it are fed
        by it rather than by what came before it."""
        self._check(node)
        self.skip(node.source, reason)
        self.plan.pass_through.append(node)
        self._connect(node, fed_by, index)
        return node

    def _check(self, layer: Layer) -> None:
        if layer.source not in self.checkpoint.tensors:
            raise StructureError(f"{self.family}: expected tensor {layer.source!r} is missing")
        check_layer(layer, self.checkpoint.tensors[layer.source].shape, self.family)

    def _connect(self, layer: Layer, fed_by: Stream | Iterable[str], index: IndexMap) -> None:
        self._planned[layer.name] = layer
        if isinstance(fed_by, Stream):
            if fed_by.reads_input:
                self.plan.reads_input.add(layer.name)
            fed_by = fed_by.producers
        for src in fed_by:
            self.plan.feeds.append(Feed(src, layer.name, index))

    def reads_input(self, *names: str) -> None:
        self.plan.reads_input.update(names)

    def skip(self, name: str, reason: str) -> None:
        self._used.add(name)
        self.plan.skipped.append(Skip(name, reason))

    def block(self, name: str, branches: dict[str, tuple[str, ...]], note: str = "") -> None:
        self.plan.blocks.append(ResidualBlock(name, branches, note))

    def note(self, text: str) -> None:
        self.plan.notes.append(text)

    def build(self, depth_note: str, widths: Iterable[int] = ()) -> LayerPlan:
        """The plan, with every tensor not used as a layer skipped and its reason stated."""
        for name in self.checkpoint.names():
            if name in self._used:
                continue
            reason = skip_reason(self.checkpoint.tensors[name]) or (
                f"not part of the {self.family} architecture (--family generic audits it)"
            )
            self.plan.skipped.append(Skip(name, reason))
        self.plan.depth_note = depth_note
        self.plan.widths = list(widths)
        self.plan.layers.sort(key=lambda layer: layer.depth)  # stable: keeps order within depth
        self.plan.pass_through.sort(key=lambda node: node.depth)
        return self.plan


VALUE_PATH = "attention: the value path only (q and k act through the softmax)"


def add_transformer_block(
    build: PlanBuilder,
    stream: Stream,
    index: int,
    attention: tuple[Layer, Layer, Layer, Layer],
    mlp: tuple[Layer, ...],
    *,
    value_map: IndexMap = IDENTITY,
    parallel: bool = False,
    note: str = VALUE_PATH,
) -> None:
    """A pre-norm transformer block on the residual ``stream`` (norms scale channels, they do
    not mix them): query, key and value read the stream; the output projection reads the
    value through ``value_map`` (the heads); the MLP's input layers (``mlp[:-1]``: fc, or
    gate and up) read the stream — the block's own input with a ``parallel`` residual, else
    the stream after attention — and its output layer reads them. The stream gains the
    attention output and the MLP output; the block's branches are the value path and the
    MLP."""
    q, k, v, out = attention
    *inputs, mlp_out = mlp
    block_input = Stream(list(stream.producers), stream.reads_input)
    for layer in (q, k, v):
        build.add(layer, stream)
    build.add(out, [v.name], value_map)
    stream.add(out.name)
    for layer in inputs:
        build.add(layer, block_input if parallel else stream)
    build.add(mlp_out, [layer.name for layer in inputs])
    stream.add(mlp_out.name)
    build.block(
        f"block {index}",
        {"attention": (v.name, out.name), "mlp": tuple(layer.name for layer in mlp)},
        note=note,
    )


def require_weight(
    checkpoint: Checkpoint,
    name: str,
    family: str,
    kind: Literal["linear", "conv"] = "linear",
    type_: str = "",
) -> tuple[int, ...]:
    """The shape of tensor ``name``, checked to be a ``kind`` weight (2-D or 4-D, no empty
    dimension): read it before using its dimensions to plan."""
    if name not in checkpoint.tensors:
        raise StructureError(f"{family}: expected tensor {name!r} is missing")
    shape = checkpoint.tensors[name].shape
    check_layer(Layer(name, type_ or kind, 0, kind), shape, family)
    return shape


def require_blocks(
    checkpoint: Checkpoint,
    blocks: dict[int, dict[str, str]],
    types: dict[str, str],
    family: str,
) -> None:
    """Every block of ``blocks`` (from :func:`index_blocks`) has each part ``types`` names
    (part → layer type), and each part is a linear weight (:func:`require_weight`), checked
    before any shape is read to plan."""
    for index, parts in sorted(blocks.items()):
        missing = [p for p in types if p not in parts]
        if missing:
            raise StructureError(
                f"{family}: block {index} lacks {', '.join(missing)} (pruned, or one shard of "
                "several?)"
            )
        for part, name in parts.items():
            require_weight(checkpoint, name, family, "linear", types[part])


def chain_index(src_outputs: int, layer: Layer, shape: tuple[int, int, int]) -> IndexMap | None:
    """The index map when ``layer`` reads the outputs of a single earlier layer directly: a
    conv reads channels through kh·kw patches, a linear after a conv reads a flattened
    (channels × h × w) map. None when the widths do not fit together."""
    g, _, n = shape
    if layer.kind == "conv":
        channels_per_group = src_outputs // g if src_outputs % g == 0 else 0
        if channels_per_group and n % channels_per_group == 0:
            return IndexMap(repeat=n // channels_per_group)
        return None
    if n == src_outputs:
        return IDENTITY
    if src_outputs and n % src_outputs == 0:
        return IndexMap(repeat=n // src_outputs)
    return None


def index_blocks(
    checkpoint: Checkpoint, pattern: re.Pattern[str]
) -> tuple[dict[int, dict[str, str]], set[str]]:
    """Tensors matching ``pattern`` (groups ``index``, ``part`` and optionally ``prefix``)
    as ``{block index: {part: tensor name}}``, and the distinct prefixes seen."""
    blocks: dict[int, dict[str, str]] = defaultdict(dict)
    prefixes = set()
    for name in checkpoint.tensors:
        match = pattern.match(name)
        if match:
            blocks[int(match["index"])][match["part"]] = name
            prefixes.add(match.groupdict().get("prefix") or "")
    return dict(blocks), prefixes


def config_int(config: dict[str, object] | None, *keys: str) -> int | None:
    """The first of ``keys`` that config.json holds as an integer."""
    for key in keys:
        value = (config or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
