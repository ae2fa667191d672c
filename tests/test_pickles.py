"""--allow-pickle: plain weights read through torch.load(weights_only=True), nothing executed."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

import dynaudit
from dynaudit.errors import PickleRefused
from dynaudit.sources import SourceOptions
from tests import producers
from tests.cli import run_cli
from tests.hubserver import LocalHub

FAST = {"q_dim": 16, "pieces": 4, "steps": 40}


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same tiny LLaMA twice: safetensors from save_pretrained, and a pickle from
    torch.save(state_dict) as training scripts write it, in two shards with an index."""
    from transformers import LlamaForCausalLM

    safe = producers.llama(tmp_path_factory.mktemp("safe"), dtype=torch.float32, shards=False)
    pickled = tmp_path_factory.mktemp("pickled")
    state = LlamaForCausalLM.from_pretrained(safe).state_dict()
    names = sorted(state)
    halves = {
        "pytorch_model-00001-of-00002.bin": names[::2],
        "pytorch_model-00002-of-00002.bin": names[1::2],
    }
    weight_map = {}
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, pickled / file)
        weight_map.update(dict.fromkeys(keys, file))
    import json

    (pickled / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (pickled / "config.json").write_text((safe / "config.json").read_text())
    return safe, pickled


def figures(report: Any) -> list[tuple[str, float | None]]:
    return [(layer.name, layer.mean_distance) for layer in report.measured]


def test_pickle_weights_are_read_only_when_allowed(llama_pair: tuple[Path, Path]) -> None:
    safe, pickled = llama_pair
    with pytest.raises(PickleRefused, match="--allow-pickle"):
        dynaudit.measure(pickled, **FAST)
    allowed = SourceOptions(allow_pickle=True)
    report = dynaudit.measure(pickled, sources=allowed, cache=False, **FAST)
    assert report.family.name == "llama"
    assert figures(report) == figures(dynaudit.measure(safe, cache=False, **FAST))
    assert dynaudit.inspect(pickled, sources=allowed).layers == dynaudit.inspect(safe).layers


def test_a_malicious_pickle_runs_nothing_even_when_allowed(tmp_path: Path) -> None:
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {canary}",))

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Evil()}))
    torch.save({"w": Evil()}, folder / "model.pt")
    for target in (folder, folder / "model.pt"):
        proc = run_cli("measure", str(target), "--allow-pickle")
        assert proc.returncode == 3, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "weights_only" in lines[0], proc.stderr
    assert not canary.exists()


def test_the_refusal_gives_the_unpicklers_reason(tmp_path: Path) -> None:
    """Regression: with torch 2.13's message layout the reason was lost — "refused it ()" for a
    raw pickle, "(not a weights file)" for a torch.save file calling os.system."""

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("true",))

    allowed = SourceOptions(allow_pickle=True)
    torch.save({"w": Evil()}, tmp_path / "model.pt")
    with pytest.raises(PickleRefused, match=r"\(Trying to load unsupported GLOBAL posix\.system"):
        dynaudit.measure(tmp_path / "model.pt", sources=allowed)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(PickleRefused) as refused:
        dynaudit.measure(raw, sources=allowed)
    assert "()" not in refused.value.message and "Unsupported operand" in refused.value.message


def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    torch.save([torch.ones(2, 2)], tmp_path / "model.pt")
    with pytest.raises(PickleRefused, match="not a state dict"):
        dynaudit.measure(tmp_path / "model.pt", sources=SourceOptions(allow_pickle=True))


def test_tied_weights_convert(tmp_path: Path) -> None:
    shared = torch.randn(8, 4)
    torch.save({"a.weight": shared, "b.weight": shared, "c.weight": torch.randn(4, 8)},
               tmp_path / "pytorch_model.bin")  # fmt: skip
    allowed = SourceOptions(allow_pickle=True)
    for source in (tmp_path, tmp_path / "pytorch_model.bin"):  # a directory, and the file itself
        report = dynaudit.measure(source, sources=allowed, **FAST)
        assert {layer.name for layer in report.measured} >= {"a.weight", "b.weight"}


def test_a_pickle_only_hub_repo_with_allow_pickle(
    hub: LocalHub, llama_pair: tuple[Path, Path]
) -> None:
    safe, pickled = llama_pair
    hub.add("org/pickled-llama", pickled)
    options = SourceOptions(hf_endpoint=hub.url)
    with pytest.raises(PickleRefused, match="--allow-pickle"):
        dynaudit.measure("hf://org/pickled-llama", sources=options, **FAST)
    report = dynaudit.measure(
        "hf://org/pickled-llama",
        sources=SourceOptions(hf_endpoint=hub.url, allow_pickle=True),
        cache=False,
        **FAST,
    )
    assert figures(report) == figures(dynaudit.measure(safe, cache=False, **FAST))


# -- training checkpoints -------------------------------------------------------------------

FAST_FLAGS = ["--q-dim", "16", "--pieces", "4", "--steps", "40"]


class _Net(torch.nn.Module):
    """A small model as a training script defines it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(24, 32)
        self.fc2 = torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _trained() -> tuple[_Net, torch.optim.Adam]:
    """The model and its Adam optimizer after one step, so the optimizer has state."""
    torch.manual_seed(0)
    model = _Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 24)).square().mean().backward()
    optimizer.step()
    return model, optimizer


def _measure_json(path: Path, cache: Path, *flags: str) -> dict[str, Any]:
    import json

    out = cache.parent / "report.json"
    proc = run_cli(
        "measure",
        str(path),
        "--allow-pickle",
        "--cache-dir",
        str(cache),
        *FAST_FLAGS,
        "--json",
        str(out),
        "--quiet",
        *flags,
    )
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def _digests(report: dict[str, Any]) -> dict[str, str]:
    """Each fitted layer's digest of its weights."""
    return {x["name"]: x["digest"] for x in report["layers"] if x.get("digest")}


