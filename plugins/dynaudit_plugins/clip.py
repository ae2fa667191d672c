"""CLIP: two towers, a text transformer and a vision transformer, as transformers writes
``CLIPModel``, ``CLIPTextModel(WithProjection)``, ``CLIPVisionModel(WithProjection)`` and
``CLIPForImageClassification``.

Each tower is a stack (``Layer.stack`` ``text`` or ``vision``) with its own thirds, and types
carry the tower (``text.query``, ``vision.fc1``): the towers never exchange activations, so a
text query and a vision query are two populations. Depth counts within each tower, from 0.

Graph (pre-LayerNorm blocks; LayerNorm does not mix channels, so stream maps are the identity):

- text: the token and position embeddings (the model's input) start the stream; q, k, v and fc1
  read it, o reads v, fc2 reads fc1; ``text_projection`` reads the final stream (at the end-of-
  text token, after ``final_layer_norm``);
- vision: the patch embedding (a convolution over pixels) starts the stream, with the class
  token and position embeddings; the blocks as above; ``visual_projection`` (or a classifier)
  reads the final stream (the class token, after ``post_layernorm``).
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
from dynaudit.tensors import Checkpoint
from dynaudit_plugins.encdec import Tower

__all__ = ["CLIPFamily"]

NAME = "clip"
MODEL_TYPES = ("clip", "clip_text_model", "clip_vision_model")
_ROLES = {
    "self_attn.q_proj": "query",
    "self_attn.k_proj": "key",
    "self_attn.v_proj": "value",
    "self_attn.out_proj": "output",
    "mlp.fc1": "fc1",
    "mlp.fc2": "fc2",
}
_BLOCK = re.compile(
    r"^(?P<root>(?:[\w.]+\.)?(?P<tower>text|vision)_model\.)encoder\.layers\.(?P<index>\d+)\."
    r"(?P<part>[\w.]+?)\.weight$"
)
# a CLIPTextModel or CLIPVisionModel saved by transformers ≥ 5 has no text_model./vision_model.
_BARE = re.compile(
    r"^(?P<root>(?:[\w.]+\.)?)encoder\.layers\.(?P<index>\d+)\.(?P<part>[\w.]+?)\.weight$"
)
_PATCH = "embeddings.patch_embedding.weight"  # under the vision tower's root
_TOKENS = "embeddings.token_embedding.weight"  # under the text tower's root
_PROJECTION = {"text": "text_projection.weight", "vision": "visual_projection.weight"}
_CLASSIFIER = "classifier.weight"  # CLIPForImageClassification, on the vision tower
_CONFIG = {"text": "text_config", "vision": "vision_config"}
_BARE_TYPES = {"clip_text_model": "text", "clip_vision_model": "vision"}
_LOGIT_SCALE = "logit scale: the image–text similarity's temperature, a scalar"
_CLASS_TOKEN = "class token: a learned input vector"


@dataclass(frozen=True)
class _Tower:
    root: str  # prefix of the tower's tensors: ``text_model.``, or ``""`` for a bare tower
    blocks: dict[int, dict[str, str]]  # block index → role → tensor

    @property
    def outer(self) -> str:
        """Prefix of the tensors beside the tower (projections, logit scale)."""
        for tower in ("text", "vision"):
            if self.root.endswith(f"{tower}_model."):
                return self.root[: -len(f"{tower}_model.")]
        return self.root


def _collect(checkpoint: Checkpoint) -> dict[str, _Tower]:
    """The towers present, each with its blocks: ``text_model.``/``vision_model.`` names, or
    a bare tower when config.json's model_type says which one it is."""
    bare = _BARE_TYPES.get(str((checkpoint.config or {}).get("model_type")))
    blocks: dict[str, dict[int, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    roots: dict[str, set[str]] = defaultdict(set)
    for name in checkpoint.tensors:
        match = (_BARE if bare else _BLOCK).match(name)
        if match and match["part"] in _ROLES:
            tower = bare or match["tower"]
            blocks[tower][int(match["index"])][_ROLES[match["part"]]] = name
            roots[tower].add(match["root"])
    for tower, found in roots.items():
        if len(found) > 1:
            raise StructureError(
                f"{NAME}: several {tower} towers in one checkpoint: {sorted(found)}"
            )
    return {tower: _Tower(roots[tower].pop(), dict(b)) for tower, b in blocks.items()}


def _tower_config(config: dict[str, object], tower: str) -> dict[str, object]:
    """A tower's settings: ``text_config``/``vision_config`` of a CLIPModel, or the top level
    of a CLIPTextModel's or CLIPVisionModel's config."""
    sub = config.get(_CONFIG[tower])
    if isinstance(sub, dict):
        return sub
    if config.get("model_type") == f"clip_{tower}_model":
        return config
    return {}


class CLIPFamily(Family):
    name = NAME
    description = "CLIP text and vision towers: thirds per tower, projections on top"

    def detect(self, checkpoint: Checkpoint) -> float | tuple[float, str]:
        config = checkpoint.config or {}
        model_type = config.get("model_type")
        try:
            towers = _collect(checkpoint)
        except StructureError:
            return 0.0
        if model_type in MODEL_TYPES:
            return (0.95 if towers else 0.5), f"config.json model_type {model_type!r}"
        if model_type is not None:
            return 0.0  # siglip and others share the tower names but not the heads
        complete = all(
            set(_ROLES.values()) <= set(block)
            for tower in towers.values()
            for block in tower.blocks.values()
        )
        vision = towers.get("vision")
        has_patch = vision is None or vision.root + _PATCH in checkpoint.tensors
        if towers and complete and has_patch:
            return 0.8, "tensor names (text_model / vision_model encoder layers)"
        return 0.0

    def plan(self, checkpoint: Checkpoint) -> LayerPlan:
        config = checkpoint.config or {}
        towers = _collect(checkpoint)
        if not towers:
            raise StructureError(
                f"{NAME}: no text_model or vision_model encoder layers in {checkpoint.root}"
            )
        build = PlanBuilder(checkpoint, NAME)
        for outer in {found.outer for found in towers.values()}:
            if outer + "logit_scale" in checkpoint.tensors:
                build.skip(outer + "logit_scale", _LOGIT_SCALE)
        widths: dict[str, list[int]] = {}
        for tower in ("text", "vision"):
            if tower in towers:
                settings = _tower_config(config, tower)
                widths[tower] = _plan_tower(build, tower, towers[tower], settings)
        main = "vision" if "vision" in widths else "text"
        if len(widths) == 2:
            text = " → ".join(map(str, _short(widths["text"])))
            build.note(
                f"structural class from the vision tower's widths; the text tower's are {text}"
            )
        build.note(f"towers: {', '.join(widths)}; thirds are counted within each tower")
        return build.build(
            depth_note=f"{NAME} family: depth counts within each tower — text block i at i, "
            "the patch embedding at 0 and vision block i at i + 1 — projections on top",
            widths=widths[main],
        )


def _short(widths: list[int]) -> list[int | str]:
    """``[a, b, b, b, c]`` as ``[a, b, …, b, c]`` for a note."""
    if len(widths) <= 4:
        return list(widths)
    return [widths[0], widths[1], "…", widths[-2], widths[-1]]


def _plan_tower(
    build: PlanBuilder, tower: str, found: _Tower, settings: dict[str, object]
) -> list[int]:
    """Plan one tower; its widths along the main path, input first."""
    checkpoint = build.checkpoint
    blocks = found.blocks
    indices = sorted(blocks)
    expected = config_int(settings, "num_hidden_layers")
    if indices != list(range(expected if expected is not None else len(indices))):
        said = f"config.json says {expected}" if expected is not None else "expected 0, 1, …"
        raise StructureError(
            f"{NAME}: {tower} blocks {indices[0]}…{indices[-1]} ({len(indices)}); {said}"
        )
    for index in indices:
        missing = [role for role in _ROLES.values() if role not in blocks[index]]
        if missing:
            raise StructureError(f"{NAME}: {tower} block {index} lacks {', '.join(missing)}")
    first = blocks[0]["query"]
    width = (
        config_int(settings, "hidden_size")
        or require_weight(checkpoint, first, NAME, "linear", f"{tower}.query")[1]
    )
    stack = Tower(build, tower, width)
    if tower == "vision":
        patch = found.root + _PATCH
        shape = require_weight(checkpoint, patch, NAME, "conv", "vision.patch")
        build.add(Layer(patch, "vision.patch", 0, "conv", group="bottom", stack=tower))
        build.reads_input(patch)
        if shape[0] != width:
            raise StructureError(
                f"{NAME}: {patch} makes {shape[0]} channels; the vision blocks read {width}"
            )
        stack.stream = Stream([patch], reads_input=False)
        if found.root + "embeddings.class_embedding" in checkpoint.tensors:
            build.skip(found.root + "embeddings.class_embedding", _CLASS_TOKEN)
        inputs = build.shape(patch)[2]
    else:
        embed = checkpoint.tensors.get(found.root + _TOKENS)
        vocab = embed.shape[0] if embed is not None and len(embed.shape) == 2 else None
        inputs = vocab or config_int(settings, "vocab_size") or width
    offset = 1 if tower == "vision" else 0
    for index in indices:
        parts = blocks[index]
        depth = index + offset
        value, out = stack.attention(parts, depth)
        fc1, fc2 = (stack.layer(parts[r], r, depth) for r in ("fc1", "fc2"))
        mlp = stack.mlp([fc1], fc2)
        build.block(
            f"{tower} block {index}",
            {"attention": (value, out), "mlp": mlp},
            note="attention: the value path only (q and k act through the softmax)",
        )
    top = len(indices) + offset
    outputs = width
    heads = [(_PROJECTION[tower], "projection")]
    if tower == "vision":
        heads.append((_CLASSIFIER, "head"))
    for name, role in heads:
        if found.outer + name in checkpoint.tensors:
            head = Layer(found.outer + name, f"{tower}.{role}", top, group="top", stack=tower)
            stack.add(head, stack.stream)
            outputs = build.outputs(head.name)
    return [inputs, width, *[width] * len(indices), outputs]
