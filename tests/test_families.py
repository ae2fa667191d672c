"""The plugin contract, the registry and the generic family."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from dynaudit_plugins.generic import GenericFamily, role

from dynaudit import inspect, measure
from dynaudit.errors import UnknownFamily
from dynaudit.families import (
    available_families,
    detect_family,
    get_family,
)
from dynaudit.families.base import Layer, LayerPlan, weight_matrices
from dynaudit.families.build import StructureError
from dynaudit.families.testing import ConformanceError, check_family
from dynaudit.tensors import Checkpoint
from tests import producers, zoo

# Every installed family, with the checkpoints (by real producers) that are its own.
OWN_FIXTURES = {
    "llama": ["llama_gqa", "qwen2_tied", "phi3"],
    "gpt2": ["gpt2"],
    "neox": ["gpt_neox", "falcon_mqa", "falcon_new"],
    "vit": ["vit_hf", "timm_vit"],
    "cnn": [
        "resnet_hf",
        "torchvision_resnet18",
        "lenet",
        "torchvision_mobilenet_v2",
        "torchvision_efficientnet_b0",
        "timm_mobilenetv3_large",
    ],
    "encoder": ["bert", "bert_classifier", "roberta", "distilbert", "albert", "electra"],
    "moe": ["mixtral", "mixtral_fused", "qwen2_moe", "qwen3_moe", "deepseek_v3"],
    "generic": ["mlp", "crnn"],
    "encoder-decoder": ["t5", "flan_t5", "bart", "mbart"],
    "clip": ["clip", "clip_text"],
}


@pytest.fixture(scope="session")
def family_zoo(tmp_path_factory: pytest.TempPathFactory, digits_mlp: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family-zoo")
    zoo.train_digits_lenet(root / "lenet", epochs=3)
    return {
        "llama_gqa": producers.llama(root / "llama"),
        "qwen2_tied": producers.qwen2(root / "qwen2"),
        "vit_hf": producers.vit_hf(root / "vit"),
        "timm_vit": producers.timm_vit(root / "timm-vit"),
        "resnet_hf": producers.resnet_hf(root / "resnet"),
        "torchvision_resnet18": producers.torchvision_resnet18(root / "resnet18"),
        "bert": producers.bert(root / "bert"),
        "bert_classifier": producers.bert_classifier(root / "bert-cls"),
        "roberta": producers.roberta(root / "roberta"),
        "distilbert": producers.distilbert(root / "distilbert"),
        "albert": producers.albert(root / "albert"),
        "electra": producers.electra(root / "electra"),
        "lenet": root / "lenet",
        "torchvision_mobilenet_v2": producers.torchvision_mobilenet_v2(root / "mobilenet-v2"),
        "torchvision_efficientnet_b0": producers.torchvision_efficientnet(root / "b0"),
        "timm_mobilenetv3_large": producers.timm_mobile(root / "v3", "mobilenetv3_large_100"),
        "mlp": digits_mlp,
        "gpt2": producers.gpt2(root / "gpt2"),
        "gpt_neox": producers.gpt_neox(root / "gpt-neox"),
        "falcon_mqa": producers.falcon(root / "falcon-mqa"),
        "falcon_new": producers.falcon(
            root / "falcon-new", new_decoder_architecture=True, num_kv_heads=2
        ),
        "phi3": producers.phi3(root / "phi3"),
        "t5": producers.t5(root / "t5"),
        "flan_t5": producers.t5(root / "flan-t5", gated=True, decoder_layers=2),
        "bart": producers.bart(root / "bart"),
        "mbart": producers.bart(root / "mbart", mbart=True, layers=2, decoder_layers=2),
        "clip": producers.clip(root / "clip"),
        "clip_text": producers.clip_text(root / "clip-text"),
        "mixtral": producers.mixtral(root / "mixtral"),
        "mixtral_fused": producers.mixtral(root / "mixtral-fused", fused=True),
        "qwen2_moe": producers.qwen2_moe(root / "qwen2-moe"),
        "qwen3_moe": producers.qwen3_moe(root / "qwen3-moe"),
        "deepseek_v3": producers.deepseek(root / "deepseek-v3"),
        "crnn": producers.save_module(producers.CRNN(), root / "crnn"),
    }


def test_every_first_party_family_has_fixtures() -> None:
    ours = {
        n for n, origin in available_families().items() if origin.startswith("dynaudit_plugins")
    }
    assert ours == set(OWN_FIXTURES)


@pytest.mark.parametrize(
    ("name", "fixture"), [(f, x) for f, xs in OWN_FIXTURES.items() for x in xs]
)
def test_every_installed_family_honours_the_contract(
    name: str, fixture: str, family_zoo: dict[str, Path]
) -> None:
    """Conformance through the public kit plugin authors use (docs/families.md)."""
    plan = check_family(name, family_zoo[fixture])
    assert plan.layers


class _Forgetful(GenericFamily):
    """The generic family, but it forgets its last layer: neither used nor skipped."""

    name = "forgetful"

    def plan(self, checkpoint: Checkpoint) -> LayerPlan:
        made = super().plan(checkpoint)
        return LayerPlan(layers=made.layers[:-1], skipped=made.skipped)


def test_the_conformance_kit_names_a_broken_rule(digits_mlp: Path) -> None:
    """check_family can fail: a tensor the plan drops is named."""
    with pytest.raises(ConformanceError, match=r"neither used nor skipped: \['4.weight'\]"):
        check_family(_Forgetful(), digits_mlp, detects=False)
    with pytest.raises(ConformanceError, match="detected as 'generic', not its own"):
        check_family(_Forgetful(), digits_mlp)


def test_generic_plan_order_types_and_skips(write_checkpoint) -> None:  # type: ignore[no-untyped-def]
    tensors = {
        "model.layers.10.self_attn.q_proj.weight": torch.randn(8, 8),
        "model.layers.2.self_attn.q_proj.weight": torch.randn(8, 8),
        "model.layers.2.mlp.fc1.weight": torch.randn(16, 8),
        "model.layers.2.mlp.fc1.bias": torch.randn(16),
        "model.layers.2.input_layernorm.weight": torch.randn(8),
        "model.embed_tokens.weight": torch.randn(32, 8),
        "features.0.weight": torch.randn(4, 3, 3, 3),
        "features.1.weight": torch.randn(4, 1, 3, 3),
        "stem.weight": torch.randn(6, 1, 3, 3),
        "features.1.running_mean": torch.randn(4),
        "steps": torch.tensor([1, 2], dtype=torch.int64),
        "odd": torch.randn(2, 3, 4),
        "0.weight": torch.randn(5, 4),
    }
    with Checkpoint.open(write_checkpoint(tensors)) as checkpoint:
        plan = GenericFamily().plan(checkpoint)
    assert [(x.name, x.type, x.depth, x.kind) for x in plan.layers] == [
        ("0.weight", "linear", 0, "linear"),
        ("features.0.weight", "conv", 1, "conv"),
        ("model.layers.2.mlp.fc1.weight", "fc1", 2, "linear"),
        ("model.layers.2.self_attn.q_proj.weight", "q_proj", 3, "linear"),
        ("model.layers.10.self_attn.q_proj.weight", "q_proj", 4, "linear"),
        ("stem.weight", "conv", 5, "conv"),  # 1 input channel, no earlier conv made 6
    ]
    reasons = {s.name: s.reason for s in plan.skipped}
    assert reasons["model.layers.2.mlp.fc1.bias"] == "bias"
    assert reasons["model.layers.2.input_layernorm.weight"] == "normalisation parameter"
    assert reasons["model.embed_tokens.weight"] == "embedding table"
    assert reasons["features.1.weight"].startswith("depthwise")
    assert reasons["steps"] == "non-float dtype I64"
    assert reasons["odd"].startswith("3-D tensor")
    assert "position" in plan.depth_note


def test_conv_groups_become_matrices() -> None:
    weight = torch.randn(8, 2, 3, 3)  # 8 out channels, 4 groups of 2 in channels
    mats = weight_matrices(Layer("c", "conv", 0, "conv", groups=4), weight)
    assert mats.shape == (4, 2, 18)
    assert torch.equal(mats[1], weight[2:4].reshape(2, 18))
    linear = weight_matrices(Layer("l", "fc", 0, "linear", transposed=True), torch.randn(3, 5))
    assert linear.shape == (1, 5, 3)


def test_role_names() -> None:
    assert role("encoder.layer.0.attention.self.query.weight", "linear") == "query"
    assert role("3.weight", "linear") == "linear"
    assert role("layer1.0.conv2.weight", "conv") == "conv"


def test_unknown_family_suggests_close_names() -> None:
    with pytest.raises(UnknownFamily, match="generic") as info:
        get_family("generc")
    assert info.value.suggestions[0] == "generic"  # "encoder" is close to "generc" too
    assert info.value.exit_code == 2


def test_detection_falls_back_to_generic(write_checkpoint) -> None:  # type: ignore[no-untyped-def]
    with Checkpoint.open(write_checkpoint({"w": torch.randn(4, 4)})) as checkpoint:
        detection = detect_family(checkpoint)
        assert detection.family.name == "generic"
        assert detection.how.startswith("fallback")
        assert detect_family(checkpoint, "generic").how == "chosen with --family"


# fixture → (family, fingerprinted files (a sharded checkpoint's index too), layers, layers per
# type, layers per depth third)
EXPECTED = {
    "llama_gqa": ("llama", 4, 29,
                  {"query": 4, "key": 4, "value": 4, "output": 4, "gate": 4, "up": 4,
                   "down": 4, "head": 1},
                  {"bottom": 14, "middle": 7, "top": 8}),
    "qwen2_tied": ("llama", 1, 21,
                   {"query": 3, "key": 3, "value": 3, "output": 3, "gate": 3, "up": 3,
                    "down": 3},
                   {"bottom": 7, "middle": 7, "top": 7}),
    "vit_hf": ("vit", 1, 20,
               {"patch": 1, "query": 3, "key": 3, "value": 3, "output": 3, "fc1": 3, "fc2": 3,
                "head": 1},
               {"bottom": 7, "middle": 6, "top": 7}),
    "timm_vit": ("vit", 1, 26,
                 {"patch": 1, "query": 4, "key": 4, "value": 4, "output": 4, "fc1": 4,
                  "fc2": 4, "head": 1},
                 {"bottom": 13, "middle": 6, "top": 7}),
    "resnet_hf": ("cnn", 1, 15, {"stem": 1, "conv": 10, "downsample": 3, "fc": 1},
                  {"bottom": 6, "middle": 5, "top": 4}),
    "torchvision_resnet18": ("cnn", 1, 21, {"stem": 1, "conv": 16, "downsample": 3, "fc": 1},
                             {"bottom": 8, "middle": 7, "top": 6}),
    "lenet": ("cnn", 1, 5, {"conv": 2, "fc": 3}, {"bottom": 2, "middle": 2, "top": 1}),
    "t5": ("encoder-decoder", 1, 48,
           {**{f"encoder.{r}": 3 for r in ("query", "key", "value", "output", "wi", "wo")},
            **{f"decoder.{r}": 3 for r in ("query", "key", "value", "output", "cross-query",
                                          "cross-key", "cross-value", "cross-output", "wi",
                                          "wo")}},
           {"bottom": 16, "middle": 16, "top": 16}),
    "clip": ("clip", 1, 27,
             {**{f"{t}.{r}": 2 for t in ("text", "vision")
                 for r in ("query", "key", "value", "output", "fc1", "fc2")},
              "vision.patch": 1, "text.projection": 1, "vision.projection": 1},
             {"bottom": 13, "middle": 12, "top": 2}),
}  # fmt: skip


@pytest.mark.parametrize("fixture", sorted(EXPECTED))
def test_measure_reports_each_family_per_type_and_depth(
    fixture: str, family_zoo: dict[str, Path]
) -> None:
    """Acceptance: each real producer's checkpoint is detected as its family with the right
    layers, types and depth groups, and the report aggregates per type and per group."""
    family, files, count, types, groups = EXPECTED[fixture]
    report = measure(family_zoo[fixture], q_dim=8, pieces=2, steps=10)
    assert report.family.name == family and report.family.confidence >= 0.5
    assert len(report.source.files) == files
    assert len(report.measured) == count
    assert Counter(layer.type for layer in report.measured) == types
    assert Counter(layer.group for layer in report.measured) == groups
    assert {t: a.layers for t, a in report.summary.types.items()} == types
    assert {g: a.layers for g, a in report.summary.groups.items()} == groups
    for type_, cells in report.summary.table.items():
        assert sum(cell.layers for cell in cells.values()) == types[type_]
    assert all(layer.fidelity is not None for layer in report.measured)


def test_llama_checkpoint_is_bf16_gqa_and_sharded(family_zoo: dict[str, Path]) -> None:
    with Checkpoint.open(family_zoo["llama_gqa"]) as checkpoint:
        assert {info.dtype for info in checkpoint.tensors.values()} == {"BF16"}
        plan = get_family("llama").plan(checkpoint)
    feeds = {feed.dst: feed for feed in plan.feeds if feed.dst.endswith("o_proj.weight")}
    o_map = feeds["model.layers.0.self_attn.o_proj.weight"].index
    # 4 query heads of 8 dims read 2 key/value heads: heads 0, 1 → kv 0 and heads 2, 3 → kv 1.
    assert o_map.indices(1, 32)[0].tolist() == [*range(8), *range(8), *range(8, 16), *range(8, 16)]


def test_timm_qkv_is_split_by_its_layout(family_zoo: dict[str, Path]) -> None:
    with Checkpoint.open(family_zoo["timm_vit"]) as checkpoint:
        plan = get_family("vit").plan(checkpoint)
        fused = checkpoint.read("blocks.0.attn.qkv.weight")
        parts = {x.type: x for x in plan.layers if x.source == "blocks.0.attn.qkv.weight"}
        assert set(parts) == {"query", "key", "value"}
        for i, kind in enumerate(("query", "key", "value")):
            mats = weight_matrices(parts[kind], fused)
            assert torch.equal(mats[0], fused[24 * i : 24 * (i + 1)])
        assert parts["query"].name == "blocks.0.attn.qkv.weight[query]"


def test_structure_mismatch_is_an_input_error(family_zoo: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    broken = shutil.copytree(family_zoo["timm_vit"], tmp_path / "vit")
    config = json.loads((broken / "config.json").read_text())
    config["model_args"]["embed_dim"] = 16
    config["num_features"] = 16
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(StructureError, match=r"qkv.*72×24") as info:
        measure(broken, q_dim=8, pieces=2, steps=5)
    assert info.value.exit_code == 3
    gqa = shutil.copytree(family_zoo["llama_gqa"], tmp_path / "llama")
    (gqa / "config.json").unlink()
    with pytest.raises(StructureError, match="num_key_value_heads"):
        measure(gqa, family="llama", q_dim=8, pieces=2, steps=5)


def test_a_llama_block_missing_its_query_is_a_structure_error(
    family_zoo: dict[str, Path], tmp_path: Path
) -> None:
    """Was a KeyError (exit 4) when the first block lacked q_proj, e.g. one shard of several."""
    from safetensors.torch import save_file

    with Checkpoint.open(family_zoo["llama_gqa"]) as checkpoint:
        kept = {n: checkpoint.read(n) for n in checkpoint.names() if "0.self_attn.q_proj" not in n}
    save_file(kept, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((family_zoo["llama_gqa"] / "config.json").read_text())
    with pytest.raises(StructureError, match=r"block 0 lacks self_attn\.q_proj"):
        measure(tmp_path, q_dim=8, pieces=2, steps=5)


@pytest.mark.parametrize("fixture", ["llama_gqa", "timm_vit", "torchvision_resnet18"])
def test_inspect_reads_headers_only(
    fixture: str, family_zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``inspect`` (without --weights) plans, classifies and costs a model from its headers."""

    def no_reads(self: Checkpoint, name: str) -> torch.Tensor:
        raise AssertionError(f"inspect read tensor data: {name}")

    monkeypatch.setattr(Checkpoint, "read", no_reads)
    found = inspect(family_zoo[fixture])
    family, _, count, _, _ = EXPECTED[fixture]
    assert found.family.name == family and len(found.layers) == count
    assert found.structure.structural_class and found.structure.degenerate is None
    assert all(layer.gflop > 0 and layer.rank is None for layer in found.layers)
    assert all(layer.inputs or layer.reads_input for layer in found.layers)


