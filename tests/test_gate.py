"""The gate policy as pure functions (dynaudit/gate.py): ``decide`` on hand-made comparisons,
and ``load_policy`` from pyproject, a file and flags. On real checkpoints: tests/test_check.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynaudit.gate import decide
from dynaudit.schema import Change, Comparison, GroupComparison, LayerComparison, Policy


def _layer(
    name: str,
    mean: float,
    group: str = "bottom",
    weight_change: float | None = 0.01,
    noise_likeness: float | None = 0.3,
) -> LayerComparison:
    return LayerComparison(
        name=name, type="query", depth=0, group=group, shape=[1, 4, 4],  # type: ignore[arg-type]
        baseline_mean_distance=1.0, mean_distance=1.0 + mean,
        change=Change(mean=mean, std=0.001, absolute=mean, seeds=3), displacement=0.01,
        null_drift=0.001, noise=0.001, fidelity=0.5, weight_change=weight_change,
        noise_likeness=noise_likeness,
    )  # fmt: skip


def _comparison(all_mean: float, noise: float, layers: list[LayerComparison]) -> Comparison:
    group = GroupComparison(
        layers=len(layers), change=Change(mean=all_mean, std=noise, absolute=0, seeds=3),
        noise=noise, displacement=0.01,
    )  # fmt: skip
    return Comparison(layers=layers, all=group, groups={"bottom": group}, types={})


@pytest.mark.parametrize(
    ("all_mean", "noise", "layer_mean", "verdict", "reason"),
    [
        (0.0, 0.001, 0.0, "pass", "no drop"),
        (-0.05, 0.001, -0.05, "fail", "capacity loss: all layers"),
        (-0.05, 0.03, -0.05, "pass", "no drop"),  # a drop inside 3× its noise is not flagged
        (-0.01, 0.001, -0.01, "pass", "no drop"),  # below the 2 % / 3 % thresholds
        (0.10, 0.001, 0.30, "fail", "damage: w"),  # a rise far beyond fine-tuning: damage
        (-0.10, 0.001, -0.30, "fail", "damage: w"),
    ],
)
def test_decide(
    all_mean: float, noise: float, layer_mean: float, verdict: str, reason: str
) -> None:
    result = decide(_comparison(all_mean, noise, [_layer("w", layer_mean)]), Policy())
    assert result.verdict == verdict
    assert any(reason in line for line in result.reasons), result.reasons


@pytest.mark.parametrize(
    ("moved", "limit", "verdict"),
    [(0.43, 80.0, "pass"), (1.41, 80.0, "fail"), (0.9, 80.0, "fail"), (1.41, None, "pass"),
     (None, 80.0, "pass"), (0.5, 40.0, "fail")],
)  # fmt: skip
def test_decide_on_weight_change(moved: float | None, limit: float | None, verdict: str) -> None:
    """A layer whose statistics held but whose weights moved by more than the limit (a
    re-drawn or swapped layer is ~141 % away); no figure (an older baseline): no finding."""
    layer = _layer("w", 0.0, weight_change=moved)
    result = decide(_comparison(0.0, 0.001, [layer]), Policy(max_weight_change=limit))
    assert result.verdict == verdict
    if verdict == "fail":
        assert result.failing_layers == ["w"] and "replaced, not adapted" in result.reasons[0]


@pytest.mark.parametrize(
    ("moved", "likeness", "verdict"),
    [(0.27, 1.0, "fail"), (0.27, 0.5, "pass"), (0.15, 1.0, "pass"), (0.43, 0.59, "pass"),
     (0.52, None, "pass")],
)  # fmt: skip
def test_decide_on_noise_like_changes(moved: float, likeness: float | None, verdict: str) -> None:
    """Beyond 20 %, a change as unstructured as noise (likeness ≥ 0.8) is damage; a structured
    one of the same size (a fine-tune: ≤ 0.6 in the calibration) is not."""
    layer = _layer("w", 0.0, weight_change=moved, noise_likeness=likeness)
    result = decide(_comparison(0.0, 0.001, [layer]), Policy())
    assert result.verdict == verdict
    if verdict == "fail":
        assert "like random noise" in result.reasons[0]
    off = decide(_comparison(0.0, 0.001, [layer]), Policy(max_noise_change=None))
    assert off.passed


def test_decide_fails_on_nan_and_zeroed_layers() -> None:
    comparison = _comparison(0.0, 0.001, [_layer("w", 0.0)])
    nan = comparison.model_copy(update={"non_finite": ["w"]})
    zero = comparison.model_copy(update={"zeroed": ["w"]})
    assert "non-finite" in decide(nan, Policy()).reasons[0]
    assert decide(zero, Policy()).failing_layers == ["w"]


def test_policy_from_pyproject_file_and_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dynaudit.errors import UsageError
    from dynaudit.gate import load_policy

    monkeypatch.chdir(tmp_path)
    assert load_policy() == Policy()
    (tmp_path / "pyproject.toml").write_text("[tool.dynaudit.policy]\nmax_drop_all = 5.0\n")
    assert load_policy().max_drop_all == 5.0
    own = tmp_path / "gate.toml"
    own.write_text("max_drop_group = 7\n")
    assert load_policy(own).max_drop_group == 7 and load_policy(own).max_drop_all == 2.0
    assert load_policy(own, max_drop_group=1.0).max_drop_group == 1.0
    own.write_text("max_drop_grup = 7\n")
    with pytest.raises(UsageError, match="invalid gate policy"):
        load_policy(own)
