"""Large matrices fitted on seeded blocks of rows and columns (dynamics.blocks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dynaudit
from bench.checkpoint import projection
from dynaudit.dynamics.blocks import block_seed, block_shape, take_blocks
from tests.conftest import WriteCheckpoint, small_settings


@pytest.mark.parametrize(
    ("m", "n", "cap", "expected"),
    [
        (4096, 4096, 1 << 20, (1024, 1024)),
        (1024, 1024, 1 << 20, (1024, 1024)),  # at the cap: whole
        (4096, 4096, 0, (4096, 4096)),  # 0: never sampled
        (4096, 11008, 1 << 20, (625, 1677)),  # the matrix's aspect ratio
        (32, 100_000, 1 << 20, (32, 32768)),  # a short side is kept whole
        (300, 300, 1 << 16, (256, 256)),  # no side below 256
    ],
)
def test_block_shape(m: int, n: int, cap: int, expected: tuple[int, int]) -> None:
    assert block_shape(m, n, cap) == expected


def test_blocks_are_seeded_sorted_submatrices() -> None:
    target = torch.arange(2 * 40 * 30, dtype=torch.float32).view(2, 40, 30)
    seeds = [block_seed(0, "layer", 0), block_seed(0, "layer", 1)]
    blocks = take_blocks(target, (10, 8), seeds)
    assert blocks.shape == (2, 10, 8)
    assert torch.equal(blocks, take_blocks(target, (10, 8), seeds))  # deterministic
    for i in range(2):
        rows = (blocks[i, :, 0] - target[i, 0, 0]) // 30  # which rows of the matrix were kept
        cols = blocks[i, 0] - target[i, 0, 0] - rows[0] * 30
        assert torch.equal(blocks[i], target[i][rows.long()][:, cols.long()])
        assert bool((rows.diff() > 0).all() and (cols.diff() > 0).all())  # stored order
    assert not torch.equal(blocks[0] - target[0, 0, 0], blocks[1] - target[1, 0, 0])
    other_seed = take_blocks(target, (10, 8), [block_seed(1, "layer", 0)] * 2)
    assert not torch.equal(other_seed[0], blocks[0])
    assert take_blocks(target, (40, 30), seeds) is target  # whole: no copy


@pytest.fixture
def large(write_checkpoint: WriteCheckpoint) -> Path:
    gen = torch.Generator().manual_seed(0)
    return write_checkpoint({f"layers.{i}.weight": projection(640, 512, gen) for i in range(2)})


SAMPLED = small_settings(max_entries=1 << 16)


def test_a_sampled_layer_reports_its_block(large: Path) -> None:
    report = dynaudit.measure(large, seeds=2, **SAMPLED)
    whole = dynaudit.measure(large, seeds=2, **small_settings())
    for layer, exact in zip(report.measured, whole.measured, strict=True):
        assert layer.block == [286, 256] and layer.neurons == 286 + 256
        assert layer.shape == [640, 512] and exact.block is None
        assert layer.fidelity is not None and layer.fidelity > 0.2
        assert layer.mean_distance is not None and exact.mean_distance is not None
        assert layer.mean_distance != exact.mean_distance  # another system, not a copy
    assert report.settings["max_entries"] == 1 << 16
    from dynaudit.reports import render_markdown

    assert "| 640×512 (block 286×256) |" in render_markdown(report)


def test_a_sampled_baseline_compares_on_the_same_blocks(large: Path, tmp_path: Path) -> None:
    stored = tmp_path / "baseline"
    dynaudit.baseline(large, stored, **SAMPLED)
    same = dynaudit.check(large, stored, cache=False)
    assert same.verdict.passed
    assert same.comparison.all.change is not None
    assert abs(same.comparison.all.change.mean) < 1e-6  # each seed refits its own block
    gen = torch.Generator().manual_seed(1)
    noisy = {
        f"layers.{i}.weight": projection(640, 512, gen) * 0.5 + projection(640, 512, gen)
        for i in range(2)
    }
    from safetensors.torch import save_file

    save_file(noisy, str(tmp_path / "model.safetensors"))
    changed = dynaudit.check(tmp_path / "model.safetensors", stored, cache=False)
    assert changed.comparison.all.change is not None
    assert abs(changed.comparison.all.change.mean) > 0.01
