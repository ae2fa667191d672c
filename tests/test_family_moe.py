"""The ``moe`` family on checkpoints written by transformers (Mixtral, Qwen2-MoE, Qwen3-MoE,
DeepSeek-V2/V3, and a Mixtral state dict with its experts fused in 3-D): every expert is a set
of layers with its index, the report aggregates per expert, ``--experts`` selects, ``inspect``
counts every expert's cost, and ``check`` names a damaged expert."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from safetensors.torch import load_file, save_file

import dynaudit
from dynaudit.errors import UsageError
from dynaudit.families import detect_family, get_family
from dynaudit.families.base import Layer, read_matrices, weight_matrices
from dynaudit.families.build import StructureError
from dynaudit.families.testing import check_family
from dynaudit.reports import render_markdown
from dynaudit.schemas import schema_text
from dynaudit.tensors import Checkpoint
from experiments.derived import derive
from tests import producers
from tests.cli import run_cli

FIT: dict[str, Any] = {"q_dim": 8, "pieces": 2, "steps": 10}
FLAGS = ["--q-dim", "8", "--pieces", "2", "--steps", "10"]


@pytest.fixture(scope="module")
def moe_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe-zoo")
    return {
        "mixtral": producers.mixtral(root / "mixtral"),
        "mixtral_fused": producers.mixtral(root / "mixtral-fused", fused=True),
        "qwen2_moe": producers.qwen2_moe(root / "qwen2-moe"),
        "qwen3_moe": producers.qwen3_moe(root / "qwen3-moe"),
        "deepseek_v3": producers.deepseek(root / "deepseek-v3"),
        "deepseek_v2": producers.deepseek(root / "deepseek-v2", version=2),
    }


_ATTENTION = {"query": 2, "key": 2, "value": 2, "output": 2}
_EXPERTS = {"router": 2, "expert.gate": 8, "expert.up": 8, "expert.down": 8}
_LATENT = {"query": 3, "kv.a": 3, "key.rope": 3, "key": 3, "value": 3, "output": 3}
_DEEPSEEK = {**_EXPERTS, "shared.gate": 2, "shared.up": 2, "shared.down": 2}
_DEEPSEEK |= {"gate": 1, "up": 1, "down": 1, "head": 1}
# fixture → (layers per type, layers per depth third): 2 blocks of 4 experts (DeepSeek: a
# dense block, then 2 of 4 experts and a shared one), every expert's gate, up and down.
EXPECTED = {
    "mixtral": ({**_ATTENTION, **_EXPERTS, "head": 1}, {"bottom": 17, "middle": 17, "top": 1}),
    "mixtral_fused": (
        {**_ATTENTION, **_EXPERTS, "head": 1},
        {"bottom": 17, "middle": 17, "top": 1},
    ),
    "qwen2_moe": (
        {**_ATTENTION, **_EXPERTS, "shared.gate": 2, "shared.up": 2, "shared.down": 2, "head": 1},
        {"bottom": 20, "middle": 20, "top": 1},
    ),
    "qwen3_moe": ({**_ATTENTION, **_EXPERTS, "head": 1}, {"bottom": 17, "middle": 17, "top": 1}),
    "deepseek_v3": (
        {**_LATENT, "query.a": 3, **_DEEPSEEK},
        {"bottom": 10, "middle": 23, "top": 24},
    ),
    "deepseek_v2": ({**_LATENT, **_DEEPSEEK}, {"bottom": 9, "middle": 22, "top": 23}),
}


@pytest.mark.parametrize("fixture", sorted(EXPECTED))
def test_each_producer_is_planned_with_every_expert(fixture: str, moe_zoo: dict[str, Path]) -> None:
    """Detected as moe (conformance included), with every expert's three layers, typed and
    indexed, and the thirds of the blocks."""
    from dynaudit.engine.plan import layer_groups

    types, thirds = EXPECTED[fixture]
    plan = check_family("moe", moe_zoo[fixture])
    assert Counter(x.type for x in plan.layers) == types
    assert Counter(layer_groups(plan.layers).values()) == thirds
    for layer in plan.layers:
        assert (layer.expert is not None) == layer.type.startswith("expert.")
    experts = {(x.depth, x.expert) for x in plan.layers if x.expert is not None}
    sparse = sorted({depth for depth, _ in experts})
    assert experts == {(d, e) for d in sparse for e in range(4)}
    assert any("4 experts per sparse block, 2 chosen per token" in n for n in plan.notes)


def test_moe_wins_detection_over_llama(moe_zoo: dict[str, Path], tmp_path: Path) -> None:
    """Qwen2-MoE's architectures start with "Qwen2", which llama claims at 0.9; without a
    config.json, the expert names alone."""
    for fixture in ("qwen2_moe", "qwen3_moe", "mixtral"):
        with Checkpoint.open(moe_zoo[fixture]) as checkpoint:
            found = detect_family(checkpoint)
        assert found.family.name == "moe" and found.confidence == 0.95
    bare = shutil.copytree(moe_zoo["mixtral"], tmp_path / "bare")
    (bare / "config.json").unlink()
    with Checkpoint.open(bare) as checkpoint:
        found = detect_family(checkpoint)
    assert (found.family.name, found.confidence) == ("moe", 0.85)
    assert "tensor names" in found.how


def test_the_graph_sums_every_expert_into_the_stream(moe_zoo: dict[str, Path]) -> None:
    with Checkpoint.open(moe_zoo["qwen2_moe"]) as checkpoint:
        plan = get_family("moe").plan(checkpoint)
    fed = plan.fed_by()
    block = "model.layers.{}.mlp.{}.weight"
    downs = [block.format(0, f"experts.{e}.down_proj") for e in range(4)]
    shared_down = block.format(0, "shared_expert.down_proj")
    o_0 = "model.layers.0.self_attn.o_proj.weight"
    earlier = {o_0, *downs, shared_down}
    assert set(fed["model.layers.1.self_attn.q_proj.weight"]) == earlier
    assert set(fed[block.format(1, "gate")]) == {*earlier, "model.layers.1.self_attn.o_proj.weight"}
    assert block.format(1, "gate") in plan.reads_input
    for e in range(4):  # an expert's down reads its own gate and up, nothing else
        parts = [block.format(0, f"experts.{e}.{p}_proj") for p in ("gate", "up")]
        assert fed[downs[e]] == parts
        assert set(fed[parts[0]]) == {o_0}
    last = [block.format(1, f"experts.{e}.down_proj") for e in range(4)]
    assert fed["lm_head.weight"][-5:] == [*last, block.format(1, "shared_expert.down_proj")]
    # the router scores the experts: it reads the stream and feeds no layer
    assert not any(f.src == block.format(0, "gate") for f in plan.feeds)
    branches = plan.blocks[0].branches
    assert list(branches) == ["attention", "expert 0", "expert 1", "expert 2", "expert 3", "shared"]
    assert branches["expert 2"] == tuple(
        block.format(0, f"experts.2.{p}_proj") for p in ("gate", "up", "down")
    )
    skipped = {s.name: s.reason for s in plan.skipped}
    assert skipped[block.format(0, "shared_expert_gate")].startswith("shared-expert gate")


def test_fused_experts_equal_the_ones_save_pretrained_writes(moe_zoo: dict[str, Path]) -> None:
    """The same model (same seed) saved both ways: each expert's slice of the 3-D stacks is,
    bit for bit, the expert's own tensor."""
    family = get_family("moe")
    with (
        Checkpoint.open(moe_zoo["mixtral"]) as split,
        Checkpoint.open(moe_zoo["mixtral_fused"]) as fused,
    ):
        plans = family.plan(split), family.plan(fused)
        key = [{(x.depth, x.expert, x.type): x for x in plan.layers} for plan in plans]
        assert key[0].keys() == key[1].keys()
        for k, layer in key[0].items():
            other = key[1][k]
            ours, theirs = (
                family.matrices(layer, split.read(layer.source)),
                fused.read(other.source),
            )
            assert torch.equal(ours, family.matrices(other, theirs)), k
            assert torch.equal(ours, read_matrices(family, other, fused)), k  # read alone
    gate = key[1][0, 2, "expert.gate"]
    assert gate.name == "model.layers.0.mlp.experts.gate_up_proj[2:gate]"
    assert (gate.index, gate.rows) == (2, ((0, 24),))
    assert key[1][0, 2, "expert.up"].rows == ((24, 48),)
    assert key[1][1, 3, "expert.down"].name == "model.layers.1.mlp.experts.down_proj[3]"
    assert any("stored fused" in note for note in plans[1].notes)


