"""The suite's base models, one per family, from real producers (tests/producers.py):

- ``llama``: transformers ``LlamaForCausalLM`` (4 blocks, hidden 64, GQA), float32, sharded by
  ``save_pretrained``;
- ``vit``: transformers ``ViTForImageClassification`` (3 blocks, width 32), float32;
- ``cnn``: a torch module with torchvision ``resnet18``'s tensor names (widths 8 → 64).

They are freshly initialised rather than trained: a false alarm or a missed damage on an
initialised model is as real as on a trained one, and the LLaMA cases that need training (the
catastrophic fine-tune) train it themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tests import producers

__all__ = ["BUILDERS", "FAMILIES"]


def llama(out: Path) -> Path:
    return producers.llama(
        out, dtype=torch.float32, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256,
    )  # fmt: skip


def vit(out: Path) -> Path:
    return producers.vit_hf(out)


def cnn(out: Path) -> Path:
    torch.manual_seed(0)
    return producers.save_module(producers.TorchvisionResNet18(width=8), out)


BUILDERS: dict[str, Callable[[Path], Path]] = {"llama": llama, "vit": vit, "cnn": cnn}
FAMILIES = tuple(BUILDERS)
