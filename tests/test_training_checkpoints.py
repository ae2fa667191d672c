"""Training checkpoints in safetensors, recurrent layers split per gate, and the CRNN order.

Every checkpoint here is written by torch and safetensors from real modules and a real
optimizer's state; the gate splits are compared with ``torch.nn.LSTM``/``GRU``'s own gates.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from dynaudit_plugins.generic import GenericFamily

import dynaudit
from dynaudit.errors import StateDictKeyNotFound
from dynaudit.families.base import LayerPlan
from dynaudit.families.testing import check_family
from dynaudit.sources import SourceOptions, open_checkpoint, resolve
from dynaudit.tensors import Checkpoint, natural_key
from tests import producers
from tests.cli import run_cli
from tests.hubserver import LocalHub

FAST = {"q_dim": 16, "pieces": 4, "steps": 40}
FAST_FLAGS = ["--q-dim", "16", "--pieces", "4", "--steps", "40"]


def _measure_json(path: Path, cache: Path, *flags: str) -> dict[str, Any]:
    out = cache.parent / "report.json"
    proc = run_cli(
        "measure", str(path), "--cache-dir", str(cache), *FAST_FLAGS, "--json", str(out),
        "--quiet", *flags,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def _digests(report: dict[str, Any]) -> dict[str, str]:
    """Each fitted layer's digest of its weights."""
    return {x["name"]: x["digest"] for x in report["layers"] if x.get("digest")}


def _refused(path: Path, *flags: str) -> str:
    """The one line of a refusal with exit 3."""
    proc = run_cli("inspect", str(path), *flags)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _opened_names(path: Path, key: str | None = None) -> tuple[list[str], str | None]:
    options = SourceOptions(state_dict_key=key)
    with open_checkpoint(resolve(path, options), options=options) as checkpoint:
        return checkpoint.names(), checkpoint.weights_note


# -- safetensors training checkpoints ------------------------------------------------------


def test_a_training_loop_checkpoint_in_safetensors_is_audited_from_its_model_state_dict(
    tmp_path: Path,
) -> None:
    model, optimizer = producers.trained_net()
    path = producers.training_safetensors(
        tmp_path / "checkpoint.safetensors", producers.loop_checkpoint(model, optimizer)
    )
    with Checkpoint.open(path) as raw:  # what the file holds: names flattened, Adam's state
        assert "model_state_dict.fc1.weight" in raw.tensors
        assert "optimizer_state_dict.state.0.exp_avg_sq" in raw.tensors
    report = _measure_json(path, tmp_path / "cache")
    assert {layer["name"] for layer in report["layers"]} == set(model.state_dict())
    note = report["source"]["selection"]
    assert note.startswith("the model weights under 'model_state_dict' of a training checkpoint")
    assert "not audited: cer, epoch, optimizer_state_dict" in note
    plain = producers.save_module(model, tmp_path / "plain")
    same = _measure_json(plain, tmp_path / "cache")
    assert "selection" not in same["source"]
    assert _digests(same) == _digests(report)  # the same weights, whole, and nothing else


def test_a_lightning_checkpoint_in_safetensors_loses_its_model_prefix(tmp_path: Path) -> None:
    model, optimizer = producers.trained_net()
    path = producers.training_safetensors(
        tmp_path / "last.safetensors", producers.lightning_checkpoint(model, optimizer)
    )
    names, note = _opened_names(path)
    assert names == sorted(model.state_dict(), key=natural_key)
    assert note is not None and "'state_dict'" in note and "prefix 'model.' removed" in note
    assert "not audited: epoch, global_step, optimizer_states" in note


def test_the_state_dict_key_picks_the_average_and_the_cache_tells_the_keys_apart(
    tmp_path: Path,
) -> None:
    model, optimizer = producers.trained_net()
    ema = {k: v * 0.5 for k, v in model.state_dict().items()}
    path = producers.training_safetensors(
        tmp_path / "both.safetensors",
        {"ema": ema, "model": model.state_dict(), "optimizer": optimizer.state_dict()},
    )
    cache = tmp_path / "cache"
    chosen = _measure_json(path, cache)
    assert "'model'" in chosen["source"]["selection"]  # model before ema: STATE_DICT_KEYS
    picked = _measure_json(path, cache, "--state-dict-key", "ema")
    assert "'ema'" in picked["source"]["selection"] and not picked["cache"]["hit"]
    assert picked["source"]["files"] == chosen["source"]["files"]  # one file, two keys
    assert _digests(picked).keys() == _digests(chosen).keys()
    assert set(_digests(picked).values()).isdisjoint(_digests(chosen).values())
    again = _measure_json(path, cache)
    assert again["cache"]["hit"] and _digests(again) == _digests(chosen)