def test_a_training_loop_checkpoint_is_audited_from_its_model_state_dict(tmp_path: Path) -> None:
    model, optimizer = _trained()
    path = tmp_path / "checkpoint.pt"
    torch.save(
        {
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "epoch": 5,
            "cer": 0.031,
            "char2idx": {"a": 1, "b": 2},
        },
        path,
    )
    report = _measure_json(path, tmp_path / "cache")
    assert {layer["name"] for layer in report["layers"]} == set(model.state_dict())
    note = report["source"]["selection"]
    assert "'model_state_dict'" in note and "optimizer_state_dict" in note and "epoch" in note
    plain = tmp_path / "plain" / "model.pt"
    plain.parent.mkdir()
    torch.save(model.state_dict(), plain)
    same = _measure_json(plain, tmp_path / "cache")
    assert "selection" not in same["source"]
    assert _digests(same) == _digests(report)  # the same weights, whole


def test_a_lightning_ckpt_loses_its_model_prefix(tmp_path: Path) -> None:
    model, optimizer = _trained()
    path = tmp_path / "epoch=3-step=120.ckpt"
    torch.save(
        {
            "epoch": 3,
            "global_step": 120,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "loops": {},
            "callbacks": {},
            "optimizer_states": [optimizer.state_dict()],
            "lr_schedulers": [],
            "hyper_parameters": {"lr": 1e-3},
        },
        path,
    )
    report = _measure_json(path, tmp_path / "cache")
    assert {layer["name"] for layer in report["layers"]} == set(model.state_dict())
    note = report["source"]["selection"]
    assert "'state_dict'" in note and "Lightning" in note and "'model.' removed" in note


def test_the_state_dict_key_picks_explicitly_and_the_default_order_decides(
    tmp_path: Path,
) -> None:
    model, _ = _trained()
    ema = {k: v * 0.5 for k, v in model.state_dict().items()}
    path = tmp_path / "both.pt"
    torch.save({"ema": ema, "model": model.state_dict(), "step": 10}, path)
    chosen = _measure_json(path, tmp_path / "cache")
    assert "'model'" in chosen["source"]["selection"]  # model before ema: STATE_DICT_KEYS
    picked = _measure_json(path, tmp_path / "cache", "--state-dict-key", "ema")
    assert "'ema'" in picked["source"]["selection"]
    # a different key is converted afresh, not read from the other key's conversion
    assert picked["source"]["files"] != chosen["source"]["files"]
    assert _digests(picked).keys() == _digests(chosen).keys()
    assert set(_digests(picked).values()).isdisjoint(_digests(chosen).values())
    converted = list((tmp_path / "cache" / "pickles").iterdir())
    assert len(converted) == 2


def test_an_unknown_state_dict_key_is_exit_3_listing_the_keys(tmp_path: Path) -> None:
    model, optimizer = _trained()
    path = tmp_path / "checkpoint.pt"
    state = {"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()}
    torch.save({**state, "epoch": 5}, path)
    for key, reason in (("weights", "no such key"), ("epoch", "not a mapping")):
        proc = run_cli(
            "measure",
            str(path),
            "--allow-pickle",
            "--state-dict-key",
            key,
            "--cache-dir",
            str(tmp_path / "cache"),
        )
        assert proc.returncode == 3, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and reason in lines[0], proc.stderr
        assert "model_state_dict, optimizer_state_dict, epoch" in lines[0]


def test_a_checkpoint_without_a_state_dict_names_its_keys(tmp_path: Path) -> None:
    torch.save({"epoch": 1, "weights": [torch.ones(2, 2)]}, tmp_path / "model.pt")
    with pytest.raises(PickleRefused, match=r"its keys: epoch, weights\).*--state-dict-key"):
        dynaudit.measure(tmp_path / "model.pt", sources=SourceOptions(allow_pickle=True))


def test_a_malicious_training_checkpoint_runs_nothing(tmp_path: Path) -> None:
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {canary}",))

    model, _ = _trained()
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": model.state_dict(), "callbacks": {"x": Evil()}}, path)
    proc = run_cli("measure", str(path), "--allow-pickle", "--state-dict-key", "state_dict")
    assert proc.returncode == 3, proc.stderr
    assert "weights_only" in proc.stderr and not canary.exists()


def test_inspect_names_the_training_checkpoints_key(tmp_path: Path) -> None:
    """inspect says where the weights were found, as measure's report does."""
    model, _ = _trained()
    path = tmp_path / "checkpoint.pt"
    torch.save({"model_state_dict": model.state_dict(), "epoch": 5}, path)
    out = tmp_path / "inspect.json"
    shown = run_cli(
        "inspect", str(path), "--allow-pickle", "--cache-dir", str(tmp_path / "cache"),
        "--json", str(out),
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    said = "the model weights under 'model_state_dict' of a training checkpoint"
    assert f"weights: {said}" in " ".join(shown.stdout.split())
    assert json.loads(out.read_text())["selection"].startswith(said)
