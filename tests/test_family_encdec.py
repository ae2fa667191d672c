"""The encoder-decoder (T5, BART) and clip families on checkpoints transformers writes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dynaudit import measure
from dynaudit.engine.plan import layer_groups
from dynaudit.errors import PluginError, StructureError
from dynaudit.families import available_families, detect_family, get_family
from dynaudit.families.base import LayerPlan
from dynaudit.families.testing import check_family
from dynaudit.tensors import Checkpoint
from tests import producers


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encdec-zoo")
    return {
        "t5": producers.t5(root / "t5"),
        "flan_t5": producers.t5(root / "flan-t5", gated=True, layers=3, decoder_layers=2),
        "bart": producers.bart(root / "bart"),
        "mbart": producers.bart(root / "mbart", mbart=True, layers=2, decoder_layers=2),
        "clip": producers.clip(root / "clip"),
        "clip_text": producers.clip_text(root / "clip-text"),
        "clip_text_hub": producers.clip_text(root / "clip-text-hub", hub_names=True),
    }


FAMILY = {
    "t5": "encoder-decoder",
    "flan_t5": "encoder-decoder",
    "bart": "encoder-decoder",
    "mbart": "encoder-decoder",
    "clip": "clip",
    "clip_text": "clip",
    "clip_text_hub": "clip",
}


def _plan(path: Path, family: str) -> LayerPlan:
    with Checkpoint.open(path) as checkpoint:
        return get_family(family).plan(checkpoint)


def _thirds(plan: LayerPlan) -> Counter[tuple[str, str]]:
    groups = layer_groups(plan.layers)
    return Counter((layer.stack, groups[layer.name]) for layer in plan.layers)


@pytest.mark.parametrize("fixture", sorted(FAMILY))
def test_each_checkpoint_honours_the_contract(fixture: str, zoo: dict[str, Path]) -> None:
    plan = check_family(FAMILY[fixture], zoo[fixture])
    assert plan.layers and all(layer.stack for layer in plan.layers)


@pytest.mark.parametrize("fixture", sorted(FAMILY))
def test_no_other_family_claims_them(fixture: str, zoo: dict[str, Path]) -> None:
    """Detection by config.json model_type, well above any other installed family's score."""
    with Checkpoint.open(zoo[fixture]) as checkpoint:
        detection = detect_family(checkpoint)
        assert detection.family.name == FAMILY[fixture]
        assert detection.confidence == 0.95
        assert "config.json model_type" in detection.how
        for name in available_families():
            if name in (FAMILY[fixture], "generic"):
                continue
            try:
                family = get_family(name)
            except PluginError:  # a plugin this tree lacks (detection skips it too)
                continue
            score = family.detect(checkpoint)
            assert (score[0] if isinstance(score, tuple) else score) < 0.95, name


