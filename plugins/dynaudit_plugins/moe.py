"""Mixture-of-experts decoders: Mixtral, Phi-3.5-MoE, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3.

Per decoder block ``model.layers.N`` (depth N):

- attention: LLaMA's ``self_attn.{q,k,v,o}_proj`` (query, key, value, output; GQA), or
  DeepSeek's multi-head latent attention (below);
- a sparse MoE block: the router (``mlp.gate``, Mixtral's ``block_sparse_moe.gate``; type
  ``router``: one logit per expert) and E experts, each a gated MLP whose three matrices are
  layers of their own carrying the expert's index: ``expert.gate``, ``expert.up``,
  ``expert.down`` (Mixtral's w1, w3, w2; gate_proj, up_proj, down_proj elsewhere). Shared
  experts (Qwen2-MoE ``shared_expert``, DeepSeek ``shared_experts``) are ``shared.gate``,
  ``shared.up``, ``shared.down``; Qwen2-MoE's ``shared_expert_gate`` (1 × d) is skipped;
- or a dense MLP ``mlp.{gate,up,down}_proj`` (gate, up, down): DeepSeek's first
  ``first_k_dense_replace`` blocks, Qwen2-MoE's ``mlp_only_layers``.

``save_pretrained`` writes one tensor per expert matrix (``experts.E.w1.weight``). transformers'
modules hold them fused, so a state dict saved straight from a model has
``experts.gate_up_proj`` (E, 2·I, d: gate rows, then up rows) and ``experts.down_proj``
(E, d, I); each expert's matrices are then its slice of the stack (``Layer.index``).

Multi-head latent attention (DeepSeek): ``q_proj`` (query), or ``q_a_proj`` (query.a) then
``q_b_proj`` (query); ``kv_a_proj_with_mqa`` is split by config.json into its latent rows
(kv.a, ``kv_lora_rank``) and the shared rotary key (key.rope, ``qk_rope_head_dim``);
``kv_b_proj`` into each head's key rows (key, ``qk_nope_head_dim``) and value rows (value,
``v_head_dim``); ``o_proj`` (output).

Graph (pre-norm residual stream; RMSNorm is channel-wise, so every map is the identity): the
router and every expert's gate and up read the stream; an expert's down reads its own
gate ⊙ up; the block adds the router-weighted outputs of the chosen experts, so the stream
gains every expert's down (and the shared expert's). The router's outputs only weight that
sum (softmax, top-k) and feed no layer. In latent attention, q_b reads q_a, kv_b's parts read
kv.a, and o reads kv_b's value rows, concatenated head by head as o reads them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from dynaudit.families import IDENTITY, Family, IndexMap, Layer, LayerPlan
from dynaudit.families.build import (
    PlanBuilder,
    Stream,
    StructureError,
    config_int,
    require_weight,
)
from dynaudit.tensors import Checkpoint
from dynaudit_plugins.llama import _Heads

__all__ = ["MoEFamily"]

MODEL_TYPES = ("mixtral", "phimoe", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
_ARCHITECTURES = ("Mixtral", "Phimoe", "Qwen2Moe", "Qwen3Moe", "Olmoe", "DeepseekV2", "DeepseekV3")
_BLOCK = re.compile(r"^(?P<prefix>(?:[\w.]+\.)?layers)\.(?P<index>\d+)\.(?P<rest>.+)$")
_MOE = r"(?:mlp|block_sparse_moe)\."
_ATTENTION = re.compile(
    r"^self_attn\.(?P<part>q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|"
    r"kv_b_proj)\.weight$"
)
_ROUTER = re.compile(rf"^{_MOE}gate\.weight$")
_EXPERT = re.compile(
    rf"^{_MOE}experts\.(?P<expert>\d+)\.(?P<part>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_FUSED = re.compile(rf"^{_MOE}experts\.(?P<part>gate_up_proj|down_proj)(?:\.weight)?$")
_SHARED = re.compile(r"^mlp\.shared_experts?\.(?P<part>gate_proj|up_proj|down_proj)\.weight$")
_SHARED_GATE = re.compile(r"^mlp\.shared_expert_gate\.weight$")
_DENSE = re.compile(r"^mlp\.(?P<part>gate_proj|up_proj|down_proj)\.weight$")
_ROLE = {"w1": "gate", "w3": "up", "w2": "down"} | {f"{p}_proj": p for p in ("gate", "up", "down")}
_MLP = ("gate", "up", "down")
_HEADS = ("lm_head.weight", "score.weight")
_EXPERTS_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
_NOTE = (
    "attention: the value path only (q and k act through the softmax); an expert or MLP: "
    "gate ⊙ up is quadratic in its input, and the router's softmax weight (at most 1) that "
    "scales an expert's output is left out"
)


@dataclass
class _Block:
    """The tensors of one decoder block, by role."""

    attention: dict[str, str] = field(default_factory=dict)  # q_proj, ... → tensor
    router: str | None = None
    experts: dict[int, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    fused: dict[str, str] = field(default_factory=dict)  # gate_up_proj, down_proj → tensor
    shared: dict[str, str] = field(default_factory=dict)  # gate, up, down → tensor
    shared_gate: str | None = None
    dense: dict[str, str] = field(default_factory=dict)  # gate, up, down → tensor

    @property
    def sparse(self) -> bool:
        return bool(self.experts or self.fused)


def _read_blocks(checkpoint: Checkpoint) -> tuple[dict[int, _Block], set[str]]:
    """Every decoder block's tensors by role, and the distinct ``…layers`` prefixes."""
    blocks: dict[int, _Block] = defaultdict(_Block)
    prefixes = set()
    for name in checkpoint.tensors:
        match = _BLOCK.match(name)
        if not match:
            continue
        rest, block = match["rest"], blocks[int(match["index"])]
        if m := _ATTENTION.match(rest):
            block.attention[m["part"]] = name
        elif _ROUTER.match(rest):
            block.router = name
        elif m := _EXPERT.match(rest):
            block.experts[int(m["expert"])][_ROLE[m["part"]]] = name
        elif m := _FUSED.match(rest):
            block.fused[m["part"]] = name
        elif m := _SHARED.match(rest):
            block.shared[_ROLE[m["part"]]] = name
        elif _SHARED_GATE.match(rest):
            block.shared_gate = name
        elif m := _DENSE.match(rest):
            block.dense[_ROLE[m["part"]]] = name
        else:
            continue
        prefixes.add(match["prefix"])
    return {i: b for i, b in blocks.items() if b.attention or b.sparse or b.dense}, prefixes


