"""LLaMA-style decoders: LLaMA, Mistral, Qwen2/3, Phi-3 — the same tensor names, GQA, tied heads.

Per block ``model.layers.N``: ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``,
reported as query, key, value, output, gate, up, down at depth N; ``lm_head`` (when not tied to
the embedding) at the top. q/k/v biases (Qwen2) are skipped like every bias.

Phi-3 fuses them: ``self_attn.qkv_proj`` is ``[q; k; v]`` (heads·d, kv_heads·d, kv_heads·d rows,
as ``Phi3Attention`` slices its output at ``query_pos``) and ``mlp.gate_up_proj`` is
``[gate; up]`` (``intermediate_size`` rows each, as ``Phi3MLP``'s ``chunk(2)``). Each is split
into the same seven types by config.json's head counts and intermediate size, never by its rows
divided by three or two; the graph is the same.

Graph (pre-norm residual stream; RMSNorm scales channels, it does not mix them):
q, k, v, gate and up read the stream — the embedding plus every earlier o and down; o reads
v through the GQA head map (query head h reads key/value head h // (heads / kv_heads));
down reads gate ⊙ up, channel by channel; the head reads the final stream.
"""

from __future__ import annotations

import re

from dynaudit.families import Family, IndexMap, Layer, LayerPlan, matrix_shape
from dynaudit.families.build import (
    VALUE_PATH,
    PlanBuilder,
    Stream,
    StructureError,
    add_transformer_block,
    config_int,
    index_blocks,
    require_weight,
)
from dynaudit.tensors import Checkpoint

__all__ = ["LlamaFamily"]

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
_PARTS = {
    "self_attn.q_proj": "query",
    "self_attn.k_proj": "key",
    "self_attn.v_proj": "value",
    "self_attn.o_proj": "output",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
}
_BLOCK = re.compile(
    r"^(?P<prefix>(?:[\w.]+\.)?layers)\.(?P<index>\d+)\.(?P<part>"
    + "|".join(re.escape(p) for p in _PARTS)
    + r")\.weight$"
)
# Phi-3's fused projections, each split into parts of _PARTS
_FUSED = {"self_attn.qkv_proj": "qkv", "mlp.gate_up_proj": "gate_up"}
_FUSED_INTO = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
_ANY_BLOCK = re.compile(
    r"^(?P<prefix>(?:[\w.]+\.)?layers)\.(?P<index>\d+)\.(?P<part>"
    + "|".join(re.escape(p) for p in (*_PARTS, *_FUSED))
    + r")\.weight$"
)
_PHI3_PARTS = {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}
_HEADS = ("lm_head.weight", "score.weight")


