"""Mobile CNNs in the cnn family (issue 22): MobileNetV2, MobileNetV3 and EfficientNet with
torchvision's and timm's tensor names, written by plain torch modules that rebuild those
libraries' layouts name for name (tests/producers.py; neither library imports beside this
torch). Inverted residuals with a skip are ResidualBlocks, depthwise convolutions are
pass-through nodes of the graph (skipped for fitting, with the reason), squeeze-excitation is
typed apart, and the main path's widths are the blocks' input and output widths."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from dynaudit_plugins.cnn import CNNFamily

import dynaudit
from dynaudit.families import IDENTITY, IndexMap, LayerPlan, Skip, detect_family, get_family
from dynaudit.families.naming import DEPTHWISE
from dynaudit.families.testing import ConformanceError, check_family
from dynaudit.structure import classify, path_widths
from dynaudit.tensors import Checkpoint
from tests import producers
from tests.cli import run_cli
from tests.conftest import WriteCheckpoint

# fixture → the module (tiny widths) and its layer types; every one is 0.25 of the published
# widths with its published depth: MobileNetV2 17 blocks, V3-Large 15, V3-Small 11, B0 16.
V2_TYPES = {"stem": 1, "expand": 16, "project": 17, "head": 1, "fc": 1}
V3L_TYPES = {"stem": 1, "expand": 14, "project": 15, "se.reduce": 8, "se.expand": 8, "head": 2,
             "fc": 1}  # fmt: skip
V3S_TYPES = {"stem": 1, "expand": 10, "project": 11, "se.reduce": 9, "se.expand": 9, "head": 2,
             "fc": 1}  # fmt: skip
B0_TYPES = {"stem": 1, "expand": 15, "project": 16, "se.reduce": 16, "se.expand": 16, "head": 1,
            "fc": 1}  # fmt: skip
MODELS = {
    "tv_mobilenet_v2": (lambda: producers.TorchvisionMobileNetV2(0.25, last=64), V2_TYPES, 17),
    "tv_mobilenet_v3_large": (lambda: producers.TorchvisionMobileNetV3("large", 0.25), V3L_TYPES,
                              15),
    "tv_mobilenet_v3_small": (lambda: producers.TorchvisionMobileNetV3("small", 0.25), V3S_TYPES,
                              11),
    "tv_efficientnet_b0": (lambda: producers.TorchvisionEfficientNet(0.25), B0_TYPES, 16),
    "timm_mobilenetv2_100": (lambda: producers.TimmMobile("mobilenetv2_100", 0.25, head=64),
                             V2_TYPES, 17),
    "timm_efficientnet_b0": (lambda: producers.TimmMobile("efficientnet_b0", 0.25, head=64),
                             B0_TYPES, 16),
    "timm_mobilenetv3_large_100": (
        lambda: producers.TimmMobile("mobilenetv3_large_100", 0.25, head=64), V3L_TYPES, 15),
    "timm_mobilenetv3_small_100": (
        lambda: producers.TimmMobile("mobilenetv3_small_100", 0.25, head=64), V3S_TYPES, 11),
}  # fmt: skip


@pytest.fixture(scope="module")
def mobile_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[str]]]:
    """Each model saved as a training script would, with the blocks that add their input
    back according to the module itself (``use_res_connect`` / ``has_skip``)."""
    root = tmp_path_factory.mktemp("mobile")
    out = {}
    for name, (make, _, _) in MODELS.items():
        torch.manual_seed(0)
        module = make().eval()
        with torch.no_grad():  # the rebuilt layout runs: its channels fit together
            assert module(torch.randn(1, 3, 32, 32)).shape == (1, 10)
        out[name] = (producers.save_module(module, root / name), producers.skips(module))
    return out


@pytest.fixture(scope="module")
def full_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchvision's MobileNetV2 at its published widths (3.5 M parameters, 1000 classes)."""
    torch.manual_seed(0)
    model = producers.TorchvisionMobileNetV2(1.0, classes=1000)
    return producers.save_module(model, tmp_path_factory.mktemp("v2-full"))


def plan_of(path: Path) -> LayerPlan:
    with Checkpoint.open(path) as checkpoint:
        return get_family("cnn").plan(checkpoint)