class MoEFamily(Family):
    name = "moe"
    description = (
        "mixture-of-experts decoders (Mixtral, Phi-3.5-MoE, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3): "
        "every expert's gate/up/down, the router, shared experts"
    )

    def detect(self, checkpoint: Checkpoint) -> float | tuple[float, str]:
        config = checkpoint.config or {}
        experts = any(b.sparse for b in _read_blocks(checkpoint)[0].values())
        model_type = config.get("model_type")
        if model_type in MODEL_TYPES:
            return (0.95 if experts else 0.5), f"config.json model_type {model_type!r}"
        architectures = [str(a) for a in config.get("architectures") or []]
        if experts and any(a.startswith(_ARCHITECTURES) for a in architectures):
            return 0.95, f"config.json architectures {architectures!r}"
        if experts:
            return 0.85, "tensor names (layers.N.…experts.E.… and a router)"
        return 0.0

    def plan(self, checkpoint: Checkpoint) -> LayerPlan:
        config = checkpoint.config or {}
        blocks, prefixes = _read_blocks(checkpoint)
        if not any(b.sparse for b in blocks.values()):
            raise StructureError(
                f"moe: no experts (…layers.N.mlp.experts.E.… or a fused experts.gate_up_proj) "
                f"in {checkpoint.root}"
            )
        if len(prefixes) > 1:
            raise StructureError(f"moe: several decoder stacks in one checkpoint: {prefixes}")
        build = PlanBuilder(checkpoint, "moe")
        blocks = _drop_extra_blocks(build, blocks, config)
        attention = _Attention.read(checkpoint, blocks)
        experts = _expert_count(checkpoint, blocks, config)
        hidden = attention.hidden
        stream = Stream()  # the token embedding: the model's input, not audited
        moe_blocks: list[int] = []
        for index in sorted(blocks):
            block = blocks[index]
            branches = {"attention": attention.add(build, stream, index, block.attention)}
            if block.sparse:
                moe_blocks.append(index)
                branches |= _add_experts(build, stream, index, block, experts, hidden)
            else:
                branches["mlp"] = _add_dense(build, stream, index, block.dense, hidden)
            build.block(f"block {index}", branches, note=_NOTE)
        _notes(build, blocks, moe_blocks, experts, config)
        vocab = _head(build, checkpoint, stream, len(blocks))
        embed = next((i for n, i in checkpoint.tensors.items() if "embed_tokens" in n), None)
        vocab_in = embed.shape[0] if embed is not None else vocab
        return build.build(
            depth_note="moe family: depth = decoder block index; the head is one above",
            widths=[w for w in (vocab_in, hidden, *[hidden] * len(blocks), vocab) if w],
        )