class LlamaFamily(Family):
    name = "llama"
    description = (
        "LLaMA-style decoders (LLaMA, Mistral, Qwen2/3, Phi-3 fused qkv/gate_up split by the "
        "config): q/k/v/o, gate/up/down, GQA"
    )

    def detect(self, checkpoint: Checkpoint) -> float | tuple[float, str]:
        config = checkpoint.config or {}
        model_type = config.get("model_type")
        names = [m for m in map(_ANY_BLOCK.match, checkpoint.tensors) if m]
        if model_type in MODEL_TYPES:
            return (0.95 if names else 0.5), f"config.json model_type {model_type!r}"
        architectures = config.get("architectures") or []
        prefixes = ("Llama", "Mistral", "Qwen2", "Qwen3", "Phi3For")
        if any(str(a).startswith(prefixes) for a in architectures):
            return 0.9, f"config.json architectures {architectures!r}"
        parts = {m["part"] for m in names}
        if parts == set(_PARTS):
            return 0.7, "tensor names (self_attn.q_proj … mlp.down_proj)"
        if parts == _PHI3_PARTS:
            return 0.7, "tensor names (Phi-3: self_attn.qkv_proj … mlp.down_proj)"
        return 0.0

    def plan(self, checkpoint: Checkpoint) -> LayerPlan:
        config = checkpoint.config or {}
        blocks, prefixes = index_blocks(checkpoint, _ANY_BLOCK)
        if not blocks:
            raise StructureError(f"llama: no {'/'.join(_PARTS)} weights in {checkpoint.root}")
        if len(prefixes) > 1:
            raise StructureError(f"llama: several decoder stacks in one checkpoint: {prefixes}")
        for index, parts in sorted(blocks.items()):
            _check_parts(index, parts)
            for part, name in parts.items():  # before any shape is read below
                require_weight(
                    checkpoint, name, "llama", "linear", _PARTS.get(part, _FUSED.get(part, ""))
                )
        heads = _Heads.read(checkpoint, blocks)
        expected = config_int(config, "num_hidden_layers")
        if expected is not None and sorted(blocks) != list(range(expected)):
            raise StructureError(
                f"llama: config.json has num_hidden_layers={expected}, the checkpoint has blocks "
                f"{_ranges(sorted(blocks))}"
            )

        build = PlanBuilder(checkpoint, "llama")
        stream = Stream()  # the token embedding: the model's input, not audited
        first = blocks[min(blocks)]
        hidden = checkpoint.tensors[
            first.get("self_attn.q_proj") or first["self_attn.qkv_proj"]
        ].shape[1]
        for index in sorted(blocks):
            parts = blocks[index]
            layer = {
                part: Layer(name, _PARTS[part], index, "linear")
                for part, name in parts.items()
                if part in _PARTS
            }
            if "self_attn.qkv_proj" in parts:
                fused = heads.split_qkv(checkpoint, parts["self_attn.qkv_proj"], index)
                layer.update(zip(_FUSED_INTO["self_attn.qkv_proj"], fused, strict=True))
            if "mlp.gate_up_proj" in parts:
                fused = _split_gate_up(build, checkpoint, parts, index)
                layer.update(zip(_FUSED_INTO["mlp.gate_up_proj"], fused, strict=True))
            q, k, v, o = (layer[f"self_attn.{x}_proj"] for x in "qkvo")
            gate, up, down = (layer[f"mlp.{x}_proj"] for x in ("gate", "up", "down"))
            heads.check(checkpoint, q, k, v, o)
            add_transformer_block(
                build,
                stream,
                index,
                (q, k, v, o),
                (gate, up, down),
                value_map=heads.value_map(),
                note=f"{VALUE_PATH}; mlp: gate ⊙ up is quadratic in its input",
            )

        vocab = self._head(build, checkpoint, stream, len(blocks))
        embed = next((i for n, i in checkpoint.tensors.items() if "embed_tokens" in n), None)
        vocab_in = embed.shape[0] if embed is not None else vocab
        return build.build(
            depth_note="llama family: depth = decoder block index; the head is one above",
            widths=[w for w in (vocab_in, hidden, *[hidden] * len(blocks), vocab) if w],
        )

    @staticmethod
    def _head(build: PlanBuilder, checkpoint: Checkpoint, stream: Stream, depth: int) -> int:
        config = checkpoint.config or {}
        for name in _HEADS:
            if name in checkpoint.tensors:
                build.add(Layer(name, "head", depth, "linear", group="top"), stream)
                return checkpoint.tensors[name].shape[0]
        if config.get("tie_word_embeddings", True):
            build.note("lm_head is tied to the token embedding; embeddings are not audited")
        else:
            build.note("no lm_head in this checkpoint (a bare decoder)")
        return config_int(config, "vocab_size") or 0


def _check_parts(index: int, parts: dict[str, str]) -> None:
    """A block has each projection once: separate, or fused as Phi-3 stores them."""
    wanted = list(_PARTS)
    for fused, into in _FUSED_INTO.items():
        if fused in parts:
            both = [p for p in into if p in parts]
            if both:
                raise StructureError(
                    f"llama: block {index} has {fused} and also {', '.join(both)}: q, k, v "
                    "(or gate, up) must be stored either fused or apart, not both"
                )
            wanted = [fused if p == into[0] else p for p in wanted if p not in into[1:]]
    missing = [p for p in wanted if p not in parts]
    if missing:
        raise StructureError(
            f"llama: block {index} lacks {', '.join(missing)} (pruned, one shard of "
            "several, or not a LLaMA?)"
        )


def _split_gate_up(
    build: PlanBuilder, checkpoint: Checkpoint, parts: dict[str, str], depth: int
) -> tuple[Layer, Layer]:
    """gate and up as row ranges of Phi-3's ``[gate; up]``, at config.json's intermediate_size
    (else the down projection's input width, noted): ``Phi3MLP`` takes ``chunk(2)``."""
    name, down = parts["mlp.gate_up_proj"], parts["mlp.down_proj"]
    declared = config_int(checkpoint.config, "intermediate_size")
    down_inputs = checkpoint.tensors[down].shape[1]
    if declared is None:
        declared = down_inputs
        note = f"intermediate_size = {declared}, taken from mlp.down_proj's input width"
        if note not in build.plan.notes:
            build.note(note + " (no config.json intermediate_size)")
    rows = checkpoint.tensors[name].shape[0]
    if rows != 2 * declared or down_inputs != declared:
        raise StructureError(
            f"llama: {name} has {rows} rows and {down} reads {down_inputs} channels; "
            f"[gate; up] at intermediate_size {declared} needs {2 * declared} and {declared}"
        )
    gate, up = (
        Layer(
            f"{name}[{kind}]", kind, depth, tensor=name, rows=((i * declared, (i + 1) * declared),)
        )
        for i, kind in enumerate(("gate", "up"))
    )
    return gate, up