@pytest.mark.parametrize("fixture", sorted(MODELS))
def test_detected_with_its_layers_blocks_and_the_contract(
    fixture: str, mobile_zoo: dict[str, tuple[Path, list[str]]]
) -> None:
    """Detected as cnn; the expected layers by type; one ResidualBlock per block that adds
    its input back — exactly the blocks the producer's own module says do; conformance."""
    path, skips = mobile_zoo[fixture]
    _, types, depthwise = MODELS[fixture]
    with Checkpoint.open(path) as checkpoint:
        detection = detect_family(checkpoint)
    assert detection.family.name == "cnn" and detection.confidence >= 0.85
    plan = check_family("cnn", path)  # the real conformance kit, pass-through rules included
    assert Counter(layer.type for layer in plan.layers) == types
    assert sorted(block.name for block in plan.blocks) == sorted(skips)
    assert len(plan.pass_through) == depthwise
    assert {layer.group for layer in plan.layers if layer.type in ("head", "fc")} == {"top"}


@pytest.mark.parametrize("fixture", sorted(MODELS))
def test_depthwise_convs_are_skipped_nodes_between_expansion_and_projection(
    fixture: str, mobile_zoo: dict[str, tuple[Path, list[str]]]
) -> None:
    path, _ = mobile_zoo[fixture]
    plan = plan_of(path)
    layers = {layer.name: layer for layer in plan.layers}
    nodes = {node.name: node for node in plan.pass_through}
    reasons = {skip.name: skip.reason for skip in plan.skipped}
    with Checkpoint.open(path) as checkpoint:
        kernels = {
            name for name, info in checkpoint.tensors.items()
            if len(info.shape) == 4 and info.shape[1] == 1 and info.shape[0] > 1
        }  # fmt: skip
        shapes = {name: checkpoint.tensors[name].shape for name in nodes}
    assert set(nodes) == kernels and not kernels & set(layers)
    assert all(reasons[name] == DEPTHWISE for name in nodes)
    fed_by = plan.fed_by()
    index = {(feed.src, feed.dst): feed.index for feed in plan.feeds}
    for name, node in nodes.items():
        c, _, kh, kw = shapes[name]
        assert node.type == "depthwise" and node.groups == c
        assert fed_by[name], name
        for src in fed_by[name]:  # the expansion (or the stream) reaches it channel by channel
            assert index[(src, name)] == IndexMap(repeat=kh * kw)
        after = [feed.dst for feed in plan.feeds if feed.src == name]
        projection = [dst for dst in after if layers[dst].type in ("project", "conv")]
        assert len(projection) == 1, (name, after)
        assert index[(name, projection[0])] == IDENTITY
        # Only the depthwise node and squeeze-excitation's gate feed the projection: never
        # the expansion before the depthwise (the bug of issue 22).
        assert {layers[x].type for x in fed_by[projection[0]] if x in layers} <= {"se.expand"}
    for layer in plan.layers:
        if layer.type == "expand":
            assert any(feed.src == layer.name and feed.dst in nodes for feed in plan.feeds), (
                layer.name
            )


@pytest.mark.parametrize(
    "fixture", ["tv_mobilenet_v3_large", "tv_efficientnet_b0", "timm_efficientnet_b0"]
)
def test_squeeze_excitation_is_typed_apart_and_off_the_main_path(
    fixture: str, mobile_zoo: dict[str, tuple[Path, list[str]]]
) -> None:
    """se.reduce reads the depthwise output (pooled), se.expand reads se.reduce, and the
    projection reads the depthwise output times the gate: both feed it. Neither SE layer is
    in a residual branch nor in the main path's widths."""
    path, _ = mobile_zoo[fixture]
    plan = plan_of(path)
    types = {x.name: x.type for x in (*plan.layers, *plan.pass_through)}
    fed_by = plan.fed_by()
    reduces = [name for name, t in types.items() if t == "se.reduce"]
    assert reduces
    for reduce in reduces:
        (node,) = fed_by[reduce]
        assert types[node] == "depthwise"
        (expand,) = [dst for dst, srcs in fed_by.items() if reduce in srcs]
        assert types[expand] == "se.expand"
        (projection,) = [dst for dst, srcs in fed_by.items() if expand in srcs]
        assert types[projection] == "project"
        assert sorted(fed_by[projection]) == sorted([node, expand])
    in_branches = {name for block in plan.blocks for b in block.branches.values() for name in b}
    assert not {name for name, t in types.items() if t.startswith("se.")} & in_branches
    for block in plan.blocks:  # expansion → depthwise → projection (no expansion: dw → proj)
        (branch,) = block.branches.values()
        assert [types[name] for name in branch] in (
            ["expand", "depthwise", "project"],
            ["depthwise", "project"],
        )


