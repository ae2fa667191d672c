"""What the CLI prints on the terminal about a measure report (the rich tables) and a stored
baseline (one line)."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from dynaudit.errors import printable
from dynaudit.reports.escape import plain, print_plain
from dynaudit.reports.markdown import (
    EXPERT_ROWS,
    cache_note,
    expert_cells,
    expert_spread,
    fmt,
    summary_rows,
    type_by_depth,
)
from dynaudit.schema import Baseline, Report

__all__ = ["StoredBaseline", "plain", "render_terminal"]

_LEFT = ("layer", "type", "shape")  # the other columns are numbers
_LAYER_COLUMNS = ("layer", "type", "depth", "shape", "mean dist", "± seeds", "𝒟", "fidelity")


def render_terminal(report: Report, console: Console) -> None:
    """The per-layer table, the summaries and the notes. Every string from the checkpoint
    goes through :func:`~dynaudit.reports.escape.plain`; the title and the depth note, which
    hold them, are lines of their own rather than a table title rich would wrap."""
    revision = f" (revision {report.source.revision[:12]})" if report.source.revision else ""
    print_plain(console, f"dynaudit · {report.source.uri}{revision} · family {report.family.name}")
    if report.source.selection:
        print_plain(console, f"weights: {report.source.selection}", style="yellow")
    console.print(_layer_table(report))
    if report.family.depth_note:
        print_plain(console, report.family.depth_note, style="dim")
    console.print(_summary_table(report))
    columns, by_type = type_by_depth(report)
    if by_type:
        by_depth = Table(title="mean distance by type and depth")
        for column in ("type", *columns):
            by_depth.add_column(column, justify="left" if column == "type" else "right")
        for type_, values in by_type:
            by_depth.add_row(plain(type_), *values)
        console.print(by_depth)
    _experts(report, console)
    for note in report.family.notes:
        print_plain(console, note, style="dim")
    console.print(
        f"{len(report.measured)} layers measured, {len(report.skipped)} tensors skipped "
        f"({report.seconds:.1f} s, protocol v{report.protocol_version})"
    )
    if report.cache is not None and report.cache.hit:
        print_plain(console, cache_note(report), style="dim")
    if report.non_finite:
        print_plain(console, f"non-finite weights: {', '.join(report.non_finite)}", style="red")


def _layer_table(report: Report) -> Table:
    table = Table(show_lines=False)
    for column in _LAYER_COLUMNS:
        # Layer names are the reader's key into the checkpoint: wrap them, never elide them.
        table.add_column(column, justify="left" if column in _LEFT else "right", overflow="fold")
    for layer in report.measured:
        spread = f"{layer.spread.relative:.2%}" if layer.spread else "—"
        name = plain(layer.name)
        if layer.reason:
            name.append_text(plain(f"  ({layer.reason})", style="yellow"))
        figures = [fmt(layer.mean_distance), spread, fmt(layer.discrepancy, 2)]
        figures.append(fmt(layer.fidelity, 3))
        table.add_row(name, plain(layer.type), str(layer.depth), layer.shape_text, *figures)
    return table


def _experts(report: Report, console: Console) -> None:
    """A mixture of experts: the spread across experts, and each expert when they are few."""
    line = expert_spread(report)
    experts = report.summary.experts
    if line is None or experts is None:
        return
    if len(experts) <= EXPERT_ROWS:
        table = Table(title="per expert (means over its layers)")
        for column in ("depth", "expert", "layers", "mean dist", "𝒟", "fidelity"):
            table.add_column(column, justify="right")
        for expert in experts:
            table.add_row(*expert_cells(expert))
        console.print(table)
    else:
        line += " (--json or --markdown lists every expert)"
    print_plain(console, line)


def _summary_table(report: Report) -> Table:
    summary = Table(title="summary (means over layers)")
    for column in ("group", "layers", "mean dist", "𝒟", "fidelity", "median fidelity"):
        summary.add_column(column, justify="left" if column == "group" else "right")
    for label, agg in summary_rows(report):
        figures = [fmt(agg.mean_distance), fmt(agg.discrepancy, 2), fmt(agg.fidelity, 3)]
        summary.add_row(plain(label), str(agg.layers), *figures, fmt(agg.fidelity_median, 3))
    return summary


@dataclass(frozen=True)
class StoredBaseline:
    """The line ``dynaudit baseline`` prints: what was stored ``where``, escaped (the URI and
    the family come from the user and the checkpoint)."""

    where: str

    def render(self, made: Baseline) -> str:
        fitted = sum(1 for layer in made.layers if layer.coords)
        return (
            printable(
                f"baseline of {made.source.uri} stored in {self.where}: {fitted} layers × "
                f"{made.seeds} seeds, family {made.family.name}, protocol v{made.protocol_version}"
            )
            + "\n"
        )
