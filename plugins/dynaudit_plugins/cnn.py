"""Convolutional networks: ResNets (torchvision/timm and transformers names) and plain
LeNet-style CNNs (convolutions, then fully connected layers).

ResNet layers: the stem conv (depth 0), the convs of every residual block (depth 1 + the
block's position across stages), the shortcut (``downsample.0`` / ``shortcut.convolution``)
and the classifier on top. Types: stem, conv, downsample, fc.

Graph: a block's first conv and its shortcut read the residual stream — the outputs summed so
far: the stem, then each block's last conv plus its shortcut, or plus the stream it received
when the shortcut is the identity. A conv reads its input channels through kh·kw patches
(index map ``repeat = kh·kw``); the classifier reads the pooled channels. Grouped convs get
their group count from the channels that feed them; depthwise convs are skipped.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import replace

from dynaudit.families import Family, Layer, LayerPlan
from dynaudit.families.build import (
    PlanBuilder,
    Stream,
    StructureError,
    chain_index,
    require_weight,
)
from dynaudit.families.naming import DEPTHWISE, skip_reason
from dynaudit.tensors import Checkpoint

__all__ = ["CNNFamily"]

_TORCHVISION = re.compile(
    r"^(?P<prefix>(?:[\w.]+\.)?)layer(?P<stage>\d+)\.(?P<block>\d+)\."
    r"(?:conv(?P<conv>\d+)|(?P<short>downsample\.0))\.weight$"
)
_TRANSFORMERS = re.compile(
    r"^(?P<prefix>(?:[\w.]+\.)?)encoder\.stages\.(?P<stage>\d+)\.layers\.(?P<block>\d+)\."
    r"(?:layer\.(?P<conv>\d+)|(?P<short>shortcut))\.convolution\.weight$"
)
_STEMS = ("conv1.weight", "embedder.embedder.convolution.weight", "stem.conv.weight")
_CLASSIFIERS = ("fc.weight", "classifier.1.weight", "classifier.weight", "head.fc.weight")
_LENET = re.compile(r"^(?:[\w.]+\.)?(?:conv|fc)\d+\.weight$")
_NOT_CNN = re.compile(r"attn|attention|q_proj|query|embed_tokens|lm_head")

BRANCH_NOTE = (
    "conv kernels as (C_out) × (C_in·kh·kw) matrices: their spectral norm is within √(kh·kw) "
    "of the convolution's operator norm; BatchNorm scales are not included"
)


class CNNFamily(Family):
    name = "cnn"
    description = "CNNs: ResNet (torchvision/timm, transformers) and plain LeNet-style nets"

    def detect(self, checkpoint: Checkpoint) -> float | tuple[float, str]:
        config = checkpoint.config or {}
        if config.get("model_type") == "resnet":
            return 0.95, "config.json model_type 'resnet'"
        if _resnet_blocks(checkpoint)[0]:
            return 0.85, "tensor names (ResNet stages and blocks)"
        chain = _plain_chain(checkpoint)
        if chain is not None and all(_LENET.match(name) for name in chain):
            return 0.6, "tensor names (LeNet-style conv1… then fc1…)"
        if chain is not None:
            return 0.3, "tensor shapes (convolutions followed by linear layers)"
        return 0.0

    def plan(self, checkpoint: Checkpoint) -> LayerPlan:
        blocks, _ = _resnet_blocks(checkpoint)
        if blocks:
            return _plan_resnet(checkpoint, blocks)
        chain = _plain_chain(checkpoint)
        if chain is None:
            raise StructureError(
                "cnn: neither ResNet names nor a chain of convolutions then linear layers"
            )
        return _plan_chain(checkpoint, chain)


Blocks = dict[tuple[int, int], dict[str, str]]  # (stage, block) → {conv index | "short": name}


def _resnet_blocks(checkpoint: Checkpoint) -> tuple[Blocks, str]:
    for pattern in (_TORCHVISION, _TRANSFORMERS):
        blocks: Blocks = defaultdict(dict)
        prefixes = set()
        for name in checkpoint.tensors:
            match = pattern.match(name)
            if match and len(checkpoint.tensors[name].shape) == 4:
                key = "short" if match["short"] else match["conv"]
                blocks[(int(match["stage"]), int(match["block"]))][key] = name
                prefixes.add(match["prefix"])
        if blocks and len(prefixes) == 1:
            return dict(blocks), prefixes.pop()
    return {}, ""


def _conv_layer(build: PlanBuilder, name: str, type_: str, depth: int, inputs: int) -> Layer | None:
    """A conv reading ``inputs`` channels; groups from the kernel's input channels. None (and
    skipped) when depthwise."""
    c_out, c_in, kh, kw = require_weight(build.checkpoint, name, "cnn", "conv", type_)
    if inputs % c_in:
        raise StructureError(f"cnn: {name} takes {c_in} channels per group; {inputs} reach it")
    groups = inputs // c_in
    kernel = kh * kw
    if c_in == 1 and groups > 1 and kernel > 1:
        build.skip(name, DEPTHWISE)
        return None
    if c_out % groups:
        raise StructureError(f"cnn: {name} has {c_out} outputs, not divisible by {groups} groups")
    return Layer(name, type_, depth, "conv", groups=groups)


def _feed(build: PlanBuilder, layer: Layer, sources: list[str]) -> None:
    width = build.outputs(sources[0])
    index = chain_index(width, layer, build.shape(layer))
    if index is None or any(build.outputs(s) != width for s in sources):
        raise StructureError(f"cnn: {layer.name} does not fit the {width} channels feeding it")
    build.add(layer, sources, index)


def _plan_resnet(checkpoint: Checkpoint, blocks: Blocks) -> LayerPlan:
    build = PlanBuilder(checkpoint, "cnn")
    in_blocks = {name for parts in blocks.values() for name in parts.values()}
    stem_name = next(
        (n for n in checkpoint.names() if n.endswith(_STEMS) and n not in in_blocks), None
    )
    if stem_name is None or len(checkpoint.tensors[stem_name].shape) != 4:
        raise StructureError("cnn: ResNet blocks without a stem convolution (conv1)")
    in_channels = checkpoint.tensors[stem_name].shape[1]
    stem = _conv_layer(build, stem_name, "stem", 0, in_channels)
    assert stem is not None  # a stem reads the image, it is never depthwise
    build.add(replace(stem, group="bottom"))
    build.reads_input(stem.name)
    stream = Stream([stem.name], reads_input=False)
    widths = [in_channels, build.outputs(stem.name)]
    for depth, key in enumerate(sorted(blocks), start=1):
        parts = blocks[key]
        convs = sorted((k for k in parts if k != "short"), key=int)
        previous = list(stream.producers)
        branch: list[str] = []
        for conv in convs:
            layer = _conv_layer(build, parts[conv], "conv", depth, build.outputs(previous[0]))
            if layer is None:
                continue  # depthwise: channels pass through unchanged
            _feed(build, layer, previous)
            previous = [layer.name]
            branch.append(layer.name)
        if not branch:
            raise StructureError(f"cnn: block {key} has no convolution to audit")
        shortcut = list(stream.producers)
        if "short" in parts:
            feeding = build.outputs(stream.producers[0])
            short = _conv_layer(build, parts["short"], "downsample", depth, feeding)
            if short is not None:
                _feed(build, short, stream.producers)
                shortcut = [short.name]
        stage, index = key
        build.block(f"stage {stage} block {index}", {"residual": tuple(branch)}, BRANCH_NOTE)
        stream = Stream([branch[-1], *shortcut], reads_input=False)
        widths.append(build.outputs(branch[-1]))
    classifier = _classifier(checkpoint)
    if classifier is not None:
        fc = Layer(classifier, "fc", len(blocks) + 1, "linear", group="top")
        _feed(build, fc, stream.producers)
        widths.append(build.outputs(fc.name))
    return build.build(
        depth_note="cnn family: depth 0 = stem, 1… = residual blocks in stage order, the "
        "classifier on top",
        widths=widths,
    )


def _classifier(checkpoint: Checkpoint) -> str | None:
    """The 2-D tensor named like a classifier head, if any (the first, in stored order)."""
    for name in checkpoint.names():
        if name.endswith(_CLASSIFIERS) and len(checkpoint.tensors[name].shape) == 2:
            return name
    return None


def _plain_chain(checkpoint: Checkpoint) -> list[str] | None:
    """Conv weights then linear weights, in name order, when they form a chain (each layer
    reads exactly the previous one's outputs); None otherwise."""
    if any(_NOT_CNN.search(name) for name in checkpoint.tensors):
        return None
    usable = [n for n in checkpoint.names() if skip_reason(checkpoint.tensors[n]) is None]
    convs = [n for n in usable if len(checkpoint.tensors[n].shape) == 4]
    linears = [n for n in usable if len(checkpoint.tensors[n].shape) == 2]
    if not convs:
        return None
    chain = convs + linears
    channels = checkpoint.tensors[chain[0]].shape[1]
    for name in chain:
        shape = checkpoint.tensors[name].shape
        fits = channels % shape[1] == 0 if len(shape) == 4 else shape[1] % channels == 0
        if not fits:
            return None
        channels = shape[0]
    return chain


def _plan_chain(checkpoint: Checkpoint, chain: list[str]) -> LayerPlan:
    build = PlanBuilder(checkpoint, "cnn")
    channels = checkpoint.tensors[chain[0]].shape[1]
    widths = [channels]
    previous: str | None = None
    depth = 0
    for name in chain:
        shape = checkpoint.tensors[name].shape
        if len(shape) == 4:
            layer = _conv_layer(build, name, "conv", depth, channels)
            if layer is None:
                continue
        else:
            layer = Layer(name, "fc", depth, "linear")
        if previous is None:
            build.add(layer)
            build.reads_input(layer.name)
        else:
            _feed(build, layer, [previous])
        previous = layer.name
        channels = build.outputs(layer.name)
        widths.append(channels)
        depth += 1
    return build.build(
        depth_note="cnn family (plain chain): depth = position, convolutions before linears",
        widths=widths,
    )