def test_full_mobilenet_v2_structure_and_its_reason(
    full_v2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acceptance: a MobileNetV2 at torchvision's published widths. Ten inverted residuals
    have a skip (stages of 2, 3, 4, 3, 3 blocks: 1 + 2 + 3 + 2 + 2), and the expansions are
    inside their branches (augmented 24 → 144 → 144 → 24), not on the main path. The class is
    still a bottleneck, for a narrowing of the stream itself: the first block projects the
    stem's 32 channels onto 16, and the next stage carries 24 before the stream is back at 32
    (docs/families.md §3). All of it from the headers."""

    def no_reads(self: Checkpoint, name: str) -> torch.Tensor:
        raise AssertionError(f"inspect read tensor data: {name}")

    with monkeypatch.context() as patch:
        patch.setattr(Checkpoint, "read", no_reads)
        found = dynaudit.inspect(full_v2)
    assert found.family.name == "cnn"
    assert len(found.layers) == 36 and len(found.pass_through) == 17
    structure = found.structure
    assert structure.widths == [3, 32, 16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96,
                                160, 160, 160, 320, 1280, 1000]  # fmt: skip
    assert structure.structural_class == "bottleneck"
    assert structure.reason == "width 16 between wider 32 and 1280"
    assert structure.branches == {"augmented": 10}
    # The layers read as a chain (how the shape-detected chain saw it before) put every
    # projection between two expansions: from the first block on (16 → 96 → 24 → 144 → …),
    # a "bottleneck" of the expansion narrowing alone.
    with Checkpoint.open(full_v2) as checkpoint:
        chain = path_widths(plan_of(full_v2).layers, checkpoint)
    assert chain[:6] == [3, 32, 16, 96, 24, 144]
    assert classify(chain[2:]) == ("bottleneck", "width 24 between wider 96 and 1280")
    # The stem's 32 channels are what the stream narrows from (to 16, then 24 and 24): the
    # same path without the stem's width is augmented.
    assert classify([3, *structure.widths[2:]])[0] == "augmented"


def test_stage_strides_decide_the_skips_widths_cannot(
    mobile_zoo: dict[str, tuple[Path, list[str]]],
) -> None:
    """At 0.25 of its widths MobileNetV2's 24- and 32-channel stages both round to 8, so the
    first block of the 32 stage (features.4, stride 2) has equal input and output widths and
    no skip: the strides of the published stages decide it, and the plan says so."""
    path, skips = mobile_zoo["tv_mobilenet_v2"]
    plan = plan_of(path)
    blocks = {block.name for block in plan.blocks}
    assert "features.4" not in skips and "features.4" not in blocks
    assert "features.5" in skips and "features.5" in blocks
    assert any("stage strides 1, 2, 2, 2, 1, 2, 1" in note for note in plan.notes)
    small, skips_small = mobile_zoo["tv_mobilenet_v3_small"]
    assert "features.1" not in skips_small  # 8 → 8 channels at stride 2
    assert "features.1" not in {block.name for block in plan_of(small).blocks}


def test_unknown_layouts_say_which_skips_were_assumed(tmp_path: Path) -> None:
    """A torchvision MobileNetV2 with its own inverted_residual_setting: no published
    strides to lean on, so blocks of equal widths are taken as stride 1, and named."""
    setting = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 1))
    torch.manual_seed(0)
    model = producers.TorchvisionMobileNetV2(0.5, last=32, setting=setting)
    plan = check_family("cnn", producers.save_module(model, tmp_path))
    assert sorted(block.name for block in plan.blocks) == sorted(producers.skips(model))
    (note,) = [note for note in plan.notes if note.startswith("strides not known")]
    assert "features.3" in note and "features.5" in note


def test_inspect_shows_the_nodes_and_their_feeds(
    mobile_zoo: dict[str, tuple[Path, list[str]]],
) -> None:
    path, _ = mobile_zoo["tv_mobilenet_v3_small"]
    proc = run_cli("inspect", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "kept in the graph but not fitted: 11 depthwise" in proc.stdout
    assert "1 layer, 1 depthwise" in proc.stdout  # a projection: the gate and the depthwise
    assert "residual branches: 7 augmented" in proc.stdout
    as_json = run_cli("inspect", str(path), "--json", "-")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["schema_minor"] >= 1
    nodes = {node["name"]: node for node in data["pass_through"]}
    node = nodes["features.2.block.1.0.weight"]
    assert node["inputs"] == ["features.2.block.0.0.weight"]  # the expansion
    assert node["type"] == "depthwise" and node["skipped"] == DEPTHWISE
    assert node["shape"] == [24, 1, 3, 3] and node["spectral_norm"] is None
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert layers["features.2.block.2.0.weight"]["inputs"] == ["features.2.block.1.0.weight"]
    assert "features.2.block.1.0.weight" not in layers


def test_branch_gains_include_the_depthwise_kernel_norm(
    mobile_zoo: dict[str, tuple[Path, list[str]]],
) -> None:
    """gain = ‖expand‖₂ · max_c ‖k_c‖₂ · ‖project‖₂, each kernel reshaped as for fitting."""
    path, _ = mobile_zoo["timm_efficientnet_b0"]
    found = dynaudit.inspect(path, weights=True)
    assert len(found.gains) == 10
    with Checkpoint.open(path) as checkpoint:
        for gain in found.gains:
            norms = []
            for name in gain.layers:
                weight = checkpoint.read(name)
                if weight.shape[1] == 1:  # depthwise: each channel's kernel is a 1 × kh·kw row
                    norms.append(float(weight.flatten(1).norm(dim=1).max()))
                else:
                    norms.append(float(torch.linalg.matrix_norm(weight.flatten(1), ord=2)))
            assert gain.gain == pytest.approx(math.prod(norms), rel=1e-5)
            assert "depthwise" in gain.note and "squeeze-excitation" in gain.note
    node_norms = {node.name: node.spectral_norm for node in found.pass_through}
    assert all(norm is not None and norm > 0 for norm in node_norms.values())
    assert found.structure.degenerate is not None
    assert not set(found.structure.degenerate) & set(node_norms)


def test_a_tiny_measure(tmp_path: Path) -> None:
    """EfficientNet at 0.25 of its widths and 0.3 of its depth (8 blocks): every layer but
    the depthwise ones is fitted, per type and third."""
    path = producers.torchvision_efficientnet(tmp_path / "b0", width=0.25, depth=0.3)
    report = dynaudit.measure(path, q_dim=8, pieces=2, steps=10, cache=False)
    assert report.family.name == "cnn"
    types = {"stem": 1, "expand": 7, "project": 8, "se.reduce": 8, "se.expand": 8, "head": 1,
             "fc": 1}  # fmt: skip
    assert Counter(layer.type for layer in report.measured) == types
    assert {t: a.layers for t, a in report.summary.types.items()} == types
    assert all(layer.fidelity is not None for layer in report.measured)
    skipped = Counter(layer.skipped for layer in report.skipped)
    assert skipped[DEPTHWISE] == 8
    assert any("pass-through" in note for note in report.family.notes)


def test_resnet_and_chain_depthwise_convs_are_nodes_too(write_checkpoint: WriteCheckpoint) -> None:
    """The ResNet and plain-chain readers keep a depthwise conv as a node as well: a
    ResNeXt-like block 1 × 1 → depthwise 3 × 3 → 1 × 1, and conv → depthwise → conv → fc."""
    resnet = {
        "conv1.weight": torch.randn(8, 3, 3, 3),
        "layer1.0.conv1.weight": torch.randn(16, 8, 1, 1),
        "layer1.0.conv2.weight": torch.randn(16, 1, 3, 3),
        "layer1.0.conv3.weight": torch.randn(8, 16, 1, 1),
        "fc.weight": torch.randn(4, 8),
    }
    plan = check_family("cnn", write_checkpoint(resnet))
    assert [node.name for node in plan.pass_through] == ["layer1.0.conv2.weight"]
    assert plan.fed_by()["layer1.0.conv3.weight"] == ["layer1.0.conv2.weight"]
    assert plan.blocks[0].branches["residual"] == (
        "layer1.0.conv1.weight", "layer1.0.conv2.weight", "layer1.0.conv3.weight",
    )  # fmt: skip
    chain = {
        "conv1.weight": torch.randn(8, 1, 3, 3),
        "conv2.weight": torch.randn(8, 1, 3, 3),
        "conv3.weight": torch.randn(16, 8, 3, 3),
        "fc1.weight": torch.randn(4, 16 * 4 * 4),
    }
    plan = check_family("cnn", write_checkpoint(chain))
    assert [node.name for node in plan.pass_through] == ["conv2.weight"]
    assert plan.fed_by()["conv3.weight"] == ["conv2.weight"]
    assert plan.widths == [1, 8, 16, 4]


class _Meddling(CNNFamily):
    """The cnn family with one thing broken in the plans it returns."""

    name = "cnn"

    def __init__(self, how: str) -> None:
        self.how = how

    def plan(self, checkpoint: Checkpoint) -> LayerPlan:
        plan = super().plan(checkpoint)
        node = plan.pass_through[0].name
        if self.how == "mixes channels":  # every channel reads channel 0's whole patch
            plan.feeds = [
                replace(f, index=IndexMap(repeat=1)) if f.dst == node else f for f in plan.feeds
            ]
        elif self.how == "not skipped":
            plan.skipped = [skip for skip in plan.skipped if skip.name != node]
        return plan


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("mixes channels", "does not map onto all"),
        ("not skipped", "pass-through nodes whose tensor is not skipped"),
    ],
)
def test_the_conformance_kit_checks_pass_through_nodes(
    how: str, message: str, mobile_zoo: dict[str, tuple[Path, list[str]]]
) -> None:
    path, _ = mobile_zoo["tv_mobilenet_v2"]
    with pytest.raises(ConformanceError, match=message):
        check_family(_Meddling(how), path)


def test_a_node_must_forward_channel_c_to_channel_c(write_checkpoint: WriteCheckpoint) -> None:
    """A depthwise conv with channel multiplier 2 (16 outputs from 8 channels) is fitted as
    8 groups of 2 × 9 matrices; declared a pass-through node instead, the kit refuses it."""
    chain = {
        "conv1.weight": torch.randn(8, 3, 3, 3),
        "conv2.weight": torch.randn(16, 1, 3, 3),
        "conv3.weight": torch.randn(4, 16, 3, 3),
    }
    path = write_checkpoint(chain)
    plan = check_family("cnn", path)
    assert [layer.groups for layer in plan.layers] == [1, 8, 1] and not plan.pass_through

    class Forwarding(CNNFamily):
        name = "cnn"

        def plan(self, checkpoint: Checkpoint) -> LayerPlan:
            plan = super().plan(checkpoint)
            (layer,) = [x for x in plan.layers if x.name == "conv2.weight"]
            plan.layers.remove(layer)
            plan.pass_through.append(replace(layer, type="depthwise"))
            plan.skipped.append(Skip(layer.name, DEPTHWISE))
            return plan

    with pytest.raises(ConformanceError, match="must read channel c into channel c"):
        check_family(Forwarding(), path)


def test_a_non_mobile_conv_under_features_is_not_claimed(
    write_checkpoint: WriteCheckpoint,
) -> None:
    """torchvision-like block names beside a conv the layout cannot place: not a MobileNet
    (VGG's ``features.N.weight`` convs, for one)."""
    tensors = {
        "features.0.0.weight": torch.randn(8, 3, 3, 3),
        "features.1.conv.0.0.weight": torch.randn(8, 1, 3, 3),
        "features.1.conv.1.weight": torch.randn(8, 8, 1, 1),
        "features.2.weight": torch.randn(8, 8, 3, 3),
        "classifier.1.weight": torch.randn(4, 8),
    }
    with Checkpoint.open(write_checkpoint(tensors)) as checkpoint:
        evidence = CNNFamily().detect(checkpoint)
    assert not (isinstance(evidence, tuple) and "MobileNet" in evidence[1])


def test_a_classifier_replaced_by_one_linear(tmp_path: Path) -> None:
    """Fine-tuning scripts often swap torchvision's ``classifier`` Sequential for a Linear:
    ``classifier.weight`` is the fc, fed by the head conv."""
    torch.manual_seed(0)
    model = producers.TorchvisionMobileNetV2(0.25, last=64)
    model.classifier = torch.nn.Linear(64, 3)  # type: ignore[assignment]
    plan = check_family("cnn", producers.save_module(model, tmp_path))
    (fc,) = [layer for layer in plan.layers if layer.type == "fc"]
    assert fc.name == "classifier.weight"
    assert plan.fed_by()[fc.name] == ["features.18.0.weight"]
    assert plan.widths[-2:] == [64, 3]


def test_the_plan_names_squeeze_excitation_only_where_there_is_some(
    mobile_zoo: dict[str, tuple[Path, list[str]]],
) -> None:
    """MobileNetV2 has no squeeze-excitation: its plan's note does not mention it; V3 does."""
    without = plan_of(mobile_zoo["tv_mobilenet_v2"][0]).notes
    with_se = plan_of(mobile_zoo["tv_mobilenet_v3_small"][0]).notes
    assert not any("squeeze-excitation" in note for note in without)
    assert any("squeeze-excitation convs are typed se.reduce" in note for note in with_se)
