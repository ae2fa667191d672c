"""A zoo of small, really trained networks saved as safetensors checkpoints: the tests'
fixtures (tests/conftest.py, tests/test_families.py), which the experiments and the
reliability suite reuse for their evidence.

Tests and method evidence need weights that went through actual optimisation (random
initialisations have very different spectra), yet nothing may be downloaded. Everything here
trains on data that ships with scikit-learn or with Python itself, on CPU, in seconds.

Usage: ``python -m tests.zoo OUT_DIR [--quick]``
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

__all__ = [
    "LeNet",
    "build_mlp",
    "digits_split",
    "fit_classifier",
    "stdlib_corpus",
    "train_digits_lenet",
    "train_digits_mlp",
    "train_tiny_llama",
]

# Modules chosen because they exist from Python 3.10 through 3.13; the list is sorted so the
# corpus (and therefore the trained weights) depends only on the interpreter's stdlib sources.
CORPUS_MODULES: tuple[str, ...] = (
    "argparse.py",
    "calendar.py",
    "configparser.py",
    "contextlib.py",
    "dataclasses.py",
    "difflib.py",
    "fractions.py",
    "functools.py",
    "inspect.py",
    "shutil.py",
    "statistics.py",
    "tempfile.py",
    "textwrap.py",
)

_BATCH_SIZE = 64
_LLAMA_BATCH_SIZE = 16


def replication_settings(quick: bool) -> dict[str, Any]:
    """dynaudit settings of the replication experiments: the defaults with K = 3 fit seeds;
    in quick mode (CI smoke tests) a small fit with K = 2."""
    return {"q_dim": 32, "pieces": 4, "steps": 150, "seeds": 2} if quick else {"seeds": 3}


def digits_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(x_train, y_train, x_val, y_val)`` for the 8×8 digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(x))
    tr, va = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[va], y[va]


def fit_classifier(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    *,
    epochs: int,
    seed: int,
    lr: float = 2e-3,
) -> float:
    """Minibatch AdamW training; returns validation accuracy."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    # A dedicated generator keeps the batch order independent of any other RNG consumer.
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=gen)
        for start in range(0, len(order), _BATCH_SIZE):
            idx = order[start : start + _BATCH_SIZE]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(x_val).argmax(dim=1)
    return float((pred == y_val).float().mean())


def save_state_dict(model: nn.Module, out_dir: Path, config: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    # safetensors refuses non-contiguous or shared storage, so copy each tensor out explicitly.
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    path = out_dir / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def build_mlp(hidden: Sequence[int], in_features: int = 64, num_classes: int = 10) -> nn.Sequential:
    """Linear/ReLU stack; parameter names are ``0.weight``, ``2.weight``, …"""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class LeNet(nn.Module):
    """LeNet-5 shrunk to 8×8 inputs: 8×8 →conv1→ 8×8 →pool→ 4×4 →conv2→ 2×2 → 64 features."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=3)
        # No pooling after conv2: at 2×2 another pool would throw away 3/4 of the features.
        self.fc1 = nn.Linear(16 * 2 * 2, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x)).flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def train_digits_mlp(
    out_dir: Path, *, hidden: Sequence[int] = (256, 256), epochs: int = 30, seed: int = 0
) -> dict[str, Any]:
    """Train an MLP on sklearn digits and save ``model.safetensors`` + ``config.json``."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    x_tr, y_tr, x_va, y_va = digits_split(seed)
    model = build_mlp(hidden)
    acc = fit_classifier(model, x_tr, y_tr, x_va, y_va, epochs=epochs, seed=seed)
    with torch.no_grad():
        fitted = float((model(x_tr).argmax(dim=1) == y_tr).float().mean())
    path = save_state_dict(model, out_dir, {"model_type": "mlp", "hidden": list(hidden)})
    return {"val_accuracy": acc, "train_accuracy": fitted, "path": str(path)}


def train_digits_lenet(out_dir: Path, *, epochs: int = 30, seed: int = 0) -> dict[str, Any]:
    """Train a LeNet-style CNN on the 8×8 digits; saves like :func:`train_digits_mlp`."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    x_tr, y_tr, x_va, y_va = digits_split(seed)
    model = LeNet()
    acc = fit_classifier(
        model,
        x_tr.view(-1, 1, 8, 8),
        y_tr,
        x_va.view(-1, 1, 8, 8),
        y_va,
        epochs=epochs,
        seed=seed,
    )
    path = save_state_dict(model, out_dir, {"model_type": "lenet"})
    return {"val_accuracy": acc, "path": str(path)}


def stdlib_corpus(modules: Sequence[str] = CORPUS_MODULES) -> bytes:
    """Concatenated source of the given stdlib files (missing ones skipped), as raw bytes."""
    root = Path(os.__file__).parent
    parts = [(root / name).read_bytes() for name in sorted(modules) if (root / name).is_file()]
    if not parts:
        raise FileNotFoundError(f"none of {list(modules)} found under {root}")
    return b"\n\n".join(parts)


def train_tiny_llama(
    out_dir: Path,
    *,
    steps: int = 300,
    seed: int = 0,
    hidden_size: int = 128,
    intermediate_size: int = 344,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    seq_len: int = 64,
    lr: float = 3e-3,
    max_shard_size: int | str | None = None,
) -> dict[str, Any]:
    """Train a byte-level ``LlamaForCausalLM`` from scratch on stdlib source and save it.

    ``train_loss_first`` is the loss of the very first batch; ``train_loss_last`` averages the
    last (up to) 10 steps, because single-batch losses of random windows are noisy.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    data = _byte_tensor(stdlib_corpus())
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max(seq_len, 128),
        tie_word_embeddings=False,
        # Byte values 0–2 are ordinary tokens here; keep the special ids out of the way.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    first, last = _train_lm(model, data, steps=steps, lr=lr, seed=seed, seq_len=seq_len)
    if not last < 0.85 * first:
        raise RuntimeError(f"LM training did not converge: loss {first:.3f} -> {last:.3f}")
    _save_pretrained(model, out_dir, max_shard_size)
    return {"train_loss_first": first, "train_loss_last": last, "path": str(out_dir)}


def finetune_tiny_llama(
    base_dir: Path,
    out_dir: Path,
    *,
    modules: Sequence[str] = (),
    text: bytes | None = None,
    steps: int = 100,
    lr: float = 3e-4,
    seed: int = 0,
    seq_len: int = 64,
    clip: float | None = 1.0,
) -> dict[str, Any]:
    """Continue training a tiny LLaMA on another corpus (other stdlib files, or ``text``):
    a real fine-tune. ``clip=None`` and a large ``lr`` make the catastrophic kind."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    data = _byte_tensor(text if text is not None else stdlib_corpus(modules))
    model = LlamaForCausalLM.from_pretrained(base_dir)
    first, last = _train_lm(
        model, data, steps=steps, lr=lr, seed=seed, seq_len=seq_len, clip=clip, warmup=False
    )
    _save_pretrained(model, Path(out_dir), None)
    return {"train_loss_first": first, "train_loss_last": last, "path": str(out_dir)}


def lm_loss(
    model_dir: Path,
    modules: Sequence[str] = CORPUS_MODULES,
    *,
    text: bytes | None = None,
    windows: int = 128,
    seq_len: int = 64,
    seed: int = 1234,
) -> float:
    """Mean next-byte loss of a saved tiny LLaMA on fixed windows of ``modules`` (or of
    ``text``): the ground truth the calibration compares the gate's verdicts with."""
    from transformers import LlamaForCausalLM

    data = _byte_tensor(text if text is not None else stdlib_corpus(modules))
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq_len, (windows,), generator=gen)
    batch = data[starts[:, None] + torch.arange(seq_len)]
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return float(model(input_ids=batch, labels=batch).loss)


