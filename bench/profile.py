"""Where the fit of one matrix spends its time and memory: ``python -m bench.profile``.

``ops``: time a few fit steps (GFLOP/s), then run them under ``torch.profiler`` and group the
aten ops by what limits them (matmul, elementwise passes, reductions, copies and allocation,
views), printing the top ops. ``bench.protocol`` calls the same function for its kernel table.
``memory``: fit, discrepancy and reconstruction error of one matrix as the engine runs them,
with the peak added RssAnon of each phase.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench._probe import Sampler, rss_anon_bytes
from bench.checkpoint import projection
from dynaudit.config import FitSettings
from dynaudit.dynamics import discrepancy, fit_coordinates, init_coordinates
from dynaudit.dynamics.metrics import squared_error

MIB = 2**20

# What bounds each op: matmuls are compute-bound, elementwise passes and reductions stream the
# (b, H, rows, n) buffers, copies and allocations move or provide memory without arithmetic,
# and views only rewrite metadata (their time is call overhead, large for small matrices).
_CATEGORY = {
    "matmul": ("aten::bmm", "aten::mm", "aten::addmm", "aten::baddbmm", "aten::matmul"),
    "elementwise": (
        "aten::clamp_", "aten::clamp", "aten::clamp_min", "aten::clamp_min_", "aten::sqrt_",
        "aten::sqrt", "aten::rsqrt", "aten::div", "aten::div_", "aten::sub", "aten::sub_",
        "aten::mul", "aten::mul_", "aten::add", "aten::add_", "aten::neg", "aten::neg_",
        "aten::addcmul_", "aten::addcdiv_", "aten::pow", "aten::rsub", "aten::lerp_",
        "aten::square", "aten::reciprocal", "aten::reciprocal_", "aten::sign", "aten::abs",
        "aten::where", "aten::maximum", "aten::minimum", "aten::exp", "aten::log",
    ),
    "reduction": ("aten::sum", "aten::mean", "aten::amax", "aten::linalg_vector_norm"),
    "copy/alloc": (
        "aten::cat", "aten::copy_", "aten::clone", "aten::empty", "aten::empty_like",
        "aten::zeros", "aten::zeros_like", "aten::ones", "aten::ones_like", "aten::zero_",
        "aten::fill_", "aten::to", "aten::_to_copy", "aten::empty_strided", "aten::resize_",
        "aten::contiguous", "aten::index_select",
    ),
    "view": (
        "aten::view", "aten::slice", "aten::as_strided", "aten::select", "aten::transpose",
        "aten::alias", "aten::unsqueeze", "aten::squeeze", "aten::mT", "aten::t",
        "aten::expand", "aten::reshape", "aten::permute", "aten::_reshape_alias",
        "aten::unflatten", "aten::flatten", "aten::narrow", "aten::split", "aten::chunk",
    ),
}  # fmt: skip
CATEGORIES = (*_CATEGORY, "other")


def _category(name: str) -> str:
    for category, names in _CATEGORY.items():
        if name in names:
            return category
    return "other"


def _target(m: int, n: int, seed: int) -> torch.Tensor:
    weight = projection(m, n, torch.Generator().manual_seed(seed))
    return (weight / weight.pow(2).mean().sqrt()).unsqueeze(0)


def fit_passes(
    m: int,
    n: int,
    steps: int,
    settings: FitSettings,
    *,
    batch: int = 1,
    repeats: int = 3,
    top: int = 15,
) -> dict[str, Any]:
    """Rate and per-pass split of ``steps`` fit steps on ``batch`` same-shape m × n matrices.

    After a one-step warm-up (first touch of the buffers), ``repeats`` unprofiled runs give the
    rate: the best run, as ``bench.kernel`` takes the best ``torch.mm`` call, since on a shared
    machine it is the least disturbed; the process CPU time is recorded beside it. One more run
    under ``torch.profiler`` gives each aten op's self time, grouped by what bounds it
    (``CATEGORIES``). Shares are of the profiled aten time; ``aten_share_of_wall`` says how
    much of the profiled run that time covers (the rest is Python, code outside aten such as a
    fused kernel, and the profiler's own overhead).
    """
    from torch.profiler import ProfilerActivity, profile

    target = torch.cat([_target(m, n, seed) for seed in range(batch)])
    rms = target.pow(2).mean(dim=(1, 2)).sqrt()
    init = init_coordinates(m, n, settings, list(range(batch)), rms)
    walls, cpus = [], []
    with torch.no_grad():
        fit_coordinates(target, settings, init, steps=1)
        before = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(repeats):
            started, cpu = time.perf_counter(), time.process_time()
            fit_coordinates(target, settings, init, steps=steps)
            walls.append(time.perf_counter() - started)
            cpus.append(time.process_time() - cpu)
        after = resource.getrusage(resource.RUSAGE_SELF)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            fit_coordinates(target, settings, init, steps=steps)
            profiled_wall = time.perf_counter() - started
    ops = [
        {"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count}
        for e in prof.key_averages()
        if e.self_cpu_time_total > 0
    ]
    ops.sort(key=lambda op: -op["self_s"])
    total = sum(op["self_s"] for op in ops)
    by_category = dict.fromkeys(CATEGORIES, 0.0)
    for op in ops:
        op["share"] = op["self_s"] / total
        op["category"] = _category(op["op"])
        by_category[op["category"]] += op["self_s"]
    per_step = min(walls) / steps
    return {
        "m": m,
        "n": n,
        "batch": batch,
        "steps": steps,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "seconds_per_step": per_step,
        "seconds_per_step_median": statistics.median(walls) / steps,
        "cpu_s_per_step": min(cpus) / steps,
        "gflops": 6 * batch * m * n * settings.q_dim / per_step / 1e9,
        "user_s_per_run": (after.ru_utime - before.ru_utime) / repeats,
        "sys_s_per_run": (after.ru_stime - before.ru_stime) / repeats,
        "minor_faults_per_step": (after.ru_minflt - before.ru_minflt) / (repeats * steps),
        "profiled_self_s": total,
        "aten_share_of_wall": total / profiled_wall,
        "categories": {k: v / total for k, v in by_category.items()},
        "top": ops[:top],
    }


def profile_memory(m: int, n: int, steps: int, settings: FitSettings, batch: int) -> dict[str, Any]:
    """Peak added RssAnon (over the RssAnon before any work) of each phase the engine runs on
    a batch of ``batch`` same-shape matrices; phases are cumulative, as in the engine."""
    phases: dict[str, float] = {}

    def phase(name: str, work: Any) -> Any:
        sampler = Sampler(0.002)
        sampler.start()
        out = work()
        sampler.stop()
        phases[name] = (sampler.peak - baseline) / MIB
        return out

    def warm_up() -> None:
        # A tiny fit starts the thread pool and the BLAS/allocator state that any fit needs.
        small = _target(64, 64, 1)
        rms = small.pow(2).mean(dim=(1, 2)).sqrt()
        fit_coordinates(small, settings, init_coordinates(64, 64, settings, [1], rms), steps=2)

    def read() -> torch.Tensor:
        # As the engine does (since 48f29a3): a private float32 copy of each stored matrix,
        # scaled in place, concatenated only when the batch has more than one matrix.
        floats = [w.float() for w in stored]
        for f in floats:
            # The norm without a squared copy, as the engine's chunked rms() does.
            f.div_(torch.linalg.vector_norm(f) / f.numel() ** 0.5)
        return floats[0].unsqueeze(0) if batch == 1 else torch.stack(floats)

    gen = torch.Generator().manual_seed(0)
    stored = [projection(m, n, gen).to(torch.bfloat16) for _ in range(batch)]
    work = _work_bytes(settings, batch, m, n)
    baseline = rss_anon_bytes()  # the stored bf16 weights are file-backed in the engine
    with torch.no_grad():
        phase("runtime warm-up (64×64 fit)", warm_up)
        target = phase("read: f32 copy, scaled", read)
        rms = target.pow(2).mean(dim=(1, 2)).sqrt()
        seeds = list(range(batch))
        init = phase("init coordinates", lambda: init_coordinates(m, n, settings, seeds, rms))
        coords = phase("fit", lambda: fit_coordinates(target, settings, init, steps=steps))
        phase("discrepancy", lambda: discrepancy(coords))
        phase("squared error", lambda: squared_error(coords, target, work))
    rows = max(1, min(m, work // (4 * batch * settings.pieces * n)))
    return {
        "m": m,
        "n": n,
        "batch": batch,
        "matrix_f32_mib": 4 * m * n / MIB,
        "distance_buffer_mib": 4 * batch * settings.pieces * rows * n / MIB,
        "row_tiles": -(-m // rows),
        "coordinates_mib": 4 * batch * (m + n) * settings.q_dim / MIB,
        "peak_added_mib_by_phase": phases,
    }


def _work_bytes(settings: FitSettings, b: int, m: int, n: int) -> int:
    """The fit's work-buffer budget as the installed kernel computes it."""
    try:  # kernels since 48f29a3 cap it at the batch's own float32 size
        from dynaudit.dynamics.kernel import work_bytes

        return int(work_bytes(settings, b, m, n))
    except ImportError:
        return settings.tile_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("what", choices=["ops", "memory"])
    parser.add_argument("--m", type=int, default=2048)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--batch", type=int, default=1, help="same-shape matrices fitted together")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = FitSettings()
    if args.what == "ops":
        result = fit_passes(args.m, args.n, args.steps, settings, batch=args.batch, top=args.top)
        print(f"fit {args.batch} × {args.m}×{args.n}, {args.steps} steps, {result['threads']} "
              f"threads: {result['seconds_per_step']:.4f} s/step, {result['gflops']:.1f} GFLOP/s, "
              f"user {result['user_s_per_run']:.2f} s, sys {result['sys_s_per_run']:.2f} s per run,"
              f" {result['minor_faults_per_step']:.0f} minor faults per step; aten ops cover "
              f"{result['aten_share_of_wall']:.0%} of the profiled run")  # fmt: skip
        for category, share in result["categories"].items():
            print(f"  {category:<12} {share:6.1%}")
        for op in result["top"]:
            print(f"  {op['op']:<22} {op['share']:6.1%}  {op['calls']:>6} calls  {op['category']}")
    else:
        result = profile_memory(args.m, args.n, args.steps, settings, args.batch)
        print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
