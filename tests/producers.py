"""Tiny checkpoints from real producers: transformers ``save_pretrained`` and torch modules
carrying torchvision / timm tensor names (torchvision and timm themselves do not import beside
this machine's torch, so their module layouts are rebuilt here, name for name)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, NamedTuple

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

# Tiny BERT-class sizes: width 32, 4 heads (head_dim 8), MLP 64, a 50-token vocabulary.
ENCODER_SIZES: dict[str, object] = {
    "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 50,
    "max_position_embeddings": 40,
}  # fmt: skip


def hf_encoder(out: Path, model: str, layers: int = 2, **settings: object) -> Path:
    """Any transformers encoder class by name (``"BertForPreTraining"``), saved by
    ``save_pretrained`` from its own config class at the tiny encoder sizes (DistilBERT's
    config takes ``dim``/``n_layers``/``n_heads``/``hidden_dim``)."""
    import transformers

    torch.manual_seed(0)
    model_class = getattr(transformers, model)
    sizes: dict[str, object]
    if model.startswith("DistilBert"):
        sizes = {"dim": 32, "n_layers": layers, "n_heads": 4, "hidden_dim": 64, "vocab_size": 50,
                 "max_position_embeddings": 40}  # fmt: skip
    else:
        sizes = {**ENCODER_SIZES, "num_hidden_layers": layers}
    config = model_class.config_class(**{**sizes, **settings})
    model_class(config).save_pretrained(out)
    return out


def bert(out: Path) -> Path:
    """``BertModel``: 3 layers and the pooler, no ``bert.`` prefix."""
    return hf_encoder(out, "BertModel", layers=3)


def bert_classifier(out: Path) -> Path:
    """``BertForSequenceClassification``: ``bert.`` prefix, pooler, 3-way classifier."""
    return hf_encoder(out, "BertForSequenceClassification", layers=3, num_labels=3)


def roberta(out: Path) -> Path:
    """``RobertaForSequenceClassification``: no pooler, ``classifier.dense`` → ``out_proj``."""
    return hf_encoder(out, "RobertaForSequenceClassification", layers=2, num_labels=3)


def distilbert(out: Path) -> Path:
    """``DistilBertForSequenceClassification``: ``q_lin`` … ``ffn.lin2``, ``pre_classifier``."""
    return hf_encoder(out, "DistilBertForSequenceClassification", layers=3)


def albert(out: Path, **settings: object) -> Path:
    """``AlbertForSequenceClassification``: embeddings 16 wide projected to 32, one shared layer
    group applied at 3 layers."""
    return hf_encoder(
        out, "AlbertForSequenceClassification", layers=3, embedding_size=16, **settings
    )


def electra(out: Path) -> Path:
    """``ElectraForSequenceClassification``: embeddings 16 wide, ``embeddings_project`` to 32."""
    return hf_encoder(out, "ElectraForSequenceClassification", layers=2, embedding_size=16)


def sentence_transformer(out: Path) -> Path:
    """A sentence-transformers model (a tiny BERT, mean pooling, normalisation) saved by
    ``SentenceTransformer.save``: the transformer's files at the root beside ``modules.json``
    and ``1_Pooling/``, as all-MiniLM-L6-v2 ships."""
    from sentence_transformers import SentenceTransformer
    from transformers import BertTokenizerFast

    try:  # sentence-transformers ≥ 6 moved the modules (the old path warns)
        from sentence_transformers.sentence_transformer import modules
    except ImportError:
        from sentence_transformers import models as modules

    bert(out / "bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(45))]
    (out / "bert" / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(str(out / "bert" / "vocab.txt")).save_pretrained(out / "bert")
    transformer = modules.Transformer(str(out / "bert"), max_seq_length=32)
    pooling = modules.Pooling(32, pooling_mode="mean")
    model = SentenceTransformer(modules=[transformer, pooling, modules.Normalize()], device="cpu")
    model.save(str(out / "st"))
    return out / "st"


# ── gpt2 / neox / phi3 ──────────────────────────────────────────────────────────────


def gpt2(out: Path, **kw: object) -> Path:
    """``GPT2LMHeadModel``: 3 blocks, n_embd 32, 4 heads, Conv1D weights, lm_head tied to wte."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    settings: dict[str, object] = {
        "n_embd": 32, "n_layer": 3, "n_head": 4, "vocab_size": 64, "n_positions": 32,
        "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    settings.update(kw)
    GPT2LMHeadModel(GPT2Config(**settings)).save_pretrained(out)
    return out


