"""Vision transformers: transformers ``ViTModel``/``ViTForImageClassification`` and timm names.

Layers per encoder block N (depth N + 1; the patch embedding is depth 0, the head last):
query, key, value, output (attention), fc1, fc2 (MLP). timm stores q, k and v fused as one
``blocks.N.attn.qkv.weight`` of shape ``[3·d, d]`` laid out ``[q; k; v]`` (timm reshapes the
output to ``(3, heads, head_dim)``); it is split by that layout, after checking the rows
against the embedding width from config.json — never by dividing the rows by three.

Graph (pre-norm residual stream): the patch embedding (a conv over pixels) starts the stream;
q, k, v and fc1 read it; the output projection reads v (head by head, no GQA); fc2 reads fc1;
the head and the pooler read the final stream.
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
    require_weight,
)
from dynaudit.tensors import Checkpoint

__all__ = ["ViTFamily"]

# block part → (type) for the three naming schemes
_HF = {  # transformers checkpoints (save_pretrained writes these)
    "attention.attention.query": "query",
    "attention.attention.key": "key",
    "attention.attention.value": "value",
    "attention.output.dense": "output",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
}
_HF_NEW = {  # transformers ≥ 5 module names
    "attention.q_proj": "query",
    "attention.k_proj": "key",
    "attention.v_proj": "value",
    "attention.o_proj": "output",
    "mlp.fc1": "fc1",
    "mlp.fc2": "fc2",
}
_TIMM = {"attn.qkv": "qkv", "attn.proj": "output", "mlp.fc1": "fc1", "mlp.fc2": "fc2"}
_BLOCK = re.compile(
    r"^(?P<prefix>(?:[\w.]+\.)?(?:encoder\.layer|layers|blocks))\.(?P<index>\d+)\."
    r"(?P<part>[\w.]+?)\.weight$"
)
_PATCH = ("patch_embeddings.projection.weight", "patch_embed.proj.weight")
_HEADS = ("classifier.weight", "head.weight", "head.fc.weight")
_POOLER = ("pooler.dense.weight",)
# timm architecture names → attention heads, for timm configs without model_args
_TIMM_HEADS = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16, "giant": 16}


class ViTFamily(Family):
    name = "vit"
    description = "vision transformers: transformers ViT and timm names (fused qkv split)"

    def detect(self, checkpoint: Checkpoint) -> float | tuple[float, str]:
        config = checkpoint.config or {}
        parts = {m["part"] for m in map(_BLOCK.match, checkpoint.tensors) if m}
        has_patch = any(n.endswith(_PATCH) for n in checkpoint.tensors)
        if config.get("model_type") == "vit":
            return (0.95 if has_patch else 0.5), "config.json model_type 'vit'"
        if str(config.get("architecture", "")).startswith(("vit_", "deit_")):
            return 0.9, f"timm config.json architecture {config['architecture']!r}"
        for scheme in (_HF, _HF_NEW, _TIMM):
            if has_patch and set(scheme) <= parts:
                return 0.8, "tensor names (patch embedding and attention blocks)"
        return 0.0

    def plan(self, checkpoint: Checkpoint) -> LayerPlan:
        blocks, _ = index_blocks(checkpoint, _BLOCK)
        scheme = _scheme(blocks)
        build = PlanBuilder(checkpoint, "vit")
        stream = Stream(reads_input=False)
        patch = _patch(checkpoint)
        build.add(Layer(patch, "patch", 0, "conv", group="bottom"))  # checks its shape
        build.reads_input(patch)
        stream.add(patch)
        width = checkpoint.tensors[patch].shape[0]
        heads = _heads(checkpoint.config or {})
        for index in sorted(blocks):
            parts = blocks[index]
            missing = [p for p in scheme if p not in parts]
            if missing:
                raise StructureError(f"vit: block {index} lacks {', '.join(missing)}")
            depth = index + 1
            if scheme is _TIMM:
                q, k, v = _split_qkv(checkpoint, parts["attn.qkv"], width, depth)
            else:
                q, k, v = (Layer(parts[p], t, depth) for p, t in scheme.items() if t in _QKV)
            by_type = {t: Layer(parts[p], t, depth) for p, t in scheme.items() if t not in _QKV}
            out, fc1, fc2 = by_type["output"], by_type["fc1"], by_type["fc2"]
            add_transformer_block(build, stream, index, (q, k, v, out), (fc1, fc2))
        top = len(blocks) + 1
        outputs = width
        for name in checkpoint.names():
            if name.endswith(_POOLER):
                build.add(Layer(name, "pooler", top, "linear", group="top"), stream)
            elif name.endswith(_HEADS) and len(checkpoint.tensors[name].shape) == 2:
                build.add(Layer(name, "head", top, "linear", group="top"), stream)
                outputs = checkpoint.tensors[name].shape[0]
        if heads:
            build.note(f"{heads} attention heads (from config.json)")
        patch_inputs = build.shape(patch)[2]
        return build.build(
            depth_note="vit family: depth 0 = patch embedding, N + 1 = encoder block N, "
            "the head above the last block",
            widths=[patch_inputs, width] + [width] * len(blocks) + [outputs],
        )


_QKV = ("query", "key", "value", "qkv")


def _patch(checkpoint: Checkpoint) -> str:
    """The patch embedding's tensor; a ViT without one is a structure error."""
    patch = next((n for n in checkpoint.names() if n.endswith(_PATCH)), None)
    if patch is None:
        raise StructureError(
            "vit: no patch embedding (patch_embeddings.projection or patch_embed.proj) in the "
            "checkpoint"
        )
    return patch


def _scheme(blocks: dict[int, dict[str, str]]) -> dict[str, str]:
    parts = {p for block in blocks.values() for p in block}
    for scheme in (_HF, _HF_NEW, _TIMM):
        if set(scheme) <= parts:
            return scheme
    raise StructureError("vit: the encoder blocks match neither transformers nor timm names")


def _heads(config: dict[str, object]) -> int | None:
    args = config.get("model_args")
    heads = config_int(config, "num_attention_heads", "num_heads")
    if heads is None and isinstance(args, dict):
        heads = config_int(args, "num_heads")
    arch = str(config.get("architecture", ""))
    if heads is None and arch.startswith(("vit_", "deit_")):
        size = arch.split("_")[1]
        heads = _TIMM_HEADS.get(size)
    return heads


def _split_qkv(checkpoint: Checkpoint, name: str, width: int, depth: int) -> tuple[Layer, ...]:
    """q, k, v as row ranges of timm's fused ``[q; k; v]`` weight."""
    config = checkpoint.config or {}
    args = config.get("model_args")
    declared = config_int(config, "embed_dim", "hidden_size", "num_features")
    if declared is None and isinstance(args, dict):
        declared = config_int(args, "embed_dim")
    if declared is None:
        raise StructureError(
            f"vit: {name} fuses q, k and v; config.json must give the embedding width "
            "(embed_dim, hidden_size, num_features or model_args.embed_dim) to split it"
        )
    rows, cols = require_weight(checkpoint, name, "vit", "linear", "qkv")
    if declared != width or rows != 3 * declared or cols != declared:
        raise StructureError(
            f"vit: {name} is {rows}×{cols}; a timm [q; k; v] layout for embedding width "
            f"{declared} is {3 * declared}×{declared}"
        )
    return tuple(
        Layer(f"{name}[{kind}]", kind, depth, tensor=name, rows=((i * width, (i + 1) * width),))
        for i, kind in enumerate(("query", "key", "value"))
    )
