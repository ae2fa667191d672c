"""A seeded, LLaMA-shaped bf16 safetensors checkpoint with Hugging Face tensor names.

Every projection matrix is ``W = σ·(noise + low-rank)``: Gaussian noise plus a rank-``r`` part
whose singular values decay as a power law (``d_j ∝ j^-α``). This gives the spectrum a bulk and
a heavy-tailed set of outliers, like trained weights, rather than pure white noise (for which
both tools would see nothing but Marchenko-Pastur). The low-rank part carries ``signal`` of the
Frobenius energy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["Shape", "generate", "projection"]

_STD = 0.02  # typical init/trained std of LLaMA-style projections
_RANK = 64  # rank of the structured part
_ALPHA = 1.0  # power-law exponent of its singular values
_SIGNAL = 0.5  # fraction of the Frobenius energy in the structured part


@dataclass(frozen=True)
class Shape:
    """Sizes of the generated model."""

    hidden: int
    intermediate: int
    blocks: int
    vocab: int
    heads: int

    def projections(self) -> dict[str, tuple[int, int]]:
        """Every fitted matrix name → (out, in), in file order."""
        h, i = self.hidden, self.intermediate
        out: dict[str, tuple[int, int]] = {}
        for b in range(self.blocks):
            p = f"model.layers.{b}"
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[f"{p}.self_attn.{name}.weight"] = (h, h)
            out[f"{p}.mlp.gate_proj.weight"] = (i, h)
            out[f"{p}.mlp.up_proj.weight"] = (i, h)
            out[f"{p}.mlp.down_proj.weight"] = (h, i)
        out["lm_head.weight"] = (self.vocab, h)
        return out


def projection(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Noise plus a power-law low-rank part, float32, RMS ≈ ``_STD``."""
    r = min(_RANK, m, n)
    noise = torch.randn(m, n, generator=gen)
    left = torch.randn(m, r, generator=gen)
    right = torch.randn(r, n, generator=gen)
    decay = torch.arange(1, r + 1, dtype=torch.float32).pow(-_ALPHA)
    structured = (left * decay) @ right
    # Scale the two parts so the structured one holds _SIGNAL of the energy, then set the RMS.
    structured *= (_SIGNAL / (1 - _SIGNAL)) ** 0.5 * noise.norm() / structured.norm()
    weight = noise.add_(structured)
    return weight.mul_(_STD / weight.pow(2).mean().sqrt())


def generate(directory: Path, shape: Shape, seed: int = 0) -> dict[str, object]:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``; returns a summary."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    h = shape.hidden
    tensors["model.embed_tokens.weight"] = (torch.randn(shape.vocab, h, generator=gen) * _STD).to(
        torch.bfloat16
    )
    for name, (m, n) in shape.projections().items():
        tensors[name] = projection(m, n, gen).to(torch.bfloat16)
    # Norm gains near 1, as trained RMSNorms are; not fitted by dynaudit or WeightWatcher.
    norms = [
        f"model.layers.{b}.{k}.weight"
        for b in range(shape.blocks)
        for k in ("input_layernorm", "post_attention_layernorm")
    ]
    norms.append("model.norm.weight")
    for name in norms:
        tensors[name] = (1.0 + 0.05 * torch.randn(h, generator=gen)).to(torch.bfloat16)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.blocks,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.heads,
        "vocab_size": shape.vocab,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    sizes = shape.projections().values()
    return {
        "path": str(directory),
        "shape": asdict(shape),
        "dtype": "bf16",
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "bytes": (directory / "model.safetensors").stat().st_size,
        "fitted_matrices": len(shape.projections()),
        "largest_matrix": list(max(sizes, key=lambda s: s[0] * s[1])),
        "weights": f"seed {seed}; W = noise + rank-{_RANK} part with singular values ∝ j^-{_ALPHA} "
        f"holding {_SIGNAL:.0%} of the energy, RMS {_STD}; embeddings Gaussian, norms ≈ 1",
    }
