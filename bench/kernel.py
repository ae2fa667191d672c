"""In-process throughput of the fit kernel against a plain float32 ``torch.mm``.

Both are timed in the same process with the same torch thread count, so the ratio says how
much of the machine's matmul rate the fit reaches (the fit's FLOP are counted as dynaudit
counts them: ``6·m·n·q_dim`` per step).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from bench.checkpoint import projection
from dynaudit.config import FitSettings
from dynaudit.dynamics.kernel import fit_coordinates, init_coordinates

__all__ = ["fit_throughput", "mm_throughput"]


def mm_throughput(size: int = 2048, reps: int = 10, seed: int = 0) -> dict[str, Any]:
    """GFLOP/s of ``size × size`` float32 ``torch.mm`` (2·n³ FLOP per call), best and median
    call. The best is what the ratio uses: on a shared machine it is the least disturbed."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)  # warm-up: first call pays for MKL's dispatch and thread start
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - started)
    flop = 2 * size**3
    return {
        "size": size,
        "reps": reps,
        "seconds_best": min(times),
        "seconds_median": statistics.median(times),
        "gflops": flop / min(times) / 1e9,
        "gflops_median": flop / statistics.median(times) / 1e9,
    }


def fit_throughput(
    m: int, n: int, steps: int, settings: FitSettings, seed: int = 0, repeats: int = 3
) -> dict[str, Any]:
    """Time ``repeats`` runs of ``steps`` Adam steps of :func:`fit_coordinates` on one
    ``m × n`` matrix, after a one-step warm-up; the best run gives the rate (as for the mm).

    The target is one generated projection divided by its RMS, as the engine passes it. The
    per-matrix time is extrapolated to the steps the engine would run (the cost of a step does
    not depend on the step index: the schedule only changes a scalar).
    """
    gen = torch.Generator().manual_seed(seed)
    weight = projection(m, n, gen)
    target = (weight / weight.pow(2).mean().sqrt()).unsqueeze(0)
    rms = target.pow(2).mean(dim=(1, 2)).sqrt()
    init = init_coordinates(m, n, settings, [seed], rms)
    times = []
    with torch.no_grad():
        fit_coordinates(target, settings, init, steps=1)  # first-touch of the buffers
        for _ in range(repeats):
            started = time.perf_counter()
            fit_coordinates(target, settings, init, steps=steps)
            times.append(time.perf_counter() - started)
    per_step = min(times) / steps
    flop_per_step = 6 * m * n * settings.q_dim
    try:  # newer kernels give over-parameterised (small) matrices more steps
        from dynaudit.dynamics.kernel import fit_steps

        per_matrix = fit_steps(settings, m, n)
    except ImportError:
        per_matrix = settings.steps
    return {
        "m": m,
        "n": n,
        "q_dim": settings.q_dim,
        "pieces": settings.pieces,
        "steps_timed": steps,
        "repeats": repeats,
        "seconds_per_step": per_step,
        "seconds_per_step_median": statistics.median(times) / steps,
        "steps_per_s": 1 / per_step,
        "gflops": flop_per_step / per_step / 1e9,
        "gflops_median": flop_per_step * steps / statistics.median(times) / 1e9,
        "steps_per_matrix": per_matrix,
        "seconds_per_matrix": per_step * per_matrix,
    }
