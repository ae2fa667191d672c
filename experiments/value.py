"""Protocol and added value: does the discrepancy tell anything that simple weight statistics
do not? (Not a claim of the paper; the question every user asks.)

    python -m experiments.value --quick      # < 2 min: CI smoke test
    python -m experiments.value --out docs/replication/value.json --plot docs/replication/value.png

On one tiny LLaMA base, ordinary fine-tunes (the three task formats of
``experiments.finetuning`` and plain language-model fine-tunes on other stdlib files) and
damaged copies (noise, a low-rank block, a re-initialised layer, a catastrophic fine-tune) are
checked against a baseline of the base. For every (case, layer) we have dynaudit's relative
change of the mean distance and, from the same two weight matrices, four simple statistics:
‖ΔW‖/‖W‖ and the relative changes of the spectral norm, of the stable rank ‖W‖²_F/‖W‖²_2 and
of the nuclear-to-Frobenius ratio ‖W‖_*/‖W‖_F. Reported:
- rank correlations of dynaudit's change with each statistic, and the R² of a linear model
  that predicts it from all four (near 1: it adds nothing they do not already say);
- per case, the largest layer score of each measure, and whether each one separates every
  ordinary fine-tune from every damaged copy (the gate's job);
- across layers, how the mean distance itself relates to the stable rank and the
  nuclear-to-Frobenius ratio (the μ-regularised fit might track a nuclear-norm-like quantity);
- the protocol's own noise: fit-seed spread and null drift, beside the effects the default
  policy flags.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from experiments._cli import experiment_main, pyplot, save_figure
from experiments.calibrate_gate import FINETUNE_MODULES, damaged_copies
from experiments.finetuning import task_text
from experiments.width import spearman
from tests import zoo

STATS = ("relative_delta", "spectral", "stable_rank", "nuclear_frobenius")
MILD = {"noise 10%": "mild"}


def weight_stats(weight: torch.Tensor) -> dict[str, float]:
    """Frobenius and spectral norms, stable rank and the nuclear-to-Frobenius ratio."""
    sv = torch.linalg.svdvals(weight.double())
    fro = float(sv.square().sum().sqrt())
    return {
        "frobenius": fro,
        "spectral": float(sv[0]),
        "stable_rank": fro**2 / float(sv[0]) ** 2,
        "nuclear_frobenius": float(sv.sum()) / fro,
    }


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def _cases(base: Path, work: Path, quick: bool) -> dict[str, tuple[str, Path]]:
    """name → (kind, checkpoint): kind is "fine-tune", "damage", or "mild" for noise the gate
    calibration found as harmless as a gentle fine-tune (10 %: base loss +0.010, docs/gate.md),
    reported but left out of the separation."""
    cases: dict[str, tuple[str, Path]] = {}
    tasks = ("classification",) if quick else ("classification", "extraction", "translation")
    for task in tasks:
        out = work / f"task-{task}"
        zoo.finetune_tiny_llama(base, out, text=task_text(task), steps=30 if quick else 200)
        cases[f"{task} fine-tune"] = ("fine-tune", out)
    if not quick:
        for lr, steps in ((1e-4, 60), (1e-3, 300)):
            out = work / f"lm-{lr:g}-{steps}"
            zoo.finetune_tiny_llama(base, out, modules=FINETUNE_MODULES, steps=steps, lr=lr)
            cases[f"stdlib fine-tune lr {lr:g}, {steps} steps"] = ("fine-tune", out)
    levels = (0.5,) if quick else (0.1, 0.25, 0.5)
    damaged = damaged_copies(base, work, seed=0, levels=levels)
    del damaged["zeroed layer"]  # every statistic sees a zero matrix; it tells nothing here
    if quick:
        del damaged["re-initialised layer"]
    else:
        out = work / "catastrophic"
        zoo.finetune_tiny_llama(base, out, modules=FINETUNE_MODULES, steps=60, lr=3e-2, clip=None)
        damaged["catastrophic fine-tune"] = out
    cases.update({name: (MILD.get(name, "damage"), path) for name, path in damaged.items()})
    return cases


def run(quick: bool, work: Path) -> dict[str, Any]:
    import dynaudit

    settings = zoo.replication_settings(quick)  # K fit seeds are the baseline's K
    started = time.perf_counter()
    base = work / "base"
    zoo.train_tiny_llama(base, steps=150 if quick else 400)
    stored = dynaudit.baseline(base, work / "baseline", **settings)
    reference = _weights(base)
    base_stats = {x.name: weight_stats(reference[x.name]) for x in stored.layers}
    rows, cases = [], []
    for name, (kind, path) in _cases(base, work, quick).items():
        report = dynaudit.check(path, work / "baseline")
        weights = _weights(path)
        layers = []
        for x in report.comparison.layers:
            if x.change is None:
                continue
            new, old = weight_stats(weights[x.name]), base_stats[x.name]
            delta = float((weights[x.name] - reference[x.name]).norm()) / old["frobenius"]
            changes = {k: (new[k] - old[k]) / old[k] for k in STATS[1:]}
            layers.append({
                "case": name, "kind": kind, "layer": x.name, "type": x.type,
                "dynaudit": x.change.mean, "dynaudit_std": x.change.std,
                "relative_delta": delta, **changes,
                "mean_distance": x.mean_distance, **{f"{k}_value": new[k] for k in STATS[1:]},
            })  # fmt: skip
        rows += layers
        cases.append({
            "case": name, "kind": kind, "verdict": report.verdict.verdict,
            "all": report.comparison.all.change.mean if report.comparison.all.change else None,
            "noise": report.comparison.all.noise,
            **{f"max_{k}": max(abs(r[k]) for r in layers) for k in ("dynaudit", *STATS)},
        })  # fmt: skip
        print(f"{name:40} {kind:9} {report.verdict.verdict:4} max layer change "
              f"{cases[-1]['max_dynaudit'] * 100:6.1f}%  max ‖ΔW‖/‖W‖ "
              f"{cases[-1]['max_relative_delta'] * 100:6.1f}%", flush=True)  # fmt: skip
    protocol = {
        "fit_seed_std": [r["dynaudit_std"] for r in rows],
        "null_drift": [
            abs(statistics.fmean(x.null_mean_distance) - statistics.fmean(x.cold_mean_distance))
            / statistics.fmean(x.cold_mean_distance)
            for x in stored.layers
            if x.cold_mean_distance and x.null_mean_distance
        ],
        "base_layers": [
            {"layer": x.name, "mean_distance": x.mean_distance, **base_stats[x.name]}
            for x in stored.report.measured
        ],
    }
    return {
        "settings": settings, "rows": rows, "cases": cases, "protocol": protocol,
        "summary": summarize(rows, cases, protocol),
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip


def _r_squared(y: list[float], columns: list[list[float]]) -> float:
    """R² of the least-squares fit of ``y`` on ``columns`` with an intercept."""
    x = torch.tensor([[1.0, *row] for row in zip(*columns, strict=True)], dtype=torch.float64)
    target = torch.tensor(y, dtype=torch.float64)
    coef = torch.linalg.lstsq(x, target[:, None]).solution
    residual = target - (x @ coef)[:, 0]
    total = target - target.mean()
    return 1.0 - float(residual.square().sum() / total.square().sum())


def summarize(
    rows: list[dict[str, Any]], cases: list[dict[str, Any]], protocol: dict[str, Any]
) -> dict[str, Any]:
    dyn = [r["dynaudit"] for r in rows]
    tuned = [r for r in rows if r["kind"] == "fine-tune"]
    ordinary = [c for c in cases if c["kind"] == "fine-tune"]
    damage = [c for c in cases if c["kind"] == "damage"]
    separation = {}
    for k in ("dynaudit", *STATS):
        worst_ordinary = max(c[f"max_{k}"] for c in ordinary)
        mildest_damage = min(c[f"max_{k}"] for c in damage)
        separation[k] = {
            "max_over_fine_tunes": worst_ordinary,
            "min_over_damage": mildest_damage,
            "separates": mildest_damage > worst_ordinary,
            "ratio": mildest_damage / worst_ordinary if worst_ordinary else None,
        }
    base = protocol["base_layers"]
    fit_std = protocol["fit_seed_std"]
    return {
        "spearman_with_dynaudit": {k: spearman(dyn, [r[k] for r in rows]) for k in STATS},
        "spearman_abs_with_dynaudit": {
            k: spearman([abs(v) for v in dyn], [abs(r[k]) for r in rows]) for k in STATS
        },
        "r_squared_all_four": _r_squared(dyn, [[r[k] for r in rows] for k in STATS]),
        "r_squared_fine_tunes": _r_squared(
            [r["dynaudit"] for r in tuned], [[r[k] for r in tuned] for k in STATS]
        ),
        "spearman_fine_tunes": {
            k: spearman([r["dynaudit"] for r in tuned], [r[k] for r in tuned]) for k in STATS
        },
        "separation": separation,
        "mean_distance_vs": {
            k: spearman([x["mean_distance"] for x in base], [x[k] for x in base])
            for k in ("stable_rank", "nuclear_frobenius")
        },
        "fit_seed_std_median": statistics.median(fit_std) if fit_std else None,
        "fit_seed_std_max": max(fit_std) if fit_std else None,
        "null_drift_median": statistics.median(protocol["null_drift"]),
        "null_drift_max": max(protocol["null_drift"]),
        "layers": len(rows),
    }


def show(result: dict[str, Any]) -> None:
    summary = result["summary"]
    print("Spearman with dynaudit's layer change:",
          {k: round(v, 2) for k, v in summary["spearman_with_dynaudit"].items()})  # fmt: skip
    print("... of absolute values:",
          {k: round(v, 2) for k, v in summary["spearman_abs_with_dynaudit"].items()})  # fmt: skip
    print(f"R² of dynaudit's change on all four: {summary['r_squared_all_four']:.3f} "
          f"(fine-tunes only: {summary['r_squared_fine_tunes']:.3f})")  # fmt: skip
    for k, item in summary["separation"].items():
        verdict = "separates" if item["separates"] else "overlaps"
        print(f"{k:18} fine-tunes ≤ {item['max_over_fine_tunes']:.4f}, damage ≥ "
              f"{item['min_over_damage']:.4f}: {verdict}")  # fmt: skip
    print("mean distance vs (across the base's layers):",
          {k: round(v, 2) for k, v in summary["mean_distance_vs"].items()})  # fmt: skip


def plot(result: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    rows = result["rows"]
    fig, axes = plt.subplots(1, len(STATS) + 1, figsize=(4 * (len(STATS) + 1), 3.8))
    for ax, k in zip(axes, STATS, strict=False):
        for kind, color in (("fine-tune", "C0"), ("mild", "C1"), ("damage", "C3")):
            mine = [r for r in rows if r["kind"] == kind]
            ax.scatter([r[k] for r in mine], [r["dynaudit"] * 100 for r in mine], s=8,
                       color=color, alpha=0.6, label=kind)  # fmt: skip
        ax.set_xlabel(k.replace("_", " ") + (" change" if k != "relative_delta" else ""))
        ax.set_ylabel("dynaudit change (%)")
        ax.set_title(f"ρ = {result['summary']['spearman_with_dynaudit'][k]:+.2f}", fontsize=9)
    axes[0].legend(fontsize=7)
    base = result["protocol"]["base_layers"]
    axes[-1].scatter([x["nuclear_frobenius"] for x in base], [x["mean_distance"] for x in base])
    axes[-1].set_xlabel("‖W‖_* / ‖W‖_F (base layers)")
    axes[-1].set_ylabel("mean distance (units of s)")
    save_figure(fig, out)


def main(argv: list[str] | None = None) -> None:
    experiment_main(__doc__, "value", run, show, plot, argv=argv)


if __name__ == "__main__":
    main()
