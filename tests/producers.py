"""Tiny checkpoints from real producers: transformers ``save_pretrained`` and torch modules
carrying torchvision / timm tensor names (torchvision and timm themselves do not import beside
this machine's torch, so their module layouts are rebuilt here, name for name)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn


def save_module(module: nn.Module, out: Path, config: dict[str, object] | None = None) -> Path:
    """``model.safetensors`` (+ ``config.json``) the way a torch training script writes it."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    if config is not None:
        (out / "config.json").write_text(json.dumps(config))
    return out


def llama(
    out: Path, *, dtype: torch.dtype = torch.bfloat16, shards: bool = True, **kw: object
) -> Path:
    """``LlamaForCausalLM`` with GQA (4 query heads, 2 key/value heads), 4 blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    settings: dict[str, object] = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
        "tie_word_embeddings": False,
    }  # fmt: skip
    settings.update(kw)
    model = LlamaForCausalLM(LlamaConfig(**settings)).to(dtype)
    model.save_pretrained(out, max_shard_size="40KB" if shards else "10GB")
    return out


def qwen2(out: Path) -> Path:
    """``Qwen2ForCausalLM``: LLaMA names plus q/k/v biases, tied embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(out)
    return out


def vit_hf(out: Path) -> Path:
    """``ViTForImageClassification``: 3 blocks, width 32, 4 heads, 5 classes."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        image_size=16, patch_size=4, num_labels=5,
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(out)
    return out


def resnet_hf(out: Path, layer_type: str = "basic") -> Path:
    """``ResNetForImageClassification``: four stages of 1, 1, 2, 1 blocks."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1],
        layer_type=layer_type, num_labels=5,
    )  # fmt: skip
    ResNetForImageClassification(config).save_pretrained(out)
    return out


class _BasicBlock(nn.Module):
    """torchvision's ``BasicBlock`` attribute names."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )


class TorchvisionResNet18(nn.Module):
    """torchvision ``resnet18``'s tensor names at a quarter… of its widths (16 → 128)."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        c_in = width
        for stage in range(4):
            c_out = width * 2**stage
            blocks = [
                _BasicBlock(c_in, c_out, 1 if stage == 0 else 2),
                _BasicBlock(c_out, c_out, 1),
            ]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
            c_in = c_out
        self.fc = nn.Linear(c_in, classes)


class _TimmAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class _TimmMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)


class _TimmBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _TimmAttention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _TimmMlp(dim, 4 * dim)


