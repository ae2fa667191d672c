"""One command, one generated checkpoint, three ratios: ``python -m bench.run [--quick]``.

1. generate a seeded LLaMA-shaped bf16 checkpoint in a temporary directory;
2. time ``dynaudit measure`` and WeightWatcher's ``analyze()`` on it, each as a whole process;
3. time the fit kernel in-process against ``torch.mm`` with the same thread count;
4. record dynaudit's peak anonymous memory against the largest matrix in float32;
then print the table and write the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench.checkpoint import Shape, generate
from bench.kernel import fit_throughput, mm_throughput
from bench.machine import describe, load_average
from dynaudit.config import FitSettings

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20

# Goals the ratios are judged against (docs/performance.md).
GOAL_TIME = 1.0  # dynaudit measure / WeightWatcher analyze, whole process
GOAL_KERNEL = 0.25  # fit GFLOP/s / torch.mm GFLOP/s
GOAL_MEMORY = 3.0  # peak added RssAnon / largest matrix in float32

QUICK = Shape(hidden=512, intermediate=1408, blocks=1, vocab=1024, heads=8)
FULL = Shape(hidden=2048, intermediate=5632, blocks=1, vocab=4096, heads=16)
QUICK_STEPS = 100  # keeps --quick under two minutes; the time is extrapolated to the default


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="hidden 512: about 30 s on a quiet 2-core machine"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"Adam steps passed to dynaudit (default: its own, {FitSettings().steps}; "
        f"--quick: {QUICK_STEPS})",
    )
    parser.add_argument("--blocks", type=int, default=1, help="transformer blocks (default 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for both tools: torch's for dynaudit and the kernel, the BLAS/OpenMP "
        "pools' for WeightWatcher (default: each library's own)",
    )
    parser.add_argument("--kernel-steps", type=int, default=None, help="fit steps timed in-process")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated weights")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint here")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "results" / "latest.json",
        help="results JSON (default bench/results/latest.json)",
    )
    return parser.parse_args(argv)


def run_process(
    argv: list[str], log: Path, extra_env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``argv`` to completion; wall clock, CPU time and peak total RSS of that process."""
    path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), **(extra_env or {})}
    load_before = load_average()
    with log.open("wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        # wait4 gives this child's own rusage (getrusage(CHILDREN) would mix all children).
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return {
        "argv": argv,
        "exit_code": proc.returncode,
        "wall_s": wall,
        "cpu_s": cpu,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,  # page faults of fresh buffers show up here
        "cpu_utilisation": cpu / wall if wall else 0.0,
        "max_rss_bytes": usage.ru_maxrss * 1024,  # total (anon + file-backed) RSS, Linux KiB
        "minor_faults": usage.ru_minflt,
        "load_before": load_before,
        "load_after": load_average(),
        "log": str(log),
    }


def revision_of_dynaudit() -> str:
    """The dynaudit commit measured, with ``-dirty`` when the work tree has local changes."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=REPO, capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def require_success(result: dict[str, Any], what: str) -> None:
    if result["exit_code"] != 0:
        tail = Path(result["log"]).read_text(errors="replace")[-3000:]
        raise SystemExit(f"{what} failed (exit {result['exit_code']}):\n{tail}")


def measure_dynaudit(ckpt: Path, work: Path, steps: int | None, threads: int) -> dict[str, Any]:
    """Whole-process ``dynaudit measure`` under the memory probe."""
    probe, report = work / "probe.json", work / "dynaudit.json"
    # --no-cache: a result cached by an earlier run of the same generated checkpoint (same
    # bytes, same settings) would otherwise be timed as a fit.
    cli = ["measure", str(ckpt), "--quiet", "--no-cache", "--json", str(report), "--threads",
           str(threads)]  # fmt: skip
    if steps is not None:
        cli += ["--steps", str(steps)]
    argv = [sys.executable, "-m", "bench._probe", str(probe), "--", *cli]
    result = run_process(argv, work / "dynaudit.log")
    require_success(result, "dynaudit measure")
    result["probe"] = json.loads(probe.read_text())
    data = json.loads(report.read_text())
    if (data.get("cache") or {}).get("hit"):
        raise RuntimeError(f"{report}: a cache hit, not a measurement")
    measured = [layer for layer in data["layers"] if layer.get("seconds") is not None]
    result["report_seconds"] = data["seconds"]
    result["layers_fitted"] = [layer["name"] for layer in measured]
    result["layer_seconds"] = {layer["name"]: layer["seconds"] for layer in measured}
    result["fit_s"] = sum(result["layer_seconds"].values())
    result["steps"] = data["settings"]["steps"]
    result["threads"] = data["settings"]["threads"]
    result["fidelity"] = data["summary"]["all"]["fidelity"]
    return result


def measure_weightwatcher(ckpt: Path, work: Path, threads: int | None) -> dict[str, Any]:
    """Whole-process WeightWatcher; ``threads`` caps its BLAS/OpenMP pools like dynaudit's."""
    out = work / "weightwatcher.json"
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    env = {name: str(threads) for name in names} if threads is not None else None
    argv = [sys.executable, "-m", "bench._ww", str(ckpt), str(out)]
    result = run_process(argv, work / "ww.log", env)
    result["thread_env"] = env or {}
    require_success(result, "WeightWatcher analyze")
    result.update(json.loads(out.read_text()))
    return result


def _extrapolate(dyn: dict[str, Any], default_steps: int) -> float:
    """Whole-process time at ``default_steps``: the per-layer time (read + fit + metrics) is
    scaled linearly in steps, the rest (start-up, planning, hashing) kept. Scaling the read and
    metrics as well makes this a slight over-estimate."""
    scale = default_steps / dyn["steps"]
    return float(dyn["wall_s"] - dyn["fit_s"] + dyn["fit_s"] * scale)


def _table(res: dict[str, Any]) -> Table:
    dyn, ww, ker, mm = res["dynaudit"], res["weightwatcher"], res["kernel"], res["mm"]
    r, probe = res["ratios"], res["dynaudit"]["probe"]
    table = Table(title=f"dynaudit vs WeightWatcher {ww['version']} · {res['mode']} mode")
    for column in ("quantity", "dynaudit", "reference", "ratio", "goal", "met"):
        table.add_column(column, justify="left" if column == "quantity" else "right")

    def judged(ratio: float, goal: float, at_most: bool, percent: bool = False) -> list[str]:
        ok = ratio <= goal if at_most else ratio >= goal
        shown = f"{ratio:.1%}" if percent else f"{ratio:.2f}"
        limit = f"{goal:.0%}" if percent else f"{goal:g}"
        return [shown, f"{'≤' if at_most else '≥'} {limit}", "yes" if ok else "NO"]

    rows: list[list[str]] = [
        [f"whole process, s (dynaudit {dyn['steps']} steps | WW analyze)",
         f"{dyn['wall_s']:.1f}", f"{ww['wall_s']:.1f}", *judged(r["time"], GOAL_TIME, True)],
    ]  # fmt: skip
    if "time_extrapolated" in r:
        rows.append(
            [f"  dynaudit extrapolated to {res['default_steps']} steps, s",
             f"{dyn['extrapolated_s']:.0f}", f"{ww['wall_s']:.1f}",
             *judged(r["time_extrapolated"], GOAL_TIME, True)]
        )  # fmt: skip
    rows += [
        [f"fit {ker['m']}×{ker['n']} | torch.mm {mm['size']}², GFLOP/s (best run)",
         f"{ker['gflops']:.1f}", f"{mm['gflops']:.1f}",
         *judged(r["kernel"], GOAL_KERNEL, False, percent=True)],
        ["  fit steps/s | s per matrix at the default steps",
         f"{ker['steps_per_s']:.2f}", f"{ker['seconds_per_matrix']:.0f}", "", "", ""],
        ["peak added RssAnon | largest matrix f32, MiB",
         f"{probe['rss_anon_added'] / MIB:.1f}", f"{res['largest_matrix_bytes'] / MIB:.1f}",
         *judged(r["memory"], GOAL_MEMORY, True)],
        ["  peak total RSS of the process (dynaudit | WW), MiB",
         f"{dyn['max_rss_bytes'] / MIB:.0f}", f"{ww['max_rss_bytes'] / MIB:.0f}", "", "", ""],
        ["  matrices analysed (dynaudit | WW)",
         str(len(dyn["layers_fitted"])), str(len(ww["layers"])), "", "", ""],
        ["  CPU utilisation, cpu s / wall s (dynaudit | WW)",
         f"{dyn['cpu_utilisation']:.2f}", f"{ww['cpu_utilisation']:.2f}", "", "", ""],
    ]  # fmt: skip
    for row in rows:
        table.add_row(*row)
    return table


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    shape = QUICK if args.quick else FULL
    shape = Shape(shape.hidden, shape.intermediate, args.blocks, shape.vocab, shape.heads)
    default_steps = FitSettings().steps
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else None)
    kernel_steps = args.kernel_steps or (20 if args.quick else 5)
    console = Console(stderr=True)
    machine = describe()
    machine["torch_threads_used"] = threads
    revision = revision_of_dynaudit()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="dynaudit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        console.print(f"[1/4] generating the checkpoint in {work} ...")
        started = time.perf_counter()
        checkpoint = generate(work / "checkpoint", shape, seed=args.seed)
        checkpoint["seconds"] = time.perf_counter() - started
        ckpt = Path(str(checkpoint["path"]))

        console.print(f"[2/4] fit kernel and torch.mm in-process ({threads} threads) ...")
        size = 512 if args.quick else 2048
        load = load_average()
        kernel = fit_throughput(size, size, kernel_steps, FitSettings(), seed=args.seed)
        mm = mm_throughput(2048)
        kernel["load_before"] = mm["load_before"] = load

        console.print(f"[3/4] dynaudit measure ({steps or default_steps} steps) ...")
        dyn = measure_dynaudit(ckpt, work, steps, threads)
        console.print("[4/4] WeightWatcher analyze ...")
        ww = measure_weightwatcher(ckpt, work, args.threads)

        m, n = checkpoint["largest_matrix"]  # type: ignore[misc]
        largest = 4 * m * n
        ratios = {
            "time": dyn["wall_s"] / ww["wall_s"],
            "kernel": kernel["gflops"] / mm["gflops"],
            "memory": dyn["probe"]["rss_anon_added"] / largest,
        }
        if dyn["steps"] < default_steps:
            dyn["extrapolated_s"] = _extrapolate(dyn, default_steps)
            ratios["time_extrapolated"] = dyn["extrapolated_s"] / ww["wall_s"]
        machine["load_average_end"] = load_average()
        results: dict[str, Any] = {
            "mode": "quick" if args.quick else "full",
            "default_steps": default_steps,
            "steps": dyn["steps"],
            "threads": threads,
            "dynaudit_revision": revision,
            "machine": machine,
            "checkpoint": checkpoint,
            "largest_matrix_bytes": largest,
            "dynaudit": dyn,
            "weightwatcher": ww,
            "kernel": kernel,
            "mm": mm,
            "ratios": ratios,
            "goals": {"time": GOAL_TIME, "kernel": GOAL_KERNEL, "memory": GOAL_MEMORY},
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    # Wide enough for one line per row also when stdout is a pipe or a file.
    Console(soft_wrap=False, width=max(120, Console().width)).print(_table(results))
    load = machine["load_average_start"]
    print(
        f"dynaudit {revision}; machine: {machine['cpu_model']}, {machine['cores']} cores, "
        f"torch {machine['torch']}, "
        f"{threads} threads; load average {load[0]} at start, "
        f"{machine['load_average_end'][0]} at end"
        + (" (other jobs were running: timings may be inflated)" if load[0] > 0.5 else "")
    )
    if "time_extrapolated" in ratios:
        print(
            f"dynaudit ran {dyn['steps']} steps (default {default_steps}); the extrapolated row "
            "scales its per-layer time linearly in steps."
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
