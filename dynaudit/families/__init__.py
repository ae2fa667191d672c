"""Model-family plugins: which tensors are layers, and how they map to matrices."""

from dynaudit.families.base import (
    Detection,
    Family,
    Layer,
    LayerPlan,
    Skip,
    available_families,
    detect_family,
    get_family,
)

__all__ = [
    "Detection",
    "Family",
    "Layer",
    "LayerPlan",
    "Skip",
    "available_families",
    "detect_family",
    "get_family",
]