class TimmViT(nn.Module):
    """timm ``VisionTransformer``'s tensor names: fused ``attn.qkv``, ``patch_embed.proj``."""

    def __init__(self, dim: int = 24, depth: int = 4, patch: int = 4, classes: int = 7) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(*[_TimmBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)


def timm_vit(out: Path, dim: int = 24, depth: int = 4, heads: int = 3) -> Path:
    torch.manual_seed(0)
    config = {
        "architecture": "vit_tiny_patch4_16",
        "num_classes": 7,
        "num_features": dim,
        "model_args": {"embed_dim": dim, "depth": depth, "num_heads": heads},
    }
    return save_module(TimmViT(dim, depth), out, config)


def torchvision_resnet18(out: Path) -> Path:
    torch.manual_seed(0)
    return save_module(TorchvisionResNet18(), out)


def peft_lora(
    base: Path, out: Path, *, alpha: float, b_std: float, merged: Path | None = None
) -> Path:
    """A PEFT LoRA (r 4 on q_proj and v_proj) over the LLaMA at ``base``, saved by ``peft`` to
    ``out``; its B drawn from N(0, b_std²) as after some training (PEFT starts B at 0), torch
    seeded with 0. With ``merged``, the model ``merge_and_unload`` gives is saved there too."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])
    peft = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, b_std)
    peft.save_pretrained(out)
    if merged is not None:
        peft.merge_and_unload().save_pretrained(merged)
    return out


def raw_safetensors(path: Path, header: dict[str, object], data: bytes) -> Path:
    """A file in safetensors framing with any header, valid or not: length, JSON, data."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def sharded_index(parent: Path, weight_map: dict[str, str]) -> Path:
    """``parent/sharded``: one real shard (tensor ``a``) and an index with ``weight_map``,
    valid or not."""
    folder = parent / "sharded"
    folder.mkdir()
    save_file({"a": torch.ones(2, 2)}, str(folder / "model-00001-of-00002.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


# ── encoder ──────────────────────────────────────────────────────────────


# ── gpt2 / neox / phi3 ──────────────────────────────────────────────────────────────


# ── moe ──────────────────────────────────────────────────────────────


# ── encoder-decoder / clip ──────────────────────────────────────────────────────────────


# ── mobile cnn ──────────────────────────────────────────────────────────────


# ── quantized ──────────────────────────────────────────────────────────────

# The largest finite value of each FP8 format: a block's absmax is mapped onto it.
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def fp8_blocks(
    weight: torch.Tensor, block: tuple[int, int], dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` quantized the way DeepSeek-V3's FP8 release is: per ``block`` of rows ×
    columns (ragged at the edges), the block's largest magnitude mapped onto the format's
    largest value. Returns the FP8 weight and the float32 scales, one per block, with
    ``weight ≈ fp8.float() * scale`` blockwise (DeepSeek names them ``weight_scale_inv``)."""
    w = weight.float()
    m, n = w.shape
    b0, b1 = block
    rows, cols = -(-m // b0), -(-n // b1)
    padded = torch.zeros(rows * b0, cols * b1)
    padded[:m, :n] = w
    blocks = padded.view(rows, b0, cols, b1)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / FP8_MAX[dtype]
    top = FP8_MAX[dtype]
    q = (blocks / scale[:, None, :, None]).clamp(-top, top).to(dtype)
    return q.view(rows * b0, cols * b1)[:m, :n].contiguous(), scale


def _quantized_copy(base: Path, out: Path, convert: Any, quantization: dict[str, object]) -> Path:
    """``base`` (a save_pretrained directory, sharded or not) with each tensor ``name`` of the
    decoder blocks' linear layers replaced by ``convert(name, tensor)`` (a dict of tensors),
    the index updated and ``quantization_config`` added to config.json."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(base, out)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    for shard in sorted(out.glob("*.safetensors")):
        state: dict[str, torch.Tensor] = {}
        for name, tensor in load_file(str(shard)).items():
            linear = ".layers." in name and name.endswith(".weight") and tensor.dim() == 2
            new = convert(name, tensor) if linear else {name: tensor}
            state.update(new)
            if index is not None:
                index["weight_map"].pop(name)
                index["weight_map"].update(dict.fromkeys(new, shard.name))
        save_file(state, str(shard), metadata={"format": "pt"})
    if index is not None:
        index_path.write_text(json.dumps(index))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = quantization
    (out / "config.json").write_text(json.dumps(config))
    return out


def fp8_checkpoint(
    base: Path,
    out: Path,
    *,
    block: tuple[int, int] | None = (128, 128),
    dtype: torch.dtype = torch.float8_e4m3fn,
) -> Path:
    """An FP8 release of ``base``, written by safetensors' own FP8 dtypes. With ``block``, as
    DeepSeek-V3 and Qwen FP8 ship: ``X.weight`` FP8 and ``X.weight_scale_inv`` one float32
    per block, ``quantization_config`` with ``weight_block_size``. Without, as
    compressed-tensors (llm-compressor) ships a per-tensor FP8 scheme: ``X.weight_scale``, one
    value of shape (1,)."""

    def convert(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        if block is None:
            q, scale = fp8_blocks(weight, tuple(weight.shape), dtype)  # type: ignore[arg-type]
            return {name: q, f"{name}_scale": scale.reshape(1)}
        q, scale = fp8_blocks(weight, block, dtype)
        return {name: q, f"{name}_scale_inv": scale}

    fmt = "e4m3" if dtype == torch.float8_e4m3fn else "e5m2"
    quantization: dict[str, object] = (
        {"quant_method": "fp8", "fmt": fmt, "activation_scheme": "dynamic",
         "weight_block_size": list(block)}
        if block is not None
        else {"quant_method": "compressed-tensors", "format": "float-quantized",
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                  "num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True}}},
              "ignore": ["lm_head"]}
    )  # fmt: skip
    return _quantized_copy(base, out, convert, quantization)


def gptq_checkpoint(base: Path, out: Path, *, group: int = 16, method: str = "gptq") -> Path:
    """``base`` in the packed int4 layout AutoGPTQ/GPTQModel (``method="gptq"``) or AutoAWQ
    (``"awq"``) write: per linear layer ``qweight`` (int32, eight 4-bit values per word),
    ``qzeros``, float16 ``scales`` per group of ``group`` inputs, and GPTQ's ``g_idx``
    (round-to-nearest values: the layout is what matters, not the quantizer's search)."""

    def pack(values: torch.Tensor, dim: int) -> torch.Tensor:
        """Eight 4-bit values per int32 along ``dim``."""
        v = values.to(torch.int64).movedim(dim, 0)
        v = v.reshape(v.shape[0] // 8, 8, *v.shape[1:])
        shifts = (torch.arange(8) * 4).reshape(1, 8, *([1] * (v.dim() - 2)))
        word = (v << shifts).sum(dim=1)
        signed = torch.where(word < 2**31, word, word - 2**32)  # int32's two's complement
        return signed.to(torch.int32).movedim(0, dim).contiguous()

    def convert(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        w = weight.float().T  # (in, out), as GPTQ stores it
        n_in, n_out = w.shape
        groups = w.reshape(n_in // group, group, n_out)
        scale = groups.abs().amax(dim=1).clamp_min(1e-8) / 7
        q = (groups / scale[:, None]).round().clamp(-8, 7).to(torch.int64) + 8
        prefix = name.removesuffix(".weight")
        zeros = torch.full((n_in // group, n_out), 8)
        tensors = {
            f"{prefix}.qweight": pack(q.reshape(n_in, n_out), 0 if method == "gptq" else 1),
            f"{prefix}.qzeros": pack(zeros, 1),
            f"{prefix}.scales": scale.half(),
        }
        if method == "gptq":
            tensors[f"{prefix}.g_idx"] = torch.arange(n_in, dtype=torch.int32) // group
        return tensors

    quantization: dict[str, object] = {
        "quant_method": method, "bits": 4, "group_size": group, "sym": True,
        **({"desc_act": False} if method == "gptq" else {"version": "gemm", "zero_point": True}),
    }  # fmt: skip
    return _quantized_copy(base, out, convert, quantization)


def bnb_checkpoint(base: Path, out: Path, *, bits: int = 4) -> Path:
    """``base`` with the tensor names and dtypes transformers' save_pretrained writes for a
    bitsandbytes model (read off a real bitsandbytes 0.50 save): 4-bit nf4 with double
    quantization (``weight`` packed uint8, ``absmax``, ``quant_map``, ``nested_*`` and the
    ``quant_state.bitsandbytes__nf4`` blob), or LLM.int8 (``weight`` int8, ``SCB``,
    ``weight_format``). The values are placeholders: only a refusal reads these."""

    def convert(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        prefix = name.removesuffix(".weight")
        numel = weight.numel()
        if bits == 8:
            return {
                name: torch.zeros(weight.shape, dtype=torch.int8),
                f"{prefix}.SCB": weight.float().abs().amax(dim=1),
                f"{prefix}.weight_format": torch.tensor(0, dtype=torch.uint8),
            }
        return {
            name: torch.zeros(numel // 2, 1, dtype=torch.uint8),
            f"{name}.absmax": torch.zeros(numel // 64, dtype=torch.uint8),
            f"{name}.nested_absmax": torch.ones(1),
            f"{name}.nested_quant_map": torch.linspace(-1, 1, 256),
            f"{name}.quant_map": torch.linspace(-1, 1, 16),
            f"{name}.quant_state.bitsandbytes__nf4": torch.zeros(100, dtype=torch.uint8),
        }

    quantization: dict[str, object] = {
        "quant_method": "bitsandbytes", "load_in_4bit": bits == 4, "load_in_8bit": bits == 8,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
    }  # fmt: skip
    return _quantized_copy(base, out, convert, quantization)


# ── training checkpoints ──────────────────────────────────────────────────────────────
