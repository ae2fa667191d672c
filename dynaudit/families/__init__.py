"""Model-family plugins: which tensors are layers, how they map to matrices, how they connect."""

from dynaudit.families.base import (
    IDENTITY,
    Detection,
    Evidence,
    Family,
    Feed,
    IndexMap,
    Layer,
    LayerPlan,
    ResidualBlock,
    Skip,
    available_families,
    detect_family,
    get_family,
    matrix_shape,
)

__all__ = [
    "IDENTITY",
    "Detection",
    "Evidence",
    "Family",
    "Feed",
    "IndexMap",
    "Layer",
    "LayerPlan",
    "ResidualBlock",
    "Skip",
    "available_families",
    "detect_family",
    "get_family",
    "matrix_shape",
]
