"""The generic family: every 2-D (Linear) and 4-D (Conv2d) weight, in natural name order.

It knows nothing about the architecture, so depth is simply the position in that order (a
heuristic the report states) and the type is the role the tensor's name gives it.
"""

from __future__ import annotations

from dynaudit.families import Family, Layer, LayerPlan
from dynaudit.families.build import PlanBuilder, chain_index
from dynaudit.families.naming import DEPTHWISE, looks_depthwise, role, skip_reason
from dynaudit.tensors import Checkpoint

__all__ = ["GenericFamily", "role"]


class GenericFamily(Family):
    name = "generic"
    description = "any checkpoint: every Linear and Conv2d weight, depth = position by name"

    def detect(self, checkpoint: Checkpoint) -> float:
        return 0.01

    def plan(self, checkpoint: Checkpoint) -> LayerPlan:
        build = PlanBuilder(checkpoint, "generic")
        conv_channels: set[int] = set()
        previous: Layer | None = None
        for name in checkpoint.names():
            info = checkpoint.tensors[name]
            reason = skip_reason(info)
            if reason is None and len(info.shape) == 4:
                if looks_depthwise(info.shape, conv_channels):
                    reason = DEPTHWISE
                conv_channels.add(info.shape[0])
            if reason is not None:
                build.skip(name, reason)
                continue
            depth = len(build.plan.layers)
            if len(info.shape) == 4:
                layer = Layer(name, "conv", depth, "conv")
            else:
                layer = Layer(name, role(name, "linear"), depth, "linear")
            # The graph is a guess: a layer reads the previous one when their widths fit.
            index = None
            if previous is not None:
                index = chain_index(build.outputs(previous.name), layer, build.shape(layer))
            if previous is None or index is None:
                build.add(layer)
                build.reads_input(name)
            else:
                build.add(layer, [previous.name], index)
            previous = layer
        build.note("generic family: the layer graph chains layers whose widths fit (a guess)")
        return build.build(
            depth_note="generic family: depth is the layer's position in natural name order"
        )
