"""Renderings of a :class:`~dynaudit.schema.CheckReport`: Markdown (what a reviewer reads
before a release) and the rich terminal table. Strings from checkpoints and baselines are
escaped in both (:mod:`dynaudit.reports.escape`)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from dynaudit.reports.escape import escape_markdown, markdown_code, plain, print_plain
from dynaudit.reports.markdown import fmt
from dynaudit.schema import (
    Change,
    CheckReport,
    Comparison,
    GroupComparison,
    LayerComparison,
    scope_label,
)

__all__ = ["refit_summary", "render_check_markdown", "render_check_terminal"]


def _change(change: Change | None) -> str:
    if change is None:
        return "—"
    if change.seeds == 1:  # no spread to show: one seed (sequential seeds, or K = 1)
        return f"{change.mean * 100:+.2f}% (1 seed)"
    return f"{change.mean * 100:+.2f}% ± {change.std * 100:.2f}%"


def _layer_change(layer: LayerComparison) -> str:
    return "0 (unchanged)" if layer.unchanged else _change(layer.change)


def refit_summary(comparison: Comparison) -> str | None:
    """What the check refitted, as one line: unchanged layers, warm refits run and what all
    seeds of every layer would have cost (None for a comparison made before these counts)."""
    if comparison.refits is None or comparison.refits_full is None:
        return None
    unchanged = len(comparison.unchanged or [])
    rule = {"sequential": "sequential seeds", "all": "all seeds"}.get(comparison.seed_rule or "")
    return (
        f"{unchanged} layer{'s' if unchanged != 1 else ''} unchanged (bit-equal to the "
        f"baseline's, not refitted); {comparison.refits} warm refit"
        f"{'s' if comparison.refits != 1 else ''} run of {comparison.refits_full} for every "
        f"seed of every layer" + (f" ({rule})" if rule else "")
    )


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.2f}%"


def _groups(report: CheckReport) -> list[tuple[str, GroupComparison]]:
    return [(scope_label(k, n), c) for k, n, c in report.comparison.scopes()]


def _setting(report: CheckReport, key: str) -> str:
    """A fit setting, escaped: settings come back from a baseline file too."""
    return escape_markdown(str(report.settings.get(key, "—")))


def render_check_markdown(report: CheckReport) -> str:
    esc = escape_markdown
    verdict = report.verdict
    mark = "✅ pass" if verdict.passed else "❌ fail"
    base = report.baseline
    lines = [
        f"# dynaudit check: {esc(report.source.uri)} — {mark}",
        "",
        f"- baseline: {markdown_code(base.ref)} ({esc(base.resolved_from)}; made from "
        f"{esc(base.source.uri)} at {esc(base.created_at)}, {base.seeds} seeds, "
        f"{'stored' if base.stored else 'measured from the checkpoint'})",
        f"- family: **{esc(report.family.name)}** ({esc(report.family.detected_by)})",
        *([f"- weights: {esc(report.source.selection)}"] if report.source.selection else []),
        f"- protocol v{report.protocol_version}; q_dim {_setting(report, 'q_dim')}, "
        f"H {_setting(report, 'pieces')}, {_setting(report, 'steps')} cold / "
        f"{_setting(report, 'warm_steps')} warm steps; {report.seconds:.1f} s",
        *([f"- refits: {refits}"] if (refits := refit_summary(report.comparison)) else []),
        "",
        "## Verdict",
        "",
        *[f"- {esc(reason)}" for reason in verdict.reasons],
        "",
        "Change = relative change of the mean distance against the baseline's null refits, "
        "mean ± std over its seeds; noise = max(std, null drift), what a drop must exceed "
        f"{report.policy.noise_multiple:g}× (floor {report.policy.noise_floor:g}%).",
        "",
        "## Groups",
        "",
        "| group | layers | change | noise | max displacement |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, group in _groups(report):
        lines.append(
            f"| {esc(label)} | {group.layers} | {_change(group.change)} | {_pct(group.noise)} "
            f"| {fmt(group.displacement, 3)} |"
        )
    lines += [
        "",
        "## Layers",
        "",
        "| layer | type | third | baseline mean dist | mean dist | change | displacement "
        "| weights moved |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    failing = set(verdict.failing_layers)
    for layer in report.comparison.layers:
        name = f"**{esc(layer.name)}**" if layer.name in failing else esc(layer.name)
        change = esc(layer.reason) if layer.reason else _layer_change(layer)
        lines.append(
            f"| {name} | {esc(layer.type)} | {layer.group} | "
            f"{fmt(layer.baseline_mean_distance)} | {fmt(layer.mean_distance)} | {change} | "
            f"{fmt(layer.displacement, 3)} | {_pct(layer.weight_change)} |"
        )
    return "\n".join(lines) + "\n"


def _layer_table(report: CheckReport) -> Table:
    """Every compared layer; the flagged ones in red."""
    table = Table()
    columns = ("layer", "type", "third", "base md", "md", "change", "displacement", "weights")
    for column in columns:
        left = column in ("layer", "type", "third")
        table.add_column(column, justify="left" if left else "right", overflow="fold")
    failing = set(report.verdict.failing_layers)
    for layer in report.comparison.layers:
        style = "red" if layer.name in failing else ""
        names = [plain(layer.name, style=style), plain(layer.type), plain(layer.group)]
        change = plain(layer.reason or _layer_change(layer), style=style)
        distances = [fmt(layer.baseline_mean_distance), fmt(layer.mean_distance)]
        moves = [fmt(layer.displacement, 3), _pct(layer.weight_change)]
        table.add_row(*names, *distances, change, *moves)
    return table


def _group_table(report: CheckReport) -> Table:
    groups = Table(title="groups (mean of the layers' relative changes)")
    for column in ("group", "layers", "change", "noise", "max displacement"):
        groups.add_column(column, justify="left" if column == "group" else "right")
    for label, group in _groups(report):
        figures = [_change(group.change), _pct(group.noise), fmt(group.displacement, 3)]
        groups.add_row(plain(label), str(group.layers), *figures)
    return groups


def render_check_terminal(report: CheckReport, console: Console) -> None:
    print_plain(console, f"dynaudit check · {report.source.uri} vs {report.baseline.ref}")
    if report.source.selection:
        print_plain(console, f"weights: {report.source.selection}", style="yellow")
    console.print(_layer_table(report))
    print_plain(console, f"baseline from {report.baseline.resolved_from}", style="dim")
    console.print(_group_table(report))
    refits = refit_summary(report.comparison)
    if refits is not None:
        print_plain(console, f"refits: {refits}", style="dim")
    style = "bold green" if report.verdict.passed else "bold red"
    console.print(Text(f"verdict: {report.verdict.verdict}", style=style))
    for reason in report.verdict.reasons:
        print_plain(console, f"  {reason}")
