"""The three plots are written as PNG files (their content was checked by eye: docs/gate.md)."""

from __future__ import annotations

import json
from pathlib import Path

import dynaudit
from tests.cli import run_cli
from tests.test_check_reports import sample_report

PNG = b"\x89PNG\r\n\x1a\n"
FAST = {"q_dim": 16, "pieces": 4, "steps": 40}


def test_bars_trajectory_and_neuron_map(digits_mlp: Path, tmp_path: Path) -> None:
    check = tmp_path / "check.json"
    check.write_text(sample_report().model_dump_json())
    reports = []
    for seed in (0, 1):
        path = tmp_path / f"step{seed}.json"
        path.write_text(dynaudit.measure(digits_mlp, seed=seed, **FAST).model_dump_json())
        reports.append(str(path))
    baseline = tmp_path / "baseline"
    dynaudit.baseline(digits_mlp, baseline, seeds=1, **FAST)
    cases = {
        "bars.png": [str(check)],
        "trajectory.png": reports,
        "neurons.png": [str(baseline)],
        "tsne.png": [str(baseline), "--method", "tsne"],
    }
    for name, args in cases.items():
        proc = run_cli("plot", *args, "--out", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name
    bad = run_cli("plot", str(tmp_path / "step0.json"), "--out", str(tmp_path / "x.png"))
    assert bad.returncode == 2 and "at least two" in bad.stderr


def test_plot_reads_a_newer_minor_and_refuses_a_newer_major(tmp_path: Path) -> None:
    """Regression: plot refused any field it did not know, so a report of a newer minor
    version could not be drawn; a newer major version is one line, exit 3."""
    data = json.loads(sample_report().model_dump_json())
    data["schema_minor"] = 1
    data["from_the_future"] = True
    data["comparison"]["layers"][0]["also_new"] = 1
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(data))
    proc = run_cli("plot", str(newer), "--out", str(tmp_path / "bars.png"))
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "from_the_future" in warnings[0], proc.stderr
    data["schema_version"] = 2
    newer.write_text(json.dumps(data))
    proc = run_cli("plot", str(newer), "--out", str(tmp_path / "bars.png"))
    assert proc.returncode == 3, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "newer" in proc.stderr
