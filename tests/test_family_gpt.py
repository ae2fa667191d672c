"""GPT-2, GPT-NeoX/Pythia, Falcon and Phi-3: fused projections split exactly as the producer's own
attention reads them, transposed Conv1D weights, parallel residuals.

Each fused split is checked against the producer's code, not against a layout restated here: the
attention module is run by transformers on the identity (the rows of ``I`` as tokens, biases
zeroed), and the query, key and value it hands to its attention function — or, for Falcon, that
``FalconAttention._split_heads`` returns — are the matrices the producer applies, entry for
entry. Multiplying by the identity is exact, so the comparison is ``torch.equal``.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dynaudit import measure
from dynaudit.engine.plan import layer_groups
from dynaudit.families import Layer, LayerPlan, detect_family, get_family
from dynaudit.families.base import matrix_shape, weight_matrices
from dynaudit.families.build import StructureError
from dynaudit.families.testing import check_family
from dynaudit.tensors import Checkpoint
from tests import producers

FALCON_LAYOUTS = {  # fixture → FalconConfig settings (the default is multi_query)
    "falcon_mqa": {},
    "falcon_new": {"new_decoder_architecture": True, "num_kv_heads": 2},
    "falcon_per_head": {"multi_query": False, "parallel_attn": False},
}


@pytest.fixture(scope="module")
def gpt_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpt-zoo")
    made = {
        "gpt2": producers.gpt2(root / "gpt2"),
        "gpt_neox": producers.gpt_neox(root / "neox"),
        "gpt_neox_sequential": producers.gpt_neox(
            root / "neox-seq", use_parallel_residual=False, tie_word_embeddings=True
        ),
        "phi3": producers.phi3(root / "phi3"),
    }
    for name, settings in FALCON_LAYOUTS.items():
        made[name] = producers.falcon(root / name, **settings)
    return made


# fixture → (family, layers, layers per type, layers per depth third)
EXPECTED: dict[str, tuple[str, int, dict[str, int], dict[str, int]]] = {
    "gpt2": ("gpt2", 18,
             {"query": 3, "key": 3, "value": 3, "output": 3, "fc": 3, "proj": 3},
             {"bottom": 6, "middle": 6, "top": 6}),
    "gpt_neox": ("neox", 19,
                 {"query": 3, "key": 3, "value": 3, "output": 3, "fc": 3, "proj": 3, "head": 1},
                 {"bottom": 6, "middle": 6, "top": 7}),
    "gpt_neox_sequential": ("neox", 18,
                            {"query": 3, "key": 3, "value": 3, "output": 3, "fc": 3, "proj": 3},
                            {"bottom": 6, "middle": 6, "top": 6}),
    "falcon_mqa": ("neox", 12,
                   {"query": 2, "key": 2, "value": 2, "output": 2, "fc": 2, "proj": 2},
                   {"bottom": 6, "middle": 6}),
    "falcon_new": ("neox", 12,
                   {"query": 2, "key": 2, "value": 2, "output": 2, "fc": 2, "proj": 2},
                   {"bottom": 6, "middle": 6}),
    "falcon_per_head": ("neox", 12,
                        {"query": 2, "key": 2, "value": 2, "output": 2, "fc": 2, "proj": 2},
                        {"bottom": 6, "middle": 6}),
    "phi3": ("llama", 22,
             {"query": 3, "key": 3, "value": 3, "output": 3, "gate": 3, "up": 3, "down": 3,
              "head": 1},
             {"bottom": 7, "middle": 7, "top": 8}),
}  # fmt: skip


def _plan(path: Path, family: str | None = None) -> LayerPlan:
    with Checkpoint.open(path) as checkpoint:
        chosen = get_family(family) if family else detect_family(checkpoint).family
        return chosen.plan(checkpoint)


def _matrix(path: Path, plan: LayerPlan, name: str) -> torch.Tensor:
    """The (out × in) matrix dynaudit fits for layer ``name``."""
    layer = next(x for x in plan.layers if x.name == name)
    with Checkpoint.open(path) as checkpoint:
        return weight_matrices(layer, checkpoint.read(layer.source))[0]


@pytest.mark.parametrize("fixture", sorted(EXPECTED))
def test_detected_planned_and_conformant(fixture: str, gpt_zoo: dict[str, Path]) -> None:
    family, count, types, thirds = EXPECTED[fixture]
    plan = check_family(family, gpt_zoo[fixture])  # detection picks it, and the contract holds
    assert len(plan.layers) == count
    assert Counter(x.type for x in plan.layers) == types
    assert Counter(layer_groups(plan.layers).values()) == thirds
    with Checkpoint.open(gpt_zoo[fixture]) as checkpoint:
        for layer in plan.layers:  # fused parts are d × d (GQA: kv·d × d); no layer is empty
            g, m, n = matrix_shape(layer, checkpoint.tensors[layer.source].shape)
            assert g == 1 and m > 1 and n > 1


@pytest.mark.parametrize("fixture", ["gpt2", "gpt_neox", "falcon_new", "phi3"])
def test_a_tiny_measure(fixture: str, gpt_zoo: dict[str, Path]) -> None:
    family, count, types, thirds = EXPECTED[fixture]
    report = measure(gpt_zoo[fixture], q_dim=8, pieces=2, steps=10)
    assert report.family.name == family and report.family.confidence >= 0.9
    assert len(report.measured) == count
    assert {t: a.layers for t, a in report.summary.types.items()} == types
    assert {g: a.layers for g, a in report.summary.groups.items()} == thirds
    assert all(layer.fidelity is not None for layer in report.measured)
    split = [x for x in report.measured if x.name.endswith("[query]")]
    assert split and all(x.shape == [32, 32] for x in split)  # the part, not the fused tensor


# ── the producer's own split ──────────────────────────────────────────────────────────────


_CAPTURED: dict[str, torch.Tensor] = {}


def _capture(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An attention function that records what the attention module hands it."""
    _CAPTURED.update(query=query, key=key, value=value)
    batch, heads, tokens, dim = query.shape
    return torch.zeros(batch, tokens, heads, dim), None