def _drop_extra_blocks(
    build: PlanBuilder, blocks: dict[int, _Block], config: dict[str, object]
) -> dict[int, _Block]:
    """The decoder's blocks ``0 … num_hidden_layers − 1``; DeepSeek-V3's multi-token
    prediction blocks past them (``num_nextn_predict_layers``, which transformers does not
    load) are skipped."""
    layers = config_int(config, "num_hidden_layers")
    extra = config_int(config, "num_nextn_predict_layers") or 0
    if layers is None:
        return blocks
    if extra and sorted(blocks) == list(range(layers + extra)):
        for name in build.checkpoint.tensors:
            match = _BLOCK.match(name)
            if match and int(match["index"]) >= layers:
                build.skip(name, "multi-token prediction block (not part of the decoder)")
        return {i: b for i, b in blocks.items() if i < layers}
    if sorted(blocks) != list(range(layers)):
        found = sorted(blocks)
        raise StructureError(
            f"moe: config.json has num_hidden_layers={layers}, the checkpoint has blocks "
            f"{found[0]}…{found[-1]} ({len(found)})"
        )
    return blocks


def _expert_count(
    checkpoint: Checkpoint, blocks: dict[int, _Block], config: dict[str, object]
) -> int:
    """Experts per sparse block: config.json's count, which every sparse block must hold
    (and its router must score), or else the first sparse block's."""
    expected = config_int(config, *_EXPERTS_KEYS)
    for index in sorted(blocks):
        block = blocks[index]
        if not block.sparse:
            continue
        if block.experts and block.fused:
            raise StructureError(f"moe: block {index} holds experts both one by one and fused")
        if block.router is None:
            raise StructureError(f"moe: block {index} has experts but no router (mlp.gate)")
        if block.fused:
            found = _fused_shape(checkpoint, index, block)[0]
        else:
            found = len(block.experts)
            if sorted(block.experts) != list(range(found)):
                raise StructureError(
                    f"moe: block {index} has experts {_listed(sorted(block.experts))}, not "
                    f"0…{found - 1} (one shard of an expert-parallel checkpoint?)"
                )
        if expected is None:
            expected = found
        if found != expected:
            raise StructureError(
                f"moe: block {index} has {found} experts; config.json (or the first sparse "
                f"block) says {expected}"
            )
        routes = require_weight(checkpoint, block.router, "moe", "linear", "router")[0]
        if routes != expected:
            raise StructureError(
                f"moe: {block.router} scores {routes} experts; block {index} has {expected}"
            )
    assert expected is not None  # some block is sparse (plan checked it)
    return expected


def _fused_shape(checkpoint: Checkpoint, index: int, block: _Block) -> tuple[int, int, int]:
    """(experts, d, I) of a block's fused experts: ``gate_up_proj`` (E, 2·I, d) and
    ``down_proj`` (E, d, I), as transformers' modules hold them."""
    missing = [p for p in ("gate_up_proj", "down_proj") if p not in block.fused]
    if missing:
        raise StructureError(f"moe: block {index} lacks its fused experts.{missing[0]}")
    gate_up, down = block.fused["gate_up_proj"], block.fused["down_proj"]
    stacked, out = checkpoint.tensors[gate_up].shape, checkpoint.tensors[down].shape
    if len(out) != 3 or len(stacked) != 3 or stacked != (out[0], 2 * out[2], out[1]):
        raise StructureError(
            f"moe: fused experts {gate_up} {list(stacked)} and {down} {list(out)} are not "
            "(experts, 2·I, d) and (experts, d, I) as transformers stores them (an "
            "(experts, in, out) layout is not supported)"
        )
    return out[0], out[1], out[2]


