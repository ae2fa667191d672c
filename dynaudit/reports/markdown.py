"""Markdown report: what a reviewer reads. Every string from a checkpoint is escaped
(:mod:`dynaudit.reports.escape`)."""

from __future__ import annotations

from dynaudit.reports.escape import escape_markdown, markdown_code
from dynaudit.schema import Aggregate, ExpertAggregate, FigureRange, Report

__all__ = ["EXPERT_ROWS", "escape_markdown", "expert_spread", "render_markdown"]

EXPERT_ROWS = 32  # experts listed one by one in a table shown in full; beyond, folded or --json


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "—"
    return (
        f"{value:.{digits}g}" if abs(value) >= 1e4 or abs(value) < 1e-3 else f"{value:.{digits}f}"
    )


def _aggregate_row(label: str, agg: Aggregate) -> str:
    return (
        f"| {label} | {agg.layers} | {fmt(agg.mean_distance)} | {fmt(agg.discrepancy, 2)} "
        f"| {fmt(agg.fidelity, 3)} |"
    )


def summary_rows(report: Report) -> list[tuple[str, Aggregate]]:
    """The summary's scopes as a measure report labels them: ``all``, each depth third by its
    name, ``type T``."""
    scopes = report.summary.scopes()
    return [(f"type {name}" if kind == "type" else name, agg) for kind, name, agg in scopes]


def expert_spread(report: Report) -> str | None:
    """One line on how the experts of a mixture of experts differ, or None without experts:
    how many were measured and the range of their mean distances, naming the extremes."""
    spread = report.summary.expert_spread
    if spread is None:
        return None
    line = f"experts: {spread.experts} measured (means over each expert's layers)"
    if spread.mean_distance is not None:
        line += f"; mean distance {_range(spread.mean_distance)}"
    if spread.fidelity is not None:
        line += f"; fidelity {fmt(spread.fidelity.min, 3)} to {fmt(spread.fidelity.max, 3)}"
    return line


def _range(figure: FigureRange) -> str:
    low, high = figure.lowest, figure.highest
    return (
        f"{fmt(figure.min)} (expert {low[1]}, depth {low[0]}) to {fmt(figure.max)} "
        f"(expert {high[1]}, depth {high[0]}), mean {fmt(figure.mean)} ± {fmt(figure.std)}"
    )


def expert_cells(expert: ExpertAggregate) -> list[str]:
    """An expert's row: depth, index, layers, mean distance, 𝒟, fidelity."""
    return [
        str(expert.depth),
        str(expert.expert),
        str(expert.layers),
        fmt(expert.mean_distance),
        fmt(expert.discrepancy, 2),
        fmt(expert.fidelity, 3),
    ]


def _experts(report: Report) -> list[str]:
    line = expert_spread(report)
    if line is None or report.summary.experts is None:
        return []
    rows = [f"| {' | '.join(expert_cells(x))} |" for x in report.summary.experts]
    table = [
        "| depth | expert | layers | mean distance | 𝒟 | fidelity |",
        "|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    if len(rows) > EXPERT_ROWS:
        table = ["<details><summary>Every expert</summary>", "", *table, "", "</details>"]
    return ["", "## Experts", "", line, "", *table]


def cache_note(report: Report) -> str:
    assert report.cache is not None
    return (
        f"result cache hit: numbers measured {report.cache.measured_at} from files with the same "
        f"sha256 and settings (key {report.cache.key[:12]}; --no-cache to fit again)"
    )


def render_markdown(report: Report) -> str:
    esc = escape_markdown
    settings = report.settings
    lines = [
        f"# dynaudit report: {esc(report.source.uri)}",
        "",
        f"- family: **{esc(report.family.name)}** "
        f"({esc(report.family.detected_by)}); {esc(report.family.depth_note)}",
        f"- protocol v{report.protocol_version}; q_dim {settings['q_dim']}, "
        f"H {settings['pieces']}, "
        f"μ {settings['mu']}, {settings['steps']} steps, seed {settings['seed']}, "
        f"{settings['seeds']} seed(s); {settings['device']}, {settings['threads']} thread(s)",
        f"- {len(report.measured)} layers measured, {len(report.skipped)} tensors skipped, "
        f"{report.seconds:.1f} s",
    ]
    if report.source.revision:
        lines.append(f"- revision {markdown_code(report.source.revision)}")
    if report.source.selection:
        lines.append(f"- weights: {esc(report.source.selection)}")
    if report.cache is not None and report.cache.hit:
        lines.append(f"- {esc(cache_note(report))}")
    lines += [f"- {esc(note)}" for note in report.family.notes]
    if report.non_finite:
        names = ", ".join(markdown_code(n) for n in report.non_finite)
        lines.append(f"- **non-finite weights (NaN/Inf):** {names}")
    lines += [
        "",
        "Mean distance = 𝒟 / (N − 1), in units of the reference scale s: the figure to compare "
        "across layers and models. Fidelity = 1 − ‖sŴ − W‖/‖W‖.",
        "",
        "## Summary",
        "",
        "| group | layers | mean distance | 𝒟 | fidelity |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [_aggregate_row(escape_markdown(label), a) for label, a in summary_rows(report)]
    lines += _type_by_depth(report)
    lines += _experts(report)
    lines += [
        "",
        "## Layers",
        "",
        "| layer | type | depth | shape | mean distance | ± seeds | 𝒟 | fidelity | scale |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for layer in report.measured:
        spread = f"{layer.spread.relative:.2%}" if layer.spread else "—"
        note = f" ({escape_markdown(layer.reason)})" if layer.reason else ""
        lines.append(
            f"| {esc(layer.name)}{note} | {esc(layer.type)} | {layer.depth} "
            f"| {layer.shape_text} | {fmt(layer.mean_distance)} | {spread} "
            f"| {fmt(layer.discrepancy, 2)} | {fmt(layer.fidelity, 3)} | {fmt(layer.scale)} |"
        )
    if report.skipped:
        lines += ["", "<details><summary>Skipped tensors</summary>", ""]
        lines += [
            f"- {escape_markdown(s.name)}: {escape_markdown(s.skipped)}" for s in report.skipped
        ]
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def type_by_depth(report: Report) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Mean distance per layer type and depth third, the shape of the paper's Tables 2–3:
    the column names (the depth groups present, then "all") and one formatted row per type."""
    groups = list(report.summary.groups)
    rows = [
        (
            type_,
            [fmt(cells[g].mean_distance) if g in cells else "" for g in groups]
            + [fmt(report.summary.types[type_].mean_distance)],
        )
        for type_, cells in report.summary.table.items()
    ]
    return [*groups, "all"], rows


def _type_by_depth(report: Report) -> list[str]:
    columns, rows = type_by_depth(report)
    if not rows:
        return []
    lines = [
        "",
        "## Mean distance by type and depth",
        "",
        "| type | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    lines += [f"| {escape_markdown(t)} | " + " | ".join(values) + " |" for t, values in rows]
    return lines
