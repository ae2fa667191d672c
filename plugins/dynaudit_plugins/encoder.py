"""BERT-class encoders: BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, DistilBERT, ALBERT, MPNet,
and the MiniLM / sentence-transformers checkpoints built on them.

Names. Each encoder layer N holds six matrices, typed query, key, value, attention-output,
intermediate and output. Four naming schemes, with the base model's prefix (``bert.``,
``roberta.``, ``electra.``, ``distilbert.``, ``albert.``, ``mpnet.``) in a task model
(``BertForSequenceClassification``) and without it in a bare one (``BertModel``, a
sentence-transformers folder):

- BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA (``encoder.layer.N.``):
  ``attention.self.{query,key,value}``, ``attention.output.dense``, ``intermediate.dense``,
  ``output.dense``;
- MPNet (``encoder.layer.N.``): ``attention.attn.{q,k,v,o}``, ``intermediate.dense``,
  ``output.dense``;
- DistilBERT (``transformer.layer.N.``): ``attention.{q,k,v,out}_lin``, ``ffn.lin1``,
  ``ffn.lin2``;
- ALBERT (``encoder.albert_layer_groups.G.albert_layers.J.``): ``attention.{query,key,value}``,
  ``attention.dense``, ``ffn``, ``ffn_output``.

ALBERT stores ``num_hidden_groups`` groups G of ``inner_group_num`` layers J, shared by all
``num_hidden_layers`` encoder layers (group G serves layers ``i`` with
``int(i / (layers / groups)) == G``, as transformers computes it). Each stored matrix is one
layer here, measured once; its depth is the first encoder layer that applies it, and the plan's
notes and block names say where else it is applied.

Depth = encoder layer index. ELECTRA's ``embeddings_project`` and ALBERT's
``embedding_hidden_mapping_in`` (embedding width → hidden width) are ``projection`` at depth 0,
pinned bottom. The pooler (``pooler.dense``, ALBERT ``pooler``) and the heads (``classifier``:
sequence, token and span classification, next-sentence and sentence-order; ``lm-head``: the
masked-LM and ELECTRA-discriminator transforms, and an untied decoder) sit above the last
layer, pinned top.

Graph (post-norm residual stream: each sum ``x + f(x)`` is followed by a LayerNorm, which
rescales a token as a whole and gives each channel a gain; channel c stays channel c). The
embeddings (or the projection) start the stream; q, k and v read it; attention-output reads
value (every query head has its own value head: identity); intermediate reads the stream after
the attention sum; output reads intermediate; the pooler, and a head that does not read the
pooler, read the final stream.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from dynaudit.families import Family, Layer, LayerPlan
from dynaudit.families.build import (
    PlanBuilder,
    Stream,
    StructureError,
    config_int,
    require_weight,
)
from dynaudit.families.naming import skip_reason
from dynaudit.tensors import Checkpoint

__all__ = ["EncoderFamily"]

MODEL_TYPES = (
    "bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "albert", "mpnet",
)  # fmt: skip
# transformers' class names for those model types (not BertGeneration, RobertaPreLayerNorm, …)
_ARCHITECTURE = re.compile(
    r"^(Bert|Roberta|XLMRoberta|Camembert|Electra|DistilBert|Albert|MPNet)(Model|For\w+)$"
)
# attributes under which a task model keeps its base model
_BASES = ("bert.", "roberta.", "electra.", "distilbert.", "albert.", "mpnet.")
_TYPES = ("query", "key", "value", "attention-output", "intermediate", "output")


@dataclass(frozen=True)
class _Scheme:
    """One naming scheme of the encoder layers: the stack's prefix and the six parts."""

    label: str
    stack: str  # the prefix's last components: ``encoder.layer``
    parts: tuple[str, ...]  # in the order of _TYPES
    shared: bool = False  # ALBERT: ``G.albert_layers.J`` instead of ``N``

    @property
    def pattern(self) -> re.Pattern[str]:
        index = (
            r"(?P<group>\d+)\.albert_layers\.(?P<index>\d+)" if self.shared else r"(?P<index>\d+)"
        )
        alternatives = "|".join(re.escape(p) for p in self.parts)
        return re.compile(
            rf"^(?P<prefix>(?:[\w.]+\.)?{re.escape(self.stack)})\.{index}\."
            rf"(?P<part>{alternatives})\.weight$"
        )

    def type_of(self, part: str) -> str:
        return _TYPES[self.parts.index(part)]