def _add_experts(
    build: PlanBuilder, stream: Stream, index: int, block: _Block, experts: int, hidden: int
) -> dict[str, tuple[str, ...]]:
    """The router, every expert and the shared experts of a sparse block; the stream gains
    every expert's down. Returns the block's branches: one per expert, and the shared one."""
    assert block.router is not None
    _add(build, Layer(block.router, "router", index), stream, hidden)
    branches: dict[str, tuple[str, ...]] = {}
    for expert in range(experts):
        gate, up, down = _expert_layers(build, index, block, expert)
        branches[f"expert {expert}"] = _add_gated(build, stream, hidden, gate, up, down)
    if block.shared:
        missing = [p for p in _MLP if p not in block.shared]
        if missing:
            raise StructureError(f"moe: the shared expert of block {index} lacks its {missing[0]}")
        layers = (Layer(block.shared[p], f"shared.{p}", index) for p in _MLP)
        branches["shared"] = _add_gated(build, stream, hidden, *layers)
    if block.shared_gate is not None:
        build.skip(
            block.shared_gate,
            "shared-expert gate: one sigmoid logit per token scaling the shared expert "
            "(a 1 × d vector, not a matrix)",
        )
    stream.add(*(names[-1] for names in branches.values()))  # the outputs are summed
    return branches


def _expert_layers(
    build: PlanBuilder, index: int, block: _Block, expert: int
) -> tuple[Layer, Layer, Layer]:
    """An expert's gate, up and down: its own tensors, or its slices of the fused stacks."""
    if block.experts:
        parts = block.experts[expert]
        missing = [p for p in _MLP if p not in parts]
        if missing:
            raise StructureError(f"moe: expert {expert} of block {index} lacks its {missing[0]}")
        return (
            Layer(parts["gate"], "expert.gate", index, expert=expert),
            Layer(parts["up"], "expert.up", index, expert=expert),
            Layer(parts["down"], "expert.down", index, expert=expert),
        )
    gate_up, down = block.fused["gate_up_proj"], block.fused["down_proj"]
    inner = _fused_shape(build.checkpoint, index, block)[2]
    return (
        Layer(f"{gate_up}[{expert}:gate]", "expert.gate", index, tensor=gate_up,
              rows=((0, inner),), expert=expert, index=expert),
        Layer(f"{gate_up}[{expert}:up]", "expert.up", index, tensor=gate_up,
              rows=((inner, 2 * inner),), expert=expert, index=expert),
        Layer(f"{down}[{expert}]", "expert.down", index, tensor=down, expert=expert,
              index=expert),
    )  # fmt: skip


def _add_dense(
    build: PlanBuilder, stream: Stream, index: int, parts: dict[str, str], hidden: int
) -> tuple[str, ...]:
    """A dense block's gated MLP; the stream gains its down."""
    missing = [p for p in _MLP if p not in parts]
    if missing:
        raise StructureError(
            f"moe: block {index} has neither experts nor a whole MLP (no mlp.{missing[0]}_proj)"
        )
    names = _add_gated(build, stream, hidden, *(Layer(parts[p], p, index) for p in _MLP))
    stream.add(names[-1])
    return names


def _add_gated(
    build: PlanBuilder, stream: Stream, hidden: int, gate: Layer, up: Layer, down: Layer
) -> tuple[str, str, str]:
    """A gated MLP ``down(act(gate(x)) ⊙ up(x))`` on the stream: gate and up read it, down
    reads both, channel by channel."""
    _add(build, gate, stream, hidden)
    _add(build, up, stream, hidden)
    inner = build.outputs(gate.name)
    if build.outputs(up.name) != inner:
        raise StructureError(
            f"moe: {up.name} has {build.outputs(up.name)} outputs, its gate {inner}"
        )
    _add(build, down, [gate.name, up.name], inner)
    if build.outputs(down.name) != hidden:
        raise StructureError(
            f"moe: {down.name} has {build.outputs(down.name)} outputs; the stream is {hidden} wide"
        )
    return gate.name, up.name, down.name


def _add(
    build: PlanBuilder,
    layer: Layer,
    fed_by: Stream | list[str],
    inputs: int,
    index: IndexMap = IDENTITY,
) -> Layer:
    """Plan ``layer``, checked to read the ``inputs`` channels that feed it."""
    build.add(layer, fed_by, index)
    if build.shape(layer)[2] != inputs:
        raise StructureError(
            f"moe: {layer.name} reads {build.shape(layer)[2]} inputs; what feeds it has {inputs}"
        )
    return layer