@pytest.mark.parametrize(
    "layout",
    [
        "a model and its average",  # no optimizer: the same names twice say it
        "optimizer state under a key of its own",  # recognised by its names' shape
    ],
)
def test_other_training_layouts_are_recognised(tmp_path: Path, layout: str) -> None:
    model, optimizer = producers.trained_net()
    state = model.state_dict()
    checkpoint: dict[str, object] = (
        {"model": state, "model_ema": {k: v * 0.9 for k, v in state.items()}}
        if layout == "a model and its average"
        else {"model": state, "opt": optimizer.state_dict(), "step": torch.tensor(7)}
    )
    path = producers.training_safetensors(tmp_path / "ckpt.safetensors", checkpoint)
    names, note = _opened_names(path)
    assert names == sorted(state, key=natural_key)
    assert note is not None and "under 'model'" in note


def test_a_model_whose_names_start_with_model_is_not_a_training_checkpoint(
    tmp_path: Path,
) -> None:
    """LLaMA's ``model.layers.…`` beside ``lm_head.weight``, a DataParallel ``module.``
    state dict, and a model with submodules named ``model`` and ``ema`` that differ, are
    models: opened as they are."""
    llama = producers.llama(tmp_path / "llama", dtype=torch.float32, shards=False)
    with Checkpoint.open(llama) as raw:
        assert any(name.startswith("model.layers.") for name in raw.tensors)
        expected = raw.names()
    assert _opened_names(llama) == (expected, None)
    model, _ = producers.trained_net()
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    twice = {
        **{f"model.{k}": v for k, v in model.state_dict().items()},
        "ema.decay.weight": torch.randn(4, 4),
    }
    for tensors in (wrapped, twice):
        path = producers.training_safetensors(tmp_path / "m" / "model.safetensors", tensors)
        assert _opened_names(path) == (sorted(tensors, key=natural_key), None)


def test_a_wrong_state_dict_key_is_exit_3_listing_the_keys(tmp_path: Path) -> None:
    model, optimizer = producers.trained_net()
    path = producers.training_safetensors(
        tmp_path / "checkpoint.safetensors", producers.loop_checkpoint(model, optimizer)
    )
    line = _refused(path, "--state-dict-key", "weights")
    assert "no tensor name starts with 'weights.'" in line
    assert "cer, epoch, model_state_dict, optimizer_state_dict" in line


def test_the_state_dict_key_on_a_model_reads_it_whole_and_says_so(tmp_path: Path) -> None:
    """``check`` opens the baseline with the candidate's flag: a safetensors model baseline is
    audited whole, with a note, not refused."""
    model, optimizer = producers.trained_net()
    ema = {k: v * 0.99 for k, v in model.state_dict().items()}
    candidate = producers.training_safetensors(
        tmp_path / "run.safetensors",
        {"model": model.state_dict(), "ema": ema, "optimizer": optimizer.state_dict()},
    )
    plain = producers.save_module(model, tmp_path / "plain")
    names, note = _opened_names(plain, "ema")
    assert names == sorted(model.state_dict(), key=natural_key)
    assert note is not None and note.startswith("--state-dict-key ema does not apply")
    options = SourceOptions(state_dict_key="ema", cache_dir=tmp_path / "cache")
    checked = dynaudit.check(candidate, plain, sources=options, **FAST)
    assert checked.source.selection is not None and "under 'ema'" in checked.source.selection
    assert checked.baseline.source.selection == note


def test_optimizer_state_without_a_known_key_asks_for_the_key(tmp_path: Path) -> None:
    model, optimizer = producers.trained_net()
    path = producers.training_safetensors(
        tmp_path / "checkpoint.safetensors",
        {"net": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()},
    )
    line = _refused(path)
    assert "optimizer state under 'optimizer_state_dict'" in line
    assert "net, optimizer_state_dict" in line and "--state-dict-key KEY" in line
    with pytest.raises(StateDictKeyNotFound):
        dynaudit.inspect(path)
    names, note = _opened_names(path, "net")
    assert names == sorted(model.state_dict(), key=natural_key)
    assert note is not None and "under 'net'" in note