def test_t5_layers_types_and_thirds_per_stack(zoo: dict[str, Path]) -> None:
    plan = _plan(zoo["t5"], "encoder-decoder")
    roles = ("query", "key", "value", "output")
    cross = tuple(f"cross-{r}" for r in roles)
    want = Counter({f"encoder.{r}": 3 for r in (*roles, "wi", "wo")})
    want.update({f"decoder.{r}": 3 for r in (*roles, *cross, "wi", "wo")})
    assert Counter(layer.type for layer in plan.layers) == want
    assert len(plan.layers) == 18 + 30
    depth = {layer.stack: sorted({x.depth for x in plan.layers if x.stack == layer.stack})
             for layer in plan.layers}  # fmt: skip
    assert depth == {"encoder": [0, 1, 2], "decoder": [3, 4, 5]}
    # Thirds within each stack: the encoder's bottom third and the decoder's both exist.
    assert _thirds(plan) == {
        ("encoder", "bottom"): 6, ("encoder", "middle"): 6, ("encoder", "top"): 6,
        ("decoder", "bottom"): 10, ("decoder", "middle"): 10, ("decoder", "top"): 10,
    }  # fmt: skip
    reasons = {s.name: s.reason for s in plan.skipped}
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert reasons[bias].startswith("relative position bias (T5)")
    assert "positions, not on features" in reasons[bias]
    assert reasons["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    assert reasons["shared.weight"] == "embedding table"
    assert reasons["encoder.final_layer_norm.weight"] == "normalisation parameter"
    assert any("tied to the shared embedding" in note for note in plan.notes)
    assert plan.widths == [64, 32, *[32] * 6, 64]
    blocks = {block.name: block for block in plan.blocks}
    assert set(blocks["decoder block 0"].branches) == {"self-attention", "cross-attention", "mlp"}
    assert set(blocks["encoder block 2"].branches) == {"attention", "mlp"}


def test_cross_attention_reads_the_encoders_final_stream(zoo: dict[str, Path]) -> None:
    plan = _plan(zoo["t5"], "encoder-decoder")
    fed = plan.fed_by()
    enc = "encoder.block.{}.layer.{}"
    encoder_out = {
        *(f"{enc.format(i, 0)}.SelfAttention.o.weight" for i in range(3)),
        *(f"{enc.format(i, 1)}.DenseReluDense.wo.weight" for i in range(3)),
    }
    for j in range(3):
        for part in ("k", "v"):
            name = f"decoder.block.{j}.layer.1.EncDecAttention.{part}.weight"
            assert set(fed[name]) == encoder_out
            assert name in plan.reads_input  # the encoder's stream carries its input too
    # The decoder's own stream: block 0 reads only the target embedding, block 1 block 0's outputs.
    dec0, dec1 = "decoder.block.0.layer", "decoder.block.1.layer"
    assert fed[f"{dec0}.0.SelfAttention.q.weight"] == []
    assert f"{dec0}.0.SelfAttention.q.weight" in plan.reads_input
    assert fed[f"{dec0}.1.EncDecAttention.q.weight"] == [f"{dec0}.0.SelfAttention.o.weight"]
    assert set(fed[f"{dec1}.0.SelfAttention.q.weight"]) == {
        f"{dec0}.0.SelfAttention.o.weight",
        f"{dec0}.1.EncDecAttention.o.weight",
        f"{dec0}.2.DenseReluDense.wo.weight",
    }
    assert fed[f"{dec0}.1.EncDecAttention.o.weight"] == [f"{dec0}.1.EncDecAttention.v.weight"]


def test_flan_t5_gated_mlp_and_untied_head(zoo: dict[str, Path]) -> None:
    plan = _plan(zoo["flan_t5"], "encoder-decoder")
    types = Counter(layer.type for layer in plan.layers)
    assert types["encoder.wi_0"] == types["encoder.wi_1"] == types["encoder.wo"] == 3
    assert types["decoder.wi_0"] == types["decoder.wi_1"] == types["decoder.wo"] == 2
    assert "encoder.wi" not in types and types["head"] == 1
    head = next(layer for layer in plan.layers if layer.type == "head")
    assert (head.name, head.stack, head.group, head.depth) == (
        "lm_head.weight",
        "decoder",
        "top",
        5,
    )
    fed = plan.fed_by()
    wo = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    assert sorted(fed[wo]) == [wo.replace("wo", "wi_0"), wo.replace("wo", "wi_1")]
    assert set(fed["lm_head.weight"]) >= {"decoder.block.1.layer.2.DenseReluDense.wo.weight"}
    assert not any("tied" in note for note in plan.notes)
    assert "quadratic" in next(b for b in plan.blocks if b.name == "encoder block 0").note
    # 3 encoder blocks over three thirds; 2 decoder blocks are bottom and middle, the head top
    assert _thirds(plan) == {
        ("encoder", "bottom"): 7, ("encoder", "middle"): 7, ("encoder", "top"): 7,
        ("decoder", "bottom"): 11, ("decoder", "middle"): 11, ("decoder", "top"): 1,
    }  # fmt: skip


@pytest.mark.parametrize("fixture", ["bart", "mbart"])
def test_bart_and_mbart_names(fixture: str, zoo: dict[str, Path]) -> None:
    plan = _plan(zoo[fixture], "encoder-decoder")
    blocks = 3 if fixture == "bart" else 2
    roles = ("query", "key", "value", "output")
    cross = tuple(f"cross-{r}" for r in roles)
    want = Counter({f"encoder.{r}": blocks for r in (*roles, "fc1", "fc2")})
    want.update({f"decoder.{r}": blocks for r in (*roles, *cross, "fc1", "fc2")})
    assert Counter(layer.type for layer in plan.layers) == want
    by_name = {layer.name: layer for layer in plan.layers}
    cross_k = by_name["model.decoder.layers.0.encoder_attn.k_proj.weight"]
    assert (cross_k.type, cross_k.stack, cross_k.depth) == ("decoder.cross-key", "decoder", blocks)
    reasons = {s.name: s.reason for s in plan.skipped}
    assert reasons["final_logits_bias"].startswith("bias added to every logit")
    assert reasons["model.encoder.layers.0.self_attn.q_proj.bias"] == "bias"
    assert reasons["model.encoder.embed_positions.weight"] == "embedding table"
    assert {stack for stack, _ in _thirds(plan)} == {"encoder", "decoder"}
    assert {third for stack, third in _thirds(plan) if stack == "encoder"} >= {"bottom", "middle"}


def test_clip_two_towers(zoo: dict[str, Path]) -> None:
    plan = _plan(zoo["clip"], "clip")
    roles = ("query", "key", "value", "output", "fc1", "fc2")
    want = Counter({f"{t}.{r}": 2 for t in ("text", "vision") for r in roles})
    want.update({"vision.patch": 1, "text.projection": 1, "vision.projection": 1})
    assert Counter(layer.type for layer in plan.layers) == want
    by_name = {layer.name: layer for layer in plan.layers}
    patch = by_name["vision_model.embeddings.patch_embedding.weight"]
    assert (patch.kind, patch.depth, patch.group, patch.stack) == ("conv", 0, "bottom", "vision")
    assert by_name["visual_projection.weight"].depth == 3
    assert by_name["text_projection.weight"].depth == 2
    assert _thirds(plan) == {
        ("text", "bottom"): 6, ("text", "middle"): 6, ("text", "top"): 1,
        ("vision", "bottom"): 7, ("vision", "middle"): 6, ("vision", "top"): 1,
    }  # fmt: skip
    fed = plan.fed_by()
    vq = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert fed[vq] == [patch.name] and vq not in plan.reads_input
    tq = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert fed[tq] == [] and tq in plan.reads_input
    assert set(fed["text_projection.weight"]) == {
        f"text_model.encoder.layers.{i}.{p}.weight"
        for i in range(2)
        for p in ("self_attn.out_proj", "mlp.fc2")
    }
    reasons = {s.name: s.reason for s in plan.skipped}
    assert reasons["logit_scale"].startswith("logit scale")
    assert reasons["vision_model.embeddings.class_embedding"].startswith("class token")
    assert reasons["vision_model.pre_layrnorm.weight"] == "normalisation parameter"
    assert plan.widths == [3 * 4 * 4, 32, 32, 32, 16]
    assert any("text tower's are 64 → 32" in note for note in plan.notes)


def test_clip_text_encoder_bare_and_with_hub_names(zoo: dict[str, Path]) -> None:
    """transformers ≥ 5 writes a CLIPTextModel without ``text_model.``; Hub text encoders
    written by transformers 4 have it. Both are the same tower."""
    bare = _plan(zoo["clip_text"], "clip")
    hub = _plan(zoo["clip_text_hub"], "clip")
    assert [(x.type, x.depth) for x in bare.layers] == [(x.type, x.depth) for x in hub.layers]
    assert [f"text_model.{x.name}" for x in bare.layers] == [x.name for x in hub.layers]
    assert {x.stack for x in bare.layers} == {"text"} and len(bare.layers) == 12


@pytest.mark.parametrize("fixture", ["t5", "clip"])
def test_a_tiny_measure_reports_per_stack_types(fixture: str, zoo: dict[str, Path]) -> None:
    report = measure(zoo[fixture], q_dim=8, pieces=2, steps=10)
    assert report.family.name == FAMILY[fixture] and report.family.confidence == 0.95
    types = Counter(layer.type for layer in report.measured)
    assert {t: a.layers for t, a in report.summary.types.items()} == types
    stacks = ("encoder", "decoder") if fixture == "t5" else ("text", "vision")
    assert {t.split(".")[0] for t in types if "." in t} == set(stacks)
    for type_, cells in report.summary.table.items():  # type × third, each stack's own thirds
        assert sum(cell.layers for cell in cells.values()) == types[type_]
    assert {g: a.layers for g, a in report.summary.groups.items()} == Counter(
        layer.group for layer in report.measured
    )
    assert all(layer.fidelity is not None for layer in report.measured)


def _edited(
    source: Path,
    out: Path,
    *,
    drop: tuple[str, ...] = (),
    config: dict[str, object] | None = None,
) -> Path:
    """A copy of ``source`` without the tensors ``drop``, its config.json updated by
    ``config`` (a ``None`` value removes the key; ``config={}`` drops the whole file)."""
    out.mkdir()
    state = {k: v for k, v in load_file(str(source / "model.safetensors")).items() if k not in drop}
    save_file(state, str(out / "model.safetensors"))
    settings = json.loads((source / "config.json").read_text())
    if config == {}:
        return out
    for key, value in (config or {}).items():
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value
    (out / "config.json").write_text(json.dumps(settings))
    return out


def test_t5_by_names_alone(zoo: dict[str, Path], tmp_path: Path) -> None:
    bare = _edited(zoo["flan_t5"], tmp_path / "bare", config={})
    with Checkpoint.open(bare) as checkpoint:
        detection = detect_family(checkpoint)
    assert detection.family.name == "encoder-decoder" and detection.confidence == 0.8
    assert "tensor names (T5" in detection.how
    check_family("encoder-decoder", bare)
    # Another model type with T5's names (switch_transformers, whisper, …) is not claimed.
    other = _edited(zoo["t5"], tmp_path / "other", config={"model_type": "switch_transformers"})
    with Checkpoint.open(other) as checkpoint:
        assert get_family("encoder-decoder").detect(checkpoint) == 0.0


@pytest.mark.parametrize(
    ("drop", "config", "message"),
    [
        (("decoder.block.1.layer.1.EncDecAttention.v.weight",), None,
         "decoder block 1 lacks cross-value"),
        ((), {"num_layers": 4}, r"encoder blocks 0…2 \(3\); config.json says 4"),
        ((), {"feed_forward_proj": "gated-gelu"}, "says a gated MLP"),
        ((), {"d_kv": 4}, "num_heads × d_kv say 16"),
        ((), {"d_model": 48}, "reads 32 channels"),
    ],
)  # fmt: skip
def test_t5_that_contradicts_itself_is_exit_3(
    drop: tuple[str, ...],
    config: dict[str, object] | None,
    message: str,
    zoo: dict[str, Path],
    tmp_path: Path,
) -> None:
    path = _edited(zoo["t5"], tmp_path / "edited", drop=drop, config=config)
    with pytest.raises(StructureError, match=message) as info, Checkpoint.open(path) as checkpoint:
        get_family("encoder-decoder").plan(checkpoint)
    assert info.value.exit_code == 3


def test_a_decoder_alone_is_refused(zoo: dict[str, Path], tmp_path: Path) -> None:
    with Checkpoint.open(zoo["bart"]) as checkpoint:
        encoder = [n for n in checkpoint.tensors if n.startswith("model.encoder.")]
    path = _edited(zoo["bart"], tmp_path / "decoder", drop=tuple(encoder))
    with pytest.raises(StructureError, match="a decoder alone"), Checkpoint.open(path) as ckpt:
        get_family("encoder-decoder").plan(ckpt)


@pytest.mark.parametrize(
    "kind",
    ["MT5", "UMT5", "Pegasus", "M2M100", "Marian", "PLBart", "Blenderbot", "BlenderbotSmall"],
)
def test_relatives_with_the_same_names(kind: str, tmp_path: Path) -> None:
    """mT5 and UMT5 (a relative bias in every block) have T5's names; Pegasus, M2M-100/NLLB,
    Marian, PLBart and Blenderbot have BART's."""
    import transformers

    if kind.endswith("T5"):
        settings: dict[str, object] = {
            "vocab_size": 64, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
        }  # fmt: skip
    else:
        settings = {
            "vocab_size": 64, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
            "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64, "max_position_embeddings": 64, "pad_token_id": 1,
            "decoder_start_token_id": 1,
        }  # fmt: skip
    model = "MarianMTModel" if kind == "Marian" else f"{kind}ForConditionalGeneration"
    torch.manual_seed(0)
    config = getattr(transformers, f"{kind}Config")(**settings)
    getattr(transformers, model)(config).save_pretrained(tmp_path)
    plan = check_family("encoder-decoder", tmp_path)
    gated = 2 * 1 + 2 * 1 if kind.endswith("T5") else 0  # wi_0 and wi_1 for one wi per block
    assert len(plan.layers) == 2 * 6 + 2 * 10 + gated
    relative = [s for s in plan.skipped if "relative_attention_bias" in s.name]
    assert len(relative) == {"MT5": 2, "UMT5": 4}.get(kind, 0)  # UMT5: one per block
    assert all(s.reason.startswith("relative position bias (T5)") for s in relative)


@pytest.mark.parametrize(
    ("model", "types"),
    [
        ("CLIPVisionModel", {}),
        ("CLIPVisionModelWithProjection", {"vision.projection": 1}),
        ("CLIPTextModelWithProjection", {"text.projection": 1}),
        ("CLIPForImageClassification", {"vision.head": 1}),
    ],
)
def test_clip_towers_saved_alone_or_with_a_head(
    model: str, types: dict[str, int], tmp_path: Path
) -> None:
    import transformers

    torch.manual_seed(0)
    tower = "text" if "Text" in model else "vision"
    if model == "CLIPForImageClassification":
        config = transformers.CLIPConfig(
            text_config=producers.CLIP_TEXT, vision_config=producers.CLIP_VISION, num_labels=5
        )
    else:
        settings = producers.CLIP_TEXT if tower == "text" else producers.CLIP_VISION
        kind = "CLIPTextConfig" if tower == "text" else "CLIPVisionConfig"
        config = getattr(transformers, kind)(**settings, projection_dim=16)
    getattr(transformers, model)(config).save_pretrained(tmp_path)
    plan = check_family("clip", tmp_path)
    want = Counter({f"{tower}.{r}": 2 for r in ("query", "key", "value", "output", "fc1", "fc2")})
    want.update({"vision.patch": 1} if tower == "vision" else {})
    want.update(types)
    assert Counter(layer.type for layer in plan.layers) == want
    assert {layer.stack for layer in plan.layers} == {tower}
