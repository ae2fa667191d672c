"""Large matrices on seeded blocks: what sampling costs in accuracy, against the exact fit.

    python -m experiments.blocks --quick      # < 2 min: CI smoke test
    python -m experiments.blocks --out docs/evidence/blocks.json

A LLaMA-shaped checkpoint (bench.checkpoint: noise plus a power-law low-rank part) is changed
four ways: two low-rank updates of the size a fine-tune makes (5 % and 20 % of ‖W‖), 10 %
Gaussian noise and 50 % magnitude pruning. Each is checked against a baseline of the base made
with every matrix fitted whole (``max_entries`` 0, the exact computation) and with matrices
above a cap fitted on seeded blocks. Per cap: time, fidelity, how far the absolute mean
distance moves (bias of the reported number), and, what the gate uses, how far each layer's
relative change moves from the exact one (bias and RMS error) against the seed spread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.checkpoint import Shape, generate
from experiments._cli import experiment_main
from experiments.derived import derive

FULL = {"shape": Shape(hidden=768, intermediate=2048, blocks=1, vocab=1024, heads=8),
        "caps": [0, 1 << 20, 1 << 18, 1 << 16], "settings": {}}  # fmt: skip
QUICK = {"shape": Shape(hidden=256, intermediate=640, blocks=1, vocab=256, heads=4),
         "caps": [0, 1 << 16],
         "settings": {"q_dim": 16, "pieces": 4, "steps": 100, "seeds": 2}}  # fmt: skip


def _variants(base: Path, work: Path) -> dict[str, Path]:
    gen = torch.Generator().manual_seed(1)

    def update(size: float, rank: int) -> Callable[[str, torch.Tensor], torch.Tensor]:
        """A low-rank change of relative Frobenius size ``size``, like a merged adapter."""

        def apply(_: str, w: torch.Tensor) -> torch.Tensor:
            if w.dim() != 2:
                return w
            delta = torch.randn(w.shape[0], rank, generator=gen) @ torch.randn(
                rank, w.shape[1], generator=gen
            )
            w32 = w.float()
            return (w32 + delta * (size * w32.norm() / delta.norm())).to(w.dtype)

        return apply

    def noise(_: str, w: torch.Tensor) -> torch.Tensor:
        if w.dim() != 2:
            return w
        w32 = w.float()
        return (w32 + 0.1 * w32.std() * torch.randn(w.shape, generator=gen)).to(w.dtype)

    def prune(_: str, w: torch.Tensor) -> torch.Tensor:
        if w.dim() != 2:
            return w
        w32 = w.float()
        keep = w32.abs() >= w32.abs().flatten().median()
        return (w32 * keep).to(w.dtype)

    return {
        "update 5 %": derive(base, work / "update5", update(0.05, 8)),
        "update 20 %": derive(base, work / "update20", update(0.2, 32)),
        "noise 10 %": derive(base, work / "noise10", noise),
        "pruned 50 %": derive(base, work / "pruned50", prune),
    }


def _measure(base: Path, variants: dict[str, Path], work: Path, cap: int,
             settings: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    import dynaudit

    started = time.perf_counter()
    made = dynaudit.baseline(base, work / f"baseline-{cap}", max_entries=cap, **settings)
    layers = {
        x.name: {"block": x.block, "shape": x.shape, "mean_distance": x.mean_distance,
                 "fidelity": x.fidelity, "spread": x.spread.relative if x.spread else None}
        for x in made.report.measured
    }  # fmt: skip
    cases = {}
    for case, path in variants.items():
        report = dynaudit.check(path, work / f"baseline-{cap}", cache=False)
        cases[case] = {
            "verdict": report.verdict.verdict,
            "all": report.comparison.all.change.mean if report.comparison.all.change else None,
            "layers": {x.name: [x.change.mean, x.change.std] for x in report.comparison.layers
                       if x.change is not None},
        }  # fmt: skip
    return {"cap": cap, "seconds": round(time.perf_counter() - started, 1), "layers": layers,
            "cases": cases}  # fmt: skip


def _against_exact(exact: dict[str, Any], sampled: dict[str, Any]) -> dict[str, Any]:
    """How far a cap's numbers are from the exact ones, over every (case, layer)."""
    ratios = [
        sampled["layers"][name]["mean_distance"] / layer["mean_distance"]
        for name, layer in exact["layers"].items()
        if sampled["layers"][name]["block"]
    ]
    errors, stds, exact_std, relative = [], [], [], []
    for case, result in exact["cases"].items():
        for name, (change, std) in result["layers"].items():
            if not sampled["layers"][name]["block"]:
                continue
            ours, ours_std = sampled["cases"][case]["layers"][name]
            errors.append(ours - change)
            stds.append(ours_std)
            exact_std.append(std)
            relative.append(abs(ours - change) / abs(change) if change else 0.0)
    if not errors:
        return {"sampled_layers": 0}
    return {
        "sampled_layers": len(ratios),
        "mean_distance_ratio": [min(ratios), statistics.median(ratios), max(ratios)],
        "change_bias": statistics.fmean(errors),
        "change_rms_error": statistics.fmean(e * e for e in errors) ** 0.5,
        "change_max_error": max(errors, key=abs),
        "change_relative_error_median": statistics.median(relative),
        "seed_std_median": statistics.median(stds),
        "exact_seed_std_median": statistics.median(exact_std),
        "all_layers": {
            case: [exact["cases"][case]["all"], sampled["cases"][case]["all"]]
            for case in exact["cases"]
        },
        "verdicts_agree": all(
            exact["cases"][c]["verdict"] == sampled["cases"][c]["verdict"] for c in exact["cases"]
        ),
    }