def test_one_expert_of_a_stack_is_read_alone(moe_zoo: dict[str, Path]) -> None:
    """Reading expert E of a fused (E, ·, ·) stack reads that expert's bytes only: the others
    may hold anything (here NaN) without touching the result."""
    name = "model.layers.0.mlp.experts.down_proj"
    with Checkpoint.open(moe_zoo["mixtral_fused"]) as fused:
        whole = fused.read(name)
    poisoned = whole.clone()
    poisoned[[0, 1, 3]] = float("nan")
    tensors = load_file(moe_zoo["mixtral_fused"] / "model.safetensors")
    tensors[name] = poisoned
    out = moe_zoo["mixtral_fused"].parent / "poisoned"
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    with Checkpoint.open(out) as checkpoint:
        assert torch.equal(checkpoint.read(name, 2), whole[2])
        assert torch.isnan(checkpoint.read(name)).any()
        with pytest.raises(IndexError):
            checkpoint.read(name, 4)


def test_latent_attention_is_split_by_the_config(moe_zoo: dict[str, Path]) -> None:
    """DeepSeek's kv_a_proj_with_mqa = [latent (kv_lora_rank); rotary key (qk_rope_head_dim)]
    and kv_b_proj = per head [key (qk_nope_head_dim); value (v_head_dim)], as transformers'
    DeepseekV3Attention splits them."""
    with Checkpoint.open(moe_zoo["deepseek_v3"]) as checkpoint:
        plan = get_family("moe").plan(checkpoint)
        parts = {x.name: x for x in plan.layers if "layers.1.self_attn" in x.name}
        kv_a = checkpoint.read("model.layers.1.self_attn.kv_a_proj_with_mqa.weight")
        kv_b = checkpoint.read("model.layers.1.self_attn.kv_b_proj.weight")
    name = "model.layers.1.self_attn.{}.weight[{}]"
    latent, rope = kv_a.split([8, 4])
    assert torch.equal(
        weight_matrices(parts[name.format("kv_a_proj_with_mqa", "latent")], kv_a)[0], latent
    )
    assert torch.equal(
        weight_matrices(parts[name.format("kv_a_proj_with_mqa", "rope")], kv_a)[0], rope
    )
    heads = kv_b.view(4, 8 + 6, 8)  # (heads, nope + v, kv_lora_rank)
    key, value = heads[:, :8].reshape(-1, 8), heads[:, 8:].reshape(-1, 8)
    assert torch.equal(weight_matrices(parts[name.format("kv_b_proj", "key")], kv_b)[0], key)
    assert torch.equal(weight_matrices(parts[name.format("kv_b_proj", "value")], kv_b)[0], value)
    fed = plan.fed_by()
    assert fed["model.layers.1.self_attn.o_proj.weight"] == [name.format("kv_b_proj", "value")]
    assert fed["model.layers.1.self_attn.q_b_proj.weight"] == [
        "model.layers.1.self_attn.q_a_proj.weight"
    ]
    assert plan.blocks[1].branches["attention"] == (
        name.format("kv_a_proj_with_mqa", "latent"),
        name.format("kv_b_proj", "value"),
        "model.layers.1.self_attn.o_proj.weight",
    )  # fmt: skip


