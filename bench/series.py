"""How dynaudit's cost grows with the checkpoint: ``python -m bench.series [--quick]``.

Per size of a generated LLaMA-shaped bf16 checkpoint (bench.checkpoint; real projection shapes),
in one run:

- the I/O floor: reading every tensor once and converting it to float32, in this process (the
  file was just written, so it is in the page cache: a floor, not a cold read);
- ``dynaudit measure`` as a whole process, with its peak anonymous RSS above the RSS after
  imports (bench._probe);
- ``dynaudit check`` of the same checkpoint against a baseline of it (the warm refits), as a
  whole process; the baseline itself is built first and timed too;
- WeightWatcher 0.7.7 ``analyze()`` on the same directory, as a whole process;

then the ratios the scale issue sets goals for and the exponent of cost against parameter count
(least squares on log-log). With ``--steps`` below the default, the cold-fit times are also
extrapolated linearly in steps to the default (as in bench.run).

Each size is held to ``--budget`` minutes (60 by default): from the previous size's seconds per
counted fit FLOP, the run predicts what this size costs at the requested steps and, if that is
over budget, fits with fewer steps so that it is not; its times are extrapolated to the default
like any other.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench.checkpoint import Shape, generate
from bench.machine import describe, load_average
from bench.run import (
    REPO,
    measure_dynaudit,
    measure_weightwatcher,
    require_success,
    revision_of_dynaudit,
    run_process,
)
from dynaudit.config import FitSettings
from dynaudit.dynamics.blocks import fit_flop

MIB = 2**20
# Goals of the scale issue (docs/performance.md).
GOALS = {"time": 1.0, "time_largest": 0.5, "memory": 3.0, "warm": 0.3, "exponent": 1.0}

# LLaMA-style shapes (full multi-head attention, vocab 32000 unless noted): ~50M and ~200M in
# quick mode; ~1.1B (TinyLlama's hidden and MLP sizes, 22 blocks) in the full mode.
SIZES = {
    "4M": Shape(hidden=256, intermediate=704, blocks=2, vocab=4096, heads=4),  # smoke test
    "50M": Shape(hidden=576, intermediate=1536, blocks=8, vocab=16384, heads=9),
    "220M": Shape(hidden=1024, intermediate=2816, blocks=12, vocab=32000, heads=16),
    "1.3B": Shape(hidden=2048, intermediate=5632, blocks=22, vocab=32000, heads=32),
}
QUICK = ("50M", "220M")
FULL = ("50M", "220M", "1.3B")
MIN_STEPS = 20  # below this a capped run says more about start-up than about fitting


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.series", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help=f"sizes {', '.join(QUICK)} only")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), help="these sizes only")
    parser.add_argument(
        "--steps", type=int, default=None, help="cold-fit steps (default: dynaudit's)"
    )
    parser.add_argument(
        "--seeds", type=int, default=1, help="K of the baseline the check uses (default 1)"
    )
    parser.add_argument("--threads", type=int, default=None, help="threads for both tools")
    parser.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="minutes per size; fewer cold-fit steps above it (default 60)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep checkpoints and logs here")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "series.json")
    return parser.parse_args(argv)  # fmt: skip


def io_floor(directory: Path) -> dict[str, float]:
    """Seconds to read every tensor of ``model.safetensors`` once, as float32."""
    from safetensors import safe_open

    started = time.perf_counter()
    count = 0
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            tensor = handle.get_tensor(name).float()
            count += tensor.numel()
            del tensor
    return {"seconds": time.perf_counter() - started, "values": count}


def _dynaudit(work: Path, command: list[str], what: str) -> dict[str, Any]:
    """A dynaudit CLI command as a whole process under the memory probe."""
    probe = work / f"{what}-probe.json"
    argv = [sys.executable, "-m", "bench._probe", str(probe), "--", *command]
    result = run_process(argv, work / f"{what}.log")
    require_success(result, f"dynaudit {what}")
    result["probe"] = json.loads(probe.read_text())
    return result


def fit_tflop(shape: Shape, settings: FitSettings, *, warm: bool = False) -> float:
    """Counted TFLOP of one cold fit (or warm refit) of every matrix of the checkpoint."""
    return sum(fit_flop(settings, m, n, warm=warm) for m, n in shape.projections().values()) / 1e12


def capped_steps(
    shape: Shape, previous: dict[str, Any] | None, steps: int, seeds: int, budget_s: float
) -> tuple[int, float | None]:
    """Cold-fit steps that keep this size within ``budget_s``, and the predicted seconds at
    ``steps``. The prediction takes the previous size's seconds per counted TFLOP for the cold
    fits (measure, and the baseline's ``seeds`` fits) and for the warm check, and scales
    WeightWatcher and everything else by the parameter count."""
    if previous is None:
        return steps, None
    rate = previous["dynaudit"]["fit_s"] / previous["fit_tflop_run"]
    cold = rate * (1 + seeds) * fit_tflop(shape, FitSettings(steps=steps))
    growth = shape_parameters(shape) / previous["parameters"]
    warm = previous["check"]["wall_s"] * seeds / previous["baseline_seeds"]
    warm *= fit_tflop(shape, FitSettings()) / previous["fit_tflop_default"]
    fixed = warm + growth * (previous["weightwatcher"]["wall_s"] + previous["io_floor"]["seconds"])
    predicted = cold + fixed
    if predicted <= budget_s:
        return steps, predicted
    fitting = int(steps * max(0.0, budget_s - fixed) / cold)
    return min(steps, max(MIN_STEPS, fitting)), predicted


def shape_parameters(shape: Shape) -> int:
    """Parameters of the generated checkpoint: the projections, the embedding and the norms."""
    projections = sum(m * n for m, n in shape.projections().values())
    return projections + shape.vocab * shape.hidden + (2 * shape.blocks + 1) * shape.hidden


def run_size(
    label: str,
    shape: Shape,
    work: Path,
    args: argparse.Namespace,
    threads: int,
    previous: dict[str, Any] | None,
) -> dict[str, Any]:
    console = Console(stderr=True)
    work.mkdir(parents=True, exist_ok=True)
    requested = args.steps or FitSettings().steps
    steps, predicted = capped_steps(shape, previous, requested, args.seeds, args.budget * 60)
    if steps < requested:
        console.print(f"[{label}] predicted {predicted / 60:.0f} min at {requested} steps, over "
                      f"the {args.budget:g}-minute budget: cold fits at {steps} steps")  # fmt: skip
    console.print(f"[{label}] generating {shape} ...")
    checkpoint = generate(work / "checkpoint", shape, seed=0)
    ckpt = Path(str(checkpoint["path"]))
    io = io_floor(ckpt)
    console.print(f"[{label}] I/O floor {io['seconds']:.1f} s; dynaudit measure ...")
    started = time.perf_counter()
    dyn = measure_dynaudit(ckpt, work, steps, threads)
    common = ["--threads", str(threads), "--steps", str(steps)]
    console.print(f"[{label}] baseline (K = {args.seeds}) ...")
    baseline = _dynaudit(work, ["baseline", str(ckpt), "--out", str(work / "baseline"),
                                "--seeds", str(args.seeds), *common], "baseline")  # fmt: skip
    console.print(f"[{label}] check against it ...")
    check = _dynaudit(work, ["check", str(ckpt), "--baseline", str(work / "baseline"),
                             "--no-cache", "--quiet", "--json", str(work / "check.json")],
                      "check")  # fmt: skip
    console.print(f"[{label}] WeightWatcher analyze ...")
    ww = measure_weightwatcher(ckpt, work, args.threads)
    elapsed = time.perf_counter() - started
    report = json.loads((work / "dynaudit.json").read_text())
    m, n = checkpoint["largest_matrix"]  # type: ignore[misc]
    largest = 4 * m * n
    default_steps = FitSettings().steps
    scale = default_steps / dyn["steps"]
    measure_s = dyn["wall_s"] - dyn["fit_s"] + dyn["fit_s"] * scale  # at the default steps
    return {
        "label": label,
        "checkpoint": checkpoint,
        "parameters": checkpoint["parameters"],
        "largest_matrix_bytes": largest,
        "steps": dyn["steps"],
        "budget": {
            "minutes": args.budget,
            "predicted_s": predicted,
            "elapsed_s": elapsed,
            "requested_steps": requested,
        },
        "io_floor": io,
        "dynaudit": dyn,
        "measure_s": measure_s,
        "fit_tflop_run": fit_tflop(shape, FitSettings(steps=dyn["steps"])),
        "fit_tflop_default": fit_tflop(shape, FitSettings()),
        "blocks": sum(1 for layer in report["layers"] if layer.get("block")),
        "baseline_seeds": args.seeds,
        "baseline": baseline,
        "check": check,
        "weightwatcher": ww,
        "ratios": {
            "time": measure_s / ww["wall_s"],
            "io": measure_s / io["seconds"],
            "memory": dyn["probe"]["rss_anon_added"] / largest,
            "check_memory": check["probe"]["rss_anon_added"] / largest,
            "warm": check["wall_s"] / measure_s,
        },
    }


def exponent(points: list[tuple[float, float]]) -> float | None:
    """Slope of log(cost) against log(size) by least squares."""
    if len(points) < 2:
        return None
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else None


def _table(results: dict[str, Any]) -> Table:
    title = "dynaudit vs WeightWatcher by size"
    if any(size["steps"] != results["default_steps"] for size in results["sizes"]):
        title += f" · cold-fit times extrapolated to {results['default_steps']} steps"
    table = Table(title=title)
    columns = ["size", "params", "sampled", "steps run", "measure s", "check s", "WW s", "I/O s",
               "time ratio", "/ I/O", "RSS / matrix", "check / measure"]  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for size in results["sizes"]:
        r = size["ratios"]
        table.add_row(
            size["label"], f"{size['parameters'] / 1e6:.0f} M",
            f"{size['blocks']}/{len(size['dynaudit']['layers_fitted'])}", str(size["steps"]),
            f"{size['measure_s']:.0f}", f"{size['check']['wall_s']:.0f}",
            f"{size['weightwatcher']['wall_s']:.0f}", f"{size['io_floor']['seconds']:.1f}",
            f"{r['time']:.2f}", f"{r['io']:.0f}", f"{r['memory']:.2f}", f"{r['warm']:.2f}",
        )  # fmt: skip
    return table


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    labels = args.sizes or list(QUICK if args.quick else FULL)
    machine = describe()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dynaudit-series-"))
    sizes = []
    try:
        for label in labels:
            previous = sizes[-1] if sizes else None
            sizes.append(run_size(label, SIZES[label], work / label, args, threads, previous))
            if args.workdir is None:  # one checkpoint on disk at a time
                shutil.rmtree(work / label, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    machine["load_average_end"] = load_average()
    results: dict[str, Any] = {
        "dynaudit_revision": revision_of_dynaudit(),
        "machine": machine,
        "threads": threads,
        "default_steps": FitSettings().steps,
        "baseline_seeds": args.seeds,
        "sizes": sizes,
        "exponents": {
            "dynaudit": exponent([(s["parameters"], s["measure_s"]) for s in sizes]),
            "weightwatcher": exponent(
                [(s["parameters"], s["weightwatcher"]["wall_s"]) for s in sizes]
            ),
            "io": exponent([(s["parameters"], s["io_floor"]["seconds"]) for s in sizes]),
        },
        "goals": GOALS,
    }
    Console(soft_wrap=False, width=max(130, Console().width)).print(_table(results))
    exps = results["exponents"]
    if exps["dynaudit"] is not None:
        print(f"cost exponent vs parameters: dynaudit {exps['dynaudit']:.2f}, WeightWatcher "
              f"{exps['weightwatcher']:.2f}, I/O {exps['io']:.2f} "
              f"(goal ≈ {GOALS['exponent']:g})")  # fmt: skip
    print(f"dynaudit {results['dynaudit_revision']}; {machine['cpu_model']}, {machine['cores']} "
          f"cores, {threads} threads; load average {machine['load_average_start'][0]} → "
          f"{machine['load_average_end'][0]}; check against a K = {args.seeds} "
          "baseline")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
