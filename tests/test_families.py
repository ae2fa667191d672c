"""The plugin contract, the registry and the generic family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dynaudit_plugins.generic import GenericFamily, role

from dynaudit.errors import UnknownFamily
from dynaudit.families import Family, available_families, detect_family, get_family
from dynaudit.families.base import Layer, weight_matrices
from dynaudit.tensors import Checkpoint


@pytest.mark.parametrize("name", sorted(available_families()))
def test_every_installed_family_honours_the_contract(name: str, digits_mlp: Path) -> None:
    """Conformance: each plugin loads as a Family and plans a real checkpoint coherently."""
    family = get_family(name)
    assert isinstance(family, Family)
    assert family.name == name and family.description
    with Checkpoint.open(digits_mlp) as checkpoint:
        assert 0.0 <= family.detect(checkpoint) <= 1.0
        plan = family.plan(checkpoint)
        planned = [layer.name for layer in plan.layers] + [s.name for s in plan.skipped]
        assert sorted(planned) == sorted(checkpoint.tensors)
        for layer in plan.layers:
            mats = family.matrices(layer, checkpoint.read(layer.name))
            assert mats.dim() == 3


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
    assert info.value.suggestions == ["generic"]
    assert info.value.exit_code == 2


def test_detection_falls_back_to_generic(write_checkpoint) -> None:  # type: ignore[no-untyped-def]
    with Checkpoint.open(write_checkpoint({"w": torch.randn(4, 4)})) as checkpoint:
        detection = detect_family(checkpoint)
        assert detection.family.name == "generic"
        assert detection.how.startswith("fallback")
        assert detect_family(checkpoint, "generic").how == "chosen with --family"
