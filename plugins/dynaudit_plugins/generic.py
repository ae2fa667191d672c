"""The generic family: every 2-D (Linear) and 4-D (Conv2d) weight, in natural name order.

It knows nothing about the architecture, so depth is simply the position in that order (a
heuristic the report states) and the type is the role the tensor's name gives it.
"""

from __future__ import annotations

import re

from dynaudit.families import Family, Layer, LayerPlan, Skip
from dynaudit.tensors import Checkpoint, TensorInfo

_EMBEDDING = re.compile(r"(^|[._])(embed\w*|embeddings?|wte|wpe|tok_embeddings|shared)([._]|$)")
_NORM = re.compile(r"(^|[._])(\w*norm\w*|ln\w*|bn\d*|layernorm\w*)([._]|$)", re.IGNORECASE)
_WEIGHT_SUFFIX = re.compile(r"\.weight$")
DEPTHWISE = "depthwise convolution (1 × kh·kw matrices carry no pairwise structure)"


def role(name: str, kind: str) -> str:
    """The layer type from the tensor name: ``...self_attn.q_proj.weight`` → ``q_proj``;
    unnamed (``0.weight``) → the kind; every 4-D weight → ``conv``."""
    if kind == "conv":
        return "conv"
    parts = _WEIGHT_SUFFIX.sub("", name).split(".")
    last = parts[-1] if parts else ""
    return kind if not last or last.isdigit() else last


def skip_reason(info: TensorInfo) -> str | None:
    """Why a tensor is not a generic layer, or None when it is one."""
    if not info.is_float:
        return f"non-float dtype {info.dtype}"
    rank = len(info.shape)
    if rank <= 1:
        if info.name.endswith("bias"):
            return "bias"
        if _NORM.search(info.name):
            return "normalisation parameter"
        return f"{rank}-D tensor (not a weight matrix)"
    if rank not in (2, 4):
        return f"{rank}-D tensor (only Linear and Conv2d weights are audited)"
    if _NORM.search(info.name):
        return "normalisation parameter"
    if rank == 2 and _EMBEDDING.search(info.name):
        return "embedding table"
    if 0 in info.shape:
        return "empty tensor"
    if rank == 2 and min(info.shape) < 2:
        return f"degenerate matrix {list(info.shape)}"
    return None


def looks_depthwise(shape: tuple[int, ...], earlier_channels: set[int]) -> bool:
    """A (C, 1, kh, kw) kernel is depthwise when an earlier conv already produced C channels;
    without one it is a convolution over a single input channel (a grayscale stem)."""
    return shape[1] == 1 and shape[2] * shape[3] > 1 and shape[0] in earlier_channels


class GenericFamily(Family):
    name = "generic"
    description = "any checkpoint: every Linear and Conv2d weight, depth = position by name"

    def detect(self, checkpoint: Checkpoint) -> float:
        return 0.01

    def plan(self, checkpoint: Checkpoint) -> LayerPlan:
        layers: list[Layer] = []
        skipped: list[Skip] = []
        conv_channels: set[int] = set()
        for name in checkpoint.names():
            info = checkpoint.tensors[name]
            reason = skip_reason(info)
            if reason is None and len(info.shape) == 4:
                if looks_depthwise(info.shape, conv_channels):
                    reason = DEPTHWISE
                conv_channels.add(info.shape[0])
            if reason is not None:
                skipped.append(Skip(name, reason))
                continue
            if len(info.shape) == 4:
                layers.append(Layer(name, "conv", len(layers), "conv"))
            else:
                layers.append(Layer(name, role(name, "linear"), len(layers), "linear"))
        return LayerPlan(
            layers,
            skipped,
            depth_note="generic family: depth is the layer's position in natural name order",
        )
