"""False alarms: a base model re-checked against its own baselines must pass, every time.

Per family, 8 re-checks: the same files; a copy re-saved in another shard layout and a copy
taken through bfloat16 and back to float32, each against baselines built with fit seeds 0, 1
and 2; and the round-tripped copy checked with 2 torch threads against a baseline fitted with
one (another machine's summation order).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from bench.reliability.core import Case, Check, Outcome, Workspace, timed
from bench.reliability.models import FAMILIES
from experiments.derived import derive, reshard

__all__ = ["CASES", "largest_layer_change"]

SEEDS = (0, 1, 2)


def largest_layer_change(check: Check) -> float | None:
    """The largest |relative change| of any layer, %, signed."""
    if check.report is None:
        return None
    changes = [
        layer["change"]["mean"]
        for layer in check.report["comparison"]["layers"]
        if layer.get("change") is not None
    ]
    return 100 * max(changes, key=abs) if changes else None


def figures(check: Check) -> str:
    """All-layers change, the largest layer's, the largest displacement and the largest
    weight change, as one phrase."""
    change, largest = check.change, largest_layer_change(check)
    if check.report is None or change is None or largest is None:
        return ""
    layers = check.report["comparison"]["layers"]
    moved = max((x["displacement"] or 0.0 for x in layers), default=0.0)
    weights = max((x.get("weight_change") or 0.0 for x in layers), default=0.0)
    return (f"all layers {change:+.3f} %, largest layer {largest:+.2f} %, "
            f"displacement ≤ {moved:.2f}, weights moved ≤ {100 * weights:.3g} %")  # fmt: skip


def _round_trip(_: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor
    return tensor.to(torch.bfloat16).to(tensor.dtype)


def _variant(ws: Workspace, family: str, variant: str) -> Path:
    base = ws.base(family)
    if variant == "same files":
        return base
    if variant == "re-sharded":
        return ws.once(f"resharded/{family}", lambda out: reshard(base, out, 3))
    return ws.once(f"roundtrip/{family}", lambda out: derive(base, out, _round_trip))


def _recheck(ws: Workspace, *, family: str, variant: str, seed: int, threads: int) -> Outcome:
    with timed() as elapsed:
        source = _variant(ws, family, variant)
        check = ws.check(source, family, "--threads", str(threads), seed=seed)
    detail = figures(check) or "; ".join(check.reasons)
    if check.verdict == "fail":
        detail += " · " + "; ".join(check.reasons)
    if check.seeds_note:
        detail += " · " + check.seeds_note
    name = f"{variant}, baseline seed {seed}" + (f", {threads} threads" if threads != 1 else "")
    ok = check.verdict == "pass" and check.same_as_all_seeds
    return Outcome("alarms", name, family, "pass", check.verdict, ok, detail, elapsed(),
                   seeds=check.seeds)  # fmt: skip


def _cases() -> list[Case]:
    cases = []
    for family in FAMILIES:
        plan = [("same files", 0, 1)]
        plan += [(variant, seed, 1) for variant in ("re-sharded", "bf16 round trip")
                 for seed in SEEDS]  # fmt: skip
        plan.append(("bf16 round trip", 0, 2))
        for variant, seed, threads in plan:
            run = partial(_recheck, family=family, variant=variant, seed=seed, threads=threads)
            name = f"{variant} s{seed}" + (f" t{threads}" if threads != 1 else "")
            cases.append(Case("alarms", name, family, run))
    return cases


CASES = _cases()