_BERT = _Scheme(
    "BERT",
    "encoder.layer",
    (
        "attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "intermediate.dense", "output.dense",
    ),
)  # fmt: skip
_MPNET = _Scheme(
    "MPNet",
    "encoder.layer",
    (
        "attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o",
        "intermediate.dense", "output.dense",
    ),
)  # fmt: skip
_DISTILBERT = _Scheme(
    "DistilBERT",
    "transformer.layer",
    (
        "attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",
        "ffn.lin1", "ffn.lin2",
    ),
)  # fmt: skip
_ALBERT = _Scheme(
    "ALBERT",
    "encoder.albert_layer_groups",
    (
        "attention.query", "attention.key", "attention.value", "attention.dense",
        "ffn", "ffn_output",
    ),
    shared=True,
)  # fmt: skip
_SCHEMES = (_BERT, _MPNET, _DISTILBERT, _ALBERT)

# Heads above the encoder, tried in this order: the layers of one path, its type, and whether
# its first layer reads the pooler (when the checkpoint has one) or the final stream.
_HEADS: tuple[tuple[tuple[str, ...], str, bool], ...] = (
    (("classifier.dense", "classifier.out_proj"), "classifier", False),  # RoBERTa, ELECTRA, MPNet
    (("pre_classifier", "classifier"), "classifier", False),  # DistilBERT
    (("cls.seq_relationship",), "classifier", True),  # BERT next-sentence prediction
    (("sop_classifier.classifier",), "classifier", True),  # ALBERT sentence order
    (("qa_outputs",), "classifier", False),  # span classification
    (("classifier",), "classifier", True),  # BERT/ALBERT: the pooler when there is one
    (("cls.predictions.transform.dense", "cls.predictions.decoder"), "lm-head", False),
    (("lm_head.dense", "lm_head.decoder"), "lm-head", False),  # RoBERTa, MPNet
    (("vocab_transform", "vocab_projector"), "lm-head", False),  # DistilBERT
    (("predictions.dense", "predictions.decoder"), "lm-head", False),  # ALBERT
    (("generator_predictions.dense", "generator_lm_head"), "lm-head", False),  # ELECTRA
    (
        ("discriminator_predictions.dense", "discriminator_predictions.dense_prediction"),
        "lm-head",
        False,
    ),
)


@dataclass
class _Stack:
    """The encoder layers found under one scheme: ``{(group, index): {part: tensor}}``."""

    scheme: _Scheme
    layers: dict[tuple[int, int], dict[str, str]]
    prefixes: set[str]

    @property
    def complete(self) -> bool:
        return any(set(self.scheme.parts) <= set(parts) for parts in self.layers.values())

    @property
    def base(self) -> str:
        """The base model's prefix: ``bert.`` for ``bert.encoder.layer``, ``""`` for none."""
        (prefix,) = self.prefixes
        return prefix[: -len(self.scheme.stack)]


def _stacks(checkpoint: Checkpoint) -> list[_Stack]:
    found = []
    for scheme in _SCHEMES:
        pattern = scheme.pattern
        layers: dict[tuple[int, int], dict[str, str]] = defaultdict(dict)
        prefixes = set()
        for name in checkpoint.tensors:
            match = pattern.match(name)
            if match:
                group = int(match["group"]) if scheme.shared else 0
                layers[group, int(match["index"])][match["part"]] = name
                prefixes.add(match["prefix"])
        if layers:
            found.append(_Stack(scheme, dict(layers), prefixes))
    return found