def run(quick: bool, work: Path) -> dict[str, Any]:
    setup = QUICK if quick else FULL
    base = work / "base"
    generate(base, setup["shape"], seed=0)
    variants = _variants(base, work)
    runs = [_measure(base, variants, work, cap, setup["settings"]) for cap in setup["caps"]]
    exact = runs[0]
    return {
        "shape": setup["shape"].__dict__,
        "settings": setup["settings"] or "defaults",
        "runs": runs,
        "against_exact": {str(r["cap"]): _against_exact(exact, r) for r in runs[1:]},
    }


def show(result: dict[str, Any]) -> None:
    exact = result["runs"][0]
    changes = ", ".join(f"{c} {v['all'] * 100:+.2f}%" for c, v in exact["cases"].items())
    print(f"exact: {exact['seconds']} s; all-layers changes: {changes}")
    for run in result["runs"][1:]:
        cmp = result["against_exact"][str(run["cap"])]
        print(f"cap {run['cap']:>8}: {run['seconds']} s (exact {exact['seconds']} s), "
              f"{cmp['sampled_layers']} layers sampled")  # fmt: skip
        if not cmp["sampled_layers"]:
            continue
        lo, mid, hi = cmp["mean_distance_ratio"]
        print(f"  mean distance / exact: {mid:.3f} ({lo:.3f}–{hi:.3f})")
        print(f"  layer change − exact: bias {cmp['change_bias'] * 100:+.3f} pts, "
              f"RMS {cmp['change_rms_error'] * 100:.3f} pts, "
              f"max {cmp['change_max_error'] * 100:+.3f} pts, "
              f"median relative {cmp['change_relative_error_median']:.1%}")  # fmt: skip
        print(f"  seed std of a layer change: {cmp['seed_std_median'] * 100:.3f} pts "
              f"(exact {cmp['exact_seed_std_median'] * 100:.3f})")  # fmt: skip
        for case, (ex, ours) in cmp["all_layers"].items():
            print(f"  {case:12} all layers {ex * 100:+7.3f}% exact, {ours * 100:+7.3f}% sampled")
        print(f"  verdicts agree: {cmp['verdicts_agree']}")


def main(argv: list[str] | None = None) -> None:
    experiment_main(__doc__, "blocks", run, show, argv=argv)


if __name__ == "__main__":
    main()
