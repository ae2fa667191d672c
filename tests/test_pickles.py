"""--allow-pickle: plain weights read through torch.load(weights_only=True), nothing executed."""

from __future__ import annotations

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
