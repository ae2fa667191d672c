"""How far real fine-tunes and damage move a layer's weights, exactly and as the gate's sketch
estimates it, and how noise-like the change is (the ``max_weight_change`` and
``max_noise_change`` rules, docs/gate.md "Weight change").

    python -m experiments.weight_change --out docs/evidence/weight-change.json   # ~2 min

The cases are the gate calibration's (experiments/calibrate_gate.py: the same trained tiny
LLaMA, fine-tunes and damaged copies) and integer-quantisation round trips; no fits are run.
Per case: the largest and median relative change ‖W' − W‖ / ‖W‖ over the layers, the
sketch's worst relative error, the range of the change's noise likeness over the layers that
moved, and which layers the two rules (at the default policy) would fail.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from experiments._cli import experiment_main
from experiments.calibrate_gate import make_cases
from experiments.derived import derive, quantised


def _layers(path: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(path / "model.safetensors"))
    return {k: v for k, v in state.items() if v.dim() == 2 and ".layers." in k}


def run(quick: bool, work: Path) -> dict[str, Any]:
    from dynaudit.dynamics.sketch import sketch, weight_figures
    from dynaudit.gate import weight_damage
    from dynaudit.schema import Policy

    policy = Policy()

    cases = make_cases(quick, work)
    cases["quantised"] = {
        f"int{bits} round trip (per-row absmax)": derive(
            cases["self"]["base"], work / f"int{bits}", quantised(bits)
        )
        for bits in (8, 4, 3)
    }
    base = _layers(cases["self"]["base"])
    reference = {name: sketch(w[None], name) for name, w in base.items()}
    rows = []
    for kind, group in cases.items():
        for case, path in group.items():
            exact, errors, likeness, flagged = {}, [], [], []
            for name, w in _layers(path).items():
                exact[name] = float((w - base[name]).norm() / base[name].norm())
                estimate, noise_like = weight_figures(w[None], reference[name], name)
                if exact[name] > 0 and estimate is not None:
                    errors.append(abs(estimate / exact[name] - 1))
                if noise_like is not None:
                    likeness.append(noise_like)
                if weight_damage(estimate, noise_like, policy):
                    flagged.append(name)
            top = max(exact, key=lambda n: exact[n])
            rows.append({
                "case": case, "kind": kind, "max": exact[top], "max_layer": top,
                "median": statistics.median(exact.values()),
                "sketch_max_error": max(errors, default=0.0),
                "noise_likeness": [min(likeness), statistics.median(likeness), max(likeness)]
                if likeness else None,
                "flagged": flagged,
            })  # fmt: skip
    return {"rows": rows}


def show(result: dict[str, Any]) -> None:
    print(f"{'case':48} {'kind':8} {'largest':>8} {'median':>8} {'sketch err':>10} "
          f"{'noise likeness':>17} flagged")  # fmt: skip
    for row in result["rows"]:
        like = row["noise_likeness"]
        shown = f"{like[0]:.2f}–{like[2]:.2f} ({like[1]:.2f})" if like else "—"
        print(f"{row['case']:48} {row['kind']:8} {row['max'] * 100:7.1f}% "
              f"{row['median'] * 100:7.1f}% {row['sketch_max_error'] * 100:9.1f}% "
              f"{shown:>17} {len(row['flagged'])}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    experiment_main(__doc__, "weight-change", run, show, argv=argv)


if __name__ == "__main__":
    main()
