"""Calibrate the gate: real gentle fine-tunes vs damaged copies of a trained tiny LLaMA.

    python -m experiments.calibrate_gate --quick      # < 2 min: CI smoke test
    python -m experiments.calibrate_gate --out docs/evidence/gate-calibration.json

A base LLaMA is trained on stdlib sources, then (a) fine-tuned gently — other stdlib files,
small learning rates, a few dozen steps, several seeds — and (b) damaged: Gaussian noise,
a block collapsed to low rank, a zeroed and a re-initialised layer, a catastrophic high-LR
fine-tune. Each is checked against a baseline of the base. The table shows, per case, the
all-layers and per-third changes, the largest layer change and the verdict under the current
default policy; the thresholds are then placed between what gentle fine-tunes reach and what
damage reaches (docs/gate.md). Nothing here is tuned until it "passes": the numbers are
reported as measured.

Each case is checked twice: with every seed (the figures of the table) and as ``check`` runs
by default, with sequential seeds; both verdicts, the warm refits each ran and how much of
its margin a layer decided on seed 0 used are recorded (:func:`seed_comparison`).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from experiments._cli import experiment_main
from experiments.derived import collapse, derive, noise, reinit, zero
from tests import zoo

FINETUNE_MODULES = ("json/decoder.py", "json/encoder.py", "csv.py", "textwrap.py", "string.py")


def damaged_copies(base: Path, work: Path, seed: int, levels: tuple[float, ...]) -> dict[str, Path]:
    gen = torch.Generator().manual_seed(seed)  # one stream: each copy draws after the last
    noisy = {f"noise {level:.0%}": derive(base, work / f"noise{level:g}", noise(level, gen=gen))
             for level in levels}  # fmt: skip
    return {
        **noisy,
        "block 1 rank 4": derive(base, work / "collapse", collapse(4, "layers.1.")),
        "zeroed layer": derive(base, work / "zeroed", zero("layers.2.mlp.down_proj")),
        # 0.02: transformers' initializer_range
        "re-initialised layer": derive(
            base, work / "reinit", reinit("layers.2.self_attn.v_proj", 0.02, gen=gen)
        ),
    }


def make_cases(quick: bool, work: Path) -> dict[str, dict[str, Path]]:
    """The base (``work/base``) and every case, by kind: gentle, longer, damaged, self."""
    base = work / "base"
    zoo.train_tiny_llama(base, steps=150 if quick else 400)
    gentle: dict[str, Path] = {}
    lrs = (3e-4,) if quick else (1e-4, 3e-4, 1e-3)
    seeds = (0,) if quick else (0, 1, 2)
    for lr in lrs:
        for seed in seeds:
            out = work / f"ft-{lr:g}-{seed}"
            zoo.finetune_tiny_llama(base, out, modules=FINETUNE_MODULES, steps=60, lr=lr, seed=seed)
            gentle[f"fine-tune lr {lr:g} seed {seed}"] = out
    levels = (0.25, 1.0) if quick else (0.05, 0.1, 0.25, 0.5, 1.0)
    damaged = damaged_copies(base, work, seed=0, levels=levels)
    catastrophic = work / "catastrophic"
    zoo.finetune_tiny_llama(base, catastrophic, modules=FINETUNE_MODULES, steps=60, lr=3e-2,
                            seed=0, clip=None)  # fmt: skip
    damaged["catastrophic fine-tune (lr 3e-2, no clipping)"] = catastrophic
    longer: dict[str, Path] = {}
    if not quick:
        # Not gentle, not damage: where an ordinary, longer fine-tune lands.
        out = work / "ft-long"
        zoo.finetune_tiny_llama(base, out, modules=FINETUNE_MODULES, steps=300, lr=1e-3, seed=0)
        longer["fine-tune lr 0.001, 300 steps"] = out
    return {"gentle": gentle, "longer": longer, "damaged": damaged, "self": {"base": base}}


def run(quick: bool, work: Path) -> dict[str, Any]:
    import dynaudit

    settings = {"q_dim": 32, "pieces": 4, "steps": 150} if quick else {}
    cases = make_cases(quick, work)
    base = cases["self"]["base"]
    baseline = work / "baseline"
    started = time.perf_counter()
    dynaudit.baseline(base, baseline, **settings)
    rows = []
    for kind, group in cases.items():
        for name, path in group.items():
            report = dynaudit.check(path, baseline, all_seeds=True)
            sequential = dynaudit.check(path, baseline)
            comparison = report.comparison
            changes = [x.change.mean for x in comparison.layers if x.change is not None]
            rows.append({
                "case": name, "kind": kind, "verdict": report.verdict.verdict,
                "loss_base_corpus": zoo.lm_loss(path),
                "loss_finetune_corpus": zoo.lm_loss(path, FINETUNE_MODULES),
                "all": comparison.all.change.mean if comparison.all.change else None,
                "all_std": comparison.all.change.std if comparison.all.change else None,
                "noise": comparison.all.noise,
                "groups": {g: c.change.mean if c.change else None
                           for g, c in comparison.groups.items()},
                "max_layer": max(changes, key=abs) if changes else None,
                "max_displacement": max((x.displacement or 0.0) for x in comparison.layers),
                "max_weight_change": max((x.weight_change or 0.0) for x in comparison.layers),
                "zeroed": comparison.zeroed, "reasons": report.verdict.reasons[:3],
                "seeds": seed_comparison(sequential.model_dump(), report.model_dump()),
                "layers": [{"name": x.name, "group": x.group, "displacement": x.displacement,
                            "change": x.change.mean if x.change else None,
                            "std": x.change.std if x.change else None,
                            "weight_change": x.weight_change}
                           for x in comparison.layers],
            })  # fmt: skip
    gentle_rows = [r for r in rows if r["kind"] == "gentle"]
    summary = {
        "gentle_max_abs_layer": max(abs(r["max_layer"]) for r in gentle_rows),
        "gentle_min_all": min(r["all"] for r in gentle_rows),
        "gentle_min_group": min(
            min(v for v in r["groups"].values() if v is not None) for r in gentle_rows
        ),
        "gentle_max_displacement": max(r["max_displacement"] for r in gentle_rows),
        "sequential_seeds": seed_totals([r["seeds"] for r in rows]),
    }
    return {"settings": settings or "defaults", "rows": rows, "summary": summary,
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def seed_comparison(sequential: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """A check with sequential seeds against the same check with all seeds, from their JSON
    reports: both verdicts and whether they agree (verdict, failing layers and groups), the
    warm refits each ran, what every seed of every layer would cost, the layers found
    unchanged, and the largest share of its margin that a layer decided on seed 0 alone used
    (|seed-0 change − mean over all seeds| / margin: below 1 the margin held)."""
    ours, theirs = sequential["comparison"], full["comparison"]
    means = {x["name"]: x["change"]["mean"] for x in theirs["layers"] if x["change"]}
    used = [
        abs(x["change"]["mean"] - means[x["name"]]) / x["margin"]
        for x in ours["layers"]
        if x.get("margin") and x["change"] and x["change"]["seeds"] == 1 and x["name"] in means
    ]
    verdicts = [
        (r["verdict"]["verdict"], r["verdict"]["failing_layers"], r["verdict"]["failing_groups"])
        for r in (sequential, full)
    ]
    return {
        "verdict_sequential": sequential["verdict"]["verdict"],
        "verdict_all_seeds": full["verdict"]["verdict"],
        "same": verdicts[0] == verdicts[1],
        "refits_sequential": ours.get("refits"),
        "refits_all_seeds": theirs.get("refits"),
        "refits_full": theirs.get("refits_full"),
        "unchanged": len(ours.get("unchanged") or []),
        "margin_used": round(max(used, default=0.0), 4),
    }


def seed_totals(comparisons: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`seed_comparison` over many checks: how many agreed, and the refits in all."""
    return {
        "checks": len(comparisons),
        "same_verdicts": sum(c["same"] for c in comparisons),
        "refits_sequential": sum(c["refits_sequential"] or 0 for c in comparisons),
        "refits_all_seeds": sum(c["refits_all_seeds"] or 0 for c in comparisons),
        "refits_full": sum(c["refits_full"] or 0 for c in comparisons),
        "margin_used": max((c["margin_used"] for c in comparisons), default=0.0),
    }


