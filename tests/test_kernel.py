"""The fit kernel against first principles: the distance, the hand-written gradient,
tiling, batching and scale equivariance."""

from __future__ import annotations

import math

import pytest
import torch

from dynaudit.config import FitSettings
from dynaudit.dynamics import discrepancy, fidelity, fit_coordinates, init_coordinates, reconstruct
from dynaudit.dynamics.kernel import _gradient, _Work, matrix_seed


def _direct_reconstruction(coords: torch.Tensor, m: int) -> torch.Tensor:
    """Ŵ straight from the definition, with the paper's alternating signs (−1)^h over a
    relabelling of the pieces: the first H/2 pieces carry −1."""
    _, h, _, _ = coords.shape
    a, b = coords[:, :, :m].double(), coords[:, :, m:].double()
    dist = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
    signs = torch.tensor([-1.0] * (h // 2) + [1.0] * (h // 2), dtype=torch.float64)
    return (dist * signs.view(1, h, 1, 1)).sum(1)


def _random_coords(b: int, h: int, m: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, h, m + n, k, generator=torch.Generator().manual_seed(seed))


def test_reconstruction_matches_definition() -> None:
    coords = _random_coords(2, 4, 7, 5, 3)
    got = reconstruct(coords, 7)
    assert torch.allclose(got.double(), _direct_reconstruction(coords, 7), atol=1e-4)


def test_hand_written_gradient_matches_autograd() -> None:
    m, n, h, k, mu = 6, 5, 4, 3, 0.05
    coords = _random_coords(2, h, m, n, k).double()
    target = torch.randn(2, m, n, dtype=torch.float64)
    eps2 = torch.zeros(2, 1, 1, 1, dtype=torch.float64)
    # One-row tiles, the buffers reused from one to the next.
    work = _Work(coords.transpose(2, 3).contiguous(), target, 1)
    assert work.rows < m
    ours = _gradient(work, eps2, mu).transpose(2, 3)

    leaf = coords.clone().requires_grad_(True)
    with torch.enable_grad():
        what = _direct_reconstruction(leaf, m)
        total = m + n
        loss = ((what - target) ** 2).mean(dim=(1, 2)).sum()
        loss = loss + mu * leaf.pow(2).sum(dim=(1, 3)).mean(dim=1).sum()
        (expected,) = torch.autograd.grad(loss, leaf)
    assert total == coords.shape[2]
    assert torch.allclose(ours, expected, rtol=1e-6, atol=1e-9)


def test_tiling_and_batching_do_not_change_the_fit() -> None:
    target = torch.randn(3, 24, 20, generator=torch.Generator().manual_seed(1))
    settings = FitSettings(q_dim=16, pieces=4, steps=50)
    rms = target.pow(2).mean(dim=(1, 2)).sqrt()
    init = init_coordinates(24, 20, settings, [1, 2, 3], rms)
    # Few steps: a long fit of a random matrix amplifies summation-order rounding chaotically.
    whole = fit_coordinates(target, settings, init, steps=50)
    tiled = fit_coordinates(target, settings.model_copy(update={"tile_bytes": 1}), init, steps=50)
    single = fit_coordinates(target[1:2], settings, init[1:2], steps=50)
    assert torch.allclose(whole, tiled, rtol=1e-5, atol=1e-6)
    assert torch.equal(whole[1:2], single)


def test_fit_is_exactly_scale_equivariant() -> None:
    target = torch.randn(1, 30, 20, generator=torch.Generator().manual_seed(2))
    settings = FitSettings(q_dim=16, pieces=4, steps=80)
    base = None
    for c in (1.0, 0.5, 2.0):
        t = target * c
        init = init_coordinates(30, 20, settings, [7], t.pow(2).mean(dim=(1, 2)).sqrt())
        d, _ = discrepancy(fit_coordinates(t, settings, init))
        base = float(d) if base is None else base
        assert float(d) == pytest.approx(c * base, rel=1e-5)


def test_fit_reduces_the_error_and_fidelity_is_consistent() -> None:
    gen = torch.Generator().manual_seed(3)
    low_rank = torch.randn(1, 40, 4, generator=gen) @ torch.randn(1, 4, 30, generator=gen)
    settings = FitSettings(q_dim=16, pieces=4, steps=300)
    init = init_coordinates(40, 30, settings, [0], low_rank.pow(2).mean(dim=(1, 2)).sqrt())
    before = float(fidelity(init, low_rank))
    coords = fit_coordinates(low_rank, settings, init)
    after = float(fidelity(coords, low_rank))
    assert after > 0.8 > before
    direct = _direct_reconstruction(coords, 40)
    expected = 1 - float((direct - low_rank.double()).norm() / low_rank.double().norm())
    assert after == pytest.approx(expected, abs=1e-5)


def test_discrepancy_matches_brute_force() -> None:
    coords = _random_coords(2, 4, 9, 6, 2)
    d, mean_distance = discrepancy(coords, tile_bytes=8 * 2 * 15 * 4)  # 4-row tiles
    q = coords.permute(0, 2, 1, 3).reshape(2, 15, 8).double()
    brute = torch.cdist(q, q, compute_mode="donot_use_mm_for_euclid_dist").sum(dim=(1, 2)) / 15
    assert torch.allclose(d, brute, rtol=1e-9)
    assert torch.allclose(mean_distance, brute / 14, rtol=1e-9)


def test_matrix_seed_is_stable_and_distinct() -> None:
    assert matrix_seed(0, "a.weight") == matrix_seed(0, "a.weight")
    assert len({matrix_seed(s, n, g) for s in (0, 1) for n in ("a", "b") for g in (0, 1)}) == 8
    assert 0 <= matrix_seed(5, "x") < 2**63


@pytest.mark.parametrize(("q_dim", "pieces"), [(16, 3), (16, 1), (18, 4)])
def test_invalid_pieces_are_rejected(q_dim: int, pieces: int) -> None:
    with pytest.raises(ValueError):
        FitSettings(q_dim=q_dim, pieces=pieces)


def test_init_spread_follows_target_rms() -> None:
    settings = FitSettings(q_dim=32, pieces=4)
    init = init_coordinates(200, 100, settings, [0], torch.tensor([3.0]))
    assert float(init.std()) == pytest.approx(3.0 / math.sqrt(8), rel=0.05)


def test_step_budget_grows_only_for_over_parameterised_matrices() -> None:
    from dynaudit.dynamics.kernel import fit_steps

    settings = FitSettings(steps=400)
    assert fit_steps(settings, 4096, 4096) == 400
    assert fit_steps(settings, 384, 384) == 400  # ρ = 0.67
    assert fit_steps(settings, 128, 128) == 1600  # ρ = 2
    assert fit_steps(settings, 10, 128) == 3200  # capped at 8×
    assert fit_steps(settings.model_copy(update={"steps": 100}), 10, 128) == 800
