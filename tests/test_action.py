"""The composite action parses, and its check step runs the same CLI (with the action's own
script, inputs passed through the environment)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

import dynaudit

ROOT = Path(__file__).resolve().parents[1]
ACTION = ROOT / ".github" / "actions" / "dynaudit-check" / "action.yml"


def test_workflows_parse() -> None:
    for path in [ACTION, *(ROOT / ".github" / "workflows").glob("*.yml"),
                 ROOT / "docs" / "examples" / "gate-workflow.yml"]:  # fmt: skip
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def test_the_check_step_runs_the_cli(digits_mlp: Path, tmp_path: Path) -> None:
    action = yaml.safe_load(ACTION.read_text())
    assert set(action["inputs"]) >= {"model", "baseline", "policy", "version"}
    assert action["outputs"]["verdict"]["value"] == "${{ steps.check.outputs.verdict }}"
    step = next(s for s in action["runs"]["steps"] if s.get("id") == "check")
    assert "${{" not in step["run"]  # inputs only through the environment: no script injection
    baseline = tmp_path / "baseline"
    dynaudit.baseline(digits_mlp, baseline, seeds=2, q_dim=16, pieces=4, steps=40)
    inputs = {"model": str(digits_mlp), "baseline": str(baseline), "policy": ""}
    env = {
        name: re.sub(r"\$\{\{ inputs\.([\w-]+) \}\}", lambda m: inputs[m.group(1)], value)
        for name, value in step["env"].items()
    }
    output, summary = tmp_path / "output", tmp_path / "summary.md"
    proc = subprocess.run(
        ["bash", "-c", step["run"]], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={
            **os.environ, **env, "CI": "true", "GITHUB_ACTIONS": "true",
            "GITHUB_OUTPUT": str(output), "GITHUB_STEP_SUMMARY": str(summary),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        },
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert output.read_text() == "verdict=pass\n"
    assert summary.read_text().startswith("# dynaudit check")
    for name in ("dynaudit-check.json", "dynaudit-check.md", "dynaudit-check.xml"):
        assert (tmp_path / name).is_file()
