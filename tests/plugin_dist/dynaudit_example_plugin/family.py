"""Keras-style dense stacks: ``dense_<N>/kernel`` stored (in, out) and ``dense_<N>/bias``."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from dynaudit.families import Family, Layer, LayerPlan, Skip

if TYPE_CHECKING:
    from dynaudit.tensors import Checkpoint

__all__ = ["DenseKernelsFamily", "NotAFamily"]

_KERNEL = re.compile(r"dense_(\d+)[/.]kernel")
_BIAS = re.compile(r"dense_(\d+)[/.]bias")


class DenseKernelsFamily(Family):
    name = "dense-kernels"
    description = "Keras-style dense_<N>/kernel (in, out) weights, depth = N"

    def detect(self, checkpoint: Checkpoint) -> float:
        matrices = [
            name
            for name, info in checkpoint.tensors.items()
            if info.is_float and len(info.shape) == 2
        ]
        if matrices and all(_KERNEL.fullmatch(name) for name in matrices):
            return 0.9
        return 0.0

    def plan(self, checkpoint: Checkpoint) -> LayerPlan:
        kernels: list[tuple[int, str]] = []
        skipped: list[Skip] = []
        for name, info in checkpoint.tensors.items():
            match = _KERNEL.fullmatch(name)
            if match and info.is_float and len(info.shape) == 2:
                kernels.append((int(match.group(1)), name))
            elif _BIAS.fullmatch(name):
                skipped.append(Skip(name, "bias"))
            else:
                skipped.append(Skip(name, "not a dense_<N>/kernel matrix"))
        kernels.sort()
        layers = [
            Layer(name, "dense", depth, kind="linear", transposed=True)
            for depth, (_, name) in enumerate(kernels)
        ]
        return LayerPlan(
            layers,
            sorted(skipped, key=lambda skip: skip.name),
            depth_note="dense-kernels family: depth is the order of N in dense_<N>",
            # Kernels need not chain (a model may branch); each is said to read the input.
            reads_input={layer.name for layer in layers},
        )


class NotAFamily:
    """Deliberately not a :class:`Family` subclass: the ``wrong-base`` entry point."""

    name = "wrong-base"