def _listed(indices: list[int]) -> str:
    return str(indices) if len(indices) <= 8 else f"{indices[:8]}… ({len(indices)})"


def _notes(
    build: PlanBuilder,
    blocks: dict[int, _Block],
    sparse: list[int],
    experts: int,
    config: dict[str, object],
) -> None:
    """What the report says about the experts: how many, in which blocks, how stored."""
    chosen = config_int(config, "num_experts_per_tok")
    routing = f", {chosen} chosen per token" if chosen else ""
    dense = [i for i in sorted(blocks) if i not in sparse]
    build.note(
        f"mixture of experts: {experts} experts per sparse block{routing}, in {len(sparse)} of "
        f"{len(blocks)} blocks; every expert is measured: {experts * len(sparse)} experts, "
        f"{3 * experts * len(sparse)} layers (gate, up, down), each with its expert's index"
        + (f"; dense blocks (gate, up, down): {_listed(dense)}" if dense else "")
    )
    if any(blocks[i].shared for i in sparse):
        build.note("shared experts (run for every token) are typed shared.gate/up/down")
    if any(blocks[i].fused for i in sparse):
        build.note(
            "experts stored fused (experts.gate_up_proj, experts.down_proj): each expert's "
            "matrices are its slice of the stack; gate_up_proj holds the gate rows, then the up"
        )


def _head(build: PlanBuilder, checkpoint: Checkpoint, stream: Stream, depth: int) -> int:
    """The language-model head on the final stream (or a note that it is tied or absent);
    its vocabulary size."""
    config = checkpoint.config or {}
    for name in _HEADS:
        if name in checkpoint.tensors:
            build.add(Layer(name, "head", depth, group="top"), stream)
            return checkpoint.tensors[name].shape[0]
    if config.get("tie_word_embeddings", False):
        build.note("lm_head is tied to the token embedding; embeddings are not audited")
    else:
        build.note("no lm_head in this checkpoint (a bare decoder)")
    return config_int(config, "vocab_size") or 0


class _Attention:
    """A block's attention: LLaMA's q/k/v/o (GQA) or DeepSeek's multi-head latent attention,
    with the geometry from config.json checked against the shapes."""

    def __init__(self, heads: _Heads | None, latent: _Latent | None, hidden: int) -> None:
        self.heads, self.latent, self.hidden = heads, latent, hidden

    @classmethod
    def read(cls, checkpoint: Checkpoint, blocks: dict[int, _Block]) -> _Attention:
        latent = any("kv_a_proj_with_mqa" in b.attention for b in blocks.values())
        wanted = ("o_proj", "kv_a_proj_with_mqa", "kv_b_proj") if latent else _LLAMA
        for index, block in sorted(blocks.items()):
            parts = block.attention
            missing = [p for p in wanted if p not in parts]
            if latent and not ("q_proj" in parts or {"q_a_proj", "q_b_proj"} <= set(parts)):
                missing.append("q_proj (or q_a_proj and q_b_proj)")
            if missing:
                raise StructureError(
                    f"moe: block {index} lacks self_attn.{', '.join(missing)} (pruned, one "
                    "shard of several?)"
                )
            for name in parts.values():  # before any shape is read below
                require_weight(checkpoint, name, "moe", "linear", "attention")
        first = blocks[min(blocks)].attention
        hidden = checkpoint.tensors[first["o_proj"]].shape[0]
        if latent:
            return cls(None, _Latent.read(checkpoint), hidden)
        named = {
            i: {f"self_attn.{p}": n for p, n in b.attention.items()} for i, b in blocks.items()
        }
        try:
            return cls(_Heads.read(checkpoint, named), None, hidden)
        except StructureError as exc:
            raise StructureError(exc.message.replace("llama:", "moe:", 1)) from exc

    def add(
        self, build: PlanBuilder, stream: Stream, index: int, parts: dict[str, str]
    ) -> tuple[str, ...]:
        """Plan the block's attention; the stream gains its output. Returns the value path."""
        if self.latent is not None:
            return self.latent.add(build, stream, index, parts, self.hidden)
        assert self.heads is not None
        q, k, v, o = (Layer(parts[p], t, index) for p, t in zip(_LLAMA, _LLAMA_TYPES, strict=True))
        try:
            self.heads.check(build.checkpoint, q, k, v, o)
        except StructureError as exc:
            raise StructureError(exc.message.replace("llama:", "moe:", 1)) from exc
        for layer in (q, k, v):
            _add(build, layer, stream, self.hidden)
        build.add(o, [v.name], self.heads.value_map())
        stream.add(o.name)
        return v.name, o.name


