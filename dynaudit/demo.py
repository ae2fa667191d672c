"""The demo checkpoint: a small MLP trained in a second on a synthetic task, no download."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["build_demo_checkpoint"]


def build_demo_checkpoint(out_dir: Path, *, seed: int = 0, steps: int = 600) -> float:
    """Train a 3-layer MLP to imitate a random teacher network; save it as a safetensors
    checkpoint with a config.json. Returns the held-out accuracy."""
    gen = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(32, 16, generator=gen) / 4, torch.randn(16, 10, generator=gen)]

    def labels(x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(x @ teacher[0]) @ teacher[1]).argmax(1)

    x_train, x_test = torch.randn(4096, 32, generator=gen), torch.randn(1024, 32, generator=gen)
    y_train, y_test = labels(x_train), labels(x_test)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, len(x_train), (128,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(
        json.dumps({"model_type": "mlp", "hidden_sizes": [128, 128], "num_labels": 10}) + "\n"
    )
    return accuracy
