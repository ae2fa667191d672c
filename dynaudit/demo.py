"""The demo checkpoint: a small MLP trained in a second on a synthetic task, no download."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save

from dynaudit.errors import OutputRefused
from dynaudit.files import write_bytes_atomic, write_text_atomic
from dynaudit.outputs import output_file

__all__ = ["DEMO_FILES", "build_demo_checkpoint", "refuse_foreign"]

MARKER = ".dynaudit-demo"  # says that dynaudit built this directory
DEMO_FILES = frozenset({"model.safetensors", "config.json", MARKER})


def refuse_foreign(out_dir: Path) -> None:
    """The demo builds into a missing or empty directory, or one an earlier demo built (only
    its files, and its marker): never over a checkpoint or anything else the user had."""
    if not out_dir.exists() and not out_dir.is_symlink():
        output_file(out_dir)  # a parent that is a file, a dangling link: refused
        return
    if not out_dir.is_dir():
        raise OutputRefused(f"--out {out_dir}: exists and is not a directory", path=str(out_dir))
    names = {entry.name for entry in out_dir.iterdir()}
    if names and not (MARKER in names and names <= DEMO_FILES):
        raise OutputRefused(
            f"--out {out_dir}: not empty and not built by `dynaudit demo` (it holds "
            f"{', '.join(sorted(names)[:3])}{', …' if len(names) > 3 else ''}); give a new or "
            "empty directory",
            path=str(out_dir),
        )


def build_demo_checkpoint(out_dir: Path, *, seed: int = 0, steps: int = 600) -> float:
    """Train a 3-layer MLP to imitate a random teacher network; save it as a safetensors
    checkpoint with a config.json. Returns the held-out accuracy. ``out_dir`` must be missing,
    empty, or an earlier demo's (:func:`refuse_foreign`)."""
    refuse_foreign(out_dir)
    gen = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(32, 16, generator=gen) / 4, torch.randn(16, 10, generator=gen)]

    def labels(x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(x @ teacher[0]) @ teacher[1]).argmax(1)

    x_train, x_test = torch.randn(4096, 32, generator=gen), torch.randn(1024, 32, generator=gen)
    y_train, y_test = labels(x_train), labels(x_test)
    torch.manual_seed(seed)
    hidden = [torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU()]
    model = torch.nn.Sequential(*hidden, torch.nn.Linear(128, 10))
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
    refuse_foreign(out_dir)  # again: it may have appeared while training
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    write_text_atomic(out_dir / MARKER, "built by `dynaudit demo`\n")
    write_bytes_atomic(out_dir / "model.safetensors", save(state, metadata={"format": "pt"}))
    write_text_atomic(
        out_dir / "config.json",
        json.dumps({"model_type": "mlp", "hidden_sizes": [128, 128], "num_labels": 10}) + "\n",
    )
    return accuracy
