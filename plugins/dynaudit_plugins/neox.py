"""GPT-NeoX / Pythia and Falcon: a fused, head-interleaved ``query_key_value``.

Per block N — GPT-NeoX ``gpt_neox.layers.N.attention.{query_key_value,dense}``, Falcon
``transformer.h.N.self_attention.{query_key_value,dense}``, both ``mlp.dense_h_to_4h`` and
``mlp.dense_4h_to_h`` — reported as query, key, value, output, fc, proj at depth N; the head
(``embed_out``, ``lm_head``, ``score`` or ``classifier``) one above the last block.

The fused weight is split per head, with the layout transformers' own attention reads from
config.json (d = hidden_size / num_attention_heads), never by dividing its rows by three:

- GPT-NeoX, and Falcon without ``multi_query``: ``view(heads, 3, d)`` — head h owns rows
  ``[3hd, 3hd + 3d)``, its query first, then its key, then its value;
- Falcon ``multi_query``: ``view(heads + 2, d)`` — all query heads, then one key and one value
  head;
- Falcon ``new_decoder_architecture``: ``view(kv_heads, heads / kv_heads + 2, d)`` — per key/value
  group, its query heads, then its key, then its value.

Graph (pre-LN): q, k, v read the residual stream, output reads v through the head map (a query
head reads key/value head h // (heads / kv_heads)), proj reads fc, the head reads the final
stream. With a parallel residual (GPT-NeoX ``use_parallel_residual``; Falcon ``parallel_attn``
or ``new_decoder_architecture``), ``x' = x + attention(x) + mlp(x)``: fc reads the block's input
stream, without the block's own output; otherwise fc also reads the block's output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dynaudit.families import Family, IndexMap, Layer, LayerPlan
from dynaudit.families.build import (
    VALUE_PATH,
    PlanBuilder,
    Stream,
    StructureError,
    add_transformer_block,
    config_int,
    index_blocks,
    require_blocks,
)
from dynaudit.tensors import Checkpoint

__all__ = ["NeoXFamily", "QKVLayout", "qkv_layout"]

_TYPES = {
    "query_key_value": "qkv",
    "dense": "output",
    "dense_h_to_4h": "fc",
    "dense_4h_to_h": "proj",
}
_SCHEMES = {
    "gpt_neox": {
        "attention.query_key_value": "query_key_value",
        "attention.dense": "dense",
        "mlp.dense_h_to_4h": "dense_h_to_4h",
        "mlp.dense_4h_to_h": "dense_4h_to_h",
    },
    "falcon": {
        "self_attention.query_key_value": "query_key_value",
        "self_attention.dense": "dense",
        "mlp.dense_h_to_4h": "dense_h_to_4h",
        "mlp.dense_4h_to_h": "dense_4h_to_h",
    },
}
_BLOCK = {
    kind: re.compile(
        rf"^(?P<prefix>(?:[\w.]+\.)?{stack})\.(?P<index>\d+)\.(?P<part>"
        + "|".join(re.escape(p) for p in parts)
        + r")\.weight$"
    )
    for (kind, parts), stack in zip(_SCHEMES.items(), ("layers", "h"), strict=True)
}
_ARCHITECTURES = ("GPTNeoXFor", "GPTNeoXModel", "FalconFor", "FalconModel")
_NAMES = {"gpt_neox": "GPT-NeoX", "falcon": "Falcon"}
# buffers that older transformers versions and remote code saved with the weights
_BUFFERS = {
    ".attention.bias": "causal attention mask (a buffer, not a weight)",
    ".attention.masked_bias": "attention mask fill value (a buffer, not a weight)",
    ".inv_freq": "rotary position frequencies (a buffer, not a weight)",
}
_HEADS = ("embed_out.weight", "lm_head.weight", "score.weight", "classifier.weight")
_EMBEDDINGS = ("embed_in.weight", "word_embeddings.weight")
QKV = ("query", "key", "value")


@dataclass(frozen=True)
class QKVLayout:
    """Where query, key and value live in a fused ``query_key_value``: row ranges of each, as
    the producer's attention reads them, with the head geometry they come from."""

    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    rows: dict[str, tuple[tuple[int, int], ...]]
    name: str  # the layout in words, for the report

    @property
    def total(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    def value_map(self) -> IndexMap:
        """dense input channel → value output neuron: query head h reads kv head h // group."""
        if self.kv_heads == self.heads:
            return IndexMap()
        return IndexMap(head_dim=self.head_dim, group=self.heads // self.kv_heads)


def _flag(config: dict[str, object], key: str, default: bool) -> bool:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise StructureError(f"neox: config.json {key} is {value!r}, not true or false")
    return value


def qkv_layout(kind: str, config: dict[str, object]) -> QKVLayout:
    """The fused layout of a ``gpt_neox`` or ``falcon`` checkpoint, from config.json alone."""
    heads = config_int(config, "num_attention_heads", "n_head")
    hidden = config_int(config, "hidden_size", "n_embed")
    if not heads or not hidden:
        raise StructureError(
            f"neox: {_NAMES[kind]}'s query_key_value interleaves heads; config.json must give "
            "hidden_size and num_attention_heads to split it"
        )
    if hidden % heads:
        raise StructureError(
            f"neox: config.json hidden_size {hidden} is not divisible by "
            f"num_attention_heads {heads}"
        )
    d = hidden // heads

    def per_group(groups: int, queries: int) -> dict[str, tuple[tuple[int, int], ...]]:
        """``view(groups, queries + 2, d)``: each group's query heads, then a key, then a value."""
        stride = (queries + 2) * d
        starts = [g * stride for g in range(groups)]
        return {
            "query": tuple((s, s + queries * d) for s in starts),
            "key": tuple((s + queries * d, s + (queries + 1) * d) for s in starts),
            "value": tuple((s + (queries + 1) * d, s + (queries + 2) * d) for s in starts),
        }

    if kind == "gpt_neox":
        return QKVLayout(heads, heads, d, hidden, per_group(heads, 1), "(heads, 3, head_dim)")
    if _flag(config, "new_decoder_architecture", False):
        kv = config_int(config, "num_kv_heads", "n_head_kv") or heads
        if heads % kv:
            raise StructureError(
                f"neox: Falcon's num_attention_heads {heads} is not a multiple of num_kv_heads {kv}"
            )
        return QKVLayout(
            heads,
            kv,
            d,
            hidden,
            per_group(kv, heads // kv),
            "new_decoder_architecture (kv_heads, heads / kv_heads + 2, head_dim)",
        )
    if _flag(config, "multi_query", True):  # FalconConfig's default
        rows: dict[str, tuple[tuple[int, int], ...]] = {
            "query": ((0, heads * d),),
            "key": ((heads * d, (heads + 1) * d),),
            "value": (((heads + 1) * d, (heads + 2) * d),),
        }
        return QKVLayout(heads, 1, d, hidden, rows, "multi_query (heads + 2, head_dim)")
    return QKVLayout(heads, heads, d, hidden, per_group(heads, 1), "(heads, 3, head_dim)")


def _parallel(kind: str, config: dict[str, object]) -> bool:
    if kind == "gpt_neox":
        return _flag(config, "use_parallel_residual", True)
    return _flag(config, "new_decoder_architecture", False) or _flag(config, "parallel_attn", True)


class NeoXFamily(Family):
    name = "neox"
    description = (
        "GPT-NeoX/Pythia and Falcon: fused head-interleaved query_key_value split by the config"
    )

    def detect(self, checkpoint: Checkpoint) -> float | tuple[float, str]:
        config = checkpoint.config or {}
        model_type = config.get("model_type")
        found = {kind: _scheme_parts(checkpoint, kind) for kind in _SCHEMES}
        if model_type in _SCHEMES:
            complete = found[str(model_type)] == set(_SCHEMES[str(model_type)])
            return (0.95 if complete else 0.5), f"config.json model_type {model_type!r}"
        if model_type is not None:
            return 0.0  # BLOOM shares Falcon's names: only what the config says it is
        architectures = config.get("architectures") or []
        if any(str(a).startswith(_ARCHITECTURES) for a in architectures):
            return 0.9, f"config.json architectures {architectures!r}"
        for kind, parts in found.items():
            if parts == set(_SCHEMES[kind]):
                names = " … ".join(_SCHEMES[kind])
                return 0.7, f"tensor names ({_NAMES[kind]}: {names})"
        return 0.0

    def plan(self, checkpoint: Checkpoint) -> LayerPlan:
        config = checkpoint.config or {}
        kind = _kind(checkpoint)
        scheme = _SCHEMES[kind]
        blocks, prefixes = index_blocks(checkpoint, _BLOCK[kind])
        if not blocks:
            names = ", ".join(_SCHEMES[kind])
            raise StructureError(f"neox: no {_NAMES[kind]} blocks ({names}) in {checkpoint.root}")
        if len(prefixes) > 1:
            raise StructureError(f"neox: several decoder stacks in one checkpoint: {prefixes}")
        require_blocks(checkpoint, blocks, {p: _TYPES[t] for p, t in scheme.items()}, "neox")
        expected = config_int(config, "num_hidden_layers", "n_layer")
        if expected is not None and sorted(blocks) != list(range(expected)):
            raise StructureError(
                f"neox: config.json has num_hidden_layers={expected}, the checkpoint has blocks "
                f"{sorted(blocks)[0]}…{sorted(blocks)[-1]} ({len(blocks)})"
            )
        layout = qkv_layout(kind, config)
        parallel = _parallel(kind, config)

        build = PlanBuilder(checkpoint, "neox")
        hidden = layout.hidden
        stream = Stream()  # the token embedding: the model's input, not audited
        for index in sorted(blocks):
            named = {scheme[p]: name for p, name in blocks[index].items()}
            q, k, v = _split(checkpoint, named["query_key_value"], layout, index)
            out, fc, proj = (
                Layer(named[p], _TYPES[p], index)
                for p in ("dense", "dense_h_to_4h", "dense_4h_to_h")
            )
            ffn = checkpoint.tensors[fc.name].shape[0]
            _expect(checkpoint, out, (hidden, layout.heads * layout.head_dim))
            _expect(checkpoint, fc, (ffn, hidden))
            _expect(checkpoint, proj, (hidden, ffn))
            add_transformer_block(
                build,
                stream,
                index,
                (q, k, v, out),
                (fc, proj),
                value_map=layout.value_map(),
                parallel=parallel,
                note=VALUE_PATH
                + (
                    "; parallel residual x + attention(x) + mlp(x): both branches read the "
                    "block's input"
                    if parallel
                    else ""
                ),
            )
        for name in checkpoint.tensors:
            reason = next((r for end, r in _BUFFERS.items() if name.endswith(end)), None)
            if reason is not None:
                build.skip(name, reason)

        kv = f"{layout.kv_heads} key/value head{'s' if layout.kv_heads > 1 else ''}"
        build.note(
            f"{_NAMES[kind]} query_key_value split per head as {layout.name}: "
            f"{layout.heads} query heads and {kv} of {layout.head_dim} (config.json)"
        )
        build.note(
            "parallel residual: x + attention(x) + mlp(x)"
            if parallel
            else "sequential residual: x + attention(x), then + mlp(·)"
        )
        vocab = _head(build, checkpoint, stream, len(blocks), kind)
        embed = next((i for n, i in checkpoint.tensors.items() if n.endswith(_EMBEDDINGS)), None)
        vocab_in = embed.shape[0] if embed is not None and len(embed.shape) == 2 else vocab
        return build.build(
            depth_note="neox family: depth = decoder block index; the head is one above",
            widths=[w for w in (vocab_in, hidden, *[hidden] * len(blocks), vocab) if w],
        )


def _scheme_parts(checkpoint: Checkpoint, kind: str) -> set[str]:
    return {m["part"] for m in map(_BLOCK[kind].match, checkpoint.tensors) if m}


def _kind(checkpoint: Checkpoint) -> str:
    """``gpt_neox`` or ``falcon``: config.json's model_type, else the tensor names."""
    model_type = (checkpoint.config or {}).get("model_type")
    if model_type in _SCHEMES:
        return str(model_type)
    found = [kind for kind in _SCHEMES if _scheme_parts(checkpoint, kind)]
    if len(found) != 1:
        raise StructureError(
            f"neox: {checkpoint.root} has {'both' if found else 'neither'} GPT-NeoX "
            f"(layers.N.attention.query_key_value) {'and' if found else 'nor'} Falcon "
            "(h.N.self_attention.query_key_value) blocks"
        )
    return found[0]


def _expect(checkpoint: Checkpoint, layer: Layer, shape: tuple[int, int]) -> None:
    stored = tuple(checkpoint.tensors[layer.source].shape)
    if stored != shape:
        raise StructureError(
            f"neox: {layer.source} is {stored[0]}×{stored[1]}; config.json's geometry gives "
            f"{shape[0]}×{shape[1]} for the {layer.type}"
        )


def _split(checkpoint: Checkpoint, name: str, layout: QKVLayout, depth: int) -> tuple[Layer, ...]:
    """query, key, value of the fused weight as the row ranges of ``layout``."""
    rows, cols = checkpoint.tensors[name].shape
    if (rows, cols) != (layout.total, layout.hidden):
        raise StructureError(
            f"neox: {name} is {rows}×{cols}; the {layout.name} layout of config.json's "
            f"{layout.heads} heads and {layout.kv_heads} key/value heads of {layout.head_dim} is "
            f"{layout.total}×{layout.hidden}"
        )
    return tuple(
        Layer(f"{name}[{kind}]", kind, depth, tensor=name, rows=layout.rows[kind]) for kind in QKV
    )


def _head(build: PlanBuilder, checkpoint: Checkpoint, stream: Stream, depth: int, kind: str) -> int:
    """Plan the head over the final stream; its output width (the vocabulary, or classes)."""
    config = checkpoint.config or {}
    for name in _HEADS:
        if name in checkpoint.tensors:
            build.add(Layer(name, "head", depth, "linear", group="top"), stream)
            return int(checkpoint.tensors[name].shape[0])
    # GPTNeoXConfig unties by default, FalconConfig ties
    if config.get("tie_word_embeddings", kind == "falcon"):
        build.note("the head is tied to the token embedding; embeddings are not audited")
    else:
        build.note("no head in this checkpoint (a bare decoder)")
    return config_int(config, "vocab_size") or 0
