"""Encoder–decoder transformers: T5 (mT5, UMT5) and BART-style models (BART, mBART, Marian,
Pegasus, M2M-100/NLLB, PLBart, Blenderbot), as transformers ``save_pretrained`` writes them.

Two stacks, each with its own residual stream, and a layer's ``stack`` says which one it is
in: thirds are counted within each stack, so the encoder's bottom third and the decoder's are
reported apart. Types carry the stack too (``encoder.query``, ``decoder.cross-key``), because an
encoder's query and a decoder's are not one population. Depth runs through both stacks, encoder
block i at depth i and decoder block j at E + j, because the decoder's cross-attention reads the
encoder's final stream: every feed goes to the same or a deeper layer.

Graph (T5 is pre-RMSNorm, BART post-LayerNorm, mBART pre-LayerNorm; none of these norms mixes
channels, so every stream map is the identity):

- encoder block i: q, k, v and the MLP's first layer (wi, wi_0 and wi_1, fc1) read the encoder
  stream, its input embedding plus every earlier o and second MLP layer (wo, fc2);
- decoder block j: self-attention q, k, v read the decoder stream (the target embedding plus
  the decoder's own earlier outputs); cross-attention q reads the decoder stream, k and v the
  encoder's final stream; each o reads its v; the MLP reads the decoder stream;
- the head (lm_head, or a classification head) reads the decoder's final stream.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from dynaudit.families import Family, Layer, LayerPlan
from dynaudit.families.build import (
    PlanBuilder,
    Stream,
    StructureError,
    config_int,
    require_weight,
)
from dynaudit.tensors import Checkpoint

__all__ = ["EncoderDecoderFamily", "Tower"]

Kind = Literal["linear", "conv"]
NAME = "encoder-decoder"
T5_TYPES = ("t5", "mt5", "umt5")
BART_TYPES = (
    "bart",
    "mbart",
    "marian",
    "pegasus",
    "m2m_100",
    "plbart",
    "blenderbot",
    "blenderbot-small",
)
_ATTENTION = ("query", "key", "value", "output")
_CROSS = tuple(f"cross-{role}" for role in _ATTENTION)


@dataclass(frozen=True)
class _Layout:
    """One naming scheme: the block pattern and each block part's role."""

    name: str
    block: re.Pattern[str]
    roles: dict[str, str]  # block part → role
    mlp: tuple[tuple[tuple[str, ...], str], ...]  # accepted (first layers, second layer)
    config: dict[str, tuple[str, ...]]  # what → config.json keys, first found wins


_T5 = _Layout(
    "T5",
    re.compile(
        r"^(?P<prefix>(?:[\w.]+\.)?)(?P<stack>encoder|decoder)\.block\.(?P<index>\d+)\."
        r"layer\.\d+\.(?P<part>\w+\.\w+)\.weight$"
    ),
    {
        **{f"SelfAttention.{x}": r for x, r in zip("qkvo", _ATTENTION, strict=True)},
        **{f"EncDecAttention.{x}": r for x, r in zip("qkvo", _CROSS, strict=True)},
        **{f"DenseReluDense.{x}": x for x in ("wi", "wi_0", "wi_1", "wo")},
    },
    ((("wi",), "wo"), (("wi_0", "wi_1"), "wo")),
    {
        "encoder": ("num_layers",),
        "decoder": ("num_decoder_layers", "num_layers"),
        "width": ("d_model",),
        "heads": ("num_heads",),
        "head_dim": ("d_kv",),
    },
)
_BART = _Layout(
    "BART",
    re.compile(
        r"^(?P<prefix>(?:[\w.]+\.)?)(?P<stack>encoder|decoder)\.layers\.(?P<index>\d+)\."
        r"(?P<part>[\w.]+?)\.weight$"
    ),
    {
        **{
            f"self_attn.{x}_proj": r
            for x, r in zip(("q", "k", "v", "out"), _ATTENTION, strict=True)
        },
        **{
            f"encoder_attn.{x}_proj": r for x, r in zip(("q", "k", "v", "out"), _CROSS, strict=True)
        },
        "fc1": "fc1",
        "fc2": "fc2",
    },
    ((("fc1",), "fc2"),),
    {"encoder": ("encoder_layers",), "decoder": ("decoder_layers",), "width": ("d_model",)},
)
_RELATIVE = re.compile(r"\.relative_attention_bias\.weight$")
_HEADS = ("lm_head.weight", "qa_outputs.weight", "classifier.weight")
_CLASSIFIER = ("classification_head.dense.weight", "classification_head.out_proj.weight")
_SKIPS = {
    "final_logits_bias": "bias added to every logit (BART's final_logits_bias)",
}
RELATIVE_BIAS = (
    "relative position bias (T5): one scalar per distance bucket and head, added to the "
    "attention scores; it acts on positions, not on features"
)