class EncoderFamily(Family):
    name = "encoder"
    description = (
        "BERT-class encoders (BERT, RoBERTa, ELECTRA, DistilBERT, ALBERT, MPNet, MiniLM, "
        "sentence-transformers): query/key/value/attention-output/intermediate/output, pooler"
    )

    def detect(self, checkpoint: Checkpoint) -> float | tuple[float, str]:
        config = checkpoint.config or {}
        model_type = config.get("model_type")
        complete = [s for s in _stacks(checkpoint) if s.complete]
        if model_type in MODEL_TYPES:
            return (0.95 if complete else 0.5), f"config.json model_type {model_type!r}"
        listed = config.get("architectures")
        architectures = [str(a) for a in listed] if isinstance(listed, list) else []
        if complete and any(map(_ARCHITECTURE.match, architectures)):
            return 0.9, f"config.json architectures {architectures!r}"
        if complete:
            why = f"tensor names ({complete[0].scheme.label} encoder layers)"
            if isinstance(model_type, str):
                # a BERT-like layout under another name (LayoutLM, Longformer, …): claimed, but
                # below any family that knows that model type
                return 0.4, f"{why}; config.json model_type {model_type!r} is not one it knows"
            return 0.7, why
        return 0.0

    def plan(self, checkpoint: Checkpoint) -> LayerPlan:
        stack = _stack(checkpoint)
        scheme = stack.scheme
        config = checkpoint.config or {}
        for key, parts in sorted(stack.layers.items()):
            missing = [p for p in scheme.parts if p not in parts]
            if missing:
                raise StructureError(
                    f"encoder: {_where(scheme, key)} lacks {', '.join(missing)} (pruned, one "
                    "shard of several, or not a BERT-class encoder?)"
                )
            for part, name in parts.items():  # before any shape is read below
                require_weight(checkpoint, name, "encoder", "linear", scheme.type_of(part))
        hidden = _check_shapes(checkpoint, stack)
        depths, uses = _depths(stack, config)

        build = PlanBuilder(checkpoint, "encoder")
        base = stack.base
        stream = Stream()  # the embeddings: the model's input, not audited
        widths = [*_embedding_widths(checkpoint, base)]
        projection = next(
            (
                base + name
                for name in (
                    "embeddings_project.weight",
                    "encoder.embedding_hidden_mapping_in.weight",
                )
                if base + name in checkpoint.tensors
            ),
            None,
        )
        if projection is not None:
            build.add(Layer(projection, "projection", 0, group="bottom"))
            build.reads_input(projection)
            stream = Stream([projection], reads_input=False)
            if build.outputs(projection) != hidden:
                raise StructureError(
                    f"encoder: {projection} gives {build.outputs(projection)} channels; the "
                    f"encoder layers read {hidden}"
                )
            widths.append(hidden)
        for key in sorted(stack.layers):
            parts = stack.layers[key]
            q, k, v, out, inter, output = (
                Layer(parts[p], scheme.type_of(p), depths[key]) for p in scheme.parts
            )
            for attn in (q, k, v):
                build.add(attn, stream)
            build.add(out, [v.name])  # heads are identity maps: one value head per query head
            stream.add(out.name)
            build.add(inter, stream)
            build.add(output, [inter.name])
            stream.add(output.name)
            where = _where(scheme, key)
            if scheme.shared:
                where += f" (applied at encoder layers {_ranges(uses[key[0]])})"
            build.block(
                where,
                {"attention": (v.name, out.name), "mlp": (inter.name, output.name)},
                note="post-norm: a LayerNorm follows each sum x + f(x), rescaling the skip and "
                "the branch together, and its gains are left out; attention: the value path "
                "only (q and k act through the softmax)",
            )
        # one above the last layer applied (ALBERT applies its stored layers again and again)
        top = max(depths.values()) + 1 if not uses else max(map(max, uses.values())) + 1
        widths += [hidden] * top
        widths += _heads(build, base, stream, top, hidden)
        for name in checkpoint.names():
            if name.endswith("relative_attention_bias.weight") and name.startswith(base):
                build.skip(
                    name,
                    "relative position bias (a table of per-head score offsets, not a weight "
                    "matrix)",
                )
        heads = config_int(config, "num_attention_heads", "n_heads")
        if heads:
            build.note(f"{heads} attention heads (from config.json)")
        if scheme.shared:
            build.note(_sharing_note(stack, config, uses))
        return build.build(
            depth_note="encoder family: depth = encoder layer index (a shared ALBERT layer: the "
            "first layer that applies it); the pooler and heads above the last layer",
            widths=widths,
        )


