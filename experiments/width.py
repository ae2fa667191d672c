"""Width (the paper's Theorem 3.1): does the discrepancy grow with the hidden width of an MLP
that fits the same data?

    python -m experiments.width --quick          # < 2 min: CI smoke test
    python -m experiments.width --out docs/replication/width.json --plot docs/replication/width.png

One-hidden-layer MLPs (64 → H → 10) of growing width H are trained on scikit-learn's digits
until they fit the training set, with several training seeds, and measured by dynaudit at the
default settings with several fit seeds. Each width is also measured at initialisation (same
shapes, untrained), which separates what training does from what size does.

The theorem is about 𝒟, the sum over neuron pairs, which grows with the neuron count by
construction (docs/method.md §5): 𝒟 is reported, but the test is the **mean distance**, which does
not. Spearman's rank correlation of mean distance with width is given per layer, for trained
and untrained nets; nothing is tuned until it agrees.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from experiments._cli import experiment_main, pyplot, save_figure
from tests import zoo

WIDTHS_FULL = (16, 32, 64, 128, 256, 512)
WIDTHS_QUICK = (16, 64, 256)
LAYERS = {"0.weight": "hidden (H × 64)", "2.weight": "output (10 × H)"}


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (no ties expected: widths and continuous figures)."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        for rank, index in enumerate(order):
            out[index] = float(rank)
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    norm = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / norm if norm else 0.0


def _untrained(out: Path, width: int, seed: int) -> Path:
    torch.manual_seed(seed)
    model = zoo.build_mlp([width])
    zoo.save_state_dict(model, out, {"model_type": "mlp", "hidden": [width]})
    return out


def run(quick: bool, work: Path) -> dict[str, Any]:
    import dynaudit

    widths = WIDTHS_QUICK if quick else WIDTHS_FULL
    train_seeds = (0,) if quick else (0, 1, 2)
    settings = zoo.replication_settings(quick)
    epochs = 40 if quick else 150
    rows = []
    started = time.perf_counter()
    for width in widths:
        for seed in train_seeds:
            trained = work / f"trained-{width}-{seed}"
            fit = zoo.train_digits_mlp(trained, hidden=(width,), epochs=epochs, seed=seed)
            untrained = _untrained(work / f"init-{width}-{seed}", width, seed)
            for state, path in (("trained", trained), ("init", untrained)):
                report = dynaudit.measure(path, cache=False, **settings)
                for layer in report.measured:
                    rows.append({
                        "width": width, "train_seed": seed, "state": state, "layer": layer.name,
                        "discrepancy": layer.discrepancy, "mean_distance": layer.mean_distance,
                        "fidelity": layer.fidelity,
                        "seed_spread": layer.spread.relative if layer.spread else None,
                        "val_accuracy": fit["val_accuracy"] if state == "trained" else None,
                        "train_accuracy": fit["train_accuracy"] if state == "trained" else None,
                    })  # fmt: skip
    return {
        "settings": settings, "epochs": epochs, "widths": list(widths),
        "train_seeds": list(train_seeds), "rows": rows, "summary": summarize(rows),
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per layer and state: the mean figures per width (over training seeds) and Spearman's
    ρ of mean distance and of 𝒟 with width (over every net)."""
    out: dict[str, Any] = {}
    for layer in LAYERS:
        for state in ("trained", "init"):
            chosen = [r for r in rows if r["layer"] == layer and r["state"] == state]
            if not chosen:
                continue
            per_width = {}
            for width in sorted({r["width"] for r in chosen}):
                at = [r for r in chosen if r["width"] == width]
                distances = [r["mean_distance"] for r in at]
                per_width[str(width)] = {
                    "mean_distance": statistics.fmean(distances),
                    "mean_distance_std": statistics.pstdev(distances),
                    "discrepancy": statistics.fmean(r["discrepancy"] for r in at),
                    "fidelity": statistics.fmean(r["fidelity"] for r in at),
                    "seed_spread": max((r["seed_spread"] or 0.0) for r in at),
                }
            widths = [float(r["width"]) for r in chosen]
            out[f"{layer} {state}"] = {
                "per_width": per_width,
                "spearman_mean_distance": spearman(widths, [r["mean_distance"] for r in chosen]),
                "spearman_discrepancy": spearman(widths, [r["discrepancy"] for r in chosen]),
            }
    return out


def plot(result: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, item in result["summary"].items():
        layer, state = key.split()
        widths = [int(w) for w in item["per_width"]]
        figures = list(item["per_width"].values())
        style = "-o" if state == "trained" else "--s"
        label = f"{LAYERS[layer]}, {state}"
        axes[0].errorbar(widths, [f["mean_distance"] for f in figures],
                         yerr=[f["mean_distance_std"] for f in figures], fmt=style, label=label,
                         capsize=3)  # fmt: skip
        axes[1].plot(widths, [f["discrepancy"] for f in figures], style, label=label)
    axes[0].set(ylabel="mean distance (units of s)", title="mean distance vs width (the test)")
    axes[1].set(yscale="log", ylabel="discrepancy D", title="D vs width (grows with neurons)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["widths"], [str(w) for w in result["widths"]])
        ax.minorticks_off()
        ax.set_xlabel("hidden width H")
    axes[0].legend(fontsize=7)
    save_figure(fig, out)


def show(result: dict[str, Any]) -> None:
    for key, item in result["summary"].items():
        cells = " ".join(f"{w}:{f['mean_distance']:.3f}" for w, f in item["per_width"].items())
        print(f"{key:22} ρ(mean distance) {item['spearman_mean_distance']:+.2f} "
              f"ρ(𝒟) {item['spearman_discrepancy']:+.2f}  {cells}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    experiment_main(__doc__, "width", run, show, plot, argv=argv)


if __name__ == "__main__":
    main()
