"""PNG plots (matplotlib, an optional extra: ``pip install dynaudit[plot]``), each a
:class:`~dynaudit.reports.render.Reporter` whose document is what it draws:

- :class:`Bars` — per layer, the baseline's and the checked checkpoint's mean distance,
  with the spread over the baseline's seeds as error bars (from a check report).
- :class:`Trajectory` — the mean distance of all layers and of each depth third over a
  series of measure reports, e.g. checkpoints along training (the paper's Fig. 3).
- :class:`NeuronMap` — one layer's dynamical neurons from a baseline's stored coordinates,
  projected to 2-D by PCA (or t-SNE when scikit-learn is installed and asked for): output and
  input neurons in two colours (the paper's Fig. 2).

:func:`plot_for` reads the ``dynaudit plot`` inputs and picks the plot they ask for.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynaudit.errors import InputError, UsageError
from dynaudit.schema import DEPTH_GROUPS, CheckReport, Report, read_report

if TYPE_CHECKING:
    from dynaudit.reports.render import Reporter

__all__ = ["METHODS", "Bars", "NeuronMap", "Trajectory", "check_method", "plot_for"]

METHODS = ("pca", "tsne")  # neuron-map projections


def check_method(method: str) -> str:
    """``method`` when it is a neuron-map projection (exit 2 listing them otherwise)."""
    if method not in METHODS:
        raise UsageError(f"--method {method!r}: not a projection; use one of {', '.join(METHODS)}")
    return method


def plot_for(
    inputs: Sequence[Path], layer: str | None, method: str
) -> tuple[Reporter[Any], object]:
    """The plot ``inputs`` ask for, and its document: one baseline directory → its neuron map,
    one check report → bars, several measure reports → their trajectory (labelled by file
    stem). A report of a newer minor version is read with its unknown fields dropped."""
    from dynaudit.baseline_store import is_baseline

    if len(inputs) == 1 and is_baseline(inputs[0]):
        return NeuronMap(layer, method), inputs[0]
    loaded = [_read(path) for path in inputs]
    checks = [r for r in loaded if isinstance(r, CheckReport)]
    if len(loaded) == 1 and checks:
        return Bars(), checks[0]
    if checks:
        raise UsageError("a trajectory is drawn from measure reports, not check reports")
    measured = [r for r in loaded if isinstance(r, Report)]
    return Trajectory(tuple(p.stem for p in inputs)), measured


def _read(path: Path) -> Report | CheckReport:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise InputError(
            f"{path}: not a dynaudit report or baseline ({exc})", path=str(path)
        ) from exc
    return read_report(data, str(path))


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


@dataclass(frozen=True)
class Bars:
    """A check report's layers: baseline beside checked, the flagged ones in red."""

    def render(self, report: CheckReport) -> bytes:
        plt = _pyplot()
        layers = [x for x in report.comparison.layers if x.mean_distance is not None]
        if not layers:
            raise UsageError("the check report has no measured layers to plot")
        base = [x.baseline_mean_distance or 0.0 for x in layers]
        new = [x.mean_distance or 0.0 for x in layers]
        spread = [
            (x.change.std if x.change else 0.0) * b for x, b in zip(layers, base, strict=True)
        ]
        failing = set(report.verdict.failing_layers)
        width = 0.4
        fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(layers) + 2), 4.5))
        xs = range(len(layers))
        baseline_label = f"baseline ({report.baseline.ref})"
        ax.bar([i - width / 2 for i in xs], base, width, label=baseline_label, color="#8da0cb")
        colours = ["#e15759" if x.name in failing else "#59a14f" for x in layers]
        checked_label = f"{report.source.uri} (red: flagged)"
        ax.bar(
            [i + width / 2 for i in xs],
            new,
            width,
            yerr=spread,
            capsize=2,
            color=colours,
            label=checked_label,
        )
        ax.set_xticks(list(xs))
        ax.set_xticklabels([_short(x.name) for x in layers], rotation=90, fontsize=7)
        ax.set_ylabel("mean distance (units of s)")
        title = f"dynaudit check: {report.verdict.verdict} — error bars: seed spread"
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        return _png(fig, plt)


@dataclass(frozen=True)
class Trajectory:
    """Measure reports in order: the mean distance of all layers and of each depth third."""

    labels: tuple[str, ...]

    def render(self, reports: Sequence[Report]) -> bytes:
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
                width = 2.5 if name == "all layers" else 1.2
                ax.plot(*zip(*points, strict=True), marker="o", label=name, linewidth=width)
        ax.set_xticks(xs)
        ax.set_xticklabels(self.labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("mean distance (units of s)")
        ax.set_title("dynamical discrepancy over checkpoints", fontsize=10)
        ax.legend(fontsize=8)
        return _png(fig, plt)


@dataclass(frozen=True)
class NeuronMap:
    """Neurons of ``layer`` (default: the first fitted one) from a baseline directory's first
    cold fit, projected to 2-D by ``method``."""

    layer: str | None
    method: str = "pca"

    def render(self, baseline_dir: Path) -> bytes:
        from dynaudit.baseline_store import load_baseline, read_coords
        from dynaudit.dynamics.blocks import block_shape

        check_method(self.method)
        plt = _pyplot()
        stored = load_baseline(baseline_dir)
        fitted = [x for x in stored.layers if x.coords is not None]
        chosen = next((x for x in fitted if self.layer is None or x.name == self.layer), None)
        if chosen is None or chosen.coords is None:
            names = ", ".join(x.name for x in fitted[:5])
            raise UsageError(f"{baseline_dir}: no fitted layer {self.layer!r} (e.g. {names})")
        coords = read_coords(baseline_dir, stored, chosen)["cold.0"][0]  # (H, N, k)
        points = coords.permute(1, 0, 2).reshape(coords.shape[1], -1).double()  # (N, H·k)
        _, m, n = chosen.shape
        m, _ = block_shape(m, n, stored.fit_settings().max_entries)  # rows fitted
        xy = _project(points, self.method)
        fig, ax = plt.subplots(figsize=(5.5, 5))
        outputs, inputs = f"{m} output neurons", f"{xy.shape[0] - m} input neurons"
        ax.scatter(xy[:m, 0], xy[:m, 1], s=6, alpha=0.7, label=outputs, color="#e15759")
        ax.scatter(xy[m:, 0], xy[m:, 1], s=6, alpha=0.7, label=inputs, color="#4e79a7")
        ax.set_title(f"{_short(chosen.name)} ({self.method.upper()}, seed 0)", fontsize=10)
        ax.legend(fontsize=8)
        ax.set_aspect("equal", adjustable="datalim")
        return _png(fig, plt)


def _project(points: Any, method: str) -> Any:
    """(N, d) points to (N, 2): t-SNE (scikit-learn), else the first two principal axes."""
    import torch

    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError as exc:
            raise UsageError("t-SNE needs scikit-learn; use --method pca") from exc
        flat = TSNE(n_components=2, random_state=0, init="pca").fit_transform(points.numpy())
        return torch.as_tensor(flat)
    centred = points - points.mean(dim=0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:2].T


def _short(name: str, limit: int = 40) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def _png(fig: Any, plt: Any) -> bytes:
    """The figure rendered in memory (written by the caller atomically: never half a PNG)."""
    buffer = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buffer, dpi=120, format="png")
    finally:
        plt.close(fig)
    return buffer.getvalue()
