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
from dynaudit.dynamics.kernel import fit_steps, matrix_seed
from dynaudit.families import detect_family
from dynaudit.tensors import Checkpoint
from tests import zoo

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


def sweep_fidelity(
    matrices: dict[str, torch.Tensor], q_dims: list[int], pieces: list[int], mu: float
) -> list[dict[str, Any]]:
    """Median fidelity (one seed, default budget rule) for each (q_dim, H)."""
    out = []
    for q in q_dims:
        for h in pieces:
            settings = FitSettings(q_dim=q, pieces=h, mu=mu)
            started = time.perf_counter()
            fids = []
            for name, weight in matrices.items():
                target = weight / weight.pow(2).mean().sqrt()
                fids.append(_fit(target, settings, matrix_seed(0, name), True)[1])
            out.append(
                {
                    "q_dim": q,
                    "pieces": h,
                    "mu": mu,
                    "fidelity_median": statistics.median(fids),
                    "fidelity_min": min(fids),
                    "seconds": time.perf_counter() - started,
                }
            )
            print(out[-1], flush=True)
    return out


def time_sizes(sizes: list[int], steps: int = 20) -> list[dict[str, Any]]:
    """Seconds per default fit of an n × n matrix, from ``steps`` timed steps."""
    settings = FitSettings()
    out = []
    for n in sizes:
        gen = torch.Generator().manual_seed(n)
        target = torch.randn(1, n, n, generator=gen)
        init = init_coordinates(n, n, settings, [0], torch.ones(1))
        fit_coordinates(target, settings, init, steps=2)  # warm-up
        started = time.perf_counter()
        fit_coordinates(target, settings, init, steps=steps)
        per_step = (time.perf_counter() - started) / steps
        budget = fit_steps(settings, n, n)
        flop = 6 * n * n * settings.q_dim
        out.append(
            {
                "n": n,
                "steps": budget,
                "steps_per_second": 1 / per_step,
                "gflops": flop / per_step / 1e9,
                "seconds_per_matrix": per_step * budget,
            }
        )
        print(out[-1], flush=True)
    return out


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
    parser.add_argument("--sweep", action="store_true", help="fidelity vs q_dim and H only")
    parser.add_argument("--timing", action="store_true", help="seconds per matrix size only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1 if args.quick else torch.get_num_threads())
    if args.timing:
        sizes = [128, 256] if args.quick else [256, 512, 1024, 2048, 4096]
        _write(args.out, {"threads": torch.get_num_threads(), "timing": time_sizes(sizes)})
        return
    with tempfile.TemporaryDirectory() as tmp:
        matrices = trained_matrices(args.zoo or Path(tmp), args.quick)
        if args.sweep:
            q_dims, pieces = ([16, 32], [4, 8]) if args.quick else ([32, 64, 128, 256], [4, 8, 16])
            sweep = sweep_fidelity(matrices, q_dims, pieces, FitSettings().mu)
            _write(args.out, {"threads": torch.get_num_threads(), "sweep": sweep})
            return
        grid = GRID_QUICK if args.quick else GRID_FULL
        if args.only:
            grid = [grid[int(i)] for i in args.only.split(",")]
        results = [
            evaluate(matrices, setting, args.seeds, not args.no_step_rule) for setting in grid
        ]
    print(markdown_table(results))
    _write(args.out, {"threads": torch.get_num_threads(), "results": results})


def _write(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
