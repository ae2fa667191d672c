"""dynaudit and WeightWatcher at LLaMA-7B shapes, projected from one matrix of each shape:
``python -m bench.project [--threads N] [--steps N]``.

A 7B checkpoint does not fit this machine's time budget (WeightWatcher alone would run for
hours), so the per-matrix costs are measured and multiplied out:

- WeightWatcher's core on CPU: ``scipy.linalg.svd(W, compute_uv=False)`` in float64 (what
  0.7.7 runs without CUDA), timed on one 4096 × 4096 and one 4096 × 11008 matrix; the
  32000 × 4096 ``lm_head`` is scaled from the latter by the SVD's FLOP count (4·m·n² − 4n³/3
  for n ≤ m);
- dynaudit: the fit of one seeded block of each shape at the default ``max_entries`` (a
  4096 × 4096 matrix is fitted on 1024 × 1024 of it), timed over ``--steps`` steps and
  scaled to the default 400, plus the discrepancy and fidelity of the result;
- reading: neither tool's read time is included (bench.series measures the I/O floor).

LLaMA-7B: 32 blocks × (q, k, v, o: 4096 × 4096; gate, up: 11008 × 4096; down: 4096 × 11008)
and ``lm_head`` 32000 × 4096: 225 matrices, 6.5 B fitted parameters.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.checkpoint import projection
from bench.machine import describe
from bench.run import REPO
from dynaudit.config import FitSettings
from dynaudit.dynamics import discrepancy, fit_coordinates, init_coordinates
from dynaudit.dynamics.blocks import block_seed, block_shape, take_blocks
from dynaudit.dynamics.kernel import fit_steps, matrix_seed, rms
from dynaudit.dynamics.metrics import fidelity

BLOCKS = 32
SHAPES = {"square": (4096, 4096), "mlp": (11008, 4096)}  # (out, in); down_proj is the transpose
PER_BLOCK = {"square": 4, "mlp": 3}
LM_HEAD = (32000, 4096)


def _svd_flop(m: int, n: int) -> float:
    m, n = max(m, n), min(m, n)
    return 4 * m * n * n - 4 * n**3 / 3


Clock = Callable[[], float]


def time_svd(weight: torch.Tensor, clock: Clock = time.perf_counter) -> float:
    """Seconds of WeightWatcher's CPU path on one matrix: float64 singular values by SciPy
    (the conversion to float64 left out), by ``clock`` (``time.process_time`` for CPU time)."""
    import numpy as np
    import scipy.linalg

    w = weight.numpy().astype(np.float64)
    started = clock()
    scipy.linalg.svd(w, compute_uv=False)
    return clock() - started


def time_fit(
    weight: torch.Tensor,
    settings: FitSettings,
    steps: int | None = None,
    clock: Clock = time.perf_counter,
    name: str = "w",
) -> dict[str, Any]:
    """Seconds of dynaudit's cold fit of one matrix as the engine fits it (its block, seeded
    by ``name``), at the block's ``fit_steps`` budget — measured over ``steps`` steps and
    scaled when given — and of its metrics (discrepancy and fidelity), by ``clock``."""
    m, n = weight.shape
    target = (weight / rms(weight.unsqueeze(0)).float()).unsqueeze(0)
    shape = block_shape(m, n, settings.max_entries)
    fitted = take_blocks(target, shape, [block_seed(settings.seed, name, 0)])
    del target
    size = rms(fitted).float().clamp_min(1e-30)
    init = init_coordinates(*shape, settings, [matrix_seed(settings.seed, name)], size)
    budget = fit_steps(settings, *shape)
    run = steps or budget
    started = clock()
    coords = fit_coordinates(fitted, settings, init, steps=run)
    fit_s = (clock() - started) * budget / run
    started = clock()
    discrepancy(coords)
    fidelity(coords, fitted)
    return {"block": list(shape), "steps": budget, "fit_s": fit_s,
            "metrics_s": clock() - started}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    doc = (__doc__ or "").split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m bench.project", description=doc)
    parser.add_argument("--threads", type=int, default=None, help="torch and BLAS threads")
    parser.add_argument("--steps", type=int, default=20, help="fit steps timed (scaled to 400)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "project-7b.json")
    args = parser.parse_args(argv)  # fmt: skip
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    settings = FitSettings()
    gen = torch.Generator().manual_seed(0)
    shapes: dict[str, Any] = {}
    for name, (m, n) in SHAPES.items():
        weight = projection(m, n, gen)
        print(f"{name} {m}×{n}: SVD ...", file=sys.stderr, flush=True)
        svd_s = time_svd(weight)
        print(f"{name} {m}×{n}: dynaudit fit ...", file=sys.stderr, flush=True)
        shapes[name] = {"shape": [m, n], "svd_s": svd_s, **time_fit(weight, settings, args.steps)}
        del weight
    lm_svd = shapes["mlp"]["svd_s"] * _svd_flop(*LM_HEAD) / _svd_flop(*SHAPES["mlp"])
    lm_fit = time_fit(projection(*LM_HEAD, gen), settings, args.steps)
    per_matrix = {k: v["fit_s"] + v["metrics_s"] for k, v in shapes.items()}
    ours = BLOCKS * sum(PER_BLOCK[k] * per_matrix[k] for k in SHAPES)
    ours += lm_fit["fit_s"] + lm_fit["metrics_s"]
    theirs = BLOCKS * sum(PER_BLOCK[k] * shapes[k]["svd_s"] for k in SHAPES) + lm_svd
    result = {
        "machine": describe(),
        "threads": torch.get_num_threads(),
        "steps_timed": args.steps,
        "settings": settings.numeric(),
        "shapes": shapes,
        "lm_head": {"shape": list(LM_HEAD), "svd_s_scaled": lm_svd, **lm_fit},
        "llama_7b": {"dynaudit_s": ours, "weightwatcher_s": theirs, "ratio": ours / theirs},
    }
    for name, row in shapes.items():
        print(f"{name:7} {row['shape'][0]}×{row['shape'][1]}: SVD {row['svd_s']:.1f} s; "
              f"dynaudit block {row['block'][0]}×{row['block'][1]}: fit {row['fit_s']:.1f} s "
              f"+ metrics {row['metrics_s']:.2f} s")  # fmt: skip
    print(f"LLaMA-7B (225 matrices, reading excluded): dynaudit {ours / 60:.0f} min, "
          f"WeightWatcher {theirs / 60:.0f} min, ratio {ours / theirs:.2f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
