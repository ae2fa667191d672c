"""Cost against the number of layers: ``python -m bench.layers --counts 2000 5000 20000``.

Issue 18 found ``measure`` quadratic in the number of same-shape layers (2,000 2 × 2 tensors
took 163 s and 20,000 did not finish in ten minutes). Per count, this builds a generic
checkpoint of that many 2 × 2 float32 tensors (``safetensors`` ``save_file``; all one shape, so
the engine fits them as one batch) and runs, each as a whole process on one thread:

- ``dynaudit measure --no-cache`` with a tiny fit (q_dim 16, 4 pieces, 30 steps);
- ``dynaudit baseline`` with the same fit (``--seeds``, 1 by default);
- ``dynaudit inspect --weights`` (headers, then every matrix's singular values).

It reports each run's process CPU time, the fixed cost (the same command on a one-layer
checkpoint: imports, planning, writing), the CPU time per layer above that fixed cost, and that
per-layer time as a ratio to the smallest count's. Linear cost keeps the ratio near 1; a step
that scans all the layers for each layer makes it grow with the count (ten times the layers,
about ten times the ratio). The log-log exponent of the per-layer total is printed too.

Results go to ``--out`` (default bench/results/layers.json) with the machine and its load
average: on a shared machine, run it when the load is below the core count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench.machine import describe, load_average
from bench.run import REPO, require_success, revision_of_dynaudit, run_process
from bench.series import exponent

FIT = ["--q-dim", "16", "--pieces", "4", "--steps", "30"]
COMMANDS = ("measure", "baseline", "inspect")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.layers", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--counts", type=int, nargs="+", default=[2000, 5000, 20000],
        help="numbers of layers (default: 2000 5000 20000)",
    )  # fmt: skip
    parser.add_argument(
        "--commands", nargs="+", choices=COMMANDS, default=list(COMMANDS),
        help="what to time (default: all three)",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=1, help="baseline seeds (default 1)")
    parser.add_argument(
        "--default-fit", action="store_true",
        help="dynaudit's default fit settings (q_dim 128, H 8, 400 steps; the issue's own "
        "measurement) instead of the tiny fit",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "layers.json")
    args = parser.parse_args(argv)
    if any(count < 1 for count in args.counts):
        parser.error("--counts must be positive")
    return args


def tiny_checkpoint(out: Path, count: int) -> Path:
    """``count`` 2 × 2 float32 layers named l0.weight, l1.weight, … (seeded)."""
    gen = torch.Generator().manual_seed(0)
    out.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file(
        {f"l{i}.weight": torch.randn(2, 2, generator=gen) for i in range(count)},
        str(out / "model.safetensors"),
    )
    return out


def run_command(command: str, ckpt: Path, work: Path, seeds: int, fit: list[str]) -> dict[str, Any]:
    """One whole-process run of ``dynaudit command`` on ``ckpt``, on one thread."""
    dynaudit = [sys.executable, "-m", "dynaudit"]
    if command == "measure":
        cli = ["measure", str(ckpt), "--no-cache", "--quiet", "--threads", "1", *fit,
               "--json", str(work / "report.json")]  # fmt: skip
    elif command == "baseline":
        cli = ["baseline", str(ckpt), "--out", str(work / "baseline"), "--threads", "1",
               "--seeds", str(seeds), *fit]  # fmt: skip
    else:
        cli = ["inspect", str(ckpt), "--weights", "--json", "-"]
    # A cache of its own: no hit from an earlier run, nothing left in the user's cache.
    env = {**ONE_THREAD, "DYNAUDIT_CACHE_DIR": str(work / "cache")}
    result = run_process([*dynaudit, *cli], work / f"{command}.log", env)
    require_success(result, f"dynaudit {command} ({ckpt})")
    return {k: result[k] for k in ("cpu_s", "wall_s", "max_rss_bytes", "load_before")}


def measure_counts(
    counts: list[int], commands: list[str], seeds: int, fit: list[str]
) -> dict[str, Any]:
    """Every command at one layer (its fixed cost) and at each count."""
    runs: dict[str, dict[int, dict[str, Any]]] = {command: {} for command in commands}
    with tempfile.TemporaryDirectory(prefix="dynaudit-layers-") as tmp:
        for count in sorted({1, *counts}):
            ckpt = tiny_checkpoint(Path(tmp) / f"ckpt{count}", count)
            for command in commands:
                work = Path(tmp) / f"{command}{count}"
                work.mkdir()
                runs[command][count] = run_command(command, ckpt, work, seeds, fit)
                print(f"{command} × {count}: {runs[command][count]['cpu_s']:.1f} s CPU",
                      file=sys.stderr)  # fmt: skip
    return {command: summarise(by_count, counts) for command, by_count in runs.items()}


def summarise(by_count: dict[int, dict[str, Any]], counts: list[int]) -> dict[str, Any]:
    """Per count: CPU time, per-layer CPU time above the one-layer run, ratio to the smallest
    count's per-layer time; and the log-log exponent of the per-layer total."""
    fixed = by_count[1]["cpu_s"]
    rows = []
    for count in sorted(set(counts)):
        run = by_count[count]
        variable = max(0.0, run["cpu_s"] - fixed)
        rows.append(
            {
                "layers": count, **run, "fixed_cpu_s": fixed,
                "cpu_per_layer_ms": 1000 * variable / count,
                "cpu_per_layer_total_ms": 1000 * run["cpu_s"] / count,
            }
        )  # fmt: skip
    smallest = rows[0]["cpu_per_layer_ms"]
    for row in rows:
        row["ratio_to_smallest"] = row["cpu_per_layer_ms"] / smallest if smallest else None
    points = [(row["layers"], row["cpu_s"] - fixed) for row in rows if row["cpu_s"] > fixed]
    return {"fixed": by_count[1], "counts": rows, "exponent": exponent(points)}


def table(results: dict[str, Any]) -> Table:
    out = Table(title="dynaudit cost per layer (2 × 2 same-shape layers, one thread)")
    for column in ("command", "layers", "CPU s", "wall s", "fixed s", "ms / layer", "ratio"):
        out.add_column(column, justify="left" if column == "command" else "right")
    for command, summary in results["commands"].items():
        for row in summary["counts"]:
            ratio = row["ratio_to_smallest"]
            out.add_row(
                command, str(row["layers"]), f"{row['cpu_s']:.1f}", f"{row['wall_s']:.1f}",
                f"{row['fixed_cpu_s']:.1f}", f"{row['cpu_per_layer_ms']:.2f}",
                "—" if ratio is None else f"{ratio:.2f}",
            )  # fmt: skip
        slope = summary["exponent"]
        out.add_row(command, "exponent", "" if slope is None else f"{slope:.2f}", *[""] * 4)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    machine = describe()
    fit = [] if args.default_fit else FIT
    commands = measure_counts(args.counts, args.commands, args.seeds, fit)
    results = {
        "benchmark": "bench.layers",
        "dynaudit_revision": revision_of_dynaudit(),
        "settings": {"fit": fit or "defaults", "threads": 1, "baseline_seeds": args.seeds},
        "machine": machine,
        "load_average_end": load_average(),
        "commands": commands,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(args.out)
    Console().print(table(results))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