class _Heads:
    """Attention geometry from config.json, checked against the tensor shapes."""

    def __init__(self, heads: int | None, kv_heads: int | None, head_dim: int | None) -> None:
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim

    @classmethod
    def read(cls, checkpoint: Checkpoint, blocks: dict[int, dict[str, str]]) -> _Heads:
        config = checkpoint.config or {}
        heads = config_int(config, "num_attention_heads")
        kv_heads = config_int(config, "num_key_value_heads") or heads
        head_dim = config_int(config, "head_dim")
        hidden = config_int(config, "hidden_size")
        if heads and head_dim is None and hidden:
            head_dim = hidden // heads
        if heads and kv_heads != heads and head_dim is None:
            raise StructureError(
                "llama: grouped-query attention needs head_dim or hidden_size in config.json"
            )
        first = blocks[min(blocks)]
        if "self_attn.q_proj" not in first:  # Phi-3's fused qkv_proj
            if heads is None or head_dim is None:
                raise StructureError(
                    f"llama: {first['self_attn.qkv_proj']} fuses q, k and v; config.json must "
                    "give num_attention_heads, num_key_value_heads and hidden_size (or head_dim) "
                    "to split it"
                )
            return cls(heads, kv_heads, head_dim)
        q_rows = checkpoint.tensors[first["self_attn.q_proj"]].shape[0]
        kv_rows = checkpoint.tensors[first["self_attn.k_proj"]].shape[0]
        if heads is None and q_rows != kv_rows:
            raise StructureError(
                f"llama: grouped-query attention ({q_rows} query vs {kv_rows} key rows) needs "
                "num_attention_heads and num_key_value_heads from config.json, which is missing"
            )
        return cls(heads, kv_heads, head_dim)

    def split_qkv(self, checkpoint: Checkpoint, name: str, depth: int) -> tuple[Layer, ...]:
        """q, k, v as row ranges of Phi-3's ``[q; k; v]``: ``Phi3Attention`` slices its output
        at heads·d and heads·d + kv_heads·d."""
        if not (self.heads and self.kv_heads and self.head_dim):
            raise StructureError(
                f"llama: {name} fuses q, k and v; config.json must give num_attention_heads, "
                "num_key_value_heads and hidden_size (or head_dim) to split it"
            )
        q_rows, kv_rows = self.heads * self.head_dim, self.kv_heads * self.head_dim
        rows = checkpoint.tensors[name].shape[0]
        if rows != q_rows + 2 * kv_rows:
            raise StructureError(
                f"llama: {name} has {rows} rows; config.json's {self.heads} heads and "
                f"{self.kv_heads} key/value heads of {self.head_dim} give {q_rows + 2 * kv_rows}"
            )
        bounds = {
            "query": (0, q_rows),
            "key": (q_rows, q_rows + kv_rows),
            "value": (q_rows + kv_rows, q_rows + 2 * kv_rows),
        }
        return tuple(
            Layer(f"{name}[{kind}]", kind, depth, tensor=name, rows=(span,))
            for kind, span in bounds.items()
        )

    def check(self, checkpoint: Checkpoint, q: Layer, k: Layer, v: Layer, o: Layer) -> None:
        shape = {  # (outputs, inputs) of each, a fused projection's part included
            x.type: matrix_shape(x, checkpoint.tensors[x.source].shape)[1:] for x in (q, k, v, o)
        }
        if self.heads is None or self.head_dim is None or self.kv_heads is None:
            return
        want = {
            "query": self.heads * self.head_dim,
            "key": self.kv_heads * self.head_dim,
            "value": self.kv_heads * self.head_dim,
        }
        for kind, rows in want.items():
            if shape[kind][0] != rows:
                layer = {"query": q, "key": k, "value": v}[kind]
                raise StructureError(
                    f"llama: {layer.name} has {shape[kind][0]} rows; config.json's heads × "
                    f"head_dim say {rows}"
                )
        if shape["output"][1] != want["query"]:
            raise StructureError(
                f"llama: {o.name} reads {shape['output'][1]} channels; the heads give "
                f"{want['query']}"
            )

    def value_map(self) -> IndexMap:
        """o_proj input channel → v_proj output neuron (identity without GQA)."""
        if not (self.heads and self.kv_heads and self.head_dim) or self.heads == self.kv_heads:
            return IndexMap()
        return IndexMap(head_dim=self.head_dim, group=self.heads // self.kv_heads)


def _ranges(indices: list[int]) -> str:
    return f"{indices[0]}…{indices[-1]} ({len(indices)})" if indices else "none"