def gpt_neox(out: Path, **kw: object) -> Path:
    """``GPTNeoXForCausalLM`` (Pythia's layout): 3 blocks, hidden 32, 4 heads, parallel
    residual, an untied ``embed_out``."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    settings: dict[str, object] = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "vocab_size": 64, "max_position_embeddings": 32,
    }  # fmt: skip
    settings.update(kw)
    GPTNeoXForCausalLM(GPTNeoXConfig(**settings)).save_pretrained(out)
    return out


def falcon(out: Path, **kw: object) -> Path:
    """``FalconForCausalLM``: 2 blocks, hidden 32, 4 heads; FalconConfig's default layout is
    multi-query with a parallel residual (``new_decoder_architecture=True, num_kv_heads=2`` gives
    the grouped layout; ``multi_query=False, parallel_attn=False`` the per-head one)."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    settings: dict[str, object] = {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 64,
        "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    settings.update(kw)
    FalconForCausalLM(FalconConfig(**settings)).save_pretrained(out)
    return out


def phi3(out: Path, **kw: object) -> Path:
    """``Phi3ForCausalLM``: fused ``qkv_proj`` and ``gate_up_proj``, 3 blocks, hidden 32, 4 query
    heads and 2 key/value heads, an untied lm_head."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    settings: dict[str, object] = {
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
        "max_position_embeddings": 32, "original_max_position_embeddings": 32,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    }  # fmt: skip
    settings.update(kw)
    Phi3ForCausalLM(Phi3Config(**settings)).save_pretrained(out)
    return out


# ── moe ──────────────────────────────────────────────────────────────

# Every MoE producer: hidden 32, 4 experts, 2 chosen per token, GQA attention (4 heads, 2 kv).
_MOE: dict[str, object] = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_experts_per_tok": 2, "vocab_size": 64,
    "tie_word_embeddings": False,
}  # fmt: skip


def mixtral(out: Path, *, fused: bool = False) -> Path:
    """``MixtralForCausalLM``, 2 blocks of 4 experts (``block_sparse_moe.experts.E.w1/w2/w3``).
    ``fused``: its state dict saved as it is in memory, experts stacked in 3-D
    ``mlp.experts.gate_up_proj`` / ``down_proj`` (a training script's ``save_file``)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**_MOE, intermediate_size=24, num_local_experts=4))
    if not fused:
        model.save_pretrained(out)
        return out
    save_module(model, out)
    model.config.to_json_file(out / "config.json")
    return out


def qwen2_moe(out: Path) -> Path:
    """``Qwen2MoeForCausalLM``: 4 experts per block plus a shared expert and its scalar gate."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        **_MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=48
    )
    Qwen2MoeForCausalLM(config).save_pretrained(out)
    return out


def qwen3_moe(out: Path) -> Path:
    """``Qwen3MoeForCausalLM``: 4 experts per block, q/k norms, no shared expert."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    Qwen3MoeForCausalLM(
        Qwen3MoeConfig(**_MOE, num_experts=4, moe_intermediate_size=16)
    ).save_pretrained(out)
    return out