@dataclass
class Tower:
    """One stack of transformer blocks over its own residual stream of ``width`` channels.

    Types are ``<stack>.<role>`` and every layer carries ``stack``. Each method checks that
    the widths let the identity index map hold (a layer reading the stream has ``width``
    inputs, one writing into it ``width`` outputs, o reads exactly v's outputs) and raises
    :class:`StructureError` otherwise."""

    build: PlanBuilder
    stack: str
    width: int
    stream: Stream = field(default_factory=Stream)

    def layer(self, name: str, role: str, depth: int, kind: Kind = "linear") -> Layer:
        """A layer of this tower, typed ``<stack>.<role>``."""
        return Layer(name, f"{self.stack}.{role}", depth, kind, stack=self.stack)

    def add(self, layer: Layer, fed_by: Stream | Sequence[str]) -> Layer:
        """Plan ``layer`` fed by a stream of the tower's width, or by the named layers (their
        outputs multiplied or read channel by channel)."""
        self.build.add(layer, fed_by)
        inputs = self.build.shape(layer)[2]
        if isinstance(fed_by, Stream):
            want = self.width
        else:
            want = self.build.outputs(fed_by[0])
            odd = [src for src in fed_by if self.build.outputs(src) != want]
            if odd:
                raise StructureError(
                    f"{self.build.family}: {', '.join(fed_by)} differ in width; "
                    f"{layer.source} reads them channel by channel"
                )
        if inputs != want:
            raise StructureError(
                f"{self.build.family}: {layer.source} reads {inputs} channels; what feeds it "
                f"({self._what(fed_by)}) has {want}"
            )
        return layer

    def attention(
        self,
        parts: dict[str, str],
        depth: int,
        roles: Sequence[str] = _ATTENTION,
        memory: Stream | None = None,
    ) -> tuple[str, str]:
        """q, k, v, o of one attention (``parts``: role → tensor). Keys and values read
        ``memory`` (the encoder's final stream, for cross-attention) or the tower's stream."""
        q, k, v, o = (self.layer(parts[role], role, depth) for role in roles)
        self.add(q, self.stream)
        for kv in (k, v):
            self.add(kv, memory or self.stream)
        if self.build.outputs(q.name) != self.build.outputs(k.name):
            raise StructureError(
                f"{self.build.family}: {q.name} has {self.build.outputs(q.name)} outputs and "
                f"{k.name} {self.build.outputs(k.name)}; attention compares them head by head"
            )
        self.add(o, [v.name])
        self._writes(o)
        return v.name, o.name

    def mlp(self, first: Sequence[Layer], second: Layer) -> tuple[str, ...]:
        """The MLP: ``first`` read the stream, ``second`` reads their (product of) outputs."""
        for layer in first:
            self.add(layer, self.stream)
        self.add(second, [x.name for x in first])
        self._writes(second)
        return (*(x.name for x in first), second.name)

    def _writes(self, layer: Layer) -> None:
        outputs = self.build.outputs(layer.name)
        if outputs != self.width:
            raise StructureError(
                f"{self.build.family}: {layer.source} writes {outputs} channels into a "
                f"{self.width}-wide {self.stack} stream"
            )
        self.stream.add(layer.name)

    @staticmethod
    def _what(fed_by: Stream | Sequence[str]) -> str:
        return "the residual stream" if isinstance(fed_by, Stream) else ", ".join(fed_by)


