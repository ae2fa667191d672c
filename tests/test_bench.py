"""The benchmarks run: ``bench.protocol --quick`` (seconds), and ``bench.series`` end to end on
its smallest size (slow smoke test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.profile import CATEGORIES
from bench.series import SIZES, capped_steps, exponent, fit_tflop
from dynaudit.config import FitSettings

ROOT = Path(__file__).resolve().parents[1]


def test_exponent_is_the_log_log_slope() -> None:
    assert exponent([(1e6, 2.0), (1e7, 20.0), (1e8, 200.0)]) == pytest.approx(1.0)
    assert exponent([(1e6, 1.0), (4e6, 2.0)]) == pytest.approx(0.5)
    assert exponent([(1e6, 1.0)]) is None


def _measured(label: str, steps: int, fit_s: float, check_s: float, ww_s: float) -> dict:
    shape = SIZES[label]
    return {
        "parameters": 50e6, "baseline_seeds": 1, "dynaudit": {"fit_s": fit_s},
        "fit_tflop_run": fit_tflop(shape, FitSettings(steps=steps)),
        "fit_tflop_default": fit_tflop(shape, FitSettings()),
        "check": {"wall_s": check_s}, "weightwatcher": {"wall_s": ww_s},
        "io_floor": {"seconds": 0.0},
    }  # fmt: skip


def test_a_size_predicted_over_budget_runs_fewer_steps() -> None:
    previous = _measured("50M", 100, fit_s=100.0, check_s=10.0, ww_s=10.0)
    shape = SIZES["220M"]
    steps, predicted = capped_steps(shape, previous, 400, 1, budget_s=1e6)
    assert steps == 400 and predicted is not None
    # Cold fits (measure + one baseline seed) at 400 steps: 2 × 100 s × 4 × the FLOP ratio.
    flop = fit_tflop(shape, FitSettings(steps=400)) / previous["fit_tflop_run"]
    assert predicted > 2 * 100.0 * flop
    capped, same = capped_steps(shape, previous, 400, 1, budget_s=predicted / 2)
    assert same == predicted and 20 <= capped < 400
    again, _ = capped_steps(shape, previous, capped, 1, budget_s=predicted / 2)
    assert again == capped  # at the capped steps the prediction is within budget
    assert capped_steps(shape, previous, 10, 1, budget_s=1.0)[0] == 10  # never above the request
    assert capped_steps(shape, None, 400, 1, budget_s=1.0) == (400, None)  # first size: no data


@pytest.mark.slow
def test_series_smoke(tmp_path: Path) -> None:
    """Every phase runs as a real process (dynaudit measure, baseline, check; WeightWatcher)
    and every ratio the scale issue asks for is printed and recorded. Needs the ``[bench]``
    extra (WeightWatcher), which the CI set-up installs: there the test never skips."""
    if not os.environ.get("CI"):
        pytest.importorskip("weightwatcher")
    out = tmp_path / "series.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.series", "--sizes", "4M", "--steps", "5", "--threads", "1",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "CI": "true"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "time ratio" in proc.stdout and "4M" in proc.stdout
    result = json.loads(out.read_text())
    (size,) = result["sizes"]
    assert set(size["ratios"]) >= {"time", "io", "memory", "warm"}
    assert all(value > 0 for value in size["ratios"].values())
    assert size["check"]["exit_code"] == 0 and size["weightwatcher"]["exit_code"] == 0
    assert len(size["dynaudit"]["layers_fitted"]) == 15  # 7 per block × 2 + lm_head
    assert result["exponents"]["dynaudit"] is None  # one size: no slope


@pytest.mark.slow
def test_layers_smoke(tmp_path: Path) -> None:
    """``bench.layers`` runs each command at one layer and at the counts, and writes its table."""
    out = tmp_path / "layers.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.layers", "--counts", "20", "40", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["commands"]) == {"measure", "baseline", "inspect"}
    for summary in results["commands"].values():
        assert [row["layers"] for row in summary["counts"]] == [20, 40]
        assert summary["fixed"]["cpu_s"] > 0


def test_protocol_quick_prints_and_records_every_part(tmp_path: Path) -> None:
    """``bench.protocol --quick`` runs all six parts in one command (the panel read from a
    file, as ``--panel`` does) and records each figure the issue sets a target for."""
    panel = tmp_path / "panel.json"
    summary = {"pretrained": {"default": {"fidelity_median": 0.55}}}
    panel.write_text(json.dumps({"mode": "accuracy", "pass": True, "summary": summary}))
    out = tmp_path / "protocol.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.protocol", "--quick", "--out", str(out), "--panel",
         str(panel)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["parts"]) == ["core", "kernel", "check", "cnn", "memory", "panel"]
    assert result["threads"] == 1 and len(result["machine"]["load_average_end"]) == 3
    sizes = result["parts"]["core"]["sizes"]
    assert [size["label"] for size in sizes] == ["50m", "1.3b", "7b"]
    for size in sizes:  # one timing per distinct shape, multiplied by its count
        assert size["matrices"] == sum(row["count"] for row in size["shapes"])
        assert len({tuple(row["shape"]) for row in size["shapes"]}) == len(size["shapes"]) == 4
        assert size["ratio"] == pytest.approx(size["dynaudit_s"] / size["svd_s"])
        for row in size["shapes"]:
            assert row["block"][0] <= row["shape"][0] and row["block"][1] <= row["shape"][1]
    cases = result["parts"]["kernel"]["cases"]
    assert [(c["m"], c["batch"]) for c in cases] == [(48, 1), (96, 1), (16, 8)]
    for case in cases:
        assert set(case["categories"]) == set(CATEGORIES)
        assert sum(case["categories"].values()) == pytest.approx(1.0)
        assert case["ratio_to_mm"] > 0
    check = result["parts"]["check"]
    runs = check["runs"]
    assert list(runs) == ["baseline", "measure_full", "check_full", "check_adapter"]
    assert runs["baseline"]["exit_code"] == runs["measure_full"]["exit_code"] == 0
    assert {runs["check_full"]["exit_code"], runs["check_adapter"]["exit_code"]} <= {0, 1}
    # The full fine-tune moves every matrix; the adapter only q_proj and v_proj of 2 blocks,
    # and the check refits only those (one seed each, far from every threshold).
    assert runs["check_full"]["report"]["unchanged"] == 0
    assert runs["check_adapter"]["report"]["unchanged"] == 15 - 4
    assert runs["check_adapter"]["report"]["refits"].startswith("4 of ")
    assert all(ratio > 0 for ratio in check["ratios"].values())
    # The CNN: every fitted layer counted once under its step budget; the ×8 rule gives the
    # small 1 × 1 convolutions more steps than the head.
    cnn = result["parts"]["cnn"]
    assert cnn["run"]["exit_code"] == 0 and cnn["run"]["cpu_s"] > 0
    assert sum(row["layers"] for row in cnn["budgets"]) == 36
    assert len(cnn["budgets"]) > 1 and all(row["seconds"] > 0 for row in cnn["budgets"])
    memory = result["parts"]["memory"]  # the largest matrix is the (shrunk) lm_head
    assert memory["probe"]["exit_code"] == 0 and memory["probe"]["rss_anon_added"] > 0
    assert memory["largest_matrix_bytes"] == 4 * 2000 * 128
    assert memory["ratio"] == memory["probe"]["rss_anon_added"] / memory["largest_matrix_bytes"]
    for heading in (
        "### Side by side",
        "### Core",
        "### Kernel",
        "### Whole processes",
        "### `measure` of a MobileNetV2",
        "measure of a MobileNetV2-class CNN",
        "### Peak anonymous memory",
        "peak RssAnon ÷ largest matrix, 1.3B",
        "### Accuracy panel",
        "adapter check ÷ full check",
        "| 0.550 |",
    ):
        assert heading in proc.stdout  # fmt: skip


def test_the_cuda_check_says_so_without_a_gpu(tmp_path: Path) -> None:
    """``python -m bench.cuda`` needs a CUDA machine; without one it says so and exits 0."""
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        done = subprocess.run(
            [sys.executable, "-m", "bench.cuda", "--out", str(tmp_path / "a")],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0 and "no CUDA device" in done.stdout + done.stderr
