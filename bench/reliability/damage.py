"""Damage detection: damaged copies of each base model, checked against its baseline.

Every expected verdict below was written before the case first ran. Noise at 5 % of each
matrix's std is the one damage expected to pass: the gate calibration (docs/gate.md) found it
as harmless as a gentle fine-tune, so failing it would be a false alarm.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench.reliability.alarms import figures
from bench.reliability.core import Case, Outcome, Workspace, timed
from experiments.derived import (
    Change,
    collapse,
    derive,
    noise,
    poison,
    prune,
    reinit,
    swapped,
    zero,
)
from tests import producers

__all__ = ["CASES"]


def _catastrophic(base: Path, out: Path) -> Path:
    """A real fine-tune gone wrong: lr 3e-2, no gradient clipping, 40 steps on other text."""
    from tests import zoo

    zoo.finetune_tiny_llama(
        base, out, modules=("json/decoder.py", "csv.py"), steps=40, lr=3e-2, clip=None
    )
    return out


def _absurd_lora(base: Path, out: Path) -> Path:
    """A PEFT LoRA adapter (r 4 on q/v) saved by ``peft``, trained-looking B, alpha 4096."""
    producers.peft_lora(base, out, alpha=4096, b_std=0.02)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base)
    return out


def _from_change(change: Change) -> Callable[[Workspace, Path, str], Path]:
    return lambda ws, out, family: derive(ws.base(family), out, change)


DAMAGES: list[tuple[str, str, str, Callable[[Workspace, Path, str], Path]]] = [
    # family, case, expected verdict, how to make it
    ("llama", "noise 5 %", "pass", _from_change(noise(0.05))),
    ("llama", "noise 50 %", "fail", _from_change(noise(0.5))),
    ("llama", "magnitude pruning 90 %", "fail", _from_change(prune(0.9))),
    ("llama", "blocks 1 and 2 swapped", "fail",
     lambda ws, out, f: swapped(ws.base(f), out, "layers.1.", "layers.2.")),
    ("llama", "NaN in one layer", "fail",
     _from_change(poison("layers.0.self_attn.q_proj", float("nan")))),
    ("llama", "catastrophic fine-tune", "fail", lambda ws, out, f: _catastrophic(ws.base(f), out)),
    ("llama", "LoRA adapter, alpha 4096", "fail", lambda ws, out, f: _absurd_lora(ws.base(f), out)),
    ("vit", "noise 100 %", "fail", _from_change(noise(1.0))),
    ("vit", "magnitude pruning 50 %", "fail", _from_change(prune(0.5))),
    ("vit", "zeroed layer", "fail", _from_change(zero("layer.1.output.dense"))),
    ("vit", "Inf in one layer", "fail", _from_change(poison("layer.0.attention.attention.query",
                                                           float("inf")))),
    ("vit", "re-initialised layer", "fail",
     _from_change(reinit("layer.1.attention.attention.value", 0.02))),
    ("cnn", "rank collapse to 2", "fail", _from_change(collapse(2))),
    ("cnn", "magnitude pruning 50 %", "fail", _from_change(prune(0.5))),
    ("cnn", "noise 25 %", "fail", _from_change(noise(0.25))),
    ("cnn", "re-initialised layer", "fail", _from_change(reinit("layer3.0.conv2", 0.05))),
]  # fmt: skip


def _run(ws: Workspace, *, family: str, name: str, expected: str,
         make: Callable[[Workspace, Path, str], Path]) -> Outcome:  # fmt: skip
    with timed() as elapsed:
        source = ws.once(f"damaged/{family}/{name}", lambda out: make(ws, out, family))
        check = ws.check(source, family)
    measured = figures(check)
    detail = (measured + " · " if measured else "") + "; ".join(check.reasons[:2])
    if check.seeds_note:
        detail += " · " + check.seeds_note
    ok = check.verdict == expected and check.same_as_all_seeds
    return Outcome("damage", name, family, expected, check.verdict, ok, detail, elapsed(),
                   seeds=check.seeds)  # fmt: skip


# Damage the default gate does not fail: (family, case) → (why, at which settings: "default",
# "quick"). None today. The last two, Gaussian noise on an initialised base (another draw of
# the same initialisation, statistics unchanged), are caught by the noise-like weight change
# rule; re-drawn and swapped layers by the weight change rule (docs/reliability.md).
KNOWN_MISSES: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}

CASES = [
    Case("damage", name, family,
         partial(_run, family=family, name=name, expected=expected, make=make),
         *KNOWN_MISSES.get((family, name), ("", ())))
    for family, name, expected, make in DAMAGES
]  # fmt: skip