def test_measure_reports_per_expert_aggregates(moe_zoo: dict[str, Path]) -> None:
    report = dynaudit.measure(moe_zoo["mixtral"], cache=False, **FIT)
    layers = {x.name: x for x in report.measured}
    assert len(layers) == 35
    assert layers["model.layers.1.block_sparse_moe.experts.2.w2.weight"].expert == 2
    assert layers["model.layers.1.block_sparse_moe.gate.weight"].expert is None
    experts = report.summary.experts
    assert experts is not None and [(x.depth, x.expert) for x in experts] == [
        (d, e) for d in (0, 1) for e in range(4)
    ]
    for entry in experts:
        own = [x for x in report.measured if (x.depth, x.expert) == (entry.depth, entry.expert)]
        assert entry.layers == 3 and entry.mean_distance == pytest.approx(
            sum(x.mean_distance or 0 for x in own) / 3
        )
    spread = report.summary.expert_spread
    assert spread is not None and spread.experts == 8 and spread.mean_distance is not None
    means = [x.mean_distance for x in experts]
    assert (spread.mean_distance.min, spread.mean_distance.max) == (min(means), max(means))
    lowest = experts[means.index(min(means))]
    assert spread.mean_distance.lowest == [lowest.depth, lowest.expert]
    assert spread.mean_distance.min <= spread.mean_distance.mean <= spread.mean_distance.max
    data = json.loads(report.model_dump_json())
    jsonschema.Draft202012Validator(json.loads(schema_text("measure"))).validate(data)
    assert data["schema_minor"] == 1  # the expert fields came with measure report 1.1
    assert "expert" not in data["layers"][0] or data["layers"][0]["type"].startswith("expert.")
    markdown = render_markdown(report)
    assert "## Experts" in markdown and "| 1 | 2 | 3 |" in markdown


