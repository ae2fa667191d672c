"""The rich rendering of ``dynaudit inspect``: the layer table, the structure and the notes.

Tensor names, layer types, dtypes, notes and the URI come from the checkpoint: every one is
escaped for the terminal (:mod:`dynaudit.reports.escape`), so a name holding
``"\\x1b[2K\\x1b[1Gverdict: PASS"`` shows as that text instead of erasing the line."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from dynaudit.reports.escape import plain, print_plain

if TYPE_CHECKING:
    from dynaudit.schema import InspectedLayer, Inspection

__all__ = ["render_inspection"]


def render_inspection(found: Inspection, console: Console) -> None:
    """Print an :class:`~dynaudit.Inspection`; the rank columns when weights were read."""
    weights = any(layer.rank is not None for layer in found.layers) or (
        found.structure.degenerate is not None
    )
    print_plain(console, f"{found.uri} · family {found.family.name} ({found.family.detected_by})")
    if found.selection:
        print_plain(console, f"weights: {found.selection}", style="yellow")
    table = Table()
    columns = ["layer", "type", "depth", "shape", "dtype", "neurons", "fit GFLOP", "inputs"]
    if weights:
        columns += ["rank", "‖W‖₂"]
    for column in columns:
        left = column in ("layer", "type", "inputs")
        table.add_column(column, justify="left" if left else "right", overflow="fold")
    through = {node.name: node.type for node in found.pass_through}
    for layer in found.layers:
        table.add_row(*_row(layer, through), *(_rank(layer) if weights else []))
    console.print(table)
    console.print(
        f"{found.tensors} tensors in {len(found.files)} file(s), {found.parameters:,} parameters, "
        f"{found.bytes / 2**20:.1f} MiB; {len(found.layers)} layers to fit "
        f"({found.gflop:.1f} GFLOP), {len(found.skipped)} skipped"
    )
    experts = _experts(found)
    if experts:
        print_plain(console, experts)
    if through:
        kinds = ", ".join(f"{n} {kind}" for kind, n in Counter(through.values()).items())
        print_plain(
            console,
            f"kept in the graph but not fitted: {kinds} (pass-through nodes: each reads the "
            "layer before it and feeds the one after it; --json lists them)",
            style="dim",
        )
    structure = found.structure
    branches = ", ".join(f"{n} {kind}" for kind, n in structure.branches.items())
    print_plain(
        console,
        f"structure: {structure.structural_class} ({structure.reason}); widths "
        f"{' → '.join(map(str, structure.widths))}"
        + (f"; residual branches: {branches}" if branches else ""),
    )
    if structure.degenerate is not None:
        print_plain(
            console,
            f"degenerate (rank-deficient) layers: {', '.join(structure.degenerate) or 'none'}"
            f" — {structure.rank_rule}",
        )
    if structure.unranked:
        print_plain(
            console,
            f"rank not computed for {len(structure.unranked)} layer(s) above the size limit "
            "(the spectral norm is estimated; --json lists them)",
            style="dim",
        )
    for gain in found.gains:
        print_plain(console, f"  {gain.block} {gain.branch}: gain indicator {gain.gain:.3g}")
    if found.gains:
        print_plain(console, f"  ({found.gains[0].note})", style="dim")
    for note in found.family.notes:
        print_plain(console, note, style="dim")
    reasons = Counter(skip.skipped for skip in found.skipped)
    if reasons:
        counts = "; ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        print_plain(console, f"skipped: {counts} (--json lists them)", style="dim")


def _experts(found: Inspection) -> str | None:
    """A mixture of experts: experts per block, and their share of the layers and the cost
    (every expert is fitted, whichever the router would choose)."""
    layers = [layer for layer in found.layers if layer.expert is not None]
    if not layers:
        return None
    per_block = Counter(layer.depth for layer in {(x.depth, x.expert): x for x in layers}.values())
    counts = sorted(set(per_block.values()))
    each = "/".join(map(str, counts))
    gflop = sum(layer.gflop for layer in layers)
    return (
        f"experts: {each} per block in {len(per_block)} blocks, {sum(per_block.values())} in "
        f"all; their {len(layers)} layers cost {gflop:.1f} of the {found.gflop:.1f} GFLOP"
    )


def _row(layer: InspectedLayer, through: dict[str, str]) -> list[Text]:
    """A layer's header columns: what it is, its shape and what feeds it (layers, and
    pass-through nodes by type: ``1 depthwise``)."""
    feeds = ["input"] if layer.reads_input else []
    layers = [name for name in layer.inputs if name not in through]
    feeds += [f"{len(layers)} layer{'s' * (len(layers) != 1)}"] * bool(layers)
    nodes = Counter(through[name] for name in layer.inputs if name in through)
    feeds += [f"{n} {kind}" for kind, n in nodes.items()]
    shape = Text("×".join(map(str, layer.shape)))
    row = [plain(layer.name), plain(layer.type), Text(str(layer.depth)), shape]
    row += [plain(layer.dtype), Text(str(layer.neurons)), Text(f"{layer.gflop:.1f}")]
    return [*row, plain(", ".join(feeds))]  # node types come from the plugin


def _rank(layer: InspectedLayer) -> list[Text]:
    """A layer's rank (red when deficient) and spectral norm, once its weights were read."""
    deficient = layer.rank is not None and layer.rank < (layer.full_rank or 0)
    rank = "—" if layer.rank is None else f"{layer.rank}/{layer.full_rank}"
    norm = f"{layer.spectral_norm:.3g}" if layer.spectral_norm is not None else "—"
    return [Text(rank, style="red" if deficient else ""), Text(norm)]