_LLAMA = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA_TYPES = ("query", "key", "value", "output")
_LATENT_KEYS = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


class _Latent:
    """Multi-head latent attention's geometry (DeepSeek-V2/V3), from config.json."""

    def __init__(self, heads: int, rank: int, rope: int, nope: int, value: int) -> None:
        self.heads, self.rank, self.rope, self.nope, self.value = heads, rank, rope, nope, value

    @classmethod
    def read(cls, checkpoint: Checkpoint) -> _Latent:
        config = checkpoint.config or {}
        heads = config_int(config, "num_attention_heads")
        sizes = [config_int(config, key) for key in _LATENT_KEYS]
        if heads is None or None in sizes:
            raise StructureError(
                "moe: multi-head latent attention (kv_a_proj_with_mqa) is split by "
                f"num_attention_heads, {', '.join(_LATENT_KEYS)} from config.json, which lacks "
                "some of them"
            )
        rank, rope, nope, value = (s or 0 for s in sizes)
        return cls(heads, rank, rope, nope, value)

    def add(
        self, build: PlanBuilder, stream: Stream, index: int, parts: dict[str, str], hidden: int
    ) -> tuple[str, ...]:
        """Plan the block's latent attention; the stream gains its output. Returns the value
        path: the latent rows, kv_b's value rows, the output."""
        kv_a, kv_b, o = parts["kv_a_proj_with_mqa"], parts["kv_b_proj"], parts["o_proj"]
        self._check(build.checkpoint, parts)
        if "q_proj" in parts:
            _add(build, Layer(parts["q_proj"], "query", index), stream, hidden)
        else:
            q_a = _add(build, Layer(parts["q_a_proj"], "query.a", index), stream, hidden)
            q_b = Layer(parts["q_b_proj"], "query", index)
            _add(build, q_b, [q_a.name], build.outputs(q_a.name))
        rank, width = self.rank, self.nope + self.value
        latent = Layer(f"{kv_a}[latent]", "kv.a", index, tensor=kv_a, rows=((0, rank),))
        rotary = Layer(f"{kv_a}[rope]", "key.rope", index, tensor=kv_a,
                       rows=((rank, rank + self.rope),))  # fmt: skip
        keys = tuple((h * width, h * width + self.nope) for h in range(self.heads))
        values = tuple((h * width + self.nope, (h + 1) * width) for h in range(self.heads))
        key = Layer(f"{kv_b}[key]", "key", index, tensor=kv_b, rows=keys)
        value = Layer(f"{kv_b}[value]", "value", index, tensor=kv_b, rows=values)
        output = Layer(o, "output", index)
        _add(build, latent, stream, hidden)
        _add(build, rotary, stream, hidden)
        build.add(key, [latent.name])
        build.add(value, [latent.name])
        build.add(output, [value.name])  # o's input h·v + j is value row j of head h
        stream.add(output.name)
        return latent.name, value.name, output.name

    def _check(self, checkpoint: Checkpoint, parts: dict[str, str]) -> None:
        shape = {p: checkpoint.tensors[n].shape for p, n in parts.items()}
        query = self.heads * (self.nope + self.rope)
        want = {
            "kv_a_proj_with_mqa": (0, self.rank + self.rope, "kv_lora_rank + qk_rope_head_dim"),
            "kv_b_proj": (0, self.heads * (self.nope + self.value), "heads × (nope + v) dims"),
            "q_proj": (0, query, "heads × (nope + rope) dims"),
            "q_b_proj": (0, query, "heads × (nope + rope) dims"),
            "o_proj": (1, self.heads * self.value, "heads × v_head_dim inputs"),
        }
        if shape["kv_b_proj"][1] != self.rank:
            raise StructureError(
                f"moe: {parts['kv_b_proj']} reads {shape['kv_b_proj'][1]} channels; "
                f"config.json's kv_lora_rank is {self.rank}"
            )
        for part, (axis, size, what) in want.items():
            if part in shape and shape[part][axis] != size:
                raise StructureError(
                    f"moe: {parts[part]} has shape {list(shape[part])}; config.json's "
                    f"{what} give {size}"
                )
