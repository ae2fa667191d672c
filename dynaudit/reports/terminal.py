"""The rich table printed by the CLI."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from dynaudit.reports.escape import plain, print_plain
from dynaudit.reports.markdown import cache_note, fmt, type_by_depth
from dynaudit.schema import Report

__all__ = ["plain", "render_terminal"]


def render_terminal(report: Report, console: Console) -> None:
    """The per-layer table, the summaries and the notes. Every string from the checkpoint
    goes through :func:`~dynaudit.reports.escape.plain`; the title and the depth note, which
    hold them, are lines of their own rather than a table title rich would wrap."""
    revision = f" (revision {report.source.revision[:12]})" if report.source.revision else ""
    print_plain(console, f"dynaudit · {report.source.uri}{revision} · family {report.family.name}")
    if report.source.selection:
        print_plain(console, f"weights: {report.source.selection}", style="yellow")
    table = Table(show_lines=False)
    for column, justify in [
        ("layer", "left"), ("type", "left"), ("depth", "right"), ("shape", "left"),
        ("mean dist", "right"), ("± seeds", "right"), ("𝒟", "right"), ("fidelity", "right"),
    ]:  # fmt: skip
        # Layer names are the reader's key into the checkpoint: wrap them, never elide them.
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for layer in report.measured:
        spread = f"{layer.spread.relative:.2%}" if layer.spread else "—"
        name = plain(layer.name)
        if layer.reason:
            name.append_text(plain(f"  ({layer.reason})", style="yellow"))
        table.add_row(
            name, plain(layer.type), str(layer.depth), layer.shape_text,
            fmt(layer.mean_distance), spread, fmt(layer.discrepancy, 2), fmt(layer.fidelity, 3),
        )  # fmt: skip
    console.print(table)
    if report.family.depth_note:
        print_plain(console, report.family.depth_note, style="dim")
    summary = Table(title="summary (means over layers)")
    for column in ("group", "layers", "mean dist", "𝒟", "fidelity", "median fidelity"):
        summary.add_column(column, justify="left" if column == "group" else "right")
    rows = [("all", report.summary.all), *report.summary.groups.items()]
    rows += [(f"type {t}", a) for t, a in report.summary.types.items()]
    for label, agg in rows:
        summary.add_row(
            plain(label), str(agg.layers), fmt(agg.mean_distance), fmt(agg.discrepancy, 2),
            fmt(agg.fidelity, 3), fmt(agg.fidelity_median, 3),
        )  # fmt: skip
    console.print(summary)
    columns, by_type = type_by_depth(report)
    if by_type:
        by_depth = Table(title="mean distance by type and depth")
        for column in ("type", *columns):
            by_depth.add_column(column, justify="left" if column == "type" else "right")
        for type_, values in by_type:
            by_depth.add_row(plain(type_), *values)
        console.print(by_depth)
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