def test_a_hub_training_checkpoint_is_inspected_from_its_headers(
    hub: LocalHub, tmp_path: Path
) -> None:
    model, optimizer = producers.trained_net()
    folder = tmp_path / "repo"
    producers.training_safetensors(
        folder / "model.safetensors", producers.loop_checkpoint(model, optimizer)
    )
    hub.add("org/training-run", folder)
    found = dynaudit.inspect("hf://org/training-run", sources=SourceOptions(hf_endpoint=hub.url))
    assert [layer.name for layer in found.layers] == ["fc1.weight", "fc2.weight"]


# -- recurrent layers ----------------------------------------------------------------------


def _plan(module: torch.nn.Module, folder: Path) -> tuple[LayerPlan, dict[str, torch.Tensor]]:
    """The generic plan of ``module`` saved by safetensors, and each layer's matrix."""
    path = producers.save_module(module, folder)
    plan = check_family("generic", path)  # the contract holds
    family = GenericFamily()
    with Checkpoint.open(path) as checkpoint:
        mats = {x.name: family.matrices(x, checkpoint.read(x.source))[0] for x in plan.layers}
    return plan, mats


def test_lstm_gates_are_torchs_own_and_compute_its_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(6, 5, num_layers=2, bidirectional=True)
    plan, mats = _plan(lstm, tmp_path / "lstm")
    assert len(plan.layers) == 2 * 2 * 2 * 4  # layers × directions × (ih, hh) × gates
    for suffix in ("_l0", "_l0_reverse", "_l1", "_l1_reverse"):
        for part in ("ih", "hh"):
            stored = getattr(lstm, f"weight_{part}{suffix}").detach()
            for chunk, gate in zip(stored.chunk(4), "ifgo", strict=True):
                assert torch.equal(mats[f"weight_{part}{suffix}[{gate}]"], chunk)
    types = {x.name: x.type for x in plan.layers}
    assert types["weight_ih_l0[f]"] == "lstm.input.f"
    assert types["weight_hh_l1_reverse[o]"] == "lstm.hidden.o"
    # The gates by their letters compute torch's own step (i, f, g, o as PyTorch documents).
    x, h, c = torch.randn(6), torch.randn(5), torch.randn(5)
    bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().chunk(4)
    pre = {
        gate: mats[f"weight_ih_l0[{gate}]"] @ x + mats[f"weight_hh_l0[{gate}]"] @ h + b
        for gate, b in zip("ifgo", bias, strict=True)
    }
    c1 = torch.sigmoid(pre["f"]) * c + torch.sigmoid(pre["i"]) * torch.tanh(pre["g"])
    h1 = torch.sigmoid(pre["o"]) * torch.tanh(c1)
    single = torch.nn.LSTM(6, 5)
    single.load_state_dict({k: getattr(lstm, f"{k}") for k in single.state_dict()})
    _, (torch_h, torch_c) = single(x.view(1, 1, 6), (h.view(1, 1, 5), c.view(1, 1, 5)))
    assert torch.allclose(h1, torch_h.view(5), atol=1e-6)
    assert torch.allclose(c1, torch_c.view(5), atol=1e-6)
    assert any("LSTM weight_ih and weight_hh split per gate (i, f, g, o)" in n for n in plan.notes)
    assert any("4 gates of 5 units, read from weight_hh [20, 5]" in n for n in plan.notes)