def _stack(checkpoint: Checkpoint) -> _Stack:
    """The one complete encoder stack; anything else is a structure error."""
    stacks = _stacks(checkpoint)
    complete = [s for s in stacks if s.complete]
    if not complete:
        if stacks:
            found = ", ".join(f"{s.scheme.label} ({len(s.layers)} partial layers)" for s in stacks)
            raise StructureError(f"encoder: no encoder layer has all six matrices: {found}")
        raise StructureError(
            f"encoder: no BERT, DistilBERT, ALBERT or MPNet encoder layers in {checkpoint.root}"
        )
    if len(complete) > 1 or len(complete[0].prefixes) > 1:
        prefixes = sorted(p for s in complete for p in s.prefixes)
        raise StructureError(f"encoder: several encoder stacks in one checkpoint: {prefixes}")
    return complete[0]


def _where(scheme: _Scheme, key: tuple[int, int]) -> str:
    group, index = key
    return f"layer group {group}, layer {index}" if scheme.shared else f"layer {index}"


def _check_shapes(checkpoint: Checkpoint, stack: _Stack) -> int:
    """The hidden width, after checking every layer's matrices fit together (and the config)."""
    config = checkpoint.config or {}
    scheme = stack.scheme
    first = stack.layers[min(stack.layers)]
    hidden = checkpoint.tensors[first[scheme.parts[0]]].shape[1]
    declared = config_int(config, "hidden_size", "dim")
    if declared is not None and declared != hidden:
        raise StructureError(
            f"encoder: {first[scheme.parts[0]]} reads {hidden} channels; config.json's hidden "
            f"size is {declared}"
        )
    for key, parts in sorted(stack.layers.items()):
        shape = {scheme.type_of(p): checkpoint.tensors[name].shape for p, name in parts.items()}
        inner = shape["value"][0]
        wanted = {
            "query": (inner, hidden),
            "key": (inner, hidden),
            "value": (inner, hidden),
            "attention-output": (hidden, inner),
            "intermediate": (shape["intermediate"][0], hidden),
            "output": (hidden, shape["intermediate"][0]),
        }
        for kind, want in wanted.items():
            if tuple(shape[kind]) != want:
                name = parts[scheme.parts[_TYPES.index(kind)]]
                raise StructureError(
                    f"encoder: {name} is {shape[kind][0]}×{shape[kind][1]}; in "
                    f"{_where(scheme, key)} of a {hidden}-wide encoder with {inner} attention "
                    f"channels, {kind} is {want[0]}×{want[1]}"
                )
    return hidden


def _depths(
    stack: _Stack, config: dict[str, object]
) -> tuple[dict[tuple[int, int], int], dict[int, list[int]]]:
    """Each stored layer's depth and, for ALBERT, the encoder layers each group serves; the
    layer counts are checked against config.json."""
    keys = sorted(stack.layers)
    if not stack.scheme.shared:
        declared = config_int(config, "num_hidden_layers", "n_layers")
        indices = [index for _, index in keys]
        if declared is not None and indices != list(range(declared)):
            raise StructureError(
                f"encoder: config.json has {declared} layers, the checkpoint has layers "
                f"{_ranges(indices)}"
            )
        if declared is None and indices != list(range(len(indices))):
            raise StructureError(f"encoder: the checkpoint has layers {_ranges(indices)}")
        return {key: key[1] for key in keys}, {}
    groups = sorted({g for g, _ in keys})
    inner = sorted({j for _, j in keys})
    if keys != [(g, j) for g in range(len(groups)) for j in range(len(inner))]:
        raise StructureError(
            f"encoder: ALBERT layer groups {groups} with layers {inner} are not a full grid"
        )
    for key, count in (("num_hidden_groups", len(groups)), ("inner_group_num", len(inner))):
        declared = config_int(config, key)
        if declared is not None and declared != count:
            raise StructureError(
                f"encoder: config.json has {key}={declared}, the checkpoint {count}"
            )
    layers = config_int(config, "num_hidden_layers") or len(groups)
    if layers < len(groups):
        raise StructureError(
            f"encoder: {len(groups)} ALBERT layer groups for {layers} encoder layers leave some "
            "group unused"
        )
    uses: dict[int, list[int]] = defaultdict(list)
    for i in range(layers):
        uses[int(i / (layers / len(groups)))].append(i)
    return {(g, j): uses[g][0] for g, j in keys}, dict(uses)


