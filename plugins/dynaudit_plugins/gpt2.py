"""GPT-2: transformers ``GPT2Model`` / ``GPT2LMHeadModel`` names, ``Conv1D`` weights.

Per block ``h.N``: ``attn.c_attn`` (q, k and v fused), ``attn.c_proj``, ``mlp.c_fc``,
``mlp.c_proj``, reported as query, key, value, output, fc, proj at depth N; ``lm_head`` (when
not tied to ``wte``), ``score`` or ``classifier`` at the top.

``Conv1D`` computes ``x @ W + b`` with ``W`` stored (in, out), so every layer is transposed. The
fused ``c_attn`` is stored (d, 3·d) and ``GPT2Attention`` splits its output with
``.split(n_embd, dim=2)``: query, key and value are the stored columns ``[0, d)``, ``[d, 2d)``,
``[2d, 3d)``. ``d`` is config.json's ``n_embd``; without a config it is the width of the square
``attn.c_proj`` (which maps d to d), never the columns divided by three.

Graph (pre-LN residual stream, as in llama): q, k, v and fc read the stream — the input plus
every earlier output and proj; output reads v (each head its own value head); proj reads fc;
the head reads the final stream.
"""

from __future__ import annotations

import re

from dynaudit.families import Family, Layer, LayerPlan
from dynaudit.families.build import (
    PlanBuilder,
    Stream,
    StructureError,
    add_transformer_block,
    config_int,
    index_blocks,
    require_blocks,
)
from dynaudit.tensors import Checkpoint

__all__ = ["GPT2Family"]

_PARTS = {
    "attn.c_attn": "qkv",
    "attn.c_proj": "output",
    "mlp.c_fc": "fc",
    "mlp.c_proj": "proj",
}
_BLOCK = re.compile(
    r"^(?P<prefix>(?:[\w.]+\.)?h)\.(?P<index>\d+)\.(?P<part>"
    + "|".join(re.escape(p) for p in _PARTS)
    + r")\.weight$"
)
_CROSS = re.compile(r"(^|\.)h\.\d+\.crossattention\.")
# buffers that older transformers versions saved with the weights
_BUFFERS = {
    ".attn.bias": "causal attention mask (a buffer saved by older transformers, not a weight)",
    ".attn.masked_bias": "attention mask fill value (a buffer, not a weight)",
}
_HEADS = ("lm_head.weight", "score.weight", "classifier.weight")
QKV = ("query", "key", "value")


class GPT2Family(Family):
    name = "gpt2"
    description = "GPT-2: Conv1D weights stored (in, out), fused c_attn split by n_embd"

    def detect(self, checkpoint: Checkpoint) -> float | tuple[float, str]:
        config = checkpoint.config or {}
        model_type = config.get("model_type")
        parts = {m["part"] for m in map(_BLOCK.match, checkpoint.tensors) if m}
        if model_type == "gpt2":
            return (0.95 if parts else 0.5), "config.json model_type 'gpt2'"
        architectures = config.get("architectures") or []
        if model_type is None and any(str(a).startswith("GPT2") for a in architectures):
            return 0.9, f"config.json architectures {architectures!r}"
        # GPT-2's names are shared by models that store nn.Linear (GPTBigCode): names alone only
        # when config.json does not say the model is something else
        if model_type is None and parts == set(_PARTS):
            return 0.7, "tensor names (h.N.attn.c_attn … mlp.c_proj)"
        return 0.0

    def plan(self, checkpoint: Checkpoint) -> LayerPlan:
        config = checkpoint.config or {}
        blocks, prefixes = index_blocks(checkpoint, _BLOCK)
        if not blocks:
            raise StructureError(
                f"gpt2: no h.N.attn.c_attn … mlp.c_proj weights in {checkpoint.root}"
            )
        if len(prefixes) > 1:
            raise StructureError(f"gpt2: several decoder stacks in one checkpoint: {prefixes}")
        if any(_CROSS.search(name) for name in checkpoint.tensors):
            raise StructureError(
                "gpt2: cross-attention blocks (add_cross_attention, GPT-2 as a decoder of an "
                "encoder-decoder) are not supported; audit it with --family generic"
            )
        require_blocks(checkpoint, blocks, _PARTS, "gpt2")
        expected = config_int(config, "n_layer", "num_hidden_layers")
        if expected is not None and sorted(blocks) != list(range(expected)):
            raise StructureError(
                f"gpt2: config.json has n_layer={expected}, the checkpoint has blocks "
                f"{sorted(blocks)[0]}…{sorted(blocks)[-1]} ({len(blocks)})"
            )

        build = PlanBuilder(checkpoint, "gpt2")
        width = _width(checkpoint, blocks[min(blocks)], build)
        inner = config_int(config, "n_inner") or 4 * width
        stream = Stream()  # token + position embeddings: the model's input, not audited
        for index in sorted(blocks):
            parts = blocks[index]
            q, k, v = _split_c_attn(checkpoint, parts["attn.c_attn"], width, index)
            out, fc, proj = (
                Layer(parts[p], _PARTS[p], index, transposed=True)
                for p in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")
            )
            _expect(checkpoint, out, (width, width))
            _expect(checkpoint, fc, (width, inner))
            _expect(checkpoint, proj, (inner, width))
            add_transformer_block(build, stream, index, (q, k, v, out), (fc, proj))
        for name in checkpoint.tensors:
            reason = next((r for end, r in _BUFFERS.items() if name.endswith(end)), None)
            if reason is not None:
                build.skip(name, reason)

        heads = config_int(config, "n_head", "num_attention_heads")
        if heads:
            build.note(f"{heads} attention heads (from config.json)")
        vocab = _head(build, checkpoint, stream, len(blocks))
        wte = next((i for n, i in checkpoint.tensors.items() if n.endswith("wte.weight")), None)
        vocab_in = wte.shape[0] if wte is not None and len(wte.shape) == 2 else vocab
        return build.build(
            depth_note="gpt2 family: depth = block index h.N; the head is one above",
            widths=[w for w in (vocab_in, width, *[width] * len(blocks), vocab) if w],
        )