def test_a_model_without_experts_reports_none(tmp_path: Path) -> None:
    report = dynaudit.measure(producers.qwen2(tmp_path / "qwen2"), cache=False, **FIT)
    data = json.loads(report.model_dump_json())
    assert "experts" not in data["summary"] and "expert_spread" not in data["summary"]
    assert "schema_minor" not in data  # minor 0: what releases before 1.1 read
    assert not any("expert" in layer for layer in data["layers"])
    assert "## Experts" not in render_markdown(report)


def test_experts_flag_measures_only_those_experts(moe_zoo: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    source = str(moe_zoo["qwen2_moe"])
    proc = run_cli("measure", source, "--experts", "0,3", "--json", str(out), *FLAGS, "--no-cache")
    assert proc.returncode == 0, proc.stderr
    report = dynaudit.Report.model_validate_json(out.read_text())
    assert {(x.depth, x.expert) for x in report.measured} == {
        (d, e) for d in (0, 1) for e in (0, 3)
    }
    assert len(report.measured) == 12  # 2 experts × 3 layers × 2 blocks; no router, no shared
    skipped = {s.name: s.skipped for s in report.skipped}
    assert skipped["model.layers.0.mlp.experts.1.up_proj.weight"] == "not selected"
    assert skipped["model.layers.0.mlp.shared_expert.up_proj.weight"] == "not selected"
    assert "per expert" in proc.stdout
    proc = run_cli("measure", source, "--experts", "1-2", "--layers", r"layers\.1\..*down",
                   "--json", str(out), *FLAGS, "--no-cache")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = dynaudit.Report.model_validate_json(out.read_text())
    assert [x.name for x in report.measured] == [
        f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in (1, 2)
    ]


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("4", "--experts 4: no expert 4; the checkpoint's experts are 0-3"),
        ("2-1", "not a list of expert indices and ranges"),
        ("a", "not a list of expert indices and ranges"),
    ],
)
def test_a_bad_experts_selection_is_a_usage_error(
    given: str, message: str, moe_zoo: dict[str, Path]
) -> None:
    proc = run_cli("measure", str(moe_zoo["mixtral"]), "--experts", given, *FLAGS, "--no-cache")
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_experts_on_a_model_without_experts_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="family llama planned no experts"):
        dynaudit.measure(producers.qwen2(tmp_path / "q"), experts=[0], cache=False, **FIT)


def test_inspect_counts_every_expert(moe_zoo: dict[str, Path], tmp_path: Path) -> None:
    found = dynaudit.inspect(moe_zoo["mixtral"], **FIT)
    experts = [x for x in found.layers if x.expert is not None]
    assert len(experts) == 24 and len(found.layers) == 35
    assert found.gflop == pytest.approx(sum(x.gflop for x in found.layers))
    assert all(x.gflop > 0 for x in experts)
    out = tmp_path / "i.json"
    proc = run_cli("inspect", str(moe_zoo["mixtral_fused"]), "--json", str(out), *FLAGS[:4])
    assert proc.returncode == 0, proc.stderr
    assert "experts: 4 per block in 2 blocks, 8 in all; their 24 layers cost" in proc.stdout
    fused = json.loads(out.read_text())
    jsonschema.Draft202012Validator(json.loads(schema_text("inspect"))).validate(fused)
    shapes = {x["name"]: x["shape"] for x in fused["layers"]}
    assert shapes["model.layers.0.mlp.experts.gate_up_proj[1:up]"] == [24, 32]
    assert shapes["model.layers.0.mlp.experts.down_proj[1]"] == [32, 24]


