"""Training from scratch (the paper's Fig. 3 and Table 2): does the discrepancy rise as a
network learns?

    python -m experiments.training --quick       # < 2 min: CI smoke test
    python -m experiments.training --out docs/replication/training.json \
        --plot docs/replication/training.png

An MLP (64 → 256 → 256 → 10) and a LeNet-style CNN are trained from scratch on
scikit-learn's digits with several training seeds; checkpoints are saved along the way
(epoch 0 is the initialisation) with their validation accuracy, and each is measured by
dynaudit at the default settings with several fit seeds. Reported per checkpoint: every
layer's 𝒟, mean distance, fidelity and seed spread; per model: Spearman's rank correlation of
the all-layers mean distance (and 𝒟) with validation accuracy over the checkpoints.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from experiments._cli import experiment_main, pyplot, save_figure
from experiments.width import spearman
from tests import zoo

EPOCHS_FULL = (0, 1, 2, 4, 8, 16, 32, 64)
EPOCHS_QUICK = (0, 2, 8)


def _models() -> dict[str, tuple[Any, dict[str, Any], bool]]:
    """name → (constructor, config.json, takes images)."""
    return {
        "mlp": (lambda: zoo.build_mlp([256, 256]), {"model_type": "mlp"}, False),
        "lenet": (zoo.LeNet, {"model_type": "lenet"}, True),
    }


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def train_along(name: str, out: Path, epochs: tuple[int, ...], seed: int) -> list[dict[str, Any]]:
    """Train ``name`` from scratch, saving a checkpoint at each of ``epochs``."""
    build, config, images = _models()[name]
    torch.manual_seed(seed)
    x_tr, y_tr, x_va, y_va = zoo.digits_split(seed)
    if images:
        x_tr, x_va = x_tr.view(-1, 1, 8, 8), x_va.view(-1, 1, 8, 8)
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed + 1)
    saved = []
    for epoch in range(max(epochs) + 1):
        if epoch in epochs:
            path = out / f"{name}-seed{seed}-epoch{epoch:03d}"
            zoo.save_state_dict(model, path, config)
            saved.append({"model": name, "seed": seed, "epoch": epoch, "path": path,
                          "val_accuracy": _accuracy(model, x_va, y_va),
                          "train_accuracy": _accuracy(model, x_tr, y_tr)})  # fmt: skip
        if epoch == max(epochs):
            break
        model.train()
        order = torch.randperm(len(x_tr), generator=gen)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return saved


def run(quick: bool, work: Path) -> dict[str, Any]:
    import dynaudit

    epochs = EPOCHS_QUICK if quick else EPOCHS_FULL
    seeds = (0,) if quick else (0, 1, 2)
    settings = zoo.replication_settings(quick)
    started = time.perf_counter()
    rows = []
    for name in _models():
        for seed in seeds:
            for point in train_along(name, work, epochs, seed):
                report = dynaudit.measure(point.pop("path"), cache=False, **settings)
                every = report.summary.all
                rows.append({
                    **point, "mean_distance": every.mean_distance,
                    "discrepancy": every.discrepancy, "fidelity": every.fidelity,
                    "layers": [{"name": x.name, "mean_distance": x.mean_distance,
                                "discrepancy": x.discrepancy, "fidelity": x.fidelity,
                                "seed_spread": x.spread.relative if x.spread else None}
                               for x in report.measured],
                })  # fmt: skip
    seconds = round(time.perf_counter() - started, 1)
    return {"settings": settings, "epochs": list(epochs), "seeds": list(seeds), "rows": rows,
            "summary": summarize(rows), "seconds": seconds}  # fmt: skip


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model: ρ of the all-layers figures with validation accuracy (over every
    checkpoint of every seed), per layer ρ of its mean distance, and the first/last means."""
    out: dict[str, Any] = {}
    for name in sorted({r["model"] for r in rows}):
        chosen = [r for r in rows if r["model"] == name]
        accuracy = [r["val_accuracy"] for r in chosen]
        first = [r for r in chosen if r["epoch"] == min(c["epoch"] for c in chosen)]
        last = [r for r in chosen if r["epoch"] == max(c["epoch"] for c in chosen)]
        layer_names = [x["name"] for x in chosen[0]["layers"]]
        out[name] = {
            "spearman_mean_distance_vs_accuracy": spearman(
                accuracy, [r["mean_distance"] for r in chosen]
            ),
            "spearman_discrepancy_vs_accuracy": spearman(
                accuracy, [r["discrepancy"] for r in chosen]
            ),
            "per_layer_spearman_mean_distance": {
                layer: spearman(accuracy, [r["layers"][i]["mean_distance"] for r in chosen])
                for i, layer in enumerate(layer_names)
            },
            "first": {"epoch": first[0]["epoch"],
                      "val_accuracy": statistics.fmean(r["val_accuracy"] for r in first),
                      "mean_distance": statistics.fmean(r["mean_distance"] for r in first)},
            "last": {"epoch": last[0]["epoch"],
                     "val_accuracy": statistics.fmean(r["val_accuracy"] for r in last),
                     "mean_distance": statistics.fmean(r["mean_distance"] for r in last),
                     "mean_distance_std": statistics.pstdev(r["mean_distance"] for r in last)},
            "min_fidelity": min(x["fidelity"] for r in chosen for x in r["layers"]),
        }  # fmt: skip
    return out


def plot(result: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    models = sorted({r["model"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        rows = [r for r in result["rows"] if r["model"] == name]
        epochs = result["epochs"]
        x = [e + 0.5 for e in epochs]  # epoch 0 on a log axis
        for seed in sorted({r["seed"] for r in rows}):
            mine = sorted((r for r in rows if r["seed"] == seed), key=lambda r: r["epoch"])
            ax.plot(x, [r["mean_distance"] for r in mine], "-o", color="C0", alpha=0.7,
                    label="mean distance (all layers)" if seed == 0 else None)  # fmt: skip
        twin = ax.twinx()
        for seed in sorted({r["seed"] for r in rows}):
            mine = sorted((r for r in rows if r["seed"] == seed), key=lambda r: r["epoch"])
            twin.plot(x, [r["val_accuracy"] for r in mine], "--s", color="C1", alpha=0.7,
                      label="validation accuracy" if seed == 0 else None)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(e) for e in epochs])
        ax.minorticks_off()
        ax.set(xlabel="epoch", ylabel="mean distance (units of s)", title=name)
        twin.set_ylabel("validation accuracy")
        lines = ax.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="center right")
    save_figure(fig, out)


def show(result: dict[str, Any]) -> None:
    for name, item in result["summary"].items():
        first, last = item["first"], item["last"]
        print(f"{name}: ρ(mean distance, accuracy) "
              f"{item['spearman_mean_distance_vs_accuracy']:+.2f}  ρ(D, accuracy) "
              f"{item['spearman_discrepancy_vs_accuracy']:+.2f}  epoch {first['epoch']} → "
              f"{last['epoch']}: mean distance {first['mean_distance']:.3f} → "
              f"{last['mean_distance']:.3f}, accuracy {first['val_accuracy']:.3f} → "
              f"{last['val_accuracy']:.3f}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    experiment_main(__doc__, "training", run, show, plot, argv=argv)


if __name__ == "__main__":
    main()