def deepseek(out: Path, *, version: int = 3) -> Path:
    """``DeepseekV3ForCausalLM`` (``version=2``: V2): 3 blocks, the first dense, then 4 routed
    experts and a shared one; multi-head latent attention (V3 with a query low-rank pair)."""
    from transformers import (
        DeepseekV2Config,
        DeepseekV2ForCausalLM,
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
    )

    torch.manual_seed(0)
    settings = {**_MOE, "num_hidden_layers": 3, "num_key_value_heads": 4}
    config_type, model_type = (
        (DeepseekV3Config, DeepseekV3ForCausalLM)
        if version == 3
        else (DeepseekV2Config, DeepseekV2ForCausalLM)
    )
    config = config_type(
        **settings, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
        q_lora_rank=16 if version == 3 else None, kv_lora_rank=8, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=6,
    )  # fmt: skip
    model_type(config).save_pretrained(out)
    return out


# ── encoder-decoder / clip ──────────────────────────────────────────────────────────────


def t5(out: Path, *, gated: bool = False, layers: int = 3, decoder_layers: int = 3) -> Path:
    """``T5ForConditionalGeneration``: d_model 32, 4 heads of d_kv 8, d_ff 64. ``gated`` is
    flan-t5 / T5 v1.1: a gated-gelu MLP (wi_0, wi_1, wo) and an lm_head of its own, not tied
    to the embedding (transformers ≥ 5 writes it only when it differs from the embedding)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=layers,
        num_decoder_layers=decoder_layers, num_heads=4,
        feed_forward_proj="gated-gelu" if gated else "relu",
    )  # fmt: skip
    model = T5ForConditionalGeneration(config)
    if gated:
        model.lm_head.weight = nn.Parameter(torch.randn(64, 32) * 0.05)
        model.config.tie_word_embeddings = False
    model.save_pretrained(out)
    return out


def bart(out: Path, *, mbart: bool = False, layers: int = 3, decoder_layers: int = 3) -> Path:
    """``BartForConditionalGeneration`` (post-LayerNorm) or, with ``mbart``,
    ``MBartForConditionalGeneration`` (pre-LayerNorm, a final norm per stack): d_model 32,
    4 heads, ffn 64, the lm_head tied to the shared embedding."""
    import transformers

    torch.manual_seed(0)
    kind = "MBart" if mbart else "Bart"
    config = getattr(transformers, f"{kind}Config")(
        vocab_size=64, d_model=32, encoder_layers=layers, decoder_layers=decoder_layers,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64,
    )  # fmt: skip
    getattr(transformers, f"{kind}ForConditionalGeneration")(config).save_pretrained(out)
    return out


CLIP_TEXT = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "vocab_size": 64, "max_position_embeddings": 16,
}  # fmt: skip
CLIP_VISION = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "image_size": 16, "patch_size": 4,
}  # fmt: skip


def clip(out: Path) -> Path:
    """``CLIPModel``: text and vision towers of width 32, 2 layers, 4 heads each; 16×16
    images in 4×4 patches; projections to 16."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION, projection_dim=16)
    CLIPModel(config).save_pretrained(out)
    return out


def clip_text(out: Path, *, hub_names: bool = False) -> Path:
    """``CLIPTextModel`` (a diffusion pipeline's text encoder). transformers ≥ 5 writes the
    tower bare (``encoder.layers.N…``); ``hub_names`` renames every tensor to the
    ``text_model.…`` names that transformers 4 wrote and most Hub text encoders carry."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT))
    model.save_pretrained(out)
    if hub_names:
        from safetensors.torch import load_file

        state = load_file(str(out / "model.safetensors"))
        save_file({f"text_model.{k}": v for k, v in state.items()}, str(out / "model.safetensors"))
    return out


# ── mobile cnn ──────────────────────────────────────────────────────────────

# torchvision's MobileNetV2/V3 and EfficientNet and timm's EfficientNet/MobileNetV3 classes,
# rebuilt module for module so that state_dict() names and shapes are theirs. Each block knows
# whether it adds its input back (``use_res_connect`` / ``has_skip``), as the originals do.


def _divisible(value: float, divisor: int = 8) -> int:
    """Channels rounded to a multiple of ``divisor`` (at least ``divisor``), never below 90 %
    of ``value``: the rounding torchvision and timm apply to widths."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