def _collect(
    checkpoint: Checkpoint, layout: _Layout
) -> tuple[dict[str, dict[int, dict[str, str]]], set[str]]:
    """``{stack: {block index: {role: tensor}}}`` and the distinct name prefixes."""
    stacks: dict[str, dict[int, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    prefixes = set()
    for name in checkpoint.tensors:
        match = layout.block.match(name)
        if match and match["part"] in layout.roles:
            stacks[match["stack"]][int(match["index"])][layout.roles[match["part"]]] = name
            prefixes.add(match["prefix"])
    return {k: dict(v) for k, v in stacks.items()}, prefixes


def _layout_of(checkpoint: Checkpoint) -> tuple[_Layout | None, str]:
    """The naming scheme and what told it: config.json's model_type, else (only when
    config.json names no model type at all) complete encoder and decoder blocks."""
    config = checkpoint.config or {}
    model_type = config.get("model_type")
    if model_type in T5_TYPES:
        return _T5, f"config.json model_type {model_type!r}"
    if model_type in BART_TYPES:
        return _BART, f"config.json model_type {model_type!r}"
    if model_type is not None:
        return None, ""  # e.g. whisper, switch_transformers: same names, other architectures
    for layout in (_T5, _BART):
        if _complete(layout, _collect(checkpoint, layout)[0]):
            why = f"tensor names ({layout.name} encoder and decoder blocks with cross-attention)"
            return layout, why
    return None, ""


def _complete(layout: _Layout, stacks: dict[str, dict[int, dict[str, str]]]) -> bool:
    """Every encoder block has its attention and an MLP, every decoder block its
    cross-attention too, and there are both."""
    mlps = [{*first, second} for first, second in layout.mlp]

    def whole(block: dict[str, str], roles: tuple[str, ...]) -> bool:
        return set(roles) <= set(block) and any(mlp <= set(block) for mlp in mlps)

    encoder, decoder = stacks.get("encoder", {}), stacks.get("decoder", {})
    return (
        bool(encoder and decoder)
        and all(whole(block, _ATTENTION) for block in encoder.values())
        and all(whole(block, _ATTENTION + _CROSS) for block in decoder.values())
    )


class EncoderDecoderFamily(Family):
    name = NAME
    description = (
        "encoder-decoder transformers (T5, mT5, BART, mBART, Marian, Pegasus, M2M-100): "
        "encoder and decoder thirds apart, cross-attention fed by the encoder"
    )

    def detect(self, checkpoint: Checkpoint) -> float | tuple[float, str]:
        layout, why = _layout_of(checkpoint)
        if layout is None:
            return 0.0
        stacks, _ = _collect(checkpoint, layout)
        if why.startswith("config.json"):
            return (0.95 if stacks.get("encoder") else 0.5), why
        return 0.8, why

    def plan(self, checkpoint: Checkpoint) -> LayerPlan:
        layout, _ = _layout_of(checkpoint)
        if layout is None:
            raise StructureError(
                f"{NAME}: neither T5 (encoder.block.N.layer.M.SelfAttention.q) nor BART "
                f"(encoder.layers.N.self_attn.q_proj) blocks in {checkpoint.root}"
            )
        stacks, prefixes = _collect(checkpoint, layout)
        if len(prefixes) > 1:
            raise StructureError(f"{NAME}: several models in one checkpoint: {sorted(prefixes)}")
        encoder, decoder = stacks.get("encoder", {}), stacks.get("decoder", {})
        if not encoder:
            raise StructureError(
                f"{NAME}: no {layout.name} encoder blocks (a decoder alone is not an "
                "encoder-decoder; --family generic audits it)"
            )
        config = checkpoint.config or {}
        _check_indices(encoder, "encoder", config_int(config, *layout.config["encoder"]))
        if decoder:
            _check_indices(decoder, "decoder", config_int(config, *layout.config["decoder"]))
        first = _require(encoder[0], _ATTENTION, "encoder block 0")["query"]
        width = (
            config_int(config, *layout.config["width"])
            or require_weight(checkpoint, first, NAME, "linear", "encoder.query")[1]
        )
        _check_heads(checkpoint, layout, stacks)
        gated = _gated(config) if layout is _T5 else None

        build = PlanBuilder(checkpoint, NAME)
        for name in checkpoint.names():
            if _RELATIVE.search(name):
                build.skip(name, RELATIVE_BIAS)
            elif name in _SKIPS:
                build.skip(name, _SKIPS[name])
        enc = Tower(build, "encoder", width)
        for depth, index in enumerate(sorted(encoder)):
            parts = _require(encoder[index], _ATTENTION, f"encoder block {index}")
            value, out = enc.attention(parts, depth)
            mlp = enc.mlp(*_mlp(layout, enc, parts, depth, gated, f"encoder block {index}"))
            build.block(
                f"encoder block {index}",
                {"attention": (value, out), "mlp": mlp},
                note=_NOTE + (_GATED if len(mlp) == 3 else ""),
            )
        memory = Stream(list(enc.stream.producers))  # the encoder's output (+ its input)
        dec = Tower(build, "decoder", width)
        top = len(encoder) + len(decoder)
        for j, index in enumerate(sorted(decoder)):
            depth = len(encoder) + j
            where = f"decoder block {index}"
            parts = _require(decoder[index], _ATTENTION + _CROSS, where)
            value, out = dec.attention(parts, depth)
            cross = dec.attention(parts, depth, _CROSS, memory)
            mlp = dec.mlp(*_mlp(layout, dec, parts, depth, gated, where))
            build.block(
                where,
                {"self-attention": (value, out), "cross-attention": cross, "mlp": mlp},
                note=_NOTE + _CROSS_NOTE + (_GATED if len(mlp) == 3 else ""),
            )
        final = dec if decoder else enc
        outputs = _heads(build, final, top)
        embed = next(
            (i for n, i in checkpoint.tensors.items() if n.endswith("shared.weight")), None
        )
        vocab = config_int(config, "vocab_size")
        vocab_in = embed.shape[0] if embed is not None and len(embed.shape) == 2 else vocab
        if not outputs and decoder:
            build.note("lm_head is tied to the shared embedding; embeddings are not audited")
            outputs = vocab or 0
        if not decoder:
            build.note(f"{layout.name} encoder only (no decoder blocks in the checkpoint)")
        build.note(f"{layout.name} layout; thirds are counted within each stack (encoder, decoder)")
        return build.build(
            depth_note=f"{NAME} family: depth i = encoder block i, E + j = decoder block j "
            f"(E = {len(encoder)} encoder blocks), the head on top; thirds within each stack",
            widths=[w for w in (vocab_in, width, *[width] * top, outputs) if w],
        )


_NOTE = "attention: the value path only (q and k act through the softmax)"
_CROSS_NOTE = (
    "; cross-attention: the encoder's output carried into the decoder stream (from the "
    "decoder stream it acts only through the softmax)"
)
_GATED = "; mlp: wi_0 ⊙ wi_1 is quadratic in its input"


def _require(parts: dict[str, str], roles: Iterable[str], where: str) -> dict[str, str]:
    missing = [role for role in roles if role not in parts]
    if missing:
        raise StructureError(
            f"{NAME}: {where} lacks {', '.join(missing)} (pruned, or one shard of several?)"
        )
    return parts


def _check_indices(blocks: dict[int, dict[str, str]], stack: str, expected: int | None) -> None:
    indices = sorted(blocks)
    want = list(range(expected if expected is not None else len(indices)))
    if indices != want:
        said = f"config.json says {expected}" if expected is not None else "expected 0, 1, …"
        raise StructureError(
            f"{NAME}: {stack} blocks {indices[0]}…{indices[-1]} ({len(indices)}); {said}"
        )


def _check_heads(
    checkpoint: Checkpoint, layout: _Layout, stacks: dict[str, dict[int, dict[str, str]]]
) -> None:
    """T5's attention width is heads × d_kv, which need not equal d_model: check q's rows."""
    config = checkpoint.config or {}
    heads = config_int(config, *layout.config.get("heads", ()))
    head_dim = config_int(config, *layout.config.get("head_dim", ()))
    if not (heads and head_dim):
        return
    for stack, blocks in stacks.items():
        for index, parts in blocks.items():
            for role in ("query", "cross-query"):
                name = parts.get(role)
                if name and checkpoint.tensors[name].shape[0] != heads * head_dim:
                    raise StructureError(
                        f"{NAME}: {name} has {checkpoint.tensors[name].shape[0]} rows; "
                        f"config.json's num_heads × d_kv say {heads * head_dim} "
                        f"({stack} block {index})"
                    )


def _gated(config: dict[str, object]) -> bool | None:
    """Whether config.json says T5's MLP is gated (flan-t5, T5 v1.1, mT5); None if silent."""
    proj = config.get("feed_forward_proj")
    if isinstance(proj, str):
        return proj.startswith("gated-")
    flag = config.get("is_gated_act")
    return flag if isinstance(flag, bool) else None


def _mlp(
    layout: _Layout,
    tower: Tower,
    parts: dict[str, str],
    depth: int,
    gated: bool | None,
    where: str,
) -> tuple[list[Layer], Layer]:
    """The MLP's first layers and its second, from the variant the block's names show."""
    for first, second in layout.mlp:
        if all(role in parts for role in (*first, second)):
            if gated is not None and gated != (len(first) > 1):
                said = "a gated" if gated else "an ungated"
                raise StructureError(
                    f"{NAME}: {where} has {', '.join(first)}; config.json's feed_forward_proj "
                    f"says {said} MLP"
                )
            return [tower.layer(parts[r], r, depth) for r in first], tower.layer(
                parts[second], second, depth
            )
    wanted = " or ".join("/".join((*first, second)) for first, second in layout.mlp)
    raise StructureError(f"{NAME}: {where} lacks its MLP ({wanted})")


def _heads(build: PlanBuilder, final: Tower, depth: int) -> int:
    """Heads on the final stream, pinned to the top; the number of outputs of the last one."""
    outputs = 0
    checkpoint = build.checkpoint
    for name in _HEADS:
        if name in checkpoint.tensors and len(checkpoint.tensors[name].shape) == 2:
            final.add(Layer(name, "head", depth, group="top", stack=final.stack), final.stream)
            outputs = build.outputs(name)
    dense, out = _CLASSIFIER
    if dense in checkpoint.tensors and out in checkpoint.tensors:
        pooler = Layer(dense, "pooler", depth, group="top", stack=final.stack)
        final.add(pooler, final.stream)
        head = Layer(out, "head", depth, group="top", stack=final.stack)
        final.add(head, [dense])
        outputs = build.outputs(out)
    return outputs
