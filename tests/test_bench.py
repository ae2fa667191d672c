"""The benchmarks run: ``bench.series`` end to end on its smallest size (slow smoke test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.series import exponent

ROOT = Path(__file__).resolve().parents[1]


def test_exponent_is_the_log_log_slope() -> None:
    assert exponent([(1e6, 2.0), (1e7, 20.0), (1e8, 200.0)]) == pytest.approx(1.0)
    assert exponent([(1e6, 1.0), (4e6, 2.0)]) == pytest.approx(0.5)
    assert exponent([(1e6, 1.0)]) is None


@pytest.mark.slow
def test_series_smoke(tmp_path: Path) -> None:
    """Every phase runs as a real process (dynaudit measure, baseline, check; WeightWatcher)
    and every ratio the scale issue asks for is printed and recorded. Needs the ``[bench]``
    extra (WeightWatcher), which the CI set-up does not install yet."""
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
