"""Quantisation round trips against a bf16 base: does the gate stay quiet when the only change
is quantisation (docs/gate.md, "Quantised weights")?

    python -m experiments.quantisation --quick      # a few minutes: CI smoke test
    python -m experiments.quantisation --out docs/evidence/quantisation.json

The base is the gate calibration's trained tiny LLaMA (experiments/calibrate_gate.py) stored
in bfloat16. Each case is that base taken through a quantiser and back, as a fine-tune
shipped quantised would be: integer round trips (per row, as in experiments/weight_change.py,
and per group of 128 or 32 inputs, symmetric or with a zero point, the GPTQ/AWQ int4 layouts
without their error-compensating search), and real FP8 checkpoints written with
safetensors' FP8 dtypes (E4M3 and E5M2 with DeepSeek-V3's 128 × 128 block scales, and E4M3
with one scale per tensor as compressed-tensors writes it) that dynaudit dequantizes as it
reads them. A gentle real fine-tune, alone and then shipped as FP8, shows how the two
combine. Every quantiser touches the decoder blocks' linear layers only (the lm_head stays
bf16, as FP8 releases leave it).

Each case is checked against a baseline of the base as ``check`` runs by default, and the
table shows the verdict, the exact relative weight change of the largest and median layer,
the noise likeness the gate computed, the largest layer change of the statistics and the
next-byte loss on the base corpus (of the dequantized weights). Nothing is tuned here: the
numbers are reported as measured.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from experiments._cli import experiment_main
from experiments.calibrate_gate import FINETUNE_MODULES
from experiments.derived import Change, derive, grouped, quantised
from tests import producers, zoo

LAYERS = ".layers."  # the decoder blocks' matrices: what the quantisers touch


def _bf16(_: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor


def _in_blocks(change: Change) -> Change:
    """``change`` on the decoder blocks' matrices, computed from float32; the rest as is."""

    def apply(name: str, tensor: torch.Tensor) -> torch.Tensor:
        return change(name, tensor.float()) if LAYERS in name else tensor

    return apply


def make_cases(quick: bool, work: Path) -> dict[str, Path]:
    trained = work / "trained"
    zoo.train_tiny_llama(trained, steps=150 if quick else 400)
    base = derive(trained, work / "base", _bf16)
    cases = {"bf16 base itself": base}
    integer = {
        "int8 per row": quantised(8),
        "int4 per row": quantised(4),
        "int4 group 128 symmetric": grouped(4, 128),
        "int4 group 128 asymmetric": grouped(4, 128, symmetric=False),
        "int4 group 32 asymmetric": grouped(4, 32, symmetric=False),
        "int3 per row": quantised(3),
    }
    for i, (case, change) in enumerate(integer.items()):
        cases[case] = derive(base, work / f"int-{i}", _in_blocks(change))
    cases["FP8 E4M3, 128×128 block scales"] = producers.fp8_checkpoint(base, work / "fp8-e4m3")
    cases["FP8 E4M3, per-tensor scale"] = producers.fp8_checkpoint(
        base, work / "fp8-e4m3-tensor", block=None
    )
    cases["FP8 E5M2, 128×128 block scales"] = producers.fp8_checkpoint(
        base, work / "fp8-e5m2", dtype=torch.float8_e5m2
    )
    finetuned = work / "ft"
    zoo.finetune_tiny_llama(trained, finetuned, modules=FINETUNE_MODULES, steps=60, lr=3e-4)
    cases["fine-tune lr 3e-4"] = finetuned
    cases["fine-tune lr 3e-4, then FP8 E4M3 blocks"] = producers.fp8_checkpoint(
        finetuned, work / "ft-fp8"
    )
    return cases


def float_view(path: Path, out: Path) -> Path:
    """``path`` as plain float32 weights, read (FP8 dequantized) by dynaudit itself, for
    transformers to load on a CPU: the weights the audit saw."""
    from dynaudit.tensors import Checkpoint

    out.mkdir(parents=True)
    with Checkpoint.open(path) as checkpoint:
        state = {
            name: checkpoint.read(name)
            for name, info in checkpoint.tensors.items()
            if info.is_float and info.role is None
        }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config))
    return out


def weight_changes(path: Path, base: Path) -> list[float]:
    """‖W′ − W‖ / ‖W‖ of every decoder-block matrix, both read by dynaudit."""
    from dynaudit.tensors import Checkpoint

    with Checkpoint.open(base) as ref, Checkpoint.open(path) as case:
        names = [n for n in ref.names() if LAYERS in n and len(ref.tensors[n].shape) == 2]
        return [float((case.read(n) - (w := ref.read(n))).norm() / w.norm()) for n in names]


def run(quick: bool, work: Path) -> dict[str, Any]:
    import dynaudit

    settings = {"q_dim": 32, "pieces": 4, "steps": 150} if quick else {}
    cases = make_cases(quick, work)
    base = cases["bf16 base itself"]
    baseline = work / "baseline"
    started = time.perf_counter()
    dynaudit.baseline(base, baseline, **settings)
    rows = []
    for i, (case, path) in enumerate(cases.items()):
        report = dynaudit.check(path, baseline)
        comparison = report.comparison
        layers = comparison.layers
        changes = [x.change.mean for x in layers if x.change is not None]
        likeness = [x.noise_likeness for x in layers if x.noise_likeness is not None]
        exact = weight_changes(path, base)
        view = float_view(path, work / f"view-{i}")
        rows.append({
            "case": case, "verdict": report.verdict.verdict,
            "reasons": report.verdict.reasons[:3],
            "failing_layers": report.verdict.failing_layers,
            "weights": report.source.selection,
            "max_weight_change": max(exact), "median_weight_change": statistics.median(exact),
            "sketch_max_weight_change": max((x.weight_change or 0.0) for x in layers),
            "noise_likeness": [min(likeness), max(likeness)] if likeness else None,
            "all": comparison.all.change.mean if comparison.all.change else None,
            "max_layer": max(changes, key=abs) if changes else None,
            "loss_base_corpus": zoo.lm_loss(view),
        })  # fmt: skip
        shutil.rmtree(view)
    return {"settings": settings or "defaults", "rows": rows,
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def show(result: dict[str, Any]) -> None:
    print(f"{'case':42} {'largest':>8} {'median':>7} {'noise likeness':>14} {'all':>8} "
          f"{'max layer':>9} {'loss':>6} verdict")  # fmt: skip
    for row in result["rows"]:
        like = row["noise_likeness"]
        shown = f"{like[0]:.2f}–{like[1]:.2f}" if like else "—"
        print(f"{row['case']:42} {row['max_weight_change'] * 100:7.2f}% "
              f"{row['median_weight_change'] * 100:6.2f}% {shown:>14} "
              f"{(row['all'] or 0) * 100:+7.2f}% {(row['max_layer'] or 0) * 100:+8.2f}% "
              f"{row['loss_base_corpus']:6.3f} {row['verdict']}"
              + (f"  {row['reasons'][0]}" if row["reasons"] else ""))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    experiment_main(__doc__, "quantisation", run, show, argv=argv)


if __name__ == "__main__":
    main()