def show(result: dict[str, Any]) -> None:
    print(f"{'case':48} {'kind':8} {'all':>9} {'bottom':>8} {'middle':>8} {'top':>8} "
          f"{'max layer':>10} {'displ':>6} {'loss':>6} {'ft loss':>7} verdict  "
          "sequential (refits / all seeds / full)")  # fmt: skip
    for row in result["rows"]:
        groups = row["groups"]
        cells = [f"{(groups.get(g) or 0) * 100:+7.2f}%" for g in ("bottom", "middle", "top")]
        seeds = row["seeds"]
        print(f"{row['case']:48} {row['kind']:8} {row['all'] * 100:+8.3f}% {' '.join(cells)} "
              f"{row['max_layer'] * 100:+9.2f}% {row['max_displacement']:6.3f} "
              f"{row['loss_base_corpus']:6.3f} {row['loss_finetune_corpus']:7.3f} "
              f"{row['verdict']:7}  {seeds['verdict_sequential']}"
              f"{'' if seeds['same'] else ' (DIFFERS)'} ({seeds['refits_sequential']} / "
              f"{seeds['refits_all_seeds']} / {seeds['refits_full']})")  # fmt: skip
    print("gentle fine-tunes reach:", json.dumps(result["summary"]))
    gentle = [r for r in result["rows"] if r["kind"] == "gentle"]
    print(f"{statistics.fmean(r['all'] for r in gentle) * 100:+.3f}% mean all-layers change "
          "over gentle fine-tunes")  # fmt: skip
    totals = result["summary"]["sequential_seeds"]
    print(f"sequential seeds: {totals['same_verdicts']}/{totals['checks']} verdicts equal to all "
          f"seeds; {totals['refits_sequential']} warm refits (all seeds: "
          f"{totals['refits_all_seeds']}; every seed of every layer: {totals['refits_full']}); "
          f"largest share of a margin used {totals['margin_used']:.2f}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    experiment_main(__doc__, "calibrate", run, show, argv=argv)


if __name__ == "__main__":
    main()
