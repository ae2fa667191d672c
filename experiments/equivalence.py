"""Equivalence (the paper's Table 1): does a network keep its accuracy when layers are
replaced by their dynamical systems?

    python -m experiments.equivalence --quick      # < 2 min: CI smoke test
    python -m experiments.equivalence --out docs/replication/equivalence.json \
        --plot docs/replication/equivalence.png

A LeNet-5 (shrunk to 8×8 inputs) and a small ViT (timm's tensor names) are trained from
scratch on scikit-learn's digits. Then the bottom layers (LeNet: conv1, conv2; ViT: the four
matrices of the first block) or the top layers (LeNet: fc2, fc3; ViT: the last block's) are
replaced by their reconstructions s·Ŵ, fitted at several q_dims with K fit seeds each, and
the replaced network is evaluated on the validation split. Every fit is the one ``measure``
runs (same scaling, objective, step budget and seeds), at the default H and μ.

A control that the paper lacks: each replaced matrix is also swapped for W plus Gaussian noise
of the same error norm ‖Ŵ − W‖. If the reconstruction's error were special (e.g. kept the
directions that matter), the replaced network would do better than this control.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from experiments._cli import experiment_main, pyplot, save_figure
from tests import zoo

Q_DIMS_FULL = (8, 16, 32, 64, 128)
Q_DIMS_QUICK = (8, 32)
EPOCHS_FULL = {"lenet": 40, "vit": 60}
EPOCHS_QUICK = {"lenet": 10, "vit": 15}


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, hidden)
        self.mlp.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.attn.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.attn.proj(mixed)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """A pre-norm ViT for 8×8 digits: 2×2 patches (16 tokens + class token), timm's names
    (``patch_embed.proj``, ``blocks.N.attn.qkv``, ``blocks.N.mlp.fc1``, ``head``)."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, hidden: int = 128) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(1, dim, kernel_size=2, stride=2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def _replaced(model_name: str, depth: int = 4) -> dict[str, list[str]]:
    """The weights replaced in each group, bottom and top (the paper's Bottom-4 / Top-4)."""
    if model_name == "lenet":
        return {"bottom": ["conv1.weight", "conv2.weight"], "top": ["fc2.weight", "fc3.weight"]}
    roles = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    return {
        "bottom": [f"blocks.0.{role}.weight" for role in roles],
        "top": [f"blocks.{depth - 1}.{role}.weight" for role in roles],
    }


def _train(
    model_name: str, seed: int, epochs: int
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, float]:
    torch.manual_seed(seed)
    x_tr, y_tr, x_va, y_va = zoo.digits_split(seed)
    x_tr, x_va = x_tr.view(-1, 1, 8, 8), x_va.view(-1, 1, 8, 8)
    model = zoo.LeNet() if model_name == "lenet" else TinyViT()
    accuracy = zoo.fit_classifier(model, x_tr, y_tr, x_va, y_va, epochs=epochs, seed=seed)
    return model, x_va, y_va, accuracy


def reconstructions(
    weight: torch.Tensor, name: str, settings: dict[str, Any]
) -> tuple[torch.Tensor, list[float]]:
    """K reconstructions s·Ŵ of ``weight`` (one per fit seed, shaped like ``weight``) and their
    fidelities, fitted as ``measure`` fits a layer: conv weights as C_out × (C_in·kh·kw)."""
    from dynaudit.dynamics import fit_coordinates, init_coordinates, reconstruct
    from dynaudit.dynamics.kernel import matrix_seed, rms
    from dynaudit.engine.plan import settings_from

    fit = settings_from(settings)
    matrix = weight.detach().reshape(weight.shape[0], -1).float()
    m, n = matrix.shape
    scale = float(rms(matrix[None]))
    target = (matrix / scale).expand(fit.seeds, m, n).contiguous()
    seeds = [matrix_seed(fit.seed + k, name) for k in range(fit.seeds)]
    init = init_coordinates(m, n, fit, seeds, rms(target).float())
    rebuilt = reconstruct(fit_coordinates(target, fit, init), m) * scale
    errors = (rebuilt - matrix).flatten(1).norm(dim=1) / matrix.norm()
    return rebuilt.reshape(fit.seeds, *weight.shape), [1.0 - float(e) for e in errors]


def _accuracy_with(
    model: nn.Module, swaps: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> float:
    """Validation accuracy with some weights swapped (restored afterwards)."""
    params = dict(model.named_parameters())
    kept = {name: params[name].detach().clone() for name in swaps}
    with torch.no_grad():
        for name, value in swaps.items():
            params[name].copy_(value)
        model.eval()
        accuracy = float((model(x).argmax(dim=1) == y).float().mean())
        for name, value in kept.items():
            params[name].copy_(value)
    return accuracy


def _noise_like(weight: torch.Tensor, error: float, seed: int) -> torch.Tensor:
    """W plus Gaussian noise whose norm is ``error``·‖W‖."""
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed))
    return weight + noise * (error * float(weight.norm()) / float(noise.norm()))


