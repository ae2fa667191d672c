"""PNG plots (matplotlib, an optional extra: ``pip install dynaudit[plot]``).

- :func:`plot_bars` — per layer, the baseline's and the checked checkpoint's mean distance,
  with the spread over the baseline's seeds as error bars (from a check report).
- :func:`plot_trajectory` — the mean distance of all layers and of each depth third over a
  series of measure reports, e.g. checkpoints along training (the paper's Fig. 3).
- :func:`plot_neurons` — one layer's dynamical neurons from a baseline's stored coordinates,
  projected to 2-D by PCA (or t-SNE when scikit-learn is installed and asked for): output and
  input neurons in two colours (the paper's Fig. 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dynaudit.errors import UsageError
from dynaudit.schema import DEPTH_GROUPS, CheckReport, Report

__all__ = ["METHODS", "plot_bars", "plot_neurons", "plot_trajectory"]

METHODS = ("pca", "tsne")  # neuron-map projections


def check_method(method: str) -> str:
    """``method`` when it is a neuron-map projection (exit 2 listing them otherwise)."""
    if method not in METHODS:
        raise UsageError(f"--method {method!r}: not a projection; use one of {', '.join(METHODS)}")
    return method


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise UsageError(
            "plots need matplotlib: pip install 'dynaudit[plot]' (or matplotlib)"
        ) from exc
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_bars(report: CheckReport, out: Path) -> Path:
    plt = _pyplot()
    layers = [x for x in report.comparison.layers if x.mean_distance is not None]
    if not layers:
        raise UsageError("the check report has no measured layers to plot")
    base = [x.baseline_mean_distance or 0.0 for x in layers]
    new = [x.mean_distance or 0.0 for x in layers]
    spread = [(x.change.std if x.change else 0.0) * b for x, b in zip(layers, base, strict=True)]
    failing = set(report.verdict.failing_layers)
    width = 0.4
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(layers) + 2), 4.5))
    xs = range(len(layers))
    ax.bar([i - width / 2 for i in xs], base, width, label=f"baseline ({report.baseline.ref})",
           color="#8da0cb")  # fmt: skip
    colours = ["#e15759" if x.name in failing else "#59a14f" for x in layers]
    ax.bar([i + width / 2 for i in xs], new, width, yerr=spread, capsize=2, color=colours,
           label=f"{report.source.uri} (red: flagged)")  # fmt: skip
    ax.set_xticks(list(xs))
    ax.set_xticklabels([_short(x.name) for x in layers], rotation=90, fontsize=7)
    ax.set_ylabel("mean distance (units of s)")
    ax.set_title(f"dynaudit check: {report.verdict.verdict} — error bars: seed spread", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, plt, out)


def plot_trajectory(reports: Sequence[Report], labels: Sequence[str], out: Path) -> Path:
    plt = _pyplot()
    if len(reports) < 2:
        raise UsageError("a trajectory needs at least two measure reports")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = list(range(len(reports)))
    series = {"all layers": [r.summary.all.mean_distance for r in reports]}
    for group in DEPTH_GROUPS:
        series[f"{group} third"] = [
            r.summary.groups[group].mean_distance if group in r.summary.groups else None
            for r in reports
        ]
    for name, values in series.items():
        points = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=name,
                    linewidth=2.5 if name == "all layers" else 1.2)  # fmt: skip
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("mean distance (units of s)")
    ax.set_title("dynamical discrepancy over checkpoints", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, plt, out)


def plot_neurons(baseline_dir: Path, layer: str | None, out: Path, method: str = "pca") -> Path:
    """Neurons of ``layer`` (default: the first fitted one) from the baseline's first cold fit."""
    import torch

    from dynaudit.baseline_store import load_baseline, read_coords
    from dynaudit.dynamics.blocks import block_shape

    check_method(method)
    plt = _pyplot()
    stored = load_baseline(baseline_dir)
    fitted = [x for x in stored.layers if x.coords is not None]
    chosen = next((x for x in fitted if layer is None or x.name == layer), None)
    if chosen is None or chosen.coords is None:
        names = ", ".join(x.name for x in fitted[:5])
        raise UsageError(f"{baseline_dir}: no fitted layer {layer!r} (e.g. {names})")
    coords = read_coords(baseline_dir, stored, chosen)["cold.0"][0]  # (H, N, k)
    points = coords.permute(1, 0, 2).reshape(coords.shape[1], -1).double()  # (N, H·k)
    _, m, n = chosen.shape
    m, _ = block_shape(m, n, stored.fit_settings().max_entries)  # rows fitted
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError as exc:
            raise UsageError("t-SNE needs scikit-learn; use --method pca") from exc
        flat = TSNE(n_components=2, random_state=0, init="pca").fit_transform(points.numpy())
        xy = torch.as_tensor(flat)
    else:
        centred = points - points.mean(dim=0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        xy = centred @ v[:2].T
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(xy[:m, 0], xy[:m, 1], s=6, alpha=0.7, label=f"{m} output neurons", color="#e15759")
    ax.scatter(xy[m:, 0], xy[m:, 1], s=6, alpha=0.7, label=f"{xy.shape[0] - m} input neurons",
               color="#4e79a7")  # fmt: skip
    ax.set_title(f"{_short(chosen.name)} ({method.upper()}, seed 0)", fontsize=10)
    ax.legend(fontsize=8)
    ax.set_aspect("equal", adjustable="datalim")
    return _save(fig, plt, out)


def _short(name: str, limit: int = 40) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def _save(fig: Any, plt: Any, out: Path) -> Path:
    """Rendered in memory and written atomically (never half a PNG; ``-``: standard output)."""
    import io

    from dynaudit.reports.writers import write_bytes_atomic

    buffer = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buffer, dpi=120, format="png")
    finally:
        plt.close(fig)
    return write_bytes_atomic(out, buffer.getvalue())