def test_gru_gates_are_torchs_own_and_compute_its_step(tmp_path: Path) -> None:
    torch.manual_seed(1)
    gru = torch.nn.GRU(6, 5)
    plan, mats = _plan(gru, tmp_path / "gru")
    assert [x.type for x in plan.layers] == [
        *(f"gru.input.{g}" for g in "rzn"),
        *(f"gru.hidden.{g}" for g in "rzn"),
    ]
    for part in ("ih", "hh"):
        stored = getattr(gru, f"weight_{part}_l0").detach()
        for chunk, gate in zip(stored.chunk(3), "rzn", strict=True):
            assert torch.equal(mats[f"weight_{part}_l0[{gate}]"], chunk)
    x, h = torch.randn(6), torch.randn(5)
    b_ih = dict(zip("rzn", gru.bias_ih_l0.detach().chunk(3), strict=True))
    b_hh = dict(zip("rzn", gru.bias_hh_l0.detach().chunk(3), strict=True))
    gi = {g: mats[f"weight_ih_l0[{g}]"] @ x + b_ih[g] for g in "rzn"}
    gh = {g: mats[f"weight_hh_l0[{g}]"] @ h + b_hh[g] for g in "rzn"}
    r, z = torch.sigmoid(gi["r"] + gh["r"]), torch.sigmoid(gi["z"] + gh["z"])
    n = torch.tanh(gi["n"] + r * gh["n"])
    _, torch_h = gru(x.view(1, 1, 6), h.view(1, 1, 5))
    assert torch.allclose((1 - z) * n + z * h, torch_h.view(5), atol=1e-6)


def test_a_plain_rnn_and_a_projected_lstm(tmp_path: Path) -> None:
    torch.manual_seed(2)
    plan, mats = _plan(torch.nn.RNN(6, 5), tmp_path / "rnn")
    assert [(x.name, x.type) for x in plan.layers] == [
        ("weight_ih_l0", "rnn.input"),
        ("weight_hh_l0", "rnn.hidden"),
    ]
    assert {s.name: s.reason for s in plan.skipped} == {"bias_ih_l0": "bias", "bias_hh_l0": "bias"}
    lstm = torch.nn.LSTM(6, 5, proj_size=3)  # weight_hh (4·5, 3), weight_hr (3, 5)
    plan, mats = _plan(lstm, tmp_path / "proj")
    types = [x.type for x in plan.layers]
    assert types.count("lstm.projection") == 1 and len(types) == 9
    assert torch.equal(mats["weight_hh_l0[g]"], lstm.weight_hh_l0.detach()[10:15])
    assert plan.fed_by()["weight_hh_l0[i]"] == ["weight_hr_l0"]
    assert any("(gates·hidden, proj)" in n for n in plan.notes)


def test_recurrent_weights_whose_gates_cannot_be_read_are_audited_whole(
    write_checkpoint,  # type: ignore[no-untyped-def]
) -> None:
    folder = write_checkpoint(
        {"rnn.weight_ih_l0": torch.randn(10, 6), "rnn.weight_hh_l0": torch.randn(10, 4)}
    )
    plan = check_family("generic", folder)
    assert [(x.name, x.type, x.rows) for x in plan.layers] == [
        ("rnn.weight_ih_l0", "recurrent.input", None),
        ("rnn.weight_hh_l0", "recurrent.hidden", None),
    ]
    assert any("audited whole (weight_hh [10, 4]: 10 rows are not" in n for n in plan.notes)


# -- CRNN ------------------------------------------------------------------------------------


def _steps(plan: LayerPlan) -> list[str]:
    """The first layer at each depth, in depth order."""
    first: dict[int, str] = {}
    for layer in plan.layers:
        first.setdefault(layer.depth, layer.name)
    return [first[d] for d in sorted(first)]


def test_a_crnn_runs_convolutions_then_recurrent_layers_then_its_classifier(
    tmp_path: Path,
) -> None:
    torch.manual_seed(3)
    model = producers.CRNN()
    assert model(torch.randn(2, 1, 8, 20)).shape == (10, 2, 11)  # a working model
    names = sorted(model.state_dict(), key=natural_key)
    assert names.index("fc.weight") < names.index("rnn.weight_ih_l0")  # names alone mislead
    plan, _ = _plan(model, tmp_path / "crnn")
    assert _steps(plan) == [
        "cnn.0.weight", "cnn.4.weight", "rnn.weight_ih_l0[i]", "rnn.weight_ih_l1[i]", "fc.weight",
    ]  # fmt: skip
    depth = {x.name: x.depth for x in plan.layers}
    assert depth["rnn.weight_hh_l0_reverse[o]"] == depth["rnn.weight_ih_l0[i]"]  # one step
    fed = plan.fed_by()
    assert fed["rnn.weight_ih_l0[g]"] == ["cnn.4.weight"]  # the columns' 16 channels
    layer0 = [x.name for x in plan.layers if x.depth == depth["rnn.weight_ih_l0[i]"]]
    assert sorted(fed["rnn.weight_ih_l1[f]"]) == sorted(layer0)  # both directions, all gates
    assert sorted(fed["rnn.weight_hh_l1[f]"]) == [f"rnn.weight_ih_l1[{g}]" for g in "fgio"]
    assert len(fed["fc.weight"]) == 16
    assert plan.widths == [1, 8, 16, 24, 24, 11]
    assert "convolutions first, then recurrent layers" in plan.depth_note