def run(quick: bool, work: Path) -> dict[str, Any]:
    del work  # nothing is written: the networks stay in memory
    base = zoo.replication_settings(quick)
    q_dims = Q_DIMS_QUICK if quick else Q_DIMS_FULL
    train_seeds = (0,) if quick else (0, 1)
    epochs = EPOCHS_QUICK if quick else EPOCHS_FULL
    started = time.perf_counter()
    rows = []
    for model_name in ("lenet", "vit"):
        for train_seed in train_seeds:
            model, x_va, y_va, original = _train(model_name, train_seed, epochs[model_name])
            params = dict(model.named_parameters())
            for group, names in _replaced(model_name).items():
                for q_dim in q_dims:
                    settings = {**base, "q_dim": q_dim, "pieces": min(q_dim, base.get("pieces", 8))}
                    fitted = {n: reconstructions(params[n], n, settings) for n in names}
                    k_seeds = settings["seeds"]
                    replaced = [
                        _accuracy_with(model, {n: fitted[n][0][k] for n in names}, x_va, y_va)
                        for k in range(k_seeds)
                    ]
                    control = [
                        _accuracy_with(
                            model,
                            {
                                n: _noise_like(params[n].detach(), 1.0 - fitted[n][1][k], k)
                                for n in names
                            },
                            x_va,
                            y_va,
                        )
                        for k in range(k_seeds)
                    ]
                    rows.append({
                        "model": model_name, "train_seed": train_seed, "group": group,
                        "q_dim": q_dim, "pieces": settings["pieces"], "original": original,
                        "replaced": replaced, "noise_control": control,
                        "fidelity": {n: fitted[n][1] for n in names},
                        "shapes": {n: list(params[n].shape) for n in names},
                    })  # fmt: skip
                    print(f"{model_name} seed {train_seed} {group:6} q_dim {q_dim:3}: accuracy "
                          f"{statistics.fmean(replaced):.3f} (original {original:.3f}, noise "
                          f"control {statistics.fmean(control):.3f}), fidelity "
                          f"{_mean_fidelity(rows[-1]):.3f}", flush=True)  # fmt: skip
    seconds = round(time.perf_counter() - started, 1)
    return {
        "settings": base, "q_dims": list(q_dims), "train_seeds": list(train_seeds),
        "epochs": epochs, "rows": rows, "summary": summarize(rows), "seconds": seconds,
    }  # fmt: skip


def _mean_fidelity(row: dict[str, Any]) -> float:
    return statistics.fmean(f for values in row["fidelity"].values() for f in values)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model and group, per q_dim: the accuracy drop (original − replaced) as mean and
    std over training × fit seeds, the noise control's drop, and the mean fidelity."""
    out: dict[str, Any] = {}
    for model_name in sorted({r["model"] for r in rows}):
        for group in ("bottom", "top"):
            chosen = [r for r in rows if r["model"] == model_name and r["group"] == group]
            per_q = {}
            for q_dim in sorted({r["q_dim"] for r in chosen}):
                at = [r for r in chosen if r["q_dim"] == q_dim]
                drops = [r["original"] - a for r in at for a in r["replaced"]]
                noise = [r["original"] - a for r in at for a in r["noise_control"]]
                per_q[str(q_dim)] = {
                    "accuracy_drop": statistics.fmean(drops),
                    "accuracy_drop_std": statistics.pstdev(drops),
                    "noise_control_drop": statistics.fmean(noise),
                    "fidelity": statistics.fmean(_mean_fidelity(r) for r in at),
                    "original": statistics.fmean(r["original"] for r in at),
                }
            out[f"{model_name} {group}"] = per_q
    return out


def show(result: dict[str, Any]) -> None:
    for key, per_q in result["summary"].items():
        cells = "  ".join(
            f"q{q}: {c['accuracy_drop'] * 100:+.1f}±{c['accuracy_drop_std'] * 100:.1f} pts "
            f"(fid {c['fidelity']:.2f}, noise {c['noise_control_drop'] * 100:+.1f})"
            for q, c in per_q.items()
        )
        print(f"{key:12} accuracy drop  {cells}")


def plot(result: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (key, per_q) in enumerate(result["summary"].items()):
        q = [int(x) for x in per_q]
        color = f"C{i}"
        drop = [per_q[x]["accuracy_drop"] * 100 for x in per_q]
        std = [per_q[x]["accuracy_drop_std"] * 100 for x in per_q]
        left.errorbar(q, drop, yerr=std, fmt="-o", color=color, label=key, capsize=3)
        left.plot(q, [per_q[x]["noise_control_drop"] * 100 for x in per_q], ":", color=color)
        right.plot(q, [per_q[x]["fidelity"] for x in per_q], "-o", color=color, label=key)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("q_dim")
        ax.legend(fontsize=7)
    left.set_ylabel("accuracy drop (points; dotted: noise of equal error)")
    left.axhline(0, color="grey", lw=0.5)
    right.set_ylabel("fidelity 1 − ‖Ŵ − W‖/‖W‖")
    fig.suptitle("Layers replaced by their dynamical systems (digits)")
    save_figure(fig, out)


def main(argv: list[str] | None = None) -> None:
    experiment_main(__doc__, "equivalence", run, show, plot, argv=argv)


if __name__ == "__main__":
    main()