def _byte_tensor(text: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def _train_lm(
    model: Any,
    data: torch.Tensor,
    *,
    steps: int,
    lr: float,
    seed: int,
    seq_len: int,
    clip: float | None = 1.0,
    warmup: bool = True,
) -> tuple[float, float]:
    """AdamW on random windows of ``data``; returns the first batch's loss and the mean of the
    last (up to) 10, because single-batch losses of random windows are noisy."""
    if len(data) <= seq_len + 1:
        raise ValueError("corpus shorter than one window")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    ramp = max(1, steps // 10) if warmup else 1

    def lr_factor(step: int) -> float:
        # Short warm-up avoids the early blow-ups a high LR causes in a freshly initialised LM.
        if step < ramp:
            return (step + 1) / ramp
        progress = (step - ramp) / max(1, steps - ramp)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(seed + 1)
    offsets = torch.arange(seq_len)
    losses: list[float] = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len, (_LLAMA_BATCH_SIZE,), generator=gen)
        batch = data[starts[:, None] + offsets]
        # The model shifts labels internally, so inputs double as labels.
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    tail = losses[-min(10, len(losses)) :]
    return losses[0], sum(tail) / len(tail)


def _save_pretrained(model: Any, out_dir: Path, max_shard_size: int | str | None) -> None:
    save_kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    # transformers 5 always writes safetensors and dropped the flag; 4.x still needs it.
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        save_kwargs["safe_serialization"] = True
    model.save_pretrained(out_dir, **save_kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: train the whole zoo into ``OUT_DIR/{mlp,lenet,llama}``."""
    parser = argparse.ArgumentParser(prog="python -m tests.zoo", description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--quick", action="store_true", help="fewer epochs/steps (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    epochs, steps = (8, 80) if args.quick else (30, 300)
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    jobs = {
        "mlp": lambda d: train_digits_mlp(d, epochs=epochs, seed=args.seed),
        "lenet": lambda d: train_digits_lenet(d, epochs=epochs, seed=args.seed),
        "llama": lambda d: train_tiny_llama(d, steps=steps, seed=args.seed),
    }
    for name, job in jobs.items():
        t0 = time.perf_counter()
        results[name] = job(args.out_dir / name)
        seconds[name] = round(time.perf_counter() - t0, 2)
    results["seconds"] = seconds
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