def test_the_classic_crnn_puts_each_lstm_before_its_own_linear(tmp_path: Path) -> None:
    torch.manual_seed(4)
    plan, _ = _plan(producers.ClassicCRNN(), tmp_path / "classic")
    assert _steps(plan) == [
        "cnn.conv0.weight", "cnn.conv1.weight", "rnn.0.rnn.weight_ih_l0[i]",
        "rnn.0.embedding.weight", "rnn.1.rnn.weight_ih_l0[i]", "rnn.1.embedding.weight",
    ]  # fmt: skip
    # ``embedding`` is a Linear here (it has a bias; an nn.Embedding has none): audited.
    assert {x.name: x.type for x in plan.layers}["rnn.1.embedding.weight"] == "embedding"


def test_an_ocr_training_pickle_is_audited_in_crnn_order(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = producers.CRNN()
    path = producers.crnn_pickle(tmp_path / "ocr" / "model.pth", model)
    report = _measure_json(path, tmp_path / "cache", "--allow-pickle")
    assert report["family"]["name"] == "generic"
    note = report["source"]["selection"]
    assert "'model_state_dict'" in note and "not audited: cer, char2idx, epoch" in note
    fitted = [x for x in report["layers"] if x.get("digest")]
    assert fitted[0]["name"] == "cnn.0.weight" and fitted[-1]["name"] == "fc.weight"
    assert [x["depth"] for x in fitted] == sorted(x["depth"] for x in fitted)
    groups = {x["name"]: x["group"] for x in fitted}
    assert groups["cnn.0.weight"] == "bottom" and groups["fc.weight"] == "top"


@pytest.mark.slow
def test_a_real_ocr_model_shipped_on_pypi(tmp_path: Path) -> None:
    """khmer-ocr-ocm ships a trained CRNN (7 convolutions, a 2-layer bidirectional LSTM of 256
    units, a 984-class head) as ``{'model_state_dict', 'char2idx', 'epoch', 'cer', …}``."""
    spec = importlib.util.find_spec("khmer_ocr_ocm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("khmer-ocr-ocm is not installed (pip install khmer-ocr-ocm)")
    path = Path(next(iter(spec.submodule_search_locations))) / "assets" / "model.pth"
    cache = tmp_path / "cache"
    out = tmp_path / "inspect.json"
    proc = run_cli(
        "inspect", str(path), "--allow-pickle", "--cache-dir", str(cache), "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads(out.read_text())
    assert found["family"]["name"] == "generic"
    steps: dict[int, str] = {}
    for layer in found["layers"]:
        steps.setdefault(layer["depth"], layer["name"])
    order = [steps[d] for d in sorted(steps)]
    assert order[:7] == [f"cnn.{i}.weight" for i in (0, 5, 10, 13, 18, 21, 26)]
    assert order[7:] == ["rnn.weight_ih_l0[i]", "rnn.weight_ih_l1[i]", "fc.weight"]
    assert len(found["layers"]) == 7 + 2 * 2 * 2 * 4 + 1
    assert found["structure"]["widths"] == [1, 64, 128, 256, 256, 512, 512, 512, 512, 512, 984]
    report = dynaudit.measure(
        path,
        sources=SourceOptions(allow_pickle=True, cache_dir=cache),
        layers=r"cnn\.0\.|weight_hh_l1_reverse\[f\]|fc\.",
        cache=False,
        **FAST,
    )
    assert report.source.selection is not None
    assert report.source.selection.startswith("the model weights under 'model_state_dict'")
    assert "char2idx" in report.source.selection and "cer" in report.source.selection
    measured = {x.name: x for x in report.measured}
    assert set(measured) == {"cnn.0.weight", "rnn.weight_hh_l1_reverse[f]", "fc.weight"}
    assert measured["rnn.weight_hh_l1_reverse[f]"].type == "lstm.hidden.f"
    assert measured["rnn.weight_hh_l1_reverse[f]"].shape == [256, 256]
    assert all(x.mean_distance is not None for x in measured.values())