class _ConvNormAct(nn.Sequential):
    """torchvision's ``Conv2dNormActivation``: ``0`` the conv, ``1`` the BatchNorm, ``2`` the
    activation (no parameters)."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1,
        act: type[nn.Module] | None = nn.ReLU6,
    ) -> None:  # fmt: skip
        conv = nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
        super().__init__(conv, nn.BatchNorm2d(c_out), *([act()] if act else []))


class _TvInvertedResidual(nn.Module):
    """torchvision ``mobilenetv2.InvertedResidual``: ``conv.0.0`` expansion (when t ≠ 1), the
    depthwise ``conv.K.0``, then the projection ``conv.K+1`` and its BatchNorm."""

    def __init__(self, c_in: int, c_out: int, stride: int, t: int) -> None:
        super().__init__()
        hidden = round(c_in * t)
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = [_ConvNormAct(c_in, hidden, 1)] if t != 1 else []
        layers += [
            _ConvNormAct(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


MOBILENET_V2 = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)  # fmt: skip  (t, c, n, s)


class TorchvisionMobileNetV2(nn.Module):
    """torchvision ``MobileNetV2(width_mult=width, inverted_residual_setting=setting)``;
    ``last`` replaces its fixed 1280 head width only to keep test models small (the names do
    not change)."""

    def __init__(
        self, width: float = 1.0, classes: int = 10, last: int = 1280,
        setting: tuple[tuple[int, int, int, int], ...] = MOBILENET_V2,
    ) -> None:  # fmt: skip
        super().__init__()
        c_in = _divisible(32 * width)
        head = _divisible(last * max(1.0, width))
        features: list[nn.Module] = [_ConvNormAct(3, c_in, 3, 2)]
        for t, c, n, s in setting:
            c_out = _divisible(c * width)
            for i in range(n):
                features.append(_TvInvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        features.append(_ConvNormAct(c_in, head, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(head, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class _TvSqueezeExcitation(nn.Module):
    """torchvision ``ops.SqueezeExcitation``: ``fc1`` reduces, ``fc2`` expands (1 × 1 convs)."""

    def __init__(self, channels: int, squeeze: int, gate: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return x * self.scale_activation(scale)


class _TvMBConv(nn.Module):
    """torchvision's ``mobilenetv3.InvertedResidual`` and ``efficientnet.MBConv``:
    ``block.K.0`` convs (expansion when the widths differ, depthwise, projection) with an
    optional ``block.K.fc1/fc2`` squeeze-excitation before the projection."""

    def __init__(
        self, c_in: int, kernel: int, expanded: int, c_out: int, stride: int,
        squeeze: int | None, act: type[nn.Module], gate: type[nn.Module],
    ) -> None:  # fmt: skip
        super().__init__()
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expanded != c_in:
            layers.append(_ConvNormAct(c_in, expanded, 1, act=act))
        layers.append(_ConvNormAct(expanded, expanded, kernel, stride, expanded, act=act))
        if squeeze is not None:
            layers.append(_TvSqueezeExcitation(expanded, squeeze, gate))
        layers.append(_ConvNormAct(expanded, c_out, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res_connect else self.block(x)


# torchvision MobileNetV3 settings: (input, kernel, expanded, output, squeeze-excitation, stride)
MOBILENET_V3 = {
    "large": ((16, 3, 16, 16, False, 1), (16, 3, 64, 24, False, 2), (24, 3, 72, 24, False, 1),
              (24, 5, 72, 40, True, 2), (40, 5, 120, 40, True, 1), (40, 5, 120, 40, True, 1),
              (40, 3, 240, 80, False, 2), (80, 3, 200, 80, False, 1),
              (80, 3, 184, 80, False, 1), (80, 3, 184, 80, False, 1),
              (80, 3, 480, 112, True, 1), (112, 3, 672, 112, True, 1),
              (112, 5, 672, 160, True, 2), (160, 5, 960, 160, True, 1),
              (160, 5, 960, 160, True, 1)),
    "small": ((16, 3, 16, 16, True, 2), (16, 3, 72, 24, False, 2), (24, 3, 88, 24, False, 1),
              (24, 5, 96, 40, True, 2), (40, 5, 240, 40, True, 1), (40, 5, 240, 40, True, 1),
              (40, 5, 120, 48, True, 1), (48, 5, 144, 48, True, 1), (48, 5, 288, 96, True, 2),
              (96, 5, 576, 96, True, 1), (96, 5, 576, 96, True, 1)),
}  # fmt: skip


class TorchvisionMobileNetV3(nn.Module):
    """torchvision ``mobilenet_v3_large`` / ``mobilenet_v3_small`` at ``width``."""

    def __init__(self, arch: str = "large", width: float = 1.0, classes: int = 10) -> None:
        super().__init__()
        setting = MOBILENET_V3[arch]
        first = _divisible(setting[0][0] * width)
        features: list[nn.Module] = [_ConvNormAct(3, first, 3, 2, act=nn.Hardswish)]
        for c_in, kernel, expanded, c_out, se, stride in setting:
            c_in, expanded, c_out = (_divisible(c * width) for c in (c_in, expanded, c_out))
            squeeze = _divisible(expanded // 4) if se else None
            features.append(
                _TvMBConv(c_in, kernel, expanded, c_out, stride, squeeze, nn.ReLU, nn.Hardsigmoid)
            )
        last_in = _divisible(setting[-1][3] * width)
        features.append(_ConvNormAct(last_in, 6 * last_in, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        hidden = _divisible((1280 if arch == "large" else 1024) * width)
        self.classifier = nn.Sequential(
            nn.Linear(6 * last_in, hidden),
            nn.Hardswish(),
            nn.Dropout(0.2),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


# EfficientNet-B0 (torchvision and timm): (t, kernel, stride, input, output, blocks)
EFFICIENTNET_B0 = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
                   (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
                   (6, 3, 1, 192, 320, 1))  # fmt: skip


class TorchvisionEfficientNet(nn.Module):
    """torchvision ``EfficientNet`` (B0's table at ``width`` and ``depth``): stages
    ``features.1`` … ``features.7`` of MBConv blocks, squeeze-excitation in every block."""

    def __init__(self, width: float = 1.0, depth: float = 1.0, classes: int = 10) -> None:
        super().__init__()
        import math

        first = _divisible(EFFICIENTNET_B0[0][3] * width)
        features: list[nn.Module] = [_ConvNormAct(3, first, 3, 2, act=nn.SiLU)]
        for t, kernel, stride, c_in, c_out, n in EFFICIENTNET_B0:
            c_in, c_out = _divisible(c_in * width), _divisible(c_out * width)
            stage = []
            for i in range(math.ceil(n * depth)):
                block_in = c_in if i == 0 else c_out
                expanded = _divisible(block_in * t)
                stage.append(
                    _TvMBConv(block_in, kernel, expanded, c_out, stride if i == 0 else 1,
                              max(1, block_in // 4), nn.SiLU, nn.Sigmoid)
                )  # fmt: skip
            features.append(nn.Sequential(*stage))
        last_in = _divisible(EFFICIENTNET_B0[-1][4] * width)
        features.append(_ConvNormAct(last_in, 4 * last_in, 1, act=nn.SiLU))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * last_in, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


class _TimmSqueezeExcite(nn.Module):
    """timm ``SqueezeExcite``: ``conv_reduce``, ``conv_expand`` (1 × 1 convs with biases)."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.act1 = nn.ReLU()
        self.conv_expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), True)))))