def _width(checkpoint: Checkpoint, first: dict[str, str], build: PlanBuilder) -> int:
    """The embedding width d: config.json's ``n_embd``, or else that of the square
    ``attn.c_proj`` (stated in the report)."""
    config = checkpoint.config or {}
    declared = config_int(config, "n_embd", "hidden_size")
    if declared is not None:
        return declared
    rows, cols = checkpoint.tensors[first["attn.c_proj"]].shape
    if rows != cols:
        raise StructureError(
            f"gpt2: no config.json n_embd, and {first['attn.c_proj']} is {rows}×{cols}, not the "
            "square d×d that would give the width to split attn.c_attn"
        )
    build.note(f"n_embd = {rows}, taken from attn.c_proj's shape (no config.json n_embd)")
    return int(rows)


def _expect(checkpoint: Checkpoint, layer: Layer, shape: tuple[int, int]) -> None:
    stored = tuple(checkpoint.tensors[layer.source].shape)
    if stored != shape:
        raise StructureError(
            f"gpt2: {layer.source} is {stored[0]}×{stored[1]}; a Conv1D {layer.type} for this "
            f"config is stored (in, out) = {shape[0]}×{shape[1]}"
        )


def _split_c_attn(
    checkpoint: Checkpoint, name: str, width: int, depth: int
) -> tuple[Layer, Layer, Layer]:
    """query, key, value as column ranges of the (d, 3·d) ``c_attn``, split at ``n_embd``."""
    rows, cols = checkpoint.tensors[name].shape
    if (rows, cols) != (width, 3 * width):
        raise StructureError(
            f"gpt2: {name} is {rows}×{cols}; GPT-2's fused q|k|v for n_embd {width} is stored "
            f"(in, out) = {width}×{3 * width}"
        )
    q, k, v = (
        Layer(f"{name}[{kind}]", kind, depth, transposed=True, tensor=name, rows=(columns,))
        for kind, columns in zip(QKV, _thirds(width), strict=True)
    )
    return q, k, v


def _thirds(width: int) -> list[tuple[int, int]]:
    """``GPT2Attention``'s ``split(n_embd)`` of the 3·d fused outputs: [0, d), [d, 2d), [2d, 3d)."""
    return [(i * width, (i + 1) * width) for i in range(3)]


def _head(build: PlanBuilder, checkpoint: Checkpoint, stream: Stream, depth: int) -> int:
    """Plan the head over the final stream; its output width (the vocabulary, or classes)."""
    config = checkpoint.config or {}
    for name in _HEADS:
        if name in checkpoint.tensors:
            build.add(Layer(name, "head", depth, "linear", group="top"), stream)
            return int(checkpoint.tensors[name].shape[0])
    if config.get("tie_word_embeddings", True):
        build.note("lm_head is tied to the token embedding wte; embeddings are not audited")
    else:
        build.note("no lm_head in this checkpoint (a bare GPT2Model)")
    return config_int(config, "vocab_size") or 0