@pytest.fixture
def capture() -> Iterator[dict[str, torch.Tensor]]:
    from transformers import AttentionInterface

    AttentionInterface.register("dynaudit_capture", _capture)
    _CAPTURED.clear()
    yield _CAPTURED
    _CAPTURED.clear()


def _probe(attn: nn.Module, hidden: int, **kwargs: Any) -> dict[str, torch.Tensor]:
    """Run ``attn`` on the identity (token i = unit vector i, biases zeroed) and return the
    query, key and value it passes to its attention function as (heads·d) × hidden matrices:
    row ``h·d + j`` is head h's channel j, as the output projection reads them."""
    attn.config._attn_implementation = "dynaudit_capture"
    with torch.no_grad():
        for name, param in attn.named_parameters():
            if name.endswith("bias"):
                param.zero_()
        attn(torch.eye(hidden)[None], **kwargs)
    # (1, heads, tokens, d) → (heads, d, tokens) → (heads·d, hidden)
    return {k: v[0].permute(0, 2, 1).reshape(-1, hidden) for k, v in _CAPTURED.items()}


def _no_rotation(rotary: nn.Module, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos = 1, sin = 0: the producer's rotary step leaves q and k exactly as split."""
    cos, sin = rotary(torch.zeros(1, hidden, hidden), torch.arange(hidden)[None])
    return torch.ones_like(cos), torch.zeros_like(sin)


def _ours(path: Path, plan: LayerPlan, tensor: str) -> dict[str, torch.Tensor]:
    return {kind: _matrix(path, plan, f"{tensor}[{kind}]") for kind in ("query", "key", "value")}


def test_gpt2_c_attn_split_is_gpt2_attentions_own(
    gpt_zoo: dict[str, Path], capture: dict[str, torch.Tensor]
) -> None:
    from transformers import GPT2LMHeadModel

    path = gpt_zoo["gpt2"]
    model = GPT2LMHeadModel.from_pretrained(path).eval()
    plan = _plan(path)
    for index, block in enumerate(model.transformer.h):
        name = f"transformer.h.{index}"
        theirs = _probe(block.attn, 32)
        ours = _ours(path, plan, f"{name}.attn.c_attn.weight")
        for kind in ("query", "key", "value"):
            assert torch.equal(ours[kind], theirs[kind]), (index, kind)
        # Conv1D applies x @ W: the matrix is W transposed, for the unfused layers too
        for layer, module in (
            ("attn.c_proj", block.attn.c_proj),
            ("mlp.c_fc", block.mlp.c_fc),
            ("mlp.c_proj", block.mlp.c_proj),
        ):
            assert torch.equal(_matrix(path, plan, f"{name}.{layer}.weight"), module.weight.T)


def test_neox_split_is_gptneox_attentions_own(
    gpt_zoo: dict[str, Path], capture: dict[str, torch.Tensor]
) -> None:
    from transformers import GPTNeoXForCausalLM

    path = gpt_zoo["gpt_neox"]
    model = GPTNeoXForCausalLM.from_pretrained(path).eval()
    plan = _plan(path)
    rotation = _no_rotation(model.gpt_neox.rotary_emb, 32)
    for index, block in enumerate(model.gpt_neox.layers):
        theirs = _probe(block.attention, 32, attention_mask=None, position_embeddings=rotation)
        ours = _ours(path, plan, f"gpt_neox.layers.{index}.attention.query_key_value.weight")
        for kind in ("query", "key", "value"):
            assert torch.equal(ours[kind], theirs[kind]), (index, kind)
        # and not the naive thirds of the rows, which would mix heads
        with Checkpoint.open(path) as checkpoint:
            fused = checkpoint.read(f"gpt_neox.layers.{index}.attention.query_key_value.weight")
        assert not torch.equal(ours["query"], fused[:32])


@pytest.mark.parametrize("fixture", sorted(FALCON_LAYOUTS))
def test_falcon_split_is_falcon_split_heads(fixture: str, gpt_zoo: dict[str, Path]) -> None:
    """FalconAttention._split_heads on the fused output of the identity, for each layout
    transformers supports; key and value broadcast to the query heads exactly as the head map
    of the output projection says."""
    from transformers import FalconForCausalLM

    path = gpt_zoo[fixture]
    model = FalconForCausalLM.from_pretrained(path).eval()
    plan = _plan(path)
    for index, block in enumerate(model.transformer.h):
        attn = block.self_attention
        tensor = f"transformer.h.{index}.self_attention.query_key_value.weight"
        with torch.no_grad():
            split = attn._split_heads(attn.query_key_value(torch.eye(32)[None]))
        # (1, tokens, heads, d) → (heads·d, hidden)
        theirs = dict(
            zip(
                ("query", "key", "value"),
                (x[0].permute(1, 2, 0).reshape(-1, 32) for x in split),
                strict=True,
            )
        )
        ours = _ours(path, plan, tensor)
        assert torch.equal(ours["query"], theirs["query"])
        dense = next(
            f for f in plan.feeds if f.dst.endswith(f"{index}.self_attention.dense.weight")
        )
        reads = dense.index.indices(1, 32)[0]  # dense input channel → our value row
        for kind in ("key", "value"):
            if theirs[kind].shape[0] == ours[kind].shape[0]:  # one key/value head per query head
                assert torch.equal(ours[kind], theirs[kind]), (fixture, kind)
            else:  # new_decoder_architecture broadcasts each kv head to its group's query heads
                assert torch.equal(ours[kind][reads], theirs[kind]), (fixture, kind)
        if fixture == "falcon_mqa":  # one key/value head: every query head reads it
            assert ours["value"].shape == (8, 32)
            assert torch.equal(ours["value"][reads], theirs["value"].repeat(4, 1))


class _Ones(nn.Module):
    """An activation that records its input (Phi3MLP's gate) and returns ones."""

    def __init__(self, seen: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.seen = seen

    def forward(self, gate: torch.Tensor) -> torch.Tensor:
        self.seen["gate"] = gate
        return torch.ones_like(gate)

    @staticmethod
    def recorder(seen: dict[str, torch.Tensor], key: str) -> Any:
        """A forward pre-hook that records a module's input under ``key``."""

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen[key] = args[0]

        return hook


def test_phi3_split_is_phi3s_own_and_runs_as_llama(
    gpt_zoo: dict[str, Path], capture: dict[str, torch.Tensor]
) -> None:
    """q/k/v from Phi3Attention's slicing of qkv_proj, gate/up from Phi3MLP's chunk(2); and a
    LlamaForCausalLM given dynaudit's split matrices computes Phi-3's logits."""
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3ForCausalLM

    path = gpt_zoo["phi3"]
    model = Phi3ForCausalLM.from_pretrained(path).eval()
    plan = _plan(path)
    rotation = _no_rotation(model.model.rotary_emb, 32)
    llama_state = {
        k: v
        for k, v in model.state_dict().items()
        if "qkv_proj" not in k and "gate_up_proj" not in k
    }
    for index, block in enumerate(model.model.layers):
        prefix = f"model.layers.{index}"
        theirs = _probe(block.self_attn, 32, attention_mask=None, position_embeddings=rotation)
        ours = _ours(path, plan, f"{prefix}.self_attn.qkv_proj.weight")
        for kind, short in (("query", "q"), ("key", "k"), ("value", "v")):
            assert torch.equal(ours[kind], theirs[kind]), (index, kind)
            llama_state[f"{prefix}.self_attn.{short}_proj.weight"] = ours[kind]
        # Phi3MLP: gate, up = gate_up_proj(x).chunk(2); down(up * act(gate)) — record both
        seen: dict[str, torch.Tensor] = {}
        mlp = block.mlp
        mlp.activation_fn = _Ones(seen)  # act(gate) = 1, so down_proj reads up exactly
        hook = mlp.down_proj.register_forward_pre_hook(_Ones.recorder(seen, "up"))
        with torch.no_grad():
            mlp(torch.eye(32)[None])
        hook.remove()
        for kind in ("gate", "up"):
            mine = _matrix(path, plan, f"{prefix}.mlp.gate_up_proj.weight[{kind}]")
            assert torch.equal(mine, seen[kind][0].T), (index, kind)
            llama_state[f"{prefix}.mlp.{kind}_proj.weight"] = mine
    config = json.loads((path / "config.json").read_text())
    llama = LlamaForCausalLM(
        LlamaConfig(
            **{k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")},
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
            hidden_act="silu",
            rms_norm_eps=config["rms_norm_eps"],
            tie_word_embeddings=False,
            max_position_embeddings=32,
        )
    ).eval()
    llama.load_state_dict(llama_state, strict=True)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        phi3 = Phi3ForCausalLM.from_pretrained(path).eval()(tokens).logits
        assert torch.allclose(llama(tokens).logits, phi3, atol=1e-5, rtol=1e-5)


# ── the graph ──────────────────────────────────────────────────────────────


def _fed_by(plan: LayerPlan, suffix: str) -> tuple[set[str], bool]:
    layer = next(x for x in plan.layers if x.name.endswith(suffix))
    return set(plan.fed_by()[layer.name]), layer.name in plan.reads_input


def test_neox_parallel_residual_is_in_the_graph(gpt_zoo: dict[str, Path]) -> None:
    """x' = x + attention(x) + mlp(x): block 1's fc reads block 0's outputs but not block 1's
    attention output; sequential blocks feed it too."""
    block0 = {
        "gpt_neox.layers.0.attention.dense.weight",
        "gpt_neox.layers.0.mlp.dense_4h_to_h.weight",
    }
    dense1 = "gpt_neox.layers.1.attention.dense.weight"
    parallel = _plan(gpt_zoo["gpt_neox"])
    assert _fed_by(parallel, "layers.1.mlp.dense_h_to_4h.weight") == (block0, True)
    assert _fed_by(parallel, "layers.1.attention.query_key_value.weight[value]") == (block0, True)
    sequential = _plan(gpt_zoo["gpt_neox_sequential"])
    assert _fed_by(sequential, "layers.1.mlp.dense_h_to_4h.weight") == (block0 | {dense1}, True)
    assert any("parallel residual" in n for n in parallel.notes)
    assert any("sequential residual" in n for n in sequential.notes)
    assert "parallel" in parallel.blocks[0].note and "parallel" not in sequential.blocks[0].note
    falcon = _plan(gpt_zoo["falcon_per_head"])  # parallel_attn false
    fc1 = _fed_by(falcon, "h.1.mlp.dense_h_to_4h.weight")[0]
    assert "transformer.h.1.self_attention.dense.weight" in fc1


def test_gpt2_graph_is_the_pre_ln_stream(gpt_zoo: dict[str, Path]) -> None:
    plan = _plan(gpt_zoo["gpt2"])
    h = "transformer.h."
    fc1, _ = _fed_by(plan, "h.1.mlp.c_fc.weight")
    assert fc1 == {
        f"{h}0.attn.c_proj.weight",
        f"{h}0.mlp.c_proj.weight",
        f"{h}1.attn.c_proj.weight",
    }
    assert _fed_by(plan, "h.1.attn.c_proj.weight") == ({f"{h}1.attn.c_attn.weight[value]"}, False)
    assert _fed_by(plan, "h.1.mlp.c_proj.weight") == ({f"{h}1.mlp.c_fc.weight"}, False)
    layer = next(x for x in plan.layers if x.name == f"{h}0.attn.c_attn.weight[key]")
    assert layer.transposed and layer.rows == ((32, 64),) and layer.source.endswith("c_attn.weight")
    assert plan.widths == [64, 32, 32, 32, 32, 64]  # vocabulary → d → … → (tied) vocabulary


def test_falcon_head_maps(gpt_zoo: dict[str, Path]) -> None:
    """dense input channel → value row: MQA reads the single head, grouped layouts kv h // group."""
    for fixture, expected in (
        ("falcon_mqa", [*range(8)] * 4),
        ("falcon_new", [*range(8), *range(8), *range(8, 16), *range(8, 16)]),
        ("falcon_per_head", list(range(32))),
    ):
        plan = _plan(gpt_zoo[fixture])
        feed = next(f for f in plan.feeds if f.dst.endswith("h.0.self_attention.dense.weight"))
        assert feed.index.indices(1, 32)[0].tolist() == expected, fixture


# ── refusals and fallbacks ──────────────────────────────────────────────────────────────


def _copy(src: Path, dst: Path, **config: object) -> Path:
    out = shutil.copytree(src, dst)
    data = json.loads((out / "config.json").read_text())
    data.update(config)
    (out / "config.json").write_text(json.dumps(data))
    return out


def test_gpt2_without_config_takes_n_embd_from_c_proj(
    gpt_zoo: dict[str, Path], tmp_path: Path
) -> None:
    bare = shutil.copytree(gpt_zoo["gpt2"], tmp_path / "bare")
    (bare / "config.json").unlink()
    with Checkpoint.open(bare) as checkpoint:
        detection = detect_family(checkpoint)
    assert detection.family.name == "gpt2" and "tensor names" in detection.how
    plan = check_family("gpt2", bare)
    assert len(plan.layers) == 18
    assert any("taken from attn.c_proj" in note for note in plan.notes)


def test_structure_errors_name_the_layout(gpt_zoo: dict[str, Path], tmp_path: Path) -> None:
    cases: list[tuple[Path, str]] = [
        (_copy(gpt_zoo["gpt2"], tmp_path / "gpt2", n_embd=16), r"c_attn\.weight is 32×96"),
        (_copy(gpt_zoo["gpt_neox"], tmp_path / "neox", num_attention_heads=5), "not divisible"),
        # the layout flags decide the rows; a flipped flag is refused, never split anyway
        (_copy(gpt_zoo["falcon_mqa"], tmp_path / "mqa", multi_query=False), r"is 48×32"),
        (_copy(gpt_zoo["falcon_new"], tmp_path / "new", num_kv_heads=1), r"is 64×32"),
        (
            _copy(gpt_zoo["phi3"], tmp_path / "phi3", num_key_value_heads=4),
            "qkv_proj.weight has 64 rows",
        ),
        (_copy(gpt_zoo["phi3"], tmp_path / "phi3-mlp", intermediate_size=40), r"\[gate; up\]"),
    ]
    for path, message in cases:
        with pytest.raises(StructureError, match=message) as info:
            measure(path, q_dim=8, pieces=2, steps=5)
        assert info.value.exit_code == 3
        assert "\n" not in str(info.value)


def test_no_config_no_interleaved_split(gpt_zoo: dict[str, Path], tmp_path: Path) -> None:
    """Without config.json, the names still say NeoX / Phi-3, but the split is refused."""
    for fixture, family, message in (
        ("gpt_neox", "neox", "must give hidden_size and num_attention_heads"),
        ("falcon_new", "neox", "must give hidden_size and num_attention_heads"),
        ("phi3", "llama", "fuses q, k and v; config.json must give"),
    ):
        bare = shutil.copytree(gpt_zoo[fixture], tmp_path / fixture)
        (bare / "config.json").unlink()
        with Checkpoint.open(bare) as checkpoint:
            assert detect_family(checkpoint).family.name == family
        with pytest.raises(StructureError, match=message):
            _plan(bare)


def test_gpt_bigcode_names_are_not_gpt2(tmp_path: Path) -> None:
    """GPTBigCode stores GPT-2's names as nn.Linear (out, in): not claimed by gpt2."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    torch.manual_seed(0)
    config = GPTBigCodeConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    GPTBigCodeForCausalLM(config).save_pretrained(tmp_path)
    with Checkpoint.open(tmp_path) as checkpoint:
        assert detect_family(checkpoint).family.name not in ("gpt2", "neox")


def test_transposed_rows_select_output_columns() -> None:
    """Layer.rows are output rows: the stored columns of a weight stored (in, out)."""
    stored = torch.arange(24.0).reshape(4, 6)  # 4 inputs, 6 outputs
    part = Layer("w[b]", "key", 0, transposed=True, tensor="w", rows=((2, 4),))
    assert matrix_shape(part, (4, 6)) == (1, 2, 4)
    assert torch.equal(weight_matrices(part, stored)[0], stored[:, 2:4].T)
    plain = Layer("w[b]", "key", 0, tensor="w", rows=((2, 4), (0, 1)))
    assert matrix_shape(plain, (6, 4)) == (1, 3, 4)
    assert torch.equal(weight_matrices(plain, stored.T)[0], stored.T[[2, 3, 0]])
