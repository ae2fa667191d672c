"""Structural class from widths, degenerate (rank-deficient) matrices and residual-branch gains:
``inspect`` headers-only and ``inspect --weights``, through the API and the command line."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import dynaudit
from dynaudit.structure import classify, rank_tolerance
from tests import producers
from tests.cli import run_cli
from tests.conftest import WriteCheckpoint

BOTTLENECK = (64, 128, 16, 128, 10)
DEFICIENT = "0.weight"  # the first Linear (128 × 64) of the nn.Sequential, made rank 4
DEFICIENT_RANK = 4


def train_digits(widths: Sequence[int], steps: int = 40, seed: int = 0) -> nn.Sequential:
    """An MLP with these widths trained full-batch with Adam on scikit-learn's digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    x = (x - x.mean(dim=0)) / (x.std(dim=0) + 1e-3)
    y = torch.tensor(digits.target, dtype=torch.long)
    torch.manual_seed(seed)
    modules: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        modules.append(nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            modules.append(nn.ReLU())
    model = nn.Sequential(*modules)
    # Adam written out: torch.optim's first use imports torch._dynamo (seconds on a busy CPU).
    params = list(model.parameters())
    first = [torch.zeros_like(p) for p in params]
    second = [torch.zeros_like(p) for p in params]
    lr, beta1, beta2 = 1e-2, 0.9, 0.999
    for step in range(1, steps + 1):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, g, m, v in zip(params, grads, first, second, strict=True):
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                m_hat = m / (1 - beta1**step)
                v_hat = v / (1 - beta2**step)
                p.sub_(lr * m_hat / (v_hat.sqrt() + 1e-8))
    with torch.no_grad():
        accuracy = float((model(x).argmax(dim=1) == y).float().mean())
    assert accuracy > 0.8, f"training failed: accuracy {accuracy:.3f}"
    return model


def save_model(model: nn.Module, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def bottleneck_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MLP 64 → 128 → 16 → 128 → 10 trained on digits, its first matrix truncated to rank 4."""
    model = train_digits(BOTTLENECK)
    with torch.no_grad():
        first = model[0]
        assert isinstance(first, nn.Linear)
        u, s, vh = torch.linalg.svd(first.weight, full_matrices=False)
        k = DEFICIENT_RANK
        first.weight.copy_((u[:, :k] * s[:k]) @ vh[:k])
    return save_model(model, tmp_path_factory.mktemp("bottleneck-mlp"))


def saved_matrices(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    return {name: t for name, t in tensors.items() if t.ndim == 2}


# --- acceptance: a trained MLP with a bottleneck and a deliberately rank-deficient layer ---


def test_headers_only_reports_the_bottleneck_and_reads_no_weights(bottleneck_mlp: Path) -> None:
    found = dynaudit.inspect(bottleneck_mlp)
    assert found.family.name == "generic"
    assert found.structure.structural_class == "bottleneck"
    assert found.structure.widths == list(BOTTLENECK)
    assert "16" in found.structure.reason
    assert found.structure.degenerate is None
    assert found.structure.rank_rule is None
    assert found.gains == []
    assert [layer.name for layer in found.layers] == [f"{i}.weight" for i in (0, 2, 4, 6)]
    for layer in found.layers:
        assert layer.rank is None and layer.spectral_norm is None


def test_weights_report_exactly_the_rank_deficient_layer(bottleneck_mlp: Path) -> None:
    found = dynaudit.inspect(bottleneck_mlp, weights=True)
    assert found.structure.structural_class == "bottleneck"
    assert found.structure.widths == list(BOTTLENECK)
    assert found.structure.degenerate == [DEFICIENT]
    assert found.structure.rank_rule
    matrices = saved_matrices(bottleneck_mlp)
    layers = {layer.name: layer for layer in found.layers}
    assert set(layers) == set(matrices)
    for name, layer in layers.items():
        weight = matrices[name]
        assert layer.full_rank == min(weight.shape)
        expected_rank = DEFICIENT_RANK if name == DEFICIENT else min(weight.shape)
        assert layer.rank == expected_rank, name
        norm = float(torch.linalg.matrix_norm(weight.double(), ord=2))
        assert layer.spectral_norm == pytest.approx(norm, rel=1e-4), name
    assert layers[DEFICIENT].full_rank == 64


@pytest.mark.parametrize(
    ("widths", "expected"),
    [((64, 128, 128, 10), "augmented"), ((64, 32, 10), "non-augmented")],
)
def test_trained_mlps_without_a_bottleneck(
    tmp_path: Path, widths: tuple[int, ...], expected: str
) -> None:
    folder = save_model(train_digits(widths), tmp_path / "mlp")
    found = dynaudit.inspect(folder, weights=True)
    assert found.structure.structural_class == expected
    assert found.structure.widths == list(widths)
    assert found.structure.branches == {}
    assert found.structure.degenerate == []
    assert all(layer.rank == layer.full_rank for layer in found.layers)


def test_cli_inspect_weights_table_and_json(bottleneck_mlp: Path) -> None:
    proc = run_cli("inspect", str(bottleneck_mlp), "--weights")
    assert proc.returncode == 0, proc.stderr
    assert "bottleneck" in proc.stdout
    degenerate = [line for line in proc.stdout.splitlines() if line.startswith("degenerate")]
    assert len(degenerate) == 1, proc.stdout
    assert DEFICIENT in degenerate[0]
    assert not any(name in degenerate[0] for name in ("2.weight", "4.weight", "6.weight"))
    assert f"{DEFICIENT_RANK}/64" in proc.stdout

    as_json = run_cli("inspect", str(bottleneck_mlp), "--weights", "--json", "-")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    expected = dynaudit.inspect(bottleneck_mlp, weights=True)
    assert data["structure"] == expected.structure.model_dump(mode="json")
    assert data["structure"]["structural_class"] == "bottleneck"
    assert data["structure"]["widths"] == list(BOTTLENECK)
    assert data["structure"]["degenerate"] == [DEFICIENT]
    ranks = {layer["name"]: layer["rank"] for layer in data["layers"]}
    assert ranks == {"0.weight": DEFICIENT_RANK, "2.weight": 16, "4.weight": 16, "6.weight": 10}


# --- classify: pure function of the widths ---


@pytest.mark.parametrize(
    ("widths", "expected"),
    [
        ([784, 256, 64, 10], "non-augmented"),  # monotone decreasing
        ([64, 64, 64], "non-augmented"),  # equal widths
        ([64, 64, 32, 32, 10], "non-augmented"),  # non-increasing with plateaus
        ([64], "non-augmented"),  # a single width
        ([8, 32, 64, 16, 4], "augmented"),  # rising then falling
        ([8, 8, 32], "augmented"),  # rising only, widest after a plateau
        ([64, 128, 128, 10], "augmented"),  # widest is a plateau
        ([64, 16, 64], "bottleneck"),  # a dip
        ([64, 128, 16, 128, 10], "bottleneck"),
        ([64, 16, 16, 32, 10], "bottleneck"),  # a flat dip
        ([8, 32, 16, 24, 4], "bottleneck"),  # a dip inside an augmented shape
    ],
)
def test_classify(widths: list[int], expected: str) -> None:
    kind, reason = classify(widths)
    assert kind == expected
    assert isinstance(reason, str) and reason.strip()


def test_classify_reason_names_the_bottleneck_width() -> None:
    kind, reason = classify([64, 128, 16, 128, 10])
    assert kind == "bottleneck"
    assert "16" in reason


# --- rank tolerance and storage dtypes ---


def test_rank_tolerance_follows_the_storage_dtype(write_checkpoint: WriteCheckpoint) -> None:
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(64, 48, generator=generator)
    u, s, vh = torch.linalg.svd(full, full_matrices=False)
    s[-8:] = 0.0
    deficient = (u * s) @ vh

    def rank_of(matrix: torch.Tensor) -> int | None:
        found = dynaudit.inspect(write_checkpoint({"w.weight": matrix}), weights=True)
        (layer,) = found.layers
        assert layer.dtype == {torch.float32: "F32", torch.bfloat16: "BF16"}[matrix.dtype]
        assert layer.full_rank == 48
        return layer.rank

    assert rank_of(full) == 48
    assert rank_of(deficient) == 40
    # Rounding to bfloat16 lifts the eight zero singular values far above float32's floor;
    # the BF16 tolerance still sees them as zero.
    assert rank_of(deficient.bfloat16()) == 40

    stored = deficient.bfloat16().float()
    sigma = torch.linalg.svdvals(stored)
    rms = float(stored.square().mean().sqrt())
    as_f32 = rank_tolerance(float(sigma[0]), rms, 64, 48, "F32")
    as_bf16 = rank_tolerance(float(sigma[0]), rms, 64, 48, "BF16")
    assert as_bf16 > 100 * as_f32
    assert int((sigma > as_f32).sum()) == 48  # float32's rule would call it full rank
    assert int((sigma > as_bf16).sum()) == 40
    for dtype in ("F64", "F32", "F16"):
        assert rank_tolerance(10.0, 1.0, 64, 48, dtype) <= rank_tolerance(10.0, 1.0, 64, 48, "BF16")


def test_fp8_weights_are_ranked_at_fp8_precision(write_checkpoint: WriteCheckpoint) -> None:
    """An FP8 weight is read dequantized to float32, yet its tolerance is FP8's: the 8 zero
    singular values that E4M3 rounding lifts are still zero (the float32 floor took them as
    rank), and the tolerance is FP8's noise, 16 times bf16's."""
    generator = torch.Generator().manual_seed(0)
    u, s, vh = torch.linalg.svd(torch.randn(64, 48, generator=generator), full_matrices=False)
    s[-8:] = 0.0
    found = dynaudit.inspect(
        write_checkpoint({"w.weight": ((u * s) @ vh).to(torch.float8_e4m3fn)}), weights=True
    )
    (layer,) = found.layers
    assert (layer.dtype, layer.rank, layer.full_rank) == ("F8_E4M3", 40, 48)
    assert rank_tolerance(10.0, 1.0, 64, 48, "F8_E4M3") == 16 * rank_tolerance(
        10.0, 1.0, 64, 48, "BF16"
    )


# --- residual branches: one gain per block ---


def test_resnet_gains_are_products_of_branch_spectral_norms(tmp_path: Path) -> None:
    path = producers.resnet_hf(tmp_path / "r")
    headers = dynaudit.inspect(path)
    assert headers.gains == []
    assert sum(headers.structure.branches.values()) == 5

    found = dynaudit.inspect(path, weights=True)
    # Branch widths: stage 0 8→8→8, stage 1 8→16→16, stage 2 16→24→24 then 24→24→24,
    # stage 3 24→32→32.
    assert found.structure.branches == {"non-augmented": 2, "augmented": 3}
    assert found.structure.degenerate == []
    assert len(found.gains) == 5
    norms = {layer.name: layer.spectral_norm for layer in found.layers}
    blocks = []
    for gain in found.gains:
        assert len(gain.layers) == 2
        expected = math.prod(norms[name] or math.nan for name in gain.layers)
        assert gain.gain == pytest.approx(expected, rel=1e-6)
        assert gain.gain > 0
        prefixes = {name.split(".layer.")[0] for name in gain.layers}
        assert len(prefixes) == 1, gain.layers
        assert not any("shortcut" in name for name in gain.layers)
        parts = prefixes.pop().split(".")
        blocks.append((int(parts[-3]), int(parts[-1])))  # resnet.encoder.stages.S.layers.B
    assert sorted(blocks) == [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0)]
    assert len({gain.block for gain in found.gains}) == 5
