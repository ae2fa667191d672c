"""Convolutional networks: ResNets (torchvision/timm and transformers names), mobile networks
(MobileNetV2/V3 and EfficientNet, torchvision and timm names) and plain LeNet-style CNNs
(convolutions, then fully connected layers).

ResNet layers: the stem conv (depth 0), the convs of every residual block (depth 1 + the
block's position across stages), the shortcut (``downsample.0`` / ``shortcut.convolution``)
and the classifier on top. Types: stem, conv, downsample, fc.

Graph: a block's first conv and its shortcut read the residual stream — the outputs summed so
far: the stem, then each block's last conv plus its shortcut, or plus the stream it received
when the shortcut is the identity. A conv reads its input channels through kh·kw patches
(index map ``repeat = kh·kw``); the classifier reads the pooled channels. Grouped convs get
their group count from the channels that feed them. A depthwise conv is not fitted (its
matrices are 1 × kh·kw) but stays in the graph as a pass-through node: the conv after it is
fed by it, and it by the conv before it.

Mobile layers: the stem (depth 0), then per block (depth 1 + its position) the ``expand``
1 × 1 conv, the depthwise node, squeeze-excitation's ``se.reduce`` and ``se.expand`` and the
``project`` 1 × 1 conv; then the ``head`` convs/linears and the classifier (``fc``). A block
whose input and output widths agree, and that does not stride, adds its projection to the
stream: a :class:`ResidualBlock` of expansion → depthwise → projection.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, replace

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
    description = (
        "CNNs: ResNet (torchvision/timm, transformers), MobileNetV2/V3 and EfficientNet "
        "(torchvision, timm) and plain LeNet-style nets"
    )

    def detect(self, checkpoint: Checkpoint) -> float | tuple[float, str]:
        config = checkpoint.config or {}
        if config.get("model_type") == "resnet":
            return 0.95, "config.json model_type 'resnet'"
        if _resnet_blocks(checkpoint)[0]:
            return 0.85, "tensor names (ResNet stages and blocks)"
        mobile = _mobile(checkpoint)
        if mobile is not None:
            return 0.85, f"tensor names ({mobile.what})"
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
        mobile = _mobile(checkpoint)
        if mobile is not None:
            return _plan_mobile(checkpoint, mobile)
        chain = _plain_chain(checkpoint)
        if chain is None:
            raise StructureError(
                "cnn: neither ResNet nor MobileNet/EfficientNet names, nor a chain of "
                "convolutions then linear layers"
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


def _conv_layer(build: PlanBuilder, name: str, type_: str, depth: int, inputs: int) -> Layer:
    """A conv reading ``inputs`` channels; groups from the kernel's input channels. A
    depthwise one (one input channel per group, one output per group, a kernel larger than
    1 × 1) is typed ``depthwise``: it becomes a pass-through node (:func:`_feed`)."""
    c_out, c_in, kh, kw = require_weight(build.checkpoint, name, "cnn", "conv", type_)
    if inputs % c_in:
        raise StructureError(f"cnn: {name} takes {c_in} channels per group; {inputs} reach it")
    groups = inputs // c_in
    if c_out % groups:
        raise StructureError(f"cnn: {name} has {c_out} outputs, not divisible by {groups} groups")
    if c_in == 1 and groups > 1 and kh * kw > 1 and c_out == groups:
        type_ = "depthwise"
    return Layer(name, type_, depth, "conv", groups=groups)


def _feed(build: PlanBuilder, layer: Layer, sources: list[str]) -> None:
    """Plan ``layer`` fed by ``sources`` (all of one width); a depthwise convolution is kept
    as a pass-through node, skipped for fitting with its reason."""
    width = build.outputs(sources[0])
    index = chain_index(width, layer, build.shape(layer))
    if index is None or any(build.outputs(s) != width for s in sources):
        raise StructureError(f"cnn: {layer.name} does not fit the {width} channels feeding it")
    if layer.type == "depthwise":
        build.pass_through(layer, DEPTHWISE, sources, index)
    else:
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
    build.add(replace(stem, group="bottom"))
    build.reads_input(stem.name)
    stream = Stream([stem.name], reads_input=False)
    widths = [in_channels, build.outputs(stem.name)]
    for depth, key in enumerate(sorted(blocks), start=1):
        parts = blocks[key]
        convs = sorted((k for k in parts if k != "short"), key=int)
        previous = list(stream.producers)
        branch: list[str] = []
        audited = False
        for conv in convs:
            layer = _conv_layer(build, parts[conv], "conv", depth, build.outputs(previous[0]))
            _feed(build, layer, previous)  # a depthwise one is a pass-through node
            previous = [layer.name]
            branch.append(layer.name)
            audited |= layer.type != "depthwise"
        if not audited:
            raise StructureError(f"cnn: block {key} has no convolution to audit")
        shortcut = list(stream.producers)
        if "short" in parts:
            feeding = build.outputs(stream.producers[0])
            short = _conv_layer(build, parts["short"], "downsample", depth, feeding)
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
        else:
            layer = Layer(name, "fc", depth, "linear")
        if previous is None:
            build.add(layer)
            build.reads_input(layer.name)
        else:
            _feed(build, layer, [previous])
        previous = layer.name
        if layer.type == "depthwise":
            continue  # a pass-through node: the channels, the widths and the depth go on
        channels = build.outputs(layer.name)
        widths.append(channels)
        depth += 1
    return build.build(
        depth_note="cnn family (plain chain): depth = position, convolutions before linears",
        widths=widths,
    )


# ── mobile networks: MobileNetV2/V3 and EfficientNet, torchvision and timm names ──────────

# torchvision: ``features.N.conv.K[.0]`` (MobileNetV2), ``features.N.block.K.0`` (MobileNetV3),
# ``features.S.B.block.K.0`` (EfficientNet); squeeze-excitation ``….block.K.fc1/fc2``.
_TV_MOBILE = re.compile(
    r"^(?P<prefix>(?:[\w.]+\.)?)features\.(?P<a>\d+)\.(?:(?P<b>\d+)\.)?(?P<kind>conv|block)\."
    r"(?P<k>\d+)\.(?:(?P<se>fc1|fc2)\.|0\.)?weight$"
)
# timm (EfficientNet and MobileNetV3 classes): ``blocks.S.B.<part>``.
_TIMM_MOBILE = re.compile(
    r"^(?P<prefix>(?:[\w.]+\.)?)blocks\.(?P<a>\d+)\.(?P<b>\d+)\."
    r"(?P<part>conv_pw|conv_dw|conv_pwl|conv_exp|conv|se\.conv_reduce|se\.conv_expand)\.weight$"
)
_SE_ROLES = {
    "fc1": "se.reduce",
    "fc2": "se.expand",
    "se.conv_reduce": "se.reduce",
    "se.conv_expand": "se.expand",
}
# timm's parts in forward order. ``conv_pw`` expands before ``conv_dw`` in an inverted
# residual (which projects with ``conv_pwl``) and projects after it in a depthwise-separable
# block (which has no ``conv_pwl``).
_TIMM_ORDER = {"conv_exp": 0, "conv": 0, "conv_dw": 1, "se.conv_reduce": 2, "se.conv_expand": 3}
# Strides are not stored in the weights. Only the first block of a stage can stride (both
# torchvision's and timm's builders give every later block stride 1); the first blocks'
# strides, by the number of stages of inverted residuals, are those of the published
# architectures (EfficientNetV2-S and -M/L publish the same ones for 6 and 7 stages).
_STAGE_STRIDES = {
    7: ((1, 2, 2, 2, 1, 2, 1), "MobileNetV2, EfficientNet-B0…B7"),
    6: ((1, 2, 2, 2, 1, 2), "MobileNetV3-Large"),
    5: ((2, 2, 2, 1, 2), "MobileNetV3-Small"),
}
# torchvision's MobileNets number their blocks without stages: blocks per stage, by layout.
_TV_STAGES = {
    ("conv", 17): ((1, 2, 3, 4, 3, 3, 1), "torchvision MobileNetV2"),
    ("block", 15): ((1, 2, 3, 4, 2, 3), "torchvision MobileNetV3-Large"),
    ("block", 11): ((1, 2, 3, 2, 3), "torchvision MobileNetV3-Small"),
}

MOBILE_NOTE = (
    "expansion, depthwise and projection kernels as (C_out) × (C_in·kh·kw) matrices per group "
    "(the depthwise one: the largest norm of a channel's kernel), each within √(kh·kw) of its "
    "convolution's operator norm; squeeze-excitation gates (in [0, 1], set by the input) and "
    "BatchNorm scales are not included"
)


@dataclass
class _Block:
    name: str  # the module: features.3, features.2.1, blocks.1.0
    stage: int | None  # None: a flat torchvision layout whose stages are not known
    first: bool  # the first block of its stage (or of unknown stage)
    parts: list[tuple[str, str]]  # (role, tensor) in forward order: conv, se.reduce, se.expand


@dataclass
class _Mobile:
    what: str  # the layout recognised, for the report
    stem: str
    blocks: list[_Block]
    heads: list[str]  # convs and linears between the last block and the classifier
    classifier: str | None
    strides: tuple[int, ...] | None  # each stage's first stride; None when not known
    strides_from: str


def _mobile(checkpoint: Checkpoint) -> _Mobile | None:
    """The mobile layout of ``checkpoint`` (torchvision or timm names), if it is one."""
    return _torchvision_mobile(checkpoint) or _timm_mobile(checkpoint)


def _is_conv(checkpoint: Checkpoint, name: str) -> bool:
    info = checkpoint.tensors.get(name)
    return info is not None and len(info.shape) == 4


def _dw_kernel(shape: tuple[int, ...]) -> bool:
    """(C, 1, kh, kw) with C > 1 and a kernel larger than 1 × 1: depthwise when C channels
    reach it."""
    return shape[1] == 1 and shape[0] > 1 and shape[2] * shape[3] > 1


def _has_depthwise(checkpoint: Checkpoint, blocks: list[_Block]) -> bool:
    return any(
        _dw_kernel(checkpoint.tensors[name].shape)
        for block in blocks
        for role, name in block.parts
        if role == "conv"
    )


def _torchvision_mobile(checkpoint: Checkpoint) -> _Mobile | None:
    found: dict[tuple[int, int | None], list[tuple[tuple[int, int], str, str]]] = defaultdict(list)
    prefixes, kinds = set(), set()
    for name in checkpoint.tensors:
        match = _TV_MOBILE.match(name)
        if match and _is_conv(checkpoint, name):
            b = None if match["b"] is None else int(match["b"])
            order = (int(match["k"]), int(match["se"] == "fc2"))
            found[(int(match["a"]), b)].append((order, _SE_ROLES.get(match["se"], "conv"), name))
            prefixes.add(match["prefix"])
            kinds.add(match["kind"])
    if not found or len(prefixes) != 1 or len(kinds) != 1:
        return None
    prefix, kind = prefixes.pop(), kinds.pop()
    staged = {b is not None for _, b in found}
    if len(staged) != 1:
        return None
    stem = f"{prefix}features.0.0.weight"
    last = max(a for a, _ in found)
    heads: list[tuple[int, str]] = []
    plain = re.compile(rf"{re.escape(prefix)}features\.(\d+)\.0\.weight")
    in_blocks = {name for parts in found.values() for _, _, name in parts}
    for name in checkpoint.names():
        if not name.startswith(f"{prefix}features.") or name in in_blocks:
            continue
        if not _is_conv(checkpoint, name):
            continue
        match = plain.fullmatch(name)
        if match is None or 0 < int(match[1]) <= last:
            return None  # a convolution the layout does not explain
        if int(match[1]) > last:
            heads.append((int(match[1]), name))
    if not _is_conv(checkpoint, stem):
        return None
    keys = sorted(found)
    flat = staged == {False}
    stage_sizes, what = _TV_STAGES.get((kind, len(keys)), ((), ""))
    if flat:
        stage_of = [i for i, size in enumerate(stage_sizes) for _ in range(size)]
        what = what or f"torchvision MobileNet{'V2' if kind == 'conv' else 'V3'}-style blocks"
    blocks = []
    for i, key in enumerate(keys):
        a, b = key
        parts = [(role, name) for _, role, name in sorted(found[key])]
        if flat:
            stage = stage_of[i] if stage_of else None
            first = stage is None or i == 0 or stage_of[i - 1] != stage
            blocks.append(_Block(f"{prefix}features.{a}", stage, first, parts))
        else:
            first = b == min(y or 0 for x, y in keys if x == a)
            blocks.append(_Block(f"{prefix}features.{a}.{b}", a, first, parts))
    if not flat:
        stages = sorted({a for a, _ in keys})
        blocks = [replace(x, stage=stages.index(x.stage or 0)) for x in blocks]
        what = "torchvision EfficientNet stages"
    if not _has_depthwise(checkpoint, blocks):
        return None
    # ``classifier.K`` in torchvision's Sequential, or ``classifier`` when a fine-tuning script
    # replaced it by one Linear.
    linears = re.compile(rf"{re.escape(prefix)}classifier(?:\.(\d+))?\.weight")
    tail = sorted(
        (int(m[1] or 0), name)
        for name in checkpoint.names()
        if (m := linears.fullmatch(name)) and len(checkpoint.tensors[name].shape) == 2
    )
    names = [name for _, name in sorted(heads)] + [name for _, name in tail]
    classifier = names.pop() if tail else None
    return _with_strides(_Mobile(what, stem, blocks, names, classifier, None, ""))


def _timm_mobile(checkpoint: Checkpoint) -> _Mobile | None:
    found: dict[tuple[int, int], dict[str, str]] = defaultdict(dict)
    prefixes = set()
    for name in checkpoint.tensors:
        match = _TIMM_MOBILE.match(name)
        if match and _is_conv(checkpoint, name):
            found[(int(match["a"]), int(match["b"]))][match["part"]] = name
            prefixes.add(match["prefix"])
    if not found or len(prefixes) != 1:
        return None
    prefix = prefixes.pop()
    stem = f"{prefix}conv_stem.weight"
    matched = {name for parts in found.values() for name in parts.values()}
    strays = [
        n
        for n in checkpoint.tensors
        if n.startswith(f"{prefix}blocks.") and _is_conv(checkpoint, n) and n not in matched
    ]
    if strays or not _is_conv(checkpoint, stem):
        return None
    blocks = []
    for key in sorted(found):
        parts = found[key]
        project_last = "conv_pwl" not in parts  # a depthwise-separable block's conv_pw projects
        order = {**_TIMM_ORDER, "conv_pw": 4 if project_last else 0, "conv_pwl": 4}
        ordered = sorted(parts, key=order.__getitem__)
        roles = [(_SE_ROLES.get(part, "conv"), parts[part]) for part in ordered]
        stage, index = key
        first = index == min(b for a, b in found if a == stage)
        blocks.append(_Block(f"{prefix}blocks.{stage}.{index}", stage, first, roles))
    heads: list[str] = []
    while blocks and [role for role, _ in blocks[-1].parts] == ["conv"]:
        heads.insert(0, blocks.pop().parts[0][1])  # timm's ConvBnAct stage before the head
    if not blocks or not _has_depthwise(checkpoint, blocks):
        return None
    stages = sorted({x.stage for x in blocks if x.stage is not None})
    blocks = [replace(x, stage=stages.index(x.stage or 0)) for x in blocks]
    if _is_conv(checkpoint, f"{prefix}conv_head.weight"):
        heads.append(f"{prefix}conv_head.weight")
    classifier = f"{prefix}classifier.weight"
    info = checkpoint.tensors.get(classifier)
    found_classifier = classifier if info is not None and len(info.shape) == 2 else None
    what = "timm EfficientNet/MobileNet blocks"
    return _with_strides(_Mobile(what, stem, blocks, heads, found_classifier, None, ""))


def _with_strides(mobile: _Mobile) -> _Mobile:
    stages = {x.stage for x in mobile.blocks}
    if None in stages or len(stages) not in _STAGE_STRIDES:
        return mobile
    strides, source = _STAGE_STRIDES[len(stages)]
    return replace(mobile, strides=strides, strides_from=source)


def _stride_one(mobile: _Mobile, block: _Block, assumed: list[str]) -> bool:
    """Whether ``block`` keeps the spatial size (a condition of its skip connection)."""
    if not block.first:
        return True
    if mobile.strides is not None and block.stage is not None:
        return mobile.strides[block.stage] == 1
    assumed.append(block.name)
    return True


def _plan_block(build: PlanBuilder, block: _Block, depth: int, previous: list[str]) -> list[str]:
    """Plan one block fed by ``previous``; its main path (without squeeze-excitation)."""
    convs = [name for role, name in block.parts if role == "conv"]
    audited = [n for n in convs if not _dw_kernel(build.checkpoint.tensors[n].shape)]
    if not audited:
        raise StructureError(f"cnn: block {block.name} has no convolution to audit")
    types = dict.fromkeys(audited, "conv")
    if len(audited) > 1:
        types[audited[0]], types[audited[-1]] = "expand", "project"
    elif len(audited) < len(convs):
        types[audited[0]] = "project"  # depthwise, then the pointwise projection
    branch: list[str] = []
    reduce: str | None = None
    gate: str | None = None
    for role, name in block.parts:
        if role == "se.reduce":
            inputs = build.outputs(previous[0])
            _feed(build, _conv_layer(build, name, role, depth, inputs), previous)
            reduce = name
        elif role == "se.expand":
            if reduce is None:
                raise StructureError(f"cnn: {name} expands a squeeze-excitation never reduced")
            inputs = build.outputs(reduce)
            _feed(build, _conv_layer(build, name, role, depth, inputs), [reduce])
            reduce, gate = None, name
        else:
            inputs = build.outputs(previous[0])
            layer = _conv_layer(build, name, types.get(name, "conv"), depth, inputs)
            _feed(build, layer, [*previous, *([gate] if gate else [])])
            previous, gate = [name], None
            branch.append(name)
    if gate is not None or reduce is not None:
        raise StructureError(f"cnn: block {block.name} ends in squeeze-excitation")
    return branch


def _plan_mobile(checkpoint: Checkpoint, mobile: _Mobile) -> LayerPlan:
    build = PlanBuilder(checkpoint, "cnn")
    in_channels = checkpoint.tensors[mobile.stem].shape[1]
    stem = _conv_layer(build, mobile.stem, "stem", 0, in_channels)
    build.add(replace(stem, group="bottom"))
    build.reads_input(stem.name)
    stream = Stream([stem.name], reads_input=False)
    widths = [in_channels, build.outputs(stem.name)]
    assumed: list[str] = []
    for depth, block in enumerate(mobile.blocks, start=1):
        width = build.outputs(stream.producers[0])
        branch = _plan_block(build, block, depth, list(stream.producers))
        out = build.outputs(branch[-1])
        if out == width and _stride_one(mobile, block, assumed):
            build.block(block.name, {"residual": tuple(branch)}, MOBILE_NOTE)
            stream = Stream([*stream.producers, branch[-1]], reads_input=False)
        else:
            stream = Stream([branch[-1]], reads_input=False)
        widths.append(out)
    previous = list(stream.producers)
    tail = [*mobile.heads, *([mobile.classifier] if mobile.classifier else [])]
    for depth, name in enumerate(tail, start=len(mobile.blocks) + 1):
        type_ = "fc" if name == mobile.classifier else "head"
        if _is_conv(checkpoint, name):
            layer = _conv_layer(build, name, type_, depth, build.outputs(previous[0]))
        else:
            layer = Layer(name, type_, depth, "linear")
        _feed(build, replace(layer, group="top"), previous)
        previous = [name]
        widths.append(build.outputs(name))
    for name in checkpoint.names():  # numbered BatchNorms (features.N.conv.0.1.weight)
        module, _, leaf = name.rpartition(".")
        batchnorm = f"{module}.running_mean" in checkpoint.tensors
        if batchnorm and leaf in ("weight", "running_mean", "running_var"):
            build.skip(name, "normalisation parameter")
    nodes = len(build.plan.pass_through)
    excitation = any(layer.type.startswith("se.") for layer in build.plan.layers)
    build.note(
        f"cnn ({mobile.what}): {nodes} depthwise convolution(s) not fitted but kept in the "
        "graph as pass-through nodes (each reads the layer before it and feeds the one after "
        "it)"
        + (
            "; squeeze-excitation convs are typed se.reduce / se.expand, off the main path"
            if excitation
            else ""
        )
    )
    if mobile.strides is not None:
        build.note(
            "strides are not stored in the weights: a block of equal input and output widths "
            "has a skip connection unless it is the first of a stage that strides by 2 "
            f"(stage strides {', '.join(map(str, mobile.strides))}, as in {mobile.strides_from})"
        )
    if assumed:
        shown = ", ".join(assumed[:4]) + (
            f" and {len(assumed) - 4} more" if len(assumed) > 4 else ""
        )
        build.note(
            f"strides not known for {shown}: taken as 1 (a skip connection) from their equal "
            "input and output widths"
        )
    return build.build(
        depth_note="cnn family (mobile): depth 0 = stem, 1… = blocks in order (expansion, "
        "depthwise, squeeze-excitation and projection at their block's depth), then the head "
        "convs and the classifier",
        widths=widths,
    )
