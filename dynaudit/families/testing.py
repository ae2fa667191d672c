"""The family plugin contract as one call, for plugin authors' own tests.

``check_family(family, checkpoint)`` opens a checkpoint the family is meant for and checks
everything dynaudit relies on, in the manner of scikit-learn's ``check_estimator``::

    from dynaudit.families.testing import check_family

    def test_my_family_honours_the_contract(tmp_path):
        path = save_a_small_model_of_mine(tmp_path)   # written by the real producer
        check_family("my-family", path)

It raises :class:`ConformanceError` (an ``AssertionError``, so test runners show it as a
failed check) naming the first broken rule; our own families and the example plugin in
``tests/plugin_dist`` are tested with it. What is checked (docs/families.md):

1. the family is a :class:`~dynaudit.families.Family` with a name and a description, and
   (``detects=True``) detection picks it for this checkpoint;
2. the plan accounts for every tensor: each is a layer's source or skipped with a reason,
   never both; layer names are unique;
3. each layer's matrices have the shape :func:`~dynaudit.families.matrix_shape` predicts;
4. the layer graph: every feed goes to the same or a deeper layer, never to itself; its index
   maps the fed layer's inputs onto all of the feeding layer's outputs; every layer is fed or
   reads the model's input; no cycle; residual blocks name planned layers;
5. pass-through nodes (tensors skipped but kept in the graph, e.g. depthwise convolutions) are
   skipped with a reason and not audited, are fed like layers, and forward their channels:
   output channel c reads input channel c of every layer that feeds it, and nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from dynaudit.families.base import (
    Family,
    LayerPlan,
    detect_family,
    get_family,
    matrix_shape,
    read_matrices,
)
from dynaudit.tensors import Checkpoint

__all__ = ["ConformanceError", "check_family"]


class ConformanceError(AssertionError):
    """A family broke a rule of the plugin contract; the message says which and where."""


def check_family(
    family: Family | str, checkpoint: str | os.PathLike[str], *, detects: bool = True
) -> LayerPlan:
    """Check ``family`` (an instance, or the name it is registered under) against the plugin
    contract on ``checkpoint``, a checkpoint of the architecture it claims. ``detects=False``
    when the family is only ever chosen with ``--family``. Returns the plan it made."""
    chosen = get_family(family) if isinstance(family, str) else family
    _require(isinstance(chosen, Family), f"{chosen!r} is not a dynaudit Family")
    _require(bool(chosen.name and chosen.description), f"{chosen!r}: no name or description")
    with Checkpoint.open(checkpoint) as opened:
        if detects:
            found = detect_family(opened).family.name
            _require(found == chosen.name, f"{checkpoint}: detected as {found!r}, not its own")
        plan = chosen.plan(opened)
        _check_tensors(plan, opened)
        shapes = _check_matrices(chosen, plan, opened)
    _check_graph(plan, shapes)
    return plan


def _require(holds: bool, message: str) -> None:
    if not holds:
        raise ConformanceError(message)


def _check_tensors(plan: LayerPlan, checkpoint: Checkpoint) -> None:
    names = [layer.name for layer in (*plan.layers, *plan.pass_through)]
    twice = sorted({n for n in names if names.count(n) > 1})
    _require(not twice, f"layer names used twice: {twice}")
    used = {layer.source for layer in plan.layers}
    skipped = {s.name for s in plan.skipped}
    _require(not used & skipped, f"tensors both used and skipped: {sorted(used & skipped)}")
    kept = sorted(node.source for node in plan.pass_through if node.source not in skipped)
    _require(not kept, f"pass-through nodes whose tensor is not skipped: {kept}")
    missing = sorted(set(checkpoint.tensors) - used - skipped)
    _require(not missing, f"tensors neither used nor skipped: {missing}")
    unknown = sorted((used | skipped) - set(checkpoint.tensors))
    _require(not unknown, f"the plan names tensors the checkpoint lacks: {unknown}")
    silent = sorted(s.name for s in plan.skipped if not s.reason)
    _require(not silent, f"tensors skipped without a reason: {silent}")


def _check_matrices(
    family: Family, plan: LayerPlan, checkpoint: Checkpoint
) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in (*plan.layers, *plan.pass_through):
        expected = matrix_shape(layer, checkpoint.tensors[layer.source].shape)
        got = tuple(read_matrices(family, layer, checkpoint).shape)
        _require(got == expected, f"{layer.name}: matrices of shape {got}, planned {expected}")
        shapes[layer.name] = expected
    return shapes


def _check_graph(plan: LayerPlan, shapes: dict[str, tuple[int, ...]]) -> None:
    depth = {layer.name: layer.depth for layer in (*plan.layers, *plan.pass_through)}
    nodes = {node.name for node in plan.pass_through}
    for feed in plan.feeds:
        where = f"feed {feed.src} → {feed.dst}"
        _require(feed.src in depth and feed.dst in depth, f"{where}: not a planned layer")
        _require(feed.src != feed.dst, f"{where}: a layer feeds itself")
        _require(depth[feed.src] <= depth[feed.dst], f"{where}: goes to a shallower layer")
        g, _, n = shapes[feed.dst]
        src_g, src_m, _ = shapes[feed.src]
        index = feed.index.indices(g, n)
        _require(tuple(index.shape) == (g, n), f"{where}: index of shape {tuple(index.shape)}")
        reached = set(index.flatten().tolist())
        _require(
            reached == set(range(src_g * src_m)),
            f"{where}: the index does not map onto all {src_g * src_m} outputs of {feed.src}",
        )
        if feed.dst in nodes:
            _, m, _ = shapes[feed.dst]
            forwards = m == 1 and all(set(row) == {g} for g, row in enumerate(index.tolist()))
            _require(forwards, f"{where}: a pass-through node must read channel c into channel c")
    for name, sources in plan.fed_by().items():
        _require(bool(sources) or name in plan.reads_input, f"{name}: fed by no layer or input")
    _require(_acyclic(depth, ((f.src, f.dst) for f in plan.feeds)), "the layer graph has a cycle")
    for block in plan.blocks:
        for branch in block.branches.values():
            strays = [x for x in branch if x not in shapes]
            _require(not strays, f"residual block names layers not in the plan: {strays}")


def _acyclic(nodes: Iterable[str], edges: Iterable[tuple[str, str]]) -> bool:
    """Kahn's algorithm: every node can be taken once all its predecessors were."""
    pending = {n: 0 for n in nodes}
    out: dict[str, list[str]] = {n: [] for n in pending}
    for src, dst in edges:
        pending[dst] += 1
        out[src].append(dst)
    ready = [n for n, k in pending.items() if k == 0]
    taken = 0
    while ready:
        taken += 1
        for dst in out[ready.pop()]:
            pending[dst] -= 1
            if pending[dst] == 0:
                ready.append(dst)
    return taken == len(pending)