def test_check_names_the_damaged_expert(moe_zoo: dict[str, Path], tmp_path: Path) -> None:
    """A fine-tune whose expert 2 of block 1 had its w2 replaced by noise fails, and the
    finding names that expert."""
    base = moe_zoo["mixtral"]
    stored = tmp_path / "baseline"
    made = run_cli("baseline", str(base), "--out", str(stored), "--seeds", "1", *FLAGS)
    assert made.returncode == 0, made.stderr
    target = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    draws = torch.Generator().manual_seed(1)

    def replace(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name != target:
            return tensor
        return tensor.std() * torch.randn(tensor.shape, generator=draws)

    damaged = derive(base, tmp_path / "damaged", replace)
    out = tmp_path / "check.json"
    proc = run_cli("check", str(damaged), "--baseline", str(stored), "--json", str(out))
    assert proc.returncode == 1, proc.stderr
    report = dynaudit.CheckReport.model_validate_json(out.read_text())
    assert report.verdict.failing_layers == [target]
    assert f"damage: {target} (expert 2, depth 1)" in report.verdict.reasons[0]
    assert "(expert 2, depth 1)" in proc.stdout
    rows = {x.name: x for x in report.comparison.layers}
    assert rows[target].expert == 2 and rows[target].unchanged is False
    assert sum(1 for x in rows.values() if x.unchanged) == 34


def _resave(source: Path, out: Path, change: dict[str, torch.Tensor | None]) -> Path:
    """``source`` with tensors replaced (None: removed) and its config.json."""
    state = load_file(str(source / "model.safetensors"))
    for name, tensor in change.items():
        if tensor is None:
            del state[name]
        else:
            state[name] = tensor
    out.mkdir()
    save_file(state, str(out / "model.safetensors"))
    shutil.copy(source / "config.json", out / "config.json")
    return out


def test_structure_errors_name_what_is_wrong(moe_zoo: dict[str, Path], tmp_path: Path) -> None:
    moe = get_family("moe")
    mixtral = moe_zoo["mixtral"]
    expert = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    cases = [
        ({expert: None}, "expert 3 of block 1 lacks its up"),
        ({expert.replace("w3", "w1"): None, expert: None, expert.replace("w3", "w2"): None},
         "block 1 has 3 experts; config.json"),
        ({"model.layers.0.block_sparse_moe.gate.weight": torch.randn(5, 32)},
         "scores 5 experts; block 0 has 4"),
        ({expert: torch.randn(24, 16)}, "reads 16 inputs; what feeds it has 32"),
    ]  # fmt: skip
    for i, (change, message) in enumerate(cases):
        with (
            Checkpoint.open(_resave(mixtral, tmp_path / str(i), change)) as checkpoint,
            pytest.raises(StructureError, match=message.replace("(", r"\(")),
        ):
            moe.plan(checkpoint)
    fused = moe_zoo["mixtral_fused"]
    stack = "model.layers.0.mlp.experts.gate_up_proj"
    transposed = load_file(str(fused / "model.safetensors"))[stack].mT.contiguous()
    with (
        Checkpoint.open(_resave(fused, tmp_path / "t", {stack: transposed})) as checkpoint,
        pytest.raises(StructureError, match=r"\(experts, in, out\) layout is not supported"),
    ):
        moe.plan(checkpoint)


def test_latent_attention_needs_its_config(moe_zoo: dict[str, Path], tmp_path: Path) -> None:
    copy = shutil.copytree(moe_zoo["deepseek_v3"], tmp_path / "ds")
    config = json.loads((copy / "config.json").read_text())
    del config["kv_lora_rank"]
    (copy / "config.json").write_text(json.dumps(config))
    with (
        Checkpoint.open(copy) as checkpoint,
        pytest.raises(StructureError, match="kv_lora_rank"),
    ):
        get_family("moe").plan(checkpoint)


def test_multi_token_prediction_blocks_are_skipped(
    moe_zoo: dict[str, Path], tmp_path: Path
) -> None:
    """DeepSeek-V3 ships its multi-token prediction module as one block past
    num_hidden_layers, which transformers does not load."""
    copy = shutil.copytree(moe_zoo["deepseek_v3"], tmp_path / "ds")
    config = json.loads((copy / "config.json").read_text())
    config |= {"num_hidden_layers": 2, "num_nextn_predict_layers": 1}
    (copy / "config.json").write_text(json.dumps(config))
    plan = check_family("moe", copy)
    assert max(x.depth for x in plan.layers) == 2  # blocks 0 and 1, the head above
    reasons = {s.name: s.reason for s in plan.skipped}
    assert reasons["model.layers.2.mlp.experts.0.up_proj.weight"].startswith("multi-token")


def test_a_stacked_layer_reads_one_matrix_of_its_stack() -> None:
    """Layer.index: matrix ``index`` of a 3-D stack, before its rows; checked like any layer."""
    stack = torch.randn(3, 8, 5)
    layer = Layer("s[1:up]", "expert.up", 0, tensor="s", rows=((4, 8),), index=1)
    assert torch.equal(weight_matrices(layer, stack)[0], stack[1, 4:8])
    from dynaudit.families.base import check_layer, matrix_shape

    assert matrix_shape(layer, (3, 8, 5)) == (1, 4, 5)
    with pytest.raises(StructureError, match="matrix 3 of a 3-D stack"):
        check_layer(Layer("s[3]", "expert.down", 0, tensor="s", index=3), (3, 8, 5), "t")
    with pytest.raises(StructureError, match="rows \\[4, 9\\)"):
        check_layer(Layer("s", "x", 0, rows=((4, 9),), index=0), (3, 8, 5), "t")