def test_resnet_without_a_stem_is_a_structure_error(write_checkpoint) -> None:  # type: ignore[no-untyped-def]
    """A block conv named ``...conv1.weight`` is not mistaken for the stem."""
    tensors = {
        "layer1.0.conv1.weight": torch.randn(8, 8, 3, 3),
        "layer1.0.conv2.weight": torch.randn(8, 8, 3, 3),
        "fc.weight": torch.randn(4, 8),
    }
    with (
        Checkpoint.open(write_checkpoint(tensors)) as checkpoint,
        pytest.raises(StructureError, match="without a stem"),
    ):
        get_family("cnn").plan(checkpoint)


def test_a_selection_keeps_each_layer_in_its_own_third(family_zoo: dict[str, Path]) -> None:
    """--layers / --experts measure a subset; each selected layer stays in the third it has in
    the whole model (selecting the last block alone once made it the 'bottom' third)."""
    from dynaudit.engine.plan import layer_groups, plan_checkpoint

    with Checkpoint.open(family_zoo["llama_gqa"]) as checkpoint:
        whole = layer_groups(plan_checkpoint(checkpoint, None).plan.layers)
        chosen = plan_checkpoint(checkpoint, None, layers=r"layers\.3\.").plan
    got = layer_groups(chosen.layers)
    assert got == {name: whole[name] for name in got}
    assert set(got.values()) == {"top"}
