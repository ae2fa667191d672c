"""Evidence for the fit's defaults (docs/method.md): fidelity, seed spread, step-budget
stability and time, measured on really trained weights for a grid of settings.

    python -m experiments.protocol [--quick] [--zoo DIR] [--out docs/replication/protocol.json]

Each setting cold-fits every matrix with ``--seeds`` seeds at its step budget and once more
at 4× the budget; it reports the median fidelity, the worst and median relative seed spread
of the mean distance, and the worst and median relative change when the budget is ×4.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dynaudit.config import FitSettings
from dynaudit.dynamics import discrepancy, fidelity, fit_coordinates, init_coordinates
from dynaudit.dynamics.kernel import matrix_seed
from dynaudit.families import detect_family
from dynaudit.tensors import Checkpoint
from experiments import zoo

GRID_FULL = [
    {"q_dim": q, "pieces": 8, "mu": mu, "steps": 400} for q in (64, 128) for mu in (0.01, 0.03, 0.1)
]
GRID_QUICK = [{"q_dim": 32, "pieces": 8, "mu": 0.03, "steps": 100}]


def trained_matrices(zoo_dir: Path, quick: bool) -> dict[str, torch.Tensor]:
    """Every audited matrix of the zoo's checkpoints, trained first when missing."""
    if not (zoo_dir / "mlp" / "model.safetensors").exists():
        zoo.train_digits_mlp(zoo_dir / "mlp", epochs=5 if quick else 30)
        zoo.train_digits_lenet(zoo_dir / "lenet", epochs=5 if quick else 30)
        zoo.train_tiny_llama(zoo_dir / "llama", steps=30 if quick else 300)
    out = {}
    for model in ("mlp", "lenet", "llama"):
        with Checkpoint.open(zoo_dir / model) as checkpoint:
            family = detect_family(checkpoint).family
            for layer in family.plan(checkpoint).layers:
                mats = family.matrices(layer, checkpoint.read(layer.name))
                out[f"{model}/{layer.name}"] = mats[0]
    if quick:
        out = dict(list(out.items())[:: max(1, len(out) // 4)])
    return out


def _fit(
    target: torch.Tensor, settings: FitSettings, seed: int, step_rule: bool
) -> tuple[float, float]:
    t = target[None]
    rms = t.pow(2).mean(dim=(1, 2)).sqrt()
    init = init_coordinates(t.shape[1], t.shape[2], settings, [seed], rms)
    # Without the rule every matrix gets exactly ``settings.steps`` (the earlier protocol).
    coords = fit_coordinates(t, settings, init, steps=None if step_rule else settings.steps)
    return float(discrepancy(coords)[1][0]), float(fidelity(coords, t)[0])


def evaluate(
    matrices: dict[str, torch.Tensor], setting: dict[str, Any], seeds: int, step_rule: bool = True
) -> dict[str, Any]:
    settings = FitSettings(**setting)
    longer = settings.model_copy(update={"steps": 4 * settings.steps})
    rows = []
    started = time.perf_counter()
    for name, weight in matrices.items():
        target = weight / weight.pow(2).mean().sqrt()
        fits = [_fit(target, settings, matrix_seed(s, name), step_rule) for s in range(seeds)]
        mds = [md for md, _ in fits]
        long_md, _ = _fit(target, longer, matrix_seed(0, name), step_rule)
        rows.append(
            {
                "matrix": name,
                "shape": list(weight.shape),
                "fidelity": fits[0][1],
                "mean_distance": mds[0],
                "seed_spread": statistics.stdev(mds) / statistics.fmean(mds),
                "budget_change": abs(long_md - mds[0]) / mds[0],
            }
        )
    seconds = time.perf_counter() - started
    return {
        "settings": setting,
        "step_rule": step_rule,
        "matrices": len(rows),
        "fidelity_median": statistics.median(r["fidelity"] for r in rows),
        "seed_spread_median": statistics.median(r["seed_spread"] for r in rows),
        "seed_spread_max": max(r["seed_spread"] for r in rows),
        "budget_change_median": statistics.median(r["budget_change"] for r in rows),
        "budget_change_max": max(r["budget_change"] for r in rows),
        "seconds": seconds,
        "rows": rows,
    }


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| q_dim | H | μ | steps | small-matrix rule | median fidelity "
        "| seed spread (median / max) | ×4 steps change (median / max) | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r["settings"]
        lines.append(
            f"| {s['q_dim']} | {s['pieces']} | {s['mu']} | {s['steps']} "
            f"| {'yes' if r['step_rule'] else 'no'} "
            f"| {r['fidelity_median']:.3f} "
            f"| {r['seed_spread_median']:.2%} / {r['seed_spread_max']:.2%} "
            f"| {r['budget_change_median']:.2%} / {r['budget_change_max']:.2%} "
            f"| {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small setting (CI smoke test)")
    parser.add_argument("--zoo", type=Path, help="trained checkpoints (default: train in temp)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--only", type=str, help="comma-separated grid indices to run")
    parser.add_argument(
        "--no-step-rule", action="store_true", help="fixed steps for every matrix (no ×8 rule)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1 if args.quick else torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        matrices = trained_matrices(args.zoo or Path(tmp), args.quick)
        grid = GRID_QUICK if args.quick else GRID_FULL
        if args.only:
            grid = [grid[int(i)] for i in args.only.split(",")]
        results = [
            evaluate(matrices, setting, args.seeds, not args.no_step_rule) for setting in grid
        ]
    print(markdown_table(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "results": results},
                                       indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
