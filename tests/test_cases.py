"""The input-error table of tests/cases.py, in-process: each case is exit 3 with one
``dynaudit: error:`` line naming what is wrong, and leaves every file it was given as it was.
(The reliability suite runs the same cases through a real process, at its own settings.)"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from tests.cases import BAD_CHECKPOINTS, BROKEN_BASELINES, BadCheckpoint, BrokenBaseline
from tests.cli import CliResult, run_cli
from tests.producers import save_module

FAST = ["--q-dim", "16", "--pieces", "4", "--steps", "30"]


def files(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by path."""
    found = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in found}


def assert_refused(result: CliResult, code: int, needles: list[str]) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("dynaudit: error: "), result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])


@pytest.mark.parametrize("case", BAD_CHECKPOINTS, ids=lambda case: case.name)
def test_a_bad_checkpoint_is_refused_in_one_line(case: BadCheckpoint, tmp_path: Path) -> None:
    given = tmp_path / "given"  # beside the test's own cache directories
    (given / "ckpt").mkdir(parents=True)
    source = case.make(given / "ckpt")
    earlier = given / "earlier.json"
    earlier.write_text('{"an": "earlier report"}\n')
    before = files(given)
    result = run_cli("measure", source, "--json", earlier, *FAST)
    assert_refused(result, case.code, case.expected(source))
    assert files(given) == before


@pytest.fixture(scope="module")
def good_baseline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small MLP and its baseline (one seed, the fast settings)."""
    root = tmp_path_factory.mktemp("broken-baselines")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    model = save_module(module, root / "model", {"model_type": "mlp"})
    baseline = root / "baseline"
    made = run_cli("baseline", model, "--out", baseline, "--seeds", "1", *FAST)
    assert made.returncode == 0, made.stderr
    return model, baseline


@pytest.mark.parametrize("case", BROKEN_BASELINES, ids=lambda case: case.name)
def test_a_broken_baseline_is_refused_in_one_line(
    case: BrokenBaseline, good_baseline: tuple[Path, Path], tmp_path: Path
) -> None:
    model, baseline = good_baseline
    copy = shutil.copytree(baseline, tmp_path / "given" / "baseline")
    broken = case.damage(copy)
    before = files(copy)
    result = run_cli("check", model, "--baseline", copy, "--no-cache")
    assert_refused(result, 3, [broken, *case.needles])
    assert files(copy) == before