def _sharing_note(stack: _Stack, config: dict[str, object], uses: dict[int, list[int]]) -> str:
    groups = len({g for g, _ in stack.layers})
    inner = len({j for _, j in stack.layers})
    layers = config_int(config, "num_hidden_layers")
    told = (
        f"{layers} encoder layers"
        if layers
        else "encoder layers whose number config.json does not give (taken as one per group)"
    )
    where = "; ".join(f"group {g} at layers {_ranges(uses[g])}" for g in range(groups))
    return (
        f"ALBERT shares {groups} layer group(s) of {inner} layer(s) among {told} ({where}): "
        "each shared matrix is measured once, at the depth (and in the third) of the first "
        "layer that applies it; the layer graph shows one pass, leaving out that later passes "
        "read the shared layer's own outputs"
    )


def _embedding_widths(checkpoint: Checkpoint, base: str) -> list[int]:
    """Vocabulary (one-hot tokens) → embedding width, when the word embeddings are stored."""
    info = checkpoint.tensors.get(base + "embeddings.word_embeddings.weight")
    if info is None or len(info.shape) != 2:
        return []
    return list(info.shape)


def _heads(build: PlanBuilder, base: str, stream: Stream, top: int, hidden: int) -> list[int]:
    """Plan the pooler and the heads above the encoder, each checked to read its feeder's
    width; the main path's widths through them (the pooler and the first head path found)."""
    checkpoint = build.checkpoint

    def add(layer: Layer, source: list[str]) -> None:
        build.add(layer, source or stream)
        reads = build.shape(layer)[2]
        gives = build.outputs(source[0]) if source else hidden
        if reads != gives:
            where = source[0] if source else "the final stream"
            raise StructureError(
                f"encoder: {layer.name} reads {reads} inputs; {where} gives {gives}"
            )

    # heads sit beside the base model: ``classifier`` beside ``bert.`` (and ``distilbert.`` is
    # not ``distil`` + ``bert.``)
    outer = next((base[: -len(b)] for b in _BASES if base == b or base.endswith("." + b)), base)
    pooler = next(
        (
            base + p
            for p in ("pooler.dense.weight", "pooler.weight")
            if base + p in checkpoint.tensors
        ),
        None,
    )
    if pooler is not None and _usable(build, pooler):
        add(Layer(pooler, "pooler", top, group="top"), [])
    else:
        pooler = None
    taken: set[str] = set()
    main: list[str] = []
    for path, type_, reads_pooler in _HEADS:
        names = [outer + part + ".weight" for part in path]
        if names[0] not in checkpoint.tensors or names[0] in taken:
            continue
        after_pooler = reads_pooler and pooler is not None
        feeder: list[str] = [pooler] if after_pooler and pooler else []
        depth = top + 1 if after_pooler else top
        planned: list[str] = []
        for name in names:
            if name not in checkpoint.tensors or name in taken:
                break
            taken.add(name)
            if not _usable(build, name):
                break
            add(Layer(name, type_, depth, group="top"), planned[-1:] or feeder)
            planned.append(name)
            depth += 1
        if planned and not main:
            main = feeder + planned
    if not main and pooler is not None:
        main = [pooler]
    return [build.outputs(name) for name in main]


def _usable(build: PlanBuilder, name: str) -> bool:
    """A head tensor that can be a layer; otherwise it is skipped with the naming rules' reason
    (a regression head's 1 × d classifier is a degenerate matrix)."""
    reason = skip_reason(build.checkpoint.tensors[name])
    if reason is not None:
        build.skip(name, reason)
        return False
    return True


def _ranges(indices: list[int]) -> str:
    return f"{indices[0]}–{indices[-1]} ({len(indices)})" if indices else "none"