class _TimmMobileBlock(nn.Module):
    """timm's ``DepthwiseSeparableConv`` (``ds``: conv_dw, se, conv_pw), ``InvertedResidual``
    (``ir``: conv_pw, conv_dw, se, conv_pwl) and ``ConvBnAct`` (``cn``: conv)."""

    def __init__(
        self, kind: str, c_in: int, c_out: int, kernel: int, stride: int, mid: int,
        reduced: int | None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.kind = kind
        self.has_skip = kind != "cn" and stride == 1 and c_in == c_out
        pad = (kernel - 1) // 2
        se = _TimmSqueezeExcite(mid, reduced) if reduced else nn.Identity()
        if kind == "cn":
            self.conv = nn.Conv2d(c_in, c_out, kernel, stride, pad, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
        elif kind == "ds":
            self.conv_dw = nn.Conv2d(c_in, c_in, kernel, stride, pad, groups=c_in, bias=False)
            self.bn1 = nn.BatchNorm2d(c_in)
            self.aa = nn.Identity()
            self.se = se
            self.conv_pw = nn.Conv2d(c_in, c_out, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
        else:
            self.conv_pw = nn.Conv2d(c_in, mid, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(mid)
            self.conv_dw = nn.Conv2d(mid, mid, kernel, stride, pad, groups=mid, bias=False)
            self.bn2 = nn.BatchNorm2d(mid)
            self.aa = nn.Identity()
            self.se = se
            self.conv_pwl = nn.Conv2d(mid, c_out, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = nn.functional.relu
        if self.kind == "cn":
            return act(self.bn1(self.conv(x)))
        if self.kind == "ds":
            y = self.bn2(self.conv_pw(self.se(act(self.bn1(self.conv_dw(x))))))
        else:
            y = act(self.bn2(self.conv_dw(act(self.bn1(self.conv_pw(x))))))
            y = self.bn3(self.conv_pwl(self.se(y)))
        return x + y if self.has_skip else y


# timm architecture definitions ("type_rREPEATS_kKERNEL_sSTRIDE_eEXPANSION_cCHANNELS_seRATIO"),
# one list of strings per stage, as in timm's efficientnet.py and mobilenetv3.py.
TIMM_ARCHS: dict[str, tuple[tuple[str, ...], ...]] = {
    "mobilenetv2_100": (("ds_r1_k3_s1_c16",), ("ir_r2_k3_s2_e6_c24",), ("ir_r3_k3_s2_e6_c32",),
                        ("ir_r4_k3_s2_e6_c64",), ("ir_r3_k3_s1_e6_c96",),
                        ("ir_r3_k3_s2_e6_c160",), ("ir_r1_k3_s1_e6_c320",)),
    "efficientnet_b0": (("ds_r1_k3_s1_e1_c16_se0.25",), ("ir_r2_k3_s2_e6_c24_se0.25",),
                        ("ir_r2_k5_s2_e6_c40_se0.25",), ("ir_r3_k3_s2_e6_c80_se0.25",),
                        ("ir_r3_k5_s1_e6_c112_se0.25",), ("ir_r4_k5_s2_e6_c192_se0.25",),
                        ("ir_r1_k3_s1_e6_c320_se0.25",)),
    "mobilenetv3_large_100": (("ds_r1_k3_s1_e1_c16_nre",),
                              ("ir_r1_k3_s2_e4_c24_nre", "ir_r1_k3_s1_e3_c24_nre"),
                              ("ir_r3_k5_s2_e3_c40_se0.25_nre",),
                              ("ir_r1_k3_s2_e6_c80", "ir_r1_k3_s1_e2.5_c80",
                               "ir_r2_k3_s1_e2.3_c80"),
                              ("ir_r2_k3_s1_e6_c112_se0.25",), ("ir_r3_k5_s2_e6_c160_se0.25",),
                              ("cn_r1_k1_s1_c960",)),
    "mobilenetv3_small_100": (("ds_r1_k3_s2_e1_c16_se0.25_nre",),
                              ("ir_r1_k3_s2_e4.5_c24_nre", "ir_r1_k3_s1_e3.67_c24_nre"),
                              ("ir_r1_k5_s2_e4_c40_se0.25", "ir_r2_k5_s1_e6_c40_se0.25"),
                              ("ir_r2_k5_s1_e3_c48_se0.25",), ("ir_r3_k5_s2_e6_c96_se0.25",),
                              ("cn_r1_k1_s1_c576",)),
}  # fmt: skip


class _TimmSpec(NamedTuple):
    kind: str
    repeats: int
    kernel: int
    stride: int
    expansion: float
    channels: int
    se: float


def _timm_spec(spec: str) -> _TimmSpec:
    """One string of a timm architecture definition, e.g. ``ir_r2_k3_s2_e6_c24_se0.25``."""
    kind, *options = spec.split("_")
    found = {"e": "1", "se": "0"}
    for option in options:
        key = "se" if option.startswith("se") else option[0]
        found[key] = option[len(key) :]
    return _TimmSpec(
        kind, int(found["r"]), int(found["k"]), int(found["s"]), float(found["e"]),
        int(found["c"]), float(found["se"]),
    )  # fmt: skip


class TimmMobile(nn.Module):
    """timm's ``EfficientNet`` class (``conv_stem``, ``blocks.S.B``, ``conv_head`` + ``bn2``,
    ``classifier``), or its ``MobileNetV3`` class (``conv_head`` with a bias after pooling)
    when the name starts with ``mobilenetv3``; channels scaled by ``width``."""

    def __init__(self, arch: str, width: float = 1.0, classes: int = 10, head: int = 1280) -> None:
        super().__init__()
        v3 = arch.startswith("mobilenetv3")
        stem = _divisible((16 if v3 else 32) * width)
        self.conv_stem = nn.Conv2d(3, stem, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        c_in, stages = stem, []
        for stage in TIMM_ARCHS[arch]:
            blocks: list[nn.Module] = []
            for spec in map(_timm_spec, stage):
                c_out = _divisible(spec.channels * width)
                for _ in range(spec.repeats):
                    mid = _divisible(c_in * spec.expansion)
                    # MobileNetV3 sizes squeeze-excitation from the expanded width,
                    # EfficientNet from the block's input width.
                    reduced = _divisible(mid * spec.se) if v3 else max(1, round(c_in * spec.se))
                    stride = spec.stride if not blocks else 1  # only a stage's first block strides
                    blocks.append(
                        _TimmMobileBlock(spec.kind, c_in, c_out, spec.kernel, stride, mid,
                                   reduced if spec.se else None)
                    )  # fmt: skip
                    c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        features = _divisible(head * max(1.0, width))
        if v3:
            self.global_pool = nn.AdaptiveAvgPool2d(1)
            self.conv_head = nn.Conv2d(c_in, features, 1)
            self.norm_head = nn.Identity()
        else:
            self.conv_head = nn.Conv2d(c_in, features, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(features)
            self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.v3 = v3
        self.classifier = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(nn.functional.relu(self.bn1(self.conv_stem(x))))
        if self.v3:
            x = nn.functional.hardswish(self.conv_head(self.global_pool(x)))
        else:
            x = self.global_pool(nn.functional.relu(self.bn2(self.conv_head(x))))
        return self.classifier(x.flatten(1))


def skips(module: nn.Module) -> list[str]:
    """The producer's own verdict: the modules that add their input back, by name."""
    return [
        name
        for name, sub in module.named_modules()
        if getattr(sub, "use_res_connect", False) or getattr(sub, "has_skip", False)
    ]


def torchvision_mobilenet_v2(out: Path, width: float = 0.25, last: int = 64) -> Path:
    torch.manual_seed(0)
    return save_module(TorchvisionMobileNetV2(width, last=last), out)


def torchvision_mobilenet_v3(out: Path, arch: str = "large", width: float = 0.25) -> Path:
    torch.manual_seed(0)
    return save_module(TorchvisionMobileNetV3(arch, width), out)


def torchvision_efficientnet(out: Path, width: float = 0.25, depth: float = 1.0) -> Path:
    torch.manual_seed(0)
    return save_module(TorchvisionEfficientNet(width, depth), out)


def timm_mobile(
    out: Path, arch: str = "efficientnet_b0", width: float = 0.25, head: int = 64
) -> Path:
    torch.manual_seed(0)
    config = {"architecture": arch, "num_classes": 10}
    return save_module(TimmMobile(arch, width, head=head), out, config)


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


class TrainNet(nn.Module):
    """A small model as a training script defines it (two Linear layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(24, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def trained_net(seed: int = 0) -> tuple[TrainNet, torch.optim.Optimizer]:
    """:class:`TrainNet` and its Adam optimizer after one step, so the optimizer has state
    (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter)."""
    torch.manual_seed(seed)
    model = TrainNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 24)).square().mean().backward()
    optimizer.step()
    return model, optimizer


def flatten(tree: object, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of a nested checkpoint (dicts, lists) under dotted names, as a safetensors
    file must hold them: ``{'state': {0: {'exp_avg': t}}}`` → ``PREFIX.state.0.exp_avg``.
    Values that are not tensors (``param_groups``' floats, ``char2idx``) have no place there."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree.detach().contiguous()}
    items: list[tuple[object, object]]
    if isinstance(tree, dict):
        items = list(tree.items())
    elif isinstance(tree, list):
        items = list(enumerate(tree))
    else:
        return {}
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def training_safetensors(out: Path, checkpoint: dict[str, object]) -> Path:
    """``out`` (a ``.safetensors`` file) holding the training checkpoint ``checkpoint`` (what
    a loop would ``torch.save``) flattened into dotted names."""
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(flatten(checkpoint, ""), str(out))
    return out


def loop_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, object]:
    """The PyTorch tutorial's training checkpoint, with an OCR loop's metadata."""
    return {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "epoch": torch.tensor(5),
        "cer": torch.tensor(0.031),
    }


def lightning_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, object]:
    """What PyTorch Lightning's ``.ckpt`` holds for a LightningModule whose network is its
    ``model`` attribute (the tensors of it: the rest are Python values)."""
    return {
        "epoch": torch.tensor(3),
        "global_step": torch.tensor(120),
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "optimizer_states": [optimizer.state_dict()],
    }


class CRNN(nn.Module):
    """A CRNN as OCR packages write it: ``cnn`` (conv, batch norm, pooling), a 2-layer
    bidirectional LSTM ``rnn`` over the columns of the feature map, and a classifier ``fc``
    over both directions — names sort ``fc`` before ``rnn``."""

    def __init__(self, classes: int = 11, hidden: int = 12) -> None:
        super().__init__()
        self.cnn = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d((4, 1)),
        )  # fmt: skip
        self.rnn = nn.LSTM(16, hidden, num_layers=2, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        columns = self.cnn(x).mean(dim=2).permute(2, 0, 1)  # (width, batch, channels)
        return self.fc(self.rnn(columns)[0])


class BidirectionalLSTM(nn.Module):
    """The classic CRNN's recurrent block: an LSTM and a Linear named ``embedding``."""

    def __init__(self, inputs: int, hidden: int, outputs: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(inputs, hidden, bidirectional=True)
        self.embedding = nn.Linear(2 * hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.rnn(x)[0])


class ClassicCRNN(nn.Module):
    """The classic CRNN's layout (``cnn.convN``, ``rnn.0.rnn``, ``rnn.0.embedding``, …): its
    names sort each block's output Linear before the block's LSTM."""

    def __init__(self, classes: int = 11, hidden: int = 12) -> None:
        super().__init__()
        self.cnn = nn.Sequential()
        self.cnn.add_module("conv0", nn.Conv2d(1, 8, 3, padding=1))
        self.cnn.add_module("relu0", nn.ReLU())
        self.cnn.add_module("conv1", nn.Conv2d(8, 16, 3, padding=1))
        self.cnn.add_module("batchnorm1", nn.BatchNorm2d(16))
        self.rnn = nn.Sequential(
            BidirectionalLSTM(16, hidden, hidden), BidirectionalLSTM(hidden, hidden, classes)
        )


def crnn_pickle(out: Path, model: nn.Module) -> Path:
    """``out`` written as an OCR package ships its model: a training checkpoint with the
    vocabulary and the validation figures beside the weights."""
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model_state_dict": model.state_dict(),
            "char2idx": {c: i + 1 for i, c in enumerate("0123456789")},
            "epoch": 40,
            "cer": 0.021,
        },
        out,
    )
    return out
