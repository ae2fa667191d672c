"""The weight sketch a baseline keeps (dynamics.sketch): seeded, batch-independent, and an
estimate of the relative weight change good enough to tell adaptation from replacement."""

from __future__ import annotations

import pytest
import torch

from dynaudit.dynamics.sketch import SIDE, relative_change, sketch, weight_figures


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_the_sketch_is_seeded_by_name_and_group_not_by_batch() -> None:
    w = _randn(3, 200, 300, seed=0)
    whole = sketch(w, "layer")
    assert whole.shape == (3, SIDE, SIDE)
    assert torch.equal(whole, sketch(w, "layer"))
    assert torch.equal(whole[2:], sketch(w[2:], "layer", groups=[2]))  # batching, sharding
    assert not torch.equal(whole, sketch(w, "other"))


def test_short_sides_are_kept_whole_so_the_change_is_exact() -> None:
    w = _randn(1, 16, 3 * SIDE, seed=1)
    assert sketch(w, "x").shape == (1, 16, SIDE)  # only the long side is projected
    small = _randn(1, 12, 20, seed=3)
    assert torch.equal(sketch(small, "x"), small)  # both sides ≤ SIDE: the matrix itself
    change = relative_change(sketch(small + 0.1 * small, "x"), sketch(small, "x"))
    assert change == pytest.approx(0.1, rel=1e-6)
    assert relative_change(sketch(w, "x"), torch.zeros(1, 16, SIDE)) is None


@pytest.mark.parametrize("level", [0.02, 0.3, 1.0])
def test_the_estimate_follows_the_exact_change(level: float) -> None:
    """Full-rank changes of 512 × 384 matrices: the estimate within 10 % of the exact ratio."""
    for seed in range(5):
        w = _randn(1, 512, 384, seed=seed)
        moved = w + level * _randn(1, 512, 384, seed=100 + seed)
        exact = float((moved - w).norm() / w.norm())
        estimate = relative_change(sketch(moved, f"m{seed}"), sketch(w, f"m{seed}"))
        assert estimate == pytest.approx(exact, rel=0.1)


def test_a_replaced_matrix_is_about_root_two_away() -> None:
    """Two independent draws of one distribution: what a re-drawn or swapped layer looks like."""
    for seed in range(5):
        a, b = _randn(1, 256, 256, seed=seed), _randn(1, 256, 256, seed=50 + seed)
        change = relative_change(sketch(b, "x"), sketch(a, "x"))
        assert change is not None and 1.25 < change < 1.6


def test_noise_likeness_tells_noise_from_structured_changes() -> None:
    """≈ 1 for i.i.d. noise whatever its size, far lower for a low-rank or a row-structured
    change (what fine-tuning updates look like), for sketched and whole matrices alike."""
    for shape in [(512, 384), (48, 40)]:
        w = _randn(1, *shape, seed=0)
        noise = 0.3 * _randn(1, *shape, seed=1)
        low_rank = _randn(1, shape[0], 4, seed=2) @ _randn(1, 4, shape[1], seed=3)
        rows = _randn(1, shape[0], 1, seed=4) * _randn(1, *shape, seed=5).sign().cumsum(-1)
        for change, low, high in [(noise, 0.85, 1.15), (low_rank, 0.0, 0.2), (rows, 0.0, 0.5)]:
            moved, likeness = weight_figures(w + change, sketch(w, "x"), "x")
            assert moved is not None and moved > 0
            assert likeness is not None and low < likeness < high, (shape, likeness)
    assert weight_figures(w, sketch(w, "x"), "x") == (0.0, None)  # nothing moved
