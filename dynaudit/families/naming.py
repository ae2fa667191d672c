"""Tensor-name conventions shared by family plugins: what is a bias, a norm, an embedding."""

from __future__ import annotations

import re

from dynaudit.tensors import TensorInfo

__all__ = ["DEPTHWISE", "looks_depthwise", "role", "skip_reason"]

_EMBEDDING = re.compile(r"(^|[._])(embed\w*|embeddings?|wte|wpe|tok_embeddings|shared)([._]|$)")
_NORM = re.compile(
    r"(^|[._])(\w*norm\w*|ln\w*|bn\d*|layernorm\w*|normalization)([._]|$)", re.IGNORECASE
)
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
    """Why a tensor cannot be a layer (bias, norm, embedding, an FP8 weight's scale, ...), or
    None when it can."""
    if info.role is not None:
        return info.role
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
